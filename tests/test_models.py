import pytest
import torch
import torch.nn.functional as F

from dualtask.config.settings import BACKBONES
from dualtask.lesion.engine import ablate
from dualtask.model.network import DualTaskNet
from dualtask.model.sites import lesion_sites

SITES = {"vgg16": 13, "vgg19": 16, "resnet50": 17, "resnext50": 17}


@pytest.mark.parametrize("backbone", BACKBONES)
def test_each_backbone_takes_a_training_step_and_returns_every_head(backbone):
    torch.manual_seed(0)
    model = DualTaskNet(backbone, {"face": 7, "object": 10}, fc_width=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(4, 3, 32, 32)
    out = model(x)
    assert list(out) == ["face", "object"] and out["face"].shape == (4, 7) and out["object"].shape == (4, 10)
    loss = F.cross_entropy(out["face"][:2], torch.tensor([0, 1])) + F.cross_entropy(out["object"][2:],
                                                                                     torch.tensor([2, 3]))
    before = [p.detach().clone() for p in model.parameters()]
    loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(lesion_sites(model)) == SITES[backbone]


def test_trunk_is_torchvision_and_sizes_vary():
    import torchvision

    model = DualTaskNet("resnet50", {"a": 3, "b": 4, "c": 5})
    assert isinstance(model.trunk, torchvision.models.ResNet) and model.tasks == ["a", "b", "c"]
    model.eval()
    with torch.no_grad():
        for size in (32, 64, 224):
            assert model(torch.randn(1, 3, size, size))["c"].shape == (1, 5)
    plain = DualTaskNet("vgg16", {"a": 2, "b": 2}, batch_norm=False, fc_width=32)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    assert len(lesion_sites(plain)) == 13


@pytest.mark.parametrize("backbone", ["vgg16", "resnet50"])
def test_ablate_silences_the_site_output_and_leaves_no_trace(backbone):
    torch.manual_seed(0)
    model = DualTaskNet(backbone, {"face": 3, "object": 4}, fc_width=32).eval()
    site = lesion_sites(model)[-2]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}
    probe = site.module.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o.clone()))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        intact = model(x)["face"]
        with ablate(model, {site.name: [0, 2, 5]}):
            lesioned = model(x)["face"]
            # the probe hook was registered first, so it sees the output before the mask; check the mask by
            # hooking the module after it
        probe.remove()
        after = {}
        with ablate(model, {site.name: [0, 2, 5]}):
            h = site.module.register_forward_hook(lambda m, i, o: after.__setitem__("out", o.clone()))
            model(x)
            h.remove()
    assert (seen["out"][:, [0, 2, 5]] != 0).any()  # these channels were active
    assert (after["out"][:, [0, 2, 5]] == 0).all() and torch.equal(after["out"][:, 1], seen["out"][:, 1])
    assert not torch.equal(intact, lesioned)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x)["face"], intact)


def test_site_names_are_module_paths():
    model = DualTaskNet("resnext50", {"a": 2, "b": 2})
    names = [s.name for s in lesion_sites(model)]
    modules = dict(model.named_modules())
    assert names[0] == "trunk.relu" and names[1] == "trunk.layer1.0" and names[-1] == "trunk.layer4.2"
    assert all(n in modules for n in names)
    vgg = [s.name for s in lesion_sites(DualTaskNet("vgg19", {"a": 2, "b": 2}, fc_width=16))]
    assert vgg[0] == "trunk.features.2" and all(n.startswith("trunk.features.") for n in vgg)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_the_fused_optimizer_takes_the_plain_ones_steps(optimizer):
    """The project's optimizer uses PyTorch's fused kernel on the CPU and its step moves every weight as the
    per-parameter one's does (to float rounding; over several steps Adam's scaling of gradients near 0 makes such
    rounding visible, in either kernel), weight decay on weights only."""
    from dualtask.training.trainer import make_optimizer

    config = {"optimizer": optimizer, "weight_decay": None}
    nets = []
    for fused in (True, False):
        torch.manual_seed(0)
        net = DualTaskNet("vgg16", {"face": 3, "object": 4}, fc_width=16)
        opt = make_optimizer(net, config, lr=1e-2, fused=fused)
        assert bool(opt.param_groups[0]["fused"]) is fused
        assert [g["weight_decay"] > 0 for g in opt.param_groups] == [True, False]
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        out = net(x)
        loss = F.cross_entropy(out["face"], torch.tensor([0, 1, 2, 0])) + out["object"].square().mean()
        loss.backward()
        opt.step()
        nets.append(net)
    for a, b in zip(*(n.parameters() for n in nets)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.manual_seed(0)
    start = DualTaskNet("vgg16", {"face": 3, "object": 4}, fc_width=16)
    moved = sum(not torch.equal(a, b) for a, b in zip(start.parameters(), nets[0].parameters()))
    assert moved == len(list(start.parameters()))
