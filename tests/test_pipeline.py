import csv
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SHARED_DATA, TINY, TINY_LESION, run_script
from helpers import interrupted_at_call, make_vggface2_tree, read_rows, straight_and_resumed, tiny_config

from dualtask.config import settings
from dualtask.core import common
from dualtask.data import demo
from dualtask.experiment import pipeline as dualtask
from dualtask.model import network
from dualtask.training import trainer

LESION_COLUMNS = ["layer", "depth", "n_filters", "target", "method", "fraction", "n_lesioned", "repeat",
                  "eval_task", "accuracy", "loss", "intact_accuracy", "chance"]


def check_config_and_log(config: dict, p, script: str) -> None:
    """config.json's settings and provenance (what made the run), and the progress lines of the log."""
    assert config["image_size"] == 32 and config["tasks"]["face"]["classes"] == 10
    assert config["versions"]["torch"] == torch.__version__ and config["versions"]["scikit-learn"]
    assert set(config["versions"]) == {"python", "torch", "torchvision", "numpy", "scikit-learn", "scipy", "pandas",
                                       "opencv", "pillow"}
    assert config["device_name"].startswith("cpu") and config["command"][1].endswith(script)
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert config["git_commit"].startswith(head.strip())
    # progress in the log, one line per lesion site and per analysis
    assert "lesion site 1/2 " in p.stdout and "lesion site 2/2 " in p.stdout and "s left" in p.stdout
    for part in ("Grad-CAM", "preferred stimuli", "layer-wise decoding"):
        assert part in p.stdout
    assert config["tasks"]["object"]["chance"] == pytest.approx(0.1)


def check_training_and_lesions(out, script: str) -> tuple:
    """train_log.csv, the checkpoint, lesion_results.csv, dissociation.csv, rankings.json and the figures;
    (lesion_results.csv's rows, dissociation.csv's rows)."""
    log = read_rows(out / "train_log.csv")
    assert {(r["task"], r["split"]) for r in log} == {("face", "train"), ("face", "val"), ("object", "train"),
                                                      ("object", "val")}
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and set(state["classes"]) == {"face", "object"}
    with open(out / "lesion_results.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[:len(LESION_COLUMNS)] == LESION_COLUMNS
    rows = read_rows(out / "lesion_results.csv")
    sites = sorted({r["layer"] for r in rows})
    assert len(sites) == 2 and ("trunk.features.2" in sites if script == "vgg16.py" else "trunk.relu" in sites)
    assert {r["target"] for r in rows} == {"face", "object", "random"}
    assert {r["method"] for r in rows} == {"activation", "loss", "random"}
    assert len(rows) == 2 * (2 * 2 + 3) * 2 * 2  # sites x (methods x targets + random repeats) x fractions x tasks
    lesioned = [r for r in rows if r["fraction"] == "0.2000"]
    assert all(int(r["n_lesioned"]) == round(0.2 * int(r["n_filters"])) for r in lesioned)
    assert all(r["accuracy"] == r["intact_accuracy"] for r in rows if r["fraction"] == "0.0000")
    assert all(0 <= float(r["accuracy"]) <= 1 and float(r["loss"]) > 0 for r in lesioned)
    dissociation = read_rows(out / "dissociation.csv")
    assert len(dissociation) == 2 * 2
    # an interval exists only where the index does (a head at chance has no chance-corrected drop)
    assert all(float(r["ci_low"]) <= float(r["ci_high"]) or math.isnan(float(r["index"])) for r in dissociation)
    rankings = json.loads((out / "rankings.json").read_text())
    assert set(rankings) == set(sites)
    assert len(rankings[sites[0]]["random"]) == 3 and set(rankings[sites[0]]["loss"]) == {"face", "object"}
    for name in ("lesion_effects.png", "dissociation_by_depth.png", "training_curves.png"):
        assert (out / "figures" / name).stat().st_size > 10_000
    return rows, dissociation


def check_readouts(out, p, rows: list, dissociation: list) -> None:
    """The same lesions through refitted and through fixed readouts: the same rows, their own accuracies, read by
    the report."""
    def keys(table):
        return [(r["layer"], r["method"], r["target"], r["fraction"], r["eval_task"]) for r in table]

    assert "refitted readouts, site 2/2 " in p.stdout
    refit = read_rows(out / "refit_readout" / "lesion_results.csv")
    assert keys(refit) == keys(rows)
    assert all(0 <= float(r["accuracy"]) <= 1 for r in refit)
    assert len(read_rows(out / "refit_readout" / "dissociation.csv")) == len(dissociation)
    # fixed readouts are on by default: the same rows, and the verdict's table says what both found
    assert "fixed readouts, site 2/2 " in p.stdout
    fixed = read_rows(out / "fixed_readout" / "lesion_results.csv")
    assert keys(fixed) == keys(rows)
    assert len(read_rows(out / "fixed_readout" / "dissociation.csv")) == len(dissociation)
    page = (out / "report.html").read_text()
    assert "Through readouts refitted to the lesioned features" in page and "Refitted readouts</h2>" in page
    assert "Fixed readouts</h2>" in page and "through fixed readouts" in page


# the VGG16 variant takes about 90 s on 2 cores, so it runs with -m slow; ResNet covers the same outputs
@pytest.mark.parametrize("script", [pytest.param("vgg16.py", marks=pytest.mark.slow), "ResNet.py"])
def test_demo_end_to_end_writes_every_output(tmp_path, script):
    out = tmp_path / "run"
    narrow = ["--fc_width=64"] if script.startswith("vgg") else []
    p = run_script(script, *TINY, *TINY_LESION, *narrow, "--refit_readout=True", "--readout_images=40",
                   f"--out_dir={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    check_config_and_log(config, p, script)
    rows, dissociation = check_training_and_lesions(out, script)
    check_readouts(out, p, rows, dissociation)

    # a finished run skips training on rerun, and the lesion sweep skips finished sites
    again = run_script(script, *TINY, *TINY_LESION, *narrow, "--refit_readout=True", "--readout_images=40",
                       f"--out_dir={out}")
    assert again.returncode == 0 and "skipping" in again.stdout and "sites finished earlier" in again.stdout
    assert "refitted readouts, site" not in again.stdout and "fixed readouts, site" not in again.stdout
    model, cfg = dualtask.load_run(out)
    assert cfg["backbone"] == config["backbone"] and not model.training
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32))["object"].shape == (1, 10)


