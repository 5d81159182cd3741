"""Figures of a run, drawn from its files alone (config.json, train_log.csv, lesion_results.csv).

    python -m dualtask.report.figures runs/vgg16
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from dualtask.core.common import atomic_write, exit_on_damaged_files, read_json, report_bugs  # noqa: E402
from dualtask.stats.verdict import headline_fraction  # noqa: E402

PALETTE = "colorblind"


def _style():
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=130, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def _read(path: Path):
    """A run's CSV as a DataFrame, or None when it is missing or empty (its figure is then skipped)."""
    if not path.exists():
        return None
    df = pd.read_csv(path)
    return None if df.empty else df


def training_curves(run_dir: Path) -> Path | None:
    """Accuracy and loss per epoch, per task, training and validation."""
    df = _read(run_dir / "train_log.csv")
    if df is None:
        return None
    _style()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, label in ((axes[0], "accuracy", "accuracy (fraction correct)"), (axes[1], "loss",
                                                                                      "cross-entropy loss (nats)")):
        sns.lineplot(df, x="epoch", y=metric, hue="task", style="split", markers=True, ax=ax)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes:
        ax.get_legend().remove()
    fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.9), frameon=False)
    axes[0].set_ylim(0, 1)
    axes[1].set_yscale("log")
    fig.suptitle(f"Training: {run_dir.name}")
    fig.tight_layout()
    return _save(fig, run_dir / "figures" / "training_curves.png")


def lesion_effects(run_dir: Path) -> Path | None:
    """The headline figure: chance-corrected drops of both tasks after lesioning the 20% most task-ranked
    filters of each site, across depth, one row per ranking method and one column per target, with the range
    of the random lesions of the same size shaded."""
    df = _read(run_dir / "lesion_results.csv")
    if df is None or not (df["fraction"] > 0).any():
        return None
    f = headline_fraction(df["fraction"])
    df = df[np.isclose(df["fraction"], f)]
    tasks = list(dict.fromkeys(df["eval_task"]))
    methods = [m for m in dict.fromkeys(df["method"]) if m != "random"] or ["random"]
    targets = [t for t in tasks if (df["target"] == t).any()] or ["random"]
    colours = dict(zip(tasks, sns.color_palette(PALETTE, len(tasks))))
    random = df[df["target"] == "random"]
    _style()
    fig, axes = plt.subplots(len(methods), len(targets), figsize=(4.8 * len(targets), 3.4 * len(methods)),
                             sharex=True, sharey=True, squeeze=False)
    for row, method in enumerate(methods):
        for col, target in enumerate(targets):
            ax = axes[row][col]
            for task in tasks:
                band = random[random["eval_task"] == task].groupby("depth")["corrected_drop"]
                if len(band):
                    lo, hi = band.min(), band.max()
                    ax.fill_between(lo.index, lo.values, hi.values, color=colours[task], alpha=0.18, lw=0,
                                    label=f"{task} task, random lesions (range)")
                sub = df[(df["method"] == method) & (df["target"] == target) & (df["eval_task"] == task)]
                sub = sub.sort_values("depth")
                ax.plot(sub["depth"], sub["corrected_drop"], marker="o", ms=4, color=colours[task],
                        label=f"{task} task")
            ax.axhline(0, color="0.3", lw=0.8)
            ax.set_title(f"{method} ranking: most {target}-important {f:.0%} silenced", fontsize=10)
            ax.set_xlabel("lesion site (depth, 0 = first)")
            ax.set_ylabel("chance-corrected drop\n(intact - lesioned) / (intact - chance)", fontsize=9)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.95), frameon=False)
    fig.suptitle(f"Lesion effects by depth ({f:.0%} of each site's filters): {run_dir.name}")
    fig.tight_layout()
    return _save(fig, run_dir / "figures" / "lesion_effects.png")


