"""The cache writer's image reading: PIL against OpenCV, and OpenCV's face detector on real photographs.

    python benchmarks/cache_reader.py [--data=../shared/data/lfw_min20] [--image_size=112] [--grid=/tmp/detect_grid.png]

Reads every photograph of a class-folder tree of faces (LFW's frames by default) the way the cache writer does for
face_crop="boxes": decode, crop to LFW's fixed face box enlarged by 30%, resize to image_size. Twice, in one
process, on one thread: by the PIL path the cache writer used until 2026-12-05 (PIL decodes, crops and resizes;
kept here as it was) and by the OpenCV path it uses now (`taskdata._read_image`: OpenCV decodes the JPEGs, crops
and resizes with area averaging). Each path is timed `--repeats` times over all images and its fastest pass
counts. It checks that both give nearly the same images (mean absolute pixel difference) and prints `speedup: X`
(PIL's time over OpenCV's).

Then face_crop="detect": the largest face OpenCV's frontal-face cascade finds in each photograph
(`image_io.detect_face`), printing `detected: k/n` and saving a grid of detect crops (`--grid`) to look at.
Prints `skipped: ...` and exits 0 when the data is absent (../shared/data is not part of the project).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

from dualtask.data import images as image_io
from dualtask.data import taskdata
from dualtask.data.folders import LFW_FACE_BOX
from dualtask.data.images import DETECT, FractionBox

ROOT = Path(__file__).resolve().parents[1]


def pil_read(path: Path, size: int, box):
    """The PIL path as the cache writer had it until 2026-12-05: decode, box enlarged by the margin, bilinear resize
    of the shorter side (PIL's reducing_gap: a box-filter reduction first when shrinking), centre square."""
    from PIL import Image

    with Image.open(path) as im:
        img = image_io.to_rgb(im)
        rect = image_io.crop_box(box, img.width, img.height)
        if rect is not None:
            img = img.crop(rect)
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def opencv_read(path: Path, size: int, box):
    return image_io.read_image(path, size, box)[0]


def timed(read, paths, size, box, repeats: int):
    """(fastest pass in seconds, the images of the last pass)."""
    best, images = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        images = [read(p, size, box) for p in paths]
        best = min(best, time.perf_counter() - start)
    return best, np.stack(images)


def grid(images: np.ndarray, found: list, columns: int = 6) -> np.ndarray:
    """The images in rows of `columns`, 2-px white gaps; those with no face found framed in red."""
    n, size = len(images), images.shape[1]
    rows = (n + columns - 1) // columns
    out = np.full((rows * (size + 2), columns * (size + 2), 3), 255, np.uint8)
    for k, (img, ok) in enumerate(zip(images, found)):
        img = img.copy()
        if not ok:
            img[:3], img[-3:], img[:, :3], img[:, -3:] = (255, 0, 0), (255, 0, 0), (255, 0, 0), (255, 0, 0)
        r, c = divmod(k, columns)
        out[r * (size + 2):r * (size + 2) + size, c * (size + 2):c * (size + 2) + size] = img
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "lfw_min20"),
                   help="a class-folder tree of face photographs (LFW's 250-px frames for the box crop)")
    p.add_argument("--image_size", type=int, default=112)
    p.add_argument("--limit", type=int, default=0, help="read only the first N images (0: all)")
    p.add_argument("--repeats", type=int, default=3, help="passes per path; the fastest counts")
    p.add_argument("--grid", default="/tmp/detect_grid.png", help="where the grid of 36 detect crops goes ('' : none)")
    args = p.parse_args()
    data = Path(args.data)
    if not data.is_dir():
        print(f"skipped: {data} is absent (../shared/data/README.md describes the sample data)")
        return 0
    import cv2
    from PIL import Image

    cv2.setNumThreads(1)  # one thread for both paths, as each of the cache writer's reading threads runs
    paths = sorted(p for p in data.rglob("*") if p.suffix.lower() in taskdata.IMAGE_EXTENSIONS)
    paths = paths[:args.limit] if args.limit else paths
    box, size = FractionBox(LFW_FACE_BOX), args.image_size
    print(f"{len(paths)} images from {data}, cropped to LFW's face box and resized to {size} px, one thread, "
          f"fastest of {args.repeats} passes; OpenCV {cv2.__version__}, Pillow {Image.__version__}")
    pil_s, pil_images = timed(pil_read, paths, size, box, args.repeats)
    cv_s, cv_images = timed(opencv_read, paths, size, box, args.repeats)
    diff = np.abs(pil_images.astype(np.int16) - cv_images.astype(np.int16))
    per_image = diff.reshape(len(paths), -1).mean(1)
    print(f"PIL:    {pil_s:.2f} s ({pil_s / len(paths) * 1000:.2f} ms per image)")
    print(f"OpenCV: {cv_s:.2f} s ({cv_s / len(paths) * 1000:.2f} ms per image)")
    print(f"mean absolute difference: {diff.mean():.2f} of 255 (worst image {per_image.max():.2f}, "
          f"largest pixel difference {diff.max()})")
    if diff.mean() > 2.0:
        print("error: the two paths give different images", file=sys.stderr)
        return 1
    print(f"speedup: {pil_s / cv_s:.2f}")

    start = time.perf_counter()
    found = [image_io.detect_face(image_io.decode_image(p)) is not None for p in paths]
    detect_s = time.perf_counter() - start
    print(f"detect: {detect_s:.1f} s ({detect_s / len(paths) * 1000:.1f} ms per image, one thread)")
    print(f"detected: {sum(found)}/{len(paths)} ({sum(found) / len(paths):.1%})")
    if args.grid:
        picks = np.linspace(0, len(paths) - 1, min(36, len(paths))).round().astype(int)
        crops = np.stack([image_io.read_image(paths[k], size, DETECT)[0] for k in picks])
        Image.fromarray(grid(crops, [found[k] for k in picks])).save(args.grid)
        print(f"wrote {args.grid}: {len(picks)} detect crops, evenly spaced over the images (no face: red frame)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
