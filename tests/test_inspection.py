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

import inspection
import lesion_utils as L
from conftest import ROOT


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
    site = L.lesion_sites(model)[-1]
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


@pytest.mark.slow  # about two minutes; test_pipeline's ResNet demo run writes every figure in the default run
def test_figures_stage_writes_the_report_and_report_py_rebuilds_it(tmp_path):
    from conftest import TINY, TINY_LESION, run_script

    out = tmp_path / "run"
    p = run_script("ResNet.py", *TINY, *TINY_LESION, f"--out_dir={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    page = (out / "report.html").read_text()
    for heading in ("Settings", "Training", "Intact accuracy", "Lesions by depth", "Dissociation by depth",
                    "Grad-CAM", "Preferred stimuli", "Layer-wise decoding"):
        assert heading in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 8 and not re.search(r'(src|href)="(?!data:)', page)  # nothing fetched from elsewhere
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
    rebuilt = subprocess.run([sys.executable, str(ROOT / "report.py"), str(out)], capture_output=True, text=True)
    assert rebuilt.returncode == 0, rebuilt.stderr
    page = (out / "report.html").read_text()
    assert "Skipped: figures/decoding_by_depth.png is missing" in page and "Grad-CAM" in page

    # two runs compared
    other = tmp_path / "other"
    p = run_script("vgg16.py", *TINY, *TINY_LESION, "--fc_width=32", f"--out_dir={other}")
    assert p.returncode == 0, p.stderr[-3000:]
    cmp_dir = tmp_path / "compare"
    c = subprocess.run([sys.executable, str(ROOT / "compare.py"), str(out), str(other), f"--out_dir={cmp_dir}"],
                       capture_output=True, text=True)
    assert c.returncode == 0, c.stderr
    import csv

    rows = list(csv.DictReader(open(cmp_dir / "compare.csv")))
    assert {r["backbone"] for r in rows} == {"resnet50", "vgg16"}
    depths = [float(r["relative_depth"]) for r in rows if r["kind"] == "dissociation_index"]
    assert min(depths) == 0.0 and max(depths) == 1.0
    assert (cmp_dir / "compare.png").stat().st_size > 10_000


def test_not_a_run_folder_exits_2(tmp_path):
    for script, args in (("report.py", [str(tmp_path)]), ("compare.py", [str(tmp_path), "--out_dir=" + str(tmp_path / "c")])):
        p = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True)
        assert p.returncode == 2 and "not a run folder" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow  # about a minute: a whole run with its figures stage
def test_a_failing_analysis_costs_nothing_else(tmp_path, monkeypatch, capsys):
    """scikit-learn missing (the decoding's import fails): everything else and report.html are still written,
    the failure is named on stderr and in the report, and the run exits non-zero."""
    import experiment
    import vgg16
    from conftest import TINY, TINY_LESION

    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")] + ["sklearn"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import sklearn...` now raises ImportError
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        experiment.main(vars(vgg16), [*TINY, *TINY_LESION, "--fc_width=32", f"--out_dir={out}"])
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
