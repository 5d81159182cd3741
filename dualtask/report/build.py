"""One self-contained HTML report per run, rebuilt from the run's own files (no retraining, no re-lesioning).

    python -m dualtask.report runs/vgg16        # writes runs/vgg16/report.html

It opens on the verdict (verdict.py decides it, first_screen.py words it); every figure is embedded; a section
whose files are missing says so in one line instead.
"""
from __future__ import annotations

import html
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

from dualtask.core.common import exit_on_damaged_files, read_csv, read_json, write_text
from dualtask.core.common import number as _num
from dualtask.core.names import READOUT_DIRS
from dualtask.report import filter_sets, first_screen, pages, probes_report, sections, train_health
from dualtask.report.sections import correction_text
from dualtask.stats import multiple_testing
from dualtask.stats import verdict as V

FIGURES_STATUS = pages.FIGURES_STATUS  # what each part of the figures stage wrote, or why it failed
ALPHA = V.ALPHA  # the level of the verdict's tests
NEAR_CHANCE = 0.05  # a head whose intact accuracy is less than this above chance has learned too little
INTACT_COLUMNS = ("eval_task", "intact_accuracy", "n_images", "chance")  # what the report reads of the results
# what it reads of dissociation.csv
DISSOCIATION_COLUMNS = ("layer", "depth", "method", "fraction", "task_a", "task_b", "index", "ci_low", "ci_high",
                        "p_index", "drop_a_by_a", "drop_a_by_b", "drop_b_by_b", "drop_b_by_a", "p_a_by_a",
                        "p_b_by_b", "n_random")

STYLE, _image, _table = pages.STYLE, pages.image, pages.table
Report = pages.Page


def wilson(p: float, n: int, z: float = 1.96):
    """95% Wilson interval of a proportion p observed on n trials: scipy's, for round(p * n) successes."""
    from scipy.special import ndtr
    from scipy.stats import binomtest

    if n == 0 or not math.isfinite(p):
        return float("nan"), float("nan")
    ci = binomtest(int(round(p * n)), int(n)).proportion_ci(confidence_level=float(2 * ndtr(z) - 1), method="wilson")
    return float(ci.low), float(ci.high)


def intact_accuracies(lesion_rows: list) -> dict:
    """{task: (intact test accuracy, test images, chance)} from lesion_results.csv's rows."""
    intact = {}
    for row in lesion_rows:
        intact.setdefault(row["eval_task"], (float(row["intact_accuracy"]), int(row["n_images"]),
                                             float(row["chance"])))
    return intact


_ci = first_screen.ci_text


def verdict(row: dict) -> str:
    """A dissociation.csv row's test against the random lesions, as the tables say it (verdict.test decides)."""
    return V.test(row).value


def repeats_needed(alpha: float = ALPHA) -> int:
    """The fewest random repeats R whose smallest p_index, 1/(R+2), is below alpha (one ranking, one site)."""
    return multiple_testing.repeats_needed(1, alpha)


def _top_overlap(rankings: dict, site: str, methods: list, task: str, fraction: float):
    """(shared, k, expected by chance) of two methods' top-`fraction` filters for `task` at a site."""
    try:
        orders = [rankings[site][m][task]["order"] for m in methods]
    except KeyError:
        return None
    n = len(orders[0])
    k = int(round(fraction * n))
    if k == 0:
        return None
    return len(set(orders[0][:k]) & set(orders[1][:k])), k, k * k / n


def summary(config: dict, status: dict, results: list, diss: list, rankings: dict, checkup: dict | None = None,
            readouts: dict | None = None, control: list | None = None) -> str:
    """The report's first screen (first_screen.render): the verdict sentence, the table of the sites behind it, the
    intact accuracies and the caveats that could change the answer, with a link to the rest (`summary_parts`)."""
    return summary_parts(config, status, results, diss, rankings, checkup, readouts, control)[0]


