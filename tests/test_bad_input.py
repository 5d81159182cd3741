"""Bad settings, damaged run files and kills, as a table: each bad case exits 2 with one line naming the culprit
and its expected form, no traceback, and every file already in out_dir byte-identical afterwards; a run
killed at any moment, then run again, ends with the files of a run that was never killed.

The data side (bad images, dataset layouts, caches, vggface2.py's --out) is in test_bad_data.py.
"""
import csv
import hashlib
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT, TINY, run_script

import vgg16
from dualtask.core import common, device
from dualtask.experiment import experiment

FAST = [*TINY, "--epochs=2", "--max_per_class=8", "--lesion_methods=['activation', 'random']",
        "--lesion_layers=[0, -1]", "--random_repeats=2", "--rank_images=4"]  # a whole run in a few seconds
LESIONED = ["--stages=['train', 'lesion']"]


def tree_digest(folder):
    """{relative path: sha256} of every file under folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished ResNet run (trained and lesioned), never killed: each test damages a copy, or compares."""
    out = tmp_path_factory.mktemp("finished") / "run"
    p = run_script("ResNet.py", *FAST, *LESIONED, f"--out_dir={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


class Evil:
    """Runs a command when unpickled: what a hostile checkpoint carries."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


# -- settings: (id, arguments, culprit named in the message) ---------------------------------------------
SETTINGS = [
    ("negative seed", ["--seed=-1"], "seed=-1"),
    ("no ranking images", ["--rank_images=0"], "rank_images=0"),
    ("int where a list is expected", ["--lesion_layers=5"], "lesion_layers=5"),
    ("empty site list", ["--lesion_layers=[]"], "lesion_layers=[]"),
    ("zero-width network", ["--fc_width=0"], "fc_width=0"),
    ("no lesion fractions", ["--lesion_fractions=[]"], "lesion_fractions=[]"),
    ("only the intact fraction", ["--lesion_fractions=[0.0]"], "lesion_fractions=[0.0]"),
    ("fraction above one", ["--lesion_fractions=[0.2, 1.5]"], "lesion_fractions"),
    ("text for a count", ["--max_per_class=many"], "max_per_class='many'"),
    ("one class", ["--max_classes=1"], "max_classes=1"),
    ("infinite learning rate", ["--lr=1e999"], "lr=inf"),
    ("zero learning rate", ["--lr=0"], "lr=0;"),
    ("negative weight decay", ["--weight_decay=-1"], "weight_decay=-1;"),
    ("unknown optimizer", ["--optimizer=adam"], "optimizer='adam'"),
    ("negative gradient clip", ["--grad_clip=-0.5"], "grad_clip=-0.5"),
    ("batch smaller than the tasks", ["--batch_size=1"], "batch_size=1"),
    ("no stimulus steps", ["--stimulus_steps=0"], "stimulus_steps=0"),
    ("no random repeats", ["--random_repeats=0"], "random_repeats=0"),
    ("demo classes too small to split", ["--demo_per_class=2"], "demo_per_class=2"),
    ("no stages", ["--stages=[]"], "stages=[]"),
    ("unknown stage", ["--stages=['train', 'plot']"], "stages"),
    ("no lesion methods", ["--lesion_methods=[]"], "lesion_methods=[]"),
    ("unknown lesion method", ["--lesion_methods=['gradcam']"], "lesion_methods"),
    ("number as Grad-CAM site", ["--gradcam_site=5"], "gradcam_site=5"),
    ("images too small", ["--image_size=8"], "image_size=8"),
    ("negative epochs", ["--epochs=-1"], "epochs=-1"),
    ("empty out_dir", ["--out_dir="], "out_dir=''"),
    ("empty data setting", ["--face_data="], "face_data=''"),
    ("unknown lesion mode", ["--lesion_mode=max"], "lesion_mode='max'"),
    ("unknown device", ["--device=gpu"], "device='gpu'"),
    ("CUDA device that is not there", ["--device=cuda:7"], "device='cuda:7'"),
    ("MPS on a build without it", ["--device=mps"], "device='mps'"),
    ("unknown setting", ["--epoch=3"], "epoch"),
    ("not name=value", ["epochs=3"], "epochs=3"),
    ("unknown health action", ["--health_check=ignore"], "health_check='ignore'"),
    ("repeated seed", ["--seeds=[0, 0]"], "seeds=[0, 0]"),
    ("negative seed of an experiment", ["--seeds=[1, -2]"], "seeds=[1, -2]"),
    ("unknown control", ["--controls=['shuffled']"], "controls=['shuffled']"),
    ("unknown launcher", ["--launcher=sge"], "launcher='sge'"),
    ("accuracy matching not a flag", ["--match_accuracy=1"], "match_accuracy"),
    ("unknown face crop", ["--face_crop=mtcnn"], "face_crop='mtcnn'"),
    ("face_crop's old name", ["--lfw_crop=False"], "lfw_crop was replaced by face_crop"),
]


@pytest.mark.parametrize("args, culprit", [pytest.param(a, c, id=i) for i, a, c in SETTINGS])
def test_bad_setting(tmp_path, capsys, args, culprit):
    if "--device=mps" in args and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    if "--device=cuda:7" in args and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 CUDA devices")
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("earlier work")
    before = tree_digest(out)
    out_arg = [] if any(a.startswith("--out_dir=") for a in args) else [f"--out_dir={out}"]
    # in this process (the script's own entry point, without a fresh interpreter per case); the shell's view of
    # the same path is test_bad_setting_from_the_shell
    with pytest.raises(SystemExit) as exit_:
        experiment.main(vars(vgg16), [*TINY, "--fc_width=16", *out_arg, *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err[-2000:]
    assert culprit in err and any(w in err for w in ("expected", "valid names", "use ")), err
    assert len(err.strip().splitlines()) == 1
    assert tree_digest(out) == before


@pytest.mark.parametrize("args, culprit", [(["--seed=-1"], "seed=-1"), (["--epoch=3"], "epoch")])
def test_bad_setting_from_the_shell(tmp_path, args, culprit):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("earlier work")
    before = tree_digest(out)
    p = run_script("vgg16.py", *TINY, "--fc_width=16", f"--out_dir={out}", *args)
    assert p.returncode == 2, p.stderr[-2000:]
    assert culprit in p.stderr and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert tree_digest(out) == before


# -- damaged or foreign files in a finished run: (id, damage, culprit named) ------------------------------
def _write_evil_checkpoint(run):
    torch.save({"model": Evil(), "epoch": 1, "config": {}, "classes": {}}, run / "checkpoint.pt")


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _cut_mid_row(path):
    data = path.read_bytes()
    middle = data.index(b"\n", len(data) // 2)
    path.write_bytes(data[:middle + 6])  # a few fields of the next row, as a write cut short leaves it


def _drop_column(path, column):
    rows = list(csv.DictReader(open(path, newline="")))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[c for c in rows[0] if c != column], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


DAMAGE = [
    ("checkpoint that runs code", _write_evil_checkpoint, [], "checkpoint.pt: refused"),
    ("truncated checkpoint", lambda r: _truncate(r / "checkpoint.pt"), [], "checkpoint.pt: cannot be read"),
    ("foreign checkpoint", lambda r: torch.save({"weights": torch.zeros(2)}, r / "checkpoint.pt"), [],
     "checkpoint.pt: not a checkpoint of this tool"),
    ("progress file not JSON", lambda r: (r / "lesion_progress.json").write_text("{'done': ["), [],
     "lesion_progress.json: cannot be read"),
    ("progress file of another shape", lambda r: (r / "lesion_progress.json").write_text("[1, 2]"), [],
     "lesion_progress.json: damaged"),
    ("results lacking a column", lambda r: _drop_column(r / "lesion_results.csv", "accuracy"), [],
     "lesion_results.csv: damaged (lacks the column(s) accuracy)"),
    ("results cut mid-row", lambda r: _cut_mid_row(r / "lesion_results.csv"), [], "lesion_results.csv: damaged"),
    ("rankings not JSON", lambda r: (r / "rankings.json").write_text("nonsense"), [], "rankings.json: cannot be read"),
    ("finished run asked for more epochs", lambda r: None, ["--epochs=3"], "epochs: 2 -> 3"),
    ("finished run asked for another learning rate", lambda r: None, ["--lr=0.05"], "lr: None -> 0.05"),
    ("finished run asked for another seed", lambda r: None, ["--seed=1"], "seed: 0 -> 1"),
]


@pytest.mark.parametrize("damage, extra, culprit", [pytest.param(d, e, c, id=i) for i, d, e, c in DAMAGE])
def test_damaged_or_foreign_run_files(tmp_path, capfd, finished_run, damage, extra, culprit):
    import ResNet

    run = copy_run(finished_run, tmp_path / "run")
    damage(run)
    before = tree_digest(run)
    with pytest.raises(SystemExit) as exit_:  # the script's entry point in this process; capfd sees os.system too
        experiment.main(vars(ResNet), [*FAST, *LESIONED, f"--out_dir={run}", *extra])
    out, err = capfd.readouterr()
    assert exit_.value.code == 2, out[-2000:] + err[-2000:]
    assert culprit in err and "pwned" not in out, err
    assert "weights_only=False" not in err  # never advise the unsafe load
    assert len(err.strip().splitlines()) == 1
    assert tree_digest(run) == before


@pytest.mark.parametrize("script, damage, culprit", [
    ("dualtask.report", lambda r: (r / "config.json").write_text("{not json"), "config.json: cannot be read"),
    ("dualtask.report", lambda r: _drop_column(r / "dissociation.csv", "ci_low"), "dissociation.csv: damaged"),
    ("dualtask.report", lambda r: (r / "lesion_results.csv").write_bytes(b"\xff\xfe\x00bad"), "lesion_results.csv"),
    ("dualtask.report.compare", lambda r: (r / "config.json").write_text("[]"), "config.json: damaged"),
    ("dualtask.report.figures", lambda r: (r / "config.json").write_text(""), "config.json: cannot be read"),
], ids=["report: config not JSON", "report: dissociation lacking a column", "report: results not UTF-8",
        "compare: config of another shape", "figures: empty config"])
def test_report_tools_name_the_damaged_file(tmp_path, finished_run, script, damage, culprit):
    run = copy_run(finished_run, tmp_path / "run")
    damage(run)
    before = tree_digest(run)
    args = [str(run), f"--out_dir={tmp_path / 'cmp'}"] if script == "dualtask.report.compare" else [str(run)]
    p = run_script(script, *args)
    assert p.returncode == 2 and culprit in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert tree_digest(run) == before


def test_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    device.save_checkpoint(path, {"epoch": 1})
    before = path.read_bytes()

    def full(obj, f):
        open(f, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(common.UsageError) as e:
        device.save_checkpoint(path, {"epoch": 2})
    assert "cannot write" in str(e.value) and "disk full" in str(e.value) and "MiB free" in str(e.value)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_leftover_temporaries_are_removed_and_nothing_else(tmp_path, finished_run):
    run = copy_run(finished_run, tmp_path / "run")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process that has ended
    ours = {run / common.temporary_name("checkpoint.pt", int(dead)): b"half a checkpoint",
            run / "figures" / common.temporary_name("lesion_effects.png", int(dead)): b"half a figure"}
    # a user's files, named like temporaries (an older version's among them): this tool did not make these names
    theirs = {run / ".mine.tmp": b"not this tool's", run / ".thesis.tex.tmp4000000": b"\\chapter{one}",
              run / f".checkpoint.pt.tmp{dead}": b"a name of an older version", run / "notes.dualtask-partial": b"x"}
    (run / "figures").mkdir(exist_ok=True)
    for path, data in {**ours, **theirs}.items():
        path.write_bytes(data)
    p = run_script("ResNet.py", *FAST, *LESIONED, f"--out_dir={run}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert not [path for path in ours if path.exists()] and "left by an interrupted write" in p.stdout
    assert {path: path.read_bytes() for path in theirs} == theirs


# -- kill -9 at chosen moments, then a rerun equals a run that was never killed ---------------------------
KILLER = textwrap.dedent("""
    import os, signal
    import torch, ResNet
    from dualtask.experiment import experiment
    from dualtask.lesion import sweep
    from dualtask.training import trainer
    target = {{"trainer": trainer, "sweep": sweep, "torch": torch}}[{module!r}]
    real, calls = getattr(target, {name!r}), []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) == {n} and {when!r} == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(*args, **kwargs)
        if len(calls) == {n} and {when!r} == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(target, {name!r}, patched)
    experiment.main(vars(ResNet), {argv!r})
