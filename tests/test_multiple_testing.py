"""The headline's correction for multiple tests, on constructed inputs with known answers."""
import html
import re

import numpy as np
import pytest
from conftest import reproducible_rankings

from dualtask.experiment import aggregate
from dualtask.lesion import dissociation, resume
from dualtask.lesion import sweep as L
from dualtask.model.network import DualTaskNet
from dualtask.report import build as report
from dualtask.stats import multiple_testing as M
from dualtask.stats.verdict import Agreement


def diss_row(layer, method, index, p_index, ci_low=0.1, n_random=20, fraction="0.2000"):
    """A dissociation.csv row whose drops make its index: each task's own filters cost it index/2, the other's 0."""
    return {"layer": layer, "depth": int(layer[1:]), "method": method, "fraction": fraction, "task_a": "face",
            "task_b": "object", "index": f"{index:.4f}", "ci_low": f"{ci_low:.4f}", "ci_high": "2.0000",
            "p_index": f"{p_index:.4f}", "n_random": n_random, "drop_a_by_a": f"{index / 2:.4f}",
            "drop_a_by_b": "0.0000", "drop_b_by_b": f"{index / 2:.4f}", "drop_b_by_a": "0.0000", "p_a_by_a": "0.05",
            "p_b_by_b": "0.05"}


def ring(drops, index):
    """pair_null with diss_row's targeted drops."""
    return M.pair_null(*drops, (index / 2, 0.0), (0.0, index / 2))


def random_rows(site, drops_a, drops_b, fraction="0.2000"):
    """lesion_results.csv's random-lesion rows of one site: the chance-corrected drops of each order."""
    return [{"layer": site, "method": "random", "target": "random", "repeat": r, "fraction": fraction,
             "eval_task": task, "corrected_drop": f"{d:.4f}", "intact_accuracy": "0.8", "n_images": 200,
             "chance": "0.1"}
            for task, drops in (("face", drops_a), ("object", drops_b)) for r, d in enumerate(drops)]


def test_holm_matches_the_textbook():
    # p = 0.01, 0.04, 0.03, 0.005 (m = 4): sorted 0.005, 0.01, 0.03, 0.04 -> 4x, 3x, 2x, 1x, made monotone
    adjusted = M.holm([0.01, 0.04, 0.03, 0.005, float("nan")])
    assert adjusted[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and np.isnan(adjusted[4])
    assert M.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0]) and M.holm([0.2, 0.2]) == pytest.approx([0.4, 0.4])
    assert np.isnan(M.holm([float("nan")])).all() and len(M.holm([])) == 0


def test_pair_null_is_lesion_utils_random_pair_indices_and_a_closed_ring():
    assert dissociation.random_pair_indices is M.pair_null
    a, b = np.array([0.1, 0.3, 0.0, 0.2]), np.array([0.05, 0.2, 0.1, 0.0])
    a_filters, b_filters = (0.5, 0.05), (0.1, 0.4)  # (drop of a, drop of b) under each ranking's filters
    null = M.pair_null(a, b, a_filters, b_filters)
    # ring [a-filters, b-filters, order 0..3]: (b-filters, 0), (0, 1), (1, 2), (2, 3), (3, a-filters)
    assert null.tolist() == pytest.approx([0.1 - 0.1 + 0.05 - 0.4, 0.1 - 0.3 + 0.2 - 0.05, 0.3 - 0.0 + 0.1 - 0.2,
                                           0.0 - 0.2 + 0.0 - 0.1, 0.2 - 0.5 + 0.05 - 0.0])
    assert len(M.pair_null([0.1], [0.2], a_filters, b_filters)) == 0


