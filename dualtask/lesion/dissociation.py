"""From lesions to numbers: the lesion conditions of a site, the rows of lesion_results.csv, the double
dissociation index with its bootstrap interval and its p-value against the closed ring of lesions
(multiple_testing.pair_null), accuracy-matched subsets, and the per-image results file."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dualtask.core.common import UsageError, atomic_write
from dualtask.lesion.greedy import GREEDY_DEFAULTS, beyond_greedy_stop
from dualtask.lesion.rankings import NOT_RANKINGS
from dualtask.model.sites import Site
from dualtask.stats import multiple_testing


def corrected_drop(intact: float, lesioned: float, chance: float) -> float:
    """(intact - lesioned) / (intact - chance): 0 = no effect, 1 = down to chance."""
    return (intact - lesioned) / (intact - chance) if intact - chance > 1e-9 else float("nan")


def _fraction_key(f) -> str:
    return f"{float(f):.4f}"


# the matched_ columns are filled when match_accuracy is set: the same lesions on the accuracy-matched test images
LESION_COLUMNS = ("layer", "depth", "n_filters", "target", "method", "fraction", "n_lesioned", "repeat",
                  "eval_task", "accuracy", "loss", "intact_accuracy", "chance", "intact_loss", "n_images",
                  "corrected_drop", "matched_accuracy", "matched_intact_accuracy", "matched_n_images",
                  "beyond_greedy_stop", "read_by")
# beyond_greedy_stop: 1 on a greedy lesion silencing filters past those the greedy steps chose (just past
# greedy_stop of the site): they follow in the order of the last step's scores; 0 on every other row
# read_by: what read the accuracies, HEADS (the network's own output layers) or a readout kind's name
# (common.READOUT_NAMES: "fixed readouts", "refitted readouts"); a file written before the column is filled in
# an earlier sweep's files may lack these: they are filled in. p_corrected, correction: p_index corrected for every
# site x ranking of the row's family at its fraction, and how (multiple_testing.corrected_rows; family: "verdict"
# for the rankings that decide the verdict, "description" for the others); written once the sweep's last
# site is done, computed by the report where absent; index_null: "ring" where p_index, null_low and null_high come
# from the closed ring of lesions (multiple_testing.pair_null), absent in a sweep made before it (the report then
# makes them again from lesion_results.csv's drops)
ADDED_LESION_COLUMNS = ("beyond_greedy_stop", "p_corrected", "correction", "family", "index_null", "read_by")
DISSOCIATION_COLUMNS = ("layer", "depth", "method", "fraction", "task_a", "task_b", "index", "ci_low", "ci_high",
                        "p_index", "p_corrected", "correction", "family", "index_null", "drop_a_by_a", "drop_a_by_b",
                        "drop_b_by_b", "drop_b_by_a", "p_a_by_a", "p_b_by_b", "random_drop_a", "random_drop_b",
                        "n_random", "null_low", "null_high", "matched_index", "matched_ci_low", "matched_ci_high",
                        "matched_p_index", "beyond_greedy_stop")
PER_CLASS_COLUMNS = ("layer", "method", "target", "repeat", "fraction", "eval_task", "class", "accuracy",
                     "n_images", "read_by")
HEADS = "heads"  # read_by of accuracies read by the network's own output layers


def lesion_conditions(site: Site, rankings: dict, fractions, keep_only: bool = False) -> list:
    """[(method, target, repeat, fraction, silenced channels)] for every ranking and fraction > 0.
    keep_only silences every filter except the selected ones."""
    conditions = []
    for method, per_target in rankings.items():
        if method in NOT_RANKINGS:
            continue
        for target, entry in per_target.items():
            repeat = int(target.split("_")[1]) if method == "random" else 0
            name = "random" if method == "random" else target
            for f in fractions:
                if f <= 0:
                    continue
                conditions.append((method, name, repeat, float(f),
                                   _chosen(entry["order"], int(round(f * site.n_filters)), site, keep_only)))
    return conditions + _selective_set_conditions(site, rankings, fractions, keep_only)


def _chosen(order, k: int, site: Site, keep_only: bool) -> np.ndarray:
    chosen = np.asarray(order[:k], dtype=np.int64)
    return np.setdiff1d(np.arange(site.n_filters), chosen) if keep_only else chosen


def _selective_set_conditions(site: Site, rankings: dict, fractions, keep_only: bool) -> list:
    """The localiser's selective set of each task (its first n_selective filters), exactly, and every random
    order's first filters of the same number: the lesions at a fraction of n_selective / n_filters, where no
    fraction asked gives that number already."""
    asked = {int(round(f * site.n_filters)) for f in fractions if f > 0}
    sizes = {}
    for target, entry in rankings.get("localiser", {}).items():
        k = int(entry.get("n_selective", 0))
        if 0 < k and k not in asked:
            sizes.setdefault(k, []).append((target, entry))
    conditions = []
    for k, targets in sorted(sizes.items()):
        f = k / site.n_filters
        conditions += [("localiser", target, 0, f, _chosen(entry["order"], k, site, keep_only))
                       for target, entry in targets]
        conditions += [("random", "random", int(name.split("_")[1]), f, _chosen(entry["order"], k, site, keep_only))
                       for name, entry in rankings.get("random", {}).items()]
    return conditions


# the index's null: the other pairs of the closed ring (targeted a, targeted b, random order 1, ..., R), R + 1 indices
random_pair_indices = multiple_testing.pair_null


def dissociation_rows(site: Site, conditions: list, results: list, intact: dict, chance: dict, tasks: list,
                      n_boot: int = 1000, seed: int = 0, paired: bool = False,
                      greedy_stop: float | None = None) -> list:
    """Per method and fraction: the double-dissociation index
    [drop_a(a-filters) - drop_a(b-filters)] + [drop_b(b-filters) - drop_b(a-filters)] of chance-corrected
    accuracy drops, its 95% bootstrap interval over test images, and where random lesions of the same size
    place it (empirical p-values: the targeted lesion's own-task drop against the random lesions' drops, and
    the index against the other pairs of a closed ring of the two targeted and the random lesions,
    `random_pair_indices`, whose range is null_low to null_high).

    paired: the two tasks are scored on the same test images, in the same order (tasks that share their images):
    each bootstrap resample then draws the same images for both, keeping the correlation of an image's two
    outcomes in the interval. beyond_greedy_stop marks a greedy row whose sets hold filters past those the greedy
    steps chose (`greedy_stop`: the ranking's stop fraction; None = GREEDY_DEFAULTS')."""
    if len(tasks) < 2:
        return []
    greedy_stop = GREEDY_DEFAULTS["stop"] if greedy_stop is None else greedy_stop
    a, b = tasks[:2]
    rng = np.random.default_rng([seed, site.depth, 99])
    samples = {t: rng.integers(0, len(intact[t]["correct"]), (n_boot, len(intact[t]["correct"]))) for t in (a, b)}
    if paired and len(intact[a]["correct"]) == len(intact[b]["correct"]):
        samples[b] = samples[a]
    base = {t: intact[t]["correct"].mean() for t in (a, b)}
    boot_base = {t: intact[t]["correct"][samples[t]].mean(1) for t in (a, b)}
    by_key = {(m, tg, r, f): res for (m, tg, r, f, _), res in zip(conditions, results)}
    fractions = sorted({f for _, _, _, f, _ in conditions})
    repeats = sorted({r for m, _, r, _, _ in conditions if m == "random"})

    def drop(correct, t):
        return corrected_drop(base[t], correct.mean(), chance[t])

    def boot_drop(correct, t):  # undefined (NaN) in a resample whose intact accuracy is at or below chance
        above = boot_base[t] - chance[t]
        return np.where(above > 1e-9, (boot_base[t] - correct[samples[t]].mean(1)) / np.where(above > 1e-9, above, 1),
                        np.nan)

    rows = []
    for method in [m for m in dict.fromkeys(m for m, *_ in conditions) if m != "random"]:
        for f in fractions:
            res_a, res_b = by_key.get((method, a, 0, f)), by_key.get((method, b, 0, f))
            if res_a is None or res_b is None:
                continue
            rand = [by_key[("random", "random", r, f)] for r in repeats if ("random", "random", r, f) in by_key]
            row = {"layer": site.name, "depth": site.depth, "method": method, "fraction": _fraction_key(f),
                   "task_a": a, "task_b": b}
            rows.append({**row, **_index_columns(a, b, res_a, res_b, rand, drop, boot_drop),
                         "beyond_greedy_stop": beyond_greedy_stop(method, f, site.n_filters, greedy_stop)})
    return rows


def _index_columns(a: str, b: str, res_a: dict, res_b: dict, rand: list, drop, boot_drop) -> dict:
    """The index columns of one dissociation row: the index of the lesions of a's filters (`res_a`) and of b's
    (`res_b`), its bootstrap interval, its own-task drops and where the random lesions `rand` of the same size
    place them. `drop(correct, task)` is a chance-corrected drop, `boot_drop` the same in each resample."""
    d = {(e, t): drop(r[e]["correct"], e) for t, r in ((a, res_a), (b, res_b)) for e in (a, b)}
    index = d[a, a] - d[a, b] + d[b, b] - d[b, a]
    boot = (boot_drop(res_a[a]["correct"], a) - boot_drop(res_b[a]["correct"], a) +
            boot_drop(res_b[b]["correct"], b) - boot_drop(res_a[b]["correct"], b))
    rand_drop = {e: np.array([drop(r[e]["correct"], e) for r in rand]) for e in (a, b)}
    null = random_pair_indices(rand_drop[a], rand_drop[b], (d[a, a], d[b, a]), (d[a, b], d[b, b]))
    return {
        "index": f"{index:.4f}",
        "ci_low": f"{_interval(boot, index)[0]:.4f}", "ci_high": f"{_interval(boot, index)[1]:.4f}",
        "p_index": f"{_p_value(index, null):.4f}", "drop_a_by_a": f"{d[a, a]:.4f}",
        "drop_a_by_b": f"{d[a, b]:.4f}", "drop_b_by_b": f"{d[b, b]:.4f}", "drop_b_by_a": f"{d[b, a]:.4f}",
        "p_a_by_a": f"{_p_value(d[a, a], rand_drop[a]):.4f}",
        "p_b_by_b": f"{_p_value(d[b, b], rand_drop[b]):.4f}",
        "random_drop_a": f"{rand_drop[a].mean() if len(rand) else float('nan'):.4f}",
        "random_drop_b": f"{rand_drop[b].mean() if len(rand) else float('nan'):.4f}", "n_random": len(rand),
        "null_low": f"{np.min(null) if len(null) else float('nan'):.4f}",
        "null_high": f"{np.max(null) if len(null) else float('nan'):.4f}",
        "index_null": multiple_testing.RING if len(null) else "",
    }


def _interval(boot, value):
    """95% bootstrap interval; none when the index itself or most resamples are undefined."""
    if not np.isfinite(value) or np.isfinite(boot).mean() < 0.95:
        return float("nan"), float("nan")
    return float(np.nanpercentile(boot, 2.5)), float(np.nanpercentile(boot, 97.5))


def _p_value(value, null):
    """Empirical p of `value` against the `null` draws; undefined where the value or a null draw is (a head at
    chance)."""
    null = np.asarray(null, dtype=float)
    if not len(null) or not np.isfinite(value) or not np.isfinite(null).all():
        return float("nan")
    return multiple_testing.empirical_p(null, value)


def matched_subsets(correct: dict, seed: int = 0) -> dict:
    """{task: test image indices} on which every task's intact accuracy is the same: the performance matching
    of Dobs et al. 2022. A task above the lowest accuracy keeps all its misclassified images and a seeded random
    sample of its correctly classified ones, as many as bring its accuracy down to the lowest (equal to within
    one image); the task at the lowest keeps all its images."""
    acc = {t: float(np.mean(c)) for t, c in correct.items()}
    low = min(acc.values())
    if any(a > low and a >= 1.0 for a in acc.values()):  # no misclassified image to keep: it cannot come down
        return None
    rng = np.random.default_rng([seed, 17])
    subsets = {}
    for t, c in correct.items():
        c = np.asarray(c, dtype=bool)
        if acc[t] - low < 1e-12 or low >= 1.0:
            subsets[t] = np.arange(len(c))
            continue
        wrong, right = np.flatnonzero(~c), np.flatnonzero(c)
        n_right = min(len(right), int(round(low * len(wrong) / (1 - low))))
        subsets[t] = np.sort(np.concatenate([wrong, rng.choice(right, n_right, replace=False)]))
    return subsets


def restrict(per_image: dict, subsets: dict) -> dict:
    return {t: {k: v[subsets[t]] for k, v in r.items()} for t, r in per_image.items()}


def per_image_key(site: str, method: str, target: str, fraction, eval_task: str) -> str:
    """The key of one targeted lesion's per-image outcomes in lesion_per_image.npz ('intact|<task>' for none)."""
    return f"{site}|{method}|{target}|{_fraction_key(fraction)}|{eval_task}"


