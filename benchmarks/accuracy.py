"""Test accuracy of every backbone with the project's training defaults against a plain reference recipe.

    python benchmarks/accuracy.py                       # CPU, the small budget below (about 65 minutes on 2 cores)
    python benchmarks/accuracy.py --device=cuda --image_size=112 --max_per_class=0 --max_classes=0 --epochs=30

Both recipes train each backbone on the same real photographs (../shared/data/lfw_min20 identities and
../shared/data/cifar10 objects, or --face_data / --object_data), with the same splits, batches, augmentation
and number of steps, and are scored on the same test images. They differ only in the recipe:
- defaults: what `python <backbone script>` does (dualtask.train with the current recipe: AdamW with its lr
  per 256 images scaled to the batch, a 2-epoch warm-up, label smoothing, He initialisation and a classifier
  sized to the feature map for VGG, zero-initialised residual branches for ResNet/ResNeXt, the scripts'
  weight decay and gradient clipping);
- plain: torchvision's networks as they come (default initialisation, VGG's 7 x 7 pool), SGD with momentum 0.9,
  lr 0.1 x batch/256, cosine decay, weight decay 1e-4 on weights only, no warm-up, no clipping, no label
  smoothing.
On CUDA the defaults train as the scripts do (bf16 autocast, channels_last) and plain in float32, as a
plain loop would. It prints one line per backbone (test accuracy of each head under both recipes, with chance) and last
`defaults_at_least_plain: k/n` (the backbones on which the defaults are at least as accurate on both heads).
Finished backbones are kept in --out/results.json, so an interrupted benchmark resumes.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dualtask.config import settings
from dualtask.core.common import write_text
from dualtask.data import taskdata, transforms
from dualtask.experiment import pipeline as dualtask
from dualtask.model import network
from dualtask.training import trainer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
# name -> (backbone, batch_norm)
VARIANTS = {"vgg16": ("vgg16", True), "vgg16_no_bn": ("vgg16", False), "vgg19": ("vgg19", True),
            "resnet50": ("resnet50", True), "resnext50": ("resnext50", True)}
SCRIPTS = {"vgg16": "vgg16", "vgg19": "vgg19", "resnet50": "ResNet", "resnext50": "ResNeXt"}


def script_defaults(backbone: str) -> dict:
    return settings.hyperparameters(vars(settings.load_script(ROOT / f"{SCRIPTS[backbone]}.py")))


def train_plain(model, images: dict, config: dict, dist) -> None:
    """The plain reference recipe, on the batches dualtask.train draws (same order, same augmentation)."""
    tasks = list(images)
    per_task = config["batch_size"] // len(tasks)
    train_idx = {t: images[t].data.indices("train") for t in tasks}
    steps = max(1, math.ceil(max(len(i) for i in train_idx.values()) / per_task))
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=0.1 * config["batch_size"] / 256, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps * config["epochs"])
    model.train()
    for epoch in range(config["epochs"]):
        gen = torch.Generator().manual_seed(config["seed"] * 1_000_003 + epoch * 1009)
        order = {t: trainer.epoch_order(train_idx[t], config["seed"], epoch, k, steps * per_task, 0, 1)
                 for k, t in enumerate(tasks)}
        for step in range(steps):
            xs, ys = zip(*(images[t].batch(order[t][step * per_task:(step + 1) * per_task]) for t in tasks))
            out = model(transforms.normalize(transforms.augment(torch.cat(xs), gen)))
            loss = sum(F.cross_entropy(out[t][k * per_task:(k + 1) * per_task], ys[k]) for k, t in enumerate(tasks))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        val = trainer.evaluate(model, images, "val", dist)
        print(f"  plain epoch {epoch + 1}/{config['epochs']}: " +
              ", ".join(f"{t} val {v['accuracy']:.3f}" for t, v in val.items()), flush=True)


def parse() -> tuple:
    """(the command line's arguments, the variants asked for); exits naming what is wrong."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--face_data", default=str(SHARED / "lfw_min20"))
    p.add_argument("--object_data", default=str(SHARED / "cifar10"))
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--max_per_class", type=int, default=40, help="0 = all")
    p.add_argument("--max_classes", type=int, default=20, help="0 = all (faces: the first N identities by name)")
    p.add_argument("--epochs", type=int, default=20)  # 280 steps of 32: 112 left every VGG face head at chance
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--face_crop", default="boxes", choices=taskdata.FACE_CROPS,
                   help="how LFW's photographs are cropped, as the scripts' face_crop (none: the whole 250-px frames)")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_accuracy"))
    args = p.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        sys.exit(f"error: --variants: unknown {', '.join(unknown)}; expected names from {', '.join(VARIANTS)}")
    for spec in (args.face_data, args.object_data):
        if not Path(spec).exists():
            sys.exit(f"error: {spec} does not exist; expected a folder of class folders (../shared/data holds them)")
    return args, names