def test_turning_the_ring_turns_the_observed_index_into_a_null_one():
    """Where the targeted lesions are random ones, any lesion of the ring could have been the observed pair: the
    R + 2 indices (observed and null) are the same set whichever two neighbouring lesions are called targeted, so
    the observed index is as likely as any of them to be the largest."""
    rng = np.random.default_rng(3)
    lesions = rng.random((9, 2))  # 9 lesions' (drop of a, drop of b)

    def ring_values(order):
        x = lesions[order]
        observed = x[0, 0] - x[1, 0] + x[1, 1] - x[0, 1]
        return observed, M.pair_null(x[2:, 0], x[2:, 1], tuple(x[0]), tuple(x[1]))

    observed, null = ring_values(np.arange(9))
    for shift in range(1, 9):
        turned_obs, turned_null = ring_values(np.roll(np.arange(9), -shift))
        assert sorted(np.append(turned_null, turned_obs)) == pytest.approx(sorted(np.append(null, observed)))
        assert turned_obs == pytest.approx(null[shift - 1])  # the pair now called observed was a null one


def test_one_site_beating_every_null_draw_gets_one_over_n_plus_one():
    null = np.linspace(-0.2, 0.2, 21)  # the R + 1 = 21 null indices of R = 20 random orders
    (p,) = M.max_statistic({("s0", "loss"): 0.5}, {("s0", "loss"): null}).values()
    assert p == pytest.approx(1 / 22)
    # with one site the correction is the site's own p-value, whatever the scale: 6 of 21 nulls at least as large
    for scale in (1e-3, 1.0, 50.0):
        (p,) = M.max_statistic({("s0", "loss"): 0.1 * scale}, {("s0", "loss"): null * scale}).values()
        assert p == pytest.approx((1 + np.sum(null >= 0.1 - 1e-12)) / 22)
    # a null without spread: above it p = 1/(n+1), at it p = 1
    assert M.max_statistic({("s0", "x"): 0.3}, {("s0", "x"): np.zeros(9)})[("s0", "x")] == pytest.approx(0.1)
    assert M.max_statistic({("s0", "x"): 0.0}, {("s0", "x"): np.zeros(9)})[("s0", "x")] == pytest.approx(1.0)


def test_max_over_sites_with_a_known_maximum():
    """Site s1's null is s0's scaled by 10, and s2's is constant apart from order 7: after standardising, order r's
    largest z over the sites is known, and so is the count of orders at or above an observed z."""
    r = 10
    base = np.arange(r, dtype=float)  # 0..9
    site_nulls = {"s0": base, "s1": 10 * base[::-1], "s2": np.where(np.arange(r) == 7, 5.0, 0.0)}
    nulls = {(s, m): n for s, n in site_nulls.items() for m in ("loss", "activation")}
    observed = {("s0", "loss"): 8.5, ("s1", "loss"): 1000.0, ("s2", "loss"): -1.0}
    p = M.max_statistic(observed, nulls)

    def zs(null, obs):  # standardised by the R null values and the observed one (ddof 1)
        pooled = np.append(null, obs)
        return (null - pooled.mean()) / pooled.std(ddof=1), (obs - pooled.mean()) / pooled.std(ddof=1)

    z = {s: zs(site_nulls[s], observed[s, "loss"]) for s in site_nulls}
    max_null = np.max([z[s][0] for s in site_nulls], axis=0)
    for s in site_nulls:
        expected = (1 + np.sum(max_null >= z[s][1] - 1e-9)) / (r + 1)
        assert p[s, "loss"] == pytest.approx(expected)
    assert p["s1", "loss"] == pytest.approx(1 / 11)  # beats every order's maximum
    assert p["s2", "loss"] == pytest.approx(1.0)  # below every order's maximum
    # s0's own p-value is 2/11 (8 and 9 of its null); the maximum over sites makes it larger
    assert p["s0", "loss"] > 2 / 11
    # two rankings: Bonferroni doubles each, at most 1
    two = M.max_statistic({**observed, ("s1", "activation"): 1000.0}, nulls)
    assert two["s1", "loss"] == pytest.approx(2 / 11) and two["s1", "activation"] == pytest.approx(2 / 11)
    assert two["s2", "loss"] == 1.0
    # undefined index or null: no p-value, and the site leaves the family
    gone = M.max_statistic({("s0", "loss"): float("nan"), ("s1", "loss"): 1000.0},
                           {("s0", "loss"): base, ("s1", "loss"): 10 * base[::-1]})
    assert np.isnan(gone["s0", "loss"]) and gone["s1", "loss"] == pytest.approx(1 / 11)


