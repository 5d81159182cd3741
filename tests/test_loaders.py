"""The loaders of the reference systems' data sets (FER2013 as CSV and as class folders, KDEF, VoxCeleb frames),
the label kinds a TaskData carries, and task_view. Each test builds its own tiny fixture in tmp_path."""
import json
import re

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, write_jpeg
from helpers import KDEF_PEOPLE, make_kdef, make_lfw, tiny_config

from dualtask.data import demo, fer2013, folders, kdef, taskdata, voxceleb
from dualtask.data import loading as vggface2
from dualtask.data.loading import load_task, task_view
from dualtask.data.taskdata import DataError, TaskData

FER_HEADER = "emotion,pixels,Usage"


def fer_row(emotion: int, value: int, usage: str) -> str:
    """One FER2013 CSV row whose 48 x 48 grey pixels are all `value`."""
    return f"{emotion}," + " ".join([str(value)] * 2304) + f",{usage}"


def write_fer_csv(path, rows, header=FER_HEADER):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header] + rows) + "\n")
    return path


def fer_fixture(path):
    """2 rows per emotion and usage; the pixel value encodes emotion and usage (10 * emotion + 80 * split)."""
    rows = [fer_row(e, 10 * e + 80 * s, usage) for e in range(7)
            for s, usage in enumerate(("Training", "PublicTest", "PrivateTest")) for _ in range(2)]
    return write_fer_csv(path, rows)


# ----------------------------------------------------------------------------------------------------------
# FER2013 CSV


def test_fer_csv_keeps_the_official_split_and_the_pixels(tmp_path):
    path = fer_fixture(tmp_path / "fer" / "fer2013.csv")
    data = load_task(str(path), "expression", 48)
    assert data.classes == list(fer2013.FER2013_CLASSES)
    assert data.label_kind == "expression" and data.native_size == 48
    assert data.images.shape == (42, 48, 48, 3) and data.images.dtype == np.uint8
    assert data.counts() == {"train": 14, "val": 14, "test": 14}
    # each image's value says which emotion and Usage its row had: the split is Usage's, the label emotion's
    expected = 10 * data.labels + 80 * data.split.astype(np.int64)
    assert (data.images == expected[:, None, None, None]).all()  # grey repeated in R, G and B, exact


def test_fer_csv_row_of_200_gives_an_image_of_200_and_a_folder_with_fer2013_csv_loads(tmp_path):
    rows = [fer_row(3, 200, "Training"), fer_row(0, 5, "Training"), fer_row(3, 7, "PublicTest"),
            fer_row(0, 9, "PrivateTest")]
    write_fer_csv(tmp_path / "fer2013" / "fer2013.csv", rows)
    data = load_task(str(tmp_path / "fer2013"), "emotion", 48)  # the folder of the Kaggle archive
    assert data.classes == ["angry", "happy"]  # the emotions without training rows are left out, with a warning
    happy_train = data.images[(data.labels == 1) & (data.split == 0)]
    assert len(happy_train) == 1 and (happy_train == 200).all()
    assert data.name == "emotion" and data.source.startswith("fer2013:")
    small = load_task(str(tmp_path / "fer2013" / "fer2013.csv"), "expression", 24)
    assert small.images.shape == (4, 24, 24, 3) and small.native_size == 48


def test_fer_csv_caps_each_official_set(tmp_path):
    rows = [fer_row(e, 50, usage) for e in range(3) for usage, n in
            (("Training", 20), ("PublicTest", 6), ("PrivateTest", 6)) for _ in range(n)]
    path = write_fer_csv(tmp_path / "fer2013.csv", rows)
    data = load_task(str(path), "expression", 16, max_per_class=10, max_classes=2)
    assert data.classes == ["angry", "disgust"]
    # 10 per class: 2 test (20%), 1 val (10%), 7 train, each taken from its own official set
    for c in range(2):
        assert np.bincount(data.split[data.labels == c], minlength=3).tolist() == [7, 1, 2]


GOOD = fer_row(1, 1, "Training")


