"""KDEF (the Karolinska Directed Emotional Faces): photographs named by session, sex, person, expression and
view, any folders; the expression labels, the person as a further label, the views chosen."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from dualtask.data.images import read_many
from dualtask.data.taskdata import (
    IMAGE_EXTENSIONS,
    DataError,
    TaskData,
    choose_images,
    drop_untrainable,
    printable,
    stratified_split,
    warn_data,
)

# ----------------------------------------------------------------------------------------------------------
# KDEF (the Karolinska Directed Emotional Faces)


KDEF_EXPRESSIONS = {"AF": "afraid", "AN": "angry", "DI": "disgusted", "HA": "happy", "NE": "neutral",
                    "SA": "sad", "SU": "surprised"}
KDEF_VIEWS = ("FL", "HL", "S", "HR", "FR")  # full left, half left, straight (frontal), half right, full right
# session A/B, sex F/M, person number, expression, view: AF01ANS.JPG is session A, woman 01, angry, straight
_KDEF_NAME = re.compile(r"^([AB])([FM])(\d{2})(AF|AN|DI|HA|NE|SA|SU)(FL|HL|HR|FR|S)\.jpe?g$", re.IGNORECASE)
_KDEF_FORM = ("KDEF's file names: session A/B, sex F/M, 2-digit person number, expression AF/AN/DI/HA/NE/SA/SU, "
              "view FL/HL/S/HR/FR, .JPG, e.g. AF01ANS.JPG")


def parse_kdef_views(views) -> tuple:
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


def _find_kdef_photographs(root: Path) -> list:
    """(path, session, sex, number, expression, view) of every KDEF-named photograph below `root`, walked in
    name order; other image files and second copies of a name are skipped, each kind with one warning."""

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
        warn_data(f"{root}: skipped {len(strangers)} image file(s) not named as KDEF photographs are (first: "
              f"{printable(strangers[0])}); {_KDEF_FORM}")
    if copies:
        warn_data(f"{root}: {len(copies)} KDEF file name(s) occur twice; each photograph is loaded once (first copy "
              f"skipped: {printable(copies[0])})")
    return found


def load_kdef(root, image_size: int, views=("S",), max_per_class=None, max_classes=None, seed: int = 0,
              crop=None) -> TaskData:
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
    (a copy) is loaded once, so one photograph cannot land in train and test. `crop`: how every photograph is
    cropped (images.read_image; DETECT: the face OpenCV's detector finds), None for the whole photographs.
    """
    root = Path(root)
    views = parse_kdef_views(views)
    found = _find_kdef_photographs(root)
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
    idx, _ = choose_images(labels, max_per_class, None, seed)
    images, ok, native = read_many([found[i][0] for i in idx], image_size,
                                    None if crop is None else [crop] * len(idx), what=str(root))
    labels, expressions = labels[idx][ok], expressions[idx][ok]
    data = TaskData("", people, images, labels, stratified_split(labels, seed, classes=people), f"kdef:{root}",
                    {"expression": expressions}, native, label_kind="identity",
                    extra_classes={"expression": list(KDEF_EXPRESSIONS.values())})
    return drop_untrainable(data, str(root))
