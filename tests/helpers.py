"""Builders that several test files share: fake data-set trees on disk, tiny networks with their batches, tiny
run settings and resumed runs, run folders written directly, and the table runner of the bad-data cases.
(conftest.py holds what must load before any test module: the thread count, the marks, the subprocess runners and
the benchmark loader; this module imports torch, so the test files that need it import it, after conftest.py has
set OMP_NUM_THREADS.)"""
import csv
import hashlib
import json
import os
import pickle
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import ROOT, run_script, write_jpeg

from dualtask.config import settings
from dualtask.core.common import write_csv
from dualtask.data import cifar10, kdef
from dualtask.data.taskdata import DataError
from dualtask.experiment import pipeline as dualtask
from dualtask.lesion import dissociation as dissociation_mod
from dualtask.lesion import greedy
from dualtask.model import network
from dualtask.training import trainer as training

# ----------------------------------------------------------------------------------------------------------
# data sets on disk


def make_vggface2_tree(root, identities=3, per_identity=6, with_boxes=True):
    """VGGFace2's layout; each photo is grey with a coloured square (the 'face') where the box says."""
    rows = ["NAME_ID,X,Y,W,H"]
    for i in range(identities):
        ident = f"n{i + 1:06d}"
        colour = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]][i % 4])
        for j in range(per_identity):
            img = np.full((120, 100, 3), 128, np.uint8)
            x, y = 10 + 3 * j, 20 + 2 * j
            img[y:y + 50, x:x + 50] = colour
            write_jpeg(root / "train" / ident / f"{j + 1:04d}_01.jpg", img)
            rows.append(f"{ident}/{j + 1:04d}_01,{x},{y},50,50")
    (root / "test" / "n000999").mkdir(parents=True)
    if with_boxes:
        (root / "bb_landmark").mkdir()
        (root / "bb_landmark" / "loose_bb_train.csv").write_text("\n".join(rows) + "\n")
    return root


def make_class_folders(root, classes=("cat", "dog", "fox"), per_class=10, size=20):
    rng = np.random.default_rng(0)
    for ci, c in enumerate(classes):
        for j in range(per_class):
            write_jpeg(root / c / f"{j}.jpg", np.clip(rng.normal(60 * ci + 40, 10, (size, size + 6, 3)), 0, 255))
    return root


