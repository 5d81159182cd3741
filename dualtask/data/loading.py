"""The data API behind `vggface2.py`: `load_task` (every source to one `TaskData`), the tasks' views of shared
images, and the experiments' control data sets (pseudo-tasks, same-task splits, resolution matching). The format
and the cache are in taskdata.py, VGGFace2 in vggface2_reader.py, each other source in its own module."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from dualtask.data.cifar10 import load_cifar10
from dualtask.data.demo import make_demo
from dualtask.data.fer2013 import FER2013_CSV, load_fer2013_csv
from dualtask.data.folders import LFW_FACE_BOX, is_lfw_root, load_folder
from dualtask.data.images import DETECT, FractionBox, resize_images
from dualtask.data.kdef import is_kdef_root, load_kdef, parse_kdef_views
from dualtask.data.taskdata import (
    FACE_CROPS,
    DataError,
    TaskData,
    cap_classes,
    drop_untrainable,
    load_cache,
    warn_data,
)
from dualtask.data.vggface2_reader import is_vggface2_root, load_vggface2
from dualtask.data.voxceleb import is_voxceleb_root, load_voxceleb

# ----------------------------------------------------------------------------------------------------------
# entry point


def load_task(spec: str, task: str, image_size: int, max_per_class=None, max_classes=None, seed: int = 0,
              download: bool = False, demo_per_class: int = 100, kdef_views=("S",),
              face_crop: str = "boxes") -> TaskData:
    """Load one task's data from `spec` and bring it to `image_size` pixels.

    spec: 'demo' (the procedural set matching the task name: faces for 'face'/'identity', expressions for
    'expression', objects otherwise), 'demo:faces' / 'demo:objects' / 'demo:expression', a VGGFace2 root,
    a CIFAR-10 root (holding cifar-10-batches-py/), a cache folder written by this module, FER2013's CSV (the
    file, or a folder holding fer2013.csv), a KDEF root (photographs named like AF01ANS.JPG anywhere below it;
    `kdef_views` chooses the camera angles), VoxCeleb face frames (id10001/<video>/<frame>.jpg), or a folder
    with one subfolder per class (train/ and test/ subfolders are used when present; FER2013's class folders
    with PublicTest_/PrivateTest_ files in test/ keep FER2013's own split; LFW's folders are told by their images'
    names, <person>_NNNN.jpg).

    face_crop (one of FACE_CROPS) says how face photographs are cropped before resizing (`face_crop_applies` says
    which sources have them): "boxes", VGGFace2's loose boxes and LFW's fixed box (LFW_FACE_BOX) enlarged by 30%,
    whole images for sources without boxes; "detect", the largest face OpenCV's detector finds, enlarged by 30%
    (images with none found are used whole and counted in a warning); "align", VGGFace2's five landmarks mapped
    onto a fixed template (DataError for a face source without them); "none", whole images. A cache keeps the
    crop it was written with.

    The layouts are told apart in this order, the first that fits wins: a cache (meta.json + images.npy);
    CIFAR-10 (cifar-10-batches-py/); VGGFace2 (bb_landmark/, or train/nXXXXXX/); a .csv file or fer2013.csv in
    the folder; KDEF (most of the first few hundred image names below the root read as KDEF names, whatever
    the folders: the release's one folder per session and person would otherwise pass for class folders);
    VoxCeleb (no train/ + test/ pair, and at least 2 class folders whose images all lie one folder deeper, in
    video folders); otherwise class folders.

    The task's labels are the source's own (`labels`); `task_view` gives a task another of its labels.
    """
    kdef_views = parse_kdef_views(kdef_views)  # checked whatever the source, so a mistyped setting never waits
    if not isinstance(face_crop, str) or face_crop not in FACE_CROPS:
        raise DataError(f"face_crop={face_crop!r}: expected one of {', '.join(repr(c) for c in FACE_CROPS)}")
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
        return _named_and_sized(data, task, image_size)
    if not root.is_dir() or not os.access(root, os.R_OK | os.X_OK):
        raise DataError(f"{task}_data: {spec} is not a readable folder (nor a FER2013 .csv file)")
    try:
        data = _load_folder_source(root, task, image_size, max_per_class, max_classes, seed, download, kdef_views,
                                   face_crop)
    except OSError as e:  # a folder inside the data that cannot be listed (images themselves are skipped)
        raise DataError(f"{task}_data: cannot read {e.filename or spec} ({e.strerror or e}); make it "
                        f"readable") from None
    return _named_and_sized(data, task, image_size)


def _named_and_sized(data: TaskData, task: str, image_size: int) -> TaskData:
    """`data` named after the task, its images resized to `image_size` unless they are that size already."""
    data.name = task
    if data.image_size != image_size:
        data.images = resize_images(data.images, image_size)
    return data


def _load_folder_source(root: Path, task: str, image_size: int, max_per_class, max_classes, seed: int,
                        download: bool, kdef_views: tuple, face_crop: str) -> TaskData:
    """`load_task` for a folder: the layout it holds (`source_kind`; an empty folder asked to download is
    CIFAR-10) read by that layout's loader, face photographs cropped as `face_crop` says."""
    kind = "cifar10" if download and not any(root.iterdir()) else source_kind(root)
    crop = face_crop if kind in FACE_SOURCES or (kind == "folder" and label_kind_for_task(task)) else None
    if kind == "cache":
        data = load_cache(root)
        if data.face_crop is not None and label_kind_for_task(task) and data.face_crop != face_crop:
            warn_data(f"{root} is a cache written with face_crop={data.face_crop!r}, which face_crop={face_crop!r} "
                  f"does not change; write it again with vggface2.py --face_crop={face_crop} to crop its "
                  f"faces so")
        if max_per_class is not None or max_classes is not None:  # a cap may take a class's training images
            data = drop_untrainable(cap_classes(data, max_per_class, max_classes, seed), str(root))
    elif kind == "cifar10":
        data = load_cifar10(root, max_per_class=max_per_class, max_classes=max_classes, seed=seed,
                            download=download)
    elif kind == "vggface2":
        data = load_vggface2(root, image_size, identities=max_classes, per_identity=max_per_class, seed=seed,
                             face_crop=face_crop)
    elif kind == "fer2013":  # the Kaggle archive unpacks to fer2013/fer2013.csv
        data = load_fer2013_csv(root / FER2013_CSV, max_per_class=max_per_class, max_classes=max_classes,
                                seed=seed)
    elif kind == "kdef":
        data = load_kdef(root, image_size, views=kdef_views, max_per_class=max_per_class,
                         max_classes=max_classes, seed=seed, crop=_photo_crop(crop, root))
    elif kind == "voxceleb":
        data = load_voxceleb(root, image_size, max_per_class=max_per_class, max_classes=max_classes, seed=seed,
                             crop=_photo_crop(crop, root))
    else:
        box = FractionBox(LFW_FACE_BOX) if kind == "lfw" else None
        data = load_folder(root, image_size, max_per_class=max_per_class, max_classes=max_classes, seed=seed,
                           crop=_photo_crop(crop, root, box))
    if kind != "cache":
        data.face_crop = crop
    return data


FACE_SOURCES = ("vggface2", "lfw", "kdef", "voxceleb")  # the layouts (source_kind) that hold face photographs


def source_kind(root: Path) -> str:
    """Which of `load_task`'s layouts the folder `root` holds, the first that fits in load_task's order: 'cache',
    'cifar10', 'vggface2', 'fer2013' (a folder holding fer2013.csv), 'kdef', 'voxceleb', 'lfw' (class folders of
    LFW's photographs) or 'folder' (any other class-folder tree)."""
    if (root / "meta.json").exists() and (root / "images.npy").exists():
        return "cache"
    if (root / "cifar-10-batches-py").is_dir():
        return "cifar10"
    if is_vggface2_root(root):
        return "vggface2"
    if (root / FER2013_CSV).is_file():
        return "fer2013"
    if is_kdef_root(root):
        return "kdef"
    if is_voxceleb_root(root):
        return "voxceleb"
    return "lfw" if is_lfw_root(root) else "folder"


def face_crop_applies(spec: str, task: str) -> bool:
    """Whether the face_crop setting changes what `load_task` reads for `task` from `spec`: yes for the
    photographs of VGGFace2, LFW, KDEF and VoxCeleb, and for a class-folder tree read by a face task (one whose
    name asks for identity or expression labels: face, identity, expression, ...); no for a cache (cropped when it
    was written), CIFAR-10, FER2013's CSV, the demo sets, and a class-folder tree of any other task (objects)."""
    spec = spec.strip()
    if spec.startswith("demo"):
        return False
    root = Path(spec).expanduser()
    try:
        kind = source_kind(root) if root.is_dir() else None
    except OSError:  # load_task names what cannot be read
        return False
    return kind in FACE_SOURCES or (kind == "folder" and label_kind_for_task(task) is not None)


def _photo_crop(face_crop, root: Path, box=None):
    """The crop of every photograph of a face source without boxes or landmarks of each image (images.py's
    read_image): `box` (LFW's fixed box; None: whole) for "boxes", DETECT for "detect", None (whole) for "none"
    and for images face_crop leaves alone (face_crop None); "align" is refused, having no landmarks to align on."""
    if face_crop == "align":
        raise DataError(f"face_crop='align': {root} has no facial landmarks to align on (only VGGFace2 has them, in "
                        f"bb_landmark/loose_landmark_train.csv); use face_crop='detect' (OpenCV's face detector), "
                        f"'boxes' or 'none'")
    return {"boxes": box, "detect": DETECT}.get(face_crop)


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


def source_groups(specs: dict) -> list:
    """The tasks grouped by the images they read, in task order: [[task, ...], ...]. Tasks whose specs name the
    same folder or file share one set of images (each image then carries every task's label); 'demo' read by an
    identity task ('identity', 'face') and an expression task ('expression', 'emotion') is the demo faces,
    which carry both labels, for both. Every other demo task draws its own set, as before."""
    kinds = {t: label_kind_for_task(t) for t in specs}
    plain_demo = [t for t, s in specs.items() if s.strip() == "demo"]
    faces_shared = {"identity", "expression"} <= {kinds[t] for t in plain_demo}
    groups = {}
    for task, spec in specs.items():
        spec = spec.strip()
        if spec == "demo":
            key = ("demo", "faces" if faces_shared and kinds[task] in ("identity", "expression")
                   else demo_kind_for(task))
        elif spec.startswith("demo:"):
            key = ("demo", spec.split(":", 1)[1])
        else:
            key = ("path", str(Path(spec).expanduser().resolve()))
        groups.setdefault(key, []).append(task)
    return list(groups.values())


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
                        data.split, data.source, extra, data.native_size, kind, extra_classes, data.face_crop)
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
                             extra_classes=dict(data.extra_classes), face_crop=data.face_crop)
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