def dissociation_by_depth(run_dir: Path) -> Path | None:
    """The double-dissociation index per site at the headline fraction, one line per ranking method with its
    95% bootstrap band, beside the grey band of indices built from pairs of random lesions (the null)."""
    df = _read(run_dir / "dissociation.csv")
    if df is None:
        return None
    f = headline_fraction(df["fraction"])
    df = df[np.isclose(df["fraction"], f)].sort_values("depth")
    a, b = df["task_a"].iloc[0], df["task_b"].iloc[0]
    _style()
    fig, ax = plt.subplots(figsize=(8.5, 4))
    if {"null_low", "null_high"} <= set(df.columns):
        null = df.drop_duplicates("depth")
        n_random = int(null["n_random"].max())
        ax.fill_between(null["depth"], null["null_low"], null["null_high"], color="0.55", alpha=0.3, lw=0,
                        label=f"other pairs of the lesion ring (range of {n_random + 1})")
    for method, colour in zip(dict.fromkeys(df["method"]), sns.color_palette(PALETTE)):
        sub = df[df["method"] == method]
        ax.fill_between(sub["depth"], sub["ci_low"], sub["ci_high"], color=colour, alpha=0.2, lw=0,
                        label=f"{method}: 95% bootstrap CI")
        ax.plot(sub["depth"], sub["index"], marker="o", ms=4, color=colour, label=f"{method} ranking")
    ax.axhline(0, color="0.3", lw=0.8)
    if not np.isfinite(df["index"].to_numpy(dtype=float)).any():
        ax.text(0.5, 0.5, "no index defined: a head is at chance (see the report)", transform=ax.transAxes,
                ha="center", va="center", color="0.3")
    ax.set_xlabel("lesion site (depth, 0 = first)")
    ax.set_ylabel("double-dissociation index\n(sum of chance-corrected drop differences)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(frameon=False, title=f"{f:.0%} lesions", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"[drop {a}({a} filters) - drop {a}({b} filters)] + [drop {b}({b}) - drop {b}({a})]", fontsize=9)
    fig.suptitle(f"Task dissociation by depth: {run_dir.name}")
    return _save(fig, run_dir / "figures" / "dissociation_by_depth.png")


def dissociation_by_epoch(run_dir: Path) -> Path | None:
    """When a split appears during training: the index by depth at the headline fraction, one line per swept
    epoch (epoch_<N>/ and the run's own sweep at its last epoch), for each ranking method."""
    import json

    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    frames = []
    for folder in sorted(run_dir.glob("epoch_*")):
        df = _read(folder / "dissociation.csv")
        if df is not None and folder.name[len("epoch_"):].isdigit():
            frames.append(df.assign(epoch=int(folder.name[len("epoch_"):])))
    final = _read(run_dir / "dissociation.csv")
    if not frames or final is None:
        return None
    df = pd.concat(frames + [final.assign(epoch=int(config.get("epochs", 0)))])
    f = headline_fraction(df["fraction"])
    df = df[np.isclose(df["fraction"], f)]
    epochs = sorted(df["epoch"].unique())
    return _index_panels(df, f, "epoch", epochs, sns.color_palette("viridis", len(epochs)),
                         lambda epoch, sub: f"epoch {epoch}", "double-dissociation index\n(95% bootstrap band)",
                         f"Dissociation by depth and epoch: {run_dir.name}",
                         run_dir / "figures" / "dissociation_by_epoch.png")


def _index_panels(df, fraction: float, group: str, values: list, colours, label, ylabel: str, title: str,
                  path: Path) -> Path:
    """One panel per ranking method: the index by depth at `fraction`, one line (with its ci_low..ci_high band)
    for each of the `values` of column `group`."""
    methods = list(dict.fromkeys(df["method"]))
    _style()
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods) + 2, 4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        for value, colour in zip(values, colours):
            sub = df[(df["method"] == method) & (df[group] == value)].sort_values("depth")
            if not len(sub):
                continue
            ax.fill_between(sub["depth"], sub["ci_low"], sub["ci_high"], color=colour, alpha=0.15, lw=0)
            ax.plot(sub["depth"], sub["index"], marker="o", ms=4, color=colour, label=label(value, sub))
        ax.axhline(0, color="0.3", lw=0.8)
        shown = df[df["method"] == method]
        if not np.isfinite(shown["index"].to_numpy(dtype=float)).any():  # an empty panel says why it is empty
            ax.set_xlim(shown["depth"].min() - 0.5, shown["depth"].max() + 0.5)
            ax.text(0.5, 0.5, "no index is defined at any site:\na lesion's effect needs a head above chance\n"
                    "(see the report's caveats)", transform=ax.transAxes, ha="center", va="center", fontsize=9,
                    bbox={"facecolor": "white", "edgecolor": "0.8"})
        ax.set_title(f"{method} ranking, {fraction:.0%} lesions", fontsize=10)
        ax.set_xlabel("lesion site (depth, 0 = first)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[0][0].set_ylabel(ylabel)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.9), frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, Path(path))


def gradcam_figures(run_dir: Path, examples: dict, mean_maps: dict, tasks: list, site: str) -> list:
    """Grad-CAM overlays: example test images of each image set (`examples` keyed by the set's label: a task,
    or tasks sharing their images joined by '+') with each head's map, and each head's mean map over each set's
    images drawn on that set's mean image (mean_maps keys '<label>_images__<head>_head', '..._mean_image')."""
    _style()
    run_dir = Path(run_dir)
    written = []
    for task, (imgs, maps) in examples.items():
        n = len(imgs)
        fig, axes = plt.subplots(len(tasks) + 1, n, figsize=(1.6 * n, 1.7 * (len(tasks) + 1)), squeeze=False)
        for j in range(n):
            axes[0][j].imshow(imgs[j])
            for i, head in enumerate(tasks):
                axes[i + 1][j].imshow(imgs[j])
                axes[i + 1][j].imshow(maps[head][j], cmap="inferno", alpha=0.55, vmin=0, vmax=1)
        for i, label in enumerate(["image"] + [f"{h} head" for h in tasks]):
            axes[i][0].set_ylabel(label, fontsize=9)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
        fig.suptitle(f"Grad-CAM at {site} on {task} test images (bright = where the head looks)", fontsize=10)
        written.append(_save(fig, run_dir / "figures" / f"gradcam_{task}_images.png"))
    sets = list(examples)
    fig, axes = plt.subplots(len(sets), len(tasks), figsize=(2.6 * len(tasks), 2.6 * len(sets)), squeeze=False)
    for i, task in enumerate(sets):
        mean_image = mean_maps[f"{task}_images__mean_image"]
        for j, head in enumerate(tasks):
            ax = axes[i][j]
            ax.imshow(mean_image)
            ax.imshow(mean_maps[f"{task}_images__{head}_head"], cmap="inferno", alpha=0.55)
            ax.set_title(f"{head} head, {task} images", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
    fig.suptitle(f"Mean Grad-CAM per head over each task's test images ({site})", fontsize=10)
    written.append(_save(fig, run_dir / "figures" / "gradcam_mean.png"))
    return written


def stimuli_file(site: str) -> str:
    """The file name of a site's preferred-stimulus figure: the module path with '.' (and a branched site's ':')
    as '_', a name every file system takes."""
    return f"stimuli_{site.replace('.', '_').replace(':', '_')}.png"


def stimuli_figure(run_dir: Path, site: str, method: str, grids: list) -> Path:
    """One row per filter: its top test images (labelled with task and class) and its synthetic image."""
    _style()
    n = max(len(g[2]) for g in grids) + 1
    fig, axes = plt.subplots(len(grids), n, figsize=(1.35 * n, 1.45 * len(grids)), squeeze=False)
    for row, (task, f, tops, synth) in enumerate(grids):
        for j, (img, label) in enumerate(tops):
            axes[row][j].imshow(img)
            axes[row][j].set_title(label, fontsize=5)
        axes[row][n - 1].imshow(synth)
        axes[row][n - 1].set_title("synthetic", fontsize=6)
        axes[row][0].set_ylabel(f"{task}-ranked\nfilter {f}", fontsize=7)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
    fig.suptitle(f"Preferred stimuli at {site}: top test images and activation maximisation "
                 f"(filters ranked by {method})", fontsize=9)
    return _save(fig, Path(run_dir) / "figures" / stimuli_file(site))


def decoding_by_depth(run_dir: Path) -> Path | None:
    """Cross-validated linear decoding accuracy of each task from each site's pooled activations."""
    df = _read(run_dir / "decoding.csv")
    if df is None:
        return None
    _style()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for (task, sub), colour in zip(df.groupby("task", sort=False), sns.color_palette(PALETTE)):
        sub = sub.sort_values("depth")
        ax.errorbar(sub["depth"], sub["accuracy"], yerr=sub["sd"], marker="o", ms=4, color=colour, capsize=2,
                    label=f"{task} (chance {sub['chance'].iloc[0]:.2f})")
        ax.axhline(sub["chance"].iloc[0], color=colour, lw=0.8, ls=":")
    ax.set_ylim(0, 1)
    ax.set_xlabel("lesion site (depth, 0 = first)")
    ax.set_ylabel("linear probe accuracy\n(cross-validated, fraction correct)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(frameon=False)
    fig.suptitle(f"Layer-wise decoding: {run_dir.name}")
    return _save(fig, run_dir / "figures" / "decoding_by_depth.png")


def compare_figure(rows: list, path: Path) -> Path:
    """Across runs: intact accuracy per task with its 95% Wilson interval (left), and the dissociation index
    against relative depth (right; the loss ranking where a run has it, else activation) with 95% bootstrap
    bands."""
    _style()
    df = pd.DataFrame(rows)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4), gridspec_kw={"width_ratios": [1, 1.6]})
    intact = df[df["kind"] == "intact_accuracy"].astype({"value": float, "ci_low": float, "ci_high": float}) \
        if len(df) else df
    if len(intact):
        runs, tasks = list(dict.fromkeys(intact["run"])), list(dict.fromkeys(intact["task_or_method"]))
        width = 0.8 / len(tasks)
        for k, (task, colour) in enumerate(zip(tasks, sns.color_palette(PALETTE))):
            sub = intact[intact["task_or_method"] == task].set_index("run").reindex(runs)
            x = np.arange(len(runs)) - 0.4 + width * (k + 0.5)
            axes[0].bar(x, sub["value"], width, color=colour, label=task,
                        yerr=[sub["value"] - sub["ci_low"], sub["ci_high"] - sub["value"]], capsize=3)
        backbone = dict(zip(intact["run"], intact["backbone"]))
        axes[0].set_xticks(np.arange(len(runs)), [f"{r}\n({backbone[r]})" for r in runs])
        axes[0].legend(title="task (95% Wilson CI)", frameon=False)
    axes[0].set_ylim(0, 1)
    axes[0].set_xlabel("run (backbone)")
    axes[0].set_ylabel("intact test accuracy (fraction correct)")
    diss = df[df["kind"] == "dissociation_index"] if len(df) else df
    shown = set()
    for (run, sub), colour in zip(diss.groupby("run", sort=False) if len(diss) else [], sns.color_palette(PALETTE)):
        method = "loss" if (sub["task_or_method"] == "loss").any() else sub["task_or_method"].iloc[0]
        shown.add(method)
        sub = sub[sub["task_or_method"] == method].astype({"relative_depth": float, "value": float,
                                                           "ci_low": float, "ci_high": float})
        sub = sub.sort_values("relative_depth")
        axes[1].fill_between(sub["relative_depth"], sub["ci_low"], sub["ci_high"], color=colour, alpha=0.15, lw=0)
        axes[1].plot(sub["relative_depth"], sub["value"], marker="o", ms=4, color=colour,
                     label=f"{run} ({sub['backbone'].iloc[0]}, {method} ranking)")
    axes[1].axhline(0, color="0.3", lw=0.8)
    axes[1].set_xlabel("relative depth (0 = first lesion site, 1 = last)")
    fraction = f"{float(diss['fraction'].iloc[0]):.0%}" if len(diss) else "20%"
    axes[1].set_ylabel(f"double-dissociation index at {fraction} lesions")
    axes[1].set_title(f"{' / '.join(sorted(shown)) or 'no'} ranking (loss where a run has it, else activation); "
                      f"bands: 95% bootstrap CI", fontsize=9)
    if len(diss):
        axes[1].legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Comparison across backbones")
    fig.tight_layout()
    return _save(fig, Path(path))


def experiment_figure(rows: list, path: Path) -> Path | None:
    """An experiment's index by depth at the headline fraction: one panel per ranking, one line per role (the
    real tasks and each control) with its 95% hierarchical bootstrap band (seeds, then test images)."""
    df = pd.DataFrame(rows)
    if not len(df):
        return None
    df = df.replace("", np.nan).astype({"depth": int, "fraction": float, "index": float, "ci_low": float,
                                        "ci_high": float})
    f = headline_fraction(df["fraction"])
    df = df[np.isclose(df["fraction"], f)]
    roles = list(dict.fromkeys(df["role"]))
    return _index_panels(df, f, "role", roles, sns.color_palette(PALETTE),
                         lambda role, sub: f"{role} ({int(sub['n_seeds'].astype(int).max())} seeds)",
                         "double-dissociation index\n(mean over seeds, 95% hierarchical CI)",
                         "Dissociation by depth: the real tasks against the controls", path)


def branching_figure(points: list, path: Path) -> Path:
    """The branching-point experiment: test accuracy against the number of lesion sites the tasks share (0 =
    separate single-task networks), one line per task with its 95% Wilson interval, chance dashed.
    points: [{'task', 'shared_sites', 'accuracy', 'ci_low', 'ci_high', 'chance'}]."""
    _style()
    df = pd.DataFrame(points)
    tasks = list(dict.fromkeys(df["task"]))  # the run's task order: each task keeps its colour of the other figures
    df = df.sort_values("shared_sites")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for colour, task in zip(sns.color_palette(PALETTE), tasks):
        sub = df[df["task"] == task]
        ax.errorbar(sub["shared_sites"], sub["accuracy"], yerr=[sub["accuracy"] - sub["ci_low"],
                                                                 sub["ci_high"] - sub["accuracy"]],
                    marker="o", capsize=3, color=colour, label=task)
        ax.axhline(sub["chance"].iloc[0], color=colour, linestyle=":", linewidth=1)
    ax.set_xlabel("lesion sites shared by the tasks (branch point; 0 = separate networks)")
    ax.set_ylabel("test accuracy (95% Wilson CI)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_title("What sharing the trunk costs each task (chance dotted)")
    ax.legend(title="task")
    return _save(fig, path)


# the figures drawn from a run's CSVs alone, in the order the figures stage draws them: (name, function)
# (decoding_by_depth follows the decoding analysis, which writes its CSV)
RUN_FIGURES = (("training curves", training_curves), ("lesion effects", lesion_effects),
               ("dissociation by depth", dissociation_by_depth), ("dissociation by epoch", dissociation_by_epoch))


def make_figures(run_dir) -> list:
    """Every figure the run's files allow; returns the paths written."""
    run_dir = Path(run_dir)
    drawn = [draw(run_dir) for _, draw in RUN_FIGURES] + [decoding_by_depth(run_dir)]
    return [p for p in drawn if p is not None]


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "config.json").exists():
        print("usage: python -m dualtask.report.figures RUN_DIR (a folder holding config.json)", file=sys.stderr)
        sys.exit(2)
    with report_bugs(), exit_on_damaged_files(f"cannot draw the figures of {sys.argv[1]}"):
        read_json(Path(sys.argv[1]) / "config.json", lambda v: isinstance(v, dict), "a run's settings")
        written = make_figures(sys.argv[1])
    for p in written:
        print(f"wrote {p}")


def probes_figure(rows: list, path: Path) -> Path | None:
    """probes.csv drawn (probes.py): one panel per probe and task, across the swept sites: the inversion effect
    (upright - inverted accuracy, 95% bootstrap interval) or the transfer probe's accuracy, under each ranking's
    lesions of each task's filters, with the random lesions' range shaded and the intact network dashed."""
    if not rows:
        return None
    _style()
    panels = list(dict.fromkeys((r["probe"], r["task"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (probe, task) in zip(axes[0], panels):
        mine = [r for r in rows if r["probe"] == probe and r["task"] == task]
        key = "effect" if probe == "inversion" else "accuracy"
        sites = list(dict.fromkeys(r["layer"] for r in mine if r["layer"]))
        x = np.arange(len(sites))
        rand = [[float(r[key]) for r in mine if r["layer"] == s and r["method"] == "random"] for s in sites]
        if all(rand):
            ax.fill_between(x, [min(v) for v in rand], [max(v) for v in rand], color="0.85", label="random lesions")
        for method, target in dict.fromkeys((r["method"], r["target"]) for r in mine
                                            if r["layer"] and r["method"] != "random"):
            pts = {r["layer"]: r for r in mine if (r["method"], r["target"]) == (method, target)}
            xs = [i for i, s in enumerate(sites) if s in pts]
            ys = [float(pts[sites[i]][key]) for i in xs]
            if probe == "inversion":
                err = [[ys[j] - float(pts[sites[i]]["effect_low"]) for j, i in enumerate(xs)],
                       [float(pts[sites[i]]["effect_high"]) - ys[j] for j, i in enumerate(xs)]]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"{target} filters ({method})")
            else:
                ax.plot(xs, ys, marker="o", label=f"{target} filters ({method})")
        intact = [float(r[key]) for r in mine if r["method"] == "intact"]
        if intact:
            ax.axhline(intact[0], color="k", ls="--", lw=1, label="intact")
        ax.set_xticks(x, sites, rotation=45, ha="right", fontsize=8)
        fraction = next((r["fraction"] for r in mine if r["layer"]), "")
        ax.set_title(f"{probe}: {task}" + (f" ({float(fraction):.0%} lesions)" if fraction else ""), fontsize=10)
        ax.set_ylabel("inversion effect (upright - inverted accuracy)" if probe == "inversion" else
                      "probe accuracy")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
