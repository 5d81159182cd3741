"""Looking inside a trained run: Grad-CAM per head, preferred stimuli of task-ranked filters, and layer-wise
linear decoding. Each analysis writes plain files into the run folder (PNG, CSV, NPZ) so that report.py can
rebuild the report from the files alone.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dualtask.core.common import write_csv, write_text
from dualtask.data import loading as vggface2
from dualtask.data import taskdata, transforms
from dualtask.lesion import engine
from dualtask.lesion.readouts import ALPHAS
from dualtask.model import branches
from dualtask.model import sites as sites_mod
from dualtask.model.graph import GraphTrunk
from dualtask.report import figures

# ----------------------------------------------------------------------------------------------------------
# Grad-CAM


def gradcam(model: nn.Module, x: torch.Tensor, site: sites_mod.Site, task: str, classes=None) -> torch.Tensor:
    """Grad-CAM maps (B, H, W) in [0, 1] of `task`'s head for normalised images x, at a site's output.

    The map is ReLU(sum_c w_c A_c) with w_c the spatial mean of d score / d A_c, where the score is the
    head's logit of `classes` (default: its predicted class), upsampled to the image size."""
    model.eval()
    store = {}

    def keep(module, inputs, output):
        output.retain_grad()
        store["a"] = output

    handle = site.module.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(x.detach().requires_grad_(False))[task].float()
            target = logits.argmax(1) if classes is None else torch.as_tensor(classes, device=x.device)
            logits.gather(1, target[:, None]).sum().backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    a, g = store["a"].detach().float(), store["a"].grad.float()
    cam = F.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(1).values.clamp(min=1e-12)
    return cam / peak[:, None, None]


def top_region(maps: torch.Tensor, fraction: float = 0.05) -> torch.Tensor:
    """Boolean masks of each map's top `fraction` of pixels (exactly that many; ties broken by position)."""
    flat = maps.flatten(1)
    k = max(1, int(round(fraction * flat.shape[1])))
    region = torch.zeros_like(flat, dtype=torch.bool)
    region.scatter_(1, flat.topk(k, dim=1).indices, True)
    return region.view_as(maps)


@torch.inference_mode()
def default_gradcam_site(model, image_size: int, min_side: int = 4) -> sites_mod.Site:
    """The deepest lesion site whose output still has at least min_side x min_side positions (Grad-CAM at a
    1 x 1 output says nothing about where a head looks)."""
    sites = sites_mod.lesion_sites(model)
    sides = {}
    handles = [s.module.register_forward_hook(lambda m, i, o, name=s.name: sides.__setitem__(name, o.shape[-1]))
               for s in sites]
    try:
        model.eval()(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    wide = [s for s in sites if sides[s.name] >= min_side]
    return wide[-1] if wide else sites[0]


def image_sets(images: dict, split: str = "test", n: int | None = None) -> list:
    """[(label, [tasks], indices)]: each distinct set of `split` images once (the first n of each task's). Tasks
    whose TaskImages hold the very same image array and the same `split` indices (e.g. identity and expression
    labels on the same faces) form one set, labelled with their names joined by '+'."""
    sets = []
    for group in vggface2.shared_groups({t: ti.data for t, ti in images.items()}):
        mine = []
        for task in group:
            idx = images[task].data.indices(split)[:n]
            same = [tasks for tasks, first_idx in mine if np.array_equal(first_idx, idx)]
            if same:
                same[0].append(task)
            else:
                mine.append(([task], idx))
        sets += mine
    return [("+".join(tasks), tasks, idx) for tasks, idx in sets]


def overlap_permutation_test(regions_a: torch.Tensor, regions_b: torch.Tensor, n_perm: int = 2000, seed: int = 0,
                             n_boot: int = 2000) -> dict:
    """Do two heads' regions (boolean (N, H, W), image i of a paired with image i of b) overlap more on the same
    image than when paired with other images?

    The statistic is the mean over images of IoU(a_i, b_i). The null pairs a_i with b_pi(i) for seeded random
    permutations pi of the images (the identity may occur): each head keeps its own spatial prior (a centre
    bias, say) and only the image-by-image correspondence is broken. p is one-sided (overlap above the null)
    with the +1 correction, (1 + #{null >= observed}) / (1 + n_perm); the interval is a 95% bootstrap over
    images. No pixel-wise test. Returns {'mean_iou', 'ci_low', 'ci_high', 'null_mean', 'p', 'n_permutations', 'n'}."""
    if regions_a.shape != regions_b.shape or regions_a.ndim != 3:
        raise ValueError(f"regions of shape {tuple(regions_a.shape)} and {tuple(regions_b.shape)}; expected two "
                         f"boolean (N, H, W) tensors of the same shape")
    a = regions_a.flatten(1).double()
    b = regions_b.flatten(1).double()
    inter = a @ b.T  # (N, N): every head-a map against every head-b map
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter)).numpy()
    n = iou.shape[0]
    paired = np.diag(iou)
    observed = float(paired.mean())
    rng = np.random.default_rng([seed, 1])
    perms = rng.permuted(np.tile(np.arange(n), (n_perm, 1)), axis=1)
    null = iou[np.arange(n)[None, :], perms].mean(1)
    boot = paired[np.random.default_rng([seed, 2]).integers(0, n, (n_boot, n))].mean(1)
    low, high = np.quantile(boot, [0.025, 0.975])
    return {"mean_iou": observed, "ci_low": float(low), "ci_high": float(high), "null_mean": float(null.mean()),
            "p": float((1 + np.sum(null >= observed - 1e-12)) / (1 + n_perm)), "n_permutations": n_perm, "n": n}


