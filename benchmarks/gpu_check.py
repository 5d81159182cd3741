"""Every figure that needs a GPU, measured in one prepared run: one table on stdout, the same as JSON.

    python benchmarks/gpu_check.py --out=$OUT/gpu_check.json               # one H200 (see below)
    OMP_NUM_THREADS=1 python benchmarks/gpu_check.py --device=cpu --tiny   # the same code paths at tiny sizes:
                                                                            # 30 s on the 2-core machine

On one H200 the sizes are meant to take about 5 minutes in all (an estimate from the H100 figures in
BENCHMARKS.md: not yet run there), within 8 minutes whatever happens: no section starts after --budget_s (420 s)
and the greedy section fits its sites to 150 s and to --limit_s (450 s) from the start.

Sections, run in this order; each is timed, samples the GPU's utilisation and memory every 0.2 s (from
nvidia-smi; None on the CPU) and records the peak memory PyTorch allocated. A section that
fails records its error and traceback and the others still run; one that would start after --budget_s seconds
is recorded as skipped. No network, no weights: the project's demo data and freshly initialised networks.

  peak               the matrix-product peak every "% of peak" divides by: 8192^3 bf16 on a GPU (fp32 and small
                     on the CPU, which computes in fp32), a few products after warm-up
  data               the demo faces and objects (dualtask.load_datasets, 'demo'), drawn at 64 px and upsampled on
                     the device to 224 px (drawing at 224 takes ten times as long on the CPU: 5 ms an image)
  train_vgg16        images/s of dualtask.train's step (batch augmentation on the device, bf16 autocast and
  train_resnet50     channels_last on CUDA, the project's optimizer, schedule and label smoothing) over timed
                     steps after warm-up; % of peak = 3 x forward FLOPs (FlopCounterMode) x images/s / peak
  prepare            more training of that VGG16 for a fixed time, so that the lesion sections rank a network
                     that has learned something; its validation accuracy
  suffix_sweep       lesion_utils.evaluate_lesions (prefix once, suffix per lesion) against
                     evaluate_lesions_naive on the same lesions at a few sites: seconds, ratio, agreement, and the
                     suffix sweep's FLOP/s (FlopCounterMode per image) as a share of the peak
  ranking_precision  loss rankings (rank_site, "loss") in fp32 and bf16 (ranking_precision): Spearman, top-20%
                     overlap, and the project's bf16 check (the same top-20% sets)
  greedy             racing greedy (the defaults of greedy_settings) for a few steps at a few VGG16 sites on
                     6,400 ranking images per task, projected to the whole ranking (13 sites, both tasks, steps to
                     20%) and compared with the 4-hour target

The targets beside the figures are the GPU's: on the CPU they are shown but not judged (met: -), except the
suffix sweep's agreement with the naive one, which must be exact there.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
from dualtask.config import settings
from dualtask.core import names
from dualtask.data import loading as vggface2
from dualtask.data import transforms  # noqa: E402
from dualtask.experiment import pipeline as dualtask
from dualtask.lesion import engine, greedy, rankings
from dualtask.model import network
from dualtask.model import sites as sites_mod  # noqa: E402
from dualtask.training import trainer as trainer_mod  # noqa: E402

vgg16 = settings.load_script(ROOT / "vgg16.py")
ResNet = settings.load_script(ROOT / "ResNet.py")
from dualtask.core.common import write_text  # noqa: E402
from dualtask.core.device import autocast

# Sizes: on one H200 each section should take 10-90 s (estimated from the H100 figures; greedy, the longest,
# fits itself to greedy_s); --tiny runs the same code on a CPU in seconds.
SIZES = {
    "gpu": dict(image_size=224, fc_width=None, batch_size=256, warmup_steps=5, timed_steps=20,
                prepare_steps=400, prepare_s=45.0, matmul=8192, matmul_reps=50, sweep_sites=(0, 4, 8, 12),
                sweep_lesions=32, sweep_images=1024, rank_sites=(0, 4, 10), rank_images=256,
                greedy_sites=(10, 6, 2), greedy_steps=2, greedy_images=6400, greedy_s=150.0),
    "tiny": dict(image_size=32, fc_width=256, batch_size=8, warmup_steps=1, timed_steps=2,
                 prepare_steps=2, prepare_s=30.0, matmul=1024, matmul_reps=3, sweep_sites=(1, 11),
                 sweep_lesions=3, sweep_images=16, rank_sites=(12,), rank_images=16,
                 greedy_sites=(12, 11), greedy_steps=1, greedy_images=48, greedy_s=30.0),
}
SECTIONS = ("peak", "data", "train_vgg16", "train_resnet50", "prepare", "suffix_sweep", "ranking_precision",
            "greedy")
GREEDY_TARGET_H = 4.0
SUFFIX_TARGET_PEAK = 0.5
VGG_TARGET_PEAK = 0.4
RESNET_TARGET_IPS = 3000.0
AGREE_TARGET_GPU = 0.999  # bf16 suffix passes round differently from whole-network ones (other batch shapes)


# ----------------------------------------------------------------------------------------------------------
# measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _physical_gpu(index: int) -> str:
    """What nvidia-smi and NVML call the GPU PyTorch calls `index` (CUDA_VISIBLE_DEVICES renumbers them)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index] if index < len(visible) else str(index)


