"""The verdict's rules (verdict.py) on constructed inputs: only importance rankings decide, a split must reproduce
and hold at the neighbouring fractions, and a split that image statistics may explain is named for what it is."""
import html
import re

import pytest
from conftest import reproducible_rankings

from dualtask.experiment import aggregate
from dualtask.report import build as report
from dualtask.report import first_screen
from dualtask.stats import verdict as V

SITES = {"trunk.relu": 0.22, "trunk.layer3.0": 1.0, "trunk.layer4.2": 1.0}  # receptive field shares
DEPTH = {"trunk.relu": 0, "trunk.layer3.0": 8, "trunk.layer4.2": 16}
PASS, FAIL = (0.6, 0.3, 0.9, 0.024), (0.05, -0.1, 0.2, 0.5)  # (index, ci_low, ci_high, p_corrected)


def row(site, method, numbers, fraction=0.2):
    """A dissociation.csv row as a finished sweep writes it (corrected in its family, on the closed ring)."""
    index, low, high, p = numbers
    family = "verdict" if method in V.IMPORTANCE else "description"
    return {"layer": site, "depth": DEPTH[site], "method": method, "fraction": f"{fraction:.4f}", "task_a": "face",
            "task_b": "object", "index": f"{index:.4f}", "ci_low": f"{low:.4f}", "ci_high": f"{high:.4f}",
            "p_index": f"{p:.4f}", "p_corrected": f"{p:.4f}", "correction": "max-statistic", "family": family,
            "index_null": "ring", "n_random": 40}


def judge(rows, rankings=None, config=None, **kw):
    config = {"lesion_fractions": [0.0, 0.1, 0.2, 0.3], "lesion_methods": ["activation", "loss", "random"],
              **(config or {})}
    return V.judge_run(rows, [], reproducible_rankings(SITES) if rankings is None else rankings, config, **kw)


def everywhere(site, method, numbers):
    return [row(site, method, numbers, f) for f in (0.1, 0.2, 0.3)]


def counts(j):
    return {(f.site, f.ranking): f.counts for f in j.findings}


def test_a_late_reproducible_stable_split_of_an_importance_ranking_is_yes():
    j = judge(everywhere("trunk.layer4.2", "loss", PASS) + everywhere("trunk.layer3.0", "loss", FAIL))
    assert j.answer is V.Answer.YES and counts(j)[("trunk.layer4.2", "loss")] is V.Counts.SPLIT
    assert counts(j)[("trunk.layer3.0", "loss")] is V.Counts.NO and j.neighbours == [0.1, 0.3]
    said = first_screen.sentence(j)
    assert said.startswith("Task-specialised filters: yes, at 1 of 2 sites (trunk.layer4.2), loss ranking, 20% "
                           "lesions") and len(said.split()) <= first_screen.MAX_WORDS


def test_a_selectivity_only_split_is_description_and_never_a_yes():
    rows = everywhere("trunk.layer4.2", "activation", PASS) + everywhere("trunk.layer4.2", "loss", FAIL)
    j = judge(rows)
    assert j.answer is V.Answer.NOT_SHOWN
    assert counts(j) == {("trunk.layer4.2", "activation"): V.Counts.DESCRIPTION,
                         ("trunk.layer4.2", "loss"): V.Counts.NO}
    caveats = [c.text for c in first_screen.rule_caveats(j, "")]
    assert any(c.startswith("Selectivity is description, not the test: the activation ranking dissociates at "
                            "trunk.layer4.2; there the loss ranking, which decides, finds no split that counts")
               for c in caveats)
    # a run of selectivity rankings alone says it has nothing to decide with
    alone = judge(everywhere("trunk.layer4.2", "activation", PASS), config={"lesion_methods": ["activation"]})
    assert alone.answer is V.Answer.NOT_SHOWN and "no ranking here measures what a task needs" in \
        first_screen.sentence(alone)
    # widened on purpose: activation decides, and the report says so
    wide = judge(rows, config={"verdict_rankings": ["activation", "loss"]})
    assert wide.answer is V.Answer.YES and counts(wide)[("trunk.layer4.2", "activation")] is V.Counts.SPLIT
    assert any("widened on purpose" in c.text and c.decisive for c in first_screen.rule_caveats(wide, ""))


