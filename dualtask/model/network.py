"""The dual-task network: a torchvision trunk (VGG16/19, ResNet50, ResNeXt50) with one head per task or one
joint output layer, branched copies after a branch point (branches.py), its initialisation, and trunk weights
from ImageNet or a file."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from dualtask.config.settings import BACKBONES, HEADS, INIT_FORM, RECIPE
from dualtask.core.common import UsageError
from dualtask.model import branches
from dualtask.model import sites as sites_mod

# ----------------------------------------------------------------------------------------------------------
# the model


def vgg_pool(image_size: int) -> int:
    """Side of the pooled map VGG's classifier reads: its conv map (image_size / 32) up to torchvision's 7.

    torchvision pools every input to 7 x 7, so a 32-px image's single conv position is copied 49 times into
    the first fully connected layer (25,088 inputs for 512 numbers); a classifier that reads the map it has
    keeps the reference study's 7 x 7 at 224 px and stays 49 times smaller at 32 px."""
    return max(1, min(7, image_size // 32))


class DualTaskNet(nn.Module):
    """A torchvision trunk shared by all tasks and its output layer: one linear head per task (head="split"), or
    one linear layer with one softmax over every task's classes (head="joint", Dobs et al. 2022; the original
    repository's 20-way layer of 10 objects and 10 identities). `model(x)` -> {task: logits} either way.

    With a joint layer, task t's logits are all of the layer's outputs, reordered so that t's own classes come
    first (in order) and every other task's classes follow: a label y of t indexes its class, an argmax on
    another task's class counts as an error, and cross-entropy over them is exactly the joint softmax's loss."""

    def __init__(self, backbone: str, num_classes: dict, batch_norm: bool = True, fc_width: int = 4096,
                 image_size: int = 224, recipe: int = RECIPE, head: str = "split"):
        super().__init__()
        import torchvision.models as tvm

        if head not in HEADS:
            raise UsageError(f"head={head!r}; expected one of {', '.join(repr(h) for h in HEADS)}")
        if backbone in ("vgg16", "vgg19"):
            name = backbone + ("_bn" if batch_norm else "")
            trunk = getattr(tvm, name)(weights=None)
            pool = vgg_pool(image_size) if recipe >= 2 else 7
            if fc_width != 4096 or pool != 7:  # fully connected layers sized to the pooled map and fc_width
                trunk.avgpool = nn.AdaptiveAvgPool2d((pool, pool))
                trunk.classifier[0] = nn.Linear(512 * pool * pool, fc_width)
                trunk.classifier[3] = nn.Linear(fc_width, fc_width)
            width = trunk.classifier[3].out_features
            trunk.classifier[-1] = nn.Identity()
            if recipe >= 2:
                _he_init(trunk)
        elif backbone in ("resnet50", "resnext50"):
            # zero-initialised last BN of every residual branch: each block starts as the identity, so the
            # 50-layer net trains like a shallow one at first (Goyal et al. 2017; torchvision's option)
            kwargs = {"weights": None, "zero_init_residual": recipe >= 2}
            name = "resnet50" if backbone == "resnet50" else "resnext50_32x4d"
            trunk = getattr(tvm, name)(**kwargs)
            width = trunk.fc.in_features
            trunk.fc = nn.Identity()
        else:
            raise UsageError(f"backbone={backbone!r}; expected one of {', '.join(BACKBONES)}")
        self.backbone, self.arch, self.head = backbone, name, head  # arch: torchvision's name of the trunk
        self.trunk = trunk
        self.task_names = list(num_classes)
        if head == "split":
            self.heads = nn.ModuleDict({task: nn.Linear(width, n) for task, n in num_classes.items()})
        else:  # the joint layer's outputs: task by task, in the tasks' order; joint_order[i]: task i's view of them
            self.joint = nn.Linear(width, sum(num_classes.values()))
            self.register_buffer("joint_order", joint_order(list(num_classes.values())), persistent=False)
        self.branch_site = None  # a branched network: the module path of the last shared site (`branch`)

    @property
    def tasks(self) -> list:
        return list(self.task_names)

    def branch(self, after: str) -> list:
        """Make this a branched network (branches.py): every trunk step after the lesion site whose module path is
        `after` becomes one copy per task (the task order), each starting from the current weights; each head then
        reads its own copy's features. Returns the module paths of the branched steps."""
        if self.head != "split":
            raise UsageError(f"branch_at with head={self.head!r}: a branched network gives each task its own copy "
                             f"of the trunk after the branch point, and a joint output layer would read every "
                             f"copy; use head='split'")
        if self.branch_site is not None:
            raise UsageError(f"the network is already branched after {self.branch_site}")
        paired = branches.branch_steps(self, sites_mod.forward_chain(self), after, len(self.task_names))
        self.branch_site = after
        return paired

    def head_inputs(self, features: torch.Tensor) -> dict:
        """{task: what its readout reads} of the trunk's features (B, width): the features themselves, or in a
        branched network (its copies' features side by side) the task's own copy's part."""
        if self.branch_site is not None:
            return dict(zip(self.task_names, features.chunk(len(self.task_names), dim=1)))
        return {task: features for task in self.task_names}

    def head_outputs(self, features: torch.Tensor) -> dict:
        """{task: logits} of the trunk's features (B, width): each head's, or the joint layer's in task order.
        A branched network's features are its copies' side by side: each head reads its own copy's."""
        if self.branch_site is not None:
            return {task: self.heads[task](part) for task, part in self.head_inputs(features).items()}
        if self.head == "split":
            return {task: head(features) for task, head in self.heads.items()}
        logits = self.joint(features)
        return {task: logits.index_select(1, self.joint_order[i]) for i, task in enumerate(self.task_names)}

    def forward(self, x: torch.Tensor) -> dict:
        return self.head_outputs(self.trunk(x))


def joint_order(n_classes: list) -> torch.Tensor:
    """(tasks, all classes) indices: row i reorders a joint layer's outputs (task by task, in order) so that task
    i's own classes come first, in order, and every other task's classes follow."""
    first = np.cumsum([0] + list(n_classes))
    everything = torch.arange(int(first[-1]))
    own = [(everything >= first[i]) & (everything < first[i + 1]) for i in range(len(n_classes))]
    return torch.stack([torch.cat([everything[o], everything[~o]]) for o in own])


def _he_init(trunk: nn.Module) -> None:
    """He et al. 2015 initialisation, fan-in mode, for every conv and hidden fully connected layer of VGG.

    It keeps the variance of each ReLU layer's output equal to its input's on the forward pass, which is what
    let He et al. train deep plain (no batch norm) networks from scratch; torchvision's fan-out convs and
    N(0, 0.01) fully connected layers shrink a 32-px VGG16's signal about 100-fold before the classifier."""
    for m in trunk.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build_model(config: dict, num_classes: dict, load_init: bool = True) -> nn.Module:
    """The run's network. With `load_init`, its trunk then starts from the weights the `init` setting names
    (`load_trunk_weights`); a network whose weights a checkpoint replaces anyway can pass False.

    A network this tool did not train (the `network` setting): foreign.ReadoutNet, the network `weights` names
    (random ones without `load_init`) read by one linear head per task at `readout_layer`."""
    if config.get("network"):
        from dualtask.model import foreign, zoo

        net = zoo.build_network(config["network"], config.get("weights", "random") if load_init else "random")
        return foreign.ReadoutNet(net, config["network"], num_classes, config.get("image_size", 224),
                                  config.get("readout_layer"))
    model = DualTaskNet(config["backbone"], num_classes, config.get("batch_norm", True), config.get("fc_width", 4096),
                        config.get("image_size", 224), config.get("recipe", RECIPE), config.get("head", "split"))
    if load_init:
        load_trunk_weights(model, config.get("init", "random"))
    if config.get("branch_at") is not None:  # after the init weights, so that every copy starts from them
        model.branch(branch_site(model, config["branch_at"]).name)
    return model


def branch_site(model: DualTaskNet, branch_at) -> sites_mod.Site:
    """The lesion site after which a network is branched: `branch_at` is its depth or module path among the
    unbranched network's sites (inner bottleneck sites excluded)."""
    sites = sites_mod.lesion_sites(model)
    by_name = {s.name: s for s in sites}
    if isinstance(branch_at, int) and not isinstance(branch_at, bool) and 0 <= branch_at < len(sites):
        return sites[branch_at]
    if isinstance(branch_at, str) and branch_at in by_name:
        return by_name[branch_at]
    raise UsageError(f"branch_at={branch_at!r}; expected None, a site depth 0..{len(sites) - 1} or a site's module "
                     f"path, e.g. {sites[len(sites) // 2].name!r}")


def _imagenet_state_dict(arch: str) -> tuple:
    """torchvision's ImageNet weights of `arch` (its DEFAULT ones), downloaded into the torch hub cache the
    first time; (state dict, where they come from)."""
    import torchvision.models as tvm

    weights = tvm.get_model_weights(arch).DEFAULT
    try:
        state = weights.get_state_dict(progress=int(os.environ.get("RANK", 0)) == 0, map_location="cpu",
                                       weights_only=True)
    except Exception as e:  # no network (URLError), a refused or damaged download: all mean "cannot get them"
        raise download_failed("init='imagenet'", f"ImageNet weights of {arch}", weights.url, e, "init") from None
    return state, f"torchvision's ImageNet weights ({weights})"


def download_failed(setting: str, what: str, url: str, error: Exception, path_setting: str) -> UsageError:
    """The error of published weights that could not be downloaded: which, from where, why, and the way round it
    (the file fetched elsewhere, passed as `path_setting`)."""
    first = str(error).splitlines()[0] if str(error) else ""
    return UsageError(f"{setting}: cannot get torchvision's {what} ({url}: {type(error).__name__}: {first}); they "
                      f"are downloaded the first time, which needs network access (then kept in "
                      f"{Path(torch.hub.get_dir()) / 'checkpoints'}). Without a network, download that file "
                      f"elsewhere and pass --{path_setting}=<path to it>")


def read_state_dict(path: str, setting: str = "init", form: str = INIT_FORM) -> dict:
    """The tensors of a local weights file, as a state dict (loaded with weights_only=True; a checkpoint's nested
    'model' or 'state_dict' taken out); anything else is a UsageError naming the setting, the file and `form`."""
    import pickle

    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"{setting}={path!r}: no such file; expected {form}")
    if not p.is_file():
        raise UsageError(f"{setting}={path!r}: not a file; expected {form}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # torch.load's refusal to unpickle code (else a damaged file)
            raise UsageError(f"{setting}={path!r}: refused: it holds Python objects other than tensors and plain "
                             f"values; expected {form}") from None
        raise UsageError(f"{setting}={path!r}: cannot be read (damaged, or not written by torch.save: "
                         f"{str(e).splitlines()[0] if str(e) else 'UnpicklingError'}); expected {form}") from None
    except Exception as e:  # a damaged zip or pickle, an unreadable file: all mean "not a weights file"
        raise UsageError(f"{setting}={path!r}: cannot be read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); expected {form}") from None
    for key in ("model", "state_dict"):  # a checkpoint of this tool, or of another that nests its weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    tensors = ({k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
               if isinstance(state, dict) else {})
    if not tensors:
        raise UsageError(f"{setting}={path!r}: not a state dict (it holds a {type(state).__name__} without named "
                         f"tensors); expected {form}")
    return tensors


def load_trunk_weights(model: DualTaskNet, init: str) -> int:
    """Start the trunk from `init`: "random" keeps the initialisation it was built with; "imagenet" loads
    torchvision's ImageNet weights of its architecture; anything else is a local file's state dict (torchvision's
    layout or this tool's trunk.-prefixed one, also a whole checkpoint). Every tensor whose name and shape match
    the trunk is loaded, the rest skipped (VGG's classifier layers resized to small images or to fc_width,
    torchvision's fc or last classifier layer, which the heads replace); one line says what was loaded and which
    groups were skipped. No tensor matching is a UsageError naming the source. Returns the tensors loaded.

    The project normalises inputs with mean = std = 0.5 (vggface2.normalize), not ImageNet's statistics; a
    network started from ImageNet weights is fine-tuned with that normalisation, and its batch-norm statistics
    adapt to it during training."""
    if init == "random":
        return 0
    if init == "imagenet":
        source, where = _imagenet_state_dict(model.arch)
    else:
        source, where = read_state_dict(init), init
    if source and all(k.startswith("module.") for k in source):  # saved from a DistributedDataParallel wrapper
        source = {k[len("module."):]: v for k, v in source.items()}
    own = any(k.startswith("trunk.") for k in source)  # this tool's layout: the trunk's tensors are trunk.<name>
    target = model.trunk.state_dict()
    loaded, skipped = {}, {}  # skipped: group (the file's module path) -> why
    for key, value in source.items():
        name = key[len("trunk."):] if own and key.startswith("trunk.") else (None if own else key)
        group = key.rsplit(".", 1)[0]
        if name is None or name not in target:
            skipped.setdefault(group, "not in the trunk")
        elif tuple(target[name].shape) != tuple(value.shape):
            skipped[group] = "shape differs"
        else:
            loaded[name] = value
    if not loaded:
        example = ", ".join(list(source)[:3])
        raise UsageError(f"init={init!r}: none of its {len(source)} tensors (e.g. {example}) matches the "
                         f"{model.arch} trunk by name and shape; expected {INIT_FORM}, of torchvision's {model.arch}")
    model.trunk.load_state_dict(loaded, strict=False)
    why = {}
    for group, reason in skipped.items():
        why.setdefault(reason, []).append(group)
    parts = [", ".join(g[:6]) + (f" and {len(g) - 6} more" if len(g) > 6 else "") + f" ({reason})"
             for reason, g in why.items()]
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"init: loaded {len(loaded)} of the {model.arch} trunk's {len(target)} tensors from {where}; "
              f"skipped {'; '.join(parts) if parts else 'nothing'}", flush=True)
        if len(loaded) < len(target) / 2:
            print(f"warning: init={init!r} matched only {len(loaded)} of the trunk's {len(target)} tensors; the "
                  f"rest keep their random initialisation: is it a state dict of torchvision's {model.arch}?",
                  file=sys.stderr)
    return len(loaded)