def summary_parts(config: dict, status: dict, results: list, diss: list, rankings: dict,
                  checkup: dict | None = None, readouts: dict | None = None, control: list | None = None) -> tuple:
    """(first screen HTML, notes HTML, the judgement or None). results, diss, rankings: the rows of
    lesion_results.csv and dissociation.csv and rankings.json (empty when missing); checkup: train_health.json;
    readouts: {kind: read_readout(...)} (a kind None when not run); control: a resolution-matched run's
    dissociation rows (same experiment and seed), None when none is at hand."""
    readouts = readouts or {}
    fixed, refit = readouts.get("fixed"), readouts.get("refit")
    j = V.judge_run(diss, results, rankings, config, fixed and fixed["dissociation"], fixed and fixed["results"],
                    control) if results else None
    caveats = []
    if not results:
        answer = ("No lesion results yet (the lesion stage has not run): this run cannot say whether "
                  "task-specialised filters emerged.")
    elif j is None:
        answer = ("No dissociation index: it needs a targeted ranking (activation, localiser, loss, greedy, taylor or "
                  "mask) and two tasks; this run's lesions give only the per-task drops shown below.")
    else:
        answer = first_screen.sentence(j)
        caveats = first_screen.rule_caveats(j, "an experiment's resolution_matched control (controls="
                                               "['resolution_matched']) decides")
        caveats += _run_dissociation_caveats(config, j, rankings, fixed is not None)
        if refit is not None:
            caveats.append(_refit_caveat(refit["dissociation"], config))
    caveats += _run_caveats(config, status, results, j, checkup)
    table = first_screen.table_rows(j) if j is not None else None
    screen = first_screen.render(j, answer, table, _intact_line(results, fixed), caveats)
    correction = correction_text(j.family) if j is not None else ""
    return screen, first_screen.notes(caveats, first_screen.method_notes(j, correction)), j


def _intact_line(results: list, fixed: dict | None) -> str:
    """The intact accuracies, each named by what read it."""
    parts = []
    for who, rows in (("the heads", results), ("fixed readouts", (fixed or {}).get("results") or [])):
        intact = intact_accuracies(rows)
        if intact:
            parts.append(f"through {who}: " + "; ".join(f"{t} {acc:.3f} (chance {chance:.3f})"
                                                         for t, (acc, _, chance) in intact.items()))
    return ("Intact test accuracy " + "; ".join(parts) + ".") if parts else ""


def _run_dissociation_caveats(config: dict, j: V.Judgement, rankings: dict, fixed_ran: bool) -> list:
    """The caveats a run's dissociation rows call for beside the verdict's rules: the heads alone, rankings that
    disagree, greedy sets past the greedy stop, and what the random repeats allow."""
    Caveat = first_screen.Caveat
    caveats = []
    if not fixed_ran and j.answer is V.Answer.YES:
        caveats.append(Caveat("A single network's 'yes' through its heads alone does not separate task "
                              "specialisation from two readouts: two heads trained on one task lean on different "
                              "filters at late sites too. Fixed readouts (fixed_readout=True) or an experiment's "
                              "same_task control tell the two apart.", True, 40))
    caveats += _disagreement(j, rankings)
    beyond = list(dict.fromkeys(f.site for f in j.findings if f.ranking == "greedy"
                                and str(f.row.get("beyond_greedy_stop", "")).strip() == "1"))
    if beyond:
        caveats.append(Caveat(f"At {j.fraction:.0%} lesions the greedy ranking's sets reach past its stop (greedy_stop "
                              f"{config.get('greedy_stop', 0.2)}) at {len(beyond)} site(s), "
                              f"{first_screen.names(beyond, 6)}: their last filters follow the last greedy step's "
                              f"scores rather than a greedy choice (beyond_greedy_stop in dissociation.csv); raise "
                              f"greedy_stop to rank them greedily.", False, 85))
    if "random" not in config.get("lesion_methods", ["random"]):
        caveats.append(Caveat("No random lesions were run, so no lesion can be compared with random filters of the "
                              "same size and no p-value exists; add 'random' to lesion_methods.", True, 30))
    else:
        floor = first_screen.floor_caveat(j)
        caveats += [floor] if floor else []
    return caveats


