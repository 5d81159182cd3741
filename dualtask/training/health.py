"""Training health: does the network learn? Dead units, gradient norms, heads at chance, exploding losses.

A lesion only means something in a network that has learned its tasks. After every epoch the training loop
measures, on fixed probe images (the first validation images of every task, eval mode):
- the fraction of dead units of each hidden fully connected layer and of each lesion site (a unit or filter
  is dead when it outputs zero, after its ReLU, at every position of every probe image: silencing it changes
  nothing, and a layer of dead units passes nothing on);
- the gradient norm of the whole network (mean and largest over the epoch's steps, before clipping).
Then `diagnose` names what is wrong: a loss that exploded (not finite, or above twice the chance-level loss
ln C both over the epoch's training steps and on the validation images at its end: a spike the network
recovers from within the epoch is not a run that fails), a dead layer, or a head still at chance from first_chance_epoch
on. What the run does then is the
`health_check` setting: "stop" (the default: the epoch's checkpoint is kept and the run exits 1 with the
cause and what to change) or "warn" (go on; the report's summary carries the problem as a caveat).
Everything is written to train_health.json, and rides in the checkpoint, so a resumed run keeps it.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from dualtask.core.common import UsageError
from dualtask.core.device import autocast
from dualtask.data import loading as vggface2
from dualtask.data import transforms
from dualtask.model import sites as sites_mod

PROBE_IMAGES = 64  # validation images per task the dead-unit census runs on
DEAD_LAYER = 0.99  # a layer is dead when at least this fraction of its units is
CHANCE_EPOCH = 3  # a head at chance is a problem from this epoch on, or from half of training if later
EXPLODED = 2.0  # a training loss above this multiple of ln C (the loss of a uniform guess) has exploded


def monitored_layers(model: nn.Module, config: dict) -> list:
    """[(name, module)]: every hidden fully connected layer of the trunk (read after its ReLU) and every
    lesion site of the run (every site when lesion_layers is None)."""
    layers = [(f"trunk.{name}", m) for name, m in model.trunk.named_modules() if isinstance(m, nn.Linear)]
    try:
        sites = sites_mod.select_sites(model, config)
    except UsageError:  # an unknown site is named by the lesion stage; health then watches every site
        sites = sites_mod.lesion_sites(model)
    return layers + [(s.name, s.module) for s in sites]


def probe_batch(images: dict, channels_last: bool = False) -> torch.Tensor:
    """PROBE_IMAGES validation images of every task (a fixed random sample, so every class can appear: the
    images are stored class by class), as one normalised batch; tasks that share their images give them once."""
    xs = []
    for group in vggface2.shared_groups({t: ti.data for t, ti in images.items()}):
        ti = images[group[0]]
        val = np.asarray(ti.data.indices("val"))
        idx = np.sort(np.random.default_rng(0).permutation(val)[:PROBE_IMAGES])
        if len(idx):
            xs.append(ti.batch(np.asarray(idx), channels_last)[0])
    return transforms.normalize(torch.cat(xs))


@torch.inference_mode()
def dead_fractions(model: nn.Module, layers: list, x: torch.Tensor) -> dict:
    """{layer: fraction of its units whose output (after ReLU) is zero for every image and position of x}."""
    was_training = model.training
    model.eval()
    peaks, handles = {}, []

    def hook(name):
        def record(module, inputs, output):
            out = output.float()
            peak = out.amax(dim=(0, 2, 3)) if out.ndim == 4 else out.reshape(-1, out.shape[-1]).amax(0)
            peaks[name] = peak if name not in peaks else torch.maximum(peaks[name], peak)
        return record

    try:
        handles = [m.register_forward_hook(hook(name)) for name, m in layers]
        for start in range(0, len(x), 128):
            with autocast(x.device):
                model(x[start:start + 128])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: float((peaks[name] <= 0).float().mean()) for name, _ in layers if name in peaks}


def diagnose(epoch: int, train: dict, val: dict, chances: dict, dead: dict, grad: dict, config: dict,
             lr: float) -> list:
    """[{'epoch', 'kind', 'message'}]: what this epoch shows is wrong, each with its cause and what to change.

    train: {task: {'loss', 'accuracy', 'n'}} over the epoch's training steps; val: evaluate()'s {task: {'loss',
    'accuracy', 'n'}}; chances: {task: chance accuracy}; dead: dead_fractions(); grad: {'mean', 'max'} norms;
    config's lr: the peak lr per 256 images (dualtask.base_lr; named in the messages when given), lr: the peak
    lr per step."""
    problems = []
    setting = (f"{config['lr']:.3g} per 256 images, " if config.get("lr") is not None else "") + f"{lr:.3g} per step"
    lower = f"lower lr (now {setting})" + ("" if config.get("grad_clip", 0) > 0 else " or set grad_clip (e.g. 2)")
    for task, t in train.items():
        limit = EXPLODED * math.log(1 / chances[task])
        vloss = val[task]["loss"]
        if not math.isfinite(t["loss"]) or not math.isfinite(vloss) or (t["loss"] > limit and vloss > limit):
            problems.append({"epoch": epoch, "kind": "loss exploded", "message": (
                f"the {task} loss exploded at epoch {epoch} (training loss {t['loss']:.3g}, validation {vloss:.3g}; "
                f"a uniform guess scores {limit / EXPLODED:.3g}): {lower}")})
    if not all(math.isfinite(v) for v in grad.values()):
        problems.append({"epoch": epoch, "kind": "loss exploded", "message": (
            f"the gradient norm was not finite at epoch {epoch}: {lower}")})
    dead_layers = [name for name, fraction in dead.items() if fraction >= DEAD_LAYER]
    for name in dead_layers:
        plain = config.get("backbone", "").startswith("vgg") and not config.get("batch_norm", True)
        problems.append({"epoch": epoch, "kind": "dead layer", "message": (
            f"{name} is dead at epoch {epoch}: {dead[name]:.0%} of its units output zero for every probe image, "
            f"so nothing after it can learn and every lesion before it has no effect; units die in too large "
            f"early steps: {lower}" + (", or use batch_norm=True" if plain else ""))})
    if epoch >= first_chance_epoch(config.get("epochs", epoch)):
        for task, v in val.items():
            chance, n = chances[task], max(v["n"], 1)
            if v["accuracy"] > _beyond_chance(chance, n) or _beyond_chance(chance, n) >= 1:
                continue  # above chance, or too few validation images to tell
            fits = train[task]["accuracy"] > _beyond_chance(chance, max(train[task].get("n", n), 1))
            if dead_layers:
                cause = f"the dead layer {dead_layers[0]} is the cause"
            elif fits:
                cause = (f"its training accuracy ({train[task]['accuracy']:.3f}) is above chance but its validation "
                         f"accuracy is not: it learns its training images, not the task; give it more images per "
                         f"class (max_per_class), more epochs, or a larger weight_decay")
            else:
                cause = (f"its training accuracy is at chance too ({train[task]['accuracy']:.3f}), so the steps do not "
                         f"move it: raise lr (now {setting}) or epochs; but if an earlier epoch's loss spiked above "
                         f"a uniform guess's ({math.log(1 / chance):.2f}), too large a step knocked it back to chance: "
                         f"lower lr instead; or check that the {task} labels belong to their images")
            problems.append({"epoch": epoch, "kind": "head at chance", "message": (
                f"the {task} head is at chance after {epoch} epochs (validation accuracy {v['accuracy']:.3f} on {n} "
                f"images, chance {chance:.3f}): {cause}")})
    return problems


def first_chance_epoch(epochs: int) -> int:
    """The first epoch at which a head at chance counts: CHANCE_EPOCH, or half of training if later (a head
    can sit at chance through the warm-up and start late: plain VGG16's object head on the demo was at chance
    until epoch 5 of 15 and ended at 0.63 on its test images)."""
    return max(CHANCE_EPOCH, math.ceil(epochs / 2))


def _beyond_chance(chance: float, n: int) -> float:
    """The accuracy two binomial standard errors above chance on n images."""
    return chance + 2 * math.sqrt(chance * (1 - chance) / n)


def epoch_record(epoch: int, dead: dict, grad: dict) -> dict:
    """One epoch's measurements; a non-finite gradient norm is kept as None (JSON has no NaN)."""
    def number(x):
        return x if math.isfinite(x) else None

    return {"epoch": epoch, "grad_norm_mean": number(grad["mean"]), "grad_norm_max": number(grad["max"]),
            "dead": dead}


def summary_line(record: dict, n_fc: int) -> str:
    """One line per epoch: gradient norms, dead units of the fully connected layers, the worst lesion site."""
    dead = list(record["dead"].items())
    fc, sites = dead[:n_fc], dead[n_fc:]
    def norm(x):
        return "not finite" if x is None else f"{x:.3g}"

    parts = [f"grad norm mean {norm(record['grad_norm_mean'])} max {norm(record['grad_norm_max'])}"]
    if fc:
        parts.append("dead units " + ", ".join(f"{n} {f:.0%}" for n, f in fc))
    if sites:
        name, worst = max(sites, key=lambda s: s[1])
        parts.append(f"dead filters at {len(sites)} lesion sites: mean {np.mean([f for _, f in sites]):.0%}, "
                     f"most {worst:.0%} ({name})")
    return "  health: " + "  |  ".join(parts)








