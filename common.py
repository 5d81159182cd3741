"""The small ground every other module stands on: the error types a user sees, files written atomically
(text, CSV, checkpoints), and the GPU's bf16 autocast. It imports nothing of the project.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path

import torch


class UsageError(ValueError):
    """Bad input from the user: reported as one line on stderr, exit status 2, no traceback."""


class StageFailed(RuntimeError):
    """Part of a stage failed after everything else of the stage was written: exit status 1, one line."""


@contextlib.contextmanager
def exit_on_damaged_files(what: str):
    """For the command-line tools that read a run's files: inside, a UsageError or a value that does not parse
    ends the program with one line on stderr and exit status 2, no traceback."""
    try:
        yield
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (ValueError, KeyError, TypeError) as e:  # a value in a file that does not parse
        print(f"error: {what}: a file holds a damaged value ({type(e).__name__}: {e}); rerun the stage that "
              f"writes it", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------------------
# files


TEMPORARY = re.compile(r"^\..+\.tmp(\d+)$")  # what atomic_write leaves behind when it is killed


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder and rename it into place: a reader sees the old file
    or the new one, never a part. A write that fails (a full disk) leaves the old file as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
        except OSError:
            free = "free space unknown"
        raise UsageError(f"cannot write {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                         f"{free}): is the disk full or the folder read-only? The previous {path.name}, if any, "
                         f"is unchanged") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(folder: Path) -> list:
    """Delete the temporary files that killed atomic writes left in `folder` (those of processes that no longer
    run); returns their names."""
    removed = []
    if not Path(folder).is_dir():
        return removed
    for p in Path(folder).iterdir():
        m = TEMPORARY.match(p.name)
        if m and p.is_file() and not _running(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers cannot be in use: we are not writing them now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def write_csv(path: Path, columns, rows: list) -> None:
    def write(p):
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)


def read_csv(path: Path, columns=()) -> list:
    """A CSV this tool wrote, as a list of dicts; a damaged one (unreadable, or lacking one of `columns`) is a
    UsageError naming the file."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"{path}: cannot be read as the CSV this tool writes ({e}); move it away and run "
                         f"again to write it anew") from None
    lacking = [c for c in columns if c not in header]
    ragged = any(None in row or any(row.get(c) is None for c in columns) for row in rows)
    if lacking or ragged:
        problem = f"lacks the column(s) {', '.join(lacking)}" if lacking else "rows with missing or extra fields"
        raise UsageError(f"{path}: damaged ({problem}); expected the CSV this tool writes; move it away and run "
                         f"again to write it anew")
    return rows


def read_json(path: Path, check=lambda value: True, expected: str = "the JSON this tool writes"):
    """A JSON file this tool wrote; damaged (not JSON, or failing `check`) is a UsageError naming the file."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"{path}: cannot be read ({e}); expected {expected}; move it away and run again") from None
    if not check(value):
        raise UsageError(f"{path}: damaged (not {expected}); move it away and run again")
    return value


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda p: torch.save(state, p))


CHECKPOINT_KEYS = ("model", "epoch", "config", "classes")


def load_checkpoint(path: Path, device="cpu", mmap: bool = False) -> dict:
    """A checkpoint's state, loaded weights-only (never unpickling code); `mmap=True` reads only what is
    touched (cheap for its config and epoch). A refused, damaged or foreign file is a UsageError naming it."""
    try:
        state = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise UsageError(f"{path}: refused: it holds Python objects other than tensors and plain values, so this "
                         f"tool did not write it and will not run what is inside; move it away or choose another "
                         f"out_dir") from None
    except Exception as e:  # a damaged zip or pickle raises many types; all mean "not a readable checkpoint"
        raise UsageError(f"{path}: cannot be read, damaged or not a checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); move it away, or pass --retrain=True to "
                         f"train anew") from None
    lacking = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if lacking:
        raise UsageError(f"{path}: not a checkpoint of this tool (lacks {', '.join(lacking)}); move it away, or "
                         f"pass --retrain=True to train anew")
    return state


# ----------------------------------------------------------------------------------------------------------
# logs and devices


def format_seconds(seconds: float) -> str:
    """'4.2 s', '3 min 05 s', '1 h 02 min': durations as a person reads them in a log."""
    if seconds < 59.95:
        return f"{seconds:.1f} s"
    seconds = int(round(seconds))
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
