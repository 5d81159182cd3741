"""The lesion engine: where filters are silenced, how they are ranked, and the sweep over layers.

A lesion silences chosen output channels of one site by multiplying the site's output, after its BN and
ReLU, by a mask (never by editing weights: a BN shift would keep a zeroed filter's channel alive). Sites are
each conv layer's ReLU output for VGG, and the stem and each bottleneck block's output (after the residual
add and ReLU) for ResNet/ResNeXt, named by their module path in `model.named_modules()`.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import branches
import common
import multiple_testing
import vggface2
from common import UsageError, atomic_write, autocast, format_seconds, read_csv, read_json, write_csv, write_text


@dataclass
class Site:
    name: str  # module path whose output is lesioned; after a branch point, branches.BRANCH_PREFIX + that path
    module: nn.Module
    n_filters: int
    depth: int  # 0 = first site

    @property
    def path(self) -> str:
        """The module path of the site's module (a branched site's name carries a prefix that says so)."""
        return branches.module_path(self.name)


def lesion_sites(model: nn.Module, inner: bool = False) -> list:
    """Lesion sites in depth order: VGG conv outputs after BN and ReLU; ResNet stem and bottleneck outputs
    (after the residual add and ReLU). `inner=True` adds each bottleneck's first two conv outputs (at their
    BN, before the shared ReLU: a channel silenced there is silenced after the ReLU too).

    In a branched network (branches.py) a site after the branch point is the BranchPair of the copies of that
    layer, named `branch:<module path>`, its filters numbered across the copies, the first task's copy first.
    Such a pair offers no inner sites."""
    from torchvision.models.resnet import Bottleneck

    modules = dict(model.named_modules())
    residual = any(isinstance(m, Bottleneck) for m in modules.values())
    sites = []
    last_conv, pair = None, None  # the last conv's output channels; the pair being walked through
    for name, module in modules.items():
        if pair is not None and name.startswith(pair + "."):
            continue  # a copy inside a pair: the pair is the site
        n, pair = 1, None
        if isinstance(module, branches.BranchPair):
            n, pair, module, name_of = len(module.copies), name, module.copies[0], branches.BRANCH_PREFIX + name
            site_module = modules[name]
        else:
            name_of, site_module = name, module
        if isinstance(module, Bottleneck):
            if inner and n == 1:
                sites += [(f"{name}.bn1", module.bn1, module.bn1.num_features),
                          (f"{name}.bn2", module.bn2, module.bn2.num_features)]
            sites.append((name_of, site_module, n * module.conv3.out_channels))
        elif residual:
            if name.endswith("trunk.relu"):  # the stem's only ReLU (each bottleneck has its own)
                sites.append((name, module, modules[name.replace("relu", "conv1")].out_channels))
        elif isinstance(module, nn.Conv2d):
            last_conv = n * module.out_channels
        elif isinstance(module, nn.ReLU) and last_conv is not None:
            sites.append((name_of, site_module, last_conv))
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
    if isinstance(trunk, nn.Sequential):
        return [(f"trunk.{i}", m) for i, m in enumerate(trunk)]
    raise UsageError(f"no forward chain for a trunk of type {type(trunk).__name__}")


class SiteRunner:
    """Runs the network in two parts around one lesion site: the prefix once per image batch, then only the
    suffix for each lesion, several lesions per pass (their masks stacked along the batch)."""

    def __init__(self, model: nn.Module, site: Site):
        steps = forward_chain(model)
        names = [n for n, _ in steps]
        self.model, self.site = model, site
        if site.path in names:  # the site is a step's output: cache that output
            j = names.index(site.path) + 1
            self.inner = False
        else:  # the site lies inside a step (an inner bottleneck site): cache that step's input
            j = next(i for i, n in enumerate(names) if site.path.startswith(n + "."))
            self.inner = True
        self.prefix_steps, self.suffix_steps = steps[:j], steps[j:]

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        for _, step in self.prefix_steps:
            x = step(x)
        return x

    def suffix(self, cached: torch.Tensor, keep: torch.Tensor, add: torch.Tensor) -> dict:
        """{task: logits (M, B, classes)} for M masks (keep, add: (M, C)) applied to a cached batch."""
        m, b = keep.shape[0], cached.shape[0]
        logits = self.suffix_with(cached.repeat(m, *([1] * (cached.ndim - 1))),
                                  lambda out: apply_mask(out, keep, add, m))
        return {t: out.view(m, b, -1) for t, out in logits.items()}

    def suffix_with(self, cached: torch.Tensor, transform) -> dict:
        """{task: logits (B, classes)} of the rest of the network with `transform` applied to the site's output
        (the masks of a lesion, or a differentiable scaling for first-order scores from a cached prefix)."""
        handle = None
        if self.inner:  # the site lies inside the first suffix step: transform its output there
            x = cached
            handle = self.site.module.register_forward_hook(lambda mod, i, out: transform(out))
        else:
            x = transform(cached)
        try:
            for _, step in self.suffix_steps:
                x = step(x)
        finally:
            if handle is not None:
                handle.remove()
        outputs = getattr(self.model, "head_outputs", None)  # DualTaskNet's, split or joint; a plain net: its heads
        return outputs(x) if outputs is not None else {t: head(x) for t, head in self.model.heads.items()}


def image_batches(images: dict, split: str = "test", batch_size: int = 200, n_per_task=None, seed: int = 0) -> list:
    """[(task, normalised images, labels)] of every task's split (or a seeded sample of n_per_task of it), cut
    into batches, on the images' device. Loaded once and reused for every lesion."""
    batches = []
    rng = np.random.default_rng(seed)
    loaded = {}  # tasks sharing their images (one array) get the very same tensor for the same images
    for task, ti in images.items():
        idx = ti.data.indices(split)
        if n_per_task is not None and n_per_task < len(idx):
            idx = np.sort(rng.choice(idx, n_per_task, replace=False))
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            key = (id(ti.data.images), chunk.tobytes())
            x, y = ti.batch(chunk)
            if key not in loaded:
                loaded[key] = vggface2.normalize(x)
            batches.append((task, loaded[key], y))
    return batches


@torch.inference_mode()
def evaluate_lesions(model: nn.Module, site: Site, lesions: list, batches: list, mode: str = "zero",
                     means=None, masks_per_pass: int = 1, precision: str | None = None) -> list:
    """Evaluate many lesions of one site on the same images, computing the prefix once per batch.

    lesions: a list of channel-index arrays. Returns, per lesion, {task: {'correct': bool array, 'loss':
    float array}} for every image of every task (each image scored by its own task's head). Equal to
    running the whole network once per lesion with `ablate` (exactly so with masks_per_pass=1 on the CPU).
    precision: None = the evaluation's (bf16 autocast on CUDA); 'fp32' or 'bf16' = a ranking's
    (`ranking_precision`).
    """
    model.eval()
    runner = SiteRunner(model, site)
    masks = [lesion_mask(ch, site.n_filters, None if mode == "zero" else means) for ch in lesions]
    results = [{} for _ in lesions]
    # batches holding the same image tensor (tasks that share their images) are run once, scored by each head
    unique = {}
    for task, x, y in batches:
        unique.setdefault(id(x), (x, []))[1].append((task, y))
    for x, scored in unique.values():
        with autocast(x.device) if precision is None else ranking_precision(x.device, precision):
            cached = runner.prefix(x)
            for start in range(0, len(masks), masks_per_pass):
                group = masks[start:start + masks_per_pass]
                keep = torch.stack([k for k, _ in group])
                add = torch.stack([a for _, a in group])
                out = runner.suffix(cached, keep, add)
                for task, y in scored:
                    logits = out[task].float()
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


@torch.inference_mode()
def cache_bytes(model: nn.Module, sites: list, image_shape, batch_size: int) -> dict:
    """{site name: bytes} of the cached activations of one image batch at each site (float32)."""
    x = torch.zeros((1,) + tuple(image_shape), device=next(model.parameters()).device)
    return {s.name: SiteRunner(model, s).prefix(x).numel() * 4 * batch_size for s in sites}