def test_floor_and_repeats_needed():
    assert M.smallest_corrected_p(20) == pytest.approx(1 / 22)
    assert M.smallest_corrected_p(20, 2) == pytest.approx(2 / 22)
    assert M.smallest_corrected_p(1) == 1.0 and M.smallest_corrected_p(20, n_tests=10) == pytest.approx(10 / 22)
    assert M.repeats_needed(1) == 19 == report.repeats_needed() and M.repeats_needed(2) == 39
    assert M.repeats_needed(3) == 59 and M.repeats_needed(n_tests=10) == 199 and M.repeats_needed(1, 0.01) == 99
    for k in (1, 2, 3, 7):
        need = M.repeats_needed(k)
        assert M.smallest_corrected_p(need, k) < 0.05 <= M.smallest_corrected_p(need - 1, k)


def test_a_family_without_dissociation_rejects_at_alpha_corrected_and_far_more_often_uncorrected():
    """Targeted and random lesions from the same heavy-tailed distribution (each site its own scale; now and then
    a lesion of outlying cost), 5 sites x 2 rankings, R = 40, each index's null its ring (`pair_null`): the
    corrected test rejects anywhere in at most about 5% of the networks, the uncorrected one in about a third."""
    rng = np.random.default_rng(2024)
    n_sims, r, scales, rankings = 1500, 40, (0.01, 0.05, 0.2, 0.5, 1.0), ("activation", "loss")
    corrected = uncorrected = 0
    for _ in range(n_sims):
        nulls, observed = {}, {}
        for i, sc in enumerate(scales):
            lesions = sc * rng.standard_t(3, (r + 2 * len(rankings), 2))  # (drop of a, drop of b) per lesion
            for k, m in enumerate(rankings):
                a_filters, b_filters = lesions[r + 2 * k], lesions[r + 2 * k + 1]
                observed[f"s{i}", m] = a_filters[0] - b_filters[0] + b_filters[1] - a_filters[1]
                nulls[f"s{i}", m] = M.pair_null(lesions[:r, 0], lesions[:r, 1], a_filters, b_filters)
        corrected += min(M.max_statistic(observed, nulls).values()) < 0.05
        uncorrected += any((1 + np.sum(nulls[k] >= v)) / (r + 2) < 0.05 for k, v in observed.items())
    assert corrected / n_sims <= 0.05 + 0.015 and uncorrected / n_sims > 0.25


def test_corrected_rows_from_the_run_files_and_the_holm_fallback():
    null_drops = ([0.0, 0.1, 0.0, 0.1, 0.0], [0.0, 0.0, 0.1, 0.1, 0.0])  # null indices -0.1, 0.2, -0.1, 0, 0
    # the rings' null indices: s0 -0.5, -0.1, 0.2, -0.1, 0, -0.5; s1 -0.025, -0.1, 0.2, -0.1, 0, -0.025
    rows = [diss_row("s0", "loss", 1.0, 1 / 7, n_random=5), diss_row("s1", "loss", 0.05, 2 / 7, n_random=5),
            diss_row("s0", "loss", 0.0, 0.5, n_random=5, fraction="0.1000")]
    results = random_rows("s0", *null_drops) + random_rows("s1", *null_drops) + \
        random_rows("s0", *null_drops, fraction="0.1000")
    out = M.corrected_rows(rows, results)
    assert out[0]["correction"] == "max-statistic" and float(out[0]["p_corrected"]) == pytest.approx(1 / 7, abs=1e-4)
    assert float(out[1]["p_corrected"]) > 2 / 7 - 1e-4  # never below its own p_index
    assert out[2]["correction"] == "max-statistic"  # a fraction is its own family (of one site here)
    assert "p_corrected" not in rows[0]  # the input is left as it was
    # a site whose random drops lesion_results.csv lacks: Holm on p_index, saying why
    holm = M.corrected_rows(rows[:2], random_rows("s0", *null_drops))
    assert [float(r["p_corrected"]) for r in holm] == pytest.approx([2 / 7, 2 / 7], abs=1e-4)  # 2 x 1/7, 1 x 2/7
    assert holm[0]["correction"].startswith("holm (lesion_results.csv lacks the random lesions' drops at s1")
    # different random repeats at the two sites: no joint null either
    uneven = random_rows("s0", *null_drops) + random_rows("s1", [0.0] * 6, [0.0] * 6)
    assert M.corrected_rows(rows[:2], uneven)[0]["correction"] == "holm (the sites have different random repeats)"
    # no p-value anywhere (fewer than two random repeats): nothing to correct
    (none,) = M.corrected_rows([diss_row("s0", "loss", 1.0, float("nan"), n_random=1)], [])
    assert none["p_corrected"] == "nan" and none["correction"] == ""
    # rows that have the column keep it unless forced
    assert M.corrected_rows(out, [], force=False) is out and not M.needs_correction(out) and M.needs_correction(rows)


