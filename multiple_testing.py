"""The headline's correction for multiple tests: a split found at one of many sites x rankings has to beat what
random lesions give by chance at the best of them.

A run tests the dissociation index of every site x ranking against random-lesion pairs (`p_index` in
dissociation.csv, one null index per random order, `pair_null`). Uncorrected, a network
without task-specialised filters passes at some site far more often than 5% of the time: about 20% for 5
sites and 1 ranking, about 40% for 5 sites and 2 rankings (tests/test_multiple_testing.py simulates it).

The correction (`corrected_rows`), per lesion fraction, over the family of every site x ranking at that fraction
(the report's verdict reads the headline fraction, 20% or the nearest swept):

- max-statistic (Westfall & Young 1993, single step): the random orders already give a joint null across sites,
  since random order r is one draw at every site. At each site the observed index and the R null indices are
  standardised together (z = (value - mean) / sd over those R + 1 values, sd with ddof 1; `standardise` says why
  the observed one is included), so that a site whose random lesions vary widely does not dominate; for each
  order r the largest null z over the family's sites is one draw of the family's maximum, and an observed
  (site, ranking) gets p = (1 + #{r: max null z_r >= its z}) / (R + 1). With one site this is the site's own
  p_index.
- rankings: the rankings at a site share one random null (there is one null draw per order, not one per
  ranking), so the maximum over sites controls the error within one ranking only. Across the K rankings the
  max-statistic p is multiplied by K (Bonferroni): valid whatever the rankings' dependence, and its floor,
  K/(R+1), is simple to state. Holm across rankings would gain only where a ranking's whole family already
  passes, and pairing orders into extra "ranking" draws would invent a dependence between rankings the random
  orders do not have.
- fallback (Holm): where the random orders give no joint null (sites with different random repeats, or
  lesion_results.csv without a site's random drops), Holm's step-down on the per-site p_index over the family;
  its floor is N/(R+1) for N tests. The `correction` column says which, and why.

It imports only common.py of the project: the report and the lesion stage call it on a run's files (lesion_results.csv's
random drops and dissociation.csv's indices), so it also corrects runs swept before it existed.
"""
from __future__ import annotations

import math

import numpy as np

from common import number as _num

