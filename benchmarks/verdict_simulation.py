"""Part 1 of benchmarks/verdict_calibration.py, the statistics layer: the verdict of a run's rows as the report
reaches it (run_verdict), rates with their Wilson intervals, and simulated networks without dissociation
(simulate_network, simulate). verdict_calibration.py's docstring describes the simulation and what it measured."""
from __future__ import annotations

import math
import time

import numpy as np
from scipy.special import ndtr

from dualtask.lesion import dissociation
from dualtask.model import sites
from dualtask.report import build as report
from dualtask.stats import multiple_testing as M
from dualtask.stats import verdict as V

SCENARIOS = ("exchangeable", "stronger")  # networks without dissociation; "planted" (a known positive) for tests
YES = "dissociates"  # report.verdict of a row that passes
RHO = 0.5  # the correlation of an image's fragility across lesions


# ----------------------------------------------------------------------------------------------------------
# the verdict, as the report reaches it


def run_verdict(diss_rows: list, result_rows: list, fixed: list | None = None) -> dict:
    """The statistics layer's verdict (rule 2 of verdict.py: the test, corrected) of a run's dissociation.csv and
    lesion_results.csv rows: {'yes', 'yes_uncorrected', 'fraction', 'rows': the headline fraction's rows, each
    with 'verdict' ('dissociates' where the row passes the test, through the heads and, with `fixed`, the fixed
    readouts' rows too) and 'verdict_uncorrected'}. The simulation has no rankings to check the other rules
    against: `trained_verdict` applies them all."""
    decides = tuple(dict.fromkeys(r["method"] for r in diss_rows))  # every simulated ranking decides
    diss = M.corrected_rows(diss_rows, result_rows, force=False, decides=decides)
    if not diss:
        return {"yes": False, "yes_uncorrected": False, "fraction": float("nan"), "rows": []}
    f = V.headline_fraction(r["fraction"] for r in diss)
    rows = [r for r in diss if abs(float(r["fraction"]) - f) <= 1e-6]
    through = None if fixed is None else {(r["layer"], r["method"]): r for r in
                                          M.corrected_rows(fixed, [], force=False, decides=decides)
                                          if abs(float(r["fraction"]) - f) <= 1e-6}

    def passes(r, key="p_corrected"):
        ok = V.test(dict(r, p_corrected=r[key])) is V.Test.DISSOCIATES
        other = None if through is None else through.get((r["layer"], r["method"]))
        return ok and (through is None or (other is not None and
                                           V.test(dict(other, p_corrected=other[key])) is V.Test.DISSOCIATES))

    def said(r):  # a row passing through the heads but not the readouts is not YES
        return YES if passes(r) else V.Counts.HEADS_ONLY.value if V.test(r) is V.Test.DISSOCIATES else V.test(r).value

    rows = [dict(r, verdict=said(r), verdict_uncorrected=YES if passes(r, "p_index") else "no") for r in rows]
    return {"yes": any(r["verdict"] == YES for r in rows),
            "yes_uncorrected": any(r["verdict_uncorrected"] == YES for r in rows), "fraction": f, "rows": rows}


def rate(hits: int, n: int) -> tuple:
    """(rate, Wilson 95% low, high)."""
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    low, high = report.wilson(hits / n, n)
    return hits / n, max(0.0, low), min(1.0, high)


def fmt_rate(hits: int, n: int) -> str:
    p, low, high = rate(hits, n)
    return f"{p:.4f} [{low:.4f}, {high:.4f}] ({hits}/{n})"


# ----------------------------------------------------------------------------------------------------------
# 1. the statistics layer: simulated networks without dissociation


def _logit(p):
    return np.log(p) - np.log1p(-p)


def _expit(x):
    return 1.0 / (1.0 + np.exp(-x))


def _intact(rng: np.random.Generator, tasks: list, n_images: int) -> tuple:
    """({task: the intact network's per-image outcomes}, {task: each image's fragility}): an intact accuracy per
    task (a in [0.6, 0.95], b in [0.4, 0.9]) and each image correct or not, never all or none."""
    accuracy = {"a": rng.uniform(0.6, 0.95), "b": rng.uniform(0.4, 0.9)}
    intact, fragility = {}, {}
    for t in tasks:
        correct = rng.random(n_images) < accuracy[t]
        if correct.all() or not correct.any():
            correct[0] = not correct[0]
        intact[t] = {"correct": correct, "loss": np.zeros(n_images)}
        fragility[t] = rng.standard_normal(n_images)
    return intact, fragility


def _lesion(rng: np.random.Generator, effect: tuple, intact: dict, fragility: dict, chance: dict,
            boost: float = 0.0, own: str | None = None) -> dict:
    """One lesion's per-image outcomes at a site whose lesions cost (typical, spread_general, spread_task) on the
    logit scale; `boost` added for every task, or for `own` alone."""
    typical, spread_general, spread_task = effect
    general = rng.standard_normal()
    out = {}
    for t in intact:
        n_images = len(intact[t]["correct"])
        extra = boost if own is None or t == own else 0.0
        q = _expit(typical + extra + spread_general * general + spread_task * rng.standard_normal())
        u = ndtr(RHO * fragility[t] + math.sqrt(1 - RHO * RHO) * rng.standard_normal(n_images))
        lost = intact[t]["correct"] & (u < q)
        gained = ~intact[t]["correct"] & (rng.random(n_images) < q * chance[t])
        out[t] = {"correct": (intact[t]["correct"] & ~lost) | gained, "loss": np.zeros(n_images)}
    return out


