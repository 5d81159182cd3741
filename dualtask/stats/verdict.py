"""The verdict on a run or an experiment, decided on values: which (site, ranking) pairs count as a split by task,
and the answer (`Answer`). first_screen.py turns it into words; report.py and aggregate.py show them.

A (site, ranking) at the headline fraction (20%, or the nearest swept) counts as a split by task only where all of
these hold (docs/method.md, "The verdict", gives the reasons and the calibration):

1. The ranking decides. Rankings that measure what a task needs (`multiple_testing.IMPORTANCE`: loss, greedy,
   taylor, mask) form the verdict's family; selectivity rankings (activation, localiser) describe filters and never
   make a "yes" alone. The `verdict_rankings` setting sets the family on purpose (the report then says so).
2. The test. The index's 95% interval lies above 0 and the index beats the random-lesion pairs, corrected for every
   site x ranking of the family at the fraction (`multiple_testing`), through the heads and, where they ran,
   through the fixed readouts too (an experiment: beyond random lesions and each control, Holm-corrected).
3. The ranking reproduces. Ranked on two disjoint halves of the ranking images, each task's top set at the headline
   fraction (the filters the verdict lesions) overlaps by more than two random sets would: the one-sided
   hypergeometric p of the overlap (`Agreement`) is below RELIABILITY_ALPHA for both tasks. Random sets of k of n
   filters share k/n on average (the fraction itself). A test rather than a fixed share: a wide site ranked on few
   images (a branched ResNet50's 2,048-filter copies on 8 images) shares 32-48% of its top 20%, far beyond chance and
   short of any fixed bar near one half (docs/method.md gives the calibration).
4. It holds at the neighbouring fractions swept (the nearest below and above the headline): at each, the index is
   above 0 through the heads and through the readouts (where they ran), and its 95% interval lies above 0 through
   at least one of them (`holds_at`). Requiring the interval through both at both neighbours (the rule before
   2026-12-07) cost the branched positives half their power (4 of 9 post-branch sites, BENCHMARKS.md).
5. It is not image statistics. Where a resolution-matched control (both tasks' images at one native resolution)
   dissociates as much at the site, the split is the images', at any depth; where no such control ran, a split at
   an early site is too. Early: the site's receptive field (the image region one unit at the centre of its map
   sees, `lesion_engine.receptive_fields`) spans less than EARLY_RF_SHARE of the image's side. A site that passes
   1-4 but not 5 counts as IMAGE_STATISTICS, a third answer beside yes and not shown.

Imports no torch: it reads a run's files (its rows and rankings.json), as the report does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
from scipy import stats

from dualtask.core.common import number
from dualtask.core.names import reliability_key
from dualtask.stats import multiple_testing

ALPHA = multiple_testing.ALPHA
IMPORTANCE, SELECTIVITY = multiple_testing.IMPORTANCE, multiple_testing.SELECTIVITY
deciding = multiple_testing.deciding  # the rankings that decide: verdict_rankings, or IMPORTANCE
RELIABILITY_ALPHA = 0.05  # a top set's split-half overlap must beat random sets' at this one-sided level
EARLY_RF_SHARE = 0.5  # a site whose receptive field spans less of the image's side than this is early
HEADLINE = 0.2  # the reference study's headline lesion fraction


class Test(Enum):
    """One dissociation row's test against the random lesions, after the correction (its label: the tables')."""
    DISSOCIATES = "dissociates"
    LOST_TO_CORRECTION = "interval above 0, not beyond random lesions after the correction"
    NOT_BEYOND_RANDOM = "interval above 0, not beyond random lesions"
    NO_RANDOM = "interval above 0, no random lesions to test against"
    REVERSED = "reversed (each ranking hurts the other task more)"
    NO_SPLIT = "no dissociation (interval includes 0)"
    UNDEFINED = "undefined (a head at chance)"


class Counts(Enum):
    """What a (site, ranking) at the headline fraction counts as, in the order the rules are applied."""
    SPLIT = "split by task"
    IMAGE_STATISTICS = "image statistics"
    HEADS_ONLY = "through the heads only"
    DESCRIPTION = "description (selectivity)"
    UNMEASURED = "reproducibility not measured"
    NOT_REPRODUCIBLE = "not reproducible"
    ONE_FRACTION = "not at the neighbouring fractions"
    NO = "no split"


class Answer(Enum):
    YES = "yes"
    IMAGE_STATISTICS = "split by image statistics, not shown to be by task"
    NOT_SHOWN = "not shown"


def headline_fraction(fractions) -> float:
    """The reference study's headline is the 20% lesion; else the nearest fraction swept."""
    fractions = sorted(f for f in {float(f) for f in fractions} if f > 0)
    return min(fractions, key=lambda f: abs(f - HEADLINE))


