"""The image reading, resizing and face cropping the data sources share: any image file to an RGB array
(`decode_image`), cropped as asked (a box, OpenCV's face detector, the five-point alignment) and resized
(`read_image`), many of them in threads with one warning per kind of trouble (`read_many`), and whole uint8
batches resized (`resize_images`). Knows nothing of the data format (taskdata.py, which lies above it)."""
from __future__ import annotations

import math
import os
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dualtask.data.errors import DataError, warn_data

VGGFACE2_BOX_MARGIN = 0.3  # the dataset authors enlarge the loose box by 30% before cropping


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


DETECT = "detect"  # a crop (see read_image) that asks for the face the detector finds
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
    """A crop (see read_image): five facial points (x1, y1, ..., x5, y5) in pixels, in VGGFace2's order (left eye,
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
    ignores it; every other format by PIL, whose modes `to_rgb` scales (16-bit, float, transparency)."""
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
    """Decode and crop images (`read_image`; `crops`: one per path, or None for whole images) in threads (OpenCV
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
        warn_data(f"no face found in {len(notes['no face'])} of {detected} image(s) in {what}; those images are used "
                  f"whole (first: {notes['no face'][0]})")
    if notes["unaligned"]:
        warn_data(f"{len(notes['unaligned'])} of {aligned} image(s) in {what} have landmarks no similarity transform "
                  f"fits; those images are cropped to their box, or used whole without one (first: "
                  f"{notes['unaligned'][0]})")
    images = np.stack([a for a in arrays if a is not None]) if ok.any() else np.zeros((0, size, size, 3), np.uint8)
    natives = [n for a, _, n in results if a is not None]
    return images, ok, int(np.median(natives)) if natives else None
