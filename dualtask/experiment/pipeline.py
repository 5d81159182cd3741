"""The pipeline every backbone script runs (data, training, lesion sweep, figures: `run`), and `load_run`.

The network is in model.py, its training in training.py, the settings in settings.py; their names are importable
from here too.

A backbone script (vgg16.py, vgg19.py, ResNet.py, ResNeXt.py) lists its hyperparameters and calls
`main(globals())`. Every hyperparameter named `<task>_data` defines one task (face_data, object_data by
default): task names, class counts and chance levels come from the data, never from code.

In a notebook:

    from dualtask import load_run
    model, config = load_run("runs/vgg16")
    logits = model(images)          # {task_name: logits}
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from dualtask.analysis import inspection, probes
from dualtask.config.settings import RECIPE, RUN_IDENTITY, face_crop_of, is_task_data, network_run, task_specs
from dualtask.core import names
from dualtask.core.common import StageFailed, UsageError, format_seconds, remove_stale_temporaries, write_text
from dualtask.core.device import load_checkpoint
from dualtask.data import loading as vggface2
from dualtask.data.taskdata import DataError
from dualtask.experiment import preflight
from dualtask.lesion import sweep as lesion_utils
from dualtask.model import sites
from dualtask.model.foreign import ReadoutNet
from dualtask.model.network import DualTaskNet, build_model
from dualtask.report import build as report
from dualtask.report import figures
from dualtask.stats import multiple_testing
from dualtask.training.readout_heads import fit_heads
from dualtask.training.trainer import (
    Dist,
    TaskImages,
    epoch_checkpoint,
    epoch_folder,
    optimizer_name,
    peak_lr,
    train,
    weight_decay,
)

KEEP_PROBE_BYTES = 512 * 2**20  # a transfer probe's images up to this size are held from the check to the probes


# ----------------------------------------------------------------------------------------------------------
# runs on disk


def load_run(run_dir: str | os.PathLike, device: str = "cpu"):
    """Load a trained run for a notebook: (model in eval mode, config dict)."""
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoint.pt").exists():
        raise UsageError(f"{run_dir}: no checkpoint.pt; expected a run folder written by a backbone script")
    state = load_checkpoint(run_dir / "checkpoint.pt", device)
    config = dict(state["config"])
    if str(config.get("network", "")).startswith("python:"):
        raise UsageError(f"{run_dir}: its network ({config['network'][len('python:'):]}) was handed in from Python "
                         f"and cannot be rebuilt from its name; build it again and pass it with the run's "
                         f"checkpoint.pt (foreign.ReadoutNet(network, ...).load_state_dict(state['model']))")
    config.setdefault("recipe", 1)  # trained before the recipe was recorded
    model = build_model(config, {t: len(c) for t, c in state["classes"].items()}, load_init=False)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), config


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
    keys = list(RUN_IDENTITY) + [k for k in config if is_task_data(k)]
    # what a run written before the setting existed was
    plain = {"role": "real", "optimizer": "sgd", "kdef_views": ["S"], "head": "split", "init": "random",
             "branch_at": None}
    keys.remove("face_crop")  # compared below, source by source, where it changes what a task reads
    differ = [k for k in keys if old.get(k, plain.get(k)) != config.get(k, plain.get(k))]
    was = {k: old.get(k, plain.get(k)) for k in differ}
    crops = [(face_crop_of(old, s), face_crop_of(config, s)) for t, s in task_specs(config).items()
             if vggface2.face_crop_applies(s, t)]
    changed_crop = next(((before, now) for before, now in crops if before != now), None)
    if changed_crop:
        differ.append("face_crop")
        was["face_crop"] = changed_crop[0]
    if differ:
        changed = "; ".join(f"{k}: {was[k]!r} -> {config.get(k)!r}" for k in differ)
        as_trained = " ".join(f"--{k}={was[k]!r}" for k in differ)
        raise UsageError(f"{out_dir} holds a run trained with other settings ({changed}); pass {as_trained} to use "
                         f"it as it was trained, --retrain=True to replace it, or choose another --out_dir")
    return recipe


def _load_group(tasks: list, specs: dict, config: dict) -> dict:
    """{task: TaskData} of tasks that read one source: loaded once, each task a view with its own labels."""
    first = tasks[0]
    spec = specs[first]
    if spec.strip() == "demo" and len(tasks) > 1:
        spec = "demo:faces"  # the identity and expression tasks of the demo: the faces carry both labels
    data = vggface2.load_task(spec, first, config["image_size"], config.get("max_per_class"),
                              config.get("max_classes"), config["seed"], config.get("download", False),
                              config.get("demo_per_class", 100), kdef_views=tuple(config.get("kdef_views", ["S"])),
                              face_crop=face_crop_of(config, spec))
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
    for group in vggface2.source_groups(specs):
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


def load_probe_task(spec: str, name: str, config: dict):
    """A transfer probe's held-out task (probe_data), at the run's image size and caps."""
    return vggface2.load_task(spec, name, config["image_size"], config.get("max_per_class"), config.get("max_classes"),
                              config["seed"], config.get("download", False), config.get("demo_per_class", 100),
                              kdef_views=tuple(config.get("kdef_views", ["S"])), face_crop=face_crop_of(config, spec))


def run(config: dict, network: torch.nn.Module | None = None) -> None:
    """The whole pipeline: data, training, lesion sweep, figures (the stages named in config['stages']).
    network: a network handed in from Python (config['network'] names it), analysed as `python lesion_utils.py`
    analyses a named one (analyse.analyse)."""
    config = network_run(config)
    preflight.check_run(config, network)
    config = dict(config, random_repeats=multiple_testing.random_repeats(config))  # config.json holds the number
    note = multiple_testing.repeats_note(config)
    if note:
        print(note, flush=True)
    dist = Dist(config.get("device", "auto"))
    try:
        torch.manual_seed(config["seed"])
        out_dir = Path(config["out_dir"])
        config = dict(config, recipe=_check_out_dir(out_dir, config))
        datasets = load_datasets(config)
        probe = _transfer_probe(config)  # loaded now, so that bad probe_data stops the run here
        preflight.check_data(config, datasets, probe)  # subgroups, the fixed readouts' folds, the probe's classes
        if probe is not None and (not dist.main or probe.images.nbytes > KEEP_PROBE_BYTES):
            probe = None  # only process 0 probes; a large set is read again then rather than held through training
        # the init weights only matter to a training that starts afresh: a checkpoint replaces them otherwise
        fresh = "train" in config["stages"] and (config.get("retrain") or not (out_dir / "checkpoint.pt").exists())
        classes = {t: len(d.classes) for t, d in datasets.items()}
        model = (build_model(config, classes, load_init=fresh) if network is None else
                 ReadoutNet(network, config["network"], classes, config["image_size"], config.get("readout_layer")))
        model = model.to(dist.device)
        _check_stages(model, config, out_dir)
        resolved = _resolved(config, datasets, model, dist)
        if dist.main:
            _start_run_folder(out_dir, resolved, datasets, dist)
        dist.barrier()
        images = {}
        for group in vggface2.shared_groups(datasets):  # a shared group's images go to the device once
            for t in group:
                images[t] = TaskImages(datasets[t], dist.device, images.get(group[0]))
        images = {t: images[t] for t in datasets}
        if "train" in config["stages"]:
            _train_stage(model, images, config, out_dir, dist)
        # the checkpoint's weights in every process (under DDP each process's batch-norm statistics end on its
        # own last batch): a sweep shared out across processes is the sweep of one
        if "train" not in config["stages"] or ("lesion" in config["stages"] and dist.world > 1):
            dist.barrier()
            model.load_state_dict(load_checkpoint(out_dir / "checkpoint.pt", dist.device)["model"])
        if "lesion" in config["stages"]:
            _lesion_stages(model, images, config, out_dir, dist, probe)
        if not dist.main:
            return
        if "figures" in config["stages"]:
            figures_stage(model, images, config, out_dir)
    finally:
        dist.close()


def _transfer_probe(config: dict):
    """The transfer probe's held-out task when the run probes transfer after its lesion stage, else None."""
    if "lesion" in config["stages"] and "transfer" in (config.get("probes") or []):
        try:
            return load_probe_task(config["probe_data"], "probe", config)
        except DataError as e:  # its path was checked (preflight): what is wrong is inside
            raise UsageError(f"probe_data={config['probe_data']!r}: {e}") from None
    return None


