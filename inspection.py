"""Looking inside a trained run: Grad-CAM per head, preferred stimuli of task-ranked filters, and layer-wise
linear decoding. Each analysis writes plain files into the run folder (PNG, CSV, NPZ) so that report.py can
rebuild the report from the files alone.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import figures
import lesion_utils as L
import vggface2
from common import write_csv, write_text


# ----------------------------------------------------------------------------------------------------------
# Grad-CAM


def gradcam(model: nn.Module, x: torch.Tensor, site: L.Site, task: str, classes=None) -> torch.Tensor:
    """Grad-CAM maps (B, H, W) in [0, 1] of `task`'s head for normalised images x, at a site's output.

    The map is ReLU(sum_c w_c A_c) with w_c the spatial mean of d score / d A_c, where the score is the
    head's logit of `classes` (default: its predicted class), upsampled to the image size."""
    model.eval()
    store = {}

    def keep(module, inputs, output):
        output.retain_grad()
        store["a"] = output

    handle = site.module.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(x.detach().requires_grad_(False))[task].float()
            target = logits.argmax(1) if classes is None else torch.as_tensor(classes, device=x.device)
            logits.gather(1, target[:, None]).sum().backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    a, g = store["a"].detach().float(), store["a"].grad.float()
    cam = F.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(1).values.clamp(min=1e-12)
    return cam / peak[:, None, None]


def top_region(maps: torch.Tensor, fraction: float = 0.05) -> torch.Tensor:
    """Boolean masks of each map's top `fraction` of pixels (exactly that many; ties broken by position)."""
    flat = maps.flatten(1)
    k = max(1, int(round(fraction * flat.shape[1])))
    region = torch.zeros_like(flat, dtype=torch.bool)
    region.scatter_(1, flat.topk(k, dim=1).indices, True)
    return region.view_as(maps)


