"""Ground truth for the lesion engine: a network whose chosen channels carry one task's information only."""
import numpy as np
import pytest
from helpers import N_CLASSES, PlantedNet, planted_batches

from dualtask.lesion import dissociation, engine, rankings
from dualtask.model import sites as sites_mod


@pytest.fixture(scope="module", params=["split", "joint"])
def planted(request):
    """The planted network with one head per task, and with one joint softmax over both tasks' classes."""
    model = PlantedNet(request.param).eval()
    sites = sites_mod.lesion_sites(model)
    assert [s.name for s in sites] == ["trunk.1", "trunk.3"] and [s.n_filters for s in sites] == [8, 16]
    return model, sites, planted_batches(40, seed=0), planted_batches(60, seed=1)


@pytest.mark.parametrize("method", ["loss", "greedy", "activation", "localiser", "mask"])
def test_planted_channels_rank_first(planted, method):
    model, sites, train, _ = planted
    ranking = rankings.rank_site(model, sites[1], train, ["face", "object"], [method], seed=0)[method]
    for task, planted_channels in (("face", {0, 1, 2, 3}), ("object", {4, 5, 6, 7})):
        top = set(ranking[task]["order"][:4])
        assert len(top & planted_channels) / 4 >= 0.9, (method, task, ranking[task]["order"])


def test_planted_taylor_agrees_with_loss(planted):
    model, sites, train, _ = planted
    ranking = rankings.rank_site(model, sites[1], train, ["face", "object"], ["loss", "taylor"], seed=0)
    assert set(ranking["taylor"]["face"]["order"][:4]) == {0, 1, 2, 3}
    if model.head == "split":
        # with a joint softmax the other task's detectors also move a face's loss (its object logits), by amounts
        # near the noise, so the order below the planted four is not comparable; the planted set is
        assert ranking["agreement"]["face"] > 0.5


def test_planted_lesion_dissociates_only_where_planted(planted):
    model, sites, train, test = planted
    intact = engine.evaluate_lesions(model, sites[1], [[]], test)[0]
    chance = {"face": 1 / N_CLASSES, "object": 1 / N_CLASSES}
    assert intact["face"]["correct"].mean() > 0.8 and intact["object"]["correct"].mean() > 0.8
    index = {}
    for site in sites:
        ranking = rankings.rank_site(model, site, train, ["face", "object"], ["loss", "random"], random_repeats=6,
                                     seed=0)
        conditions = dissociation.lesion_conditions(site, ranking, [0.25])
        results = engine.evaluate_lesions(model, site, [c for *_, c in conditions], test)
        by = {(m, t, r): res for (m, t, r, _, _), res in zip(conditions, results)}
        if site.name == "trunk.3":
            face_lesion = by[("loss", "face", 0)]
            assert face_lesion["face"]["correct"].mean() < 0.5  # face filters silenced: faces fail
            drop_object = intact["object"]["correct"].mean() - face_lesion["object"]["correct"].mean()
            assert abs(drop_object) <= 0.03  # objects within a few points
        rows = dissociation.dissociation_rows(site, conditions, results, intact, chance, ["face", "object"], n_boot=300)
        (row,) = rows
        index[site.name] = row
    planted_row, plain_row = index["trunk.3"], index["trunk.1"]
    assert float(planted_row["index"]) > 1.0 and float(planted_row["ci_low"]) > 0.5
    assert float(planted_row["p_a_by_a"]) == pytest.approx(1 / 7, abs=1e-3)  # beyond every random lesion
    assert float(planted_row["p_index"]) == pytest.approx(1 / 8, abs=1e-3)  # and every other pair of the ring of 8
    assert float(planted_row["null_low"]) <= float(planted_row["null_high"]) < float(planted_row["index"])
    assert abs(float(plain_row["index"])) < 0.1 and float(plain_row["ci_low"]) <= 0.05


def test_planted_rankings_are_reproducible_across_halves_and_random_scores_are_not(planted):
    model, sites, train, _ = planted
    first, second = rankings.split_halves(train)
    assert sum(len(x) for _, x, _ in first) + sum(len(x) for _, x, _ in second) == sum(len(x) for _, x, _ in train)
    ranking = rankings.rank_site(model, sites[1], train, ["face", "object"], ["loss", "activation", "random"], seed=0,
                          reliability=True)
    rel = ranking["reliability"]
    assert set(rel) == {"loss", "activation"}  # random orders have nothing to reproduce
    for method in rel:
        for task in ("face", "object"):
            # the top 20% (3 of 16) are planted channels in both halves; which 3 of the 4 may vary
            assert rel[method][task]["top20"] >= 2 / 3, (method, task, rel[method][task])
    assert rankings.top_overlap([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], 0.4) == 0.0
    assert rankings.top_overlap(list(range(10)), [1, 0] + list(range(2, 10)), 0.2) == 1.0
    halves = ({"x": {"t": rankings.ranking_entry(np.arange(10), -np.arange(10.0))}},
              {"x": {"t": rankings.ranking_entry(np.arange(10)[::-1], np.arange(10.0))}})
    assert rankings.split_half_reliability(halves)["x"]["t"]["spearman"] == pytest.approx(-1.0)


