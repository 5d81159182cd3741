"""What a lesion sweep's results depend on (`sweep_settings`), and what an earlier sweep in the same folder
finished under the same settings (`earlier_sweep`), so that a killed sweep resumes at its first unfinished site
(sweep.py) and a sweep under other settings starts over."""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from dualtask.core.common import UsageError, read_csv, read_json
from dualtask.core.names import SWEEP_FILES
from dualtask.lesion import subgroups
from dualtask.lesion.dissociation import ADDED_LESION_COLUMNS, LESION_COLUMNS, PER_CLASS_COLUMNS, read_per_image
from dualtask.lesion.greedy import GREEDY_BEFORE, GREEDY_DEFAULTS, beyond_greedy_stop, greedy_settings
from dualtask.lesion.rankings import LOCALISER_FDR, MASK_DEFAULTS
from dualtask.model.sites import select_sites
from dualtask.stats import multiple_testing


def sweep_settings(model: nn.Module, config: dict) -> dict:
    """What a sweep's results depend on: a sweep under other settings starts over."""
    settings = {"fractions": sorted({float(f) for f in config["lesion_fractions"]} | {0.0}),
            "methods": list(config.get("lesion_methods", ["activation", "random"])),
            "random_repeats": multiple_testing.random_repeats(config) if "random_repeats" in config else 1,
            "keep_only": bool(config.get("lesion_keep_only", False)), "mode": config.get("lesion_mode", "zero"),
            "rank_images": config.get("rank_images"), "sites": [s.name for s in select_sites(model, config)],
            "seed": config["seed"], "per_class": bool(config.get("lesion_per_class", False))}
    if config.get("match_accuracy"):  # named only when set, so that sweeps made before the setting still resume
        settings["match_accuracy"] = True
    if config.get("ranking_reliability"):
        settings["reliability"] = True
    if "greedy" in settings["methods"]:  # named only for a greedy sweep (an earlier one without them: _as_now)
        settings["greedy"] = greedy_settings(config)
    if "localiser" in settings["methods"]:
        settings["localiser_fdr"] = float(config.get("localiser_fdr", LOCALISER_FDR))
    if "mask" in settings["methods"]:
        settings["mask"] = mask_settings(config)
    if config.get("subgroups"):
        settings["subgroups"] = subgroups.file_settings(config["subgroups"])
    if config.get("ranking_precision", "fp32") != "fp32" and {"loss", "greedy"} & set(settings["methods"]):
        settings["ranking_precision"] = config["ranking_precision"]
    return settings


def mask_settings(config: dict) -> dict:
    """The mask ranking's optimisation (rankings.mask_gates) from a run's settings."""
    return {"steps": int(config.get("mask_steps", MASK_DEFAULTS["steps"])),
            "l1": float(config.get("mask_l1", MASK_DEFAULTS["l1"])), "lr": MASK_DEFAULTS["lr"]}


def as_now(earlier: dict) -> dict:
    """An earlier sweep's settings as this version names them: a greedy sweep from before the greedy settings
    ran the exhaustive greedy ranking, stopping just past 20% (GREEDY_BEFORE)."""
    earlier = dict(earlier)
    if "greedy" in (earlier.get("methods") or []) and "greedy" not in earlier:
        earlier["greedy"] = dict(GREEDY_BEFORE)
    return earlier


def no_earlier_sweep(restart: str | None = None) -> dict:
    """What `earlier_sweep` returns when nothing of an earlier sweep is kept (and why, when there was one)."""
    return {"done": [], "rows": [], "dissociation": [], "per_class": [], "subgroups": [], "rankings": {},
            "per_image": {}, "restart": restart}


# the columns an earlier sweep's files must have (those added since are filled in), and those read as numbers
_EARLIER_COLUMNS = {"results": tuple(c for c in LESION_COLUMNS if c not in ADDED_LESION_COLUMNS),
                    "dissociation": ("layer", "method", "fraction", "index"),
                    "per_class": tuple(c for c in PER_CLASS_COLUMNS if c not in ADDED_LESION_COLUMNS),
                    "subgroups": tuple(c for c in subgroups.SUBGROUP_COLUMNS if c not in ADDED_LESION_COLUMNS)}
