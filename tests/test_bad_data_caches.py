"""Bad data, as a table (helpers.bad_data_case runs each case): vggface2.py's --out and arguments, and damaged
caches. Each case builds its input in tmp_path and is either refused (DataError naming the culprit; from `python
vggface2.py`, status 2 and one line "error: ..." without a traceback) or loaded right, with a warning that counts
what was changed. Every file present before a case is byte-identical after it, except the cache a successful
`vggface2.py --overwrite` replaces. The data sources' cases are in tests/test_bad_data_sources.py.
"""
import numpy as np
import pytest
from helpers import SIZE, Evil, Loaded, bad_data_case, check_classes, make_vggface2_tree, refused, vgf2

from dualtask.data import taskdata
from dualtask.data.loading import load_task
from dualtask.data.taskdata import TaskData

# -- builders: each makes its input under tmp and returns what to run, vggface2.py's arguments or a function --


def tiny_cache(folder, classes=("a", "b", "c"), labels=(0, 1, 2, 0, 1, 2), split=(0, 0, 0, 0, 1, 2)):
    images = np.random.default_rng(0).integers(0, 256, (len(labels), 8, 8, 3), dtype=np.uint8)
    TaskData("face", list(classes), images, np.array(labels), np.array(split, np.int8), "test").save(folder)
    return folder


def cli(*args, out="my_results", setup=None):
    """vggface2.py on a tiny VGGFace2 tree into tmp/out, after setup(tmp)."""
    def build(tmp):
        src = vgf2(tmp)
        if setup is not None:
            setup(tmp)
        return [f"--root={src}", f"--out={tmp / out}", f"--image_size={SIZE}", *args]
    return build


def user_folder(tmp, name="my_results"):
    (tmp / name).mkdir()
    (tmp / name / "notes.txt").write_text("three weeks of notes")


def cli_out_is(where):
    """vggface2.py with --out at `where` relative to the tree's root (which lives at tmp/data/vgf2)."""
    def build(tmp):
        root = make_vggface2_tree(tmp / "data" / "vgf2", identities=2, per_identity=3)
        return [f"--root={root}", f"--out={(root / where).resolve()}", "--overwrite", f"--image_size={SIZE}"]
    return build


def cli_root_is_out_tmp(tmp):
    tiny_cache(tmp / "faces.tmp")
    return [f"--root={tmp / 'faces.tmp'}", f"--out={tmp / 'faces'}", "--overwrite"]


def killed_save(tmp):
    """What a save killed at the renames leaves: <out>.tmp half written, <out>.old the earlier cache."""
    tiny_cache(tmp / "faces.old")
    (tmp / "faces.tmp").mkdir()
    (tmp / "faces.tmp" / "meta.json").write_text((tmp / "faces.old" / "meta.json").read_text())
    (tmp / "faces.tmp" / "images.npy").write_bytes(b"\x93NUMPY half")


def check_replaced(proc, err, tmp):
    assert proc.returncode == 0, proc.stderr
    cache = taskdata.load_cache(tmp / "faces")
    assert cache.classes == ["n000001", "n000002"] and cache.images.shape == (6, SIZE, SIZE, 3)
    assert not (tmp / "faces.tmp").exists() and not (tmp / "faces.old").exists()


def damaged_cache(damage):
    """A tiny cache, damaged by damage(folder); loading it is what runs."""
    def build(tmp):
        folder = tiny_cache(tmp / "cache")
        damage(folder)
        return lambda: load_task(str(folder), "face", 8)
    return build


def save_array(name, value):
    return lambda folder: np.save(folder / f"{name}.npy", value)


def write_text(name, text):
    return lambda folder: (folder / name).write_text(text)


def pickled_labels(folder):
    np.save(folder / "labels.npy", np.array([Evil(folder.parent / "pwned")] * 6, dtype=object), allow_pickle=True)


def cache_with_empty_class(tmp):
    folder = tiny_cache(tmp / "cache", classes=("a", "b", "c", "d"), labels=(0, 1, 3, 0, 1, 3, 0, 1, 3),
                        split=(0, 0, 0, 1, 1, 1, 2, 2, 2))
    return lambda: load_task(str(folder), "face", 8, max_classes=3)


