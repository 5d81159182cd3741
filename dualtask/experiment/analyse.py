"""A network trained elsewhere, analysed from the shell (`python lesion_utils.py --network=...`, `main`) or from
Python in one call (`analyse`): the same settings (`defaults`: ResNet.py's lesion and data settings with the
network's own, settings.NETWORK_SETTINGS; the keywords or `--name=value` given replacing them), the same run folder,
and its tables back as pandas DataFrames.

    import torchvision, lesion_utils as L
    net = torchvision.models.resnet18()      # any nn.Module, or a name: "resnet50", "timm:convnext_tiny"
    tables = L.analyse(net, "runs/mine", face_data="demo", object_data="demo", image_size=32, device="cpu")
    tables["dissociation"]                   # == L.load_results("runs/mine")["dissociation"]
"""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

from dualtask.config import settings
from dualtask.core import names
from dualtask.core.common import UsageError
from dualtask.experiment import experiment, pipeline

BASE_SCRIPT = Path(__file__).resolve().parents[2] / "ResNet.py"  # whose lesion and data settings a network run shares
TABLES = {"lesion_results": names.SWEEP_FILES["results"], "dissociation": names.SWEEP_FILES["dissociation"],
          "train_log": "train_log.csv", "probes": "probes.csv"}


def defaults() -> dict:
    """A network run's settings: settings.NETWORK_SETTINGS, then ResNet.py's less NOT_FOR_NETWORKS."""
    if not BASE_SCRIPT.is_file():
        raise UsageError(f"{BASE_SCRIPT}: not found; a network run takes its lesion settings from the repository's "
                         f"ResNet.py (run it from a clone of the repository, installed with pip install -e .)")
    base = settings.hyperparameters(vars(settings.load_script(BASE_SCRIPT)))
    own = {k: v for k, (v, _) in settings.NETWORK_SETTINGS.items()}
    return {**own, **{k: v for k, v in base.items() if k not in settings.NOT_FOR_NETWORKS and k not in own}}


def main(argv: list | None = None) -> None:
    """`python lesion_utils.py [--name=value ...]`: one network run (experiment.main's checks and exits)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        comments = dict(settings._script_comments(str(BASE_SCRIPT)),
                        **{k: c for k, (_, c) in settings.NETWORK_SETTINGS.items()})
        print("usage: python lesion_utils.py [--name=value ...]  (a network trained elsewhere)\n\nsettings:")
        for k, v in defaults().items():
            print(f"  --{k}={v!r}".ljust(44) + f"  {comments.get(k, '')}")
        return
    experiment.main(defaults(), argv)


def analyse(network, out_dir: str | os.PathLike, **overrides) -> dict:
    """Analyse `network` (an nn.Module, or a name: the `network` setting) into out_dir with `defaults()` and
    `overrides` (any of its settings, e.g. weights, face_data, lesion_methods); returns `load_results(out_dir)`. A
    setting a network run does not have is a UsageError naming it."""
    base = defaults()
    unknown = sorted(set(overrides) - set(base) | ({"network"} & set(overrides)))
    if unknown:
        raise UsageError(f"unknown setting(s) {unknown}; expected settings of a network run other than network "
                         f"(the first argument): {', '.join(k for k in base if k != 'network')}")
    config = dict(base, **overrides, out_dir=str(out_dir))
    module = None
    if isinstance(network, nn.Module):  # a copy: the run moves and evaluates it, and the user's stays as it was
        module = copy.deepcopy(network)
        config.update(network=f"python:{type(network).__name__}", network_digest="sha256:" + state_digest(module))
    else:
        config["network"] = network
    pipeline.run(config, network=module)
    return load_results(out_dir)


def state_digest(module: nn.Module) -> str:
    """sha256 of a module's state dict (names, shapes, dtypes and values): a run folder belongs to these weights."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b"")
    return digest.hexdigest()


def load_results(run_dir: str | os.PathLike) -> dict:
    """{table: pandas DataFrame} of a run folder's tables (any run: trained here or elsewhere): lesion_results,
    dissociation, train_log, probes, and fixed_readout/... and refit_readout/... where they were written; a table
    the run has not written is left out."""
    import pandas as pd

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise UsageError(f"{run_dir}: not a run folder (no config.json); expected a folder written by a script")
    out = {}
    for name, file in TABLES.items():
        if (run_dir / file).is_file():
            out[name] = pd.read_csv(run_dir / file)
    for folder in names.READOUT_DIRS.values():
        for name in ("lesion_results", "dissociation"):
            path = run_dir / folder / TABLES[name]
            if path.is_file():
                out[f"{folder}/{name}"] = pd.read_csv(path)
    return out