def _check_stages(model: DualTaskNet, config: dict, out_dir: Path) -> None:
    """Stop the run before training on what would stop a later stage: an unknown lesion or Grad-CAM site, a
    damaged file of an earlier sweep, no checkpoint for stages that need one."""
    if "lesion" in config["stages"]:
        sites.select_sites(model, config)  # an unknown lesion site stops the run before training
        if not config.get("retrain"):  # a damaged file of an earlier sweep stops it too (retrain replaces them)
            lesion_utils.earlier_sweep(lesion_utils.sweep_settings(model, config), out_dir)
    if "figures" in config["stages"] and config.get("gradcam_site"):
        sites.get_site(model, config["gradcam_site"])
    if "train" not in config["stages"] and not (out_dir / "checkpoint.pt").exists():
        raise UsageError(f"{out_dir}: no checkpoint.pt to lesion or draw; run the 'train' stage first")


def _resolved(config: dict, datasets: dict, model: DualTaskNet, dist: Dist) -> dict:
    """config.json's contents: the settings, and what the data, the device and the model made of them."""
    return dict(config, tasks={t: {"classes": len(d.classes), "chance": d.chance, "source": d.source,
                                   "counts": d.counts(), "face_crop": d.face_crop}
                               for t, d in datasets.items()},
                resolved_device=str(dist.device), world_size=dist.world,
                **({"readout_layer_used": model.readout} if isinstance(model, ReadoutNet) else dict(
                    lr_per_step=peak_lr(config, dist.world), optimizer_used=optimizer_name(config),
                    weight_decay_used=weight_decay(config))),
                shared_images=[g for g in vggface2.shared_groups(datasets) if len(g) > 1],
                n_lesion_sites=len(sites.lesion_sites(model, config.get("lesion_inner", False))),
                **provenance(dist.device))


