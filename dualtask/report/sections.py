"""Tables and sections of the report (report.html, build.py) below its first screen: the dissociation table at
the headline fraction with how its p-values were corrected, in words; where each head looks (Grad-CAM) with the
overlap of two heads' maps and its permutation test, in words; the preferred stimuli of each stage's sites; and
the run's settings."""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

from dualtask.core.common import number as _num
from dualtask.core.common import read_csv, read_json
from dualtask.report import first_screen, pages
from dualtask.report.figures import stimuli_file
from dualtask.stats import multiple_testing
from dualtask.stats import verdict as V

_table = pages.table
_ci, _p = first_screen.ci_text, first_screen.p_text


def gradcam_section(r: pages.Page, run_dir: Path, tasks: list) -> None:
    r.section("Where each head looks (Grad-CAM)")
    if not r.failed("Grad-CAM"):
        overlap = run_dir / "gradcam_overlap.csv"
        overlap_rows = read_csv(overlap, ("images", "head_a", "head_b", "mean_iou_top5")) if overlap.exists() else []
        # one set of test images per task, or one set shared by tasks labelling the same images ('a+b')
        for t in list(dict.fromkeys(row["images"] for row in overlap_rows)) or tasks:
            shared = " (the same images for these tasks)" if "+" in t else ""
            r.figure(f"gradcam_{t}_images.png", f"{t.replace('+', ' and ')} test images{shared} and, below them, "
                     f"each head's Grad-CAM map: the regions whose activation raises that head's predicted score.")
        r.figure("gradcam_mean.png", "Each head's mean map over each set of test images, drawn on that set's "
                 "mean image.")
        if overlap_rows and "p_permutation" in overlap_rows[0]:
            r.what("Overlap (intersection over union, IoU) of two heads' top-5% regions on the same image, averaged "
                   "over the images (1 = they attend to the same pixels), with its 95% bootstrap interval over "
                   "images; null_mean is the mean IoU when one head's map of an image is paired with the other "
                   "head's map of another image (random permutations of the images), which keeps each head's own "
                   "spatial prior such as a centre bias, and p_permutation is the one-sided permutation p-value of "
                   "the overlap exceeding that chance pairing.")
        elif overlap_rows:
            r.what("Overlap (intersection over union) of the two heads' top-5% regions on the same images: 1 = "
                   "they attend to the same pixels.")
        if overlap_rows:
            shown = [c for c in OVERLAP_SHOWN if c in overlap_rows[0]]
            r.raw(_table(overlap_rows, shown))
            r.raw(f"<p>{html.escape(overlap_reading(overlap_rows))}</p>")


def stimuli_section(r: pages.Page, run_dir: Path) -> None:
    r.section("Preferred stimuli")
    if not r.failed("preferred stimuli"):
        stimuli = sorted((run_dir / "figures").glob("stimuli_*.png")) if (run_dir / "figures").exists() else []
        stages = _stimuli_stages(run_dir)  # {figure name: (site, stage)} in depth order, from stimuli.json
        stimuli.sort(key=lambda path: list(stages).index(path.name) if path.name in stages else len(stages))
        for path in stimuli:
            site, stage, _ = stages.get(path.name, (None, None, None))
            where = f"Stage {stage}, {site}: f" if stage else "F"
            r.figure(path.name, f"{where}or the most task-ranked filters of this site: the test images that "
                     "activate each most (labelled with their task and class) and a synthetic image grown by "
                     "gradient ascent from noise.")
        unranked = [f"{stage} ({site})" for site, stage, skipped in stages.values() if skipped and stage]
        if unranked:
            r.what(f"No preferred stimuli at stage(s) {', '.join(unranked)}: none of the stage's sites was lesioned "
                   f"(lesion_layers), so none has a filter ranking.")
        if not stimuli:
            r.skip("no figures/stimuli_*.png: they need rankings.json from the lesion stage and the figures stage")


def settings_section(r: pages.Page, config: dict) -> None:
    r.section("Settings and provenance")
    r.what("The resolved settings of this run (config.json): backbone, data, training and lesion parameters, "
           "package versions, device, command line and git commit.")
    shown = {k: v for k, v in config.items() if k != "tasks"}
    r.raw("<details><summary>All settings</summary>" +
          _table([{"setting": k, "value": json.dumps(v)} for k, v in shown.items()], ["setting", "value"]) +
          "</details>")


# gradcam_overlap.csv's columns as the report shows them; a run written before the permutation test has sd
# instead of ci_low .. n_permutations, and the report shows what it has
OVERLAP_SHOWN = ("images", "head_a", "head_b", "site", "mean_iou_top5", "ci_low", "ci_high", "sd", "null_mean",
                 "p_permutation", "n_permutations", "n")


def _p_small(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1g}"


