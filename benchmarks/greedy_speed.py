"""The greedy ranking's cost: exhaustive greedy against racing and first-order (Taylor) pruned greedy.

    python benchmarks/greedy_speed.py
    python benchmarks/greedy_speed.py --device=cuda --image_size=224 --rank_images=6400

Trains (once, then loads) a demo VGG16-BN at --image_size px as benchmarks/lesion_speed.py does (fc_width 256,
batch 32, max_per_class 60 or as many as --rank_images needs; 10 epochs at 32 px so that the heads have learned
something to rank by, 2 at larger sizes), draws --rank_images training images per task, and ranks the filters of
the --sites by the greedy ranking for both tasks, three ways in one process (interleaved per site and task, so
that load on the machine falls on all three alike): exhaustive (every remaining filter on every image at each
step), racing (`lesion_utils.race`, margin --margin) and Taylor-pruned (each step scores only the --candidates
share of the site's filters with the highest first-order score). Per variant it prints multiply-adds
(candidate-image suffix evaluations times the suffix's multiply-adds per image, plus one prefix pass per image,
plus the first-order passes counted as forward and backward through the suffix, 2x), wall time, and the share of
site x task whose 20% set (the filters a 20% lesion silences) is the exhaustive one, with the mean share of the
exhaustive 20% set it holds (overlap); and the process's CPU time, which other work on the machine does not
inflate (wall times leave out any time the process was stopped from outside). Its last two lines are `speedup: X`
(exhaustive wall time / racing wall time) and `same_sets: Y` (racing's share of identical sets).

On a GPU (--device=cuda, or --project) the whole ranking at 224 px and 6,400 images per task is too long to run
three ways, so it projects the face ranking of every site (x2 for both tasks): the exhaustive one from --probe
candidates of the first step timed on every image, scaled by the whole ranking's candidate-image evaluations;
racing and Taylor-pruned from --steps whole steps timed, scaled by the whole ranking's candidates over those of
the steps timed. It prints `projected_speedup: X` last and compares no sets.
"""
import argparse
import threading
import time
from pathlib import Path

import numpy as np
import torch
from lesion_speed import multiply_adds, split_macs

from dualtask.config import settings
from dualtask.core import names
from dualtask.experiment import pipeline as dualtask
from dualtask.lesion import engine, greedy
from dualtask.model import sites as sites_mod
from dualtask.training import trainer

ROOT = Path(__file__).resolve().parents[1]
vgg16 = settings.load_script(ROOT / "vgg16.py")


class ActiveClock:
    """Wall time without the periods this process was stopped from outside (SIGSTOP; seen as gaps of over a
    second between a watchdog thread's 0.1-s ticks), which would otherwise count against whichever variant was
    running."""

    def __init__(self):
        self.paused, self._last = 0.0, time.perf_counter()
        threading.Thread(target=self._tick, daemon=True).start()

    def _tick(self):
        while True:
            time.sleep(0.1)
            now = time.perf_counter()
            if now - self._last > 1.0:
                self.paused += now - self._last - 0.1
            self._last = now

    def __call__(self) -> float:
        return time.perf_counter() - self.paused


CLOCK = ActiveClock()


def trained_model(args, device):
    """The demo VGG16-BN of benchmarks/lesion_speed.py, trained once into run_dir with enough training images per
    class for --rank_images (the demo keeps 70% of a class for training)."""
    per_class = max(60, int(np.ceil(args.rank_images / 10 / 0.7)) + 1)
    config = settings.hyperparameters(vars(vgg16))
    config.update(image_size=args.image_size, fc_width=256, epochs=args.epochs, max_per_class=per_class,
                  demo_per_class=max(100, per_class), batch_size=32, device=args.device, out_dir=args.run_dir,
                  stages=["train"], health_check="warn")
    if not (Path(args.run_dir) / "checkpoint.pt").exists():
        dualtask.run(config)
    model, config = dualtask.load_run(args.run_dir, args.device)
    datasets = dualtask.load_datasets(config)
    images = {t: trainer.TaskImages(d, device) for t, d in datasets.items()}
    return model.eval(), config, images


def variants(site, args):
    """(name, greedy_order keyword arguments) of the three greedy rankings."""
    k = max(1, int(round(args.candidates * site.n_filters)))
    return [("exhaustive", {"racing": False}),
            (f"racing (margin {args.margin:g})", {"racing": True, "margin": args.margin}),
            (f"taylor-pruned ({args.candidates:g} of the filters)", {"racing": False, "candidates": k})]


