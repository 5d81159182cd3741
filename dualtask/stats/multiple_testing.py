"""The headline's correction for multiple tests: a split found at one of many sites x rankings has to beat what
random lesions give by chance at the best of them.

A run tests the dissociation index of every site x ranking against the other pairs of a closed ring of its
lesions (`p_index` in dissociation.csv; `pair_null`: the ranking's two targeted lesions and the R random orders,
R + 1 null indices, p = (1 + #{null >= index}) / (R + 2)). Uncorrected, a network
without task-specialised filters passes at some site far more often than 5% of the time: about 20% for 5
sites and 1 ranking, about 40% for 5 sites and 2 rankings (tests/test_multiple_testing.py simulates it).

The correction (`corrected_rows`), per lesion fraction, over the family of every site x ranking that decides the
verdict at that fraction (IMPORTANCE by default; the selectivity rankings are corrected as a family of their own,
described beside the verdict, never deciding it; the report's verdict reads the headline fraction, 20% or the
nearest swept):

- max-statistic (Westfall & Young 1993, single step): the random orders already give a joint null across sites,
  since random order r is one draw at every site (and a ranking's targeted lesions one at every site). At each
  site the observed index and its R + 1 null indices are standardised together (z = (value - mean) / sd over
  those R + 2 values, sd with ddof 1; `standardise` says why the observed one is included), so that a site whose
  random lesions vary widely does not dominate; for each ring position j the largest null z over the family's
  sites is one draw of the family's maximum, and an observed (site, ranking) gets
  p = (1 + #{j: max null z_j >= its z}) / (R + 2). With one site this is the site's own p_index.
- rankings: each ranking has its own ring, but the rings share the random orders, so the maximum over sites
  controls the error within one ranking only. Across the K rankings the max-statistic p is multiplied by K
  (Bonferroni): valid whatever the rankings' dependence, and its floor, K/(R+2), is simple to state. Holm across
  rankings would gain only where a ranking's whole family already passes.
- fallback (Holm): where the random orders give no joint null (sites with different random repeats, or
  lesion_results.csv without a site's random drops), Holm's step-down on the per-site p_index over the family;
  its floor is N/(R+2) for N tests. The `correction` column says which, and why.

It imports only common.py of the project: the report and the lesion stage call it on a run's files (lesion_results.csv's
random drops and dissociation.csv's indices), so it also corrects runs swept before it existed.
"""
from __future__ import annotations

import math

import numpy as np

from dualtask.core.common import number as _num

ALPHA = 0.05
MAX_STATISTIC, HOLM = "max-statistic", "holm"
# the verdict's family: rankings that measure what a task needs decide (docs/method.md, "The verdict"); selectivity
# rankings (activation, localiser) describe filters and are corrected as a family of their own
IMPORTANCE = ("loss", "greedy", "taylor", "mask")
SELECTIVITY = ("activation", "localiser")
VERDICT, DESCRIPTION = "verdict", "description"  # dissociation.csv's family column
RING = "ring"  # dissociation.csv's index_null: p_index, null_low and null_high come from pair_null's closed ring
TIE = 1e-9  # values within TIE x max(1, |value|) of each other count as equal: the one tie rule of every p-value


def empirical_p(null, value: float) -> float:
    """(1 + draws at least `value`) / (draws + 1): the permutation p-value, never 0, a draw within the tie tolerance
    counting as equal; every empirical p here (dissociation, corrected and filter-set p) is this one rule."""
    at_least = int(np.sum(np.asarray(null, dtype=float) >= value - TIE * max(1.0, abs(float(value)))))
    return (1 + at_least) / (len(null) + 1)


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


