"""Experiments: the control data sets, accuracy matching, the hierarchical bootstrap, the planted real vs pseudo
split, and whole experiments run locally and through submitit."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import run_script
from helpers import FAST

from dualtask.config import settings
from dualtask.core.common import read_csv
from dualtask.data import images as image_io
from dualtask.data import loading as vggface2
from dualtask.data import taskdata
from dualtask.data.taskdata import TaskData
from dualtask.experiment import aggregate, experiment
from dualtask.lesion import dissociation, engine, rankings
from dualtask.model import sites
from dualtask.report import figures
from dualtask.stats.verdict import Agreement


def _task(name, n_classes, per_class, size, seed, native=None):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    images = rng.integers(0, 256, (len(labels), size, size, 3), dtype=np.uint8)
    split = taskdata.stratified_split(labels, seed)
    return TaskData(name, [f"c{k}" for k in range(n_classes)], images, labels, split, name, native_size=native)


def test_pseudo_tasks_split_all_classes_into_equal_halves_over_the_same_images():
    data = {"face": _task("face", 6, 5, 8, 0), "object": _task("object", 4, 5, 8, 1)}
    pseudo = vggface2.pseudo_tasks(data, seed=3)
    assert list(pseudo) == list(vggface2.PSEUDO_TASKS)
    a, b = pseudo.values()
    assert len(a.classes) == len(b.classes) == 5
    assert sorted(a.classes + b.classes) == sorted(f"{t}:c{k}" for t, d in data.items() for k in range(len(d.classes)))
    assert {c.split(":")[0] for c in a.classes} == {"face", "object"} or \
        {c.split(":")[0] for c in b.classes} == {"face", "object"}  # this seed mixes the tasks
    for p in (a, b):  # every image of a pseudo-class is the original class's image, with its split
        for k, name in enumerate(p.classes):
            task, cls = name.split(":")
            src = data[task]
            idx = np.flatnonzero(src.labels == src.classes.index(cls))
            assert np.array_equal(p.images[p.labels == k], src.images[idx])
            assert np.array_equal(p.split[p.labels == k], src.split[idx])
    assert len(a.images) + len(b.images) == 50
    other = vggface2.pseudo_tasks(data, seed=4)
    assert other["pseudo_a"].classes != a.classes  # seeded: another seed, another split


def test_same_task_deals_each_class_and_split_of_one_task_to_two_heads():
    data = _task("face", 4, 9, 8, 0)
    data.extra["expression"] = np.arange(len(data.labels)) % 3
    halves = vggface2.same_task(data, seed=2)
    assert list(halves) == ["face_a", "face_b"]
    a, b = halves.values()
    assert a.classes == b.classes == data.classes and a.chance == data.chance
    assert len(a.images) + len(b.images) == len(data.images)
    # every image goes to exactly one half, with its label, split and extra arrays
    rows = {bytes(x): (y, s, e) for x, y, s, e in zip(data.images, data.labels, data.split, data.extra["expression"])}
    seen = [bytes(x) for h in (a, b) for x in h.images]
    assert sorted(seen) == sorted(rows) and len(set(seen)) == len(seen)
    for h in (a, b):
        for x, y, s, e in zip(h.images, h.labels, h.split, h.extra["expression"]):
            assert rows[bytes(x)] == (y, s, e)
    for k in range(4):  # each class of each split dealt in two halves, one image apart at most
        for split in range(3):
            n = [int(((h.labels == k) & (h.split == split)).sum()) for h in (a, b)]
            assert abs(n[0] - n[1]) <= 1 and sum(n) == int(((data.labels == k) & (data.split == split)).sum())
    other = vggface2.same_task(data, seed=3)
    assert not np.array_equal(other["face_a"].images, a.images)  # seeded: another seed, another deal


def _high_frequency_share(images, size):
    """Share of the images' spectral power (mean removed) above the Nyquist frequency of `size` pixels."""
    x = images.astype(np.float64).mean(-1)
    x -= x.mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fft2(x)) ** 2
    f = np.abs(np.fft.fftfreq(x.shape[1]))  # cycles per pixel
    high = (f[:, None] > size / 2 / x.shape[1]) | (f[None, :] > size / 2 / x.shape[1])
    return power[:, high].sum() / power.sum()


