"""Networks with a known answer, analysed as networks trained elsewhere: through readouts alone, no heads used.

    python benchmarks/readout_known_answers.py --root=.bench/verdict_calibration/<tag>

`--root` is a folder of benchmarks/verdict_calibration.py's trained networks (branched_seed<N>, null_seed<N> and
their data/). Each network's trunk is exported as a state dict (`<network>_trunk.pt` beside its analysis), loaded
with weights_only=True into a fresh module of its architecture and handed to `lesion_utils.analyse` as a plain
nn.Module (its own heads left out), read at its features (`readout_layer="flatten"`) by readout heads fitted to
the frozen trunk on each task's training images and by fixed readouts, and swept with the calibration's lesion
settings but for the ranking images (the loss ranking on 32 ranking images per task, `--rank_images`, 20 random
orders, fractions 0.1, 0.2 and 0.3, the sites the network was swept at there: 0, 12, 13, 15, 16 by default; 8
ranking images, the calibration's, leave 4 per half: too few for the split-half rule, which found no ranking
reproducible in an early-branched network). The report's verdict rules judge each run (verdict.judge_run, as the
report does).

- A branched network (trunk shared to its branch depth, 12 by default, then one copy per task): its post-branch
  sites (deeper than the branch point; the graph names them by the pair of copies, e.g. layer3.5) are true splits.
  The known answer: "yes" naming them.
- A null network (two heads trained on two halves of one face task): read by two readouts of that same task (its
  two halves' images), any "yes" is a false positive.

It prints one line per network (for a branched one, also how well a readout of each copy alone decodes each task)
and, last, the branched networks' post-branch sites found and the nulls' "yes" count, each with its Wilson 95%
interval. Runs go to `<root>/readouts_rank<N>/<network>` and are reused on rerun.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

from verdict_simulation import fmt_rate  # noqa: E402

SETTINGS = dict(image_size=32, device="cpu", batch_size=32, demo_per_class=200, max_per_class=None, max_classes=5,
                readout_layer="flatten", lesion_methods=["loss", "random"],
                random_repeats=20, rank_images=32, lesion_fractions=[0.0, 0.1, 0.2, 0.3], ranking_reliability=True,
                fixed_readout=True, stages=["train", "lesion"])


def exported(model, config: dict, out: Path):
    """The run's trunk as a user hands over a network of their own: its state dict saved to a file
    (`<out>_trunk.pt`), loaded with weights_only=True into a fresh module of the same architecture, no heads."""
    import torch

    from dualtask.model.network import build_model

    path = out.parent / f"{out.name}_trunk.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.trunk.state_dict(), path)
    classes = {t: head.out_features for t, head in model.heads.items()}
    trunk = build_model(dict(config, init="random"), classes, load_init=False).trunk
    trunk.load_state_dict(torch.load(path, weights_only=True))
    return trunk


def analysed(model, config: dict, run: Path, out: Path, rank_images: int = SETTINGS["rank_images"]) -> dict:
    """The run's trunk (`model`, `config`: dualtask.load_run's), exported and loaded as a user's own network
    (`exported`), analysed through readouts into `out`; its verdict (verdict.judge_run on out's files)."""
    import lesion_utils as L
    from dualtask.core.common import read_csv, read_json
    from dualtask.report import build as report
    from dualtask.stats import verdict as V

    tasks = {"face_data": "demo", "object_data": "demo"}
    if run.name.startswith("null"):
        data = run.parent / "data"
        tasks = {"tasks": {t: str(data / f"halves_seed{config['seed']}_{t}") for t in ("face_a", "face_b")}}
    L.analyse(exported(model, config, out), out, seed=config["seed"], lesion_layers=config["lesion_layers"],
              **dict(SETTINGS, rank_images=rank_images), **tasks)
    diss, results = read_csv(out / "dissociation.csv"), read_csv(out / "lesion_results.csv")
    own = read_json(out / "config.json")
    fixed = report.read_readout(out, "fixed", V.deciding(own))
    j = V.judge_run(diss, results, read_json(out / "rankings.json"), own, fixed and fixed["dissociation"],
                    fixed and fixed["results"])
    return {"answer": j.answer.value, "split": {f.depth: f.site for f in j.findings if f.counts is V.Counts.SPLIT},
            "counts": {f.site: f.counts.value for f in j.findings}, "depths": config["lesion_layers"],
            "branch_at": config["branch_at"]}


def readout_features(model, out: Path) -> dict:
    """{task: ((train features, labels), (test features, labels))}: a trained run's trunk (`model`) read at the
    features its analysis `out` read (readout_layer, its data settings)."""
    import torch

    from dualtask.core.common import read_json
    from dualtask.experiment.pipeline import TaskImages, load_datasets
    from dualtask.model.foreign import ReadoutNet
    from dualtask.training.readout_heads import features

    own = {k: v for k, v in read_json(out / "config.json").items() if k != "tasks"}  # the data settings as given
    data = load_datasets(own)
    net = ReadoutNet(model.trunk, out.name, {t: len(d.classes) for t, d in data.items()}, own["image_size"],
                     own.get("readout_layer"))
    images = {t: TaskImages(d, torch.device("cpu")) for t, d in data.items()}
    return {t: (features(net, images[t], "train"), features(net, images[t], "test")) for t in data}


def copies_decoded(model, out: Path) -> dict:
    """{task: {copy: test accuracy}} of readouts fitted (readout_heads.fit_linear, on the training images) to one
    copy's half of a branched trunk's features alone: how much of each task each copy carries, whichever task it
    was trained for (the copies are concatenated along the channels, copy k the k-th half)."""
    from dualtask.training.readout_heads import fit_linear

    decoded = {}
    for task, ((x, y), (xt, yt)) in readout_features(model, out).items():
        half = x.shape[1] // 2
        decoded[task] = {}
        for k, copy_of in enumerate(model.tasks):  # the branched copies, in the order of its tasks
            part = slice(k * half, (k + 1) * half)
            weight, bias, _ = fit_linear(x[:, part], y, int(y.max()) + 1)
            decoded[task][f"{copy_of} copy"] = float(((xt[:, part] @ weight.T + bias).argmax(1) == yt).mean())
    return decoded


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="verdict_calibration.py's folder of trained networks")
    parser.add_argument("--kinds", default="branched,null", help="which networks: branched, null")
    parser.add_argument("--seeds", default=None, help="which seeds, e.g. 0,1,2 (default: every one in --root)")
    parser.add_argument("--rank_images", type=int, default=SETTINGS["rank_images"],
                        help="ranking images per task (their two halves give the split-half reproducibility)")
    parser.add_argument("--copies", action=argparse.BooleanOptionalAction, default=True,
                        help="for a branched network, also how well each copy alone decodes each task (a few minutes)")
    args = parser.parse_args(argv)
    from dualtask import load_run

    root = Path(args.root)
    start = time.perf_counter()
    found, sites, yes, nulls = 0, 0, 0, 0
    for kind in args.kinds.split(","):
        runs = sorted(root.glob(f"{kind}_seed*"), key=lambda r: int(r.name.rsplit("seed", 1)[1]))
        for run in [r for r in runs if args.seeds is None or r.name.rsplit("seed", 1)[1] in args.seeds.split(",")]:
            t = time.perf_counter()
            model, config = load_run(run)
            out = root / f"readouts_rank{args.rank_images}" / run.name
            v = analysed(model, config, run, out, args.rank_images)
            line = f"{run.name}: {v['answer']} ({time.perf_counter() - t:.0f} s); " + ", ".join(
                f"{s}: {c}" for s, c in v["counts"].items())
            print(line, flush=True)
            if kind == "branched" and args.copies:
                decoded = copies_decoded(model, out)
                print("  each copy alone, test accuracy: " + "; ".join(
                    f"{task} from the " + ", ".join(f"{c} {a:.3f}" for c, a in by.items())
                    for task, by in decoded.items()), flush=True)
            if kind == "branched":
                post = [d for d in v["depths"] if d > v["branch_at"]]
                found += sum(d in v["split"] for d in post)
                sites += len(post)
            else:
                yes += v["answer"] == "yes"
                nulls += 1
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    if sites:
        print(f"power_through_readouts: {fmt_rate(found, sites)} (post-branch sites of branched networks read as "
              f"networks trained elsewhere)")
    if nulls:
        print(f"false_positive_rate_through_readouts: {fmt_rate(yes, nulls)} (null networks read by two readouts of "
              f"one task)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