OVERLAP_COLUMNS = ("images", "head_a", "head_b", "site", "mean_iou_top5", "ci_low", "ci_high", "null_mean",
                   "p_permutation", "n_permutations", "n")


def gradcam_analysis(model, images: dict, site: sites_mod.Site, out_dir: Path, n_images: int = 64, n_perm: int = 2000,
                     seed: int = 0) -> dict:
    """Per set of test images (a task's, or one set shared by several tasks, computed once): every head's maps,
    their mean per head, and for every pair of heads the overlap (intersection over union) of their top-5%
    regions with a permutation test over images (overlap_permutation_test). Writes gradcam.npz (mean and
    per-image maps under every task's name), gradcam_overlap.csv and figures/gradcam_*.png."""
    tasks = list(images)
    mean_maps, per_image, rows, examples, shown = {}, {}, [], {}, {}
    for label, group, idx in image_sets(images, "test", n_images):
        x, _ = images[group[0]].batch(idx)
        xn = transforms.normalize(x)
        maps = {head: gradcam(model, xn, site, head).cpu() for head in tasks}
        regions = {head: top_region(m) for head, m in maps.items()}
        for i, a in enumerate(tasks):
            for b in tasks[i + 1:]:
                t = overlap_permutation_test(regions[a], regions[b], n_perm, seed)
                rows.append({"images": label, "head_a": a, "head_b": b, "site": site.name,
                             "mean_iou_top5": f"{t['mean_iou']:.4f}", "ci_low": f"{t['ci_low']:.4f}",
                             "ci_high": f"{t['ci_high']:.4f}", "null_mean": f"{t['null_mean']:.4f}",
                             "p_permutation": f"{t['p']:.4g}", "n_permutations": t["n_permutations"], "n": t["n"]})
        mean_image = x.mean(0).permute(1, 2, 0).cpu().numpy()
        for head in tasks:
            shown[f"{label}_images__{head}_head"] = maps[head].mean(0).numpy()
        shown[f"{label}_images__mean_image"] = mean_image
        for task in group:  # the npz keeps a key per task, as before sets were shared
            for head in tasks:
                mean_maps[f"{task}_images__{head}_head"] = shown[f"{label}_images__{head}_head"]
                per_image[f"{task}_images__{head}_head__per_image"] = maps[head].numpy().astype(np.float16)
            mean_maps[f"{task}_images__mean_image"] = mean_image
        examples[label] = (x[:6].permute(0, 2, 3, 1).cpu().numpy(), {h: maps[h][:6].numpy() for h in tasks})
    np.savez_compressed(out_dir / "gradcam.npz", site=site.name, **mean_maps, **per_image)
    write_csv(out_dir / "gradcam_overlap.csv", OVERLAP_COLUMNS, rows)
    return {"figures": figures.gradcam_figures(out_dir, examples, shown, tasks, site.name), "overlap": rows}


# ----------------------------------------------------------------------------------------------------------
# preferred stimuli


RANK_METHODS = ("loss", "greedy", "activation", "taylor")  # the rankings whose top filters are shown, by preference


