"""The first screen of a run's report and of an experiment's: the verdict in one sentence of at most 40 words
(`verdict.Judgement` rendered), a small table of the sites behind it, and at most three caveats, those that would
change this run's answer first; every other caveat and the method notes follow lower on the page (`NOTES`).

Words are made here from values; nothing here decides.
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

from dualtask.core.common import number
from dualtask.report import pages
from dualtask.stats import multiple_testing
from dualtask.stats.verdict import (
    ALPHA,
    EARLY_RF_SHARE,
    IMPORTANCE,
    RELIABILITY_ALPHA,
    SELECTIVITY,
    Answer,
    Counts,
    Judgement,
    Test,
)

MAX_WORDS = 40  # the verdict sentence's length at most
SHOWN = 3  # caveats on the first screen
NOTES = "notes"  # the anchor of the section holding the other caveats and the method notes
CALIBRATION = Path(__file__).resolve().parent / "verdict_calibration.json"  # package data


@dataclass
class Caveat:
    text: str
    decisive: bool  # whether it could change this run's answer
    order: int  # decisive caveats are shown in this order


def names(sites: list, most: int = 3) -> str:
    sites = list(dict.fromkeys(sites))
    return ", ".join(sites[:most]) + (f" and {len(sites) - most} more" if len(sites) > most else "")


def _and(items: list) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _rankings(found: list) -> str:
    ranks = list(dict.fromkeys(f.ranking for f in found))
    return f"{_and(ranks)} ranking{'s' if len(ranks) > 1 else ''}"


def _through(j: Judgement) -> str:
    return "through heads and fixed readouts" if j.readouts else "through the heads"


def _sites(found: list) -> list:
    return [f.site for f in sorted(found, key=lambda f: f.depth)]


def _sure(j: Judgement, found: list, corrected: str = "corrected") -> str:
    """How sure: the largest corrected p among the passes, and the floor when every pass sits at it."""
    ps = [number(f.row.get("p_corrected")) for f in found]
    worst = max(p for p in ps if math.isfinite(p))
    if j.repeats and all(p <= j.floor + 1e-4 for p in ps):  # p_corrected is written with 4 decimals
        return f"{corrected} p = {j.floor:.3f} at each, the smallest {j.repeats} random orders allow"
    return f"{corrected} p <= {worst:.3f}"


def sentence(j: Judgement, seeds: int | None = None) -> str:
    """The verdict in at most MAX_WORDS words: the answer, where, which ranking, how sure. seeds: an experiment's
    number of seeds (None: one run)."""
    a, b = j.tasks
    at = f"{j.fraction:.0%} lesions"
    across = f", across {seeds} seed{'s' if seeds != 1 else ''}" if seeds is not None else ""
    how = _through(j) if seeds is None else "beyond random lesions and the controls"
    if j.answer is Answer.YES:
        found = j.where(Counts.SPLIT)
        sites = _sites(found)
        return (f"Task-specialised filters: yes, at {len(set(sites))} of {j.n_sites} sites ({names(sites)}), "
                f"{_rankings(found)}, {at}{across}, {how}; "
                f"{_sure(j, found, 'corrected' if seeds is None else 'Holm-corrected')}.")
    if j.answer is Answer.IMAGE_STATISTICS:
        found = j.where(Counts.IMAGE_STATISTICS)
        why = ("where a resolution-matched network splits as much" if any(f.control_matches for f in found) else
               f"early site{'s' if len(found) > 1 else ''}, no resolution-matched control")
        return (f"Task-specialised filters: split by image statistics, not shown to be by task: {a} and {b} filters "
                f"dissociate only at {names(_sites(found), 2)} ({why}), {_rankings(found)}, {at}{across}.")
    if not j.deciding_run:
        return (f"Task-specialised filters: not shown: no ranking here measures what a task needs (loss, greedy, "
                f"taylor or mask); {_and(j.descriptive_run)} selectivity describes filters but cannot decide.")
    if j.repeats < 2 and not j.experiment:
        return ("Task-specialised filters: not shown: too few random lesions (random_repeats under 2, or 'random' "
                "not among lesion_methods) to test any site against.")
    if j.floor >= ALPHA - 1e-12:
        return (f"Task-specialised filters: not shown: with {j.repeats} random orders no corrected p can go below "
                f"{j.floor:.3f}, so no site could pass p < {ALPHA}.")
    return (f"Task-specialised filters: not shown. At {at} no site's {a} and {b} filters dissociate reproducibly "
            f"under the {_and(j.deciding_run)} ranking{'s' if len(j.deciding_run) > 1 else ''}{across}, {how} "
            f"({j.n_sites} site{'s' if j.n_sites != 1 else ''}).")


SHORT = {Test.DISSOCIATES: "yes", Test.LOST_TO_CORRECTION: "no (lost to the correction)",
         Test.NOT_BEYOND_RANDOM: "no (within random lesions)", Test.NO_RANDOM: "no random lesions",
         Test.REVERSED: "reversed", Test.NO_SPLIT: "no", Test.UNDEFINED: "undefined"}


def ci_text(row: dict) -> str:
    index, low, high = number(row.get("index")), number(row.get("ci_low")), number(row.get("ci_high"))
    if not math.isfinite(index):
        return "undefined"
    return f"{index:.3f} [{low:.3f}, {high:.3f}]" if math.isfinite(low) else f"{index:.3f} [no interval]"


def p_text(value) -> str:
    p = number(value)
    return f"{p:.3f}" if math.isfinite(p) else "n/a"


def _holds(f, neighbours: list) -> str:
    if not neighbours:
        return "one fraction swept"
    failed = [g for g, ok in f.holds.items() if not ok]
    if failed:
        return "fails at " + ", ".join(f"{g:.0%}" for g in failed)
    return "holds" if f.holds else "not swept here"


def table_rows(j: Judgement, experiment: bool = False) -> tuple:
    """(rows, columns) of the first screen's table: every (site, ranking) whose interval lies above 0 through the
    heads or the readouts, what counts first."""
    order = list(Counts)
    shown = [f for f in j.findings if f.heads not in (Test.NO_SPLIT, Test.UNDEFINED, Test.REVERSED) or
             f.readouts is Test.DISSOCIATES]
    shown.sort(key=lambda f: (order.index(f.counts), f.depth, f.ranking))
    near = ", ".join(f"{g:.0%}" for g in j.neighbours) or "other fractions"
    columns = ["site", "ranking", "index [95% CI]", "p corrected", "reliability",
               "beyond random and controls" if experiment else "through heads"]
    columns += [] if experiment else ["through fixed readouts"]
    columns += [f"at {near}", "counts as"]
    rows = []
    for f in shown:
        row = {"site": f"{f.site} (depth {f.depth})", "ranking": f.ranking + ("" if f.decides else " (description)"),
               "index [95% CI]": ci_text(f.row), "p corrected": p_text(f.row.get("p_corrected")),
               "reliability": "not measured" if f.reliable is None else f.reliable.text(),
               columns[5]: SHORT[f.heads], f"at {near}": _holds(f, j.neighbours), "counts as": f.counts.value}
        if not experiment:
            row["through fixed readouts"] = "not run" if f.readouts is None else SHORT[f.readouts] + (
                f", {ci_text(f.readout_row)}" if f.readout_row else "")
        rows.append(row)
    return rows, columns


# ----------------------------------------------------------------------------------------------------------
# caveats that come from the verdict's rules


def rule_caveats(j: Judgement, control_hint: str) -> list:
    """What each rule took out of the answer, and what would decide it. control_hint: how to run a
    resolution-matched control (a run: an experiment's; an experiment: its controls setting)."""
    found = [_image_statistics(j, control_hint)]
    found += [caveat(j, j.where(counts)) for counts, caveat in RULE_CAVEATS if j.where(counts)]
    found += [_lost(j), _widened(j)]
    if j.answer is Answer.YES and not j.neighbours:
        found.append(Caveat("Only one lesion fraction was swept: whether the split holds at other lesion sizes is "
                            "untested (add 0.1 and 0.3 to lesion_fractions).", True, 72))
    if not j.rf_known and any(f.counts is not Counts.NO for f in j.findings):
        found.append(Caveat("Receptive fields are not recorded in this run's rankings.json (a sweep made before "
                            "them): only the network's first site is taken as early.", False, 75))
    return [c for c in found if c is not None]


def _image_statistics(j: Judgement, control_hint: str) -> Caveat | None:
    image = j.where(Counts.IMAGE_STATISTICS)
    if not image:
        return None
    matched = [f for f in image if f.control_matches]
    early = [f for f in image if not f.control_matches]
    parts = []
    if early:
        share = "; ".join(f"{f.site}: its receptive field spans {f.rf_share:.0%} of the image's side"
                          if f.rf_share is not None else f"{f.site}: the network's first site, receptive fields "
                          f"not recorded" for f in early[:4])
        parts.append(f"at {'an early site' if len(early) == 1 else 'early sites'} ({share}; early: under "
                     f"{EARLY_RF_SHARE:.0%})")
    if matched:
        parts.append(f"where the resolution-matched network dissociates as much ({names(_sites(matched))})")
    return Caveat(f"Split by image statistics, not shown to be by task: the {_rankings(image)} dissociates "
                  f"{' and '.join(parts)}. A split there may come from the tasks' image statistics (sharpness, "
                  f"colour, size) rather than the tasks; {control_hint}.", True, 45)


def _unreproducible(j: Judgement, shaky: list) -> Caveat:
    f_text = f"{j.fraction:.0%}"
    listed = "; ".join(f"{f.site} ({f.ranking}, {f.reliable.text()})" for f in shaky[:4])
    return Caveat(f"Not reproducible: ranked on two halves of the ranking images, the top-{f_text} sets share no more "
                  f"than random sets would (one-sided p not below {RELIABILITY_ALPHA:g} for a task) at {listed}. "
                  f"These passes do not count; raise rank_images.", True, 50)


def _unmeasured(j: Judgement, unmeasured: list) -> Caveat:
    return Caveat(f"Reproducibility not measured (ranking_reliability=False): {names(_sites(unmeasured))} pass the "
                  f"test but cannot count until ranking_reliability=True shows their rankings reproduce.", True, 52)


def _one_fraction(j: Judgement, unstable: list) -> Caveat:
    listed = "; ".join(f"{f.ranking} {f.site} ({_holds(f, j.neighbours)})" for f in unstable[:4])
    return Caveat(f"One lesion size only: these pass at {j.fraction:.0%} but do not hold at the neighbouring "
                  f"fraction (the index above 0 through every reading, its interval through at least one): {listed}. "
                  f"They do not count.", True, 55)


def _description(j: Judgement, described: list) -> Caveat:
    deciding, one = j.deciding_run, len(j.deciding_run) == 1
    split_there = any(f.counts is Counts.SPLIT and f.site in _sites(described) for f in j.findings)
    if deciding:
        also = (f"; there the {_and(deciding)} ranking{'' if one else 's'}, which decide{'s' if one else ''}, " +
                ("also split" + ("s" if one else "") if split_there else f"find{'s' if one else ''} no split that "
                                                                        f"counts"))
    else:
        also = "; add 'loss' (or greedy, taylor, mask) to lesion_methods for a verdict"
    return Caveat(f"Selectivity is description, not the test: the {_rankings(described)} dissociates at "
                  f"{names(_sites(described))}{also}. What a task needs is measured by importance rankings "
                  f"({', '.join(IMPORTANCE)}); verdict_rankings widens the family on purpose.", True, 60)


def _heads_only(j: Judgement, heads_only: list) -> Caveat:
    return Caveat(f"Through the heads only at {names(_sites(heads_only))}: there each head reads its own filters, "
                  f"but readouts fitted to the intact features do not lose the two tasks apart, as two heads of one "
                  f"task also do. These do not count.", True, 65)



# the caveat of each rule that took findings out of the answer, in the order the page lists them: each is given
# the findings the rule took out
RULE_CAVEATS = ((Counts.NOT_REPRODUCIBLE, _unreproducible), (Counts.UNMEASURED, _unmeasured),
                (Counts.ONE_FRACTION, _one_fraction), (Counts.DESCRIPTION, _description),
                (Counts.HEADS_ONLY, _heads_only))


def _lost(j: Judgement) -> Caveat | None:
    lost = [f for f in j.findings if f.decides and f.heads is Test.LOST_TO_CORRECTION]
    if not lost:
        return None
    n_tests = j.family.get("n_tests") or len([f for f in j.findings if f.decides])
    against = "every comparison" if j.experiment else "the random-lesion pairs alone"
    listed = "; ".join(f"{f.ranking} {f.site} (p {p_text(f.row.get('p_index'))}, "
                       f"corrected {p_text(f.row.get('p_corrected'))})"
                       for f in lost[:4])
    return Caveat(f"{len(lost)} site x ranking pair(s) pass p < {ALPHA} against {against} but not after the "
                  f"correction for the {n_tests} tests at {j.fraction:.0%}: {listed}. More random orders "
                  f"(random_repeats) can sharpen them.", j.answer is not Answer.YES, 70)


def _widened(j: Judgement) -> Caveat | None:
    widened = [m for m in j.decides if m in SELECTIVITY]
    if not widened:
        return None
    return Caveat(f"The verdict's family was widened on purpose (verdict_rankings): the selectivity "
                  f"ranking{'s' if len(widened) > 1 else ''} {_and(widened)} decide{'s' if len(widened) == 1 else ''} "
                  f"here beside the importance rankings.", True, 38)


def floor_caveat(j: Judgement, how_many: str = "random_repeats") -> Caveat | None:
    """What the random repeats allow the corrected p-values (multiple_testing)."""
    k = len(j.deciding_run) or 1
    holm = j.family.get("method") == multiple_testing.HOLM
    n_tests = j.family.get("n_tests") if holm else None
    need = multiple_testing.repeats_needed(k, ALPHA, n_tests)
    if j.repeats < 2:
        return Caveat(f"{j.repeats} random repeat: the index's null needs at least two random lesions; no p-value "
                      f"exists. A corrected p < {ALPHA} over {k} ranking(s) needs {how_many}={need}.", True, 30)
    formula = f"{n_tests if holm else k}/({j.repeats}+2) = {j.floor:.3f}"
    how = (f"Holm's method over {n_tests} tests" if holm else "the max-statistic over the sites" +
           (f", Bonferroni over {k} rankings" if k > 1 else ""))
    if j.floor >= ALPHA - 1e-12:
        return Caveat(f"With {j.repeats} random repeats no corrected p-value can go below {formula} ({how}), so no "
                      f"site can pass p < {ALPHA} however strong its split; {how_many}={need} or more can.", True, 30)
    return Caveat(f"The verdict's p-values are corrected for every site and deciding ranking at {j.fraction:.0%} "
                  f"lesions ({how}; the description rankings as a family of their own): with {j.repeats} random "
                  f"repeats the smallest a split can reach is {formula}, and a corrected p < {ALPHA} needs "
                  f"{how_many} of at least {need}. The tables' p_index is uncorrected.", False, 88)


def calibration_note() -> str:
    """What benchmarks/verdict_calibration.py last measured of these rules, read from the file it wrote."""
    try:
        got = json.loads(CALIBRATION.read_text())
        null, power = got["false_positive_rate_trained"], got["power"]
        sim = got.get("false_positive_rate")
    except (OSError, ValueError, KeyError, TypeError):
        return ("How often these rules are wrong has not been measured with this copy of the tool "
                "(benchmarks/verdict_calibration.py --record writes dualtask/report/verdict_calibration.json).")
    text = (f"benchmarks/verdict_calibration.py measured these rules ({got.get('date', '?')}, "
            f"{got.get('networks', 'trained networks')}): 'yes' on {null['hits']} of {null['n']} networks whose "
            f"two heads learn one task (95% interval {null['low']:.2f} to {null['high']:.2f}); "
            f"{power['hits']} of {power['n']} post-branch sites of branched networks found (power "
            f"{power['rate']:.2f}, {power['low']:.2f} to {power['high']:.2f})")
    if got.get("rules_chosen_on_these_networks"):
        text += (" (the reproducibility and neighbouring-fraction rules were set after seeing these sites, so this "
                 "power is optimistic until fresh networks confirm it)")
    if sim:
        text += f"; a simulated network without a split says 'yes' in {sim['rate']:.1%} of draws per test"
    return text + ". A task whose readout is near chance gives wide intervals: read 'not shown' there with care."


def _ordered(caveats: list) -> list:
    """Those that could change the answer first, each kind in its order."""
    return sorted(caveats, key=lambda c: (not c.decisive, c.order))


def render(j: Judgement | None, answer: str, table: tuple | None, intact: str, caveats: list) -> str:
    """The first screen's HTML: the answer, the table, the intact accuracies, the SHOWN caveats (decisive first)
    and a link to the notes below."""
    first = _ordered(caveats)[:SHOWN]
    parts = [f'<div class="answer"><p class="verdict">{html.escape(answer)}</p>']
    if table and table[0]:
        parts.append(pages.table(*table))
    if intact:
        parts.append(f"<p>{html.escape(intact)}</p>")
    if first:
        parts.append("<p><b>What could change this answer</b></p>" if any(c.decisive for c in first) else
                     "<p><b>Caveats</b></p>")
        parts.append(pages.bullets([c.text for c in first]))
    rest = len(caveats) - len(first)
    parts.append(f'<p><a href="#{NOTES}">{"Further caveats and m" if rest else "M"}ethod notes</a>'
                 f'{f" ({rest} more)" if rest else ""}</p></div>')
    return "".join(parts)


def notes(caveats: list, method: list) -> str:
    """The caveats not on the first screen, then the method notes (the NOTES section's body)."""
    rest = _ordered(caveats)[SHOWN:]
    out = ""
    if rest:
        out += "<p><b>Further caveats</b></p>" + pages.bullets([c.text for c in rest])
    if method:
        out += "<p><b>How the verdict is reached</b></p>" + pages.bullets(method, "notes")
    return out


def method_notes(j: Judgement | None, correction: str, experiment: bool = False) -> list:
    """The rules as this run applied them, and the calibration: the same in every report but for the numbers."""
    if j is None:
        return []
    f_text = f"{j.fraction:.0%}"
    test = ("its index's 95% interval across seeds lies above 0 and it beats random lesions and every control "
            "that ran, Holm-corrected" if experiment else
            f"its index's 95% bootstrap interval lies above 0 and it beats the random-lesion pairs, {correction}"
            + (", through the heads and through fixed readouts" if j.readouts else ", through the heads"))
    return [
        f"A site counts as a split by task at {f_text} lesions when {test}; its ranking decides (importance: "
        f"{', '.join(j.decides)}; selectivity rankings are description); each task's top-{f_text} set, ranked on "
        f"two halves of the ranking images, overlaps by more than random sets would (one-sided hypergeometric p < "
        f"{RELIABILITY_ALPHA:g}); at the neighbouring fractions swept "
        f"({', '.join(f'{g:.0%}' for g in j.neighbours) or 'none here'}) the index stays above 0"
        + (" through both readings, its interval above 0 through at least one" if j.readouts else
           ", its interval above 0") + "; and "
        f"it is not image statistics: not an early site (receptive field under {EARLY_RF_SHARE:.0%} of the image's "
        f"side) unless a resolution-matched control ran, and not where such a control dissociates as much.",
        calibration_note(),
    ]
