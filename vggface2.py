"""All data for the dual-task experiments, in one format.

Every source (VGGFace2, CIFAR-10, FER2013, KDEF, VoxCeleb frames, a folder of class folders, the offline demo
set) becomes a `TaskData`: uint8 images (N, H, W, 3), int64 labels, class names and a split per image (0 train,
1 val, 2 test), plus what the labels are (`label_kind`) and any further labels of the same images (`extra`).
Training, lesions and figures all read that one format. A preprocessed copy lives in a folder holding
`images.npy`, `labels.npy`, `split.npy` and `meta.json`, loaded memory-mapped.

Preprocess VGGFace2 once (crop around the loose box enlarged by 30%, resize, cache):

    python vggface2.py --root=/data/vggface2 --out=/data/vggface2_112 --image_size=112 --identities=1700

An earlier cache in --out is replaced only with --overwrite; a folder that is not a cache, and any --out
inside, containing or equal to --root, is refused. Data loaded differently from how it was given (unreadable
images, classes left without images, unusable boxes) is counted in a "warning: ..." line on stderr.

Augmentation and normalisation (`augment`, `normalize`) work on whole uint8 batches on the device.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import pickle
import re
import shutil
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
VAL_FRACTION = 0.1  # of each class's images, for sources that come without a validation split
TEST_FRACTION = 0.2  # of each class's images, for sources that come without a test split
VGGFACE2_BOX_MARGIN = 0.3  # the dataset authors enlarge the loose box by 30% before cropping
# LFW's photographs are 250 x 250 frames with the face in the middle, about 110 px of it. The face box is LFWcrop's
# fixed box (Sanderson & Lovell 2009: corners (83, 92) and (166, 175), found from 40 hand-marked LFW faces), as a
# fraction of the frame, enlarged by VGGFACE2_BOX_MARGIN as VGGFace2's boxes are: a tight crop, brow to chin with
# little hair or background (tighter than VGGFace2's loose crops), rather than a 28-px face in a 64-px frame
LFW_FRAME = 250
LFW_FACE_BOX = (83 / LFW_FRAME, 92 / LFW_FRAME, 83 / LFW_FRAME, 83 / LFW_FRAME)  # x, y, w, h as fractions
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NORM_MEAN = NORM_STD = 0.5  # the reference study's normalisation


class DataError(ValueError):
    """Bad data input: the message names the path or value and the expected form."""


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
        _check_out(out, overwrite)
        tmp, old = _beside(out)
        for leftover in (tmp, old):  # check_out made sure these are ours
            if leftover.exists():
                shutil.rmtree(leftover)
        tmp.mkdir(parents=True)
        # meta.json first: it marks a half-written <out>.tmp as this module's, so a later save may remove it
        meta = {"name": self.name, "classes": list(self.classes), "source": self.source,
                "image_size": self.image_size, "counts": self.counts(), "extra": sorted(self.extra),
                "native_size": self.native_size, "label_kind": self.label_kind,
                "extra_classes": {k: list(v) for k, v in self.extra_classes.items()}}
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


def _beside(out: Path):
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


def _check_out(out: Path, overwrite: bool = False) -> None:
    """Refuse (DataError) a cache folder whose writing would replace anything but an earlier cache of this
    module, and an earlier cache unless `overwrite`. Never deletes: it only looks."""
    out = Path(out)
    for p in (out, *_beside(out)):
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            raise DataError(f"--out: {p} exists and is not a folder; choose another --out")
    if out.exists() and any(out.iterdir()):
        if not _is_own_cache(out):
            raise DataError(f"--out: {out} is not empty and is not a cache written by vggface2.py, so it is never "
                            f"replaced, even with --overwrite; choose another --out (a new or empty folder)")
        if not overwrite:
            raise DataError(f"--out: {out} already holds a cache; pass --overwrite to replace it or choose another "
                            f"--out")
    for p in _beside(out):
        if p.exists() and not _is_own_cache(p):
            raise DataError(f"--out: {p} is in the way (a save writes there) and is not a cache written by "
                            f"vggface2.py; move it away or choose another --out")


# ----------------------------------------------------------------------------------------------------------
# entry point


def load_task(spec: str, task: str, image_size: int, max_per_class=None, max_classes=None, seed: int = 0,
              download: bool = False, demo_per_class: int = 100, kdef_views=("S",), lfw_crop: bool = True) -> TaskData:
    """Load one task's data from `spec` and bring it to `image_size` pixels.

    spec: 'demo' (the procedural set matching the task name: faces for 'face'/'identity', expressions for
    'expression', objects otherwise), 'demo:faces' / 'demo:objects' / 'demo:expression', a VGGFace2 root,
    a CIFAR-10 root (holding cifar-10-batches-py/), a cache folder written by this module, FER2013's CSV (the
    file, or a folder holding fer2013.csv), a KDEF root (photographs named like AF01ANS.JPG anywhere below it;
    `kdef_views` chooses the camera angles), VoxCeleb face frames (id10001/<video>/<frame>.jpg), or a folder
    with one subfolder per class (train/ and test/ subfolders are used when present; FER2013's class folders
    with PublicTest_/PrivateTest_ files in test/ keep FER2013's own split; LFW's folders, images named
    <person>_NNNN.jpg, are cropped to the face, LFW_FACE_BOX, unless `lfw_crop` is False).

    The layouts are told apart in this order, the first that fits wins: a cache (meta.json + images.npy);
    CIFAR-10 (cifar-10-batches-py/); VGGFace2 (bb_landmark/, or train/nXXXXXX/); a .csv file or fer2013.csv in
    the folder; KDEF (most of the first few hundred image names below the root read as KDEF names, whatever
    the folders: the release's one folder per session and person would otherwise pass for class folders);
    VoxCeleb (no train/ + test/ pair, and at least 2 class folders whose images all lie one folder deeper, in
    video folders); otherwise class folders.

    The task's labels are the source's own (`labels`); `task_view` gives a task another of its labels.
    """
    kdef_views = _kdef_views(kdef_views)  # checked whatever the source, so a mistyped setting never waits
    if spec.startswith("demo"):
        kind = spec.split(":", 1)[1] if ":" in spec else demo_kind_for(task)
        per_class = demo_per_class if max_per_class is None else min(demo_per_class, max_per_class)
        n_classes = 10 if max_classes is None else max_classes
        data = make_demo(kind, n_classes=n_classes, per_class=per_class, image_size=image_size, seed=seed)
        data.name = task
        return data
    root = Path(spec).expanduser()
    if download and (not root.exists() or (root.is_dir() and not any(root.iterdir()))):
        root.mkdir(parents=True, exist_ok=True)  # an empty or new folder asked to download: CIFAR-10
    if not root.exists():
        raise DataError(f"{task}_data: {spec} does not exist; expected 'demo', a VGGFace2 root, a CIFAR-10 root, "
                        f"a cache folder made by vggface2.py, FER2013's fer2013.csv, a KDEF root, VoxCeleb frames "
                        f"(identity/video/frame.jpg), or a folder with one subfolder per class")
    if root.is_file() and root.suffix.lower() == ".csv":  # FER2013 comes as one CSV file
        data = load_fer2013_csv(root, max_per_class=max_per_class, max_classes=max_classes, seed=seed)
        data.name = task
        if data.image_size != image_size:
            data.images = resize_images(data.images, image_size)
        return data
    if not root.is_dir() or not os.access(root, os.R_OK | os.X_OK):
        raise DataError(f"{task}_data: {spec} is not a readable folder (nor a FER2013 .csv file)")
    try:
        if (root / "meta.json").exists() and (root / "images.npy").exists():
            data = load_cache(root)
            if max_per_class is not None or max_classes is not None:  # a cap may take a class's training images
                data = _drop_untrainable(_cap(data, max_per_class, max_classes, seed), str(root))
        elif (root / "cifar-10-batches-py").is_dir() or (download and not any(root.iterdir())):
            data = load_cifar10(root, max_per_class=max_per_class, max_classes=max_classes, seed=seed,
                                download=download)
        elif is_vggface2_root(root):
            data = load_vggface2(root, image_size, identities=max_classes, per_identity=max_per_class, seed=seed)
        elif (root / FER2013_CSV).is_file():  # the Kaggle archive unpacks to fer2013/fer2013.csv
            data = load_fer2013_csv(root / FER2013_CSV, max_per_class=max_per_class, max_classes=max_classes,
                                    seed=seed)
        elif is_kdef_root(root):
            data = load_kdef(root, image_size, views=kdef_views, max_per_class=max_per_class,
                             max_classes=max_classes, seed=seed)
        elif is_voxceleb_root(root):
            data = load_voxceleb(root, image_size, max_per_class=max_per_class, max_classes=max_classes, seed=seed)
        else:
            box = FractionBox(LFW_FACE_BOX) if lfw_crop and is_lfw_root(root) else None
            data = load_folder(root, image_size, max_per_class=max_per_class, max_classes=max_classes, seed=seed,
                               face_box=box)
    except OSError as e:  # a folder inside the data that cannot be listed (images themselves are skipped)
        raise DataError(f"{task}_data: cannot read {e.filename or spec} ({e.strerror or e}); make it "
                        f"readable") from None
    data.name = task
    if data.image_size != image_size:
        data.images = resize_images(data.images, image_size)
    return data


def demo_kind_for(task: str) -> str:
    """The demo set a task name asks for: the faces for an identity task, expressions for an expression task
    (the same names as `label_kind_for_task`), the objects otherwise."""
    return {"identity": "faces", "expression": "expression"}.get(label_kind_for_task(task), "objects")


# ----------------------------------------------------------------------------------------------------------
# one set of images, several labels: a task's view


def shared_groups(datasets: dict) -> list:
    """The groups of tasks whose TaskData hold the very same image array (one set of images, several labels) in
    the same split, in task order: [[task, ...], ...]."""
    groups = []
    for task, d in datasets.items():
        for g in groups:
            first = datasets[g[0]]
            if first.images is d.images and (first.split is d.split or np.array_equal(first.split, d.split)):
                g.append(task)
                break
        else:
            groups.append([task])
    return groups


_TASK_LABEL_KINDS = {"identity": "identity", "face": "identity", "faces": "identity", "id": "identity",
                     "expression": "expression", "expressions": "expression", "emotion": "expression",
                     "emotions": "expression"}


def label_kind_for_task(task: str) -> str | None:
    """The label kind a task's name asks for: 'identity' for identity / face / faces / id, 'expression' for
    expression(s) / emotion(s), None for any other name (the task takes the source's own labels)."""
    return _TASK_LABEL_KINDS.get(task)


def task_view(data: TaskData, task: str) -> TaskData:
    """`data` as task `task` sees it: the labels the task's name asks for (`label_kind_for_task`).

    - the name asks for no kind (None), or for the kind `data.labels` already are: `data` itself, its name
      set to `task`;
    - the kind is one of `data.extra`'s label arrays (e.g. a KDEF or demo-face set's expression, read by an
      expression task): a new TaskData sharing the very same `images` and `split` arrays (no copy, so two tasks
      over one source cost one image array and see the same train / val / test images), with that array as
      labels and its `extra_classes` as classes; the primary labels move into the view's extra under
      `data.label_kind`, so the view still carries both;
    - otherwise (the source lacks that label, or its labels are of unknown kind ""): DataError naming the task,
      the source and the label kinds it has, rather than training e.g. an expression task on identities.

    The view keeps every class of that label, also one without training images under the source's split (a
    split stratified by identity need not be by expression); the caller checks the counts it needs.
    """
    kind = label_kind_for_task(task)
    if kind is None or kind == data.label_kind:
        data.name = task
        return data
    if kind in data.extra and kind in data.extra_classes:
        extra = {k: v for k, v in data.extra.items() if k != kind}
        extra_classes = {k: v for k, v in data.extra_classes.items() if k != kind}
        if data.label_kind:  # unknown ("") primary labels have no name to be kept under
            extra[data.label_kind] = data.labels
            extra_classes[data.label_kind] = list(data.classes)
        return TaskData(task, list(data.extra_classes[kind]), data.images, np.asarray(data.extra[kind], np.int64),
                        data.split, data.source, extra, data.native_size, kind, extra_classes)
    has = [data.label_kind] if data.label_kind else []
    has += [k for k in data.extra_classes if k in data.extra and k not in has]
    unnamed = [k for k in data.extra if k == kind and k not in data.extra_classes]
    note = (f" (its extra '{kind}' array has no class names in extra_classes: reload or re-cache it with this "
            f"version of vggface2.py)") if unnamed else ""
    raise DataError(f"task {task}: wants {kind} labels, but {data.source or 'its data'} has "
                    f"{'only ' + ' and '.join(has) + ' labels' if has else 'labels of unknown kind'}{note}; give "
                    f"{task} a source with {kind} labels (e.g. VGGFace2 or VoxCeleb for identity, FER2013 for "
                    f"expression, KDEF for both) or rename the task")


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
        _warn(f"{len(small)} class(es) have fewer than 3 images, so no {held_out} images{unmeasured}: "
              f"{_few(small)}; raise max_per_class or collect more images for them")
    return split


def _choose(labels: np.ndarray, max_per_class, max_classes, seed: int):
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


def _cap(data: TaskData, max_per_class, max_classes, seed: int) -> TaskData:
    if max_per_class is None and max_classes is None:
        return data
    idx, kept = _choose(data.labels, max_per_class, max_classes, seed)
    remap = np.full(len(data.classes), -1, dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    # replace() carries every other field (label_kind, extra_classes, ...) as it is
    return replace(data, classes=[data.classes[k] for k in kept], images=data.images[idx],
                   labels=remap[data.labels[idx]], split=data.split[idx],
                   extra={k: v[idx] for k, v in data.extra.items()})


def _presplit_caps(max_per_class):
    """A cap on a class's images, divided between a source's own train and test pools (80 / 20)."""
    if max_per_class is None:
        return None, None
    n_train = max(1, int(round(max_per_class * (1 - TEST_FRACTION))))
    return n_train, max(1, max_per_class - n_train)


def _split_off_val(labels: np.ndarray, seed: int, classes=None) -> np.ndarray:
    """For sources with their own train/test: split validation images off the training pool."""
    return stratified_split(labels, seed, val_fraction=VAL_FRACTION / (1 - TEST_FRACTION), test_fraction=0.0,
                            classes=classes)


def _drop_untrainable(data: TaskData, what: str) -> TaskData:
    """Leave out classes without training images (all unreadable, or only in test/), with a warning, so that
    the class count and chance describe what was loaded; refuse when fewer than 2 classes remain."""
    has_train = np.bincount(data.labels[data.split == 0], minlength=len(data.classes)) > 0
    kept = np.flatnonzero(has_train)
    gone = [data.classes[k] for k in np.flatnonzero(~has_train)]
    if len(kept) < 2:
        lacking = f" ({len(gone)} class(es) have none: {_few(gone)})" if gone else ""
        raise DataError(f"{what}: {len(kept)} class(es) with readable training images{lacking}; a classification "
                        f"task needs at least 2")
    if not gone:
        return data
    _warn(f"{what}: left out {len(gone)} class(es) with no readable training images: {_few(gone)}; the task has "
          f"{len(kept)} classes (chance {1 / len(kept):.3f})")
    idx = np.flatnonzero(has_train[data.labels])
    remap = np.full(len(data.classes), -1, dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    images = data.images if len(idx) == len(data.labels) else data.images[idx]  # no copy of a memmap unless needed
    return replace(data, classes=[data.classes[k] for k in kept], images=images, labels=remap[data.labels[idx]],
                   split=data.split[idx], extra={k: v[idx] for k, v in data.extra.items()})


def _warn(message: str) -> None:
    """One 'warning: ...' line on stderr: data loaded, but not quite as given."""
    print(f"warning: {message}", file=sys.stderr)


def _few(names, k: int = 5) -> str:
    """The first k names, and how many more."""
    names = [str(n) for n in names]
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


# ----------------------------------------------------------------------------------------------------------
# images


def resize_images(images: np.ndarray, size: int, chunk: int = 512) -> np.ndarray:
    """Resize (N, H, W, 3) uint8 images to size x size (bilinear, antialiased), in chunks."""
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for start in range(0, len(images), chunk):
        x = torch.from_numpy(np.array(images[start:start + chunk])).permute(0, 3, 1, 2).float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start:start + chunk] = y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def _square_resize(img, size: int):
    """Resize the shorter side to `size` and crop the centre square (PIL image in, PIL image out)."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _to_rgb(im):
    """Any PIL image as 8-bit RGB, scaled by its format's range (PIL's own convert clips deeper images)."""
    from PIL import Image

    if im.mode == "I" or im.mode.startswith("I;16"):
        a = np.asarray(im).astype(np.float64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            # 32-bit values proper: scaled by their own range, since the format's 2^32 levels would leave
            # any real image black; "I" usually holds 16-bit data (how PIL opens many 16-bit files)
            a = (a - a.min()) / max(a.max() - a.min(), 1) * 255
        else:
            a = a / 257  # 16 bit: 65535 -> 255, so a 16-bit gradient becomes the same 8-bit gradient
        return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        # float images have no fixed range: [0, 1] (the usual convention) and [0, 255] are taken as they
        # stand, anything else is stretched from its min..max; NaN becomes 0
        a = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (a.min(), a.max()) if a.size else (0.0, 1.0)
        if lo >= 0 and hi <= 1:
            a = a * 255
        elif lo < 0 or hi > 255:
            a = (a - lo) / max(hi - lo, 1e-12) * 255
        return Image.fromarray(np.round(a).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        # transparent pixels are shown on white, as a viewer shows them, not as the hidden colour under them
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGB: PIL converts these correctly


class FractionBox(tuple):
    """A face box (x, y, w, h) given as fractions of the image's width and height (one box for many images)."""


def _crop_box(box, width: int, height: int):
    """The box (pixels, or a FractionBox) enlarged by the margin and clipped to the image as (left, top, right,
    bottom), or None when less than 2 x 2 pixels of it lie inside the image."""
    x, y, w, h = box
    if isinstance(box, FractionBox):
        x, y, w, h = x * width, y * height, w * width, h * height
    cx, cy = x + w / 2, y + h / 2
    w, h = w * (1 + VGGFACE2_BOX_MARGIN), h * (1 + VGGFACE2_BOX_MARGIN)
    left, top = max(0, int(round(cx - w / 2))), max(0, int(round(cy - h / 2)))
    right, bottom = min(width, int(round(cx + w / 2))), min(height, int(round(cy + h / 2)))
    return (left, top, right, bottom) if right - left >= 2 and bottom - top >= 2 else None


def _read_image(path: Path, size: int, box=None):
    """Decode one image to a (size, size, 3) uint8 array (None when it cannot be read), whether its box
    lay outside it (the image is then used uncropped), and its shorter side in pixels before resizing."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            img = _to_rgb(im)
            rect = _crop_box(box, img.width, img.height) if box is not None else None
            if rect is not None:
                img = img.crop(rect)
            native = min(img.width, img.height)
            return np.asarray(_square_resize(img, size), dtype=np.uint8), box is not None and rect is None, native
    except Exception:  # PIL raises many types for damaged files; any of them means "skip this image"
        return None, False, 0


def _read_many(paths, size: int, boxes=None, what: str = "images"):
    """Decode images in threads (PIL releases the GIL while decoding); skip unreadable ones with a warning.
    Returns the images, which paths were read, and the median shorter side of the read images before resizing."""
    from tqdm import tqdm

    boxes = boxes if boxes is not None else [None] * len(paths)
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) + 2)) as pool:
        results = list(tqdm(pool.map(lambda pb: _read_image(pb[0], size, pb[1]), zip(paths, boxes)), total=len(paths),
                            desc=f"reading {what}", leave=False, disable=True if len(paths) < 500 else None))
    arrays = [a for a, _, _ in results]
    ok = np.array([a is not None for a in arrays], dtype=bool)
    bad = [str(p) for p, a in zip(paths, arrays) if a is None]
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image(s) in {what}, e.g. {bad[0]}", stacklevel=2)
        print(f"warning: skipped {len(bad)} unreadable image(s) in {what} (first: {bad[0]})", file=sys.stderr)
    outside = [str(p) for p, (_, out, _) in zip(paths, results) if out]
    if outside:
        _warn(f"{len(outside)} face box(es) lie outside their image in {what}; those images are used uncropped "
              f"(first: {outside[0]})")
    images = np.stack([a for a in arrays if a is not None]) if ok.any() else np.zeros((0, size, size, 3), np.uint8)
    natives = [n for a, _, n in results if a is not None]
    return images, ok, int(np.median(natives)) if natives else None


def _list_images(folder: Path):
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


# ----------------------------------------------------------------------------------------------------------
# class folders


def _printable(name: str) -> str:
    """A file name as text any writer accepts: bytes that are not UTF-8 (kept by os.fsdecode as surrogates,
    which JSON, CSV and HTML writers reject) are shown as \\xNN, so b"caf\\xe9" becomes "caf\\xe9"."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _class_folders(root: Path, what: str):
    """({class name: folder}, {class name: image files}) of the class folders holding images."""
    dirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    folders = {_printable(d.name): d for d in dirs}
    if len(folders) < len(dirs):
        raise DataError(f"{what}: two class folders in {root} read as the same name once their non-UTF-8 bytes are "
                        f"written as \\xNN; rename one of them")
    renamed = [name for name, d in folders.items() if name != d.name]
    if renamed:
        _warn(f"{what}: {len(renamed)} class folder name(s) are not UTF-8 and are shown as {_few(renamed)}")
    files = {c: _list_images(d) for c, d in folders.items()}
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
        _warn(f"{folder}: {len(marked)} of {len(names)} images carry FER2013's PublicTest_/PrivateTest_ prefix, "
              f"the rest do not, so FER2013's split is not used: all of test/ is test and validation images are "
              f"taken from train/")
        return False
    return bool(names) and all(any(n.startswith(p) for n in names) for p in FER_TEST_PREFIXES)


def _official_split_caps(max_per_class):
    """A cap on a class's images divided among a source's own train, val and test sets, by the module's
    fractions (at least one image each, so a tiny cap may give a class up to 3)."""
    if max_per_class is None:
        return None, None, None
    n_test = max(1, int(round(max_per_class * TEST_FRACTION)))
    n_val = max(1, int(round(max_per_class * VAL_FRACTION)))
    return max(1, max_per_class - n_test - n_val), n_val, n_test


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


def load_folder(root, image_size: int, max_per_class=None, max_classes=None, seed: int = 0,
                face_box=None) -> TaskData:
    """A folder with one subfolder per class, or with train/ and test/ each holding the class subfolders.

    Without train/ + test/: a seeded stratified split of each class. With them: test/ is the test set and
    validation images are split off train/ -- except for FER2013's class folders (every test/ image named
    PublicTest_* or PrivateTest_*), which keep FER2013's official split: train/ all train, PublicTest_* val,
    PrivateTest_* test, so results compare with published FER2013 numbers; that data is labelled by expression
    (label_kind "expression"), any other folder's labels are of unknown kind ("").
    face_box: a FractionBox every image is cropped to (enlarged by VGGFACE2_BOX_MARGIN) before resizing; None
    reads the whole images.
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
        cap_train, cap_val, cap_test = _official_split_caps(max_per_class)
    else:
        cap_train, cap_test = _presplit_caps(max_per_class) if presplit else (max_per_class, None)
    parts, natives = [], []
    for pool, (_, files) in listed.items():
        paths, labels = [], []
        for ci, c in enumerate(classes):
            paths += files.get(c, [])
            labels += [ci] * len(files.get(c, []))
        labels = np.array(labels, dtype=np.int64)
        if fer and pool == "test":  # each file's official set from its name; each set capped on its own
            official = np.array([next(s for p, s in FER_TEST_PREFIXES.items() if f.name.startswith(p))
                                 for f in paths], dtype=np.int8)
            idx = np.sort(np.concatenate([np.flatnonzero(official == s)[_choose(labels[official == s], cap, None,
                                                                                seed)[0]]
                                          for s, cap in ((1, cap_val), (2, cap_test))]))
        else:
            idx, _ = _choose(labels, cap_test if pool == "test" else cap_train, None, seed)
        images, ok, native = _read_many([paths[i] for i in idx], image_size,
                                        None if face_box is None else [face_box] * len(idx), what=str(pools[pool]))
        natives += [native] * len(images)
        labels = labels[idx][ok]
        if pool == "all":
            split = stratified_split(labels, seed, classes=classes)
        elif pool == "train":
            split = np.zeros(len(labels), np.int8) if fer else _split_off_val(labels, seed, classes=classes)
        else:
            split = official[idx][ok] if fer else np.full(len(labels), 2, dtype=np.int8)
        parts.append((images, labels, split))
    images, labels, split = (np.concatenate(p) for p in zip(*parts))
    if len(images) == 0:
        raise DataError(f"{root}: no readable images")
    native = int(np.median([n for n in natives if n])) if any(natives) else None
    kind = "fer2013" if fer else "folder" if face_box is None else "face-cropped folder"
    data = TaskData("", classes, images, labels, split, source=f"{kind}:{root}",
                    native_size=native, label_kind="expression" if fer else "")
    return _drop_untrainable(data, str(root))


# ----------------------------------------------------------------------------------------------------------
# FER2013 as its original CSV


FER2013_CSV = "fer2013.csv"  # the file's name in the Kaggle archive (fer2013/fer2013.csv)
FER2013_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # emotion 0..6
FER2013_USAGE = {"Training": 0, "PublicTest": 1, "PrivateTest": 2}  # FER2013's own train / val / test
FER2013_SIZE = 48
_FER_FORM = ("expected FER2013's CSV: the header emotion,pixels,Usage, then one row per image with emotion a "
             "whole number 0-6 (angry, disgust, fear, happy, sad, surprise, neutral), pixels 2304 space-separated "
             "grey values 0-255 (48 x 48, row by row) and Usage Training, PublicTest or PrivateTest")


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
    grey, labels, split = [], [], []
    n_pixels = FER2013_SIZE * FER2013_SIZE
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
                line = reader.line_num
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
                grey.append(a.astype(np.uint8).reshape(FER2013_SIZE, FER2013_SIZE))
                labels.append(int(emotion))
                split.append(FER2013_USAGE[usage])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read it as a CSV file ({e}); {_FER_FORM}") from None
    if not grey:
        raise DataError(f"{path}: no image rows; {_FER_FORM}")
    labels, split = np.array(labels, dtype=np.int64), np.array(split, dtype=np.int8)
    missing = [u for u, s in FER2013_USAGE.items() if not (split == s).any()]
    if missing:
        empty = " and ".join(SPLITS[FER2013_USAGE[u]] for u in missing)
        _warn(f"{path}: no rows with Usage {' or '.join(missing)}, so the {empty} set is empty")
    classes = list(FER2013_CLASSES[:max_classes] if max_classes is not None else FER2013_CLASSES)
    caps = _official_split_caps(max_per_class)
    keep = np.isin(labels, np.arange(len(classes)))
    chosen = []
    for s, cap in enumerate(caps):  # each official set capped on its own, so each keeps its share
        in_set = np.flatnonzero((split == s) & keep)
        chosen.append(in_set[_choose(labels[in_set], cap, None, seed)[0]])
    idx = np.sort(np.concatenate(chosen))
    images = np.repeat(np.stack([grey[i] for i in idx])[..., None], 3, axis=3) if len(idx) else \
        np.zeros((0, FER2013_SIZE, FER2013_SIZE, 3), np.uint8)
    data = TaskData("", classes, images, labels[idx], split[idx], source=f"fer2013:{path}",
                    native_size=FER2013_SIZE, label_kind="expression")
    return _drop_untrainable(data, str(path))


# ----------------------------------------------------------------------------------------------------------
# KDEF (the Karolinska Directed Emotional Faces)


KDEF_EXPRESSIONS = {"AF": "afraid", "AN": "angry", "DI": "disgusted", "HA": "happy", "NE": "neutral",
                    "SA": "sad", "SU": "surprised"}
KDEF_VIEWS = ("FL", "HL", "S", "HR", "FR")  # full left, half left, straight (frontal), half right, full right
# session A/B, sex F/M, person number, expression, view: AF01ANS.JPG is session A, woman 01, angry, straight
_KDEF_NAME = re.compile(r"^([AB])([FM])(\d{2})(AF|AN|DI|HA|NE|SA|SU)(FL|HL|HR|FR|S)\.jpe?g$", re.IGNORECASE)
_KDEF_FORM = ("KDEF's file names: session A/B, sex F/M, 2-digit person number, expression AF/AN/DI/HA/NE/SA/SU, "
              "view FL/HL/S/HR/FR, .JPG, e.g. AF01ANS.JPG")


def _kdef_views(views) -> tuple:
    """The KDEF views asked for, as a tuple of distinct codes; a string may list them ("S" or "S,HL")."""
    given = views
    if isinstance(views, str):
        views = [v for v in re.split(r"[,\s]+", views) if v]
    try:
        views = tuple(dict.fromkeys(str(v).strip().upper() for v in views))
    except TypeError:  # not a list of views at all
        views = ()
    if not views or any(v not in KDEF_VIEWS for v in views):
        raise DataError(f"kdef_views={given!r}: expected one or more of the KDEF views FL HL S HR FR (full left, "
                        f"half left, straight, half right, full right), e.g. ('S',) for frontal photographs")
    return views


def _sample_image_names(root: Path, limit: int = 300, max_folders: int = 2000) -> list:
    """The names of up to `limit` image files below `root`, depth first in name order (looking into at most
    `max_folders` folders, each once, so a linked loop ends): enough to recognise a layout by its file names
    without listing a whole large tree."""
    names, stack, seen = [], [root], set()
    while stack and len(names) < limit and len(seen) < max_folders:
        folder = stack.pop()
        if os.path.realpath(folder) in seen:
            continue
        seen.add(os.path.realpath(folder))
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
        names += [e.name for e in entries if e.is_file() and not e.name.startswith(".")
                  and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS]
        stack += [Path(e.path) for e in reversed(entries) if e.is_dir() and not e.name.startswith(".")]
    return names[:limit]


def is_kdef_root(root: Path) -> bool:
    """True when most of the image files found below `root` (a sample of up to 300) have KDEF names."""
    names = _sample_image_names(Path(root))
    return bool(names) and sum(bool(_KDEF_NAME.match(n)) for n in names) > len(names) / 2


def load_kdef(root, image_size: int, views=("S",), max_per_class=None, max_classes=None, seed: int = 0) -> TaskData:
    """KDEF's photographs, each labelled with its person and its expression.

    The photographs may lie anywhere below `root` (the release has one folder per session and person,
    AF01/AF01ANS.JPG). `labels` are the people (label_kind "identity"; classes like "F01": sex and number, the
    two sessions A and B being the same person), `extra["expression"]` the expression of the same photograph
    (class names in `extra_classes["expression"]`: afraid, angry, disgusted, happy, neutral, sad, surprised),
    so one image array serves an identity and an expression task (`task_view`). Only the views in `views` are
    loaded; by default the frontal ones ("S"), as face-identity studies use.

    The split is stratified by person (`stratified_split`), so every person has photographs in train, val and
    test, as identity classification needs. max_classes keeps the first people by name, max_per_class caps each
    person's photographs (a seeded sample). Image files whose names do not read as KDEF's are skipped with one
    warning (the release holds a few, and a copied-in file should not become a person); a name found twice
    (a copy) is loaded once, so one photograph cannot land in train and test.
    """
    root = Path(root)
    views = _kdef_views(views)

    def fail(e):  # os.walk ignores unreadable folders unless told: a folder of photographs must not vanish
        raise e

    found, strangers, seen, copies = [], [], set(), []
    walked = {os.path.realpath(root)}  # linked folders are followed, each once (a link loop must end)
    for folder, dirs, files in os.walk(root, onerror=fail, followlinks=True):
        dirs[:] = [d for d in sorted(dirs) if not d.startswith(".")
                   and os.path.realpath(os.path.join(folder, d)) not in walked]
        walked.update(os.path.realpath(os.path.join(folder, d)) for d in dirs)
        for name in sorted(files):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue  # README files and the like are not photographs
            m = _KDEF_NAME.match(name)
            if m is None:
                strangers.append(os.path.join(folder, name))
            elif name.upper() in seen:
                copies.append(os.path.join(folder, name))
            else:
                seen.add(name.upper())
                found.append((Path(folder) / name, *(g.upper() for g in m.groups())))
    if strangers:
        _warn(f"{root}: skipped {len(strangers)} image file(s) not named as KDEF photographs are (first: "
              f"{_printable(strangers[0])}); {_KDEF_FORM}")
    if copies:
        _warn(f"{root}: {len(copies)} KDEF file name(s) occur twice; each photograph is loaded once (first copy "
              f"skipped: {_printable(copies[0])})")
    found = [f for f in found if f[5] in views]
    if not found:
        raise DataError(f"{root}: no KDEF photographs with view(s) {' '.join(views)}; expected {_KDEF_FORM}, "
                        f"anywhere below the root")
    people = sorted({sex + number for _, _, sex, number, _, _ in found})
    if max_classes is not None:
        people = people[:max_classes]
    if len(people) < 2:
        raise DataError(f"{root}: found {len(people)} KDEF person(s); identity classification needs at least 2")
    person_index = {p: i for i, p in enumerate(people)}
    found = [f for f in found if f[2] + f[3] in person_index]
    labels = np.array([person_index[sex + number] for _, _, sex, number, _, _ in found], dtype=np.int64)
    expression_codes = list(KDEF_EXPRESSIONS)
    expressions = np.array([expression_codes.index(e) for _, _, _, _, e, _ in found], dtype=np.int64)
    idx, _ = _choose(labels, max_per_class, None, seed)
    images, ok, native = _read_many([found[i][0] for i in idx], image_size, what=str(root))
    labels, expressions = labels[idx][ok], expressions[idx][ok]
    data = TaskData("", people, images, labels, stratified_split(labels, seed, classes=people), f"kdef:{root}",
                    {"expression": expressions}, native, label_kind="identity",
                    extra_classes={"expression": list(KDEF_EXPRESSIONS.values())})
    return _drop_untrainable(data, str(root))


# ----------------------------------------------------------------------------------------------------------
# VoxCeleb face frames


_VOX_FORM = ("VoxCeleb's face frames: one folder per identity (e.g. id10001), in it one folder per video, in that "
             "the frames (e.g. id10001/1zcIwhmdeo4/00001.jpg)")


def _video_folders(identity: Path, look: int = 3):
    """Whether an identity folder holds images itself, and whether one of its first `look` subfolders holds
    images (what a VoxCeleb identity folder looks like)."""
    entries = sorted(os.scandir(identity), key=lambda e: e.name)
    direct = any(e.is_file() and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS for e in entries)
    subdirs = [Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")][:look]
    return direct, any(_list_images(d) for d in subdirs)


def is_voxceleb_root(root: Path, look: int = 20) -> bool:
    """True for VoxCeleb's two-level layout: at least 2 of the first `look` class folders hold video folders
    of images and none holds images itself. A root with train/ and test/ is the class-folder layout (its
    train/ and test/ hold class folders of images, which would look the same)."""
    root = Path(root)
    if (root / "train").is_dir() and (root / "test").is_dir():
        return False
    nested = 0
    for d in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))[:look]:
        direct, deeper = _video_folders(d)
        if direct:
            return False
        nested += deeper
    return nested >= 2


def _assign_videos(videos: list, rng) -> dict:
    """{video: split} for one identity's videos: a seeded shuffle, then n_test = max(1, round(n * 0.2)) and
    n_val = max(1, round(n * 0.1)) videos (the module's fractions, counted in videos), leaving at least one
    video for training; 2 videos: one train, one test; 1 video: train."""
    order = [videos[i] for i in rng.permutation(len(videos))]
    n = len(order)
    if n >= 3:
        n_test = min(max(1, int(round(n * TEST_FRACTION))), n - 2)
        n_val = min(max(1, int(round(n * VAL_FRACTION))), n - 1 - n_test)
    else:
        n_test, n_val = (1, 0) if n == 2 else (0, 0)
    return {v: 2 if i < n_test else 1 if i < n_test + n_val else 0 for i, v in enumerate(order)}


def load_voxceleb(root, image_size: int, max_per_class=None, max_classes=None, seed: int = 0) -> TaskData:
    """VoxCeleb face frames (identity/video/frame.jpg), labelled by identity (label_kind "identity").

    Split by video, never by frame: all frames of one video go to the same split, since frames of one video
    are near copies of each other and a test frame whose neighbours were trained on would measure memory of
    that video, not recognition of the person. Per identity its videos are shuffled (seeded) and assigned as
    `_assign_videos` says: with 3 or more videos, about 20% of them (at least 1) to test, about 10% (at least
    1) to val, the rest to train; with 2 videos one goes to train and one to test (val gets none of that
    identity); with 1 video it goes to train (that identity is named in a warning: it has no test frames).
    Overall, val and test must each get some frames, else DataError (so at least one identity needs 3 videos).

    max_classes keeps the first identities by name; max_per_class caps each identity's frames, taken in turn
    from its videos (one train, one test and one val video first, then the others), so the cap thins every
    video rather than dropping whole videos and splits. `extra["video"]` holds each frame's video (names
    "identity/video" in `extra_classes["video"]`), so the split can be checked. Image files lying directly in an
    identity folder are not frames of a video and are skipped with a warning.
    """
    root = Path(root)
    identities, loose = {}, []
    for d in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        videos = {}
        for v in sorted(d.iterdir()):
            if v.is_dir() and not v.name.startswith("."):
                frames = _list_images(v)
                if frames:
                    videos[_printable(v.name)] = frames
            elif v.is_file() and v.suffix.lower() in IMAGE_EXTENSIONS:
                loose.append(v)
        if videos:
            identities[_printable(d.name)] = videos
    if loose:
        _warn(f"{root}: skipped {len(loose)} image(s) lying directly in an identity folder, outside any video "
              f"folder (first: {_printable(str(loose[0]))}); expected {_VOX_FORM}")
    names = sorted(identities)
    if max_classes is not None:
        names = names[:max_classes]
    if len(names) < 2:
        raise DataError(f"{root}: found {len(names)} identity folder(s) with video folders of frames; identity "
                        f"classification needs at least 2; expected {_VOX_FORM}")
    rng = np.random.default_rng([seed, 43])
    paths, labels, splits, video_ids, video_names, lonely = [], [], [], [], [], []
    for ci, name in enumerate(names):
        videos = identities[name]
        assigned = _assign_videos(list(videos), rng)
        if len(videos) == 1:
            lonely.append(name)
        # the order frames are taken in under a cap: a video of each split first, then the rest
        leads = [next((v for v, s in assigned.items() if s == want), None) for want in (0, 2, 1)]
        order = [v for v in leads if v is not None] + [v for v in assigned if v not in leads]
        picks = {v: rng.permutation(len(videos[v])) for v in order}
        total = sum(len(f) for f in videos.values())
        cap = total if max_per_class is None else min(total, max_per_class)
        taken = {v: [] for v in order}
        n, r = 0, 0
        while n < cap:  # round robin over the videos, one frame each per round
            for v in order:
                if r < len(picks[v]) and n < cap:
                    taken[v].append(picks[v][r])
                    n += 1
            r += 1
        for v in order:
            video_names.append(f"{name}/{v}")
            for i in sorted(taken[v]):
                paths.append(videos[v][i])
                labels.append(ci)
                splits.append(assigned[v])
                video_ids.append(len(video_names) - 1)
    if lonely:
        _warn(f"{len(lonely)} identit(y/ies) have a single video, which goes to training, so no test frames (their "
              f"accuracy goes unmeasured): {_few(lonely)}")
    images, ok, native = _read_many(paths, image_size, what=str(root))
    labels = np.array(labels, dtype=np.int64)[ok]
    split = np.array(splits, dtype=np.int8)[ok]
    video = np.array(video_ids, dtype=np.int64)[ok]
    for s, need in ((1, 3), (2, 2)):
        if not (split == s).any():
            raise DataError(f"{root}: no {SPLITS[s]} frames: frames of one video never go to two splits, and an "
                            f"identity gives {SPLITS[s]} a video only when it has at least {need} videos (with "
                            f"readable frames); add videos, or use identities that have {need} or more")
    data = TaskData("", names, images, labels, split, f"voxceleb:{root}", {"video": video}, native,
                    label_kind="identity", extra_classes={"video": video_names})
    return _drop_untrainable(data, str(root))


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 in torchvision's layout


class _PlainUnpickler(pickle.Unpickler):
    """Admits only the plain types CIFAR-10's batches hold (dict, list, str, bytes, int, numpy arrays)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("builtins", "bytes"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            if module.startswith("numpy.core.") and hasattr(np, "_core"):  # numpy 2 moved numpy.core
                module = module.replace("numpy.core.", "numpy._core.", 1)
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def _unpickle(path: Path, what: str):
    try:
        with open(path, "rb") as f:
            return _PlainUnpickler(f, encoding="latin1").load()
    except Exception as e:  # a damaged pickle raises many types; each means "not this file's format"
        raise DataError(f"{path}: not {what} in the python pickle format ({e}); replace it with a fresh copy "
                        f"of CIFAR-10") from None


def _read_cifar_meta(path: Path) -> list:
    """The class names of batches.meta."""
    meta = _unpickle(path, "CIFAR-10's batches.meta")
    names = meta.get("label_names") if isinstance(meta, dict) else None
    if not (isinstance(names, list) and len(names) == len(CIFAR_CLASSES)
            and all(isinstance(n, str) and n for n in names) and len(set(names)) == len(names)):
        got = f"label_names = {names!r:.80}" if isinstance(meta, dict) else f"a {type(meta).__name__}"
        raise DataError(f"{path}: got {got}; expected a dict whose label_names lists CIFAR-10's "
                        f"{len(CIFAR_CLASSES)} distinct class names; replace it with CIFAR-10's own batches.meta, "
                        f"or remove it to use the standard names")
    return names


def _read_cifar_batch(path: Path, n_classes: int):
    batch = _unpickle(path, "a CIFAR-10 batch")
    try:
        data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
        if data.dtype.kind not in "iu" or labels.dtype.kind not in "iu" or labels.ndim != 1:
            raise ValueError(f"data is {data.dtype}, labels are {labels.dtype} of shape {labels.shape}")
        if data.size and (data.min() < 0 or data.max() > 255):
            raise ValueError(f"pixel values span {data.min()}..{data.max()}")
        data = data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        if len(data) != len(labels):
            raise ValueError(f"{len(data)} images but {len(labels)} labels")
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise DataError(f"{path}: not a CIFAR-10 batch in the python format ({e}); expected a dict with 'data' "
                        f"(N x 3072 uint8) and 'labels' (N ints); replace it with a fresh copy of CIFAR-10") from None
    # a label beyond the class list would silently add a class: the file is damaged, so it is refused
    # rather than thinned (dropping images would hide the damage and change the class balance)
    wrong = np.unique(labels[(labels < 0) | (labels >= n_classes)])
    if len(wrong):
        raise DataError(f"{path}: labels {_few(wrong.tolist())} lie outside 0..{n_classes - 1} (CIFAR-10's "
                        f"{n_classes} classes); the file is damaged: replace it with a fresh copy of CIFAR-10")
    return np.ascontiguousarray(data), labels.astype(np.int64)


CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"  # what torchvision downloads


def load_cifar10(root, max_per_class=None, max_classes=None, seed: int = 0, download: bool = False) -> TaskData:
    """CIFAR-10 from torchvision's layout (root/cifar-10-batches-py/data_batch_1..5, test_batch).

    Downloads through torchvision only when `download` is true and the files are missing.
    """
    root = Path(root)
    folder = root / "cifar-10-batches-py"
    if download and not (folder / "test_batch").exists():
        import torchvision

        try:
            torchvision.datasets.CIFAR10(str(root), train=True, download=True)
        except (OSError, RuntimeError) as e:  # no network is a URLError (an OSError); a bad archive, RuntimeError
            raise DataError(f"{root}: could not download CIFAR-10 from {CIFAR_URL} ({e}); download it by hand "
                            f"and unpack it so that {folder} holds data_batch_1..5 and test_batch") from None
    names = [f"data_batch_{i}" for i in range(1, 6)]
    missing = [n for n in names + ["test_batch"] if not (folder / n).exists()]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)}; expected CIFAR-10's python batches "
                        f"(set download=True to fetch them)")
    meta = folder / "batches.meta"
    classes = _read_cifar_meta(meta) if meta.exists() else list(CIFAR_CLASSES)
    train = [_read_cifar_batch(folder / n, len(classes)) for n in names]
    train_x, train_y = np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])
    test_x, test_y = _read_cifar_batch(folder / "test_batch", len(classes))
    absent = [classes[k] for k in sorted(set(range(len(classes))) - set(train_y.tolist()))]
    if absent:
        _warn(f"{folder}: left out {len(absent)} class(es) with no images in data_batch_1..5: {_few(absent)}")
    cap_train, cap_test = _presplit_caps(max_per_class)
    i_train, kept = _choose(train_y, cap_train, max_classes, seed)
    i_test, _ = _choose(test_y, cap_test, None, seed)
    i_test = i_test[np.isin(test_y[i_test], kept)]  # test images of a class that cannot be learnt are left out
    if len(kept) < 2:
        raise DataError(f"{folder}: {len(kept)} class(es) have training images; a classification task needs at "
                        f"least 2")
    remap = np.full(len(classes), -1, dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    train_y, test_y = remap[train_y[i_train]], remap[test_y[i_test]]
    names_kept = [classes[k] for k in kept]
    split = np.concatenate([_split_off_val(train_y, seed, names_kept), np.full(len(test_y), 2, dtype=np.int8)])
    return TaskData("", names_kept, np.concatenate([train_x[i_train], test_x[i_test]]),
                    np.concatenate([train_y, test_y]), split, source=f"cifar10:{root}", native_size=32)


# ----------------------------------------------------------------------------------------------------------
# VGGFace2


_IDENTITY = re.compile(r"^n\d{6}$")


def is_vggface2_root(root: Path) -> bool:
    train = root / "train"
    if (root / "bb_landmark").is_dir():
        return True
    return train.is_dir() and any(_IDENTITY.match(d.name) for d in train.iterdir() if d.is_dir())


_BOX_FORM = "expected a CSV with header NAME_ID,X,Y,W,H and rows like n000002/0001_01,60,60,79,109"


def _read_boxes(csv_path: Path) -> dict:
    """{NAME_ID: (x, y, w, h)} of VGGFace2's box file; None for a box of zero or negative size or not a
    number, whose image is then used uncropped."""
    boxes, duplicates = {}, []
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a byte-order mark is accepted
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            if header[:5] != ["NAME_ID", "X", "Y", "W", "H"]:
                raise DataError(f"{csv_path}: header is {','.join(header)}; {_BOX_FORM}")
            for row in reader:
                if not any(v.strip() for v in row):
                    continue
                try:
                    x, y, w, h = (float(v) for v in row[1:5])
                except ValueError:
                    raise DataError(f"{csv_path}: line {reader.line_num} reads {','.join(row)!r:.80}; X,Y,W,H must "
                                    f"be 4 numbers; {_BOX_FORM}") from None
                name = row[0].strip()
                # a NAME_ID twice comes from a file edited or appended to, not from VGGFace2 (one row per
                # image): the first row is kept and the rest counted, rather than refusing millions of good rows
                if name in boxes:
                    duplicates.append(name)
                    continue
                usable = all(math.isfinite(v) for v in (x, y, w, h)) and w > 0 and h > 0
                boxes[name] = (x, y, w, h) if usable else None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: cannot read the bounding boxes ({e}); {_BOX_FORM}") from None
    if duplicates:
        _warn(f"{csv_path}: {len(duplicates)} row(s) repeat an earlier NAME_ID (first: {duplicates[0]}); each "
              f"image uses its first row")
    return boxes


def load_vggface2(root, image_size: int, identities=None, per_identity=None, seed: int = 0) -> TaskData:
    """VGGFace2's train/ identities, each identity's images split into train / val / test.

    Faces are cropped around `bb_landmark/loose_bb_train.csv`'s box enlarged by 30% (clipped to the image),
    then resized. VGGFace2's test/ holds other people, so it cannot serve identity classification. Images
    without a usable box (no row, zero or negative size, entirely outside the image) are used uncropped and
    counted in a warning.
    """
    root = Path(root)
    boxes_csv = root / "bb_landmark" / "loose_bb_train.csv"
    layout = "VGGFace2's layout train/nXXXXXX/NNNN_NN.jpg with bb_landmark/loose_bb_train.csv (NAME_ID,X,Y,W,H)"
    if not boxes_csv.exists():
        raise DataError(f"{root}: no bounding-box file {boxes_csv.relative_to(root)}; expected {layout}")
    if not (root / "train").is_dir():
        raise DataError(f"{root}: no train/ folder; expected {layout}")
    boxes = _read_boxes(boxes_csv)
    folders = sorted(d for d in (root / "train").iterdir() if d.is_dir() and _IDENTITY.match(d.name))
    files = {d.name: _list_images(d) for d in folders}
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
    n_nobox = sum(k not in boxes for k in keys)
    if n_nobox:
        _warn(f"{n_nobox} image(s) have no row in {boxes_csv.name}; used uncropped")
    unusable = [k for k in keys if k in boxes and boxes[k] is None]
    if unusable:
        _warn(f"{len(unusable)} box(es) in {boxes_csv.name} have zero or negative size or are not numbers "
              f"(first: {unusable[0]}); those images are used uncropped")
    images, ok, native = _read_many(paths, image_size, [boxes.get(k) for k in keys], what=str(root / "train"))
    labels = np.asarray(labels, dtype=np.int64)[ok]
    data = TaskData("", names, images, labels, stratified_split(labels, seed, classes=names), f"vggface2:{root}",
                    native_size=native, label_kind="identity")
    return _drop_untrainable(data, str(root / "train"))


def load_cache(folder) -> TaskData:
    """A folder written by `TaskData.save` (memory-mapped, so data larger than memory works)."""
    folder = Path(folder)

    def damaged(problem):
        return DataError(f"{folder}: {problem}; expected a cache as vggface2.py writes it (images.npy (N, H, W, 3) "
                         f"uint8, labels.npy, split.npy with 0 train / 1 val / 2 test, meta.json); write it again "
                         f"with vggface2.py")

    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise damaged(f"meta.json is not readable JSON ({e})") from None
    classes = meta.get("classes") if isinstance(meta, dict) else None
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)
            and len(set(classes)) == len(classes)):
        raise damaged("meta.json lacks 'classes', a list of distinct class names")
    extra_keys = meta.get("extra", [])
    if not (isinstance(extra_keys, list) and all(isinstance(k, str) and re.fullmatch(r"\w+", k) for k in extra_keys)):
        raise damaged("meta.json's 'extra' is not a list of array names")
    arrays = {}
    for key in ["images", "labels", "split"] + [f"extra_{k}" for k in extra_keys]:
        try:  # allow_pickle stays off: a cache holds plain arrays, never objects to unpickle
            arrays[key] = np.load(folder / f"{key}.npy", mmap_mode="r" if key == "images" else None)
        except (OSError, ValueError) as e:
            raise damaged(f"{key}.npy is not a readable array ({e})") from None
    images, labels, split = arrays["images"], arrays["labels"], arrays["split"]
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8 or 0 in images.shape[1:3]:
        raise damaged(f"images.npy is {images.dtype} of shape {images.shape}")
    for key, values in arrays.items():
        if key != "images" and (values.ndim == 0 or len(values) != len(images)):
            raise damaged(f"{key}.npy has shape {values.shape}, not one entry for each of the {len(images)} images")
    for key, values, top in (("labels", labels, len(classes) - 1), ("split", split, 2)):
        if values.ndim != 1 or values.dtype.kind not in "iu":
            raise damaged(f"{key}.npy is {values.dtype} of shape {values.shape}, not one integer per image")
        wrong = np.unique(values[(values < 0) | (values > top)])
        if len(wrong):
            raise damaged(f"{key}.npy holds {_few(wrong.tolist())}, outside 0..{top}"
                          + (f" (meta.json names {len(classes)} classes)" if key == "labels" else ""))
    extra = {k: arrays[f"extra_{k}"] for k in extra_keys}
    native = meta.get("native_size")
    native = native if isinstance(native, int) and not isinstance(native, bool) and native > 0 else None
    # label_kind and extra_classes came later: a cache written before them loads with the defaults
    label_kind = meta.get("label_kind", "")
    if not isinstance(label_kind, str):
        raise damaged(f"meta.json's 'label_kind' is {label_kind!r}, not a string such as \"identity\"")
    extra_classes = meta.get("extra_classes", {})
    if not (isinstance(extra_classes, dict)
            and all(k in extra and isinstance(v, list) and all(isinstance(c, str) for c in v)
                    for k, v in extra_classes.items())):
        raise damaged("meta.json's 'extra_classes' is not a mapping from names in 'extra' to lists of class names")
    for key, names in extra_classes.items():  # a label beyond its class list would name no class
        values = extra[key]
        if values.dtype.kind not in "iu" or (len(values) and (values.min() < 0 or values.max() >= len(names))):
            raise damaged(f"extra_{key}.npy is not integer labels within 0..{len(names) - 1} (meta.json names "
                          f"{len(names)} {key} classes)")
    data = TaskData(str(meta.get("name", "")), classes, images, labels.astype(np.int64), split.astype(np.int8),
                    str(meta.get("source", "")), extra, native or int(images.shape[1]), label_kind, extra_classes)
    return _drop_untrainable(data, str(folder))


