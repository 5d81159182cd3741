"""Every GPU-only branch taken on the CPU (common.py, "What differs on a GPU"): common's policy functions are
patched to give CUDA's answers, and the results the README calls equal are checked on those paths."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import torchrun_tiny
from helpers import PlantedNet, RandomNet, planted_batches, random_batches, read_rows, tiny_config, top

from dualtask.core import device as device_mod
from dualtask.core import device as device_policy
from dualtask.data import loading as vggface2
from dualtask.experiment import pipeline as dualtask
from dualtask.lesion import engine, greedy
from dualtask.lesion import rankings as rankings_mod
from dualtask.lesion import sweep as L
from dualtask.model import network, sites
from dualtask.training import trainer

CPU = torch.device("cpu")


def gpu_like(monkeypatch, bf16=True, channels_last=True, pinned=True, tf32=True, free=None):
    """CUDA's answers from common's policy functions, on the CPU; free: the bytes common.free_memory reports (None:
    the CPU's answer, no GPU memory to size things by). Without a CUDA driver pin_memory cannot run: each call is
    recorded in the list returned and the tensor passes as it is."""
    monkeypatch.setattr(device_policy, "use_bf16", lambda device: bf16)
    monkeypatch.setattr(device_policy, "use_channels_last", lambda device: channels_last)
    monkeypatch.setattr(device_policy, "use_pinned_memory", lambda device: pinned)
    monkeypatch.setattr(device_policy, "use_tf32", lambda device: tf32)
    monkeypatch.setattr(device_policy, "free_memory", lambda device, reserved=False: free)
    pins = []
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pins.append(len(self)) or self)
    return pins


@pytest.fixture(scope="module")
def demo_images():
    data = {t: vggface2.load_task("demo", t, 32, max_per_class=8) for t in ("face", "object")}
    return {t: trainer.TaskImages(d, CPU) for t, d in data.items()}


@pytest.fixture(scope="module")
def resnet():
    """ResNet50 with torchvision's initialisation (recipe 1: no residual branch starts at zero, so lesions change
    the outputs); built in a fraction of VGG16's time."""
    torch.manual_seed(1)
    return network.DualTaskNet("resnet50", {"face": 10, "object": 10}, recipe=1).eval()


