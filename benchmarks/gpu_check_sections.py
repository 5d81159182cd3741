"""benchmarks/gpu_check.py's sections, each a function of the run's Check that returns its metrics, in the order
they run (SECTIONS), with the GPU's targets beside the figures."""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from gpu_check_measures import Check, ResNet, Trainer, metric, sync, vgg16
from hardware_peak import conv_reference, conv_text, matmul_peak

from dualtask.core import names
from dualtask.experiment import pipeline as dualtask
from dualtask.lesion import engine, greedy, rankings
from dualtask.model import network
from dualtask.model import sites as sites_mod
from dualtask.training import trainer as trainer_mod

SECTIONS = ("peak", "data", "train_vgg16", "train_resnet50", "prepare", "suffix_sweep", "ranking_precision",
            "greedy")
GREEDY_TARGET_H = 4.0
SUFFIX_TARGET_PEAK = 0.5
VGG_TARGET_PEAK = 0.4
RESNET_TARGET_IPS = 3000.0
AGREE_TARGET_GPU = 0.999  # bf16 suffix passes round differently from whole-network ones (other batch shapes)


def section_peak(ck: Check) -> list:
    """The matrix-product peak, bf16 on CUDA (what autocast computes in) and fp32 on the CPU, and a 3x3
    convolution of a VGG middle layer (hardware_peak.py, shared with lesion_speed.py)."""
    n, reps = ck.S["matmul"], ck.S["matmul_reps"]
    ck.peak = matmul_peak(ck.device, n, reps)
    batch = 8 if ck.args.tiny else 64
    ck.conv_rate = conv_reference(ck.device, batch=batch, reps=reps)
    name = "bf16" if ck.gpu else "fp32"
    return [metric(f"matmul peak ({name}, {n}^3)", ck.peak / 1e12, "TFLOP/s"),
            metric(f"{conv_text(batch)} ({name})", ck.conv_rate / 1e12, "TFLOP/s")]


def upsample(images: np.ndarray, size: int, device: torch.device, chunk: int = 512) -> np.ndarray:
    """(N, h, w, 3) uint8 -> (N, size, size, 3) uint8, bilinear, in chunks on the device."""
    out = np.empty((len(images), size, size, 3), np.uint8)
    for start in range(0, len(images), chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + chunk])).to(device)
        y = F.interpolate(x.permute(0, 3, 1, 2).float(), size=(size, size), mode="bilinear", align_corners=False)
        out[start:start + chunk] = y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return out


def section_data(ck: Check) -> list:
    """The demo faces and objects, enough training images per task for the greedy section's ranking images
    (the demo keeps 70% of a class for training)."""
    size = ck.S["image_size"]
    config = ck.config(vgg16)
    config.update(image_size=min(size, 64), max_per_class=None,
                  demo_per_class=int(math.ceil(ck.S["greedy_images"] / 10 / 0.7)) + 1)
    datasets = dualtask.load_datasets(config)
    for data in datasets.values():
        if data.image_size != size:
            data.images = upsample(data.images, size, ck.device)
    ck.images = {t: trainer_mod.TaskImages(d, ck.device) for t, d in datasets.items()}
    return [metric(f"{t} images (train / val / test)", "/".join(str(v) for v in d.counts().values()),
                   f"at {size} px") for t, d in datasets.items()]


