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
from dualtask import UsageError, autocast, read_csv, write_csv

LESION_COLUMNS = ("layer", "depth", "n_filters", "target", "method", "fraction", "n_lesioned", "repeat",
                  "eval_task", "accuracy", "loss", "intact_accuracy", "chance", "intact_loss", "n_images",
                  "corrected_drop")


@dataclass
class Site:
    name: str  # module path whose output is lesioned
    module: nn.Module
    n_filters: int
    depth: int  # 0 = first site


def lesion_sites(model: nn.Module, inner: bool = False) -> list:
    """Lesion sites in depth order: VGG conv outputs after BN and ReLU; ResNet stem and bottleneck outputs
    (after the residual add and ReLU). `inner=True` adds each bottleneck's first two conv outputs (at their
    BN, before the shared ReLU: a channel silenced there is silenced after the ReLU too)."""
    from torchvision.models.resnet import Bottleneck

    modules = dict(model.named_modules())
    residual = any(isinstance(m, Bottleneck) for m in modules.values())
    sites = []
    last_conv = None
    for name, module in modules.items():
        if isinstance(module, Bottleneck):
            if inner:
                sites += [(f"{name}.bn1", module.bn1, module.bn1.num_features),
                          (f"{name}.bn2", module.bn2, module.bn2.num_features)]
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
    sites = {s.name: s for s in lesion_sites(model, inner=True)}
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
    sites = {s.name: s for s in lesion_sites(model, inner=True)}
    handles = []
    try:
        for name, channels in lesions.items():
            if name not in sites:
                raise UsageError(f"unknown lesion site {name!r}; valid sites: {', '.join(sites)}")
            if len(channels) == 0:
                continue
            fill = None if mode == "zero" else means[name]
            keep, add = lesion_mask(channels, sites[name].n_filters, fill)
            handles.append(sites[name].module.register_forward_hook(
                lambda module, inputs, output, keep=keep, add=add: apply_mask(output, keep[None], add[None], 1)))
        yield model
    finally:
        for h in handles:
            h.remove()


def lesion_mask(channels, n_channels: int, fill=None):
    """(keep, add) vectors: the output becomes output * keep + add (add = the fill values on lesioned channels)."""
    keep = torch.ones(n_channels)
    idx = torch.as_tensor(np.asarray(channels, dtype=np.int64))
    keep[idx] = 0
    add = torch.zeros(n_channels)
    if fill is not None:
        add[idx] = torch.as_tensor(fill, dtype=torch.float32)[idx]
    return keep, add


