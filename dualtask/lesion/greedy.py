"""The reference study's greedy ranking: at each step the filters whose silencing costs a task most, on
ranking images cached at the site, raced (candidates dropped once they cannot win) or exhaustive, shared out
across processes under torchrun; and the ranking's precision (fp32, or bf16 where its check passes)."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn

from dualtask.core import device as device_mod
from dualtask.lesion.engine import SiteRunner, lesion_mask, order_of, ranking_precision
from dualtask.model.sites import Site

GREEDY_STEP = 0.016  # the reference study's step: int(0.016 x n) filters per greedy step (at least one)
# the greedy ranking's settings (config: greedy_racing, greedy_margin, greedy_candidates, greedy_stop)
GREEDY_DEFAULTS = {"racing": True, "margin": 4.0, "candidates": None, "stop": 0.2}
# what the greedy ranking was before these settings existed: exhaustive, stopping just past 20% of a site
GREEDY_BEFORE = {"racing": False, "candidates": None, "stop": 0.2}
RACE_FIRST, RACE_MIN = 1 / 8, 32  # racing's first slice: this share of the ranking images, at least this many
FIRST_ORDER_BATCH = 64  # images per pass forward and back for the first-order estimates


def greedy_settings(config: dict) -> dict:
    """A run's greedy settings as a sweep records them: those that change its result (the margin only when
    racing)."""
    g = {"racing": bool(config.get("greedy_racing", GREEDY_DEFAULTS["racing"])),
         "candidates": config.get("greedy_candidates", GREEDY_DEFAULTS["candidates"]),
         "stop": float(config.get("greedy_stop", GREEDY_DEFAULTS["stop"]))}
    if g["racing"]:
        g["margin"] = float(config.get("greedy_margin", GREEDY_DEFAULTS["margin"]))
    return g


def greedy_chosen(n_filters: int, stop_fraction: float = 0.2, step_fraction: float = GREEDY_STEP) -> int:
    """How many filters the greedy steps choose at a site of n_filters: whole steps until just past
    stop_fraction. Filters beyond them follow in the order of the last step's scores."""
    step = max(1, int(round(step_fraction * n_filters)))
    stop = max(1, int(np.ceil(stop_fraction * n_filters)))
    return min(n_filters, step * int(np.ceil(stop / step)))


def beyond_greedy_stop(method: str, fraction: float, n_filters: int, stop_fraction: float) -> int:
    """1 when a greedy lesion of `fraction` silences filters the greedy steps never chose (lesion_results.csv's
    beyond_greedy_stop), else 0."""
    return int(method == "greedy" and int(round(float(fraction) * n_filters)) > greedy_chosen(n_filters,
                                                                                               stop_fraction))

