"""Lesion sites of any network from its traced graph (dualtask.model.graph), and the suffix-only runner built from
the same graph: equal, lesion by lesion, to a whole-network forward pass with the site silenced, on every CNN family
torchvision offers (random weights, no downloads)."""
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from dualtask.core.common import UsageError
from dualtask.lesion.engine import apply_mask
from dualtask.model import graph as G

torchvision = pytest.importorskip("torchvision")

# one network per family, the smallest of each; the sites each must have (a few, by name) and how many
FAMILIES = {
    "alexnet": (["features.1", "features.11"], 5),
    "vgg11": (["features.1", "features.19"], 8),
    "resnet18": (["relu", "layer1.0", "layer4.1"], 9),
    "resnext50_32x4d": (["relu", "layer1.0", "layer4.2"], 17),
    "wide_resnet50_2": (["relu", "layer3.5", "layer4.2"], 17),
    "densenet121": (["features.relu0", "features.denseblock1.denselayer1", "features.transition1.relu", "relu"],
                    None),
    "mobilenet_v2": (["features.0", "features.1.conv.0", "features.3", "features.18"], None),
    "mobilenet_v3_small": (["features.0", "features.1", "features.12"], None),
    "efficientnet_b0": (["features.0", "features.1.0", "features.8"], None),
    "regnet_x_400mf": (["stem", "trunk_output.block1.block1-0"], None),
    "convnext_tiny": (["features.1.0", "features.7.2"], 18),
    "googlenet": (["conv1", "conv3", "inception3a", "inception5b"], 12),
}
SLOW = {"resnext50_32x4d", "wide_resnet50_2"}  # the biggest (ResNet's code, as resnet18): 5-15 s each


def network(name):
    torch.manual_seed(0)
    kw = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=7, **kw).eval()
    for m in model.modules():  # BN statistics away from the identity, so a wrong order of operations shows
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def with_site_transformed(traced, site, transform, x):
    """The whole network with `transform` applied to the site's value: a forward hook on its module where it has
    one, else the traced graph interpreted node by node."""
    if site.module is not None:
        module = traced.model.get_submodule(site.module)
        handle = module.register_forward_hook(lambda m, i, out: transform(out))
        try:
            return traced.model(x)
        finally:
            handle.remove()

    class Lesioned(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            return transform(out) if n.name == site.node else out

    return Lesioned(traced.gm).run(x)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in FAMILIES])
def test_sites_are_found_and_the_suffix_runner_equals_the_whole_network_per_lesion(name):
    model = network(name)
    traced = G.Traced(model, 64)
    sites = G.find_sites(model, traced=traced)
    expected, count = FAMILIES[name]
    names = [s.name for s in sites]
    assert set(expected) <= set(names), names
    assert count is None or len(sites) == count
    assert len(set(names)) == len(names) and [s.depth for s in sites] == list(range(len(sites)))
    x = torch.randn(2, 3, 64, 64)
    m = 3
    for site in sites:
        runner = G.GraphRunner(traced, site)
        keep = (torch.rand(m, site.n_filters, generator=torch.Generator().manual_seed(site.depth)) > 0.4).float()
        add = torch.zeros(m, site.n_filters)
        with torch.no_grad():
            values = runner.prefix(x)
            stacked = runner.suffix(values, lambda v: apply_mask(v, keep, add, m), m).view(m, 2, -1)
            for j in range(m):
                whole = with_site_transformed(traced, site, lambda v: apply_mask(v, keep[j:j + 1], add[j:j + 1], 1), x)
                assert torch.allclose(stacked[j], whole, atol=1e-5, rtol=1e-4), (name, site.name, j)
            # silencing nothing is the intact network
            assert torch.allclose(runner.suffix(values), model(x), atol=1e-5, rtol=1e-4)


class TwiceReLU(nn.Module):
    """A ReLU module called twice outside any block: two sites, one per call."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        return self.fc(x.mean((2, 3)))


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv(x))


class SharedBlock(nn.Module):
    """One residual block applied twice: refused, not one site that silences two places."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = Residual(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.block(self.block(self.stem(x))).mean((2, 3)))


def test_a_module_called_twice_gives_two_sites_and_a_block_called_twice_is_refused():
    model = TwiceReLU().eval()
    traced = G.Traced(model, 16)
    sites = G.find_sites(model, traced=traced)
    assert [(s.name, s.n_filters, s.module) for s in sites] == [("act", 4, None), ("act_1", 5, None)]
    x = torch.randn(3, 3, 16, 16)
    for site in sites:  # each site silences its own call only
        runner = G.GraphRunner(traced, site)
        with torch.no_grad():
            out = runner.suffix(runner.prefix(x), torch.zeros_like)
            assert torch.allclose(out, with_site_transformed(traced, site, torch.zeros_like, x))
            assert not torch.allclose(out, G.GraphRunner(traced, sites[1 - site.depth]).suffix(
                G.GraphRunner(traced, sites[1 - site.depth]).prefix(x), torch.zeros_like))
    with pytest.raises(UsageError, match=r"'block' \(Residual\) is called 2 times"):
        G.find_sites(SharedBlock().eval(), 16)


