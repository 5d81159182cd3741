"""A network trained elsewhere, analysed from Python in one call, as `python own_network.py` analyses one from the
shell: the same settings (own_network.py's, with the keywords given replacing them), the same run folder, and its
tables back as pandas DataFrames.

    import torchvision, lesion_utils as L
    net = torchvision.models.resnet18()      # any nn.Module, or a name: "resnet50", "timm:convnext_tiny"
    tables = L.analyse(net, "runs/mine", face_data="demo", object_data="demo", image_size=32, device="cpu")
    tables["dissociation"]                   # == L.load_results("runs/mine")["dissociation"]
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn as nn

from dualtask.config import settings
from dualtask.core import names
from dualtask.core.common import UsageError
from dualtask.experiment import pipeline

SCRIPT = Path(__file__).resolve().parents[2] / "own_network.py"
TABLES = {"lesion_results": names.SWEEP_FILES["results"], "dissociation": names.SWEEP_FILES["dissociation"],
          "train_log": "train_log.csv", "probes": "probes.csv"}


def defaults() -> dict:
    """own_network.py's settings, as its command line starts from them."""
    return settings.hyperparameters(vars(settings.load_script(SCRIPT)))


def analyse(network, out_dir: str | os.PathLike, **overrides) -> dict:
    """Analyse `network` (an nn.Module, or a name own_network.py takes: its `network` setting) into out_dir with
    own_network.py's settings and `overrides` (any of its settings, e.g. weights, face_data, lesion_methods);
    returns `load_results(out_dir)`. A setting own_network.py does not have is a UsageError naming it."""
    if not SCRIPT.is_file():
        raise UsageError(f"{SCRIPT}: not found; analyse reads own_network.py's settings from the repository (run "
                         f"it from a clone of the repository, installed with pip install -e .)")
    base = defaults()
    unknown = sorted(set(overrides) - set(base) | ({"network"} & set(overrides)))
    if unknown:
        raise UsageError(f"unknown setting(s) {unknown}; expected settings of own_network.py other than network "
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
