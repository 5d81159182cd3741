"""The one format every data source becomes: `TaskData` (uint8 images (N, H, W, 3), int64 labels, class names,
a split per image: 0 train, 1 val, 2 test), its cache folder (images.npy, labels.npy, split.npy, meta.json,
loaded memory-mapped), the stratified split and the caps on classes and images, and the image reading, resizing
and face cropping the sources share (OpenCV's face detector, the five-point alignment). The ground of the data
modules: it imports none of them.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import threading
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
# how face photographs are cropped (the face_crop setting): "boxes", the source's own face boxes (VGGFace2's loose
# boxes, LFW's fixed box) enlarged by VGGFACE2_BOX_MARGIN; "detect", the largest face OpenCV's detector finds,
# enlarged likewise; "align", VGGFace2's five landmarks mapped onto a fixed template; "none", the whole images
FACE_CROPS = ("boxes", "detect", "align", "none")
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


def warn_data(message: str) -> None:
    """One 'warning: ...' line on stderr: data loaded, but not quite as given."""
    print(f"warning: {message}", file=sys.stderr)


def few(names, k: int = 5) -> str:
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


def _square_resize(img: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side of an (H, W, 3) array to `size` and crop the centre square. OpenCV's area averaging
    when shrinking (each output pixel the mean of the pixels it covers: no aliasing), bilinear when enlarging."""
    import cv2

    h, w = img.shape[:2]
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.ascontiguousarray(img[top:top + size, left:left + size])


def to_rgb(im):
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


def crop_box(box, width: int, height: int):
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


# ----------------------------------------------------------------------------------------------------------
# face crops: OpenCV's face detector and the five-point alignment


DETECT = "detect"  # a crop (see _read_image) that asks for the face the detector finds
FACE_CASCADE = "haarcascade_frontalface_default.xml"  # OpenCV's frontal-face Haar cascade, shipped in cv2.data
# the detector looks at a copy whose shorter side is at most DETECT_SIDE pixels, so it finds faces of at least 15% of
# that side (its 24-px window) in a photograph of any size, at 60% of the time the 250-px LFW frames take (and the
# same rate); the scale step and neighbour count are OpenCV's usual values. On ../shared/data/lfw_min20 it finds a
# face in 3,010 of 3,023 frames (BENCHMARKS.md, benchmarks/cache_reader.py)
DETECT_SIDE = 160
DETECT_SCALE_FACTOR = 1.1
DETECT_MIN_NEIGHBORS = 5
# ArcFace's five-point template (Deng et al. 2019, insightface) in its 112 x 112 frame, in VGGFace2's order: left
# eye, right eye, nose tip, left and right mouth corners (left and right as seen in the image)
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                             [70.7299, 92.2041]])
_detectors = threading.local()  # one detector per reading thread: OpenCV does not promise that one can be shared


@dataclass(frozen=True)
class Landmarks:
    """A crop (see _read_image): five facial points (x1, y1, ..., x5, y5) in pixels, in VGGFace2's order (left eye,
    right eye, nose, mouth left, mouth right), the face aligned on them; `box` is the crop used when no
    similarity fits them (None: the whole image)."""

    points: tuple
    box: tuple | None = None


def _face_detector():
    """This thread's copy of OpenCV's frontal-face cascade (DataError when OpenCV lacks it)."""
    import cv2

    detector = getattr(_detectors, "cascade", None)
    if detector is None:
        path = os.path.join(getattr(getattr(cv2, "data", None), "haarcascades", ""), FACE_CASCADE)
        detector = cv2.CascadeClassifier(path) if hasattr(cv2, "CascadeClassifier") else None
        if detector is None or detector.empty():
            raise DataError(f"face_crop='detect': OpenCV {cv2.__version__} has no frontal-face cascade ({path}); "
                            f"expected opencv-python-headless 4.x, which ships it: pip install -r requirements.txt")
        _detectors.cascade = detector
    return detector


