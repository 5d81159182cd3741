"""The train stage of a network this tool did not train (foreign.ReadoutNet): its weights stay as they are and
each task's head is a linear readout fitted to the frozen network's features of the task's training images.

The readout is a multinomial logistic regression (scikit-learn) on standardised features, its penalty chosen by
5-fold cross-validation on the training images alone (never on validation or test images), then written into the
head as one linear layer, so that the heads' logits, losses and accuracies are what every ranking, the sweep and
the report read. The fixed readouts (lesion/readouts.py) read the same features a second way, cross-fitted on the
test images, as for any run."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from dualtask.config.settings import TRAIN_LOG_COLUMNS
from dualtask.core.common import UsageError, write_csv
from dualtask.core.device import load_checkpoint, save_checkpoint
from dualtask.data import transforms
from dualtask.model.foreign import ReadoutNet
from dualtask.training.trainer import evaluate

PENALTIES = tuple(float(c) for c in np.logspace(-4, 2, 7))  # inverse penalties cross-validation chooses among


@torch.inference_mode()
def features(model: ReadoutNet, task_images, split: str, batch_size: int = 256) -> tuple:
    """(features (N, width) float64, labels (N,)) of a task's `split` images at the network's readout layer."""
    model.eval()
    idx = task_images.data.indices(split)
    out, labels = [], []
    for start in range(0, len(idx), batch_size):
        x, y = task_images.batch(idx[start:start + batch_size])
        out.append(model.trunk(transforms.normalize(x)).float().cpu().numpy())
        labels.append(y.cpu().numpy())
    return np.concatenate(out).astype(np.float64), np.concatenate(labels)


def row_space(z: np.ndarray) -> tuple:
    """(z in coordinates of its rows' span (N, r), that span's orthonormal basis (r, width)). An L2-penalised
    readout's weights lie in the span of its training rows (its optimality condition), and so do those of each
    cross-validation fold (a subset of the rows): fitted to these coordinates, the readout and every fold's score
    are the same as on the whole width, for r <= N columns instead of width (benchmarks/readout_fit_speed.py: a
    4,096-feature layer read from 700 images, 1.4x faster)."""
    if z.shape[1] <= z.shape[0]:
        return z, np.eye(z.shape[1])
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    keep = s > s[0] * max(z.shape) * np.finfo(z.dtype).eps  # the numerical rank (numpy's matrix_rank tolerance)
    basis = vt[keep] if keep.any() else vt[:1]  # all-zero features: one direction, a readout of constants
    return z @ basis.T, basis


def fit_linear(x: np.ndarray, y: np.ndarray, n_classes: int, seed: int = 0) -> tuple:
    """(weight (n_classes, width), bias (n_classes,), C): a logistic readout of standardised features, its C chosen
    by 5-fold cross-validation over PENALTIES (fitted in the training rows' span, `row_space`), folded into one
    linear layer of the raw features."""
    import warnings

    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.preprocessing import StandardScaler

    present, counts = np.unique(y, return_counts=True)
    if len(present) < 2:
        raise UsageError(f"a task's training images hold {len(present)} class(es) (labels {present.tolist()}); a "
                         f"readout head needs at least two")
    scaler = StandardScaler().fit(x)
    z, basis = row_space(scaler.transform(x))
    folds = int(min(5, counts.min()))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")  # defaults announced to change
        if folds >= 2:
            fit = LogisticRegressionCV(Cs=list(PENALTIES), cv=folds, max_iter=2000, random_state=seed).fit(z, y)
            c = float(np.atleast_1d(fit.C_)[0])
        else:  # a class with one training image: too few to cross-validate, the middle penalty
            c = PENALTIES[len(PENALTIES) // 2]
            fit = LogisticRegression(C=c, max_iter=2000).fit(z, y)
    coef, intercept = fit.coef_ @ basis, fit.intercept_
    if coef.shape[0] == 1:  # two classes: one logit, the second class's against the first
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    weight = np.zeros((n_classes, x.shape[1]))
    bias = np.full(n_classes, -1e4)  # a class absent from the training images is never predicted
    weight[fit.classes_] = coef / scaler.scale_
    bias[fit.classes_] = intercept - (coef / scaler.scale_) @ scaler.mean_
    return weight, bias, c


def fit_heads(model: ReadoutNet, images: dict, config: dict, out_dir: Path, dist) -> None:
    """Fit every task's head (unless out_dir's checkpoint holds them and retrain is not set) and write the
    checkpoint and train_log.csv (the heads' training and validation accuracy, as epoch 0)."""
    ckpt = out_dir / "checkpoint.pt"
    if ckpt.exists() and not config.get("retrain", False):
        if dist.main:
            print(f"readout heads fitted earlier ({ckpt}); skipping (--retrain=True fits them again)")
        model.load_state_dict(load_checkpoint(ckpt, dist.device)["model"])
        return
    start, chosen = time.perf_counter(), {}
    for task, head in model.heads.items():
        x, y = features(model, images[task], "train")
        weight, bias, chosen[task] = fit_linear(x, y, head.out_features, config.get("seed", 0))
        with torch.no_grad():
            head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
            head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))
    rows = []
    for split in ("train", "val"):
        for task, r in evaluate(model, images, split, dist).items():
            rows.append({"epoch": 0, "task": task, "split": split, "loss": round(r["loss"], 5),
                         "accuracy": round(r["accuracy"], 5), "images_per_s": ""})
    if dist.main:
        classes = {t: list(images[t].data.classes) for t in images}
        save_checkpoint(ckpt, {"model": model.state_dict(), "epoch": 0, "config": config, "classes": classes,
                               "log": rows, "readout_penalties": chosen})
        write_csv(out_dir / "train_log.csv", TRAIN_LOG_COLUMNS, rows)
        val = ", ".join(f"{r['task']} {r['accuracy']:.3f}" for r in rows if r["split"] == "val")
        print(f"readout heads fitted to {config['network']}'s features at {model.readout} (training images, penalty "
              f"by 5-fold cross-validation) in {time.perf_counter() - start:.1f} s: validation accuracy {val}",
              flush=True)