def section_train(ck: Check, script, name: str) -> list:
    S = ck.S
    config = ck.config(script)
    model = network.build_model(config, ck.num_classes()).to(ck.device)
    total = S["warmup_steps"] + S["timed_steps"] + (S["prepare_steps"] if script is vgg16 else 0)
    trainer = Trainer(model, ck.need_images(), config, ck.device, total)
    for _ in range(S["warmup_steps"]):
        trainer.step()
    ips = trainer.images_per_second(S["timed_steps"])
    flops = 3 * trainer.forward_flops_per_image()  # forward + backward: about 3 forwards
    share = flops * ips / ck.peak if ck.peak else None
    if script is vgg16:
        ck.trainer = trainer  # the prepare section trains it on
    rows = [metric(f"{name} training throughput", ips, "img/s",
                   f">= {RESNET_TARGET_IPS:.0f} img/s" if script is ResNet else None,
                   ck.judged(ips >= RESNET_TARGET_IPS) if script is ResNet else None,
                   batch=trainer.batch, steps=S["timed_steps"], optimizer=trainer_mod.optimizer_name(config)),
            metric(f"{name} training FLOPs per image (3 x forward)", flops / 1e9, "GFLOP")]
    rows.append(metric(f"{name} training % of matmul peak", None if share is None else 100 * share, "%",
                       f">= {100 * VGG_TARGET_PEAK:.0f}%" if script is vgg16 else None,
                       ck.judged(share is not None and share >= VGG_TARGET_PEAK) if script is vgg16 else None))
    return rows


def section_prepare(ck: Check) -> list:
    """Train the VGG16 on for prepare_steps or prepare_s seconds, whichever comes first."""
    S = ck.S
    if ck.trainer is None:
        config = ck.config(vgg16)
        model = network.build_model(config, ck.num_classes()).to(ck.device)
        ck.trainer = Trainer(model, ck.need_images(), config, ck.device, S["prepare_steps"])
    trainer, steps, start = ck.trainer, 0, time.perf_counter()
    while steps < S["prepare_steps"] and time.perf_counter() - start < S["prepare_s"]:
        trainer.step()
        steps += 1
        if steps % 20 == 0:  # keep the clock honest: the GPU may run behind the queued steps
            sync(ck.device)
    sync(ck.device)
    seconds = time.perf_counter() - start
    model = trainer.model.to(memory_format=torch.contiguous_format).eval()  # as dualtask.train leaves it
    ck.trainer, ck.model, ck.model_note = None, model, f"trained {S['warmup_steps'] + S['timed_steps'] + steps} steps"
    val = trainer_mod.evaluate(model, ck.need_images(), "val")
    rows = [metric("prepare: training steps", steps, f"x {trainer.batch} images in {seconds:.0f} s")]
    for t, v in val.items():
        rows.append(metric(f"prepare: {t} validation accuracy", v["accuracy"],
                           f"(chance {ck.images[t].data.chance:.2f})"))
    return rows


def chosen_sites(model, depths) -> list:
    sites = sites_mod.lesion_sites(model)
    return [sites[d] for d in depths if -len(sites) <= d < len(sites)]


def per_pass_text(mpp: dict) -> str:
    low, high = min(mpp.values()), max(mpp.values())
    return f"{low} lesion(s) per pass" if low == high else f"{low} to {high} lesions per pass by site"


def random_lesions(site, count: int, rng) -> list:
    fractions = (0.05, 0.1, 0.2, 0.5)
    return [np.sort(rng.choice(site.n_filters, max(1, int(round(fractions[i % 4] * site.n_filters))),
                               replace=False)) for i in range(count)]


def compare_results(fast: list, naive: list) -> dict:
    """How far the suffix sweep's results are from the naive sweep's (every lesion, task and image)."""
    pairs = [(a[t], b[t]) for f, n in zip(fast, naive) for a, b in zip(f, n) for t in a]
    return {"equal": all(np.array_equal(a["correct"], b["correct"]) and np.array_equal(a["loss"], b["loss"])
                         for a, b in pairs),
            "agree": float(np.mean(np.concatenate([a["correct"] == b["correct"] for a, b in pairs]))),
            "max_acc": max(abs(float(a["correct"].mean()) - float(b["correct"].mean())) for a, b in pairs),
            "max_loss": max(float(np.abs(a["loss"] - b["loss"]).max()) for a, b in pairs)}


def timed(ck: Check, fn):
    sync(ck.device)
    start = time.perf_counter()
    out = fn()
    sync(ck.device)
    return out, time.perf_counter() - start


