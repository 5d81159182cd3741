"""dualtask.data.transforms"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dualtask.data.taskdata import NORM_MEAN, NORM_STD


def to_float(batch_uint8: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1]."""
    x = batch_uint8.permute(0, 3, 1, 2).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def augment(x: torch.Tensor, generator: torch.Generator | None = None, pad_fraction: float = 0.125,
            grayscale_p: float = 0.2) -> torch.Tensor:
    """Random crop (reflect-padded), horizontal flip and random grayscale on a whole float batch (B, 3, H, W)."""
    b, _, h, w = x.shape
    dev = x.device
    pad = max(1, int(round(h * pad_fraction)))
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device="cpu").to(dev)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device="cpu").to(dev)
    iy = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None].expand(b, 3, h, w)
    ix = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :].expand(b, 3, h, w)
    rows = torch.gather(padded, 2, iy[..., :1].expand(b, 3, h, padded.shape[3]))
    out = torch.gather(rows, 3, ix)
    flip = (torch.rand(b, generator=generator) < 0.5).to(dev)
    out = torch.where(flip[:, None, None, None], out.flip(3), out)
    gray = (torch.rand(b, generator=generator) < grayscale_p).to(dev)
    weights = torch.tensor([0.299, 0.587, 0.114], device=dev, dtype=out.dtype)[None, :, None, None]
    lum = (out * weights).sum(1, keepdim=True)
    return torch.where(gray[:, None, None, None], lum.expand_as(out), out)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - NORM_MEAN) / NORM_STD

