"""The branching-point experiment: what sharing the trunk up to a depth costs each task.

    python ResNet.py --branch_points="[None, 4, 8, 12]" --seeds="[0, 1]"

An experiment with `branch_points` trains one network per branch point and seed (branch_at, branches.py: the
trunk shared up to that lesion site, one copy of the rest per task; None = fully shared). The reference study's
code (sdnn, VGG16Split) and Kell et al. 2018 found that sharing late layers costs accuracy and sharing early
layers little. This module writes branching.csv (per branch point, seed and task: test accuracy with its 95%
Wilson interval, and the network's parameter count), its figure, and the sentences of the experiment report.
Single-task networks (the single_task control) are the fully separate end of that line: 0 sites shared.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from dualtask.config.settings import is_task_data
from dualtask.experiment import pipeline as dualtask
from dualtask.model import network
from dualtask.model import sites as sites_mod
from dualtask.report import build as report
from dualtask.report import figures
from dualtask.training import trainer

BRANCHING_COLUMNS = ("branch_point", "shared_sites", "seed", "task", "accuracy", "ci_low", "ci_high", "correct",
                     "n_images", "chance", "parameters", "folder")
SEPARATE = "separate"  # the single-task networks: no site shared


def label(branch_at) -> str:
    """A branch point as written in branching.csv and in folder names: 'shared' (None), a depth or a path."""
    return "shared" if branch_at is None else str(branch_at)


def shared_sites(model: network.DualTaskNet) -> int:
    """How many lesion sites all tasks share: every site of a fully shared network, or those up to the branch
    point."""
    sites = sites_mod.lesion_sites(model)
    if model.branch_site is None:
        return len(sites)
    return next(s.depth for s in sites if s.name == model.branch_site) + 1


def _test_correct(model, config: dict, cache: dict) -> dict:
    """{task: (correct, n, chance)} of a run's network on its tasks' test images (the data loaded once per set of
    data settings and seed, which is what the runs of one experiment share)."""
    key = repr(sorted((k, v) for k, v in config.items() if is_task_data(k) or k in (
        "tasks", "seed", "image_size", "max_per_class", "max_classes", "demo_per_class", "role", "single_task",
        "kdef_views", "face_crop", "lfw_crop")))
    if key not in cache:
        datasets = dualtask.load_datasets(config)
        cache[key] = {t: trainer.TaskImages(d, torch.device("cpu")) for t, d in datasets.items()}
    images = cache[key]
    with torch.inference_mode():
        result = trainer.evaluate(model, images, "test")
    return {t: (round(r["accuracy"] * r["n"]), r["n"], images[t].data.chance) for t, r in result.items()}


def _row(point, shared, seed, task, correct, n, chance, parameters, folder) -> dict:
    low, high = report.wilson(correct / max(n, 1), n)
    return {"branch_point": point, "shared_sites": shared, "seed": seed, "task": task,
            "accuracy": f"{correct / max(n, 1):.4f}", "ci_low": f"{low:.4f}", "ci_high": f"{high:.4f}",
            "correct": correct, "n_images": n, "chance": f"{chance:.4f}", "parameters": parameters, "folder": folder}


def branching_rows(out: Path, runs: list) -> list:
    """branching.csv's rows: every real-task run (each branch point, the fully shared one included) and the
    single-task networks of the same seeds (branch point 'separate')."""
    rows, cache = [], {}
    for run in [r for r in runs if r["role"] == "real"]:
        model, config = dualtask.load_run(out / run["folder"])
        parameters = sum(p.numel() for p in model.parameters())
        shared = shared_sites(model)
        for task, (correct, n, chance) in _test_correct(model, config, cache).items():
            rows.append(_row(label(config.get("branch_at")), shared, run["seed"], task, correct, n, chance,
                             parameters, run["folder"]))
    singles = [r for r in runs if r["role"] == "single_task"]
    for seed in sorted({r["seed"] for r in singles}):
        mine = [r for r in singles if r["seed"] == seed]
        loaded = [(r, *dualtask.load_run(out / r["folder"])) for r in mine]
        parameters = sum(p.numel() for _, model, _ in loaded for p in model.parameters())
        for run, model, config in loaded:
            correct, n, chance = _test_correct(model, config, cache)[run["task"]]
            rows.append(_row(SEPARATE, 0, seed, run["task"], correct, n, chance, parameters, run["folder"]))
    return sorted(rows, key=lambda r: (-int(r["shared_sites"]), int(r["seed"]), r["task"]))


def pooled(rows: list) -> dict:
    """{(branch point, task): (accuracy, correct, n, shared sites)} over the seeds."""
    out = {}
    for r in rows:
        key = (r["branch_point"], r["task"])
        acc, correct, n, shared = out.get(key, (0.0, 0, 0, int(r["shared_sites"])))
        correct, n = correct + int(r["correct"]), n + int(r["n_images"])
        out[key] = (correct / max(n, 1), correct, n, shared)
    return out


def costs(rows: list) -> list:
    """Per branch point and task: the accuracy it costs against the least-shared network of the experiment (the
    single-task networks when they ran), pooled over seeds, with a 95% interval (normal approximation for the
    difference of two proportions over test images; seeds are not resampled). [(point, task, shared sites,
    cost, low, high, reference)], most shared first."""
    pools = pooled(rows)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    out = []
    for task in tasks:
        points = sorted([(p, v) for (p, t), v in pools.items() if t == task], key=lambda pv: pv[1][3])
        if len(points) < 2:
            continue
        reference, (ref_acc, _, ref_n, _) = points[0]
        for point, (acc, _, n, shared) in points[1:]:
            cost = ref_acc - acc
            se = math.sqrt(ref_acc * (1 - ref_acc) / max(ref_n, 1) + acc * (1 - acc) / max(n, 1))
            out.append((point, task, shared, cost, cost - 1.96 * se, cost + 1.96 * se, reference))
    return sorted(out, key=lambda c: (-c[2], c[1]))


def sentences(rows: list) -> list:
    """The experiment report's reading of branching.csv, one sentence per branch point and task."""
    said = []
    for point, task, shared, cost, low, high, reference in costs(rows):
        where = "the whole trunk" if point == "shared" else f"the trunk up to depth {point} ({shared} sites)"
        against = "separate single-task networks" if reference == SEPARATE else (
            f"the network branched at {reference}" if reference != "shared" else "the fully shared network")
        said.append(f"Sharing {where} costs the {task} task {100 * cost:.1f} points [95% CI {100 * low:.1f}, "
                    f"{100 * high:.1f}] of test accuracy against {against}.")
    return said


def figure(rows: list, path: Path) -> Path | None:
    """Accuracy against the number of shared sites, one line per task, 95% Wilson intervals (seeds pooled)."""
    if not rows:
        return None
    points = []
    for (point, task), (acc, correct, n, shared) in pooled(rows).items():
        low, high = report.wilson(acc, n)
        points.append({"branch_point": point, "task": task, "shared_sites": shared, "accuracy": acc,
                       "ci_low": low, "ci_high": high, "chance": float(np.mean(
                           [float(r["chance"]) for r in rows if r["task"] == task]))})
    return figures.branching_figure(points, path)