@pytest.mark.slow  # about a minute; the kill -9 table (test_bad_input.py) resumes training in the default run
def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch, capsys):
    a, b = straight_and_resumed(tiny_config, tmp_path, monkeypatch, capsys)
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = [r["epoch"] for r in read_rows(tmp_path / "resumed" / "train_log.csv")]
    assert epochs == ["1"] * 4 + ["2"] * 4


def test_changed_settings_do_not_overwrite_a_run(tmp_path):
    out = tmp_path / "run"
    dualtask.run(tiny_config(out, epochs=1))
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(common.UsageError, match="image_size"):
        dualtask.run(tiny_config(out, epochs=1, image_size=48))
    assert (out / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("make_bad, culprit", [
    (lambda d: [f"--face_data={d / 'nowhere'}"], "nowhere"),
    (lambda d: [f"--object_data={(d / 'empty').mkdir() or d / 'empty'}"], "empty"),
    (lambda d: [f"--face_data={d / 'vgf2'}"], "loose_bb_train.csv"),
    (lambda d: ["--lesion_fractions=[0.2, 2]"], "lesion_fractions"),
    (lambda d: ["--lesion_methods=['activation', 'gradcam']"], "lesion_methods"),
    (lambda d: ["--lesion_layers=['trunk.features.99']"], "trunk.features.99"),
    (lambda d: ["--stages=['lesion']"], "no checkpoint.pt"),
])
def test_bad_input_exits_2_and_keeps_earlier_files(tmp_path, make_bad, culprit):
    make_vggface2_tree(tmp_path / "vgf2", with_boxes=False)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"earlier": true}')
    p = run_script("vgg16.py", *TINY, *make_bad(tmp_path), f"--out_dir={out}")
    assert p.returncode == 2, p.stderr
    assert culprit in p.stderr and "Traceback" not in p.stderr
    assert (out / "config.json").read_text() == '{"earlier": true}'


