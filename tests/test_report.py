"""The report opens on the answer, and its caveats come from the run's own numbers."""
import html
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, reproducible_rankings
from helpers import make_run

from dualtask.core import common
from dualtask.core.common import write_csv
from dualtask.lesion import dissociation as dissociation_mod
from dualtask.report import build as report


def first_screen(path):
    page = report.build_report(path).read_text()
    assert re.search(r"<h2>([^<]*)</h2>", page).group(1) == "Summary"  # the answer comes before all else
    summary = page[page.index("<h2>Summary</h2>"):page.index("<h2>Intact accuracy</h2>")]
    return html.unescape(re.sub(r"<[^>]+>", " ", summary)), page


def test_too_few_random_repeats_and_disagreeing_rankings(tmp_path):
    order = list(range(10))
    rankings = {"trunk.s0": {"activation": {"face": {"order": order}}, "loss": {"face": {"order": order[::-1]}}}}
    small = ([0.01, 0.02, 0.0, 0.03, 0.01], [0.02, 0.0, 0.01, 0.01, 0.03])
    run = make_run(tmp_path / "run", [
        ("trunk.s0", 0, "activation", 0.3, 0.1, 0.5, 1 / 6), ("trunk.s0", 0, "loss", 0.0, -0.1, 0.1, 0.5),
        ("trunk.s2", 2, "activation", 0.6, 0.3, 0.9, 1 / 6), ("trunk.s2", 2, "loss", 0.7, 0.4, 1.0, 1 / 6)],
        rankings=rankings, random_drops={"trunk.s0": small, "trunk.s2": small})
    text, page = first_screen(run)
    # only the loss ranking decides: its smallest corrected p is 1/(R+2); below 0.05 it needs R = 19
    assert "Task-specialised filters: not shown: with 5 random orders no corrected p can go below 0.143, so no " \
           "site could pass p < 0.05." in text
    assert "no corrected p-value can go below 1/(5+2) = 0.143 (the max-statistic over the sites), so no site can " \
           "pass p < 0.05 however strong its split; random_repeats=19 or more can" in text
    assert "activation (description)" in text and "no (within random lesions)" in text  # the table's rows
    notes = html.unescape(re.sub(r"<[^>]+>", " ", page[page.index('<h2 id="notes">'):]))
    # activation and loss disagree at trunk.s0 only; their top-20% face filters (2 of 10) share none
    said = text + notes
    assert "disagree at 1 site(s)" in said and "share 0 of 2" in said and "about 0.4" in said
    assert "near chance" not in text
    table = page[page.index("<h2>Dissociation by depth</h2>"):]
    assert "drop_<wbr>face_<wbr>by_<wbr>object" in table and "drop_a_by_b" not in table.replace("<wbr>", "")


def test_enough_repeats_gives_a_verdict_and_counts_the_tests(tmp_path):
    noise = np.random.default_rng(0).normal(0, 0.02, (3, 2, 20))  # small random drops: every null index near 0
    drops = {site: tuple(noise[k]) for k, site in enumerate(("trunk.s0", "trunk.s5", "trunk.s9"))}
    rows = [("trunk.s0", 0, "loss", 0.02, -0.1, 0.12, 0.6), ("trunk.s5", 5, "loss", 0.8, 0.5, 1.1, 1 / 22),
            ("trunk.s9", 9, "loss", 0.9, 0.6, 1.2, 1 / 22)]
    rankings = reproducible_rankings(["trunk.s0", "trunk.s5", "trunk.s9"])
    run = make_run(tmp_path / "run", rows, repeats=20, random_drops=drops, rankings=rankings)
    text, page = first_screen(run)
    # trunk.s5 and s9 beat the largest null of every ring position over the three sites: corrected p = 1/22
    assert "Task-specialised filters: yes, at 2 of 3 sites (trunk.s5, trunk.s9), loss ranking, 20% lesions, through " \
           "the heads; corrected p = 0.045 at each, the smallest 20 random orders allow." in text
    assert "can go below" not in text and "Only one lesion fraction was swept" in text
    notes = html.unescape(re.sub(r"<[^>]+>", " ", page[page.index('<h2 id="notes">'):]))
    assert "corrected for 3 tests over 3 sites and 1 ranking by a max-statistic test over the 20 random orders" in notes
    assert "the smallest a split can reach is 1/(20+2) = 0.045" in text + notes and "at least 19." in text + notes
    table = page[page.index("<h2>Dissociation by depth</h2>"):]
    assert "p_<wbr>corrected" in table and "0.045" in table
    # without the random drops (lesion_results.csv lacks them) the same p-values are corrected by Holm: 3/22
    run = make_run(tmp_path / "holm", rows, repeats=20, rankings=rankings)
    text, page = first_screen(run)
    assert "Task-specialised filters: not shown: with 20 random orders no corrected p can go below 0.136" in text
    notes = html.unescape(re.sub(r"<[^>]+>", " ", page[page.index('<h2 id="notes">'):]))
    assert "by Holm's method" in notes and "lacks the random lesions' drops" in notes
    assert "2 site x ranking pair(s) pass p < 0.05 against the random-lesion pairs alone but not after" in text + notes
    assert "below 3/(20+2) = 0.136 (Holm's method over 3 tests)" in text and "random_repeats=59 or more" in text


