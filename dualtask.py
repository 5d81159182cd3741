"""The dual-task network, its training, checkpoints and the pipeline every backbone script runs.

A backbone script (vgg16.py, vgg19.py, ResNet.py, ResNeXt.py) lists its hyperparameters and calls
`main(globals())`. Every hyperparameter named `<task>_data` defines one task (face_data, object_data by
default): task names, class counts and chance levels come from the data, never from code.

In a notebook:

    from dualtask import load_run
    model, config = load_run("runs/vgg16")
    logits = model(images)          # {task_name: logits}
"""
from __future__ import annotations

import ast
import contextlib
import copy
import json
import math
import os
import re
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import branches
import common
import figures
import health
import inspection
import lesion_utils
import report
import vggface2
from common import (StageFailed, UsageError, autocast, format_seconds, load_checkpoint, remove_stale_temporaries,
                    save_checkpoint, write_csv, write_text)
from vggface2 import DataError, TaskData

BACKBONES = ("vgg16", "vgg19", "resnet50", "resnext50")
OPTIMIZERS = ("adamw", "sgd")  # recipe 3 on; runs of recipes 1 and 2 trained with SGD
STAGES = ("train", "lesion", "figures")
TRAIN_LOG_COLUMNS = ("epoch", "task", "split", "loss", "accuracy", "images_per_s")
# settings that make a checkpoint belong to a run: changing one needs --retrain=True or another out_dir
RUN_IDENTITY = ("backbone", "batch_norm", "fc_width", "image_size", "max_per_class", "max_classes", "seed",
                "batch_size", "epochs", "optimizer", "lr", "weight_decay", "grad_clip", "demo_per_class", "role", "single_task", "tasks", "kdef_views", "lfw_crop", "head", "init",
                "branch_at")
# what a run trains on, set by an experiment (experiment.py) for each of its runs; a plain run is "real":
# real: the tasks as given; pseudo_task: the union of their classes split at random into two halves, each half a
# task (Dobs et al. 2022); single_task: the task named by the `single_task` setting alone; resolution_matched:
# every task's images brought down to the lowest native resolution among the tasks and back up; same_task: the first
# task's images dealt in two halves to two heads that learn the same task (vggface2.same_task)
ROLES = ("real", "pseudo_task", "single_task", "resolution_matched", "same_task")


# ----------------------------------------------------------------------------------------------------------
# hyperparameters


def hyperparameters(script_globals: dict) -> dict:
    """The plain module-level assignments of a backbone script, in their order."""
    plain = (bool, int, float, str, list, tuple, dict, type(None))
    return {k: v for k, v in script_globals.items()
            if not k.startswith("_") and isinstance(v, plain) and not isinstance(v, type)}


def _fits(value, default) -> bool:
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def parse_overrides(defaults: dict, argv: list) -> dict:
    """Apply `--name=value` overrides to `defaults` (nanoGPT style, without exec).

    A value is read as a Python literal when it parses as one, else as a string, and must fit the default's
    type (an int may replace a float; any value may replace None; a string setting takes the text as given).
    """
    config = dict(defaults)
    names = ", ".join(defaults)
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise UsageError(f"cannot read argument {arg!r}; expected --name=value; valid names: {names}")
        name, text = arg[2:].split("=", 1)
        if name not in defaults:
            raise UsageError(f"unknown hyperparameter {name!r}; valid names: {names}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = text
        default = defaults[name]
        if isinstance(default, str) and not isinstance(value, str):
            value = text
        if not _fits(value, default):
            raise UsageError(f"--{name}={text}: expected a value of type {type(default).__name__} "
                             f"like the default {default!r}; valid names: {names}")
        if isinstance(default, float) and isinstance(value, int):
            value = float(value)
        config[name] = list(value) if isinstance(value, tuple) else value
    return config


def task_specs(config: dict) -> dict:
    """{task_name: data spec}: the `tasks` setting when it is a dict, else every `<task>_data` setting, in the
    script's order."""
    if isinstance(config.get("tasks"), dict):
        return dict(config["tasks"])
    return {k[: -len("_data")]: v for k, v in config.items() if k.endswith("_data") and isinstance(v, str)}


_TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")  # task names become CSV values and file-key parts ('|' joins)


def _check_tasks(value) -> None:
    """The `tasks` setting: None, or a dict of at least two task names (letters, digits, _) to data specs."""
    form = ("None or a dict of at least two task names to data specs, e.g. \"{'identity': 'demo', "
            "'expression': 'demo'}\"")
    if value is None:
        return
    if not isinstance(value, dict) or len(value) < 2:
        raise UsageError(f"tasks={value!r}; expected {form}")
    for name, spec in value.items():
        if not isinstance(name, str) or not _TASK_NAME.match(name):
            raise UsageError(f"tasks: task name {name!r}; expected letters, digits and _ starting with a letter "
                             f"({form})")
        if not isinstance(spec, str) or not spec.strip():
            raise UsageError(f"tasks: {name}={spec!r}; expected 'demo' or a data folder or file path ({form})")


def _integer(low):
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low), f"an integer of at least {low}"


def _number(low, strict):
    def ok(v):
        return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and (v > low if strict else v >= low))

    return ok, f"a finite number {'above' if strict else 'of at least'} {low}"


def _optional(rule):
    ok, text = rule
    return (lambda v: v is None or ok(v)), f"None or {text}"


def _choice(options):
    return (lambda v: v in options), f"one of {', '.join(repr(o) for o in options)}"


def _list_of(item_ok, text, non_empty=True):
    return ((lambda v: isinstance(v, list) and (len(v) > 0 or not non_empty) and all(item_ok(x) for x in v)),
            f"a {'non-empty ' if non_empty else ''}list of {text}")


def _fraction(f) -> bool:
    return isinstance(f, (int, float)) and not isinstance(f, bool) and 0 <= f <= 1


def _site_name(s) -> bool:
    return (isinstance(s, int) and not isinstance(s, bool)) or (isinstance(s, str) and bool(s))


