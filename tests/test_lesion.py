import numpy as np
import pytest
import torch

from dualtask.core import common
from dualtask.data import loading as vggface2
from dualtask.lesion import dissociation, engine, rankings
from dualtask.model import sites as sites_mod
from dualtask.model.network import DualTaskNet
from dualtask.training.trainer import TaskImages


@pytest.fixture(scope="module")
def demo_images():
    data = {t: vggface2.load_task("demo", t, 32, max_per_class=8) for t in ("face", "object")}
    return {t: TaskImages(d, torch.device("cpu")) for t, d in data.items()}


@pytest.mark.parametrize("backbone", ["vgg16", "resnet50"])
def test_suffix_only_sweep_equals_the_naive_sweep_exactly(backbone, demo_images):
    torch.manual_seed(1)
    # recipe 1 (torchvision's initialisation): recipe 2 starts every residual branch at zero, so an untrained
    # ResNet's inner lesions would change nothing and the comparison would prove little
    model = DualTaskNet(backbone, {"face": 10, "object": 10}, fc_width=32, recipe=1).eval()
    batches = engine.image_batches(demo_images, batch_size=16)
    sites = sites_mod.lesion_sites(model, inner=True)
    rng = np.random.default_rng(0)
    for site in sites[:: max(1, len(sites) // 4)]:  # the first, the last-but-few and three between
        lesions = [rng.permutation(site.n_filters)[:k] for k in (1, site.n_filters // 4, site.n_filters - 1)]
        naive = engine.evaluate_lesions_naive(model, site, lesions, batches)
        for masks_per_pass in (1, 3):
            fast = engine.evaluate_lesions(model, site, lesions, batches, masks_per_pass=masks_per_pass)
            for a, b in zip(fast, naive):
                for task in ("face", "object"):
                    assert np.array_equal(a[task]["correct"], b[task]["correct"]), site.name
                    assert np.array_equal(a[task]["loss"], b[task]["loss"]), site.name
        assert any(not np.array_equal(naive[0]["face"]["loss"], n["face"]["loss"]) for n in naive[1:])


def test_inner_sites_and_mean_ablation():
    torch.manual_seed(0)
    model = DualTaskNet("resnet50", {"a": 2, "b": 3}).eval()
    plain, inner = sites_mod.lesion_sites(model), sites_mod.lesion_sites(model, inner=True)
    assert len(plain) == 17 and len(inner) == 17 + 2 * 16
    site = sites_mod.get_site(model, "trunk.layer2.1.bn2")
    x = torch.randn(2, 3, 32, 32)
    means = torch.arange(site.n_filters, dtype=torch.float32)
    seen = {}
    with engine.ablate(model, {site.name: [3, 7]}, mode="mean", means={site.name: means}):
        h = model.trunk.layer2[1].conv3.register_forward_pre_hook(lambda m, i: seen.__setitem__("in", i[0]))
        with torch.no_grad():
            model(x)
        h.remove()
    # after the shared ReLU, the lesioned channels hold their mean everywhere
    assert torch.all(seen["in"][:, 3] == 3.0) and torch.all(seen["in"][:, 7] == 7.0)
    with pytest.raises(common.UsageError, match="unknown lesion site"):
        with engine.ablate(model, {"trunk.layer9": [0]}):
            pass


def test_forward_chain_reproduces_the_trunk():
    torch.manual_seed(0)
    for backbone in ("vgg19", "resnext50"):
        model = DualTaskNet(backbone, {"a": 2, "b": 2}, fc_width=16).eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            y = x
            for _, step in sites_mod.forward_chain(model):
                y = step(y)
            assert torch.equal(y, model.trunk(x))


def test_chance_corrected_drop():
    assert dissociation.corrected_drop(0.9, 0.5, 0.1) == pytest.approx(0.5)
    assert dissociation.corrected_drop(0.9, 0.9, 0.1) == 0
    assert dissociation.corrected_drop(0.6, 0.1, 0.1) == pytest.approx(1.0)
    assert np.isnan(dissociation.corrected_drop(0.1, 0.1, 0.1))


def test_dissociation_is_undefined_for_a_head_at_chance():
    site = sites_mod.Site("layer", None, 10, 0)
    rng = np.random.default_rng(0)

    def result(p_face, p_object):
        return {"face": {"correct": rng.random(200) < p_face, "loss": np.ones(200)},
                "object": {"correct": rng.random(200) < p_object, "loss": np.ones(200)}}

    conditions = [("loss", "face", 0, 0.2, np.arange(2)), ("loss", "object", 0, 0.2, np.arange(2)),
                  ("random", "random", 0, 0.2, np.arange(2)), ("random", "random", 1, 0.2, np.arange(2))]
    chance = {"face": 0.25, "object": 0.25}
    results = [result(0.3, 0.9), result(0.9, 0.3), result(0.85, 0.85), result(0.85, 0.85)]
    (row,) = dissociation.dissociation_rows(site, conditions, results, result(0.95, 0.95), chance, ["face", "object"])
    assert float(row["index"]) > 1.5 and float(row["ci_low"]) > 1.0 and float(row["ci_high"]) < 2.5
    at_chance = result(0.25, 0.95)
    at_chance["face"]["correct"] = np.arange(200) % 4 == 0  # exactly a quarter right, as chance predicts
    (row,) = dissociation.dissociation_rows(site, conditions, results, at_chance, chance, ["face", "object"],
                                            n_boot=200)
    assert np.isnan(float(row["index"])) and np.isnan(float(row["ci_low"])) and np.isnan(float(row["ci_high"]))


def test_rank_correlation_is_spearmans_with_ties_averaged():
    from scipy import stats

    rng = np.random.default_rng(0)
    for _ in range(20):  # filters tied at zero (never active) on either side, as in early layers
        a = np.where(rng.random(40) < 0.5, 0.0, rng.random(40))
        b = np.where(rng.random(40) < 0.5, 0.0, a + 0.3 * rng.random(40))
        assert rankings.rank_correlation(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    small = ([0, 0, 0, 1, 2], [0, 1, 0, 2, 3])  # sort-order ranks for the ties gave 0.9 here, not 0.918
    assert rankings.rank_correlation(*small) == pytest.approx(stats.spearmanr(*small).statistic)
    assert np.isnan(rankings.rank_correlation(np.zeros(5), np.arange(5)))  # a constant side: no correlation
    # the split-half reliability reports it
    entry = {"order": [3, 4, 1, 0, 2], "by_channel": small[0]}
    other = {"order": [4, 3, 1, 0, 2], "by_channel": small[1]}
    rel = rankings.split_half_reliability(({"loss": {"face": entry}}, {"loss": {"face": other}}))
    assert rel["loss"]["face"]["spearman"] == round(stats.spearmanr(*small).statistic, 4)


def _same_results(a: list, b: list) -> bool:
    return all(x.keys() == y.keys() and all(np.array_equal(x[t][k], y[t][k], equal_nan=True) for t in x for k in x[t])
               for x, y in zip(a, b, strict=True))


def test_compact_batches_hold_a_quarter_of_the_memory_and_give_the_same_numbers(demo_images):
    """image_batches(compact=True) keeps uint8 (B, H, W, 3) on the device and the engine normalises batch by batch:
    lesion results, rankings and fixed readouts equal those of the normalised float32 batches, bit for bit."""
    from dualtask.lesion import readouts

    torch.manual_seed(1)
    model = DualTaskNet("resnet50", {"face": 10, "object": 10}, fc_width=32, recipe=1).eval()
    plain = engine.image_batches(demo_images, batch_size=16)
    compact = engine.image_batches(demo_images, batch_size=16, compact=True)
    assert len(plain) == len(compact) > 1
    for (tp, p, yp), (tc, c, yc) in zip(plain, compact):
        assert tp == tc and torch.equal(yp, yc)
        assert c.dtype == torch.uint8 and c.shape == (len(yc), 32, 32, 3) and 4 * c.nbytes == p.nbytes
        assert torch.equal(engine.model_input(c), p) and engine.model_input(p) is p
    assert engine.input_shape(compact) == engine.input_shape(plain) == (3, 32, 32)
    site = sites_mod.lesion_sites(model)[0]  # the stem: its prefix reads the images themselves
    lesions = [[0, 1, 2], list(range(0, site.n_filters, 3)), []]
    for per_pass in (1, 2):
        assert _same_results(engine.evaluate_lesions(model, site, lesions, compact, masks_per_pass=per_pass),
                             engine.evaluate_lesions(model, site, lesions, plain, masks_per_pass=per_pass))
    assert _same_results(engine.evaluate_lesions_naive(model, site, lesions[:2], compact),
                         engine.evaluate_lesions_naive(model, site, lesions[:2], plain))
    methods = ["activation", "taylor"]  # through model(); the loss ranking scores its lesions by evaluate_lesions
    ranked = [rankings.rank_site(model, site, b, ["face", "object"], methods, random_repeats=2)
              for b in (compact, plain)]
    for method in methods:
        for task in ("face", "object"):
            assert np.array_equal(ranked[0][method][task]["order"], ranked[1][method][task]["order"]), method
    fixed = [readouts.fixed_readouts(model, site, b, seed=0) for b in (compact, plain)]
    assert _same_results(readouts.fixed_lesions(model, site, lesions, fixed[0], compact),
                         readouts.fixed_lesions(model, site, lesions, fixed[1], plain))
    assert engine.masks_per_pass_by_site(model, [site], compact) == engine.masks_per_pass_by_site(model, [site], plain)
