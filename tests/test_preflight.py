"""Every setting checked before the first epoch, every file checked before it is trusted, nothing of the user's
touched (issue 34), as a table: each bad case exits 2 with one line naming the culprit, no traceback, before any
training, with every file already there byte-identical; a damaged probes.csv is computed again (its inputs are
intact) or refused by the report; a user's file in a run folder survives every command whatever its name; an
error no check foresaw still prints its traceback and says it is a bug. The property test over settings is
test_settings_property.py."""
import csv
import json
import shutil
import subprocess
import sys

import pytest
from conftest import TINY, run_script, tree_digest, write_jpeg

import vggface2
from dualtask.core import common
from dualtask.core.common import UsageError
from dualtask.experiment import experiment
from dualtask.lesion import subgroups
from dualtask.report import build as report
from dualtask.report import compare

FAST = [*TINY, "--epochs=2", "--max_per_class=8", "--lesion_methods=['activation', 'random']",
        "--lesion_layers=[0, -1]", "--random_repeats=2", "--rank_images=4"]  # a whole run in a few seconds
PROBED = ["--stages=['train', 'lesion']", "--probes=['inversion', 'transfer']", "--probe_data=demo:objects"]


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory):
    """A finished ResNet run, trained, swept (with fixed readouts) and probed: each test works on a copy."""
    out = tmp_path_factory.mktemp("probed") / "run"
    p = run_script("ResNet.py", *FAST, *PROBED, f"--out_dir={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def _script(capsys, argv):
    """A backbone script's entry point in this process: (exit status, stdout, stderr)."""
    import ResNet

    with pytest.raises(SystemExit) as exit_:
        experiment.main(vars(ResNet), argv)
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def _refused(code, out, err, culprit):
    assert code == 2, out[-2000:] + err[-2000:]
    assert culprit in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "epoch 1/" not in out  # nothing trained


def _groups(path, rows, bom=False):
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        w = csv.writer(f)
        w.writerow(["task", "image", "group"])
        w.writerows(rows)
    return path


def _one_class(tmp):
    import numpy as np

    for k in range(6):
        write_jpeg(tmp / "one_class" / "cats" / f"{k}.jpg", np.full((20, 20, 3), 40 * k))
    return tmp / "one_class"


def _empty(tmp):
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _file(tmp):
    (tmp / "probe.txt").write_text("not data")
    return tmp / "probe.txt"


# -- a new run or experiment: (id, extra arguments (a function of tmp_path), culprit) ----------------------
NEW = [
    ("subgroups image with a digit int() refuses", lambda t: ["--stages=['train', 'lesion']",
     f"--subgroups={_groups(t / 'g.csv', [['face', '²', 'a']])}"], "image '²'"),
    ("probe_data that does not exist", lambda t: ["--stages=['train', 'lesion']", "--probes=['transfer']",
     f"--probe_data={t / 'nowhere'}"], "probe_data="),
    ("transfer probe without probe_data", lambda t: ["--stages=['train', 'lesion']", "--probes=['transfer']"],
     "needs probe_data"),
    ("branch_at at the last site", lambda t: ["--branch_at=16"], "branch_at=16"),
    ("branch_at at the last site by name", lambda t: ["--branch_at='trunk.layer4.2'"], "branch_at='trunk.layer4.2'"),
    ("branch_at with a joint head", lambda t: ["--branch_at=4", "--head=joint"], "branch_at=4 with head='joint'"),
    ("one lesion method twice", lambda t: ["--lesion_methods=['random', 'activation', 'random']"],
     "lesion_methods=['random', 'activation', 'random']: 'random' is named twice"),
    ("one site by two spellings", lambda t: ["--lesion_layers=[0, 'trunk.relu']"],
     "lesion_layers=[0, 'trunk.relu']: 0 and 'trunk.relu' both name the site trunk.relu"),
    ("one site by two depths", lambda t: ["--lesion_layers=[16, -1]"], "lesion_layers=[16, -1]"),
    ("fixed readouts on too few test images", lambda t: ["--stages=['train', 'lesion']", "--max_classes=2",
     "--demo_per_class=3"], "fixed_readout=True: face: too few test images"),
    ("refitted readouts on training images of one class", lambda t: ["--stages=['train', 'lesion']",
     "--refit_readout=True", "--readout_images=2", "--max_classes=2", "--fixed_readout=False"],
     "refit_readout=True: face: the 2 training images"),
    ("one stage twice", lambda t: ["--stages=['train', 'train']"], "stages=['train', 'train']"),
    ("out_dir naming a file", lambda t: [f"--out_dir={t / 'run' / 'notes.txt'}"], "out_dir="),
    ("task data that does not exist", lambda t: [f"--face_data={t / 'faces'}"], "face_data="),
    ("task data that is a file", lambda t: [f"--object_data={_file(t)}"], "object_data="),
    ("init file that does not exist", lambda t: [f"--init={t / 'weights.pt'}"], "init="),
    ("subgroups file that does not exist", lambda t: ["--stages=['train', 'lesion']",
     f"--subgroups={t / 'groups.csv'}"], "subgroups="),
    ("misspelled slurm key, local launcher", lambda t: ["--seeds=[0]", "--slurm={'timeout_mins': 60}"],
     "'timeout_mins'"),
    ("misspelled slurm key, submitit_local", lambda t: ["--seeds=[0]", "--launcher=submitit_local",
     "--slurm={'slurm_partitoin': 'gpu'}"], "'slurm_partitoin'"),
    ("misspelled slurm key, one run", lambda t: ["--slurm={'gpus_per_nodes': 1}"], "'gpus_per_nodes'"),
    ("slurm value of the wrong type", lambda t: ["--seeds=[0]", "--slurm={'timeout_min': '60'}"],
     "timeout_min='60'"),
    ("branch points with a joint head", lambda t: ["--branch_points=[None, 4]", "--head=joint"],
     "branch_points=[None, 4] with head='joint'"),
    ("branch points at the last site", lambda t: ["--branch_points=[None, 16]"], "branch_points=16"),
    ("one branch point by two spellings", lambda t: ["--branch_points=[4, 'trunk.layer2.0']"],
     "4 and 'trunk.layer2.0' both branch after trunk.layer2.0"),
    ("shared images with the pseudo-task control", lambda t: ["--tasks={'identity': 'demo', 'expression': 'demo'}",
     "--controls=['pseudo_task']"], "controls=['pseudo_task']"),
    ("one control twice", lambda t: ["--controls=['pseudo_task', 'pseudo_task']"], "'pseudo_task' is named twice"),
    ("a site the branched run of an experiment lacks", lambda t: ["--branch_points=[None, 14]",
     "--lesion_layers=['trunk.layer4.2']"], "lesion_layers: unknown site 'trunk.layer4.2'"),
]


@pytest.mark.parametrize("extra, culprit", [pytest.param(e, c, id=i) for i, e, c in NEW])
def test_a_bad_configuration_is_refused_before_anything_is_read_or_written(tmp_path, capsys, extra, culprit):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("earlier work")
    args = extra(tmp_path)
    out_arg = [] if any(a.startswith("--out_dir=") for a in args) else [f"--out_dir={run}"]
    before = tree_digest(tmp_path)
    _refused(*_script(capsys, [*FAST, *out_arg, *args]), culprit)
    assert tree_digest(tmp_path) == before  # experiment.json and config.json among what is not written


def test_launcher_slurm_without_slurm_is_refused_before_experiment_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(experiment.shutil, "which", lambda name: None)  # a machine without SLURM's commands
    out = tmp_path / "exp"
    _refused(*_script(capsys, [*FAST, "--seeds=[0]", "--launcher=slurm", f"--out_dir={out}"]), "launcher='slurm'")
    assert not out.exists()


def test_launcher_slurm_whose_commands_reach_no_cluster_is_refused_before_experiment_json(tmp_path, capsys,
                                                                                           monkeypatch):
    bin_dir = tmp_path / "bin"  # SLURM's commands installed, no cluster configured: what sinfo says then
    bin_dir.mkdir()
    for name in ("sbatch", "srun", "sinfo"):
        (bin_dir / name).write_text("#!/bin/sh\necho 'sinfo: fatal: Could not establish a configuration source' >&2\n"
                                    "exit 1\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    out = tmp_path / "exp"
    code, said, err = _script(capsys, [*FAST, "--seeds=[0]", "--launcher=slurm", f"--out_dir={out}"])
    _refused(code, said, err, "launcher='slurm', but SLURM's commands reach no cluster here (sinfo: sinfo: fatal: "
                              "Could not establish a configuration source)")
    assert not out.exists()


def test_a_submission_the_cluster_refuses_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    pytest.importorskip("submitit")
    bin_dir = tmp_path / "bin"  # a cluster that answers sinfo but refuses every job
    bin_dir.mkdir()
    scripts = {"sinfo": "echo 'debug* up infinite 1 idle node'", "srun": "exit 0",
               "sbatch": "echo 'sbatch: error: Batch job submission failed: Invalid account' >&2; exit 1"}
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    code, out, err = _script(capsys, [*FAST, "--seeds=[0]", "--launcher=slurm", f"--out_dir={tmp_path / 'exp'}"])
    assert code == 1 and "Traceback" not in err, err  # sbatch's own words (echoed by submitit), then ours
    assert "submitting seed_0 failed (sbatch: error: Batch job submission failed: Invalid account)" in \
        err.strip().splitlines()[-1]


# -- a finished run asked again with a bad probe_data: config.json and everything else unchanged --------------
@pytest.mark.parametrize("make, culprit", [(_empty, "an empty folder"), (_one_class, "1 class folder"),
                                           (_file, "a file, not a folder")],
                         ids=["empty folder", "one class", "a file"])
def test_a_finished_run_asked_with_bad_probe_data_is_left_as_it_was(tmp_path, capsys, probed_run, make, culprit):
    run = shutil.copytree(probed_run, tmp_path / "run")
    before = tree_digest(run)
    code, out, err = _script(capsys, [*FAST, *PROBED[:2], f"--probe_data={make(tmp_path)}", f"--out_dir={run}"])
    _refused(code, out, err, culprit)
    assert "probe_data=" in err
    assert tree_digest(run) == before


# -- damaged probes.csv: computed again beside intact inputs, refused by the report -------------------------
def _cut_mid_row(path):
    data = path.read_bytes()
    middle = data.index(b"\n", len(data) // 2)
    path.write_bytes(data[:middle + 6])  # a few fields of the next row, as a write cut short leaves it


def _cut_at_a_row(path):
    data = path.read_bytes()
    path.write_bytes(data[:data.index(b"\n", len(data) // 2) + 1])  # whole rows only: the count tells


@pytest.mark.parametrize("damage", [_cut_mid_row, _cut_at_a_row], ids=["cut mid-row", "cut at a row's end"])
def test_a_damaged_probes_csv_is_computed_again_not_skipped(tmp_path, probed_run, damage):
    run = shutil.copytree(probed_run, tmp_path / "run")
    damage(run / "probes.csv")
    p = run_script("ResNet.py", *FAST, *PROBED, f"--out_dir={run}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "computing the probes again" in p.stdout and "skipping" not in p.stdout.split("probes:")[-1]
    assert (run / "probes.csv").read_bytes() == (probed_run / "probes.csv").read_bytes()
    assert (run / "probes.json").read_bytes() == (probed_run / "probes.json").read_bytes()


def test_a_sweep_result_that_is_not_a_number_is_refused_naming_the_file(tmp_path, capsys, probed_run):
    run = shutil.copytree(probed_run, tmp_path / "run")
    rows = (run / "lesion_results.csv").read_text().splitlines(keepends=True)
    header = rows[0].rstrip().split(",")
    cells = rows[1].rstrip().split(",")
    cells[header.index("accuracy")] = "0.1O00"  # a letter O for a zero
    (run / "lesion_results.csv").write_text("".join([rows[0], ",".join(cells) + "\n", *rows[2:]]))
    before = tree_digest(run)
    _refused(*_script(capsys, [*FAST, *PROBED, f"--out_dir={run}"]),
             "lesion_results.csv: damaged (line 2: accuracy='0.1O00' is not a number)")
    assert tree_digest(run) == before


@pytest.mark.parametrize("damage", [_cut_mid_row, _cut_at_a_row], ids=["cut mid-row", "cut at a row's end"])
def test_the_report_refuses_a_damaged_probes_csv(tmp_path, capsys, probed_run, damage):
    run = shutil.copytree(probed_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoint.pt"))
    damage(run / "probes.csv")
    before = tree_digest(run)
    with pytest.raises(SystemExit) as exit_:
        report.main([str(run)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "probes.csv: damaged" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert tree_digest(run) == before


# -- vggface2.py and compare.py -------------------------------------------------------------------------------
@pytest.mark.parametrize("out, culprit", [("", "--out='': empty"), (".", "is not empty and is not a cache"),
                                          ("/", "--out=/: the file system's root")], ids=["empty", "dot", "root"])
def test_the_cache_writer_answers_an_out_that_names_no_new_folder(tmp_path, capsys, monkeypatch, out, culprit):
    (tmp_path / "thesis.tex").write_text("\\chapter{one}")
    monkeypatch.chdir(tmp_path)
    before = tree_digest(tmp_path)
    assert vggface2.main(["--root=demo", f"--out={out}", "--image_size=16"]) == 2
    err = capsys.readouterr().err
    assert culprit in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert tree_digest(tmp_path) == before


def _runs(tmp, *paths):
    for path in paths:
        (tmp / path).mkdir(parents=True)
        (tmp / path / "config.json").write_text(json.dumps({"backbone": "vgg16"}))
    return [str(tmp / p) for p in paths]


COMPARE = [
    ("out_dir naming a file", lambda t: [*_runs(t, "a", "b"), f"--out_dir={t / 'a' / 'config.json'}"],
     "exists and is not a folder"),
    ("the same run twice", lambda t: [*_runs(t, "a"), str(t / "a"), f"--out_dir={t / 'cmp'}"], "named twice"),
    ("the same run by two paths", lambda t: [*_runs(t, "a"), str(t / "a" / ".." / "a"), f"--out_dir={t / 'cmp'}"],
     "named twice"),
    ("two runs of one folder name", lambda t: [*_runs(t, "x/seed_0", "y/seed_0"), f"--out_dir={t / 'cmp'}"],
     "share the folder name 'seed_0'"),
    ("a compare.csv it did not write", lambda t: [*_runs(t, "a", "b"), f"--out_dir={_theirs(t, 'compare.csv')}"],
     "was not written by dualtask.report.compare"),
    ("a compare.png it did not write", lambda t: [*_runs(t, "a", "b"), f"--out_dir={_theirs(t, 'compare.png')}"],
     "was not written by dualtask.report.compare"),
]


def _theirs(tmp, name):
    (tmp / "cmp").mkdir()
    (tmp / "cmp" / name).write_text("run,score\nmine,1\n")
    return tmp / "cmp"


@pytest.mark.parametrize("args, culprit", [pytest.param(a, c, id=i) for i, a, c in COMPARE])
def test_compare_refuses_before_it_writes(tmp_path, capsys, args, culprit):
    argv = args(tmp_path)
    before = tree_digest(tmp_path)
    assert compare.main(argv) == 2
    err = capsys.readouterr().err
    assert culprit in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert tree_digest(tmp_path) == before


def test_compare_replaces_its_own_compare_csv(tmp_path, capsys):
    runs = _runs(tmp_path, "a", "b")
    assert compare.main([*runs, f"--out_dir={tmp_path / 'cmp'}"]) == 0
    assert compare.main([*runs, f"--out_dir={tmp_path / 'cmp'}"]) == 0, capsys.readouterr().err


# -- subgroups files as spreadsheets write them -----------------------------------------------------------------
def test_a_subgroups_file_with_a_byte_order_mark_is_read(tmp_path):
    path = _groups(tmp_path / "g.csv", [["face", 0, "a"], ["face", 2, "b"]], bom=True)
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    groups = subgroups.read_groups(path, {"face": 3})
    assert groups["face"]["a"].tolist() == [0] and groups["face"]["b"].tolist() == [2]
    for image in ("²", "٣", "1.0", "-1"):
        with pytest.raises(UsageError, match=f"line 2: image '{image}' is not a position"):
            subgroups.read_groups(_groups(tmp_path / "bad.csv", [["face", image, "a"]]), {"face": 3})


# -- temporaries ---------------------------------------------------------------------------------------------
def test_only_this_tools_own_temporaries_are_removed(tmp_path):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    ours = tmp_path / common.temporary_name("config.json", dead)
    running = tmp_path / common.temporary_name("config.json", 1)  # pid 1 runs: its write may be under way
    theirs = [".thesis.tex.tmp4000000", f".config.json.tmp{dead}", ".dualtask-partial.x.part",
              "dualtask-partial.1.a.part", f".dualtask-partial.{dead}.notes", "notes.txt"]
    for path in [ours, running, *(tmp_path / n for n in theirs)]:
        path.write_text("x")
    assert common.remove_stale_temporaries(tmp_path) == [ours.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, *theirs])


@pytest.mark.slow  # about 80 s on 2 cores: a whole run again with figures, then the report, figures and compare
def test_a_users_files_in_a_run_folder_survive_every_command(tmp_path, probed_run):
    run = shutil.copytree(probed_run, tmp_path / "run")
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    names = [".thesis.tex.tmp4000000", f".checkpoint.pt.tmp{dead}", f".config.json.tmp{dead}", "notes.txt",
             ".lesion_results.csv.tmp1", "lesion_results.csv.bak", "probes.csv~", "figures/.probes.png.tmp9999999",
             "fixed_readout/mine.csv", "my_analysis.ipynb"]
    mine = {name: f"the user's {name}".encode() for name in names}
    for name, data in mine.items():
        (run / name).parent.mkdir(exist_ok=True)
        (run / name).write_bytes(data)
    commands = [["ResNet.py", *FAST, *PROBED[1:], "--stages=['train', 'lesion', 'figures']", "--stimulus_steps=5",
                 "--retrain=True", f"--out_dir={run}"],
                ["dualtask.report", str(run)], ["dualtask.report.figures", str(run)],
                ["dualtask.report.compare", str(run), f"--out_dir={run}"]]
    for command in commands:
        p = run_script(*command)
        assert p.returncode == 0, (command[0], p.stderr[-2000:])
        assert {name: (run / name).read_bytes() for name in names} == mine, command[0]


# -- an error no check foresaw ---------------------------------------------------------------------------------
def test_an_unexpected_error_prints_its_traceback_and_says_it_is_a_bug(tmp_path, capsys, monkeypatch):
    from dualtask.experiment import pipeline as dualtask

    def broken(config):
        raise ZeroDivisionError("a slip in the code")

    monkeypatch.setattr(dualtask, "load_datasets", broken)
    code, out, err = _script(capsys, [*FAST, f"--out_dir={tmp_path / 'run'}"])
    assert code == 1 and "Traceback" in err and "ZeroDivisionError: a slip in the code" in err
    assert "bug of this tool" in err.strip().splitlines()[-1]
