"""A network this tool did not train, read through linear heads on its own features (model/foreign.py): the lesion
engine's sites, its suffix-only evaluation and its activations work on it as on the four backbones."""
import numpy as np
import pytest
import torch

from dualtask.lesion import engine
from dualtask.model import sites as sites_mod
from dualtask.model.foreign import ReadoutNet
from dualtask.model.zoo import build_network


def batches(n=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(t, torch.randn(n, 3, size, size, generator=g), torch.randint(0, 3, (n,), generator=g))
            for t in ("face", "object")]


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "mobilenet_v2", "googlenet"])
def test_the_suffix_only_sweep_equals_the_whole_network_per_lesion_on_a_foreign_network(name):
    torch.manual_seed(0)
    model = ReadoutNet(build_network(name), name, {"face": 3, "object": 3}, image_size=32).eval()
    sites = sites_mod.lesion_sites(model)
    assert sites[0].name.startswith("trunk.") and len({s.name for s in sites}) == len(sites)
    data = batches()
    for site in sites[:: max(1, len(sites) // 4)]:  # a few sites, early to late (DenseNet's carry skip values)
        rng = np.random.default_rng(site.depth)
        lesions = [rng.choice(site.n_filters, max(1, site.n_filters // 5), replace=False) for _ in range(3)]
        fast = engine.evaluate_lesions(model, site, lesions, data, masks_per_pass=2)
        slow = engine.evaluate_lesions_naive(model, site, lesions, data)
        for f, s in zip(fast, slow):
            for task in ("face", "object"):
                np.testing.assert_array_equal(f[task]["correct"], s[task]["correct"])
                np.testing.assert_allclose(f[task]["loss"], s[task]["loss"], rtol=1e-4, atol=1e-5)
    acts = engine.site_activations(model, sites[:2], data)
    assert acts[sites[0].name]["face"].shape == (6, sites[0].n_filters)


@pytest.mark.parametrize("name, first", [("resnet18", 7 / 64), ("convnext_tiny", 28 / 64)])
def test_receptive_fields_of_a_foreign_network_grow_with_depth(name, first):
    model = ReadoutNet(build_network(name), name, {"face": 2, "object": 2}, image_size=64).eval()
    sites = sites_mod.lesion_sites(model)
    rf = sites_mod.receptive_fields(model, sites, 64)  # ConvNeXt: layer norms and linear layers in float64 too
    shares = [rf[s.name]["share"] for s in sites]
    # the stem's 7 px (resnet18); ConvNeXt's first block: a 4-px patch, then a 7 x 7 depthwise conv at stride 4
    assert shares == sorted(shares) and shares[0] == pytest.approx(first, abs=1e-4) and shares[-1] == 1.0
    assert model.trunk.width == {"resnet18": 512, "convnext_tiny": 768}[name]


# ----------------------------------------------------------------------------------------------------------
# python lesion_utils.py: a saved network, analysed without training


SMALL = ["--image_size=32", "--device=cpu", "--demo_per_class=20", "--lesion_layers=[0, 4, 8]",
         "--lesion_fractions=[0.0, 0.1, 0.2, 0.3]", "--lesion_methods=['activation', 'loss', 'random']",
         "--random_repeats=3", "--rank_images=8", "--stages=['train', 'lesion']"]


@pytest.mark.slow
def test_own_network_analyses_a_saved_state_dict_and_its_report_says_how_it_was_read(tmp_path):
    import json

    import torchvision
    from conftest import run_script

    from dualtask import load_run

    torch.manual_seed(0)
    saved = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), saved)
    out = tmp_path / "run"
    done = run_script("lesion_utils.py", "--network=resnet18", f"--weights={saved}", f"--out_dir={out}", *SMALL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "readout heads fitted to resnet18's features at flatten" in done.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["backbone"] == "resnet18" and config["readout_layer_used"] == "flatten"
    sites = {r.split(",")[0] for r in (out / "lesion_results.csv").read_text().splitlines()[1:]}
    assert sites == {"trunk.relu", "trunk.layer2.1", "trunk.layer4.1"}
    assert (out / "fixed_readout" / "dissociation.csv").exists()
    # the network analysed is the file's: its weights are in the run's checkpoint, and load_run reads it back
    model, _ = load_run(out)
    assert torch.equal(model.trunk.net.conv1.weight, torch.load(saved, weights_only=True)["conv1.weight"])
    page = run_script("dualtask.report", str(out))
    assert page.returncode == 0, page.stderr
    assert "A network trained elsewhere (resnet18, weights" in (out / "report.html").read_text()
    # run again: the heads are not fitted again, the finished sites not lesioned again
    again = run_script("lesion_utils.py", "--network=resnet18", f"--weights={saved}", f"--out_dir={out}", *SMALL)
    assert again.returncode == 0 and "readout heads fitted earlier" in again.stdout
    # the file saved again with other weights is another network: refused, the run folder untouched
    torch.save(torchvision.models.resnet18().state_dict(), saved)
    before = (out / "checkpoint.pt").read_bytes()
    other = run_script("lesion_utils.py", "--network=resnet18", f"--weights={saved}", f"--out_dir={out}", *SMALL)
    assert other.returncode == 2 and "network_digest" in other.stderr and "Traceback" not in other.stderr
    assert (out / "checkpoint.pt").read_bytes() == before


def test_own_network_refuses_a_wrong_file_or_name_before_writing_anything(tmp_path):
    import torchvision
    from conftest import run_script

    saved = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), saved)
    out = tmp_path / "run"
    wrong = run_script("lesion_utils.py", "--network=resnet50", f"--weights={saved}", f"--out_dir={out}", *SMALL)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "does not fit torchvision's resnet50: key 'layer1.0.conv1.weight' has shape (64, 64, 3, 3) in the file" \
        in wrong.stderr and not out.exists()
    unknown = run_script("lesion_utils.py", "--network=resnet51", f"--out_dir={out}", *SMALL)
    assert unknown.returncode == 2 and "torchvision has no model 'resnet51'" in unknown.stderr and not out.exists()
    missing = run_script("lesion_utils.py", "--network=resnet18", f"--weights={tmp_path / 'nope.pt'}",
                         f"--out_dir={out}", *SMALL)
    assert missing.returncode == 2 and "weights=" in missing.stderr and "no such file" in missing.stderr
    assert not out.exists()


@pytest.mark.slow
def test_the_python_call_returns_the_same_numbers_as_the_command(tmp_path):
    import ast

    import torchvision
    from conftest import run_script

    import lesion_utils as L
    from dualtask.core.common import UsageError

    torch.manual_seed(1)
    net = torchvision.models.resnet18()
    saved = tmp_path / "resnet18.pt"
    torch.save(net.state_dict(), saved)
    settings = {a[2:].split("=", 1)[0]: a.split("=", 1)[1] for a in SMALL}
    settings = {k: ast.literal_eval(v) if k not in ("device",) else v for k, v in settings.items()}
    tables = L.analyse(net, tmp_path / "python", **settings)
    shell = run_script("lesion_utils.py", "--network=resnet18", f"--weights={saved}",
                       f"--out_dir={tmp_path / 'shell'}", *SMALL)
    assert shell.returncode == 0, shell.stderr[-2000:]
    again = L.load_results(tmp_path / "shell")
    assert set(tables) == set(again) >= {"lesion_results", "dissociation", "train_log",
                                         "fixed_readout/lesion_results", "fixed_readout/dissociation"}
    for name in ("dissociation", "fixed_readout/dissociation", "lesion_results"):
        numbers = tables[name].select_dtypes("number").columns
        assert len(tables[name]) > 0
        assert tables[name][numbers].equals(again[name][numbers]), name
    assert torch.equal(net.conv1.weight, torch.load(saved, weights_only=True)["conv1.weight"])  # the user's intact
    with pytest.raises(UsageError, match="network_digest"):  # another network of the same class, same folder
        L.analyse(torchvision.models.resnet18(), tmp_path / "python", **settings)
    with pytest.raises(UsageError, match=r"unknown setting\(s\) \['epochs'\]"):
        L.analyse(net, tmp_path / "x", epochs=3)
    with pytest.raises(UsageError, match="not a run folder"):
        L.load_results(tmp_path / "x")


def test_a_readout_fitted_in_its_training_rows_span_equals_the_readout_fitted_on_every_feature():
    import warnings

    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.preprocessing import StandardScaler

    from dualtask.core.common import UsageError
    from dualtask.training.readout_heads import PENALTIES, fit_linear, row_space

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    centres = np.zeros((3, 400))
    centres[:, :5] = rng.normal(size=(3, 5)) * 2  # five informative features of 400: a penalty inside the range
    x = rng.normal(size=(60, 400)) + centres[y]  # wider than it is tall
    z, basis = row_space(x)
    assert z.shape == (60, 60) and np.allclose(basis @ basis.T, np.eye(60)) and np.allclose(z @ basis, x)
    weight, bias, c = fit_linear(x, y, n_classes=4)
    scaler = StandardScaler().fit(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = LogisticRegressionCV(Cs=list(PENALTIES), cv=5, max_iter=5000, tol=1e-8).fit(scaler.transform(x), y)
    assert c == float(plain.C_[0]) == 0.01
    probe = rng.normal(size=(30, 400)) + centres[np.arange(30) % 3]
    ours = probe @ weight[:3].T + bias[:3]
    theirs = plain.decision_function(scaler.transform(probe))
    assert np.abs(ours - theirs).max() < 1e-2 * np.abs(theirs).max()
    assert (ours.argmax(1) == theirs.argmax(1)).all()
    assert bias[3] < -1e3 and not weight[3].any()  # a class absent from the training images is never predicted
    with pytest.raises(UsageError, match="1 class"):
        fit_linear(x, np.zeros(60, int), n_classes=2)


def test_a_foreign_networks_stages_for_preferred_stimuli_are_its_feature_map_sizes():
    import torchvision

    from dualtask.analysis.inspection import conv_stages, stimuli_sites

    model = ReadoutNet(torchvision.models.resnet18(), "resnet18", {"face": 3, "object": 3}, image_size=32)
    stages = conv_stages(model)
    assert [n for n, _ in stages] == ["16x16", "8x8", "4x4", "2x2", "1x1"]
    assert [s.name for _, st in stages for s in st] == [s.name for s in sites_mod.lesion_sites(model)]
    ranked = {"trunk.layer1.0": {"loss": {}}}  # the deepest ranked site of its stage stands for the stage
    assert [s.name for _, s in stimuli_sites(model, ranked)] == ["trunk.relu", "trunk.layer1.0", "trunk.layer2.1",
                                                                  "trunk.layer3.1", "trunk.layer4.1"]
