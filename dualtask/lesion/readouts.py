"""Lesions scored by linear readouts instead of the network's own heads: fixed readouts and refitted ones.

A lesion scored through the network's own heads asks which filters each head reads. Two heads trained on one
task ask that differently too (they start from different weights and lean on different late filters), so a
double dissociation through the heads alone does not show that the filters carry task-specific information:
benchmarks/verdict_calibration.py found it on 6 of 6 networks whose two heads learn the same face task.

Fixed readouts (`fixed_readouts`, `fixed_lesions`; fixed_readout=True, the default): per task, linear readouts
fitted once to the intact network's features of held-out images (the task's test images in 10 folds: every test
image is read by the readout fitted on the other nine, its ridge penalty chosen on those nine alone) and never
refitted. A lesion then costs a task what
it takes from the features its readout reads. Two heads of one task get readouts of one form (fitted to the same
task, on images the network never trained on), so the filters each head happens to read cannot split them, while
in a branched network a task's copy alone feeds its readout. The verdict asks a site to dissociate through them
too (report.confirmed).

Refitted readouts (`refit_lesions`; refit_readout=True): per task, a readout fitted anew to each lesion's
features on `readout_images` of its training images: what the features still hold for the task. The features of
small networks stay linearly readable after a 20% lesion, so this reading has little power (BENCHMARKS.md).

The readout is the project's linear probe (inspection.linear_probe's form: standardised features, a ridge
classifier, closed form) on the heads' own input (the trunk's features, a branched network's task copy), its
ridge penalty chosen by leave-one-out on the intact network's features of the images the readout is fitted on
(never on the images it scores) and then kept for every lesion. Results have the form of
`lesion_engine.evaluate_lesions`'s (a loss is not defined: NaN), so the sweep's
rows, index, ring null and correction apply as they are; they go to common.READOUT_DIRS' folder inside the run
folder.
"""
from __future__ import annotations

import numpy as np
import torch

from dualtask.core.common import UsageError
from dualtask.core.device import autocast
from dualtask.lesion.engine import SiteRunner, evaluate_lesions, lesion_mask

ALPHAS = tuple(float(a) for a in np.logspace(-1, 5, 13))  # the ridge penalties leave-one-out chooses among
PENALTY_RULE = "per_fold"  # the fixed readouts' penalty: chosen per fold on its own training images (nested)
FEATURE_BUDGET = 512 * 2**20  # bytes of readout inputs held at once (lesions are scored in groups that fit)


