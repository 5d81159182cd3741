"""All data for the dual-task experiments, in one format: the entry point (`load_task`), VGGFace2, the tasks'
views of shared images, the experiments' control data sets, batches on the device, and the cache's command line.

Every source (VGGFace2, CIFAR-10, FER2013, KDEF, VoxCeleb frames, a folder of class folders, the offline demo
set) becomes a `TaskData` (taskdata.py): uint8 images (N, H, W, 3), int64 labels, class names and a split per
image (0 train, 1 val, 2 test), plus what the labels are (`label_kind`) and any further labels of the same images
(`extra`). Training, lesions and figures all read that one format. A preprocessed copy lives in a folder holding
`images.npy`, `labels.npy`, `split.npy` and `meta.json`, loaded memory-mapped. Each other source has its own
module under dualtask/data/ (cifar10.py, fer2013.py, kdef.py, voxceleb.py, folders.py for class-folder trees and
LFW, demo.py); the names below are the API a notebook or script uses.

Preprocess VGGFace2 once (crop around the loose box enlarged by 30%, resize, cache; --face_crop=detect or align
crops otherwise, see `load_task`):

    python vggface2.py --root=/data/vggface2 --out=/data/vggface2_112 --image_size=112 --identities=1700

An earlier cache in --out is replaced only with --overwrite; a folder that is not a cache, and any --out
inside, containing or equal to --root, is refused. Data loaded differently from how it was given (unreadable
images, classes left without images, unusable boxes or landmarks, no face found) is counted in a "warning: ..."
line on stderr.

Augmentation and normalisation (`augment`, `normalize`) work on whole uint8 batches on the device.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dualtask.core.common import UsageError, report_bugs
from dualtask.data.cifar10 import CIFAR_CLASSES, load_cifar10
from dualtask.data.demo import make_demo
from dualtask.data.loading import (
    PSEUDO_TASKS,
    load_task,
    match_resolution,
    pseudo_tasks,
    same_task,
    source_groups,
    task_view,
)
from dualtask.data.taskdata import (
    FACE_CROPS,
    DataError,
    TaskData,
    beside,
    check_out_folder,
    load_cache,
    stratified_split,
)
from dualtask.data.transforms import augment, normalize, to_float
from dualtask.data.vggface2_reader import load_vggface2

__all__ = ["CIFAR_CLASSES", "DataError", "PSEUDO_TASKS", "TaskData", "augment", "load_cache", "load_cifar10",
           "load_task", "load_vggface2", "make_demo", "main", "match_resolution", "normalize", "pseudo_tasks",
           "same_task", "source_groups", "stratified_split", "task_view", "to_float"]


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
    if args.lfw_crop is not None:  # the setting's name before face_crop replaced it
        raise DataError(f"--lfw_crop={args.lfw_crop}: replaced by --face_crop: --face_crop=boxes for True, "
                        f"--face_crop=none for False (or detect, align)")
    if args.face_crop not in FACE_CROPS:
        raise DataError(f"--face_crop={args.face_crop}: expected one of {', '.join(FACE_CROPS)}")
    for name, value, low in (("image_size", args.image_size, 1), ("identities", args.identities, 2),
                             ("per_identity", args.per_identity, 1), ("seed", args.seed, 0)):
        if value is not None and value < low:
            raise DataError(f"--{name}={value}: expected a whole number of at least {low}")
    if not args.out.strip():
        raise DataError(f"--out={args.out!r}: empty; expected the path of the cache folder to write (new or empty, "
                        f"or an earlier cache with --overwrite)")
    if not Path(os.path.abspath(Path(args.out).expanduser())).name:
        raise DataError(f"--out={args.out}: the file system's root; expected the path of the cache folder to write "
                        f"(new or empty, or an earlier cache with --overwrite)")
    if args.root.startswith("demo"):
        return
    root, out = Path(args.root).expanduser().resolve(), Path(args.out).expanduser().resolve()
    for p in (out, *beside(out)):  # a save writes <out>.tmp and <out>.old too, and removes them
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
    parser.add_argument("--face_crop", default="boxes", help="how face photographs are cropped: boxes (VGGFace2's "
                        "loose boxes, LFW's fixed box, enlarged by 30%%), detect (the face OpenCV's detector finds, "
                        "enlarged by 30%%), align (VGGFace2's five landmarks onto a template) or none (whole images)")
    parser.add_argument("--lfw_crop", default=None, help=argparse.SUPPRESS)  # replaced by --face_crop: named if given
    try:
        with report_bugs(DataError):
            args = parser.parse_args(argv)
            _check_arguments(args)
            out = Path(args.out).expanduser()
            if out.name in ("", ".", ".."):  # "." or "..": the folder it names, by its own name
                out = Path(os.path.abspath(out))
            check_out_folder(out, args.overwrite)  # before the long read, so a refused --out costs nothing
            data = load_task(args.root, args.task, args.image_size, max_per_class=args.per_identity,
                             max_classes=args.identities, seed=args.seed, face_crop=args.face_crop)
            try:
                data.save(out, overwrite=args.overwrite)
            except OSError as e:  # permissions, a full disk
                raise DataError(f"--out: cannot write {out} ({e}); choose a writable --out with enough space") from None
    except (DataError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = data.counts()
    faces = f", faces cropped by face_crop={data.face_crop}" if data.face_crop else ""
    print(f"wrote {out}: {len(data.classes)} classes, {c['train']} train / {c['val']} val / {c['test']} test "
          f"images at {data.image_size} px{faces}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
