"""The aggregate of an experiment (experiment.py): the dissociation index across training seeds with a
hierarchical bootstrap interval, the real tasks weighed against the control networks, single-task baselines,
and the experiment's report.html, which opens on the verdict.

Writes into the experiment's folder: summary.csv (per role, site, ranking and fraction), accuracy.csv
(intact test accuracy per role, seed and task), single_task.csv (when that control ran), figures/ and
report.html. Each run keeps its own report in its own folder.
"""
from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np
import torch
from scipy.stats import combine_pvalues

from dualtask.analysis import inspection
from dualtask.core import names
from dualtask.core.common import UsageError, number, read_csv, read_json, write_csv, write_text
from dualtask.experiment import branching
from dualtask.experiment import pipeline as dualtask
from dualtask.lesion import dissociation, engine
from dualtask.report import build as report
from dualtask.report import figures, first_screen, pages
from dualtask.stats import multiple_testing
from dualtask.stats import verdict as V
from dualtask.training import trainer

N_BOOT = 1000  # hierarchical bootstrap draws
ALPHA = report.ALPHA
FEW_SEEDS = 5  # below this many seeds per role, an across-seed interval is a rough guide
SUMMARY_COLUMNS = ("role", "layer", "depth", "relative_depth", "method", "fraction", "task_a", "task_b", "n_seeds",
                   "index", "ci_low", "ci_high", "seed_indices", "p_random", "pseudo_task_index",
                   "p_vs_pseudo_task", "resolution_matched_index", "p_vs_resolution_matched", "p_corrected",
                   "matched_index", "same_task_index", "p_vs_same_task")
# p_corrected: the p-value of "beyond random lesions and every control" at the row's site and ranking, corrected by
# Holm over every site x ranking x comparison of its role at its fraction (`holm_family`); the p_ columns before it
# are uncorrected
ACCURACY_COLUMNS = ("role", "seed", "task", "accuracy", "ci_low", "ci_high", "n_images", "chance", "folder",
                    "read_by")  # read_by: "heads", the networks' own output layers
SINGLE_COLUMNS = ("trained_on", "seed", "decoded_task", "single_task_decoding", "joint_decoding", "chance",
                  "n_train", "n_test")
SWEPT_ROLES = ("real", "pseudo_task", "resolution_matched", "same_task")  # two tasks and a lesion sweep
# the controls whose index the real one must beat, each with its name in the verdict and what beating it rules out
COMPARED = {"pseudo_task": ("pseudo-tasks", "more than for random splits of the same classes"),
            "same_task": ("two heads on one task", "more than two heads learning one task lean on different filters"),
            "resolution_matched": ("resolution-matched training", "more than when every task's images share one "
                                                                  "resolution")}


# ----------------------------------------------------------------------------------------------------------
# statistics


def index_from_means(means: dict, chance: dict, a: str, b: str):
    """The double-dissociation index from mean accuracies (arrays of draws or numbers):
    means[(lesion, eval_task)] with lesion 'intact', a (the a-ranked filters silenced) or b."""
    def drop(lesion, t):
        above = means["intact", t] - chance[t]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(above > 1e-9, (means["intact", t] - means[lesion, t]) / np.where(above > 1e-9, above, 1),
                            np.nan)
    return drop(a, a) - drop(b, a) + drop(b, b) - drop(a, b)


