"""FER2013 as its original CSV (emotion, pixels, Usage), with its own train / val / test split."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from dualtask.data.taskdata import (
    SPLITS,
    DataError,
    TaskData,
    choose_images,
    drop_untrainable,
    official_split_caps,
    warn_data,
)

# ----------------------------------------------------------------------------------------------------------
# FER2013 as its original CSV


FER2013_CSV = "fer2013.csv"  # the file's name in the Kaggle archive (fer2013/fer2013.csv)
FER2013_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # emotion 0..6
FER2013_USAGE = {"Training": 0, "PublicTest": 1, "PrivateTest": 2}  # FER2013's own train / val / test
FER2013_SIZE = 48
_FER_FORM = ("expected FER2013's CSV: the header emotion,pixels,Usage, then one row per image with emotion a "
             "whole number 0-6 (angry, disgust, fear, happy, sad, surprise, neutral), pixels 2304 space-separated "
             "grey values 0-255 (48 x 48, row by row) and Usage Training, PublicTest or PrivateTest")


def _fer_row(path: Path, line: int, row: list, column: dict) -> tuple[np.ndarray, int, int]:
    """One CSV row as (its 48 x 48 grey image, its emotion, its official set 0/1/2); a row not in FER2013's
    form is refused with its line number."""
    n_pixels = FER2013_SIZE * FER2013_SIZE
    if len(row) != 3:
        raise DataError(f"{path}: line {line}: {len(row)} fields, not 3; {_FER_FORM}")
    emotion, pixels, usage = (row[column[k]].strip() for k in ("emotion", "pixels", "Usage"))
    if emotion not in {str(k) for k in range(len(FER2013_CLASSES))}:
        raise DataError(f"{path}: line {line}: emotion {emotion!r:.20} is not a whole number 0-6; "
                        f"{_FER_FORM}")
    if usage not in FER2013_USAGE:
        raise DataError(f"{path}: line {line}: Usage {usage!r:.30} is not Training, PublicTest or "
                        f"PrivateTest; {_FER_FORM}")
    values = pixels.split()
    if len(values) != n_pixels:
        raise DataError(f"{path}: line {line}: {len(values)} pixel values, not {n_pixels} "
                        f"({FER2013_SIZE} x {FER2013_SIZE}); {_FER_FORM}")
    try:
        a = np.array(values, dtype=np.int64)
    except ValueError:
        raise DataError(f"{path}: line {line}: the pixels are not all whole numbers; "
                        f"{_FER_FORM}") from None
    if a.min() < 0 or a.max() > 255:
        raise DataError(f"{path}: line {line}: pixel values span {a.min()}..{a.max()}, not 0..255; "
                        f"{_FER_FORM}")
    return a.astype(np.uint8).reshape(FER2013_SIZE, FER2013_SIZE), int(emotion), FER2013_USAGE[usage]


def _read_fer_csv(path: Path) -> tuple[list, list, list]:
    """(grey images, emotions, official sets) of every non-blank row of the CSV, in file order."""
    grey, labels, split = [], [], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a byte-order mark is accepted
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            if sorted(header) != sorted(["emotion", "pixels", "Usage"]):
                raise DataError(f"{path}: line 1: the header is {','.join(header)!r:.80}; {_FER_FORM}")
            column = {h: i for i, h in enumerate(header)}
            for row in reader:
                if not any(v.strip() for v in row):
                    continue
                image, emotion, usage = _fer_row(path, reader.line_num, row, column)
                grey.append(image)
                labels.append(emotion)
                split.append(usage)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read it as a CSV file ({e}); {_FER_FORM}") from None
    return grey, labels, split


def load_fer2013_csv(path, max_per_class=None, max_classes=None, seed: int = 0) -> TaskData:
    """FER2013 from its original CSV (fer2013.csv: emotion,pixels,Usage), at its own 48 x 48 pixels.

    FER2013's own split is kept, so results compare with published ones: Usage Training -> train, PublicTest ->
    val, PrivateTest -> test. The grey images become RGB (the grey value in all three channels), labelled by
    expression (label_kind "expression", classes in emotion order 0..6). max_classes keeps the first classes in
    that order; max_per_class caps each class's images, divided among the three sets as `_official_split_caps`
    says. The columns may come in any order (some copies write emotion,Usage,pixels). Any row that is not as
    described is refused with its line number rather than skipped: such a file is damaged or another format,
    and dropping rows would change the benchmark silently.
    """
    path = Path(path)
    grey, labels, split = _read_fer_csv(path)
    if not grey:
        raise DataError(f"{path}: no image rows; {_FER_FORM}")
    labels, split = np.array(labels, dtype=np.int64), np.array(split, dtype=np.int8)
    missing = [u for u, s in FER2013_USAGE.items() if not (split == s).any()]
    if missing:
        empty = " and ".join(SPLITS[FER2013_USAGE[u]] for u in missing)
        warn_data(f"{path}: no rows with Usage {' or '.join(missing)}, so the {empty} set is empty")
    classes = list(FER2013_CLASSES[:max_classes] if max_classes is not None else FER2013_CLASSES)
    caps = official_split_caps(max_per_class)
    keep = np.isin(labels, np.arange(len(classes)))
    chosen = []
    for s, cap in enumerate(caps):  # each official set capped on its own, so each keeps its share
        in_set = np.flatnonzero((split == s) & keep)
        chosen.append(in_set[choose_images(labels[in_set], cap, None, seed)[0]])
    idx = np.sort(np.concatenate(chosen))
    images = np.repeat(np.stack([grey[i] for i in idx])[..., None], 3, axis=3) if len(idx) else \
        np.zeros((0, FER2013_SIZE, FER2013_SIZE, 3), np.uint8)
    data = TaskData("", classes, images, labels[idx], split[idx], source=f"fer2013:{path}",
                    native_size=FER2013_SIZE, label_kind="expression")
    return drop_untrainable(data, str(path))
