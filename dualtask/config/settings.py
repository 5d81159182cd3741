"""A run's settings: the backbone scripts' hyperparameters, the command line's overrides, every setting's rule
and expected form (SETTINGS, checked before anything is read or written), the settings that make a checkpoint a
run's (RUN_IDENTITY), and --help."""
from __future__ import annotations

import ast
import contextlib
import importlib.util
import math
import re
import types
from pathlib import Path

import torch

from dualtask.core import names as names_mod
from dualtask.core.common import UsageError
from dualtask.data import folders, kdef, taskdata

BACKBONES = ("vgg16", "vgg19", "resnet50", "resnext50")
OPTIMIZERS = ("adamw", "sgd")  # recipe 3 on; runs of recipes 1 and 2 trained with SGD
STAGES = ("train", "lesion", "figures")
TRAIN_LOG_COLUMNS = ("epoch", "task", "split", "loss", "accuracy", "images_per_s")
# settings that make a checkpoint belong to a run: changing one needs --retrain=True or another out_dir
RUN_IDENTITY = ("backbone", "batch_norm", "fc_width", "image_size", "max_per_class", "max_classes", "seed",
                "batch_size", "epochs", "optimizer", "lr", "weight_decay", "grad_clip", "demo_per_class", "role",
                "single_task", "tasks", "kdef_views", "face_crop", "head", "init", "branch_at", "network", "weights",
                "readout_layer", "network_digest")
# what a run trains on, set by an experiment (experiment.py) for each of its runs; a plain run is "real":
# real: the tasks as given; pseudo_task: the union of their classes split at random into two halves, each half a
# task (Dobs et al. 2022); single_task: the task named by the `single_task` setting alone; resolution_matched:
# every task's images brought down to the lowest native resolution among the tasks and back up; same_task: the first
# task's images dealt in two halves to two heads that learn the same task (vggface2.same_task)
ROLES = ("real", "pseudo_task", "single_task", "resolution_matched", "same_task")


# ----------------------------------------------------------------------------------------------------------
# hyperparameters


def load_script(path) -> types.ModuleType:
    """A backbone script (vgg16.py, ...) as a module, its hyperparameters set and its main not run: how the
    benchmarks read a script's settings."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"dualtask_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
        if name not in defaults and name in REPLACED:
            raise UsageError(f"--{name}={text}: {name} was replaced by {REPLACED[name]}")
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


NOT_TASK_DATA = ("probe_data",)  # settings named like <task>_data that are not a task's data (probes.py)


def is_task_data(name: str) -> bool:
    """Whether a setting's name makes it a task's data spec (<task>_data)."""
    return name.endswith("_data") and name not in NOT_TASK_DATA


def task_specs(config: dict) -> dict:
    """{task_name: data spec}: the `tasks` setting when it is a dict, else every `<task>_data` setting, in the
    script's order."""
    if isinstance(config.get("tasks"), dict):
        return dict(config["tasks"])
    return {k[: -len("_data")]: v for k, v in config.items() if is_task_data(k) and isinstance(v, str)}


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
# a network this tool did not train (`python lesion_utils.py`, dualtask.experiment.analyse; dualtask.model.zoo): its
# settings are ResNet.py's less those of training and experiments (NOT_FOR_NETWORKS), with NETWORK_SETTINGS first
NOT_FOR_NETWORKS = ("backbone", "head", "branch_at", "init", "epochs", "optimizer", "lr", "grad_clip",
                    "weight_decay", "health_check", "compile", "lesion_epochs", "lesion_inner", "seeds", "controls",
                    "branch_points", "launcher", "slurm")
