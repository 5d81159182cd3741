"""The lesion sweep's speed: the suffix-only engine against a naive sweep, on the same conditions.

    python benchmarks/lesion_speed.py

Trains (once, then loads) a small demo VGG16 on the CPU, ranks each site's filters by activation
selectivity, and evaluates every site x target (face, object, random) x fraction lesion twice in one process:
with `lesion_utils.evaluate_lesions` (the prefix once per image batch, then only the rest of the network per
lesion) and with a naive sweep (the whole network per lesion, a forward hook silencing the channels), on the
same preloaded tensors. It checks that both give the same correct counts and losses. It also times the fixed
readouts (readouts.py, the verdict's second reading) scored in the heads' own pass (`evaluate_lesions(...,
read=)`, as the lesion sweep does) against a pass of their own after the heads' (as before 2026-12-05), checks
that both give the same results, and prints `fixed readouts in the heads' pass: speedup Z`.

In the same run it measures what the machine can do (hardware_peak.py: the matrix-product peak, fp32 on the CPU
and bf16 on CUDA, and a 3x3 convolution of a VGG middle layer) and prints the suffix-only sweep's achieved FLOP/s
(twice the conv and linear multiply-adds it computes, counted from the layer shapes, over its wall time) as a
share of each. It prints last: `speedup: X` (the measured ratio of wall times, naive over suffix-only), `ideal:
Y` (the naive sweep's multiply-adds over those the suffix-only sweep cannot avoid) and `share_of_peak: Z` (the
sweep's FLOP/s over the measured matmul peak).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from hardware_peak import conv_reference, conv_text, matmul_peak

from dualtask.config import settings
from dualtask.experiment import pipeline as dualtask
from dualtask.lesion import engine, rankings, readouts
from dualtask.model import sites as sites_mod
from dualtask.training import trainer

ROOT = Path(__file__).resolve().parents[1]
vgg16 = settings.load_script(ROOT / "vgg16.py")


def multiply_adds(model, image_size, device):
    """{module path: multiply-adds per image} of every conv and linear layer, from one forward pass."""
    counts, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            per_out = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            handles.append(module.register_forward_hook(
                lambda m, i, o, name=name, k=per_out: counts.__setitem__(name, o[0].numel() * k)))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(
                lambda m, i, o, name=name: counts.__setitem__(name, m.in_features * m.out_features)))
    with torch.inference_mode():
        model(torch.zeros(1, 3, image_size, image_size, device=device))
    for h in handles:
        h.remove()
    return counts


def split_macs(model, site, counts):
    """(prefix, suffix) multiply-adds per image around a site; the heads count to the suffix."""
    runner = engine.SiteRunner(model, site)
    prefix_names = [n for n, _ in runner.prefix_steps]
    prefix = sum(c for name, c in counts.items() if any(name == p or name.startswith(p + ".") for p in prefix_names))
    return prefix, sum(counts.values()) - prefix


def trained_model(args) -> tuple:
    """(model, config) of the small demo VGG16, trained into --run_dir once and loaded."""
    config = settings.hyperparameters(vars(vgg16))
    config.update(image_size=32, fc_width=256, epochs=2, max_per_class=60, batch_size=32,
                  device=args.device, out_dir=args.run_dir, stages=["train"], health_check="warn")
    if not (Path(args.run_dir) / "checkpoint.pt").exists():
        dualtask.run(config)
    return dualtask.load_run(args.run_dir, args.device)


def lesion_conditions(model, sites, images: dict, fractions: list) -> dict:
    """{site name: every target's (each task's activation ranking, a random order) top filters at each fraction}."""
    acts = engine.site_activations(model, sites, engine.image_batches(images, "train", n_per_task=128))
    conditions = {}
    for site in sites:
        order = {t: rankings.rank_by_activation(acts[site.name], t) for t in images}
        order["random"] = np.random.default_rng(site.depth).permutation(site.n_filters)
        conditions[site.name] = [order[t][:max(1, int(round(f * site.n_filters)))] for f in fractions for t in order]
    return conditions


def time_fixed_readouts(model, sites, conditions: dict, batches, seed: int, per_pass: dict) -> bool:
    """The fixed readouts scored in the heads' own pass against a pass of their own after the heads'; prints both
    times and the speedup; whether both give the same results."""
    fixed = readouts.fixed_readouts(model, sites[0], batches, seed)
    read = readouts.fixed_reader(fixed)
    t0 = time.perf_counter()
    apart = {s.name: (engine.evaluate_lesions(model, s, conditions[s.name], batches, masks_per_pass=per_pass[s.name]),
                      readouts.fixed_lesions(model, s, conditions[s.name], fixed, batches,
                                             masks_per_pass=per_pass[s.name])) for s in sites}
    t_apart = time.perf_counter() - t0
    t0 = time.perf_counter()
    together = {s.name: engine.evaluate_lesions(model, s, conditions[s.name], batches,
                                                masks_per_pass=per_pass[s.name], read=read) for s in sites}
    t_together = time.perf_counter() - t0
    same = all(np.array_equal(h[t]["correct"], b[t]["correct"]) and np.array_equal(h[t]["loss"], b[t]["loss"])
               and np.array_equal(f[t]["correct"], b[t]["read"])
               for s in sites for h, f, b in zip(*apart[s.name], together[s.name]) for t in b)
    print(f"fixed readouts: heads and readouts in one pass {t_together:.2f} s, the readouts in a pass of their own "
          f"after the heads' {t_apart:.2f} s; results equal: {same}")
    print(f"fixed readouts in the heads' pass: speedup {t_apart / t_together:.2f}")
    return same


def unavoidable_macs(model, sites, conditions: dict, image_size: int, device) -> tuple:
    """(the naive sweep's multiply-adds, those the suffix-only sweep cannot avoid), from the layer shapes."""
    counts = multiply_adds(model, image_size, device)
    naive_macs = sum(len(c) for c in conditions.values()) * sum(counts.values())
    unavoidable = 0
    for site in sites:
        prefix, suffix = split_macs(model, site, counts)
        unavoidable += prefix + len(conditions[site.name]) * suffix
    return naive_macs, unavoidable


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--run_dir", default=str(ROOT / "runs" / "bench_lesion_vgg16"))
    p.add_argument("--fractions", default="0.1,0.2,0.3,0.5")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    model, config = trained_model(args)
    device = torch.device(args.device)
    datasets = dualtask.load_datasets(config)
    images = {t: trainer.TaskImages(d, device) for t, d in datasets.items()}
    batches = engine.image_batches(images, "test", compact=True)  # uint8 on the device, as the sweep keeps them
    plain = engine.image_batches(images, "test")  # the naive reference's: normalised float32
    n_images = sum(len(y) for _, _, y in batches)
    sites = sites_mod.lesion_sites(model)
    conditions = lesion_conditions(model, sites, images, [float(f) for f in args.fractions.split(",")])
    n_conditions = sum(len(c) for c in conditions.values())
    def held(b):  # MiB of the distinct image tensors (tasks sharing their images hold one)
        return sum({id(x): x.nbytes for _, x, _ in b}.values()) / 2**20

    print(f"{len(sites)} sites, {n_conditions} lesions, {n_images} test images, device {device}; the images held "
          f"as uint8: {held(batches):.1f} MiB (as float32 {held(plain):.1f})")

    per_pass = engine.masks_per_pass_by_site(model, sites, batches)  # as the sweep chooses them
    t0 = time.perf_counter()
    fast_results = {site.name: engine.evaluate_lesions(model, site, conditions[site.name], batches,
                                                       masks_per_pass=per_pass[site.name]) for site in sites}
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive_results = {site.name: engine.evaluate_lesions_naive(model, site, conditions[site.name], plain)
                     for site in sites}
    t_naive = time.perf_counter() - t0
    same = time_fixed_readouts(model, sites, conditions, batches, config["seed"], per_pass)

    pairs = [(a[t], b[t]) for s in sites for a, b in zip(fast_results[s.name], naive_results[s.name]) for t in a]
    equal = all(np.array_equal(a["correct"], b["correct"]) and np.array_equal(a["loss"], b["loss"]) for a, b in pairs)
    agree = np.mean(np.concatenate([a["correct"] == b["correct"] for a, b in pairs]))
    worst = max(float(np.abs(a["loss"] - b["loss"]).max()) for a, b in pairs)
    naive_macs, unavoidable = unavoidable_macs(model, sites, conditions, config["image_size"], device)
    largest = max(len(y) for _, _, y in batches)
    cache_mb = max(engine.cache_bytes(model, sites, engine.input_shape(batches), largest).values()) / 2**20
    print(f"results equal: {equal} (correct counts and losses of every lesion, every image); predictions agree "
          f"on {agree:.4%} of image-lesion pairs, largest loss difference {worst:.2e}")
    print(f"naive sweep {t_naive:.2f} s, suffix-only sweep {t_fast:.2f} s; largest cached batch {cache_mb:.1f} MiB, "
          f"lesions per pass by site {sorted(per_pass.values())}")
    peak, conv = matmul_peak(device), conv_reference(device)
    achieved = 2 * unavoidable * n_images / t_fast
    print(f"suffix-only sweep: {achieved / 1e9:.1f} GFLOP/s ({2 * unavoidable * n_images / 1e12:.2f} TFLOP of conv "
          f"and linear layers in {t_fast:.2f} s, {torch.get_num_threads()} thread(s)); this machine's "
          f"{'bf16' if device.type == 'cuda' else 'fp32'} matmul peak {peak / 1e9:.1f} GFLOP/s, a "
          f"{conv_text()} {conv / 1e9:.1f} GFLOP/s; share of the conv's rate {achieved / conv:.2f}")
    print(f"speedup: {t_naive / t_fast:.2f}")
    print(f"ideal: {naive_macs / unavoidable:.2f}")
    print(f"share_of_peak: {achieved / peak:.2f}")
    # float32 on the CPU must match exactly with one lesion per pass, and to float32 rounding with several stacked
    # (a stacked batch's kernels may round otherwise: every prediction the same, losses within 1e-4); bf16 on a GPU
    # to rounding
    one_per_pass = all(v == 1 for v in per_pass.values())
    if not same or (device.type == "cpu" and not equal and (one_per_pass or agree < 1 or worst > 1e-4)):
        sys.exit(1)


if __name__ == "__main__":
    main()