@pytest.mark.slow  # about two minutes; the kill -9 table kills a sweep at a site in the default run
def test_killed_lesion_sweep_resumes_at_the_unfinished_site(tmp_path, monkeypatch, capsys):
    from dualtask.lesion import rankings
    from dualtask.lesion import sweep as lesion_utils

    lesion = dict(stages=["train", "lesion"], epochs=1, lesion_fractions=[0.0, 0.2], lesion_layers=[0, 5, -1],
                  lesion_methods=["activation", "loss", "random"], random_repeats=2, rank_images=6,
                  ranking_reliability=False)  # one rank_site call per site: the second call is the second site
    dualtask.run(tiny_config(tmp_path / "straight", **lesion))
    real = rankings.rank_site
    monkeypatch.setattr(lesion_utils, "rank_site", interrupted_at_call(2, real))  # at the second site
    with pytest.raises(KeyboardInterrupt):
        dualtask.run(tiny_config(tmp_path / "killed", **lesion))
    partial = read_rows(tmp_path / "killed" / "lesion_results.csv")
    assert {r["layer"] for r in partial} == {"trunk.features.2"}
    monkeypatch.setattr(lesion_utils, "rank_site", real)
    capsys.readouterr()
    dualtask.run(tiny_config(tmp_path / "killed", **lesion))
    assert "1 of 3 sites finished earlier" in capsys.readouterr().out
    for name in ("lesion_results.csv", "dissociation.csv"):
        assert read_rows(tmp_path / "killed" / name) == read_rows(tmp_path / "straight" / name)


def test_keep_only_and_per_class_outputs(tmp_path):
    out = tmp_path / "keep"
    dualtask.run(tiny_config(out, stages=["train", "lesion"], epochs=1, lesion_fractions=[0.0, 0.25],
                             lesion_layers=[-1], random_repeats=1, lesion_keep_only=True, lesion_per_class=True))
    rows = read_rows(out / "lesion_results.csv")
    kept = [r for r in rows if r["fraction"] == "0.2500"]
    assert kept and all(int(r["n_lesioned"]) == int(r["n_filters"]) - round(0.25 * int(r["n_filters"])) for r in kept)
    per_class = read_rows(out / "lesion_per_class.csv")
    assert {r["class"] for r in per_class if r["eval_task"] == "object"} == set(demo.DEMO_OBJECTS)
    assert len(per_class) == len(rows) // 2 * 10 + len(rows) // 2 * 10  # every row of both tasks x 10 classes
    counted = sum(int(r["n_images"]) for r in per_class if r["eval_task"] == "face" and r["target"] == "random"
                  and r["fraction"] == "0.0000")
    assert counted == int(rows[0]["n_images"])


@pytest.mark.slow  # about two minutes on 2 cores; the shared greedy (test_greedy: two gloo processes) keeps the
# distributed code in the default run
def test_torchrun_two_cpu_processes(tmp_path):
    """Training and the lesion sweep under torchrun with 2 CPU processes: the sites are shared out, the greedy
    ranking's candidates at each step too, and the sweep's files are those of one process sweeping the same
    checkpoint."""
    import shutil

    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # the greedy Taylor-pruned to 2 candidates a step (and no split halves), so that it costs seconds here
    sweep = ["--lesion_layers=[0, 8, -1]", "--lesion_methods=['activation', 'greedy', 'random']",
             "--random_repeats=2", "--rank_images=16", "--greedy_candidates=2", "--ranking_reliability=False"]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                        str(ROOT / "ResNeXt.py"), *TINY, *sweep, f"--out_dir={out}", "--stages=['train', 'lesion']"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "sites shared out across 2 processes" in p.stdout
    assert "greedy rankings: each step's candidates shared out across 2 processes" in p.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    log = read_rows(out / "train_log.csv")
    assert len(log) == 4  # one epoch, two tasks, train and val, written once (by rank 0)
    n_train = config["tasks"]["face"]["counts"]["train"]
    assert sum(1 for r in log if r["split"] == "val") == 2
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1 and n_train > 0
    one = tmp_path / "one"  # the same checkpoint swept by one process
    shutil.copytree(out, one)
    for name in ("lesion_results.csv", "dissociation.csv", "rankings.json", "lesion_progress.json",
                 "lesion_per_image.npz"):
        (one / name).unlink()
    import ResNeXt
    from dualtask.experiment import experiment

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process had
    try:
        experiment.main(vars(ResNeXt), [*TINY, *sweep, f"--out_dir={one}", "--stages=['lesion']"])
    finally:
        torch.set_num_threads(threads)
    for name in ("lesion_results.csv", "dissociation.csv", "rankings.json"):
        assert (one / name).read_text() == (out / name).read_text(), name
    sites = [r["layer"] for r in read_rows(out / "lesion_results.csv")]
    assert len(dict.fromkeys(sites)) == 3 and sites == sorted(sites, key=lambda s: list(dict.fromkeys(sites)).index(s))


