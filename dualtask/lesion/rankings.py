"""How filters are ranked for a task at a site: activation selectivity, loss when silenced, greedy (greedy.py),
Taylor's first-order estimate, random orders; their agreement and split-half reliability; rankings.json's
entries."""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn as nn

from dualtask.core.common import UsageError
from dualtask.core.device import autocast
from dualtask.core.names import METHODS, reliability_key
from dualtask.lesion.engine import SiteRunner, evaluate_lesions, model_input, order_of, site_activations
from dualtask.lesion.greedy import GREEDY_DEFAULTS, greedy_order
from dualtask.model.sites import Site


def selectivity(acts: dict, task: str) -> np.ndarray:
    """d' of each channel's mean activation between `task`'s images and all other tasks' images."""
    own = acts[task]
    other = np.concatenate([a for t, a in acts.items() if t != task])
    pooled = np.sqrt(0.5 * (own.var(0) + other.var(0)) + 1e-12)
    return (own.mean(0) - other.mean(0)) / pooled


LOCALISER_FDR = 0.05  # the localiser's false discovery rate (Benjamini-Yekutieli), localiser_fdr
MASK_DEFAULTS = {"steps": 100, "l1": 1.0, "lr": 0.1}  # the mask ranking's optimisation (mask_steps, mask_l1)


def localiser(acts: dict, task: str, fdr: float = LOCALISER_FDR) -> tuple:
    """An fMRI-style localiser (Prince & Konkle's selectivity.py): per channel, Welch's t of its spatially averaged
    activation to `task`'s images against the other tasks' images, its one-sided p (task above the others), and
    whether it passes Benjamini-Yekutieli's false discovery rate control at `fdr` (valid under any dependence
    between channels). A channel constant in both groups gets t = 0 and p = 1. Returns (t, p, passing)."""
    from scipy import stats

    own = np.asarray(acts[task], dtype=np.float64)
    other = np.concatenate([np.asarray(a, dtype=np.float64) for t, a in acts.items() if t != task])
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's note on channels (near) constant in both groups
        t, p = stats.ttest_ind(own, other, axis=0, equal_var=False, alternative="greater")
    t, p = np.nan_to_num(np.asarray(t, dtype=float), nan=0.0), np.where(np.isfinite(p), p, 1.0)
    return t, p, stats.false_discovery_control(p, method="by") <= fdr


def localiser_entry(acts: dict, task: str, fdr: float = LOCALISER_FDR) -> dict:
    """rankings.json's entry of the localiser: channels from the smallest p up (ties: larger t, then channel
    index), so that its first n_selective are exactly the set passing the FDR control; scores are t."""
    t, p, passing = localiser(acts, task, fdr)
    order = np.lexsort((np.arange(len(t)), -t, p))
    return dict(ranking_entry(order, t), n_selective=int(passing.sum()), fdr=fdr)


def mask_gates(model, site: Site, batches: list, task: str, steps: int = MASK_DEFAULTS["steps"],
               l1: float = MASK_DEFAULTS["l1"], lr: float = MASK_DEFAULTS["lr"], seed: int = 0) -> np.ndarray:
    """A learned mask (the reference study's vgg_subnet.py, Csordas et al. 2021): one sigmoid gate per filter of
    the site, on frozen weights, trained for `steps` full-batch Adam steps on `task`'s ranking images to keep its
    cross-entropy low while an L1 pull (l1 x the mean gate) closes gates; gates start open (about 0.95, with a
    seeded jitter of 0.01 that breaks ties). Returns the final gates (0 = closed, 1 = open)."""
    model.eval()
    runner = SiteRunner(model, site)
    own = [(x, y) for t, x, y in batches if t == task]
    n = sum(len(y) for _, y in own)
    with torch.no_grad():
        cached = [runner.prefix(x) for x, _ in own]
    jitter = torch.randn(site.n_filters, generator=torch.Generator().manual_seed(seed)).to(cached[0].device)
    logits = (3.0 + 0.01 * jitter).requires_grad_(True)
    optimiser = torch.optim.Adam([logits], lr=lr)
    for _ in range(steps):
        gate = torch.sigmoid(logits)
        loss = l1 * gate.mean()
        for c, (_, y) in zip(cached, own):
            out = runner.suffix_with(c, lambda o: o * gate.view(1, -1, *([1] * (o.ndim - 2))).to(o.dtype))[task]
            loss = loss + nn.functional.cross_entropy(out.float(), y, reduction="sum") / n
        (grad,) = torch.autograd.grad(loss, logits)
        optimiser.zero_grad()
        logits.grad = grad
        optimiser.step()
    return torch.sigmoid(logits).detach().cpu().numpy()