def test_greedy_sets_past_the_greedy_stop_are_a_caveat(tmp_path):
    run = make_run(tmp_path / "run", [("trunk.s2", 2, "greedy", 0.3, 0.1, 0.5, 0.01),
                                      ("trunk.s4", 4, "greedy", 0.2, 0.05, 0.4, 0.01)])
    rows = list(common.read_csv(run / "dissociation.csv"))
    rows[1]["beyond_greedy_stop"] = 1  # trunk.s4's greedy steps stopped short of 20%
    write_csv(run / "dissociation.csv", dissociation_mod.DISSOCIATION_COLUMNS, rows)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(dict(config, greedy_stop=0.15)))
    (text,) = [html.unescape(c) for c in re.findall(r"<li>([^<]*)</li>", first_screen(run)[1])
               if "reach past its stop" in c]
    assert "reach past its stop (greedy_stop 0.15) at 1 site(s), trunk.s4" in text and "trunk.s2" not in text
    rows[1]["beyond_greedy_stop"] = 0
    write_csv(run / "dissociation.csv", dissociation_mod.DISSOCIATION_COLUMNS, rows)
    assert "reach past its stop" not in first_screen(run)[1]


def test_a_head_near_chance_is_named(tmp_path):
    run = make_run(tmp_path / "run", [("trunk.s0", 0, "loss", 0.5, 0.2, 0.8, 0.04)],
                   intact=(("face", 0.9, 0.1), ("object", 0.12, 0.1)), repeats=30)
    text, page = first_screen(run)
    assert "object head is near chance: intact test accuracy 0.120" in text and "face head is near" not in text
    first = html.unescape(re.findall(r"<li>([^<]*)</li>", page)[0])  # the first caveat: it could change everything
    assert first.startswith("The object head is near chance")


def test_no_lesions_says_so(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"backbone": "resnet50", "seed": 1, "tasks": {}}))
    text, _ = first_screen(run)
    assert "No lesion results yet" in text


def test_random_pair_null_has_one_draw_per_order_and_one_more():
    null = dissociation_mod.random_pair_indices([0.1, 0.2, 0.3], [0.3, 0.1, 0.0], (0.6, 0.0), (0.0, 0.5))
    # the ring face filters, object filters, order 0, 1, 2: each pair's first lesion as the face filters
    assert null.tolist() == pytest.approx([0.0 - 0.1 + 0.3 - 0.5, 0.1 - 0.2 + 0.1 - 0.3, 0.2 - 0.3 + 0.0 - 0.1,
                                           0.3 - 0.6 + 0.0 - 0.0])
    assert len(dissociation_mod.random_pair_indices([0.1], [0.2], (0.6, 0.0), (0.0, 0.5))) == 0


def test_report_names_the_rankings_that_are_not_reproducible():
    rankings = {"trunk.layer1.0": {"reliability": {"loss": {
        "face": {"top10": 0.2, "top20": 0.3, "spearman": 0.1, "filters": 100},
        "object": {"top10": 0.9, "top20": 0.8, "spearman": 0.9, "filters": 100}}}},
        "trunk.layer2.0": {"reliability": {"loss": {"face": {"top10": 1.0, "top20": 1.0, "spearman": 1.0,
                                                            "filters": 100}}}}}
    # 6 of 20 shared where random sets share 4 on average: p 0.17, no more than chance
    assert report.unreproducible(rankings, 0.2) == ["trunk.layer1.0 loss face: 30% shared (chance 20%), p 0.17"]
    assert len(report.unreproducible(rankings, 0.1)) == 1 and report.unreproducible(rankings, 0.3) == []
    assert report.unreproducible({"s": {"loss": {}}}, 0.2) == []


def test_wilson_is_scipys_interval():
    from scipy.special import ndtr
    from scipy.stats import binomtest

    for k, n in [(0, 1), (0, 3), (3, 3), (8, 9), (17, 40), (123, 1000), (9999, 10000)]:
        test = binomtest(k, n)
        ci = test.proportion_ci(confidence_level=2 * ndtr(1.96) - 1, method="wilson")  # z = 1.96, the default
        assert report.wilson(k / n, n) == pytest.approx((ci.low, ci.high), rel=1e-12, abs=1e-15)
        ci95 = test.proportion_ci(method="wilson")
        assert report.wilson(k / n, n) == pytest.approx((ci95.low, ci95.high), abs=1e-5)
        # an accuracy as lesion_results.csv writes it (4 decimals) gives the same interval
        assert report.wilson(float(f"{k / n:.4f}"), n) == report.wilson(k / n, n)
    assert all(np.isnan(report.wilson(0.5, 0))) and all(np.isnan(report.wilson(float("nan"), 10)))


def test_the_report_command_imports_neither_torch_nor_an_image_library(tmp_path):
    """`python -m dualtask.report RUN` builds report.html from the run's files alone (import-linter's forbidden
    contract checks the imports; this checks the command as run)."""
    run = make_run(tmp_path / "run", [("trunk.layer3.0", 8, "loss", 0.30, 0.20, 0.40, 0.01)])
    code = ("import runpy, sys\nsys.argv = ['dualtask.report', sys.argv[1]]\ntry:\n"
            "    runpy.run_module('dualtask.report', run_name='__main__')\nexcept SystemExit as e:\n"
            "    status = e.code\nprint('heavy:', sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'torchvision', 'cv2', 'sklearn')), 'status:', status)")
    p = subprocess.run([sys.executable, "-c", code, str(run)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.stdout.strip().splitlines()[-1] == "heavy: [] status: 0", p.stdout + p.stderr
    assert (run / "report.html").exists()