def pair_null(drop_a, drop_b, a_filters, b_filters) -> np.ndarray:
    """The dissociation index's null (lesion_utils.random_pair_indices is this function): the indices of the other
    pairs of one closed ring of lesions. drop_a, drop_b: each random order's chance-corrected drop of task a and of
    task b; a_filters, b_filters: (drop of task a, drop of task b) under the ranking's task-a and task-b filters.

    The ring is [task-a filters, task-b filters, order 1, ..., order R] and back to the first; each neighbouring
    pair (x, y) gives an index with x as the task-a set and y as the task-b set, a(x) - a(y) + b(y) - b(x). The
    observed index is the pair (task-a filters, task-b filters); the R + 1 others, (task-b filters, order 1),
    (order 1, order 2), ..., (order R, task-a filters), are the null. Where the targeted lesions are no different
    from random ones (the null hypothesis), turning the ring leaves its distribution unchanged, so the observed
    pair is as likely as any of the R + 2 to be the largest, at one site and, turned alike, at every site at once:
    p = (1 + #{null >= observed}) / (R + 2) and the max-statistic over sites keep their level exactly. (An open
    ring of the random orders alone, (order r, order r+1), uses every random lesion twice, once with each sign,
    and the observed lesions once: a lesion of outlying cost then stands out more in the observed index than in a
    null one, and the max-statistic over 5 sites said yes in 5.3% of networks without a split,
    benchmarks/verdict_calibration.py, against at most 1/21.) Under a real split the two null pairs that hold a
    targeted lesion are strongly negative, so they do not compete with the observed one. Each lesion is used
    twice, as in the observed pair, and there are R + 1 null values for R random orders: all R(R-1) ordered
    pairs would promise a precision the R draws do not have. Empty with fewer than 2 random orders."""
    drop_a, drop_b = np.asarray(drop_a, dtype=float), np.asarray(drop_b, dtype=float)
    if len(drop_a) < 2:
        return np.array([])
    ring_a = np.concatenate([[a_filters[0], b_filters[0]], drop_a])
    ring_b = np.concatenate([[a_filters[1], b_filters[1]], drop_b])
    nxt = np.roll(np.arange(len(ring_a)), -1)
    return (ring_a - ring_a[nxt] + ring_b[nxt] - ring_b)[1:]  # the same sum as the observed index, term by term


def standardise(null, observed: float) -> tuple:
    """(null z, observed z) of one site and ranking: the R + 1 null indices and the observed index standardised
    by the mean and sd (ddof 1) of all R + 2 of them. Taking the observed index into the mean and sd treats it as
    one more pair of the ring, as the null hypothesis says it is: the standardised ring stays as symmetric as the
    raw one (`pair_null`), so the maximum over sites keeps its level exactly (standardising by the null alone
    shrinks the null z values, which set the mean and sd, against the observed one, which did not, and rejects too
    often: about 8% instead of 5% for 5 sites and 20 orders). Values without spread (sd 0) are all z 0. The map is
    increasing, so a site's own
    ordering of observed and null values, and its own p-value, are kept."""
    null = np.asarray(null, dtype=float)
    pooled = np.append(null, float(observed))
    mean, sd = pooled.mean(), pooled.std(ddof=1)
    if not math.isfinite(sd) or sd <= 1e-12 * max(1.0, abs(mean)):
        return np.zeros_like(null), 0.0
    return (null - mean) / sd, (float(observed) - mean) / sd


def max_statistic(observed: dict, nulls: dict) -> dict:
    """Family-wise corrected p-values of observed indices {(site, ranking): index} against their null indices
    {(site, ranking): array of R + 1, `pair_null`'s ring in the same positions at every site}. Per ranking, the
    single-step max-statistic over sites: p = (1 + #{j: max over sites of null z_j >= observed z}) / (R + 2);
    then times the number of rankings K (Bonferroni), at most 1. The family is every (site, ranking) whose index
    and null are defined (finite); the others get NaN."""
    defined = {k: _num(v) for k, v in observed.items() if math.isfinite(_num(v)) and k in nulls
               and len(nulls[k]) >= 2 and np.isfinite(np.asarray(nulls[k], dtype=float)).all()}
    out = {k: float("nan") for k in observed}
    if not defined:
        return out
    lengths = {len(nulls[k]) for k in defined}
    if len(lengths) != 1:
        raise ValueError(f"the nulls differ in length ({sorted(lengths)}): no joint null")
    rankings = list(dict.fromkeys(m for _, m in defined))
    for ranking in rankings:
        keys = [k for k in defined if k[1] == ranking]
        z_null, z_obs = [], {}
        for k in keys:
            zn, z_obs[k] = standardise(nulls[k], defined[k])
            z_null.append(zn)
        max_null = np.max(np.stack(z_null), axis=0)  # (R + 1,): the largest null z over the sites, per position
        for k in keys:
            p = empirical_p(max_null, z_obs[k])
            out[k] = min(1.0, len(rankings) * p)
    return out


