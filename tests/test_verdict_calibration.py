"""benchmarks/verdict_calibration.py: the statistics-layer simulation (verdict_simulation.py) in-process
(seconds), and the --quick mode as a user runs it (three tiny networks, about 20 s)."""
import html
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, load_benchmark, reproducible_rankings

from dualtask.report import build as report
from dualtask.stats import multiple_testing

V = load_benchmark("verdict_simulation")  # run_verdict, simulate_network, simulate, rates


def test_simulation_returns_rates_in_range_with_wilson_intervals():
    for scenario in V.SCENARIOS:
        sim = V.simulate(draws=12, seed=1, scenario=scenario, n_sites=3, repeats=20, n_images=60, n_boot=200)
        assert sim["draws"] == 12 and 0 <= sim["yes"] <= sim["yes_uncorrected"] <= 12
        for key in ("rate", "rate_uncorrected"):
            p, low, high = sim[key]
            assert 0.0 <= low <= p <= high <= 1.0
        assert len(sim["min_p_corrected"]) == 12
        # the corrected p of one ranking with 20 random orders cannot go below 1/22
        assert min(sim["min_p_corrected"]) >= 1 / 22 - 1e-4
        assert scenario in V.describe_simulation(sim)


def _said(diss, results, fixed=None) -> str:
    """report.summary's answer for simulated rows: every site late and every ranking reproducible (the simulation
    knows no rankings), one fraction swept, so that the statistics layer's test is what decides."""
    intact = [{"layer": "site0", "eval_task": t, "intact_accuracy": results[i]["intact_accuracy"], "n_images": 80,
               "chance": "0.1000"} for i, t in ((0, "a"), (20, "b"))]
    config = {"seed": 0, "lesion_methods": ["loss", "random"], "random_repeats": 20, "lesion_fractions": [0.2]}
    rankings = reproducible_rankings([r["layer"] for r in diss], methods=("loss",), tasks=("a", "b"))
    readouts = {"fixed": None if fixed is None else {"dissociation": fixed, "results": []}}
    page = html.unescape(re.sub(r"<[^>]+>", " ", report.summary(config, {}, intact + results, diss, rankings,
                                                                readouts=readouts)))
    return page


def test_simulated_rows_are_the_lesion_stages_and_the_verdict_is_the_reports():
    """Each simulated network gives dissociation.csv's and lesion_results.csv's rows; run_verdict says yes exactly
    when report.summary's first sentence does, for networks without dissociation and with a planted one."""
    rng = np.random.default_rng(5)
    seen = set()
    for k in range(8):
        scenario = "planted" if k % 2 else "exchangeable"
        diss, results = V.simulate_network(rng, n_sites=3, n_rankings=1, repeats=20, n_images=80,
                                           scenario=scenario, n_boot=200, seed=k)
        assert len(diss) == 3 and {r["method"] for r in diss} == {"loss"}
        assert {r["method"] for r in results} == {"random"} and len(results) == 3 * 20 * 2
        verdict = V.run_verdict(diss, results)
        assert all(r["correction"] == "max-statistic" for r in verdict["rows"])
        said = re.search(r"Task-specialised filters: (yes|not shown)", _said(diss, results)).group(1)
        assert (said == "yes") == verdict["yes"]
        seen.add(verdict["yes"])
        if verdict["yes"]:
            assert verdict["yes_uncorrected"]  # the correction only ever removes a yes
    assert seen == {True, False}  # the planted networks pass, so both answers were checked