def _read_rankings(out_dir: Path) -> dict:
    path = Path(out_dir) / "rankings.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _ranked_filters(out_dir: Path, site: sites_mod.Site, tasks: list, n: int, rankings: dict | None = None):
    """(method, {task: top n filters of the site}) from rankings.json (or `rankings`, its contents): the loss
    ranking when there is one, else activation; (None, {}) when the site was not ranked."""
    ranking = (_read_rankings(out_dir) if rankings is None else rankings).get(site.name, {})
    method = next((m for m in RANK_METHODS if m in ranking), None)
    if method is None:
        return None, {}
    return method, {t: ranking[method][t]["order"][:n] for t in tasks if t in ranking[method]}


def resolution_stages(model: nn.Module) -> list:
    """[(stage name, [sites])] of a network traced from its graph: runs of consecutive sites whose feature maps
    have one size, named by it ("16x16")."""
    stages = []
    for site, (_, size) in zip(sites_mod.lesion_sites(model), model.trunk.site_sizes()):  # both in depth order
        name = "x".join(str(d) for d in size)
        if stages and stages[-1][0] == name:
            stages[-1][1].append(site)
        else:
            stages.append((name, [site]))
    seen = [n for n, _ in stages]
    return [(n if seen.count(n) == 1 else f"{n} ({k + 1})", st) for k, (n, st) in enumerate(stages)]


def conv_stages(model: nn.Module) -> list:
    """[(stage name, [lesion sites of the stage in depth order])]. A stage ends at a max-pool (VGG: block1 ..
    block5) or where the sites' parent module changes (ResNet/ResNeXt: the stem, then layer1 .. layer4)."""
    from torchvision.models.resnet import Bottleneck

    if isinstance(getattr(model, "trunk", None), GraphTrunk):  # a network trained elsewhere: its resolution stages
        return resolution_stages(model)
    sites = {s.path: s for s in sites_mod.lesion_sites(model)}  # by module path: a branched site is its pair of copies
    residual = any(isinstance(m, Bottleneck) for m in model.modules())
    stages, current, pooled, parent = [], [], False, None
    for name, module in model.named_modules():
        if isinstance(module, nn.MaxPool2d):
            pooled = True
        if name not in sites:
            continue
        up = name.rsplit(".", 1)[0] if "." in name else ""
        if current and (pooled or up != parent):
            stages.append(current)
            current = []
        current.append(sites[name])
        pooled, parent = False, up
    if current:
        stages.append(current)

    def stage_name(k, stage):
        if not residual:
            return f"block{k + 1}"
        first = stage[0].module
        if not isinstance(first.copies[0] if isinstance(first, branches.BranchPair) else first, Bottleneck):
            return "stem"
        return stage[0].path.rsplit(".", 1)[0].rsplit(".", 1)[-1]

    return [(stage_name(k, st), st) for k, st in enumerate(stages)]


def stage_sites(model: nn.Module) -> list:
    """The last lesion site of every conv stage (conv_stages): VGG's last conv before each max-pool, ResNet's
    stem and the last block of layer1 .. layer4."""
    return [st[-1] for _, st in conv_stages(model)]


def _shared(images: dict) -> tuple:
    """({task: label of its test-image set}, {one task per set: its TaskImages}) of image_sets on the test split."""
    sets = image_sets(images, "test")
    return {t: label for label, tasks, _ in sets for t in tasks}, {tasks[0]: images[tasks[0]] for _, tasks, _ in sets}


@torch.inference_mode()
def top_images(model, images: dict, site: sites_mod.Site, filters: list, n: int = 8, acts: dict | None = None) -> list:
    """Per filter: the n test images (of all tasks, a set shared by several tasks counted once) with the highest
    spatially averaged activation, as (task, index, activation). `acts`: the site's {task: (N, C) activations}
    when already computed (site_activations over the shared sets' test images)."""
    _, distinct = _shared(images)
    if acts is None:
        acts = engine.site_activations(model, [site], engine.image_batches(distinct, "test"))[site.name]
    pool = [(t, i) for t in distinct for i in images[t].data.indices("test")]
    all_acts = np.concatenate([acts[t] for t in distinct])
    out = []
    for f in filters:
        order = np.argsort(-all_acts[:, f], kind="stable")[:n]
        out.append([(pool[k][0], pool[k][1], float(all_acts[k, f])) for k in order])
    return out