@pytest.mark.parametrize("header, bad_row, message", [
    ("emotion,pixel,Usage", GOOD, r"line 1: the header is"),
    (FER_HEADER, "0," + " ".join(["1"] * 2303) + ",Training", r"line 3: 2303 pixel values, not 2304"),
    (FER_HEADER, fer_row(0, 1, "Validation"), r"line 3: Usage 'Validation' is not Training"),
    (FER_HEADER, fer_row(7, 1, "Training"), r"line 3: emotion '7' is not a whole number 0-6"),
    (FER_HEADER, fer_row(-1, 1, "Training"), r"line 3: emotion '-1'"),
    (FER_HEADER, fer_row(0, 256, "Training"), r"line 3: pixel values span 256..256, not 0..255"),
    (FER_HEADER, "0," + " ".join(["x"] * 2304) + ",Training", r"line 3: the pixels are not all whole numbers"),
    (FER_HEADER, GOOD + ",extra", r"line 3: 4 fields, not 3"),
])
def test_bad_fer_csv_names_file_and_line(tmp_path, header, bad_row, message):
    path = write_fer_csv(tmp_path / "bad.csv", [GOOD, bad_row], header=header)  # line 2 good, line 3 bad
    with pytest.raises(DataError, match=re.escape(str(path)) + ": " + message) as e:
        load_task(str(path), "expression", 16)
    assert "expected FER2013's CSV: the header emotion,pixels,Usage" in str(e.value)


# ----------------------------------------------------------------------------------------------------------
# FER2013 as class folders (Kaggle's images): the official split from the test file names


def make_fer_folders(root, classes=("angry", "happy", "sad"), n_train=5, n_public=2, n_private=3):
    for ci, c in enumerate(classes):
        for i in range(n_train):
            write_jpeg(root / "train" / c / f"Training_{ci}{i:03d}.jpg", np.full((48, 48, 3), 20, np.uint8))
        for i in range(n_public):
            write_jpeg(root / "test" / c / f"PublicTest_{ci}{i:03d}.jpg", np.full((48, 48, 3), 120, np.uint8))
        for i in range(n_private):
            write_jpeg(root / "test" / c / f"PrivateTest_{ci}{i:03d}.jpg", np.full((48, 48, 3), 220, np.uint8))
    return root


def test_fer_folders_keep_the_official_split(tmp_path):
    data = load_task(str(make_fer_folders(tmp_path / "fer")), "expression", 16)
    assert data.label_kind == "expression" and data.classes == ["angry", "happy", "sad"]
    assert data.counts() == {"train": 15, "val": 6, "test": 9}  # nothing carved out of train/
    mean = data.images.reshape(len(data.images), -1).mean(1)
    for s, value in enumerate((20, 120, 220)):  # train/ -> train, PublicTest_ -> val, PrivateTest_ -> test
        assert np.abs(mean[data.split == s] - value).max() < 5


def test_fer_folders_cap_each_official_set(tmp_path):
    data = load_task(str(make_fer_folders(tmp_path / "fer", n_public=4, n_private=4)), "expression", 16,
                     max_per_class=5)
    for c in range(3):  # 5 per class: 1 test, 1 val, 3 train
        assert np.bincount(data.split[data.labels == c], minlength=3).tolist() == [3, 1, 1]


def test_other_train_test_folders_keep_the_ordinary_rule(tmp_path):
    root = tmp_path / "plain"
    for c in ("cat", "dog"):
        for i in range(10):
            write_jpeg(root / "train" / c / f"{i}.jpg", np.full((8, 8, 3), 20, np.uint8))
        for i in range(3):
            write_jpeg(root / "test" / c / f"{i}.jpg", np.full((8, 8, 3), 20, np.uint8))
    data = load_task(str(root), "object", 8)
    assert data.label_kind == "" and data.source.startswith("folder:")
    assert data.counts()["test"] == 6 and data.counts()["val"] > 0  # val carved out of train/, as before


def test_fer_prefixes_on_only_some_test_files_warn_and_keep_the_ordinary_rule(tmp_path, capsys):
    root = make_fer_folders(tmp_path / "fer")
    write_jpeg(root / "test" / "angry" / "other.jpg", np.full((48, 48, 3), 220, np.uint8))
    data = load_task(str(root), "expression", 16)
    assert "FER2013's split is not used" in capsys.readouterr().err
    assert data.counts()["test"] == 3 * 5 + 1 and data.label_kind == ""


