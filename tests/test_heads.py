"""The output layer (head="split" or "joint") and the trunk's starting weights (init="random", "imagenet" or a file)."""
import csv
import json
import re
import urllib.error
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, TINY_LESION, run_script

from dualtask.config.settings import BACKBONES
from dualtask.core.common import UsageError
from dualtask.experiment import pipeline as dualtask
from dualtask.model import network
from dualtask.model.network import DualTaskNet
from dualtask.training import trainer

# ResNet50 in the fast suite; the other backbones (each model built and saved takes seconds) with -m slow
EVERY_BACKBONE = [b if b == "resnet50" else pytest.param(b, marks=pytest.mark.slow) for b in BACKBONES]

CLASSES = {"face": 3, "object": 4, "scene": 2}  # three tasks: the middle one's classes sit inside the joint layer


def tiny(backbone, **kw):
    """A cheap network of the backbone: 32-px images, VGG's fully connected layers 16 wide."""
    return DualTaskNet(backbone, kw.pop("classes", CLASSES), fc_width=kw.pop("fc_width", 16), image_size=32, **kw)


class FixedImages:
    """What dualtask.evaluate reads of a task's images: the image array and split (which tasks share images),
    indices of a split, labels, and batches of (images, labels)."""

    def __init__(self, x, y):
        self.x, self.labels = x, y
        self.data = SimpleNamespace(images=x, split=np.zeros(len(y), np.int8), indices=lambda split: np.arange(len(y)))

    def batch(self, idx, channels_last=False):
        return self.x[idx], self.labels[idx]


@pytest.mark.parametrize("backbone", EVERY_BACKBONE)
def test_joint_head_is_one_softmax_over_every_tasks_classes(backbone):
    torch.manual_seed(0)
    model = tiny(backbone, head="joint").eval()
    total = sum(CLASSES.values())
    keys = list(model.state_dict())
    assert "joint.weight" in keys and not any(k.startswith("heads.") or "order" in k for k in keys)
    assert model.tasks == list(CLASSES) and model.joint.out_features == total
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        joint = model.joint(model.trunk(x))  # the joint layer applied directly
    assert list(out) == list(CLASSES) and all(v.shape == (5, total) for v in out.values())
    first = 0
    for task, n in CLASSES.items():
        own = list(range(first, first + n))
        order = own + [c for c in range(total) if c not in own]  # the task's classes first, the others after
        assert torch.allclose(out[task].softmax(1), joint.softmax(1)[:, order], atol=1e-6)
        y = torch.arange(5) % n
        assert torch.allclose(F.cross_entropy(out[task], y), F.cross_entropy(joint, y + first), atol=1e-5)
        first += n
    # a label of one task classified as another task's class is an error (dualtask.evaluate's accuracy)
    with torch.no_grad():
        model.joint.weight.zero_()
        model.joint.bias.zero_()
        model.joint.bias[3 + 1] = 10.0  # every image: object class 1
    images = {t: FixedImages(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 1, 0])) for t in CLASSES}
    scores = trainer.evaluate(model, images, "test")
    assert scores["face"]["accuracy"] == 0 and scores["scene"]["accuracy"] == 0  # labels 1 of theirs: still wrong
    assert scores["object"]["accuracy"] == 0.5
    joint_loss = -torch.log_softmax(model.joint.bias, 0)
    assert scores["face"]["loss"] == pytest.approx(joint_loss[[0, 1, 1, 0]].mean().item(), rel=1e-5)
    assert scores["scene"]["loss"] == pytest.approx(joint_loss[[7, 8, 8, 7]].mean().item(), rel=1e-5)


def test_split_head_is_the_default_and_a_bad_head_is_refused():
    model = network.build_model({"backbone": "vgg16", "fc_width": 16, "image_size": 32}, {"a": 2, "b": 3})
    assert model.head == "split" and set(model.heads) == {"a", "b"} and not hasattr(model, "joint")
    with pytest.raises(UsageError, match="head='both'"):
        tiny("vgg16", head="both")


# torchvision's layout (the trunk's own names) or this tool's (trunk.-prefixed, a whole checkpoint too)
LAYOUTS = {"vgg16": "torchvision", "vgg19": "checkpoint", "resnet50": "torchvision", "resnext50": "project"}