def image_draws(correct: dict, chance: dict, a: str, b: str, n_draws: int, rng, paired: bool = False) -> tuple:
    """One run's index and `n_draws` bootstrap draws of it over its test images (resampled per task, the same
    resample for the intact network and both lesions: they are paired on the images). correct[(lesion, task)]:
    per-image bool arrays. paired: both tasks were scored on the same images in the same order (tasks sharing
    their images), so one resample of the images serves both tasks. Returns (index, draws)."""
    point = index_from_means({k: np.mean(v) for k, v in correct.items()}, chance, a, b)
    if paired and len(correct["intact", a]) != len(correct["intact", b]):
        raise UsageError(f"tasks {a} and {b} share their images but have {len(correct['intact', a])} and "
                         f"{len(correct['intact', b])} test outcomes; rerun the lesion stage")
    columns = [(lesion, t) for lesion in ("intact", a, b) for t in (a, b)]
    groups = [columns] if paired else [[c for c in columns if c[1] == t] for t in (a, b)]
    means = {}
    for group in groups:
        # an image's outcomes under the k conditions form one of 2^k patterns, so a resample of the n images is a
        # multinomial draw of the pattern counts: exact, and as fast for 10,000 images as for 100
        k = len(group)
        stacked = np.stack([np.asarray(correct[c], dtype=bool) for c in group], 1)
        n = len(stacked)
        pattern = stacked @ (1 << np.arange(k))
        freq = np.bincount(pattern, minlength=2 ** k) / n
        counts = rng.multinomial(n, freq, size=n_draws)  # (n_draws, 2^k)
        bits = (np.arange(2 ** k)[:, None] >> np.arange(k)[None, :]) & 1  # (2^k patterns, k conditions)
        m = counts @ bits / n
        for j, c in enumerate(group):
            means[c] = m[:, j]
    return float(point), index_from_means(means, chance, a, b)


def hierarchical_bootstrap(per_seed_draws: list, rng) -> np.ndarray:
    """Draws of the mean across seeds: each draw resamples the seeds with replacement, then takes for every
    seed it picked an independent resample of that seed's test images. per_seed_draws: for each of the S seeds,
    an (n_boot, S) array of image-resampled draws of its index (one column per slot it may fill)."""
    stacked = np.stack(per_seed_draws)  # (S seeds, n_boot, S slots)
    n_seeds, n_boot, slots = stacked.shape
    pick = rng.integers(0, n_seeds, (n_boot, slots))
    return stacked[pick, np.arange(n_boot)[:, None], np.arange(slots)[None, :]].mean(1)


def interval(draws: np.ndarray):
    """95% percentile interval; none when more than 5% of the draws are undefined (a head at chance)."""
    draws = np.asarray(draws, dtype=float)
    if not len(draws) or np.isfinite(draws).mean() < 0.95:
        return float("nan"), float("nan")
    return float(np.nanpercentile(draws, 2.5)), float(np.nanpercentile(draws, 97.5))


def p_greater(draws: np.ndarray, other: np.ndarray) -> float:
    """One-sided bootstrap p-value that the index behind `draws` is not above the one behind `other`
    (independent draws of each): the share of paired draws where it is not, (1 + k) / (n + 1)."""
    diff = np.asarray(draws) - np.asarray(other)
    ok = np.isfinite(diff)
    if ok.mean() < 0.95:
        return float("nan")
    return (1 + int(np.sum(diff[ok] <= 0))) / (int(ok.sum()) + 1)


def fisher(p_values) -> float:
    """Fisher's combination of independent per-seed p-values (each seed's index against its random lesions)."""
    p = [float(v) for v in p_values if math.isfinite(float(v))]
    if not p:
        return float("nan")
    return float(combine_pvalues(p, method="fisher").pvalue) if len(p) > 1 else p[0]


# ----------------------------------------------------------------------------------------------------------
# reading the runs


def read_swept_run(folder: Path) -> dict | None:
    """A two-task run's config, dissociation rows and per-image results; None when the run has no lesion sweep
    (its stages left it out). A damaged file, or a sweep without its per-image results, is a UsageError naming it."""
    config = read_json(folder / "config.json", lambda v: isinstance(v, dict) and isinstance(v.get("tasks"), dict),
                       "a run's settings")
    diss_path, per_image_path = folder / "dissociation.csv", folder / names.SWEEP_FILES["per_image"]
    if not diss_path.exists():
        return None
    if not per_image_path.exists():
        raise UsageError(f"{per_image_path} is missing (the sweep predates it); rerun that run's lesion stage "
                         f"(--retrain=True --stages=\"['lesion']\" in {folder})")
    rows = read_csv(diss_path, ("layer", "depth", "method", "fraction", "task_a", "task_b", "index", "p_index"))
    if multiple_testing.needs_correction(rows) and (folder / names.SWEEP_FILES["results"]).exists():
        # a sweep made before the closed ring: its p_index made again from its drops, as the run's report does
        rows = multiple_testing.corrected_rows(rows, read_csv(folder / names.SWEEP_FILES["results"]))
    return {"config": config, "dissociation": rows, "per_image": dissociation.read_per_image(per_image_path)}