_EARLIER_NUMBERS = {"results": ("depth", "n_filters", "fraction", "n_lesioned", "repeat", "accuracy", "loss",
                                "intact_accuracy", "chance"), "dissociation": ("fraction", "index"),
                    "per_class": ("repeat", "fraction", "accuracy", "n_images"),
                    "subgroups": ("repeat", "fraction", "accuracy", "intact_accuracy", "n_images")}


def earlier_sweep(settings: dict, out_dir: Path) -> dict:
    """What an earlier sweep in out_dir finished under the same settings (`sweep_settings`): {'done': site names,
    'rows', 'dissociation', 'per_class': their CSV rows, 'rankings': by site, 'restart': why an earlier sweep is not
    continued, or None}; nothing when there is none or its settings differ. Its files may be damaged or foreign:
    each is checked, and a bad one is a UsageError naming it. Reads only, so the pipeline calls it before it writes
    anything."""
    paths = {k: Path(out_dir) / f for k, f in SWEEP_FILES.items()}
    nothing = no_earlier_sweep()
    if not paths["progress"].exists():
        return nothing
    progress = read_json(paths["progress"], lambda p: isinstance(p, dict) and isinstance(p.get("settings"), dict)
                         and isinstance(p.get("done"), list) and all(isinstance(s, str) for s in p["done"]),
                         "the sweep's progress ({'settings': {...}, 'done': [site names]})")
    if as_now(progress["settings"]) != settings or not paths["results"].exists():
        return dict(nothing, restart=f"lesion settings differ from the earlier sweep's "
                                     f"({paths['progress'].name}): the sweep starts over and replaces its files"
                    if progress["done"] else None)
    done = set(progress["done"])
    if done and not paths["per_image"].exists():
        return dict(nothing, restart=f"{paths['per_image'].name} is missing (the sweep predates it, or it was "
                                     f"removed): the sweep starts over")
    stop = settings.get("greedy", GREEDY_DEFAULTS)["stop"]
    rankings = read_json(paths["rankings"], lambda r: isinstance(r, dict) and all(
        isinstance(v, dict) for v in r.values()), "rankings by site") if done and paths["rankings"].exists() else {}
    per_image = read_per_image(paths["per_image"]) if done and paths["per_image"].exists() else {}
    results = _finished_rows(paths["results"], "results", done, {}, stop)
    n_filters = {r["layer"]: r["n_filters"] for r in results}  # by site: what an earlier file's dissociation rows need
    earlier = {"done": [s for s in settings["sites"] if s in done], "rows": results,
               "dissociation": _finished_rows(paths["dissociation"], "dissociation", done, n_filters, stop),
               "per_class": _finished_rows(paths["per_class"], "per_class", done, n_filters, stop),
               "subgroups": _finished_rows(paths["subgroups"], "subgroups", done, n_filters, stop),
               "rankings": {k: v for k, v in rankings.items() if k in done},
               "per_image": {k: v for k, v in per_image.items() if k.split("|")[0] in done | {"intact"}},
               "restart": None}
    if done - set(earlier["rankings"]) or done - {r["layer"] for r in earlier["rows"]}:
        return dict(nothing, restart=f"{paths['progress'].name} lists sites whose results or rankings are "
                                     f"missing: the sweep starts over")
    return earlier


def _finished_rows(path: Path, key: str, done: set, n_filters: dict, stop: float) -> list:
    """The rows of the finished sites `done` in an earlier sweep's file (`key`: which of SWEEP_FILES), which must
    be as this tool wrote it; beyond_greedy_stop filled in where the file predates the column (`n_filters`: by
    site, where the rows lack it; `stop`: the greedy stop fraction)."""
    if not done or not path.exists():
        return []
    rows = [r for r in read_csv(path, _EARLIER_COLUMNS[key], _EARLIER_NUMBERS[key]) if r["layer"] in done]
    for r in rows if key in ("results", "dissociation") else []:  # a column added since the file was written
        n = r.get("n_filters") or n_filters.get(r["layer"])  # None: its site lacks results (restarted below)
        if r.get("beyond_greedy_stop") in (None, "") and n is not None:
            try:
                r["beyond_greedy_stop"] = beyond_greedy_stop(r["method"], float(r["fraction"]), int(n), stop)
            except ValueError:
                raise UsageError(f"{path}: damaged (a row's fraction or n_filters is not a number); "
                                 f"move it away and run again to write it anew") from None
    return rows