def cache_budget(device: torch.device) -> int:
    """Bytes a greedy run may keep of cached prefix outputs: 40% of the free GPU memory, or a quarter of the
    free RAM."""
    free = device_mod.free_memory(device, reserved=True)  # a GPU's free memory and what PyTorch holds in reserve
    if free is not None:
        return int(0.4 * free)
    try:
        return int(0.25 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 30


def all_gather_objects(obj) -> list:
    """Every process's `obj`, in rank order, on every process (torch.distributed)."""
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


class RankingImages:
    """One task's ranking images at one site, for a whole greedy run: each batch's prefix output is computed once
    and kept (while `budget` bytes allow; else computed again when needed), and the per-image losses of any
    lesion sets on any of the images come from the suffix alone. `counts` tallies the work: candidate-image
    suffix evaluations, prefix images, first-order (Taylor) images.

    share = (rank, world, all_gather): the lesion sets of each call are shared out across processes (process r
    scores every world-th from the r-th) and gathered, so every process holds every loss."""

    def __init__(self, model, site: Site, batches: list, task: str, precision: str = "fp32",
                 masks_per_pass: int = 1, budget: int | None = None, share=None):
        self.runner, self.site, self.task = SiteRunner(model, site), site, task
        self.precision, self.masks_per_pass, self.share = precision, masks_per_pass, share
        self.batches = [(x, y) for t, x, y in batches if t == task]
        sizes = [len(y) for _, y in self.batches]
        self.n = int(sum(sizes))
        self.batch_of = np.repeat(np.arange(len(sizes)), sizes)
        self.offset = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.device = self.batches[0][0].device if self.batches else torch.device("cpu")
        self.budget = cache_budget(self.device) if budget is None else budget
        self.cache, self.cached_bytes = {}, 0
        self.counts = {"evaluations": 0, "prefix_images": 0, "first_order_images": 0}
        model.eval()

    def context(self):
        return ranking_precision(self.device, self.precision)

    @torch.no_grad()
    def prefix(self, b: int) -> torch.Tensor:
        if b in self.cache:
            return self.cache[b]
        with self.context():
            out = self.runner.prefix(self.batches[b][0])
        self.counts["prefix_images"] += len(out)
        size = out.numel() * out.element_size()
        if self.cached_bytes + size <= self.budget:
            self.cache[b] = out
            self.cached_bytes += size
        return out

    def _pieces(self, positions):
        """[(segments [(batch, its rows or None for all)], the positions they hold)]: each whole batch when
        `positions` is None; else `positions` in order, cut into pieces of at most the largest batch's size
        (one suffix pass per lesion and piece, whichever batches the images come from)."""
        if positions is None:
            return [([(b, None)], np.arange(o, o + len(y))) for b, ((_, y), o) in enumerate(zip(self.batches,
                                                                                                 self.offset))]
        positions = np.sort(np.asarray(positions, dtype=np.int64))
        size = max(len(y) for _, y in self.batches)
        pieces = []
        for start in range(0, len(positions), size):
            pos = positions[start:start + size]
            segments = []
            for b in np.unique(self.batch_of[pos]):
                rows = pos[self.batch_of[pos] == b] - self.offset[b]
                segments.append((int(b), None if len(rows) == len(self.batches[b][1]) else rows))
            pieces.append((segments, pos))
        return pieces

    def _gather(self, segments) -> tuple:
        """(cached prefix outputs, labels) of a piece's images."""
        parts = []
        for b, rows in segments:
            cached, y = self.prefix(b), self.batches[b][1]
            if rows is not None:
                cached = cached.index_select(0, torch.as_tensor(rows, device=cached.device))
                y = y.index_select(0, torch.as_tensor(rows, device=y.device))
            parts.append((cached, y))
        if len(parts) == 1:
            return parts[0]
        return torch.cat([c for c, _ in parts]), torch.cat([y for _, y in parts])

    @torch.no_grad()
    def _own_losses(self, lesions: list, positions) -> np.ndarray:
        out = np.full((len(lesions), self.n), np.nan, dtype=np.float32)
        if not lesions:
            return out
        masks = [lesion_mask(ch, self.site.n_filters) for ch in lesions]
        for segments, pos in self._pieces(positions):
            cached, y = self._gather(segments)
            with self.context():
                for start in range(0, len(masks), self.masks_per_pass):
                    group = masks[start:start + self.masks_per_pass]
                    keep = torch.stack([k for k, _ in group])
                    add = torch.stack([a for _, a in group])
                    logits = self.runner.suffix(cached, keep, add)[self.task].float()
                    loss = nn.functional.cross_entropy(logits.reshape(len(group) * len(y), -1),
                                                       y.repeat(len(group)), reduction="none")
                    out[start:start + len(group), pos] = loss.view(len(group), len(y)).cpu().numpy()
            self.counts["evaluations"] += len(masks) * len(pos)
        return out

    def losses(self, lesions: list, positions=None) -> np.ndarray:
        """(len(lesions), n) float32: `task`'s per-image loss with each lesion set (channel list) silenced, at
        `positions` of the ranking images (None: all; the others NaN). For all images exactly what
        evaluate_lesions gives on the CPU; for some, the same to float rounding (other batch shapes)."""
        if self.share is None:
            return self._own_losses(lesions, positions)
        rank, world, gather = self.share
        parts = gather(self._own_losses(lesions[rank::world], positions))
        out = np.empty((len(lesions), self.n), dtype=np.float32)
        for r, part in enumerate(parts):
            out[r::world] = part
        return out

    def mean_losses(self, lesions: list) -> np.ndarray:
        """`task`'s mean loss over all ranking images with each lesion set silenced (float32, as _task_loss)."""
        full = self.losses(lesions)
        return np.array([row.mean() for row in full])

    def first_order(self, silenced) -> np.ndarray:
        """(n, n_filters) float32: each image's first-order estimate of how much `task`'s loss rises when one
        more filter is silenced besides `silenced` (minus the gradient of the image's loss with respect to a
        per-image mask on the filter's channel), from the cached prefix outputs: one pass forward and back
        through the suffix per image. Shared out across processes by batch."""
        n_filters = self.site.n_filters
        keep = torch.ones(n_filters)
        keep[torch.as_tensor(np.asarray(silenced, dtype=np.int64))] = 0
        rank, world, gather = self.share if self.share is not None else (0, 1, None)
        mine = {}
        for b in range(rank, len(self.batches), world):
            rows = []
            for start in range(0, len(self.batches[b][1]), FIRST_ORDER_BATCH):  # bounded memory for the backward
                cached = self.prefix(b)[start:start + FIRST_ORDER_BATCH]
                y = self.batches[b][1][start:start + FIRST_ORDER_BATCH]
                if cached.is_inference():
                    cached = cached.clone()
                mask = torch.ones(len(cached), n_filters, device=cached.device, requires_grad=True)
                k = keep.to(cached.device)

                def transform(out, mask=mask, k=k):
                    m = (mask * k).view(*mask.shape, *([1] * (out.ndim - 2)))
                    return out * m.to(out.dtype)

                with torch.enable_grad(), self.context():
                    logits = self.runner.suffix_with(cached, transform)[self.task].float()
                    loss = nn.functional.cross_entropy(logits, y, reduction="sum")
                    (grad,) = torch.autograd.grad(loss, mask)
                rows.append((-grad).float().cpu().numpy())
                self.counts["first_order_images"] += len(y)
            mine[b] = np.concatenate(rows)
        parts = [mine] if gather is None else gather(mine)
        out = np.empty((self.n, n_filters), dtype=np.float32)
        for part in parts:
            for b, rows in part.items():
                out[self.offset[b]:self.offset[b] + len(rows)] = rows
        return out

    def taylor(self, silenced, predicted: np.ndarray | None = None) -> np.ndarray:
        """|activation x gradient of `task`'s loss| per filter, summed over positions and averaged over images
        (taylor_scores), with the `silenced` filters silenced (from `first_order`, or its given result)."""
        predicted = self.first_order(silenced) if predicted is None else predicted
        return np.abs(predicted.astype(np.float64)).sum(0) / max(self.n, 1)


def _adjusted(d: np.ndarray, z: np.ndarray | None, z_all: np.ndarray | None) -> tuple:
    """(mean, standard error) of each row of the paired differences d (rows: candidates, columns: the images
    seen so far). With a control variate z (same shape; its mean over every image z_all known), the regression
    estimate mean(d) - beta (mean(z) - z_all), beta fitted per row, and the standard error of its residuals."""
    n = d.shape[1]
    mean = d.mean(1)
    if z is None:
        return mean, d.std(1, ddof=1) / np.sqrt(n)
    dc, zc = d - mean[:, None], z - z.mean(1, keepdims=True)
    var = (zc * zc).sum(1)
    beta = np.where(var > 0, (dc * zc).sum(1) / np.where(var > 0, var, 1), 0.0)
    resid = dc - beta[:, None] * zc
    se = np.sqrt((resid * resid).sum(1) / max(n - 2, 1)) / np.sqrt(n)
    return mean - beta * (z.mean(1) - z_all), se


def race(images: RankingImages, pool: list, chosen: list, step: int, margin: float, image_order: np.ndarray,
         predicted: np.ndarray | None = None, first: float = RACE_FIRST, least: int = RACE_MIN) -> tuple:
    """Racing scores of one greedy step: every candidate in `pool` (silenced together with `chosen`) on a first
    slice of the ranking images (`first` of them in `image_order`, at least `least`), then on twice as many, and
    so on, each round dropping the candidates confidently below the step's cut: below the candidate ranked
    `step`-th by mean loss so far and below each one ranked above it, so that at least `step` candidates are
    confidently better (with one filter per step, the cut alone). Confidently below: the mean of the paired
    per-image loss differences plus `margin` standard errors is below 0. The survivors are scored on every
    image.

    predicted: (n images, filters) first-order estimates of each filter's loss increase per image
    (`RankingImages.first_order`), used as a control variate: the paired differences' mean is corrected by the
    difference of the estimates' mean on the images seen from their mean on every image (a regression
    estimate), with the standard error of what the estimates leave unexplained. Where they predict the losses
    well, a candidate is confidently ranked on far fewer images. The candidates' means so far (for the cut)
    are likewise corrected, as differences to the candidate with the highest plain mean.

    Returns (exact, estimate): {candidate: mean loss over all images (float32: the exhaustive score, to the
    rounding of other batch shapes)} for the survivors, {candidate: mean loss over the images it was scored on}
    for those dropped."""
    n = images.n
    losses = np.full((len(pool), n), np.nan, dtype=np.float32)
    alive = np.arange(len(pool))
    estimate = {}
    columns = np.asarray(pool)
    done, size = 0, min(n, max(least, int(np.ceil(first * n))))
    while done < n:
        if len(alive) <= step:  # nothing left to race: what is alive is chosen, on every image
            size = n
        new = image_order[done:size]
        fresh = images.losses([chosen + [pool[i]] for i in alive], new)
        losses[np.ix_(alive, new)] = fresh[:, new]
        done = size
        if done < n and len(alive) > step:
            seen = image_order[:done]
            sub = losses[np.ix_(alive, seen)].astype(np.float64)
            means = sub.mean(1)
            z = z_all = None
            if predicted is not None:
                pred = predicted[:, columns[alive]].astype(np.float64)  # (n, alive)
                z, z_all = pred[seen].T, pred.mean(0)
            ref = int(np.argmax(means))
            shift = _adjusted(sub - sub[ref], None if z is None else z - z[ref],
                              None if z is None else z_all - z_all[ref])[0]
            ranked = np.argsort(-shift, kind="stable")
            bound = np.full(len(alive), -np.inf)  # the highest of the upper bounds to each of the best `step`
            for j in ranked[:step]:
                diff_mean, diff_se = _adjusted(sub - sub[j], None if z is None else z - z[j],
                                               None if z is None else z_all - z_all[j])
                bound = np.maximum(bound, diff_mean + margin * diff_se)
            drop = bound < 0
            drop[ranked[:step]] = False
            for i in np.flatnonzero(drop):
                estimate[pool[alive[i]]] = float(means[i])
            alive = alive[~drop]
        size = min(n, 2 * size)
    exact = {pool[i]: losses[i].mean() for i in alive}
    return exact, estimate


def greedy_order(model, site: Site, batches: list, task: str, step_fraction: float = GREEDY_STEP,
                 stop_fraction: float = 0.2, masks_per_pass: int = 1, racing: bool = True, margin: float = 4.0,
                 candidates: int | None = None, precision: str = "fp32", seed: int = 0, control: bool = True,
                 share=None, stats: dict | None = None):
    """Grouped greedy forward selection (the reference study's): each step adds the `step_fraction` of the
    site's filters whose removal together with those already chosen raises `task`'s loss most, until just past
    `stop_fraction`. The filters never chosen follow, ordered by their effect at the last step.
    Returns (order, scores): a chosen filter's score is the loss with it removed at the step it was chosen.

    racing=False scores every remaining filter on every ranking image at each step (exhaustive). racing=True
    races them (`race`): a filter confidently below the step's cut after a slice of the images (by `margin`
    standard errors of its paired loss differences, with the first-order estimates as a control variate unless
    control=False) is dropped, and the step's choice is the exhaustive rule applied to the survivors' exact
    losses; a dropped filter's score at the last step is its mean on the images it was scored on.
    candidates=K: each step scores only the K remaining filters (at least one step's worth) with the highest
    first-order (Taylor) score computed with the chosen filters silenced; the others' score at the last step is
    the loss of the chosen set before it, and they follow in Taylor order.
    Every step reuses the prefix outputs of the ranking images (computed once per run when memory allows).
    share = (rank, world, all_gather) shares each step's candidates out across processes (the chosen sets
    are those of one process); stats, when given, receives the work done (RankingImages.counts and steps)."""
    images = RankingImages(model, site, batches, task, precision, masks_per_pass, share=share)
    step = max(1, int(round(step_fraction * site.n_filters)))
    stop = max(1, int(np.ceil(stop_fraction * site.n_filters)))
    image_order = np.random.default_rng([seed, site.depth, 7]).permutation(images.n)
    first_slice = min(images.n, max(RACE_MIN, int(np.ceil(RACE_FIRST * images.n))))
    chosen, scores = [], []
    remaining = list(range(site.n_filters))
    last, before_last, taylor, steps = None, [], None, 0
    while len(chosen) < stop and remaining:
        pool, taylor, predicted = remaining, None, None
        prune = candidates is not None and max(candidates, step) < len(remaining)
        if prune or (racing and control and len(remaining) > step and first_slice < images.n):
            predicted = images.first_order(chosen)
        if prune:
            taylor = images.taylor(chosen, predicted)
            top = set(sorted(remaining, key=lambda c: -taylor[c])[:max(candidates, step)])
            pool = [c for c in remaining if c in top]
        if racing:
            exact, estimate = race(images, pool, chosen, step, margin, image_order,
                                   predicted if control else None)
        else:
            exact, estimate = dict(zip(pool, images.mean_losses([chosen + [c] for c in pool]))), {}
        survivors = [c for c in pool if c in exact]
        losses = np.array([exact[c] for c in survivors])
        best = order_of(losses)[:step]
        before_last = list(chosen)
        chosen += [survivors[i] for i in best]
        scores += [float(losses[i]) for i in best]
        last = {**{c: float(v) for c, v in estimate.items()}, **{c: float(exact[c]) for c in survivors}}
        picked = {survivors[i] for i in best}
        remaining = [c for c in remaining if c not in picked]
        steps += 1
    rest, rest_scores = _unchosen_order(images, remaining, last, before_last, taylor)
    if stats is not None:
        stats.update(images.counts, steps=steps, n_chosen=len(chosen), n_images=images.n)
    return np.array(chosen + rest), np.array(scores + rest_scores)


def _unchosen_order(images, remaining: list, last: dict | None, before_last: list, taylor) -> tuple[list, list]:
    """The filters the greedy steps never chose, ordered by their loss at the last step (`last`; ties by their
    first-order score, where the last step pruned), and those scores."""
    pruned = [c for c in remaining if last is not None and c not in last]
    if pruned:  # left out by the first-order pruning at the last step: the chosen set's loss before that step
        base = float(images.mean_losses([before_last])[0])
        last.update({c: base for c in pruned})
    tie = (lambda c: -taylor[c]) if taylor is not None else (lambda c: 0.0)
    rest = sorted(remaining, key=lambda c: (-last[c], tie(c))) if last else remaining
    return rest, [last[c] if last else 0.0 for c in rest]