def _relative_depth(depth: int, config: dict, rows: list) -> float:
    n_sites = config.get("n_lesion_sites") or (max(int(r["depth"]) for r in rows) + 1)
    return depth / max(n_sites - 1, 1)


def role_statistics(role_runs: list, rng) -> dict:
    """{(layer, method, fraction): statistics} of one role's runs (one per seed)."""
    slots = len(role_runs)
    by_key = {}
    for run in role_runs:
        data = run["data"]
        chance = {t: float(v["chance"]) for t, v in data["config"]["tasks"].items()}
        pi = data["per_image"]
        shared = [set(g) for g in data["config"].get("shared_images", [])]
        for row in data["dissociation"]:
            a, b, f = row["task_a"], row["task_b"], row["fraction"]
            keys = {(lesion, t): (f"intact|{t}" if lesion == "intact" else
                                  dissociation.per_image_key(row["layer"], row["method"], lesion, f, t))
                    for lesion in ("intact", a, b) for t in (a, b)}
            if any(k not in pi for k in keys.values()):
                raise UsageError(f"{run['folder']}: lesion_per_image.npz lacks {row['layer']} {row['method']} "
                                 f"{f}; rerun that run's lesion stage")
            paired = any({a, b} <= g for g in shared)
            point, draws = image_draws({k: pi[v] for k, v in keys.items()}, chance, a, b, N_BOOT * slots, rng,
                                       paired)
            entry = by_key.setdefault((row["layer"], row["method"], f), {
                "depth": int(row["depth"]), "relative_depth": _relative_depth(int(row["depth"]), data["config"],
                                                                              data["dissociation"]),
                "task_a": a, "task_b": b, "seeds": [], "points": [], "draws": [], "p_index": [], "matched": []})
            entry["seeds"].append(run["seed"])
            entry["points"].append(point)
            entry["draws"].append(draws.reshape(N_BOOT, slots))
            entry["p_index"].append(number(row["p_index"]))
            entry["matched"].append(number(row.get("matched_index")))
    stats = {}
    for key, e in by_key.items():
        boot = hierarchical_bootstrap([d[:, :len(e["draws"])] for d in e["draws"]], rng)
        low, high = interval(boot)
        matched = [m for m in e["matched"] if math.isfinite(m)]
        stats[key] = dict(e, index=float(np.mean(e["points"])), boot=boot, ci_low=low, ci_high=high,
                          p_random=fisher(e["p_index"]),
                          matched_index=float(np.mean(matched)) if matched else float("nan"))
    return stats


