"""face_crop: how face photographs are cropped (boxes, detect, align, none). Alignment on a drawn VGGFace2 fixture
whose five points are known, OpenCV's detector on a few real LFW photographs (skipped without ../shared/data),
the cache's record of the crop, and bad values. Each test builds its own tiny fixture in tmp_path."""
import json
import math

import numpy as np
import pytest
from conftest import SHARED_DATA, write_jpeg
from helpers import make_class_folders, make_lfw, make_vggface2_tree

import vggface2
from dualtask.data import images as image_io
from dualtask.data import loading, taskdata
from dualtask.data.loading import load_task
from dualtask.data.taskdata import DataError

SIZE = 112
# the five points' colours (VGGFace2's order: left eye, right eye, nose, mouth left, mouth right)
DOT_COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255]])
# each photograph: ArcFace's template under a rotation (degrees), a scale and a shift; scales above and below
# the output's, so alignment both shrinks and enlarges
POSES = [(0, 1.0, (20, 30)), (25, 2.2, (90, 10)), (-30, 0.8, (60, 70)), (12, 3.0, (40, 5))]


def posed_points(angle, scale, shift):
    a = math.radians(angle)
    rotation = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return image_io.ARCFACE_TEMPLATE @ rotation.T * scale + np.asarray(shift, float)


def draw_face(points, radius, shape=(420, 420)):
    """A grey photograph with a coloured dot at each of the five points."""
    img = np.full((*shape, 3), 128, np.uint8)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    for (x, y), colour in zip(points, DOT_COLOURS):
        img[(xx - x) ** 2 + (yy - y) ** 2 <= radius ** 2] = colour
    return img


def make_landmark_tree(root, identities=2, lacking=()):
    """VGGFace2's layout: each identity's photographs drawn in POSES, with bb_landmark/loose_landmark_train.csv
    (the drawn points) and loose_bb_train.csv (a box around them); the NAME_IDs in `lacking` get no landmark row."""
    boxes, marks = ["NAME_ID,X,Y,W,H"], ["NAME_ID,P1X,P1Y,P2X,P2Y,P3X,P3Y,P4X,P4Y,P5X,P5Y"]
    for i in range(identities):
        for j, pose in enumerate(POSES):
            name = f"n{i + 1:06d}/{j + 1:04d}_01"
            points = posed_points(*pose)
            write_jpeg(root / "train" / f"{name}.jpg", draw_face(points, radius=4 * pose[1]))  # 3 px once aligned
            (x0, y0), (x1, y1) = points.min(0), points.max(0)
            boxes.append(f"{name},{x0:.1f},{y0:.1f},{x1 - x0:.1f},{y1 - y0:.1f}")
            if name not in lacking:
                marks.append(name + "," + ",".join(f"{v:.2f}" for v in points.ravel()))
    (root / "bb_landmark").mkdir(parents=True)
    (root / "bb_landmark" / "loose_bb_train.csv").write_text("\n".join(boxes) + "\n")
    (root / "bb_landmark" / "loose_landmark_train.csv").write_text("\n".join(marks) + "\n")
    return root


def dot_centre(img, colour):
    """The centroid (x, y) of the pixels of one dot's colour, or None when there are none."""
    x = img.astype(int)
    near = (np.abs(x - colour).max(-1) < 90) & (np.abs(x - 128).max(-1) > 60)
    ys, xs = np.nonzero(near)
    return (xs.mean(), ys.mean()) if len(xs) else None


def test_align_puts_the_five_points_on_the_template(tmp_path, capsys):
    root = make_landmark_tree(tmp_path / "vgf2", lacking=("n000002/0004_01",))
    data = load_task(str(root), "face", SIZE, face_crop="align")
    assert data.face_crop == "align" and data.images.shape == (8, SIZE, SIZE, 3)
    template = image_io.face_template(SIZE)
    for k, img in enumerate(data.images):
        if k == 7:  # no landmark row: cropped to its box instead, so the points are not on the template
            continue
        for point, colour, where in zip(template, DOT_COLOURS, ("left eye", "right eye", "nose", "mouth left",
                                                                  "mouth right")):
            found = dot_centre(img, colour)
            assert found is not None, (k, where)
            error = math.dist(found, point)
            assert error < (2 if "eye" in where else 3), (k, where, found, point)
    err = capsys.readouterr().err
    assert "1 of 8 image(s) have no usable row in loose_landmark_train.csv (first: n000002/0004_01)" in err
    assert "1 of them are cropped to their box" in err
    # the template is ArcFace's, its 112-px frame enlarged by the boxes' 30% margin
    assert abs(template[:, 0].mean() - SIZE / 2) < 1 and 25 < template[1, 0] - template[0, 0] < 29