def test_the_loss_rankings_halves_come_from_its_per_image_losses_as_if_each_half_were_ranked_alone(planted):
    model, sites, train, _ = planted
    # uneven batches (7, 7, 6 images per task) so the halves' positions cross batch boundaries
    batches = [(t, x[a:b], y[a:b]) for t, x, y in train for a, b in ((0, 7), (7, 14), (14, 20))]
    ranking = rankings.rank_site(model, sites[1], batches, ["face", "object"], ["loss"], reliability=True)
    per_image = {t: rankings.loss_per_image(model, sites[1], batches, t) for t in ("face", "object")}
    for k, half in enumerate(rankings.split_halves(batches)):
        alone = rankings.rank_site(model, sites[1], half, ["face", "object"], ["loss"])["loss"]
        for task in ("face", "object"):
            positions = rankings.half_positions(batches, task, k)
            assert len(positions) == sum(len(y) for t, _, y in half if t == task)
            shared = rankings.loss_increase(per_image[task], positions)
            np.testing.assert_allclose(shared, alone[task]["by_channel"], rtol=1e-5, atol=1e-6)
    def half(k, task):
        scores = rankings.loss_increase(per_image[task], rankings.half_positions(batches, task, k))
        return rankings.ranking_entry(rankings.order_of(scores), scores)

    assert ranking["reliability"] == rankings.split_half_reliability(
        tuple({"loss": {t: half(k, t) for t in ("face", "object")}} for k in (0, 1)))
    # the whole set's scores are the mean over all images, as before the halves were shared
    np.testing.assert_array_equal(ranking["loss"]["face"]["by_channel"],
                                  rankings.loss_scores(model, sites[1], batches, "face"))


def test_the_localiser_selects_exactly_the_planted_channels_and_the_mask_opens_only_them(planted):
    model, sites, train, _ = planted
    ranking = rankings.rank_site(model, sites[1], train, ["face", "object"], ["localiser", "mask"], seed=0)
    for task, planted_channels in (("face", [0, 1, 2, 3]), ("object", [4, 5, 6, 7])):
        localiser = ranking["localiser"][task]
        assert localiser["n_selective"] == 4 and localiser["fdr"] == 0.05
        assert sorted(localiser["order"][:4]) == planted_channels
        gates = np.asarray(ranking["mask"][task]["by_channel"])
        assert ranking["mask"][task]["n_open"] == 4 and sorted(np.flatnonzero(gates > 0.5)) == planted_channels
    # the copies of trunk.1 respond to both tasks alike: nothing is face- or object-selective there
    early = rankings.rank_site(model, sites[0], train, ["face", "object"], ["localiser"])
    assert early["localiser"]["face"]["n_selective"] == 0 and early["localiser"]["object"]["n_selective"] == 0


def test_the_localiser_on_noise_passes_no_more_than_its_false_discovery_rate_allows():
    from dualtask.lesion import rankings

    any_passing = []
    for seed in range(40):  # 500 channels of noise, the same for both tasks: every channel is a true null
        rng = np.random.default_rng(seed)
        acts = {"face": rng.normal(size=(60, 500)), "object": rng.normal(size=(60, 500))}
        t, p, passing = rankings.localiser(acts, "face")
        assert p.shape == (500,) and np.all((p > 0) & (p <= 1))
        any_passing.append(passing.any())
    # with every null true, the chance that any channel passes is at most the FDR, 0.05 (2 of 40 expected)
    assert sum(any_passing) <= 5
    # a channel that differs passes; a constant one gets p = 1
    rng = np.random.default_rng(0)
    acts = {"face": rng.normal(size=(60, 3)), "object": rng.normal(size=(60, 3))}
    acts["face"][:, 0] += 2.0
    acts["face"][:, 2] = acts["object"][:, 2] = 1.0
    t, p, passing = rankings.localiser(acts, "face")
    assert passing.tolist() == [True, False, False] and p[2] == 1.0 and t[2] == 0.0


def test_the_localisers_selective_set_is_lesioned_exactly_beside_random_sets_of_its_size(planted):
    model, sites, train, _ = planted
    ranking = rankings.rank_site(model, sites[1], train, ["face", "object"], ["localiser", "random"], random_repeats=3)
    conditions = dissociation.lesion_conditions(sites[1], ranking, [0.0, 0.5])  # 8 of 16: not the selective sets' size
    extra = [(m, t, r, f, sorted(c.tolist())) for m, t, r, f, c in conditions if f == 4 / 16]
    assert [(m, t) for m, t, *_ in extra] == ([("localiser", "face"), ("localiser", "object")]
                                              + [("random", "random")] * 3)
    assert extra[0][4] == [0, 1, 2, 3] and extra[1][4] == [4, 5, 6, 7]
    assert all(len(c) == 4 for *_, c in extra)
    # a fraction asked that gives the same number of filters already lesions them: nothing is added
    assert all(f == 0.25 for *_, f, _ in dissociation.lesion_conditions(sites[1], ranking, [0.25]))
