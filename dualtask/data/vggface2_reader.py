"""VGGFace2's train/ identities (train/nXXXXXX/NNNN_NN.jpg), each identity's images split into train / val /
test, the faces cropped by its loose boxes or aligned on its five landmarks (bb_landmark/*.csv), or as the
face_crop setting says otherwise."""
from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np

from dualtask.data.images import DETECT, Landmarks, read_many
from dualtask.data.taskdata import DataError, TaskData, drop_untrainable, list_images, stratified_split, warn_data

_IDENTITY = re.compile(r"^n\d{6}$")


def is_vggface2_root(root: Path) -> bool:
    train = root / "train"
    if (root / "bb_landmark").is_dir():
        return True
    return train.is_dir() and any(_IDENTITY.match(d.name) for d in train.iterdir() if d.is_dir())


_BOX_FORM = "expected a CSV with header NAME_ID,X,Y,W,H and rows like n000002/0001_01,60,60,79,109"
LANDMARK_COLUMNS = ("P1X", "P1Y", "P2X", "P2Y", "P3X", "P3Y", "P4X", "P4Y", "P5X", "P5Y")
_LANDMARK_FORM = ("expected a CSV with header NAME_ID,P1X,P1Y,...,P5X,P5Y (left eye, right eye, nose, mouth left, "
                  "mouth right) and rows like n000002/0001_01,75.8,111.0,113.0,109.5,93.5,135.6,79.4,157.4,111.7,155.9")


def _read_rows(csv_path: Path, columns, form: str, what: str, usable=None) -> dict:
    """{NAME_ID: the row's numbers} of one of VGGFace2's CSV files (header NAME_ID followed by `columns`); None
    for a row whose numbers are not all finite or fail `usable`, whose image is then cropped otherwise."""
    rows, duplicates = {}, []
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a byte-order mark is accepted
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            if header[:len(columns) + 1] != ["NAME_ID", *columns]:
                raise DataError(f"{csv_path}: header is {','.join(header)}; {form}")
            for row in reader:
                if not any(v.strip() for v in row):
                    continue
                try:
                    values = tuple(float(v) for v in row[1:len(columns) + 1])
                    if len(values) < len(columns):
                        raise ValueError
                except ValueError:
                    raise DataError(f"{csv_path}: line {reader.line_num} reads {','.join(row)!r:.80}; "
                                    f"{','.join(columns)} must be {len(columns)} numbers; {form}") from None
                name = row[0].strip()
                # a NAME_ID twice comes from a file edited or appended to, not from VGGFace2 (one row per
                # image): the first row is kept and the rest counted, rather than refusing millions of good rows
                if name in rows:
                    duplicates.append(name)
                    continue
                ok = all(math.isfinite(v) for v in values) and (usable is None or usable(values))
                rows[name] = values if ok else None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: cannot read the {what} ({e}); {form}") from None
    if duplicates:
        warn_data(f"{csv_path}: {len(duplicates)} row(s) repeat an earlier NAME_ID (first: {duplicates[0]}); each "
              f"image uses its first row")
    return rows


def _read_boxes(csv_path: Path) -> dict:
    """{NAME_ID: (x, y, w, h)} of VGGFace2's box file; None for a box of zero or negative size or not a
    number, whose image is then used uncropped."""
    return _read_rows(csv_path, ("X", "Y", "W", "H"), _BOX_FORM, "bounding boxes", lambda v: v[2] > 0 and v[3] > 0)


def _read_landmarks(csv_path: Path) -> dict:
    """{NAME_ID: (x1, y1, ..., x5, y5)} of VGGFace2's landmark file; None for a row that is not all numbers."""
    return _read_rows(csv_path, LANDMARK_COLUMNS, _LANDMARK_FORM, "landmarks")


def _sample_identities(root: Path, identities, per_identity, seed: int) -> tuple[list, list, list, list]:
    """(identity names, image paths, labels, NAME_IDs) of the first `identities` identity folders of train/ that
    hold images, each with a seeded sample of at most `per_identity` of its images."""
    folders = sorted(d for d in (root / "train").iterdir() if d.is_dir() and _IDENTITY.match(d.name))
    files = {d.name: list_images(d) for d in folders}
    names = [n for n in files if files[n]]
    if identities is not None:
        names = names[:identities]
    if len(names) < 2:
        raise DataError(f"{root / 'train'}: found {len(names)} identity folder(s) with images; need at least 2")
    paths, labels, keys = [], [], []
    rng = np.random.default_rng(seed)
    for ci, name in enumerate(names):
        chosen = files[name]
        if per_identity is not None and len(chosen) > per_identity:
            chosen = [chosen[i] for i in sorted(rng.choice(len(chosen), per_identity, replace=False))]
        for p in chosen:
            paths.append(p)
            labels.append(ci)
            keys.append(f"{name}/{p.stem}")
    return names, paths, labels, keys