def test(row: dict) -> Test:
    """A dissociation.csv row judged: DISSOCIATES when its 95% interval lies above 0 and its corrected p (p_corrected,
    multiple_testing.corrected_rows) is below ALPHA; else what holds of it."""
    low, high, p = number(row.get("ci_low")), number(row.get("ci_high")), number(row.get("p_corrected"))
    if not math.isfinite(number(row.get("index"))):
        return Test.UNDEFINED
    if low > 0 and p < ALPHA:
        return Test.DISSOCIATES
    if low > 0:
        if not math.isfinite(p):
            return Test.NO_RANDOM
        return Test.LOST_TO_CORRECTION if number(row.get("p_index")) < ALPHA else Test.NOT_BEYOND_RANDOM
    return Test.REVERSED if high < 0 else Test.NO_SPLIT


def above_zero(row: dict | None) -> bool:
    return row is not None and number(row.get("ci_low")) > 0


def holds_at(rows: list) -> bool:
    """Rule 4 at one neighbouring fraction, given that reading's rows (the heads', and the fixed readouts' where
    they ran; None: that row is missing): every index above 0, and at least one interval above 0."""
    return all(r is not None and number(r.get("index")) > 0 for r in rows) and any(above_zero(r) for r in rows)


@dataclass(frozen=True)
class Agreement:
    """How well a ranking's top set at a fraction reproduces on two halves of the ranking images, both tasks
    together: the smaller of their overlaps, the larger of their p-values."""
    overlap: float  # the share of one half's top set also in the other's (the smaller of the tasks')
    p: float  # one-sided: random top sets of the same size overlap at least as much (the larger of the tasks')
    chance: float  # the overlap two random top sets have on average (k / n)
    counts: tuple = ()  # ((shared, n, k), ...): the counts behind it, one per network (`pooled` adds them)

    @property
    def reproduces(self) -> bool:
        return self.p < RELIABILITY_ALPHA

    def text(self) -> str:
        return f"{self.overlap:.0%} shared (chance {self.chance:.0%}), p {self.p:.2g}"


def overlap_p(overlap: float, n: int, fraction: float) -> tuple:
    """(p, chance) of a split-half overlap of top sets of k = round(fraction * n) of n filters (as
    rankings.top_overlap counts them): p = P(X >= the overlap's count) for X hypergeometric (two random k-subsets of
    n), chance = k / n, its mean share."""
    k = max(1, int(round(fraction * n)))
    x = int(round(overlap * k))
    return float(stats.hypergeom.sf(x - 1, n, k, k)), k / n


def filters_of(rankings: dict, site: str, method: str, task: str) -> int | None:
    """How many filters a site's ranking orders: its split-half row's 'filters', else the length of its order."""
    entry = rankings.get(site) or {}
    n = number(((entry.get("reliability") or {}).get(method, {}).get(task) or {}).get("filters"))
    if math.isfinite(n):
        return int(n)
    order = ((entry.get(method) or {}).get(task) or {}).get("order")
    return len(order) if isinstance(order, list) and order else None


def task_agreement(rankings: dict, site: str, method: str, fraction: float, task: str) -> Agreement | None:
    """One task's split-half agreement at `fraction` (rankings.json's 'reliability'), None where it was not
    measured or the site's filter count is unknown."""
    row = ((rankings.get(site) or {}).get("reliability") or {}).get(method, {}).get(task) or {}
    overlap, n = number(row.get(reliability_key(fraction))), filters_of(rankings, site, method, task)
    if not math.isfinite(overlap) or not n:
        return None
    k = max(1, int(round(fraction * n)))
    return Agreement(overlap, *overlap_p(overlap, n, fraction), counts=((int(round(overlap * k)), n, k),))


def both_tasks(per_task: list) -> Agreement | None:
    """The tasks' agreements as one: the smaller overlap and the larger p (each task must reproduce)."""
    if not per_task or any(a is None for a in per_task):
        return None
    return Agreement(min(a.overlap for a in per_task), max(a.p for a in per_task),
                     max(a.chance for a in per_task))


