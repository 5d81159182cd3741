"""The aggregate of an experiment (experiment.py): the dissociation index across training seeds with a
hierarchical bootstrap interval, the real tasks weighed against the control networks, single-task baselines,
and the experiment's report.html, which opens on the verdict (judgement.py judges and words it).

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
from dualtask.experiment.judgement import (
    COMPARED,
    accuracy_caveats,
    fmt,
    holm_family,
    judge,
    receptive_across,
    reliability_across,
    run_rankings,
    unreproducible_runs,
    words,
)
from dualtask.lesion import dissociation, engine
from dualtask.report import build as report
from dualtask.report import figures, first_screen, pages
from dualtask.stats import multiple_testing
from dualtask.training import trainer

N_BOOT = 1000  # hierarchical bootstrap draws
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


def summary_rows(stats: dict, decides=multiple_testing.IMPORTANCE) -> list:
    """summary.csv's rows: every role's statistics, the real rows with their comparisons against the controls
    at the same site (the same relative depth: the runs share one architecture), and p_corrected: the largest of
    a row's Holm-adjusted p-values (`holm_family` over its role, fraction and family: the rankings that decide the
    verdict, `decides`, apart from the others), so that p_corrected < ALPHA says the row is beyond random lesions
    and every control, corrected."""
    rows = []
    for role, per in stats.items():
        for (layer, method, f), s in sorted(per.items(), key=lambda kv: (kv[1]["depth"], kv[0][1], kv[0][2])):
            row = {"role": role, "layer": layer, "depth": s["depth"], "relative_depth": fmt(s["relative_depth"], 3),
                   "method": method, "fraction": f, "task_a": s["task_a"], "task_b": s["task_b"],
                   "n_seeds": len(s["seeds"]), "index": fmt(s["index"]), "ci_low": fmt(s["ci_low"]),
                   "ci_high": fmt(s["ci_high"]), "seed_indices": ";".join(fmt(p) for p in s["points"]),
                   "p_random": fmt(s["p_random"]), "matched_index": fmt(s["matched_index"])}
            if role == "real":
                for control in COMPARED:
                    c = stats.get(control, {}).get((layer, method, f))
                    if c is not None:
                        row[f"{control}_index"] = fmt(c["index"])
                        row[f"p_vs_{control}"] = fmt(p_greater(s["boot"], c["boot"]))
            rows.append(row)
    for role in stats:
        keys = ["p_random"] + ([f"p_vs_{c}" for c in COMPARED if c in stats]
                               if role == "real" else [])
        for f, kind in dict.fromkeys((r["fraction"], multiple_testing.family_of(r["method"], decides))
                                     for r in rows if r["role"] == role):
            family = [r for r in rows if r["role"] == role and r["fraction"] == f and
                      multiple_testing.family_of(r["method"], decides) == kind]
            for row, adjusted in zip(family, holm_family(family, keys)):
                row["p_corrected"] = fmt(max(adjusted.values())) if all(
                    math.isfinite(p) for p in adjusted.values()) else ""
    return rows


def _wilson_row(role, seed, task, correct, chance, folder) -> dict:
    acc = float(np.mean(correct))
    low, high = report.wilson(acc, len(correct))
    return {"role": role, "seed": seed, "task": task, "accuracy": fmt(acc), "ci_low": fmt(low),
            "ci_high": fmt(high), "n_images": len(correct), "chance": fmt(chance), "folder": folder,
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
                                      "single_task_decoding": fmt(single),
                                      "joint_decoding": fmt(joint_decoding[task]),
                                      "chance": fmt(datasets[task].chance), "n_train": n_train, "n_test": n_test})
    return accuracy_rows, decoding_rows


# ----------------------------------------------------------------------------------------------------------
# the verdict and the report (the verdict's tests and words: judgement.py)


def verdict(rows: list, roles_run: set, n_seeds: int, repeats: int, void_resolution: bool = False,
            decides=multiple_testing.IMPORTANCE, reliability: dict | None = None, rf: dict | None = None) -> tuple:
    """(answer, licence, caveats, passing rows) at the headline fraction (`judge`); caveats: first_screen.Caveat,
    those that could change the answer first."""
    j, _ = judge(rows, roles_run, repeats, void_resolution, decides, reliability, rf)
    return words(j, roles_run, n_seeds, repeats, void_resolution)


def build_report(out: Path, runs: list, rows: list, accuracy: list, decoding: list, figure: Path | None,
                 branched: tuple | None = None) -> Path:
    """The experiment's report.html. branched: (branching.csv's rows, its figure) of a branching-point experiment."""
    roles_run = {r["role"] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    n_real = max((int(r["n_seeds"]) for r in rows if r["role"] == "real"), default=0)  # seeds with a sweep
    repeats = min((multiple_testing.random_repeats(r["config"]) for r in runs if r["role"] != "single_task"
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
    caveats = accuracy_caveats(accuracy) + caveats + unreproducible_runs(out, runs)
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
    settings = {k: v for k, v in runs[0]["config"].items() if k not in ("out_dir", "role", "seed")}
    page.raw(f"<p class='what'>Settings: {html.escape(str(settings))}</p>")


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