def test_resolution_matched_images_carry_no_detail_above_the_target():
    sharp = _task("face", 3, 4, 64, 0, native=250)  # noise: detail at every frequency
    low = _task("object", 3, 4, 64, 1, native=32)
    matched, size = vggface2.match_resolution({"face": sharp, "object": low})
    assert size == 32
    assert _high_frequency_share(sharp.images, 32) > 0.5
    for d in matched.values():
        assert d.images.shape == sharp.images.shape and d.native_size == 32
        assert _high_frequency_share(d.images, 32) < 0.05
        # nothing is left for a second pass through 32 px to remove: the images are (up to rounding) what 32 px holds
        again = image_io.resize_images(image_io.resize_images(d.images, 32), 64).astype(float)
        assert np.abs(again - d.images).mean() < 0.25 * np.abs(sharp.images.astype(float) - d.images).mean()
    unchanged, _ = vggface2.match_resolution({"face": _task("face", 3, 4, 32, 0, native=64),
                                              "object": _task("object", 3, 4, 32, 1, native=64)})
    assert unchanged["face"].source == "face"  # nothing finer than image_size to remove: the images stay


def test_accuracy_matching_gives_equal_intact_accuracies():
    rng = np.random.default_rng(0)
    correct = {"face": rng.random(400) < 0.9, "object": rng.random(300) < 0.55, "scene": rng.random(250) < 0.7}
    subsets = dissociation.matched_subsets(correct, seed=1)
    low = correct["object"].mean()
    assert np.array_equal(subsets["object"], np.arange(300))  # the weakest task keeps all its images
    for task in ("face", "scene"):
        sub = subsets[task]
        left_out = np.setdiff1d(np.arange(len(correct[task])), sub)
        assert len(set(sub)) == len(sub) and np.all(correct[task][left_out])  # only correct images are left out
        assert abs(correct[task][sub].mean() - low) <= 1 / len(sub)
    assert not np.array_equal(dissociation.matched_subsets(correct, seed=2)["face"], subsets["face"])  # seeded sample


def _correct(accuracy, n, rng):
    out = np.zeros(n, dtype=bool)
    out[rng.choice(n, int(round(accuracy * n)), replace=False)] = True
    return out


def test_hierarchical_bootstrap_recovers_a_known_spread_across_seeds():
    """Eight seeds whose indices differ by a known spread, each measured on many test images: the interval is as
    wide as the seeds' spread (resampling images alone would make it far narrower)."""
    rng = np.random.default_rng(0)
    n, chance = 4000, {"a": 0.1, "b": 0.1}
    seed_indices = [0.2, 0.5, 0.8, 1.1, 0.35, 0.95, 0.65, 0.45]  # sd of the mean: std / sqrt(8)
    draws, points = [], []
    for target in seed_indices:
        drop = target / 2  # index = 2 * drop when each ranking drops its own task by `drop` and the other by 0
        acc = {("intact", "a"): 0.9, ("intact", "b"): 0.9, ("a", "a"): 0.9 - drop * 0.8, ("a", "b"): 0.9,
               ("b", "b"): 0.9 - drop * 0.8, ("b", "a"): 0.9}
        correct = {k: _correct(v, n, rng) for k, v in acc.items()}
        point, d = aggregate.image_draws(correct, chance, "a", "b", 2000 * len(seed_indices), rng)
        points.append(point)
        draws.append(d.reshape(2000, len(seed_indices)))
    assert np.allclose(points, seed_indices, atol=0.01)
    boot = aggregate.hierarchical_bootstrap(draws, rng)
    expected_sd = np.std(seed_indices) / np.sqrt(len(seed_indices))
    assert boot.std() == pytest.approx(expected_sd, rel=0.2)
    low, high = aggregate.interval(boot)
    assert low < np.mean(seed_indices) < high and (high - low) == pytest.approx(2 * 1.96 * expected_sd, rel=0.25)
    images_only = np.mean([d[:, 0] for d in draws], axis=0)  # every seed kept, images resampled
    assert images_only.std() < 0.3 * boot.std()
    # against a control whose seeds sit at 0, the real index is far above; against itself it is not
    assert aggregate.p_greater(boot, aggregate.hierarchical_bootstrap([d - np.mean(seed_indices) for d in draws],
                                                                      rng)) < 0.01
    assert aggregate.p_greater(boot, aggregate.hierarchical_bootstrap(draws, rng)) > 0.2