def pooled(per_run: list) -> Agreement | None:
    """One task's agreements in several networks (an experiment's seeds) as one: the mean overlap and chance, and
    the exact p of the shared counts added over the networks (the sum of independent hypergeometric counts: does
    the total overlap beat random top sets', the question the mean overlap answers)."""
    if not per_run or any(a is None for a in per_run):
        return None
    counts = [c for a in per_run for c in a.counts]
    if len(counts) != len(per_run):  # counts not known: every network must reproduce on its own
        p = max(a.p for a in per_run)
    else:
        dist = [1.0]
        for _, n, k in counts:
            dist = np.convolve(dist, stats.hypergeom.pmf(np.arange(k + 1), n, k, k))
        p = float(min(1.0, dist[sum(x for x, _, _ in counts):].sum()))
    return Agreement(sum(a.overlap for a in per_run) / len(per_run), p, sum(a.chance for a in per_run) / len(per_run),
                     tuple(counts))


def reliability(rankings: dict, site: str, method: str, fraction: float, tasks) -> Agreement | None:
    """Both tasks' split-half agreement of the ranking's top set at `fraction` (`Agreement`), None where it was not
    measured."""
    return both_tasks([task_agreement(rankings, site, method, fraction, t) for t in tasks])


def receptive_share(rankings: dict, site: str) -> float | None:
    """The share of the image's side the site's receptive field spans (rankings.json), None where not recorded."""
    rf = (rankings.get(site) or {}).get("receptive_field")
    share = number(rf.get("share")) if isinstance(rf, dict) else float("nan")
    return share if math.isfinite(share) else None


def neighbours(fraction: float, swept) -> list:
    """The swept fractions next to `fraction`: the nearest below (above 0) and the nearest above, where swept."""
    below = [f for f in swept if 0 < f < fraction - 1e-9]
    above = [f for f in swept if f > fraction + 1e-9]
    return ([max(below)] if below else []) + ([min(above)] if above else [])


def classify(heads: Test, readouts: Test | None, decides: bool, reliable: Agreement | None, holds: dict,
             early: bool, control_matches: bool | None) -> Counts:
    """The rules in order (the module's docstring): heads: the test through the heads (an experiment: beyond random
    lesions and every control but the resolution-matched one); readouts: through the fixed readouts (None: not run);
    decides: the ranking is in the verdict's family; reliable: its split-half agreement (None: not measured); holds:
    {neighbouring fraction: whether the index holds there}; early: an early site; control_matches: a
    resolution-matched control dissociates as much there (None: none ran)."""
    if heads is not Test.DISSOCIATES:
        return Counts.NO
    if readouts is not None and readouts is not Test.DISSOCIATES:
        return Counts.HEADS_ONLY
    if not decides:
        return Counts.DESCRIPTION
    if reliable is None:
        return Counts.UNMEASURED
    if not reliable.reproduces:
        return Counts.NOT_REPRODUCIBLE
    if not all(holds.values()):
        return Counts.ONE_FRACTION
    if control_matches or (control_matches is None and early):
        return Counts.IMAGE_STATISTICS
    return Counts.SPLIT


@dataclass
class Finding:
    """One (site, ranking) at the headline fraction and what it counts as."""
    site: str
    depth: int
    ranking: str
    row: dict  # its dissociation row (a run's through the heads; an experiment's summary row)
    heads: Test
    readouts: Test | None
    readout_row: dict | None
    decides: bool
    reliable: Agreement | None
    holds: dict  # {neighbouring fraction: the index holds there}
    rf_share: float | None
    early: bool
    control_matches: bool | None
    counts: Counts = Counts.NO

    def __post_init__(self):
        self.counts = classify(self.heads, self.readouts, self.decides, self.reliable, self.holds, self.early,
                               self.control_matches)


@dataclass
class Judgement:
    """A run's or an experiment's verdict at its headline fraction."""
    answer: Answer
    fraction: float
    tasks: tuple
    findings: list
    decides: tuple  # the verdict's family as asked (deciding)
    rankings: list  # the rankings of the rows, in order
    n_sites: int
    readouts: bool  # the fixed readouts ran (a run), or None (an experiment)
    neighbours: list  # the fractions each split must hold at
    rf_known: bool  # receptive fields recorded for every site (else: early = the network's first site)
    control: bool  # a resolution-matched control's results were at hand
    floor: float  # the smallest corrected p the random repeats allow
    repeats: int
    family: dict = field(default_factory=dict)  # multiple_testing.family of the deciding rows
    experiment: bool = False  # an experiment's verdict (across seeds, against the controls)

    def where(self, *counts) -> list:
        return [f for f in self.findings if f.counts in counts]

    @property
    def deciding_run(self) -> list:
        """The rankings of this run that decide."""
        return [m for m in self.rankings if m in self.decides]

    @property
    def descriptive_run(self) -> list:
        return [m for m in self.rankings if m not in self.decides]