NETWORK_SETTINGS = {  # name: (default, what it does: what --help and docs/settings.md print)
    "network": ("resnet18", "a torchvision classification model's name (resnet50, convnext_tiny, mobilenet_v2, "
                "densenet121, googlenet, ... or \"torchvision:<name>\"), or \"timm:<name>\" (pip install timm)"),
    "weights": ("random", "\"random\", \"pretrained\" (the library's published weights, downloaded only when asked) "
                "or a path to a state-dict file of that network"),
    "readout_layer": (None, "where the readouts read the network: None = the input of its last linear layer (e.g. "
                      "\"flatten\"), or a node name of its traced graph"),
    "image_size": (64, "both tasks are resized to image_size x image_size pixels (ImageNet networks were trained "
                   "at 224)"),
    "retrain": (False, "fit the readout heads again even when out_dir holds them"),
    "out_dir": ("runs/own_network", "where config.json, checkpoint.pt (the fitted heads), lesion_results.csv, "
                "report.html and figures/ go"),
}
NETWORK_FORM = ("a torchvision classification model's name (e.g. 'resnet50', 'convnext_tiny', or "
                "'torchvision:resnet50'), or 'timm:<name>' for a timm model")
WEIGHTS_FORM = ("'random', 'pretrained' (the library's published weights, downloaded the first time: needs network "
                "access) or a path to a file written by torch.save holding the network's state dict")
READOUT_FORM = ("None (the input of the network's last linear layer) or a node of its traced graph, e.g. 'flatten' "
                "or 'layer4.1'")


def _text(v) -> bool:
    return isinstance(v, str) and v.strip() != ""


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
    "lesion_methods": _list_of(lambda m: m in names_mod.METHODS, f"names from {list(names_mod.METHODS)}"),
    "random_repeats": _optional(_integer(1)),
    "rank_images": _integer(1),
    "refit_readout": _FLAG,
    "fixed_readout": _FLAG,
    "localiser_fdr": ((lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1),
                      "a false discovery rate above 0 and below 1, e.g. 0.05"),
    "mask_steps": _integer(1),
    "probes": _list_of(lambda p: p in ("inversion", "transfer"), "probes from ['inversion', 'transfer']",
                       non_empty=False),
    "probe_data": ((lambda v: v is None or (isinstance(v, str) and v.strip() != "")),
                   "None or the held-out task's data: a class-folder tree, a CIFAR-10 root, a cache or 'demo:objects'"),
    "subgroups": ((lambda v: v is None or (isinstance(v, str) and v.strip() != "")), "None or a path to a CSV file "
                  "with the columns task, image (a position among the task's test images) and group"),
    "mask_l1": _number(0, strict=False),
    "readout_images": _integer(2),
    "lesion_layers": ((lambda v: v is None or (isinstance(v, list) and v and all(_site_name(s) for s in v))),
                      "None or a non-empty list of site depths or module paths, e.g. [0, 4, 'trunk.layer4.2']"),
    "lesion_mode": _choice(("zero", "mean")),
    "lesion_keep_only": _FLAG,
    "lesion_per_class": _FLAG,
    "lesion_inner": _FLAG,
    "gradcam_site": ((lambda v: v is None or (isinstance(v, str) and v != "")), "None or a module path"),
    "stimulus_steps": _integer(1),
    "stages": _list_of(lambda s: s in STAGES, f"stages from {list(STAGES)}"),
    "health_check": _choice(names_mod.ACTIONS),
    "match_accuracy": _FLAG,
    "ranking_reliability": _FLAG,
    "verdict_rankings": ((lambda v: v is None or (isinstance(v, list) and len(v) > 0 and len(set(v)) == len(v) and all(
        m in names_mod.METHODS and m != "random" for m in v))),
        f"None or a non-empty list of distinct rankings from {[m for m in names_mod.METHODS if m != 'random']}"),
    "greedy_racing": _FLAG,
    "greedy_margin": _number(0, strict=False),
    "greedy_candidates": _optional(_integer(1)),
    "greedy_stop": ((lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1),
                    "a fraction above 0 and at most 1, e.g. 0.2"),
    "ranking_precision": _choice(names_mod.RANKING_PRECISIONS),
    "lesion_epochs": ((lambda v: v is None or (isinstance(v, list) and all(
        isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in v))),
        "None or a list of epochs (integers of at least 1), e.g. [1, 5, 10]"),
    "role": _choice(ROLES),
    "kdef_views": _list_of(lambda v: v in kdef.KDEF_VIEWS, f"KDEF views from {list(kdef.KDEF_VIEWS)}"),
    "face_crop": _choice(taskdata.FACE_CROPS),
    "network": ((lambda v: v is None or _text(v)), "None or " + NETWORK_FORM),
    "weights": (_text, WEIGHTS_FORM),
    "readout_layer": ((lambda v: v is None or _text(v)), READOUT_FORM),
    "lfw_crop": _FLAG,  # face_crop's forerunner: read from the config of a run written before face_crop existed
}
# list settings whose items must be distinct (lesion_layers: by the site they name, preflight.resolve_sites)
DISTINCT = ("lesion_fractions", "lesion_methods", "probes", "stages", "kdef_views", "lesion_epochs")
# settings renamed or replaced: their old names, in a command line, are answered with what replaced them
REPLACED = {"lfw_crop": "face_crop: use --face_crop=boxes for lfw_crop=True, --face_crop=none for False"}