def _disagreement(j: V.Judgement, rankings: dict) -> list:
    """Sites where one ranking's interval lies above 0 and another's does not, with their top sets' overlap."""
    above = {(f.site, f.ranking): V.above_zero(f.row) for f in j.findings}
    by_site = {}
    for f in j.findings:
        by_site.setdefault(f.site, {})[f.ranking] = f
    disagree = []
    a = j.tasks[0]
    for site, per in by_site.items():
        found = [m for m in per if above[site, m]]
        if found and len(found) < len(per):
            others = [m for m in per if m not in found]
            text = (f"{site}: {', '.join(f'{m} {_ci(per[m].row)}' for m in found)} finds a split, "
                    f"{', '.join(f'{m} {_ci(per[m].row)}' for m in others)} does not")
            overlap = _top_overlap(rankings, site, [found[0], others[0]], a, j.fraction)
            if overlap:
                shared, k, expected = overlap
                text += (f" (their top-{j.fraction:.0%} {a} filters share {shared} of {k}; random sets would share "
                         f"about {expected:.1f})")
            disagree.append(text)
    if not disagree:
        return []
    return [first_screen.Caveat(
        f"The rankings disagree at {len(disagree)} site(s) (interval above 0 for one, not for another): " +
        "; ".join(disagree[:4]) + ("; ..." if len(disagree) > 4 else "") + ". Selectivity (activation) often "
        "predicts importance (loss) poorly (Morcos et al. 2018), which is why only importance rankings decide.",
        False, 80)]


def _refit_caveat(refit: list, config: dict):
    """What the refitted readouts (readouts.py) say at the headline fraction: a note, not part of the verdict."""
    if not refit:
        return first_screen.Caveat("The refitted readouts found no index to compute.", False, 92)
    f = V.headline_fraction(r["fraction"] for r in refit)
    rows = [r for r in refit if abs(_num(r["fraction"]) - f) < 1e-6]
    sites = list(dict.fromkeys(r["layer"] for r in rows if V.test(r) is V.Test.DISSOCIATES and
                               r["method"] in V.deciding(config)))
    said = (f"dissociate at {len(sites)} of {len({r['layer'] for r in rows})} sites ({first_screen.names(sites)})"
            if sites else "dissociate at no site")
    return first_screen.Caveat(
        f"Through readouts refitted to the lesioned features (refit_readout/), the tasks' filters {said}: what the "
        f"features still hold, not what a head reads. They are not part of the verdict: refitted readouts lost the "
        f"branched networks' split in benchmarks/verdict_calibration.py, whose features stay linearly readable after "
        f"a 20% lesion.", False, 92)