def test_an_unreproducible_ranking_does_not_count():
    rows = everywhere("trunk.layer4.2", "loss", PASS)
    shaky = reproducible_rankings(SITES, overlap=0.22)  # top 20% of 512 filters: random sets share 20%
    j = judge(rows, shaky)
    assert j.answer is V.Answer.NOT_SHOWN and counts(j)[("trunk.layer4.2", "loss")] is V.Counts.NOT_REPRODUCIBLE
    (caveat,) = [c for c in first_screen.rule_caveats(j, "") if c.text.startswith("Not reproducible")]
    assert "trunk.layer4.2 (loss, 22% shared (chance 20%), p 0.37)" in caveat.text and "raise rank_images" in \
        caveat.text and caveat.decisive
    # the bar is a test against random sets: a third of a wide site's top set (a branched network's 2,048-filter
    # copy ranked on 8 images) is far beyond chance and counts; the same share of a 20-filter site does not
    wide = reproducible_rankings(SITES, overlap=0.32, filters=2048)
    assert judge(rows, wide).answer is V.Answer.YES and judge(rows, wide).findings[0].reliable.p < 1e-6
    assert counts(judge(rows, reproducible_rankings(SITES, overlap=0.32, filters=20)))[
        ("trunk.layer4.2", "loss")] is V.Counts.NOT_REPRODUCIBLE
    # one task's ranking reproducing is not enough: both tasks must beat random sets
    half = reproducible_rankings(SITES)
    half["trunk.layer4.2"]["reliability"]["loss"]["object"]["top20"] = 0.2
    assert counts(judge(rows, half))[("trunk.layer4.2", "loss")] is V.Counts.NOT_REPRODUCIBLE
    half["trunk.layer4.2"]["reliability"]["loss"]["object"]["top20"] = 0.3  # 31 of 102 shared: p 0.003
    assert judge(rows, half).answer is V.Answer.YES
    # no filter count recorded (an older sweep): the order's length gives it
    old = reproducible_rankings(SITES, overlap=0.3)
    for e in old.values():
        for m, per in e["reliability"].items():
            for t, rel in per.items():
                del rel["filters"]
                e.setdefault(m, {})[t] = {"order": list(range(512))}
    assert judge(rows, old).answer is V.Answer.YES
    # not measured (ranking_reliability=False): it cannot count either
    unmeasured = {s: {"receptive_field": e["receptive_field"]} for s, e in reproducible_rankings(SITES).items()}
    j = judge(rows, unmeasured)
    assert j.answer is V.Answer.NOT_SHOWN and counts(j)[("trunk.layer4.2", "loss")] is V.Counts.UNMEASURED


def test_the_reproducibility_p_is_the_chance_that_random_top_sets_overlap_as_much():
    import numpy as np

    from dualtask.lesion.rankings import top_overlap

    n, fraction = 40, 0.2
    rng = np.random.default_rng(0)
    null = np.array([top_overlap(rng.permutation(n), rng.permutation(n), fraction) for _ in range(20000)])
    assert null.mean() == pytest.approx(V.overlap_p(0.0, n, fraction)[1], abs=0.01)  # chance: k / n
    for overlap in (0.125, 0.25, 0.375, 0.5):  # 1 to 4 of the 8 filters shared
        p, _ = V.overlap_p(overlap, n, fraction)
        assert p == pytest.approx((null >= overlap - 1e-9).mean(), abs=0.01)
    # pooled over an experiment's runs by their shared counts: runs at chance stay at chance, runs beyond it are
    # further beyond, and one run far beyond chance does not carry four at chance (a mean of 21% against 20%)
    def run(overlap, n=512):
        return V.task_agreement({"s": {"reliability": {"loss": {"face": {"top20": overlap, "filters": n}}}}}, "s",
                                "loss", 0.2, "face")

    assert V.pooled([run(0.2)] * 3).p > 0.3 and V.pooled([run(0.3)] * 3).p < 1e-5 < run(0.3).p
    mixed = V.pooled([run(0.35)] + [run(0.18)] * 4)
    assert run(0.35).p < 1e-3 and mixed.p > 0.1 and mixed.overlap == pytest.approx(0.214)


