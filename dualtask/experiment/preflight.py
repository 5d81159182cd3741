"""The check of a whole configuration before work starts: `check_run` before anything of a run is read, trained or
written, `check_data` once its images are loaded and before config.json is written, and (experiment.py) the same
for every run of an experiment before the first one starts. Each failure is a UsageError that names the setting,
its value and the expected form. check_run reads nothing but the settings and the file system's view of the paths
(a network's layout is built on the meta device, without weights), so it takes milliseconds.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch

from dualtask.config.settings import INIT_FORM, WEIGHTS_FORM, check_config, task_specs
from dualtask.core.common import UsageError
from dualtask.data import loading as vggface2
from dualtask.lesion import readouts, subgroups
from dualtask.lesion import sweep as lesion_utils
from dualtask.model import sites as sites_mod
from dualtask.model.foreign import ReadoutNet
from dualtask.model.network import DualTaskNet, branch_site, build_model

DATA_FORM = ("'demo', a VGGFace2 root, a CIFAR-10 root, a cache folder made by vggface2.py, FER2013's fer2013.csv, "
             "a KDEF root, VoxCeleb frames or a folder with one subfolder per class")
PROBE_FORM = "the held-out task's data: a class-folder tree, a CIFAR-10 root, a cache folder or 'demo:objects'"


def check_run(config: dict, network=None) -> list:
    """Everything of one run's settings that is known before an image is read: every setting's rule
    (settings.check_config), no setting naming one thing twice, the sites and branch point this backbone has,
    the combinations that cannot run, and every path setting (exists, of the right kind, readable). Returns the
    names of the sites the run lesions. network: a network handed in from Python (pipeline.run)."""
    check_config(config)
    sites = _check_sites(config, network)
    _check_combinations(config)
    _check_paths(config)
    return sites


# ----------------------------------------------------------------------------------------------------------
# sites


def _network(backbone: str, batch_norm: bool) -> DualTaskNet:
    """A network of this backbone's layout, without weights (on the meta device: built in milliseconds); its
    sites do not depend on the classes, widths or image size."""
    with torch.device("meta"):
        return DualTaskNet(backbone, {"a": 2, "b": 2}, batch_norm, 8)


@functools.lru_cache(maxsize=64)
def _site_names(backbone: str, batch_norm: bool, branch_at, inner: bool) -> tuple:
    """The lesion sites' names of a (branched) network of this backbone, in depth order (with the inner
    bottleneck sites when `inner`)."""
    model = _network(backbone, batch_norm)
    if branch_at is not None:
        with torch.device("meta"):
            model.branch(branch_site(model, branch_at).name)
    return tuple(s.name for s in sites_mod.lesion_sites(model, inner=inner))


@functools.lru_cache(maxsize=64)
def branch_point(backbone: str, batch_norm: bool, branch_at, name: str = "branch_at") -> str:
    """The module path of the site a network of this backbone branches after (`branch_at`: a depth or a module
    path); a UsageError naming the setting `name` where there is no such site or nothing after it to branch."""
    model = _network(backbone, batch_norm)
    try:
        site = branch_site(model, branch_at)
    except UsageError as e:
        raise UsageError(f"{name}: {e}" if name != "branch_at" else str(e)) from None
    sites = sites_mod.lesion_sites(model)
    with torch.device("meta"):
        paired = model.branch(site.name)
    if not any(p.numel() for path in paired for p in model.get_submodule(path).parameters()):
        raise UsageError(f"{name}={branch_at!r}: {site.name} is the last site of {backbone}, with no weights after "
                         f"it to give each task a copy of; expected a site depth 0..{len(sites) - 2} or a module "
                         f"path before it, e.g. {sites[len(sites) // 2].name!r}")
    return site.name


def resolve_sites(wanted: list, names: tuple, setting: str) -> list:
    """The site names that the depths and module paths of `wanted` name (lesion_engine.select_sites' rule); a
    UsageError names `setting` for an unknown site or for one site named twice (two spellings of one site)."""
    chosen = {}
    for w in wanted:
        if isinstance(w, int) and not isinstance(w, bool) and -len(names) <= w < len(names):
            name = names[w]
        elif isinstance(w, str) and w in names:
            name = w
        else:
            raise UsageError(f"{setting}: unknown site {w!r}; expected depths 0..{len(names) - 1} or names from: "
                             f"{', '.join(names)}")
        if name in chosen:
            raise UsageError(f"{setting}={wanted!r}: {chosen[name]!r} and {w!r} both name the site {name}; "
                             f"expected each site once")
        chosen[name] = w
    return list(chosen)


@functools.lru_cache(maxsize=16)
def _network_site_names(network: str, image_size: int, readout) -> tuple:
    """The lesion sites' names of a network this tool did not train (its graph's, random weights)."""
    model = build_model({"network": network, "image_size": image_size, "readout_layer": readout}, {"a": 2, "b": 2},
                        load_init=False)
    return tuple(s.name for s in sites_mod.lesion_sites(model))


def _check_sites(config: dict, network=None) -> list:
    """The branch point, the swept sites and the Grad-CAM site against the network the settings build."""
    backbone, bn, branch_at = config["backbone"], config.get("batch_norm", True), config.get("branch_at")
    if config.get("network"):
        if branch_at is not None:
            raise UsageError(f"branch_at={branch_at!r} with network={config['network']!r}: a network trained "
                             f"elsewhere is analysed as it is; expected branch_at=None")
        names = _network_site_names(config["network"], config.get("image_size", 224), config.get("readout_layer")) \
            if network is None else tuple(s.name for s in sites_mod.lesion_sites(ReadoutNet(
                network, config["network"], {"a": 2, "b": 2}, config.get("image_size", 224),
                config.get("readout_layer"))))
        if config.get("lesion_layers") is not None and "lesion" in config["stages"]:
            names = tuple(resolve_sites(config["lesion_layers"], names, "lesion_layers"))
        if config.get("gradcam_site") and "figures" in config["stages"] and config["gradcam_site"] not in names:
            raise UsageError(f"gradcam_site={config['gradcam_site']!r}: not a site of this network; expected None or "
                             f"one of: {', '.join(names)}")
        return list(names)
    if branch_at is not None:
        if config.get("head", "split") != "split":
            raise UsageError(f"branch_at={branch_at!r} with head={config['head']!r}: a branched network gives each "
                             f"task its own copy of the trunk after the branch point, and a joint output layer would "
                             f"read every copy; expected head='split' or branch_at=None")
        branch_at = branch_point(backbone, bn, branch_at)
    names = _site_names(backbone, bn, branch_at, bool(config.get("lesion_inner", False)))
    if config.get("lesion_layers") is not None and "lesion" in config["stages"]:
        names = tuple(resolve_sites(config["lesion_layers"], names, "lesion_layers"))
    if config.get("gradcam_site") and "figures" in config["stages"]:
        every = _site_names(backbone, bn, branch_at, True)
        if config["gradcam_site"] not in every:
            raise UsageError(f"gradcam_site={config['gradcam_site']!r}: not a site of this network; expected None or "
                             f"one of: {', '.join(every)}")
    return list(names)


# ----------------------------------------------------------------------------------------------------------
# combinations and paths


def _check_combinations(config: dict) -> None:
    stages = config["stages"]
    if "lesion" in stages and "transfer" in (config.get("probes") or []) and not config.get("probe_data"):
        raise UsageError(f"probes={config['probes']!r} needs probe_data: expected {PROBE_FORM}")
    if config.get("role") == "pseudo_task":
        shared = [g for g in vggface2.source_groups(task_specs(config)) if len(g) > 1]
        if shared:
            raise UsageError(f"controls: the pseudo_task control (role='pseudo_task') splits the tasks' classes into "
                             f"two tasks over their images, and tasks {' and '.join('+'.join(g) for g in shared)} "
                             f"read the same images, so an image would carry two labels in one pseudo-task; "
                             f"expected controls without pseudo_task, or tasks that read their own images")


def _readable_dir(p: Path) -> bool:
    return p.is_dir() and os.access(p, os.R_OK | os.X_OK)


def check_data_path(spec: str, setting: str, form: str, download: bool = False) -> None:
    """A data spec that names a path: it exists, is a folder (or FER2013's .csv file) and can be read."""
    if spec.strip().startswith("demo"):
        return
    p = Path(spec.strip()).expanduser()
    if not p.exists():
        if download:  # CIFAR-10 is fetched into a new folder
            return
        raise UsageError(f"{setting}={spec!r}: does not exist; expected {form}")
    if p.is_file():
        if p.suffix.lower() != ".csv":
            raise UsageError(f"{setting}={spec!r}: a file, not a folder (only FER2013's .csv is read as a file); "
                             f"expected {form}")
        if not os.access(p, os.R_OK):
            raise UsageError(f"{setting}={spec!r}: cannot be read (no permission); expected {form}")
        return
    if not _readable_dir(p):
        raise UsageError(f"{setting}={spec!r}: not a readable folder; expected {form}")
    if not any(p.iterdir()) and not download:
        raise UsageError(f"{setting}={spec!r}: an empty folder; expected {form}")


def _check_paths(config: dict) -> None:
    stages = config["stages"]
    out = Path(config["out_dir"]).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"out_dir={config['out_dir']!r}: exists and is not a folder; expected a folder path (a new "
                         f"folder or a run folder)")
    above = next((p for p in [out, *out.absolute().parents] if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UsageError(f"out_dir={config['out_dir']!r}: {above} is a file, so the folder cannot be made; expected "
                         f"a folder path")
    if above is not None and not os.access(above, os.W_OK | os.X_OK):
        raise UsageError(f"out_dir={config['out_dir']!r}: {above} is not writable; expected a folder path this "
                         f"user may write")
    specs = task_specs(config)
    by_tasks = isinstance(config.get("tasks"), dict)
    for task, spec in specs.items():
        setting = f"tasks: {task}" if by_tasks else f"{task}_data"
        check_data_path(spec, setting, DATA_FORM, bool(config.get("download", False)))
    weights = config.get("weights", "random")
    if config.get("network") and weights not in ("random", "pretrained"):
        p = Path(weights).expanduser()
        if not p.is_file() or not os.access(p, os.R_OK):
            what = "no such file" if not p.exists() else "not a readable file"
            raise UsageError(f"weights={weights!r}: {what}; expected {WEIGHTS_FORM}")
    init = config.get("init", "random")
    if "train" in stages and init not in ("random", "imagenet"):
        p = Path(init).expanduser()
        if not p.exists():
            raise UsageError(f"init={init!r}: no such file; expected {INIT_FORM}")
        if not p.is_file() or not os.access(p, os.R_OK):
            raise UsageError(f"init={init!r}: not a readable file; expected {INIT_FORM}")
    if "lesion" in stages and config.get("subgroups"):
        p = Path(config["subgroups"]).expanduser()
        if not p.is_file() or not os.access(p, os.R_OK):
            what = "does not exist" if not p.exists() else "is not a readable file"
            raise UsageError(f"subgroups={config['subgroups']!r}: {what}; expected {subgroups.FORM}")
    if "lesion" in stages and "transfer" in (config.get("probes") or []):
        check_data_path(config["probe_data"], "probe_data", PROBE_FORM, bool(config.get("download", False)))


# ----------------------------------------------------------------------------------------------------------
# what needs the images


def check_data(config: dict, datasets: dict, probe=None) -> None:
    """What needs the tasks' images (TaskData by task, as the run's role has them), checked before anything is
    trained or written: the subgroups file against each task's test images, enough test images for the fixed
    readouts' folds, training images of two classes or more for the refitted readouts, and the transfer probe's data
    (`probe`, loaded from probe_data) with at least two classes and
    images to fit and to test on."""
    if "lesion" not in config["stages"]:
        return
    if config.get("subgroups"):
        subgroups.read_groups(config["subgroups"], {t: d.counts()["test"] for t, d in datasets.items()})
    if config.get("fixed_readout", False):
        for task, data in datasets.items():
            problem = readouts.folds_problem(data.labels[data.indices("test")], config["seed"])
            if problem:
                raise UsageError(f"fixed_readout=True: {task}: {problem}; expected more test images per class (raise "
                                 f"max_per_class or demo_per_class) or fixed_readout=False")
    if config.get("refit_readout", False):  # the training images each task's refitted readouts are fitted on
        n, rng = config.get("readout_images", lesion_utils.READOUT_IMAGES), np.random.default_rng(config["seed"])
        for task, data in datasets.items():  # the sample lesion_engine.image_batches draws, task by task
            idx = data.indices("train")
            if n < len(idx):
                idx = np.sort(rng.choice(idx, n, replace=False))
            if len(np.unique(data.labels[idx])) < 2:
                raise UsageError(f"refit_readout=True: {task}: the {len(idx)} training images its refitted readouts "
                                 f"are fitted on (readout_images={n}) hold one class; expected readout_images large "
                                 f"enough for two classes or more, or refit_readout=False")
    if probe is not None:
        counts = probe.counts()
        if len(probe.classes) < 2 or counts["train"] == 0 or counts["test"] == 0:
            raise UsageError(f"probe_data={config['probe_data']!r}: {len(probe.classes)} class(es), {counts['train']} "
                             f"training and {counts['test']} test images; a linear probe needs at least two classes "
                             f"and images to fit and to test on; expected {PROBE_FORM}")