def simulate_network(rng: np.random.Generator, n_sites: int = 5, n_rankings: int = 1, repeats: int = 20,
                     n_images: int = 120, fraction: float = 0.2, scenario: str = "exchangeable",
                     n_boot: int = 1000, seed: int = 0, chance_level: float = 0.1) -> tuple:
    """One simulated run without task-specialised filters: (dissociation.csv rows, lesion_results.csv rows of
    the random lesions), made by lesion_utils.dissociation_rows and lesion_utils._result_rows from per-image
    outcomes, as the lesion stage makes them from a network's.

    Per task: intact accuracy (a in [0.6, 0.95], b in [0.4, 0.9]; chance 0.1), n_images test images, each correct
    or not, each with a fragility (standard normal) shared by every site and lesion. Per site: a typical share of
    correct images a lesion costs (log-uniform in [0.02, 0.6]) and spreads of a lesion's cost, general (both tasks)
    and per task. Per lesion (each ranking's two targeted lesions and every random one, all alike; scenario
    'stronger': the targeted ones at 3x the odds, both tasks alike; 'planted', a known positive: each task's targeted
    lesion at 20x the odds for its own task only): each task's share q of its correct images lost,
    an image lost when its fragility mixed with fresh noise (correlation 0.5) falls below q's quantile; a wrong
    image turns right with probability q x chance (a damaged head guessing)."""
    if scenario not in SCENARIOS + ("planted",):
        raise ValueError(f"scenario={scenario!r}; expected one of {SCENARIOS + ('planted',)}")
    tasks = ["a", "b"]
    chance = {t: chance_level for t in tasks}
    intact, fragility = _intact(rng, tasks, n_images)
    summary = {t: dissociation.per_image_summary(intact[t]) for t in tasks}
    rankings = list(V.IMPORTANCE[:n_rankings])  # named as rankings that decide
    boost = {"exchangeable": 0.0, "stronger": math.log(3.0), "planted": math.log(20.0)}[scenario]
    diss, random_rows = [], []
    for s in range(n_sites):
        n_filters = 64 * 2 ** min(s, 5)
        site = sites.Site(f"site{s}", None, n_filters, s)
        effect = (_logit(math.exp(rng.uniform(math.log(0.02), math.log(0.6)))), rng.uniform(0.1, 1.0),
                  rng.uniform(0.1, 0.8))
        chosen = np.arange(int(round(fraction * n_filters)))
        conditions, results = [], []
        for method in rankings:
            for target in tasks:
                conditions.append((method, target, 0, fraction, chosen))
                own = target if scenario == "planted" else None
                results.append(_lesion(rng, effect, intact, fragility, chance, boost, own))
        for r in range(repeats):
            conditions.append(("random", "random", r, fraction, chosen))
            results.append(_lesion(rng, effect, intact, fragility, chance))
            random_rows += dissociation.result_rows(site, "random", "random", r, fraction, len(chosen), results[-1],
                                                    summary, chance, tasks)
        diss += dissociation.dissociation_rows(site, conditions, results, intact, chance, tasks, n_boot=n_boot,
                                               seed=seed)
    return diss, random_rows


def simulate(draws: int = 2000, seed: int = 0, scenario: str = "exchangeable", n_sites: int = 5,
             n_rankings: int = 1, repeats: int = 20, n_images: int = 120, n_boot: int = 1000,
             chance_level: float = 0.1) -> dict:
    """The verdict over `draws` simulated networks without dissociation: {'draws', 'yes', 'yes_uncorrected',
    'rate', 'rate_uncorrected' ((rate, low, high) each, Wilson 95%), 'min_p_corrected': each draw's smallest
    corrected p, 'seconds', and the settings}."""
    rng = np.random.default_rng([seed, 2112])
    start = time.perf_counter()
    yes = yes_uncorrected = 0
    smallest = []
    for d in range(draws):
        diss, random_rows = simulate_network(rng, n_sites, n_rankings, repeats, n_images, scenario=scenario,
                                             n_boot=n_boot, seed=d, chance_level=chance_level)
        v = run_verdict(diss, random_rows)
        yes += v["yes"]
        yes_uncorrected += v["yes_uncorrected"]
        smallest.append(min(float(r["p_corrected"]) for r in v["rows"]))
    return {"draws": draws, "yes": yes, "yes_uncorrected": yes_uncorrected, "rate": rate(yes, draws),
            "rate_uncorrected": rate(yes_uncorrected, draws), "min_p_corrected": smallest,
            "seconds": time.perf_counter() - start, "scenario": scenario, "n_sites": n_sites,
            "n_rankings": n_rankings, "repeats": repeats, "n_images": n_images, "chance": chance_level}


def describe_simulation(sim: dict) -> str:
    return (f"simulation ({sim['scenario']}): {sim['draws']} networks without dissociation, {sim['n_sites']} sites x "
            f"{sim['n_rankings']} ranking(s), {sim['repeats']} random orders, {sim['n_images']} test images per "
            f"task (chance {sim['chance']:.2f}); verdict yes in {fmt_rate(sim['yes'], sim['draws'])} corrected, "
            f"{fmt_rate(sim['yes_uncorrected'], sim['draws'])} uncorrected ({sim['seconds']:.0f} s)")
