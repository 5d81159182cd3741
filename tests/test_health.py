"""Training health: a dead layer is caught, a run at chance stops with its cause, a warning reaches the report."""
import json
import math

import pytest
import torch
from conftest import TINY, run_script

from dualtask.core import names as names_mod
from dualtask.model.network import DualTaskNet
from dualtask.report import build as report
from dualtask.report import train_health
from dualtask.training import health

CONFIG = {"backbone": "vgg16", "batch_norm": False, "lr": None, "grad_clip": 2.0, "lesion_layers": None}


def _model():
    torch.manual_seed(0)
    return DualTaskNet("vgg16", {"face": 3, "object": 4}, batch_norm=False, fc_width=16, image_size=32).eval()


def test_dead_fully_connected_layer_is_found_and_named():
    model = _model()
    layers = health.monitored_layers(model, CONFIG)
    names = [n for n, _ in layers]
    assert names[:2] == ["trunk.classifier.0", "trunk.classifier.3"] and "trunk.features.29" in names
    x = torch.randn(8, 3, 32, 32)
    alive = health.dead_fractions(model, layers, x)
    assert alive["trunk.classifier.0"] < 1.0
    with torch.no_grad():
        model.trunk.classifier[0].bias.fill_(-1e4)  # every unit of the first fully connected layer dies
    dead = health.dead_fractions(model, layers, x)
    assert dead["trunk.classifier.0"] == 1.0
    assert dead["trunk.features.1"] == alive["trunk.features.1"]  # the conv layers before it are untouched
    found = health.diagnose(1, _train(1.0, 1.2), _val(0.5, 0.5), {"face": 1 / 3, "object": 0.25}, dead,
                            {"mean": 1.0, "max": 2.0}, CONFIG, 0.0025)
    # the layer after it gets nothing but its zero biases, so it is dead too
    assert [p["kind"] for p in found] == ["dead layer", "dead layer"] and "trunk.classifier.3 is dead" in \
        found[1]["message"]
    message = found[0]["message"]
    assert "trunk.classifier.0 is dead at epoch 1" in message and "100%" in message
    assert "lower lr" in message and "batch_norm=True" in message  # what to change


def test_dead_conv_filters_are_counted_per_site():
    model = _model()
    layers = health.monitored_layers(model, dict(CONFIG, lesion_layers=[0, 1]))
    assert [n for n, _ in layers] == ["trunk.classifier.0", "trunk.classifier.3", "trunk.features.1",
                                      "trunk.features.3"]
    with torch.no_grad():
        model.trunk.features[0].bias[:16] = -1e4  # 16 of the first conv's 64 filters never fire
    dead = health.dead_fractions(model, layers, torch.randn(4, 3, 32, 32))
    assert dead["trunk.features.1"] == pytest.approx(0.25)
    assert health.diagnose(1, _train(), _val(0.6, 0.6), {"face": 1 / 3, "object": 0.25}, dead,
                           {"mean": 1.0, "max": 1.0}, CONFIG, 0.01) == []  # a quarter dead is a caveat, not a stop
    caveats = train_health.caveats({"epochs": [health.epoch_record(3, dead, {"mean": 1, "max": 1})], "problems": []},
                             {"trunk.features.1"})
    assert len(caveats) == 1 and "trunk.features.1 25%" in caveats[0]


def _val(a, b, n=100):
    return {"face": {"loss": 1.0, "accuracy": a, "n": n}, "object": {"loss": 1.0, "accuracy": b, "n": n}}


def _train(face_loss=1.0, object_loss=1.0, face_acc=0.5, object_acc=0.5):
    return {"face": {"loss": face_loss, "accuracy": face_acc}, "object": {"loss": object_loss, "accuracy": object_acc}}


@pytest.mark.parametrize("loss, grad, kind", [(float("nan"), 1.0, "loss exploded"), (50.0, 1.0, "loss exploded"),
                                              (1.0, float("inf"), "loss exploded")])
def test_exploding_loss_is_named(loss, grad, kind):
    val = _val(0.5, 0.5)
    val["face"]["loss"] = loss if math.isfinite(loss) else 1.0  # a loss that stays high to the epoch's end
    found = health.diagnose(2, _train(loss), val, {"face": 0.1, "object": 0.1}, {},
                            {"mean": grad, "max": grad}, dict(CONFIG, grad_clip=0.0), 0.02)
    assert [p["kind"] for p in found] == [kind]
    assert "lower lr" in found[0]["message"] and "set grad_clip" in found[0]["message"]
    clipped = health.diagnose(2, _train(loss), val, {"face": 0.1, "object": 0.1}, {},
                              {"mean": grad, "max": grad}, CONFIG, 0.02)
    assert "lower lr" in clipped[0]["message"] and "grad_clip" not in clipped[0]["message"]  # it is already set


def test_a_training_spike_the_network_recovers_from_is_not_an_explosion():
    # 2 steps an epoch: one wild early step lifts the epoch's mean, the validation loss at its end is sound
    found = health.diagnose(1, _train(5.6), _val(0.5, 0.5), {"face": 0.1, "object": 0.1}, {},
                            {"mean": 8.0, "max": 9.0}, CONFIG, 0.1)
    assert found == []