def _fmt(x, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and math.isfinite(x) else ""


def holm_family(rows: list, keys) -> list:
    """Holm's adjusted p-values of one family, every row x key (the site x ranking x comparison tests the
    verdict reads: their p-values come from bootstrap draws and Fisher's combination, not from shared random
    orders, so no joint null is at hand and Holm's step-down controls the family-wise error under any
    dependence): [{key: adjusted p}] in the rows' order, NaN where the row has no p-value for a key."""
    keys = list(keys)
    flat = multiple_testing.holm([number(r.get(k)) for r in rows for k in keys])
    return [dict(zip(keys, flat[i * len(keys):(i + 1) * len(keys)])) for i in range(len(rows))]


def summary_rows(stats: dict, decides=multiple_testing.IMPORTANCE) -> list:
    """summary.csv's rows: every role's statistics, the real rows with their comparisons against the controls
    at the same site (the same relative depth: the runs share one architecture), and p_corrected: the largest of
    a row's Holm-adjusted p-values (`holm_family` over its role, fraction and family: the rankings that decide the
    verdict, `decides`, apart from the others), so that p_corrected < ALPHA says the row is beyond random lesions
    and every control, corrected."""
    rows = []
    for role, per in stats.items():
        for (layer, method, f), s in sorted(per.items(), key=lambda kv: (kv[1]["depth"], kv[0][1], kv[0][2])):
            row = {"role": role, "layer": layer, "depth": s["depth"], "relative_depth": _fmt(s["relative_depth"], 3),
                   "method": method, "fraction": f, "task_a": s["task_a"], "task_b": s["task_b"],
                   "n_seeds": len(s["seeds"]), "index": _fmt(s["index"]), "ci_low": _fmt(s["ci_low"]),
                   "ci_high": _fmt(s["ci_high"]), "seed_indices": ";".join(_fmt(p) for p in s["points"]),
                   "p_random": _fmt(s["p_random"]), "matched_index": _fmt(s["matched_index"])}
            if role == "real":
                for control in COMPARED:
                    c = stats.get(control, {}).get((layer, method, f))
                    if c is not None:
                        row[f"{control}_index"] = _fmt(c["index"])
                        row[f"p_vs_{control}"] = _fmt(p_greater(s["boot"], c["boot"]))
            rows.append(row)
    for role in stats:
        keys = ["p_random"] + ([f"p_vs_{c}" for c in COMPARED if c in stats]
                               if role == "real" else [])
        for f, kind in dict.fromkeys((r["fraction"], multiple_testing.family_of(r["method"], decides))
                                     for r in rows if r["role"] == role):
            family = [r for r in rows if r["role"] == role and r["fraction"] == f and
                      multiple_testing.family_of(r["method"], decides) == kind]
            for row, adjusted in zip(family, holm_family(family, keys)):
                row["p_corrected"] = _fmt(max(adjusted.values())) if all(
                    math.isfinite(p) for p in adjusted.values()) else ""
    return rows


def _wilson_row(role, seed, task, correct, chance, folder) -> dict:
    acc = float(np.mean(correct))
    low, high = report.wilson(acc, len(correct))
    return {"role": role, "seed": seed, "task": task, "accuracy": _fmt(acc), "ci_low": _fmt(low),
            "ci_high": _fmt(high), "n_images": len(correct), "chance": _fmt(chance), "folder": folder,
            "read_by": "heads"}


# ----------------------------------------------------------------------------------------------------------
# single-task networks


@torch.inference_mode()
def _features(model, images: dict, task: str, split: str, limit: int, seed: int):
    """Penultimate-layer features (the trunk's output) and labels of up to `limit` of a task's images."""
    batches = engine.image_batches({task: images[task]}, split, n_per_task=limit, seed=seed)
    xs = [model.trunk(x).float().cpu().numpy() for _, x, _ in batches]
    ys = [y.cpu().numpy() for _, _, y in batches]
    return np.concatenate(xs), np.concatenate(ys)


def _decode(model, images, task: str, seed: int) -> tuple:
    """A linear probe of `task` on the model's penultimate features: fitted on up to 1,000 training images,
    scored on the test images. Returns (accuracy, n_train, n_test)."""
    xtr, ytr = _features(model, images, task, "train", 1000, seed)
    xte, yte = _features(model, images, task, "test", None, seed)
    probe = inspection.linear_probe().fit(xtr, ytr)
    return float(probe.score(xte, yte)), len(ytr), len(yte)


def single_task_analysis(runs: list, out: Path) -> tuple:
    """accuracy rows of the single-task networks, and single_task.csv's rows: how well each single-task network's
    penultimate layer decodes each task (its own and the other), beside the joint network of the same seed."""
    accuracy_rows, decoding_rows = [], []
    real = {r["seed"]: r for r in runs if r["role"] == "real"}
    singles = [r for r in runs if r["role"] == "single_task"]
    for seed in sorted({r["seed"] for r in singles}):
        joint_config = real[seed]["config"]
        datasets = dualtask.load_datasets(joint_config)
        images = {t: trainer.TaskImages(d, torch.device("cpu")) for t, d in datasets.items()}
        joint, _ = dualtask.load_run(out / real[seed]["folder"])
        joint_decoding = {task: _decode(joint, images, task, seed)[0] for task in images}
        for run in [r for r in singles if r["seed"] == seed]:
            model, _ = dualtask.load_run(out / run["folder"])
            own = run["task"]
            batches = engine.image_batches({own: images[own]}, "test")
            with torch.inference_mode():
                correct = np.concatenate([(model(x)[own].argmax(1) == y).cpu().numpy() for _, x, y in batches])
            accuracy_rows.append(_wilson_row("single_task", seed, own, correct, datasets[own].chance, run["folder"]))
            for task in images:
                single, n_train, n_test = _decode(model, images, task, seed)
                decoding_rows.append({"trained_on": own, "seed": seed, "decoded_task": task,
                                      "single_task_decoding": _fmt(single),
                                      "joint_decoding": _fmt(joint_decoding[task]),
                                      "chance": _fmt(datasets[task].chance), "n_train": n_train, "n_test": n_test})
    return accuracy_rows, decoding_rows


# ----------------------------------------------------------------------------------------------------------
# the verdict and the report


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
    ranking): the real runs' mean split-half overlap}; rf: {site: receptive field share} (None: not recorded)."""
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
            row=dict(r, p_corrected=_fmt(max((adj[k] for k in deciding_keys), default=float("nan")))),
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