@pytest.mark.skipif(not (SHARED_DATA / "fer2013").is_dir(), reason="shared FER2013 sample not present")
def test_shared_fer2013_folder_split(monkeypatch):
    root = SHARED_DATA / "fer2013"
    n_public = len(list((root / "test").glob("*/PublicTest_*")))
    n_private = len(list((root / "test").glob("*/PrivateTest_*")))

    def listed_only(paths, size, boxes=None, what="images"):  # the rule is in the names: skip 10k decodes
        return np.zeros((len(paths), size, size, 3), np.uint8), np.ones(len(paths), bool), 48

    monkeypatch.setattr(folders, "read_many", listed_only)  # folders.load_folder reads the class folders
    data = load_task(str(root), "expression", 8)
    assert len(data.classes) == 7 and data.label_kind == "expression"
    assert data.counts() == {"train": 3436, "val": n_public, "test": n_private}
    assert n_public > 0 and n_private > 0


# ----------------------------------------------------------------------------------------------------------
# KDEF


def test_kdef_labels_both_identity_and_expression_from_the_names(tmp_path):
    root = make_kdef(tmp_path / "KDEF")
    data = load_task(str(root), "face", 12)
    assert data.source.startswith("kdef:") and data.label_kind == "identity"
    assert data.classes == list(KDEF_PEOPLE)  # sex + number; sessions A and B are the same person
    assert data.extra_classes == {"expression": ["afraid", "angry", "disgusted", "happy", "neutral", "sad",
                                                 "surprised"]}
    assert len(data.images) == 4 * 4 * 2  # frontal only by default: people x expressions x sessions
    colour = data.images.reshape(len(data.images), -1, 3).mean(1)
    assert np.abs(colour[:, 0] - (40 + 40 * data.labels)).max() < 6  # identity, from the same photograph
    assert np.abs(colour[:, 1] - (30 + 30 * data.extra["expression"])).max() < 6  # and its expression
    assert np.abs(colour[:, 2] - 60).max() < 6  # all straight (S)
    assert sorted(set(data.extra["expression"].tolist())) == [0, 1, 3, 4]  # AF AN HA NE
    for c in range(len(KDEF_PEOPLE)):  # stratified by identity: every person in every split
        assert set(data.split[data.labels == c].tolist()) == {0, 1, 2}


def test_kdef_views_setting_picks_other_views(tmp_path):
    root = make_kdef(tmp_path / "KDEF")
    half = kdef.load_kdef(root, 12, views=("HL",))
    blue = half.images.reshape(len(half.images), -1, 3).mean(1)[:, 2]
    assert len(half.images) == 32 and np.abs(blue - 180).max() < 6
    both = load_task(str(root), "face", 12, kdef_views=("S", "HL"))
    assert len(both.images) == 64
    assert len(load_task(str(root), "face", 12, kdef_views="S,HL").images) == 64


def test_kdef_caps_and_strangers(tmp_path, capsys):
    root = make_kdef(tmp_path / "KDEF_and_AKDEF" / "KDEF")
    write_jpeg(root / "AF01" / "notes.jpg", np.zeros((8, 8, 3), np.uint8))
    (root / "README.txt").write_text("not a photograph")
    data = load_task(str(tmp_path / "KDEF_and_AKDEF"), "face", 12, max_per_class=5, max_classes=3)
    assert "skipped 1 image file(s) not named as KDEF photographs" in capsys.readouterr().err
    assert data.classes == ["F01", "F02", "M01"] and np.bincount(data.labels).tolist() == [5, 5, 5]


def test_kdef_copies_and_link_loops_are_read_once(tmp_path, capsys):
    root = make_kdef(tmp_path / "KDEF", people=("F01", "M01"), expressions=("HA", "SA"))
    (root / "copies").mkdir()
    (root / "copies" / "AF01HAS.JPG").write_bytes((root / "AF01" / "AF01HAS.JPG").read_bytes())
    (root / "AF01" / "loop").symlink_to(root, target_is_directory=True)
    data = load_task(str(root), "face", 12)
    assert "occur twice" in capsys.readouterr().err
    assert len(data.images) == 2 * 2 * 2  # people x expressions x sessions, the copy and the loop not again


@pytest.mark.parametrize("views", [("X",), (), "front", None, ("S", "left")])
def test_bad_kdef_views_are_refused(tmp_path, views):
    root = make_kdef(tmp_path / "KDEF", people=("F01", "M01"), expressions=("HA",))
    with pytest.raises(DataError, match=r"kdef_views=.*FL HL S HR FR"):
        load_task(str(root), "face", 12, kdef_views=views)