def default_masks_per_pass(device: torch.device, batch_bytes: int = 0) -> int:
    """Lesions evaluated per pass. On a GPU, as many stacked copies of a cached batch as fit a quarter of the
    free memory (common.free_memory; the part after the site needs a few times its input), at most 32; on the
    CPU one, which is as fast there and bit-for-bit reproducible."""
    free = common.free_memory(device)
    if free is None:
        return 1
    return int(max(1, min(32, 0.25 * free // max(1, 4 * batch_bytes))))


@torch.inference_mode()
def site_activations(model: nn.Module, sites: list, batches: list) -> dict:
    """{site name: {task: (N, C) spatially averaged activations}} over the batches' images."""
    model.eval()
    acts = {s.name: {} for s in sites}
    current = {}
    handles = [s.module.register_forward_hook(
        lambda m, i, o, name=s.name: current.__setitem__(name, _pool(o).cpu())) for s in sites]
    try:
        for task, x, _ in batches:
            with autocast(x.device):
                model(x)
            for s in sites:
                acts[s.name].setdefault(task, []).append(current[s.name])
    finally:
        for h in handles:
            h.remove()
    return {site: {t: torch.cat(v).numpy() for t, v in per.items()} for site, per in acts.items()}


def _pool(output: torch.Tensor) -> torch.Tensor:
    """Spatial mean after ReLU (an inner BN site is read as its ReLU will see it; other sites are >= 0)."""
    out = output.float().clamp(min=0)
    return out.mean(dim=(2, 3)) if out.ndim == 4 else out


def selectivity(acts: dict, task: str) -> np.ndarray:
    """d' of each channel's mean activation between `task`'s images and all other tasks' images."""
    own = acts[task]
    other = np.concatenate([a for t, a in acts.items() if t != task])
    pooled = np.sqrt(0.5 * (own.var(0) + other.var(0)) + 1e-12)
    return (own.mean(0) - other.mean(0)) / pooled


def _order(scores: np.ndarray) -> np.ndarray:
    """Channels from highest to lowest score (ties broken by channel index)."""
    return np.argsort(-np.asarray(scores), kind="stable")


def rank_by_activation(acts: dict, task: str) -> np.ndarray:
    """Channels ordered from most to least selective for `task` (ties broken by channel index)."""
    return _order(selectivity(acts, task))


def _task_loss(results: list, task: str) -> np.ndarray:
    return np.array([r[task]["loss"].mean() for r in results])


def loss_scores(model, site: Site, batches: list, task: str, masks_per_pass: int = 1,
                precision: str = "fp32") -> np.ndarray:
    """Increase of `task`'s mean cross-entropy when each filter alone is silenced (batches: training images)."""
    own = [b for b in batches if b[0] == task]
    intact = _task_loss(evaluate_lesions(model, site, [[]], own, precision=precision), task)[0]
    singles = [[c] for c in range(site.n_filters)]
    return _task_loss(evaluate_lesions(model, site, singles, own, masks_per_pass=masks_per_pass,
                                       precision=precision), task) - intact


GREEDY_STEP = 0.016  # the reference study's step: int(0.016 x n) filters per greedy step (at least one)
# the greedy ranking's settings (config: greedy_racing, greedy_margin, greedy_candidates, greedy_stop)
GREEDY_DEFAULTS = {"racing": True, "margin": 4.0, "candidates": None, "stop": 0.2}
# what the greedy ranking was before these settings existed: exhaustive, stopping just past 20% of a site
GREEDY_BEFORE = {"racing": False, "candidates": None, "stop": 0.2}
RANKING_PRECISIONS = ("fp32", "bf16")
RACE_FIRST, RACE_MIN = 1 / 8, 32  # racing's first slice: this share of the ranking images, at least this many
FIRST_ORDER_BATCH = 64  # images per pass forward and back for the first-order estimates


def greedy_settings(config: dict) -> dict:
    """A run's greedy settings as a sweep records them: those that change its result (the margin only when
    racing)."""
    g = {"racing": bool(config.get("greedy_racing", GREEDY_DEFAULTS["racing"])),
         "candidates": config.get("greedy_candidates", GREEDY_DEFAULTS["candidates"]),
         "stop": float(config.get("greedy_stop", GREEDY_DEFAULTS["stop"]))}
    if g["racing"]:
        g["margin"] = float(config.get("greedy_margin", GREEDY_DEFAULTS["margin"]))
    return g


def greedy_chosen(n_filters: int, stop_fraction: float = 0.2, step_fraction: float = GREEDY_STEP) -> int:
    """How many filters the greedy steps choose at a site of n_filters: whole steps until just past
    stop_fraction. Filters beyond them follow in the order of the last step's scores."""
    step = max(1, int(round(step_fraction * n_filters)))
    stop = max(1, int(np.ceil(stop_fraction * n_filters)))
    return min(n_filters, step * int(np.ceil(stop / step)))


def beyond_greedy_stop(method: str, fraction: float, n_filters: int, stop_fraction: float) -> int:
    """1 when a greedy lesion of `fraction` silences filters the greedy steps never chose (lesion_results.csv's
    beyond_greedy_stop), else 0."""
    return int(method == "greedy" and int(round(float(fraction) * n_filters)) > greedy_chosen(n_filters,
                                                                                               stop_fraction))


@contextlib.contextmanager
def ranking_precision(device: torch.device, precision: str = "fp32"):
    """How a ranking scores lesions: 'fp32' (on CUDA no bf16 autocast; TF32 matrix products allowed) or 'bf16'
    (bf16 autocast on CUDA). The CPU computes in float32 either way. Where a device computes in bf16 and may use
    TF32: common.use_bf16 and common.use_tf32."""
    if precision not in RANKING_PRECISIONS:
        raise UsageError(f"ranking_precision={precision!r}; expected one of {list(RANKING_PRECISIONS)}")
    if not common.use_bf16(device):
        yield
        return
    if precision == "bf16":
        with autocast(device, enabled=True):
            yield
        return
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if common.use_tf32(device):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _cache_budget(device: torch.device) -> int:
    """Bytes a greedy run may keep of cached prefix outputs: 40% of the free GPU memory, or a quarter of the
    free RAM."""
    free = common.free_memory(device, reserved=True)  # a GPU's free memory and what PyTorch holds in reserve
    if free is not None:
        return int(0.4 * free)
    try:
        return int(0.25 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 30


def all_gather_objects(obj) -> list:
    """Every process's `obj`, in rank order, on every process (torch.distributed)."""
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


class RankingImages:
    """One task's ranking images at one site, for a whole greedy run: each batch's prefix output is computed once
    and kept (while `budget` bytes allow; else computed again when needed), and the per-image losses of any
    lesion sets on any of the images come from the suffix alone. `counts` tallies the work: candidate-image
    suffix evaluations, prefix images, first-order (Taylor) images.

    share = (rank, world, all_gather): the lesion sets of each call are shared out across processes (process r
    scores every world-th from the r-th) and gathered, so every process holds every loss."""

    def __init__(self, model, site: Site, batches: list, task: str, precision: str = "fp32",
                 masks_per_pass: int = 1, budget: int | None = None, share=None):
        self.runner, self.site, self.task = SiteRunner(model, site), site, task
        self.precision, self.masks_per_pass, self.share = precision, masks_per_pass, share
        self.batches = [(x, y) for t, x, y in batches if t == task]
        sizes = [len(y) for _, y in self.batches]
        self.n = int(sum(sizes))
        self.batch_of = np.repeat(np.arange(len(sizes)), sizes)
        self.offset = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.device = self.batches[0][0].device if self.batches else torch.device("cpu")
        self.budget = _cache_budget(self.device) if budget is None else budget
        self.cache, self.cached_bytes = {}, 0
        self.counts = {"evaluations": 0, "prefix_images": 0, "first_order_images": 0}
        model.eval()

    def context(self):
        return ranking_precision(self.device, self.precision)

    @torch.no_grad()
    def prefix(self, b: int) -> torch.Tensor:
        if b in self.cache:
            return self.cache[b]
        with self.context():
            out = self.runner.prefix(self.batches[b][0])
        self.counts["prefix_images"] += len(out)
        size = out.numel() * out.element_size()
        if self.cached_bytes + size <= self.budget:
            self.cache[b] = out
            self.cached_bytes += size
        return out

    def _pieces(self, positions):
        """[(segments [(batch, its rows or None for all)], the positions they hold)]: each whole batch when
        `positions` is None; else `positions` in order, cut into pieces of at most the largest batch's size
        (one suffix pass per lesion and piece, whichever batches the images come from)."""
        if positions is None:
            return [([(b, None)], np.arange(o, o + len(y))) for b, ((_, y), o) in enumerate(zip(self.batches,
                                                                                                 self.offset))]
        positions = np.sort(np.asarray(positions, dtype=np.int64))
        size = max(len(y) for _, y in self.batches)
        pieces = []
        for start in range(0, len(positions), size):
            pos = positions[start:start + size]
            segments = []
            for b in np.unique(self.batch_of[pos]):
                rows = pos[self.batch_of[pos] == b] - self.offset[b]
                segments.append((int(b), None if len(rows) == len(self.batches[b][1]) else rows))
            pieces.append((segments, pos))
        return pieces

    def _gather(self, segments) -> tuple:
        """(cached prefix outputs, labels) of a piece's images."""
        parts = []
        for b, rows in segments:
            cached, y = self.prefix(b), self.batches[b][1]
            if rows is not None:
                cached = cached.index_select(0, torch.as_tensor(rows, device=cached.device))
                y = y.index_select(0, torch.as_tensor(rows, device=y.device))
            parts.append((cached, y))
        if len(parts) == 1:
            return parts[0]
        return torch.cat([c for c, _ in parts]), torch.cat([y for _, y in parts])

    @torch.no_grad()
    def _own_losses(self, lesions: list, positions) -> np.ndarray:
        out = np.full((len(lesions), self.n), np.nan, dtype=np.float32)
        if not lesions:
            return out
        masks = [lesion_mask(ch, self.site.n_filters) for ch in lesions]
        for segments, pos in self._pieces(positions):
            cached, y = self._gather(segments)
            with self.context():
                for start in range(0, len(masks), self.masks_per_pass):
                    group = masks[start:start + self.masks_per_pass]
                    keep = torch.stack([k for k, _ in group])
                    add = torch.stack([a for _, a in group])
                    logits = self.runner.suffix(cached, keep, add)[self.task].float()
                    loss = nn.functional.cross_entropy(logits.reshape(len(group) * len(y), -1),
                                                       y.repeat(len(group)), reduction="none")
                    out[start:start + len(group), pos] = loss.view(len(group), len(y)).cpu().numpy()
            self.counts["evaluations"] += len(masks) * len(pos)
        return out

    def losses(self, lesions: list, positions=None) -> np.ndarray:
        """(len(lesions), n) float32: `task`'s per-image loss with each lesion set (channel list) silenced, at
        `positions` of the ranking images (None: all; the others NaN). For all images exactly what
        evaluate_lesions gives on the CPU; for some, the same to float rounding (other batch shapes)."""
        if self.share is None:
            return self._own_losses(lesions, positions)
        rank, world, gather = self.share
        parts = gather(self._own_losses(lesions[rank::world], positions))
        out = np.empty((len(lesions), self.n), dtype=np.float32)
        for r, part in enumerate(parts):
            out[r::world] = part
        return out

    def mean_losses(self, lesions: list) -> np.ndarray:
        """`task`'s mean loss over all ranking images with each lesion set silenced (float32, as _task_loss)."""
        full = self.losses(lesions)
        return np.array([row.mean() for row in full])

    def first_order(self, silenced) -> np.ndarray:
        """(n, n_filters) float32: each image's first-order estimate of how much `task`'s loss rises when one
        more filter is silenced besides `silenced` (minus the gradient of the image's loss with respect to a
        per-image mask on the filter's channel), from the cached prefix outputs: one pass forward and back
        through the suffix per image. Shared out across processes by batch."""
        n_filters = self.site.n_filters
        keep = torch.ones(n_filters)
        keep[torch.as_tensor(np.asarray(silenced, dtype=np.int64))] = 0
        rank, world, gather = self.share if self.share is not None else (0, 1, None)
        mine = {}
        for b in range(rank, len(self.batches), world):
            rows = []
            for start in range(0, len(self.batches[b][1]), FIRST_ORDER_BATCH):  # bounded memory for the backward
                cached = self.prefix(b)[start:start + FIRST_ORDER_BATCH]
                y = self.batches[b][1][start:start + FIRST_ORDER_BATCH]
                if cached.is_inference():
                    cached = cached.clone()
                mask = torch.ones(len(cached), n_filters, device=cached.device, requires_grad=True)
                k = keep.to(cached.device)

                def transform(out, mask=mask, k=k):
                    m = (mask * k).view(*mask.shape, *([1] * (out.ndim - 2)))
                    return out * m.to(out.dtype)

                with torch.enable_grad(), self.context():
                    logits = self.runner.suffix_with(cached, transform)[self.task].float()
                    loss = nn.functional.cross_entropy(logits, y, reduction="sum")
                    (grad,) = torch.autograd.grad(loss, mask)
                rows.append((-grad).float().cpu().numpy())
                self.counts["first_order_images"] += len(y)
            mine[b] = np.concatenate(rows)
        parts = [mine] if gather is None else gather(mine)
        out = np.empty((self.n, n_filters), dtype=np.float32)
        for part in parts:
            for b, rows in part.items():
                out[self.offset[b]:self.offset[b] + len(rows)] = rows
        return out

    def taylor(self, silenced, predicted: np.ndarray | None = None) -> np.ndarray:
        """|activation x gradient of `task`'s loss| per filter, summed over positions and averaged over images
        (taylor_scores), with the `silenced` filters silenced (from `first_order`, or its given result)."""
        predicted = self.first_order(silenced) if predicted is None else predicted
        return np.abs(predicted.astype(np.float64)).sum(0) / max(self.n, 1)


def _adjusted(d: np.ndarray, z: np.ndarray | None, z_all: np.ndarray | None) -> tuple:
    """(mean, standard error) of each row of the paired differences d (rows: candidates, columns: the images
    seen so far). With a control variate z (same shape; its mean over every image z_all known), the regression
    estimate mean(d) - beta (mean(z) - z_all), beta fitted per row, and the standard error of its residuals."""
    n = d.shape[1]
    mean = d.mean(1)
    if z is None:
        return mean, d.std(1, ddof=1) / np.sqrt(n)
    dc, zc = d - mean[:, None], z - z.mean(1, keepdims=True)
    var = (zc * zc).sum(1)
    beta = np.where(var > 0, (dc * zc).sum(1) / np.where(var > 0, var, 1), 0.0)
    resid = dc - beta[:, None] * zc
    se = np.sqrt((resid * resid).sum(1) / max(n - 2, 1)) / np.sqrt(n)
    return mean - beta * (z.mean(1) - z_all), se


def race(images: RankingImages, pool: list, chosen: list, step: int, margin: float, image_order: np.ndarray,
         predicted: np.ndarray | None = None, first: float = RACE_FIRST, least: int = RACE_MIN) -> tuple:
    """Racing scores of one greedy step: every candidate in `pool` (silenced together with `chosen`) on a first
    slice of the ranking images (`first` of them in `image_order`, at least `least`), then on twice as many, and
    so on, each round dropping the candidates confidently below the step's cut: below the candidate ranked
    `step`-th by mean loss so far and below each one ranked above it, so that at least `step` candidates are
    confidently better (with one filter per step, the cut alone). Confidently below: the mean of the paired
    per-image loss differences plus `margin` standard errors is below 0. The survivors are scored on every
    image.

    predicted: (n images, filters) first-order estimates of each filter's loss increase per image
    (`RankingImages.first_order`), used as a control variate: the paired differences' mean is corrected by the
    difference of the estimates' mean on the images seen from their mean on every image (a regression
    estimate), with the standard error of what the estimates leave unexplained. Where they predict the losses
    well, a candidate is confidently ranked on far fewer images. The candidates' means so far (for the cut)
    are likewise corrected, as differences to the candidate with the highest plain mean.

    Returns (exact, estimate): {candidate: mean loss over all images (float32: the exhaustive score, to the
    rounding of other batch shapes)} for the survivors, {candidate: mean loss over the images it was scored on}
    for those dropped."""
    n = images.n
    losses = np.full((len(pool), n), np.nan, dtype=np.float32)
    alive = np.arange(len(pool))
    estimate = {}
    columns = np.asarray(pool)
    done, size = 0, min(n, max(least, int(np.ceil(first * n))))
    while done < n:
        if len(alive) <= step:  # nothing left to race: what is alive is chosen, on every image
            size = n
        new = image_order[done:size]
        fresh = images.losses([chosen + [pool[i]] for i in alive], new)
        losses[np.ix_(alive, new)] = fresh[:, new]
        done = size
        if done < n and len(alive) > step:
            seen = image_order[:done]
            sub = losses[np.ix_(alive, seen)].astype(np.float64)
            means = sub.mean(1)
            z = z_all = None
            if predicted is not None:
                pred = predicted[:, columns[alive]].astype(np.float64)  # (n, alive)
                z, z_all = pred[seen].T, pred.mean(0)
            ref = int(np.argmax(means))
            shift = _adjusted(sub - sub[ref], None if z is None else z - z[ref],
                              None if z is None else z_all - z_all[ref])[0]
            ranked = np.argsort(-shift, kind="stable")
            bound = np.full(len(alive), -np.inf)  # the highest of the upper bounds to each of the best `step`
            for j in ranked[:step]:
                diff_mean, diff_se = _adjusted(sub - sub[j], None if z is None else z - z[j],
                                               None if z is None else z_all - z_all[j])
                bound = np.maximum(bound, diff_mean + margin * diff_se)
            drop = bound < 0
            drop[ranked[:step]] = False
            for i in np.flatnonzero(drop):
                estimate[pool[alive[i]]] = float(means[i])
            alive = alive[~drop]
        size = min(n, 2 * size)
    exact = {pool[i]: losses[i].mean() for i in alive}
    return exact, estimate


def greedy_order(model, site: Site, batches: list, task: str, step_fraction: float = GREEDY_STEP,
                 stop_fraction: float = 0.2, masks_per_pass: int = 1, racing: bool = True, margin: float = 4.0,
                 candidates: int | None = None, precision: str = "fp32", seed: int = 0, control: bool = True,
                 share=None, stats: dict | None = None):
    """Grouped greedy forward selection (the reference study's): each step adds the `step_fraction` of the
    site's filters whose removal together with those already chosen raises `task`'s loss most, until just past
    `stop_fraction`. The filters never chosen follow, ordered by their effect at the last step.
    Returns (order, scores): a chosen filter's score is the loss with it removed at the step it was chosen.

    racing=False scores every remaining filter on every ranking image at each step (exhaustive). racing=True
    races them (`race`): a filter confidently below the step's cut after a slice of the images (by `margin`
    standard errors of its paired loss differences, with the first-order estimates as a control variate unless
    control=False) is dropped, and the step's choice is the exhaustive rule applied to the survivors' exact
    losses; a dropped filter's score at the last step is its mean on the images it was scored on.
    candidates=K: each step scores only the K remaining filters (at least one step's worth) with the highest
    first-order (Taylor) score computed with the chosen filters silenced; the others' score at the last step is
    the loss of the chosen set before it, and they follow in Taylor order.
    Every step reuses the prefix outputs of the ranking images (computed once per run when memory allows).
    share = (rank, world, all_gather) shares each step's candidates out across processes (the chosen sets
    are those of one process); stats, when given, receives the work done (RankingImages.counts and steps)."""
    images = RankingImages(model, site, batches, task, precision, masks_per_pass, share=share)
    step = max(1, int(round(step_fraction * site.n_filters)))
    stop = max(1, int(np.ceil(stop_fraction * site.n_filters)))
    image_order = np.random.default_rng([seed, site.depth, 7]).permutation(images.n)
    first_slice = min(images.n, max(RACE_MIN, int(np.ceil(RACE_FIRST * images.n))))
    chosen, scores = [], []
    remaining = list(range(site.n_filters))
    last, before_last, taylor, steps = None, [], None, 0
    while len(chosen) < stop and remaining:
        pool, taylor, predicted = remaining, None, None
        prune = candidates is not None and max(candidates, step) < len(remaining)
        if prune or (racing and control and len(remaining) > step and first_slice < images.n):
            predicted = images.first_order(chosen)
        if prune:
            taylor = images.taylor(chosen, predicted)
            top = set(sorted(remaining, key=lambda c: -taylor[c])[:max(candidates, step)])
            pool = [c for c in remaining if c in top]
        if racing:
            exact, estimate = race(images, pool, chosen, step, margin, image_order,
                                   predicted if control else None)
        else:
            exact, estimate = dict(zip(pool, images.mean_losses([chosen + [c] for c in pool]))), {}
        survivors = [c for c in pool if c in exact]
        losses = np.array([exact[c] for c in survivors])
        best = _order(losses)[:step]
        before_last = list(chosen)
        chosen += [survivors[i] for i in best]
        scores += [float(losses[i]) for i in best]
        last = {**{c: float(v) for c, v in estimate.items()}, **{c: float(exact[c]) for c in survivors}}
        picked = {survivors[i] for i in best}
        remaining = [c for c in remaining if c not in picked]
        steps += 1
    pruned = [c for c in remaining if last is not None and c not in last]
    if pruned:  # left out by the first-order pruning at the last step: the chosen set's loss before that step
        base = float(images.mean_losses([before_last])[0])
        last.update({c: base for c in pruned})
    tie = (lambda c: -taylor[c]) if taylor is not None else (lambda c: 0.0)
    rest = sorted(remaining, key=lambda c: (-last[c], tie(c))) if last else remaining
    if stats is not None:
        stats.update(images.counts, steps=steps, n_chosen=len(chosen), n_images=images.n)
    return np.array(chosen + rest), np.array(scores + [last[c] if last else 0.0 for c in rest])


def taylor_scores(model, site: Site, batches: list, task: str) -> np.ndarray:
    """First-order estimate of each filter's importance: |activation x gradient of `task`'s loss|, summed
    over positions and averaged over images (the gradient of the loss with respect to a per-image mask)."""
    model.eval()
    total = torch.zeros(site.n_filters, dtype=torch.float64)
    n = 0
    for t, x, y in batches:
        if t != task:
            continue
        mask = torch.ones(len(x), site.n_filters, device=x.device, requires_grad=True)
        handle = site.module.register_forward_hook(
            lambda m, i, out: out * mask.view(*mask.shape, *([1] * (out.ndim - 2))).to(out.dtype))
        try:
            with torch.enable_grad(), autocast(x.device):
                loss = nn.functional.cross_entropy(model(x)[task].float(), y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, mask)
        finally:
            handle.remove()
        total += grad.abs().sum(0).double().cpu()
        n += len(x)
    return (total / max(n, 1)).numpy()


def same_top_sets(a: dict, b: dict, methods, tasks, fraction: float = 0.2) -> dict:
    """{'method|task': whether two rankings of one site (rank_site's) select the same top-`fraction` set}."""
    out = {}
    for m in methods:
        for t in tasks:
            order_a, order_b = a[m][t]["order"], b[m][t]["order"]
            k = max(1, int(round(fraction * len(order_a))))
            out[f"{m}|{t}"] = set(order_a[:k]) == set(order_b[:k])
    return out


def rank_correlation(a, b) -> float:
    """Spearman's rank correlation (Pearson correlation of ranks; ties get their order's rank)."""
    ra, rb = np.argsort(np.argsort(a)).astype(float), np.argsort(np.argsort(b)).astype(float)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


METHODS = ("activation", "loss", "greedy", "taylor", "random")
NOT_RANKINGS = ("agreement", "reliability", "precision", "branch")  # the entries of a site's rankings that are about rankings
RELIABILITY_FRACTIONS = (0.1, 0.2)  # the top sets whose split-half overlap is reported


def split_halves(batches: list) -> tuple:
    """The ranking images cut into two disjoint halves (alternate images of every batch, so each half holds
    half of every task's images)."""
    return tuple([(t, x[k::2], y[k::2]) for t, x, y in batches if len(x[k::2])] for k in (0, 1))


def top_overlap(order_a, order_b, fraction: float) -> float:
    """Share of the top-`fraction` filters of one order that are also in the other's (random orders share about
    `fraction` of them)."""
    k = max(1, int(round(fraction * len(order_a))))
    return len(set(list(order_a)[:k]) & set(list(order_b)[:k])) / k


def split_half_reliability(halves: tuple) -> dict:
    """How reproducible a ranking is: the same method on two disjoint halves of the ranking images. Per method
    and task: top-10% and top-20% overlap, and Spearman's correlation of the scores by channel."""
    first, second = halves
    out = {}
    for method, per_task in first.items():
        if method in NOT_RANKINGS or method == "random":
            continue
        out[method] = {}
        for t, entry in per_task.items():
            other = second[method][t]
            row = {f"top{int(round(f * 100))}": round(top_overlap(entry["order"], other["order"], f), 4)
                   for f in RELIABILITY_FRACTIONS}
            row["spearman"] = round(rank_correlation(entry["by_channel"], other["by_channel"]), 4)
            out[method][t] = row
    return out


def rank_site(model, site: Site, rank_batches: list, tasks: list, methods, random_repeats: int = 10,
              seed: int = 0, masks_per_pass: int = 1, reliability: bool = False, greedy: dict | None = None,
              precision: str = "fp32", share=None) -> dict:
    """{method: {target: {'order': [...], 'scores': [...]}}} for one site; 'random' holds repeat_0..R-1, and
    'agreement' the rank correlation of taylor with loss per task when both were computed. With `reliability`,
    'reliability' holds each ranking's split-half reliability (`split_half_reliability`): every ranking is
    computed again on each half of the ranking images, which costs as much again as the rankings.
    greedy: the greedy ranking's settings (`greedy_settings`; None = the defaults, GREEDY_DEFAULTS);
    precision: how the loss and greedy rankings score lesions (`ranking_precision`);
    share: (rank, world, all_gather) shares each greedy step's candidates out across processes (`greedy_order`),
    so every process must call it for the same site."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise UsageError(f"unknown lesion method(s) {bad}; expected some of {list(METHODS)}")
    known = list(getattr(model, "tasks", None) or model.heads)  # a joint output layer has no per-task heads
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise UsageError(f"unknown task(s) {unknown}; the model's tasks are {known}")
    out = {}
    if "activation" in methods:
        acts = site_activations(model, [site], rank_batches)[site.name]
        scores = {t: selectivity(acts, t) for t in tasks}
        out["activation"] = {t: _entry(_order(scores[t]), scores[t]) for t in tasks}
    if "loss" in methods:
        out["loss"] = {}
        for t in tasks:
            scores = loss_scores(model, site, rank_batches, t, masks_per_pass, precision)
            out["loss"][t] = _entry(_order(scores), scores)
    if "greedy" in methods:
        g = dict(GREEDY_DEFAULTS, **(greedy or {}))
        out["greedy"] = {t: _entry(*greedy_order(
            model, site, rank_batches, t, stop_fraction=g["stop"], masks_per_pass=masks_per_pass,
            racing=g["racing"], margin=g["margin"], candidates=g["candidates"], precision=precision, seed=seed,
            share=share), ordered=True) for t in tasks}
    if "taylor" in methods:
        out["taylor"] = {}
        for t in tasks:
            scores = taylor_scores(model, site, rank_batches, t)
            out["taylor"][t] = _entry(_order(scores), scores)
    if "random" in methods:
        out["random"] = {f"repeat_{r}": {"order": np.random.default_rng([seed, site.depth, r]).permutation(
            site.n_filters).tolist()} for r in range(random_repeats)}
    if "taylor" in out and "loss" in out:
        out["agreement"] = {t: rank_correlation(out["taylor"][t]["by_channel"], out["loss"][t]["by_channel"])
                            for t in tasks}
    ranked = [m for m in methods if m != "random"]
    if reliability and ranked:
        halves = split_halves(rank_batches)
        if all(any(t == task for t, _, _ in half) for half in halves for task in tasks):
            out["reliability"] = split_half_reliability(tuple(
                rank_site(model, site, half, tasks, ranked, masks_per_pass=masks_per_pass, greedy=greedy,
                          precision=precision, share=share) for half in halves))
    return out


RANKING_KEYS = (*METHODS, "agreement", "reliability")  # the order of a site's entries in rankings.json


def merge_rankings(own: dict, given: dict) -> dict:
    """A site's rankings from two parts (here: the rankings its process computed alone, and the greedy rankings
    all processes computed together), in the order one rank_site call gives them: methods in METHODS order,
    then agreement and reliability (each method's entry in METHODS order)."""
    merged = {**own, **{k: v for k, v in given.items() if k != "reliability"}}
    reliability = {**own.get("reliability", {}), **given.get("reliability", {})}
    if reliability:
        merged["reliability"] = {m: reliability[m] for m in METHODS if m in reliability}
    keys = [k for k in RANKING_KEYS if k in merged] + [k for k in merged if k not in RANKING_KEYS]
    return {k: merged[k] for k in keys}


def _entry(order, scores, ordered: bool = False) -> dict:
    """A ranking as saved: the order, the scores in that order, and (for correlations) the scores by channel."""
    order = np.asarray(order)
    scores = np.asarray(scores, dtype=float)
    in_order = scores if ordered else scores[order]
    by_channel = np.empty(len(order))
    by_channel[order] = in_order
    return {"order": order.tolist(), "scores": [round(float(v), 6) for v in in_order],
            "by_channel": by_channel.tolist()}


def corrected_drop(intact: float, lesioned: float, chance: float) -> float:
    """(intact - lesioned) / (intact - chance): 0 = no effect, 1 = down to chance."""
    return (intact - lesioned) / (intact - chance) if intact - chance > 1e-9 else float("nan")


def _fraction_key(f) -> str:
    return f"{float(f):.4f}"


# the matched_ columns are filled when match_accuracy is set: the same lesions on the accuracy-matched test images
LESION_COLUMNS = ("layer", "depth", "n_filters", "target", "method", "fraction", "n_lesioned", "repeat",
                  "eval_task", "accuracy", "loss", "intact_accuracy", "chance", "intact_loss", "n_images",
                  "corrected_drop", "matched_accuracy", "matched_intact_accuracy", "matched_n_images",
                  "beyond_greedy_stop")
# beyond_greedy_stop: 1 on a greedy lesion silencing filters past those the greedy steps chose (just past
# greedy_stop of the site): they follow in the order of the last step's scores; 0 on every other row
# an earlier sweep's files may lack these: they are filled in. p_corrected, correction: p_index corrected for every
# site x ranking at the row's fraction, and how (multiple_testing.corrected_rows); written once the sweep's last
# site is done, computed by the report where absent; index_null: "ring" where p_index, null_low and null_high come
# from the closed ring of lesions (multiple_testing.pair_null), absent in a sweep made before it (the report then
# makes them again from lesion_results.csv's drops)
ADDED_LESION_COLUMNS = ("beyond_greedy_stop", "p_corrected", "correction", "index_null")
DISSOCIATION_COLUMNS = ("layer", "depth", "method", "fraction", "task_a", "task_b", "index", "ci_low", "ci_high",
                        "p_index", "p_corrected", "correction", "index_null", "drop_a_by_a", "drop_a_by_b", "drop_b_by_b",
                        "drop_b_by_a", "p_a_by_a", "p_b_by_b", "random_drop_a", "random_drop_b", "n_random",
                        "null_low", "null_high", "matched_index", "matched_ci_low", "matched_ci_high", "matched_p_index", "beyond_greedy_stop")
PER_CLASS_COLUMNS = ("layer", "method", "target", "repeat", "fraction", "eval_task", "class", "accuracy",
                     "n_images")


def lesion_conditions(site: Site, rankings: dict, fractions, keep_only: bool = False) -> list:
    """[(method, target, repeat, fraction, silenced channels)] for every ranking and fraction > 0.
    keep_only silences every filter except the selected ones."""
    conditions = []
    for method, per_target in rankings.items():
        if method in NOT_RANKINGS:
            continue
        for target, entry in per_target.items():
            repeat = int(target.split("_")[1]) if method == "random" else 0
            name = "random" if method == "random" else target
            for f in fractions:
                if f <= 0:
                    continue
                chosen = np.asarray(entry["order"][:int(round(f * site.n_filters))], dtype=np.int64)
                if keep_only:
                    chosen = np.setdiff1d(np.arange(site.n_filters), chosen)
                conditions.append((method, name, repeat, float(f), chosen))
    return conditions


# the index's null: the other pairs of the closed ring (targeted a, targeted b, random order 1, ..., R), R + 1 indices
random_pair_indices = multiple_testing.pair_null


def dissociation_rows(site: Site, conditions: list, results: list, intact: dict, chance: dict, tasks: list,
                      n_boot: int = 1000, seed: int = 0, paired: bool = False, greedy_stop: float | None = None) -> list:
    """Per method and fraction: the double-dissociation index
    [drop_a(a-filters) - drop_a(b-filters)] + [drop_b(b-filters) - drop_b(a-filters)] of chance-corrected
    accuracy drops, its 95% bootstrap interval over test images, and where random lesions of the same size
    place it (empirical p-values: the targeted lesion's own-task drop against the random lesions' drops, and
    the index against the other pairs of a closed ring of the two targeted and the random lesions,
    `random_pair_indices`, whose range is null_low to null_high).

    paired: the two tasks are scored on the same test images, in the same order (tasks that share their images):
    each bootstrap resample then draws the same images for both, keeping the correlation of an image's two
    outcomes in the interval. beyond_greedy_stop marks a greedy row whose sets hold filters past those the greedy
    steps chose (`greedy_stop`: the ranking's stop fraction; None = GREEDY_DEFAULTS')."""
    if len(tasks) < 2:
        return []
    greedy_stop = GREEDY_DEFAULTS["stop"] if greedy_stop is None else greedy_stop
    a, b = tasks[:2]
    rng = np.random.default_rng([seed, site.depth, 99])
    samples = {t: rng.integers(0, len(intact[t]["correct"]), (n_boot, len(intact[t]["correct"]))) for t in (a, b)}
    if paired and len(intact[a]["correct"]) == len(intact[b]["correct"]):
        samples[b] = samples[a]
    base = {t: intact[t]["correct"].mean() for t in (a, b)}
    boot_base = {t: intact[t]["correct"][samples[t]].mean(1) for t in (a, b)}
    by_key = {(m, tg, r, f): res for (m, tg, r, f, _), res in zip(conditions, results)}
    fractions = sorted({f for _, _, _, f, _ in conditions})
    repeats = sorted({r for m, _, r, _, _ in conditions if m == "random"})

    def drop(correct, t):
        return corrected_drop(base[t], correct.mean(), chance[t])

    def boot_drop(correct, t):  # undefined (NaN) in a resample whose intact accuracy is at or below chance
        above = boot_base[t] - chance[t]
        return np.where(above > 1e-9, (boot_base[t] - correct[samples[t]].mean(1)) / np.where(above > 1e-9, above, 1),
                        np.nan)

    def interval(boot, value):  # 95% bootstrap interval; none when the index itself or most resamples are undefined
        if not np.isfinite(value) or np.isfinite(boot).mean() < 0.95:
            return float("nan"), float("nan")
        return float(np.nanpercentile(boot, 2.5)), float(np.nanpercentile(boot, 97.5))

    def p_value(value, null):  # undefined where the value or a null draw is (a head at chance)
        null = np.asarray(null, dtype=float)
        if not len(null) or not np.isfinite(value) or not np.isfinite(null).all():
            return float("nan")
        return (1 + int(np.sum(null >= value - 1e-9 * max(1.0, abs(value))))) / (len(null) + 1)  # float ties count

    rows = []
    for method in [m for m in dict.fromkeys(m for m, *_ in conditions) if m != "random"]:
        for f in fractions:
            res_a, res_b = by_key.get((method, a, 0, f)), by_key.get((method, b, 0, f))
            if res_a is None or res_b is None:
                continue
            d = {(e, t): drop(r[e]["correct"], e) for t, r in ((a, res_a), (b, res_b)) for e in (a, b)}
            index = d[a, a] - d[a, b] + d[b, b] - d[b, a]
            boot = (boot_drop(res_a[a]["correct"], a) - boot_drop(res_b[a]["correct"], a) +
                    boot_drop(res_b[b]["correct"], b) - boot_drop(res_a[b]["correct"], b))
            rand = [by_key[("random", "random", r, f)] for r in repeats if ("random", "random", r, f) in by_key]
            rand_drop = {e: np.array([drop(r[e]["correct"], e) for r in rand]) for e in (a, b)}
            null = random_pair_indices(rand_drop[a], rand_drop[b], (d[a, a], d[b, a]), (d[a, b], d[b, b]))
            rows.append({
                "layer": site.name, "depth": site.depth, "method": method, "fraction": _fraction_key(f),
                "task_a": a, "task_b": b, "index": f"{index:.4f}",
                "ci_low": f"{interval(boot, index)[0]:.4f}", "ci_high": f"{interval(boot, index)[1]:.4f}",
                "p_index": f"{p_value(index, null):.4f}", "drop_a_by_a": f"{d[a, a]:.4f}",
                "drop_a_by_b": f"{d[a, b]:.4f}", "drop_b_by_b": f"{d[b, b]:.4f}", "drop_b_by_a": f"{d[b, a]:.4f}",
                "p_a_by_a": f"{p_value(d[a, a], rand_drop[a]):.4f}",
                "p_b_by_b": f"{p_value(d[b, b], rand_drop[b]):.4f}",
                "random_drop_a": f"{rand_drop[a].mean() if len(rand) else float('nan'):.4f}",
                "random_drop_b": f"{rand_drop[b].mean() if len(rand) else float('nan'):.4f}", "n_random": len(rand),
                "null_low": f"{np.min(null) if len(null) else float('nan'):.4f}",
                "null_high": f"{np.max(null) if len(null) else float('nan'):.4f}",
                "index_null": multiple_testing.RING if len(null) else "",
                "beyond_greedy_stop": beyond_greedy_stop(method, f, site.n_filters, greedy_stop),
            })
    return rows


def matched_subsets(correct: dict, seed: int = 0) -> dict:
    """{task: test image indices} on which every task's intact accuracy is the same: the performance matching
    of Dobs et al. 2022. A task above the lowest accuracy keeps all its misclassified images and a seeded random
    sample of its correctly classified ones, as many as bring its accuracy down to the lowest (equal to within
    one image); the task at the lowest keeps all its images."""
    acc = {t: float(np.mean(c)) for t, c in correct.items()}
    low = min(acc.values())
    if any(a > low and a >= 1.0 for a in acc.values()):  # no misclassified image to keep: it cannot come down
        return None
    rng = np.random.default_rng([seed, 17])
    subsets = {}
    for t, c in correct.items():
        c = np.asarray(c, dtype=bool)
        if acc[t] - low < 1e-12 or low >= 1.0:
            subsets[t] = np.arange(len(c))
            continue
        wrong, right = np.flatnonzero(~c), np.flatnonzero(c)
        n_right = min(len(right), int(round(low * len(wrong) / (1 - low))))
        subsets[t] = np.sort(np.concatenate([wrong, rng.choice(right, n_right, replace=False)]))
    return subsets


def _restrict(per_image: dict, subsets: dict) -> dict:
    return {t: {k: v[subsets[t]] for k, v in r.items()} for t, r in per_image.items()}


def per_image_key(site: str, method: str, target: str, fraction, eval_task: str) -> str:
    """The key of one targeted lesion's per-image outcomes in lesion_per_image.npz ('intact|<task>' for none)."""
    return f"{site}|{method}|{target}|{_fraction_key(fraction)}|{eval_task}"


def per_image_arrays(site: Site, conditions: list, results: list, tasks: list) -> dict:
    """The per-image correctness of a site's targeted lesions (random orders left out), for statistics across
    runs that resample test images (the experiment's hierarchical bootstrap)."""
    return {per_image_key(site.name, m, tg, f, e): np.asarray(res[e]["correct"], dtype=bool)
            for (m, tg, _, f, _), res in zip(conditions, results) if m != "random" for e in tasks}


def write_per_image(path: Path, arrays: dict) -> None:
    def write(p):
        with open(p, "wb") as f:  # a file object: np.savez would add .npz to the temporary's name
            np.savez_compressed(f, **arrays)

    atomic_write(path, write)


def read_per_image(path: Path) -> dict:
    """{key: bool array} of lesion_per_image.npz; a damaged file is a UsageError naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k].astype(bool) for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise UsageError(f"{path}: not a readable per-image results file ({e}); rerun the lesion stage "
                         f"(--retrain=True --stages=\"['lesion']\")") from None


def select_sites(model: nn.Module, config: dict) -> list:
    """The sites a run lesions: all of them (with the inner bottleneck sites when lesion_inner is set), or
    those named or numbered in lesion_layers."""
    sites = lesion_sites(model, inner=config.get("lesion_inner", False))
    wanted = config.get("lesion_layers")
    if wanted is None:
        return sites
    by_name, chosen = {s.name: s for s in sites}, []
    for w in wanted:
        if isinstance(w, int) and not isinstance(w, bool) and -len(sites) <= w < len(sites):
            chosen.append(sites[w])
        elif isinstance(w, str) and w in by_name:
            chosen.append(by_name[w])
        else:
            raise UsageError(f"lesion_layers: unknown site {w!r}; expected depths 0..{len(sites) - 1} or names "
                             f"from: {', '.join(by_name)}")
    return sorted({s.name: s for s in chosen}.values(), key=lambda s: s.depth)


def _result_rows(site, method, target, repeat, f, n_silenced, res, summary, chance, tasks, matched=None,
                 intact=None, beyond=0):
    rows = []
    for e in tasks:
        acc, loss = float(res[e]["correct"].mean()), float(res[e]["loss"].mean())
        extra = {}
        if matched is not None:
            sub = matched[e]
            extra = {"matched_accuracy": f"{res[e]['correct'][sub].mean():.4f}",
                     "matched_intact_accuracy": f"{intact[e]['correct'][sub].mean():.4f}",
                     "matched_n_images": len(sub)}
        rows.append({
            "layer": site.name, "depth": site.depth, "n_filters": site.n_filters, "target": target,
            "method": method, "fraction": _fraction_key(f), "n_lesioned": n_silenced, "repeat": repeat,
            "eval_task": e, "accuracy": f"{acc:.4f}", "loss": f"{loss:.4f}",
            "intact_accuracy": f"{summary[e]['accuracy']:.4f}", "chance": f"{chance[e]:.4f}",
            "intact_loss": f"{summary[e]['loss']:.4f}", "n_images": len(res[e]["correct"]),
            "corrected_drop": f"{corrected_drop(summary[e]['accuracy'], acc, chance[e]):.4f}", **extra,
            "beyond_greedy_stop": int(beyond),
        })
    return rows


def _per_class_rows(site, method, target, repeat, f, res, labels, classes):
    rows = []
    for e, names in classes.items():
        for k, name in enumerate(names):
            hit = res[e]["correct"][labels[e] == k]
            rows.append({"layer": site.name, "method": method, "target": target, "repeat": repeat,
                         "fraction": _fraction_key(f), "eval_task": e, "class": name,
                         "accuracy": f"{hit.mean() if len(hit) else float('nan'):.4f}", "n_images": len(hit)})
    return rows


SWEEP_FILES = {"results": "lesion_results.csv", "rankings": "rankings.json", "dissociation": "dissociation.csv",
               "progress": "lesion_progress.json", "per_class": "lesion_per_class.csv",
               "per_image": "lesion_per_image.npz"}


def sweep_settings(model: nn.Module, config: dict) -> dict:
    """What a sweep's results depend on: a sweep under other settings starts over."""
    settings = {"fractions": sorted({float(f) for f in config["lesion_fractions"]} | {0.0}),
            "methods": list(config.get("lesion_methods", ["activation", "random"])),
            "random_repeats": int(config.get("random_repeats", 1)),
            "keep_only": bool(config.get("lesion_keep_only", False)), "mode": config.get("lesion_mode", "zero"),
            "rank_images": config.get("rank_images"), "sites": [s.name for s in select_sites(model, config)],
            "seed": config["seed"], "per_class": bool(config.get("lesion_per_class", False))}
    if config.get("match_accuracy"):  # named only when set, so that sweeps made before the setting still resume
        settings["match_accuracy"] = True
    if config.get("ranking_reliability"):
        settings["reliability"] = True
    if "greedy" in settings["methods"]:  # named only for a greedy sweep (an earlier one without them: _as_now)
        settings["greedy"] = greedy_settings(config)
    if config.get("ranking_precision", "fp32") != "fp32" and {"loss", "greedy"} & set(settings["methods"]):
        settings["ranking_precision"] = config["ranking_precision"]
    return settings


def _as_now(earlier: dict) -> dict:
    """An earlier sweep's settings as this version names them: a greedy sweep from before the greedy settings
    ran the exhaustive greedy ranking, stopping just past 20% (GREEDY_BEFORE)."""
    earlier = dict(earlier)
    if "greedy" in (earlier.get("methods") or []) and "greedy" not in earlier:
        earlier["greedy"] = dict(GREEDY_BEFORE)
    return earlier


def no_earlier_sweep(restart: str | None = None) -> dict:
    """What `earlier_sweep` returns when nothing of an earlier sweep is kept (and why, when there was one)."""
    return {"done": [], "rows": [], "dissociation": [], "per_class": [], "rankings": {}, "per_image": {},
            "restart": restart}


def earlier_sweep(settings: dict, out_dir: Path) -> dict:
    """What an earlier sweep in out_dir finished under the same settings (`sweep_settings`): {'done': site names, 'rows',
    'dissociation', 'per_class': their CSV rows, 'rankings': by site, 'restart': why an earlier sweep is not
    continued, or None}; nothing when there is none or its settings differ. Its files may be damaged or foreign: each is checked, and a bad one is a UsageError naming
    it. Reads only, so the pipeline calls it before it writes anything."""
    paths = {k: Path(out_dir) / f for k, f in SWEEP_FILES.items()}
    nothing = no_earlier_sweep()
    if not paths["progress"].exists():
        return nothing
    progress = read_json(paths["progress"], lambda p: isinstance(p, dict) and isinstance(p.get("settings"), dict)
                         and isinstance(p.get("done"), list) and all(isinstance(s, str) for s in p["done"]),
                         "the sweep's progress ({'settings': {...}, 'done': [site names]})")
    if _as_now(progress["settings"]) != settings or not paths["results"].exists():
        return dict(nothing, restart=f"lesion settings differ from the earlier sweep's "
                                     f"({paths['progress'].name}): the sweep starts over and replaces its files"
                    if progress["done"] else None)
    done = set(progress["done"])
    if done and not paths["per_image"].exists():
        return dict(nothing, restart=f"{paths['per_image'].name} is missing (the sweep predates it, or it was "
                                     f"removed): the sweep starts over")
    columns = {"results": tuple(c for c in LESION_COLUMNS if c not in ADDED_LESION_COLUMNS),
               "dissociation": ("layer", "method", "fraction", "index"), "per_class": PER_CLASS_COLUMNS}
    stop = settings.get("greedy", GREEDY_DEFAULTS)["stop"]
    n_filters = {}  # by site, from the results: what an earlier file's dissociation rows need

    def rows_of(key):  # the rows of finished sites, from a file that must be as this tool wrote it
        if not done or not paths[key].exists():
            return []
        rows = [r for r in read_csv(paths[key], columns[key]) if r["layer"] in done]
        for r in rows if key in ("results", "dissociation") else []:  # a column added since the file was written
            n = r.get("n_filters") or n_filters.get(r["layer"])  # None: its site lacks results (restarted below)
            if r.get("beyond_greedy_stop") in (None, "") and n is not None:
                try:
                    r["beyond_greedy_stop"] = beyond_greedy_stop(r["method"], float(r["fraction"]), int(n), stop)
                except ValueError:
                    raise UsageError(f"{paths[key]}: damaged (a row's fraction or n_filters is not a number); "
                                     f"move it away and run again to write it anew") from None
        return rows

    rankings = read_json(paths["rankings"], lambda r: isinstance(r, dict) and all(
        isinstance(v, dict) for v in r.values()), "rankings by site") if done and paths["rankings"].exists() else {}
    per_image = read_per_image(paths["per_image"]) if done and paths["per_image"].exists() else {}
    results = rows_of("results")
    n_filters.update({r["layer"]: r["n_filters"] for r in results})
    earlier = {"done": [s for s in settings["sites"] if s in done], "rows": results,
               "dissociation": rows_of("dissociation"), "per_class": rows_of("per_class"),
               "rankings": {k: v for k, v in rankings.items() if k in done},
               "per_image": {k: v for k, v in per_image.items() if k.split("|")[0] in done | {"intact"}},
               "restart": None}
    if done - set(earlier["rankings"]) or done - {r["layer"] for r in earlier["rows"]}:
        return dict(nothing, restart=f"{paths['progress'].name} lists sites whose results or rankings are "
                                     f"missing: the sweep starts over")
    return earlier


def _one_process(obj):
    return [obj]


def lesion_stage(model: nn.Module, images: dict, config: dict, out_dir: Path, rank: int = 0, world: int = 1,
                 gather=_one_process) -> Path:
    """The lesion sweep of a run: for each site, rank its filters for each task by every method in
    config['lesion_methods'] on training images, silence the top fraction of each ranking (and of each random
    order), evaluate both heads on the test images, and write lesion_results.csv, rankings.json and
    dissociation.csv after every site. A killed sweep resumes at the first unfinished site.

    Under torchrun every process calls it: the sites are shared out (process r sweeps every world-th site from
    the r-th), `gather(obj)` brings every process's result of a round to process 0 (a list in rank order; None
    elsewhere), and process 0 alone prints and writes, in site order: the files are those of one process."""
    from tqdm import tqdm

    main = rank == 0
    say = print if main else (lambda *a, **k: None)
    out_dir = Path(out_dir)
    tasks = list(images)
    settings = sweep_settings(model, config)
    fractions, methods, repeats = settings["fractions"], settings["methods"], settings["random_repeats"]
    keep_only, mode, per_class_wanted = settings["keep_only"], settings["mode"], settings["per_class"]
    sites = select_sites(model, config)
    paths = {k: out_dir / f for k, f in SWEEP_FILES.items()}
    earlier = earlier_sweep(settings, out_dir) if not config.get("retrain") else \
        no_earlier_sweep("--retrain=True: the sweep starts over")
    if earlier["restart"]:
        say(f"lesion sweep: {earlier['restart']}")
    progress = {"settings": settings, "done": list(earlier["done"])}
    done = set(earlier["done"])
    rows, diss, per_class, rankings = earlier["rows"], earlier["dissociation"], earlier["per_class"], \
        earlier["rankings"]
    per_image = dict(earlier["per_image"])
    if done:
        say(f"lesion sweep: {len(done)} of {len(sites)} sites finished earlier; continuing")
    todo = [s for s in sites if s.name not in done]
    if not todo:
        return paths["results"]
    model.eval()
    device = next(model.parameters()).device
    test = image_batches(images, "test")
    train_sample = image_batches(images, "train", n_per_task=config.get("rank_images", 256), seed=config["seed"])
    intact = evaluate_lesions(model, sites[0], [[]], test)[0]
    chance = {t: images[t].data.chance for t in tasks}
    paired = len(tasks) >= 2 and images[tasks[0]].data.images is images[tasks[1]].data.images  # one image set
    summary = {t: _summary(intact[t]) for t in tasks}
    per_image.update({f"intact|{t}": np.asarray(intact[t]["correct"], dtype=bool) for t in tasks})
    matched = matched_subsets({t: intact[t]["correct"] for t in tasks}, config["seed"]) \
        if settings.get("match_accuracy") else None
    if settings.get("match_accuracy") and matched is None:
        say("accuracy matching impossible: a task classifies every test image correctly while another does not "
            "(the matched_ columns stay empty)")
    if matched is not None:
        say("accuracy-matched test images: " + ", ".join(
            f"{t} {len(matched[t])} images at {intact[t]['correct'][matched[t]].mean():.3f}" for t in tasks))
    say("intact test accuracy: " + ", ".join(f"{t} {summary[t]['accuracy']:.3f} (chance {chance[t]:.3f})"
                                             for t in tasks))
    caches = cache_bytes(model, todo, test[0][1].shape[1:], max(len(x) for _, x, _ in test))
    masks_per_pass = default_masks_per_pass(device, max(caches.values()))
    say(f"activation cache: at most {max(caches.values()) / 2**20:.1f} MiB per image batch "
        f"({max(len(x) for _, x, _ in test)} images), {masks_per_pass} lesion(s) per pass"
        + (f"; sites shared out across {world} processes" if world > 1 else ""))
    labels = {t: torch.cat([y for tb, _, y in test if tb == t]).cpu().numpy() for t in tasks}
    classes = {t: list(images[t].data.classes) for t in tasks}
    n_test = sum(len(y) for _, _, y in test)

    greedy = settings.get("greedy")
    greedy_stop = (greedy or GREEDY_DEFAULTS)["stop"]
    wanted_precision = settings.get("ranking_precision", "fp32")
    # under torchrun the greedy rankings (the costliest by far) are computed by all processes together, each
    # scoring a share of every step's candidates; everything else about a site is its own process's work
    share = (rank, world, all_gather_objects) if world > 1 and "greedy" in methods and \
        torch.distributed.is_available() and torch.distributed.is_initialized() else None
    own = [m for m in methods if not (share and m == "greedy")]
    scored = [m for m in own if m in ("loss", "greedy")]  # the rankings whose precision is a setting
    precision = {"used": None}  # bf16 asked for on a GPU: decided by a check at this process's first site
    if share:
        say(f"greedy rankings: each step's candidates shared out across {world} processes (fp32)")

    def shared_greedy(site):
        """The site's greedy rankings, every process scoring a share of each step's candidates (in fp32: the
        bf16 check is a process's own)."""
        return rank_site(model, site, train_sample, tasks, ["greedy"], repeats, config["seed"], masks_per_pass,
                         reliability=settings.get("reliability", False), greedy=greedy, precision="fp32",
                         share=share)

    def rank_filters(site):
        """The site's rankings, in fp32 unless bf16 was asked for and its check at the first site passed."""
        def ranked(chosen_methods, how, reliability):
            return rank_site(model, site, train_sample, tasks, chosen_methods, repeats, config["seed"],
                             masks_per_pass, reliability=reliability, greedy=greedy, precision=how)

        reliability = settings.get("reliability", False)
        if wanted_precision == "fp32" or not common.use_bf16(device) or not scored:  # bf16 changes nothing
            return ranked(own, "fp32", reliability)
        if precision["used"] is None:
            ranking = ranked(own, "fp32", reliability)
            same = same_top_sets(ranking, ranked(scored, "bf16", False), scored, tasks, 0.2)
            precision["used"] = "bf16" if all(same.values()) else "fp32"
            ranking["precision"] = {"requested": "bf16", "used": "fp32", "bf16_same_top20": same,
                                    "later_sites": precision["used"]}
            say(f"ranking precision: bf16 {'gives' if precision['used'] == 'bf16' else 'does not give'} the "
                f"fp32 top-20% sets at {site.name} ({', '.join(k for k, v in same.items() if not v) or 'all same'}"
                f"); later sites rank in {precision['used']}")
            return ranking
        ranking = ranked(own, precision["used"], reliability)
        ranking["precision"] = {"requested": "bf16", "used": precision["used"]}
        return ranking

    def sweep_site(site, given=None):
        """Everything one site adds to the sweep's files; `given`: its greedy rankings, computed together."""
        start = time.perf_counter()
        ranking = rank_filters(site) if given is None else merge_rankings(rank_filters(site), given)
        if site.name.startswith(branches.BRANCH_PREFIX):  # after a branch point: each filter's task copy
            ranking["branch"] = {"copy_of_filter": branches.copy_of_filter(
                site.n_filters, list(getattr(model, "task_names", tasks)))}
        means = None
        if mode == "mean":
            acts = site_activations(model, [site], train_sample)[site.name]
            means = np.concatenate(list(acts.values())).mean(0)
        conditions = lesion_conditions(site, ranking, fractions, keep_only)
        results = evaluate_lesions(model, site, [c for *_, c in conditions], test, mode, means, masks_per_pass)
        keyed = {(m, t, r, f): (len(c), res) for (m, t, r, f, c), res in zip(conditions, results)}
        out = {"rows": [], "per_class": [], "ranking": ranking, "n_lesions": len(conditions)}
        for method, target, repeat in dict.fromkeys((m, t, r) for m, t, r, *_ in conditions):
            for f in fractions:
                n_silenced, res = (0, intact) if f == 0 else keyed[(method, target, repeat, f)]
                out["rows"] += _result_rows(site, method, target, repeat, f, n_silenced, res, summary, chance, tasks,
                                            matched, intact,
                                            beyond_greedy_stop(method, f, site.n_filters, greedy_stop))
                if per_class_wanted:
                    out["per_class"] += _per_class_rows(site, method, target, repeat, f, res, labels, classes)
        out["diss"] = dissociation_rows(site, conditions, results, intact, chance, tasks, seed=config["seed"],
                                        paired=paired, greedy_stop=greedy_stop)
        if matched is not None:
            on_matched = dissociation_rows(site, conditions, [_restrict(r, matched) for r in results],
                                           _restrict(intact, matched), chance, tasks, seed=config["seed"])
            for row, m in zip(out["diss"], on_matched):
                row.update({f"matched_{k}": m[k] for k in ("index", "ci_low", "ci_high", "p_index")})
        out["per_image"] = per_image_arrays(site, conditions, results, tasks)
        out["seconds"] = time.perf_counter() - start
        return out

    started, finished = time.perf_counter(), 0
    rounds = [todo[k:k + world] for k in range(0, len(todo), world)]
    for group in tqdm(rounds, desc="lesion sweep", leave=False, disable=None if main else True):
        given, spent = {}, {}
        for site in group if share else []:  # every process, every site of the round, together
            spent[site.name] = time.perf_counter()
            given[site.name] = shared_greedy(site)
            spent[site.name] = time.perf_counter() - spent[site.name]
        mine = sweep_site(group[rank], given.get(group[rank].name)) if rank < len(group) else None
        if mine is not None:
            mine["seconds"] += spent.get(group[rank].name, 0.0)
        gathered = gather(mine)
        if not main:
            continue
        for site, got in zip(group, gathered):
            rows += got["rows"]
            per_class += got["per_class"]
            diss += got["diss"]
            per_image.update(got["per_image"])
            rankings[site.name] = got["ranking"]
            progress["done"].append(site.name)
        write_csv(paths["results"], LESION_COLUMNS, rows)
        # after the last site: the headline's multiple-test correction over every site, from the sweep's own
        # numbers, written before the progress says the sweep is done (a sweep killed in between redoes that site)
        if len(progress["done"]) == len(sites):
            diss = multiple_testing.corrected_rows(diss, rows)
        write_csv(paths["dissociation"], DISSOCIATION_COLUMNS, diss)
        if per_class_wanted:
            write_csv(paths["per_class"], PER_CLASS_COLUMNS, per_class)
        write_text(paths["rankings"], json.dumps(rankings))
        write_per_image(paths["per_image"], per_image)
        write_text(paths["progress"], json.dumps(progress, indent=1))
        finished += len(group)
        left = (time.perf_counter() - started) / finished * (len(todo) - finished)
        for site, got in zip(group, gathered):
            print(f"lesion site {len(progress['done']) - len(group) + group.index(site) + 1}/{len(sites)} {site.name} "
                  f"({site.n_filters} filters): ranked by {', '.join(methods)}; {got['n_lesions']} lesions x {n_test} "
                  f"test images; {got['seconds']:.1f} s; about {format_seconds(left)} left", flush=True)
    say(f"wrote {paths['results']} ({len(rows)} rows, {len(sites)} sites), {paths['dissociation'].name}, "
        f"{paths['rankings'].name}")
    return paths["results"]


def _summary(per_image: dict) -> dict:
    return {"accuracy": float(per_image["correct"].mean()), "loss": float(per_image["loss"].mean()),
            "n": int(len(per_image["correct"]))}