CASES = [
    # -- vggface2.py --out: nothing of the user's is replaced; --root is never written into ----------------
    ("out: non-empty user folder without --overwrite", cli(setup=user_folder),
     refused("my_results", "is not empty", "choose another --out")),
    ("out: user folder is refused even with --overwrite", cli("--overwrite", setup=user_folder),
     refused("my_results", "not a cache written by vggface2.py", "even with --overwrite")),
    ("out: a lone images.npy is not a cache", cli("--overwrite", setup=lambda t: (
        (t / "my_results").mkdir(), np.save(t / "my_results" / "images.npy", np.zeros(3)))),
     refused("my_results", "not a cache")),
    ("out: earlier cache without --overwrite", cli(out="faces", setup=lambda t: tiny_cache(t / "faces")),
     refused("faces", "already holds a cache", "--overwrite")),
    ("out: equals --root", cli_out_is("."), refused("vgf2", "is --root", "choose an --out outside")),
    ("out: inside --root", cli_out_is("train/cache"), refused("train/cache", "lies inside --root")),
    ("out: contains --root", cli_out_is(".."), refused("contains --root")),
    ("out: its .tmp would be --root", cli_root_is_out_tmp, refused("faces.tmp", "is --root")),
    ("out: is a file", cli(out="notes.txt", setup=lambda t: (t / "notes.txt").write_text("mine")),
     refused("notes.txt", "not a folder")),
    ("out: a user's folder named <out>.tmp", cli(out="faces", setup=lambda t: user_folder(t, "faces.tmp")),
     refused("faces.tmp", "move it away")),
    ("out: --overwrite replaces an earlier cache", cli("--overwrite", out="faces",
                                                       setup=lambda t: tiny_cache(t / "faces")),
     Loaded(check_replaced, changes=("faces",))),
    ("out: leftovers of a killed save are removed", cli(out="faces", setup=killed_save),
     Loaded(check_replaced, changes=("faces", "faces.tmp", "faces.old"))),
    # -- vggface2.py arguments ---------------------------------------------------------------------------
    ("arg: --image_size=0", cli("--image_size=0"), refused("--image_size=0", "at least 1")),
    ("arg: --image_size=-5", cli("--image_size=-5"), refused("--image_size=-5", "at least 1")),
    ("arg: --image_size=abc", cli("--image_size=abc"), refused("--image_size", "'abc'")),
    ("arg: --identities=0", cli("--identities=0"), refused("--identities=0", "at least 2")),
    ("arg: --per_identity=0", cli("--per_identity=0"), refused("--per_identity=0", "at least 1")),
    ("arg: --seed=-1", cli("--seed=-1"), refused("--seed=-1", "at least 0")),
    ("arg: --overwrite=maybe", cli("--overwrite=maybe"), refused("--overwrite", "True or False")),
    # -- caches --------------------------------------------------------------------------------------------
    ("cache: label beyond its classes", damaged_cache(save_array("labels", np.array([0, 1, 2, 0, 1, 3]))),
     refused("cache", "labels.npy holds 3, outside 0..2", "3 classes")),
    ("cache: arrays disagree in length", damaged_cache(save_array("split", np.zeros(5, np.int8))),
     refused("cache", "split.npy has shape (5,)", "6 images")),
    ("cache: images are float", damaged_cache(save_array("images", np.zeros((6, 8, 8, 3), np.float32))),
     refused("cache", "images.npy is float32")),
    ("cache: images are (N, H, W)", damaged_cache(save_array("images", np.zeros((6, 8, 8), np.uint8))),
     refused("cache", "images.npy", "(6, 8, 8)")),
    ("cache: split value 3", damaged_cache(save_array("split", np.array([0, 0, 0, 0, 1, 3], np.int8))),
     refused("cache", "split.npy holds 3, outside 0..2")),
    ("cache: meta.json is not JSON", damaged_cache(write_text("meta.json", "{classes: [a, b")),
     refused("cache", "meta.json is not readable JSON")),
    ("cache: meta.json lacks classes", damaged_cache(write_text("meta.json", '{"name": "face"}')),
     refused("cache", "meta.json lacks 'classes'")),
    ("cache: meta.json is a list", damaged_cache(write_text("meta.json", '["a", "b", "c"]')),
     refused("cache", "meta.json lacks 'classes'")),
    ("cache: labels.npy holds pickled objects", damaged_cache(pickled_labels),
     refused("cache", "labels.npy is not a readable array")),
    ("cache: a class without images is left out", cache_with_empty_class,
     Loaded(check_classes(["a", "b", "d"], ["c"]))),
]


@pytest.mark.parametrize("build, expect", [pytest.param(b, e, id=i) for i, b, e in CASES])
def test_bad_data(build, expect, tmp_path, capsys):
    bad_data_case(build, expect, tmp_path, capsys)