def smallest_corrected_p(repeats: int, n_rankings: int = 1, n_tests: int | None = None) -> float:
    """The smallest corrected p R random orders allow: K/(R+2) for the max-statistic over sites with Bonferroni
    over K rankings; N/(R+2) for Holm over N tests (`n_tests`, the fallback); 1/(R+2) is the smallest
    uncorrected p_index (`pair_null`'s ring). 1 without a null (R < 2)."""
    if repeats < 2:
        return 1.0
    return min(1.0, (n_tests if n_tests is not None else n_rankings) / (repeats + 2))


def repeats_needed(n_rankings: int = 1, alpha: float = ALPHA, n_tests: int | None = None) -> int:
    """The fewest random repeats R whose smallest corrected p (`smallest_corrected_p`) is below alpha."""
    k = n_tests if n_tests is not None else n_rankings
    r = max(2, int(math.floor(k / alpha)) - 3)
    while k >= alpha * (r + 2) - 1e-12:  # k/(R+2) < alpha, free of the rounding of k/(R+2) itself
        r += 1
    return r


# the fewest random orders a run takes when random_repeats is None (19 let one ranking's corrected p reach 1/21)
MIN_REPEATS = 20


def deciding_run(config: dict) -> list:
    """The rankings a run lesions by that decide its verdict (`deciding`), in lesion_methods' order."""
    return [m for m in config.get("lesion_methods") or [] if m in deciding(config)]


def random_repeats(config: dict) -> int:
    """The run's random orders: its random_repeats setting, or when that is None as many as let its deciding
    rankings' corrected p go below ALPHA (`repeats_needed`: K/(R+2) < ALPHA for K rankings), at least
    MIN_REPEATS."""
    if config.get("random_repeats") is not None:
        return int(config["random_repeats"])
    return max(MIN_REPEATS, repeats_needed(max(1, len(deciding_run(config)))))


def repeats_note(config: dict) -> str | None:
    """What a run's random_repeats (a number) cannot show, said before it starts: None when its deciding rankings'
    corrected p can go below ALPHA, or when it lesions no random orders or no deciding ranking."""
    decide, repeats = deciding_run(config), int(config.get("random_repeats") or 0)
    k = len(decide)
    floor = smallest_corrected_p(repeats, k) if k else 0.0
    if floor < ALPHA or "random" not in (config.get("lesion_methods") or []):
        return None
    return (f"note: random_repeats={repeats} with {k} ranking(s) deciding the verdict ({', '.join(decide)}): the "
            f"smallest corrected p is {k}/({repeats}+2) = {floor:.3f}, so no site can pass p < {ALPHA} and the "
            f"verdict cannot say yes; random_repeats={repeats_needed(k)} or more can (random_repeats=None chooses "
            f"{random_repeats(dict(config, random_repeats=None))})")


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
    """({(site, ranking): null indices}, None) from the random drops and each row's targeted drops, or
    (None, why not) when they give no joint null for the sites whose p_index is defined."""
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
    nulls = {}
    for row in rows:
        if row["layer"] in tested and math.isfinite(_num(row.get("p_index"))):
            s = row["layer"]
            nulls[s, row["method"]] = pair_null(
                [drops[s][r][a] for r in order], [drops[s][r][b] for r in order],
                (_num(row.get("drop_a_by_a")), _num(row.get("drop_b_by_a"))),
                (_num(row.get("drop_a_by_b")), _num(row.get("drop_b_by_b"))))
    undefined = [k for k, n in nulls.items() if not np.isfinite(n).all()]
    if undefined:
        return None, f"the drops at {undefined[0][0]} are undefined where its p_index is not"
    return nulls, None