_FLAG = (lambda v: isinstance(v, bool)), "True or False"
# every setting's rule and its expected form, checked before anything is read or written
SETTINGS = {
    "backbone": _choice(BACKBONES),
    "batch_norm": _FLAG,
    "fc_width": _integer(8),
    "head": _choice(("split", "joint")),  # dualtask.HEADS
    "branch_at": ((lambda v: v is None or _site_name(v)), "None or a lesion site's depth or module path, e.g. 8 or "
                  "'trunk.layer3.0'"),
    "init": ((lambda v: isinstance(v, str) and v.strip() != ""),
             "'random', 'imagenet' or a path to a state-dict file of the trunk"),
    "download": _FLAG,
    "image_size": _integer(16),
    "max_per_class": _optional(_integer(1)),
    "max_classes": _optional(_integer(2)),
    "demo_per_class": _integer(3),
    "epochs": _integer(0),
    "lr": _optional(_number(0, strict=True)),
    "grad_clip": _number(0, strict=False),
    "weight_decay": _optional(_number(0, strict=False)),
    "optimizer": _choice(OPTIMIZERS),
    "seed": _integer(0),
    "compile": _FLAG,
    "retrain": _FLAG,
    "out_dir": ((lambda v: isinstance(v, str) and v.strip() != ""), "a folder path"),
    "lesion_fractions": ((lambda v: isinstance(v, list) and all(_fraction(f) for f in v) and any(f > 0 for f in v)),
                         "a list of fractions in [0, 1] with at least one above 0, e.g. [0.0, 0.2]"),
    "lesion_methods": _list_of(lambda m: m in lesion_utils.METHODS, f"names from {list(lesion_utils.METHODS)}"),
    "random_repeats": _integer(1),
    "rank_images": _integer(1),
    "lesion_layers": ((lambda v: v is None or (isinstance(v, list) and v and all(_site_name(s) for s in v))),
                      "None or a non-empty list of site depths or module paths, e.g. [0, 4, 'trunk.layer4.2']"),
    "lesion_mode": _choice(("zero", "mean")),
    "lesion_keep_only": _FLAG,
    "lesion_per_class": _FLAG,
    "lesion_inner": _FLAG,
    "gradcam_site": ((lambda v: v is None or (isinstance(v, str) and v != "")), "None or a module path"),
    "stimulus_steps": _integer(1),
    "stages": _list_of(lambda s: s in STAGES, f"stages from {list(STAGES)}"),
    "health_check": _choice(health.ACTIONS),
    "match_accuracy": _FLAG,
    "ranking_reliability": _FLAG,
    "greedy_racing": _FLAG,
    "greedy_margin": _number(0, strict=False),
    "greedy_candidates": _optional(_integer(1)),
    "greedy_stop": ((lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1),
                    "a fraction above 0 and at most 1, e.g. 0.2"),
    "ranking_precision": _choice(lesion_utils.RANKING_PRECISIONS),
    "lesion_epochs": ((lambda v: v is None or (isinstance(v, list) and all(
        isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in v))),
        "None or a list of epochs (integers of at least 1), e.g. [1, 5, 10]"),
    "role": _choice(ROLES),
    "kdef_views": _list_of(lambda v: v in vggface2.KDEF_VIEWS, f"KDEF views from {list(vggface2.KDEF_VIEWS)}"),
    "lfw_crop": _FLAG,
}


def check_config(config: dict) -> None:
    """Values that parse but make no sense get a clear error before anything is read or written."""
    _check_tasks(config.get("tasks"))
    for name, value in config.items():
        if name.endswith("_data") and not isinstance(config.get("tasks"), dict):
            if not isinstance(value, str) or not value.strip():
                raise UsageError(f"{name}={value!r}; expected 'demo' or a data folder path")
        elif name in SETTINGS and not SETTINGS[name][0](value):
            raise UsageError(f"{name}={value!r}; expected {SETTINGS[name][1]}")
    tasks = task_specs(config)
    if config.get("role") == "single_task":
        if config.get("single_task") not in tasks:
            raise UsageError(f"single_task={config.get('single_task')!r}; expected one of the tasks: {', '.join(tasks)}")
        tasks = {config["single_task"]: tasks[config["single_task"]]}
    elif len(tasks) < 2:
        raise UsageError(f"found {len(tasks)} task(s) ({', '.join(tasks) or 'none'}); expected at least two "
                         f"settings named <task>_data, e.g. face_data and object_data, or the tasks setting")
    if not (isinstance(config.get("batch_size"), int) and config["batch_size"] >= len(tasks)):
        raise UsageError(f"batch_size={config.get('batch_size')!r}; expected an integer of at least {len(tasks)} "
                         f"(every step holds images of each of the {len(tasks)} tasks)")
    device = config.get("device", "auto")
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
        raise UsageError(f"device={device!r}; expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"device={device!r} but this PyTorch build sees no CUDA device; use device='auto' "
                             f"or 'cpu'")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist; "
                             f"expected cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError("device='mps' but this PyTorch build or machine has no Apple MPS device; use "
                         "device='auto' or 'cpu'")


def _script_comments(path: str) -> dict:
    comments = {}
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            m = re.match(r"^(\w+)\s*=.*?#\s*(.*)$", line)
            if m:
                comments[m.group(1)] = m.group(2)
    return comments


def print_help(defaults: dict, script: str) -> None:
    comments = _script_comments(script)
    print(f"usage: python {Path(script).name} [--name=value ...]\n\nhyperparameters (defaults from the script):")
    for k, v in defaults.items():
        print(f"  --{k}={v!r}".ljust(44) + f"  {comments.get(k, '')}")


# ----------------------------------------------------------------------------------------------------------
# the model


# The training recipe's version, kept in every checkpoint's config. Recipe 1 (before the defaults were tuned):
# VGG's classifier always read a 7 x 7 pool, torchvision's initialisation, lr taken as given. Recipe 2: the
# choices below. A finished recipe-1 run is still rebuilt as it was trained, so its lesions and figures can be
# redrawn; training it further needs --retrain=True.
RECIPE = 3
# Recipe 3 adds the optimizer setting, AdamW by default (recipe 1 and 2 runs trained with SGD).
# The peak learning rate per 256 images when lr=None, per optimizer and backbone.
# SGD (Nesterov momentum 0.9), scaled linearly to the images of a step (Goyal et al. 2017). Batch-normalised
# nets: 0.2, the CIFAR recipe of He et al. 2016 (0.1 per 128 images); a VGG without batch norm loses its units at
# such rates and trains at 0.01-0.02, as in Simonyan & Zisserman (0.01 per 256) and the reference study.
# AdamW (Loshchilov & Hutter 2019; torchvision's ConvNeXt recipe: 1e-3 per 1,024 images with weight decay 0.05),
# scaled with the square root of the step's images, the scaling rule for adaptive optimisers (Malladi et al.
# 2022). An adaptive step moves every weight by about the lr whatever its gradient's size, which is what a
# from-scratch network needs in the few hundred steps a small data set gives it: see BENCHMARKS.md.
DEFAULT_LR = {"sgd": {"resnet50": 0.2, "resnext50": 0.2, "vgg_bn": 0.2, "vgg": 0.02},
              "adamw": {"resnet50": 2e-3, "resnext50": 2e-3, "vgg_bn": 2e-3, "vgg": 6e-4}}