def _start_run_folder(out_dir: Path, resolved: dict, datasets: dict, dist: Dist) -> None:
    """Create out_dir (process 0), remove what interrupted writes left in it, write config.json and say what
    the run trains on."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"out_dir={str(out_dir)!r} cannot be created ({e.strerror}); expected a writable "
                         f"folder path")
    for folder in (out_dir, out_dir / "figures", *(out_dir / f for f in names.READOUT_DIRS.values()),
                   *sorted(out_dir.glob("epoch_*"))):
        for name in remove_stale_temporaries(folder):  # only this tool's own (common.temporary_name)
            print(f"removed {folder / name}, left by an interrupted write")
    write_text(out_dir / "config.json", json.dumps(resolved, indent=1))
    summary = ", ".join(f"{t}: {len(d.classes)} classes, {d.counts()['train']} train / "
                        f"{d.counts()['test']} test" for t, d in datasets.items())
    shared = "".join(f"; {' and '.join(g)} on the same images" for g in resolved["shared_images"])
    print(f"{resolved['backbone']} on {dist.device} (x{dist.world}), {resolved['image_size']} px; {summary}{shared}")


def _train_stage(model: DualTaskNet, images: dict, config: dict, out_dir: Path, dist: Dist) -> None:
    """Train (or resume); a training that starts or goes on removes the lesion and probe results of an older
    model first. A network this tool did not train gets its readout heads fitted instead (readout_heads)."""
    if isinstance(model, ReadoutNet):
        if dist.main and (config.get("retrain") or not (out_dir / "checkpoint.pt").exists()):
            _forget_results(out_dir)
        fit_heads(model, images, config, out_dir, dist)
        return
    if dist.main and config["epochs"] > 0 and (config.get("retrain") or not _finished(out_dir, config)):
        _forget_results(out_dir)
    train(model, images, config, out_dir, dist)


def _forget_results(out_dir: Path) -> None:
    """Remove the lesion and probe results of an older model: they no longer hold."""
    for stale in names.SWEEP_FILES.values():
        (out_dir / stale).unlink(missing_ok=True)
        for folder in names.READOUT_DIRS.values():
            (out_dir / folder / stale).unlink(missing_ok=True)
    for stale in ("probes.csv", "probes.json"):
        (out_dir / stale).unlink(missing_ok=True)


def _lesion_stages(model: DualTaskNet, images: dict, config: dict, out_dir: Path, dist: Dist, probe) -> None:
    """The lesion sweep, the readout sweeps and probes asked for, and the sweeps of earlier epochs; every
    process sweeps its share of the sites, process 0 writes. probe: the transfer probe's task, if still held."""
    # the fixed readouts score each lesion in the heads' own pass; their stage writes what that gave
    reuse = {} if config.get("fixed_readout", False) else None
    lesion_utils.lesion_stage(model, images, config, out_dir, dist.rank, dist.world, dist.gather, reuse)
    for kind in ("refit", "fixed"):  # the same lesions through linear readouts (readouts.py), when asked for
        if config.get(f"{kind}_readout", False):
            dist.barrier()  # rankings.json, which process 0 wrote last, is read by every process
            lesion_utils.readout_stage(model, images, config, out_dir, kind, dist.rank, dist.world,
                                       dist.gather, reuse)
    if config.get("probes") and dist.main:
        probes.probe_stage(model, images, config, out_dir,
                           lambda spec, name: probe if probe is not None else load_probe_task(spec, name, config))
    epoch_sweeps(model, images, config, out_dir, dist)


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
    """What made the run, for config.json: the versions of python and of every library that shapes the numbers
    (torch, torchvision, numpy, scikit-learn, scipy, pandas, OpenCV, Pillow), the device, the command line and the
    git commit."""
    import importlib
    import platform
    import subprocess
    from importlib import metadata

    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    def module_version(name):  # OpenCV ships under several distribution names (headless, contrib): ask cv2
        try:
            return importlib.import_module(name).__version__
        except ImportError:
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
                         "scikit-learn": version("scikit-learn"), "scipy": version("scipy"),
                         "pandas": version("pandas"), "opencv": module_version("cv2"), "pillow": version("pillow")},
            "device_name": device_name, "command": [Path(sys.executable).name] + sys.argv, "git_commit": commit}


def _finished(out_dir: Path, config: dict) -> bool:
    ckpt = out_dir / "checkpoint.pt"
    return ckpt.exists() and int(load_checkpoint(ckpt, mmap=True)["epoch"]) >= config["epochs"]
