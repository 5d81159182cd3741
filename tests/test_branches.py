"""Branched networks (branch_at): the trunk shared up to a site, then one copy of the rest per task."""
import csv
import html
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import straight_and_resumed

from dualtask.config import settings
from dualtask.core.common import UsageError
from dualtask.experiment import pipeline as dualtask
from dualtask.lesion import engine, rankings
from dualtask.model import branches, network, sites

TASKS = {"face": 5, "object": 4}


def branched(backbone="resnet50", branch_at=8, **extra):
    torch.manual_seed(0)
    config = dict(backbone=backbone, image_size=32, fc_width=32, branch_at=branch_at, **extra)
    return network.build_model(config, TASKS)


@pytest.mark.parametrize("backbone", settings.BACKBONES)
def test_sites_after_the_branch_point_are_pairs_numbered_across_the_copies(backbone):
    shared = network.DualTaskNet(backbone, TASKS, fc_width=32)
    model = branched(backbone, branch_at=4)
    plain, split = sites.lesion_sites(shared), sites.lesion_sites(model)
    assert len(plain) == len(split)
    for before, after in zip(plain, split):
        if after.depth <= 4:
            assert after.name == before.name and after.n_filters == before.n_filters
        else:
            assert after.name == branches.BRANCH_PREFIX + before.name and after.n_filters == 2 * before.n_filters
            assert after.path == before.name and isinstance(after.module, branches.BranchPair)
    # every copy starts from the shared network's weights at that depth (the same initial weights)
    pair = split[-1].module
    for a, b in zip(pair.copies[0].parameters(), pair.copies[1].parameters()):
        assert torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out["face"].shape == (2, 5) and out["object"].shape == (2, 4)


@pytest.mark.parametrize("backbone", ["resnet50", "vgg16"])
def test_silencing_one_copy_leaves_the_other_heads_logits_bit_identical(backbone):
    model = branched(backbone, branch_at=3).eval()
    x = torch.randn(6, 3, 32, 32)
    site = sites.lesion_sites(model)[-2]
    half = site.n_filters // 2
    with torch.no_grad():
        intact = model(x)
        with engine.ablate(model, {site.name: np.arange(half)}):  # every filter of the face copy
            face_silenced = model(x)
        with engine.ablate(model, {site.name: np.arange(half, 2 * half)}):
            object_silenced = model(x)
    assert torch.equal(face_silenced["object"], intact["object"])
    assert not torch.equal(face_silenced["face"], intact["face"])
    assert torch.equal(object_silenced["face"], intact["face"])
    # the sweep's engine (prefix cached, masks stacked) agrees
    y = torch.zeros(6, dtype=torch.long)
    res = engine.evaluate_lesions(model, site, [np.arange(0, half, 3), []], [("object", x, y)], masks_per_pass=2)
    assert np.array_equal(res[0]["object"]["loss"], res[1]["object"]["loss"])


@pytest.mark.parametrize("backbone", ["vgg16", "resnet50"])
def test_a_branched_network_takes_a_training_step(backbone):
    """VGG's in-place ReLUs meet a pair's view of its input: the copies' ReLUs must not write into it."""
    model = branched(backbone, branch_at=10).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    out = model(torch.randn(4, 3, 32, 32))
    loss = F.cross_entropy(out["face"][:2], torch.tensor([0, 1])) + F.cross_entropy(out["object"][2:],
                                                                                     torch.tensor([2, 3]))
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_branch_parameters_get_gradients_only_from_their_own_task():
    model = branched("resnet50", branch_at=10).train()
    x = torch.randn(4, 3, 32, 32)
    loss = F.cross_entropy(model(x)["face"], torch.tensor([0, 1, 2, 3]))
    loss.backward()
    pairs = [m for m in model.modules() if isinstance(m, branches.BranchPair)]
    assert pairs
    for pair in pairs:
        face_copy, object_copy = pair.copies
        assert all(p.grad is None or not p.grad.any() for p in object_copy.parameters())
    face_grads = [p.grad for pair in pairs for p in pair.copies[0].parameters() if p.grad is not None]
    assert any(g.abs().sum() > 0 for g in face_grads)
    assert all(p.grad is None for p in model.heads["object"].parameters())
    # the shared trunk before the branch point learns from the face task too
    assert model.trunk.conv1.weight.grad.abs().sum() > 0