def _summary_text(diss, results, repeats=20, methods=("loss", "random")):
    config = {"seed": 0, "lesion_methods": list(methods), "random_repeats": repeats}
    intact = [{"layer": "s0", "eval_task": t, "intact_accuracy": "0.8", "n_images": 200, "chance": "0.1"}
              for t in ("face", "object")]
    rankings = reproducible_rankings([r["layer"] for r in diss], methods=methods)  # late sites that reproduce
    page = report.summary(config, {}, intact + results, diss, rankings)
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


def test_report_decides_with_the_corrected_p_and_names_the_correction():
    rng = np.random.default_rng(0)
    sites = [f"s{i}" for i in range(5)]
    drops = {s: (rng.normal(0, 0.02, 20), rng.normal(0, 0.02, 20)) for s in sites}
    results = [row for s in sites for row in random_rows(s, *drops[s])]

    def rows_with(strong_index):
        rows = []
        for s in sites:
            index = strong_index if s == "s4" else 0.0
            p = (1 + np.sum(ring(drops[s], index) >= index)) / 22
            rows.append(diss_row(s, "loss", index, p, ci_low=0.01 if s == "s4" else -0.1))
        return rows

    # s4's index far beyond every null draw anywhere: corrected p = 1/22 < 0.05, so yes
    text = _summary_text(rows_with(1.0), results)
    assert "Task-specialised filters: yes, at 1 of 5 sites (s4), loss ranking, 20% lesions, through the heads; " \
           "corrected p = 0.045 at each, the smallest 20 random orders allow." in text
    assert "p corrected" in text
    # the same index beating its own site's 21 draws (p_index = 1/22) but inside the others' range after
    # standardising: uncorrected it would pass, corrected it does not
    modest = float(np.max(ring(drops["s4"], 0.1)) + 1e-3)
    assert (ring(drops["s4"], modest) < modest).all()  # p_index = 1/22
    text = _summary_text(rows_with(modest), results)
    assert "Task-specialised filters: not shown. At 20% lesions no site's face and object filters" in text
    assert "1 site x ranking pair(s) pass p < 0.05 against the random-lesion pairs alone but not after the " \
           "correction for the 5 tests" in text
    assert "no (lost to the correction)" in text
    # a selectivity ranking beside it is corrected as a family of its own: the loss ranking keeps its floor 1/22
    rows = rows_with(1.0) + [dict(r, method="activation") for r in rows_with(1.0)]
    corrected = M.corrected_rows(rows, results)
    assert {(r["method"], r["family"]) for r in corrected} == {("loss", "verdict"), ("activation", "description")}
    text = _summary_text(rows, results, methods=("activation", "loss", "random"))
    assert "yes, at 1 of 5 sites (s4), loss ranking" in text and "activation (description)" in text
    # two rankings that decide at 20 repeats: the floor 2/22 is above 0.05, so nothing can pass and it says so
    rows = rows_with(1.0) + [dict(r, method="taylor") for r in rows_with(1.0)]
    text = _summary_text(rows, results, methods=("taylor", "loss", "random"))
    assert "not shown: with 20 random orders no corrected p can go below 0.091" in text
    assert "no corrected p-value can go below 2/(20+2) = 0.091" in text and "random_repeats=39" in text
    assert "Bonferroni over 2 rankings" in text