def _face_crops(face_crop: str, keys: list, boxes: dict, boxes_csv: Path, landmarks_csv: Path):
    """The crop of each image (`read_many`'s crops) that `face_crop` asks for, with a warning for the images that
    cannot be cropped so: their box (boxes), their landmarks, else their box (align), the detector's face
    (detect); None (whole images) for "none"."""
    if face_crop == "boxes":
        n_nobox = sum(k not in boxes for k in keys)
        if n_nobox:
            warn_data(f"{n_nobox} image(s) have no row in {boxes_csv.name}; used uncropped")
        unusable = [k for k in keys if k in boxes and boxes[k] is None]
        if unusable:
            warn_data(f"{len(unusable)} box(es) in {boxes_csv.name} have zero or negative size or are not numbers "
                  f"(first: {unusable[0]}); those images are used uncropped")
        return [boxes.get(k) for k in keys]
    if face_crop == "align":
        landmarks = _read_landmarks(landmarks_csv)
        lacking = [k for k in keys if landmarks.get(k) is None]
        if lacking:
            boxed = sum(boxes.get(k) is not None for k in lacking)
            warn_data(f"{len(lacking)} of {len(keys)} image(s) have no usable row in {landmarks_csv.name} (first: "
                      f"{lacking[0]}); {boxed} of them are cropped to their box in {boxes_csv.name}, "
                      f"{len(lacking) - boxed} used whole")
        return [Landmarks(landmarks[k], boxes.get(k)) if landmarks.get(k) is not None else boxes.get(k)
                for k in keys]
    return [DETECT] * len(keys) if face_crop == "detect" else None


def load_vggface2(root, image_size: int, identities=None, per_identity=None, seed: int = 0,
                  face_crop: str = "boxes") -> TaskData:
    """VGGFace2's train/ identities, each identity's images split into train / val / test.

    Faces are cropped as `face_crop` says, then resized: "boxes", around `bb_landmark/loose_bb_train.csv`'s box
    enlarged by 30% (clipped to the image); "detect", around the largest face OpenCV's detector finds, enlarged
    likewise; "align", aligned on the five points of `bb_landmark/loose_landmark_train.csv` (`align_face`);
    "none", whole. VGGFace2's test/ holds other people, so it cannot serve identity classification. Images
    cropped otherwise than asked are counted in a warning: without a usable box (no row, zero or negative size,
    entirely outside the image) they are used uncropped; without usable landmarks they are cropped to their box
    (whole without one); with no face found, whole.
    """
    root = Path(root)
    boxes_csv = root / "bb_landmark" / "loose_bb_train.csv"
    landmarks_csv = root / "bb_landmark" / "loose_landmark_train.csv"
    layout = "VGGFace2's layout train/nXXXXXX/NNNN_NN.jpg with bb_landmark/loose_bb_train.csv (NAME_ID,X,Y,W,H)"
    if face_crop == "boxes" and not boxes_csv.exists():
        raise DataError(f"{root}: no bounding-box file {boxes_csv.relative_to(root)}; expected {layout} (or "
                        f"face_crop='detect' or 'none', which need no boxes)")
    if face_crop == "align" and not landmarks_csv.exists():
        raise DataError(f"face_crop='align': {root} has no landmark file {landmarks_csv.relative_to(root)}; "
                        f"{_LANDMARK_FORM}; or use face_crop='boxes' or 'detect'")
    if not (root / "train").is_dir():
        raise DataError(f"{root}: no train/ folder; expected {layout}")
    use_boxes = face_crop == "boxes" or (face_crop == "align" and boxes_csv.exists())
    boxes = _read_boxes(boxes_csv) if use_boxes else {}
    names, paths, labels, keys = _sample_identities(root, identities, per_identity, seed)
    crops = _face_crops(face_crop, keys, boxes, boxes_csv, landmarks_csv)
    images, ok, native = read_many(paths, image_size, crops, what=str(root / "train"))
    labels = np.asarray(labels, dtype=np.int64)[ok]
    data = TaskData("", names, images, labels, stratified_split(labels, seed, classes=names), f"vggface2:{root}",
                    native_size=native, label_kind="identity", face_crop=face_crop)
    return drop_untrainable(data, str(root / "train"))