def overlap_reading(rows: list) -> str:
    """One sentence reading gradcam_overlap.csv: for each set of images and pair of heads, whether the heads
    attend to the same image-specific regions more than chance pairing of images (p_permutation < ALPHA)."""
    if not rows or "p_permutation" not in rows[0]:
        return ("These overlaps predate the permutation test over images (rerun the figures stage for it), so they "
                "cannot tell heads that attend to the same image-specific regions from heads that share a spatial "
                "prior such as a centre bias.")
    parts = []
    for row in rows:
        iou, low, high = _num(row["mean_iou_top5"]), _num(row.get("ci_low")), _num(row.get("ci_high"))
        null, p = _num(row.get("null_mean")), _num(row["p_permutation"])
        who = f"on {row['images'].replace('+', ' and ')} images the {row['head_a']} and {row['head_b']} heads"
        numbers = (f"IoU {iou:.2f} [{low:.2f}, {high:.2f}] against {null:.2f} under chance pairing, "
                   f"p = {_p_small(p)}" if math.isfinite(p) else "no p-value")
        if p < V.ALPHA:
            parts.append(f"{who} attend to the same image-specific regions more than chance pairing ({numbers})")
        else:
            parts.append(f"{who} are not shown to attend to the same image-specific regions more than chance "
                         f"pairing ({numbers})")
    text = "; ".join(parts)
    return f"{text[0].upper()}{text[1:]} (one-sided permutation test over images, p < {V.ALPHA})."


def _stimuli_stages(run_dir: Path) -> dict:
    """{figure name: (site, stage name, skipped)} of stimuli.json in its (depth) order; the stage is None for a
    run written before stimuli.json named stages; {} without the file."""
    path = run_dir / "stimuli.json"
    summary = read_json(path, lambda v: isinstance(v, dict), "preferred stimuli by site") if path.exists() else {}
    return {stimuli_file(site): (site, entry.get("stage"), "skipped" in entry)
            for site, entry in summary.items() if isinstance(entry, dict)}


def correction_text(family: dict) -> str:
    """How the headline's p-values were corrected (multiple_testing.family of its rows), in words."""
    n, m, k, r = (family[key] for key in ("n_tests", "n_sites", "n_rankings", "repeats"))
    tests = (f"corrected for {n} test{'s' if n != 1 else ''} over {m} site{'s' if m != 1 else ''} and {k} "
             f"ranking{'s' if k != 1 else ''}")
    if family["method"] == multiple_testing.MAX_STATISTIC:
        return (f"{tests} by a max-statistic test over the {r} random orders" +
                (" (Bonferroni over the rankings)" if k > 1 else ""))
    if family["method"] == multiple_testing.HOLM:
        return (f"{tests} by Holm's method on the per-site p-values (no joint null across sites: "
                f"{family['why']})")
    return ""


def dissociation_table(rows: list) -> str:
    """The dissociation table at the headline fraction, with the tasks' names in its columns."""
    if not rows:
        return ""
    f = V.headline_fraction(r["fraction"] for r in rows)
    keep = [x for x in rows if abs(_num(x["fraction"]) - f) < 1e-6]
    a, b = keep[0]["task_a"], keep[0]["task_b"]
    names = {"drop_a_by_a": f"drop_{a}_by_{a}", "drop_a_by_b": f"drop_{a}_by_{b}",
             "drop_b_by_b": f"drop_{b}_by_{b}", "drop_b_by_a": f"drop_{b}_by_{a}",
             "p_a_by_a": f"p_{a}_by_{a}", "p_b_by_b": f"p_{b}_by_{b}"}
    table = []
    for x in keep:
        null = (f"{_num(x.get('null_low')):.3f} to {_num(x.get('null_high')):.3f}"
                if math.isfinite(_num(x.get("null_low"))) else "n/a")
        row = {"site": x["layer"], "depth": x["depth"], "ranking": x["method"], "family": x.get("family", ""),
               "index [95% CI]": _ci(x), "random pairs": null, "p_index": _p(x.get("p_index")),
               "p_corrected": _p(x.get("p_corrected"))}
        row.update({new: _p(x[old]) for old, new in names.items()})  # drops and p-values: 3 decimals or n/a
        table.append(row)
    text = (f"<p class='what'>At {f:.0%} lesions. drop_X_by_Y: the chance-corrected drop of task X when the "
            f"filters ranked most important for task Y are silenced. p_index: the share of random-lesion pairs "
            f"whose index is at least as large: the other pairs of a ring of the two targeted and the R random lesions "
            f"(one-sided; the smallest is 1/(R+2)); "
            f"p_corrected: p_index corrected for every site and ranking of its family at this fraction "
            f"({_correction_how(keep)}); p_X_by_X: the share of random lesions that cost the targeted task at "
            f"least as much (uncorrected; the smallest is 1/(R+1)).</p>")
    return text + _table(table, ["site", "depth", "ranking", "family", "index [95% CI]", "random pairs", "p_index",
                                 "p_corrected", *names.values()], wide=True)


def _correction_how(rows: list) -> str:
    """How each family of rows (the deciding rankings, the descriptive ones) was corrected, in words."""
    parts = []
    for kind, what in ((multiple_testing.VERDICT, "the rankings that decide the verdict"),
                       (multiple_testing.DESCRIPTION, "the selectivity rankings, description")):
        text = correction_text(multiple_testing.family([r for r in rows if r.get("family") == kind]))
        if text:
            parts.append(f"{what}: {text}")
    return "; ".join(parts) or "none: no p-value against random lesions"