def test_experiment_verdict_and_summary_control_the_family_wise_error():
    """Three sites x one ranking x two comparisons (random lesions, pseudo-tasks): Holm over the six."""
    def row(layer, p_random, p_pseudo):
        return {"role": "real", "layer": layer, "depth": int(layer[1:]), "method": "loss", "fraction": "0.2000",
                "index": "1.0", "ci_low": "0.5", "ci_high": "1.5", "p_random": p_random, "p_vs_pseudo_task": p_pseudo}

    rows = [row("s0", "0.001", "0.002"), row("s1", "0.01", "0.02"), row("s2", "0.3", "0.5")]
    # Holm: 0.001 x6, 0.002 x5, 0.01 x4, 0.02 x3 = 0.006, 0.01, 0.04, 0.06: s0 passes both, s1 not the second
    late = {(f"s{k}", "loss"): Agreement(0.8, 1e-9, 0.2) for k in range(3)}, {f"s{k}": 1.0 for k in range(3)}
    answer, _, caveats, passing = aggregate.verdict(rows, {"real", "pseudo_task"}, 3, 99, reliability=late[0],
                                                    rf=late[1])
    assert [r["layer"] for r in passing] == ["s0"]
    assert "yes, at 1 of 3 sites (s0), loss ranking, 20% lesions, across 3 seeds, beyond random lesions and the " \
           "controls; Holm-corrected p <= 0.010" in answer
    assert any("1 site x ranking pair(s) pass p < 0.05 against every comparison but not after the correction for "
               "the 6 tests" in c.text and "loss s1" in c.text for c in caveats)
    adjusted = aggregate.holm_family(rows, ["p_random", "p_vs_pseudo_task"])
    assert [max(a.values()) for a in adjusted] == pytest.approx([0.01, 0.06, 0.6])  # 0.3 x 2, 0.5 x 1


def test_summary_csv_keeps_the_uncorrected_p_and_adds_the_corrected_one():
    def stat(depth, p_random, boot_shift):
        draws = np.full(50, 1.0 + boot_shift)
        return {"depth": depth, "relative_depth": depth / 2, "task_a": "face", "task_b": "object", "seeds": [0, 1],
                "points": [1.0, 1.0], "index": 1.0, "ci_low": 0.5, "ci_high": 1.5, "p_random": p_random,
                "matched_index": float("nan"), "boot": draws}

    stats = {"real": {("s0", "loss", "0.2000"): stat(0, 0.001, 0.0), ("s1", "loss", "0.2000"): stat(1, 0.03, 0.0)},
             "pseudo_task": {("s0", "loss", "0.2000"): stat(0, 0.5, -1.0),
                             ("s1", "loss", "0.2000"): stat(1, 0.5, -1.0)}}
    rows = aggregate.summary_rows(stats)
    real = {r["layer"]: r for r in rows if r["role"] == "real"}
    assert "p_corrected" in aggregate.SUMMARY_COLUMNS and "p_random" in aggregate.SUMMARY_COLUMNS
    # four tests (p_random 0.001, 0.03; p_vs_pseudo_task 1/51 at both sites): Holm 4 x 0.001, 3 x 1/51,
    # 2 x 1/51 and 0.03, made monotone: 3/51 for both of the 1/51 and for 0.03; a row's is its largest
    assert real["s0"]["p_random"] == "0.0010" and float(real["s0"]["p_corrected"]) == pytest.approx(3 / 51, abs=1e-4)
    assert real["s1"]["p_random"] == "0.0300" and float(real["s1"]["p_corrected"]) == pytest.approx(3 / 51, abs=1e-4)
    pseudo = [r for r in rows if r["role"] == "pseudo_task"]
    assert [float(r["p_corrected"]) for r in pseudo] == pytest.approx([1.0, 1.0])