def verdict(rows: list, roles_run: set, n_seeds: int, repeats: int, void_resolution: bool = False,
            decides=multiple_testing.IMPORTANCE, reliability: dict | None = None, rf: dict | None = None) -> tuple:
    """(answer, licence, caveats, passing rows) at the headline fraction (`judge`); caveats: first_screen.Caveat,
    those that could change the answer first."""
    j, _ = judge(rows, roles_run, repeats, void_resolution, decides, reliability, rf)
    return words(j, roles_run, n_seeds, repeats, void_resolution)


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


def _accuracy_caveats(accuracy: list) -> list:
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
    """{(site, ranking): the mean over the real runs of each run's split-half overlap (the smaller of the two
    tasks') at the headline fraction}; a pair any run did not measure is left out (not measured)."""
    real = [r for r in rows if r["role"] == "real"]
    if not real or not rankings:
        return {}
    f = V.headline_fraction(r["fraction"] for r in real)
    out = {}
    for r in real:
        key = (r["layer"], r["method"])
        values = [V.reliability(per, r["layer"], r["method"], f, (r["task_a"], r["task_b"])) for per in rankings]
        if values and all(v is not None for v in values):
            out[key] = float(np.mean(values))
    return out


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


def _unreproducible_runs(out: Path, runs: list) -> list:
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
        f"): ranked on two halves of the ranking images, some sites share less than {report.UNRELIABLE:.0%} of their "
        f"top-20% filters (each run's rankings.json and report name them); raise rank_images.", False, 82)]