# ----------------------------------------------------------------------------------------------------------
# the offline demo set


DEMO_OBJECTS = ("disc", "square", "triangle", "cross", "ring", "star", "stripes", "checker", "dots", "bar")
DEMO_EXPRESSIONS = ("neutral", "happy", "sad", "surprised")


def _ellipse(u, v, cx, cy, rx, ry):
    return ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 <= 1.0


def _paint(img, mask, colour):
    img[mask] = colour


def _demo_face(u, v, ident, expression, rng):
    """Paint one face in face coordinates (u, v in about [-1, 1]); identity fixes geometry and colours."""
    h, w = u.shape
    img = np.empty((h, w, 3), np.float32)
    img[:] = rng.uniform(0.1, 0.9, 3)  # background colour varies per image
    p = ident
    _paint(img, _ellipse(u, v, 0, -0.25, p["face_w"] * 1.08, p["face_h"] * 0.75) & (v < -0.1), p["hair"])
    _paint(img, _ellipse(u, v, 0, 0, p["face_w"], p["face_h"]), p["skin"])
    if p["fringe"]:
        _paint(img, _ellipse(u, v, 0, -p["face_h"] * 0.85, p["face_w"] * 0.8, 0.18), p["hair"])
    raise_brow = 0.06 * expression["brow"]
    for side in (-1, 1):
        ex = side * p["eye_dx"]
        _paint(img, _ellipse(u, v, ex, p["eye_y"], p["eye_r"] * 1.4, p["eye_r"] * (1.0 + 0.4 * expression["eyes"])),
               (0.95, 0.95, 0.95))
        _paint(img, _ellipse(u, v, ex, p["eye_y"], p["eye_r"] * 0.7, p["eye_r"] * 0.7), p["iris"])
        by = p["eye_y"] - p["eye_r"] * 2.2 - raise_brow
        tilt = (u - ex) * side * (p["brow_tilt"] - 0.3 * expression["brow"])
        _paint(img, (np.abs(u - ex) < p["eye_r"] * 1.8) & (np.abs(v - by - tilt) < p["brow_t"]), p["hair"] * 0.6)
    nose = (v > p["eye_y"]) & (v < p["eye_y"] + p["nose_len"]) & \
           (np.abs(u) < p["nose_w"] * (v - p["eye_y"]) / p["nose_len"])
    _paint(img, nose, p["skin"] * 0.75)
    my = p["eye_y"] + p["nose_len"] + 0.15
    curve = expression["smile"] * 0.5 * (u / p["mouth_w"]) ** 2
    mouth = (np.abs(u) < p["mouth_w"]) & (np.abs(v - my + expression["smile"] * 0.08 - curve)
                                          < 0.03 + 0.09 * expression["open"])
    _paint(img, mouth, (0.55, 0.12, 0.15))
    return img