def test_kdef_without_the_views_asked_for_is_refused(tmp_path):
    root = make_kdef(tmp_path / "KDEF", people=("F01", "M01"), expressions=("HA",), views=("S",))
    with pytest.raises(DataError, match=re.escape(str(root)) + r": no KDEF photographs with view\(s\) FR"):
        kdef.load_kdef(root, 12, views=("FR",))


def test_kdef_expression_view_shares_the_images(tmp_path):
    data = load_task(str(make_kdef(tmp_path / "KDEF")), "face", 12)
    view = task_view(data, "expression")
    assert view.images is data.images and view.split is data.split
    assert view.label_kind == "expression" and view.classes == data.extra_classes["expression"]
    assert np.array_equal(view.labels, data.extra["expression"])
    assert np.array_equal(view.extra["identity"], data.labels) and view.extra_classes["identity"] == data.classes


# ----------------------------------------------------------------------------------------------------------
# VoxCeleb face frames


def make_voxceleb(root, videos_per_identity=(4, 3, 5, 2), frames=3):
    """id1000N/<video>/<frame>.jpg; each video has its own grey level (so frames reveal their video)."""
    level = {}
    for i, n_videos in enumerate(videos_per_identity):
        for v in range(n_videos):
            video = f"id{10001 + i}/vid{v}x"
            level[video] = 10 + 7 * len(level)
            for f in range(frames):
                write_jpeg(root / video / f"{f:05d}.jpg", np.full((10, 10, 3), level[video], np.uint8))
    return level


def test_voxceleb_never_puts_one_video_in_two_splits(tmp_path):
    level = make_voxceleb(tmp_path / "vox")
    for seed in range(4):
        data = load_task(str(tmp_path / "vox"), "identity", 10, seed=seed)
        assert data.source.startswith("voxceleb:") and data.label_kind == "identity"
        assert data.classes == ["id10001", "id10002", "id10003", "id10004"]
        assert len(data.images) == 14 * 3
        names = data.extra_classes["video"]
        for v in np.unique(data.extra["video"]):
            in_video = data.extra["video"] == v
            assert len(set(data.split[in_video].tolist())) == 1, names[v]  # one split per video
            assert np.abs(data.images[in_video].astype(int) - level[names[v]]).max() < 3  # truly that video
        assert min(data.counts().values()) > 0
        # identities with 3 or more videos are in every split; the one with 2 in train and test
        for c, n_videos in enumerate((4, 3, 5, 2)):
            expected = {0, 1, 2} if n_videos >= 3 else {0, 2}
            assert set(data.split[data.labels == c].tolist()) == expected


def test_voxceleb_caps_spread_frames_across_videos(tmp_path):
    make_voxceleb(tmp_path / "vox", videos_per_identity=(3, 4, 3), frames=4)
    data = load_task(str(tmp_path / "vox"), "face", 10, max_per_class=6, max_classes=2)
    assert data.classes == ["id10001", "id10002"] and np.bincount(data.labels).tolist() == [6, 6]
    for c in range(2):  # every split keeps frames under the cap, and every video of id10001 gives 2
        assert set(data.split[data.labels == c].tolist()) == {0, 1, 2}
    assert sorted(np.bincount(data.extra["video"][data.labels == 0]).tolist()) == [2, 2, 2]


def test_voxceleb_without_enough_videos_for_val_is_refused(tmp_path):
    make_voxceleb(tmp_path / "vox", videos_per_identity=(2, 2))
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "vox")) + r": no val frames.*at least 3 videos"):
        load_task(str(tmp_path / "vox"), "face", 10)


def test_voxceleb_detection_leaves_class_folders_alone(tmp_path):
    make_voxceleb(tmp_path / "vox")
    assert voxceleb.is_voxceleb_root(tmp_path / "vox")
    make_fer_folders(tmp_path / "fer", n_train=1, n_public=1, n_private=1)  # train/<class>/ looks two-level too
    assert not voxceleb.is_voxceleb_root(tmp_path / "fer")
    make_kdef(tmp_path / "kdef", people=("F01", "M01"), expressions=("HA",))
    assert kdef.is_kdef_root(tmp_path / "kdef") and not kdef.is_kdef_root(tmp_path / "vox")


# ----------------------------------------------------------------------------------------------------------
# LFW: cropped to the face


