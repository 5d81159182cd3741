import pickle

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, run_script
from helpers import make_class_folders, make_vggface2_tree, write_cifar_root

from dualtask.data import cifar10, demo, taskdata, transforms
from dualtask.data.loading import load_task
from dualtask.data.taskdata import DataError


def test_vggface2_crops_around_the_enlarged_box_and_splits_each_identity(tmp_path):
    root = make_vggface2_tree(tmp_path / "vgf2")
    data = load_task(str(root), "face", 32, seed=0)
    assert data.classes == ["n000001", "n000002", "n000003"]
    assert data.images.shape == (18, 32, 32, 3) and data.images.dtype == np.uint8
    for c in range(3):
        assert set(data.split[data.labels == c]) == {0, 1, 2}  # identities are shared across splits
    # the box fills the middle of the crop (30% margin around it), the grey background only the rim
    centre = data.images[:, 12:20, 12:20].reshape(len(data.images), -1, 3).mean(1)
    expected = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]])[data.labels]
    assert np.abs(centre - expected).max() < 30
    rim = data.images[:, 0, :].astype(float).mean(1).mean(1)
    assert np.abs(rim - 128).max() < 40


def test_vggface2_cache_round_trip_and_caps(tmp_path):
    root = make_vggface2_tree(tmp_path / "vgf2", identities=4, per_identity=6)
    out = tmp_path / "cache"
    p = run_script("vggface2.py", f"--root={root}", f"--out={out}", "--image_size=24", "--identities=3",
                   "--per_identity=5")
    assert p.returncode == 0, p.stderr
    assert "3 classes" in p.stdout
    cached = taskdata.load_cache(out)
    assert cached.images.shape == (15, 24, 24, 3) and len(cached.classes) == 3
    again = load_task(str(out), "face", 16)
    assert again.images.shape == (15, 16, 16, 3) and again.name == "face"


def test_vggface2_without_box_file_is_refused(tmp_path):
    root = make_vggface2_tree(tmp_path / "vgf2", with_boxes=False)
    with pytest.raises(DataError, match="loose_bb_train.csv"):
        load_task(str(root), "face", 32)


def test_vggface2_sample_tree_from_shared_data():
    root = SHARED_DATA / "vggface2_format_lfw"
    if not root.exists():
        pytest.skip("../shared/data is absent")
    data = load_task(str(root), "face", 32, max_classes=5, max_per_class=8)
    assert len(data.classes) == 5 and data.classes[0] == "n000001" and data.counts()["test"] > 0


def test_class_folders_get_a_deterministic_stratified_split(tmp_path):
    root = make_class_folders(tmp_path / "folders")
    a = load_task(str(root), "object", 16, seed=3)
    b = load_task(str(root), "object", 16, seed=3)
    c = load_task(str(root), "object", 16, seed=4)
    assert a.classes == ["cat", "dog", "fox"] and a.images.shape == (30, 16, 16, 3)
    assert np.array_equal(a.split, b.split) and np.array_equal(a.images, b.images)
    assert not np.array_equal(a.split, c.split)
    for k in range(3):
        assert [int(((a.labels == k) & (a.split == s)).sum()) for s in range(3)] == [7, 1, 2]
    # class is recoverable from the image (the folder's brightness), so labels follow folders
    assert np.all(np.diff([a.images[a.labels == k].mean() for k in range(3)]) > 30)


def test_class_folders_with_train_and_test_and_a_cap(tmp_path):
    make_class_folders(tmp_path / "tree" / "train", per_class=12)
    make_class_folders(tmp_path / "tree" / "test", per_class=6)
    data = load_task(str(tmp_path / "tree"), "object", 16, max_per_class=10)
    counts = data.counts()
    assert counts["test"] == 3 * 2 and counts["train"] + counts["val"] == 3 * 8 and counts["val"] >= 3


def test_corrupt_image_is_skipped_with_a_warning(tmp_path, capsys):
    root = make_class_folders(tmp_path / "folders")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        data = load_task(str(root), "object", 16)
    assert len(data.labels) == 30
    assert "broken.jpg" in capsys.readouterr().err


@pytest.mark.parametrize("layout, message", [("missing", "does not exist"), ("empty", "no class folders"),
                                             ("one_class", "at least 2")])
def test_bad_folders_are_refused(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout == "empty":
        root.mkdir()
    elif layout == "one_class":
        make_class_folders(root, classes=("only",))
    with pytest.raises(DataError, match=message):
        load_task(str(root), "face", 16)


def test_cifar_batches_are_read_exactly(tmp_path):
    expected = write_cifar_root(tmp_path / "cifar")
    data = load_task(str(tmp_path / "cifar"), "object", 32)
    assert data.classes == list(cifar10.CIFAR_CLASSES)
    assert data.counts()["test"] == 20 and sum(data.counts().values()) == 120
    test = data.indices("test")
    raw, labels = expected["test_batch"]
    assert np.array_equal(data.images[test], raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert np.array_equal(data.labels[test], labels)
    upsampled = load_task(str(tmp_path / "cifar"), "object", 48, max_per_class=5)
    assert upsampled.images.shape[1:] == (48, 48, 3) and upsampled.counts()["test"] == 10


def test_cifar_reader_refuses_code_in_a_pickle(tmp_path):
    write_cifar_root(tmp_path / "cifar")

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    with pytest.raises(DataError, match="refusing to load"):
        load_task(str(tmp_path / "cifar"), "object", 32)
    assert not (tmp_path / "pwned").exists()


def test_demo_is_deterministic_and_labelled():
    a = demo.make_demo("faces", n_classes=5, per_class=6, image_size=32, seed=1)
    b = demo.make_demo("faces", n_classes=5, per_class=6, image_size=32, seed=1)
    c = demo.make_demo("faces", n_classes=5, per_class=6, image_size=32, seed=2)
    assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)
    assert a.images.shape == (30, 32, 32, 3) and len(a.classes) == 5
    assert set(a.extra["expression"]) <= set(range(len(demo.DEMO_EXPRESSIONS)))
    objects = load_task("demo", "object", 40, max_per_class=3)
    assert objects.classes == list(demo.DEMO_OBJECTS) and objects.images.shape == (30, 40, 40, 3)
    expr = load_task("demo", "expression", 32, max_per_class=4)
    assert expr.classes == list(demo.DEMO_EXPRESSIONS)
    assert np.array_equal(expr.labels, expr.extra["expression"])
    # same identity, different images: nuisance varies
    assert not np.array_equal(a.images[0], a.images[1])


def test_augment_works_on_whole_batches():
    x = torch.rand(64, 3, 24, 24)
    gen = torch.Generator().manual_seed(0)
    y = transforms.augment(x, gen, grayscale_p=1.0)
    assert y.shape == x.shape
    assert torch.allclose(y[:, 0], y[:, 1]) and torch.allclose(y[:, 1], y[:, 2])  # all grey at p = 1
    z = transforms.augment(x, torch.Generator().manual_seed(0), grayscale_p=0.0)
    assert not torch.allclose(z[:, 0], z[:, 1])
    # a crop of a reflect-padded image: every output row is a row of the padded input
    plain = transforms.augment(x[:1], torch.Generator().manual_seed(5), grayscale_p=0.0)
    padded = torch.nn.functional.pad(x[:1], (3, 3, 3, 3), mode="reflect")
    found = any(torch.equal(plain, padded[..., i:i + 24, j:j + 24]) or
                torch.equal(plain, padded[..., i:i + 24, j:j + 24].flip(3)) for i in range(7) for j in range(7))
    assert found