# -- the planted network: a task split that is real, and a pseudo-task split that is not -----------------

N_CLASSES = 4


class CopiesNet(nn.Module):
    """Faces light one of four pixels in the left column, objects in the right. Channels 0-3 are four thresholded
    copies of the left column (faces only), 4-7 of the right (objects only), 8-15 are constant. A class's logit
    sums its task's four copies at its row, so a task fails only when all four of its copies are silenced: the
    code is split by task, but no channel belongs to a subset of a task's classes. A pseudo-task (half the classes
    of each task) then has no channels of its own."""

    def __init__(self, groups: dict):
        super().__init__()
        detect = nn.Conv2d(1, 16, (1, 2))
        with torch.no_grad():
            detect.weight.zero_()
            detect.bias.zero_()
            detect.weight[:4, 0, 0, 0] = 1.0
            detect.weight[4:8, 0, 0, 1] = 1.0
            detect.bias[:8] = -0.4  # a threshold: noise alone rarely lights a copy
            detect.bias[8:] = 0.5
        self.trunk = nn.Sequential(nn.Identity(), detect, nn.ReLU(), nn.Flatten(1))  # features: channel * 4 + row
        self.heads = nn.ModuleDict()
        for name, classes in groups.items():  # classes: [(task, k)]
            head = nn.Linear(64, len(classes))
            with torch.no_grad():
                head.weight.zero_()
                head.bias.zero_()
                for c, (task, k) in enumerate(classes):
                    first = 0 if task == "face" else 4
                    for j in range(first, first + 4):
                        head.weight[c, j * 4 + k] = 3.0
            self.heads[name] = head

    def forward(self, x):
        features = self.trunk(x)
        return {t: h(features) for t, h in self.heads.items()}


