"""Accuracy per subgroup of test images under every lesion (the subgroups setting, lesion_subgroups.csv)."""
import csv
import json

import numpy as np
import pytest
from helpers import read_rows, tiny_config

from dualtask.core.common import UsageError
from dualtask.experiment import pipeline as dualtask
from dualtask.lesion import subgroups


def write_groups(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "image", "group"])
        w.writerows(rows)
    return str(path)


def test_a_subgroups_file_is_read_and_bad_ones_are_named(tmp_path):
    path = write_groups(tmp_path / "g.csv", [["face", 0, "young"], ["face", 3, "old"], ["face", 1, "young"],
                                             ["object", 2, "indoor"]])
    groups = subgroups.read_groups(path, {"face": 4, "object": 3})
    assert groups["face"]["young"].tolist() == [0, 1] and groups["face"]["old"].tolist() == [3]
    assert groups["object"]["indoor"].tolist() == [2]
    for rows, says in (([["face", 4, "old"]], "image '4' is not a position among face's 4 test images"),
                       ([["car", 0, "old"]], "task 'car' is not one of the run's tasks"),
                       ([["face", 0, "a"], ["face", 0, "b"]], "face image 0 is listed twice"),
                       ([["face", "x", "old"]], "image 'x'"), ([["face", 1, ""]], "no group name")):
        bad = write_groups(tmp_path / "bad.csv", rows)
        with pytest.raises(UsageError, match="subgroups=.*bad.csv.*" + says.replace("(", r"\(")):
            subgroups.read_groups(bad, {"face": 4, "object": 3})
    with pytest.raises(UsageError, match="cannot be read"):
        subgroups.read_groups(tmp_path / "missing.csv", {"face": 4})
    (tmp_path / "cols.csv").write_text("name,group\nx,y\n")
    with pytest.raises(UsageError, match="columns group, name; expected a CSV file with a header row task,image,group"):
        subgroups.read_groups(tmp_path / "cols.csv", {"face": 4})


@pytest.mark.slow  # a training run and a sweep, about 40 s; reading the groups is tested above
def test_every_lesions_accuracy_per_subgroup_adds_up_to_the_totals(tmp_path):
    out = tmp_path / "run"
    config = tiny_config(out, stages=["train"])
    dualtask.run(config)
    n_test = {t: v["counts"]["test"] for t, v in json.loads((out / "config.json").read_text())["tasks"].items()}
    # every face test image in one of two groups; the object task's first five images only
    rows = [["face", i, "even" if i % 2 == 0 else "odd"] for i in range(n_test["face"])] + \
        [["object", i, "first"] for i in range(5)]
    config = tiny_config(out, stages=["lesion"], lesion_methods=["activation", "random"], lesion_layers=[0, 12],
                         random_repeats=2, rank_images=8, lesion_fractions=[0.0, 0.5],
                         subgroups=write_groups(tmp_path / "groups.csv", rows))
    dualtask.run(config)
    results = read_rows(out / "lesion_results.csv")
    per_group = read_rows(out / "lesion_subgroups.csv")
    assert len(per_group) == len(results) // 2 * 3  # every lesion: two face groups and one object group
    for r in results:
        mine = [g for g in per_group if all(g[k] == r[k] for k in ("layer", "method", "target", "repeat",
                                                                    "fraction", "eval_task"))]
        n = sum(int(g["n_images"]) for g in mine)
        if r["eval_task"] == "face":  # every image listed: the groups' counts and hits add up to the totals
            assert n == int(r["n_images"]) == n_test["face"]
            hits = sum(float(g["accuracy"]) * int(g["n_images"]) for g in mine)
            assert hits == pytest.approx(float(r["accuracy"]) * n, abs=0.01)
        else:
            assert n == 5 and [g["group"] for g in mine] == ["first"]
    intact = [g for g in per_group if g["fraction"] == "0.0000"]
    assert all(g["accuracy"] == g["intact_accuracy"] for g in intact)
    # a bad file stops the run before anything is lesioned, naming it
    bad = write_groups(tmp_path / "bad.csv", [["face", n_test["face"], "x"]])
    with pytest.raises(UsageError, match="bad.csv"):
        dualtask.run(dict(config, subgroups=bad))
    assert np.isfinite([float(g["accuracy"]) for g in per_group]).all()
