"""Compare runs across backbones: intact accuracies, and the dissociation index against relative depth.

    python -m dualtask.report.compare runs/vgg16 runs/vgg19 runs/resnet50 runs/resnext50 --out_dir=runs/compare

Writes compare.csv and compare.png to --out_dir (default runs/compare). Relative depth is 0 at a run's first
lesion site and 1 at its last.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dualtask.core.common import UsageError, exit_on_damaged_files, read_csv, read_json, report_bugs, write_csv
from dualtask.report import build as report
from dualtask.report import figures
from dualtask.stats import verdict

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
            headline = verdict.headline_fraction(r["fraction"] for r in rows)
            depths = sorted({int(r["depth"]) for r in rows})
            span = max(1, depths[-1] - depths[0])
            for r in rows:
                if abs(float(r["fraction"]) - headline) < 1e-6:
                    out.append({"run": run_dir.name, "backbone": config["backbone"], "kind": "dissociation_index",
                                "task_or_method": r["method"], "layer": r["layer"],
                                "relative_depth": f"{(int(r['depth']) - depths[0]) / span:.4f}", "value": r["index"],
                                "ci_low": r["ci_low"], "ci_high": r["ci_high"], "fraction": r["fraction"]})
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 2, not argparse's usage block
        raise UsageError(f"{message} (python -m dualtask.report.compare --help lists the arguments)")


def check_arguments(runs: list, out_dir: Path) -> None:
    """Before anything is read or written: each run folder once, folders of distinct names (a run's folder name
    labels it in compare.csv and compare.png), and an out_dir that is a folder where compare.csv and compare.png
    are new or this tool's own."""
    bad = [str(r) for r in runs if not (r / "config.json").is_file()]
    if bad:
        raise UsageError(f"not a run folder (no config.json): {', '.join(bad)}; expected folders written by a "
                         f"backbone script, e.g. runs/vgg16")
    seen, names = {}, {}
    for r in runs:
        real = r.resolve()
        if real in seen:
            raise UsageError(f"{seen[real]} and {r} are the same run folder, named twice; expected each run once")
        if real.name in names:
            raise UsageError(f"{names[real.name]} and {r} share the folder name {real.name!r}, which "
                             f"labels a run in compare.csv and compare.png; expected runs whose folders have "
                             f"distinct names (e.g. link one under another name)")
        seen[real], names[real.name] = r, r
    if not str(out_dir).strip():
        raise UsageError("--out_dir='': expected a folder path for compare.csv and compare.png")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out_dir={out_dir}: exists and is not a folder; expected a folder path for compare.csv "
                         f"and compare.png")
    table, figure = out_dir / "compare.csv", out_dir / "compare.png"
    ours = table.is_file() and _header(table) == ",".join(COLUMNS)
    for path in (table, figure):
        if (path.exists() or path.is_symlink()) and not ours:
            raise UsageError(f"--out_dir={out_dir}: {path} exists and was not written by dualtask.report.compare"
                             f"{'' if path == table else ' (no compare.csv of this tool beside it)'}, so it is never "
                             f"replaced; expected an --out_dir without it (move it away or choose another --out_dir)")


def _header(path: Path) -> str:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError):
        return ""


def main(argv=None) -> int:
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders written by the backbone scripts")
    parser.add_argument("--out_dir", default="runs/compare", help="where compare.csv and compare.png go")
    try:
        with report_bugs():
            args = parser.parse_args(argv)
            runs, out_dir = [Path(r) for r in args.runs], Path(args.out_dir)
            check_arguments(runs, out_dir)
            with exit_on_damaged_files("cannot compare the runs"):
                rows = [row for r in runs for row in collect(r)]
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UsageError(f"--out_dir={out_dir}: cannot be created ({e.strerror}); expected a writable folder "
                                 f"path") from None
            write_csv(out_dir / "compare.csv", COLUMNS, rows)
            figure = figures.compare_figure(rows, out_dir / "compare.png")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out_dir / 'compare.csv'} ({len(rows)} rows) and {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