def answer_of(findings: list) -> Answer:
    counts = {f.counts for f in findings}
    if Counts.SPLIT in counts:
        return Answer.YES
    return Answer.IMAGE_STATISTICS if Counts.IMAGE_STATISTICS in counts else Answer.NOT_SHOWN


def _at(rows: list, fraction: float) -> dict:
    return {(r["layer"], r["method"]): r for r in rows if abs(number(r.get("fraction")) - fraction) < 1e-6}


def swept_fractions(config: dict, rows: list) -> list:
    """The fractions a run swept (its lesion_fractions, above 0; else those of its rows)."""
    asked = [float(f) for f in config.get("lesion_fractions") or [] if number(f) > 0]
    return sorted(set(asked)) or sorted({number(r["fraction"]) for r in rows if number(r["fraction"]) > 0})


def judge_run(diss: list, results: list, rankings: dict, config: dict, fixed: list | None = None,
              fixed_results: list | None = None, control: list | None = None) -> Judgement | None:
    """A run's verdict from its files' rows: dissociation.csv and lesion_results.csv (diss, results), rankings.json,
    config.json; fixed, fixed_results: fixed_readout/'s (None: not run); control: the dissociation rows of a
    resolution-matched run of the same experiment and seed (None: none at hand). None without dissociation rows.
    Rows lacking the correction, or corrected in another family, are corrected here."""
    if not diss:
        return None
    decides = deciding(config)
    diss = multiple_testing.corrected_rows(diss, results, force=False, decides=decides)
    if fixed is not None:
        fixed = multiple_testing.corrected_rows(fixed, fixed_results or [], force=False, decides=decides)
    f = headline_fraction(r["fraction"] for r in diss)
    swept = swept_fractions(config, diss)
    near = neighbours(f, swept)
    heads_at = {g: _at(diss, g) for g in [f] + near}
    fixed_at = {g: _at(fixed, g) for g in [f] + near} if fixed is not None else None
    control_at = _at(control, f) if control else None
    rows = list(heads_at[f].values())
    a, b = rows[0]["task_a"], rows[0]["task_b"]
    first = min(int(number(r["depth"])) for r in diss)
    findings, rf_known = [], True
    for r in rows:
        key, site = (r["layer"], r["method"]), r["layer"]
        holds = {}
        for g in near:
            if key in heads_at[g]:
                holds[g] = holds_at([heads_at[g][key]] + ([] if fixed_at is None else [fixed_at[g].get(key)]))
        share = receptive_share(rankings, site)
        rf_known &= share is not None
        early = share < EARLY_RF_SHARE if share is not None else int(number(r["depth"])) == first == 0
        matches = None
        if control_at is not None and key in control_at:  # the control's index reaches the real one's interval
            matches = number(control_at[key].get("index")) >= number(r.get("ci_low"))
        readout_row = None if fixed_at is None else fixed_at[f].get(key)
        findings.append(Finding(
            site=site, depth=int(number(r["depth"])), ranking=r["method"], row=r, heads=test(r),
            readouts=None if fixed_at is None else (test(readout_row) if readout_row else Test.UNDEFINED),
            readout_row=readout_row, decides=r["method"] in decides,
            reliable=reliability(rankings, site, r["method"], f, (a, b)), holds=holds, rf_share=share, early=early,
            control_matches=matches))
    family_rows = [r for r in rows if r["method"] in decides]
    fam = multiple_testing.family(family_rows)
    repeats = fam["repeats"] or max((int(number(r.get("n_random"))) for r in rows
                                     if math.isfinite(number(r.get("n_random")))), default=0)
    k = len({r["method"] for r in family_rows}) or 1
    holm = fam["method"] == multiple_testing.HOLM
    floor = multiple_testing.smallest_corrected_p(repeats, k, fam["n_tests"] if holm else None)
    return Judgement(answer=answer_of(findings), fraction=f, tasks=(a, b), findings=findings, decides=decides,
                     rankings=list(dict.fromkeys(r["method"] for r in rows)),
                     n_sites=len({r["layer"] for r in rows}), readouts=fixed is not None, neighbours=near,
                     rf_known=rf_known, control=bool(control), floor=floor, repeats=repeats, family=fam)