def _face_identity(rng):
    skin_base = rng.uniform(0.3, 0.95)
    return {
        "face_w": rng.uniform(0.48, 0.62), "face_h": rng.uniform(0.62, 0.78),
        "skin": np.array([skin_base, skin_base * rng.uniform(0.7, 0.85), skin_base * rng.uniform(0.55, 0.75)]),
        "hair": rng.uniform(0.0, 0.7, 3), "fringe": bool(rng.random() < 0.5),
        "eye_dx": rng.uniform(0.17, 0.27), "eye_y": rng.uniform(-0.22, -0.08), "eye_r": rng.uniform(0.045, 0.075),
        "iris": rng.uniform(0.0, 0.6, 3), "brow_tilt": rng.uniform(-0.3, 0.3), "brow_t": rng.uniform(0.015, 0.035),
        "nose_len": rng.uniform(0.15, 0.3), "nose_w": rng.uniform(0.05, 0.11), "mouth_w": rng.uniform(0.1, 0.22),
    }


_EXPRESSION_SHAPES = {  # smile: mouth curvature, open: mouth opening, brow: raised brows, eyes: widened eyes
    "neutral": dict(smile=0.0, open=0.0, brow=0.0, eyes=0.0),
    "happy": dict(smile=1.0, open=0.3, brow=0.2, eyes=-0.2),
    "sad": dict(smile=-0.8, open=0.0, brow=-0.8, eyes=-0.1),
    "surprised": dict(smile=0.0, open=1.0, brow=1.0, eyes=0.6),
}


