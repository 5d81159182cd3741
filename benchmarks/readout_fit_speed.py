"""The readout heads' fit of a network trained elsewhere, in the span of its training rows against the plain fit on
every feature, in one run: the same cross-validated logistic readout (scikit-learn's LogisticRegressionCV over
readout_heads.PENALTIES, 5 folds, standardised features), timed both ways on one feature matrix.

    cd benchmarks && python readout_fit_speed.py --run=<root>/branched_seed0 --task=object
    python benchmarks/readout_fit_speed.py [--images=700] [--width=4096] [--classes=5]

With `--run` (a network of benchmarks/verdict_calibration.py whose analysis readout_known_answers.py wrote into
<root>/readouts/<network>), the features are that network's, as its readout heads read them: the task's training
images to fit, its test images to compare. Without, they are ReLU outputs of a random projection of
class-dependent inputs (cross-validation then tends to choose the strongest penalty, where both fits are quick).
It prints both times, the chosen penalties, the largest difference of the two
readouts' logits on held-out features relative to their size and the share of equal predictions, and last
`speedup: X`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402


def features(n: int, width: int, classes: int, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    latent = rng.normal(size=(n, 64)) + rng.normal(size=(classes, 64))[y] * 0.5
    return np.maximum(latent @ rng.normal(size=(64, width)) / 8 + rng.normal(size=(n, width)) * 0.5, 0), y


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=700, help="training images (the calibration's: 700)")
    parser.add_argument("--width", type=int, default=4096, help="features (a branched ResNet50's: 4,096)")
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--run", default=None, help="a calibration network's run folder (its features read)")
    parser.add_argument("--task", default="object", help="with --run: the task whose readout is fitted")
    args = parser.parse_args(argv)
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.preprocessing import StandardScaler

    from dualtask.training.readout_heads import PENALTIES, fit_linear

    if args.run:
        from pathlib import Path

        from readout_known_answers import readout_features

        run = Path(args.run)
        from dualtask import load_run

        (x, y), (held, _) = readout_features(load_run(run)[0], run.parent / "readouts" / run.name)[args.task]
        args.images, args.width, args.classes = x.shape[0], x.shape[1], int(y.max()) + 1
    else:
        x, y = features(args.images, args.width, args.classes, 0)
        held, _ = features(500, args.width, args.classes, 1)
    start = time.perf_counter()
    weight, bias, c = fit_linear(x, y, args.classes)
    fast = time.perf_counter() - start
    start = time.perf_counter()
    scaler = StandardScaler().fit(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = LogisticRegressionCV(Cs=list(PENALTIES), cv=5, max_iter=2000, random_state=0)
        plain.fit(scaler.transform(x), y)
    slow = time.perf_counter() - start
    ours, theirs = held @ weight.T + bias, plain.decision_function(scaler.transform(held))
    print(f"{args.images} images x {args.width} features, {args.classes} classes, threads "
          f"{os.environ['OMP_NUM_THREADS']}")
    print(f"plain fit on every feature: {slow:.1f} s, penalty C={float(plain.C_[0]):g}")
    print(f"fit in the training rows' span: {fast:.1f} s, penalty C={c:g}")
    print(f"largest logit difference: {np.abs(ours - theirs).max() / np.abs(theirs).max():.2e} of the largest "
          f"logit; equal predictions: {(ours.argmax(1) == theirs.argmax(1)).mean():.3f}")
    print(f"speedup: {slow / fast:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