def test_both_copies_start_from_the_init_file(tmp_path):
    torch.manual_seed(1)
    donor = network.DualTaskNet("resnet50", TASKS, fc_width=32)
    path = tmp_path / "trunk.pt"
    torch.save(donor.trunk.state_dict(), path)
    model = branched("resnet50", branch_at=14, init=str(path))
    pair = model.trunk.layer4[2]
    assert isinstance(pair, branches.BranchPair)
    for copy in pair.copies:
        assert torch.equal(copy.conv1.weight, donor.trunk.layer4[2].conv1.weight)
    assert torch.equal(model.trunk.conv1.weight, donor.trunk.conv1.weight)


def test_bad_branch_settings_are_refused():
    with pytest.raises(UsageError, match="head='split'"):
        branched("resnet50", branch_at=4, head="joint")
    with pytest.raises(UsageError, match="branch_at=99"):
        branched("resnet50", branch_at=99)
    with pytest.raises(UsageError, match="trunk.layer9"):
        branched("resnet50", branch_at="trunk.layer9")
    model = branched("resnet50", branch_at="trunk.layer3.0")
    assert sites.lesion_sites(model)[8].name == "trunk.layer3.0"
    assert sites.lesion_sites(model)[9].name.startswith(branches.BRANCH_PREFIX)


def branched_config(out_dir, **changes):
    import ResNet

    config = settings.hyperparameters(vars(ResNet))
    config.update(face_data="demo", object_data="demo", image_size=32, epochs=2, max_per_class=8, device="cpu",
                  batch_size=16, out_dir=str(out_dir), stages=["train"], health_check="warn", branch_at=14,
                  lesion_methods=["loss", "random"], lesion_layers=[14, 16], random_repeats=2, rank_images=8,
                  lesion_fractions=[0.0, 0.2])
    config.update(changes)
    return config