def section_suffix_sweep(ck: Check) -> list:
    """The same random lesions (5-50% of a site) at a few sites, both sweeps, every test image sampled."""
    S = ck.S
    model, note = ck.lesion_model()
    sites = chosen_sites(model, S["sweep_sites"])
    batches = engine.image_batches(ck.need_images(), "test", n_per_task=S["sweep_images"], seed=0, compact=True)
    n_images = sum(len(y) for _, _, y in batches)
    rng = np.random.default_rng(0)
    lesions = {s.name: random_lesions(s, S["sweep_lesions"], rng) for s in sites}
    mpp = engine.masks_per_pass_by_site(model, sites, batches)
    warm = [batches[0], batches[-1]]  # first calls (kernel choice, allocations) out of the timing
    for s in sites:
        engine.evaluate_lesions(model, s, lesions[s.name][:mpp[s.name]], warm, masks_per_pass=mpp[s.name])
        engine.evaluate_lesions_naive(model, s, lesions[s.name][:1], warm)
    fast, t_fast = timed(ck, lambda: [engine.evaluate_lesions(model, s, lesions[s.name], batches,
                                                              masks_per_pass=mpp[s.name]) for s in sites])
    naive, t_naive = timed(ck, lambda: [engine.evaluate_lesions_naive(model, s, lesions[s.name], batches)
                                        for s in sites])
    cmp = compare_results(fast, naive)
    flops = ck.flops(model, sites)
    work = sum(n_images * (flops[s.name][0] + len(lesions[s.name]) * flops[s.name][1]) for s in sites)
    naive_work = sum(n_images * len(lesions[s.name]) * sum(flops[s.name]) for s in sites)
    rate = work / t_fast
    share = rate / ck.peak if ck.peak else None
    agree_ok = cmp["equal"] if not ck.gpu else cmp["agree"] >= AGREE_TARGET_GPU
    n_lesions = sum(len(v) for v in lesions.values())
    return [
        metric("lesions x images", f"{n_lesions} x {n_images}", f"({len(sites)} sites, {per_pass_text(mpp)})",
               model=note, sites=[s.name for s in sites]),
        metric("naive sweep", t_naive, "s"),
        metric("suffix sweep", t_fast, "s"),
        metric("speedup (naive / suffix)", t_naive / t_fast, "x", ideal=naive_work / work),
        metric("ideal speedup (FLOPs naive / suffix)", naive_work / work, "x"),
        metric("results equal (every image's correctness and loss)", cmp["equal"], "",
               "yes on the CPU (float32)", None if ck.gpu else cmp["equal"]),
        metric("predictions agree", 100 * cmp["agree"], "% of image-lesion pairs",
               f">= {100 * AGREE_TARGET_GPU:.1f}%" if ck.gpu else "100%", agree_ok),
        metric("max |accuracy difference|", cmp["max_acc"], ""),
        metric("max |loss difference|", cmp["max_loss"], ""),
        metric("suffix sweep achieved", rate / 1e12, "TFLOP/s", flops=work),
        metric("suffix sweep % of matmul peak", None if share is None else 100 * share, "%",
               f">= {100 * SUFFIX_TARGET_PEAK:.0f}%", ck.judged(share is not None and share >= SUFFIX_TARGET_PEAK)),
        metric("suffix sweep % of the 3x3 conv's rate", 100 * rate / ck.conv_rate if ck.conv_rate else None, "%"),
    ]