def test_a_site_counts_only_where_it_dissociates_through_the_heads_and_the_fixed_readouts():
    """run_verdict and the summary's sentence on constructed rows: a planted dissociation through the heads that the
    fixed readouts do not show is 'through the heads only', and the answer says 'not shown'; with the fixed
    readouts' rows dissociating too it is 'yes'; without fixed readouts the heads decide alone."""
    rng = np.random.default_rng(7)
    planted = exchangeable = None
    for k in range(12):
        diss, results = V.simulate_network(rng, n_sites=3, n_rankings=1, repeats=20, n_images=80,
                                           scenario="planted", n_boot=200, seed=k)
        if planted is None and V.run_verdict(diss, results)["yes"]:
            planted = (diss, results)
        diss, results = V.simulate_network(rng, n_sites=3, n_rankings=1, repeats=20, n_images=80,
                                           scenario="exchangeable", n_boot=200, seed=100 + k)
        if exchangeable is None and not V.run_verdict(diss, results)["yes"]:
            exchangeable = (diss, results)
    assert planted and exchangeable
    (diss, results), (null_diss, null_results) = planted, exchangeable
    null_diss = [dict(r, layer=p["layer"], depth=p["depth"]) for r, p in zip(null_diss, diss)]  # same sites
    heads = V.run_verdict(diss, results)
    fixed_null = multiple_testing.corrected_rows(null_diss, null_results, force=False)
    fixed_planted = multiple_testing.corrected_rows(diss, results, force=False)
    both = V.run_verdict(diss, results, fixed_planted)
    only = V.run_verdict(diss, results, fixed_null)
    assert heads["yes"] and both["yes"] and not only["yes"]
    for fixed, said in ((fixed_null, "not shown"), (fixed_planted, "yes"), (None, "yes")):
        assert re.search(r"Task-specialised filters: (yes|not shown)", _said(diss, results, fixed)).group(1) == said
    page = _said(diss, results, fixed_null)
    assert "Through the heads only at" in page and "through the heads only" in page  # the caveat and the table