def write_cifar_root(root, per_batch=20):
    """CIFAR-10's python batch format, as torchvision expects it under cifar-10-batches-py/."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    expected = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(v) for v in np.arange(per_batch) % 10]
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        expected[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data,
                         "filenames": [f"{k}.png" for k in range(per_batch)]}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(cifar10.CIFAR_CLASSES), "num_cases_per_batch": per_batch}, f)
    return expected


def make_lfw(root, people=("Ann_Lee", "Bo_Ray"), per=10, names=None, size=250):
    """LFW's layout: 250 x 250 frames, blue, with a red square (90..160) in the middle where LFW's face is."""
    frame = np.zeros((250, 250, 3), np.uint8)
    frame[..., 2] = 255
    frame[90:160, 90:160] = (255, 0, 0)
    frame = frame[:size, :size]
    for person in people:
        for i in range(per):
            write_jpeg(root / person / (names or "{p}_{i:04d}.jpg").format(p=person, i=i + 1), frame)
    return root


KDEF_PEOPLE = ("F01", "F02", "M01", "M02")


def make_kdef(root, people=KDEF_PEOPLE, expressions=("AF", "AN", "HA", "NE"), views=("S", "HL"), sessions="AB"):
    """The release's layout (one folder per session and person); each photograph's colour encodes its person
    (red), expression (green) and view (blue), so labels can be checked against pixels."""
    codes = list(kdef.KDEF_EXPRESSIONS)
    for session in sessions:
        for pi, person in enumerate(people):
            for expr in expressions:
                for view in views:
                    colour = (40 + 40 * pi, 30 + 30 * codes.index(expr), 60 + 120 * (view != "S"))
                    write_jpeg(root / f"{session}{person}" / f"{session}{person}{expr}{view}.JPG",
                               np.tile(np.array(colour, np.uint8), (12, 10, 1)))
    return root

# ----------------------------------------------------------------------------------------------------------
# tiny networks and their batches


N_CLASSES = 4  # per task; a class is which of four positions lights up


class PlantedNet(nn.Module):
    """Faces light one pixel of the left column, objects one of the right column (one input channel).

    trunk.1 (8 channels): every channel is a copy of the image, so every channel carries both tasks and
    losing a few copies changes nothing (no planted structure).
    trunk.3 (16 channels): channels 0-3 detect the face positions only, 4-7 the object positions only,
    8-15 are constant (they carry nothing). Detectors have a threshold, so noise alone rarely lights one. The face
    head reads 0-3, the object head reads 4-7.
    """

    def __init__(self, head="split"):
        super().__init__()
        self.head = head
        copies = nn.Conv2d(1, 8, 1)
        detect = nn.Conv2d(8, 16, (4, 2))
        with torch.no_grad():
            copies.weight.fill_(1.0)
            copies.bias.zero_()
            detect.weight.zero_()
            detect.bias.zero_()
            for k in range(N_CLASSES):
                detect.weight[k, :, k, 0] = 1.0 / 8  # face position k (left column), summed over the copies
                detect.weight[4 + k, :, k, 1] = 1.0 / 8  # object position k (right column)
            detect.bias[:8] = -0.4  # a threshold: noise alone rarely lights a detector
            detect.bias[8:] = 0.5
        self.trunk = nn.Sequential(copies, nn.ReLU(), detect, nn.ReLU(), nn.Flatten(1))
        self.tasks = ["face", "object"]
        if head == "split":
            self.heads = nn.ModuleDict({"face": nn.Linear(16, N_CLASSES), "object": nn.Linear(16, N_CLASSES)})
            layers = ((self.heads["face"], 0, 0), (self.heads["object"], 4, 0))
        else:  # one softmax over all 8 classes, as dualtask's head="joint": face classes 0-3, object classes 4-7
            self.joint = nn.Linear(16, 2 * N_CLASSES)
            self.register_buffer("joint_order", network.joint_order([N_CLASSES, N_CLASSES]), persistent=False)
            layers = ((self.joint, 0, 0), (self.joint, 4, N_CLASSES))
        with torch.no_grad():
            for layer, first, row in layers:
                layer.weight[row:row + N_CLASSES].zero_()
                layer.bias[row:row + N_CLASSES].zero_()
                for k in range(N_CLASSES):
                    layer.weight[row + k, first + k] = 8.0

    def head_outputs(self, features):
        if self.head == "split":
            return {t: h(features) for t, h in self.heads.items()}
        logits = self.joint(features)
        return {t: logits.index_select(1, self.joint_order[i]) for i, t in enumerate(self.tasks)}

    def forward(self, x):
        return self.head_outputs(self.trunk(x))


def planted_batches(n_per_class, seed, noise=0.3):
    rng = np.random.default_rng(seed)
    batches = []
    for task, column in (("face", 0), ("object", 1)):
        labels = np.repeat(np.arange(N_CLASSES), n_per_class)
        x = rng.normal(0, noise, (len(labels), 1, 4, 2)).astype(np.float32)
        x[np.arange(len(labels)), 0, labels, column] += 1.0
        batches.append((task, torch.from_numpy(x), torch.from_numpy(labels)))
    return batches


class RandomNet(nn.Module):
    """A tiny random conv net with two heads (sites trunk.1: 8 filters, trunk.3: 48 filters)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 48, 3, padding=1),
                                   nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(1))
        self.tasks = ["a", "b"]
        self.heads = nn.ModuleDict({t: nn.Linear(192, 5) for t in self.tasks})
        with torch.no_grad():  # logits large enough that single filters move the loss
            for h in self.heads.values():
                h.weight.mul_(8)

    def forward(self, x):
        f = self.trunk(x)
        return {t: h(f) for t, h in self.heads.items()}


def random_batches(n_per_task=192, seed=0, batch=80):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for task in ("a", "b"):
        x, y = torch.randn(n_per_task, 3, 8, 8, generator=g), torch.randint(0, 5, (n_per_task,), generator=g)
        batches += [(task, x[s:s + batch], y[s:s + batch]) for s in range(0, n_per_task, batch)]
    return batches