def _run_caveats(config: dict, status: dict, results: list, j, checkup: dict | None) -> list:
    """What the whole run calls for: heads near chance, training health, keep-only lesions, parts that failed,
    and what one network cannot show."""
    Caveat = first_screen.Caveat
    caveats = []
    for task, (accuracy, n, chance) in intact_accuracies(results).items():
        low, high = wilson(accuracy, n)
        if accuracy - chance < NEAR_CHANCE or low <= chance:
            caveats.append(Caveat(f"The {task} head is near chance: intact test accuracy {accuracy:.3f} (95% CI "
                                  f"{low:.3f} to {high:.3f}, {n} images) against chance {chance:.3f}. Its "
                                  f"chance-corrected drops, and every index that uses them, mean little; train it "
                                  f"further before reading its lesions.", bool(j), 10))
    lesioned = {r["layer"] for r in results}
    unhealthy = bool(checkup and train_health.unresolved(checkup) and results)
    caveats += [Caveat(text, unhealthy, 20) for text in train_health.caveats(checkup or {}, lesioned)]
    if config.get("lesion_keep_only"):
        caveats.append(Caveat("Keep-only lesions: a ranking's selected filters are the ones kept and every other "
                              "filter of the site is silenced, so keeping a task's filters should spare that task and "
                              "a split shows as a negative index ('reversed'), not a positive one: read every index "
                              "with its sign reversed.", True, 15))
    failed = [f"{part} ({entry.get('error')})" for part, entry in status.items() if not entry.get("ok", True)]
    if failed:
        caveats.append(Caveat(f"Not written, because they failed: {'; '.join(failed)}.", False, 95))
    if config.get("network"):  # a network this tool did not train (python lesion_utils.py)
        caveats.append(Caveat(
            f"A network trained elsewhere ({config['network']}, weights {config.get('weights', 'random')}), read "
            f"through linear readouts: its heads were fitted here to its frozen features at "
            f"{config.get('readout_layer_used') or config.get('readout_layer') or 'its classifier input'} on the "
            f"training images (and the fixed readouts, cross-fitted on the test images, read the same features). A "
            f"split says which filters the information each readout reads depends on, not which filters the network "
            f"itself used for either task; no seeds or controls of this network ran. Its inputs were normalised as "
            f"this tool's are (each channel (x - 0.5) / 0.5), not with the statistics it may have been trained with "
            f"(ImageNet's), which can lower what its features carry.", True, 60))
    elif config.get("role"):  # one run of an experiment (experiment.py)
        caveats.append(Caveat(f"One network of an experiment ({config['role']}, seed {config.get('seed')}): the "
                              f"experiment's report.html (in the experiment's folder) weighs it against the other "
                              f"seeds and the controls.", False, 97))
    else:
        caveats.append(Caveat(f"One network, trained from seed {config.get('seed')}, and no controls: without "
                              f"networks from other seeds, a resolution-matched control, a pseudo-task control or "
                              f"single-task networks, this run cannot show that a split holds across networks or "
                              f"comes from the tasks rather than from their images (the seeds and controls settings "
                              f"run them).", False, 97))
    return caveats


def unreproducible(rankings: dict, fraction: float) -> list:
    """['site method task: overlap (chance c), p'] of the rankings whose top-`fraction` sets, ranked on two halves of
    the ranking images, share no more than random sets would (verdict.task_agreement: one-sided p not below
    verdict.RELIABILITY_ALPHA)."""
    out = []
    for site, per in rankings.items():
        for method, tasks in (per.get("reliability") or {}).items():
            for task in tasks:
                a = V.task_agreement(rankings, site, method, fraction, task)
                if a is not None and not a.reproduces:
                    out.append(f"{site} {method} {task}: {a.text()}")
    return out


def build_report(run_dir) -> Path:
    """Write run_dir/report.html from the run's files and return its path. It opens on the answer and its
    caveats; the figures, tables and settings follow."""
    run_dir = Path(run_dir)
    config, status, results, diss, rankings, readouts = _run_files(run_dir)
    tasks = list(config.get("tasks", {}))
    r = Report(run_dir, status)
    r.section("Summary")
    screen, notes, _ = summary_parts(config, status, results, diss, rankings, train_health.read(run_dir), readouts,
                                     resolution_control(run_dir, config))
    r.raw(screen)

    _intact_section(r, config, results)

    _lesion_sections(r, results, diss, rankings)
    _probes_section(r, run_dir)
    r.section("Notes on the verdict", first_screen.NOTES)
    r.raw(notes)
    _readout_sections(r, readouts)
    if config.get("lesion_epochs"):
        r.section("Dissociation by epoch")
        r.figure("dissociation_by_epoch.png", "The index by depth for each swept epoch (epoch_<N>/ holds each "
                 "epoch's own lesion files): when during training a split appears, and where.",
                 "dissociation by epoch")

    r.section("Training")
    r.figure("training_curves.png", "Accuracy and loss of each head on its own task, per epoch, on training "
             "batches (augmented) and on the validation images.", "training curves")

    sections.gradcam_section(r, run_dir, tasks)

    sections.stimuli_section(r, run_dir)

    r.section("Layer-wise decoding")
    r.figure("decoding_by_depth.png", "Cross-validated accuracy of a linear probe reading each task's labels "
             "from each site's spatially pooled activations: where task information becomes linearly "
             "separable, to set beside where lesions dissociate.", "decoding")

    sections.settings_section(r, config)

    title = f"Dual-task lesion report: {run_dir.name} ({config.get('backbone', '?')})"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = pages.document(title, f"<h1>{html.escape(title)}</h1><p>Built {stamp} from the files in "
                                 f"{html.escape(str(run_dir))}.</p>" + "".join(r.parts))
    out = run_dir / "report.html"
    write_text(out, page)
    return out


