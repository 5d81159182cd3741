"""The report opens on the answer, and its caveats come from the run's own numbers."""
import html
import json
import re

import pytest

import lesion_utils as L
import report
from common import write_csv


def make_run(path, dissociation, intact=(("face", 0.8, 0.1), ("object", 0.7, 0.1)), repeats=5, rankings=None):
    """A run folder with the files the report reads: config.json, lesion_results.csv, dissociation.csv."""
    path.mkdir()
    tasks = {t: {"classes": 10, "chance": c, "source": "demo", "counts": {"train": 80, "val": 20, "test": 200}}
             for t, _, c in intact}
    config = {"backbone": "vgg16", "seed": 0, "lesion_methods": ["activation", "loss", "random"],
              "random_repeats": repeats, "tasks": tasks}
    (path / "config.json").write_text(json.dumps(config))
    write_csv(path / "lesion_results.csv", L.LESION_COLUMNS,
              [{"eval_task": t, "intact_accuracy": a, "n_images": 200, "chance": c} for t, a, c in intact])
    rows = []
    for layer, depth, method, index, low, high, p in dissociation:
        rows.append({"layer": layer, "depth": depth, "method": method, "fraction": "0.2000", "task_a": "face",
                     "task_b": "object", "index": index, "ci_low": low, "ci_high": high, "p_index": p,
                     "drop_a_by_a": 0.5, "drop_a_by_b": 0.1, "drop_b_by_b": 0.4, "drop_b_by_a": 0.05,
                     "p_a_by_a": p, "p_b_by_b": p, "n_random": repeats, "null_low": -0.1, "null_high": 0.1})
    write_csv(path / "dissociation.csv", L.DISSOCIATION_COLUMNS, rows)
    if rankings:
        (path / "rankings.json").write_text(json.dumps(rankings))
    return path


def first_screen(path):
    page = report.build_report(path).read_text()
    assert re.search(r"<h2>([^<]*)</h2>", page).group(1) == "Summary"  # the answer comes before all else
    summary = page[page.index("<h2>Summary</h2>"):page.index("<h2>Intact accuracy</h2>")]
    return html.unescape(re.sub(r"<[^>]+>", " ", summary)), page


def test_too_few_random_repeats_early_split_and_disagreeing_rankings(tmp_path):
    order = list(range(10))
    rankings = {"trunk.s0": {"activation": {"face": {"order": order}}, "loss": {"face": {"order": order[::-1]}}}}
    run = make_run(tmp_path / "run", [
        ("trunk.s0", 0, "activation", 0.3, 0.1, 0.5, 1 / 6), ("trunk.s0", 0, "loss", 0.0, -0.1, 0.1, 0.5),
        ("trunk.s2", 2, "activation", 0.6, 0.3, 0.9, 1 / 6), ("trunk.s2", 2, "loss", 0.7, 0.4, 1.0, 1 / 6)],
        rankings=rankings)
    text, page = first_screen(run)
    assert "Task-specialised filters: not shown" in text and "2 sites lesioned" in text
    assert "interval above 0, not beyond random lesions" in text  # the table lists what the intervals show
    assert "no p-value can go below 1/(5+1) = 0.167" in text and "at least 20 repeats" in text
    assert "already above 0 at the network's first site, trunk.s0" in text and "resolution-matched" in text
    # activation and loss disagree at trunk.s0 only; their top-20% face filters (2 of 10) share none
    assert "disagree at 1 site(s)" in text and "share 0 of 2" in text and "about 0.4" in text
    assert "near chance" not in text
    table = page[page.index("<h2>Dissociation by depth</h2>"):]
    assert "drop_<wbr>face_<wbr>by_<wbr>object" in table and "drop_a_by_b" not in table.replace("<wbr>", "")


def test_enough_repeats_gives_a_verdict_and_counts_the_tests(tmp_path):
    run = make_run(tmp_path / "run", [
        ("trunk.s0", 0, "loss", 0.02, -0.1, 0.12, 0.6), ("trunk.s5", 5, "loss", 0.8, 0.5, 1.1, 1 / 21),
        ("trunk.s9", 9, "loss", 0.9, 0.6, 1.2, 1 / 21)], repeats=20)
    text, _ = first_screen(run)
    assert "Task-specialised filters: yes, at 2 of 3 sites" in text
    assert "with the loss ranking at 2 site(s): trunk.s5, trunk.s9" in text
    assert "can go below" not in text and "first site" not in text
    assert "not corrected for the 3 tests" in text


def test_greedy_sets_past_the_greedy_stop_are_a_caveat(tmp_path):
    run = make_run(tmp_path / "run", [("trunk.s2", 2, "greedy", 0.3, 0.1, 0.5, 0.01),
                                      ("trunk.s4", 4, "greedy", 0.2, 0.05, 0.4, 0.01)])
    rows = list(L.read_csv(run / "dissociation.csv"))
    rows[1]["beyond_greedy_stop"] = 1  # trunk.s4's greedy steps stopped short of 20%
    write_csv(run / "dissociation.csv", L.DISSOCIATION_COLUMNS, rows)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(dict(config, greedy_stop=0.15)))
    text, _ = first_screen(run)
    assert "reach past its stop (greedy_stop 0.15) at 1 site(s), trunk.s4" in text and "trunk.s2" not in \
        text[text.index("reach past its stop"):]
    rows[1]["beyond_greedy_stop"] = 0
    write_csv(run / "dissociation.csv", L.DISSOCIATION_COLUMNS, rows)
    assert "reach past its stop" not in first_screen(run)[0]


def test_a_head_near_chance_is_named(tmp_path):
    run = make_run(tmp_path / "run", [("trunk.s0", 0, "loss", 0.5, 0.2, 0.8, 0.04)],
                   intact=(("face", 0.9, 0.1), ("object", 0.12, 0.1)), repeats=30)
    text, _ = first_screen(run)
    assert "object head is near chance: intact test accuracy 0.120" in text and "face head is near" not in text
    assert "But the object head is near chance" in text


def test_no_lesions_says_so(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"backbone": "resnet50", "seed": 1, "tasks": {}}))
    text, _ = first_screen(run)
    assert "No lesion results yet" in text


def test_random_pair_null_has_one_draw_per_order():
    null = L.random_pair_indices([0.1, 0.2, 0.3], [0.3, 0.1, 0.0])
    # order r as the face filters, order r+1 as the object filters
    assert null.tolist() == pytest.approx([0.1 - 0.2 + 0.1 - 0.3, 0.2 - 0.3 + 0.0 - 0.1, 0.3 - 0.1 + 0.3 - 0.0])
    assert len(L.random_pair_indices([0.1], [0.2])) == 0


def test_report_warns_where_a_ranking_is_not_reproducible():
    import report

    rankings = {"trunk.layer1.0": {"reliability": {"loss": {"face": {"top10": 0.2, "top20": 0.3, "spearman": 0.1},
                                                            "object": {"top10": 0.9, "top20": 0.8, "spearman": 0.9}}}},
                "trunk.layer2.0": {"reliability": {"loss": {"face": {"top10": 1.0, "top20": 1.0, "spearman": 1.0}}}}}
    (caveat,) = report._reliability_caveats(rankings, 0.2)
    assert "not reproducible" in caveat and "trunk.layer1.0 loss face 30%" in caveat
    assert "object" not in caveat and "layer2" not in caveat
    assert report._reliability_caveats(rankings, 0.1)[0].count("%") >= 2
    assert report._reliability_caveats({"s": {"loss": {}}}, 0.2) == []