def per_image_arrays(site: Site, conditions: list, results: list, tasks: list) -> dict:
    """The per-image correctness of a site's targeted lesions (random orders left out), for statistics across
    runs that resample test images (the experiment's hierarchical bootstrap)."""
    return {per_image_key(site.name, m, tg, f, e): np.asarray(res[e]["correct"], dtype=bool)
            for (m, tg, _, f, _), res in zip(conditions, results) if m != "random" for e in tasks}


def write_per_image(path: Path, arrays: dict) -> None:
    def write(p):
        with open(p, "wb") as f:  # a file object: np.savez would add .npz to the temporary's name
            np.savez_compressed(f, **arrays)

    atomic_write(path, write)


def read_per_image(path: Path) -> dict:
    """{key: bool array} of lesion_per_image.npz; a damaged file is a UsageError naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k].astype(bool) for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise UsageError(f"{path}: not a readable per-image results file ({e}); rerun the lesion stage "
                         f"(--retrain=True --stages=\"['lesion']\")") from None


def result_rows(site, method, target, repeat, f, n_silenced, res, summary, chance, tasks, matched=None,
                 intact=None, beyond=0, read_by=HEADS):
    rows = []
    for e in tasks:
        acc, loss = float(res[e]["correct"].mean()), float(res[e]["loss"].mean())
        extra = {}
        if matched is not None:
            sub = matched[e]
            extra = {"matched_accuracy": f"{res[e]['correct'][sub].mean():.4f}",
                     "matched_intact_accuracy": f"{intact[e]['correct'][sub].mean():.4f}",
                     "matched_n_images": len(sub)}
        rows.append({
            "layer": site.name, "depth": site.depth, "n_filters": site.n_filters, "target": target,
            "method": method, "fraction": _fraction_key(f), "n_lesioned": n_silenced, "repeat": repeat,
            "eval_task": e, "accuracy": f"{acc:.4f}", "loss": f"{loss:.4f}",
            "intact_accuracy": f"{summary[e]['accuracy']:.4f}", "chance": f"{chance[e]:.4f}",
            "intact_loss": f"{summary[e]['loss']:.4f}", "n_images": len(res[e]["correct"]),
            "corrected_drop": f"{corrected_drop(summary[e]['accuracy'], acc, chance[e]):.4f}", **extra,
            "beyond_greedy_stop": int(beyond), "read_by": read_by,
        })
    return rows


def per_class_rows(site, method, target, repeat, f, res, labels, classes, read_by=HEADS):
    rows = []
    for e, names in classes.items():
        for k, name in enumerate(names):
            hit = res[e]["correct"][labels[e] == k]
            rows.append({"layer": site.name, "method": method, "target": target, "repeat": repeat,
                         "fraction": _fraction_key(f), "eval_task": e, "class": name,
                         "accuracy": f"{hit.mean() if len(hit) else float('nan'):.4f}", "n_images": len(hit),
                         "read_by": read_by})
    return rows


def per_image_summary(per_image: dict) -> dict:
    return {"accuracy": float(per_image["correct"].mean()), "loss": float(per_image["loss"].mean()),
            "n": int(len(per_image["correct"]))}