_LUMA = np.array([0.299, 0.587, 0.114])


def _demo_object(u, v, kind, rng):
    h, w = u.shape
    img = np.empty((h, w, 3), np.float32)
    bg = rng.uniform(0.0, 1.0, 3)
    img[:] = bg
    fg = rng.uniform(0.0, 1.0, 3)
    while abs(_LUMA @ (fg - bg)) < 0.3:  # visible against its background, in grey too
        fg = rng.uniform(0.0, 1.0, 3)
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    inside = r < 0.8  # textures fill a disc-shaped patch
    if kind == "disc":
        m = r < 0.6
    elif kind == "square":
        m = np.maximum(np.abs(u), np.abs(v)) < 0.5
    elif kind == "triangle":
        m = (v < 0.45) & (v > -0.6 + 1.8 * np.abs(u))
    elif kind == "cross":
        m = ((np.abs(u) < 0.17) & (np.abs(v) < 0.65)) | ((np.abs(v) < 0.17) & (np.abs(u) < 0.65))
    elif kind == "ring":
        m = (r > 0.35) & (r < 0.62)
    elif kind == "star":
        m = r < 0.3 + 0.32 * np.maximum(0, np.cos(5 * theta))
    elif kind == "stripes":
        m = inside & (np.sin(u * rng.uniform(12, 18)) > 0)
    elif kind == "checker":
        f = rng.uniform(8, 12)
        m = inside & ((np.sin(u * f) > 0) ^ (np.sin(v * f) > 0))
    elif kind == "dots":
        f = rng.uniform(12, 16)
        m = inside & (np.sin(u * f) * np.sin(v * f) > 0.5)
    elif kind == "bar":
        m = (np.abs(u) < 0.75) & (np.abs(v) < 0.14)
    else:
        raise ValueError(kind)
    img[m] = fg
    return img