def result_key(budget: dict, name: str) -> str:
    """A variant's entry in results.json: its budget, name and the current recipe."""
    return json.dumps(dict(budget, variant=name, recipe=settings.RECIPE), sort_keys=True)


def both_recipes(name: str, config: dict, datasets: dict, images: dict, seed: int, dist) -> dict:
    """One variant trained under the defaults and under the plain recipe, each scored on the test images:
    {'chance', 'defaults', 'plain' ({task: test accuracy}), '<recipe>_seconds'}."""
    classes = {t: len(d.classes) for t, d in datasets.items()}
    row = {"chance": {t: d.chance for t, d in datasets.items()}}
    for recipe in ("defaults", "plain"):
        torch.manual_seed(seed)
        start = time.perf_counter()
        if recipe == "defaults":
            config["recipe"] = settings.RECIPE
            model = network.build_model(config, classes).to(dist.device)
            Path(config["out_dir"]).mkdir(parents=True, exist_ok=True)
            trainer.train(model, images, config, Path(config["out_dir"]), dist)
        else:
            model = network.build_model(dict(config, recipe=1), classes).to(dist.device)
            train_plain(model, images, config, dist)
        test = trainer.evaluate(model, images, "test", dist)
        row[recipe] = {t: v["accuracy"] for t, v in test.items()}
        row[recipe + "_seconds"] = round(time.perf_counter() - start, 1)
        print(f"{name} {recipe}: " + ", ".join(f"{t} test {a:.3f}" for t, a in row[recipe].items()) +
              f" ({row[recipe + '_seconds']:.0f} s)", flush=True)
    return row


def print_table(args, names: list, budget: dict, results: dict) -> None:
    """Every variant's test accuracy under both recipes, and last `defaults_at_least_plain: k/n`."""
    print(f"\ntest accuracy, {args.image_size} px, {args.epochs} epochs, batch {args.batch_size}, "
          f"{args.max_per_class or 'all'} images per class, {args.device}:")
    print(f"{'backbone':<12} {'task':<8} {'chance':>7} {'defaults':>9} {'plain':>7}")
    wins = 0
    for name in names:
        row = results[result_key(budget, name)]
        for t, chance in row["chance"].items():
            print(f"{name:<12} {t:<8} {chance:7.3f} {row['defaults'][t]:9.3f} {row['plain'][t]:7.3f}")
        wins += all(row["defaults"][t] >= row["plain"][t] for t in row["chance"])
    print(f"defaults_at_least_plain: {wins}/{len(names)}")


def main():
    args, names = parse()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    budget = dict(face_data=args.face_data, object_data=args.object_data, image_size=args.image_size,
                  max_per_class=args.max_per_class or None, max_classes=args.max_classes or None,
                  epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, device=args.device,
                  face_crop=args.face_crop)
    dist = trainer.Dist(args.device)
    datasets, images = None, None
    for name in names:
        key = result_key(budget, name)
        if key in results:
            continue
        backbone, batch_norm = VARIANTS[name]
        config = dict(script_defaults(backbone), **budget, backbone=backbone, batch_norm=batch_norm,
                      out_dir=str(out / name), retrain=True, health_check="warn", stages=["train"])
        settings.check_config(config)
        if datasets is None:
            datasets = dualtask.load_datasets(config)
            images = {t: trainer.TaskImages(d, dist.device) for t, d in datasets.items()}
            print(", ".join(f"{t}: {len(d.classes)} classes, {d.counts()['train']} train / {d.counts()['test']} test"
                            for t, d in datasets.items()), flush=True)
        results[key] = dict(both_recipes(name, config, datasets, images, args.seed, dist), variant=name)
        write_text(results_path, json.dumps(results, indent=1))
    print_table(args, names, budget, results)


if __name__ == "__main__":
    main()
