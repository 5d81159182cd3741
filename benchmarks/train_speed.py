"""Training throughput of the dual-task step: plain float32 against bf16 autocast + channels_last.

    python benchmarks/train_speed.py --backbone=vgg16 --image_size=224 --batch_size=128 --steps=30

Times the same step (augment, normalise, forward through both heads, backward, SGD) both ways in one process
and prints images/s for each and their ratio. On CPU only the float32 path runs.
"""
import argparse
import time

import torch
import torch.nn.functional as F

from dualtask.core.device import autocast
from dualtask.data import transforms
from dualtask.model.network import DualTaskNet


def time_steps(backbone, image_size, batch_size, steps, device, fast):
    torch.manual_seed(0)
    model = DualTaskNet(backbone, {"face": 100, "object": 10}, image_size=image_size).to(device)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
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
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    plain, mem_plain = time_steps(args.backbone, args.image_size, args.batch_size, args.steps, device, fast=False)
    print(f"{args.backbone} {args.image_size}px batch {args.batch_size} on {device}: float32 {plain:.0f} img/s "
          f"(peak {mem_plain:.1f} GiB)")
    if device.type == "cuda":
        fast, mem_fast = time_steps(args.backbone, args.image_size, args.batch_size, args.steps, device, fast=True)
        print(f"{args.backbone} {args.image_size}px batch {args.batch_size} on {device}: bf16+channels_last "
              f"{fast:.0f} img/s (peak {mem_fast:.1f} GiB)")
        print(f"speedup: {fast / plain:.2f}")


if __name__ == "__main__":
    main()