def rank_by_activation(acts: dict, task: str) -> np.ndarray:
    """Channels ordered from most to least selective for `task` (ties broken by channel index)."""
    return order_of(selectivity(acts, task))


def task_loss(results: list, task: str) -> np.ndarray:
    return np.array([r[task]["loss"].mean() for r in results])


def loss_per_image(model, site: Site, batches: list, task: str, masks_per_pass: int = 1,
                   precision: str = "fp32") -> tuple:
    """(intact, lesioned): `task`'s cross-entropy of each of its images (batches: training images, in batch order)
    intact, shape (images,), and with each filter alone silenced, shape (filters, images)."""
    own = [b for b in batches if b[0] == task]
    intact = evaluate_lesions(model, site, [[]], own, precision=precision)[0][task]["loss"]
    singles = [[c] for c in range(site.n_filters)]
    lesioned = evaluate_lesions(model, site, singles, own, masks_per_pass=masks_per_pass, precision=precision)
    return intact, np.stack([r[task]["loss"] for r in lesioned])


def loss_increase(per_image: tuple, images=None) -> np.ndarray:
    """Each filter's increase of the mean cross-entropy (`loss_per_image`'s), over all images or the positions
    `images` among them."""
    intact, lesioned = per_image
    if images is not None:
        intact, lesioned = intact[images], lesioned[:, images]
    return np.array([row.mean() for row in lesioned]) - intact.mean()


def loss_scores(model, site: Site, batches: list, task: str, masks_per_pass: int = 1,
                precision: str = "fp32") -> np.ndarray:
    """Increase of `task`'s mean cross-entropy when each filter alone is silenced (batches: training images)."""
    return loss_increase(loss_per_image(model, site, batches, task, masks_per_pass, precision))


def taylor_scores(model, site: Site, batches: list, task: str) -> np.ndarray:
    """First-order estimate of each filter's importance: |activation x gradient of `task`'s loss|, summed
    over positions and averaged over images (the gradient of the loss with respect to a per-image mask)."""
    model.eval()
    total = torch.zeros(site.n_filters, dtype=torch.float64)
    n = 0
    for t, x, y in batches:
        if t != task:
            continue
        mask = torch.ones(len(x), site.n_filters, device=x.device, requires_grad=True)
        handle = site.module.register_forward_hook(
            lambda m, i, out: out * mask.view(*mask.shape, *([1] * (out.ndim - 2))).to(out.dtype))
        try:
            with torch.enable_grad(), autocast(x.device):
                loss = nn.functional.cross_entropy(model(model_input(x))[task].float(), y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, mask)
        finally:
            handle.remove()
        total += grad.abs().sum(0).double().cpu()
        n += len(x)
    return (total / max(n, 1)).numpy()


def same_top_sets(a: dict, b: dict, methods, tasks, fraction: float = 0.2) -> dict:
    """{'method|task': whether two rankings of one site (rank_site's) select the same top-`fraction` set}."""
    out = {}
    for m in methods:
        for t in tasks:
            order_a, order_b = a[m][t]["order"], b[m][t]["order"]
            k = max(1, int(round(fraction * len(order_a))))
            out[f"{m}|{t}"] = set(order_a[:k]) == set(order_b[:k])
    return out