def make_demo(kind: str, n_classes: int = 10, per_class: int = 100, image_size: int = 64, seed: int = 0) -> TaskData:
    """The procedural offline set: 'faces' (identities), 'expression' (the same faces labelled by expression)
    or 'objects' (10 shape and texture classes). Deterministic for a seed.

    Each face identity is fixed geometry and colour (outline, eye spacing and size, nose, mouth, brows, skin,
    hair); every image adds position, scale, rotation, lighting, noise and one of four expressions, which is
    stored per image in `extra['expression']` either way.
    """
    if kind not in ("faces", "objects", "expression"):
        raise DataError(f"demo:{kind}: unknown demo set; expected demo:faces, demo:objects or demo:expression")
    if kind == "objects":
        n_classes = min(n_classes, len(DEMO_OBJECTS))
        classes = list(DEMO_OBJECTS[:n_classes])
    elif kind == "expression":
        n_classes = min(n_classes, len(DEMO_EXPRESSIONS))
        classes = list(DEMO_EXPRESSIONS[:n_classes])
    else:
        classes = [f"id{i:03d}" for i in range(n_classes)]
    if n_classes < 2 or per_class < 1:
        raise DataError(f"demo:{kind}: needs at least 2 classes and 1 image per class")
    # draw at a fixed working resolution, then resize, so a demo set looks the same at any image_size
    draw = 64 if image_size <= 64 else image_size
    grid = (np.arange(draw, dtype=np.float32) + 0.5) / draw * 2 - 1
    gy, gx = np.meshgrid(grid, grid, indexing="ij")
    identities = [_face_identity(np.random.default_rng([seed, 7, i])) for i in range(n_classes)]
    n_ident_faces = n_classes if kind == "faces" else 12
    if kind == "expression":  # expression sets show many people, each with every expression
        identities = [_face_identity(np.random.default_rng([seed, 7, i])) for i in range(n_ident_faces)]
    images = np.empty((n_classes * per_class, draw, draw, 3), np.uint8)
    labels = np.repeat(np.arange(n_classes), per_class)
    expressions = np.zeros(len(labels), np.int64)
    rng = np.random.default_rng([seed, 11, {"faces": 0, "objects": 1, "expression": 2}[kind]])
    for i, label in enumerate(labels):
        angle = rng.uniform(-0.35, 0.35) if kind != "objects" else rng.uniform(-np.pi, np.pi)
        scale = rng.uniform(0.8, 1.1) if kind != "objects" else rng.uniform(0.7, 1.05)
        dx, dy = rng.uniform(-0.15, 0.15, 2)
        c, s = np.cos(angle), np.sin(angle)
        u = (c * (gx - dx) + s * (gy - dy)) / scale
        v = (-s * (gx - dx) + c * (gy - dy)) / scale
        if kind == "objects":
            img = _demo_object(u, v, classes[label], rng)
        else:
            expr = int(label) if kind == "expression" else int(rng.integers(len(DEMO_EXPRESSIONS)))
            who = identities[int(rng.integers(len(identities)))] if kind == "expression" else identities[label]
            expressions[i] = expr
            jitter = {k: val * rng.uniform(0.7, 1.0) for k, val in _EXPRESSION_SHAPES[DEMO_EXPRESSIONS[expr]].items()}
            img = _demo_face(u, v, who, jitter, rng)
        # lighting: a random linear gradient and overall gain, then sensor noise
        light = rng.uniform(0.7, 1.2) + rng.uniform(-0.25, 0.25) * gx + rng.uniform(-0.25, 0.25) * gy
        img = img * light[..., None] + rng.normal(0, 0.04, img.shape)
        images[i] = np.clip(img * 255, 0, 255).astype(np.uint8)
    if draw != image_size:
        images = resize_images(images, image_size)
    split = stratified_split(labels, seed, classes=classes)
    extra = {} if kind == "objects" else {"expression": expressions}
    # the faces carry both labels (identity as `labels`, expression in extra), so one set of demo faces can
    # serve an identity and an expression task (task_view); objects are generic categories ("")
    label_kind = {"faces": "identity", "expression": "expression", "objects": ""}[kind]
    extra_classes = {} if kind == "objects" else {"expression": list(DEMO_EXPRESSIONS)}
    return TaskData("", classes, images, labels.astype(np.int64), split, source=f"demo:{kind}", extra=extra,
                    native_size=draw, label_kind=label_kind, extra_classes=extra_classes)