def test_align_refuses_a_source_without_landmarks(tmp_path):
    vgf2 = make_vggface2_tree(tmp_path / "vgf2")
    with pytest.raises(DataError, match=r"face_crop='align'.*loose_landmark_train.csv"):
        load_task(str(vgf2), "face", 32, face_crop="align")
    lfw = make_lfw(tmp_path / "lfw")
    with pytest.raises(DataError, match=r"face_crop='align'.*no facial landmarks"):
        load_task(str(lfw), "face", 32, face_crop="align")
    objects = make_class_folders(tmp_path / "objects")
    assert load_task(str(objects), "object", 16, face_crop="align").face_crop is None  # not faces: left alone


def test_align_falls_back_when_no_similarity_fits():
    img = draw_face(posed_points(*POSES[0]), radius=4)
    assert image_io.align_face(img, [float("nan")] * 10, SIZE) is None
    assert image_io.align_face(img, [50.0, 50.0] * 5, SIZE) is None  # five points on one spot


def test_none_and_detect_need_no_box_file(tmp_path, capsys):
    root = make_vggface2_tree(tmp_path / "vgf2", with_boxes=False)
    whole = load_task(str(root), "face", 24, face_crop="none")
    assert whole.face_crop == "none" and whole.native_size == 100  # the whole 120 x 100 photographs
    detected = load_task(str(root), "face", 24, face_crop="detect")  # drawn squares: no face found
    assert detected.source.startswith("vggface2:") and np.array_equal(detected.images, whole.images)
    assert "no face found in 18 of 18 image(s)" in capsys.readouterr().err


def test_detect_leaves_object_folders_alone_and_counts_faceless_photographs(tmp_path, capsys):
    root = make_class_folders(tmp_path / "folders", per_class=4)
    objects = load_task(str(root), "object", 16, face_crop="detect")
    assert objects.face_crop is None and objects.source.startswith("folder:")
    assert "no face" not in capsys.readouterr().err
    faces = load_task(str(root), "face", 16, face_crop="detect")
    assert faces.face_crop == "detect" and faces.source.startswith("face-detected folder:")
    assert "warning: no face found in 12 of 12 image(s)" in capsys.readouterr().err
    assert loading.face_crop_applies(str(root), "face") and not loading.face_crop_applies(str(root), "object")


@pytest.mark.skipif(not (SHARED_DATA / "lfw_min20").is_dir(), reason="shared LFW sample not present")
def test_detect_finds_the_faces_of_real_photographs():
    root = SHARED_DATA / "lfw_min20"
    people = sorted(d for d in root.iterdir() if d.is_dir())[:6]
    paths = [p for d in people for p in sorted(d.glob("*.jpg"))[:2]]
    boxes = [image_io.detect_face(image_io.decode_image(p)) for p in paths]
    assert sum(b is not None for b in boxes) >= len(paths) - 1
    for x, y, w, h in (b for b in boxes if b is not None):  # LFW's frames: a face of about 110 px in the middle
        assert 70 < w < 170 and abs(x + w / 2 - 125) < 35 and abs(y + h / 2 - 125) < 40
    data = load_task(str(root), "face", 32, max_classes=2, max_per_class=4, face_crop="detect")
    assert data.face_crop == "detect" and data.source.startswith("face-detected folder:")
    assert 100 < data.native_size < 200  # the face's enlarged box, not the 250-px frame


def test_the_cache_records_its_face_crop_and_an_older_cache_loads_as_boxes(tmp_path, capsys):
    root = make_vggface2_tree(tmp_path / "vgf2")
    out = tmp_path / "cache"
    assert vggface2.main([f"--root={root}", f"--out={out}", "--image_size=16", "--face_crop=none"]) == 0
    assert "face_crop=none" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["face_crop"] == "none" and taskdata.load_cache(out).face_crop == "none"
    load_task(str(out), "face", 16, face_crop="detect")  # a cache is never cropped again: said so
    assert "cache written with face_crop='none'" in capsys.readouterr().err
    load_task(str(out), "object", 16, face_crop="detect")  # ... to a face task only
    assert "face_crop" not in capsys.readouterr().err
    del meta["face_crop"]  # as caches were written before the setting
    (out / "meta.json").write_text(json.dumps(meta))
    assert taskdata.load_cache(out).face_crop == "boxes"
    meta["face_crop"] = "mtcnn"
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"'face_crop' is 'mtcnn'"):
        taskdata.load_cache(out)


@pytest.mark.parametrize("args, culprit", [(["--face_crop=mtcnn"], "--face_crop=mtcnn: expected one of boxes, "
                                                                    "detect, align, none"),
                                           (["--lfw_crop=False"], "--face_crop=none for False")])
def test_bad_face_crop_of_the_cache_writer_exits_2(tmp_path, capsys, args, culprit):
    root = make_vggface2_tree(tmp_path / "vgf2")
    assert vggface2.main([f"--root={root}", f"--out={tmp_path / 'cache'}", *args]) == 2
    err = capsys.readouterr().err
    assert culprit in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cache").exists()


def test_bad_face_crop_of_load_task(tmp_path):
    with pytest.raises(DataError, match=r"face_crop='Detect': expected one of 'boxes', 'detect', 'align', 'none'"):
        load_task("demo", "face", 16, face_crop="Detect")