class GpuSampler:
    """The GPU's utilisation (%) and used memory (MiB) every `every` seconds in a background thread while a
    section runs, from nvidia-smi; nothing on the CPU or without it."""

    def __init__(self, device: torch.device, every: float = 0.2):
        self.every, self.samples, self.failures = every, [], 0
        self.query = self._query(device) if device.type == "cuda" else None
        self._stop, self._thread = threading.Event(), None

    @staticmethod
    def _query(device: torch.device):
        gpu = _physical_gpu(device.index if device.index is not None else torch.cuda.current_device())
        if shutil.which("nvidia-smi") is None:
            return None

        def smi():
            out = subprocess.run(["nvidia-smi", "-i", gpu, "--query-gpu=utilization.gpu,memory.used",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
            util, used = out.stdout.strip().splitlines()[0].split(",")
            return float(util), float(used)
        return smi

    def _poll(self):
        while True:
            try:
                self.samples.append(self.query())
            except Exception:  # a sample lost is a sample lost; the section goes on
                self.failures += 1
            if self._stop.wait(self.every):
                return

    def start(self) -> None:
        self.samples, self.failures = [], 0
        self._stop.clear()
        if self.query is not None:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if not self.samples:
            return {"gpu_util_mean": None, "gpu_util_max": None, "gpu_mem_used_max_mib": None, "gpu_samples": 0}
        util = [u for u, _ in self.samples]
        return {"gpu_util_mean": round(float(np.mean(util)), 1), "gpu_util_max": float(max(util)),
                "gpu_mem_used_max_mib": float(max(m for _, m in self.samples)), "gpu_samples": len(self.samples)}


def forward_flops(fn) -> int:
    """FLOPs of the matrix products and convolutions `fn()` runs (a multiply-add counts 2)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@torch.inference_mode()
def site_flops(model, sites: list, image_shape, device) -> dict:
    """{site name: (prefix, suffix) FLOPs per image}: one image through SiteRunner's two parts, one lesion."""
    x = torch.zeros((1,) + tuple(image_shape), device=device)
    out = {}
    for site in sites:
        runner = engine.SiteRunner(model, site)
        cached = runner.prefix(x)
        keep, add = engine.lesion_mask([0], site.n_filters)
        out[site.name] = (forward_flops(lambda: runner.prefix(x)),
                          forward_flops(lambda: runner.suffix(cached, keep[None], add[None])))
    return out


def metric(name: str, value, unit: str = "", target: str | None = None, met=None, **detail) -> dict:
    return {"metric": name, "value": value, "unit": unit, "target": target, "met": met,
            **({"detail": detail} if detail else {})}


# ----------------------------------------------------------------------------------------------------------
# the run's shared state


class Check:
    """What the sections share: options, sizes, device, the demo images, the trained VGG16, the peak."""

    def __init__(self, args):
        self.args, self.S = args, dict(SIZES["tiny" if args.tiny else "gpu"])
        self.device = torch.device(args.device)
        self.gpu = self.device.type == "cuda"
        self.t0 = time.perf_counter()
        self.images, self.trainer, self.model, self.peak, self._flops = None, None, None, None, {}

    def judged(self, ok: bool):
        """A GPU target is judged on the GPU only."""
        return bool(ok) if self.gpu else None

    def config(self, script) -> dict:
        """A backbone script's settings at this check's sizes."""
        c = settings.hyperparameters(vars(script))
        c.update(image_size=self.S["image_size"], batch_size=self.S["batch_size"], device=str(self.device), seed=0)
        if self.S["fc_width"]:
            c["fc_width"] = self.S["fc_width"]
        return c

    def num_classes(self) -> dict:
        return {t: len(ti.data.classes) for t, ti in self.need_images().items()}

    def need_images(self) -> dict:
        if self.images is None:
            raise RuntimeError("no demo images: the data section did not run or failed")
        return self.images

    def lesion_model(self):
        """(the prepared VGG16 in eval mode, a note): a freshly initialised one when `prepare` failed."""
        if self.model is None:
            model = network.build_model(self.config(vgg16), self.num_classes()).to(self.device).eval()
            self.model, self.model_note = model, "untrained (prepare did not run)"
        return self.model, getattr(self, "model_note", "prepared")

    def flops(self, model, sites) -> dict:
        todo = [s for s in sites if s.name not in self._flops]
        if todo:
            shape = (3, self.S["image_size"], self.S["image_size"])
            self._flops.update(site_flops(model, todo, shape, self.device))
        return self._flops


# ----------------------------------------------------------------------------------------------------------
# training


class Trainer:
    """dualtask.train's step, which is inline in its loop and so mirrored here step for step: a batch of each
    image group's training images, augmented and normalised on the device, channels_last and bf16 autocast on
    CUDA, every head's label-smoothed cross-entropy, backward, the gradient norm the health check reads, the
    project's optimizer (make_optimizer at peak_lr) and its warm-up + cosine schedule."""

    def __init__(self, model, images: dict, config: dict, device: torch.device, total_steps: int):
        self.model, self.images, self.device, self.tasks = model, images, device, list(images)
        self.groups = vggface2.shared_groups({t: ti.data for t, ti in images.items()})
        self.per_group = config["batch_size"] // len(self.groups)
        self.batch = self.per_group * len(self.groups)
        self.train_idx = {g[0]: images[g[0]].data.indices("train") for g in self.groups}
        self.channels_last = device.type == "cuda"
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.optimizer = trainer_mod.make_optimizer(model, config, trainer_mod.peak_lr(config))
        per_epoch = max(1, math.ceil(max(len(i) for i in self.train_idx.values()) / self.per_group))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, trainer_mod.lr_lambda(total_steps, trainer_mod.warmup_steps(config, per_epoch)))
        self.smoothing = trainer_mod.LABEL_SMOOTHING if config.get("recipe", settings.RECIPE) >= 2 else 0.0
        self.clip = config.get("grad_clip", 0)
        self.gen, self.rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
        model.train()

    def _inputs(self):
        xs, ys, rows = [], {}, {}
        for k, g in enumerate(self.groups):
            pool = self.train_idx[g[0]]
            idx = self.rng.choice(pool, self.per_group, replace=len(pool) < self.per_group)
            x, ys[g[0]] = self.images[g[0]].batch(idx)
            xs.append(x)
            for t in g:
                rows[t] = slice(k * self.per_group, (k + 1) * self.per_group)
                if t != g[0]:
                    ys[t] = self.images[t].labels[torch.from_numpy(idx).to(self.images[t].labels.device)]
        x = transforms.normalize(transforms.augment(torch.cat(xs), self.gen))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, ys, rows

    def step(self) -> torch.Tensor:
        x, ys, rows = self._inputs()
        with autocast(self.device):
            out = self.model(x)
        loss = sum(F.cross_entropy(out[t][rows[t]].float(), ys[t], label_smoothing=self.smoothing)
                   for t in self.tasks)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.clip)
        else:  # the loop computes the norm every step for the health check
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach().float()) for p in params]))
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    def images_per_second(self, steps: int) -> float:
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return steps * self.batch / (time.perf_counter() - start)

    def forward_flops_per_image(self) -> float:
        """Forward FLOPs per image of the training forward pass (eval mode, so no running statistics move)."""
        x, _, _ = self._inputs()
        self.model.eval()
        try:
            with torch.no_grad(), autocast(self.device):
                flops = forward_flops(lambda: self.model(x[:2]))
        finally:
            self.model.train()
        return flops / 2