def red_fraction(images):
    x = images.astype(int)
    return float(((x[..., 0] > 128) & (x[..., 2] < 128)).mean())


def test_lfw_folders_are_cropped_to_the_face(tmp_path):
    root = make_lfw(tmp_path / "lfw")
    assert folders.is_lfw_root(root)
    cropped = load_task(str(root), "identity", 16)
    whole = load_task(str(root), "identity", 16, face_crop="none")
    # the face box (LFWcrop's 83 px, enlarged by 30%: 108 px) holds the red square over 40% of its area; the
    # whole frame is 8% red
    assert red_fraction(cropped.images) > 0.35 and red_fraction(whole.images) < 0.12
    assert cropped.source.startswith("face-cropped folder:") and whole.source.startswith("folder:")
    assert cropped.native_size in (107, 108) and whole.native_size == 250  # resolution matching sees the crop
    assert cropped.classes == whole.classes == ["Ann_Lee", "Bo_Ray"]


def test_other_class_folders_are_not_cropped(tmp_path):
    root = make_lfw(tmp_path / "other", names="img_{i:04d}.jpg")
    assert not folders.is_lfw_root(root)
    data = load_task(str(root), "identity", 16)
    assert data.source.startswith("folder:") and red_fraction(data.images) < 0.12
    aligned = make_lfw(tmp_path / "aligned", size=200)  # LFW's names, but not its 250-px frames
    assert not folders.is_lfw_root(aligned)
    assert load_task(str(aligned), "identity", 16).source.startswith("folder:")


@pytest.mark.slow  # a training run on the LFW photographs, about 30 s; the crop functions themselves are tested above
def test_face_crop_is_part_of_a_run_on_lfw_and_of_no_other(tmp_path):
    from dualtask.core import common
    from dualtask.experiment import pipeline as dualtask

    lfw = make_lfw(tmp_path / "lfw", people=("Ann_Lee", "Bo_Ray", "Cy_Dee"))
    out = tmp_path / "on_lfw"
    dualtask.run(tiny_config(out, epochs=1, face_data=str(lfw)))
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(common.UsageError, match=r"face_crop: 'boxes' -> 'none'.*--face_crop='boxes'"):
        dualtask.run(tiny_config(out, epochs=1, face_data=str(lfw), face_crop="none"))
    assert (out / "checkpoint.pt").read_bytes() == before
    # a run written with lfw_crop, face_crop's forerunner, is read by it: True is 'boxes', False 'none'
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    del state["config"]["face_crop"]
    for lfw_crop, same in ((True, "boxes"), (False, "none")):
        state["config"]["lfw_crop"] = lfw_crop
        torch.save(state, out / "checkpoint.pt")
        other = "none" if same == "boxes" else "boxes"
        with pytest.raises(common.UsageError, match=rf"face_crop: '{same}' -> '{other}'.*--face_crop='{same}'"):
            dualtask.run(tiny_config(out, epochs=1, face_data=str(lfw), face_crop=other))
        dualtask.run(tiny_config(out, epochs=1, face_data=str(lfw), face_crop=same))  # finished: nothing to train
    # a run trained before either setting existed was trained on whole frames: it is used as such, or refused
    del state["config"]["lfw_crop"]
    torch.save(state, out / "checkpoint.pt")
    with pytest.raises(common.UsageError, match=r"face_crop: 'none' -> 'boxes'.*--face_crop='none'"):
        dualtask.run(tiny_config(out, epochs=1, face_data=str(lfw)))
    dualtask.run(tiny_config(out, epochs=1, face_data=str(lfw), face_crop="none"))
    demo = tmp_path / "demo"
    dualtask.run(tiny_config(demo, epochs=1))
    dualtask.run(tiny_config(demo, epochs=1, face_crop="detect"))  # no face photographs: the setting changes nothing


# ----------------------------------------------------------------------------------------------------------
# label kinds, task_view and the cache


def tiny(label_kind="identity", extra=True):
    labels = np.array([0, 1, 0, 1, 0, 1], np.int64)
    expr = np.array([0, 0, 1, 1, 2, 2], np.int64)
    return TaskData("src", ["a", "b"], np.zeros((6, 4, 4, 3), np.uint8), labels, np.array([0, 0, 1, 1, 2, 2], np.int8),
                    "tiny", {"expression": expr} if extra else {}, 4, label_kind,
                    {"expression": ["x", "y", "z"]} if extra else {})