# ----------------------------------------------------------------------------------------------------------
# the experiment's control data sets


PSEUDO_TASKS = ("pseudo_a", "pseudo_b")


def pseudo_tasks(datasets: dict, seed: int) -> dict:
    """The pseudo-task control of Dobs et al. 2022: the union of all tasks' classes split at random (seeded)
    into two halves of equal size (the first one class larger when the count is odd), each half a task over the
    images of its classes, with their splits. A network trained on such a pair shows how much "specialisation"
    any split of the same images produces. Class names become '<task>:<class>'."""
    pool = [(task, k) for task, d in datasets.items() for k in range(len(d.classes))]
    if len(pool) < 4:
        raise DataError(f"pseudo_task control: the tasks have {len(pool)} classes in all; two pseudo-tasks need at "
                        f"least 4")
    order = np.random.default_rng([seed, 31]).permutation(len(pool))
    half = (len(pool) + 1) // 2
    sources = " + ".join(d.source for d in datasets.values())
    out = {}
    for name, group in zip(PSEUDO_TASKS, (np.sort(order[:half]), np.sort(order[half:]))):
        images, labels, split, classes = [], [], [], []
        for new_label, g in enumerate(group):
            task, k = pool[g]
            d = datasets[task]
            idx = np.flatnonzero(d.labels == k)
            images.append(np.asarray(d.images[idx]))
            labels.append(np.full(len(idx), new_label, dtype=np.int64))
            split.append(d.split[idx])
            classes.append(f"{task}:{d.classes[k]}")
        # a pseudo-task's classes mix the tasks' classes, so its labels are of no one kind (label_kind ""), and
        # the tasks' extra arrays are not carried (no extra_classes either)
        out[name] = TaskData(name, classes, np.concatenate(images), np.concatenate(labels),
                             np.concatenate(split).astype(np.int8), f"pseudo_task({sources})", label_kind="")
    return out


