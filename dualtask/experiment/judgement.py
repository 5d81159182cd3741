"""The experiment's verdict (aggregate.py): each site and ranking's test across seeds, against random lesions and
every control that ran, Holm-corrected over its family (`judge`); the verdict in words, with what it licenses and
the caveats that could change it (`words`); and what the real runs' rankings add to it (split-half reliability,
receptive fields, rankings two halves of the images do not reproduce)."""
from __future__ import annotations

import math
from pathlib import Path

from dualtask.core import names
from dualtask.core.common import number, read_json
from dualtask.report import build as report
from dualtask.report import first_screen
from dualtask.stats import multiple_testing
from dualtask.stats import verdict as V

ALPHA = report.ALPHA
FEW_SEEDS = 5  # below this many seeds per role, an across-seed interval is a rough guide
# the controls whose index the real one must beat, each with its name in the verdict and what beating it rules out
COMPARED = {"pseudo_task": ("pseudo-tasks", "more than for random splits of the same classes"),
            "same_task": ("two heads on one task", "more than two heads learning one task lean on different filters"),
            "resolution_matched": ("resolution-matched training", "more than when every task's images share one "
                                                                  "resolution")}


def fmt(x, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and math.isfinite(x) else ""


def holm_family(rows: list, keys) -> list:
    """Holm's adjusted p-values of one family, every row x key (the site x ranking x comparison tests the
    verdict reads: their p-values come from bootstrap draws and Fisher's combination, not from shared random
    orders, so no joint null is at hand and Holm's step-down controls the family-wise error under any
    dependence): [{key: adjusted p}] in the rows' order, NaN where the row has no p-value for a key."""
    keys = list(keys)
    flat = multiple_testing.holm([number(r.get(k)) for r in rows for k in keys])
    return [dict(zip(keys, flat[i * len(keys):(i + 1) * len(keys)])) for i in range(len(rows))]


def _experiment_test(row: dict, adjusted: dict, keys: list) -> V.Test:
    """A summary row's test: its interval above 0 and every comparison in `keys` (p_random and the controls' p_vs_
    columns) below ALPHA after Holm's correction (`adjusted`)."""
    if not math.isfinite(number(row.get("index"))):
        return V.Test.UNDEFINED
    if number(row.get("ci_low")) <= 0:
        return V.Test.REVERSED if number(row.get("ci_high")) < 0 else V.Test.NO_SPLIT
    if all(adjusted.get(k, float("nan")) < ALPHA for k in keys):
        return V.Test.DISSOCIATES
    if not math.isfinite(number(row.get("p_random"))):
        return V.Test.NO_RANDOM
    return V.Test.LOST_TO_CORRECTION if all(number(row.get(k)) < ALPHA for k in keys) else V.Test.NOT_BEYOND_RANDOM


def judge(rows: list, roles_run: set, repeats: int, void_resolution: bool = False,
          decides=multiple_testing.IMPORTANCE, reliability: dict | None = None, rf: dict | None = None):
    """(verdict.Judgement or None, the comparisons [(name, column)]) of an experiment at the headline fraction.
    A (site, ranking) passes the test when the real index's interval across seeds lies above 0 and it beats random
    lesions (Fisher-combined p) and every control that ran but the resolution-matched one (bootstrap p), each
    below ALPHA after Holm's correction over its family (`holm_family`: every site x ranking x comparison of the
    deciding rankings at the fraction; the description rankings apart). The resolution-matched control, where it
    ran, decides whether a split is the tasks' or their images' (verdict.py, rule 5). reliability: {(site,
    ranking): the real runs' split-half agreement, verdict.Agreement (reliability_across)}; rf: {site: receptive
    field share} (None: not recorded)."""
    real = [r for r in rows if r["role"] == "real"]
    tests = [("random lesions", "p_random")] + [(name, f"p_vs_{c}") for c, (name, _) in COMPARED.items()
                                                 if c in roles_run]
    if not real:
        return None, tests
    f = V.headline_fraction(r["fraction"] for r in real)
    at = {g: {(r["layer"], r["method"]): r for r in real if abs(number(r["fraction"]) - g) < 1e-6}
          for g in V.neighbours(f, sorted({number(r["fraction"]) for r in real})) + [f]}
    near = [g for g in at if g != f]
    keys = [k for _, k in tests]
    adjusted = {}
    for kind in (multiple_testing.VERDICT, multiple_testing.DESCRIPTION):
        family = [r for r in at[f].values() if multiple_testing.family_of(r["method"], decides) == kind]
        adjusted.update({id(r): a for r, a in zip(family, holm_family(family, keys))})
    matched_ran = "resolution_matched" in roles_run and not void_resolution
    deciding_keys = [k for k in keys if k != "p_vs_resolution_matched"]
    findings = []
    for key, r in at[f].items():
        adj = adjusted[id(r)]
        p_control = adj.get("p_vs_resolution_matched", float("nan"))
        share = (rf or {}).get(r["layer"])
        findings.append(V.Finding(
            site=r["layer"], depth=int(number(r["depth"])), ranking=r["method"],
            row=dict(r, p_corrected=fmt(max((adj[k] for k in deciding_keys), default=float("nan")))),
            heads=_experiment_test(r, adj, deciding_keys), readouts=None, readout_row=None,
            decides=r["method"] in decides, reliable=(reliability or {}).get(key),
            holds={g: V.above_zero(at[g][key]) for g in near if key in at[g]}, rf_share=share,
            early=share < V.EARLY_RF_SHARE if share is not None else int(number(r["depth"])) == 0,
            control_matches=(p_control >= ALPHA) if matched_ran and math.isfinite(p_control) else None))
    n_tests = sum(math.isfinite(p) for a in adjusted.values() for p in a.values())
    tasks = (real[0].get("task_a", "task a"), real[0].get("task_b", "task b"))
    j = V.Judgement(answer=V.answer_of(findings), fraction=f, tasks=tasks,
                    findings=findings, decides=tuple(decides), rankings=_methods(list(at[f].values())),
                    n_sites=len({r["layer"] for r in at[f].values()}), readouts=False, neighbours=near,
                    rf_known=rf is not None and all(f.rf_share is not None for f in findings),
                    control=matched_ran, floor=0.0, repeats=0,
                    family={"method": "holm", "n_tests": n_tests, "n_sites": len({r["layer"] for r in real}),
                            "n_rankings": len(_methods(real)), "repeats": repeats}, experiment=True)
    return j, tests


def words(j, roles_run: set, n_seeds: int, repeats: int, void_resolution: bool = False) -> tuple:
    """(answer, licence, caveats, passing rows) of an experiment's judgement (`judge`; None: no real index)."""
    if j is None:
        return ("No dissociation index from the real tasks (the lesion stage has not run, or it had no targeted "
                "ranking or no fraction above 0): this experiment cannot say whether task-specialised filters "
                "emerged.", "", [], [])
    passing = [f.row for f in j.where(V.Counts.SPLIT)]
    if passing:
        licence = (f"This licenses saying that, in these {n_seeds} trained {'network' if n_seeds == 1 else 'networks'}"
                   f" of this architecture, data and training budget, the filters a ranking assigns to one task "
                   f"matter more for that task than for the other at those depths, more than random filters of the "
                   f"same number" + "".join(f", {more}" for c, (_, more) in COMPARED.items() if c in roles_run) +
                   ". It does not license saying that the network holds a module in the brain's sense, that other "
                   "architectures, data, image sizes or training budgets would split the same way, or how the "
                   "network computes either task: a lesion shows which damage hurts, not why.")
    else:
        licence = ("This does not show that the networks lack task-specialised filters: more seeds, more random "
                   "repeats, better-trained heads, other rankings or finer lesion fractions could still find them. It "
                   "shows only that these runs give no evidence for them beyond the controls that ran.")
    caveats = first_screen.rule_caveats(j, "controls=['resolution_matched'] decides")
    caveats += _verdict_caveats(roles_run, n_seeds, repeats, void_resolution, j)
    return first_screen.sentence(j, seeds=n_seeds), licence, caveats, passing


def _verdict_caveats(roles_run: set, n_seeds: int, repeats: int, void_resolution: bool, j) -> list:
    """What the experiment verdict cannot show: controls not run or void, too few seeds or random repeats."""
    Caveat, yes = first_screen.Caveat, j.answer is V.Answer.YES
    caveats = []
    if void_resolution:
        caveats.append(Caveat("The resolution-matched runs saw the same images as the real runs: no task's native "
                              "resolution is below image_size, so that control tests nothing here.", True, 44))
    missing = [c for c in (*COMPARED, "single_task") if c not in roles_run]
    if missing:
        caveats.append(Caveat(
            f"Controls not run: {', '.join(missing)}. The verdict says nothing about them: " + "; ".join(
                {"pseudo_task": "a split that any random division of the classes would show is not ruled out",
                 "resolution_matched": "a split made by the tasks' image statistics (sharpness, size) rather than "
                                       "the tasks is not ruled out (early sites count as image statistics)",
                 "same_task": "a split that any two heads show, even two learning one task (each leans on its own "
                              "filters), is not ruled out",
                 "single_task": "no single-task baseline tells what each task costs the other"}[c] for c in missing)
            + ".", yes and any(c in missing for c in ("pseudo_task", "same_task")), 42))
    if n_seeds < FEW_SEEDS:
        caveats.append(Caveat(f"{n_seeds} seed(s) per role: the hierarchical bootstrap resamples only these, so its "
                              f"intervals and the p-values against the controls understate the spread between "
                              f"networks; {FEW_SEEDS} or more seeds make them trustworthy.", yes, 48))
    floor = 1 / (repeats + 2) if repeats else 1.0  # p_index's: multiple_testing.pair_null's ring
    if floor >= ALPHA:
        caveats.append(Caveat(f"random_repeats={repeats}: each seed's p-value against random lesions cannot go below "
                              f"{floor:.3f}; Fisher's combination over {n_seeds} seed(s) may still not reach p < "
                              f"{ALPHA}. Use random_repeats={report.repeats_needed()} or more.", not yes, 30))
    return caveats


def _methods(rows: list) -> list:
    return list(dict.fromkeys(r["method"] for r in rows))


def accuracy_caveats(accuracy: list) -> list:
    weak = [r for r in accuracy if number(r["accuracy"]) - number(r["chance"]) < report.NEAR_CHANCE
            or number(r["ci_low"]) <= number(r["chance"])]
    if not weak:
        return []
    return [first_screen.Caveat("Heads near chance (their lesion effects mean little): " + "; ".join(
        f"{r['role']} seed {r['seed']} {r['task']} {r['accuracy']} (chance {r['chance']})" for r in weak[:6]) + ".",
        True, 10)]


def run_rankings(out: Path, runs: list) -> list:
    """The rankings.json of every swept real run ({} where it is missing)."""
    found = []
    for run in runs:
        path = out / run["folder"] / names.SWEEP_FILES["rankings"]
        if run["role"] == "real" and path.exists():
            found.append(read_json(path, lambda v: isinstance(v, dict), "rankings by site"))
    return found


def reliability_across(rankings: list, rows: list) -> dict:
    """{(site, ranking): verdict.Agreement over the real runs}: per task the runs' split-half agreements at the
    headline fraction pooled (mean overlap, the exact p of the summed shared counts), then both tasks as one; a
    pair any run did not measure is left out (not measured)."""
    real = [r for r in rows if r["role"] == "real"]
    if not real or not rankings:
        return {}
    f = V.headline_fraction(r["fraction"] for r in real)
    out = {}
    for r in real:
        key = (r["layer"], r["method"])
        out[key] = V.both_tasks([V.pooled([V.task_agreement(per, r["layer"], r["method"], f, t) for per in rankings])
                                 for t in (r["task_a"], r["task_b"])])
    return {k: v for k, v in out.items() if v is not None}


def receptive_across(rankings: list) -> dict | None:
    """{site: share of the image's side its receptive field spans}, from the real runs' rankings.json (one
    architecture), None where no run recorded them."""
    shares = {}
    for per in rankings:
        for site in per:
            share = V.receptive_share(per, site)
            if share is not None:
                shares.setdefault(site, share)
    return shares or None


def unreproducible_runs(out: Path, runs: list) -> list:
    """Notes naming the runs whose rankings two halves of the ranking images do not reproduce."""
    shaky = []
    for run in runs:
        path = out / run["folder"] / names.SWEEP_FILES["rankings"]
        if path.exists() and report.unreproducible(read_json(path, lambda v: isinstance(v, dict), "rankings by site"),
                                                   0.2):
            shaky.append(run["folder"])
    if not shaky:
        return []
    return [first_screen.Caveat(
        f"Rankings not reproducible in {len(shaky)} run(s) ({', '.join(shaky[:6])}{', ...' if len(shaky) > 6 else ''}"
        f"): ranked on two halves of the ranking images, some sites' top-20% filters overlap no more than random "
        f"sets would (one-sided p not below {V.RELIABILITY_ALPHA:g}; each run's rankings.json and report name them); "
        f"raise rank_images.", False, 82)]