def build_report(out: Path, runs: list, rows: list, accuracy: list, decoding: list, figure: Path | None,
                 branched: tuple | None = None) -> Path:
    """The experiment's report.html. branched: (branching.csv's rows, its figure) of a branching-point experiment."""
    roles_run = {r["role"] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    n_real = max((int(r["n_seeds"]) for r in rows if r["role"] == "real"), default=0)  # seeds with a sweep
    repeats = min((int(r["config"].get("random_repeats", 0)) for r in runs if r["role"] != "single_task"
                   and "random" in r["config"].get("lesion_methods", [])), default=0)
    void = "resolution_matched" in roles_run and not any(
        "matched to" in str(v.get("source", "")) for r in runs if r["role"] == "resolution_matched"
        for v in read_json(out / r["folder"] / "config.json").get("tasks", {}).values())
    decides = multiple_testing.deciding(runs[0]["config"]) if runs else multiple_testing.IMPORTANCE
    rankings = run_rankings(out, runs)
    j, _ = judge(rows, roles_run, repeats, void, decides, reliability_across(rankings, rows),
                 receptive_across(rankings))
    answer, licence, caveats, _ = words(j, roles_run, n_real or len(seeds), repeats, void)
    unswept = [r["folder"] for r in runs if r["role"] != "single_task" and
               not (out / r["folder"] / "dissociation.csv").exists()]
    if unswept:
        caveats.append(first_screen.Caveat(f"Runs without a lesion sweep, left out of every statistic: "
                                           f"{', '.join(unswept)}.", False, 90))
    caveats = _accuracy_caveats(accuracy) + caveats + _unreproducible_runs(out, runs)
    page = pages.Page(out, {})
    page.raw(f"<h1>Experiment: {html.escape(out.name)}</h1>")
    table = first_screen.table_rows(j, experiment=True) if j is not None else None
    page.raw(first_screen.render(j, answer, table, "", caveats))
    page.section("Notes on the verdict", first_screen.NOTES)
    page.raw(f"<p>{html.escape(licence)}</p>" if licence else "")
    page.raw(first_screen.notes(caveats, first_screen.method_notes(j, "", experiment=True)))
    _report_body(page, out, runs, rows, accuracy, decoding, figure, branched, roles_run)
    path = out / "report.html"
    write_text(path, pages.document(f"Experiment {out.name}", "".join(page.parts)))
    return path


def _report_body(page, out: Path, runs: list, rows: list, accuracy: list, decoding: list, figure: Path | None,
                 branched: tuple | None, roles_run: set) -> None:
    """Everything below the experiment report's verdict: the index across seeds, accuracy, single-task networks,
    branch points and the runs."""
    page.section("The index across seeds")
    page.what("Double-dissociation index per site (mean over seeds, 95% hierarchical bootstrap interval: seeds "
              "resampled, then test images within each seed). p_random: each seed's index against indices made of "
              "random lesions of the same size, combined over seeds (Fisher). p_vs_pseudo_task, p_vs_same_task "
              "and p_vs_resolution_matched: bootstrap p-value that the real index is not above the control's at the "
              "same site. These are uncorrected; p_corrected is the largest of a row's p-values after Holm's "
              "correction over every site x ranking x comparison of its role at its fraction (the rankings that "
              "decide the verdict apart from the selectivity rankings), the verdict's test.")
    if figure is not None:
        page.parts.append(pages.image(figure, figure.name))
    columns = ["role", "layer", "depth", "method", "fraction", "n_seeds", "index", "ci_low", "ci_high", "p_random"]
    real_columns = columns + [k for c in COMPARED if c in roles_run for k in (f"{c}_index", f"p_vs_{c}")] + \
        ["p_corrected"]
    if any(r.get("matched_index") for r in rows):
        real_columns.append("matched_index")
    shown = [dict(r, index=r["index"] or "undefined (a head at chance)") for r in rows]
    page.raw(pages.table([r for r in shown if r["role"] == "real"], real_columns, wide=True))
    controls = [r for r in shown if r["role"] != "real"]
    if controls:
        page.raw("<details><summary>The control networks' own indices</summary>" +
                 pages.table(controls, columns + ["p_corrected"], wide=True) + "</details>")
    page.section("Intact test accuracy")
    page.raw(pages.table(accuracy, list(ACCURACY_COLUMNS)))
    if "single_task" in roles_run:
        page.section("Single-task networks")
        page.what("Each single-task network trained on one task alone; a linear probe on its penultimate layer, "
                  "fitted on training images and scored on test images, decodes each task, beside the joint "
                  "network of the same seed: how much of the other task a network trained without it carries.")
        page.raw(pages.table(decoding, list(SINGLE_COLUMNS)))
    else:
        page.section("Single-task networks")
        page.skip("the single_task control was not run")
    if branched is not None:
        branch_rows, branch_figure = branched
        page.section("Branch points: what sharing the trunk costs")
        page.what("One network per branch point and seed (branch_at: the trunk shared up to that lesion site, then "
                  "one copy of the rest per task; 'shared' = the whole trunk, 'separate' = single-task networks). "
                  "Test accuracy per task with its 95% Wilson interval (branching.csv, which also gives each "
                  "network's parameter count); each cost below is pooled over seeds against the least-shared "
                  "network, with a 95% interval over test images (seeds not resampled).")
        said = branching.sentences(branch_rows)
        page.raw("<ul>" + "".join(f"<li>{html.escape(t)}</li>" for t in said) + "</ul>" if said else
                 "<p>Only one branch point has results: no cost to compare.</p>")
        if branch_figure is not None:
            page.parts.append(pages.image(branch_figure, branch_figure.name))
        page.raw(pages.table(branch_rows, [c for c in branching.BRANCHING_COLUMNS if c != "correct"]))
    page.section("Runs")
    page.raw("<ul>" + "".join(
        f"<li>{html.escape(r['role'])} seed {r['seed']}{' (' + html.escape(r['task']) + ')' if r['task'] else ''}: " +
        (f"<a href='{html.escape(r['folder'])}/report.html'>{html.escape(r['folder'])}</a></li>"
         if (out / r["folder"] / "report.html").exists() else f"{html.escape(r['folder'])} (no report)</li>")
        for r in runs) +
        "</ul>")
    page.raw(f"<p class='what'>Settings: {html.escape(str({k: v for k, v in runs[0]['config'].items() if k not in ('out_dir', 'role', 'seed')}))}</p>")


def aggregate(out: Path, runs: list, seed: int = 0) -> list:
    """The experiment's statistics and report from its finished runs (experiment.plan's list). Returns the
    paths written."""
    out = Path(out)
    rng = np.random.default_rng([seed, 2022])
    stats, accuracy = {}, []
    everything, runs = runs, [r for r in runs if not r.get("branch_point")]  # other branch points: branching.py
    for role in SWEPT_ROLES:
        role_runs = [dict(r, data=read_swept_run(out / r["folder"])) for r in runs if r["role"] == role]
        role_runs = [r for r in role_runs if r["data"] is not None and r["data"]["dissociation"]]
        for r in role_runs:
            for t, v in r["data"]["config"]["tasks"].items():
                correct = r["data"]["per_image"].get(f"intact|{t}")
                if correct is not None:
                    accuracy.append(_wilson_row(role, r["seed"], t, correct, float(v["chance"]), r["folder"]))
        if role_runs:
            stats[role] = role_statistics(role_runs, rng)
    rows = summary_rows(stats, multiple_testing.deciding(runs[0]["config"]) if runs else multiple_testing.IMPORTANCE)
    written = [out / "summary.csv", out / "accuracy.csv"]
    write_csv(written[0], SUMMARY_COLUMNS, rows)
    decoding = []
    if any(r["role"] == "single_task" for r in runs):
        single_accuracy, decoding = single_task_analysis(runs, out)
        accuracy += single_accuracy
        write_csv(out / "single_task.csv", SINGLE_COLUMNS, decoding)
        written.append(out / "single_task.csv")
    write_csv(written[1], ACCURACY_COLUMNS, accuracy)
    figure = figures.experiment_figure(rows, out / "figures" / "dissociation_by_depth.png") if rows else None
    if figure is not None:
        written.append(figure)
    branched = None
    if len(everything) > len(runs):  # the branching-point experiment
        branch_rows = branching.branching_rows(out, everything)
        write_csv(out / "branching.csv", branching.BRANCHING_COLUMNS, branch_rows)
        branched = (branch_rows, branching.figure(branch_rows, out / "figures" / "branching.png"))
        written += [out / "branching.csv"] + ([branched[1]] if branched[1] else [])
    written.append(build_report(out, everything, rows, accuracy, decoding, figure, branched))
    return written