def detect_face(img: np.ndarray):
    """The largest face OpenCV's frontal-face cascade finds in an (H, W, 3) RGB array, as a box (x, y, w, h) in
    pixels, or None when it finds none."""
    import cv2

    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    scale = min(1.0, DETECT_SIDE / min(grey.shape))
    if scale < 1:
        grey = cv2.resize(grey, (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale))),
                          interpolation=cv2.INTER_AREA)
    faces = _face_detector().detectMultiScale(grey, scaleFactor=DETECT_SCALE_FACTOR, minNeighbors=DETECT_MIN_NEIGHBORS)
    if len(faces) == 0:
        return None
    x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
    return x / scale, y / scale, w / scale, h / scale


def face_template(size: int) -> np.ndarray:
    """Where an aligned face's five points lie in a size x size image, (5, 2) in pixels: ArcFace's template, its
    112-px frame enlarged by VGGFACE2_BOX_MARGIN (a face as loose as the boxes' crops), scaled to `size`."""
    return ((ARCFACE_TEMPLATE / 112 - 0.5) / (1 + VGGFACE2_BOX_MARGIN) + 0.5) * size


def align_face(img: np.ndarray, points, size: int):
    """The face of an (H, W, 3) array aligned on its five points (x1, y1, ..., x5, y5): the similarity transform
    (rotation, uniform scale, shift) that maps them closest onto `face_template(size)` (least squares), applied by
    OpenCV's warpAffine; what falls outside the image is black. Returns (the size x size array, the side in
    pixels of the image region it shows), or None when the points are not finite or no similarity fits them."""
    import cv2

    src = np.asarray(points, dtype=np.float64).reshape(5, 2)
    if not np.isfinite(src).all():
        return None
    # a threshold as large as the output keeps every point an inlier, so the refined fit is the least-squares
    # similarity over all five points (as ArcFace's alignment), not a subset's
    matrix, _ = cv2.estimateAffinePartial2D(src.astype(np.float32), face_template(size).astype(np.float32),
                                            method=cv2.RANSAC, ransacReprojThreshold=float(size))
    if matrix is None or not np.isfinite(matrix).all():
        return None
    scale = math.sqrt(abs(np.linalg.det(matrix[:, :2])))
    if not scale > 1e-6:
        return None
    region = size / scale
    if scale < 1:  # shrinking: average the pixels down first (warpAffine alone would alias), then warp at ~1:1
        h, w = img.shape[:2]
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
        matrix = matrix.copy()
        matrix[:, 0] *= w / nw
        matrix[:, 1] *= h / nh
    face = cv2.warpAffine(img, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(0, 0, 0))
    return face, max(1, int(round(region)))


def decode_image(path: Path):
    """The image file as an (H, W, 3) uint8 RGB array. JPEG files (told by their first bytes, whatever their name)
    are decoded by OpenCV, faster than PIL (benchmarks/cache_reader.py), with the EXIF orientation ignored as PIL
    ignores it; every other format by PIL, whose modes `_to_rgb` scales (16-bit, float, transparency)."""
    import io

    import cv2
    from PIL import Image

    data = np.fromfile(path, dtype=np.uint8)
    if data[:2].tobytes() == b"\xff\xd8":
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if bgr is not None:
            return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    with Image.open(io.BytesIO(data.tobytes())) as im:  # a JPEG OpenCV refused gets PIL's judgement too
        return np.asarray(to_rgb(im))