def same_task(data: TaskData, seed: int) -> dict:
    """The same-task control: one task's images dealt in two halves to two tasks, `<name>_a` and `<name>_b`, each
    split's images, shuffled within each class (seeded), dealt alternately, so that both learn the same classes
    from the same kind of images at the same chance level. Every filter useful to one is useful to the other: a
    network trained on the pair shows how much "specialisation" two readouts of one task produce (two heads
    lean on different filters even then; benchmarks/verdict_calibration.py). Labels, classes and the task's
    extra arrays are kept; each class of each split is dealt one image apart at most."""
    rng = np.random.default_rng([seed, 47])
    halves = ([], [])
    for s in np.unique(data.split):  # one deal per split, running on from class to class, so that a split with
        # one image per class still gives both heads half of its images
        dealt = np.concatenate([rng.permutation(np.flatnonzero((data.labels == label) & (data.split == s)))
                                for label in np.unique(data.labels)])
        halves[0].append(dealt[0::2])
        halves[1].append(dealt[1::2])
    out = {}
    for suffix, parts in zip(("a", "b"), halves):
        idx = np.sort(np.concatenate(parts))
        name = f"{data.name}_{suffix}"
        out[name] = TaskData(name, list(data.classes), np.ascontiguousarray(data.images[idx]), data.labels[idx].copy(),
                             data.split[idx].copy(), f"same_task({data.source}, half {suffix})",
                             extra={k: np.asarray(v)[idx] for k, v in data.extra.items()},
                             native_size=data.native_size, label_kind=data.label_kind,
                             extra_classes=dict(data.extra_classes))
    return out