def test_a_split_at_one_fraction_only_does_not_count():
    rows = [row("trunk.layer4.2", "loss", PASS, 0.2), row("trunk.layer4.2", "loss", PASS, 0.3),
            row("trunk.layer4.2", "loss", FAIL, 0.1)]
    j = judge(rows)
    assert j.answer is V.Answer.NOT_SHOWN and counts(j)[("trunk.layer4.2", "loss")] is V.Counts.ONE_FRACTION
    assert j.findings[0].holds == {0.1: False, 0.3: True}
    (caveat,) = [c for c in first_screen.rule_caveats(j, "") if c.text.startswith("One lesion size only")]
    assert "loss trunk.layer4.2 (fails at 10%)" in caveat.text
    # through the fixed readouts too: a neighbour where the readouts' index falls below 0 fails it
    fixed = everywhere("trunk.layer4.2", "loss", PASS)
    fixed[2] = row("trunk.layer4.2", "loss", (-0.05, -0.2, 0.1, 0.7), 0.3)
    j = judge(everywhere("trunk.layer4.2", "loss", PASS), fixed=fixed)
    assert counts(j)[("trunk.layer4.2", "loss")] is V.Counts.ONE_FRACTION and j.findings[0].holds == {
        0.1: True, 0.3: False}
    # one reading's interval above 0 is enough where the other's index stays above 0 (its interval reaching 0)
    fixed[2] = row("trunk.layer4.2", "loss", FAIL, 0.3)
    j = judge(everywhere("trunk.layer4.2", "loss", PASS), fixed=fixed)
    assert j.answer is V.Answer.YES and j.findings[0].holds == {0.1: True, 0.3: True}
    # ... but not where no reading's interval is above 0 there
    j = judge([row("trunk.layer4.2", "loss", PASS, f) for f in (0.1, 0.2)] + [row("trunk.layer4.2", "loss", FAIL, 0.3)],
              fixed=fixed)
    assert counts(j)[("trunk.layer4.2", "loss")] is V.Counts.ONE_FRACTION
    # one fraction swept: nothing to hold at, and a yes says that was not tested
    j = judge([row("trunk.layer4.2", "loss", PASS)], config={"lesion_fractions": [0.0, 0.2]})
    assert j.answer is V.Answer.YES and j.neighbours == []
    assert any(c.text.startswith("Only one lesion fraction was swept") and c.decisive
               for c in first_screen.rule_caveats(j, ""))


def test_an_early_split_is_image_statistics_unless_a_resolution_matched_control_rules_that_out():
    rows = everywhere("trunk.relu", "loss", PASS) + everywhere("trunk.layer4.2", "loss", FAIL)
    j = judge(rows)
    assert j.answer is V.Answer.IMAGE_STATISTICS and counts(j)[("trunk.relu", "loss")] is V.Counts.IMAGE_STATISTICS
    said = first_screen.sentence(j)
    assert said.startswith("Task-specialised filters: split by image statistics, not shown to be by task: face and "
                           "object filters dissociate only at trunk.relu (early site, no resolution-matched "
                           "control)") and len(said.split()) <= first_screen.MAX_WORDS
    (caveat,) = [c for c in first_screen.rule_caveats(j, "X decides") if c.text.startswith("Split by image")]
    assert "trunk.relu: its receptive field spans 22% of the image's side; early: under 50%" in caveat.text
    assert "X decides" in caveat.text
    # a resolution-matched network whose index at the site stays below the real interval: the split is the task's
    weak = [row("trunk.relu", "loss", (0.1, -0.05, 0.25, 0.6)), row("trunk.layer4.2", "loss", FAIL)]
    j = judge(rows, control=weak)
    assert j.answer is V.Answer.YES and counts(j)[("trunk.relu", "loss")] is V.Counts.SPLIT
    # one that dissociates as much (its index reaches the real one's interval): image statistics, at any depth
    strong = [row("trunk.relu", "loss", (0.5, 0.2, 0.8, 0.03)), row("trunk.layer4.2", "loss", PASS)]
    j = judge(everywhere("trunk.relu", "loss", PASS) + everywhere("trunk.layer4.2", "loss", PASS), control=strong)
    assert j.answer is V.Answer.IMAGE_STATISTICS and set(counts(j).values()) == {V.Counts.IMAGE_STATISTICS}
    assert "where a resolution-matched network splits as much" in first_screen.sentence(j)
    # receptive fields not recorded (an older sweep): only the network's first site is early
    old = {s: {"reliability": e["reliability"]} for s, e in reproducible_rankings(SITES).items()}
    j = judge(everywhere("trunk.relu", "loss", PASS) + everywhere("trunk.layer3.0", "loss", PASS), old)
    assert counts(j) == {("trunk.relu", "loss"): V.Counts.IMAGE_STATISTICS,
                         ("trunk.layer3.0", "loss"): V.Counts.SPLIT} and not j.rf_known