def test_random_repeats_by_default_let_the_deciding_rankings_reach_alpha_and_fewer_are_said_first():
    run = {"lesion_methods": ["activation", "loss", "random"], "random_repeats": None}
    assert M.random_repeats(run) == 20 and M.smallest_corrected_p(20, 1) < 0.05  # one deciding ranking
    assert M.random_repeats(dict(run, lesion_methods=["loss", "greedy", "taylor", "mask", "random"])) == 79
    assert M.smallest_corrected_p(79, 4) < 0.05 <= M.smallest_corrected_p(78, 4)
    assert M.random_repeats(dict(run, lesion_methods=["activation", "random"])) == 20  # none decides: the least
    assert M.random_repeats(dict(run, verdict_rankings=["activation", "loss"])) == 39  # a family widened on purpose
    assert M.random_repeats(dict(run, random_repeats=7)) == 7  # a number is kept
    assert M.repeats_note(dict(run, random_repeats=20)) is None
    note = M.repeats_note(dict(run, random_repeats=10))
    assert "random_repeats=10" in note and "1/(10+2) = 0.083" in note and "random_repeats=19 or more" in note
    assert M.repeats_note(dict(run, random_repeats=10, lesion_methods=["activation", "random"])) is None
    assert M.repeats_note(dict(run, random_repeats=10, lesion_methods=["loss"])) is None  # no random orders
    # the sweep's settings (what its files are reused under) hold the number, whichever way it was given
    sweep = {"lesion_fractions": [0.2], "seed": 0, "lesion_layers": [0]}
    model = DualTaskNet("vgg16", {"face": 2, "object": 2}, fc_width=8)
    assert resume.sweep_settings(model, dict(sweep, **run))["random_repeats"] == 20
    assert resume.sweep_settings(model, dict(sweep, **dict(run, random_repeats=5)))["random_repeats"] == 5


def test_the_lesion_stage_writes_the_corrected_p(tmp_path, monkeypatch):
    """A tiny sweep on CPU: dissociation.csv has p_corrected and correction beside p_index once the last site is
    done, and the correction from the files equals what the stage wrote. The network is untrained: chance is
    taken as 0 so that its heads, right on about a third of the images, have defined drops."""
    import torch

    from dualtask.core.common import read_csv
    from dualtask.data import loading as vggface2
    from dualtask.data import taskdata
    from dualtask.model.network import DualTaskNet
    from dualtask.training.trainer import TaskImages

    torch.manual_seed(0)
    monkeypatch.setattr(taskdata.TaskData, "chance", property(lambda self: 0.0))
    data = {t: vggface2.load_task("demo", t, 32, max_per_class=4, max_classes=3) for t in ("face", "object")}
    images = {t: TaskImages(d, torch.device("cpu")) for t, d in data.items()}
    model = DualTaskNet("vgg16", {t: len(d.classes) for t, d in data.items()}, fc_width=16).eval()
    config = {"lesion_fractions": [0.0, 0.25], "lesion_methods": ["activation", "random"], "random_repeats": 3,
              "lesion_layers": [0, -1], "rank_images": 8, "seed": 0}
    L.lesion_stage(model, images, config, tmp_path)
    diss = read_csv(tmp_path / "dissociation.csv", dissociation.DISSOCIATION_COLUMNS)
    assert len(diss) == 2 and all(r["correction"] == "max-statistic" for r in diss)
    results = read_csv(tmp_path / "lesion_results.csv")
    again = M.corrected_rows([{k: v for k, v in r.items() if k not in ("p_corrected", "correction")} for r in diss],
                             results)
    assert [r["p_corrected"] for r in again] == [r["p_corrected"] for r in diss]
    assert [r["correction"] for r in again] == [r["correction"] for r in diss]
    for r in diss:  # never below the uncorrected p-value, which stays beside it
        assert float(r["p_corrected"]) >= float(r["p_index"]) - 1e-4