ALPHA = 0.05
MAX_STATISTIC, HOLM = "max-statistic", "holm"
TIE = 1e-9  # z values this close count as equal (at least as large), as the uncorrected p-value counts ties


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the input's order: the i-th smallest of m becomes
    max over j <= i of min(1, (m - j + 1) p_(j)). Undefined (NaN) p-values stay NaN and do not count in m."""
    p = np.asarray(p_values, dtype=float).reshape(-1)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if not len(ok):
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    adjusted = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(adjusted)
    return out


def pair_null(drop_a, drop_b) -> np.ndarray:
    """The dissociation index's null (lesion_utils.random_pair_indices is this function): indices built from two
    random lesions, random order r standing for the task-a filters and order r+1 (cyclically) for the task-b
    filters. One null value per random order, so that the smallest p-value, 1/(R+1) for R orders, is what R
    independent draws allow (all R(R-1) ordered pairs would reuse each order many times and promise a precision
    the R draws do not have)."""
    drop_a, drop_b = np.asarray(drop_a, dtype=float), np.asarray(drop_b, dtype=float)
    if len(drop_a) < 2:
        return np.array([])
    nxt = np.roll(np.arange(len(drop_a)), -1)
    return drop_a - drop_a[nxt] + drop_b[nxt] - drop_b


def standardise(null, observed: float) -> tuple:
    """(null z, observed z) of one site and ranking: the R null indices and the observed index standardised by
    the mean and sd (ddof 1) of all R + 1 of them. Taking the observed index into the mean and sd treats it as one
    more draw, as the null hypothesis says it is: the R + 1 standardised values stay exchangeable, so the
    maximum over sites keeps its level exactly (standardising by the null alone shrinks the null z values, which
    set the mean and sd, against the observed one, which did not, and rejects too often: about 8% instead of 5%
    for 5 sites and 20 orders). Values without spread (sd 0) are all z 0. The map is increasing, so a site's own
    ordering of observed and null values, and its own p-value, are kept."""
    null = np.asarray(null, dtype=float)
    pooled = np.append(null, float(observed))
    mean, sd = pooled.mean(), pooled.std(ddof=1)
    if not math.isfinite(sd) or sd <= 1e-12 * max(1.0, abs(mean)):
        return np.zeros_like(null), 0.0
    return (null - mean) / sd, (float(observed) - mean) / sd


def max_statistic(observed: dict, nulls: dict) -> dict:
    """Family-wise corrected p-values of observed indices {(site, ranking): index} against the sites' null
    indices {site: array of R, one per random order, in the same order at every site}. Per ranking, the
    single-step max-statistic over sites: p = (1 + #{r: max over sites of null z_r >= observed z}) / (R + 1);
    then times the number of rankings K (Bonferroni), at most 1. The family is every (site, ranking) whose index
    and site null are defined (finite); the others get NaN."""
    defined = {k: _num(v) for k, v in observed.items() if math.isfinite(_num(v)) and k[0] in nulls
               and len(nulls[k[0]]) >= 2 and np.isfinite(np.asarray(nulls[k[0]], dtype=float)).all()}
    out = {k: float("nan") for k in observed}
    if not defined:
        return out
    lengths = {len(nulls[s]) for s, _ in defined}
    if len(lengths) != 1:
        raise ValueError(f"the sites' nulls differ in length ({sorted(lengths)}): no joint null")
    rankings = list(dict.fromkeys(m for _, m in defined))
    for ranking in rankings:
        keys = [k for k in defined if k[1] == ranking]
        z_null, z_obs = [], {}
        for k in keys:
            zn, z_obs[k] = standardise(nulls[k[0]], defined[k])
            z_null.append(zn)
        max_null = np.max(np.stack(z_null), axis=0)  # (R,): the largest null z over the sites, per random order
        for k in keys:
            p = (1 + int(np.sum(max_null >= z_obs[k] - TIE))) / (len(max_null) + 1)
            out[k] = min(1.0, len(rankings) * p)
    return out


def smallest_corrected_p(repeats: int, n_rankings: int = 1, n_tests: int | None = None) -> float:
    """The smallest corrected p R random orders allow: K/(R+1) for the max-statistic over sites with Bonferroni
    over K rankings; N/(R+1) for Holm over N tests (`n_tests`, the fallback). 1 without a null (R < 2)."""
    if repeats < 2:
        return 1.0
    return min(1.0, (n_tests if n_tests is not None else n_rankings) / (repeats + 1))


def repeats_needed(n_rankings: int = 1, alpha: float = ALPHA, n_tests: int | None = None) -> int:
    """The fewest random repeats R whose smallest corrected p (`smallest_corrected_p`) is below alpha."""
    k = n_tests if n_tests is not None else n_rankings
    r = max(2, int(math.floor(k / alpha)) - 2)
    while k >= alpha * (r + 1) - 1e-12:  # k/(R+1) < alpha, free of the rounding of k/(R+1) itself
        r += 1
    return r


def _same(a, b) -> bool:
    return abs(_num(a) - _num(b)) < 1e-6


def random_drops(result_rows: list, fraction: float) -> dict:
    """{site: {repeat: {eval_task: chance-corrected drop}}} of the random lesions at one fraction, from the rows
    of lesion_results.csv."""
    drops = {}
    for r in result_rows:
        if r.get("method") != "random" or not _same(r.get("fraction"), fraction):
            continue
        try:
            repeat = int(float(r["repeat"]))
        except (KeyError, TypeError, ValueError):
            continue
        drops.setdefault(r.get("layer"), {}).setdefault(repeat, {})[r.get("eval_task")] = _num(r.get("corrected_drop"))
    return drops


def _family_nulls(rows: list, result_rows: list, fraction: float) -> tuple:
    """({site: null indices}, None) from the random drops, or (None, why not) when they give no joint null for
    the sites whose p_index is defined."""
    tested = list(dict.fromkeys(r["layer"] for r in rows if math.isfinite(_num(r.get("p_index")))))
    if not tested:
        return {}, None
    drops = random_drops(result_rows, fraction)
    a, b = rows[0]["task_a"], rows[0]["task_b"]
    missing = [s for s in tested if s not in drops]
    if missing:
        return None, "lesion_results.csv lacks the random lesions' drops at " + ", ".join(missing[:3]) + \
            (" ..." if len(missing) > 3 else "")
    repeats = {s: tuple(sorted(r for r, t in drops[s].items() if a in t and b in t)) for s in tested}
    if len(set(repeats.values())) > 1:
        return None, "the sites have different random repeats"
    n_random = {int(_num(r.get("n_random"))) for r in rows if r["layer"] in tested and
                math.isfinite(_num(r.get("n_random")))}
    order = next(iter(repeats.values()))
    if len(order) < 2 or (n_random and n_random != {len(order)}):
        return None, "lesion_results.csv's random repeats do not match dissociation.csv's n_random"
    nulls = {s: pair_null([drops[s][r][a] for r in order], [drops[s][r][b] for r in order]) for s in tested}
    undefined = [s for s, n in nulls.items() if not np.isfinite(n).all()]
    if undefined:
        return None, f"the random drops at {undefined[0]} are undefined where its p_index is not"
    return nulls, None


def correct_family(rows: list, result_rows: list) -> tuple:
    """([corrected p of each row], method) for one family: the rows of dissociation.csv at one fraction. method:
    'max-statistic', 'holm (why no joint null)', or '' when no row has a p-value."""
    p_index = [_num(r.get("p_index")) for r in rows]
    if not any(math.isfinite(p) for p in p_index):
        return [float("nan")] * len(rows), ""
    nulls, why = _family_nulls(rows, result_rows, _num(rows[0]["fraction"]))
    if nulls is not None:
        keyed = {(r["layer"], r["method"]): _num(r["index"]) for r, p in zip(rows, p_index) if math.isfinite(p)}
        corrected = max_statistic(keyed, nulls)
        return [corrected.get((r["layer"], r["method"]), float("nan")) if math.isfinite(p) else float("nan")
                for r, p in zip(rows, p_index)], MAX_STATISTIC
    return list(holm(p_index)), f"{HOLM} ({why})"


def needs_correction(rows: list) -> bool:
    """Whether dissociation.csv's rows lack the corrected p (a file written before it, or a sweep not finished)."""
    return any(r.get("p_corrected") in (None, "") for r in rows)


def corrected_rows(diss_rows: list, result_rows: list, force: bool = True) -> list:
    """dissociation.csv's rows with `p_corrected` and `correction` filled in, each fraction's rows one family
    (computed from lesion_results.csv's random drops, `result_rows`); force=False keeps rows that have them."""
    if not force and not needs_correction(diss_rows):
        return diss_rows
    out = [dict(r) for r in diss_rows]
    families = {}
    for r in out:
        families.setdefault(round(_num(r.get("fraction")), 6), []).append(r)
    for rows in families.values():
        corrected, method = correct_family(rows, result_rows)
        for r, p in zip(rows, corrected):
            r["p_corrected"] = f"{p:.4f}"
            r["correction"] = method if math.isfinite(p) else ""
    return out


def family(rows: list) -> dict:
    """What the correction of one family (dissociation.csv's rows at one fraction, with p_corrected) covered:
    {'method': 'max-statistic' or 'holm' or None, 'why': why Holm, 'n_tests', 'n_sites', 'n_rankings',
    'repeats': R}."""
    tested = [r for r in rows if math.isfinite(_num(r.get("p_corrected")))]
    methods = [str(r.get("correction") or "") for r in tested]
    method = MAX_STATISTIC if any(m.startswith(MAX_STATISTIC) for m in methods) else \
        HOLM if any(m.startswith(HOLM) for m in methods) else None
    why = next((m[len(HOLM):].strip(" ()") for m in methods if m.startswith(HOLM)), "")
    repeats = max((int(_num(r.get("n_random"))) for r in tested if math.isfinite(_num(r.get("n_random")))),
                  default=0)
    return {"method": method, "why": why, "n_tests": len(tested), "n_sites": len({r["layer"] for r in tested}),
            "n_rankings": len({r["method"] for r in tested}), "repeats": repeats}