def read_image(path: Path, size: int, crop=None):
    """Decode one image and bring it to a (size, size, 3) uint8 array, cropped as `crop` says:

    - None: the whole image;
    - a box (x, y, w, h) in pixels, or a FractionBox: that box enlarged by VGGFACE2_BOX_MARGIN, clipped to the image;
    - DETECT: the largest face OpenCV's detector finds (`detect_face`), enlarged and clipped likewise;
    - Landmarks: the face aligned on its five points (`align_face`).

    Returns the array (None when the image cannot be read); what went otherwise than asked, the image then used
    whole or, for landmarks, cropped to their box: "" (nothing), "outside" (the box lay outside the image),
    "no face" (none found) or "unaligned" (no similarity fits the points); and the shorter side in pixels of
    what was resized (the crop's, or for an alignment the side of the image region it shows).
    """
    try:
        img = decode_image(path)
        note = ""
        if isinstance(crop, Landmarks):
            aligned = align_face(img, crop.points, size)
            if aligned is not None:
                return aligned[0], "", aligned[1]
            note, crop = "unaligned", crop.box
        elif isinstance(crop, str) and crop == DETECT:
            crop = detect_face(img)
            note = "no face" if crop is None else ""
        if crop is not None:
            rect = crop_box(crop, img.shape[1], img.shape[0])
            if rect is None:
                note = note or "outside"
            else:
                left, top, right, bottom = rect
                img = img[top:bottom, left:right]
        return _square_resize(img, size), note, min(img.shape[:2])
    except Exception:  # PIL and OpenCV raise many types for damaged files; any of them means "skip this image"
        return None, "", 0


def read_many(paths, size: int, crops=None, what: str = "images"):
    """Decode and crop images (`_read_image`; `crops`: one per path, or None for whole images) in threads (OpenCV
    and PIL release the GIL while decoding); skip unreadable ones with a warning, and count in warnings the
    images cropped otherwise than asked. Returns the images, which paths were read, and the median shorter side
    of what was resized."""
    import cv2
    from tqdm import tqdm

    crops = crops if crops is not None else [None] * len(paths)
    if any(isinstance(c, str) and c == DETECT for c in crops):
        _face_detector()  # a detector that cannot load is one clear error, not every image "unreadable"
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # the pool's threads keep the cores busy: OpenCV's own threads would only compete
    try:
        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) + 2)) as pool:
            results = list(tqdm(pool.map(lambda pc: read_image(pc[0], size, pc[1]), zip(paths, crops)),
                                total=len(paths), desc=f"reading {what}", leave=False,
                                disable=True if len(paths) < 500 else None))
    finally:
        cv2.setNumThreads(threads)
    arrays = [a for a, _, _ in results]
    ok = np.array([a is not None for a in arrays], dtype=bool)
    bad = [str(p) for p, a in zip(paths, arrays) if a is None]
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image(s) in {what}, e.g. {bad[0]}", stacklevel=2)
        print(f"warning: skipped {len(bad)} unreadable image(s) in {what} (first: {bad[0]})", file=sys.stderr)
    notes = {note: [str(p) for p, (_, n, _) in zip(paths, results) if n == note]
             for note in ("outside", "no face", "unaligned")}
    detected = sum(a is not None and isinstance(c, str) and c == DETECT for a, c in zip(arrays, crops))
    aligned = sum(a is not None and isinstance(c, Landmarks) for a, c in zip(arrays, crops))
    if notes["outside"]:
        warn_data(f"{len(notes['outside'])} face box(es) lie outside their image in {what}; those images are used "
              f"uncropped (first: {notes['outside'][0]})")
    if notes["no face"]:
        warn_data(f"no face found in {len(notes['no face'])} of {detected} image(s) in {what}; those images are used whole "
              f"(first: {notes['no face'][0]})")
    if notes["unaligned"]:
        warn_data(f"{len(notes['unaligned'])} of {aligned} image(s) in {what} have landmarks no similarity transform fits; "
              f"those images are cropped to their box, or used whole without one (first: {notes['unaligned'][0]})")
    images = np.stack([a for a in arrays if a is not None]) if ok.any() else np.zeros((0, size, size, 3), np.uint8)
    natives = [n for a, _, n in results if a is not None]
    return images, ok, int(np.median(natives)) if natives else None


def list_images(folder: Path):
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


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
            raise damaged(f"{key}.npy holds {few(wrong.tolist())}, outside 0..{top}"
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
    face_crop = meta.get("face_crop", "boxes")  # a cache from before the setting: VGGFace2's boxes, LFW's box
    if face_crop is not None and face_crop not in FACE_CROPS:
        raise damaged(f"meta.json's 'face_crop' is {face_crop!r}, not null or one of {', '.join(FACE_CROPS)}")
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