class _Reached(Exception):
    """Raised by maximise's hook once the site's output is in hand."""


def maximise(model, site: sites_mod.Site, filters: list, image_size: int, steps: int = 200, seed: int = 0,
             lr: float = 0.05, smooth: float = 0.05, jitter: int = 2) -> np.ndarray:
    """Activation maximisation: an image per filter by gradient ascent from noise on the filter's mean
    activation, with random jitter each step and a total-variation penalty (fixed seed)."""
    device = next(model.parameters()).device
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    x = (0.5 * torch.randn(len(filters), 3, image_size, image_size, generator=gen)).to(device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    store = {}

    def grab(module, inputs, output):
        store["a"] = output
        raise _Reached  # nothing after the site matters: an early site costs a fraction of a full pass

    handle = site.module.register_forward_hook(grab)
    index = torch.arange(len(filters), device=device)
    chosen = torch.as_tensor(filters, device=device)
    try:
        for _ in range(steps):
            dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=gen).tolist()
            shifted = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            with torch.enable_grad():
                try:
                    model(shifted.tanh())
                except _Reached:
                    pass
                a = store["a"].float().clamp(min=0) if store["a"].ndim == 4 else store["a"].float()
                score = a[index, chosen].mean(dim=(1, 2)) if a.ndim == 4 else a[index, chosen]
                tv = (x[:, :, 1:] - x[:, :, :-1]).abs().mean() + (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()
                loss = -score.mean() + smooth * tv * len(filters)
                opt.zero_grad()
                loss.backward()
            opt.step()
    finally:
        handle.remove()
    img = (x.detach().tanh() * taskdata.NORM_STD + taskdata.NORM_MEAN).clamp(0, 1)
    return img.permute(0, 2, 3, 1).cpu().numpy()


def stimuli_analysis(model, images: dict, sites: list, out_dir: Path, n_filters: int = 4, n_images: int = 8,
                     steps: int = 200, seed: int = 0, stages: list | None = None) -> list:
    """For each chosen site: top test images and an activation-maximisation image of its most task-ranked
    filters (rankings.json). Writes figures/stimuli_<site>.png and stimuli.json (every site, with its stage
    name from `stages` when given, and why it was skipped when it was not ranked)."""
    tasks = list(images)
    rankings = _read_rankings(out_dir)
    chosen = [(site, *_ranked_filters(out_dir, site, tasks, n_filters, rankings)) for site in sites]
    ranked_sites = [site for site, _, ranked in chosen if ranked]
    label_of, distinct = _shared(images)
    # one pass over the test images for every site's top images
    acts = engine.site_activations(model, ranked_sites, engine.image_batches(distinct, "test")) if ranked_sites else {}
    written, summary = [], {}
    for k, (site, method, ranked) in enumerate(chosen):
        entry = {"stage": stages[k]} if stages else {}
        if not ranked:
            summary[site.name] = dict(entry, skipped="not ranked in rankings.json (not a lesioned site)")
            continue
        filters = [(t, f) for t in tasks if t in ranked for f in ranked[t]]
        tops = top_images(model, images, site, [f for _, f in filters], n_images, acts=acts[site.name])
        synth = maximise(model, site, [f for _, f in filters], images[tasks[0]].data.image_size, steps, seed)

        def caption(src, i):  # every task that labels the image
            return "; ".join(f"{t}: {images[t].data.classes[images[t].data.labels[i]]}"
                             for t in label_of[src].split("+"))

        grids = [(t, f, [(images[src].data.images[i], caption(src, i)) for src, i, _ in top], synth[j])
                 for j, ((t, f), top) in enumerate(zip(filters, tops))]
        written.append(figures.stimuli_figure(out_dir, site.name, method, grids))
        summary[site.name] = dict(entry, method=method, filters={t: ranked[t] for t in ranked},
                                  top_images={f"{t}:{f}": [label_of[src] for src, _, _ in top]
                                              for (t, f), top in zip(filters, tops)})
    write_text(out_dir / "stimuli.json", json.dumps(summary, indent=1))
    return written


# ----------------------------------------------------------------------------------------------------------
# layer-wise decoding


def linear_probe():
    """The project's linear probe: a scikit-learn ridge classifier on standardised features (closed form, so
    every site of a large network takes seconds), its penalty chosen among readouts.ALPHAS by leave-one-out on
    the images it is fitted on (RidgeClassifierCV): within a cross-validation, on the training folds only."""
    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), RidgeClassifierCV(alphas=ALPHAS))