def test_the_runner_returns_the_features_a_readout_reads_and_refuses_nodes_before_the_site():
    model = network("resnet18")
    traced = G.Traced(model, 32)
    assert G.classifier_input(traced) == "flatten"
    sites = {s.name: s for s in G.find_sites(model, traced=traced)}
    runner = G.GraphRunner(traced, sites["layer3.0"], outputs=["flatten"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = runner.suffix(runner.prefix(x))["flatten"]
        assert features.shape == (2, 512)
        assert torch.allclose(model.fc(features), model(x), atol=1e-5)
    with pytest.raises(UsageError, match="come before the lesion site"):
        G.GraphRunner(traced, sites["layer3.0"], outputs=["layer1.0.conv1"])
    with pytest.raises(UsageError, match="outputs='nope': not a node of the traced network"):
        G.GraphRunner(traced, sites["layer3.0"], outputs=["nope"])


# ----------------------------------------------------------------------------------------------------------
# networks from anywhere (dualtask.model.zoo)


def test_networks_by_name_and_weights_files_that_fit_or_are_refused_naming_the_key(tmp_path):
    from dualtask.model import zoo

    model = zoo.build_network("resnet18")
    assert type(model).__name__ == "ResNet" and not model.training
    assert type(zoo.build_network("torchvision:mobilenet_v3_small")).__name__ == "MobileNetV3"
    with pytest.raises(UsageError, match=r"torchvision has no model 'resnet51'; did you mean resnet50"):
        zoo.build_network("resnet51")
    with pytest.raises(UsageError, match=r"unknown source 'keras'"):
        zoo.build_network("keras:resnet50")
    # a state dict of the architecture loads exactly (weights_only), also one saved from DistributedDataParallel
    path = tmp_path / "resnet18.pt"
    torch.save(model.state_dict(), path)
    again = zoo.build_network("resnet18", str(path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "ddp.pt")
    assert torch.equal(zoo.build_network("resnet18", str(tmp_path / "ddp.pt")).conv1.weight, model.conv1.weight)
    # a fine-tuned checkpoint with 10 classes: built with the file's classes
    tuned = torchvision.models.resnet18(num_classes=10)
    torch.save(tuned.state_dict(), tmp_path / "tuned.pt")
    assert zoo.build_network("resnet18", str(tmp_path / "tuned.pt")).fc.out_features == 10
    # another architecture: refused, the first mismatched key and both shapes named
    with pytest.raises(UsageError, match=r"weights='.*resnet18.pt' does not fit torchvision's resnet50: key "
                                         r"'layer1.0.conv1.weight' has shape \(64, 64, 3, 3\) in the file, "
                                         r"\(64, 64, 1, 1\) in the network"):
        zoo.build_network("resnet50", str(path))
    with pytest.raises(UsageError, match=r"does not fit torchvision's vgg11: key 'features.0.weight' is missing"):
        zoo.build_network("vgg11", str(path))
    with pytest.raises(UsageError, match=r"weights='.*nope.pt': no such file; expected 'random', 'pretrained'"):
        zoo.build_network("resnet18", str(tmp_path / "nope.pt"))


def test_published_weights_without_a_network_are_refused_saying_how_to_pass_a_file(monkeypatch):
    import urllib.error

    import torchvision

    from dualtask.core.common import UsageError
    from dualtask.model import zoo

    def offline(self, *args, **kwargs):  # never a download here: torchvision's fetch replaced by a failing one
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(UsageError, match=r"weights='pretrained': cannot get torchvision's weights of resnet18 "
                                         r"\(https://.*URLError.*network access.*--weights=<path to it>"):
        zoo.build_network("resnet18", "pretrained")


def test_a_timm_model_runs_when_timm_is_installed():
    pytest.importorskip("timm")
    from dualtask.model import zoo

    model = zoo.build_network("timm:resnet18")
    traced = G.Traced(model, 64)
    sites = G.find_sites(model, traced=traced)
    assert len(sites) >= 5 and sites[-1].n_filters == 512
    x = torch.randn(2, 3, 64, 64)
    runner = G.GraphRunner(traced, sites[len(sites) // 2])
    with torch.no_grad():
        assert torch.allclose(runner.suffix(runner.prefix(x)), model(x), atol=1e-5)


class Odd(nn.Module):
    """Three things a site must not be or hide: an in-place method whose result nothing reads (it changes x all the
    same), a channels-last map (N, H, W, C: its last dimension is not filters), and a value without a batch
    dimension carried past a site."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.gain = nn.Parameter(torch.ones(4))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        scale = self.gain.view(1, -1, 1, 1) * 2  # no batch dimension, read after the first site
        x = torch.relu(self.conv1(x))
        x.mul_(2)  # in place: its result is not read, its effect is
        last = torch.nn.functional.gelu(x.permute(0, 2, 3, 1))  # a channels-last map
        x = torch.relu(self.conv2(last.permute(0, 3, 1, 2)) * scale)
        return self.fc(x.mean((2, 3)))


def test_sites_leave_out_channels_last_maps_and_cuts_that_carry_values_without_a_batch_and_keep_in_place_ops():
    model = Odd().eval()
    traced = G.Traced(model, 16)
    sites = G.find_sites(model, traced=traced)
    assert [s.name for s in sites] == ["relu_1"]  # relu: scale crosses its cut; gelu: channels last
    trunk = G.GraphTrunk(model, 16, readout="mean")
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.fc(trunk(x)), model(x), atol=1e-6)  # the in-place product is still there
