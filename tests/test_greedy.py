"""The greedy ranking's faster forms: racing and first-order (Taylor) pruning against the exhaustive search, the
greedy_stop marking, the settings, and candidates shared out across processes."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from conftest import TINY, TINY_LESION, run_script
from helpers import PlantedNet, RandomNet, planted_batches, random_batches, top

import vgg16
from dualtask.core import common, names
from dualtask.experiment import experiment
from dualtask.lesion import dissociation, engine, greedy, rankings, resume
from dualtask.lesion import sweep as L
from dualtask.model import sites as sites_mod


def exhaustive_reference(model, site, batches, task, step_fraction=0.016, stop_fraction=0.2):
    """The greedy ranking as it was before racing and pruning: every remaining filter on every image per step."""
    own = [b for b in batches if b[0] == task]
    step = max(1, int(round(step_fraction * site.n_filters)))
    stop = max(1, int(np.ceil(stop_fraction * site.n_filters)))
    chosen, scores, remaining, last = [], [], list(range(site.n_filters)), None
    while len(chosen) < stop and remaining:
        losses = rankings.task_loss(engine.evaluate_lesions(model, site, [chosen + [c] for c in remaining], own), task)
        best = engine.order_of(losses)[:step]
        chosen += [remaining[i] for i in best]
        scores += [float(losses[i]) for i in best]
        last = {remaining[i]: float(losses[i]) for i in range(len(remaining))}
        remaining = [c for i, c in enumerate(remaining) if i not in set(best.tolist())]
    rest = sorted(remaining, key=lambda c: -last[c]) if last else remaining
    return np.array(chosen + rest), np.array(scores + [last[c] if last else 0.0 for c in rest])


@pytest.fixture(scope="module")
def random_net():
    model = RandomNet().eval()
    return model, sites_mod.lesion_sites(model), random_batches()


def planted_cases():
    for head in ("split", "joint"):
        model = PlantedNet(head).eval()
        yield model, sites_mod.lesion_sites(model), planted_batches(40, seed=0)


def test_exhaustive_greedy_is_as_before_bit_for_bit(random_net):
    for model, sites, batches in [*planted_cases(), random_net]:
        for site in sites:
            for task in model.tasks:
                order, scores = greedy.greedy_order(model, site, batches, task, racing=False)
                ref_order, ref_scores = exhaustive_reference(model, site, batches, task)
                assert np.array_equal(order, ref_order) and np.array_equal(scores, ref_scores), (site.name, task)


def test_racing_chooses_the_exhaustive_set(random_net):
    model, sites, batches = random_net
    for site in sites:
        for task in model.tasks:
            exhaustive, race_stats = {}, {}
            order, scores = greedy.greedy_order(model, site, batches, task, racing=False, stats=exhaustive)
            raced, raced_scores = greedy.greedy_order(model, site, batches, task, racing=True, stats=race_stats)
            k = greedy.greedy_chosen(site.n_filters)
            assert top(raced, site.n_filters) == top(order, site.n_filters), (site.name, task)
            # each step chose by the survivors' exact losses: the chosen filters' scores are the exhaustive ones
            # (to float rounding: racing scores images in batches of other shapes)
            assert np.allclose(np.sort(raced_scores[:k]), np.sort(scores[:k]), rtol=1e-6, atol=0)
            assert sorted(raced.tolist()) == list(range(site.n_filters))
            assert race_stats["evaluations"] <= exhaustive["evaluations"]
            assert race_stats["prefix_images"] == exhaustive["prefix_images"] == 192  # one prefix pass per image
            if site.n_filters == 48:  # 10 steps of one filter, every remaining filter on 192 images
                assert exhaustive["evaluations"] == sum(48 - s for s in range(10)) * 192
                assert race_stats["evaluations"] < 0.5 * exhaustive["evaluations"]  # most dropped early
    for model, sites, batches in planted_cases():
        for site in sites:
            for task in model.tasks:
                raced, _ = greedy.greedy_order(model, site, batches, task, racing=True)
                order, _ = greedy.greedy_order(model, site, batches, task, racing=False)
                assert top(raced, site.n_filters) == top(order, site.n_filters), (model.head, site.name, task)


def test_aggressive_racing_and_pruning_still_give_valid_orders(random_net):
    for model, sites, batches in [*planted_cases(), random_net]:
        for site in sites:
            for task in model.tasks:
                for kw in ({"racing": True, "margin": 0.0}, {"racing": False, "candidates": 1},
                           {"racing": True, "margin": 0.0, "candidates": 2}):
                    order, scores = greedy.greedy_order(model, site, batches, task, **kw)
                    assert sorted(order.tolist()) == list(range(site.n_filters)), kw
                    assert len(scores) == site.n_filters and np.isfinite(scores).all()
    model = PlantedNet("split").eval()
    site = sites_mod.lesion_sites(model)[1]
    order, _ = greedy.greedy_order(model, site, planted_batches(40, seed=0), "face", racing=True, margin=0.0)
    assert set(order[:4].tolist()) == {0, 1, 2, 3}  # the planted face detectors even so


def test_taylor_pruning_with_every_filter_a_candidate_is_exhaustive(random_net):
    model, sites, batches = random_net
    for site in sites:
        exhaustive = greedy.greedy_order(model, site, batches, "b", racing=False)
        pruned = greedy.greedy_order(model, site, batches, "b", racing=False, candidates=site.n_filters)
        assert all(np.array_equal(a, b) for a, b in zip(exhaustive, pruned))
    model = PlantedNet("split").eval()
    site = sites_mod.lesion_sites(model)[1]
    for task, planted in (("face", {0, 1, 2, 3}), ("object", {4, 5, 6, 7})):
        order, _ = greedy.greedy_order(model, site, planted_batches(40, seed=0), task, racing=False, candidates=4)
        assert set(order[:4].tolist()) == planted


def test_ranking_images_cache_the_prefix_once_and_score_as_evaluate_lesions(random_net):
    model, sites, batches = random_net
    site = sites[1]
    images = greedy.RankingImages(model, site, batches, "a")
    lesions = [[], [3], [3, 5, 7]]
    full = images.losses(lesions)
    ref = engine.evaluate_lesions(model, site, lesions, [b for b in batches if b[0] == "a"])
    assert all(np.array_equal(full[i], r["a"]["loss"]) for i, r in enumerate(ref))
    part = images.losses(lesions, [5, 150, 151, 191])
    assert np.isnan(part[:, 0]).all() and np.allclose(part[:, [5, 150, 151, 191]], full[:, [5, 150, 151, 191]],
                                                      rtol=1e-6, atol=1e-6)
    assert images.counts["prefix_images"] == 192 and len(images.cache) == 3  # each batch's prefix once
    tight = greedy.RankingImages(model, site, batches, "a", budget=0)  # no memory for a cache: computed when needed
    assert np.array_equal(tight.losses(lesions), full) and not tight.cache
    scores = images.taylor([])
    assert np.allclose(scores, rankings.taylor_scores(model, site, batches, "a"), rtol=1e-4, atol=1e-7)
    assert images.taylor(list(range(32)))[:32].max() == 0  # silenced filters: no first-order effect left
    # the first-order estimates predict each image's loss change of a single-filter lesion closely
    predicted, changes = images.first_order([]), full[1] - full[0]
    assert np.corrcoef(predicted[:, 3], changes)[0, 1] > 0.9


def test_ranking_precision():
    cpu = torch.device("cpu")
    for precision in names.RANKING_PRECISIONS:
        with engine.ranking_precision(cpu, precision):
            assert not torch.is_autocast_enabled()
    with pytest.raises(common.UsageError, match="ranking_precision='fp16'"):
        with engine.ranking_precision(cpu, "fp16"):
            pass
    a = {"loss": {"x": {"order": [3, 1, 2, 0, 4]}}}
    b = {"loss": {"x": {"order": [3, 2, 1, 0, 4]}}}
    assert rankings.same_top_sets(a, b, ["loss"], ["x"], 0.2) == {"loss|x": True}
    assert rankings.same_top_sets(a, b, ["loss"], ["x"], 0.4) == {"loss|x": False}


def test_greedy_stop_counts_and_marking():
    assert greedy.greedy_chosen(64) == 13 and greedy.greedy_chosen(512) == 104
    assert greedy.greedy_chosen(2048, 0.1) == 231 and greedy.greedy_chosen(8, 1.0) == 8
    assert greedy.beyond_greedy_stop("greedy", 0.2, 512, 0.2) == 0
    assert greedy.beyond_greedy_stop("greedy", 0.3, 512, 0.2) == 1
    assert greedy.beyond_greedy_stop("loss", 0.5, 512, 0.2) == 0
    assert greedy.beyond_greedy_stop("greedy", 0.0, 512, 0.2) == 0
    model = PlantedNet("split").eval()
    site = sites_mod.lesion_sites(model)[1]
    order, _ = greedy.greedy_order(model, site, planted_batches(40, seed=0), "face", stop_fraction=0.5)
    assert sorted(order.tolist()) == list(range(16))


def test_sweep_settings_name_the_greedy_settings_and_read_earlier_sweeps_sensibly():
    model = PlantedNet("split").eval()
    base = {"lesion_fractions": [0.0, 0.2], "seed": 0, "lesion_methods": ["activation", "random"]}
    plain = L.sweep_settings(model, base)
    assert "greedy" not in plain and "ranking_precision" not in plain  # a sweep without greedy: as before
    assert L.sweep_settings(model, dict(base, ranking_precision="bf16")) == plain  # nothing it would change
    greedy = L.sweep_settings(model, dict(base, lesion_methods=["greedy", "random"]))
    assert greedy["greedy"] == {"racing": True, "margin": 4.0, "candidates": None, "stop": 0.2}
    exhaustive = L.sweep_settings(model, dict(base, lesion_methods=["greedy"], greedy_racing=False,
                                              greedy_margin=1.0))
    assert exhaustive["greedy"] == {"racing": False, "candidates": None, "stop": 0.2}  # the margin plays no part
    older = {k: v for k, v in exhaustive.items() if k != "greedy"}  # written before the greedy settings existed
    assert resume.as_now(older) == exhaustive and resume.as_now(older) != greedy
    assert resume.as_now(plain) == plain


def test_an_earlier_greedy_sweep_without_the_new_column_resumes(tmp_path):
    """Files of a sweep made before beyond_greedy_stop existed, under settings that still hold (exhaustive
    greedy stopping at 20%): the finished site is kept and its rows get the column."""
    model = PlantedNet("split").eval()
    config = {"lesion_fractions": [0.0, 0.3], "seed": 0, "lesion_methods": ["greedy"], "greedy_racing": False}
    settings = L.sweep_settings(model, config)
    older = {k: v for k, v in settings.items() if k != "greedy"}
    site = "trunk.3"
    (tmp_path / "lesion_progress.json").write_text(json.dumps({"settings": older, "done": [site]}))
    old_columns = [c for c in dissociation.LESION_COLUMNS if c not in dissociation.ADDED_LESION_COLUMNS]
    row = {c: "" for c in old_columns}
    row.update(layer=site, depth=1, n_filters=16, target="face", method="greedy", fraction="0.3000", eval_task="face")
    common.write_csv(tmp_path / "lesion_results.csv", old_columns, [row])
    old_diss = [c for c in dissociation.DISSOCIATION_COLUMNS if c not in dissociation.ADDED_LESION_COLUMNS]
    diss = {c: "" for c in old_diss}
    diss.update(layer=site, depth=1, method="greedy", fraction="0.3000", index="0.1")
    common.write_csv(tmp_path / "dissociation.csv", old_diss, [diss])
    (tmp_path / "rankings.json").write_text(json.dumps({site: {"greedy": {}}}))
    dissociation.write_per_image(tmp_path / "lesion_per_image.npz", {"intact|face": np.ones(3, dtype=bool)})
    earlier = L.earlier_sweep(settings, tmp_path)
    assert earlier["restart"] is None and earlier["done"] == [site]
    assert earlier["rows"][0]["beyond_greedy_stop"] == 1  # 5 of 16 filters; the greedy steps chose 4
    assert earlier["dissociation"][0]["beyond_greedy_stop"] == 1  # n_filters from the site's results
    raced = L.sweep_settings(model, dict(config, greedy_racing=True))
    assert L.earlier_sweep(raced, tmp_path)["restart"].startswith("lesion settings differ")


@pytest.mark.slow  # a whole run with the greedy ranking, about 25 s; greedy's choices are tested above in-process
def test_greedy_stop_is_marked_in_lesion_results(tmp_path):
    out = tmp_path / "run"
    p = run_script("ResNet.py", *TINY, *TINY_LESION, "--lesion_methods=['greedy', 'random']",
                   "--lesion_layers=[-1]", "--lesion_fractions=[0.0, 0.1, 0.2]", "--greedy_stop=0.1",
                   "--ranking_reliability=False", "--stages=['train', 'lesion']", f"--out_dir={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    with open(out / "lesion_results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    marks = {(r["method"], r["fraction"]): r["beyond_greedy_stop"] for r in rows}
    # 2048 filters: steps of 33 until just past 10% (205) choose 231; a 20% lesion silences 410
    assert marks == {("greedy", "0.0000"): "0", ("greedy", "0.1000"): "0", ("greedy", "0.2000"): "1",
                     ("random", "0.0000"): "0", ("random", "0.1000"): "0", ("random", "0.2000"): "0"}
    with open(out / "dissociation.csv", newline="") as f:
        assert {r["fraction"]: r["beyond_greedy_stop"] for r in csv.DictReader(f)} == {"0.1000": "0", "0.2000": "1"}
    progress = json.loads((out / "lesion_progress.json").read_text())
    assert progress["settings"]["greedy"] == {"racing": True, "margin": 4.0, "candidates": None, "stop": 0.1}
    rankings = json.loads((out / "rankings.json").read_text())
    (site,) = rankings
    assert all(sorted(e["order"]) == list(range(2048)) for e in rankings[site]["greedy"].values())


@pytest.mark.parametrize("args, culprit", [
    (["--greedy_margin=-1"], "greedy_margin=-1.0"),
    (["--greedy_candidates=0"], "greedy_candidates=0"),
    (["--greedy_stop=0"], "greedy_stop=0.0"),
    (["--greedy_stop=1.5"], "greedy_stop=1.5"),
    (["--greedy_racing=1"], "greedy_racing"),
    (["--ranking_precision=fp16"], "ranking_precision='fp16'"),
])
def test_bad_greedy_settings_exit_2(tmp_path, capsys, args, culprit):
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(SystemExit) as exit_:
        experiment.main(vars(vgg16), [*TINY, "--fc_width=16", f"--out_dir={out}", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err[-2000:]
    assert culprit in err and ("expected" in err or "valid names" in err), err
    assert len(err.strip().splitlines()) == 1 and not any(out.iterdir())


VARIANTS = (("exhaustive", {"racing": False}), ("racing", {"racing": True}),
            ("pruned", {"racing": True, "candidates": 8}))


def _shared_greedy(rank, world, port, path):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, batches = RandomNet().eval(), random_batches()
        site = sites_mod.lesion_sites(model)[1]
        share = (rank, world, greedy.all_gather_objects)
        out = {}
        for name, kw in VARIANTS:
            stats = {}
            order, scores = greedy.greedy_order(model, site, batches, "a", share=share, stats=stats, **kw)
            out[name] = (order.tolist(), scores.tolist(), stats["evaluations"])
        torch.save(out, f"{path}.{rank}")
        dist.barrier()  # neither process tears the group down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_candidates_shared_across_two_processes_choose_as_one(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_shared_greedy, args=(2, port, str(tmp_path / "out")), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"out.{r}", weights_only=False) for r in (0, 1)]
    model, batches = RandomNet().eval(), random_batches()
    site = sites_mod.lesion_sites(model)[1]
    for name, kw in VARIANTS:
        stats = {}
        order, scores = greedy.greedy_order(model, site, batches, "a", stats=stats, **kw)
        for r in (0, 1):
            assert got[r][name][0] == order.tolist() and got[r][name][1] == scores.tolist(), (name, r)
        assert got[0][name][2] + got[1][name][2] == stats["evaluations"]  # the work was shared, not repeated
        assert 0 < got[1][name][2] < stats["evaluations"]