@pytest.mark.parametrize("backbone", EVERY_BACKBONE)
def test_init_from_a_local_file_loads_every_matching_tensor_of_the_trunk(backbone, tmp_path, capsys):
    torch.manual_seed(1)
    source = tiny(backbone, fc_width=32, classes={"a": 5, "b": 6})  # VGG: other fully connected sizes
    state = source.trunk.state_dict()
    if backbone.startswith("vgg"):
        state["classifier.6.weight"] = torch.randn(10, 32)  # torchvision's last layer, which the heads replace
    else:
        state["fc.weight"], state["fc.bias"] = torch.randn(10, 2048), torch.randn(10)
    layout = LAYOUTS[backbone]
    if layout != "torchvision":
        state = {("trunk." + k if not k.startswith(("fc", "classifier.6")) else k): v for k, v in state.items()}
        state.update({f"heads.{k}": v for k, v in source.heads.state_dict().items()})
    if layout == "checkpoint":
        state = {"model": state, "epoch": 3, "config": {"backbone": backbone}, "classes": {}}
    path = tmp_path / f"{backbone}.pt"
    torch.save(state, path)
    torch.manual_seed(0)
    model = network.build_model({"backbone": backbone, "fc_width": 16, "image_size": 32, "init": str(path)},
                                 CLASSES)
    line = capsys.readouterr().out
    theirs, ours = source.trunk.state_dict(), model.trunk.state_dict()
    convs = [n for n, m in model.trunk.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) >= 13 and all(torch.equal(ours[f"{n}.weight"], theirs[f"{n}.weight"]) for n in convs)
    assert all(torch.equal(v, theirs[k]) for k, v in ours.items() if not k.startswith("classifier"))
    assert f"from {path}" in line and "init: loaded" in line
    if backbone.startswith("vgg"):
        n = len(ours) - 4  # classifier.0 and .3 (weight and bias) are sized to fc_width: kept as built
        resized = "classifier.0, classifier.3" if layout == "torchvision" else "trunk.classifier.0, trunk.classifier.3"
        assert f"loaded {n} of " in line and f"skipped {resized} (shape differs)" in line
        assert re.search(r"classifier\.6[^(]*\(not in the trunk\)", line)
    else:
        assert f"loaded {len(ours)} of the {model.arch} trunk's {len(ours)} tensors" in line
        assert re.search(r"\bfc[^(]*\(not in the trunk\)", line)
    if layout != "torchvision":
        assert "heads.a, heads.b" in line


def test_init_errors_name_the_file_and_the_expected_form(tmp_path, monkeypatch):
    model = tiny("vgg16")
    resnet = tmp_path / "resnet.pt"  # names of a ResNet's tensors, none of them in VGG
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}, resnet)
    with pytest.raises(UsageError, match=r"resnet\.pt.*none of its 2 tensors.*matches the vgg16_bn trunk"):
        network.load_trunk_weights(model, str(resnet))
    with pytest.raises(UsageError, match=r"missing\.pt'?: no such file; expected 'random', 'imagenet' or a path"):
        network.load_trunk_weights(model, str(tmp_path / "missing.pt"))
    (tmp_path / "noise.pt").write_bytes(b"not a torch file")  # neither a zip nor a pickle
    with pytest.raises(UsageError, match=r"noise\.pt'?: cannot be read"):
        network.load_trunk_weights(model, str(tmp_path / "noise.pt"))
    torch.save(SimpleNamespace(a=1), tmp_path / "code.pt")  # a Python object, not tensors
    with pytest.raises(UsageError, match=r"code\.pt'?: refused: it holds Python objects"):
        network.load_trunk_weights(model, str(tmp_path / "code.pt"))
    torch.save({"epochs": 3, "note": "no tensors"}, tmp_path / "plain.pt")
    with pytest.raises(UsageError, match=r"plain\.pt'?: not a state dict"):
        network.load_trunk_weights(model, str(tmp_path / "plain.pt"))
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    with pytest.raises(UsageError, match=r"list\.pt'?: not a state dict"):
        network.load_trunk_weights(model, str(tmp_path / "list.pt"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert network.load_trunk_weights(model, "random") == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    # init="imagenet" without a network: never a download here, torchvision's fetch is replaced by a failing one
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    import torchvision

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(UsageError, match=r"init='imagenet': cannot get torchvision's ImageNet weights of vgg16_bn "
                                         r".*network access.*--init=<path"):
        network.load_trunk_weights(model, "imagenet")


def test_a_file_of_another_architecture_exits_2_naming_it(tmp_path):
    resnet = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, resnet)
    p = run_script("vgg16.py", *TINY, "--fc_width=16", "--demo_per_class=3", f"--init={resnet}",
                   "--stages=['train']",
                   f"--out_dir={tmp_path / 'run'}")
    assert p.returncode == 2, p.stderr[-2000:]
    assert str(resnet) in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow  # about 20 s; test_planted sweeps a joint head in the default run
def test_joint_head_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    # the lesion engine reads the joint layer through SiteRunner (every lesion) and rank_site (its tasks); the
    # costly loss ranking adds nothing to that, so the sweep ranks by activation only
    p = run_script("ResNet.py", *TINY, *TINY_LESION, "--lesion_methods=['activation', 'random']",
                   "--ranking_reliability=False", "--head=joint", "--stages=['train', 'lesion']", f"--out_dir={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["head"] == "joint"
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert "joint.weight" in state["model"] and not any(k.startswith("heads.") for k in state["model"])
    assert state["model"]["joint.weight"].shape[0] == 20  # the demo's 10 identities and 10 objects
    with open(out / "lesion_results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["eval_task"] for r in rows} == {"face", "object"} and len({r["layer"] for r in rows}) == 2
    model, config = dualtask.load_run(out)
    assert model.head == "joint" and config["head"] == "joint"
    assert all(v.shape == (1, 20) for v in model(torch.rand(1, 3, 32, 32)).values())