def test_the_heads_alone_do_not_make_a_split_where_the_fixed_readouts_ran():
    rows = everywhere("trunk.layer4.2", "loss", PASS)
    j = judge(rows, fixed=everywhere("trunk.layer4.2", "loss", FAIL))
    assert j.answer is V.Answer.NOT_SHOWN and counts(j)[("trunk.layer4.2", "loss")] is V.Counts.HEADS_ONLY
    assert judge(rows, fixed=everywhere("trunk.layer4.2", "loss", PASS)).answer is V.Answer.YES


@pytest.mark.parametrize("answer", ["yes", "image", "none", "floor"])
def test_the_sentence_stays_within_forty_words_with_long_names(answer):
    long = {f"branch:trunk.layer{k}.very_long_module_name_{k}": 1.0 for k in range(8)}
    rankings = reproducible_rankings({**long, "trunk.relu": 0.1}, methods=("loss", "greedy", "taylor", "mask"))
    numbers = {"yes": PASS, "image": FAIL, "none": FAIL, "floor": FAIL}[answer]
    rows = [dict(r, depth=k + 1) for k, s in enumerate(long) for m in ("loss", "greedy", "taylor", "mask")
            for r in [row("trunk.layer4.2", m, numbers, f) for f in (0.1, 0.2, 0.3)] for r in [dict(r, layer=s)]]
    rows += [dict(r, depth=0) for r in everywhere("trunk.relu", "loss", PASS if answer == "image" else FAIL)]
    # four deciding rankings: the floor 4/(R+2) is below 0.05 from R = 79 on
    rows = [dict(r, n_random=5 if answer == "floor" else 100) for r in rows]
    j = V.judge_run(rows, [], rankings, {"lesion_fractions": [0.1, 0.2, 0.3]})
    said = first_screen.sentence(j)
    assert len(said.split()) <= first_screen.MAX_WORDS, (len(said.split()), said)
    assert said.startswith("Task-specialised filters: " + {"yes": "yes", "image": "split by image statistics",
                                                          "none": "not shown.", "floor": "not shown: with"}[answer])


def test_the_report_opens_on_the_sentence_then_a_table_then_three_caveats(tmp_path):
    import json

    from dualtask.core.common import write_csv
    from dualtask.lesion.dissociation import DISSOCIATION_COLUMNS, LESION_COLUMNS

    run = tmp_path / "run"
    run.mkdir()
    config = {"backbone": "resnet50", "seed": 0, "lesion_methods": ["activation", "loss", "random"],
              "random_repeats": 40, "lesion_fractions": [0.0, 0.1, 0.2, 0.3],
              "tasks": {t: {"classes": 10, "chance": 0.1, "source": "demo",
                            "counts": {"train": 80, "val": 20, "test": 200}} for t in ("face", "object")}}
    (run / "config.json").write_text(json.dumps(config))
    intact = [{"layer": "trunk.relu", "eval_task": t, "intact_accuracy": a, "n_images": 200, "chance": 0.1,
               "read_by": "heads"} for t, a in (("face", 0.88), ("object", 0.57))]
    write_csv(run / "lesion_results.csv", LESION_COLUMNS, intact)
    shaky = reproducible_rankings(SITES)
    shaky["trunk.layer3.0"]["reliability"]["loss"]["object"]["top20"] = 0.22
    (run / "rankings.json").write_text(json.dumps(shaky))
    rows = (everywhere("trunk.relu", "loss", PASS) + everywhere("trunk.layer3.0", "loss", PASS) +
            everywhere("trunk.layer3.0", "activation", PASS) + everywhere("trunk.layer4.2", "loss", FAIL) +
            everywhere("trunk.layer4.2", "activation", FAIL))
    write_csv(run / "dissociation.csv", DISSOCIATION_COLUMNS, rows)
    fixed = run / "fixed_readout"
    fixed.mkdir()
    write_csv(fixed / "lesion_results.csv", LESION_COLUMNS, [dict(r, intact_accuracy=0.8, read_by="fixed readouts")
                                                             for r in intact])
    write_csv(fixed / "dissociation.csv", DISSOCIATION_COLUMNS, rows)
    page = report.build_report(run).read_text()
    screen = page[page.index("<h2>Summary</h2>"):page.index("<h2>Intact accuracy</h2>")]
    text = html.unescape(re.sub(r"<[^>]+>", " ", screen))
    verdict = re.search(r'<p class="verdict">([^<]*)</p>', screen).group(1)
    assert html.unescape(verdict).startswith("Task-specialised filters: split by image statistics, not shown to be "
                                             "by task") and len(verdict.split()) <= 40
    table = screen[screen.index("<table>"):screen.index("</table>")]
    for column in ("site", "ranking", "index [95% CI]", "p corrected", "reliability", "through heads",
                   "through fixed readouts", "counts as"):
        assert f"<th>{html.escape(column)}" in table.replace("<wbr>", "")
    assert "not reproducible" in table and "description (selectivity)" in table and "image statistics" in table
    caveats = re.findall(r"<li>([^<]*)</li>", screen)
    assert len(caveats) == 3
    assert [c.split(":")[0] for c in map(html.unescape, caveats)] == [
        "Split by image statistics, not shown to be by task", "Not reproducible",
        "Selectivity is description, not the test"]
    assert "Intact test accuracy through the heads: face 0.880 (chance 0.100); object 0.570 (chance 0.100); through " \
           "fixed readouts: face 0.800" in text
    notes = page[page.index('<h2 id="notes">'):]
    assert 'href="#notes"' in screen and "How the verdict is reached" in notes and "One network" in notes