def _run_files(run_dir: Path) -> tuple:
    """(config, figures status, lesion_results.csv's rows, dissociation.csv's rows (corrected as the verdict's
    family says, where an older sweep's file lacks it), rankings, {kind: read_readout(...)}) of a run; a file
    missing is empty (the config excepted)."""
    config = read_json(run_dir / "config.json", lambda v: isinstance(v, dict) and isinstance(v.get("tasks", {}), dict),
                       "a run's settings")
    status_path = run_dir / FIGURES_STATUS
    status = read_json(status_path, lambda v: isinstance(v, dict) and all(isinstance(e, dict) for e in v.values()),
                       "the figures stage's status") if status_path.exists() else {}
    results_path, diss_path, rankings_path = (run_dir / n for n in ("lesion_results.csv", "dissociation.csv",
                                                                     "rankings.json"))
    results = read_csv(results_path, INTACT_COLUMNS) if results_path.exists() else []
    diss = read_csv(diss_path, DISSOCIATION_COLUMNS) if diss_path.exists() else []
    decides = V.deciding(config)
    diss = multiple_testing.corrected_rows(diss, results, force=False, decides=decides)  # an older sweep's file
    rankings = read_json(rankings_path, lambda v: isinstance(v, dict), "rankings by site") \
        if rankings_path.exists() else {}
    readouts = {kind: read_readout(run_dir, kind, decides) for kind in READOUT_DIRS}
    return config, status, results, diss, rankings, readouts


def _lesion_sections(r: Report, results: list, diss: list, rankings: dict) -> None:
    """Lesions by depth, dissociation by depth (with its table) and, where run, the localiser and masks."""
    r.section("Lesions by depth")
    r.figure("lesion_effects.png", "Chance-corrected drop of each task's accuracy when the most task-important "
             "20% of a site's filters are silenced, per site and ranking method; shading is the range over random "
             "lesions of the same size. A task-specific site hurts the targeted task above the random band and "
             "spares the other.", "lesion effects")

    r.section("Dissociation by depth")
    r.figure("dissociation_by_depth.png", "The double-dissociation index per site (0 = no task split) with its "
             "95% bootstrap interval over test images, beside the range of indices built from pairs of random "
             "lesions (grey).", "dissociation by depth")
    r.raw(sections.dissociation_table(diss))
    selective = filter_sets.localiser_sentence(filter_sets.localiser_rows(rankings, results))
    masks = filter_sets.mask_sentence(filter_sets.mask_rows(rankings))
    if selective or masks:
        r.section("Localiser and learned masks")
        for text in (selective, masks):
            if text:
                r.what(text)


def _probes_section(r: Report, run_dir: Path) -> None:
    """The behavioural probes (probes.csv), where they ran."""
    probe_rows = probes_report.read_rows(run_dir) if (run_dir / "probes.csv").exists() else []
    if probe_rows:
        r.section("Behavioural probes")
        for text in (probes_report.inversion_sentence(probe_rows), probes_report.transfer_sentence(probe_rows)):
            if text:
                r.what(text)
        r.figure("probes.png", "Each probe across the swept sites: the inversion effect (upright minus upside-down "
                 "accuracy, 95% interval) or the held-out task's probe accuracy, under each task's filters' lesions; "
                 "grey: the random lesions' range; dashed: the intact network.", "probes")


