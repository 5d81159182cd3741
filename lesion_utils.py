"""The lesion engine: where filters are silenced, how they are ranked, and the sweep over layers.

A lesion silences chosen output channels of one site by multiplying the site's output, after its BN and
ReLU, by a mask (never by editing weights: a BN shift would keep a zeroed filter's channel alive). Sites are
each conv layer's ReLU output for VGG, and the stem and each bottleneck block's output (after the residual
add and ReLU) for ResNet/ResNeXt, named by their module path in `model.named_modules()`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import vggface2
from dualtask import UsageError, autocast, evaluate, read_csv, write_csv

LESION_COLUMNS = ("layer", "depth", "n_filters", "target", "method", "fraction", "n_lesioned", "repeat",
                  "eval_task", "accuracy", "loss", "intact_accuracy", "chance", "intact_loss", "n_images",
                  "corrected_drop")


@dataclass
class Site:
    name: str  # module path whose output is lesioned
    module: nn.Module
    n_filters: int
    depth: int  # 0 = first site


def lesion_sites(model: nn.Module) -> list:
    """Lesion sites in depth order: VGG conv outputs after BN and ReLU; ResNet stem and bottleneck outputs."""
    from torchvision.models.resnet import Bottleneck

    modules = dict(model.named_modules())
    residual = any(isinstance(m, Bottleneck) for m in modules.values())
    sites = []
    last_conv = None
    for name, module in modules.items():
        if isinstance(module, Bottleneck):
            sites.append((name, module, module.conv3.out_channels))
        elif residual:
            if name.endswith("trunk.relu"):  # the stem's only ReLU (each bottleneck has its own)
                sites.append((name, module, modules[name.replace("relu", "conv1")].out_channels))
        elif isinstance(module, nn.Conv2d):
            last_conv = module
        elif isinstance(module, nn.ReLU) and last_conv is not None:
            sites.append((name, module, last_conv.out_channels))
            last_conv = None
    return [Site(n, m, c, i) for i, (n, m, c) in enumerate(sites)]


def get_site(model: nn.Module, name: str) -> Site:
    sites = {s.name: s for s in lesion_sites(model)}
    if name not in sites:
        raise UsageError(f"unknown lesion site {name!r}; valid sites: {', '.join(sites)}")
    return sites[name]


@contextlib.contextmanager
def ablate(model: nn.Module, lesions: dict, mode: str = "zero", means: dict | None = None):
    """Silence channels while the context is open: `lesions` = {site name: channel indices}.

    mode 'zero' multiplies them by 0; mode 'mean' replaces them with `means[site]` (a per-channel mean
    activation). The model's weights are untouched and every hook is removed on exit.
    """
    if mode not in ("zero", "mean"):
        raise UsageError(f"ablation mode {mode!r}; expected 'zero' or 'mean'")
    modules = dict(model.named_modules())
    handles = []
    try:
        for name, channels in lesions.items():
            if name not in modules:
                raise UsageError(f"unknown lesion site {name!r}")
            channels = torch.as_tensor(np.asarray(channels, dtype=np.int64))
            if len(channels) == 0:
                continue
            fill = None if mode == "zero" else torch.as_tensor(means[name], dtype=torch.float32)

            def hook(module, inputs, output, channels=channels, fill=fill):
                keep = torch.ones(output.shape[1], device=output.device, dtype=output.dtype)
                keep[channels.to(output.device)] = 0
                out = output * keep.view(1, -1, *([1] * (output.ndim - 2)))
                if fill is not None:
                    add = torch.zeros_like(keep)
                    add[channels.to(output.device)] = fill.to(output.device, output.dtype)[channels.to(output.device)]
                    out = out + add.view(1, -1, *([1] * (output.ndim - 2)))
                return out

            handles.append(modules[name].register_forward_hook(hook))
        yield model
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def site_activations(model: nn.Module, images: dict, sites: list, split: str = "train", n_per_task: int = 256,
                     seed: int = 0, batch_size: int = 128) -> dict:
    """{site name: {task: (N, C) spatially averaged activations}} of a seeded sample of each task's images."""
    model.eval()
    acts = {s.name: {} for s in sites}
    current = {}
    handles = [s.module.register_forward_hook(
        lambda m, i, o, name=s.name: current.__setitem__(name, o.float().mean(dim=(2, 3)).cpu())) for s in sites]
    try:
        rng = np.random.default_rng(seed)
        for task, ti in images.items():
            idx = ti.data.indices(split)
            idx = np.sort(rng.choice(idx, min(n_per_task, len(idx)), replace=False))
            chunks = {s.name: [] for s in sites}
            for start in range(0, len(idx), batch_size):
                x, _ = ti.batch(idx[start:start + batch_size])
                with autocast(x.device):
                    model(vggface2.normalize(x))
                for name in chunks:
                    chunks[name].append(current[name])
            for name, parts in chunks.items():
                acts[name][task] = torch.cat(parts).numpy()
    finally:
        for h in handles:
            h.remove()
    return acts