@torch.inference_mode()
def default_gradcam_site(model, image_size: int, min_side: int = 4) -> L.Site:
    """The deepest lesion site whose output still has at least min_side x min_side positions (Grad-CAM at a
    1 x 1 output says nothing about where a head looks)."""
    sites = L.lesion_sites(model)
    sides = {}
    handles = [s.module.register_forward_hook(lambda m, i, o, name=s.name: sides.__setitem__(name, o.shape[-1]))
               for s in sites]
    try:
        model.eval()(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    wide = [s for s in sites if sides[s.name] >= min_side]
    return wide[-1] if wide else sites[0]


def gradcam_analysis(model, images: dict, site: L.Site, out_dir: Path, n_images: int = 64) -> dict:
    """Per task's test images: both heads' maps, their mean per head, and the overlap (intersection over union)
    of the two heads' top-5% regions. Writes gradcam.npz (mean and per-image maps), gradcam_overlap.csv and
    figures/gradcam_*.png."""
    tasks = list(images)
    mean_maps, per_image, rows, examples = {}, {}, [], {}
    for task in tasks:
        idx = images[task].data.indices("test")[:n_images]
        x, _ = images[task].batch(idx)
        xn = vggface2.normalize(x)
        maps = {head: gradcam(model, xn, site, head).cpu() for head in tasks}
        regions = {head: top_region(m) for head, m in maps.items()}
        for i, a in enumerate(tasks):
            for b in tasks[i + 1:]:
                inter = (regions[a] & regions[b]).flatten(1).sum(1).float()
                union = (regions[a] | regions[b]).flatten(1).sum(1).float()
                iou = (inter / union).numpy()
                rows.append({"images": task, "head_a": a, "head_b": b, "site": site.name,
                             "mean_iou_top5": f"{iou.mean():.4f}", "sd": f"{iou.std():.4f}", "n": len(iou)})
        for head in tasks:
            mean_maps[f"{task}_images__{head}_head"] = maps[head].mean(0).numpy()
            per_image[f"{task}_images__{head}_head__per_image"] = maps[head].numpy().astype(np.float16)
        mean_maps[f"{task}_images__mean_image"] = x.mean(0).permute(1, 2, 0).cpu().numpy()
        examples[task] = (x[:6].permute(0, 2, 3, 1).cpu().numpy(), {h: maps[h][:6].numpy() for h in tasks})
    np.savez_compressed(out_dir / "gradcam.npz", site=site.name, **mean_maps, **per_image)
    write_csv(out_dir / "gradcam_overlap.csv", ("images", "head_a", "head_b", "site", "mean_iou_top5", "sd", "n"), rows)
    return {"figures": figures.gradcam_figures(out_dir, examples, mean_maps, tasks, site.name), "overlap": rows}


# ----------------------------------------------------------------------------------------------------------
# preferred stimuli


def _ranked_filters(out_dir: Path, site: L.Site, tasks: list, n: int):
    """(method, {task: top n filters of the site}) from rankings.json: the loss ranking when there is one,
    else activation; (None, {}) when the site was not ranked."""
    path = out_dir / "rankings.json"
    ranking = json.loads(path.read_text()).get(site.name, {}) if path.exists() else {}
    method = next((m for m in ("loss", "greedy", "activation", "taylor") if m in ranking), None)
    if method is None:
        return None, {}
    return method, {t: ranking[method][t]["order"][:n] for t in tasks if t in ranking[method]}


@torch.inference_mode()
def top_images(model, images: dict, site: L.Site, filters: list, n: int = 8) -> list:
    """Per filter: the n test images (of all tasks) with the highest spatially averaged activation."""
    batches = L.image_batches(images, "test")
    acts = L.site_activations(model, [site], batches)[site.name]
    pool = [(t, i) for t in images for i in images[t].data.indices("test")]
    all_acts = np.concatenate([acts[t] for t in images])
    out = []
    for f in filters:
        order = np.argsort(-all_acts[:, f], kind="stable")[:n]
        out.append([(pool[k][0], pool[k][1], float(all_acts[k, f])) for k in order])
    return out


def maximise(model, site: L.Site, filters: list, image_size: int, steps: int = 200, seed: int = 0,
             lr: float = 0.05, smooth: float = 0.05, jitter: int = 2) -> np.ndarray:
    """Activation maximisation: an image per filter by gradient ascent from noise on the filter's mean
    activation, with random jitter each step and a total-variation penalty (fixed seed)."""
    device = next(model.parameters()).device
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    x = (0.5 * torch.randn(len(filters), 3, image_size, image_size, generator=gen)).to(device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    store = {}
    handle = site.module.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    index = torch.arange(len(filters), device=device)
    chosen = torch.as_tensor(filters, device=device)
    try:
        for _ in range(steps):
            dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=gen).tolist()
            shifted = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            with torch.enable_grad():
                model(shifted.tanh())
                a = store["a"].float().clamp(min=0) if store["a"].ndim == 4 else store["a"].float()
                score = a[index, chosen].mean(dim=(1, 2)) if a.ndim == 4 else a[index, chosen]
                tv = (x[:, :, 1:] - x[:, :, :-1]).abs().mean() + (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()
                loss = -score.mean() + smooth * tv * len(filters)
                opt.zero_grad()
                loss.backward()
            opt.step()
    finally:
        handle.remove()
    img = (x.detach().tanh() * vggface2.NORM_STD + vggface2.NORM_MEAN).clamp(0, 1)
    return img.permute(0, 2, 3, 1).cpu().numpy()


def stimuli_analysis(model, images: dict, sites: list, out_dir: Path, n_filters: int = 4, n_images: int = 8,
                     steps: int = 200, seed: int = 0) -> list:
    """For each chosen site: top test images and an activation-maximisation image of its most face- and most
    object-ranked filters (rankings.json). Writes figures/stimuli_<site>.png and stimuli.json."""
    tasks = list(images)
    written, summary = [], {}
    for site in sites:
        method, ranked = _ranked_filters(out_dir, site, tasks, n_filters)
        if not ranked:
            continue
        filters = [(t, f) for t in tasks if t in ranked for f in ranked[t]]
        tops = top_images(model, images, site, [f for _, f in filters], n_images)
        synth = maximise(model, site, [f for _, f in filters], images[tasks[0]].data.image_size, steps, seed)
        grids = [(t, f, [(images[src].data.images[i], f"{src}: {images[src].data.classes[images[src].data.labels[i]]}")
                         for src, i, _ in top], synth[k]) for k, ((t, f), top) in enumerate(zip(filters, tops))]
        written.append(figures.stimuli_figure(out_dir, site.name, method, grids))
        summary[site.name] = {"method": method, "filters": {t: ranked[t] for t in ranked},
                              "top_images": {f"{t}:{f}": [src for src, _, _ in top] for (t, f), top in zip(filters, tops)}}
    write_text(out_dir / "stimuli.json", json.dumps(summary, indent=1))
    return written


# ----------------------------------------------------------------------------------------------------------
# layer-wise decoding


def linear_probe():
    """The project's linear probe: a scikit-learn ridge classifier on standardised features (closed form, so
    every site of a large network takes seconds)."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), RidgeClassifier(alpha=100.0))


def decoding_analysis(model, images: dict, sites: list, out_dir: Path, n_per_task: int = 400, folds: int = 5,
                      seed: int = 0) -> Path:
    """Cross-validated linear probes (scikit-learn ridge classifiers on standardised, spatially pooled
    activations: closed form, so every site of a large network takes seconds) for each task's labels at each
    site, on the task's test images. Writes decoding.csv."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    batches = L.image_batches(images, "test", n_per_task=n_per_task, seed=seed)
    acts = L.site_activations(model, sites, batches)
    labels = {t: torch.cat([y for tb, _, y in batches if tb == t]).cpu().numpy() for t in images}
    rows = []
    for site in sites:
        for task in images:
            y = labels[task]
            k = min(folds, int(np.bincount(y).min()))
            if k < 2:
                continue
            probe = linear_probe()
            scores = cross_val_score(probe, acts[site.name][task], y,
                                     cv=StratifiedKFold(k, shuffle=True, random_state=seed))
            rows.append({"layer": site.name, "depth": site.depth, "task": task, "accuracy": f"{scores.mean():.4f}",
                         "sd": f"{scores.std():.4f}", "folds": k, "n_images": len(y),
                         "chance": f"{1 / len(images[task].data.classes):.4f}"})
    write_csv(out_dir / "decoding.csv", ("layer", "depth", "task", "accuracy", "sd", "folds", "n_images", "chance"),
              rows)
    return out_dir / "decoding.csv"


def _site_for_gradcam(model, images: dict, config: dict) -> L.Site:
    if config.get("gradcam_site"):
        return L.get_site(model, config["gradcam_site"])
    return default_gradcam_site(model, images[next(iter(images))].data.image_size)


def gradcam_step(model, images: dict, config: dict, out_dir: Path) -> list:
    """The figures stage's Grad-CAM: every head on every task's first 64 test images."""
    site = _site_for_gradcam(model, images, config)
    print(f"Grad-CAM: {len(images)} heads at {site.name} on up to 64 test images per task", flush=True)
    return gradcam_analysis(model.eval(), images, site, Path(out_dir))["figures"]


def stimuli_step(model, images: dict, config: dict, out_dir: Path) -> list:
    """The figures stage's preferred stimuli: a middle and the last site, the filters ranked first for each task."""
    sites = L.lesion_sites(model)
    chosen = [sites[len(sites) // 2], sites[-1]]
    steps = config.get("stimulus_steps", 200)
    print(f"preferred stimuli: top test images and {steps}-step activation maximisation of the 4 filters ranked "
          f"first for each task at {', '.join(s.name for s in chosen)}", flush=True)
    return stimuli_analysis(model.eval(), images, chosen, Path(out_dir), steps=steps, seed=config["seed"])


def decoding_step(model, images: dict, config: dict, out_dir: Path) -> list:
    """The figures stage's layer-wise decoding: every site, then its figure."""
    sites = L.lesion_sites(model)
    print(f"layer-wise decoding: cross-validated ridge probes of each task at {len(sites)} sites on up to 400 "
          f"test images per task", flush=True)
    return [decoding_analysis(model.eval(), images, sites, Path(out_dir), seed=config["seed"]),
            figures.decoding_by_depth(Path(out_dir))]


# the analyses of the figures stage that need the model, in the order they run: (name, step)
ANALYSES = (("Grad-CAM", gradcam_step), ("preferred stimuli", stimuli_step), ("decoding", decoding_step))