def _readout_sections(r: Report, readouts: dict) -> None:
    """The dissociation tables of the fixed and the refitted readouts, where they ran."""
    if readouts["fixed"]:
        r.section("Fixed readouts")
        r.what("The same lesions, each task scored by linear readouts (ridge on standardised features) fitted once "
               "to the intact network's features of its test images in 10 folds, each image read by the readout "
               "fitted on the other nine, never refitted: whether the filters a head needs carry its task for any "
               "readout of it, where two heads of one task cannot differ (fixed_readout/). The summary's verdict "
               "asks a site to dissociate here too.")
        r.raw(sections.dissociation_table(readouts["fixed"]["dissociation"]))
    if readouts["refit"]:
        r.section("Refitted readouts")
        r.what("The same lesions, each task scored by a linear readout (ridge on standardised features) fitted anew "
               "to the lesioned network's features on its training images: what the features still hold for the "
               "task, rather than what its head reads (refit_readout/).")
        r.raw(sections.dissociation_table(readouts["refit"]["dissociation"]))


def read_readout(run_dir: Path, kind: str, decides=V.IMPORTANCE) -> dict | None:
    """{'dissociation': the rows of a run's readout sweep's dissociation.csv, corrected as the verdict's family
    `decides` says, 'results': its lesion_results.csv rows} (kind "fixed": fixed_readout/, "refit": refit_readout/);
    None when it did not run."""
    folder = Path(run_dir) / READOUT_DIRS[kind]
    if not (folder / "dissociation.csv").exists():
        return None
    results = _results_of(folder)
    return {"dissociation": multiple_testing.corrected_rows(read_csv(folder / "dissociation.csv", DISSOCIATION_COLUMNS),
                                                            results, force=False, decides=decides),
            "results": results}


def _results_of(folder: Path) -> list:
    """The rows of a folder's lesion_results.csv, [] where it has none."""
    path = folder / "lesion_results.csv"
    return read_csv(path, INTACT_COLUMNS) if path.exists() else []


def resolution_control(run_dir: Path, config: dict) -> list | None:
    """The dissociation rows of the resolution-matched run of the same experiment and seed (experiment.plan's
    folders: <experiment>/seed_<N>/ and <experiment>/resolution_matched/seed_<N>/), None when there is none yet
    (an experiment runs its controls after its real runs: their reports are rebuilt by `python -m dualtask.report`)."""
    if config.get("role") != "real":
        return None
    folder = Path(run_dir).parent / "resolution_matched" / Path(run_dir).name
    path = folder / "dissociation.csv"
    if not path.exists() or not (folder / "config.json").exists():
        return None
    if read_json(folder / "config.json", lambda v: isinstance(v, dict), "a run's settings").get("role") != \
            "resolution_matched":
        return None
    results = _results_of(folder)
    return multiple_testing.corrected_rows(read_csv(path, DISSOCIATION_COLUMNS), results, force=False,
                                           decides=V.deciding(config))


def _intact_section(r: Report, config: dict, results: list) -> None:
    r.section("Intact accuracy")
    intact = intact_accuracies(results)
    if not intact:
        r.skip("lesion_results.csv is missing: the lesion stage has not run")
    r.what("Each head's test accuracy on its own task before any lesion, with its 95% Wilson interval, and each "
           "task's data.")
    rows = []
    for t, v in config.get("tasks", {}).items():
        row = {"task": t, "classes": v["classes"], "chance": f"{v['chance']:.3f}", "source": v["source"],
               **v["counts"]}
        if t in intact:
            a, n, _ = intact[t]
            row.update({"accuracy": f"{a:.3f}", "95% interval": "{:.3f} to {:.3f}".format(*wilson(a, n))})
        rows.append(row)
    r.raw(_table(rows, ["task", "accuracy", "95% interval", "chance", "classes", "train", "val", "test", "source"]))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m dualtask.report RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    if not (run_dir / "config.json").exists():
        print(f"error: {run_dir} is not a run folder (no config.json); expected a folder written by a backbone "
              f"script, e.g. runs/vgg16", file=sys.stderr)
        return 2
    with exit_on_damaged_files(f"cannot build the report from {run_dir}"):
        print(f"wrote {build_report(run_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
