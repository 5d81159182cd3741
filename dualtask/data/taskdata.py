"""The one format every data source becomes: `TaskData` (uint8 images (N, H, W, 3), int64 labels, class names,
a split per image: 0 train, 1 val, 2 test), its cache folder (images.npy, labels.npy, split.npy, meta.json,
loaded memory-mapped), and the stratified split and the caps on classes and images. The image reading, resizing
and face cropping the sources share are in images.py, `DataError` and `warn_data` in errors.py: both lie below
this module, which imports no other data module.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from dualtask.data.errors import DataError, warn_data

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
VAL_FRACTION = 0.1  # of each class's images, for sources that come without a validation split
TEST_FRACTION = 0.2  # of each class's images, for sources that come without a test split
# how face photographs are cropped (the face_crop setting): "boxes", the source's own face boxes (VGGFace2's loose
# boxes, LFW's fixed box) enlarged by VGGFACE2_BOX_MARGIN; "detect", the largest face OpenCV's detector finds,
# enlarged likewise; "align", VGGFace2's five landmarks mapped onto a fixed template; "none", the whole images
FACE_CROPS = ("boxes", "detect", "align", "none")
NORM_MEAN = NORM_STD = 0.5  # the reference study's normalisation


@dataclass
class TaskData:
    """One task's images in the project's single format."""

    name: str
    classes: list
    images: np.ndarray  # (N, H, W, 3) uint8, possibly memory-mapped
    labels: np.ndarray  # (N,) int64
    split: np.ndarray  # (N,) int8: 0 train, 1 val, 2 test
    source: str = ""
    extra: dict = field(default_factory=dict)  # further per-image arrays, e.g. the demo's expression
    native_size: int | None = None  # the source's own resolution (median shorter side, px) before any resizing
    # what `labels` are: "identity", "expression", or "" when unknown or generic (object categories, a plain
    # class-folder tree); `task_view` uses it to give each task the labels its name asks for
    label_kind: str = ""
    # class names of the label arrays in `extra`, e.g. {"expression": ["afraid", ...]}; an extra array without
    # an entry here is per-image data that is not a label (none so far)
    extra_classes: dict = field(default_factory=dict)
    # how its face photographs were cropped (one of FACE_CROPS), None for images the face_crop setting leaves alone
    # (objects, FER2013's CSV, the demo sets)
    face_crop: str | None = None

    @property
    def chance(self) -> float:
        return 1.0 / len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == SPLITS.index(split))

    def counts(self) -> dict:
        return {s: int((self.split == i).sum()) for i, s in enumerate(SPLITS)}

    def save(self, out: str | os.PathLike, overwrite: bool = False) -> None:
        """Write the cache folder atomically (written as <out>.tmp, then renamed into place).

        A non-empty `out` is replaced only with overwrite=True and only when it is a cache written by this
        module; anything else there is refused (DataError). Leftovers of a killed earlier save (<out>.tmp,
        <out>.old) are removed.
        """
        out = Path(out)
        check_out_folder(out, overwrite)
        tmp, old = beside(out)
        for leftover in (tmp, old):  # check_out made sure these are ours
            if leftover.exists():
                shutil.rmtree(leftover)
        tmp.mkdir(parents=True)
        # meta.json first: it marks a half-written <out>.tmp as this module's, so a later save may remove it
        meta = {"name": self.name, "classes": list(self.classes), "source": self.source,
                "image_size": self.image_size, "counts": self.counts(), "extra": sorted(self.extra),
                "native_size": self.native_size, "label_kind": self.label_kind,
                "extra_classes": {k: list(v) for k, v in self.extra_classes.items()}, "face_crop": self.face_crop}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        np.save(tmp / "images.npy", np.ascontiguousarray(self.images))
        np.save(tmp / "labels.npy", self.labels.astype(np.int64))
        np.save(tmp / "split.npy", self.split.astype(np.int8))
        for key, values in self.extra.items():
            np.save(tmp / f"extra_{key}.npy", values)
        if out.exists():
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)


_CACHE_FILE = re.compile(r"^(images|labels|split|extra_\w+)\.npy$|^meta\.json$")


def beside(out: Path):
    """The temporary and the replaced folder of a save into `out`."""
    return out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")


def _is_own_cache(folder: Path) -> bool:
    """True for an empty folder or one holding only this module's cache files, meta.json among them."""
    entries = list(folder.iterdir())
    if not entries:
        return True
    if any(e.is_symlink() or not e.is_file() or not _CACHE_FILE.match(e.name) for e in entries):
        return False
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "classes" in meta and "counts" in meta


