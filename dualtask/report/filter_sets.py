"""What the report reads of the localiser's selective sets and the learned masks' open sets (rankings.py's
`localiser` and `mask_gates`): per site, how many filters each task's set holds, what silencing the selective set
costs each task against random sets of the same size, its overlap with a lesion ranking's top set against chance,
and the overlap of the two tasks' open sets (Jaccard) against random sets of the same sizes."""
from __future__ import annotations

import numpy as np

from dualtask.core.common import number as _num
from dualtask.stats.multiple_testing import empirical_p

TOP_RANKINGS = ("loss", "greedy", "taylor", "activation")  # the ranking a selective set is set beside, by preference


def _drops(results: list, layer: str, method: str, target: str, k: int) -> dict:
    """{eval task: [corrected drops]} of a site's lesions of k filters by one method and target."""
    out = {}
    for r in results:
        if r["layer"] == layer and r["method"] == method and r["target"] == target and int(r["n_lesioned"]) == k:
            out.setdefault(r["eval_task"], []).append(_num(r["corrected_drop"]))
    return out


def localiser_rows(rankings: dict, results: list) -> list:
    """Per site and task: its selective set (n_selective of n_filters at the FDR), the chance-corrected drop of
    each task when it is silenced, the random sets' mean drop and the share of them costing the task at least as
    much (p, (1 + #) / (R + 1)), and its overlap with another ranking's top set of the same size (and chance's)."""
    rows = []
    for layer, ranking in rankings.items():
        for task, entry in ranking.get("localiser", {}).items():
            k, n = int(entry["n_selective"]), len(entry["order"])
            row = {"layer": layer, "task": task, "n_selective": k, "n_filters": n, "fdr": entry.get("fdr")}
            if k:
                own = _drops(results, layer, "localiser", task, k)
                rand = _drops(results, layer, "random", "random", k)
                for e, d in own.items():
                    row[f"drop_{e}"] = d[0]
                    null = np.asarray(rand.get(e, []), dtype=float)
                    row[f"random_drop_{e}"] = float(null.mean()) if len(null) else float("nan")
                    row[f"p_{e}"] = empirical_p(null, d[0]) if len(null) else float("nan")
                other = next((m for m in TOP_RANKINGS if task in ranking.get(m, {})), None)
                if other:
                    shared = len(set(entry["order"][:k]) & set(ranking[other][task]["order"][:k]))
                    row.update(compared_with=other, shared=shared,
                               shared_by_chance=k * k / n)
            rows.append(row)
    return rows


def mask_rows(rankings: dict, draws: int = 2000, seed: int = 0) -> list:
    """Per site: each task's open set (gates above 0.5), the Jaccard overlap of the first two tasks' open sets, and
    the 95% range and mean of the Jaccard of random sets of the same sizes (`draws` seeded draws)."""
    rows = []
    for layer, ranking in rankings.items():
        masks = ranking.get("mask", {})
        if len(masks) < 2:
            continue
        (a, ea), (b, eb) = list(masks.items())[:2]
        open_a = set(np.flatnonzero(np.asarray(ea["by_channel"]) > 0.5).tolist())
        open_b = set(np.flatnonzero(np.asarray(eb["by_channel"]) > 0.5).tolist())
        n = len(ea["order"])
        union = open_a | open_b
        jaccard = len(open_a & open_b) / len(union) if union else float("nan")
        rng = np.random.default_rng([seed, n, len(open_a), len(open_b)])
        null = []
        for _ in range(draws):
            x, y = set(rng.choice(n, len(open_a), replace=False)), set(rng.choice(n, len(open_b), replace=False))
            null.append(len(x & y) / len(x | y) if x | y else float("nan"))
        null = np.asarray(null)
        rows.append({"layer": layer, "task_a": a, "task_b": b, "n_filters": n, "open_a": len(open_a),
                     "open_b": len(open_b), "jaccard": jaccard, "random_mean": float(np.nanmean(null)),
                     "random_low": float(np.nanpercentile(null, 2.5)),
                     "random_high": float(np.nanpercentile(null, 97.5))})
    return rows


def localiser_sentence(rows: list) -> str:
    """The localiser in a sentence or two, for the report."""
    if not rows:
        return ""
    fdr = rows[0].get("fdr")
    counts = "; ".join(f"{r['layer']} {r['task']} {r['n_selective']} of {r['n_filters']}" for r in rows)
    text = (f"Localiser (Welch's t of each filter's mean activation, a task's images against the other tasks', "
            f"Benjamini-Yekutieli FDR {fdr}): selective filters per site and task: {counts}.")
    lesioned = [r for r in rows if r["n_selective"] and f"drop_{r['task']}" in r]
    if lesioned:
        text += " Silencing a task's selective set costs it " + "; ".join(
            f"{r['drop_' + r['task']]:.3f} at {r['layer']} ({r['task']}; random sets of {r['n_selective']}: "
            f"{r['random_drop_' + r['task']]:.3f}, p {r['p_' + r['task']]:.3f})" for r in lesioned) + \
            " (chance-corrected drops; p uncorrected, the smallest is 1/(R+1))."
    compared = [r for r in rows if r.get("compared_with")]
    if compared:
        text += " Overlap with the " + compared[0]["compared_with"] + " ranking's top set of the same size: " + \
            "; ".join(f"{r['layer']} {r['task']} {r['shared']} of {r['n_selective']} (chance "
                      f"{r['shared_by_chance']:.1f})" for r in compared) + "."
    return text


def mask_sentence(rows: list) -> str:
    """The learned masks in a sentence, for the report."""
    if not rows:
        return ""
    return ("Learned masks (a gate per filter trained on frozen weights to keep each task's loss with an L1 pull "
            "toward closing gates; open = gate above 0.5): " + "; ".join(
                f"{r['layer']}: {r['task_a']} keeps {r['open_a']}, {r['task_b']} {r['open_b']} of {r['n_filters']}, "
                f"Jaccard overlap {r['jaccard']:.3f} against {r['random_mean']:.3f} [{r['random_low']:.3f}, "
                f"{r['random_high']:.3f}] for random sets of those sizes" for r in rows) +
            ". Below the random range: the tasks keep apart filters; above it: they share them.")
