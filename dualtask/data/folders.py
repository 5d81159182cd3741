"""A folder with one subfolder per class (train/ and test/ subfolders kept when present), and what is told
apart inside such trees: FER2013's class folders with its own test split, and LFW's photographs, cropped to the
face (LFW_FACE_BOX).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from dualtask.data.images import DETECT, read_many
from dualtask.data.taskdata import (
    IMAGE_EXTENSIONS,
    DataError,
    TaskData,
    choose_images,
    drop_untrainable,
    few,
    list_images,
    official_split_caps,
    presplit_caps,
    printable,
    split_off_val,
    stratified_split,
    warn_data,
)

# LFW's photographs are 250 x 250 frames with the face in the middle, about 110 px of it. The face box is LFWcrop's
# fixed box (Sanderson & Lovell 2009: corners (83, 92) and (166, 175), found from 40 hand-marked LFW faces), as a
# fraction of the frame, enlarged by VGGFACE2_BOX_MARGIN as VGGFace2's boxes are: a tight crop, brow to chin with
# little hair or background (tighter than VGGFace2's loose crops), rather than a 28-px face in a 64-px frame
LFW_FRAME = 250
LFW_FACE_BOX = (83 / LFW_FRAME, 92 / LFW_FRAME, 83 / LFW_FRAME, 83 / LFW_FRAME)  # x, y, w, h as fractions


# ----------------------------------------------------------------------------------------------------------
# class folders


def _class_folders(root: Path, what: str):
    """({class name: folder}, {class name: image files}) of the class folders holding images."""
    dirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    folders = {printable(d.name): d for d in dirs}
    if len(folders) < len(dirs):
        raise DataError(f"{what}: two class folders in {root} read as the same name once their non-UTF-8 bytes are "
                        f"written as \\xNN; rename one of them")
    renamed = [name for name, d in folders.items() if name != d.name]
    if renamed:
        warn_data(f"{what}: {len(renamed)} class folder name(s) are not UTF-8 and are shown as {few(renamed)}")
    files = {c: list_images(d) for c, d in folders.items()}
    classes = sorted(c for c in folders if files[c])
    if not classes:
        raise DataError(f"{what}: {root} holds no class folders with images; expected one subfolder per class, "
                        f"each with image files ({', '.join(IMAGE_EXTENSIONS[:3])}, ...)")
    return classes, files


FER_TEST_PREFIXES = {"PublicTest_": 1, "PrivateTest_": 2}  # FER2013's test-file prefixes -> val / test


def _is_fer_test_folder(files: dict, folder: Path) -> bool:
    """True when every image in the test/ class folders carries FER2013's PublicTest_ or PrivateTest_ prefix,
    both occurring: FER2013's own validation (public) and test (private) sets, as the Kaggle images come.
    A test/ where only some names carry them keeps the ordinary rule (all test), with a warning."""
    names = [p.name for paths in files.values() for p in paths]
    marked = [n for n in names if n.startswith(tuple(FER_TEST_PREFIXES))]
    if marked and len(marked) < len(names):
        warn_data(f"{folder}: {len(marked)} of {len(names)} images carry FER2013's PublicTest_/PrivateTest_ prefix, "
              f"the rest do not, so FER2013's split is not used: all of test/ is test and validation images are "
              f"taken from train/")
        return False
    return bool(names) and all(any(n.startswith(p) for n in names) for p in FER_TEST_PREFIXES)


_LFW_NAME = re.compile(r"^(.+)_(\d{4})\.jpe?g$", re.IGNORECASE)


def is_lfw_root(root: Path, look: int = 20) -> bool:
    """True when `root` (or its train/) holds LFW's layout: class folders named after people whose images are
    named <folder>_NNNN.jpg (Aaron_Peirsol/Aaron_Peirsol_0001.jpg), for most of the first `look` folders, and
    the first such image is LFW's 250 x 250 frame (aligned or cropped copies that keep LFW's names are not)."""
    from PIL import Image

    root = Path(root)
    base = root / "train" if (root / "train").is_dir() else root
    try:
        folders = sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))[:look]
        checked, named = 0, []
        for d in folders:
            for f in sorted(os.scandir(d), key=lambda e: e.name)[:5]:
                if f.is_file() and Path(f.name).suffix.lower() in IMAGE_EXTENSIONS:
                    checked += 1
                    m = _LFW_NAME.match(f.name)
                    if m and m.group(1) == d.name:
                        named.append(f.path)
        if not checked or len(named) <= checked / 2:
            return False
        with Image.open(named[0]) as im:
            return im.size == (LFW_FRAME, LFW_FRAME)
    except Exception:  # a folder or image that cannot be read: not recognisably LFW
        return False


def _pool_files(files: dict, classes: list) -> tuple[list, np.ndarray]:
    """(image files, class indices) of one pool's class folders, class by class in the order of `classes`."""
    paths, labels = [], []
    for ci, c in enumerate(classes):
        paths += files.get(c, [])
        labels += [ci] * len(files.get(c, []))
    return paths, np.array(labels, dtype=np.int64)


