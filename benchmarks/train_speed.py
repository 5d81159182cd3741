"""Training throughput of the dual-task step: the plain step against the project's.

    python benchmarks/train_speed.py --backbone=vgg16 --image_size=224 --batch_size=128 --steps=30
    python benchmarks/train_speed.py --backbone=resnet50 --image_size=32 --batch_size=32 --optimizer=adamw

Times the same step (augment, normalise, forward through both heads, backward, optimizer) in one process: float32
with PyTorch's per-parameter optimizer (the plain reference), float32 with the project's optimizer
(trainer.make_optimizer: the fused kernel where PyTorch has one) and, on a GPU, that with bf16 autocast +
channels_last. It prints images/s for each and, last, `speedup` of the project's step (on the CPU its float32 step)
over the plain one.
"""
import argparse
import time

import torch
import torch.nn.functional as F

from dualtask.core.device import autocast
from dualtask.data import transforms
from dualtask.model.network import DualTaskNet
from dualtask.training.trainer import make_optimizer


def time_steps(backbone, image_size, batch_size, steps, device, fast, optimizer="sgd", plain_optimizer=False):
    """Images/s and peak GPU memory (GiB; nan on the CPU) of `steps` training steps. fast: bf16 autocast +
    channels_last; plain_optimizer: PyTorch's per-parameter optimizer instead of the project's."""
    torch.manual_seed(0)
    model = DualTaskNet(backbone, {"face": 100, "object": 10}, image_size=image_size).to(device)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    config = {"optimizer": optimizer, "weight_decay": None}
    opt = make_optimizer(model, config, lr=1e-4, fused=not plain_optimizer)
    half = batch_size // 2
    raw = torch.randint(0, 256, (batch_size, image_size, image_size, 3), dtype=torch.uint8, device=device)
    y_face = torch.randint(0, 100, (half,), device=device)
    y_obj = torch.randint(0, 10, (half,), device=device)
    gen = torch.Generator().manual_seed(0)

    def step():
        x = transforms.normalize(transforms.augment(transforms.to_float(raw), gen))
        if fast:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device) if fast else torch.autocast(device.type, enabled=False):
            out = model(x)
        loss = (F.cross_entropy(out["face"][:half].float(), y_face)
                + F.cross_entropy(out["object"][half:].float(), y_obj))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return steps * batch_size / seconds, memory


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backbone", default="vgg16")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    what = f"{args.backbone} {args.image_size}px batch {args.batch_size} {args.optimizer} on {device}"
    runs = {"float32, plain optimizer": dict(fast=False, plain_optimizer=True),
            "float32, the project's optimizer": dict(fast=False)}
    if device.type == "cuda":
        runs["bf16+channels_last, the project's optimizer"] = dict(fast=True)
    speed = {}
    for name, how in runs.items():
        speed[name], memory = time_steps(args.backbone, args.image_size, args.batch_size, args.steps, device,
                                         optimizer=args.optimizer, **how)
        peak = f" (peak {memory:.1f} GiB)" if device.type == "cuda" else ""
        print(f"{what}: {name} {speed[name]:.1f} img/s{peak}", flush=True)
    print(f"speedup: {speed[list(runs)[-1]] / speed['float32, plain optimizer']:.2f}")


if __name__ == "__main__":
    main()