def top(order, n_filters, stop=0.2):
    return set(np.asarray(order)[:greedy.greedy_chosen(n_filters, stop)].tolist())


# ----------------------------------------------------------------------------------------------------------
# tiny runs

_SCRIPTS = {}


def _script(name: str):
    """A backbone script (vgg16, ResNet, ...) as a module, loaded once."""
    if name not in _SCRIPTS:
        _SCRIPTS[name] = settings.load_script(ROOT / f"{name}.py")
    return _SCRIPTS[name]


# the tiny runs of the experiment tests (and of the SLURM ones): seconds per job
FAST = ["--image_size=16", "--epochs=1", "--max_per_class=8", "--max_classes=3", "--batch_size=24", "--device=cpu",
        "--health_check=warn", "--lesion_layers=[0, -1]", "--lesion_fractions=[0.0, 0.25]", "--random_repeats=2",
        "--rank_images=8", "--stages=['train', 'lesion']"]


def tiny_config(out_dir, **changes):
    """vgg16.py's settings for a 2-epoch demo training at 32 px (stages: train), with `changes`."""
    config = settings.hyperparameters(vars(_script("vgg16")))
    config.update(face_data="demo", object_data="demo", image_size=32, epochs=2, max_per_class=12, fc_width=32,
                  device="cpu", batch_size=16, out_dir=str(out_dir), stages=["train"], health_check="warn")
    config.update(changes)
    return config


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def interrupted_at_call(n, function):
    """`function`, except that its n-th call raises KeyboardInterrupt (a run killed at that moment)."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return function(*args, **kwargs)

    return wrapped


def straight_and_resumed(make_config, tmp_path, monkeypatch, capsys) -> tuple:
    """Train a 2-epoch run straight through, and again killed in its second epoch then resumed: the two
    checkpoints' weights (the resumed run's output checked to say it resumed)."""
    dualtask.run(make_config(tmp_path / "straight"))
    real_evaluate = training.evaluate
    monkeypatch.setattr(training, "evaluate", interrupted_at_call(2, real_evaluate))  # in epoch 2
    with pytest.raises(KeyboardInterrupt):
        dualtask.run(make_config(tmp_path / "resumed"))
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(training, "evaluate", real_evaluate)
    capsys.readouterr()
    dualtask.run(make_config(tmp_path / "resumed"))
    assert "resuming from epoch 1" in capsys.readouterr().out
    return tuple(torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["model"]
                 for name in ("straight", "resumed"))


# ----------------------------------------------------------------------------------------------------------
# a run folder's files, written directly (what the report reads)


def random_rows(drops: dict, fraction="0.2000") -> list:
    """lesion_results.csv's rows of random lesions: drops {site: (face drops, object drops), one per order}."""
    return [{"layer": site, "method": "random", "target": "random", "repeat": r, "fraction": fraction,
             "eval_task": task, "corrected_drop": f"{d:.4f}", "intact_accuracy": 0.8, "n_images": 200,
             "chance": 0.1}
            for site, per_task in drops.items() for task, ds in zip(("face", "object"), per_task)
            for r, d in enumerate(ds)]