# weight decay when weight_decay=None: SGD's L2 penalty of He et al. 2016 (5e-4 for small images); AdamW's
# decoupled decay of torchvision's ConvNeXt recipe
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 0.05}
LABEL_SMOOTHING = 0.1  # torchvision's reference recipe (Szegedy et al. 2016): keeps logits from growing without end


def vgg_pool(image_size: int) -> int:
    """Side of the pooled map VGG's classifier reads: its conv map (image_size / 32) up to torchvision's 7.

    torchvision pools every input to 7 x 7, so a 32-px image's single conv position is copied 49 times into
    the first fully connected layer (25,088 inputs for 512 numbers); a classifier that reads the map it has
    keeps the reference study's 7 x 7 at 224 px and stays 49 times smaller at 32 px."""
    return max(1, min(7, image_size // 32))


HEADS = ("split", "joint")  # the output layers: one per task, or one softmax over all tasks' classes


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
        paired = branches.branch_steps(self, lesion_utils.forward_chain(self), after, len(self.task_names))
        self.branch_site = after
        return paired

    def head_outputs(self, features: torch.Tensor) -> dict:
        """{task: logits} of the trunk's features (B, width): each head's, or the joint layer's in task order.
        A branched network's features are its copies' side by side: each head reads its own copy's."""
        if self.branch_site is not None:
            parts = features.chunk(len(self.task_names), dim=1)
            return {task: self.heads[task](part) for task, part in zip(self.task_names, parts)}
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


def build_model(config: dict, num_classes: dict, load_init: bool = True) -> DualTaskNet:
    """The run's network. With `load_init`, its trunk then starts from the weights the `init` setting names
    (`load_trunk_weights`); a network whose weights a checkpoint replaces anyway can pass False."""
    model = DualTaskNet(config["backbone"], num_classes, config.get("batch_norm", True), config.get("fc_width", 4096),
                        config.get("image_size", 224), config.get("recipe", RECIPE), config.get("head", "split"))
    if load_init:
        load_trunk_weights(model, config.get("init", "random"))
    if config.get("branch_at") is not None:  # after the init weights, so that every copy starts from them
        model.branch(branch_site(model, config["branch_at"]).name)
    return model


def branch_site(model: DualTaskNet, branch_at) -> lesion_utils.Site:
    """The lesion site after which a network is branched: `branch_at` is its depth or module path among the
    unbranched network's sites (inner bottleneck sites excluded)."""
    sites = lesion_utils.lesion_sites(model)
    by_name = {s.name: s for s in sites}
    if isinstance(branch_at, int) and not isinstance(branch_at, bool) and 0 <= branch_at < len(sites):
        return sites[branch_at]
    if isinstance(branch_at, str) and branch_at in by_name:
        return by_name[branch_at]
    raise UsageError(f"branch_at={branch_at!r}; expected None, a site depth 0..{len(sites) - 1} or a site's module "
                     f"path, e.g. {sites[len(sites) // 2].name!r}")


INIT_FORM = ("'random', 'imagenet' or a path to a file written by torch.save holding a state dict of the trunk: in "
             "torchvision's layout (keys like features.0.weight or layer1.0.conv1.weight), or this tool's "
             "(trunk.-prefixed keys, e.g. a run's checkpoint.pt)")


def _imagenet_state_dict(arch: str) -> tuple:
    """torchvision's ImageNet weights of `arch` (its DEFAULT ones), downloaded into the torch hub cache the
    first time; (state dict, where they come from)."""
    import torchvision.models as tvm

    weights = tvm.get_model_weights(arch).DEFAULT
    try:
        state = weights.get_state_dict(progress=int(os.environ.get("RANK", 0)) == 0, map_location="cpu",
                                       weights_only=True)
    except Exception as e:  # no network (URLError), a refused or damaged download: all mean "cannot get them"
        raise UsageError(f"init='imagenet': cannot get torchvision's ImageNet weights of {arch} ({weights.url}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); they are downloaded "
                         f"the first time, which needs network access (then kept in "
                         f"{Path(torch.hub.get_dir()) / 'checkpoints'}). Without a network, download that file "
                         f"elsewhere and pass --init=<path to it>") from None
    return state, f"torchvision's ImageNet weights ({weights})"


def _init_file_state_dict(path: str) -> dict:
    """The tensors of a local weights file, as a state dict; anything else is a UsageError naming the file."""
    import pickle

    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"init={path!r}: no such file; expected {INIT_FORM}")
    if not p.is_file():
        raise UsageError(f"init={path!r}: not a file; expected {INIT_FORM}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # torch.load's refusal to unpickle code (else a damaged file)
            raise UsageError(f"init={path!r}: refused: it holds Python objects other than tensors and plain "
                             f"values; expected {INIT_FORM}") from None
        raise UsageError(f"init={path!r}: cannot be read (damaged, or not written by torch.save: "
                         f"{str(e).splitlines()[0] if str(e) else 'UnpicklingError'}); expected {INIT_FORM}") from None
    except Exception as e:  # a damaged zip or pickle, an unreadable file: all mean "not a weights file"
        raise UsageError(f"init={path!r}: cannot be read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); expected {INIT_FORM}") from None
    for key in ("model", "state_dict"):  # a checkpoint of this tool, or of another that nests its weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    tensors = ({k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
               if isinstance(state, dict) else {})
    if not tensors:
        raise UsageError(f"init={path!r}: not a state dict (it holds a {type(state).__name__} without named "
                         f"tensors); expected {INIT_FORM}")
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
        source, where = _init_file_state_dict(init), init
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


def optimizer_name(config: dict) -> str:
    """The run's optimizer: its setting, or SGD for runs of recipes before the setting existed."""
    return config.get("optimizer", "adamw") if config.get("recipe", RECIPE) >= 3 else "sgd"


def base_lr(config: dict) -> float:
    """The peak learning rate per 256 images: the lr setting, or the backbone's default when it is None."""
    if config.get("lr") is not None:
        return float(config["lr"])
    table = DEFAULT_LR[optimizer_name(config)]
    if config["backbone"].startswith("vgg"):
        return table["vgg_bn" if config.get("batch_norm", True) else "vgg"]
    return table[config["backbone"]]


def weight_decay(config: dict) -> float:
    """The weight decay: the setting, or the optimizer's default when it is None."""
    if config.get("weight_decay") is not None:
        return float(config["weight_decay"])
    return DEFAULT_WEIGHT_DECAY[optimizer_name(config)]


def peak_lr(config: dict, world: int = 1) -> float:
    """The step's peak learning rate: per-256 lr scaled to the images of one step, batch_size on each of
    `world` processes: linearly for SGD, with the square root for AdamW (recipe 1: lr as given)."""
    if config.get("recipe", RECIPE) < 2:
        return base_lr(config)
    ratio = config["batch_size"] * world / 256
    return base_lr(config) * (ratio if optimizer_name(config) == "sgd" else math.sqrt(ratio))


def make_optimizer(model: nn.Module, config: dict, lr: float) -> torch.optim.Optimizer:
    """The run's optimizer; weight decay on weights only, not on biases and batch-norm parameters."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay(config)}, {"params": no_decay, "weight_decay": 0.0}]
    if optimizer_name(config) == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


# ----------------------------------------------------------------------------------------------------------
# devices and processes


class Dist:
    """Rank and world size; torchrun sets RANK / WORLD_SIZE / LOCAL_RANK, a plain run is rank 0 of 1."""

    def __init__(self, device_setting: str):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device_setting == "auto":
            device_setting = "cuda" if torch.cuda.is_available() else "cpu"
        if device_setting == "cuda" and self.world > 1:
            device_setting = f"cuda:{self.local_rank}"
        self.device = torch.device(device_setting)
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list) -> list:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather(self, obj):
        """Every process's `obj` on process 0 (a list in rank order), None on the others."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def close(self):
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class TaskImages:
    """One task's uint8 images where batches are cut from them: on the GPU when they fit, else in host memory."""

    def __init__(self, data: TaskData, device: torch.device, same_images: TaskImages | None = None):
        """same_images: another task's TaskImages over the same image array, whose device copy is reused."""
        self.data, self.device = data, device
        self.labels = torch.from_numpy(np.asarray(data.labels, dtype=np.int64))
        self.on_device = None
        if same_images is not None:
            self.on_device = same_images.on_device
        else:  # on a GPU (common.free_memory) when they fit a quarter of its free memory
            free = common.free_memory(device)
            if free is not None and data.images.nbytes < 0.25 * free:
                self.on_device = torch.from_numpy(np.ascontiguousarray(data.images)).to(device)
        self.labels = self.labels.to(device)

    def batch(self, idx: np.ndarray, channels_last: bool = False):
        """Images as normalised-ready float (B, 3, H, W) in [0, 1] and their labels, on the device."""
        if self.on_device is not None:
            i = torch.from_numpy(idx).to(self.device)
            raw = self.on_device[i]
        else:
            order = np.argsort(idx)  # sorted reads are kinder to a memory-mapped cache
            raw = np.empty((len(idx),) + self.data.images.shape[1:], np.uint8)
            raw[order] = self.data.images[idx[order]]
            raw = common.host_to_device(torch.from_numpy(raw), self.device)  # pinned, non-blocking on a GPU
            i = torch.from_numpy(idx).to(self.device)
        return vggface2.to_float(raw, channels_last), self.labels[i]


@torch.inference_mode()
def evaluate(model: nn.Module, images: dict, split: str, dist: Dist | None = None, batch_size: int = 256,
             channels_last: bool = False) -> dict:
    """{task: {'loss', 'accuracy', 'n'}} of each task's head on that task's `split` images (eval mode). Tasks
    that share their images (one split of one array) are scored by their heads on one pass of those images."""
    was_training = model.training
    model.eval()
    results = {}
    rank, world = (dist.rank, dist.world) if dist else (0, 1)
    for group in vggface2.shared_groups({t: ti.data for t, ti in images.items()}):
        idx = images[group[0]].data.indices(split)[rank::world]
        sums = {t: [0.0, 0] for t in group}  # loss, correct
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            x, _ = images[group[0]].batch(chunk, channels_last)
            with autocast(x.device):
                out = model(vggface2.normalize(x))
            for t in group:
                y = images[t].labels[torch.from_numpy(chunk).to(images[t].labels.device)]
                logits = out[t].float()
                sums[t][0] += F.cross_entropy(logits, y, reduction="sum").item()
                sums[t][1] += (logits.argmax(1) == y).sum().item()
        for t in group:
            loss_sum, correct, n = sums[t] + [len(idx)]
            if dist:
                loss_sum, correct, n = dist.all_sum([loss_sum, correct, n])
            results[t] = {"loss": loss_sum / max(n, 1), "accuracy": correct / max(n, 1), "n": int(n)}
    model.train(was_training)
    return {t: results[t] for t in images}


# ----------------------------------------------------------------------------------------------------------
# runs on disk


def load_run(run_dir: str | os.PathLike, device: str = "cpu"):
    """Load a trained run for a notebook: (model in eval mode, config dict)."""
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoint.pt").exists():
        raise UsageError(f"{run_dir}: no checkpoint.pt; expected a run folder written by a backbone script")
    state = load_checkpoint(run_dir / "checkpoint.pt", device)
    config = dict(state["config"])
    config.setdefault("recipe", 1)  # trained before the recipe was recorded
    model = build_model(config, {t: len(c) for t, c in state["classes"].items()}, load_init=False)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), config