def _images(n_per_class, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for task, column in (("face", 0), ("object", 1)):
        labels = np.repeat(np.arange(N_CLASSES), n_per_class)
        x = rng.normal(0, 0.2, (len(labels), 1, 4, 2)).astype(np.float32)
        x[np.arange(len(labels)), 0, labels, column] += 1.0
        out[task] = (torch.from_numpy(x), labels)
    return out


def _batches(images, groups):
    batches = []
    for name, classes in groups.items():
        xs, ys = [], []
        for c, (task, k) in enumerate(classes):
            x, labels = images[task]
            xs.append(x[labels == k])
            ys.append(torch.full((int((labels == k).sum()),), c))
        batches.append((name, torch.cat(xs), torch.cat(ys)))
    return batches


def _swept(groups, seed):
    """One 'run' of the planted network: its dissociation rows at 25% lesions and its per-image results."""
    model = CopiesNet(groups).eval()
    site = sites.lesion_sites(model)[0]
    assert site.n_filters == 16
    tasks = list(groups)
    train, test = _batches(_images(30, seed), groups), _batches(_images(50, seed + 100), groups)
    intact = engine.evaluate_lesions(model, site, [[]], test)[0]
    ranking = rankings.rank_site(model, site, train, tasks, ["loss", "random"], random_repeats=19, seed=seed)
    conditions = dissociation.lesion_conditions(site, ranking, [0.25])
    results = engine.evaluate_lesions(model, site, [c for *_, c in conditions], test)
    chance = {t: 1 / N_CLASSES for t in tasks}
    rows = dissociation.dissociation_rows(site, conditions, results, intact, chance, tasks, n_boot=200, seed=seed)
    per_image = {f"intact|{t}": intact[t]["correct"] for t in tasks}
    per_image.update(dissociation.per_image_arrays(site, conditions, results, tasks))
    return {"config": {"tasks": {t: {"chance": chance[t]} for t in tasks}, "n_lesion_sites": 1},
            "dissociation": rows, "per_image": per_image}


def test_planted_real_split_dissociates_and_a_pseudo_task_split_does_not():
    real = {t: [(t, k) for k in range(N_CLASSES)] for t in ("face", "object")}
    # a pseudo-task split as the control draws it, from the classes of the two tasks: the first seed whose halves
    # hold two classes of each task (with 4 + 4 classes a split may also lean to one task, and then shares part of
    # the real split; with the many classes of real data the halves are close to balanced)
    for split_seed in range(50):
        names = vggface2.pseudo_tasks({t: _task(t, N_CLASSES, 5, 4, 0) for t in real}, seed=split_seed)
        pseudo = {p: [(c.split(":")[0], int(c.split(":")[1][1:])) for c in d.classes] for p, d in names.items()}
        if all(sum(t == "face" for t, _ in classes) == 2 for classes in pseudo.values()):
            break
    else:
        pytest.fail("no balanced pseudo-task split among 50 seeds")
    runs = {"real": [], "pseudo_task": [], "same_task": []}
    same = {"face_a": real["face"], "face_b": real["face"]}  # two heads reading the same planted face filters
    for seed in (0, 1, 2):
        runs["real"].append({"seed": seed, "folder": f"seed_{seed}", "data": _swept(real, seed)})
        runs["pseudo_task"].append({"seed": seed, "folder": f"pseudo/seed_{seed}", "data": _swept(pseudo, seed)})
        runs["same_task"].append({"seed": seed, "folder": f"same/seed_{seed}", "data": _swept(same, seed)})
    rng = np.random.default_rng(0)
    stats = {role: aggregate.role_statistics(r, rng) for role, r in runs.items()}
    rows = {r["role"]: r for r in aggregate.summary_rows(stats)}
    real_row, pseudo_row = rows["real"], rows["pseudo_task"]
    assert float(real_row["index"]) > 1.5 and float(real_row["ci_low"]) > 1.0
    assert abs(float(pseudo_row["index"])) < 0.5 and float(pseudo_row["ci_low"]) < 0.5 * float(real_row["ci_low"])
    assert float(real_row["p_vs_pseudo_task"]) < 0.01
    assert abs(float(rows["same_task"]["index"])) < 0.2 and float(real_row["p_vs_same_task"]) < 0.01
    assert float(real_row["p_random"]) < 0.01  # three seeds at 1/21 each, combined (Fisher)
    late = {(real_row["layer"], real_row["method"]): Agreement(0.9, 1e-9, 0.2)}, {real_row["layer"]: 1.0}  # late
    answer, licence, caveats, passing = aggregate.verdict(list(rows.values()), {"real", "pseudo_task", "same_task"},
                                                          3, 19, reliability=late[0], rf=late[1])
    assert answer.startswith("Task-specialised filters: yes") and len(passing) == 1
    assert "across 3 seeds, beyond random lesions and the controls" in answer
    assert "more than two heads learning one task lean on different filters" in licence
    # the real split, judged as a same-task network's: not beyond the control
    as_same = dict(real_row, p_vs_same_task="0.6")
    answer, *_ = aggregate.verdict([as_same], {"real", "same_task"}, 3, 19, reliability=late[0], rf=late[1])
    assert answer.startswith("Task-specialised filters: not shown")
    assert any("resolution_matched" in c.text for c in caveats)  # the control that did not run is named


# -- whole experiments ----------------------------------------------------------------------------------

def test_plan_names_every_run_with_its_role_seed_and_folder(tmp_path):
    import ResNet

    config = dict(settings.hyperparameters(vars(ResNet)), seeds=[3, 5], out_dir=str(tmp_path),
                  controls=["resolution_matched", "single_task", "pseudo_task"])
    runs = experiment.plan(config)
    assert [(r["role"], r["seed"], r["folder"]) for r in runs] == [
        ("real", 3, "seed_3"), ("real", 5, "seed_5"),
        ("pseudo_task", 3, "pseudo_task/seed_3"), ("pseudo_task", 5, "pseudo_task/seed_5"),
        ("single_task", 3, "single_task_face/seed_3"), ("single_task", 3, "single_task_object/seed_3"),
        ("single_task", 5, "single_task_face/seed_5"), ("single_task", 5, "single_task_object/seed_5"),
        ("resolution_matched", 3, "resolution_matched/seed_3"), ("resolution_matched", 5, "resolution_matched/seed_5")]
    for r in runs:
        assert r["config"]["out_dir"] == str(tmp_path / r["folder"]) and r["config"]["seed"] == r["seed"]
        assert not set(experiment.EXPERIMENT_KEYS) & set(r["config"])
        assert r["config"]["stages"] == (["train"] if r["role"] == "single_task" else config["stages"])
    single = experiment.plan(dict(config, seeds=None, controls=["pseudo_task"], seed=7))
    assert [(r["role"], r["folder"]) for r in single] == [("real", "seed_7"), ("pseudo_task", "pseudo_task/seed_7")]


@pytest.mark.slow  # two seeds' runs through submitit's local executor, about 25 s
def test_two_seed_experiment_through_submitit_then_a_rerun_trains_nothing(tmp_path, capsys):
    """The SLURM path with submitit's local executor: each run a job in its own process."""
    pytest.importorskip("submitit")
    import ResNet

    out = tmp_path / "exp"
    experiment.main(vars(ResNet), [*FAST, "--seeds=[0, 1]", "--launcher=submitit_local", f"--out_dir={out}"])
    printed = capsys.readouterr().out
    assert printed.count("submitted job") == 2 and printed.count("finished: seed_") == 2
    listing = json.loads((out / "experiment.json").read_text())
    assert [(r["role"], r["seed"], r["folder"], r["status"]) for r in listing["runs"]] == [
        ("real", 0, "seed_0", "done"), ("real", 1, "seed_1", "done")]
    for seed in (0, 1):
        assert (out / f"seed_{seed}" / "lesion_results.csv").exists()
        assert json.loads((out / f"seed_{seed}" / "config.json").read_text())["seed"] == seed
    rows = read_csv(out / "summary.csv", aggregate.SUMMARY_COLUMNS)
    assert {r["role"] for r in rows} == {"real"} and all(r["n_seeds"] == "2" for r in rows)
    page = (out / "report.html").read_text()
    assert page.index("Task-specialised filters:") < page.index("The index across seeds")
    assert "Controls not run: pseudo_task, same_task, resolution_matched, single_task" in page
    stamp = (out / "seed_0" / "checkpoint.pt").stat().st_mtime_ns
    experiment.main(vars(ResNet), [*FAST, "--seeds=[0, 1]", f"--out_dir={out}"])  # again, here: nothing to train
    printed = capsys.readouterr().out
    assert "2 finished earlier, 0 to run" in printed and "epoch 1/1" not in printed
    assert (out / "seed_0" / "checkpoint.pt").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_experiment_with_every_control(tmp_path):
    out = tmp_path / "exp"
    args = [*FAST, "--max_classes=None", "--max_per_class=12", "--image_size=32", "--match_accuracy=True",
            "--seeds=[0, 1]", "--controls=['pseudo_task', 'single_task', 'resolution_matched', 'same_task']",
            f"--out_dir={out}"]
    p = run_script("ResNet.py", *args)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    listing = json.loads((out / "experiment.json").read_text())
    assert {r["role"] for r in listing["runs"]} == {"real", "pseudo_task", "single_task", "resolution_matched",
                                                    "same_task"}
    assert len(listing["runs"]) == 12 and all(r["status"] == "done" for r in listing["runs"])
    same = json.loads((out / "same_task" / "seed_0" / "config.json").read_text())
    assert list(same["tasks"]) == ["face_a", "face_b"]  # the first task's images, dealt to two heads
    rows = read_csv(out / "summary.csv", aggregate.SUMMARY_COLUMNS)
    assert {r["role"] for r in rows} == {"real", "pseudo_task", "resolution_matched", "same_task"}
    assert all(r["matched_index"] != "" or r["index"] == "" for r in rows if r["role"] == "real")
    decoding = read_csv(out / "single_task.csv", aggregate.SINGLE_COLUMNS)
    assert {(r["trained_on"], r["decoded_task"]) for r in decoding} == {
        (a, b) for a in ("face", "object") for b in ("face", "object")}
    page = (out / "report.html").read_text()
    assert "Task-specialised filters:" in page and "Single-task networks" in page and "Controls not run" not in page
    again = run_script("ResNet.py", *args)
    assert again.returncode == 0 and "12 finished earlier, 0 to run" in again.stdout


@pytest.mark.slow  # about 20 s
def test_lesion_epochs_keep_and_sweep_earlier_weights(tmp_path, capsys):
    import ResNet
    from dualtask.core.device import load_checkpoint
    from dualtask.report import figures

    out = tmp_path / "run"
    experiment.main(vars(ResNet), [*FAST, "--epochs=2", "--lesion_epochs=[1, 2, 7]", f"--out_dir={out}"])
    kept = load_checkpoint(out / "checkpoint_epoch1.pt")
    final = load_checkpoint(out / "checkpoint.pt")
    assert kept["epoch"] == 1 and final["epoch"] == 2
    assert not torch.equal(kept["model"]["trunk.conv1.weight"], final["model"]["trunk.conv1.weight"])
    assert not (out / "checkpoint_epoch2.pt").exists()  # the last epoch's sweep is the run's own
    early = read_csv(out / "epoch_1" / "lesion_results.csv", dissociation.LESION_COLUMNS)
    late = read_csv(out / "lesion_results.csv", dissociation.LESION_COLUMNS)
    assert len(early) == len(late) and early != late
    assert (out / "epoch_1" / "dissociation.csv").exists()
    assert figures.dissociation_by_epoch(out).exists()
    printed = capsys.readouterr().out
    assert "lesion sweep of epoch 1 of 2" in printed
    # training again replaces the kept weights and forgets the old epoch's sweep before it is made anew
    experiment.main(vars(ResNet), [*FAST, "--epochs=2", "--lesion_epochs=[1]", "--retrain=True",
                                   "--stages=['train']", f"--out_dir={out}"])
    assert not (out / "epoch_1" / "lesion_results.csv").exists()
    assert load_checkpoint(out / "checkpoint_epoch1.pt")["epoch"] == 1


def test_matching_is_refused_when_a_task_has_no_errors_and_the_verdict_survives_a_missing_control():
    perfect = {"face": np.ones(50, dtype=bool), "object": np.arange(40) % 2 == 0}
    assert dissociation.matched_subsets(perfect) is None  # nothing misclassified to keep: it cannot be brought down
    row = {"role": "real", "layer": "trunk.relu", "depth": 0, "method": "loss", "fraction": "0.2000", "index": "1.0",
           "ci_low": "0.5", "ci_high": "1.5", "p_random": "0.01"}  # the pseudo-task runs have no result here
    answer, _, _, passing = aggregate.verdict([row], {"real", "pseudo_task"}, 3, 19)
    assert answer.startswith("Task-specialised filters: not shown") and passing == []


def test_a_run_is_not_finished_while_it_runs_again(tmp_path, monkeypatch):
    import ResNet

    config = dict(settings.hyperparameters(vars(ResNet)), seeds=[0], out_dir=str(tmp_path))
    (run,) = experiment.plan(config)
    folder = tmp_path / run["folder"]
    folder.mkdir(parents=True)
    (folder / experiment.DONE_FILE).write_text(json.dumps({"config": experiment.what_counts(run["config"])}))
    assert experiment.finished(run)

    def killed(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment.dualtask, "run", killed)
    with pytest.raises(KeyboardInterrupt):
        experiment.run_one(dict(run["config"], retrain=True))
    assert not experiment.finished(run)  # a run killed while training again is not taken for finished


def test_an_experiment_figure_without_any_index_says_why(tmp_path, monkeypatch):
    """Heads at chance leave every index undefined: the panel says so instead of showing empty axes."""
    drawn = {}
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.setdefault("fig", fig) and path)
    rows = [{"role": role, "layer": f"site{d}", "depth": d, "method": "activation", "fraction": "0.2", "index": "",
             "ci_low": "", "ci_high": "", "n_seeds": "2"} for role in ("real", "pseudo_task") for d in (0, 8, 16)]
    assert figures.experiment_figure(rows, tmp_path / "f.png") == tmp_path / "f.png"
    texts = [t.get_text() for ax in drawn["fig"].axes for t in ax.texts]
    assert any("no index is defined at any site" in t for t in texts)
    assert drawn["fig"].axes[0].get_xlim() == (-0.5, 16.5)
