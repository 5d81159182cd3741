"""Networks this tool did not train: a torchvision classification model or a timm model by name, with random
weights, its published weights (downloaded only when asked), or a local weights file; `graph.py` finds its
lesion sites.

    build_network("resnet50")                           # torchvision, random weights
    build_network("torchvision:resnet50", "pretrained")  # torchvision's DEFAULT weights, downloaded the first time
    build_network("timm:convnext_tiny", "my_weights.pt") # timm (an optional dependency), a local state dict

A weights file is read with `torch.load(weights_only=True)` and must fit the architecture exactly: the first key
that is missing, left over or of another shape is named, with both shapes. A file whose only misfit is the
classifier's number of classes builds the network with the file's number instead (a fine-tuned checkpoint).
"""
from __future__ import annotations

import difflib
import os

import torch.nn as nn

from dualtask.config.settings import NETWORK_FORM, WEIGHTS_FORM
from dualtask.core.common import UsageError
from dualtask.model.network import download_failed, read_state_dict

SOURCES = ("torchvision", "timm")
NAME_FORM = NETWORK_FORM


def parse_name(name: str) -> tuple:
    """(source, architecture) of a network name: 'resnet50' and 'torchvision:resnet50' are torchvision's."""
    if not isinstance(name, str) or not name.strip():
        raise UsageError(f"network={name!r}; expected {NAME_FORM}")
    source, _, arch = name.partition(":") if ":" in name else ("torchvision", "", name)
    if source not in SOURCES:
        raise UsageError(f"network={name!r}: unknown source {source!r}; expected {NAME_FORM}")
    return source, arch.strip()


def _timm():
    try:
        import timm
    except ImportError:
        raise UsageError("timm is not installed: `pip install timm` to analyse timm models (an optional "
                         "dependency), or name a torchvision model") from None
    return timm


def known(source: str) -> list:
    """The architectures a source offers (torchvision: its classification models)."""
    if source == "timm":
        return list(_timm().list_models())
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _refuse_unknown(name: str, source: str, arch: str) -> None:
    names = known(source)
    if source == "timm" and arch.split(".")[0] in names:  # a pretrained tag, e.g. resnet50.a1_in1k
        return
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=4, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UsageError(f"network={name!r}: {source} has no model {arch!r}; {hint}expected {NAME_FORM}")


def _construct(source: str, arch: str, pretrained: bool = False, num_classes: int | None = None) -> nn.Module:
    kw = {} if num_classes is None else {"num_classes": num_classes}
    if source == "timm":
        return _timm().create_model(arch, pretrained=pretrained, **kw)
    import torchvision.models as tvm

    if not pretrained:
        if arch in ("googlenet", "inception_v3"):  # as built with torchvision's weights, whatever the weights:
            kw.update(aux_logits=False, init_weights=True, transform_input=True)  # a rebuild computes the same
        return tvm.get_model(arch, weights=None, **kw)
    weights = tvm.get_model_weights(arch).DEFAULT
    try:
        return tvm.get_model(arch, weights=weights, progress=int(os.environ.get("RANK", 0)) == 0)
    except Exception as e:  # no network, a refused or damaged download
        raise download_failed("weights='pretrained'", f"weights of {arch}", weights.url, e, "weights") from None


def misfit(model_state: dict, file_state: dict) -> str | None:
    """The first way a state dict does not fit a network's, in the network's order: a key missing from the file,
    a tensor of another shape; then a key the network does not have. None when it fits."""
    for key, value in model_state.items():
        if key not in file_state:
            return f"key {key!r} is missing from the file"
        if tuple(file_state[key].shape) != tuple(value.shape):
            return (f"key {key!r} has shape {tuple(file_state[key].shape)} in the file, {tuple(value.shape)} in the "
                    f"network")
    extra = [k for k in file_state if k not in model_state]
    return f"the file has key {extra[0]!r}, which the network does not" if extra else None


def _classes_in(model: nn.Module, file_state: dict) -> int | None:
    """The file's number of classes where the network's last linear layer is the only misfit, else None."""
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linear:
        return None
    last = linear[-1]
    own = model.state_dict()
    off = [k for k in own if k not in file_state or tuple(file_state[k].shape) != tuple(own[k].shape)]
    weight = file_state.get(f"{last}.weight")
    if off and all(k.startswith(last + ".") for k in off) and weight is not None and weight.ndim == 2:
        return int(weight.shape[0])
    return None


def build_network(name: str, weights: str = "random") -> nn.Module:
    """The network `name` names (NAME_FORM) with `weights` (WEIGHTS_FORM), in evaluation mode."""
    source, arch = parse_name(name)
    _refuse_unknown(name, source, arch)
    if weights in ("random", None):
        return _construct(source, arch).eval()
    if weights == "pretrained":
        return _construct(source, arch, pretrained=True).eval()
    if not isinstance(weights, (str, os.PathLike)):
        raise UsageError(f"weights={weights!r}; expected {WEIGHTS_FORM}")
    state = read_state_dict(str(weights), "weights", WEIGHTS_FORM)
    if state and all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    model = _construct(source, arch)
    classes = _classes_in(model, state)
    if classes is not None:
        model = _construct(source, arch, num_classes=classes)
    wrong = misfit(model.state_dict(), state)
    if wrong:
        raise UsageError(f"weights={str(weights)!r} does not fit {source}'s {arch}: {wrong}; expected a state dict "
                         f"of that architecture (torch.save(model.state_dict(), path))")
    model.load_state_dict(state)
    return model.eval()
