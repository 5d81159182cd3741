"""dualtask.model.sites"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from dualtask.core.common import UsageError
from dualtask.model import branches, graph


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
    Such a pair offers no inner sites.

    A network traced from its graph (graph.GraphTrunk, a network this tool did not train) has the sites its graph
    gives (graph.py), named `trunk.<name>`, each an nn.Identity tap on the site's value; no inner sites."""
    from torchvision.models.resnet import Bottleneck

    trunk = getattr(model, "trunk", None)
    if isinstance(trunk, graph.GraphTrunk):
        return [Site(f"trunk.{name}", tap, n, i) for i, (name, tap, n) in enumerate(trunk.sites())]
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


def _constant(module: nn.Module, key: str, value: float) -> None:
    """Replace a module's parameter or buffer by a float64 constant of its shape (None stays None), not trained."""
    for table in (module._parameters, module._buffers):
        if table.get(key) is not None:
            table[key] = torch.full(table[key].shape, value, dtype=torch.float64)


def _positive(module: nn.Module, seed: int) -> None:
    """Replace a layer's weight by float64 positive weights, unequal across its inputs and outputs (equal ones would
    cancel after a layer norm over channels); any positive weights give one support, so one receptive field."""
    shape = module._parameters["weight"].shape
    fan_in = int(torch.Size(shape[1:]).numel())
    g = torch.Generator().manual_seed(seed)
    module._parameters["weight"] = (0.5 + torch.rand(shape, generator=g, dtype=torch.float64)) / fan_in


class _Reached(Exception):
    """Raised by receptive_fields' hook once every site's output is in hand: nothing after them is run."""


def receptive_fields(model: nn.Module, sites: list, image_size: int) -> dict:
    """{site name: {'pixels': the side of the image region one unit at the centre of the site's map can see,
    'image_size', 'share': pixels / image_size}}: the theoretical receptive field, clipped to the image (1.0: the
    unit sees the whole image). The verdict calls a site early, and a split there image statistics, when its
    share is below verdict.EARLY_RF_SHARE.

    Measured, not tabulated, so that any network's sites get it (`_probe`): every input pixel the centre unit
    depends on gets a gradient above 0 and none cancels. Sites without a spatial map: the whole image."""
    probe = _probe(model)
    found = {s.name: s for s in lesion_sites(probe, inner=True)}
    outputs, handles = {}, []

    def keep(name, output):
        outputs[name] = output
        if len(outputs) == len(sites):
            raise _Reached()  # nothing after the deepest site is run

    for s in sites:
        handles.append(found[s.name].module.register_forward_hook(lambda m, i, out, name=s.name: keep(name, out)))
    x = torch.ones(1, 3, image_size, image_size, dtype=torch.float64, requires_grad=True)
    try:
        with torch.enable_grad():
            with contextlib.suppress(_Reached):
                probe(x)
            missing = [s.name for s in sites if s.name not in outputs]
            if missing:
                raise RuntimeError(f"receptive_fields: the forward pass did not reach {missing[0]}")
            out = {s.name: _extent(outputs[s.name], x) for s in sites}
    finally:
        for h in handles:
            h.remove()
    return {name: {"pixels": px, "image_size": int(image_size), "share": round(px / image_size, 4)}
            for name, px in out.items()}


def _probe(model: nn.Module) -> nn.Module:
    """A copy of the network for receptive fields: every conv weight positive (each unit a weighted mean of its inputs),
    in float64, BN the identity, max pools turned into average pools of the same geometry (a max pool passes on
    one input's gradient only). It shares the network's tensors, none changed (its modules get new ones)."""
    import copy

    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    probe = copy.deepcopy(model, memo=memo).eval()
    for name, module in list(probe.named_modules()):
        if isinstance(module, (nn.Conv2d, nn.Linear)):  # a Linear: channel mixing at one position, or a head
            _positive(module, len(name))
            _constant(module, "bias", 0.0)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):  # float64 like the rest; the map's extent is unchanged
            _constant(module, "weight", 1.0)
            _constant(module, "bias", 0.0)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            for key, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
                _constant(module, key, value)
        elif isinstance(module, nn.ReLU):
            module.inplace = False
        elif isinstance(module, nn.MaxPool2d) and name:
            parent, _, attr = name.rpartition(".")
            setattr(probe.get_submodule(parent) if parent else probe, attr,
                    nn.AvgPool2d(module.kernel_size, module.stride, module.padding, ceil_mode=module.ceil_mode))
    for module in probe.modules():  # every other tensor in float64 too (a traced network reads some directly)
        for table in (module._parameters, module._buffers):
            for key, value in table.items():
                if value is not None and value.is_floating_point() and value.dtype != torch.float64:
                    table[key] = value.detach().double()
    return probe


def _extent(output: torch.Tensor, x: torch.Tensor) -> int:
    """The side (in pixels of x) of the input region the unit at the centre of `output`'s map depends on."""
    if output.ndim != 4:
        return int(x.shape[-1])
    centre = output[0, :, output.shape[2] // 2, output.shape[3] // 2].sum()
    (grad,) = torch.autograd.grad(centre, x, retain_graph=True)
    seen = grad[0].abs().sum(0) > 0
    rows, cols = torch.nonzero(seen.any(1)).flatten(), torch.nonzero(seen.any(0)).flatten()
    return int(max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)) if len(rows) else 0


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