def macs_of(stats, prefix, suffix):
    return (stats["evaluations"] * suffix + stats["prefix_images"] * prefix
            + 2 * stats["first_order_images"] * suffix)


def steps_of(site, stop=0.2):
    """[remaining filters at each greedy step] of a whole ranking."""
    step = max(1, int(round(greedy.GREEDY_STEP * site.n_filters)))
    n_steps = greedy.greedy_chosen(site.n_filters, stop) // step
    return [site.n_filters - s * step for s in range(n_steps)]


def measure(model, sites, batches, tasks, counts, args, masks):
    """Every variant's whole greedy ranking of every site and task: per variant, seconds, multiply-adds and the
    20% sets."""
    out = {}
    for site in sites:
        prefix, suffix = split_macs(model, site, counts)
        for task in tasks:
            for name, kw in variants(site, args):
                stats = {}
                start, cpu = CLOCK(), time.process_time()
                order, _ = greedy.greedy_order(model, site, batches, task, masks_per_pass=masks[site.name],
                                          precision=args.precision, stats=stats, **kw)
                seconds, cpu = CLOCK() - start, time.process_time() - cpu
                got = out.setdefault(name, {"seconds": 0.0, "cpu": 0.0, "macs": 0, "sets": {}, "evaluations": 0})
                got["seconds"] += seconds
                got["cpu"] += cpu
                got["macs"] += macs_of(stats, prefix, suffix)
                got["evaluations"] += stats["evaluations"]
                got["sets"][site.name, task] = set(order[:int(round(0.2 * site.n_filters))].tolist())
                print(f"  {site.name} ({site.n_filters} filters) {task:<7} {name:<36} {seconds:8.1f} s "
                      f"(CPU {cpu:8.1f} s) {stats['evaluations']:>12,} candidate-image evaluations", flush=True)
    return out


def project(model, sites, batches, counts, args, masks):
    """Per variant, the projected seconds and multiply-adds of every site's whole face ranking (x2 for both
    tasks), from a few timed steps."""
    out = {}
    for site in sites:
        prefix, suffix = split_macs(model, site, counts)
        remaining = steps_of(site)
        n_images = sum(len(y) for t, _, y in batches if t == "face")
        step = max(1, int(round(greedy.GREEDY_STEP * site.n_filters)))
        k = min(args.steps, len(remaining))
        for name, kw in variants(site, args):
            stats = {}
            if name == "exhaustive":  # linear in candidates x images: time --probe candidates of the first step
                images = greedy.RankingImages(model, site, batches, "face", args.precision, masks[site.name])
                images.losses([[0]])  # fills the prefix cache and warms up
                start = CLOCK()
                images.losses([[c] for c in range(min(args.probe, site.n_filters))])
                per_eval = (CLOCK() - start) / (min(args.probe, site.n_filters) * n_images)
                evaluations = sum(remaining) * n_images
                stats = {"evaluations": evaluations, "prefix_images": n_images, "first_order_images": 0}
                seconds = per_eval * evaluations
                exhaustive_per_eval = per_eval
            else:
                start = CLOCK()
                greedy.greedy_order(model, site, batches, "face", stop_fraction=(k * step - 0.5) / site.n_filters,
                               masks_per_pass=masks[site.name], precision=args.precision, stats=stats, **kw)
                measured = CLOCK() - start
                share = sum(remaining) / sum(remaining[:k])  # the whole ranking's candidates over those timed
                seconds = measured * share
                stats = {key: int(stats[key] * share) if key != "prefix_images" else stats[key]
                         for key in ("evaluations", "prefix_images", "first_order_images")}
            got = out.setdefault(name, {"seconds": 0.0, "macs": 0, "evaluations": 0})
            got["seconds"] += 2 * seconds
            got["macs"] += 2 * macs_of(stats, prefix, suffix)
            got["evaluations"] += 2 * stats["evaluations"]
            print(f"  {site.name} ({site.n_filters} filters) {name:<36} projected {2 * seconds:9.1f} s for both "
                  f"tasks ({exhaustive_per_eval * 1e6:.2f} us per exhaustive candidate-image evaluation)",
                  flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--rank_images", type=int, default=256, help="training images per task the rankings use")
    p.add_argument("--sites", default=None,
                   help="site depths, e.g. 10,11,12 (the default on the CPU: block 5); 'all' (the default on a GPU)")
    p.add_argument("--run_dir", default=None, help="default: runs/bench_greedy_vgg16[_<image_size>]")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: 10 at 32 px, else 2)")
    p.add_argument("--margin", type=float, default=greedy.GREEDY_DEFAULTS["margin"])
    p.add_argument("--candidates", type=float, default=0.125, help="Taylor-pruned: share of a site's filters scored")
    p.add_argument("--precision", default="fp32", choices=names.RANKING_PRECISIONS)
    p.add_argument("--project", action="store_true", help="time a few steps and project (the default on a GPU)")
    p.add_argument("--steps", type=int, default=1, help="greedy steps timed per site and variant when projecting")
    p.add_argument("--probe", type=int, default=16, help="candidates timed for the exhaustive projection")
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = 10 if args.image_size <= 32 else 2
    device = torch.device(args.device)
    args.project = args.project or device.type == "cuda"
    if args.run_dir is None:
        args.run_dir = str(ROOT / "runs" / ("bench_greedy_vgg16" + ("" if args.image_size == 32 else
                                                                     f"_{args.image_size}")))
    model, config, images = trained_model(args, device)
    tasks = list(images)
    batches = engine.image_batches(images, "train", n_per_task=args.rank_images, seed=0)
    all_sites = sites_mod.lesion_sites(model)
    wanted = args.sites or ("all" if args.project else "10,11,12")
    sites = all_sites if wanted == "all" else [all_sites[int(d)] for d in wanted.split(",")]
    counts = multiply_adds(model, config["image_size"], device)
    masks = engine.masks_per_pass_by_site(model, sites, batches)
    n_images = {t: sum(len(y) for tb, _, y in batches if tb == t) for t in tasks}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"VGG16-BN at {config['image_size']} px on {name}; ranking images per task: "
          f"{', '.join(f'{t} {n}' for t, n in n_images.items())}; sites: "
          f"{', '.join(f'{s.name} ({s.n_filters})' for s in sites)}; ranking precision {args.precision}")
    if args.project:
        print_projected(project(model, sites, batches, counts, args, masks))
    else:
        print_measured(measure(model, sites, batches, tasks, counts, args, masks))


