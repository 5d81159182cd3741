"""Where filters are silenced and what silencing them does: lesion sites, masks, the suffix-only evaluation of
many lesions at once, and site activations.

A lesion silences chosen output channels of one site by multiplying the site's output, after its BN and
ReLU, by a mask (never by editing weights: a BN shift would keep a zeroed filter's channel alive). Sites are
each conv layer's ReLU output for VGG, and the stem and each bottleneck block's output (after the residual
add and ReLU) for ResNet/ResNeXt, named by their module path in `model.named_modules()`.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn as nn

from dualtask.core import device as device_mod
from dualtask.core.common import UsageError
from dualtask.core.device import autocast
from dualtask.core.names import RANKING_PRECISIONS
from dualtask.data import transforms
from dualtask.model.graph import GraphTrunk
from dualtask.model.sites import Site, forward_chain, lesion_sites


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




class SiteRunner:
    """Runs the network in two parts around one lesion site: the prefix once per image batch, then only the
    suffix for each lesion, several lesions per pass (their masks stacked along the batch)."""

    def __init__(self, model: nn.Module, site: Site):
        self.model, self.site = model, site
        trunk = getattr(model, "trunk", None)
        self.graph = trunk.runner(site.module) if isinstance(trunk, GraphTrunk) else None  # a traced network
        if self.graph is not None:
            return
        steps = forward_chain(model)
        names = [n for n, _ in steps]
        if site.path in names:  # the site is a step's output: cache that output
            j = names.index(site.path) + 1
            self.inner = False
        else:  # the site lies inside a step (an inner bottleneck site): cache that step's input
            j = next(i for i, n in enumerate(names) if site.path.startswith(n + "."))
            self.inner = True
        self.prefix_steps, self.suffix_steps = steps[:j], steps[j:]

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        x = model_input(x)
        if self.graph is not None:
            return self.graph.packed_prefix(x)
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
        return self._heads(self.features_with(cached, transform))

    def _heads(self, x: torch.Tensor) -> dict:
        outputs = getattr(self.model, "head_outputs", None)  # DualTaskNet's, split or joint; a plain net: its heads
        return outputs(x) if outputs is not None else {t: head(x) for t, head in self.model.heads.items()}

    def _head_inputs(self, x: torch.Tensor) -> dict:
        inputs = getattr(self.model, "head_inputs", None)
        return inputs(x) if inputs is not None else {t: x for t in self.model.heads}

    def readout_inputs(self, cached: torch.Tensor, keep: torch.Tensor, add: torch.Tensor) -> dict:
        """{task: what its readout reads (M, B, width)} for M masks applied to a cached batch: the trunk's
        features, or a branched network's task copy's part of them."""
        return self.suffix_and_inputs(cached, keep, add, logits=False)[1]

    def suffix_and_inputs(self, cached: torch.Tensor, keep: torch.Tensor, add: torch.Tensor,
                          logits: bool = True) -> tuple:
        """({task: logits (M, B, classes)} or None, {task: its readout's input (M, B, width)}) for M masks
        applied to a cached batch, from one pass through the rest of the trunk."""
        m, b = keep.shape[0], cached.shape[0]
        x = self.features_with(cached.repeat(m, *([1] * (cached.ndim - 1))), lambda out: apply_mask(out, keep, add, m))
        inputs = {t: v.reshape(m, b, -1) for t, v in self._head_inputs(x).items()}
        return ({t: out.view(m, b, -1) for t, out in self._heads(x).items()} if logits else None), inputs

    def features_with(self, cached: torch.Tensor, transform) -> torch.Tensor:
        """The trunk's features (B, width), the heads' input, with `transform` applied to the site's output."""
        if self.graph is not None:
            return self.graph.packed_suffix(cached, transform)
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
        return x


def image_batches(images: dict, split: str = "test", batch_size: int = 200, n_per_task=None, seed: int = 0,
                  compact: bool = False) -> list:
    """[(task, normalised images, labels)] of every task's split (or a seeded sample of n_per_task of it), cut
    into batches, on the images' device. Loaded once and reused for every lesion.

    compact=True keeps the images as stored, uint8 (B, H, W, 3): a quarter of the float32 batch's memory on the
    device (more ranking images, larger lesion stacks), normalised batch by batch as the network takes them
    (`model_input`; the engine's functions take either form and give the same numbers)."""
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
            if key not in loaded:  # the images once, each task's labels its own
                x, y = ti.raw(chunk) if compact else ti.batch(chunk)
                loaded[key] = x if compact else transforms.normalize(x)
            else:
                y = ti.labels[torch.from_numpy(chunk).to(ti.labels.device)]
            batches.append((task, loaded[key], y))
    return batches


def model_input(x: torch.Tensor) -> torch.Tensor:
    """A batch as the network takes it: stored uint8 images (B, H, W, 3) (image_batches(compact=True)) become
    normalised float (B, 3, H, W), the very numbers image_batches gives without compact; float batches pass."""
    return transforms.normalize(transforms.to_float(x)) if x.dtype == torch.uint8 else x


def input_shape(batches: list) -> tuple:
    """(3, H, W): the shape of one image of the batches as the network takes it, whichever form they hold."""
    return tuple(model_input(batches[0][1][:1]).shape[1:])


def masks_per_pass_by_site(model: nn.Module, sites: list, batches: list) -> dict:
    """{site name: lesions per pass}: each site's own, from the size of its cached output for the batches' largest
    batch (`cache_bytes`, `default_masks_per_pass`), as the sweep chooses them."""
    device = next(model.parameters()).device
    caches = cache_bytes(model, sites, input_shape(batches), max(len(y) for _, _, y in batches))
    return {s.name: default_masks_per_pass(device, caches[s.name]) for s in sites}


@torch.inference_mode()
def evaluate_lesions(model: nn.Module, site: Site, lesions: list, batches: list, mode: str = "zero",
                     means=None, masks_per_pass: int = 1, precision: str | None = None, read=None,
                     heads: bool = True) -> list:
    """Evaluate many lesions of one site on the same images, computing the prefix once per batch.

    lesions: a list of channel-index arrays. Returns, per lesion, {task: {'correct': bool array, 'loss':
    float array}} for every image of every task (each image scored by its own task's head). Equal to
    running the whole network once per lesion with `ablate` (exactly so with masks_per_pass=1 on the CPU).
    precision: None = the evaluation's (bf16 autocast on CUDA); 'fp32' or 'bf16' = a ranking's
    (`ranking_precision`).
    read: a readout of the heads' inputs, read(task, inputs (B, width) float32 numpy, start) -> predicted labels
    of the task's images start..start+B (in batch order): each task's entry also gets 'read', its correct
    predictions, from the same pass as the heads' (readouts.fixed_reader); heads=False leaves the heads out.
    """
    model.eval()
    runner = SiteRunner(model, site)
    masks = [lesion_mask(ch, site.n_filters, None if mode == "zero" else means) for ch in lesions]
    results = [{} for _ in lesions]
    # batches holding the same image tensor (tasks that share their images) are run once, scored by each head
    unique, start_of = {}, {}
    for task, x, y in batches:
        unique.setdefault(id(x), (x, []))[1].append((task, y, start_of.get(task, 0)))
        start_of[task] = start_of.get(task, 0) + len(y)
    parts = (("correct", "loss") if heads else ()) + (("read",) if read is not None else ())
    for x, scored in unique.values():
        with autocast(x.device) if precision is None else ranking_precision(x.device, precision):
            cached = runner.prefix(x)
            for start in range(0, len(masks), masks_per_pass):
                group = masks[start:start + masks_per_pass]
                keep = torch.stack([k for k, _ in group])
                add = torch.stack([a for _, a in group])
                if read is None:
                    out, inputs = runner.suffix(cached, keep, add), None
                else:
                    out, inputs = runner.suffix_and_inputs(cached, keep, add, logits=heads)
                for task, y, first in scored:
                    logits = out[task].float() if heads else None
                    for k in range(len(group)):
                        entry = results[start + k].setdefault(task, {p: [] for p in parts})
                        if heads:
                            entry["loss"].append(nn.functional.cross_entropy(logits[k], y, reduction="none").cpu())
                            entry["correct"].append((logits[k].argmax(1) == y).cpu())
                        if read is not None:
                            predicted = read(task, inputs[task][k].float().cpu().numpy(), first)
                            entry["read"].append(torch.from_numpy(predicted == y.cpu().numpy()))
    return [{t: {p: torch.cat(v[p]).numpy() for p in parts} for t, v in r.items()} for r in results]


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
                    logits = model(model_input(x))[task].float()
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


# On the CPU, lesions are stacked along the batch until the stacked cached batch reaches about this many bytes:
# small batches (a deep site's few positions, a ranking's 16 images) leave the cores' vector units idle between
# kernel launches, while larger ones fall out of the cache (benchmarks/lesion_speed.py, BENCHMARKS.md)
CPU_STACK_BYTES = 12 * 2 ** 20


def default_masks_per_pass(device: torch.device, batch_bytes: int = 0) -> int:
    """Lesions evaluated per pass of a cached batch of `batch_bytes`. On a GPU, as many stacked copies as fit a
    quarter of the free memory (common.free_memory; the part after the site needs a few times its input); on the
    CPU, as many as keep the stacked batch within CPU_STACK_BYTES. At most 32, at least 1. A stacked batch has
    other shapes than one lesion's, for which the kernels may round otherwise: equal to one lesion per pass
    within float32 rounding (bit for bit on the 2-core development machine for the sizes its tests use)."""
    if batch_bytes <= 0:
        return 1
    free = device_mod.free_memory(device)
    room = CPU_STACK_BYTES if free is None else 0.25 * free / 4
    return int(max(1, min(32, room // batch_bytes)))


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
                model(model_input(x))
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










def order_of(scores: np.ndarray) -> np.ndarray:
    """Channels from highest to lowest score (ties broken by channel index)."""
    return np.argsort(-np.asarray(scores), kind="stable")


@contextlib.contextmanager
def ranking_precision(device: torch.device, precision: str = "fp32"):
    """How a ranking scores lesions: 'fp32' (on CUDA no bf16 autocast; TF32 matrix products allowed) or 'bf16'
    (bf16 autocast on CUDA). The CPU computes in float32 either way. Where a device computes in bf16 and may use
    TF32: common.use_bf16 and common.use_tf32."""
    if precision not in RANKING_PRECISIONS:
        raise UsageError(f"ranking_precision={precision!r}; expected one of {list(RANKING_PRECISIONS)}")
    if not device_mod.use_bf16(device):
        yield
        return
    if precision == "bf16":
        with autocast(device, enabled=True):
            yield
        return
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if device_mod.use_tf32(device):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


