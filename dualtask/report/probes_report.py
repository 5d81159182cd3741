"""What the report says of probes.csv (analysis/probes.py): the inversion effect of each task, intact and under
the sweep's lesions, and the held-out task's transfer probe, each in a sentence."""
from __future__ import annotations

from pathlib import Path

from dualtask.core.common import number as _num
from dualtask.core.common import read_csv, read_json
from dualtask.stats.multiple_testing import ALPHA

PROBES_FILE, PROBES_SETTINGS = "probes.csv", "probes.json"  # the rows, and what they were made under (last)
PROBE_COLUMNS = ("probe", "task", "layer", "depth", "method", "target", "repeat", "fraction", "accuracy",
                 "inverted_accuracy", "effect", "effect_low", "effect_high", "n_images", "p_vs_random", "read_by")
# read_by: what read the accuracies: "heads" (inversion: the network's own output layers) or "linear probe" (transfer)
ADDED_PROBE_COLUMNS = ("read_by",)  # columns added since probes.csv was first written: an earlier file lacks them
NUMBER_COLUMNS = ("depth", "repeat", "fraction", "accuracy", "inverted_accuracy", "effect", "effect_low",
                  "effect_high", "n_images", "p_vs_random")


def read_rows(run_dir, n_rows: int | None = None) -> list:
    """probes.csv's rows, checked as they are read: every column, numbers where numbers belong, and as many rows
    as `n_rows`, else as its settings file (probes.json) records; a damaged file is a UsageError naming it."""
    run_dir = Path(run_dir)
    if n_rows is None and (run_dir / PROBES_SETTINGS).exists():
        recorded = read_json(run_dir / PROBES_SETTINGS, lambda d: isinstance(d, dict), "the probes' settings")
        n_rows = recorded.get("rows") if isinstance(recorded.get("rows"), int) else None
    columns = tuple(c for c in PROBE_COLUMNS if c not in ADDED_PROBE_COLUMNS)
    return read_csv(run_dir / PROBES_FILE, columns, NUMBER_COLUMNS, n_rows)


def _targeted(rows: list) -> dict:
    """{(method, target): [rows of the swept sites]} of the lesions that are not random."""
    out = {}
    for r in rows:
        if r["layer"] and r["method"] not in ("random", "intact"):
            out.setdefault((r["method"], r["target"]), []).append(r)
    return out


def _beyond(rows: list) -> str:
    hits = [r["layer"] for r in rows if _num(r.get("p_vs_random")) < ALPHA]
    return (f"beyond every random lesion's at {len(hits)} of {len(rows)} sites ({', '.join(hits[:4])}"
            f"{' and more' if len(hits) > 4 else ''})" if hits else f"at no site beyond the random lesions "
            f"({len(rows)} sites)")


def inversion_sentence(rows: list) -> str:
    rows = [r for r in rows if r["probe"] == "inversion"]
    if not rows:
        return ""
    parts = []
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        intact = next((r for r in mine if r["method"] == "intact"), None)
        if intact is None:
            continue
        text = (f"{task}: {_num(intact['effect']):.3f} [{_num(intact['effect_low']):.3f}, "
                f"{_num(intact['effect_high']):.3f}] (upright {_num(intact['accuracy']):.3f}, inverted "
                f"{_num(intact['inverted_accuracy']):.3f}, {intact['n_images']} images)")
        targeted = _targeted(mine)
        shrink = [f"{target} filters ({method}) shrink it {_beyond(site_rows)}"
                  for (method, target), site_rows in targeted.items()
                  if any(_num(r.get("p_vs_random")) < ALPHA for r in site_rows)]
        if targeted and not shrink:
            shrink = [f"no ranking's lesion shrinks it beyond the random lesions at any of "
                      f"{len(next(iter(targeted.values())))} sites"]
        parts.append(text + ("; " + "; ".join(shrink) if shrink else ""))
    fraction = next((r["fraction"] for r in rows if r["layer"]), None)
    return ("Inversion effect (upright minus upside-down test accuracy on the same images, 95% bootstrap interval"
            + (f"; lesions of {_num(fraction):.0%} of a site's filters, p uncorrected, the smallest 1/(R+1)" if fraction
               else "") + "): " + ". ".join(parts) + ". A face-specialised part should carry the face task's "
            "inversion effect: its lesion shrinks that effect more than random lesions do.")


def transfer_sentence(rows: list) -> str:
    rows = [r for r in rows if r["probe"] == "transfer"]
    intact = next((r for r in rows if r["method"] == "intact"), None)
    if intact is None:
        return ""
    base = _num(intact["accuracy"])
    losses = []
    for (method, target), site_rows in _targeted(rows).items():
        mean = sum(base - _num(r["accuracy"]) for r in site_rows) / len(site_rows)
        losses.append((mean, f"{target} filters ({method}): mean loss {mean:.3f}, {_beyond(site_rows)}"))
    losses.sort(key=lambda x: -x[0])
    beyond = any(_num(r.get("p_vs_random")) < ALPHA for site_rows in _targeted(rows).values() for r in site_rows)
    most = losses[0][1].split(":")[0] if losses and beyond else ""
    return (f"Transfer to a held-out task ({intact['task']}): a linear probe on the intact trunk features scores "
            f"{base:.3f} on its {intact['n_images']} test images. Under the lesions, " + "; ".join(t for _, t in losses)
            + (f". The new task loses most with the {most}." if most else
               ". No lesion costs it more than random lesions do at any site, so which task's filters it leans on is "
               "not shown."))