def probe(alpha: float):
    """A linear readout: standardised features, a ridge classifier of penalty `alpha` (scikit-learn)."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), RidgeClassifier(alpha=alpha))


def choose_alpha(features: np.ndarray, labels: np.ndarray) -> float:
    """The ridge penalty among ALPHAS that predicts the (one-hot) labels best by leave-one-out over these images
    (scikit-learn's RidgeClassifierCV on the standardised features): only the images given are looked at."""
    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.preprocessing import StandardScaler

    return float(RidgeClassifierCV(alphas=ALPHAS).fit(StandardScaler().fit_transform(features), labels).alpha_)


def choose_alphas(features: dict, labels: dict) -> dict:
    """{task: `choose_alpha` on that task's (intact) features}."""
    return {t: choose_alpha(features[t], labels[t]) for t in features}


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


FIXED_FOLDS = 10  # the fixed readouts' folds of each task's test images (fewer where the test set is small)


def fixed_readouts(model, site, test_batches: list, seed: int = 0, folds: int = FIXED_FOLDS) -> dict:
    """The fixed readouts `fixed_lesions` scores lesions with: per task, its test images dealt into `folds` folds
    (seeded, in turn within each class), and per fold a linear readout (`probe`) fitted to the intact network's
    readout inputs of the other folds' images, its penalty chosen (`choose_alpha`) on those images alone. Every
    test image is later read by the readout that did not see it, and whose penalty it did not help choose, so no
    image a readout saw, and no image the network trained on, is scored; with many folds each readout sees most
    of the images and a task's accuracy averages over many readouts, so the noise of any one readout's fit weighs
    little. Returns {task: {'fold': int array (per test image, in order), 'readouts': [per fold],
    'alphas': [each fold's penalty]}}."""
    keep, add = lesion_mask([], site.n_filters)
    (features,) = readout_inputs(model, site, [(keep, add)], test_batches, 1)
    labels = _labels(test_batches)
    for task, y in labels.items():  # preflight.check_data asks the same before a run trains
        problem = folds_problem(y, seed, folds)
        if problem:
            raise UsageError(f"fixed_readout: {task}: {problem}")
    out = {}
    for task, y in labels.items():
        fold, k = deal_folds(y, seed, folds)
        out[task] = {"fold": fold, "alphas": [], "readouts": []}
        for f in range(k):  # fold f's readout and its penalty see the other folds' images only
            x, y_fit = features[task][fold != f], y[fold != f]
            out[task]["alphas"].append(choose_alpha(x, y_fit))
            out[task]["readouts"].append(probe(out[task]["alphas"][-1]).fit(x, y_fit))
    return out


def deal_folds(y: np.ndarray, seed: int = 0, folds: int = FIXED_FOLDS) -> tuple:
    """(the fold of each of a task's test images (labels `y`, in order), the number of folds) for the fixed
    readouts: max(2, min(folds, n // 2)) folds, dealt seeded and in turn within each class, one deal running on
    from class to class so that every fold gets its share of each (the same deal for every task: tasks of one
    image set split alike)."""
    k = max(2, min(folds, len(y) // 2))
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(y), dtype=int)
    start = 0
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        fold[members] = (start + np.arange(len(members))) % k
        start += len(members)
    return fold, k


def folds_problem(y: np.ndarray, seed: int = 0, folds: int = FIXED_FOLDS) -> str | None:
    """Why a task's test images (labels `y`) cannot have fixed readouts, or None: each fold's readout is fitted on
    the other folds' images, which must hold at least two classes."""
    y = np.asarray(y)
    fold, k = deal_folds(y, seed, folds)
    if any(len(np.unique(y[fold != f])) < 2 for f in range(k)):
        return (f"too few test images ({len(y)} in {len(np.unique(y))} class(es)) to fit a readout without each of "
                f"{k} folds (each fold's readout is fitted on the other folds' images, at least two classes)")
    return None


def penalty_range(alphas: list) -> str:
    """The fixed readouts' penalties of one task in words, for the log: one value, or the range over folds."""
    low, high = min(alphas), max(alphas)
    return f"penalty {low:g} in every fold" if low == high else f"penalty {low:g} to {high:g} by fold"


def fixed_reader(readouts: dict):
    """The fixed readouts (`fixed_readouts`) as `lesion_engine.evaluate_lesions`' `read`: the predicted labels of a
    task's test images start..start+B (in order) from their features, each image by its own fold's readout."""
    def read(task: str, features: np.ndarray, start: int) -> np.ndarray:
        fold, fitted = readouts[task]["fold"][start:start + len(features)], readouts[task]["readouts"]
        predicted = np.empty(len(features), dtype=np.int64)
        for f in np.unique(fold):  # fold f's images, read by the readout fitted without them
            predicted[fold == f] = fitted[f].predict(features[fold == f])
        return predicted
    return read


def as_scored(results: list) -> list:
    """evaluate_lesions' results with `read` as the readouts' own: per lesion {task: {'correct': what the readout
    read right, 'loss': NaN (a readout has none)}}."""
    return [{t: {"correct": r["read"], "loss": np.full(len(r["read"]), np.nan)} for t, r in res.items()}
            for res in results]


def fixed_lesions(model, site, lesions: list, readouts: dict, test_batches: list, mode: str = "zero",
                  means=None, masks_per_pass: int = 1) -> list:
    """Score each lesion (channel-index arrays of `site`) by the fixed readouts (`fixed_readouts`: fitted once, to
    the intact network's features of held-out images, never refitted): each test image read by the readout of
    its fold, which did not see it. Two heads of one task share their readout's form (fitted to the same task on
    images the network never trained on), a branched network's task copy alone feeds its task's. Returns per
    lesion {task: {'correct': bool array, 'loss': NaN array}}, as evaluate_lesions'. The lesion sweep scores them
    in the heads' own pass (evaluate_lesions with `read=fixed_reader(...)`) when it can."""
    return as_scored(evaluate_lesions(model, site, lesions, test_batches, mode, means, masks_per_pass,
                                      read=fixed_reader(readouts), heads=False))