def test_a_tasks_loss_ranking_after_the_branch_point_puts_its_own_copy_first():
    model = branched("vgg16", branch_at=10).eval()
    site = sites.lesion_sites(model)[12]
    torch.manual_seed(2)
    batches = [("face", torch.randn(8, 3, 32, 32), torch.arange(8) % 5),
               ("object", torch.randn(8, 3, 32, 32), torch.arange(8) % 4)]
    ranking = rankings.rank_site(model, site, batches, ["face", "object"], ["loss"])
    half = site.n_filters // 2
    for task, own in (("face", range(0, half)), ("object", range(half, 2 * half))):
        scores = np.asarray(ranking["loss"][task]["by_channel"])
        other = np.setdiff1d(np.arange(2 * half), list(own))
        assert np.all(scores[other] == 0)  # the other copy's filters do not touch this task's loss at all
        assert set(ranking["loss"][task]["order"][:half // 4]) <= set(own)


@pytest.mark.slow  # about 2 minutes on 2 cores: three trainings and a loss-ranked sweep of 6,144 filters
def test_a_branched_run_resumes_to_the_same_weights_and_records_each_filters_copy(tmp_path, monkeypatch, capsys):
    a, b = straight_and_resumed(branched_config, tmp_path, monkeypatch, capsys)
    assert any(".copies.1." in k for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    # another branch point is another network: refused, naming the setting as it was trained
    with pytest.raises(UsageError, match="branch_at: 14 -> 4"):
        dualtask.run(branched_config(tmp_path / "resumed", branch_at=4))
    out = tmp_path / "resumed"
    dualtask.run(branched_config(out, stages=["lesion"]))
    rankings = json.loads((out / "rankings.json").read_text())
    assert set(rankings) == {"trunk.layer4.0", "branch:trunk.layer4.2"}
    copies = rankings["branch:trunk.layer4.2"]["branch"]["copy_of_filter"]
    assert copies == ["face"] * 2048 + ["object"] * 2048
    assert "branch" not in rankings["trunk.layer4.0"]
    # a task's most loss-important filters after the branch point lie in its own copy
    top = rankings["branch:trunk.layer4.2"]["loss"]["face"]["order"][:100]
    assert all(copies[f] == "face" for f in top)
    model, config = dualtask.load_run(out)
    assert config["branch_at"] == 14 and model.branch_site == "trunk.layer4.0"


def test_the_branching_point_experiment_writes_accuracy_by_branch_point(tmp_path):
    from dualtask.experiment import aggregate, branching, experiment

    out = tmp_path / "exp"
    config = branched_config(out, branch_at=None, branch_points=[None, 14], seeds=[0], epochs=1, max_classes=4,
                             controls=[], launcher="local")
    experiment.run_experiment(config)
    rows = list(csv.DictReader(open(out / "branching.csv", newline="")))
    assert [(r["branch_point"], r["task"]) for r in rows] == [("shared", "face"), ("shared", "object"),
                                                              ("14", "face"), ("14", "object")]
    assert [int(r["shared_sites"]) for r in rows] == [17, 17, 15, 15]
    assert int(rows[2]["parameters"]) > int(rows[0]["parameters"])  # layer4's last two blocks twice
    for r in rows:
        correct, n = int(r["correct"]), int(r["n_images"])
        assert float(r["accuracy"]) == pytest.approx(correct / n, abs=1e-4)
        assert float(r["ci_low"]) <= float(r["accuracy"]) <= float(r["ci_high"])
    assert rows[2]["folder"] == "branch_14/seed_0"
    assert (out / "figures" / "branching.png").stat().st_size > 10_000
    page = (out / "report.html").read_text()
    assert "Branch points: what sharing the trunk costs" in page
    said = branching.sentences(rows)
    assert len(said) == 2 and said[0].startswith("Sharing the whole trunk costs the face task")
    assert html.escape(said[0]) in page
    # the branch-point runs stay out of the real tasks' statistics
    assert not (out / "summary.csv").exists() or all(
        r["role"] != "real" or r["n_seeds"] == "1" for r in csv.DictReader(open(out / "summary.csv")))
    with pytest.raises(UsageError, match="branch_points"):
        experiment.check_experiment(dict(config, branch_points=[None, 99]))
    assert aggregate.SWEPT_ROLES  # the module's public names are unchanged


def test_branching_costs_are_read_against_the_least_shared_network():
    from dualtask.experiment import branching

    def row(point, shared, task, correct, n=100):
        return {"branch_point": point, "shared_sites": shared, "seed": 0, "task": task, "correct": correct,
                "n_images": n, "chance": "0.1"}

    rows = [row("shared", 17, "face", 60), row("8", 9, "face", 80), row(branching.SEPARATE, 0, "face", 90)]
    costs = branching.costs(rows)
    assert [(c[0], round(c[3], 3), c[6]) for c in costs] == [("shared", 0.3, "separate"), ("8", 0.1, "separate")]
    low, high = costs[0][4], costs[0][5]
    assert low < 0.3 < high and high - low == pytest.approx(2 * 1.96 * (0.9 * 0.1 / 100 + 0.6 * 0.4 / 100) ** 0.5)
    assert "against separate single-task networks" in branching.sentences(rows)[0]


@pytest.mark.slow  # about a minute on 2 cores
def test_a_branched_network_trains_and_sweeps_under_torchrun(tmp_path):
    """DistributedDataParallel over a branched network (every copy takes part in every step's loss, so no
    parameter goes unused) and the sites shared out across 2 CPU processes, post-branch pairs included."""
    from conftest import torchrun_tiny

    out = tmp_path / "ddp"
    p = torchrun_tiny(out, 29541, "--branch_at=14", "--lesion_layers=[14, 16]")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "sites shared out across 2 processes" in p.stdout
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["config"]["branch_at"] == 14 and any(".copies.1." in k for k in state["model"])
    rankings = json.loads((out / "rankings.json").read_text())
    assert set(rankings) == {"trunk.layer4.0", "branch:trunk.layer4.2"}
