"""Refitted readouts: every lesion also scored by a linear readout fitted anew to the lesioned network's features.

A lesion scored through the network's own heads asks which filters each head reads. Two heads trained on one
task ask that differently too (they start from different weights and lean on different late filters), so a
double dissociation through the heads alone does not show that the filters carry task-specific information:
benchmarks/verdict_calibration.py found it on 6 of 6 networks whose two heads learn the same face task. A readout
refitted to the lesioned features asks what the features still hold for each task: for two heads of one task it
is the same readout (fitted on the same images, exactly so; on halves of them, nearly), so their lesions cannot
dissociate, while in a branched network a task's copy alone feeds its readout and the dissociation stands.

The readout is the project's linear probe (inspection.linear_probe's form: standardised features, a ridge
classifier, closed form): fitted per task on `readout_images` of its training images (the heads' own input:
the trunk's features, a branched network's task copy), its ridge penalty chosen once per task on the intact
network's features by leave-one-out and then kept for every lesion, and scored on the test images. Its results
have the form of `lesion_engine.evaluate_lesions`'s (a loss is not defined: NaN), so the sweep's rows, index,
ring null and correction apply as they are; they go to common.READOUT_DIR inside the run folder.
"""
from __future__ import annotations

import numpy as np
import torch

from common import autocast
from lesion_engine import lesion_mask, SiteRunner

ALPHAS = tuple(float(a) for a in np.logspace(-1, 5, 13))  # the ridge penalties leave-one-out chooses among
FEATURE_BUDGET = 512 * 2**20  # bytes of readout inputs held at once (lesions are scored in groups that fit)


def probe(alpha: float):
    """A linear readout: standardised features, a ridge classifier of penalty `alpha` (scikit-learn)."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), RidgeClassifier(alpha=alpha))


def choose_alphas(features: dict, labels: dict) -> dict:
    """{task: the ridge penalty among ALPHAS with the best leave-one-out accuracy on its (intact) features}."""
    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.preprocessing import StandardScaler

    return {t: float(RidgeClassifierCV(alphas=ALPHAS).fit(StandardScaler().fit_transform(features[t]), labels[t])
                     .alpha_) for t in features}


def _labels(batches: list) -> dict:
    labels = {}
    for task, _, y in batches:
        labels.setdefault(task, []).append(y.cpu())
    return {t: torch.cat(v).numpy() for t, v in labels.items()}


@torch.inference_mode()
def readout_inputs(model, site, masks: list, batches: list, masks_per_pass: int) -> list:
    """Per mask ((keep, add) of `lesion_mask`), {task: (images, width) float32 array} of what each task's readout
    reads, over every batch of that task (in order): the prefix runs once per batch."""
    runner = SiteRunner(model, site)
    out = [{} for _ in masks]
    unique = {}  # batches holding the same image tensor (tasks that share their images) run once
    for task, x, _ in batches:
        unique.setdefault(id(x), (x, []))[1].append(task)
    for x, tasks in unique.values():
        with autocast(x.device):
            cached = runner.prefix(x)
            for start in range(0, len(masks), masks_per_pass):
                group = masks[start:start + masks_per_pass]
                inputs = runner.readout_inputs(cached, torch.stack([k for k, _ in group]),
                                               torch.stack([a for _, a in group]))
                for task in tasks:
                    for k in range(len(group)):
                        out[start + k].setdefault(task, []).append(inputs[task][k].float().cpu())
    return [{t: torch.cat(v).numpy() for t, v in per.items()} for per in out]


def refit_lesions(model, site, lesions: list, fit_batches: list, test_batches: list, alphas: dict | None = None,
                  mode: str = "zero", means=None, masks_per_pass: int = 1) -> tuple:
    """Score each lesion (channel-index arrays of `site`) by readouts refitted to its features: per task, fitted
    on `fit_batches`' images and scored on `test_batches`'. alphas: {task: ridge penalty}, chosen by
    `choose_alphas` on the first lesion's features when None (pass [] first: the intact network). Returns
    ([per lesion {task: {'correct': bool array, 'loss': NaN array}} as evaluate_lesions'], alphas)."""
    model.eval()
    masks = [lesion_mask(ch, site.n_filters, None if mode == "zero" else means) for ch in lesions]
    y_fit, y_test = _labels(fit_batches), _labels(test_batches)
    width = _width(model, site, fit_batches)
    per_lesion = (sum(len(v) for v in y_fit.values()) + sum(len(v) for v in y_test.values())) * width * 4
    chunk = max(1, FEATURE_BUDGET // max(1, per_lesion))
    results = []
    for start in range(0, len(masks), chunk):
        group = masks[start:start + chunk]
        fit = readout_inputs(model, site, group, fit_batches, masks_per_pass)
        test = readout_inputs(model, site, group, test_batches, masks_per_pass)
        if alphas is None:
            alphas = choose_alphas(fit[0], y_fit)
        for f, t in zip(fit, test):
            scored = {}
            for task in y_test:
                readout = probe(alphas[task]).fit(f[task], y_fit[task])
                correct = readout.predict(t[task]) == y_test[task]
                scored[task] = {"correct": correct, "loss": np.full(len(correct), np.nan)}
            results.append(scored)
    return results, alphas


@torch.inference_mode()
def _width(model, site, batches: list) -> int:
    """The widest task readout input (numbers per image)."""
    _, x, _ = batches[0]
    keep, add = lesion_mask([], site.n_filters)
    runner = SiteRunner(model, site)
    inputs = runner.readout_inputs(runner.prefix(x[:1]), keep[None], add[None])
    return max(v.shape[-1] for v in inputs.values())