def test_head_at_chance_only_after_a_few_epochs_with_its_cause():
    chances = {"face": 0.1, "object": 0.1}
    at_chance = _val(0.62, 0.11)
    stuck = _train(1.0, 2.3, 0.6, 0.1)
    grad = {"mean": 1, "max": 1}
    assert health.diagnose(health.CHANCE_EPOCH - 1, stuck, at_chance, chances, {}, grad, CONFIG, 0.01) == []
    late = health.diagnose(health.CHANCE_EPOCH, stuck, at_chance, chances, {}, grad, CONFIG, 0.01)
    assert [p["kind"] for p in late] == ["head at chance"] and "the object head is at chance" in late[0]["message"]
    assert "raise lr" in late[0]["message"]  # training accuracy at chance too: the steps do not move it
    memorises = health.diagnose(3, _train(1.0, 0.5, 0.6, 0.9), at_chance, chances, {}, grad, CONFIG, 0.01)
    assert "learns its training images, not the task" in memorises[0]["message"]
    assert "max_per_class" in memorises[0]["message"]
    dead = health.diagnose(3, stuck, at_chance, chances, {"trunk.classifier.0": 1.0}, grad, CONFIG, 0.01)
    assert [p["kind"] for p in dead] == ["dead layer", "head at chance"]
    assert "the dead layer trunk.classifier.0 is the cause" in dead[1]["message"]
    # a long run gives a late starter half of its epochs (plain VGG16's demo object head left chance at epoch 6 of 15)
    assert health.first_chance_epoch(15) == 8 and health.first_chance_epoch(4) == health.CHANCE_EPOCH
    long_run = dict(CONFIG, epochs=15)
    assert health.diagnose(7, stuck, at_chance, chances, {}, grad, long_run, 0.01) == []
    assert len(health.diagnose(8, stuck, at_chance, chances, {}, grad, long_run, 0.01)) == 1
    # 0.16 on 100 images is within two standard errors of 0.1: still chance; 0.2 is not
    assert len(health.diagnose(3, stuck, _val(0.6, 0.16), chances, {}, grad, CONFIG, 0.01)) == 1
    assert health.diagnose(3, stuck, _val(0.6, 0.2), chances, {}, grad, CONFIG, 0.01) == []


STUCK = [a for a in TINY if not a.startswith(("--epochs", "--health_check"))] + [
    "--epochs=4", "--lr=1e-9", "--fc_width=16", "--demo_per_class=20", "--lesion_layers=[0]",
    "--lesion_methods=['activation', 'random']", "--random_repeats=2", "--rank_images=8", "--stimulus_steps=5"]


def test_run_at_chance_stops_with_the_cause_and_keeps_its_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    p = run_script("vgg16.py", *STUCK, f"--out_dir={out}")
    assert p.returncode == 1, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: training stopped after epoch {health.CHANCE_EPOCH}: ")
    assert "head is at chance after 3 epochs" in last and "raise lr" in last and "--health_check=warn" in last
    assert "Traceback" not in p.stderr
    assert "health: grad norm mean" in p.stdout and "dead units trunk.classifier.0" in p.stdout
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == health.CHANCE_EPOCH  # the epoch that showed it is kept, nothing after it ran
    record = json.loads((out / names_mod.HEALTH_FILE).read_text())
    assert [e["epoch"] for e in record["epochs"]] == [1, 2, 3]
    assert all(math.isfinite(e["grad_norm_mean"]) for e in record["epochs"])
    assert set(record["epochs"][0]["dead"]) == {"trunk.classifier.0", "trunk.classifier.3", "trunk.features.2"}
    assert {p["kind"] for p in record["problems"]} == {"head at chance"}
    assert not (out / "lesion_results.csv").exists()
    # run again: it resumes, trains the last epoch, is still at chance and stops; a third run does not skip
    # to the lesions of a network that never learned
    # (the script's entry point in this process: the shell's view was checked above)
    import vgg16
    from dualtask.experiment import experiment

    for expected in ("resuming from epoch 3", "training stopped after its last epoch (4)"):
        with pytest.raises(SystemExit) as exit_:
            experiment.main(vars(vgg16), [*STUCK, f"--out_dir={out}"])
        printed = capsys.readouterr()
        assert exit_.value.code == 1 and expected in printed.out + printed.err
        assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 4
    assert not (out / "lesion_results.csv").exists()


@pytest.mark.slow  # about a minute; the caveats themselves are tested above without training
def test_warn_goes_on_and_the_report_says_why(tmp_path):
    out = tmp_path / "run"
    p = run_script("vgg16.py", *STUCK, "--health_check=warn", "--stages=['train']", f"--out_dir={out}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "warning: the " in p.stderr and "head is at chance" in p.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 4
    record = train_health.read(out)
    assert {p["epoch"] for p in record["problems"]} == {3, 4}
    page = report.build_report(out).read_text()
    summary = page[page.index("Summary"):page.index("Intact accuracy")]
    assert "Training health (head at chance, epochs 3, 4)" in summary and "raise lr" in summary