def check_out_folder(out: Path, overwrite: bool = False) -> None:
    """Refuse (DataError) a cache folder whose writing would replace anything but an earlier cache of this
    module, and an earlier cache unless `overwrite`. Never deletes: it only looks."""
    out = Path(out)
    for p in (out, *beside(out)):
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            raise DataError(f"--out: {p} exists and is not a folder; choose another --out")
    if out.exists() and any(out.iterdir()):
        if not _is_own_cache(out):
            raise DataError(f"--out: {out} is not empty and is not a cache written by vggface2.py, so it is never "
                            f"replaced, even with --overwrite; choose another --out (a new or empty folder)")
        if not overwrite:
            raise DataError(f"--out: {out} already holds a cache; pass --overwrite to replace it or choose another "
                            f"--out")
    for p in beside(out):
        if p.exists() and not _is_own_cache(p):
            raise DataError(f"--out: {p} is in the way (a save writes there) and is not a cache written by "
                            f"vggface2.py; move it away or choose another --out")


# ----------------------------------------------------------------------------------------------------------
# splitting and capping


def stratified_split(labels: np.ndarray, seed: int, val_fraction=VAL_FRACTION, test_fraction=TEST_FRACTION,
                     classes=None) -> np.ndarray:
    """Deterministic split per class into train / val / test (0 / 1 / 2).

    A class of n >= 3 images gets n_test = max(1, round(n * test_fraction)) test images, then
    n_val = max(1, round(n * val_fraction)) validation images (0 where the fraction is 0), capped so that one
    training image (and one validation image when val_fraction > 0) remains. A class of 1 or 2 images stays
    all training, and a warning names such classes (`classes`: the names by label, for that warning).
    """
    rng = np.random.default_rng(seed)
    split = np.zeros(len(labels), dtype=np.int8)
    small = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = len(idx)
        if n < 3:
            small.append(classes[c] if classes is not None else f"label {c}")
            continue
        n_test = max(int(round(n * test_fraction)), 1) if test_fraction > 0 else 0
        n_val = max(int(round(n * val_fraction)), 1) if val_fraction > 0 else 0
        n_test = min(n_test, n - 1 - (n_val > 0))  # only fractions summing near 1 reach these caps
        n_val = min(n_val, n - 1 - n_test)
        split[idx[:n_test]] = 2
        split[idx[n_test:n_test + n_val]] = 1
    held_out = " or ".join(name for name, f in (("validation", val_fraction), ("test", test_fraction)) if f > 0)
    if small and held_out:
        unmeasured = " (their accuracy goes unmeasured)" if test_fraction > 0 else ""
        warn_data(f"{len(small)} class(es) have fewer than 3 images, so no {held_out} images{unmeasured}: "
              f"{few(small)}; raise max_per_class or collect more images for them")
    return split


def choose_images(labels: np.ndarray, max_per_class, max_classes, seed: int):
    """Indices kept under the caps (first `max_classes` classes; a seeded sample of `max_per_class` each)."""
    keep_classes = np.unique(labels)
    if max_classes is not None:
        keep_classes = keep_classes[:max_classes]
    rng = np.random.default_rng(seed)
    chosen = []
    for c in keep_classes:
        idx = np.flatnonzero(labels == c)
        if max_per_class is not None and len(idx) > max_per_class:
            idx = np.sort(rng.choice(idx, max_per_class, replace=False))
        chosen.append(idx)
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64), keep_classes


