"""The tasks setting and tasks that share their images (identity and expression on the same faces)."""
import csv
import json

import numpy as np
import pytest
from conftest import run_script
from helpers import make_kdef

from dualtask.config import settings
from dualtask.core.common import UsageError
from dualtask.data import loading as vggface2
from dualtask.data import taskdata
from dualtask.experiment import aggregate
from dualtask.experiment import pipeline as dualtask


def test_source_groups_share_one_source_and_keep_separate_demo_sets_apart(tmp_path):
    assert vggface2.source_groups({"identity": "demo", "expression": "demo"}) == [["identity", "expression"]]
    assert vggface2.source_groups({"face": "demo", "object": "demo"}) == [["face"], ["object"]]
    # a third task of its own beside a shared pair
    assert vggface2.source_groups({"face": "demo", "object": "demo", "emotion": "demo"}) == [["face", "emotion"],
                                                                                           ["object"]]
    folder = tmp_path / "kdef"
    folder.mkdir()
    assert vggface2.source_groups({"identity": str(folder), "expression": str(folder) + "/",
                                   "object": "demo"}) == [["identity", "expression"], ["object"]]


def test_shared_demo_faces_carry_both_labels_on_one_image_array():
    config = {"tasks": {"identity": "demo", "expression": "demo"}, "image_size": 32, "seed": 0, "max_per_class": 12,
              "max_classes": None, "demo_per_class": 12, "role": "real"}
    data = dualtask.load_datasets(config)
    ident, expr = data["identity"], data["expression"]
    assert ident.images is expr.images and np.array_equal(ident.split, expr.split)
    assert len(ident.classes) == 10 and expr.classes == ["neutral", "happy", "sad", "surprised"]
    assert np.array_equal(expr.labels, ident.extra["expression"] if "expression" in ident.extra else expr.labels)
    assert len(set(expr.labels.tolist())) == 4 and not np.array_equal(ident.labels, expr.labels)
    assert vggface2.shared_groups(data) == [["identity", "expression"]]
    # the resolution-matched control keeps them on one array; the pseudo-task control is refused
    matched = dualtask.load_datasets(dict(config, role="resolution_matched"))
    assert matched["identity"].images is matched["expression"].images
    with pytest.raises(taskdata.DataError, match="share their images"):
        dualtask.load_datasets(dict(config, role="pseudo_task"))


@pytest.mark.parametrize("tasks, culprit", [
    ({"identity": "demo"}, "at least two"),
    ("identity", "a dict"),
    ({"bad name": "demo", "b": "demo"}, "bad name"),
    ({"a": "", "b": "demo"}, "a=''"),
])
def test_bad_tasks_settings_are_refused(tasks, culprit):
    config = {**settings.hyperparameters(vars(__import__("ResNet"))), "tasks": tasks}
    with pytest.raises(UsageError, match=culprit):
        settings.check_config(config)


def test_two_tasks_choosing_the_same_labels_of_one_source_are_refused():
    config = {"tasks": {"identity": "demo:faces", "face": "demo:faces"}, "image_size": 32, "seed": 0,
              "max_per_class": 6, "max_classes": None, "demo_per_class": 6, "role": "real"}
    with pytest.raises(taskdata.DataError, match="both choose"):
        dualtask.load_datasets(config)


def test_paired_bootstrap_keeps_the_correlation_of_one_image_outcomes():
    """When the lesions hit the same images for both tasks, the index's terms rise and fall together: a paired
    resample (one draw of images for both tasks) shows the larger spread that an independent one hides."""
    rng = np.random.default_rng(0)
    n = 400
    hit = rng.random(n) < 0.5  # images where each task's own-filter lesion costs the answer
    ones = np.ones(n, bool)
    correct = {("intact", "a"): ones, ("intact", "b"): ones, ("a", "a"): ~hit, ("b", "a"): ones,
               ("b", "b"): ~hit, ("a", "b"): ones}
    chance = {"a": 0.1, "b": 0.1}
    point, unpaired = aggregate.image_draws(correct, chance, "a", "b", 4000, np.random.default_rng(1))
    point2, paired = aggregate.image_draws(correct, chance, "a", "b", 4000, np.random.default_rng(1), paired=True)
    assert point == point2 == pytest.approx(2 * hit.mean() / 0.9)
    # perfectly correlated terms: the paired sd is sqrt(2) times the independent one
    assert np.std(paired) / np.std(unpaired) == pytest.approx(np.sqrt(2), rel=0.1)


@pytest.mark.slow  # about a minute (its figures stage); the KDEF test below covers training and lesions quickly
def test_identity_and_expression_on_the_same_demo_faces_end_to_end(tmp_path):
    """The issue's command, smaller: both heads train on the same images; lesions, report and the CAM overlap
    test are written."""
    out = tmp_path / "run"
    p = run_script("ResNet.py", "--tasks={'identity': 'demo', 'expression': 'demo'}", "--image_size=32", "--epochs=1",
                   "--max_per_class=12", "--demo_per_class=12", "--lesion_layers=[0, 16]",
                   "--lesion_fractions=[0.0, 0.2]", "--random_repeats=3", "--rank_images=8", "--stimulus_steps=5",
                   "--batch_size=32", "--device=cpu", "--health_check=warn", f"--out_dir={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "identity and expression on the same images" in p.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["shared_images"] == [["identity", "expression"]]
    assert config["tasks"]["identity"]["source"] == config["tasks"]["expression"]["source"]
    assert config["tasks"]["identity"]["counts"] == config["tasks"]["expression"]["counts"]
    assert config["tasks"]["expression"]["classes"] == 4
    with open(out / "train_log.csv", newline="") as f:
        log = list(csv.DictReader(f))
    assert {r["task"] for r in log} == {"identity", "expression"}
    with open(out / "lesion_results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["eval_task"] for r in rows} == {"identity", "expression"}
    assert (out / "dissociation.csv").exists() and (out / "report.html").exists()
    with open(out / "gradcam_overlap.csv", newline="") as f:
        overlap = list(csv.DictReader(f))
    assert overlap and "p_permutation" in overlap[0]


def test_a_kdef_folder_trains_identity_and_expression_from_the_same_photographs(tmp_path):
    root = make_kdef(tmp_path / "KDEF", expressions=("AF", "AN", "DI", "HA", "NE", "SA", "SU"), views=("S",))
    out = tmp_path / "run"
    p = run_script("ResNet.py", f"--tasks={{'identity': '{root}', 'expression': '{root}'}}", "--image_size=32",
                   "--epochs=1", "--batch_size=16", "--stages=['train', 'lesion']", "--lesion_layers=[0]",
                   "--lesion_fractions=[0.0, 0.2]", "--lesion_methods=['activation', 'random']", "--random_repeats=2",
                   "--rank_images=8", "--ranking_reliability=False", "--device=cpu", "--health_check=warn",
                   f"--out_dir={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["shared_images"] == [["identity", "expression"]]
    assert config["tasks"]["identity"]["classes"] == 4 and config["tasks"]["expression"]["classes"] == 7
    assert config["tasks"]["identity"]["counts"] == config["tasks"]["expression"]["counts"]
    assert sum(config["tasks"]["identity"]["counts"].values()) == 4 * 7 * 2  # people x expressions x sessions
    with open(out / "lesion_results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["eval_task"] for r in rows} == {"identity", "expression"}