def apply_mask(output: torch.Tensor, keep: torch.Tensor, add: torch.Tensor, n_masks: int) -> torch.Tensor:
    """Apply M masks to an output whose batch holds M stacked copies: keep and add are (M, C)."""
    shape = output.shape
    view = (n_masks, shape[0] // n_masks, shape[1]) + (1,) * (output.ndim - 2)
    keep = keep.to(output.device, output.dtype).view(n_masks, 1, shape[1], *view[3:])
    add = add.to(output.device, output.dtype).view(n_masks, 1, shape[1], *view[3:])
    return (output.view(n_masks, shape[0] // n_masks, *shape[1:]) * keep + add).view(shape)


def forward_chain(model: nn.Module) -> list:
    """The trunk's forward pass as named steps: running them in order equals `model.trunk(x)`.

    Each step's name is its module path, so a lesion site is either a step (the site's output is that
    step's output) or lies inside one (an inner bottleneck site)."""
    import torchvision

    trunk = model.trunk
    flatten = ("flatten", nn.Flatten(1))
    if isinstance(trunk, torchvision.models.VGG):
        return ([(f"trunk.features.{i}", m) for i, m in enumerate(trunk.features)] +
                [("trunk.avgpool", trunk.avgpool), flatten, ("trunk.classifier", trunk.classifier)])
    if isinstance(trunk, torchvision.models.ResNet):
        steps = [(f"trunk.{n}", getattr(trunk, n)) for n in ("conv1", "bn1", "relu", "maxpool")]
        for layer in ("layer1", "layer2", "layer3", "layer4"):
            steps += [(f"trunk.{layer}.{i}", block) for i, block in enumerate(getattr(trunk, layer))]
        return steps + [("trunk.avgpool", trunk.avgpool), flatten, ("trunk.fc", trunk.fc)]
    raise UsageError(f"no forward chain for a trunk of type {type(trunk).__name__}")


class SiteRunner:
    """Runs the network in two parts around one lesion site: the prefix once per image batch, then only the
    suffix for each lesion, several lesions per pass (their masks stacked along the batch)."""

    def __init__(self, model: nn.Module, site: Site):
        steps = forward_chain(model)
        names = [n for n, _ in steps]
        self.model, self.site = model, site
        if site.name in names:  # the site is a step's output: cache that output
            j = names.index(site.name) + 1
            self.inner = False
        else:  # the site lies inside a step (an inner bottleneck site): cache that step's input
            j = next(i for i, n in enumerate(names) if site.name.startswith(n + "."))
            self.inner = True
        self.prefix_steps, self.suffix_steps = steps[:j], steps[j:]

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        for _, step in self.prefix_steps:
            x = step(x)
        return x

    def suffix(self, cached: torch.Tensor, keep: torch.Tensor, add: torch.Tensor) -> dict:
        """{task: logits (M, B, classes)} for M masks (keep, add: (M, C)) applied to a cached batch."""
        m, b = keep.shape[0], cached.shape[0]
        if self.inner:
            x = cached.repeat(m, *([1] * (cached.ndim - 1)))
            handle = self.site.module.register_forward_hook(lambda mod, i, out: apply_mask(out, keep, add, m))
        else:
            x = apply_mask(cached.repeat(m, *([1] * (cached.ndim - 1))), keep, add, m)
            handle = None
        try:
            for _, step in self.suffix_steps:
                x = step(x)
        finally:
            if handle is not None:
                handle.remove()
        return {t: head(x).view(m, b, -1) for t, head in self.model.heads.items()}


def test_batches(images: dict, split: str = "test", batch_size: int = 200) -> list:
    """[(task, normalised images, labels)] of every task's split, cut into batches, on the images' device."""
    batches = []
    for task, ti in images.items():
        idx = ti.data.indices(split)
        for start in range(0, len(idx), batch_size):
            x, y = ti.batch(idx[start:start + batch_size])
            batches.append((task, vggface2.normalize(x), y))
    return batches


@torch.inference_mode()
def evaluate_lesions(model: nn.Module, site: Site, lesions: list, batches: list, mode: str = "zero",
                     means=None, masks_per_pass: int = 1) -> list:
    """Evaluate many lesions of one site on the same images, computing the prefix once per batch.

    lesions: a list of channel-index arrays. Returns, per lesion, {task: {'correct': bool array, 'loss':
    float array}} for every image of every task (each image scored by its own task's head). Equal to
    running the whole network once per lesion with `ablate` (exactly so with masks_per_pass=1 on the CPU).
    """
    model.eval()
    runner = SiteRunner(model, site)
    masks = [lesion_mask(ch, site.n_filters, None if mode == "zero" else means) for ch in lesions]
    results = [{} for _ in lesions]
    for task, x, y in batches:
        with autocast(x.device):
            cached = runner.prefix(x)
            for start in range(0, len(masks), masks_per_pass):
                group = masks[start:start + masks_per_pass]
                keep = torch.stack([k for k, _ in group])
                add = torch.stack([a for _, a in group])
                logits = runner.suffix(cached, keep, add)[task].float()
                for k in range(len(group)):
                    loss = nn.functional.cross_entropy(logits[k], y, reduction="none")
                    correct = logits[k].argmax(1) == y
                    entry = results[start + k].setdefault(task, {"correct": [], "loss": []})
                    entry["correct"].append(correct.cpu())
                    entry["loss"].append(loss.cpu())
    return [{t: {"correct": torch.cat(v["correct"]).numpy(), "loss": torch.cat(v["loss"]).numpy()}
             for t, v in r.items()} for r in results]


@torch.inference_mode()
def evaluate_lesions_naive(model: nn.Module, site: Site, lesions: list, batches: list, mode: str = "zero",
                           means=None) -> list:
    """The reference: the whole network once per lesion, a forward hook silencing the channels."""
    model.eval()
    results = []
    for channels in lesions:
        result = {}
        with ablate(model, {site.name: channels}, mode, {site.name: means} if means is not None else None):
            for task, x, y in batches:
                with autocast(x.device):
                    logits = model(x)[task].float()
                entry = result.setdefault(task, {"correct": [], "loss": []})
                entry["correct"].append((logits.argmax(1) == y).cpu())
                entry["loss"].append(nn.functional.cross_entropy(logits, y, reduction="none").cpu())
        results.append({t: {"correct": torch.cat(v["correct"]).numpy(), "loss": torch.cat(v["loss"]).numpy()}
                        for t, v in result.items()})
    return results


def default_masks_per_pass(device: torch.device) -> int:
    """Several masks per pass keep a GPU busy; on the CPU one mask per pass is as fast and exactly reproducible."""
    return 8 if device.type == "cuda" else 1


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
    device = next(model.parameters()).device
    batches = test_batches(images, "test")
    intact = {t: _summary(r) for t, r in evaluate_lesions(model, sites[-1], [[]], batches)[0].items()}
    chance = {t: images[t].data.chance for t in tasks}
    print("intact test accuracy: " + ", ".join(f"{t} {intact[t]['accuracy']:.3f} (chance {chance[t]:.3f})"
                                               for t in tasks))
    acts = site_activations(model, images, todo, "train", config.get("rank_images", 256), config["seed"])
    for site in tqdm(todo, desc="lesion sweep", leave=False, disable=None):
        order = {t: rank_by_activation(acts[site.name], t) for t in tasks}
        order["random"] = np.random.default_rng([config["seed"], site.depth, 0]).permutation(site.n_filters)
        conditions = [(f, target, order[target][:int(round(f * site.n_filters))])
                      for f in fractions if f > 0 for target in targets]
        lesioned = evaluate_lesions(model, site, [c for _, _, c in conditions], batches,
                                    masks_per_pass=default_masks_per_pass(device))
        results = {(_fraction_key(f), target): {t: _summary(r) for t, r in res.items()}
                   for (f, target, _), res in zip(conditions, lesioned)}
        for f in fractions:
            n = int(round(f * site.n_filters)) if f > 0 else 0
            for target in targets:
                result = results[(_fraction_key(f), target)] if f > 0 else intact
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


def _summary(per_image: dict) -> dict:
    return {"accuracy": float(per_image["correct"].mean()), "loss": float(per_image["loss"].mean()),
            "n": int(len(per_image["correct"]))}