""")

KILLS = [
    ("after the checkpoint, before the log", "trainer", "write_csv", 1, "before", False),
    ("inside the second checkpoint write", "torch", "save", 2, "after", True),
    ("at the second site's ranking", "sweep", "rank_site", 2, "before", True),
    ("after a site's results, before its progress", "sweep", "write_text", 4, "before", True),
]


def without_speed(path):
    """A training log's rows without images_per_s (a timing, different in every run)."""
    return [{k: v for k, v in row.items() if k != "images_per_s"} for row in csv.DictReader(open(path))]


# each kill takes about 30 s on 2 cores: one runs by default, the other three with -m slow (last field)
@pytest.mark.parametrize("module, name, n, when", [
    pytest.param(*k[1:5], id=k[0], marks=[pytest.mark.slow] if k[5] else []) for k in KILLS])
def test_kill_then_rerun_equals_an_unbroken_run(tmp_path, finished_run, module, name, n, when):
    out = tmp_path / "run"
    argv = [*FAST, *LESIONED, f"--out_dir={out}"]
    code = KILLER.format(module=module, name=name, n=n, when=when, argv=argv)
    killed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    again = run_script("ResNet.py", *argv)
    assert again.returncode == 0, again.stderr[-2000:]
    for name in ("lesion_results.csv", "dissociation.csv", "rankings.json"):
        assert (out / name).read_text() == (finished_run / name).read_text(), name
    assert without_speed(out / "train_log.csv") == without_speed(finished_run / "train_log.csv")
    a = torch.load(out / "checkpoint.pt", weights_only=True)
    b = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert len(a["log"]) == 8
    assert not [p.name for p in out.iterdir() if common.TEMPORARY.match(p.name)]  # no leftovers