def test_main_prints_the_headline_lines_last(capsys):
    calibration = load_benchmark("verdict_calibration")
    assert calibration.main(["--sim_only", "--draws=6", "--sim_sites=2", "--sim_images=40"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("false_positive_rate: ") and lines[-1].startswith("false_positive_rate_uncorrected: ")
    value = re.match(r"false_positive_rate: ([0-9.]+) \[([0-9.]+), ([0-9.]+)\]", lines[-2])
    p, low, high = map(float, value.groups())
    assert 0.0 <= low <= p <= high <= 1.0


def test_fmt_rate_and_site_power():
    assert V.fmt_rate(1, 20).startswith("0.0500 [0.0089, 0.2361]")
    rows = [{"layer": "branch:x", "depth": 14, "verdict": V.YES}, {"layer": "branch:y", "depth": 16,
                                                                   "verdict": "no dissociation (interval includes 0)"},
            {"layer": "z", "depth": 4, "verdict": V.YES}]
    assert load_benchmark("verdict_trained").site_power([{"rows": rows}], {14, 16}) == (1, 2)


def test_pool_tabulates_every_finished_network_by_configuration_and_pools_last(tmp_path, monkeypatch, capsys):
    """--pool: every finished <kind>_seed<N> folder under the roots, one table row per configuration (backbone,
    size, epochs, kind, branch depth), runs without the fixed readouts left out and said so, the pooled
    false-positive rate and power as the last two lines; a missing folder is a usage error (exit 2)."""
    import json

    trained, calibration = load_benchmark("verdict_trained"), load_benchmark("verdict_calibration")
    assert calibration.networks is trained
    yes_row = {"layer": "trunk.layer4.2", "depth": 16, "verdict": V.YES}
    no_row = {"layer": "trunk.layer4.1", "depth": 15, "verdict": "no dissociation (interval includes 0)"}
    made = {  # folder: (config, what read_run gives)
        "a/null_seed0": ({"backbone": "resnet50", "image_size": 32, "epochs": 4, "lesion_layers": [15, 16]},
                         {"yes": False, "rows": [no_row], "fixed": {}}),
        "a/null_seed1": ({"backbone": "resnet50", "image_size": 32, "epochs": 4, "lesion_layers": [15, 16]},
                         {"yes": True, "rows": [yes_row], "fixed": {}}),
        "a/null_seed2": ({"backbone": "resnet50", "image_size": 32, "epochs": 4, "lesion_layers": [15, 16]},
                         {"yes": False, "rows": [no_row]}),  # no fixed readouts: left out
        "a/branched_seed0": ({"backbone": "resnet50", "image_size": 32, "epochs": 4, "lesion_layers": [0, 15, 16],
                              "branch_at": 12}, {"yes": True, "rows": [yes_row, no_row], "fixed": {}}),
        "b/branched_seed3": ({"backbone": "vgg16", "batch_norm": False, "image_size": 32, "epochs": 6,
                              "lesion_layers": [4, 10, 12], "branch_at": 9},
                             {"yes": True, "rows": [dict(yes_row, depth=10), dict(no_row, depth=4)], "fixed": {}}),
    }
    for folder, (config, _) in made.items():
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "config.json").write_text(json.dumps(config))
        (tmp_path / folder / "dissociation.csv").write_text("layer\n")
    (tmp_path / "a" / "null_seed9").mkdir()  # unfinished: no dissociation.csv
    (tmp_path / "a" / "null_seed5.log").write_text("")  # not a run folder
    monkeypatch.setattr(trained, "read_run", lambda out_dir: dict(made[f"{out_dir.parent.name}/{out_dir.name}"][1]))
    assert calibration.main([f"--pool={[str(tmp_path / 'a'), str(tmp_path / 'b')]}"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("false_positive_rate_trained: 0.5000 [") and "(1/2)" in lines[-2]
    assert lines[-1].startswith("power: 0.6667 [") and "(2/3)" in lines[-1]
    rows = {tuple(line.split()[:6]): line for line in lines if line.split()[0] in ("resnet50", "vgg16")}
    left_out = "1 without a finished sweep through the fixed readouts, left out"
    assert left_out in rows["resnet50", "32", "4", "null", "-", "2"]
    assert "(1/2) over post-branch sites [15, 16]" in rows["resnet50", "32", "4", "branched", "12", "1"]
    assert "(1/1) over post-branch sites [10, 12]" in rows["vgg16", "(plain)", "32", "6", "branched", "9"]
    recorded = tmp_path / "calibration.json"  # --record: the pooled rates, the simulated rate kept from before
    recorded.write_text(json.dumps({"false_positive_rate": {"hits": 9, "n": 200}, "power": {"hits": 0, "n": 1}}))
    monkeypatch.setattr(calibration, "RECORD", recorded)
    assert calibration.main([f"--pool={[str(tmp_path / 'a'), str(tmp_path / 'b')]}", "--record"]) == 0
    got = json.loads(recorded.read_text())
    assert got["false_positive_rate"] == {"hits": 9, "n": 200}
    assert (got["false_positive_rate_trained"]["hits"], got["false_positive_rate_trained"]["n"]) == (1, 2)
    assert (got["power"]["hits"], got["power"]["n"]) == (2, 3) and got["power"]["low"] < 2 / 3 < got["power"]["high"]
    assert "2 null and 2 branched networks" in got["networks"] and "depths 9, 12" in got["networks"]
    capsys.readouterr()
    assert calibration.main([f"--pool={[str(tmp_path / 'nowhere')]}"]) == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.slow  # about 20 s alone, minutes on a busy machine: three tiny trainings and sweeps
def test_quick_mode_runs_end_to_end(tmp_path):
    """The smoke test as a user runs it (three networks of 2 training steps each, two sites): about 20 s with one
    OpenMP thread, which it is given; with two, on 2 cores that other jobs share, it took 2 minutes (threads
    waiting on each other)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "verdict_calibration.py"), "--quick",
                           f"--out_root={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-4:]
    assert [line.split(":")[0] for line in last] == ["false_positive_rate", "false_positive_rate_uncorrected",
                                                      "power", "power_shared"]
    for line in last:
        p = float(line.split(":")[1].split()[0])
        assert 0.0 <= p <= 1.0
    for kind in ("branched", "shared", "null"):  # each an ordinary run of the pipeline, swept
        assert (tmp_path / f"{kind}_seed0" / "dissociation.csv").exists()
        assert f"{kind} seed 0:" in done.stdout
