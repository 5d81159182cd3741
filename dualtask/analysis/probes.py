"""Behavioural probes of a swept network (the `probes` setting), at the sweep's headline fraction:

- "inversion" (Dobs et al. 2023): each task's test accuracy on upright and on upside-down images, intact and under
  every lesion of each swept site (each ranking's filters of each task, and the random ones). The inversion
  effect is upright minus inverted accuracy on the same images, with a bootstrap interval over them; a lesion
  that shrinks a task's effect more than random lesions of the same size do points at the filters that carry it.
- "transfer" (Kanwisher, Gupta & Dobs 2023): a held-out task (`probe_data`, any data spec load_task reads) read
  by a linear probe (the project's ridge readout, scikit-learn) fitted on its training images at the intact
  network's trunk features (the heads' input; a branched network's copies side by side), then scored on its
  test images under every lesion: which task's filters does a new task lose most with?

Results go to probes.csv (one row per probe, task, lesion), a figure (figures/probes.png) and a report section.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dualtask.analysis.inspection import linear_probe
from dualtask.core.common import UsageError, read_json, write_csv, write_text
from dualtask.core.device import autocast
from dualtask.data import transforms
from dualtask.lesion.dissociation import lesion_conditions
from dualtask.lesion.engine import SiteRunner, apply_mask, evaluate_lesions, image_batches, lesion_mask
from dualtask.model.sites import select_sites
from dualtask.report import figures
from dualtask.report.probes_report import PROBE_COLUMNS, PROBES_FILE, PROBES_SETTINGS, read_rows
from dualtask.stats import verdict

PROBES = ("inversion", "transfer")
N_BOOT = 1000


def inverted(batches: list) -> list:
    """The same batches upside down (flipped top to bottom), the same labels; shared image tensors stay shared."""
    flipped = {}
    return [(t, flipped.setdefault(id(x), x.flip(-2)), y) for t, x, y in batches]


def headline_conditions(site, ranking: dict, fraction: float) -> list:
    """The lesions of a site at the fraction: each ranking's filters of each task, and every random order's."""
    return [c for c in lesion_conditions(site, ranking, [fraction]) if abs(c[3] - fraction) < 1e-9]


def _effect(up: np.ndarray, down: np.ndarray, rng: np.random.Generator) -> tuple:
    """(upright - inverted accuracy, its 95% bootstrap interval over images) of paired per-image outcomes."""
    idx = rng.integers(0, len(up), (N_BOOT, len(up)))
    boot = up[idx].mean(1) - down[idx].mean(1)
    return float(up.mean() - down.mean()), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def inversion_rows(model, sites: list, rankings: dict, test: list, fraction: float, seed: int = 0,
                   masks_per_pass: int = 1) -> list:
    """probes.csv's inversion rows: per task, the intact network, then every lesion of every site at `fraction`
    (p_vs_random: the share of the site's random lesions whose effect is at most the lesion's, (1 + #) / (R + 1),
    i.e. how unusual a shrinking it is; empty for the random lesions themselves)."""
    flipped = inverted(test)
    tasks = list(dict.fromkeys(t for t, _, _ in test))
    rows = []
    rng = np.random.default_rng([seed, 7])
    up0 = evaluate_lesions(model, sites[0], [[]], test, masks_per_pass=masks_per_pass)[0]
    down0 = evaluate_lesions(model, sites[0], [[]], flipped, masks_per_pass=masks_per_pass)[0]
    for t in tasks:
        rows.append(_row("inversion", t, None, "intact", "", 0, 0.0, up0[t]["correct"], down0[t]["correct"], rng))
    for site in sites:
        conditions = headline_conditions(site, rankings[site.name], fraction)
        lesions = [c for *_, c in conditions]
        up = evaluate_lesions(model, site, lesions, test, masks_per_pass=masks_per_pass)
        down = evaluate_lesions(model, site, lesions, flipped, masks_per_pass=masks_per_pass)
        site_rows = [_row("inversion", t, site, m, tg, r, f, u[t]["correct"], d[t]["correct"], rng)
                     for (m, tg, r, f, _), u, d in zip(conditions, up, down) for t in tasks]
        rows += _against_random(site_rows, "effect")
    return rows


def _row(probe, task, site, method, target, repeat, f, up, down, rng) -> dict:
    up, down = np.asarray(up, dtype=float), np.asarray(down, dtype=float)
    effect, low, high = _effect(up, down, rng)
    return {"probe": probe, "task": task, "layer": site.name if site else "", "depth": site.depth if site else "",
            "method": method, "target": target, "repeat": repeat, "fraction": f"{f:.4f}",
            "accuracy": f"{up.mean():.4f}", "inverted_accuracy": f"{down.mean():.4f}", "effect": f"{effect:.4f}",
            "effect_low": f"{low:.4f}", "effect_high": f"{high:.4f}", "n_images": len(up), "p_vs_random": "",
            "read_by": "heads"}


def _against_random(rows: list, key: str) -> list:
    """Fill p_vs_random of a site's targeted rows: the share of the random lesions (same task) whose `key` is at
    most the row's (a lower effect, or a lower transfer accuracy, is the larger loss)."""
    for row in rows:
        if row["method"] == "random":
            continue
        null = np.array([float(r[key]) for r in rows if r["method"] == "random" and r["task"] == row["task"]])
        if len(null):
            row["p_vs_random"] = f"{(1 + int(np.sum(null <= float(row[key]) + 1e-9))) / (len(null) + 1):.4f}"
    return rows


@torch.inference_mode()
def trunk_features(model, site, lesions: list, batches: list) -> list:
    """Per lesion (channel arrays of `site`), the trunk's features (images, width) of every batch, in order."""
    runner = SiteRunner(model, site)
    out = [[] for _ in lesions]
    for _, x, _ in batches:
        with autocast(x.device):
            cached = runner.prefix(x)
            for k, channels in enumerate(lesions):
                keep, add = lesion_mask(channels, site.n_filters)
                feats = runner.features_with(cached, lambda o: apply_mask(o, keep[None], add[None], 1))
                out[k].append(feats.float().flatten(1).cpu())
    return [torch.cat(f).numpy() for f in out]


def transfer_rows(model, sites: list, rankings: dict, fit: list, test: list, fraction: float, name: str) -> list:
    """probes.csv's transfer rows: a linear probe of the held-out task `name`, fitted on `fit`'s images at the intact
    network's trunk features, scored on `test`'s intact and under every lesion at `fraction` (p_vs_random: the
    share of random lesions leaving it at most as accurate)."""
    y_fit = torch.cat([y for _, _, y in fit]).cpu().numpy()
    y_test = torch.cat([y for _, _, y in test]).cpu().numpy()
    (f_fit,) = trunk_features(model, sites[0], [[]], fit)
    probe = linear_probe().fit(f_fit, y_fit)

    def row(site, method, target, repeat, f, feats):
        acc = float((probe.predict(feats) == y_test).mean())
        return {"probe": "transfer", "task": name, "layer": site.name if site else "",
                "depth": site.depth if site else "", "method": method, "target": target, "repeat": repeat,
                "fraction": f"{f:.4f}", "accuracy": f"{acc:.4f}", "inverted_accuracy": "", "effect": "",
                "effect_low": "", "effect_high": "", "n_images": len(y_test), "p_vs_random": "",
                "read_by": "linear probe"}

    (intact,) = trunk_features(model, sites[0], [[]], test)
    rows = [row(None, "intact", "", 0, 0.0, intact)]
    for site in sites:
        conditions = headline_conditions(site, rankings[site.name], fraction)
        feats = trunk_features(model, site, [c for *_, c in conditions], test)
        rows += _against_random([row(site, m, tg, r, f, x) for (m, tg, r, f, _), x in zip(conditions, feats)],
                                "accuracy")
    return rows


def probe_stage(model, images: dict, config: dict, run_dir: Path, load_task=None) -> Path:
    """The probes a run asks for (config['probes']) on its swept sites at the headline fraction; writes probes.csv
    and figures/probes.png. load_task(spec, name) -> TaskData loads the transfer probe's data."""
    run_dir = Path(run_dir)
    asked = list(config.get("probes") or [])
    rankings = read_json(run_dir / "rankings.json", lambda r: isinstance(r, dict), "rankings by site")
    sites = [s for s in select_sites(model, config) if s.name in rankings]
    fraction = verdict.headline_fraction(config["lesion_fractions"])
    settings = {"probes": asked, "probe_data": config.get("probe_data"), "fraction": fraction, "seed": config["seed"],
                "sites": [s.name for s in sites], "readout_images": config.get("readout_images", 500),
                "sweep": read_json(run_dir / "lesion_progress.json").get("settings")}
    path, done = run_dir / PROBES_FILE, run_dir / PROBES_SETTINGS
    if path.exists() and done.exists():
        earlier = read_json(done, lambda d: isinstance(d, dict), "the probes' settings")
        if {k: v for k, v in earlier.items() if k != "rows"} == json.loads(json.dumps(settings)):
            try:  # trusted only as written: every column, numbers, and the rows these settings make
                read_rows(run_dir, expected_rows(asked, list(images), sites, rankings, fraction))
            except UsageError as e:  # its inputs (rankings.json, the network) are intact: it is made again
                print(f"probes: {str(e).split('; expected')[0]}; computing the probes again", flush=True)
            else:
                print(f"probes: {', '.join(asked)} done earlier under the same settings ({path.name}); skipping",
                      flush=True)
                return path
    rows = []
    if "inversion" in asked:
        rows += inversion_rows(model, sites, rankings, image_batches(images, "test"), fraction, config["seed"])
        print(f"probe inversion: {len(sites)} sites x {len(rows)} rows", flush=True)
    if "transfer" in asked:
        if not config.get("probe_data"):
            raise UsageError("probes=['transfer'] needs probe_data: the held-out task's data (a class-folder tree, "
                             "a CIFAR-10 root, a cache or 'demo:objects')")
        data = load_task(config["probe_data"], "probe")
        view = _TaskView(data, next(iter(images.values())).device)
        n = config.get("readout_images", 500)
        fit = image_batches({"probe": view}, "train", n_per_task=n, seed=config["seed"])
        test = image_batches({"probe": view}, "test")
        name = f"probe ({data.source or config['probe_data']})"
        rows += transfer_rows(model, sites, rankings, fit, test, fraction, name)
        print(f"probe transfer: {data.source or config['probe_data']}, {len(data.classes)} classes", flush=True)
    write_csv(path, PROBE_COLUMNS, rows)
    figures.probes_figure(rows, run_dir / "figures" / "probes.png")
    write_text(done, json.dumps(dict(settings, rows=len(rows)), indent=1))  # last: what probes.csv was made under
    return path


def expected_rows(asked: list, tasks: list, sites: list, rankings: dict, fraction: float) -> int:
    """The number of probes.csv's rows that `probe_stage` writes: per probe the intact network (per task for the
    inversion probe), then every lesion of every site at `fraction`."""
    lesions = sum(len(headline_conditions(site, rankings[site.name], fraction)) for site in sites)
    return (len(tasks) * (1 + lesions) if "inversion" in asked else 0) + (1 + lesions if "transfer" in asked else 0)


class _TaskView:
    """A held-out task's images where batches are cut from them (training.TaskImages' interface, on `device`)."""

    def __init__(self, data, device):
        self.data, self.device = data, device

    def batch(self, idx: np.ndarray):
        raw = torch.from_numpy(np.ascontiguousarray(self.data.images[idx]))
        return transforms.to_float(raw.to(self.device)), torch.as_tensor(self.data.labels[idx]).to(self.device)
