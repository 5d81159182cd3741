"""benchmarks/gpu_check.py: its tiny CPU run goes through every section (the GPU's code paths at CPU sizes) and
writes the table as JSON; one section alone, in-process."""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, load_benchmark


def section_metrics(report: dict, name: str) -> dict:
    record = next(s for s in report["sections"] if s["section"] == name)
    return {m["metric"]: m["value"] for m in record["metrics"]}


@pytest.mark.slow  # about a minute on 2 cores: the benchmark's own smoke run; the sections' parts are tested below
def test_tiny_run_covers_every_section(tmp_path):
    """About 30 s on 2 cores."""
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device=cpu", "--tiny", f"--out={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(out.read_text())
    sections = load_benchmark("gpu_check").SECTIONS
    assert {s["section"]: s["status"] for s in report["sections"]} == {name: "ok" for name in sections}
    assert report["device"].startswith("cpu") and report["tiny"] is True and report["command"]
    sweep = section_metrics(report, "suffix_sweep")
    assert sweep["results equal (every image's correctness and loss)"] is True
    assert sweep["predictions agree"] == 100.0 and sweep["max |loss difference|"] == 0.0
    greedy = next(m for m in next(s for s in report["sections"] if s["section"] == "greedy")["metrics"]
                  if m["metric"].startswith("projected whole greedy ranking"))
    assert greedy["value"] > 0 and greedy["unit"] == "h" and len(greedy["detail"]["per_site_s"]) == 13
    assert all({"section", "metric", "value", "target", "met"} <= set(row) for row in report["rows"])
    assert "met" in done.stdout and "projected whole greedy ranking" in done.stdout


def test_one_section_in_process_and_errors_recorded(tmp_path, capsys):
    """The suffix sweep alone (on a fresh network, prepare not run); a section that fails records its error and
    traceback, the others still run, and the exit status says so."""
    gpu_check = load_benchmark("gpu_check")
    out = tmp_path / "one.json"
    assert gpu_check.main(["--device=cpu", "--tiny", f"--out={out}", "--sections=data,suffix_sweep"]) == 0
    report = json.loads(out.read_text())
    assert [s["status"] for s in report["sections"]] == ["ok", "ok"]
    assert section_metrics(report, "suffix_sweep")["results equal (every image's correctness and loss)"] is True

    # without the data section the lesion sections have no images: each records that, the peak still runs
    out = tmp_path / "failing.json"
    assert gpu_check.main(["--device=cpu", "--tiny", f"--out={out}", "--sections=suffix_sweep,peak"]) == 1
    report = json.loads(out.read_text())
    status = {s["section"]: s for s in report["sections"]}
    assert status["suffix_sweep"]["status"] == "error" and "no demo images" in status["suffix_sweep"]["error"]
    assert "Traceback" in status["suffix_sweep"]["traceback"]
    assert status["peak"]["status"] == "ok"
    assert "failed: suffix_sweep" in capsys.readouterr().out


def test_tiny_sizes_keep_no_clock_and_greedy_measures_a_site_past_its_deadline(tmp_path):
    """--tiny checks code paths, so nothing in it depends on how fast or loaded the machine is: no section budget
    and no greedy limit unless asked; and even with the greedy limit already past (--limit_s=0, as on a machine
    far slower than planned) the greedy section measures one step at its first site and projects from it, leaving
    the other site out."""
    gpu_check = load_benchmark("gpu_check")
    args = gpu_check.parse(["--device=cpu", "--tiny"])
    assert args.budget_s == float("inf") and args.limit_s == float("inf")
    full = gpu_check.parse(["--device=cpu"])
    assert (full.budget_s, full.limit_s) == (420.0, 450.0)
    out = tmp_path / "late.json"
    assert gpu_check.main(["--device=cpu", "--tiny", f"--out={out}", "--sections=data,greedy", "--limit_s=0"]) == 0
    report = json.loads(out.read_text())
    greedy = next(s for s in report["sections"] if s["section"] == "greedy")
    assert greedy["status"] == "ok", greedy["error"]
    names = [m["metric"] for m in greedy["metrics"]]
    assert sum(n.endswith("s per greedy step") for n in names) == 1
    assert any(m["value"] == "left out" for m in greedy["metrics"])
    assert any(n.startswith("projected whole greedy ranking") for n in names)
