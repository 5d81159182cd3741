"""Figures of a run, drawn from its files alone (config.json, train_log.csv, lesion_results.csv).

    python figures.py runs/vgg16
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

PALETTE = "colorblind"


def _style():
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def training_curves(run_dir: Path) -> Path | None:
    """Accuracy and loss per epoch, per task, training and validation."""
    log = run_dir / "train_log.csv"
    if not log.exists():
        return None
    df = pd.read_csv(log)
    if df.empty:
        return None
    _style()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, label in ((axes[0], "accuracy", "accuracy (fraction correct)"), (axes[1], "loss",
                                                                                      "cross-entropy loss (nats)")):
        sns.lineplot(df, x="epoch", y=metric, hue="task", style="split", markers=True, ax=ax)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[0].set_ylim(0, 1)
    axes[1].set_yscale("log")
    fig.suptitle(f"Training: {run_dir.name}")
    return _save(fig, run_dir / "figures" / "training_curves.png")


def lesion_effects(run_dir: Path) -> Path | None:
    """Chance-corrected drop of each task per site, one panel per lesion target, one line style per fraction."""
    path = run_dir / "lesion_results.csv"
    if not path.exists():
        return None
    df = pd.read_csv(path)
    df = df[df["fraction"] > 0]
    if df.empty:
        return None
    _style()
    targets = list(dict.fromkeys(df["target"]))
    tasks = list(dict.fromkeys(df["eval_task"]))
    df = df.assign(evaluated=df["eval_task"] + " task", lesioned=df["fraction"].map(lambda f: f"{f:.0%} lesioned"))
    fig, axes = plt.subplots(1, len(targets), figsize=(4.6 * len(targets), 4.2), sharey=True, squeeze=False)
    layers = df.drop_duplicates("depth").sort_values("depth")
    for ax, target in zip(axes[0], targets):
        sub = df[df["target"] == target]
        sns.lineplot(sub, x="depth", y="corrected_drop", hue="evaluated", hue_order=[f"{t} task" for t in tasks],
                     style="lesioned", markers=True, ax=ax, errorbar=None)
        ax.axhline(0, color="0.3", lw=0.8)
        title = "random filters" if target == "random" else f"most {target}-selective filters"
        ax.set_title(f"lesion: {title}")
        ax.set_xlabel("lesion site (depth, first conv = 0)")
        ax.set_ylabel("chance-corrected drop\n(intact - lesioned) / (intact - chance)")
        ax.set_xticks(layers["depth"][:: max(1, -(-len(layers) // 9))])
        if ax is not axes[0][-1]:
            ax.get_legend().remove()
    sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    fig.suptitle(f"Lesion effects by depth: {run_dir.name}")
    return _save(fig, run_dir / "figures" / "lesion_effects.png")


def make_figures(run_dir) -> list:
    """Every figure the run's files allow; returns the paths written."""
    run_dir = Path(run_dir)
    return [p for p in (training_curves(run_dir), lesion_effects(run_dir)) if p is not None]


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "config.json").exists():
        print("usage: python figures.py RUN_DIR (a folder holding config.json)", file=sys.stderr)
        sys.exit(2)
    json.loads((Path(sys.argv[1]) / "config.json").read_text())
    for p in make_figures(sys.argv[1]):
        print(f"wrote {p}")