def face_crop_of(config: dict, spec: str) -> str:
    """The face_crop with which a run's config reads the source `spec`: its face_crop setting. A run written
    before face_crop existed is read as it was trained: LFW's folders by its lfw_crop ('boxes' for True, 'none'
    for False, and for no lfw_crop either: runs before that setting read LFW's whole frames), every other source
    with 'boxes' (VGGFace2's boxes were always used)."""
    if "face_crop" in config:
        return config["face_crop"]
    root = Path(spec.strip()).expanduser()
    lfw = not spec.strip().startswith("demo") and root.is_dir() and folders.is_lfw_root(root)
    return "boxes" if not lfw or config.get("lfw_crop", False) else "none"


def network_run(config: dict) -> dict:
    """A run of a network this tool did not train (the `network` setting): its backbone is the network's name, it
    trains nothing (epochs 0: the train stage fits its readout heads), and a weights file is identified by its
    content (`network_digest`, one of RUN_IDENTITY: a file saved again under the same name is another network).
    Other runs as they are."""
    if not config.get("network"):
        return config
    out = dict(config, backbone=str(config["network"]), epochs=0)
    weights = config.get("weights", "random")
    if weights not in ("random", "pretrained") and "network_digest" not in config:
        path = Path(str(weights)).expanduser()
        if path.is_file():
            out["network_digest"] = "sha256:" + file_digest(path)
    return out


def file_digest(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_config(config: dict) -> None:
    """Values that parse but make no sense get a clear error before anything is read or written."""
    _check_tasks(config.get("tasks"))
    for name, value in config.items():
        if is_task_data(name) and not isinstance(config.get("tasks"), dict):
            if not isinstance(value, str) or not value.strip():
                raise UsageError(f"{name}={value!r}; expected 'demo' or a data folder path")
        elif name == "backbone" and config.get("network"):
            continue  # a network run's backbone is its network's name (network_run)
        elif name in SETTINGS and not SETTINGS[name][0](value):
            raise UsageError(f"{name}={value!r}; expected {SETTINGS[name][1]}")
    for name in DISTINCT:  # a list that names one thing twice would run it twice, or once without saying so
        value = config.get(name)
        if isinstance(value, list):
            twice = next((v for k, v in enumerate(value) if v in value[:k]), None)
            if twice is not None:
                raise UsageError(f"{name}={value!r}: {twice!r} is named twice; expected each once "
                                 f"({SETTINGS[name][1]})")
    tasks = task_specs(config)
    if config.get("role") == "single_task":
        if config.get("single_task") not in tasks:
            raise UsageError(f"role='single_task' with single_task={config.get('single_task')!r}; expected "
                             f"single_task to name one of the tasks: {', '.join(tasks)}")
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


# The training recipe's version, kept in every checkpoint's config. Recipe 1 (before the defaults were tuned):
# VGG's classifier always read a 7 x 7 pool, torchvision's initialisation, lr taken as given. Recipe 2: the
# choices below. A finished recipe-1 run is still rebuilt as it was trained, so its lesions and figures can be
# redrawn; training it further needs --retrain=True.
RECIPE = 3
HEADS = ("split", "joint")  # the output layers: one per task, or one softmax over all tasks' classes

INIT_FORM = ("'random', 'imagenet' or a path to a file written by torch.save holding a state dict of the trunk: in "
             "torchvision's layout (keys like features.0.weight or layer1.0.conv1.weight), or this tool's "
             "(trunk.-prefixed keys, e.g. a run's checkpoint.pt)")
