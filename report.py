"""One self-contained HTML report per run, rebuilt from the run's own files (no retraining, no re-lesioning).

    python report.py runs/vgg16        # writes runs/vgg16/report.html

Every figure is embedded; a section whose files are missing says so in one line instead.
"""
from __future__ import annotations

import base64
import html
import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

from common import exit_on_damaged_files, number as _num, read_csv, read_json, READOUT_DIRS, write_text
import filter_sets
import health
import multiple_testing
import probes_report
from figures import headline_fraction, stimuli_file

FIGURES_STATUS = "figures_status.json"  # what each part of the figures stage wrote, or why it failed
ALPHA = 0.05  # the level of the summary's test against random lesions
NEAR_CHANCE = 0.05  # a head whose intact accuracy is less than this above chance has learned too little
INTACT_COLUMNS = ("eval_task", "intact_accuracy", "n_images", "chance")  # what the report reads of the results
# what it reads of dissociation.csv
DISSOCIATION_COLUMNS = ("layer", "depth", "method", "fraction", "task_a", "task_b", "index", "ci_low", "ci_high",
                        "p_index", "drop_a_by_a", "drop_a_by_b", "drop_b_by_b", "drop_b_by_a", "p_a_by_a",
                        "p_b_by_b", "n_random")

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222;
       line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