def _fer_test_choice(paths: list, labels: np.ndarray, cap_val, cap_test, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(each file's official set, 1 val or 2 test, from its name; the indices kept) of FER2013's test/ folder:
    each official set is capped on its own."""
    official = np.array([next(s for p, s in FER_TEST_PREFIXES.items() if f.name.startswith(p))
                         for f in paths], dtype=np.int8)
    idx = np.sort(np.concatenate([np.flatnonzero(official == s)[choose_images(labels[official == s], cap, None,
                                                                        seed)[0]]
                                  for s, cap in ((1, cap_val), (2, cap_test))]))
    return official, idx


def load_folder(root, image_size: int, max_per_class=None, max_classes=None, seed: int = 0,
                crop=None) -> TaskData:
    """A folder with one subfolder per class, or with train/ and test/ each holding the class subfolders.

    Without train/ + test/: a seeded stratified split of each class. With them: test/ is the test set and
    validation images are split off train/ -- except for FER2013's class folders (every test/ image named
    PublicTest_* or PrivateTest_*), which keep FER2013's official split: train/ all train, PublicTest_* val,
    PrivateTest_* test, so results compare with published FER2013 numbers; that data is labelled by expression
    (label_kind "expression"), any other folder's labels are of unknown kind ("").
    crop: how every image is cropped before resizing (images.read_image): a FractionBox (enlarged by
    VGGFACE2_BOX_MARGIN), DETECT (the face OpenCV's detector finds), or None, the whole images.
    """
    root = Path(root)
    presplit = (root / "train").is_dir() and (root / "test").is_dir()
    pools = {"train": root / "train", "test": root / "test"} if presplit else {"all": root}
    listed = {name: _class_folders(folder, str(folder)) for name, folder in pools.items()}
    classes = sorted(set().union(*(set(c) for c, _ in listed.values())))
    if max_classes is not None:
        classes = classes[:max_classes]
    if len(classes) < 2:
        raise DataError(f"{root}: found {len(classes)} class folder(s) with images; a classification task needs "
                        f"at least 2 (one subfolder per class)")
    fer = presplit and _is_fer_test_folder(listed["test"][1], root / "test")
    if fer:
        cap_train, cap_val, cap_test = official_split_caps(max_per_class)
    else:
        cap_train, cap_test = presplit_caps(max_per_class) if presplit else (max_per_class, None)
    parts, natives = [], []
    for pool, (_, files) in listed.items():
        paths, labels = _pool_files(files, classes)
        if fer and pool == "test":
            official, idx = _fer_test_choice(paths, labels, cap_val, cap_test, seed)
        else:
            idx, _ = choose_images(labels, cap_test if pool == "test" else cap_train, None, seed)
        images, ok, native = read_many([paths[i] for i in idx], image_size,
                                        None if crop is None else [crop] * len(idx), what=str(pools[pool]))
        natives += [native] * len(images)
        labels = labels[idx][ok]
        if pool == "all":
            split = stratified_split(labels, seed, classes=classes)
        elif pool == "train":
            split = np.zeros(len(labels), np.int8) if fer else split_off_val(labels, seed, classes=classes)
        else:
            split = official[idx][ok] if fer else np.full(len(labels), 2, dtype=np.int8)
        parts.append((images, labels, split))
    images, labels, split = (np.concatenate(p) for p in zip(*parts))
    if len(images) == 0:
        raise DataError(f"{root}: no readable images")
    native = int(np.median([n for n in natives if n])) if any(natives) else None
    kind = ("fer2013" if fer else "folder" if crop is None else "face-detected folder" if crop == DETECT
            else "face-cropped folder")
    data = TaskData("", classes, images, labels, split, source=f"{kind}:{root}",
                    native_size=native, label_kind="expression" if fer else "")
    return drop_untrainable(data, str(root))