def test_the_experiment_verdict_follows_the_same_rules():
    def summary(layer, method, fraction="0.2000", ci_low="0.5", p_res="0.001"):
        return {"role": "real", "layer": layer, "depth": DEPTH[layer], "method": method, "fraction": fraction,
                "task_a": "face", "task_b": "object", "index": "1.0", "ci_low": ci_low, "ci_high": "1.5",
                "p_random": "0.001", "p_vs_pseudo_task": "0.001", "p_vs_same_task": "0.001",
                "p_vs_resolution_matched": p_res}

    roles = {"real", "pseudo_task", "same_task", "resolution_matched"}
    reliable = {(s, m): V.Agreement(0.8, 1e-9, 0.2) for s in SITES for m in ("loss", "activation")}
    rows = [summary(s, m, f) for s in ("trunk.relu", "trunk.layer4.2") for m in ("loss", "activation")
            for f in ("0.1000", "0.2000", "0.3000")]
    j, _ = aggregate.judge(rows, roles, 40, reliability=reliable, rf=SITES)
    assert j.answer is V.Answer.YES and counts(j) == {
        ("trunk.relu", "loss"): V.Counts.SPLIT, ("trunk.layer4.2", "loss"): V.Counts.SPLIT,
        ("trunk.relu", "activation"): V.Counts.DESCRIPTION, ("trunk.layer4.2", "activation"): V.Counts.DESCRIPTION}
    answer, licence, caveats, passing = aggregate.verdict(rows, roles, 3, 40, reliability=reliable, rf=SITES)
    assert answer.startswith("Task-specialised filters: yes, at 2 of 2 sites (trunk.relu, trunk.layer4.2), loss "
                             "ranking, 20% lesions, across 3 seeds") and len(answer.split()) <= 40
    assert len(passing) == 2
    # the resolution-matched network splits as much at the stem: image statistics there, at any depth
    as_much = [dict(r, p_vs_resolution_matched="0.4") if r["layer"] == "trunk.relu" else r for r in rows]
    j, _ = aggregate.judge(as_much, roles, 40, reliability=reliable, rf=SITES)
    assert counts(j)[("trunk.relu", "loss")] is V.Counts.IMAGE_STATISTICS and j.answer is V.Answer.YES
    # without that control the early site is image statistics, the late one a split
    j, _ = aggregate.judge(rows, roles - {"resolution_matched"}, 40, reliability=reliable, rf=SITES)
    assert counts(j)[("trunk.relu", "loss")] is V.Counts.IMAGE_STATISTICS
    assert counts(j)[("trunk.layer4.2", "loss")] is V.Counts.SPLIT
    # no reliability measured: nothing counts; a neighbouring fraction failing: nothing counts there
    j, _ = aggregate.judge(rows, roles, 40, rf=SITES)
    assert j.answer is V.Answer.NOT_SHOWN and counts(j)[("trunk.layer4.2", "loss")] is V.Counts.UNMEASURED
    shaky = [dict(r, ci_low="-0.1") if r["fraction"] == "0.1000" and r["layer"] == "trunk.layer4.2" else r
             for r in rows]
    j, _ = aggregate.judge(shaky, roles, 40, reliability=reliable, rf=SITES)
    assert counts(j)[("trunk.layer4.2", "loss")] is V.Counts.ONE_FRACTION
