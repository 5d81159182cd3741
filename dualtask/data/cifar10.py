"""CIFAR-10 in torchvision's layout (cifar-10-batches-py/), read without unpickling anything but arrays;
downloaded only when asked."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from dualtask.data.taskdata import DataError, TaskData, choose_images, few, presplit_caps, split_off_val, warn_data

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


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
        raise DataError(f"{path}: labels {few(wrong.tolist())} lie outside 0..{n_classes - 1} (CIFAR-10's "
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
        warn_data(f"{folder}: left out {len(absent)} class(es) with no images in data_batch_1..5: {few(absent)}")
    cap_train, cap_test = presplit_caps(max_per_class)
    i_train, kept = choose_images(train_y, cap_train, max_classes, seed)
    i_test, _ = choose_images(test_y, cap_test, None, seed)
    i_test = i_test[np.isin(test_y[i_test], kept)]  # test images of a class that cannot be learnt are left out
    if len(kept) < 2:
        raise DataError(f"{folder}: {len(kept)} class(es) have training images; a classification task needs at "
                        f"least 2")
    remap = np.full(len(classes), -1, dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    train_y, test_y = remap[train_y[i_train]], remap[test_y[i_test]]
    names_kept = [classes[k] for k in kept]
    split = np.concatenate([split_off_val(train_y, seed, names_kept), np.full(len(test_y), 2, dtype=np.int8)])
    return TaskData("", names_kept, np.concatenate([train_x[i_train], test_x[i_test]]),
                    np.concatenate([train_y, test_y]), split, source=f"cifar10:{root}", native_size=32)
