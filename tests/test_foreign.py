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


def test_receptive_fields_of_a_foreign_network_grow_with_depth():
    model = ReadoutNet(build_network("resnet18"), "resnet18", {"face": 2, "object": 2}, image_size=64).eval()
    sites = sites_mod.lesion_sites(model)
    rf = sites_mod.receptive_fields(model, sites, 64)
    shares = [rf[s.name]["share"] for s in sites]
    assert shares == sorted(shares) and shares[0] < 0.2 and shares[-1] == 1.0
    assert model.readout == "flatten" and model.trunk.width == 512
