"""VoxCeleb face frames: one folder per identity, one per video in it; a video's frames stay in one split."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dualtask.data.images import read_many
from dualtask.data.taskdata import (
    IMAGE_EXTENSIONS,
    SPLITS,
    TEST_FRACTION,
    VAL_FRACTION,
    DataError,
    TaskData,
    drop_untrainable,
    few,
    list_images,
    printable,
    warn_data,
)

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
    return direct, any(list_images(d) for d in subdirs)


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


def _identity_videos(root: Path) -> dict:
    """{identity: {video: frame files}} of the identity folders holding video folders of frames; image files lying
    directly in an identity folder are skipped with a warning."""
    identities, loose = {}, []
    for d in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        videos = {}
        for v in sorted(d.iterdir()):
            if v.is_dir() and not v.name.startswith("."):
                frames = list_images(v)
                if frames:
                    videos[printable(v.name)] = frames
            elif v.is_file() and v.suffix.lower() in IMAGE_EXTENSIONS:
                loose.append(v)
        if videos:
            identities[printable(d.name)] = videos
    if loose:
        warn_data(f"{root}: skipped {len(loose)} image(s) lying directly in an identity folder, outside any video "
              f"folder (first: {printable(str(loose[0]))}); expected {_VOX_FORM}")
    return identities


def _take_frames(videos: dict, assigned: dict, max_per_class, rng) -> dict:
    """{video: indices of its frames taken} for one identity, its videos in the order frames are taken in under
    a cap: a video of each split first (train, test, val), then the rest; round robin over the videos, one
    seeded-random frame each per round, until the cap or the frames run out."""
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
    return taken


def load_voxceleb(root, image_size: int, max_per_class=None, max_classes=None, seed: int = 0,
                  crop=None) -> TaskData:
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
    identity folder are not frames of a video and are skipped with a warning. `crop`: how every frame is cropped
    (images.read_image; DETECT: the face OpenCV's detector finds), None for the whole frames.
    """
    root = Path(root)
    identities = _identity_videos(root)
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
        taken = _take_frames(videos, assigned, max_per_class, rng)
        for v, frames in taken.items():
            video_names.append(f"{name}/{v}")
            for i in sorted(frames):
                paths.append(videos[v][i])
                labels.append(ci)
                splits.append(assigned[v])
                video_ids.append(len(video_names) - 1)
    if lonely:
        warn_data(f"{len(lonely)} identit(y/ies) have a single video, which goes to training, so no test frames (their "
              f"accuracy goes unmeasured): {few(lonely)}")
    images, ok, native = read_many(paths, image_size, None if crop is None else [crop] * len(paths), what=str(root))
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
    return drop_untrainable(data, str(root))