class TinyNet(nn.Module):
    """Three small conv sites (8, 16, 16 filters) and a head per task: a lesion stage in well under a second."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.tasks = ["face", "object"]
        self.heads = nn.ModuleDict({t: nn.Linear(16, 10) for t in self.tasks})

    def forward(self, x):
        f = self.trunk(x)
        return {t: h(f) for t, h in self.heads.items()}


def same_results(a, b):
    return all(np.array_equal(x[t][k], y[t][k]) for x, y in zip(a, b) for t in x for k in ("correct", "loss"))


def test_stacked_lesions_sized_from_free_memory_equal_the_naive_sweep(monkeypatch, resnet, demo_images):
    """default_masks_per_pass on a GPU: 1, 7 and 64 (clamped to 32) lesions fit a quarter of the free memory; on
    the CPU as many as keep the stacked batch within CPU_STACK_BYTES (here 32: a deep site's 16 images are small).
    The sweep with one mask per pass equals the naive sweep exactly (float32 on the CPU; the naive sweep, the whole
    network per lesion, on three of the 33 lesions), and with 7 or 32 stacked it gets every image's correctness
    the same and its loss within 1e-5: a stacked batch has other shapes, for which the CPU's kernels may round
    otherwise (exact on the 2-core development machine for these 16-image batches, not for batches of 8 there, and
    not with 32 stacked on the H200 machine's CPU)."""
    batches = engine.image_batches(demo_images, batch_size=16, n_per_task=16)[:1]  # 16 face images
    site = sites.lesion_sites(resnet)[15]  # trunk.layer4.1: a bottleneck block after it
    cached = engine.cache_bytes(resnet, [site], batches[0][1].shape[1:], 16)[site.name]
    assert engine.default_masks_per_pass(CPU, cached) == min(32, engine.CPU_STACK_BYTES // cached) == 32
    assert engine.default_masks_per_pass(CPU, engine.CPU_STACK_BYTES // 3) == 3
    assert engine.default_masks_per_pass(CPU, 2 * engine.CPU_STACK_BYTES) == 1  # a large batch: one at a time
    rng = np.random.default_rng(0)
    lesions = [rng.permutation(site.n_filters)[:k] for k in rng.integers(1, site.n_filters, 33)]
    sweeps = {}
    for fit, expected in ((1, 1), (7, 7), (64, 32)):
        gpu_like(monkeypatch, bf16=False, free=16 * cached * fit)  # a quarter of it: fit x 4 x the cached batch
        per_pass = engine.default_masks_per_pass(CPU, cached)
        monkeypatch.undo()
        assert per_pass == expected
        sweeps[per_pass] = engine.evaluate_lesions(resnet, site, lesions, batches, masks_per_pass=per_pass)
    for stacked in (sweeps[7], sweeps[32]):
        for a, b in zip(stacked, sweeps[1]):
            assert np.array_equal(a["face"]["correct"], b["face"]["correct"])
            assert np.allclose(a["face"]["loss"], b["face"]["loss"], rtol=0, atol=1e-5)
    few = [0, 31, 32]  # the first and last lesion of the first stack of 32, and the one after it
    naive = engine.evaluate_lesions_naive(resnet, site, [lesions[i] for i in few], batches)
    assert same_results([sweeps[1][i] for i in few], naive)
    assert not same_results(sweeps[1][:1], sweeps[1][1:2])  # lesions that change something


def test_bf16_sweep_is_the_naive_sweep_within_tolerance(monkeypatch, resnet, demo_images):
    """Under bf16 autocast (the CPU's, where a GPU's would be) the sweep with 1 and 7 masks stacked per pass and
    the naive sweep agree on every lesion's correctness for at least 95% of the images, and on each image's loss
    within 0.05."""
    batches = engine.image_batches(demo_images, batch_size=16, n_per_task=8)
    site = sites.lesion_sites(resnet)[14]  # trunk.layer4.0
    rng = np.random.default_rng(1)
    lesions = [[]] + [rng.permutation(site.n_filters)[:k] for k in (5, 200, 1000, 1800)]
    fp32 = engine.evaluate_lesions(resnet, site, lesions, batches)
    gpu_like(monkeypatch)
    dtypes = []
    hook = site.module.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    try:
        naive = engine.evaluate_lesions_naive(resnet, site, lesions, batches)
        for per_pass in (1, 7):
            fast = engine.evaluate_lesions(resnet, site, lesions, batches, masks_per_pass=per_pass)
            for a, b in zip(fast, naive):
                for task in ("face", "object"):
                    assert np.mean(a[task]["correct"] == b[task]["correct"]) >= 0.95
                    assert np.abs(a[task]["loss"] - b[task]["loss"]).max() <= 0.05
    finally:
        hook.remove()
    assert set(dtypes) == {torch.bfloat16}  # the branch was taken: the site's output is bf16
    assert not same_results(naive, fp32)  # and it computes otherwise than float32 does


def test_racing_greedy_with_a_prefix_cache_that_does_not_fit(monkeypatch):
    """A GPU whose free memory holds two of the three batches' prefix outputs (40% of it, _cache_budget), or
    none: what does not fit is computed again when needed, with the losses of a full cache bit for bit, and
    racing still chooses the exhaustive search's set."""
    model, batches = RandomNet().eval(), random_batches()
    site = sites.lesion_sites(model)[1]  # 48 filters at 8 x 8: 983,040 bytes per batch of 80 images, 393,216 per 32
    lesions = [[], [3], [3, 5, 7]]
    full = greedy.RankingImages(model, site, batches, "a")
    expected = full.losses(lesions)
    assert len(full.cache) == 3  # the CPU's budget (a quarter of the free RAM) holds them all
    for free, n_cached in ((0, 0), (int(1.5 * 983_040 / 0.4), 2)):
        gpu_like(monkeypatch, bf16=False, free=free)
        assert greedy.cache_budget(CPU) == int(0.4 * free)
        images = greedy.RankingImages(model, site, batches, "a")
        assert np.array_equal(images.losses(lesions), expected) and len(images.cache) == n_cached
        assert np.array_equal(images.losses(lesions), expected) and images.counts["prefix_images"] == 384 - 112 * (
            n_cached == 2)  # the uncached batches' prefixes twice
    exhaustive, raced = {}, {}
    order, scores = greedy.greedy_order(model, site, batches, "a", racing=False, stats=exhaustive)
    raced_order, raced_scores = greedy.greedy_order(model, site, batches, "a", racing=True, stats=raced)
    k = greedy.greedy_chosen(site.n_filters)
    assert top(raced_order, site.n_filters) == top(order, site.n_filters)
    assert np.allclose(np.sort(raced_scores[:k]), np.sort(scores[:k]), rtol=1e-6, atol=0)
    assert exhaustive["prefix_images"] > 192 and raced["evaluations"] < exhaustive["evaluations"]


def test_ranking_precision_on_a_bf16_device(monkeypatch):
    """ranking_precision where the device computes in bf16: 'bf16' keeps bf16 autocast; 'fp32' switches it off
    (inside the evaluation's autocast too) and allows TF32 only while it is open, and scores exactly as the CPU
    does by default."""
    model, batches = PlantedNet("split").eval(), planted_batches(40, seed=0)
    site = sites.lesion_sites(model)[1]
    plain = rankings_mod.loss_scores(model, site, batches, "face", precision="fp32")
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    gpu_like(monkeypatch)
    with engine.ranking_precision(CPU, "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with device_mod.autocast(CPU), engine.ranking_precision(CPU, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags
    assert np.array_equal(rankings_mod.loss_scores(model, site, batches, "face", precision="fp32"), plain)
    bf16 = rankings_mod.loss_scores(model, site, batches, "face", precision="bf16")
    assert not np.array_equal(bf16, plain) and set(engine.order_of(bf16)[:4]) == {0, 1, 2, 3}


@pytest.mark.parametrize("agree", [True, False])
def test_bf16_ranking_check_records_its_precision_in_rankings_json(monkeypatch, tmp_path, demo_images, agree):
    """ranking_precision='bf16' where the device computes in bf16 (lesion_stage's rank_filters): the first site
    is ranked in float32 and in bf16, keeps the float32 rankings (those the CPU computes by default), and
    rankings.json records the check; later sites rank in bf16 only where the top-20% sets agreed."""
    model = TinyNet().eval()
    config = {"lesion_fractions": [0.0, 0.2], "lesion_methods": ["loss", "random"], "random_repeats": 2,
              "rank_images": 8, "lesion_layers": [-2, -1], "seed": 0, "ranking_precision": "bf16"}
    first, second = sites.select_sites(model, config)
    train = engine.image_batches(demo_images, "train", n_per_task=8, seed=0)
    plain = rankings_mod.rank_site(model, first, train, ["face", "object"], ["loss"], precision="fp32")
    gpu_like(monkeypatch)
    real_check, real_rank, asked = rankings_mod.same_top_sets, rankings_mod.rank_site, []
    monkeypatch.setattr(L, "same_top_sets", lambda *a, **k: {key: agree for key in real_check(*a, **k)})
    monkeypatch.setattr(L, "rank_site", lambda model, site, *a, **k: asked.append((site.name, k["precision"])) or
                        real_rank(model, site, *a, **k))
    L.lesion_stage(model, demo_images, config, tmp_path)
    later = "bf16" if agree else "fp32"
    assert asked == [(first.name, "fp32"), (first.name, "bf16"), (second.name, later)]
    rankings = json.loads((tmp_path / "rankings.json").read_text())
    assert rankings[first.name]["precision"] == {"requested": "bf16", "used": "fp32", "later_sites": later,
                                                 "bf16_same_top20": {"loss|face": agree, "loss|object": agree}}
    assert rankings[second.name]["precision"] == {"requested": "bf16", "used": later}
    assert all(rankings[first.name]["loss"][t] == json.loads(json.dumps(plain["loss"][t])) for t in model.tasks)
    assert {r["layer"] for r in read_rows(tmp_path / "lesion_results.csv")} == {first.name, second.name}


def test_images_on_the_device_and_pinned_copies_give_the_same_batches(monkeypatch, demo_images):
    """TaskImages on a GPU: the image array kept on the device when it fits a quarter of the free memory, else
    each batch copied through pinned memory; either gives the host path's batches, in either memory format."""
    idx = np.array([5, 0, 3, 17, 9])
    data = demo_images["face"].data
    expected = demo_images["face"].batch(idx)
    gpu_like(monkeypatch, bf16=False, free=4 * data.images.nbytes + 1)
    resident = trainer.TaskImages(data, CPU)
    assert resident.on_device is not None
    pins = gpu_like(monkeypatch, bf16=False, free=4 * data.images.nbytes - 1)
    copied = trainer.TaskImages(data, CPU)
    assert copied.on_device is None
    for images in (resident, copied):
        x, y = images.batch(idx)
        assert torch.equal(x, expected[0]) and torch.equal(y, expected[1])
        x, _ = images.batch(idx, channels_last=True)
        assert x.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, expected[0])
    assert pins == ([] if torch.cuda.is_available() else [len(idx)] * 2)  # the copied path's two batches


@pytest.mark.parametrize("layout", [{"head": "split"}, {"head": "joint"}, {"branch_at": 14}])
def test_every_parameter_takes_part_in_a_training_step(layout):
    """DistributedDataParallel runs without find_unused_parameters: in each head layout every parameter gets a
    gradient from a training step's loss (every task's images are in every step)."""
    torch.manual_seed(0)
    model = network.build_model(dict(backbone="resnet50", image_size=32, **layout), {"face": 3, "object": 4},
                                 load_init=False)
    out = model(torch.randn(4, 3, 32, 32))
    loss = sum(nn.functional.cross_entropy(out[t][rows], torch.zeros(2, dtype=torch.long))
               for t, rows in (("face", slice(0, 2)), ("object", slice(2, 4))))
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_training_with_bf16_and_channels_last(monkeypatch, tmp_path):
    """A run trained as on a GPU (bf16 autocast, channels_last model and batches, pinned copies) on the CPU: every
    forward pass of training, validation and the health probe takes that path, and the run ends as a run does
    (finite losses, a checkpoint, the model back in the contiguous layout)."""
    pins = gpu_like(monkeypatch)
    seen, models = [], []
    real_forward = network.DualTaskNet.forward

    def forward(self, x):
        models.append(self)
        seen.append((self.training, x.is_contiguous(memory_format=torch.channels_last),
                     torch.is_autocast_enabled("cpu"), self.trunk.conv1.weight.is_contiguous(
                         memory_format=torch.channels_last)))
        return real_forward(self, x)

    monkeypatch.setattr(network.DualTaskNet, "forward", forward)
    out = tmp_path / "run"
    dualtask.run(tiny_config(out, backbone="resnet50", epochs=1, max_per_class=6))
    assert any(s[0] for s in seen) and any(not s[0] for s in seen)  # training steps, and validation
    assert all(s[1:] == (True, True, True) for s in seen), seen
    assert models[-1].trunk.conv1.weight.is_contiguous()  # back in the contiguous layout after training
    if not torch.cuda.is_available():
        assert sum(pins) > 0  # the batches went through the pinned copy
    log = read_rows(out / "train_log.csv")
    assert len(log) == 4 and all(np.isfinite(float(r["loss"])) for r in log)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


@pytest.mark.slow  # about 2 minutes on 2 cores: inductor compiles the training step
def test_compile_trains_one_epoch(tmp_path):
    out = tmp_path / "compiled"
    dualtask.run(tiny_config(out, backbone="resnet50", epochs=1, max_per_class=6, compile=True))
    log = read_rows(out / "train_log.csv")
    assert len(log) == 4 and all(np.isfinite(float(r["loss"])) for r in log)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


@pytest.mark.slow  # about 40 s on 2 cores
def test_a_joint_head_trains_and_sweeps_under_torchrun(tmp_path):
    """DistributedDataParallel over one joint output layer (the other head layouts: tests/test_pipeline.py's
    split heads, tests/test_branches.py's branched network), gloo on 2 CPU processes."""
    out = tmp_path / "ddp"
    p = torchrun_tiny(out, 29547, "--head=joint", "--lesion_layers=[15, 16]")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "sites shared out across 2 processes" in p.stdout
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["config"]["head"] == "joint" and "joint.weight" in state["model"]
    assert not any(k.startswith("heads.") for k in state["model"])
    assert len(read_rows(out / "train_log.csv")) == 4
    assert set(json.loads((out / "rankings.json").read_text())) == {"trunk.layer4.1", "trunk.layer4.2"}
