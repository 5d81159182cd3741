"""The small ground every other module stands on: the error types a user sees, files written atomically
(text, CSV, checkpoints), and the GPU's bf16 autocast. It imports nothing of the project.
"""
from __future__ import annotations

import contextlib
import csv
import os
from pathlib import Path

import torch


class UsageError(ValueError):
    """Bad input from the user: reported as one line on stderr, exit status 2, no traceback."""


class StageFailed(RuntimeError):
    """Part of a stage failed after everything else of the stage was written: exit status 1, one line."""


# ----------------------------------------------------------------------------------------------------------
# files


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder and rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def write_csv(path: Path, columns, rows: list) -> None:
    def write(p):
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)


def read_csv(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda p: torch.save(state, p))


def load_checkpoint(path: Path, device="cpu", mmap: bool = False) -> dict:
    """A checkpoint's state; `mmap=True` reads only what is touched (cheap for its config and epoch)."""
    return torch.load(path, map_location=device, weights_only=True, mmap=mmap)


# ----------------------------------------------------------------------------------------------------------
# logs and devices


def format_seconds(seconds: float) -> str:
    """'4.2 s', '3 min 05 s', '1 h 02 min': durations as a person reads them in a log."""
    if seconds < 59.95:
        return f"{seconds:.1f} s"
    seconds = int(round(seconds))
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