def cap_classes(data: TaskData, max_per_class, max_classes, seed: int) -> TaskData:
    if max_per_class is None and max_classes is None:
        return data
    idx, kept = choose_images(data.labels, max_per_class, max_classes, seed)
    remap = np.full(len(data.classes), -1, dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    # replace() carries every other field (label_kind, extra_classes, ...) as it is
    return replace(data, classes=[data.classes[k] for k in kept], images=data.images[idx],
                   labels=remap[data.labels[idx]], split=data.split[idx],
                   extra={k: v[idx] for k, v in data.extra.items()})


def presplit_caps(max_per_class):
    """A cap on a class's images, divided between a source's own train and test pools (80 / 20)."""
    if max_per_class is None:
        return None, None
    n_train = max(1, int(round(max_per_class * (1 - TEST_FRACTION))))
    return n_train, max(1, max_per_class - n_train)


def split_off_val(labels: np.ndarray, seed: int, classes=None) -> np.ndarray:
    """For sources with their own train/test: split validation images off the training pool."""
    return stratified_split(labels, seed, val_fraction=VAL_FRACTION / (1 - TEST_FRACTION), test_fraction=0.0,
                            classes=classes)


def drop_untrainable(data: TaskData, what: str) -> TaskData:
    """Leave out classes without training images (all unreadable, or only in test/), with a warning, so that
    the class count and chance describe what was loaded; refuse when fewer than 2 classes remain."""
    has_train = np.bincount(data.labels[data.split == 0], minlength=len(data.classes)) > 0
    kept = np.flatnonzero(has_train)
    gone = [data.classes[k] for k in np.flatnonzero(~has_train)]
    if len(kept) < 2:
        lacking = f" ({len(gone)} class(es) have none: {few(gone)})" if gone else ""
        raise DataError(f"{what}: {len(kept)} class(es) with readable training images{lacking}; a classification "
                        f"task needs at least 2")
    if not gone:
        return data
    warn_data(f"{what}: left out {len(gone)} class(es) with no readable training images: {few(gone)}; the task has "
          f"{len(kept)} classes (chance {1 / len(kept):.3f})")
    idx = np.flatnonzero(has_train[data.labels])
    remap = np.full(len(data.classes), -1, dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    images = data.images if len(idx) == len(data.labels) else data.images[idx]  # no copy of a memmap unless needed
    return replace(data, classes=[data.classes[k] for k in kept], images=images, labels=remap[data.labels[idx]],
                   split=data.split[idx], extra={k: v[idx] for k, v in data.extra.items()})


def few(names, k: int = 5) -> str:
    """The first k names, and how many more."""
    names = [str(n) for n in names]
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def list_images(folder: Path):
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _damaged_cache(folder: Path, problem: str) -> DataError:
    return DataError(f"{folder}: {problem}; expected a cache as vggface2.py writes it (images.npy (N, H, W, 3) "
                     f"uint8, labels.npy, split.npy with 0 train / 1 val / 2 test, meta.json); write it again "
                     f"with vggface2.py")


def _cache_arrays(folder: Path, n_classes: int, extra_keys: list) -> dict:
    """{name: array} of a cache's .npy files (images memory-mapped), each checked for its shape, type and range."""
    arrays = {}
    for key in ["images", "labels", "split"] + [f"extra_{k}" for k in extra_keys]:
        try:  # allow_pickle stays off: a cache holds plain arrays, never objects to unpickle
            arrays[key] = np.load(folder / f"{key}.npy", mmap_mode="r" if key == "images" else None)
        except (OSError, ValueError) as e:
            raise _damaged_cache(folder, f"{key}.npy is not a readable array ({e})") from None
    images, labels, split = arrays["images"], arrays["labels"], arrays["split"]
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8 or 0 in images.shape[1:3]:
        raise _damaged_cache(folder, f"images.npy is {images.dtype} of shape {images.shape}")
    for key, values in arrays.items():
        if key != "images" and (values.ndim == 0 or len(values) != len(images)):
            raise _damaged_cache(folder, f"{key}.npy has shape {values.shape}, not one entry for each of the "
                                         f"{len(images)} images")
    for key, values, top in (("labels", labels, n_classes - 1), ("split", split, 2)):
        if values.ndim != 1 or values.dtype.kind not in "iu":
            raise _damaged_cache(folder, f"{key}.npy is {values.dtype} of shape {values.shape}, not one integer "
                                         f"per image")
        wrong = np.unique(values[(values < 0) | (values > top)])
        if len(wrong):
            raise _damaged_cache(folder, f"{key}.npy holds {few(wrong.tolist())}, outside 0..{top}"
                                 + (f" (meta.json names {n_classes} classes)" if key == "labels" else ""))
    return arrays


def _cache_labels(folder: Path, meta: dict, extra: dict) -> tuple:
    """(label_kind, extra_classes, face_crop) of a cache's meta.json, checked against its extra arrays."""
    # label_kind and extra_classes came later: a cache written before them loads with the defaults
    label_kind = meta.get("label_kind", "")
    if not isinstance(label_kind, str):
        raise _damaged_cache(folder, f"meta.json's 'label_kind' is {label_kind!r}, not a string such as "
                                     f"\"identity\"")
    extra_classes = meta.get("extra_classes", {})
    if not (isinstance(extra_classes, dict)
            and all(k in extra and isinstance(v, list) and all(isinstance(c, str) for c in v)
                    for k, v in extra_classes.items())):
        raise _damaged_cache(folder, "meta.json's 'extra_classes' is not a mapping from names in 'extra' to lists "
                                     "of class names")
    for key, names in extra_classes.items():  # a label beyond its class list would name no class
        values = extra[key]
        if values.dtype.kind not in "iu" or (len(values) and (values.min() < 0 or values.max() >= len(names))):
            raise _damaged_cache(folder, f"extra_{key}.npy is not integer labels within 0..{len(names) - 1} "
                                         f"(meta.json names {len(names)} {key} classes)")
    face_crop = meta.get("face_crop", "boxes")  # a cache from before the setting: VGGFace2's boxes, LFW's box
    if face_crop is not None and face_crop not in FACE_CROPS:
        raise _damaged_cache(folder, f"meta.json's 'face_crop' is {face_crop!r}, not null or one of "
                                     f"{', '.join(FACE_CROPS)}")
    return label_kind, extra_classes, face_crop


def load_cache(folder) -> TaskData:
    """A folder written by `TaskData.save` (memory-mapped, so data larger than memory works)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise _damaged_cache(folder, f"meta.json is not readable JSON ({e})") from None
    classes = meta.get("classes") if isinstance(meta, dict) else None
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)
            and len(set(classes)) == len(classes)):
        raise _damaged_cache(folder, "meta.json lacks 'classes', a list of distinct class names")
    extra_keys = meta.get("extra", [])
    if not (isinstance(extra_keys, list) and all(isinstance(k, str) and re.fullmatch(r"\w+", k) for k in extra_keys)):
        raise _damaged_cache(folder, "meta.json's 'extra' is not a list of array names")
    arrays = _cache_arrays(folder, len(classes), extra_keys)
    images, labels, split = arrays["images"], arrays["labels"], arrays["split"]
    extra = {k: arrays[f"extra_{k}"] for k in extra_keys}
    native = meta.get("native_size")
    native = native if isinstance(native, int) and not isinstance(native, bool) and native > 0 else None
    label_kind, extra_classes, face_crop = _cache_labels(folder, meta, extra)
    data = TaskData(str(meta.get("name", "")), classes, images, labels.astype(np.int64), split.astype(np.int8),
                    str(meta.get("source", "")), extra, native or int(images.shape[1]), label_kind, extra_classes,
                    face_crop)
    return drop_untrainable(data, str(folder))


def printable(name: str) -> str:
    """A file name as text any writer accepts: bytes that are not UTF-8 (kept by os.fsdecode as surrogates,
    which JSON, CSV and HTML writers reject) are shown as \\xNN, so b"caf\\xe9" becomes "caf\\xe9"."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def official_split_caps(max_per_class):
    """A cap on a class's images divided among a source's own train, val and test sets, by the module's
    fractions (at least one image each, so a tiny cap may give a class up to 3)."""
    if max_per_class is None:
        return None, None, None
    n_test = max(1, int(round(max_per_class * TEST_FRACTION)))
    n_val = max(1, int(round(max_per_class * VAL_FRACTION)))
    return max(1, max_per_class - n_test - n_val), n_val, n_test
