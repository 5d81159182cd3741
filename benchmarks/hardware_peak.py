"""What the machine can do, measured in the same run as what it did: the matrix-product peak and a conv-heavy
reference, so that a benchmark can print its own FLOP/s as a share of each.

    from hardware_peak import matmul_peak, conv_reference
    peak = matmul_peak(torch.device("cpu"))          # fp32 on the CPU, bf16 on CUDA: FLOP/s

Both use every thread torch has (torch.get_num_threads()); on CUDA they synchronise before reading the clock.
"""
import time

import torch
import torch.nn.functional as F


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_dtype(device: torch.device) -> torch.dtype:
    """What the lesion sweep computes in: bf16 (autocast) on CUDA, fp32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _best_rate(fn, flops: float, device: torch.device, reps: int, rounds: int = 3) -> float:
    """FLOP/s of fn (flops per call), the best of `rounds` timed rounds of `reps` calls after one warm-up call."""
    fn()
    sync(device)
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        best = max(best, reps * flops / (time.perf_counter() - start))
    return best


@torch.inference_mode()
def matmul_peak(device: torch.device, n: int | None = None, reps: int | None = None) -> float:
    """FLOP/s of an n x n x n matrix product (2 n^3 flops) in peak_dtype: 2048 and 4 calls a round on the CPU,
    8192 and 50 on CUDA."""
    n = n or (8192 if device.type == "cuda" else 2048)
    reps = reps or (50 if device.type == "cuda" else 4)
    a = torch.randn(n, n, device=device, dtype=peak_dtype(device))
    b = torch.randn(n, n, device=device, dtype=peak_dtype(device))
    return _best_rate(lambda: a @ b, 2.0 * n ** 3, device, reps)


CONV_REFERENCE = dict(batch=64, channels=256, size=16)  # conv_reference's layer


def conv_text(batch: int = CONV_REFERENCE["batch"]) -> str:
    """How conv_reference's layer reads in a report line."""
    c = CONV_REFERENCE
    return f"3x3 conv, {c['channels']} channels, {c['size']}x{c['size']}, batch {batch}"


@torch.inference_mode()
def conv_reference(device: torch.device, batch: int = CONV_REFERENCE["batch"],
                   channels: int = CONV_REFERENCE["channels"], size: int = CONV_REFERENCE["size"],
                   reps: int | None = None) -> float:
    """FLOP/s of a 3x3 convolution, channels -> channels on size x size maps, padding 1 (a VGG middle layer):
    the rate a conv-heavy network could reach on this machine, below the matmul peak."""
    reps = reps or (50 if device.type == "cuda" else 4)
    dtype = peak_dtype(device)
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
    w = torch.randn(channels, channels, 3, 3, device=device, dtype=dtype)
    flops = 2.0 * batch * channels * channels * 9 * size * size
    return _best_rate(lambda: F.conv2d(x, w, padding=1), flops, device, reps)
