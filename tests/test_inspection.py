import base64
import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import run_script
from helpers import make_run

from dualtask.analysis import inspection
from dualtask.model import sites as sites_mod


class OneQuadrantNet(nn.Module):
    """Can only see the top-left quadrant: everything else is multiplied by zero before the first conv."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        # no biases: what the model cannot see stays exactly zero, up to the convolutions' reach of 2 pixels
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.heads = nn.ModuleDict({"face": nn.Linear(8, 3), "object": nn.Linear(8, 3)})
        mask = torch.zeros(1, 1, 32, 32)
        mask[..., :16, :16] = 1
        self.register_buffer("mask", mask)

    def forward(self, x):
        features = self.trunk(x * self.mask)
        return {t: h(features) for t, h in self.heads.items()}


def test_gradcam_finds_the_only_quadrant_the_model_sees():
    model = OneQuadrantNet().eval()
    site = sites_mod.lesion_sites(model)[-1]
    x = torch.randn(16, 3, 32, 32)
    for head in ("face", "object"):
        maps = inspection.gradcam(model, x, site, head)
        assert maps.shape == (16, 32, 32) and float(maps.max()) <= 1.0 + 1e-6
        total = maps.sum(dim=(1, 2))
        assert bool((total > 0).all())
        assert torch.equal(maps[:, 18:, :], torch.zeros_like(maps[:, 18:, :]))  # nothing below the quadrant
        assert torch.equal(maps[:, :, 18:], torch.zeros_like(maps[:, :, 18:]))  # nothing right of it
        inside = maps[:, :16, :16].sum(dim=(1, 2))
        assert bool((inside / total > 0.6).all())  # the quadrant is a quarter of the image
        region = inspection.top_region(maps, 0.05)
        assert int(region[0].sum()) == round(0.05 * 1024)
        assert not region[:, 18:, :].any() and not region[:, :, 18:].any()


def squares(corners, size=24, side=4):
    """Boolean regions (N, size, size): a side x side square at each (row, column) corner."""
    regions = torch.zeros(len(corners), size, size, dtype=torch.bool)
    for k, (y, x) in enumerate(corners):
        regions[k, y:y + side, x:x + side] = True
    return regions


def test_overlap_permutation_test_finds_image_specific_overlap():
    """Both heads pick the same region of each image, and the regions sit at random places: far above chance
    pairing of images."""
    a = squares(np.random.default_rng(0).integers(0, 21, (40, 2)))
    t = inspection.overlap_permutation_test(a, a.clone(), n_perm=2000, seed=0)
    assert t["mean_iou"] == 1.0 and t["n"] == 40 and t["n_permutations"] == 2000
    assert t["null_mean"] < 0.2
    assert t["p"] < 0.01 and t["p"] >= 1 / 2001  # the +1 correction: never 0
    assert t["ci_low"] <= 1.0 <= t["ci_high"]


def test_overlap_permutation_test_does_not_count_a_shared_centre_bias():
    """Each head's region is near the centre, independently of the other head's: they overlap on every image (a
    test against no overlap would call it significant), but no more than when images are paired at random."""
    rng = np.random.default_rng(0)
    a = squares(10 + rng.integers(-2, 3, (40, 2)))
    b = squares(10 + rng.integers(-2, 3, (40, 2)))
    t = inspection.overlap_permutation_test(a, b, n_perm=2000, seed=0)
    assert t["ci_low"] > 0.1 and t["null_mean"] > 0.1  # overlap there is, from the centre bias alone
    assert t["p"] > 0.05
    assert t["ci_low"] <= t["mean_iou"] <= t["ci_high"]
    again = inspection.overlap_permutation_test(a, b, n_perm=2000, seed=0)
    assert again == t  # seeded
    with pytest.raises(ValueError):
        inspection.overlap_permutation_test(a, b[:-1], n_perm=10)


def shared_face_images(n=30, n_test=20, copy_for_object=False):
    """{'face', 'object'} TaskImages over the same 32-px images (or, with copy_for_object, equal copies of them)
    with different labels."""
    from dualtask.data import taskdata
    from dualtask.training import trainer

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    split = np.array([0] * (n - n_test) + [2] * n_test, np.int8)
    face = taskdata.TaskData("face", ["ann", "bob", "cy"], pixels, rng.integers(0, 3, n), split)
    other = pixels.copy() if copy_for_object else pixels
    obj = taskdata.TaskData("object", ["happy", "sad", "calm"], other, rng.integers(0, 3, n), split)
    return {t: trainer.TaskImages(d, torch.device("cpu")) for t, d in (("face", face), ("object", obj))}


def test_gradcam_overlap_computes_a_shared_image_set_once(tmp_path):
    import csv

    model = OneQuadrantNet().eval()
    site = sites_mod.lesion_sites(model)[-1]
    inspection.gradcam_analysis(model, shared_face_images(), site, tmp_path, n_perm=200)
    with open(tmp_path / "gradcam_overlap.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == ("images", "head_a", "head_b", "site", "mean_iou_top5", "ci_low", "ci_high",
                                        "null_mean", "p_permutation", "n_permutations", "n")
    assert [(r["images"], r["head_a"], r["head_b"]) for r in rows] == [("face+object", "face", "object")]
    row = rows[0]
    assert row["site"] == site.name and row["n"] == "20" and row["n_permutations"] == "200"
    assert float(row["ci_low"]) <= float(row["mean_iou_top5"]) <= float(row["ci_high"])
    assert 1 / 201 <= float(row["p_permutation"]) <= 1
    maps = np.load(tmp_path / "gradcam.npz")
    for head in ("face", "object"):  # every task keeps its keys; a shared set's maps are the same
        np.testing.assert_array_equal(maps[f"face_images__{head}_head"], maps[f"object_images__{head}_head"])
        assert maps[f"object_images__{head}_head__per_image"].shape == (20, 32, 32)
    assert (tmp_path / "figures" / "gradcam_face+object_images.png").exists()
    assert not (tmp_path / "figures" / "gradcam_face_images.png").exists()

    # equal images in two arrays are two sets: one row per set of images
    separate = tmp_path / "separate"
    separate.mkdir()
    inspection.gradcam_analysis(model, shared_face_images(copy_for_object=True), site, separate, n_perm=200)
    with open(separate / "gradcam_overlap.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["images"], r["head_a"], r["head_b"]) for r in rows] == [("face", "face", "object"),
                                                                        ("object", "face", "object")]


def test_report_reads_the_overlap_test_and_runs_written_before_it(tmp_path):
    from dualtask.core.common import write_csv
    from dualtask.report import build as report

    columns = ("images", "head_a", "head_b", "site", "mean_iou_top5", "ci_low", "ci_high", "null_mean",
               "p_permutation", "n_permutations", "n")
    base = {"images": "face+object", "head_a": "face", "head_b": "object", "site": "trunk.s2", "ci_low": 0.3,
            "ci_high": 0.5, "n_permutations": 2000, "n": 64}
    for name, row, reading in (
            ("above", dict(base, mean_iou_top5=0.4, null_mean=0.2, p_permutation=0.0004998),
             "attend to the same image-specific regions more than chance pairing (IoU 0.40 [0.30, 0.50] against "
             "0.20 under chance pairing, p = 0.0005)"),
            ("chance", dict(base, mean_iou_top5=0.4, null_mean=0.39, p_permutation=0.41),
             "are not shown to attend to the same image-specific regions more than chance pairing")):
        run = make_run(tmp_path / name, [("trunk.s2", 2, "activation", 0.6, 0.3, 0.9, 0.01)])
        write_csv(run / "gradcam_overlap.csv", columns, [row])
        page = html_text(report.build_report(run).read_text())
        assert reading in page and "On face and object images the face and object heads" in page
        assert "p_permutation" in page and "null_mean" in page  # the table shows the test
        assert "Skipped: figures/gradcam_face+object_images.png is missing" in page  # the shared set's figure

    # a run written before the permutation test: its table as it is, and a sentence saying what it lacks
    old = make_run(tmp_path / "old", [("trunk.s2", 2, "activation", 0.6, 0.3, 0.9, 0.01)])
    write_csv(old / "gradcam_overlap.csv", ("images", "head_a", "head_b", "site", "mean_iou_top5", "sd", "n"),
              [{"images": t, "head_a": "face", "head_b": "object", "site": "trunk.s2", "mean_iou_top5": 0.3,
                "sd": 0.1, "n": 64} for t in ("face", "object")])
    page = html_text(report.build_report(old).read_text())
    assert "predate the permutation test" in page and "p_permutation" not in page
    assert "Skipped: figures/gradcam_face_images.png is missing" in page


def html_text(page):
    import html

    return html.unescape(re.sub(r"<[^>]+>", "", page.replace("<wbr>", "")))


def test_preferred_stimuli_at_the_last_site_of_every_stage():
    from dualtask.model import network

    vgg = network.DualTaskNet("vgg16", {"a": 3, "b": 4}, image_size=32, fc_width=32)
    sites = inspection.stage_sites(vgg)
    assert [s.name for s in sites] == ["trunk.features.5", "trunk.features.12", "trunk.features.22",
                                       "trunk.features.32", "trunk.features.42"]
    for s in sites:  # each is the last conv site before a max-pool
        assert isinstance(vgg.trunk.features[int(s.name.rsplit(".", 1)[1]) + 1], nn.MaxPool2d)
    assert [n for n, _ in inspection.conv_stages(vgg)] == [f"block{k}" for k in range(1, 6)]

    resnet = network.DualTaskNet("resnet50", {"a": 3, "b": 4}, image_size=32)
    assert [s.name for s in inspection.stage_sites(resnet)] == ["trunk.relu", "trunk.layer1.2", "trunk.layer2.3",
                                                                 "trunk.layer3.5", "trunk.layer4.2"]
    assert [n for n, _ in inspection.conv_stages(resnet)] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    # where a stage's last site was not lesioned (no ranking), its deepest lesioned site stands in
    rankings = {"trunk.layer2.1": {"loss": {}}, "trunk.layer2.3": {"random": {}}, "trunk.layer4.2": {"activation": {}}}
    assert [s.name for _, s in inspection.stimuli_sites(resnet, rankings)] == [
        "trunk.relu", "trunk.layer1.2", "trunk.layer2.1", "trunk.layer3.5", "trunk.layer4.2"]


def test_preferred_stimuli_list_every_stage_and_count_shared_images_once(tmp_path):
    model = OneQuadrantNet().eval()
    first, last = sites_mod.lesion_sites(model)
    order = {"face": {"order": [0, 1, 2, 3, 4, 5, 6, 7]}, "object": {"order": [7, 6, 5, 4, 3, 2, 1, 0]}}
    (tmp_path / "rankings.json").write_text(json.dumps({last.name: {"activation": order}}))
    images = shared_face_images()
    written = inspection.stimuli_analysis(model, images, [first, last], tmp_path, n_filters=2, n_images=20, steps=3,
                                          stages=["block1", "block2"])
    assert [p.name for p in written] == [f"stimuli_{last.name.replace('.', '_')}.png"]
    summary = json.loads((tmp_path / "stimuli.json").read_text())
    assert list(summary) == [first.name, last.name]  # every stage, the unranked one with its reason
    assert summary[first.name]["stage"] == "block1" and "not ranked" in summary[first.name]["skipped"]
    assert summary[last.name]["stage"] == "block2" and summary[last.name]["filters"]["face"] == [0, 1]
    for top in summary[last.name]["top_images"].values():
        assert top == ["face+object"] * 20  # the 20 shared test images, each once
    tops = inspection.top_images(model, images, last, [0, 7], n=40)
    assert all(len(t) == 20 and len({i for _, i, _ in t}) == 20 for t in tops)


@pytest.mark.slow  # about two minutes; test_pipeline's ResNet demo run writes every figure in the default run
def test_figures_stage_writes_the_report_and_report_py_rebuilds_it(tmp_path):
    from conftest import TINY, TINY_LESION, run_script

    out = tmp_path / "run"
    p = run_script("ResNet.py", *TINY, *TINY_LESION, f"--out_dir={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    # 3 random orders cannot let the loss ranking's corrected p below 0.05: said before anything runs
    assert p.stdout.index("note: random_repeats=3 with 1 ranking(s) deciding the verdict (loss)") < \
        p.stdout.index("epoch 1/")
    page = (out / "report.html").read_text()
    for heading in ("Settings", "Training", "Intact accuracy", "Lesions by depth", "Dissociation by depth",
                    "Grad-CAM", "Preferred stimuli", "Layer-wise decoding"):
        assert heading in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 8 and not re.search(r'(src|href)="(?!data:|#)', page)  # nothing fetched from elsewhere
    from PIL import Image

    for data in images:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()  # every embedded image decodes
    assert "Skipped" not in page
    decoding = (out / "decoding.csv").read_text().splitlines()
    assert len(decoding) == 1 + 17 * 2
    assert json.loads((out / "stimuli.json").read_text())
    maps = np.load(out / "gradcam.npz")
    assert maps["face_images__object_head__per_image"].shape[1:] == (32, 32)
    assert maps["object_images__face_head"].shape == (32, 32) and str(maps["site"]).startswith("trunk.")

    # rebuilt from the files alone, without the model; a missing file becomes a one-line reason
    (out / "report.html").unlink()
    (out / "figures" / "decoding_by_depth.png").unlink()
    rebuilt = subprocess.run([sys.executable, "-m", "dualtask.report", str(out)], capture_output=True, text=True)
    assert rebuilt.returncode == 0, rebuilt.stderr
    page = (out / "report.html").read_text()
    assert "Skipped: figures/decoding_by_depth.png is missing" in page and "Grad-CAM" in page

    # two runs compared
    other = tmp_path / "other"
    p = run_script("vgg16.py", *TINY, *TINY_LESION, "--fc_width=32", f"--out_dir={other}")
    assert p.returncode == 0, p.stderr[-3000:]
    cmp_dir = tmp_path / "compare"
    c = subprocess.run([sys.executable, "-m", "dualtask.report.compare", str(out), str(other), f"--out_dir={cmp_dir}"],
                       capture_output=True, text=True)
    assert c.returncode == 0, c.stderr
    import csv

    rows = list(csv.DictReader(open(cmp_dir / "compare.csv")))
    assert {r["backbone"] for r in rows} == {"resnet50", "vgg16"}
    depths = [float(r["relative_depth"]) for r in rows if r["kind"] == "dissociation_index"]
    assert min(depths) == 0.0 and max(depths) == 1.0
    assert (cmp_dir / "compare.png").stat().st_size > 10_000


def test_the_linear_probe_chooses_its_penalty_on_the_training_folds_only():
    from sklearn.model_selection import StratifiedKFold, cross_validate

    from dualtask.lesion import readouts

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    x = rng.normal(size=(60, 40)) + 0.8 * np.eye(3)[y] @ rng.normal(size=(3, 40))
    folds = list(StratifiedKFold(5, shuffle=True, random_state=0).split(x, y))
    fitted = cross_validate(inspection.linear_probe(), x, y, cv=folds, return_estimator=True)["estimator"]
    for probe, (train, _) in zip(fitted, folds):
        assert probe[-1].alpha_ == readouts.choose_alpha(x[train], y[train])  # the fold's scored rows unseen


def test_not_a_run_folder_exits_2(tmp_path):
    for module, args in (("dualtask.report", [str(tmp_path)]),
                         ("dualtask.report.compare", [str(tmp_path), "--out_dir=" + str(tmp_path / "c")])):
        p = run_script(module, *args)
        assert p.returncode == 2 and "not a run folder" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow  # about a minute: a whole run with its figures stage
def test_a_failing_analysis_costs_nothing_else(tmp_path, monkeypatch, capsys):
    """scikit-learn missing (the decoding's import fails): everything else and report.html are still written,
    the failure is named on stderr and in the report, and the run exits non-zero."""
    from conftest import TINY, TINY_LESION

    import vgg16
    from dualtask.experiment import experiment

    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")] + ["sklearn"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import sklearn...` now raises ImportError
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        experiment.main(vars(vgg16), [*TINY, *TINY_LESION, "--fc_width=32", "--fixed_readout=False",  # readouts use
                                      f"--out_dir={out}"])  # scikit-learn in the lesion stage: the figures' alone
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    failure_lines = [line for line in err.splitlines() if "decoding failed" in line]
    assert len(failure_lines) == 1 and "sklearn" in failure_lines[0]  # one line when it happens
    assert "figures stage: decoding" in err.splitlines()[-1]  # and named again at the end
    assert "Traceback" not in err
    page = (out / "report.html").read_text()
    assert "Skipped: decoding failed:" in page and "sklearn" in page and "requirements.txt" in page
    for name in ("training_curves.png", "lesion_effects.png", "dissociation_by_depth.png", "gradcam_mean.png"):
        assert (out / "figures" / name).stat().st_size > 5_000
    assert list((out / "figures").glob("stimuli_*.png")) and not (out / "decoding.csv").exists()
    status = json.loads((out / "figures_status.json").read_text())
    assert status["decoding"]["ok"] is False and status["Grad-CAM"]["ok"] is True
    assert "Traceback" in status["decoding"]["traceback"]
    assert page.index("Summary") < page.index("Settings")
