"""The offline demo set: procedural faces (identities), expressions and objects, drawn at any size, so that
everything runs without a download."""
from __future__ import annotations

import numpy as np

from dualtask.data.images import resize_images
from dualtask.data.taskdata import DataError, TaskData, stratified_split

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


def _demo_classes(kind: str, n_classes: int) -> tuple[int, list]:
    """(n_classes, class names) of a demo set: objects and expressions are capped at the kinds there are."""
    if kind == "objects":
        n_classes = min(n_classes, len(DEMO_OBJECTS))
        return n_classes, list(DEMO_OBJECTS[:n_classes])
    if kind == "expression":
        n_classes = min(n_classes, len(DEMO_EXPRESSIONS))
        return n_classes, list(DEMO_EXPRESSIONS[:n_classes])
    return n_classes, [f"id{i:03d}" for i in range(n_classes)]


def _demo_image(kind: str, label: int, classes: list, identities: list, gx, gy, rng) -> tuple[np.ndarray, int]:
    """One demo image (uint8, at the drawing resolution of gx, gy) and its expression index (0 for objects):
    a random pose, the object or face, then lighting and noise. The draws from `rng` come in a fixed order, so
    a set is the same for a seed."""
    angle = rng.uniform(-0.35, 0.35) if kind != "objects" else rng.uniform(-np.pi, np.pi)
    scale = rng.uniform(0.8, 1.1) if kind != "objects" else rng.uniform(0.7, 1.05)
    dx, dy = rng.uniform(-0.15, 0.15, 2)
    c, s = np.cos(angle), np.sin(angle)
    u = (c * (gx - dx) + s * (gy - dy)) / scale
    v = (-s * (gx - dx) + c * (gy - dy)) / scale
    expr = 0
    if kind == "objects":
        img = _demo_object(u, v, classes[label], rng)
    else:
        expr = int(label) if kind == "expression" else int(rng.integers(len(DEMO_EXPRESSIONS)))
        who = identities[int(rng.integers(len(identities)))] if kind == "expression" else identities[label]
        jitter = {k: val * rng.uniform(0.7, 1.0) for k, val in _EXPRESSION_SHAPES[DEMO_EXPRESSIONS[expr]].items()}
        img = _demo_face(u, v, who, jitter, rng)
    # lighting: a random linear gradient and overall gain, then sensor noise
    light = rng.uniform(0.7, 1.2) + rng.uniform(-0.25, 0.25) * gx + rng.uniform(-0.25, 0.25) * gy
    img = img * light[..., None] + rng.normal(0, 0.04, img.shape)
    return np.clip(img * 255, 0, 255).astype(np.uint8), expr


def make_demo(kind: str, n_classes: int = 10, per_class: int = 100, image_size: int = 64, seed: int = 0) -> TaskData:
    """The procedural offline set: 'faces' (identities), 'expression' (the same faces labelled by expression)
    or 'objects' (10 shape and texture classes). Deterministic for a seed.

    Each face identity is fixed geometry and colour (outline, eye spacing and size, nose, mouth, brows, skin,
    hair); every image adds position, scale, rotation, lighting, noise and one of four expressions, which is
    stored per image in `extra['expression']` either way.
    """
    if kind not in ("faces", "objects", "expression"):
        raise DataError(f"demo:{kind}: unknown demo set; expected demo:faces, demo:objects or demo:expression")
    n_classes, classes = _demo_classes(kind, n_classes)
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
        images[i], expressions[i] = _demo_image(kind, label, classes, identities, gx, gy, rng)
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
