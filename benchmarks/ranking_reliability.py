"""How many ranking images a reproducible ranking needs: split-half reliability against rank_images.

    python benchmarks/ranking_reliability.py RUN_DIR [--sizes="[32, 64, 128, 256, 512]"] [--methods="['activation']"]

Loads a trained run (any backbone script's out_dir), and for each number N of ranking images per task draws N
training images per task, ranks every lesion site's filters on each half (N/2 images) with each method, and
prints the share of top-10% and top-20% filters the two halves agree on and their Spearman correlation,
averaged over sites and tasks (with the worst site). The top-20% agreement is what decides whether the sets a
20% lesion silences are the network's or the sample's. Activation ranking costs forward passes only; loss
ranking one suffix pass per filter and image (slow on a CPU: pass --sites to limit it).
"""
import argparse
import ast
import sys

import numpy as np
import torch

from dualtask.experiment import pipeline as dualtask
from dualtask.lesion import engine
from dualtask.lesion import rankings as rankings_mod
from dualtask.model import sites as sites_mod
from dualtask.training import trainer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--sizes", default="[32, 64, 128, 256, 512]", help="ranking images per task (both halves)")
    parser.add_argument("--methods", default="['activation']")
    parser.add_argument("--sites", default="None", help="site depths, e.g. [0, 8, 16]; None = every site")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes, methods, wanted = (ast.literal_eval(v) for v in (args.sizes, args.methods, args.sites))
    model, config = dualtask.load_run(args.run_dir)
    datasets = dualtask.load_datasets(config)
    images = {t: trainer.TaskImages(d, torch.device("cpu")) for t, d in datasets.items()}
    tasks = list(images)
    sites = sites_mod.select_sites(model, dict(config, lesion_layers=wanted, lesion_inner=False))
    available = min(len(d.indices("train")) for d in datasets.values())
    print(f"{args.run_dir}: {config['backbone']}, {len(sites)} sites, at most {available} training images per task")
    print("rank_images  method      top10 (worst)   top20 (worst)   spearman (worst)")
    for n in sizes:
        if n > available:
            print(f"{n:>11}  skipped: a task has only {available} training images")
            continue
        batches = engine.image_batches(images, "train", n_per_task=n, seed=args.seed)
        halves = rankings_mod.split_halves(batches)
        per_method = {m: {"top10": [], "top20": [], "spearman": []} for m in methods}
        for site in sites:
            rankings = [rankings_mod.rank_site(model, site, half, tasks, methods) for half in halves]
            for method, per_task in rankings_mod.split_half_reliability(tuple(rankings)).items():
                for rel in per_task.values():
                    for key in per_method[method]:
                        per_method[method][key].append(rel[key])
        for method, values in per_method.items():
            cells = [f"{np.nanmean(v):.2f} ({np.nanmin(v):.2f})" for v in values.values()]
            print(f"{n:>11}  {method:<10}  {cells[0]:<14}  {cells[1]:<14}  {cells[2]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