# ----------------------------------------------------------------------------------------------------------
# sections


def section_peak(ck: Check) -> list:
    """The matrix-product peak: bf16 on CUDA (what autocast computes in), fp32 on the CPU."""
    n, reps = ck.S["matmul"], ck.S["matmul_reps"]
    dtype = torch.bfloat16 if ck.gpu else torch.float32
    a = torch.randn(n, n, device=ck.device, dtype=dtype)
    b = torch.randn(n, n, device=ck.device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(ck.device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(ck.device)
    ck.peak = reps * 2 * n ** 3 / (time.perf_counter() - start)
    name = "bf16" if ck.gpu else "fp32"
    return [metric(f"matmul peak ({name}, {n}^3)", ck.peak / 1e12, "TFLOP/s")]


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


def masks_per_pass(ck: Check, model, sites, batches) -> int:
    caches = engine.cache_bytes(model, sites, batches[0][1].shape[1:], max(len(x) for _, x, _ in batches))
    return engine.default_masks_per_pass(ck.device, max(caches.values()))


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
    batches = engine.image_batches(ck.need_images(), "test", n_per_task=S["sweep_images"], seed=0)
    n_images = sum(len(y) for _, _, y in batches)
    rng = np.random.default_rng(0)
    lesions = {s.name: random_lesions(s, S["sweep_lesions"], rng) for s in sites}
    mpp = masks_per_pass(ck, model, sites, batches)
    warm = [batches[0], batches[-1]]  # first calls (kernel choice, allocations) out of the timing
    for s in sites:
        engine.evaluate_lesions(model, s, lesions[s.name][:mpp], warm, masks_per_pass=mpp)
        engine.evaluate_lesions_naive(model, s, lesions[s.name][:1], warm)
    fast, t_fast = timed(ck, lambda: [engine.evaluate_lesions(model, s, lesions[s.name], batches, masks_per_pass=mpp)
                                      for s in sites])
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
        metric("lesions x images", f"{n_lesions} x {n_images}", f"({len(sites)} sites, {mpp} lesion(s) per pass)",
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
    ]


def section_ranking_precision(ck: Check) -> list:
    """Loss rankings of a few sites in fp32 (TF32 allowed) and in bf16, on the same ranking images."""
    S = ck.S
    model, note = ck.lesion_model()
    sites = chosen_sites(model, S["rank_sites"])
    batches = engine.image_batches(ck.need_images(), "train", n_per_task=S["rank_images"], seed=0)
    tasks = list(ck.images)
    mpp = masks_per_pass(ck, model, sites, batches)
    rows = []
    for site in sites:
        for how in names.RANKING_PRECISIONS:  # first calls out of the timing
            engine.evaluate_lesions(model, site, [[0]], batches[:1], precision=how)
        rank = {}
        seconds = {}
        for how in names.RANKING_PRECISIONS:
            rank[how], seconds[how] = timed(ck, lambda how=how: rankings.rank_site(
                model, site, batches, tasks, ["loss"], masks_per_pass=mpp, precision=how))
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
    end past greedy_s runs fewer steps, or is left out."""
    S, start = ck.S, time.perf_counter()
    deadline = min(start + S["greedy_s"], ck.t0 + ck.args.limit_s)
    model, note = ck.lesion_model()
    config = ck.config(vgg16)
    g = dict(greedy.GREEDY_DEFAULTS, **greedy.greedy_settings(config))
    precision = ck.args.greedy_precision or config.get("ranking_precision", "fp32")
    all_sites = sites_mod.lesion_sites(model)
    sites = chosen_sites(model, S["greedy_sites"])
    batches = engine.image_batches(ck.need_images(), "train", n_per_task=S["greedy_images"], seed=0)
    task = list(ck.images)[0]
    n_images = sum(len(y) for t, _, y in batches if t == task)
    flops = ck.flops(model, all_sites)
    caches = engine.cache_bytes(model, sites, batches[0][1].shape[1:], max(len(x) for _, x, _ in batches))
    factors, rows, kept = {}, [], 1.0
    for site in sites:
        remaining, step = greedy_steps_of(site, g["stop"]), max(1, int(round(greedy.GREEDY_STEP * site.n_filters)))
        mpp = engine.default_masks_per_pass(ck.device, caches[site.name])
        per_eval = probe_seconds(model, site, batches, task, precision, mpp)
        k = min(S["greedy_steps"], len(remaining))
        while k > 0 and time.perf_counter() + per_eval * n_images * (kept * sum(remaining[:k]) + 3 * k) > deadline:
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


# ----------------------------------------------------------------------------------------------------------
# running and reporting


def run_section(ck: Check, name: str, sampler: GpuSampler) -> dict:
    """One section, timed and sampled; its error (with traceback) recorded instead of raised."""
    record = {"section": name, "status": "ok", "seconds": None, "error": None, "traceback": None, "metrics": [],
              "peak_memory_gib": None}
    elapsed = time.perf_counter() - ck.t0
    if elapsed > ck.args.budget_s:
        record.update(status="skipped", error=f"not started: {elapsed:.0f} s elapsed, past --budget_s="
                                              f"{ck.args.budget_s:g}")
        print(f"[{elapsed:6.1f} s] {name}: skipped (past the time budget)", flush=True)
        return record
    print(f"[{elapsed:6.1f} s] {name} ...", flush=True)
    if ck.gpu:
        torch.cuda.reset_peak_memory_stats(ck.device)
    sampler.start()
    start = time.perf_counter()
    try:
        record["metrics"] = SECTION_FUNCTIONS[name](ck)
    except Exception as e:  # recorded; the next section runs
        record.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        print(f"  {name} failed: {record['error']}", file=sys.stderr, flush=True)
    finally:
        try:
            sync(ck.device)
        except Exception:  # a broken device is the section's error, already recorded
            pass
        record["seconds"] = round(time.perf_counter() - start, 2)
        record.update(sampler.stop())
        if ck.gpu:
            record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(ck.device) / 2**30, 2)
        gc.collect()
        if ck.gpu:
            torch.cuda.empty_cache()
    return record


def fmt(value, unit: str = "") -> str:
    if value is None:
        text = "-"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, (int, np.integer)):
        text = f"{value:,}"
    elif isinstance(value, float):
        text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 \
            else f"{value:.2e}"
    else:
        text = str(value)
    return f"{text} {unit}".strip()


def status_row(record: dict) -> dict:
    parts = [record["status"]]
    if record["seconds"] is not None:
        parts.append(f"{record['seconds']:.1f} s")
    if record.get("gpu_util_mean") is not None:
        parts.append(f"GPU util mean {record['gpu_util_mean']:.0f}% (max {record['gpu_util_max']:.0f}%)")
    if record.get("peak_memory_gib") is not None:
        parts.append(f"peak {record['peak_memory_gib']:.1f} GiB")
    if record["error"]:
        parts.append(record["error"].splitlines()[0][:160])
    return {"section": record["section"], "metric": "status", "value": ", ".join(parts), "target": None,
            "met": None if record["status"] != "error" else False}


def table_rows(records: list) -> list:
    rows = []
    for record in records:
        rows.append(status_row(record))
        for m in record["metrics"]:
            rows.append({"section": record["section"], "metric": m["metric"], "value": fmt(m["value"], m["unit"]),
                         "target": m["target"], "met": m["met"], "raw": m["value"], "unit": m["unit"]})
    return rows


def print_table(rows: list) -> None:
    cells = [(r["section"], r["metric"], r["value"], r["target"] or "-",
              "-" if r["met"] is None else "yes" if r["met"] else "no") for r in rows]
    head = ("section", "metric", "value", "target", "met")
    widths = [min(70, max(len(c[i]) for c in cells + [head])) for i in range(5)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*head))
    print(line.format(*("-" * w for w in widths)))
    for c in cells:
        print(line.format(*c))


def plain(value):
    """JSON-safe: numpy scalars and arrays as Python values, NaN and infinities as null."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def environment(ck: Check) -> dict:
    import torchvision
    name = torch.cuda.get_device_name(ck.device) if ck.gpu else \
        f"cpu: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return {"device": name, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name] + sys.argv), "tiny": ck.args.tiny, "sizes": ck.S,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="CPU sizes: 32 px, tiny batches, few images and steps")
    p.add_argument("--out", default=str(ROOT / ".bench" / "gpu_check.json"), help="the JSON file written")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {','.join(SECTIONS)}")
    p.add_argument("--budget_s", type=float, default=420.0, help="no section starts after this many seconds")
    p.add_argument("--limit_s", type=float, default=450.0, help="the greedy section ends its sites by then")
    p.add_argument("--greedy_precision", default=None, choices=names.RANKING_PRECISIONS,
                   help="the greedy section's ranking precision (default: the scripts' ranking_precision)")
    p.add_argument("--cudnn_benchmark", action="store_true",
                   help="cuDNN autotuning (dualtask.train does not turn it on, so neither does this by default)")
    args = p.parse_args(argv)
    unknown = [s for s in args.sections.split(",") if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; expected some of {list(SECTIONS)}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    ck = Check(args)
    env = environment(ck)
    print(f"gpu_check on {env['device']}, torch {env['torch']}, {'tiny sizes' if args.tiny else 'full sizes'}",
          flush=True)
    sampler = GpuSampler(ck.device)
    wanted = args.sections.split(",")
    records = [run_section(ck, name, sampler) for name in SECTIONS if name in wanted]
    rows = table_rows(records)
    total = time.perf_counter() - ck.t0
    print()
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps(plain({**env, "total_seconds": round(total, 1), "rows": rows,
                                      "sections": records}), indent=1) + "\n")
    failed = [r["section"] for r in records if r["status"] == "error"]
    print(f"\ntotal {total:.1f} s; wrote {out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