def print_projected(out: dict) -> None:
    """project's result, a line per variant, and last `projected_speedup: X`."""
    base = out["exhaustive"]
    for variant, got in out.items():
        print(f"{variant:<38} projected {got['macs'] / 1e12:10.1f} TMAC  {got['seconds']:10.1f} s  "
              f"({base['seconds'] / got['seconds']:.2f}x)")
    racing = next(v for v in out if v.startswith("racing"))
    print(f"projected_speedup: {base['seconds'] / out[racing]['seconds']:.2f}")


def print_measured(out: dict) -> None:
    """measure's result as a table against the exhaustive ranking, and last `speedup: X` and `same_sets: Y`."""
    base = out["exhaustive"]
    print(f"{'variant':<38} {'multiply-adds':>14} {'wall':>10} {'CPU time':>10} {'same 20% sets':>14} "
          f"{'overlap':>8}")
    same = {}
    for variant, got in out.items():
        same[variant] = np.mean([got["sets"][key] == base["sets"][key] for key in base["sets"]])
        overlap = np.mean([len(got["sets"][key] & base["sets"][key]) / len(base["sets"][key]) for key in base["sets"]])
        print(f"{variant:<38} {got['macs'] / 1e12:9.2f} TMAC {got['seconds']:8.1f} s {got['cpu']:8.1f} s "
              f"{same[variant]:14.2f} {overlap:8.2f}  ({base['macs'] / got['macs']:.2f}x fewer multiply-adds, "
              f"{base['seconds'] / got['seconds']:.2f}x faster, {base['cpu'] / got['cpu']:.2f}x less CPU time)")
    if CLOCK.paused > 0:
        print(f"(the process was stopped from outside for {CLOCK.paused:.0f} s in all; wall times leave that out)")
    racing = next(v for v in out if v.startswith("racing"))
    print(f"speedup: {base['seconds'] / out[racing]['seconds']:.2f}")
    print(f"same_sets: {same[racing]:.2f}")


if __name__ == "__main__":
    main()