img { max-width: 100%; display: block; margin: .8em 0; }
table { border-collapse: collapse; font-size: .9em; margin: .6em 0; }
td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: left; }
p.skip { color: #a33; font-style: italic; }
div.answer { background: #f4f7fb; border-left: 4px solid #3a6ea5; padding: .4em 1em .6em; }
div.answer p.verdict { font-size: 1.1em; }
ul.caveats li { margin: .25em 0; }
table.wide { font-size: .78em; } table.wide td { padding: .2em .4em; white-space: nowrap; }
table.wide th { padding: .2em .4em; vertical-align: bottom; }
div.scroll { overflow-x: auto; }
p.what { color: #444; }
details { margin: .5em 0; }
"""


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(rows: list, columns: list, wide: bool = False) -> str:
    head = "".join(f"<th>{html.escape(c).replace('_', '_<wbr>')}</th>" for c in columns)  # long names may wrap
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    if wide:
        return f'<div class="scroll"><table class="wide"><tr>{head}</tr>{body}</table></div>'
    return f"<table><tr>{head}</tr>{body}</table>"


def wilson(p: float, n: int, z: float = 1.96):
    """95% Wilson interval of a proportion p observed on n trials."""
    if n == 0:
        return float("nan"), float("nan")
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


class Report:
    def __init__(self, run_dir: Path, status: dict):
        self.run_dir = run_dir
        self.status = status  # figures_status.json: the parts of the figures stage that ran, or failed
        self.parts = []

    def failed(self, part: str) -> bool:
        """Say so and return True when a part of the figures stage failed."""
        entry = self.status.get(part)
        if entry and not entry.get("ok", True):
            self.skip(f"{part} failed: {entry.get('error', 'unknown error')} (traceback in {FIGURES_STATUS})")
            return True
        return False

    def section(self, title: str):
        self.parts.append(f"<h2>{html.escape(title)}</h2>")

    def what(self, text: str):
        self.parts.append(f'<p class="what">{html.escape(text)}</p>')

    def skip(self, reason: str):
        self.parts.append(f'<p class="skip">Skipped: {html.escape(reason)}</p>')

    def figure(self, name: str, text: str, part: str | None = None) -> bool:
        path = self.run_dir / "figures" / name
        if part and self.failed(part):
            return False
        if not path.exists():
            self.skip(f"figures/{name} is missing (its stage has not run, or its inputs were missing)")
            return False
        self.what(text)
        self.parts.append(_image(path, name))
        return True

    def raw(self, markup: str):
        self.parts.append(markup)


def intact_accuracies(lesion_rows: list) -> dict:
    """{task: (intact test accuracy, test images, chance)} from lesion_results.csv's rows."""
    intact = {}
    for row in lesion_rows:
        intact.setdefault(row["eval_task"], (float(row["intact_accuracy"]), int(row["n_images"]),
                                             float(row["chance"])))
    return intact


def _ci(row: dict) -> str:
    index, low, high = _num(row["index"]), _num(row["ci_low"]), _num(row["ci_high"])
    if not math.isfinite(index):
        return "undefined"
    return f"{index:.3f} [{low:.3f}, {high:.3f}]" if math.isfinite(low) else f"{index:.3f} [no interval]"


def _p(value) -> str:
    """A number as shown in a table: 3 decimals, or n/a where it is undefined."""
    p = _num(value)
    return f"{p:.3f}" if math.isfinite(p) else "n/a"


def verdict(row: dict) -> str:
    """A dissociation.csv row judged: 'dissociates' when its 95% interval lies above 0 and the index beats the
    random-lesion pairs after the correction for the family's tests (p_corrected < ALPHA,
    multiple_testing.corrected_rows fills it in); else what holds of it."""
    low, high, p = _num(row["ci_low"]), _num(row["ci_high"]), _num(row.get("p_corrected"))
    if not math.isfinite(_num(row["index"])):
        return "undefined (a head at chance)"
    if low > 0 and p < ALPHA:
        return "dissociates"
    if low > 0:
        return "interval above 0, not beyond random lesions" + (
            " after the correction" if _num(row.get("p_index")) < ALPHA else "") if math.isfinite(p) else \
            "interval above 0, no random lesions to test against"
    if high < 0:
        return "reversed (each ranking hurts the other task more)"
    return "no dissociation (interval includes 0)"


def repeats_needed(alpha: float = ALPHA) -> int:
    """The fewest random repeats R whose smallest p_index, 1/(R+2), is below alpha (one ranking, one site)."""
    return multiple_testing.repeats_needed(1, alpha)


def _names(sites: list) -> str:
    return ", ".join(sites[:6]) + (f" and {len(sites) - 6} more" if len(sites) > 6 else "")


def _top_overlap(rankings: dict, site: str, methods: list, task: str, fraction: float):
    """(shared, k, expected by chance) of two methods' top-`fraction` filters for `task` at a site."""
    try:
        orders = [rankings[site][m][task]["order"] for m in methods]
    except KeyError:
        return None
    n = len(orders[0])
    k = int(round(fraction * n))
    if k == 0:
        return None
    return len(set(orders[0][:k]) & set(orders[1][:k])), k, k * k / n


def correction_text(family: dict) -> str:
    """How the headline's p-values were corrected (multiple_testing.family of its rows), as the verdict says it."""
    n, m, k, r = (family[key] for key in ("n_tests", "n_sites", "n_rankings", "repeats"))
    tests = (f"corrected for {n} test{'s' if n != 1 else ''} over {m} site{'s' if m != 1 else ''} and {k} "
             f"ranking{'s' if k != 1 else ''}")
    if family["method"] == multiple_testing.MAX_STATISTIC:
        return (f"{tests} by a max-statistic test over the {r} random orders" +
                (" (Bonferroni over the rankings)" if k > 1 else ""))
    if family["method"] == multiple_testing.HOLM:
        return (f"{tests} by Holm's method on the per-site p-values (no joint null across sites: "
                f"{family['why']})")
    return ""


def summary(config: dict, status: dict, results: list, diss: list, rankings: dict, checkup: dict | None = None,
            readouts: dict | None = None) -> str:
    """The report's first screen: the answer (per ranking, the sites where the dissociation index's 95%
    interval excludes 0 and the index beats the random-lesion null after the correction for every site x
    ranking at the headline fraction, `multiple_testing`), a compact table, and the caveats this run's own
    numbers call for. results, diss, rankings: the rows of lesion_results.csv and dissociation.csv and
    rankings.json (empty when missing); checkup: the run's train_health.json (empty when missing); readouts:
    {"fixed": rows, "refit": rows} of fixed_readout/ and refit_readout/dissociation.csv (the same lesions through
    linear readouts, `read_readout`), a kind missing or None when not run. Where the fixed readouts ran, a site
    counts only when it dissociates through the heads and through them (`confirmed`). Rows of dissociation.csv
    without p_corrected (a sweep made before it) get it from lesion_results.csv's random drops."""
    readouts = readouts or {}
    intact = intact_accuracies(results)
    diss = multiple_testing.corrected_rows(diss, results, force=False)
    caveats, table = [], ""
    if not results:
        answer = ("No lesion results yet (the lesion stage has not run): this run cannot say whether "
                  "task-specialised filters emerged.")
    elif not diss:
        answer = ("No dissociation index: it needs a targeted ranking (activation, localiser, loss, greedy, taylor or mask) and "
                  "two tasks; this run's lesions give only the per-task drops shown below.")
    else:
        answer, table, caveats = _dissociation_answer(config, diss, rankings, readouts.get("fixed"))
        answer = (answer + " " + _refit_sentence(readouts["refit"], caveats)).strip() if readouts.get("refit") \
            is not None else answer
    answer, caveats = _run_caveats(config, status, results, diss, intact, checkup, answer, caveats)
    parts = [f'<div class="answer"><p class="verdict">{html.escape(answer)}</p>{table}']
    if intact:
        parts.append("<p>Intact test accuracy: " + "; ".join(
            f"{t} {acc:.3f} (chance {chance:.3f})" for t, (acc, _, chance) in intact.items()) + ".</p>")
    parts.append("<p><b>Caveats</b></p><ul class='caveats'>" +
                 "".join(f"<li>{html.escape(c)}</li>" for c in caveats) + "</ul></div>")
    return "".join(parts)


def confirmed(rows: list, fixed: list | None) -> dict:
    """{(site, ranking): True where the site dissociates}: through the heads (`verdict`) and, where the fixed
    readouts ran (`fixed`: their dissociation rows, None when not run), through them too at the same site, ranking
    and fraction. Each part keeps its own correction, and a site must pass both, so the pair's false-positive rate
    is at most either's (an intersection-union test)."""
    through = None if fixed is None else {(r["layer"], r["method"], round(_num(r["fraction"]), 6)): verdict(r)
                                          for r in fixed}
    return {(r["layer"], r["method"]): verdict(r) == "dissociates" and (
        through is None or through.get((r["layer"], r["method"], round(_num(r["fraction"]), 6))) == "dissociates")
        for r in rows}


def _dissociation_answer(config: dict, diss: list, rankings: dict, fixed: list | None = None) -> tuple:
    """(answer, compact table, caveats) of a run with dissociation rows, at the headline fraction; fixed: the
    fixed readouts' rows (None when not run), which a site's dissociation must hold through too."""
    methods = list(dict.fromkeys(r["method"] for r in diss))
    caveats, table = [], ""
    f = headline_fraction(r["fraction"] for r in diss)
    rows = [r for r in diss if abs(_num(r["fraction"]) - f) < 1e-6]
    a, b = rows[0]["task_a"], rows[0]["task_b"]
    n_sites = len({r["layer"] for r in rows})
    ok = confirmed(rows, fixed)
    passing = {m: [r["layer"] for r in rows if r["method"] == m and ok[(r["layer"], m)]] for m in methods}
    heads_only = list(dict.fromkeys(r["layer"] for r in rows if verdict(r) == "dissociates"
                                    and not ok[(r["layer"], r["method"])]))
    criterion = (f"the index's 95% bootstrap interval above 0 and the index beyond the random-lesion pairs, "
                 f"corrected p < {ALPHA}" + (", through the heads and through fixed readouts" if fixed is not None
                                             else ""))
    corrected = correction_text(multiple_testing.family(rows))
    corrected = f", {corrected}" if corrected else ""
    n_pass = len({s for sites in passing.values() for s in sites})
    if n_pass:
        answer = (f"Task-specialised filters: yes, at {n_pass} of {n_sites} sites{corrected}. At {f:.0%} "
                  f"lesions, {a} and {b} filters dissociate ({criterion}) " + "; ".join(
                      f"with the {m} ranking at " + (f"{len(s)} site(s): {_names(s)}" if s else "no site")
                      for m, s in passing.items()) + ".")
        if fixed is None:
            answer += (" One network's heads alone cannot tell whether the split comes from the tasks or from two "
                       "heads (two heads learning one task split too): the fixed readouts (fixed_readout=True) or "
                       "an experiment's same_task control can.")
    else:
        answer = (f"Task-specialised filters: not shown{corrected}. At {f:.0%} lesions, no site dissociates "
                  f"{a} from {b} filters ({criterion}) with the {' or the '.join(methods)} ranking "
                  f"({n_sites} sites lesioned).")
    if heads_only:
        answer += (f" Through the heads alone they dissociate also at {_names(heads_only)}, but not through fixed "
                   f"readouts: there each head reads its own filters, and readouts fitted to the intact features do "
                   f"not lose the two tasks apart, as two heads of one task also do.")
    shown = [r for r in rows if verdict(r) not in ("no dissociation (interval includes 0)",
                                                       "undefined (a head at chance)")]
    if shown:
        fixed_at = {} if fixed is None else {(r["layer"], r["method"]): r for r in fixed
                                             if abs(_num(r["fraction"]) - f) < 1e-6}
        columns = ["ranking", "site", "index [95% CI]", "p vs random pairs", "p corrected", "verdict"] + (
            ["fixed readouts: index [95% CI], p corrected", "both"] if fixed is not None else [])
        table = _table([{"ranking": r["method"], "site": f"{r['layer']} (depth {r['depth']})",
                         "index [95% CI]": _ci(r), "p vs random pairs": _p(r.get("p_index")),
                         "p corrected": _p(r.get("p_corrected")), "verdict": verdict(r),
                         **({} if fixed is None else {
                             "fixed readouts: index [95% CI], p corrected": (
                                 f"{_ci(fixed_at[(r['layer'], r['method'])])}, "
                                 f"{_p(fixed_at[(r['layer'], r['method'])].get('p_corrected'))}")
                             if (r["layer"], r["method"]) in fixed_at else "not run",
                             "both": "dissociates" if ok[(r["layer"], r["method"])] else "no"})} for r in shown],
                       columns)
    else:
        answer += " At no site does any ranking's interval exclude 0."
    if fixed is None and n_pass:  # what benchmarks/verdict_calibration.py measured (BENCHMARKS.md, 2026-12-04)
        caveats.append("A single network's 'yes' through its heads alone does not separate task specialisation from "
                       "two readouts: two heads trained on one face task, on halves of its images or on the very "
                       "same images, lean on different filters at the late sites, and 3 of 3 such ResNet50s of each "
                       "kind got 'yes' there (indices 0.1 to 0.4; benchmarks/verdict_calibration.py). Fixed readouts "
                       "(fixed_readout=True) or an experiment's same_task control tell the two apart.")
    if fixed is not None:
        caveats.append(FIXED_CAVEAT)
    # the split-half overlap is kept for the top 10% and 20%: the one nearer the headline fraction
    caveats += _dissociation_caveats(rows, rankings, f) + _reliability_caveats(rankings, 0.2 if f >= 0.15 else 0.1)
    beyond = list(dict.fromkeys(r["layer"] for r in rows if r["method"] == "greedy"
                                and str(r.get("beyond_greedy_stop", "")).strip() == "1"))
    if beyond:
        caveats.append(f"At {f:.0%} lesions the greedy ranking's sets reach past its stop (greedy_stop "
                       f"{config.get('greedy_stop', 0.2)}) at {len(beyond)} site(s), {_names(beyond)}: their "
                       f"last filters follow the last greedy step's scores rather than a greedy choice "
                       f"(beyond_greedy_stop in dissociation.csv); raise greedy_stop to rank them greedily.")
    return answer, table, caveats


FIXED_CAVEAT = ("The verdict asks each site to dissociate twice: through the network's heads, and through fixed "
                "readouts (fixed_readout/: per task linear readouts fitted once to the intact network's features of "
                "its test images in 10 folds, each image read by the readout fitted on the other nine, never "
                "refitted). Two heads of one task read different filters, but one task's readouts do not tell them "
                "apart. benchmarks/verdict_calibration.py "
                "measured this pair of tests on ResNet50s at 32 px (BENCHMARKS.md, 2026-12-05): 'yes' on 0 of 3 networks "
                "whose two heads learn one face task (3 of 3 through the heads alone), 8 of 9 post-branch sites of "
                "branched networks found; a simulated null says 'yes' in 4.5% of networks per test. Three null "
                "networks bound the false-positive rate only loosely (at most 0.56 at 95%), and a task whose readout "
                "is weak (near chance) gives wide intervals, so read 'not shown' there with care.")


def _refit_sentence(refit: list, caveats: list) -> str:
    """What the refitted readouts (readouts.py) say at the headline fraction, in a sentence; adds its caveat."""
    if not refit:
        return "The refitted readouts found no index to compute."
    f = headline_fraction(r["fraction"] for r in refit)
    rows = [r for r in refit if abs(_num(r["fraction"]) - f) < 1e-6]
    a, b = rows[0]["task_a"], rows[0]["task_b"]
    sites = list(dict.fromkeys(r["layer"] for r in rows if verdict(r) == "dissociates"))
    n_sites = len({r["layer"] for r in rows})
    caveats.append("Refitted readouts (refit_readout/): every lesion scored again by linear readouts fitted anew "
                   "to the lesioned features, per task (what the features still hold, not what a head reads). They "
                   "do not settle the question a single run leaves open: in benchmarks/verdict_calibration.py "
                   "(BENCHMARKS.md) they said 'yes' on 1 of 3 ResNet50s whose two heads learn one task, and found "
                   "0 of 9 post-branch sites of branched networks, whose features stay linearly readable after a "
                   "20% lesion; read 'not shown' there as weak evidence.")
    how = correction_text(multiple_testing.family(rows))
    if sites:
        return (f"Through readouts refitted to the lesioned features, {a} and {b} filters dissociate at "
                f"{len(sites)} of {n_sites} sites ({_names(sites)}){', ' + how if how else ''}: there the "
                f"filters carry what one task needs more than the other, which two heads of one task cannot show.")
    return (f"Through readouts refitted to the lesioned features, no site dissociates{', ' + how if how else ''} "
            f"({n_sites} sites): what the filters carry, as a fresh linear readout finds it, is not shown to differ "
            f"between the tasks.")


def _run_caveats(config: dict, status: dict, results: list, diss: list, intact: dict, checkup: dict | None,
                 answer: str, caveats: list) -> tuple:
    """(answer, caveats) with what the whole run calls for: heads near chance, training health, random repeats,
    keep-only lesions, parts that failed, and what one network cannot show."""
    weak, near_chance = [], []
    for task, (accuracy, n, chance) in intact.items():
        low, high = wilson(accuracy, n)
        if accuracy - chance < NEAR_CHANCE or low <= chance:
            weak.append(task)
            near_chance.append(f"The {task} head is near chance: intact test accuracy {accuracy:.3f} (95% CI "
                               f"{low:.3f} to {high:.3f}, {n} images) against chance {chance:.3f}. Its "
                               f"chance-corrected drops, and every index that uses them, mean little; train it "
                               f"further before reading its lesions.")
    lesioned = {r["layer"] for r in results}
    trained = health.caveats(checkup or {}, lesioned)
    caveats = near_chance + trained + caveats
    if checkup and health.unresolved(checkup) and results:
        answer += (" Training did not go well (see the caveats on training health): a lesion of a network that has "
                   "not learned its tasks says little about how it would divide them.")
    if config.get("lesion_keep_only") and diss:
        answer = "Keep-only lesions: read every index with its sign reversed (see the caveats). " + answer
    if weak and diss:
        answer += (f" But the {' and '.join(weak)} head{'s are' if len(weak) > 1 else ' is'} near chance, so "
                   f"this answer means little (see the caveats).")
    if results:
        caveats += _random_caveats(diss, config)
    if config.get("lesion_keep_only"):
        caveats.append("Keep-only lesions: a ranking's selected filters are the ones kept and every other filter of "
                       "the site is silenced, so keeping a task's filters should spare that task and a split shows "
                       "as a negative index ('reversed' above), not a positive one.")
    failed = [f"{part} ({entry.get('error')})" for part, entry in status.items() if not entry.get("ok", True)]
    if failed:
        caveats.append(f"Not written, because they failed: {'; '.join(failed)}.")
    if config.get("role"):  # one run of an experiment (experiment.py)
        caveats.append(f"One network of an experiment ({config['role']}, seed {config.get('seed')}): the "
                       f"experiment's report.html (in the experiment's folder) weighs it against the other seeds and the "
                       f"controls.")
    else:
        caveats.append(f"One network, trained from seed {config.get('seed')}, and no controls: without networks "
                       f"from other seeds, a resolution-matched control, a pseudo-task control or single-task "
                       f"networks, this run cannot show that a split holds across networks or comes from the tasks "
                       f"rather than from their images (the seeds and controls settings run them).")
    return answer, caveats


def _dissociation_caveats(rows: list, rankings: dict, fraction: float) -> list:
    caveats = []
    above = {(r["layer"], r["method"]): _num(r["ci_low"]) > 0 for r in rows}
    by_site = {}
    for r in rows:
        by_site.setdefault(r["layer"], {})[r["method"]] = r
    disagree = []
    for site, per in by_site.items():
        found = [m for m in per if above[site, m]]
        if found and len(found) < len(per):
            others = [m for m in per if m not in found]
            text = (f"{site}: {', '.join(f'{m} {_ci(per[m])}' for m in found)} finds a split, "
                    f"{', '.join(f'{m} {_ci(per[m])}' for m in others)} does not")
            overlap = _top_overlap(rankings, site, [found[0], others[0]], rows[0]["task_a"], fraction)
            if overlap:
                shared, k, expected = overlap
                text += (f" (their top-{fraction:.0%} {rows[0]['task_a']} filters share {shared} of {k}; "
                         f"random sets would share about {expected:.1f})")
            disagree.append(text)
    if disagree:
        caveats.append(f"The rankings disagree at {len(disagree)} site(s) (interval above 0 for one, not for "
                       f"another): " + "; ".join(disagree[:4]) + ("; ..." if len(disagree) > 4 else "") +
                       ". Selectivity (activation) often predicts importance (loss) poorly; trust the loss-based "
                       "rankings where they differ.")
    first_depth = min(int(r["depth"]) for r in rows)
    early = [r for r in rows if int(r["depth"]) == first_depth and _num(r["ci_low"]) > 0]
    if early:
        where = "the network's first site" if first_depth == 0 else "the first lesioned site"
        caveats.append(f"The index is already above 0 at {where}, {early[0]['layer']} (" +
                       ", ".join(f"{r['method']} {_ci(r)}" for r in early) + "): a split this early more likely "
                       "reflects low-level image statistics (sharpness, colour, size) than task specialisation. "
                       "A resolution-matched control (both tasks' images at the same native resolution) has to "
                       "come before a claim; this run has none.")
    lost = [r for r in rows if verdict(r).endswith("after the correction")]
    if lost:
        n_tests = multiple_testing.family(rows)["n_tests"]
        caveats.append(f"{len(lost)} site x ranking pair(s) pass p < {ALPHA} against the random-lesion pairs alone "
                       f"but not after the correction for the {n_tests} tests at {fraction:.0%} lesions: " +
                       "; ".join(f"{r['method']} {r['layer']} (p {_p(r.get('p_index'))}, corrected "
                                 f"{_p(r.get('p_corrected'))})" for r in lost[:4]) + ("; ..." if len(lost) > 4 else "")
                       + f". With no split anywhere, about {n_tests * ALPHA:.1f} of {n_tests} uncorrected tests would "
                       f"pass by chance alone.")
    return caveats


UNRELIABLE = 0.5  # a ranking whose two halves share less than this share of their top sets is not reproducible


def _reliability_caveats(rankings: dict, fraction: float) -> list:
    """Rankings whose lesioned top sets differ between two halves of the ranking images."""
    key = f"top{int(round(fraction * 100))}"
    shaky = []
    for site, per in rankings.items():
        for method, tasks in per.get("reliability", {}).items():
            for task, rel in tasks.items():
                if key in rel and rel[key] < UNRELIABLE:
                    shaky.append(f"{site} {method} {task} {rel[key]:.0%}")
    if not shaky:
        return []
    return [f"Rankings not reproducible: ranked on two halves of the ranking images, these share less than "
            f"{UNRELIABLE:.0%} of their top-{fraction:.0%} filters: " + "; ".join(shaky[:6]) +
            ("; ..." if len(shaky) > 6 else "") + ". Their lesions silence sets that other images would not "
            "choose; raise rank_images (rankings.json holds every ranking's split-half overlap and Spearman "
            "correlation)."]


def _random_caveats(diss: list, config: dict) -> list:
    """What the random repeats allow the headline's corrected p-values (multiple_testing): its smallest value,
    and the random_repeats a corrected p < ALPHA needs."""
    methods = config.get("lesion_methods", [])
    if "random" not in methods:
        return ["No random lesions were run, so no lesion can be compared with random filters of the same size "
                "and no p-value exists; add 'random' to lesion_methods."]
    repeats = max((int(_num(r["n_random"])) for r in diss if math.isfinite(_num(r.get("n_random")))),
                  default=int(config.get("random_repeats", 0)))
    f = headline_fraction(r["fraction"] for r in diss) if diss else None
    family = multiple_testing.family([r for r in diss if abs(_num(r["fraction"]) - f) < 1e-6]) if diss else {}
    k = family.get("n_rankings") or len({r["method"] for r in diss}) or \
        len([m for m in methods if m != "random"]) or 1
    holm = family.get("method") == multiple_testing.HOLM
    n_tests = family["n_tests"] if holm else None
    need = multiple_testing.repeats_needed(k, ALPHA, n_tests)
    if repeats < 2:
        return [f"{repeats} random repeat: the index's null needs at least two random lesions; no p-value for "
                f"the index exists. A corrected p < {ALPHA} over {k} ranking(s) needs random_repeats={need}."]
    floor = multiple_testing.smallest_corrected_p(repeats, k, n_tests)
    formula = f"{n_tests if holm else k}/({repeats}+2) = {floor:.3f}"
    how = (f"Holm's method over {n_tests} tests" if holm else "the max-statistic over the sites" +
           (f", Bonferroni over {k} rankings" if k > 1 else ""))
    if floor >= ALPHA - 1e-12:
        return [f"With {repeats} random repeats no corrected p-value can go below {formula} ({how}), so no site "
                f"can pass p < {ALPHA} however strong its split; a corrected p < {ALPHA} needs at least {need} "
                f"repeats (random_repeats={need})."]
    where = f" at {f:.0%} lesions" if f is not None else ""
    return [f"The verdict's p-values are corrected for every site and ranking{where} ({how}): with {repeats} "
            f"random repeats the smallest a split can reach is {formula}, and a corrected p < {ALPHA} needs "
            f"random_repeats of at least {need}. The tables' p vs random pairs and p_index are uncorrected."]


def build_report(run_dir) -> Path:
    """Write run_dir/report.html from the run's files and return its path. It opens on the answer and its
    caveats; the figures, tables and settings follow."""
    run_dir = Path(run_dir)
    config = read_json(run_dir / "config.json", lambda v: isinstance(v, dict) and isinstance(v.get("tasks", {}), dict),
                       "a run's settings")
    status_path = run_dir / FIGURES_STATUS
    status = read_json(status_path, lambda v: isinstance(v, dict) and all(isinstance(e, dict) for e in v.values()),
                       "the figures stage's status") if status_path.exists() else {}
    tasks = list(config.get("tasks", {}))
    results_path, diss_path, rankings_path = (run_dir / n for n in ("lesion_results.csv", "dissociation.csv",
                                                                     "rankings.json"))
    results = read_csv(results_path, INTACT_COLUMNS) if results_path.exists() else []
    diss = read_csv(diss_path, DISSOCIATION_COLUMNS) if diss_path.exists() else []
    diss = multiple_testing.corrected_rows(diss, results, force=False)  # a sweep made before p_corrected
    rankings = read_json(rankings_path, lambda v: isinstance(v, dict), "rankings by site") \
        if rankings_path.exists() else {}
    readouts = {kind: read_readout(run_dir, kind) for kind in READOUT_DIRS}
    r = Report(run_dir, status)
    r.section("Summary")
    r.raw(summary(config, status, results, diss, rankings, health.read(run_dir), readouts))

    _intact_section(r, config, results)

    r.section("Lesions by depth")
    r.figure("lesion_effects.png", "Chance-corrected drop of each task's accuracy when the most task-important "
             "20% of a site's filters are silenced, per site and ranking method; shading is the range over random "
             "lesions of the same size. A task-specific site hurts the targeted task above the random band and "
             "spares the other.", "lesion effects")

    r.section("Dissociation by depth")
    r.figure("dissociation_by_depth.png", "The double-dissociation index per site (0 = no task split) with its "
             "95% bootstrap interval over test images, beside the range of indices built from pairs of random "
             "lesions (grey).", "dissociation by depth")
    r.raw(_dissociation_table(diss))
    selective = filter_sets.localiser_sentence(filter_sets.localiser_rows(rankings, results))
    masks = filter_sets.mask_sentence(filter_sets.mask_rows(rankings))
    if selective or masks:
        r.section("Localiser and learned masks")
        for text in (selective, masks):
            if text:
                r.what(text)
    probe_rows = probes_report.read_rows(run_dir) if (run_dir / "probes.csv").exists() else []
    if probe_rows:
        r.section("Behavioural probes")
        for text in (probes_report.inversion_sentence(probe_rows), probes_report.transfer_sentence(probe_rows)):
            if text:
                r.what(text)
        r.figure("probes.png", "Each probe across the swept sites: the inversion effect (upright minus upside-down "
                 "accuracy, 95% interval) or the held-out task's probe accuracy, under each task's filters' lesions; "
                 "grey: the random lesions' range; dashed: the intact network.", "probes")
    if readouts["fixed"]:
        r.section("Fixed readouts")
        r.what("The same lesions, each task scored by linear readouts (ridge on standardised features) fitted once "
               "to the intact network's features of its test images in 10 folds, each image read by the readout "
               "fitted on the other nine, never refitted: whether the filters a head needs carry its task for any readout of it, where two heads "
               "of one task cannot differ (fixed_readout/). The summary's verdict asks a site to dissociate here "
               "too.")
        r.raw(_dissociation_table(readouts["fixed"]))
    if readouts["refit"]:
        r.section("Refitted readouts")
        r.what("The same lesions, each task scored by a linear readout (ridge on standardised features) fitted anew "
               "to the lesioned network's features on its training images: what the features still hold for the "
               "task, rather than what its head reads (refit_readout/).")
        r.raw(_dissociation_table(readouts["refit"]))
    if config.get("lesion_epochs"):
        r.section("Dissociation by epoch")
        r.figure("dissociation_by_epoch.png", "The index by depth for each swept epoch (epoch_<N>/ holds each "
                 "epoch's own lesion files): when during training a split appears, and where.",
                 "dissociation by epoch")

    r.section("Training")
    r.figure("training_curves.png", "Accuracy and loss of each head on its own task, per epoch, on training "
             "batches (augmented) and on the validation images.", "training curves")

    _gradcam_section(r, run_dir, tasks)

    _stimuli_section(r, run_dir)

    r.section("Layer-wise decoding")
    r.figure("decoding_by_depth.png", "Cross-validated accuracy of a linear probe reading each task's labels "
             "from each site's spatially pooled activations: where task information becomes linearly "
             "separable, to set beside where lesions dissociate.", "decoding")

    _settings_section(r, config)

    title = f"Dual-task lesion report: {run_dir.name} ({config.get('backbone', '?')})"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>Built {stamp} from the files in {html.escape(str(run_dir))}.</p>" + "".join(r.parts) +
            "</body></html>")
    out = run_dir / "report.html"
    write_text(out, page)
    return out


def read_readout(run_dir: Path, kind: str) -> list | None:
    """The rows of a run's readout sweep's dissociation.csv (kind "fixed": fixed_readout/, "refit":
    refit_readout/), corrected as the sweep's; None when it did not run."""
    folder = Path(run_dir) / READOUT_DIRS[kind]
    if not (folder / "dissociation.csv").exists():
        return None
    results = read_csv(folder / "lesion_results.csv", INTACT_COLUMNS) if (folder / "lesion_results.csv").exists() else []
    return multiple_testing.corrected_rows(read_csv(folder / "dissociation.csv", DISSOCIATION_COLUMNS), results,
                                           force=False)


def _intact_section(r: Report, config: dict, results: list) -> None:
    r.section("Intact accuracy")
    intact = intact_accuracies(results)
    if not intact:
        r.skip("lesion_results.csv is missing: the lesion stage has not run")
    r.what("Each head's test accuracy on its own task before any lesion, with its 95% Wilson interval, and each "
           "task's data.")
    rows = []
    for t, v in config.get("tasks", {}).items():
        row = {"task": t, "classes": v["classes"], "chance": f"{v['chance']:.3f}", "source": v["source"],
               **v["counts"]}
        if t in intact:
            a, n, _ = intact[t]
            row.update({"accuracy": f"{a:.3f}", "95% interval": "{:.3f} to {:.3f}".format(*wilson(a, n))})
        rows.append(row)
    r.raw(_table(rows, ["task", "accuracy", "95% interval", "chance", "classes", "train", "val", "test", "source"]))


def _gradcam_section(r: Report, run_dir: Path, tasks: list) -> None:
    r.section("Where each head looks (Grad-CAM)")
    if not r.failed("Grad-CAM"):
        overlap = run_dir / "gradcam_overlap.csv"
        overlap_rows = read_csv(overlap, ("images", "head_a", "head_b", "mean_iou_top5")) if overlap.exists() else []
        # one set of test images per task, or one set shared by tasks labelling the same images ('a+b')
        for t in list(dict.fromkeys(row["images"] for row in overlap_rows)) or tasks:
            shared = " (the same images for these tasks)" if "+" in t else ""
            r.figure(f"gradcam_{t}_images.png", f"{t.replace('+', ' and ')} test images{shared} and, below them, "
                     f"each head's Grad-CAM map: the regions whose activation raises that head's predicted score.")
        r.figure("gradcam_mean.png", "Each head's mean map over each set of test images, drawn on that set's "
                 "mean image.")
        if overlap_rows and "p_permutation" in overlap_rows[0]:
            r.what("Overlap (intersection over union, IoU) of two heads' top-5% regions on the same image, averaged "
                   "over the images (1 = they attend to the same pixels), with its 95% bootstrap interval over "
                   "images; null_mean is the mean IoU when one head's map of an image is paired with the other "
                   "head's map of another image (random permutations of the images), which keeps each head's own "
                   "spatial prior such as a centre bias, and p_permutation is the one-sided permutation p-value of "
                   "the overlap exceeding that chance pairing.")
        elif overlap_rows:
            r.what("Overlap (intersection over union) of the two heads' top-5% regions on the same images: 1 = "
                   "they attend to the same pixels.")
        if overlap_rows:
            shown = [c for c in OVERLAP_SHOWN if c in overlap_rows[0]]
            r.raw(_table(overlap_rows, shown))
            r.raw(f"<p>{html.escape(overlap_reading(overlap_rows))}</p>")


def _stimuli_section(r: Report, run_dir: Path) -> None:
    r.section("Preferred stimuli")
    if not r.failed("preferred stimuli"):
        stimuli = sorted((run_dir / "figures").glob("stimuli_*.png")) if (run_dir / "figures").exists() else []
        stages = _stimuli_stages(run_dir)  # {figure name: (site, stage)} in depth order, from stimuli.json
        stimuli.sort(key=lambda path: list(stages).index(path.name) if path.name in stages else len(stages))
        for path in stimuli:
            site, stage, _ = stages.get(path.name, (None, None, None))
            where = f"Stage {stage}, {site}: f" if stage else "F"
            r.figure(path.name, f"{where}or the most task-ranked filters of this site: the test images that "
                     "activate each most (labelled with their task and class) and a synthetic image grown by "
                     "gradient ascent from noise.")
        unranked = [f"{stage} ({site})" for site, stage, skipped in stages.values() if skipped and stage]
        if unranked:
            r.what(f"No preferred stimuli at stage(s) {', '.join(unranked)}: none of the stage's sites was lesioned "
                   f"(lesion_layers), so none has a filter ranking.")
        if not stimuli:
            r.skip("no figures/stimuli_*.png: they need rankings.json from the lesion stage and the figures stage")


def _settings_section(r: Report, config: dict) -> None:
    r.section("Settings and provenance")
    r.what("The resolved settings of this run (config.json): backbone, data, training and lesion parameters, "
           "package versions, device, command line and git commit.")
    shown = {k: v for k, v in config.items() if k != "tasks"}
    r.raw("<details><summary>All settings</summary>" +
          _table([{"setting": k, "value": json.dumps(v)} for k, v in shown.items()], ["setting", "value"]) +
          "</details>")


# gradcam_overlap.csv's columns as the report shows them; a run written before the permutation test has sd
# instead of ci_low .. n_permutations, and the report shows what it has
OVERLAP_SHOWN = ("images", "head_a", "head_b", "site", "mean_iou_top5", "ci_low", "ci_high", "sd", "null_mean",
                 "p_permutation", "n_permutations", "n")


def _p_small(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1g}"


def overlap_reading(rows: list) -> str:
    """One sentence reading gradcam_overlap.csv: for each set of images and pair of heads, whether the heads
    attend to the same image-specific regions more than chance pairing of images (p_permutation < ALPHA)."""
    if not rows or "p_permutation" not in rows[0]:
        return ("These overlaps predate the permutation test over images (rerun the figures stage for it), so they "
                "cannot tell heads that attend to the same image-specific regions from heads that share a spatial "
                "prior such as a centre bias.")
    parts = []
    for row in rows:
        iou, low, high = _num(row["mean_iou_top5"]), _num(row.get("ci_low")), _num(row.get("ci_high"))
        null, p = _num(row.get("null_mean")), _num(row["p_permutation"])
        who = f"on {row['images'].replace('+', ' and ')} images the {row['head_a']} and {row['head_b']} heads"
        numbers = (f"IoU {iou:.2f} [{low:.2f}, {high:.2f}] against {null:.2f} under chance pairing, "
                   f"p = {_p_small(p)}" if math.isfinite(p) else "no p-value")
        if p < ALPHA:
            parts.append(f"{who} attend to the same image-specific regions more than chance pairing ({numbers})")
        else:
            parts.append(f"{who} are not shown to attend to the same image-specific regions more than chance "
                         f"pairing ({numbers})")
    text = "; ".join(parts)
    return f"{text[0].upper()}{text[1:]} (one-sided permutation test over images, p < {ALPHA})."


def _stimuli_stages(run_dir: Path) -> dict:
    """{figure name: (site, stage name, skipped)} of stimuli.json in its (depth) order; the stage is None for a
    run written before stimuli.json named stages; {} without the file."""
    path = run_dir / "stimuli.json"
    summary = read_json(path, lambda v: isinstance(v, dict), "preferred stimuli by site") if path.exists() else {}
    return {stimuli_file(site): (site, entry.get("stage"), "skipped" in entry)
            for site, entry in summary.items() if isinstance(entry, dict)}


def _dissociation_table(rows: list) -> str:
    """The dissociation table at the headline fraction, with the tasks' names in its columns."""
    if not rows:
        return ""
    f = headline_fraction(r["fraction"] for r in rows)
    keep = [x for x in rows if abs(_num(x["fraction"]) - f) < 1e-6]
    a, b = keep[0]["task_a"], keep[0]["task_b"]
    names = {"drop_a_by_a": f"drop_{a}_by_{a}", "drop_a_by_b": f"drop_{a}_by_{b}",
             "drop_b_by_b": f"drop_{b}_by_{b}", "drop_b_by_a": f"drop_{b}_by_{a}",
             "p_a_by_a": f"p_{a}_by_{a}", "p_b_by_b": f"p_{b}_by_{b}"}
    table = []
    for x in keep:
        null = (f"{_num(x.get('null_low')):.3f} to {_num(x.get('null_high')):.3f}"
                if math.isfinite(_num(x.get("null_low"))) else "n/a")
        row = {"site": x["layer"], "depth": x["depth"], "ranking": x["method"], "index [95% CI]": _ci(x),
               "random pairs": null, "p_index": _p(x.get("p_index")), "p_corrected": _p(x.get("p_corrected"))}
        row.update({new: _p(x[old]) for old, new in names.items()})  # drops and p-values: 3 decimals or n/a
        table.append(row)
    text = (f"<p class='what'>At {f:.0%} lesions. drop_X_by_Y: the chance-corrected drop of task X when the "
            f"filters ranked most important for task Y are silenced. p_index: the share of random-lesion pairs "
            f"whose index is at least as large: the other pairs of a ring of the two targeted and the R random lesions "
            f"(one-sided; the smallest is 1/(R+2)); "
            f"p_corrected: p_index corrected for every site and ranking at this fraction "
            f"({_correction_how(keep)}); p_X_by_X: the share of random lesions that cost the targeted task at "
            f"least as much (uncorrected; the smallest is 1/(R+1)).</p>")
    return text + _table(table, ["site", "depth", "ranking", "index [95% CI]", "random pairs", "p_index",
                                 "p_corrected", *names.values()], wide=True)


def _correction_how(rows: list) -> str:
    text = correction_text(multiple_testing.family(rows))
    return text or "none: no p-value against random lesions"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python report.py RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    if not (run_dir / "config.json").exists():
        print(f"error: {run_dir} is not a run folder (no config.json); expected a folder written by a backbone "
              f"script, e.g. runs/vgg16", file=sys.stderr)
        return 2
    with exit_on_damaged_files(f"cannot build the report from {run_dir}"):
        print(f"wrote {build_report(run_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