def selectivity(acts: dict, task: str) -> np.ndarray:
    """d' of each channel's mean activation between `task`'s images and all other tasks' images."""
    own = acts[task]
    other = np.concatenate([a for t, a in acts.items() if t != task])
    pooled = np.sqrt(0.5 * (own.var(0) + other.var(0)) + 1e-12)
    return (own.mean(0) - other.mean(0)) / pooled


def rank_by_activation(acts: dict, task: str) -> np.ndarray:
    """Channels ordered from most to least selective for `task` (ties broken by channel index)."""
    return np.argsort(-selectivity(acts, task), kind="stable")


def corrected_drop(intact: float, lesioned: float, chance: float) -> float:
    """(intact - lesioned) / (intact - chance): 0 = no effect, 1 = down to chance."""
    return (intact - lesioned) / (intact - chance) if intact - chance > 1e-9 else float("nan")


def _fraction_key(f) -> str:
    return f"{float(f):.4f}"


def lesion_stage(model: nn.Module, images: dict, config: dict, out_dir: Path) -> Path:
    """Per site: rank filters by activation selectivity for each task, silence the top fraction for each task
    and a random control, and evaluate every head on its task's test images. Writes lesion_results.csv after
    each site; a rerun skips sites already finished with the same fractions."""
    from tqdm import tqdm

    out_path = Path(out_dir) / "lesion_results.csv"
    tasks = list(images)
    fractions = sorted({float(f) for f in config["lesion_fractions"]} | {0.0})
    targets = tasks + ["random"]
    sites = lesion_sites(model)
    model.eval()
    rows = read_csv(out_path) if out_path.exists() else []
    expected = {(t, _fraction_key(f), e) for t in targets for f in fractions for e in tasks}
    done = {s.name for s in sites
            if {(r["target"], _fraction_key(r["fraction"]), r["eval_task"]) for r in rows if r["layer"] == s.name}
            == expected}
    rows = [r for r in rows if r["layer"] in done]
    if done:
        print(f"lesion sweep: {len(done)} of {len(sites)} sites finished earlier; continuing")
    todo = [s for s in sites if s.name not in done]
    if not todo:
        return out_path
    intact = evaluate(model, images, "test")
    chance = {t: images[t].data.chance for t in tasks}
    print("intact test accuracy: " + ", ".join(f"{t} {intact[t]['accuracy']:.3f} (chance {chance[t]:.3f})"
                                               for t in tasks))
    acts = site_activations(model, images, todo, "train", config.get("rank_images", 256), config["seed"])
    for site in tqdm(todo, desc="lesion sweep", leave=False, disable=None):
        order = {t: rank_by_activation(acts[site.name], t) for t in tasks}
        order["random"] = np.random.default_rng([config["seed"], site.depth, 0]).permutation(site.n_filters)
        for f in fractions:
            n = int(round(f * site.n_filters))
            for target in targets:
                if n == 0:
                    result = intact
                else:
                    with ablate(model, {site.name: order[target][:n]}):
                        result = evaluate(model, images, "test")
                for e in tasks:
                    rows.append({
                        "layer": site.name, "depth": site.depth, "n_filters": site.n_filters, "target": target,
                        "method": "random" if target == "random" else "activation", "fraction": _fraction_key(f),
                        "n_lesioned": n, "repeat": 0, "eval_task": e, "accuracy": f"{result[e]['accuracy']:.4f}",
                        "loss": f"{result[e]['loss']:.4f}", "intact_accuracy": f"{intact[e]['accuracy']:.4f}",
                        "chance": f"{chance[e]:.4f}", "intact_loss": f"{intact[e]['loss']:.4f}",
                        "n_images": result[e]["n"],
                        "corrected_drop": f"{corrected_drop(intact[e]['accuracy'], result[e]['accuracy'], chance[e]):.4f}",
                    })
        write_csv(out_path, LESION_COLUMNS, rows)
    print(f"wrote {out_path} ({len(rows)} rows, {len(sites)} sites)")
    return out_path