def section_ranking_precision(ck: Check) -> list:
    """Loss rankings of a few sites in fp32 (TF32 allowed) and in bf16, on the same ranking images."""
    S = ck.S
    model, note = ck.lesion_model()
    sites = chosen_sites(model, S["rank_sites"])
    batches = engine.image_batches(ck.need_images(), "train", n_per_task=S["rank_images"], seed=0, compact=True)
    tasks = list(ck.images)
    mpp = engine.masks_per_pass_by_site(model, sites, batches)
    rows = []
    for site in sites:
        for how in names.RANKING_PRECISIONS:  # first calls out of the timing
            engine.evaluate_lesions(model, site, [[0]], batches[:1], precision=how)
        rank = {}
        seconds = {}
        for how in names.RANKING_PRECISIONS:
            rank[how], seconds[how] = timed(ck, lambda how=how: rankings.rank_site(
                model, site, batches, tasks, ["loss"], masks_per_pass=mpp[site.name], precision=how))
        a, b = rank["fp32"]["loss"], rank["bf16"]["loss"]
        spearman = {t: rankings.rank_correlation(a[t]["by_channel"], b[t]["by_channel"]) for t in tasks}
        overlap = {t: rankings.top_overlap(a[t]["order"], b[t]["order"], 0.2) for t in tasks}
        same = rankings.same_top_sets(rank["fp32"], rank["bf16"], ["loss"], tasks, 0.2)
        where = f"{site.name} ({site.n_filters})"
        rows += [metric(f"{where} spearman fp32 vs bf16 (worst task)", min(spearman.values()), "",
                        per_task=spearman, model=note),
                 metric(f"{where} top-20% overlap (worst task)", min(overlap.values()), "", per_task=overlap),
                 metric(f"{where} same top-20% sets, every task", all(same.values()), "",
                        "yes: bf16 used (the project's check)", None, per_task=same),
                 metric(f"{where} fp32 / bf16 ranking time", f"{seconds['fp32']:.1f} / {seconds['bf16']:.1f}", "s",
                        speedup=seconds["fp32"] / seconds["bf16"])]
    return rows


