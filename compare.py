"""Compare runs across backbones: intact accuracies, and the dissociation index against relative depth.

    python compare.py runs/vgg16 runs/vgg19 runs/resnet50 runs/resnext50 --out_dir=runs/compare

Writes compare.csv and compare.png to --out_dir (default runs/compare). Relative depth is 0 at a run's first
lesion site and 1 at its last.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import figures
import report
from common import exit_on_damaged_files, read_csv, read_json, write_csv

COLUMNS = ("run", "backbone", "kind", "task_or_method", "layer", "relative_depth", "value", "ci_low", "ci_high",
           "fraction", "n_images")


def collect(run_dir: Path) -> list:
    """The comparison rows of one run: intact accuracy per task, dissociation index per site and method."""
    config = read_json(run_dir / "config.json", lambda v: isinstance(v, dict) and "backbone" in v, "a run's settings")
    out = []
    results = run_dir / "lesion_results.csv"
    if results.exists():
        for task, (accuracy, n, _) in report.intact_accuracies(read_csv(results, report.INTACT_COLUMNS)).items():
            low, high = report.wilson(accuracy, n)
            out.append({"run": run_dir.name, "backbone": config["backbone"], "kind": "intact_accuracy",
                        "task_or_method": task, "value": f"{accuracy:.4f}", "ci_low": f"{low:.4f}",
                        "ci_high": f"{high:.4f}", "n_images": n})
    diss = run_dir / "dissociation.csv"
    if diss.exists():
        rows = read_csv(diss, report.DISSOCIATION_COLUMNS)
        if rows:
            headline = figures.headline_fraction(r["fraction"] for r in rows)
            depths = sorted({int(r["depth"]) for r in rows})
            span = max(1, depths[-1] - depths[0])
            for r in rows:
                if abs(float(r["fraction"]) - headline) < 1e-6:
                    out.append({"run": run_dir.name, "backbone": config["backbone"], "kind": "dissociation_index",
                                "task_or_method": r["method"], "layer": r["layer"],
                                "relative_depth": f"{(int(r['depth']) - depths[0]) / span:.4f}", "value": r["index"],
                                "ci_low": r["ci_low"], "ci_high": r["ci_high"], "fraction": r["fraction"]})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders written by the backbone scripts")
    parser.add_argument("--out_dir", default="runs/compare", help="where compare.csv and compare.png go")
    args = parser.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    bad = [str(r) for r in runs if not (r / "config.json").exists()]
    if bad:
        print(f"error: not a run folder (no config.json): {', '.join(bad)}; expected folders written by a "
              f"backbone script, e.g. runs/vgg16", file=sys.stderr)
        return 2
    with exit_on_damaged_files("cannot compare the runs"):
        rows = [row for r in runs for row in collect(r)]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "compare.csv", COLUMNS, rows)
    figure = figures.compare_figure(rows, out_dir / "compare.png")
    print(f"wrote {out_dir / 'compare.csv'} ({len(rows)} rows) and {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