def rank_correlation(a, b) -> float:
    """Spearman's rank correlation (scipy.stats.spearmanr: tied scores, such as filters that never fire, share
    their average rank); NaN where either side is constant."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


# the entries of a site's rankings.json that are about its rankings, or about the site
NOT_RANKINGS = ("agreement", "reliability", "precision", "branch", "receptive_field")
# the top sets whose split-half overlap is reported (a sweep adds its lesion fractions: the verdict reads the top set
# of its headline fraction, verdict.reliability)
RELIABILITY_FRACTIONS = (0.1, 0.2, 0.3)


def split_halves(batches: list) -> tuple:
    """The ranking images cut into two disjoint halves (alternate images of every batch, so each half holds
    half of every task's images)."""
    return tuple([(t, x[k::2], y[k::2]) for t, x, y in batches if len(x[k::2])] for k in (0, 1))


def half_positions(batches: list, task: str, half: int) -> np.ndarray:
    """Where `split_halves`' half (0 or 1) of `task`'s images sits among the task's images in batch order."""
    sizes = [len(y) for t, _, y in batches if t == task]
    starts = np.cumsum([0] + sizes[:-1])
    return np.concatenate([start + np.arange(n)[half::2] for start, n in zip(starts, sizes)] or [np.zeros(0, int)])


def top_overlap(order_a, order_b, fraction: float) -> float:
    """Share of the top-`fraction` filters of one order that are also in the other's (random orders share about
    `fraction` of them)."""
    k = max(1, int(round(fraction * len(order_a))))
    return len(set(list(order_a)[:k]) & set(list(order_b)[:k])) / k


def split_half_reliability(halves: tuple, fractions=RELIABILITY_FRACTIONS) -> dict:
    """How reproducible a ranking is: the same method on two disjoint halves of the ranking images. Per method
    and task: the overlap of the top sets at each of `fractions` ('top10', 'top20', ...: `reliability_key`), and
    Spearman's correlation of the scores by channel; 'filters', how many filters the order holds (the verdict's
    test of the overlap against random sets reads it, verdict.overlap_p)."""
    first, second = halves
    out = {}
    for method, per_task in first.items():
        if method in NOT_RANKINGS or method == "random":
            continue
        out[method] = {}
        for t, entry in per_task.items():
            other = second[method][t]
            row = {reliability_key(f): round(top_overlap(entry["order"], other["order"], f), 4)
                   for f in sorted(set(fractions))}
            row["spearman"] = round(rank_correlation(entry["by_channel"], other["by_channel"]), 4)
            row["filters"] = len(entry["order"])
            out[method][t] = row
    return out


def rank_site(model, site: Site, rank_batches: list, tasks: list, methods, random_repeats: int = 10,
              seed: int = 0, masks_per_pass: int = 1, reliability: bool = False, greedy: dict | None = None,
              precision: str = "fp32", share=None, localiser_fdr: float = LOCALISER_FDR,
              mask: dict | None = None, reliability_fractions=RELIABILITY_FRACTIONS) -> dict:
    """{method: {target: {'order': [...], 'scores': [...]}}} for one site; 'random' holds repeat_0..R-1, and
    'agreement' the rank correlation of taylor with loss per task when both were computed. With `reliability`,
    'reliability' holds each ranking's split-half reliability (`split_half_reliability`): every ranking is
    computed on each half of the ranking images: the loss ranking's halves from the same per-image losses (no
    second pass), the others again, which costs as much again as they do.
    greedy: the greedy ranking's settings (`greedy_settings`; None = the defaults, GREEDY_DEFAULTS);
    precision: how the loss and greedy rankings score lesions (`ranking_precision`);
    share: (rank, world, all_gather) shares each greedy step's candidates out across processes (`greedy_order`),
    so every process must call it for the same site. localiser_fdr: the localiser's false discovery rate
    (`localiser`); mask: the mask ranking's settings (MASK_DEFAULTS' keys; None = those); reliability_fractions:
    the top sets whose split-half overlap `reliability` reports."""
    _check_methods_and_tasks(model, methods, tasks)
    out = {}
    acts = site_activations(model, [site], rank_batches)[site.name] if {"activation", "localiser"} & set(methods) \
        else None
    if "activation" in methods:
        scores = {t: selectivity(acts, t) for t in tasks}
        out["activation"] = {t: ranking_entry(order_of(scores[t]), scores[t]) for t in tasks}
    if "localiser" in methods:
        out["localiser"] = {t: localiser_entry(acts, t, localiser_fdr) for t in tasks}
    per_image = {t: loss_per_image(model, site, rank_batches, t, masks_per_pass, precision)
                 for t in tasks} if "loss" in methods else {}
    if per_image:
        out["loss"] = {t: ranking_entry(order_of(s), s) for t in tasks for s in [loss_increase(per_image[t])]}
    if "greedy" in methods:
        g = dict(GREEDY_DEFAULTS, **(greedy or {}))
        out["greedy"] = {t: ranking_entry(*greedy_order(
            model, site, rank_batches, t, stop_fraction=g["stop"], masks_per_pass=masks_per_pass,
            racing=g["racing"], margin=g["margin"], candidates=g["candidates"], precision=precision, seed=seed,
            share=share), ordered=True) for t in tasks}
    if "taylor" in methods:
        out["taylor"] = {}
        for t in tasks:
            scores = taylor_scores(model, site, rank_batches, t)
            out["taylor"][t] = ranking_entry(order_of(scores), scores)
    if "mask" in methods:
        m = dict(MASK_DEFAULTS, **(mask or {}))
        gates = {t: mask_gates(model, site, rank_batches, t, m["steps"], m["l1"], m["lr"], seed) for t in tasks}
        out["mask"] = {t: dict(ranking_entry(order_of(gates[t]), gates[t]), n_open=int((gates[t] > 0.5).sum()))
                       for t in tasks}
    if "random" in methods:
        out["random"] = {f"repeat_{r}": {"order": np.random.default_rng([seed, site.depth, r]).permutation(
            site.n_filters).tolist()} for r in range(random_repeats)}
    if "taylor" in out and "loss" in out:
        out["agreement"] = {t: rank_correlation(out["taylor"][t]["by_channel"], out["loss"][t]["by_channel"])
                            for t in tasks}
    ranked = [m for m in methods if m != "random"]
    if reliability and ranked:
        halves = split_halves(rank_batches)
        if all(any(t == task for t, _, _ in half) for half in halves for task in tasks):
            out["reliability"] = split_half_reliability(halves_ranked(
                model, site, rank_batches, halves, tasks, ranked, per_image, masks_per_pass=masks_per_pass,
                greedy=greedy, precision=precision, share=share, localiser_fdr=localiser_fdr, mask=mask),
                reliability_fractions)
    return out


def halves_ranked(model, site: Site, rank_batches: list, halves: tuple, tasks: list, ranked: list, per_image: dict,
                  **settings) -> tuple:
    """`rank_site` of each of `halves` (split_halves of rank_batches) by the `ranked` methods: the loss ranking
    from its per-image losses on all the images (`per_image`: {task: loss_per_image}; no second pass), the others
    ranked again with `settings` (rank_site's)."""
    others = [m for m in ranked if m != "loss"]
    per_half = tuple(rank_site(model, site, half, tasks, others, **settings) if others else {} for half in halves)
    if per_image:
        for k, entry in enumerate(per_half):
            entry["loss"] = {t: loss_half(per_image[t], rank_batches, t, k) for t in tasks}
    return per_half


def loss_half(per_image: tuple, rank_batches: list, task: str, half: int) -> dict:
    """The loss ranking (`ranking_entry`) on one of `split_halves`' halves of the ranking images, from the
    per-image losses on all of them (`loss_per_image`)."""
    scores = loss_increase(per_image, half_positions(rank_batches, task, half))
    return ranking_entry(order_of(scores), scores)


def _check_methods_and_tasks(model, methods, tasks) -> None:
    """UsageError for a lesion method not in METHODS or a task the model does not have."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise UsageError(f"unknown lesion method(s) {bad}; expected some of {list(METHODS)}")
    known = list(getattr(model, "tasks", None) or model.heads)  # a joint output layer has no per-task heads
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise UsageError(f"unknown task(s) {unknown}; the model's tasks are {known}")


RANKING_KEYS = (*METHODS, "agreement", "reliability")  # the order of a site's entries in rankings.json


def merge_rankings(own: dict, given: dict) -> dict:
    """A site's rankings from two parts (here: the rankings its process computed alone, and the greedy rankings
    all processes computed together), in the order one rank_site call gives them: methods in METHODS order,
    then agreement and reliability (each method's entry in METHODS order)."""
    merged = {**own, **{k: v for k, v in given.items() if k != "reliability"}}
    reliability = {**own.get("reliability", {}), **given.get("reliability", {})}
    if reliability:
        merged["reliability"] = {m: reliability[m] for m in METHODS if m in reliability}
    keys = [k for k in RANKING_KEYS if k in merged] + [k for k in merged if k not in RANKING_KEYS]
    return {k: merged[k] for k in keys}


def ranking_entry(order, scores, ordered: bool = False) -> dict:
    """A ranking as saved: the order, the scores in that order, and (for correlations) the scores by channel."""
    order = np.asarray(order)
    scores = np.asarray(scores, dtype=float)
    in_order = scores if ordered else scores[order]
    by_channel = np.empty(len(order))
    by_channel[order] = in_order
    return {"order": order.tolist(), "scores": [round(float(v), 6) for v in in_order],
            "by_channel": by_channel.tolist()}
