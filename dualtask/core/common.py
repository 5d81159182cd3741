"""The small ground every other module stands on: the error types a user sees, files written atomically
(text, CSV, checkpoints), and what the code does differently on a GPU (see "What differs on a GPU" below). It
imports nothing of the project.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import sys
import traceback
from pathlib import Path


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


@contextlib.contextmanager
def report_bugs(*worded):
    """Around a command line's work: an error no check foresaw still prints its traceback, then a line saying that
    it is a bug of this tool to report, and exits with status 1. UsageError, StageFailed and the types in `worded`
    (vggface2.DataError) pass through: the command words them as one line itself."""
    try:
        yield
    except (UsageError, StageFailed, *worded):
        raise
    except Exception:
        traceback.print_exc()
        print("error: the traceback above is a bug of this tool, not a mistake in the command: please report it "
              "with the command line and the traceback", file=sys.stderr)
        sys.exit(1)


# ----------------------------------------------------------------------------------------------------------
# files


# A temporary of atomic_write: a name only this tool makes, TEMPORARY_PREFIX + the writing process's id + "." +
# the file's name + TEMPORARY_SUFFIX. remove_stale_temporaries deletes nothing else, so a user's own file in a run
# folder survives whatever its name (an older version's ".name.tmp<pid>" leftovers among them: they cannot be told
# from a user's file, and stay).
TEMPORARY_PREFIX = ".dualtask-partial."
TEMPORARY_SUFFIX = ".part"
TEMPORARY = re.compile(r"^" + re.escape(TEMPORARY_PREFIX) + r"(\d+)\.(.+)" + re.escape(TEMPORARY_SUFFIX) + r"$")


def temporary_name(name: str, pid: int | None = None) -> str:
    """The name of atomic_write's temporary for the file `name`, written by process `pid` (this one)."""
    return f"{TEMPORARY_PREFIX}{os.getpid() if pid is None else pid}.{name}{TEMPORARY_SUFFIX}"


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder and rename it into place: a reader sees the old file
    or the new one, never a part. A write that fails (a full disk) leaves the old file as it was."""
    path = Path(path)
    tmp = path.with_name(temporary_name(path.name))
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
    """Delete the temporary files that killed atomic writes of this tool left in `folder` (named by
    temporary_name, of processes that no longer run); returns their names. Nothing else is ever deleted."""
    removed = []
    if not Path(folder).is_dir():
        return removed
    for p in Path(folder).iterdir():
        m = TEMPORARY.match(p.name)
        if m and p.is_file() and not p.is_symlink() and not _running(int(m.group(1))):
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


def read_csv(path: Path, columns=(), numbers=(), n_rows: int | None = None) -> list:
    """A CSV this tool wrote, as a list of dicts; a damaged one is a UsageError naming the file: unreadable,
    lacking one of `columns`, a row cut short or with extra fields (a write cut mid-row), a cell of `numbers` that
    is neither a number nor empty, or (when `n_rows` is given) another number of rows than its settings say."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"{path}: cannot be read as the CSV this tool writes ({e}); move it away and run "
                         f"again to write it anew") from None
    lacking = [c for c in columns if c not in header]
    ragged = next((k for k, row in enumerate(rows, start=2) if None in row or any(v is None for v in row.values())),
                  None)
    problem = None
    if lacking:
        problem = f"lacks the column(s) {', '.join(lacking)}"
    elif ragged is not None:
        problem = f"line {ragged} has missing or extra fields, as a write cut short leaves it"
    else:
        bad = next(((k, c, row[c]) for k, row in enumerate(rows, start=2) for c in numbers
                    if c in row and row[c].strip() != "" and not _is_number(row[c])), None)
        if bad:
            problem = f"line {bad[0]}: {bad[1]}={bad[2]!r} is not a number"
        elif n_rows is not None and len(rows) != n_rows:
            problem = f"{len(rows)} rows where its settings say {n_rows}"
    if problem:
        raise UsageError(f"{path}: damaged ({problem}); expected the CSV this tool writes; move it away and run "
                         f"again to write it anew")
    return rows


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_json(path: Path, check=lambda value: True, expected: str = "the JSON this tool writes"):
    """A JSON file this tool wrote; damaged (not JSON, or failing `check`) is a UsageError naming the file."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"{path}: cannot be read ({e}); expected {expected}; move it away and run again") from None
    if not check(value):
        raise UsageError(f"{path}: damaged (not {expected}); move it away and run again")
    return value










# ----------------------------------------------------------------------------------------------------------
# logs and devices


def number(value) -> float:
    """A number read from a CSV cell or a JSON value; NaN where it is empty or not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def format_seconds(seconds: float) -> str:
    """'4.2 s', '3 min 05 s', '1 h 02 min': durations as a person reads them in a log."""
    if seconds < 59.95:
        return f"{seconds:.1f} s"
    seconds = int(round(seconds))
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