def observed_index(row: dict) -> float:
    """A dissociation.csv row's index made as `pair_null` makes its null ones, from the four drops as written
    (4 decimals): drop_a_by_a - drop_a_by_b + drop_b_by_b - drop_b_by_a. Lesions cost whole test images, so a
    null index can equal the observed one; summed alike from the same rounded drops, a tie stays a tie (and counts
    against the observed index), where the rounded `index` column could come out a rounding error above it. The
    `index` column where a drop is missing."""
    drops = [_num(row.get(k)) for k in ("drop_a_by_a", "drop_a_by_b", "drop_b_by_b", "drop_b_by_a")]
    if not all(math.isfinite(d) for d in drops):
        return _num(row.get("index"))
    return drops[0] - drops[1] + drops[2] - drops[3]


def correct_family(rows: list, result_rows: list) -> tuple:
    """([corrected p of each row], method) for one family: the rows of dissociation.csv at one fraction. method:
    'max-statistic', 'holm (why no joint null)', or '' when no row has a p-value. With a joint null the rows'
    p_index, null_low and null_high are made again from the same rings (in place; index_null says so), so that
    a sweep made before the closed ring, or resumed across it, reads one null throughout."""
    p_index = [_num(r.get("p_index")) for r in rows]
    if not any(math.isfinite(p) for p in p_index):
        return [float("nan")] * len(rows), ""
    nulls, why = _family_nulls(rows, result_rows, _num(rows[0]["fraction"]))
    if nulls is None:
        return list(holm(p_index)), f"{HOLM} ({why})"
    keyed = {(r["layer"], r["method"]): observed_index(r) for r, p in zip(rows, p_index) if math.isfinite(p)}
    for r in rows:
        null = nulls.get((r["layer"], r["method"]))
        if null is not None and (r["layer"], r["method"]) in keyed:
            value = keyed[r["layer"], r["method"]]
            r.update(p_index=f"{empirical_p(null, value):.4f}",
                     null_low=f"{np.min(null):.4f}", null_high=f"{np.max(null):.4f}", index_null=RING)
    corrected = max_statistic(keyed, nulls)
    return [corrected.get((r["layer"], r["method"]), float("nan")) if math.isfinite(p) else float("nan")
            for r, p in zip(rows, p_index)], MAX_STATISTIC


def deciding(config: dict) -> tuple:
    """The rankings whose rows decide a run's verdict: its verdict_rankings setting, or IMPORTANCE."""
    asked = config.get("verdict_rankings")
    return IMPORTANCE if asked is None else tuple(asked)


def family_of(method: str, decides=IMPORTANCE) -> str:
    """The family a ranking's rows are corrected in: VERDICT for the rankings that decide (`decides`: the
    verdict_rankings setting, IMPORTANCE by default), DESCRIPTION for the others."""
    return VERDICT if method in tuple(decides) else DESCRIPTION


def needs_correction(rows: list, decides=IMPORTANCE) -> bool:
    """Whether dissociation.csv's rows lack the corrected p (a file written before it, or a sweep not finished),
    have a p_index from before the closed ring (`pair_null`; index_null is not 'ring'), or were corrected in
    another family than `decides` gives them (a file from before the families, or another verdict_rankings)."""
    return any(r.get("p_corrected") in (None, "") or r.get("family") != family_of(r.get("method"), decides) or
               (math.isfinite(_num(r.get("p_index"))) and r.get("index_null") != RING) for r in rows)


def corrected_rows(diss_rows: list, result_rows: list, force: bool = True, decides=IMPORTANCE) -> list:
    """dissociation.csv's rows with `p_corrected`, `correction` and `family` filled in: at each fraction the
    rankings that decide the verdict (`decides`) form one family and the others (description) another, each
    corrected on its own (from lesion_results.csv's random drops, `result_rows`), and p_index made from the closed
    ring where the drops allow (`correct_family`); force=False keeps rows that have them, corrected as `decides`
    says."""
    if not force and not needs_correction(diss_rows, decides):
        return diss_rows
    out = [dict(r) for r in diss_rows]
    families = {}
    for r in out:
        r["family"] = family_of(r.get("method"), decides)
        families.setdefault((round(_num(r.get("fraction")), 6), r["family"]), []).append(r)
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
