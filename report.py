"""One self-contained HTML report per run, rebuilt from the run's own files (no retraining, no re-lesioning).

    python report.py runs/vgg16        # writes runs/vgg16/report.html

Every figure is embedded; a section whose files are missing says so in one line instead.
"""
from __future__ import annotations

import base64
import html
import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

from dualtask import read_csv, write_text

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
img { max-width: 100%; display: block; margin: .8em 0; }
table { border-collapse: collapse; font-size: .9em; margin: .6em 0; }
td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: left; }
p.skip { color: #a33; font-style: italic; }
p.what { color: #444; }
details { margin: .5em 0; }
"""


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(rows: list, columns: list) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def wilson(p: float, n: int, z: float = 1.96):
    """95% Wilson interval of a proportion p observed on n trials."""
    if n == 0:
        return float("nan"), float("nan")
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


class Report:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.parts = []

    def section(self, title: str):
        self.parts.append(f"<h2>{html.escape(title)}</h2>")

    def what(self, text: str):
        self.parts.append(f'<p class="what">{html.escape(text)}</p>')

    def skip(self, reason: str):
        self.parts.append(f'<p class="skip">Skipped: {html.escape(reason)}</p>')

    def figure(self, name: str, text: str) -> bool:
        path = self.run_dir / "figures" / name
        if not path.exists():
            self.skip(f"figures/{name} is missing (its stage has not run, or its inputs were missing)")
            return False
        self.what(text)
        self.parts.append(_image(path, name))
        return True

    def raw(self, markup: str):
        self.parts.append(markup)


def build_report(run_dir) -> Path:
    """Write run_dir/report.html from the run's files and return its path."""
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    tasks = list(config.get("tasks", {}))
    r = Report(run_dir)
    r.section("Settings")
    r.what("The resolved settings of this run (config.json): backbone, data, training and lesion parameters.")
    shown = {k: v for k, v in config.items() if k != "tasks"}
    r.raw(_table([{"setting": k, "value": json.dumps(v)} for k, v in shown.items()], ["setting", "value"]))
    if tasks:
        r.raw(_table([{"task": t, "classes": v["classes"], "chance": f"{v['chance']:.3f}", "source": v["source"],
                       **v["counts"]} for t, v in config["tasks"].items()],
                     ["task", "classes", "chance", "source", "train", "val", "test"]))

    r.section("Training")
    r.figure("training_curves.png", "Accuracy and loss of each head on its own task, per epoch, on training "
             "batches (augmented) and on the validation images.")

    r.section("Intact accuracy")
    results = run_dir / "lesion_results.csv"
    if results.exists():
        rows = read_csv(results)
        intact = {}
        for row in rows:
            intact.setdefault(row["eval_task"], (float(row["intact_accuracy"]), int(row["n_images"]),
                                                 float(row["chance"])))
        r.what("Test accuracy of each head on its own task before any lesion, with its 95% Wilson interval.")
        r.raw(_table([{"task": t, "accuracy": f"{a:.3f}", "95% interval": "{:.3f} to {:.3f}".format(*wilson(a, n)),
                       "test images": n, "chance": f"{c:.3f}"} for t, (a, n, c) in intact.items()],
                     ["task", "accuracy", "95% interval", "test images", "chance"]))
    else:
        r.skip("lesion_results.csv is missing: the lesion stage has not run")

    r.section("Lesions by depth")
    r.figure("lesion_effects.png", "Chance-corrected drop of each task's accuracy when the most task-important "
             "20% of a site's filters are silenced, per site and ranking method; shading is the range over random "
             "lesions of the same size. A task-specific site hurts the targeted task above the random band and "
             "spares the other.")

    r.section("Dissociation by depth")
    if r.figure("dissociation_by_depth.png", "The double-dissociation index per site (0 = no task split) with "
                "its 95% bootstrap interval over test images."):
        rows = read_csv(run_dir / "dissociation.csv")
        fractions = sorted({float(x["fraction"]) for x in rows})
        if fractions:
            headline = min(fractions, key=lambda f: abs(f - 0.2))
            keep = [x for x in rows if abs(float(x["fraction"]) - headline) < 1e-6]
            r.raw(f"<details><summary>Table at {headline:.0%} lesions (p-values against random lesions)"
                  f"</summary>" + _table(keep, ["layer", "method", "index", "ci_low", "ci_high", "p_index",
                                                "drop_a_by_a", "drop_a_by_b", "drop_b_by_b", "drop_b_by_a",
                                                "p_a_by_a", "p_b_by_b"]) + "</details>")

    r.section("Where each head looks (Grad-CAM)")
    for t in tasks:
        r.figure(f"gradcam_{t}_images.png", f"{t} test images and, below them, each head's Grad-CAM map: the "
                 f"regions whose activation raises that head's predicted score.")
    r.figure("gradcam_mean.png", "Each head's mean map over each task's test images, drawn on that task's mean "
             "image.")
    overlap = run_dir / "gradcam_overlap.csv"
    if overlap.exists():
        r.what("Overlap (intersection over union) of the two heads' top-5% regions on the same images: 1 = they "
               "attend to the same pixels.")
        r.raw(_table(read_csv(overlap), ["images", "head_a", "head_b", "site", "mean_iou_top5", "sd", "n"]))

    r.section("Preferred stimuli")
    stimuli = sorted((run_dir / "figures").glob("stimuli_*.png")) if (run_dir / "figures").exists() else []
    if stimuli:
        for path in stimuli:
            r.figure(path.name, "For the most task-ranked filters of this site: the test images that activate "
                     "each most (labelled with their task and class) and a synthetic image grown by gradient "
                     "ascent from noise.")
    else:
        r.skip("no figures/stimuli_*.png: they need rankings.json from the lesion stage and the figures stage")

    r.section("Layer-wise decoding")
    r.figure("decoding_by_depth.png", "Cross-validated accuracy of a linear probe reading each task's labels "
             "from each site's spatially pooled activations: where task information becomes linearly "
             "separable, to set beside where lesions dissociate.")

    title = f"Dual-task lesion report: {run_dir.name} ({config.get('backbone', '?')})"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>Built {stamp} from the files in {html.escape(str(run_dir))}.</p>" + "".join(r.parts) +
            "</body></html>")
    out = run_dir / "report.html"
    write_text(out, page)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python report.py RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    if not (run_dir / "config.json").exists():
        print(f"error: {run_dir} is not a run folder (no config.json); expected a folder written by a backbone "
              f"script, e.g. runs/vgg16", file=sys.stderr)
        return 2
    print(f"wrote {build_report(run_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