def greedy_steps_of(site, stop: float) -> list:
    """[remaining filters at each greedy step] of a whole ranking (as benchmarks/greedy_speed.py counts)."""
    step = max(1, int(round(greedy.GREEDY_STEP * site.n_filters)))
    return [site.n_filters - s * step for s in range(greedy.greedy_chosen(site.n_filters, stop) // step)]


def project_greedy(all_sites, factors: dict, flops: dict, n_images: int, stop: float, tasks: int) -> dict:
    """{site: projected seconds of its whole ranking for every task}. A measured site's factor is its time over
    the candidate-image suffix FLOPs of the steps it ran (one number that folds in racing's savings, the
    first-order and prefix passes, and how well the GPU runs that site's shapes); every site takes the factor of
    the nearest measured site in depth."""
    measured = {s.depth: factors[s.name] for s in all_sites if s.name in factors}
    out = {}
    for site in all_sites:
        depth = min(measured, key=lambda d: (abs(d - site.depth), d))
        out[site.name] = tasks * measured[depth] * sum(greedy_steps_of(site, stop)) * n_images * flops[site.name][1]
    return out


def probe_seconds(model, site, batches, task: str, precision: str, mpp: int) -> float:
    """Seconds per candidate-image evaluation at a site (the exhaustive rate): a few single-filter lesions on one
    batch of ranking images, after one untimed call."""
    first = [next(b for b in batches if b[0] == task)]
    images = greedy.RankingImages(model, site, first, task, precision, mpp)
    images.losses([[0]])
    count = min(site.n_filters, max(2 * mpp, 4))
    device = first[0][1].device
    sync(device)
    start = time.perf_counter()
    images.losses([[c] for c in range(count)])
    sync(device)
    return (time.perf_counter() - start) / (count * images.n)


def section_greedy(ck: Check) -> list:
    """Racing greedy for greedy_steps steps at each of greedy_sites (the first task), then the projection. Before
    each site its cost is predicted (the probe's rate, the share of evaluations racing kept at the site before,
    all of them at the first, and one first-order pass forward and back per image and step); a site predicted to
    end past greedy_s runs fewer steps, or is left out (except the first, which runs at least one step, so that a
    slow or loaded machine still gives a projection)."""
    S, start = ck.S, time.perf_counter()
    deadline = min(start + S["greedy_s"], ck.t0 + ck.args.limit_s)
    model, note = ck.lesion_model()
    config = ck.config(vgg16)
    g = dict(greedy.GREEDY_DEFAULTS, **greedy.greedy_settings(config))
    precision = ck.args.greedy_precision or config.get("ranking_precision", "fp32")
    all_sites = sites_mod.lesion_sites(model)
    sites = chosen_sites(model, S["greedy_sites"])
    batches = engine.image_batches(ck.need_images(), "train", n_per_task=S["greedy_images"], seed=0, compact=True)
    task = list(ck.images)[0]
    n_images = sum(len(y) for t, _, y in batches if t == task)
    flops = ck.flops(model, all_sites)
    per_pass = engine.masks_per_pass_by_site(model, sites, batches)
    factors, rows, kept = {}, [], 1.0
    for site in sites:
        remaining, step = greedy_steps_of(site, g["stop"]), max(1, int(round(greedy.GREEDY_STEP * site.n_filters)))
        mpp = per_pass[site.name]
        per_eval = probe_seconds(model, site, batches, task, precision, mpp)
        k = min(S["greedy_steps"], len(remaining))
        # the first site runs one step whatever the clock says (the projection needs one measurement); the
        # rest fit the time left
        floor = 0 if factors else 1
        while k > floor and time.perf_counter() + per_eval * n_images * (kept * sum(remaining[:k]) + 3 * k) > deadline:
            k -= 1
        if k == 0:
            rows.append(metric(f"{site.name} ({site.n_filters})", "left out", "predicted past the time budget",
                               us_per_evaluation=1e6 * per_eval))
            continue
        stats = {}
        _, seconds = timed(ck, lambda: greedy.greedy_order(
            model, site, batches, task, stop_fraction=(k * step - 0.5) / site.n_filters, masks_per_pass=mpp,
            racing=g["racing"], margin=g.get("margin", greedy.GREEDY_DEFAULTS["margin"]), candidates=g["candidates"],
            precision=precision, stats=stats))
        done = stats.get("steps", k)
        exhaustive = sum(remaining[:done]) * n_images
        kept = stats.get("evaluations", exhaustive) / exhaustive
        factors[site.name] = seconds / (exhaustive * flops[site.name][1])
        rows.append(metric(f"{site.name} ({site.n_filters}) s per greedy step", seconds / done, "s",
                           steps=done, seconds=seconds, evaluations=stats.get("evaluations"),
                           first_order_images=stats.get("first_order_images"), us_per_evaluation=1e6 * per_eval,
                           exhaustive_s_per_step=per_eval * exhaustive / done))
        rows.append(metric(f"{site.name} racing kept", 100 * kept, "% of candidate-image evaluations"))
    if not factors:
        raise RuntimeError("no greedy site could be measured within the time budget")
    projected = project_greedy(all_sites, factors, flops, n_images, g["stop"], len(ck.images))
    hours = sum(projected.values()) / 3600
    rows.insert(0, metric("ranking images per task, precision", f"{n_images}, {precision}",
                          f"(racing {g['racing']}, margin {g.get('margin')})", model=note, settings=g))
    rows.append(metric(f"projected whole greedy ranking ({len(all_sites)} sites, {len(ck.images)} tasks)", hours,
                       "h", f"< {GREEDY_TARGET_H:g} h", ck.judged(hours < GREEDY_TARGET_H),
                       per_site_s={k: round(v, 1) for k, v in projected.items()}))
    return rows


SECTION_FUNCTIONS = {
    "peak": section_peak, "data": section_data,
    "train_vgg16": lambda ck: section_train(ck, vgg16, "VGG16-BN"),
    "train_resnet50": lambda ck: section_train(ck, ResNet, "ResNet50"),
    "prepare": section_prepare, "suffix_sweep": section_suffix_sweep,
    "ranking_precision": section_ranking_precision, "greedy": section_greedy,
}