# ----------------------------------------------------------------------------------------------------------
# training


def _lr_lambda(total_steps: int, warmup_steps: int):
    def f(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def warmup_steps(config: dict, steps_per_epoch: int) -> int:
    """Linear warm-up from 0 to the peak lr: 2 epochs or 5% of training, whichever is longer, at most a quarter.

    A from-scratch net's first steps have the largest gradients; ramping the lr up over them is what keeps
    large-batch SGD from diverging (Goyal et al. 2017 ramp over 5 epochs at 8k images per step). Recipe 1
    ramped over 5% of training only, which in a 15-epoch run was under one epoch."""
    total = steps_per_epoch * config["epochs"]
    if config.get("recipe", RECIPE) < 2:
        return max(1, total // 20)
    return max(1, min(total // 4, max(total // 20, 2 * steps_per_epoch)))


def _epoch_order(n_train: np.ndarray, seed: int, epoch: int, task_index: int, length: int, rank: int, world: int):
    """This rank's shard of a seeded permutation of the training indices, repeated to `length` per rank."""
    rng = np.random.default_rng([seed, epoch, task_index])
    perms = []
    while sum(len(p) for p in perms) < length * world:
        perms.append(rng.permutation(n_train))
    return np.concatenate(perms)[rank::world][:length]


def epoch_checkpoint(out_dir: Path, epoch: int) -> Path:
    """Where training keeps the weights of an epoch named in lesion_epochs."""
    return Path(out_dir) / f"checkpoint_epoch{epoch}.pt"


def epoch_folder(out_dir: Path, epoch: int) -> Path:
    """Where the lesion sweep of an epoch named in lesion_epochs writes its files."""
    return Path(out_dir) / f"epoch_{epoch}"


def _forget_epoch(out_dir: Path, epoch: int) -> None:
    """Remove an epoch's kept weights and its sweep: training that passes the epoch again replaces them."""
    epoch_checkpoint(out_dir, epoch).unlink(missing_ok=True)
    for name in lesion_utils.SWEEP_FILES.values():
        (epoch_folder(out_dir, epoch) / name).unlink(missing_ok=True)


def train(model: DualTaskNet, images: dict, config: dict, out_dir: Path, dist: Dist) -> None:
    """Train all heads together; resume from out_dir/checkpoint.pt; skip when the run is finished."""
    from tqdm import tqdm

    device = dist.device
    ckpt_path, log_path = out_dir / "checkpoint.pt", out_dir / "train_log.csv"
    tasks = list(images)
    # tasks that share their images (shared_groups) take one batch together, every image scored by each of their
    # heads; every group gets an equal share of the step
    groups = vggface2.shared_groups({t: ti.data for t, ti in images.items()})
    per_group = config["batch_size"] // len(groups)
    train_idx = {g[0]: images[g[0]].data.indices("train") for g in groups}
    steps = max(1, math.ceil(max(len(i) for i in train_idx.values()) / (per_group * dist.world)))
    total_steps = steps * config["epochs"]
    channels_last = common.use_channels_last(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    lr = peak_lr(config, dist.world)
    optimizer = make_optimizer(model, config, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, warmup_steps(config, steps)))
    smoothing = LABEL_SMOOTHING if config.get("recipe", RECIPE) >= 2 else 0.0
    start_epoch, log_rows, checkup = 0, [], {"epochs": [], "problems": []}
    if ckpt_path.exists() and not config.get("retrain", False):
        state = load_checkpoint(ckpt_path, device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
        log_rows = list(state.get("log", []))
        checkup = state.get("health", checkup)
        if dist.main:  # the log rides inside the checkpoint: after a kill between the two writes, the CSV catches up
            write_csv(log_path, TRAIN_LOG_COLUMNS, log_rows)
            if "health" in state:
                health.write(out_dir, config.get("health_check", "stop"), checkup["epochs"], checkup["problems"])
        last = [p for p in checkup["problems"] if p["epoch"] == start_epoch]
        if last and start_epoch >= config["epochs"] and config.get("health_check", "stop") == "stop":
            raise StageFailed(f"training stopped after its last epoch ({start_epoch}): " +
                              "; ".join(p["message"] for p in last) + "; --health_check=warn goes on with this "
                              "network anyway, --retrain=True trains it again")
        if start_epoch >= config["epochs"]:
            if dist.main:
                print(f"training finished earlier ({start_epoch} epochs in {ckpt_path}); skipping "
                      f"(--retrain=True trains again)")
            return
        if dist.main:
            print(f"resuming from epoch {start_epoch} of {config['epochs']} ({ckpt_path})")
    net = model
    if dist.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.get("compile", False):
        net = torch.compile(net)
    classes = {t: list(images[t].data.classes) for t in tasks}
    watched = health.monitored_layers(model, config)
    n_fc = sum(isinstance(m, nn.Linear) for _, m in watched)
    probe = health.probe_batch(images, channels_last)
    chances = {t: images[t].data.chance for t in tasks}
    clip = config.get("grad_clip", 0)
    if dist.main:  # weights kept from epochs this training passes again (or from an earlier training) no longer hold
        for path in out_dir.glob("checkpoint_epoch*.pt"):
            kept = path.stem[len("checkpoint_epoch"):]
            if kept.isdigit() and int(kept) > start_epoch:
                _forget_epoch(out_dir, int(kept))
    for epoch in range(start_epoch, config["epochs"]):
        torch.manual_seed(config["seed"] * 100_003 + epoch * 101 + dist.rank)  # dropout, reproducible on resume
        gen = torch.Generator().manual_seed(config["seed"] * 1_000_003 + epoch * 1009 + dist.rank)
        order = {g[0]: _epoch_order(train_idx[g[0]], config["seed"], epoch, tasks.index(g[0]), steps * per_group,
                                    dist.rank, dist.world) for g in groups}
        sums = {t: torch.zeros(3, dtype=torch.float64, device=device) for t in tasks}  # loss, correct, n
        grad_sum, grad_max = torch.zeros((), device=device), torch.zeros((), device=device)
        net.train()
        t0 = time.perf_counter()
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{config['epochs']}", disable=None if dist.main else True, leave=False,
                   mininterval=2.0)
        for step in bar:
            xs, ys, rows = [], {}, {}
            for k, g in enumerate(groups):
                idx = order[g[0]][step * per_group:(step + 1) * per_group]
                x, ys[g[0]] = images[g[0]].batch(idx)
                xs.append(x)
                for t in g:
                    rows[t] = slice(k * per_group, k * per_group + len(idx))
                    if t != g[0]:
                        ys[t] = images[t].labels[torch.from_numpy(idx).to(images[t].labels.device)]
            x = vggface2.normalize(vggface2.augment(torch.cat(xs), gen))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device):
                out = net(x)
            loss = 0.0
            for t in tasks:
                logits = out[t][rows[t]].float()
                task_loss = F.cross_entropy(logits, ys[t], label_smoothing=smoothing)
                loss = loss + task_loss
                with torch.no_grad():
                    sums[t] += torch.stack([task_loss.detach().double() * len(ys[t]),
                                            (logits.argmax(1) == ys[t]).sum().double(),
                                            torch.tensor(float(len(ys[t])), dtype=torch.float64, device=device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # the norm before any clipping, for the health check
            if clip > 0:
                norm = nn.utils.clip_grad_norm_(model.parameters(), clip).detach().float()
            else:
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach().float())
                                                             for p in model.parameters() if p.grad is not None]))
            grad_sum += norm
            grad_max = torch.maximum(grad_max, norm)
            optimizer.step()
            scheduler.step()
            if dist.main and step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        train_stats = {t: dist.all_sum(sums[t].tolist()) for t in tasks}
        n_images = sum(s[2] for s in train_stats.values())
        t1 = time.perf_counter()
        val = evaluate(model, images, "val", dist, channels_last=channels_last)
        val_speed = sum(v["n"] for v in val.values()) / max(time.perf_counter() - t1, 1e-9)
        grad = {"mean": grad_sum.item() / steps, "max": grad_max.item()}
        dead = health.dead_fractions(model, watched, probe)
        found = health.diagnose(epoch + 1, {t: {"loss": s[0] / s[2], "accuracy": s[1] / s[2], "n": s[2]} for t, s in
                                            train_stats.items()}, val, chances, dead, grad,
                                dict(config, lr=base_lr(config)), lr)
        # every rank stops or none: eval-mode dead-unit counts can differ between ranks (their BN statistics)
        stop = dist.all_sum([float(bool(found))])[0] > 0 and config.get("health_check", "stop") == "stop"
        finite = all(math.isfinite(s[0]) for s in train_stats.values()) and math.isfinite(grad["mean"])
        checkup["epochs"].append(health.epoch_record(epoch + 1, dead, grad))
        checkup["problems"] += found
        for t in tasks:
            loss_sum, correct, n = train_stats[t]
            log_rows.append({"epoch": epoch + 1, "task": t, "split": "train", "loss": f"{loss_sum / n:.4f}",
                             "accuracy": f"{correct / n:.4f}", "images_per_s": f"{n_images / seconds:.1f}"})
            log_rows.append({"epoch": epoch + 1, "task": t, "split": "val", "loss": f"{val[t]['loss']:.4f}",
                             "accuracy": f"{val[t]['accuracy']:.4f}", "images_per_s": f"{val_speed:.1f}"})
        if dist.main:
            parts = [f"{t} train {train_stats[t][1] / train_stats[t][2]:.3f} val {val[t]['accuracy']:.3f} "
                     f"(loss {val[t]['loss']:.3f})" for t in tasks]
            print(f"epoch {epoch + 1}/{config['epochs']}  " + "  |  ".join(parts) +
                  f"  |  {n_images / seconds:.0f} img/s  lr {scheduler.get_last_lr()[0]:.2e}", flush=True)
            print(health.summary_line(checkup["epochs"][-1], n_fc), flush=True)
            for problem in found:
                print(f"warning: {problem['message']}", file=sys.stderr, flush=True)
            if finite:  # weights that went non-finite would only overwrite the last good epoch
                save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                            "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "config": config,
                                            "classes": classes, "log": log_rows, "health": checkup})
                write_csv(log_path, TRAIN_LOG_COLUMNS, log_rows)
                if epoch + 1 in (config.get("lesion_epochs") or []) and epoch + 1 < config["epochs"]:
                    save_checkpoint(epoch_checkpoint(out_dir, epoch + 1), {
                        "model": model.state_dict(), "epoch": epoch + 1, "config": config, "classes": classes})
            health.write(out_dir, config.get("health_check", "stop"), checkup["epochs"], checkup["problems"])
        dist.barrier()
        if stop or not finite:
            if channels_last:
                model.to(memory_format=torch.contiguous_format)
            kept = (f"the checkpoint of epoch {epoch + 1} is kept in {ckpt_path}" if finite else
                    f"{ckpt_path} keeps the last epoch with finite weights")
            raise StageFailed(f"training stopped after epoch {epoch + 1}: " + "; ".join(p["message"] for p in found) +
                              f". A changed setting needs --retrain=True (it changes the run); {kept} (health in "
                              f"{out_dir / health.HEALTH_FILE})" +
                              ("; --health_check=warn trains on regardless" if finite else ""))
    if channels_last:
        model.to(memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------------------------------------
# the pipeline


def _check_out_dir(out_dir: Path, config: dict) -> int:
    """Refuse to mix a new run's settings into an existing run's checkpoint (nothing there is touched).

    Returns the training recipe of the run: the checkpoint's, or the current one for a new run."""
    ckpt = out_dir / "checkpoint.pt"
    if not ckpt.exists():
        return RECIPE
    if config.get("retrain", False):  # trained anew, unless only its lesions and figures are redone
        return RECIPE if "train" in config["stages"] else load_checkpoint(ckpt, mmap=True)["config"].get("recipe", 1)
    state = load_checkpoint(ckpt, mmap=True)
    old, recipe = state["config"], state["config"].get("recipe", 1)
    if recipe != RECIPE and "train" in config["stages"] and int(state["epoch"]) < config["epochs"]:
        raise UsageError(f"{out_dir} holds a run trained with an older recipe ({recipe}; now {RECIPE}) that is not "
                         f"finished; pass --retrain=True to train it again or choose another --out_dir")
    keys = list(RUN_IDENTITY) + [k for k in config if k.endswith("_data")]
    # what a run written before the setting existed was
    plain = {"role": "real", "optimizer": "sgd", "kdef_views": ["S"], "head": "split", "init": "random",
             "lfw_crop": False, "branch_at": None}
    if not any(vggface2.is_lfw_root(Path(s).expanduser()) for s in task_specs(config).values()
               if not s.startswith("demo") and Path(s).expanduser().is_dir()):
        keys.remove("lfw_crop")  # no LFW folder read: the setting changes nothing
    differ = [k for k in keys if old.get(k, plain.get(k)) != config.get(k, plain.get(k))]
    if differ:
        was = {k: old.get(k, plain.get(k)) for k in differ}
        changed = "; ".join(f"{k}: {was[k]!r} -> {config.get(k)!r}" for k in differ)
        as_trained = " ".join(f"--{k}={was[k]!r}" for k in differ)
        raise UsageError(f"{out_dir} holds a run trained with other settings ({changed}); pass {as_trained} to use "
                         f"it as it was trained, --retrain=True to replace it, or choose another --out_dir")
    return recipe


def source_groups(specs: dict) -> list:
    """The tasks grouped by the images they read, in task order: [[task, ...], ...]. Tasks whose specs name the
    same folder or file share one set of images (each image then carries every task's label); 'demo' read by an
    identity task ('identity', 'face') and an expression task ('expression', 'emotion') is the demo faces,
    which carry both labels, for both. Every other demo task draws its own set, as before."""
    kinds = {t: vggface2.label_kind_for_task(t) for t in specs}
    plain_demo = [t for t, s in specs.items() if s.strip() == "demo"]
    faces_shared = {"identity", "expression"} <= {kinds[t] for t in plain_demo}
    groups = {}
    for task, spec in specs.items():
        spec = spec.strip()
        if spec == "demo":
            key = ("demo", "faces" if faces_shared and kinds[task] in ("identity", "expression")
                   else vggface2.demo_kind_for(task))
        elif spec.startswith("demo:"):
            key = ("demo", spec.split(":", 1)[1])
        else:
            key = ("path", str(Path(spec).expanduser().resolve()))
        groups.setdefault(key, []).append(task)
    return list(groups.values())


def _load_group(tasks: list, specs: dict, config: dict) -> dict:
    """{task: TaskData} of tasks that read one source: loaded once, each task a view with its own labels."""
    first = tasks[0]
    spec = specs[first]
    if spec.strip() == "demo" and len(tasks) > 1:
        spec = "demo:faces"  # the identity and expression tasks of the demo: the faces carry both labels
    data = vggface2.load_task(spec, first, config["image_size"], config.get("max_per_class"),
                              config.get("max_classes"), config["seed"], config.get("download", False),
                              config.get("demo_per_class", 100), kdef_views=tuple(config.get("kdef_views", ["S"])),
                              lfw_crop=config.get("lfw_crop", False))  # a run from before the setting: whole frames
    if len(tasks) == 1:
        return {first: data}
    views = {t: vggface2.task_view(data, t) for t in tasks}
    chosen = {}
    for t in tasks:
        kind = vggface2.label_kind_for_task(t) or data.label_kind
        if kind in chosen:
            raise DataError(f"tasks {chosen[kind]} and {t} read the same images ({specs[t]}) and both choose its "
                            f"{kind or 'only'} labels; name one task by the label it should use (identity or "
                            f"face -> identity, expression or emotion -> expression)")
        chosen[kind] = t
    return views


def load_datasets(config: dict) -> dict:
    """{task: TaskData} for every task (the `tasks` setting or the `<task>_data` settings), all at `image_size`,
    as the run's role has them (ROLES): the tasks as given, pseudo-tasks, one task alone, or resolution-matched
    images. Tasks that read the same source share one image array (`shared_groups`)."""
    role = config.get("role", "real")
    specs = task_specs(config)
    if role == "single_task":
        specs = {config["single_task"]: specs[config["single_task"]]}
    datasets = {}
    for group in source_groups(specs):
        datasets.update(_load_group(group, specs, config))
    datasets = {t: datasets[t] for t in specs}
    for task, data in datasets.items():
        counts = data.counts()
        if min(counts.values()) == 0:
            raise DataError(f"{task}: {specs[task]} gives {counts}; every split needs images (raise max_per_class)")
    groups = vggface2.shared_groups(datasets)
    if role == "pseudo_task":
        if len(groups) < len(datasets):
            raise DataError(f"the pseudo_task control splits the tasks' classes into two tasks over their images; "
                            f"tasks {' and '.join('+'.join(g) for g in groups if len(g) > 1)} share their images, so "
                            f"an image would carry two labels in one pseudo-task; leave pseudo_task out of controls")
        datasets = vggface2.pseudo_tasks(datasets, config["seed"])
    elif role == "same_task":
        first = next(iter(datasets))
        datasets = vggface2.same_task(datasets[first], config["seed"])
        for task, data in datasets.items():
            if min(data.counts().values()) == 0:
                raise DataError(f"the same_task control deals {first}'s images to two heads; {task} gets "
                                f"{data.counts()}; every split needs images (raise max_per_class)")
    elif role == "resolution_matched":
        datasets, size = vggface2.match_resolution(datasets)
        for g in groups:  # one resized image array per shared group, as before matching
            for t in g[1:]:
                datasets[t].images = datasets[g[0]].images
        if size < config["image_size"]:
            print(f"resolution-matched control: every task's images brought down to {size} px and back up to "
                  f"{config['image_size']} px")
        else:
            print(f"resolution-matched control: the lowest native resolution ({size} px) is not below "
                  f"image_size={config['image_size']}: the images are the real run's (this control tests nothing "
                  f"here)")
    return datasets


def run(config: dict) -> None:
    """The whole pipeline: data, training, lesion sweep, figures (the stages named in config['stages'])."""
    check_config(config)
    dist = Dist(config.get("device", "auto"))
    try:
        torch.manual_seed(config["seed"])
        out_dir = Path(config["out_dir"])
        config = dict(config, recipe=_check_out_dir(out_dir, config))
        datasets = load_datasets(config)
        # the init weights only matter to a training that starts afresh: a checkpoint replaces them otherwise
        fresh = "train" in config["stages"] and (config.get("retrain") or not (out_dir / "checkpoint.pt").exists())
        model = build_model(config, {t: len(d.classes) for t, d in datasets.items()}, load_init=fresh).to(dist.device)
        if "lesion" in config["stages"]:
            lesion_utils.select_sites(model, config)  # an unknown lesion site stops the run before training
            if not config.get("retrain"):  # a damaged file of an earlier sweep stops it too (retrain replaces them)
                lesion_utils.earlier_sweep(lesion_utils.sweep_settings(model, config), out_dir)
        if "figures" in config["stages"] and config.get("gradcam_site"):
            lesion_utils.get_site(model, config["gradcam_site"])
        if "train" not in config["stages"] and not (out_dir / "checkpoint.pt").exists():
            raise UsageError(f"{out_dir}: no checkpoint.pt to lesion or draw; run the 'train' stage first")
        resolved = dict(config, tasks={t: {"classes": len(d.classes), "chance": d.chance, "source": d.source,
                                           "counts": d.counts()} for t, d in datasets.items()},
                        resolved_device=str(dist.device), world_size=dist.world, lr_per_step=peak_lr(config, dist.world),
                        optimizer_used=optimizer_name(config), weight_decay_used=weight_decay(config),
                        shared_images=[g for g in vggface2.shared_groups(datasets) if len(g) > 1],
                        n_lesion_sites=len(lesion_utils.lesion_sites(model, config.get("lesion_inner", False))),
                        **provenance(dist.device))
        if dist.main:
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UsageError(f"out_dir={str(out_dir)!r} cannot be created ({e.strerror}); expected a writable "
                                 f"folder path")
            for folder in (out_dir, out_dir / "figures"):
                for name in remove_stale_temporaries(folder):
                    print(f"removed {folder / name}, left by an interrupted write")
            write_text(out_dir / "config.json", json.dumps(resolved, indent=1))
            summary = ", ".join(f"{t}: {len(d.classes)} classes, {d.counts()['train']} train / "
                                f"{d.counts()['test']} test" for t, d in datasets.items())
            shared = "".join(f"; {' and '.join(g)} on the same images" for g in resolved["shared_images"])
            print(f"{config['backbone']} on {dist.device} (x{dist.world}), {config['image_size']} px; {summary}{shared}")
        dist.barrier()
        images = {}
        for group in vggface2.shared_groups(datasets):  # a shared group's images go to the device once
            for t in group:
                images[t] = TaskImages(datasets[t], dist.device, images.get(group[0]))
        images = {t: images[t] for t in datasets}
        if "train" in config["stages"]:
            if dist.main and config["epochs"] > 0 and (config.get("retrain") or not _finished(out_dir, config)):
                for stale in lesion_utils.SWEEP_FILES.values():  # results of an older model no longer hold
                    (out_dir / stale).unlink(missing_ok=True)
            train(model, images, config, out_dir, dist)
        # the checkpoint's weights in every process (under DDP each process's batch-norm statistics end on its
        # own last batch): a sweep shared out across processes is the sweep of one
        if "train" not in config["stages"] or ("lesion" in config["stages"] and dist.world > 1):
            dist.barrier()
            model.load_state_dict(load_checkpoint(out_dir / "checkpoint.pt", dist.device)["model"])
        if "lesion" in config["stages"]:  # every process sweeps its share of the sites; process 0 writes
            lesion_utils.lesion_stage(model, images, config, out_dir, dist.rank, dist.world, dist.gather)
            epoch_sweeps(model, images, config, out_dir, dist)
        if not dist.main:
            return
        if "figures" in config["stages"]:
            figures_stage(model, images, config, out_dir)
    finally:
        dist.close()


def epoch_sweeps(model: DualTaskNet, images: dict, config: dict, out_dir: Path, dist: Dist) -> None:
    """The lesion sweep of every epoch named in lesion_epochs (before the last, whose sweep is the run's own),
    each from its kept weights into epoch_<N>/, to show when a split appears during training."""
    wanted = sorted({e for e in (config.get("lesion_epochs") or []) if e < config["epochs"]})
    for epoch in wanted:
        path = epoch_checkpoint(out_dir, epoch)
        if not path.exists():
            if dist.main:
                print(f"warning: no weights kept for epoch {epoch} ({path.name}): it was trained before "
                      f"lesion_epochs named it; --retrain=True trains again and keeps them", file=sys.stderr)
            continue
        if dist.main:
            print(f"lesion sweep of epoch {epoch} of {config['epochs']} ({path.name})", flush=True)
        earlier = copy.deepcopy(model)
        earlier.load_state_dict(load_checkpoint(path, next(model.parameters()).device)["model"])
        folder = epoch_folder(out_dir, epoch)
        if dist.main:
            folder.mkdir(exist_ok=True)
        dist.barrier()
        lesion_utils.lesion_stage(earlier, images, config, folder, dist.rank, dist.world, dist.gather)


def figures_stage(model: DualTaskNet, images: dict, config: dict, out_dir: Path) -> None:
    """Figures, analyses and report.html. The figures drawn from the run's CSVs and the report come first, so
    that nothing finished is lost; then Grad-CAM, preferred stimuli and decoding each run on their own. A part
    that fails is named in one line on stderr, in figures_status.json and in the report ("Skipped: ..."); the
    others still run, the report is rebuilt, and StageFailed names the failed parts at the end."""
    out_dir = Path(out_dir)
    status_path = out_dir / report.FIGURES_STATUS
    status = {}

    def attempt(name, make):
        start = time.perf_counter()
        try:
            written = [p for p in make() if p is not None]
        except Exception as e:  # one part's failure must not cost the others (KeyboardInterrupt still stops)
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
            if isinstance(e, ImportError):
                reason += " (a package is missing: pip install -r requirements.txt)"
            status[name] = {"ok": False, "error": reason, "traceback": traceback.format_exc()}
            print(f"error: {name} failed after {format_seconds(time.perf_counter() - start)}: {reason} "
                  f"(traceback in {status_path})", file=sys.stderr, flush=True)
        else:
            status[name] = {"ok": True, "seconds": round(time.perf_counter() - start, 1),
                            "files": [str(p) for p in written]}
            for path in written:
                print(f"wrote {path}")
            print(f"{name}: {format_seconds(time.perf_counter() - start)}", flush=True)
        write_text(status_path, json.dumps(status, indent=1))

    for name, draw in figures.RUN_FIGURES:
        attempt(name, lambda draw=draw: [draw(out_dir)])
    attempt("report", lambda: [report.build_report(out_dir)])
    for name, step in inspection.ANALYSES:
        attempt(name, lambda step=step: step(model, images, config, out_dir))
    attempt("report", lambda: [report.build_report(out_dir)])
    failed = [f"{name} ({entry['error']})" for name, entry in status.items() if not entry["ok"]]
    if failed:
        raise StageFailed(f"figures stage: {'; '.join(failed)} failed; everything else was written "
                          f"({out_dir / 'report.html'} names what is missing)")


def provenance(device: torch.device) -> dict:
    """What made the run, for config.json: package versions, the device, the command line and the git commit."""
    import platform
    import subprocess
    from importlib import metadata

    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):  # Linux names the CPU model here; platform does not
            cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                        if line.startswith("model name")), cpu)
        device_name = f"{device.type}: {cpu}, {os.cpu_count()} cores"
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        if commit:
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "torchvision": version("torchvision"), "numpy": np.__version__,
                         "scikit-learn": version("scikit-learn")},
            "device_name": device_name, "command": [Path(sys.executable).name] + sys.argv, "git_commit": commit}


def _finished(out_dir: Path, config: dict) -> bool:
    ckpt = out_dir / "checkpoint.pt"
    return ckpt.exists() and int(load_checkpoint(ckpt, mmap=True)["epoch"]) >= config["epochs"]
