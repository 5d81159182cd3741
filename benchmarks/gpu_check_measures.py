"""benchmarks/gpu_check.py's measuring: its sizes, the run's shared state (Check), the GPU sampler, FLOP counts,
and dualtask.train's step mirrored (Trainer). The sections are in gpu_check_sections.py."""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hardware_peak import sync
from torch.utils.flop_counter import FlopCounterMode

from dualtask.config import settings
from dualtask.core.device import autocast
from dualtask.data import loading as vggface2
from dualtask.data import transforms
from dualtask.lesion import engine
from dualtask.model import network
from dualtask.training import trainer as trainer_mod

ROOT = Path(__file__).resolve().parents[1]
vgg16 = settings.load_script(ROOT / "vgg16.py")
ResNet = settings.load_script(ROOT / "ResNet.py")

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


# ----------------------------------------------------------------------------------------------------------
# measuring


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
        self.conv_rate = None

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
