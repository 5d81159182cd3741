"""Accuracy per subgroup of test images under every lesion (the reference study's `--subgroups_file`, e.g. by race).

The `subgroups` setting names a CSV with the columns task, image and group: `image` is an image's position among
its task's test images (0-based, the order of lesion_per_image.npz and of every per-image file of a run), `group`
any label. An image may be listed once per task; images not listed belong to no group. The sweep then writes
lesion_subgroups.csv: per site, lesion and group, the group's accuracy and its number of images, beside the
intact network's accuracy on the same images.
"""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np

from dualtask.core.common import UsageError

SUBGROUP_COLUMNS = ("layer", "method", "target", "repeat", "fraction", "eval_task", "group", "accuracy",
                    "intact_accuracy", "n_images", "read_by")  # read_by: as lesion_results.csv's
FORM = ("a CSV file with a header row task,image,group: the task's name, the image's position among that task's "
        "test images (0-based) and its group's name, one row per image")


def file_settings(path) -> dict:
    """What a sweep's subgroup results depend on: the file and a hash of its contents."""
    p = Path(path).expanduser()
    try:
        return {"file": str(p.resolve()), "sha1": hashlib.sha1(p.read_bytes()).hexdigest()}
    except OSError as e:
        raise UsageError(f"subgroups={str(path)!r}: cannot be read ({e.strerror}); expected {FORM}") from None


def read_groups(path, n_test: dict) -> dict:
    """{task: {group: sorted image positions}} of a subgroups file, checked against each task's number of test
    images; a bad file is a UsageError naming it, the row and the expected form."""
    p = Path(path).expanduser()
    where = f"subgroups={str(path)!r}"
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's "CSV UTF-8" starts with a BOM
            rows = list(csv.DictReader(f))
            header = set(rows[0]) if rows else set()
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"{where}: cannot be read ({getattr(e, 'strerror', None) or e}); expected {FORM}") from None
    if not rows or not {"task", "image", "group"} <= header:
        found = "no rows" if not rows else "columns " + ", ".join(sorted(header))
        raise UsageError(f"{where}: {found}; expected {FORM}")
    groups, seen = {}, set()
    for line, row in enumerate(rows, start=2):
        task, image, group = ((row.get(k) or "").strip() for k in ("task", "image", "group"))
        if task not in n_test:
            raise UsageError(f"{where}, line {line}: task {task!r} is not one of the run's tasks "
                             f"({', '.join(n_test)}); expected {FORM}")
        if not (image.isascii() and image.isdigit()) or int(image) >= n_test[task]:  # not '²', which int() refuses
            raise UsageError(f"{where}, line {line}: image {image!r} is not a position among {task}'s "
                             f"{n_test[task]} test images (0 to {n_test[task] - 1}); expected {FORM}")
        if not group:
            raise UsageError(f"{where}, line {line}: no group name; expected {FORM}")
        if (task, int(image)) in seen:
            raise UsageError(f"{where}, line {line}: {task} image {image} is listed twice; expected {FORM}")
        seen.add((task, int(image)))
        groups.setdefault(task, {}).setdefault(group, []).append(int(image))
    return {t: {g: np.array(sorted(i), dtype=np.int64) for g, i in per.items()} for t, per in groups.items()}


def subgroup_rows(site, method: str, target: str, repeat: int, fraction: str, res: dict, intact: dict,
                  groups: dict, read_by: str = "heads") -> list:
    """lesion_subgroups.csv's rows of one lesion (res: evaluate_lesions' result of it; fraction: its key)."""
    rows = []
    for task, per_group in groups.items():
        for group, idx in per_group.items():
            hit, base = res[task]["correct"][idx], intact[task]["correct"][idx]
            rows.append({"layer": site.name, "method": method, "target": target, "repeat": repeat,
                         "fraction": fraction, "eval_task": task, "group": group,
                         "accuracy": f"{hit.mean():.4f}", "intact_accuracy": f"{base.mean():.4f}",
                         "n_images": len(idx), "read_by": read_by})
    return rows