def make_run(path, dissociation, intact=(("face", 0.8, 0.1), ("object", 0.7, 0.1)), repeats=5, rankings=None,
             random_drops=None):
    """A run folder with the files the report reads: config.json, lesion_results.csv, dissociation.csv;
    random_drops: the random lesions' drops by site (`random_rows`), without which the report has no joint null
    and corrects by Holm."""
    path.mkdir()
    tasks = {t: {"classes": 10, "chance": c, "source": "demo", "counts": {"train": 80, "val": 20, "test": 200}}
             for t, _, c in intact}
    config = {"backbone": "vgg16", "seed": 0, "lesion_methods": ["activation", "loss", "random"],
              "random_repeats": repeats, "tasks": tasks}
    (path / "config.json").write_text(json.dumps(config))
    write_csv(path / "lesion_results.csv", dissociation_mod.LESION_COLUMNS,
              [{"eval_task": t, "intact_accuracy": a, "n_images": 200, "chance": c} for t, a, c in intact] +
              random_rows(random_drops or {}))
    rows = []
    for layer, depth, method, index, low, high, p in dissociation:
        rows.append({"layer": layer, "depth": depth, "method": method, "fraction": "0.2000", "task_a": "face",
                     "task_b": "object", "index": index, "ci_low": low, "ci_high": high, "p_index": p,
                     # each task's own filters cost it index/2, the other's nothing: the drops make the index
                     "drop_a_by_a": f"{index / 2:.4f}", "drop_a_by_b": 0.0, "drop_b_by_b": f"{index / 2:.4f}",
                     "drop_b_by_a": 0.0,
                     "p_a_by_a": p, "p_b_by_b": p, "n_random": repeats, "null_low": -0.1, "null_high": 0.1})
    write_csv(path / "dissociation.csv", dissociation_mod.DISSOCIATION_COLUMNS, rows)
    if rankings:
        (path / "rankings.json").write_text(json.dumps(rankings))
    return path

# ----------------------------------------------------------------------------------------------------------
# the bad-data table (tests/test_bad_data_caches.py, tests/test_bad_data_sources.py): each case builds its input
# in tmp_path and is either refused or loaded right, and leaves every file present before it byte-identical


SIZE = 16  # pixels of every loaded image: the cases stay fast


class Evil:
    """Runs a command when unpickled: what a hostile file carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


@dataclass
class Refused:
    """DataError (or exit status 2) whose message contains every culprit."""

    culprits: tuple


@dataclass
class Loaded:
    """Runs; check(result, stderr, tmp_path) asserts the values. `changes`: top-level names it may rewrite."""

    check: object
    changes: tuple = ()


def refused(*culprits):
    return Refused(culprits)


def vgf2(tmp, identities=2, per_identity=3):
    return make_vggface2_tree(tmp / "vgf2", identities=identities, per_identity=per_identity)


def check_classes(classes, dropped, stderr_has=()):
    def check(data, err, tmp):
        assert data.classes == classes and data.chance == pytest.approx(1 / len(classes))
        assert set(np.unique(data.labels)) == set(range(len(classes)))
        assert f"left out {len(dropped)} class(es)" in err and all(d in err for d in dropped)
        assert all(s in err for s in stderr_has)
        assert all((data.split[data.labels == k] == 0).any() for k in range(len(classes)))
    return check


def disk_digest(folder):
    """{relative path: sha256, or 'dir'} of everything under folder."""
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def bad_data_case(build, expect, tmp_path, capsys):
    """One case of the table: `build(tmp_path)` gives vggface2.py's arguments (a list) or a function that loads;
    `expect` is Refused (DataError naming the culprits; from `python vggface2.py`, status 2 and one line
    "error: ..." without a traceback) or Loaded (its check passes). Every file there before is byte-identical
    after, except the top-level names in Loaded.changes, and nothing was written beside them."""
    run = build(tmp_path)
    before = disk_digest(tmp_path)
    capsys.readouterr()
    if isinstance(run, list):  # vggface2.py's command line
        result = run_script("vggface2.py", *run)
        err = message = result.stderr
        assert "Traceback" not in err
        if isinstance(expect, Refused):
            lines = err.strip().splitlines()
            assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    elif isinstance(expect, Refused):
        with pytest.raises(DataError) as caught:
            run()
        message = str(caught.value)
        assert "\n" not in message
    else:
        result, err = run(), capsys.readouterr().err
    if isinstance(expect, Refused):
        for culprit in expect.culprits:
            assert culprit in message, message
    else:
        expect.check(result, err, tmp_path)
    after = disk_digest(tmp_path)
    changes = getattr(expect, "changes", ())
    kept = {k: v for k, v in before.items() if k.split(os.sep)[0] not in changes}
    assert {k: after.get(k) for k in kept} == kept  # everything there before is byte-identical
    new = {k for k in after if k not in before and k.split(os.sep)[0] not in changes}
    assert not new, new  # and nothing was written beside it (a refused --out, an unpickled payload)

