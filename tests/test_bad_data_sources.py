"""Bad data, as a table (helpers.bad_data_case runs each case): the data sources (CIFAR-10's batches, VGGFace2's
boxes, class folders and identities, image modes). Each case builds its input in tmp_path and is either refused
(DataError naming the culprit) or loaded right, with a warning that counts what was changed; every file present
before a case is byte-identical after it. Property tests of stratified_split follow. vggface2.py's --out and
arguments and damaged caches are in tests/test_bad_data_caches.py.
"""
import contextlib
import io
import json
import os
import pickle
import socket
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
from conftest import write_jpeg
from helpers import (
    SIZE,
    Evil,
    Loaded,
    bad_data_case,
    check_classes,
    make_class_folders,
    refused,
    vgf2,
    write_cifar_root,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from dualtask.data import cifar10, taskdata
from dualtask.data import images as image_io
from dualtask.data.loading import load_task

# the unreadable-image warning also goes to stderr, where the cases read it
pytestmark = pytest.mark.filterwarnings("ignore:skipped .* unreadable image:UserWarning")

GRADIENT = np.tile(np.arange(16, dtype=np.uint8) * 17, (16, 1))  # 0..255 across the columns


# -- builders: each makes its input under tmp and returns a function that loads it ---------------------------


def cifar(damage):
    """A tiny CIFAR-10 root (20 images a batch), damaged by damage(batch folder); loading it is what runs."""
    def build(tmp):
        write_cifar_root(tmp / "cifar", per_batch=20)
        damage(tmp / "cifar" / "cifar-10-batches-py")
        return lambda: load_task(str(tmp / "cifar"), "object", 32)
    return build


def repickle(name, **changes):
    """The batch `name` with these entries changed."""
    def damage(folder):
        with open(folder / name, "rb") as f:
            batch = pickle.load(f)
        batch.update(changes)
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return damage


def write_meta(meta):
    """batches.meta holding `meta`, or meta(folder) when it is a function."""
    def damage(folder):
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump(meta(folder) if callable(meta) else meta, f)
    return damage


def cifar_offline(error):
    """download=True into an empty folder while torchvision's download fails as it does without network."""
    def build(tmp):
        import torchvision

        (tmp / "cifar").mkdir()

        def fail(*args, **kwargs):
            raise error

        def run():
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(torchvision.datasets, "CIFAR10", fail)
                mp.setattr(socket.socket, "connect", fail)  # and should a download start anyway, it cannot connect
                return load_task(str(tmp / "cifar"), "object", 32, download=True)
        return run
    return build


def boxes(rows, bom=False):
    """The tiny VGGFace2 tree (2 identities x 6 images) with these box rows instead of the real ones."""
    def build(tmp):
        root = vgf2(tmp, per_identity=6)
        text = "\n".join(["NAME_ID,X,Y,W,H", *rows]) + "\n"
        (root / "bb_landmark" / "loose_bb_train.csv").write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
        return lambda: load_task(str(root), "face", SIZE)
    return build


def true_rows(identities=2, per_identity=6):
    """make_vggface2_tree's own box rows."""
    return [f"n{i + 1:06d}/{j + 1:04d}_01,{10 + 3 * j},{20 + 2 * j},50,50"
            for i in range(identities) for j in range(per_identity)]


BAD_BOXES = [  # identity 1's first six images: zero width, NaN, negative height, outside, duplicated, clipped
    "n000001/0001_01,10,20,0,50", "n000001/0002_01,nan,22,50,50", "n000001/0003_01,16,24,50,-5",
    "n000001/0004_01,1000,1000,50,50", "n000001/0005_01,22,28,50,50", "n000001/0005_01,0,0,5,5",
    "n000001/0006_01,-20,-20,60,60", *true_rows()[6:]]


def check_bad_boxes(data, err, tmp):
    folder = tmp / "vgf2" / "train" / "n000001"
    first = data.labels == 0
    got = {k: data.images[first][k] for k in range(6)}  # images stay in file order within an identity

    def read(name, box=None):
        return image_io.read_image(folder / name, SIZE, box)[0]
    for k in range(4):  # unusable boxes: the whole image, uncropped
        assert np.array_equal(got[k], read(f"{k + 1:04d}_01.jpg")), k
    assert np.array_equal(got[4], read("0005_01.jpg", (22, 28, 50, 50)))  # the first of the duplicated rows
    assert np.array_equal(got[5], read("0006_01.jpg", (-20, -20, 60, 60)))  # partly outside: clipped
    assert "3 box(es) in loose_bb_train.csv have zero or negative size or are not numbers" in err
    assert "1 face box(es) lie outside their image" in err and "0004_01" in err
    assert "1 row(s) repeat an earlier NAME_ID (first: n000001/0005_01)" in err
    assert "no row" not in err


def check_bom(data, err, tmp):
    assert "no row" not in err and data.classes == ["n000001", "n000002"]
    img = tmp / "vgf2" / "train" / "n000001" / "0002_01.jpg"
    assert np.array_equal(data.images[1], image_io.read_image(img, SIZE, (13, 22, 50, 50))[0])


def folders(classes, broken=()):
    """Class folders of three tiny JPEGs each; the classes in `broken` hold only an empty and a damaged file."""
    def build(tmp):
        root = make_class_folders(tmp / "folders", classes=[c for c in classes if c not in broken],
                                  per_class=3, size=SIZE)
        for c in broken:
            (root / c).mkdir(parents=True)
            (root / c / "0.jpg").write_bytes(b"")
            (root / c / "1.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
        return lambda: load_task(str(root), "object", SIZE)
    return build


def class_only_in_test(tmp):
    root = tmp / "folders"
    make_class_folders(root / "train", classes=("cat", "dog"), per_class=3, size=SIZE)
    make_class_folders(root / "test", classes=("cat", "dog", "emu"), per_class=2, size=SIZE)
    return lambda: load_task(str(root), "object", SIZE)


def image_mode(write, expected):
    """Class 'a' holds three copies of the image write(path) makes, class 'b' ordinary JPEGs."""
    def build(tmp):
        root = make_class_folders(tmp / "folders", classes=("b",), per_class=3, size=SIZE)
        (root / "a").mkdir()
        for k in range(3):
            write(root / "a" / f"{k}")
        return lambda: load_task(str(root), "object", SIZE)

    def check(data, err, tmp):
        assert "unreadable" not in err and data.classes == ["a", "b"]
        want = np.asarray(expected, np.int64)
        want = np.broadcast_to(want[..., None] if want.ndim == 2 else want, (SIZE, SIZE, 3))
        for img in data.images[data.labels == 0]:
            assert np.abs(img.astype(np.int64) - want).max() <= 1, img[0, :, 0]
    return build, Loaded(check)


def pil_save(array, suffix, mode=None, **kwargs):
    """PIL's own file of `array` (converted to `mode`), as a user's tools would write it."""
    def write(path):
        from PIL import Image

        img = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
        img.save(path.with_suffix(suffix), **kwargs)
    return write


def palette_png(path):
    """A palette image of the grey ramp whose index 0 (the first column) is transparent."""
    from PIL import Image

    img = Image.fromarray(np.tile(np.arange(16, dtype=np.uint8), (16, 1)), "P")
    img.putpalette([v for i in range(256) for v in (min(i * 17, 255),) * 3])
    img.save(path.with_suffix(".png"), transparency=0)


LA = np.stack([GRADIENT, np.where(np.arange(16) < 8, 255, 0).astype(np.uint8)[None].repeat(16, 0)], -1)
RAMP = np.stack([GRADIENT, 255 - GRADIENT, np.full_like(GRADIENT, 77)], -1)
MODES = {  # id: (how the file is written, the RGB or grey values expected after loading)
    "16-bit grey PNG (I;16) becomes the same 8-bit gradient": (pil_save(GRADIENT.astype(np.uint16) * 257, ".png"),
                                                              GRADIENT),
    "32-bit TIFF (I) of 16-bit values is read as 16 bit": (pil_save(GRADIENT.astype(np.int32) * 257, ".tif"),
                                                           GRADIENT),
    "32-bit TIFF (I) beyond 16 bits is stretched": (pil_save(GRADIENT.astype(np.int32) * 1_000_000, ".tif"),
                                                    GRADIENT),
    "float TIFF (F) in 0..1 is scaled by 255": (pil_save(GRADIENT.astype(np.float32) / 255, ".tif"), GRADIENT),
    "float TIFF (F) in -1..1 is stretched": (pil_save(GRADIENT.astype(np.float32) / 127.5 - 1, ".tif"), GRADIENT),
    "grey+alpha PNG (LA) shows transparency as white": (pil_save(LA, ".png"),
                                                        np.where(np.arange(16) < 8, GRADIENT, 255)),
    "palette PNG (P) with a transparent index": (palette_png, np.where(np.arange(16) == 0, 255, GRADIENT)),
    "CMYK TIFF": (pil_save(RAMP, ".tif", mode="CMYK"), RAMP),
    "1-bit PNG": (pil_save(GRADIENT > 127, ".png"), np.where(GRADIENT > 127, 255, 0)),
    "grey PNG (L)": (pil_save(GRADIENT, ".png"), GRADIENT),
}


def vgf2_broken_identity(tmp):
    root = vgf2(tmp, identities=3)
    for p in (root / "train" / "n000002").iterdir():
        p.write_bytes(p.read_bytes()[:40])  # truncated JPEGs
    return lambda: load_task(str(root), "face", SIZE)


def non_utf8_folder(tmp):
    root = tmp / "folders"
    make_class_folders(root, classes=("dog",), per_class=3, size=SIZE)
    try:
        os.mkdir(os.fsencode(root) + b"/caf\xe9")
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    for k in range(3):
        write_jpeg(Path(os.fsdecode(os.fsencode(root) + b"/caf\xe9")) / f"{k}.jpg", np.full((SIZE, SIZE, 3), 200))
    return lambda: load_task(str(root), "object", SIZE)


def check_non_utf8(data, err, tmp):
    assert data.classes == ["caf\\xe9", "dog"] and len(data.labels) == 6
    json.dumps(data.classes, ensure_ascii=False).encode("utf-8")  # config.json and the report can hold them
    assert "not UTF-8" in err and "caf\\xe9" in err
    assert np.abs(data.images[data.labels == 0].astype(int) - 200).max() <= 2


def check_small_classes(data, err, tmp):
    assert "2 class(es) have fewer than 3 images, so no validation or test images" in err
    assert "cat, dog" in err and "max_per_class" in err and "fox" not in err
    for k in (0, 1):
        assert set(data.split[data.labels == k]) == {0}
    assert set(data.split[data.labels == 2]) == {0, 1, 2}


def small_classes(tmp):
    root = make_class_folders(tmp / "folders", classes=("fox",), per_class=5, size=SIZE)
    make_class_folders(root, classes=("dog",), per_class=2, size=SIZE)
    make_class_folders(root, classes=("cat",), per_class=1, size=SIZE)
    return lambda: load_task(str(root), "object", SIZE)


CASES = [
    # -- CIFAR-10 ------------------------------------------------------------------------------------------
    ("cifar: labels outside 0..9", cifar(repickle("data_batch_2", labels=[10, -1] + [0] * 18)),
     refused("data_batch_2", "-1, 10", "outside 0..9")),
    ("cifar: images and labels disagree", cifar(repickle("data_batch_1", labels=[0] * 19)),
     refused("data_batch_1", "20 images but 19 labels")),
    ("cifar: batches.meta is a list", cifar(write_meta(list(cifar10.CIFAR_CLASSES))),
     refused("batches.meta", "got a list")),
    ("cifar: label_names are not str", cifar(write_meta({"label_names": list(range(10))})),
     refused("batches.meta", "label_names")),
    ("cifar: label_names holds lists", cifar(write_meta({"label_names": [[c] for c in cifar10.CIFAR_CLASSES]})),
     refused("batches.meta", "label_names")),
    ("cifar: label_names of length 9", cifar(write_meta({"label_names": list(cifar10.CIFAR_CLASSES[:9])})),
     refused("batches.meta", "10 distinct class names")),
    ("cifar: batches.meta runs code", cifar(write_meta(lambda f: {"label_names": Evil(f.parent.parent / "pwned")})),
     refused("batches.meta", "refusing to load")),
    ("cifar: download without network (URLError)",
     cifar_offline(URLError("[Errno -3] Temporary failure in name resolution")),
     refused(cifar10.CIFAR_URL, "cifar-10-batches-py", "by hand")),
    ("cifar: download fails (OSError)", cifar_offline(OSError("Network is unreachable")),
     refused(cifar10.CIFAR_URL, "cifar-10-batches-py")),
    # -- VGGFace2 boxes ------------------------------------------------------------------------------------
    ("boxes: non-numeric row", boxes(true_rows()[:1] + ["n000001/0002_01,13,22,fifty,50"]),
     refused("loose_bb_train.csv", "line 3", "4 numbers")),
    ("boxes: short row", boxes(["n000001/0001_01,10,20"]), refused("loose_bb_train.csv", "line 2")),
    ("boxes: unusable, outside, duplicated, clipped", boxes(BAD_BOXES), Loaded(check_bad_boxes)),
    ("boxes: UTF-8 byte-order mark", boxes(true_rows(), bom=True), Loaded(check_bom)),
    # -- class folders and identities ----------------------------------------------------------------------
    ("folder: a class of unreadable images is left out", folders(("cat", "dog", "emu", "fox"), broken=("emu",)),
     Loaded(check_classes(["cat", "dog", "fox"], ["emu"], stderr_has=["skipped 2 unreadable", "chance 0.333"]))),
    ("folder: a class only in test/ is left out", class_only_in_test,
     Loaded(check_classes(["cat", "dog"], ["emu"]))),
    ("folder: one readable class left", folders(("cat", "dog"), broken=("dog",)),
     refused("1 class(es) with readable training images", "dog", "at least 2")),
    ("vggface2: an identity of unreadable images is left out", vgf2_broken_identity,
     Loaded(check_classes(["n000001", "n000003"], ["n000002"]))),
    ("folder: class folder name not UTF-8", non_utf8_folder, Loaded(check_non_utf8)),
    ("split: classes of 1 and 2 images are named", small_classes, Loaded(check_small_classes)),
    # -- image modes: converted by the range of their format -----------------------------------------------
    *[(f"image: {name}", *image_mode(write, expected)) for name, (write, expected) in MODES.items()],
]


@pytest.mark.parametrize("build, expect", [pytest.param(b, e, id=i) for i, b, e in CASES])
def test_bad_data(build, expect, tmp_path, capsys):
    bad_data_case(build, expect, tmp_path, capsys)


# -- stratified_split: properties over random labels and seeds ------------------------------------------------


def documented_counts(n, val_fraction, test_fraction):
    """(n_val, n_test) of a class of n images, as stratified_split's docstring states them."""
    if n < 3:
        return 0, 0
    n_test = max(round(n * test_fraction), 1) if test_fraction > 0 else 0
    n_val = max(round(n * val_fraction), 1) if val_fraction > 0 else 0
    n_test = min(n_test, n - 1 - (n_val > 0))
    return min(n_val, n - 1 - n_test), n_test


FRACTIONS = [(taskdata.VAL_FRACTION, taskdata.TEST_FRACTION), (0.125, 0.0), (0.0, 0.2), (0.3, 0.3), (0.5, 0.45),
             (0.2, 0.7)]  # the last two reach the caps that keep a training and a validation image


@settings(max_examples=100, deadline=None, database=None)
@given(labels=st.lists(st.sampled_from([0, 1, 3, 7, 42]), min_size=1, max_size=80),
       seed=st.integers(0, 2 ** 32 - 1), fractions=st.sampled_from(FRACTIONS))
def test_stratified_split_properties(labels, seed, fractions):
    labels = np.array(labels)
    val_fraction, test_fraction = fractions
    with contextlib.redirect_stderr(io.StringIO()):
        split = taskdata.stratified_split(labels, seed, val_fraction, test_fraction)
        again = taskdata.stratified_split(labels, seed, val_fraction, test_fraction)
    assert split.shape == labels.shape and set(np.unique(split)) <= {0, 1, 2}  # one split value per index
    assert np.array_equal(split, again)  # deterministic for a seed
    for c in np.unique(labels):
        mine = split[labels == c]
        n = len(mine)
        assert (mine == 0).sum() >= 1  # every class keeps a training image
        assert ((mine == 1).sum(), (mine == 2).sum()) == documented_counts(n, val_fraction, test_fraction)
        if n >= 3:
            assert (mine == 1).any() == (val_fraction > 0) and (mine == 2).any() == (test_fraction > 0)


@settings(max_examples=100, deadline=None, database=None)
@given(n=st.integers(3, 400))
def test_default_split_rounds_to_the_nearest_count(n):
    with contextlib.redirect_stderr(io.StringIO()):
        split = taskdata.stratified_split(np.zeros(n, np.int64), seed=n)
    n_val, n_test = (split == 1).sum(), (split == 2).sum()
    assert n_test == 1 or abs(n_test - n * taskdata.TEST_FRACTION) <= 0.5
    assert n_val == 1 or abs(n_val - n * taskdata.VAL_FRACTION) <= 0.5
    assert n - n_val - n_test >= 1