def decoding_analysis(model, images: dict, sites: list, out_dir: Path, n_per_task: int = 400, folds: int = 5,
                      seed: int = 0) -> Path:
    """Cross-validated linear probes (scikit-learn ridge classifiers on standardised, spatially pooled
    activations: closed form, so every site of a large network takes seconds; each fold's penalty chosen on its
    training folds, `linear_probe`) for each task's labels at each site, on the task's test images. Writes
    decoding.csv."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    batches = engine.image_batches(images, "test", n_per_task=n_per_task, seed=seed)
    acts = engine.site_activations(model, sites, batches)
    labels = {t: torch.cat([y for tb, _, y in batches if tb == t]).cpu().numpy() for t in images}
    rows = []
    for site in sites:
        for task in images:
            y = labels[task]
            k = min(folds, int(np.bincount(y).min()))
            if k < 2:
                continue
            probe = linear_probe()
            scores = cross_val_score(probe, acts[site.name][task], y,
                                     cv=StratifiedKFold(k, shuffle=True, random_state=seed))
            rows.append({"layer": site.name, "depth": site.depth, "task": task, "accuracy": f"{scores.mean():.4f}",
                         "sd": f"{scores.std():.4f}", "folds": k, "n_images": len(y),
                         "chance": f"{1 / len(images[task].data.classes):.4f}"})
    write_csv(out_dir / "decoding.csv", ("layer", "depth", "task", "accuracy", "sd", "folds", "n_images", "chance"),
              rows)
    return out_dir / "decoding.csv"


def _site_for_gradcam(model, images: dict, config: dict) -> sites_mod.Site:
    if config.get("gradcam_site"):
        return sites_mod.get_site(model, config["gradcam_site"])
    return default_gradcam_site(model, images[next(iter(images))].data.image_size)


def gradcam_step(model, images: dict, config: dict, out_dir: Path) -> list:
    """The figures stage's Grad-CAM: every head on every task's first 64 test images."""
    site = _site_for_gradcam(model, images, config)
    print(f"Grad-CAM: {len(images)} heads at {site.name} on up to 64 test images per task", flush=True)
    return gradcam_analysis(model.eval(), images, site, Path(out_dir), seed=config["seed"])["figures"]


def stimuli_sites(model, rankings: dict) -> list:
    """[(stage name, site)]: per conv stage (conv_stages) its last site, or where that site was not lesioned
    (lesion_layers), the stage's deepest site that was (rankings.json); the last site when none was."""
    def ranked(site):
        return any(m in rankings.get(site.name, {}) for m in RANK_METHODS)

    return [(name, next((s for s in reversed(st) if ranked(s)), st[-1])) for name, st in conv_stages(model)]


def stimuli_step(model, images: dict, config: dict, out_dir: Path) -> list:
    """The figures stage's preferred stimuli: at the last site of every conv stage, the filters ranked first for
    each task."""
    chosen = stimuli_sites(model, _read_rankings(out_dir))
    steps = config.get("stimulus_steps", 200)
    print(f"preferred stimuli: top test images and {steps}-step activation maximisation of the 4 filters ranked "
          f"first for each task at the last site of each of {len(chosen)} stages: "
          f"{', '.join(f'{s.name} ({n})' for n, s in chosen)}", flush=True)
    return stimuli_analysis(model.eval(), images, [s for _, s in chosen], Path(out_dir), steps=steps,
                            seed=config["seed"], stages=[n for n, _ in chosen])


def decoding_step(model, images: dict, config: dict, out_dir: Path) -> list:
    """The figures stage's layer-wise decoding: every site, then its figure."""
    sites = sites_mod.lesion_sites(model)
    print(f"layer-wise decoding: cross-validated ridge probes of each task at {len(sites)} sites on up to 400 "
          f"test images per task", flush=True)
    return [decoding_analysis(model.eval(), images, sites, Path(out_dir), seed=config["seed"]),
            figures.decoding_by_depth(Path(out_dir))]


# the analyses of the figures stage that need the model, in the order they run: (name, step)
ANALYSES = (("Grad-CAM", gradcam_step), ("preferred stimuli", stimuli_step), ("decoding", decoding_step))