@pytest.mark.slow
def test_real_photographs_both_heads_beat_chance(tmp_path):
    faces, objects = SHARED_DATA / "lfw_min20", SHARED_DATA / "cifar10"
    if not (faces.exists() and objects.exists()):
        pytest.skip("../shared/data is absent")
    out = tmp_path / "real"
    p = run_script("ResNet.py", f"--face_data={faces}", f"--object_data={objects}", "--image_size=32",
                   "--max_per_class=100", "--max_classes=10", "--epochs=12", "--batch_size=32", "--device=cpu",
                   "--stages=['train']", f"--out_dir={out}", timeout=3000)
    assert p.returncode == 0, p.stderr[-3000:]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    model, config = dualtask.load_run(out)
    datasets = dualtask.load_datasets(config)
    images = {t: trainer.TaskImages(d, torch.device("cpu")) for t, d in datasets.items()}
    test = trainer.evaluate(model, images, "test")
    print({t: round(r["accuracy"], 3) for t, r in test.items()})
    for task, data in datasets.items():
        assert test[task]["accuracy"] > data.chance + 0.1, (task, test[task], state["epoch"])


@pytest.mark.slow  # two tiny runs, about 25 s
def test_run_of_an_older_recipe_is_rebuilt_as_trained(tmp_path):
    """A checkpoint trained before recipe 2 (VGG's 7 x 7 classifier pool at any size) still lesions and
    reports; training it further is refused with the reason, and nothing in it changes."""
    out = tmp_path / "old"
    dualtask.run(tiny_config(out, epochs=1))
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["config"]["recipe"] == settings.RECIPE
    assert state["model"]["trunk.classifier.0.weight"].shape[1] == 512  # 32 px: a 1 x 1 map, not 7 x 7 copies
    old = network.DualTaskNet("vgg16", {t: len(c) for t, c in state["classes"].items()}, fc_width=32,
                               image_size=32, recipe=1)
    assert old.trunk.classifier[0].in_features == 512 * 49
    del state["config"]["recipe"], state["config"]["optimizer"]  # SGD, before the setting existed
    state["config"].update(lr=0.01, grad_clip=2.0, weight_decay=5e-4)  # the old scripts' settings
    state["model"] = old.state_dict()
    torch.save(state, out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(common.UsageError, match="older recipe"):
        dualtask.run(tiny_config(out, epochs=2))
    lesion = dict(epochs=1, stages=["train", "lesion"], lesion_layers=[0, -1], lesion_fractions=[0.0, 0.2],
                  random_repeats=2, rank_images=8)
    as_trained = "pass --optimizer='sgd' --lr=0.01 --weight_decay=0.0005 --grad_clip=2.0 to use it as it was trained"
    with pytest.raises(common.UsageError, match=re.escape(as_trained)):
        dualtask.run(tiny_config(out, **lesion))
    dualtask.run(tiny_config(out, optimizer="sgd", lr=0.01, weight_decay=5e-4, grad_clip=2.0, **lesion))
    assert (out / "checkpoint.pt").read_bytes() == before
    assert len(read_rows(out / "lesion_results.csv")) > 0
    model, config = dualtask.load_run(out)
    assert model.trunk.classifier[0].in_features == 512 * 49