def test_label_kind_for_task():
    for task in ("identity", "face", "faces", "id"):
        assert vggface2.label_kind_for_task(task) == "identity"
    for task in ("expression", "expressions", "emotion", "emotions"):
        assert vggface2.label_kind_for_task(task) == "expression"
    assert vggface2.label_kind_for_task("object") is None


def test_task_view_semantics():
    data = tiny()
    assert task_view(data, "object") is data and data.name == "object"  # no kind asked: the data itself
    assert task_view(data, "face") is data and data.name == "face"  # the kind it already has
    view = task_view(data, "emotion")
    assert view is not data and view.name == "emotion"
    assert view.images is data.images and view.split is data.split  # shared, not copied
    assert view.classes == ["x", "y", "z"] and view.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert view.extra["identity"] is data.labels and view.extra_classes == {"identity": ["a", "b"]}
    assert "expression" not in view.extra and view.label_kind == "expression"
    assert task_view(view, "id").labels.tolist() == data.labels.tolist()  # and back again


@pytest.mark.parametrize("data, task, has", [
    (tiny(extra=False), "expression", "only identity labels"),
    (tiny("expression", extra=False), "face", "only expression labels"),
    (tiny("", extra=False), "identity", "labels of unknown kind"),
])
def test_task_view_refuses_a_missing_label_kind(data, task, has):
    with pytest.raises(DataError, match=rf"task {task}: wants \w+ labels, but tiny has {has}"):
        task_view(data, task)


def test_demo_label_kinds():
    faces = demo.make_demo("faces", n_classes=3, per_class=4, image_size=16)
    assert faces.label_kind == "identity" and faces.extra_classes == {"expression": list(demo.DEMO_EXPRESSIONS)}
    assert task_view(faces, "expression").images is faces.images
    assert demo.make_demo("expression", n_classes=4, per_class=3, image_size=16).label_kind == "expression"
    assert demo.make_demo("objects", n_classes=3, per_class=3, image_size=16).label_kind == ""
    assert load_task("demo", "emotion", 16, max_per_class=3).source == "demo:expression"


def test_cache_round_trip_keeps_label_kind_and_extra_classes(tmp_path):
    data = load_task(str(make_kdef(tmp_path / "KDEF", people=("F01", "F02", "M01"))), "face", 12)
    data.save(tmp_path / "cache")
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["label_kind"] == "identity" and meta["extra_classes"]["expression"][0] == "afraid"
    again = taskdata.load_cache(tmp_path / "cache")
    assert again.label_kind == "identity" and again.extra_classes == data.extra_classes
    assert np.array_equal(again.extra["expression"], data.extra["expression"])
    capped = load_task(str(tmp_path / "cache"), "face", 12, max_per_class=6)  # caps keep them too
    assert capped.label_kind == "identity" and capped.extra_classes == data.extra_classes
    # a cache written before these fields still loads, with the defaults
    for key in ("label_kind", "extra_classes"):
        del meta[key]
    (tmp_path / "cache" / "meta.json").write_text(json.dumps(meta))
    old = taskdata.load_cache(tmp_path / "cache")
    assert old.label_kind == "" and old.extra_classes == {}


def test_damaged_extra_classes_in_a_cache_are_refused(tmp_path):
    tiny().save(tmp_path / "cache")
    meta_path = tmp_path / "cache" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["extra_classes"] = {"expression": ["x", "y"]}  # label 2 would name no class
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "cache")) + r": extra_expression.npy is not "
                       r"integer labels within 0..1"):
        taskdata.load_cache(tmp_path / "cache")


def test_controls_carry_label_kinds():
    faces = demo.make_demo("faces", n_classes=3, per_class=6, image_size=32)
    objects = demo.make_demo("objects", n_classes=3, per_class=6, image_size=32)
    matched, size = vggface2.match_resolution({"face": faces, "object": objects}, size=8)
    assert size == 8 and matched["face"].label_kind == "identity"
    assert matched["face"].extra_classes == faces.extra_classes and matched["face"].extra.keys() == {"expression"}
    pseudo = vggface2.pseudo_tasks({"face": faces, "object": objects}, seed=0)
    assert all(d.label_kind == "" for d in pseudo.values())


def test_missing_csv_is_refused_with_its_path(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope.csv")) + " does not exist"):
        load_task(str(tmp_path / "nope.csv"), "expression", 16)
