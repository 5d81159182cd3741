"""Refitted readouts (readouts.py): every lesion scored by linear readouts fitted anew to the lesioned features."""
import numpy as np
import torch

from dualtask.lesion import engine, readouts
from dualtask.lesion import sweep as L
from dualtask.model import network
from dualtask.model import sites as sites_mod


def _images(n_classes=3, per_class=12, seed=0):
    """Images whose class is a colour (plus noise): any random network's features tell the classes apart."""
    y = torch.arange(n_classes).repeat_interleave(per_class)
    colours = torch.rand(n_classes, 3, 1, 1, generator=torch.Generator().manual_seed(0)) * 2 - 1
    g = torch.Generator().manual_seed(seed)
    x = colours[y] + 0.1 * torch.randn(len(y), 3, 32, 32, generator=g)
    return x, y


def test_two_heads_of_one_task_get_the_same_refitted_readout_whatever_their_heads_read():
    torch.manual_seed(0)
    model = network.DualTaskNet("vgg16", {"a": 3, "b": 3}, fc_width=32, image_size=32).eval()
    x_fit, y_fit = _images(seed=1)
    x_test, y_test = _images(per_class=6, seed=2)
    fit = [("a", x_fit, y_fit), ("b", x_fit, y_fit)]  # the very same images and labels for both heads
    test = [("a", x_test, y_test), ("b", x_test, y_test)]
    site = sites_mod.lesion_sites(model)[6]
    lesions = [[], np.arange(0, site.n_filters, 3), np.arange(site.n_filters // 2)]
    refit, alphas = readouts.refit_lesions(model, site, lesions, fit, test)
    assert alphas["a"] == alphas["b"] and alphas["a"] in readouts.ALPHAS
    assert refit[0]["a"]["correct"].mean() >= 0.9  # a readout that reads the classes, not a constant guess
    for res in refit:
        assert np.array_equal(res["a"]["correct"], res["b"]["correct"])
        assert np.isnan(res["a"]["loss"]).all()
    # through the network's own heads (different initial weights) the same lesions score differently
    fixed = engine.evaluate_lesions(model, site, lesions, test)
    assert not np.array_equal(fixed[1]["a"]["loss"], fixed[1]["b"]["loss"])


def test_a_refitted_readout_reads_the_features_and_loses_the_task_with_every_filter():
    torch.manual_seed(0)
    model = network.DualTaskNet("vgg16", {"a": 3, "b": 3}, fc_width=32, image_size=32).eval()
    x_fit, y_fit = _images(seed=1)
    x_test, y_test = _images(per_class=10, seed=2)
    site = sites_mod.lesion_sites(model)[0]
    everything = np.arange(site.n_filters)
    (intact, silenced), _ = readouts.refit_lesions(model, site, [[], everything], [("a", x_fit, y_fit)],
                                                   [("a", x_test, y_test)])
    assert intact["a"]["correct"].mean() >= 0.9  # the colours are linearly readable from random features
    # nothing passes the silenced stem: every test image gets the same features, hence the same class
    assert silenced["a"]["correct"].mean() <= 1 / 3 + 1e-9
    # the groups a small feature budget cuts the lesions into change nothing
    budget = readouts.FEATURE_BUDGET
    try:
        readouts.FEATURE_BUDGET = 1
        (again, _), _ = readouts.refit_lesions(model, site, [[], everything], [("a", x_fit, y_fit)],
                                               [("a", x_test, y_test)], masks_per_pass=2)
    finally:
        readouts.FEATURE_BUDGET = budget
    assert np.array_equal(again["a"]["correct"], intact["a"]["correct"])


def test_in_a_branched_network_silencing_one_copy_leaves_the_other_tasks_readout_unchanged():
    torch.manual_seed(0)
    model = network.build_model(dict(backbone="vgg16", image_size=32, fc_width=32, branch_at=3),
                                 {"face": 3, "object": 3}).eval()
    x_fit, y_fit = _images(seed=1)
    x_test, y_test = _images(per_class=6, seed=2)
    site = sites_mod.lesion_sites(model)[-3]
    half = site.n_filters // 2
    keep, add = engine.lesion_mask([], site.n_filters)
    face_copy = engine.lesion_mask(np.arange(half), site.n_filters)
    inputs = readouts.readout_inputs(model, site, [(keep, add), face_copy], [("face", x_test, y_test),
                                                                             ("object", x_test, y_test)], 2)
    assert inputs[0]["object"].shape == (len(y_test), 32)  # the object copy's features only
    assert np.array_equal(inputs[0]["object"], inputs[1]["object"])
    assert not np.array_equal(inputs[0]["face"], inputs[1]["face"])
    batches = [("face", x_fit, y_fit), ("object", x_fit, y_fit)]
    (intact, lesioned), _ = readouts.refit_lesions(model, site, [[], np.arange(half)], batches,
                                                   [("face", x_test, y_test), ("object", x_test, y_test)])
    assert np.array_equal(intact["object"]["correct"], lesioned["object"]["correct"])


def test_fixed_readouts_read_each_image_by_a_readout_that_did_not_see_it_and_ignore_the_heads():
    torch.manual_seed(0)
    model = network.DualTaskNet("vgg16", {"a": 3, "b": 3}, fc_width=32, image_size=32).eval()
    x_test, y_test = _images(per_class=10, seed=2)
    test = [("a", x_test, y_test), ("b", x_test, y_test)]  # two heads of one task, on the same images
    site = sites_mod.lesion_sites(model)[6]
    fitted = readouts.fixed_readouts(model, site, test, seed=3, folds=5)
    fold, y = fitted["a"]["fold"], y_test.numpy()
    assert len(fitted["a"]["readouts"]) == 5
    for c in range(3):  # each class dealt evenly into the folds
        counts = np.bincount(fold[y == c], minlength=5)
        assert counts.max() - counts.min() <= 1
    lesions = [[], np.arange(0, site.n_filters, 3), np.arange(site.n_filters // 2)]
    scored = readouts.fixed_lesions(model, site, lesions, fitted, test)
    assert scored[0]["a"]["correct"].mean() >= 0.9  # held-out images read right: the colours are in the features
    for res in scored:  # one task, one readout: whatever the two heads read, their lesions cannot differ
        assert np.array_equal(res["a"]["correct"], res["b"]["correct"])
        assert np.isnan(res["a"]["loss"]).all()
    # the readouts are fitted once: each image's prediction is its fold's readout's, on the lesioned features
    keep, add = engine.lesion_mask(lesions[2], site.n_filters)
    (features,) = readouts.readout_inputs(model, site, [(keep, add)], test[:1], 1)
    expected = np.empty(len(y), dtype=int)
    for f, readout in enumerate(fitted["a"]["readouts"]):
        expected[fold == f] = readout.predict(features["a"][fold == f])
        # and the readout of fold f never saw fold f's images: refitting it without them gives the same weights
        again = readouts.probe(fitted["a"]["alphas"][f]).fit(features_intact(model, site, test)[fold != f],
                                                             y[fold != f])
        assert np.allclose(again[-1].coef_, readout[-1].coef_)
    assert np.array_equal(scored[2]["a"]["correct"], expected == y)
    # silencing the whole stem leaves every image the same features: one class for all
    stem = sites_mod.lesion_sites(model)[0]
    (silenced,) = readouts.fixed_lesions(model, stem, [np.arange(stem.n_filters)],
                                         readouts.fixed_readouts(model, stem, test[:1]), test[:1])
    assert silenced["a"]["correct"].mean() <= 0.5 + 1e-9


def test_a_folds_penalty_and_readout_do_not_change_when_the_images_it_scores_are_replaced_by_noise():
    """Nested choice: each fold's ridge penalty is chosen on the images its readout is fitted on, never on the
    fold's own (scored) images."""
    torch.manual_seed(0)
    model = network.DualTaskNet("vgg16", {"a": 3, "b": 3}, fc_width=32, image_size=32).eval()
    x, y = _images(per_class=10, seed=2)
    site = sites_mod.lesion_sites(model)[6]
    clean = readouts.fixed_readouts(model, site, [("a", x, y)], seed=3, folds=5)["a"]
    assert len(clean["alphas"]) == 5 and set(clean["alphas"]) <= set(readouts.ALPHAS)
    for f in (0, 3):
        scored = torch.from_numpy(clean["fold"] == f)
        noisy_x = x.clone()
        noisy_x[scored] = 2 * torch.randn(int(scored.sum()), 3, 32, 32, generator=torch.Generator().manual_seed(9))
        noisy = readouts.fixed_readouts(model, site, [("a", noisy_x, y)], seed=3, folds=5)["a"]
        assert np.array_equal(noisy["fold"], clean["fold"])
        assert noisy["alphas"][f] == clean["alphas"][f]
        same, before = noisy["readouts"][f], clean["readouts"][f]
        for got, expected in ((same[0].mean_, before[0].mean_), (same[0].scale_, before[0].scale_),
                              (same[-1].coef_, before[-1].coef_), (same[-1].intercept_, before[-1].intercept_)):
            assert np.array_equal(got, expected)
        # the noise matters where it is seen: the folds fitted on those images, and one penalty for all images
        # (the rule before: chosen once per task by leave-one-out on every test image)
        assert any(not np.array_equal(noisy["readouts"][g][-1].coef_, clean["readouts"][g][-1].coef_)
                   for g in range(5) if g != f)
        pooled = [readouts.choose_alpha(readouts.readout_inputs(model, site, [engine.lesion_mask([], site.n_filters)],
                                                                [("a", images, y)], 1)[0]["a"], y.numpy())
                  for images in (x, noisy_x)]
        assert pooled[0] != pooled[1]


def features_intact(model, site, test):
    keep, add = engine.lesion_mask([], site.n_filters)
    return readouts.readout_inputs(model, site, [(keep, add)], test[:1], 1)[0]["a"]


def test_the_heads_pass_reads_the_fixed_readouts_as_their_own_pass_does():
    """evaluate_lesions with `read`: the heads' results unchanged, and each image read by its fold's readout from
    the same features a separate pass gives, across batches (the offsets) and several lesions per pass."""
    torch.manual_seed(0)
    model = network.build_model(dict(backbone="vgg16", image_size=32, fc_width=32, branch_at=3),
                                 {"face": 3, "object": 3}).eval()
    x, y = _images(per_class=10, seed=2)
    xo, yo = _images(per_class=8, seed=4)
    test = [("face", x[:17], y[:17]), ("face", x[17:], y[17:]), ("object", xo, yo)]  # two batches, two image sets
    site = sites_mod.lesion_sites(model)[-3]
    fitted = readouts.fixed_readouts(model, site, test, seed=1, folds=4)
    lesions = [[], np.arange(0, site.n_filters, 3), np.arange(site.n_filters // 2), np.arange(5)]
    both = engine.evaluate_lesions(model, site, lesions, test, masks_per_pass=3, read=readouts.fixed_reader(fitted))
    heads = engine.evaluate_lesions(model, site, lesions, test, masks_per_pass=3)
    for b, h in zip(both, heads):
        for t in ("face", "object"):
            assert np.array_equal(b[t]["correct"], h[t]["correct"]) and np.array_equal(b[t]["loss"], h[t]["loss"])
    labels = {"face": y.numpy(), "object": yo.numpy()}
    for lesion, b in zip(lesions, both):  # the reference: the task's whole features, each fold's rows predicted
        (features,) = readouts.readout_inputs(model, site, [engine.lesion_mask(lesion, site.n_filters)], test, 1)
        for t, r in fitted.items():
            expected = np.empty(len(labels[t]), dtype=int)
            for f, readout in enumerate(r["readouts"]):
                expected[r["fold"] == f] = readout.predict(features[t][r["fold"] == f])
            assert np.array_equal(b[t]["read"], expected == labels[t])
    assert not np.array_equal(both[2]["face"]["read"], both[0]["face"]["read"])  # the face copy's half silenced
    assert np.array_equal(both[2]["object"]["read"], both[0]["object"]["read"])  # the object copy untouched
    alone = readouts.fixed_lesions(model, site, lesions, fitted, test, masks_per_pass=2)
    assert all(np.array_equal(a[t]["correct"], b[t]["read"]) for a, b in zip(alone, both) for t in fitted)


def test_the_fixed_readouts_stage_writes_what_the_heads_sweep_scored_and_equals_its_own_sweep(tmp_path, capsys):
    from dualtask.data import loading as vggface2
    from dualtask.training.trainer import TaskImages

    data = {t: vggface2.load_task("demo", t, 32, max_per_class=30, max_classes=3) for t in ("face", "object")}
    images = {t: TaskImages(d, torch.device("cpu")) for t, d in data.items()}
    config = {"lesion_fractions": [0.0, 0.25], "lesion_methods": ["activation", "random"], "random_repeats": 3,
              "lesion_layers": [0, 6, -1], "rank_images": 8, "seed": 0}
    torch.manual_seed(0)
    model = network.DualTaskNet("vgg16", {t: len(d.classes) for t, d in data.items()}, fc_width=16).eval()
    files = ("lesion_results.csv", "dissociation.csv", "rankings.json", "lesion_per_image.npz")
    for name, reuse in (("apart", None), ("together", {})):
        (tmp_path / name).mkdir()
        L.lesion_stage(model, images, config, tmp_path / name, reuse=reuse)
        L.readout_stage(model, images, config, tmp_path / name, "fixed", reuse=reuse)
    printed = capsys.readouterr().out
    assert printed.count("scored in the lesion sweep's own pass") == 3  # every site of the second run
    for f in files:
        for folder in ("", "fixed_readout"):
            apart, together = tmp_path / "apart" / folder / f, tmp_path / "together" / folder / f
            assert apart.read_bytes() == together.read_bytes(), f
    # a fixed stage with nothing handed on (a sweep finished earlier) computes its sites itself, the same
    (tmp_path / "together" / "fixed_readout" / "lesion_progress.json").unlink()
    L.readout_stage(model, images, config, tmp_path / "together", "fixed")
    assert "own pass" not in capsys.readouterr().out
    assert (tmp_path / "apart" / "fixed_readout" / "lesion_results.csv").read_bytes() == \
        (tmp_path / "together" / "fixed_readout" / "lesion_results.csv").read_bytes()


def test_each_accuracy_names_what_read_it_and_the_sweep_records_what_the_verdict_needs(tmp_path, capsys):
    """lesion_results.csv's read_by, the log's intact accuracies by reader, and rankings.json's receptive fields
    and split-half overlaps at every swept fraction (verdict.py's rules 3 and 5)."""
    import json

    from dualtask.core.common import read_csv
    from dualtask.data import loading as vggface2
    from dualtask.training.trainer import TaskImages

    data = {t: vggface2.load_task("demo", t, 32, max_per_class=20, max_classes=3) for t in ("face", "object")}
    images = {t: TaskImages(d, torch.device("cpu")) for t, d in data.items()}
    config = {"lesion_fractions": [0.0, 0.25, 0.5], "lesion_methods": ["activation", "random"], "random_repeats": 2,
              "lesion_layers": [0, -1], "rank_images": 8, "seed": 0, "ranking_reliability": True}
    torch.manual_seed(0)
    model = network.DualTaskNet("vgg16", {t: len(d.classes) for t, d in data.items()}, fc_width=16).eval()
    L.lesion_stage(model, images, config, tmp_path)
    L.readout_stage(model, images, config, tmp_path, "fixed")
    printed = capsys.readouterr().out
    assert "intact test accuracy through the heads: face" in printed
    assert "intact test accuracy through the fixed readouts: face" in printed
    assert {r["read_by"] for r in read_csv(tmp_path / "lesion_results.csv")} == {"heads"}
    assert {r["read_by"] for r in read_csv(tmp_path / "fixed_readout" / "lesion_results.csv")} == {"fixed readouts"}
    rankings = json.loads((tmp_path / "rankings.json").read_text())
    first, last = rankings["trunk.features.2"], rankings["trunk.features.42"]
    assert first["receptive_field"] == {"pixels": 3, "image_size": 32, "share": round(3 / 32, 4)}
    assert last["receptive_field"]["share"] == 1.0  # VGG16's last conv sees the whole 32-px image
    assert set(first["reliability"]["activation"]["face"]) == {"top10", "top20", "top25", "top30", "top50", "filters",
                                                                "spearman"}


def test_receptive_fields_are_the_theoretical_ones_and_leave_the_network_untouched():
    from dualtask.model import sites as sites_mod

    model = network.DualTaskNet("resnet50", {"a": 3, "b": 3}, fc_width=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sites = sites_mod.lesion_sites(model)
    rf = sites_mod.receptive_fields(model, sites, 224)
    # stem 7x7 stride 2 (7), max pool 3x3 stride 2 (11, jump 4), each bottleneck's 3x3 conv adds 2 x jump
    assert [rf[s.name]["pixels"] for s in sites[:9]] == [7, 19, 27, 35, 43, 59, 75, 91, 107]
    assert rf[sites[-1].name] == {"pixels": 224, "image_size": 224, "share": 1.0}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    vgg = network.DualTaskNet("vgg16", {"a": 3, "b": 3}, fc_width=16, batch_norm=False)
    rf = sites_mod.receptive_fields(vgg, sites_mod.lesion_sites(vgg), 64)
    # conv1_1 3, conv1_2 5, pool 6, conv2_x 10 and 14, pool 16, conv3_x 24, 32, 40, pool 44; conv4_1's 60 pixels,
    # centred on a unit off the 64-px image's centre (8 x 8 map), reach past its edge: 58 of them lie inside
    assert [v["pixels"] for v in rf.values()][:8] == [3, 5, 10, 14, 24, 32, 40, 58]
