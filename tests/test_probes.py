"""Behavioural probes (probes.py): the inversion effect and a held-out task's transfer probe under lesions."""
import csv

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import N_CLASSES, PlantedNet, planted_batches

from dualtask.analysis import probes
from dualtask.lesion import rankings
from dualtask.model import sites as sites_mod
from dualtask.report import probes_report


class Symmetric(nn.Module):
    """An image and its upside-down copy averaged: whatever follows cannot tell them apart."""

    def forward(self, x):
        return 0.5 * (x + x.flip(-2))


def orientation_blind():
    torch.manual_seed(0)
    model = PlantedNet().eval()
    model.trunk = nn.Sequential(Symmetric(), *model.trunk)  # sites trunk.2 and trunk.4
    return model


def rankings_of(model, sites, train):
    return {s.name: rankings.rank_site(model, s, train, ["face", "object"], ["loss", "random"], random_repeats=20,
                                       seed=0)
            for s in sites}


def test_an_orientation_blind_network_shows_no_inversion_effect_under_any_lesion():
    model = orientation_blind()
    sites = sites_mod.lesion_sites(model)
    train, test = planted_batches(20, seed=0), planted_batches(30, seed=1)
    rows = probes.inversion_rows(model, sites, rankings_of(model, sites, train), test, 0.25)
    assert len(rows) == 2 + 2 * 2 * (2 + 20)  # intact, then sites x tasks x (2 targeted + 20 random)
    for r in rows:
        assert float(r["effect"]) == 0.0 and float(r["effect_low"]) == 0.0 and float(r["effect_high"]) == 0.0
        assert r["accuracy"] == r["inverted_accuracy"]


def test_the_planted_network_is_orientation_bound_and_its_face_filters_carry_the_faces_inversion_effect():
    model = PlantedNet().eval()  # a face at position k, flipped, lights position 3 - k: always another class
    sites = sites_mod.lesion_sites(model)
    train, test = planted_batches(20, seed=0), planted_batches(30, seed=1)
    rows = probes.inversion_rows(model, sites, rankings_of(model, sites, train), test, 0.25)
    intact = {r["task"]: r for r in rows if r["method"] == "intact"}
    assert float(intact["face"]["effect"]) > 0.7 and float(intact["face"]["effect_low"]) > 0.6
    face_lesion = next(r for r in rows if (r["layer"], r["method"], r["target"], r["task"]) ==
                       ("trunk.3", "loss", "face", "face"))
    object_lesion = next(r for r in rows if (r["layer"], r["method"], r["target"], r["task"]) ==
                         ("trunk.3", "loss", "object", "face"))
    assert float(face_lesion["effect"]) < float(intact["face"]["effect"]) - 0.5  # face filters: the effect goes
    assert float(object_lesion["effect"]) == pytest.approx(float(intact["face"]["effect"]), abs=0.05)
    assert float(face_lesion["p_vs_random"]) <= float(object_lesion["p_vs_random"])
    text = probes_report.inversion_sentence(rows)
    assert text.startswith("Inversion effect") and ("face: 0.9" in text or "face: 1.0" in text)
    assert "face filters (loss) shrink it beyond every random lesion's at 1 of 2 sites (trunk.3)" in text


def test_a_transfer_probe_of_a_copy_of_the_face_task_loses_most_with_the_face_filters():
    model = PlantedNet().eval()
    sites = sites_mod.lesion_sites(model)
    train = planted_batches(20, seed=0)
    copy_fit = [("probe", x, y) for t, x, y in planted_batches(25, seed=2) if t == "face"]
    copy_test = [("probe", x, y) for t, x, y in planted_batches(25, seed=3) if t == "face"]
    rows = probes.transfer_rows(model, sites, rankings_of(model, sites, train), copy_fit, copy_test, 0.25, "copy")
    intact = next(r for r in rows if r["method"] == "intact")
    assert float(intact["accuracy"]) > 0.9
    at = {(r["target"]): float(r["accuracy"]) for r in rows if r["layer"] == "trunk.3" and r["method"] == "loss"}
    assert at["face"] <= 1 / N_CLASSES + 0.15  # the copy's information went with the face filters
    assert at["object"] > 0.9
    text = probes_report.transfer_sentence(rows)
    assert "loses most with the face filters (loss)" in text


def test_probes_are_flipped_top_to_bottom_and_shared_images_stay_shared():
    x = torch.arange(8.0).view(1, 1, 4, 2)
    batches = [("a", x, torch.zeros(1)), ("b", x, torch.zeros(1))]
    flipped = probes.inverted(batches)
    assert torch.equal(flipped[0][1][0, 0, 0], x[0, 0, 3]) and flipped[0][1] is flipped[1][1]
    assert np.array_equal(flipped[0][2], batches[0][2])


@pytest.mark.slow  # about 70 s on 2 cores: a tiny run with the mask ranking and both probes, then its rerun
def test_a_run_with_the_probes_and_the_new_rankings_reads_each_in_its_report(tmp_path):
    from conftest import TINY, run_script

    out = tmp_path / "run"
    args = [*TINY, "--lesion_methods=['loss', 'localiser', 'mask', 'random']", "--lesion_layers=[0, -1]",
            "--random_repeats=3", "--rank_images=8", "--mask_steps=10", "--stimulus_steps=5",
            "--probes=['inversion', 'transfer']", "--probe_data=demo:expression", f"--out_dir={out}"]
    p = run_script("ResNet.py", *args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "probe inversion" in p.stdout and "probe transfer" in p.stdout
    with open(out / "probes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["probe"] for r in rows} == {"inversion", "transfer"}
    assert {r["method"] for r in rows} == {"intact", "loss", "localiser", "mask", "random"}
    assert (out / "figures" / "probes.png").stat().st_size > 10_000
    page = (out / "report.html").read_text()
    for said in ("Localiser (Welch", "Learned masks (a gate per filter", "Inversion effect (upright minus",
                 "Transfer to a held-out task"):
        assert said in page, said
    again = run_script("ResNet.py", *args)
    assert again.returncode == 0 and "done earlier under the same settings" in again.stdout
    # the transfer probe without its data is refused before anything runs
    bad = run_script("ResNet.py", *TINY, "--probes=['transfer']", f"--out_dir={tmp_path / 'bad'}")
    assert bad.returncode == 2 and "probe_data" in bad.stderr and not (tmp_path / "bad").exists()