def match_resolution(datasets: dict, size: int | None = None) -> tuple:
    """The resolution-matched control: every task's images brought down to `size` pixels (default: the lowest
    native resolution among the tasks, e.g. CIFAR's 32) and back up to their image size (antialiased bilinear
    both ways), so that no task carries detail the others lack. Every task takes the same path, also the one
    already at that resolution. Returns ({task: TaskData}, size); images already at or below `size` stay."""
    natives = [d.native_size or d.image_size for d in datasets.values()]
    size = int(min(natives) if size is None else size)
    out = {}
    for task, d in datasets.items():
        if size >= d.image_size:
            out[task] = d
            continue
        images = resize_images(resize_images(d.images, size), d.image_size)
        # replace() keeps labels, split, extra, label_kind and extra_classes: only the images change
        out[task] = replace(d, images=images, source=f"{d.source} (matched to {size} px)",
                            native_size=min(size, d.native_size or d.image_size))
    return out, size


# ----------------------------------------------------------------------------------------------------------
# batches on the device


def to_float(batch_uint8: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1]."""
    x = batch_uint8.permute(0, 3, 1, 2).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def augment(x: torch.Tensor, generator: torch.Generator | None = None, pad_fraction: float = 0.125,
            grayscale_p: float = 0.2) -> torch.Tensor:
    """Random crop (reflect-padded), horizontal flip and random grayscale on a whole float batch (B, 3, H, W)."""
    b, _, h, w = x.shape
    dev = x.device
    pad = max(1, int(round(h * pad_fraction)))
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device="cpu").to(dev)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device="cpu").to(dev)
    iy = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None].expand(b, 3, h, w)
    ix = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :].expand(b, 3, h, w)
    rows = torch.gather(padded, 2, iy[..., :1].expand(b, 3, h, padded.shape[3]))
    out = torch.gather(rows, 3, ix)
    flip = (torch.rand(b, generator=generator) < 0.5).to(dev)
    out = torch.where(flip[:, None, None, None], out.flip(3), out)
    gray = (torch.rand(b, generator=generator) < grayscale_p).to(dev)
    lum = (out * torch.tensor([0.299, 0.587, 0.114], device=dev, dtype=out.dtype)[None, :, None, None]).sum(1, keepdim=True)
    return torch.where(gray[:, None, None, None], lum.expand_as(out), out)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - NORM_MEAN) / NORM_STD


# ----------------------------------------------------------------------------------------------------------
# command line: preprocess VGGFace2 (or any source) into a cache folder


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 2 from main, not argparse's usage block
        raise DataError(f"{message} (python vggface2.py --help lists the arguments)")


def _flag(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _check_arguments(args) -> None:
    """Whole numbers in range, and an --out that can neither be nor hold nor sit inside --root."""
    for name, value, low in (("image_size", args.image_size, 1), ("identities", args.identities, 2),
                             ("per_identity", args.per_identity, 1), ("seed", args.seed, 0)):
        if value is not None and value < low:
            raise DataError(f"--{name}={value}: expected a whole number of at least {low}")
    if args.root.startswith("demo"):
        return
    root, out = Path(args.root).expanduser().resolve(), Path(args.out).expanduser().resolve()
    for p in (out, *_beside(out)):  # a save writes <out>.tmp and <out>.old too, and removes them
        if p == root or root in p.parents or p in root.parents:
            where = "is" if p == root else "lies inside" if root in p.parents else "contains"
            raise DataError(f"--out={args.out}: {p} {where} --root={args.root}; the cache is never written inside "
                            f"the raw data or in its place: choose an --out outside {root}")


def main(argv=None) -> int:
    parser = _Parser(description="Preprocess VGGFace2 (or any source) into a cache folder.")
    parser.add_argument("--root", required=True, help="VGGFace2 root (train/, bb_landmark/), a CIFAR-10 root, "
                        "FER2013's fer2013.csv, a KDEF root, VoxCeleb frames, a class-folder tree, or 'demo'")
    parser.add_argument("--out", required=True, help="cache folder to write (new or empty, or an earlier cache "
                        "with --overwrite); never inside --root")
    parser.add_argument("--overwrite", type=_flag, nargs="?", const=True, default=False,
                        help="replace an earlier cache in --out (never a folder that is not a cache)")
    parser.add_argument("--image_size", type=int, default=112, help="side of the square images in pixels")
    parser.add_argument("--identities", type=int, default=None, help="number of identities (classes); all if unset")
    parser.add_argument("--per_identity", type=int, default=None, help="images per identity; all if unset")
    parser.add_argument("--task", default="face", help="task name stored with the data")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling and the train/val/test split")
    parser.add_argument("--lfw_crop", type=_flag, default=True, help="crop LFW's photographs to the face "
                        "(LFWcrop's box enlarged by 30%%); False keeps the whole 250-px frame")
    try:
        args = parser.parse_args(argv)
        _check_arguments(args)
        out = Path(args.out).expanduser()
        _check_out(out, args.overwrite)  # before the long read, so a refused --out costs nothing
        data = load_task(args.root, args.task, args.image_size, max_per_class=args.per_identity,
                         max_classes=args.identities, seed=args.seed, lfw_crop=args.lfw_crop)
        try:
            data.save(out, overwrite=args.overwrite)
        except OSError as e:  # permissions, a full disk
            raise DataError(f"--out: cannot write {out} ({e}); choose a writable --out with enough space") from None
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = data.counts()
    print(f"wrote {out}: {len(data.classes)} classes, {c['train']} train / {c['val']} val / {c['test']} test "
          f"images at {data.image_size} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
