"""The small ground every other module stands on: the error types a user sees, files written atomically
(text, CSV, checkpoints), and what the code does differently on a GPU (see "What differs on a GPU" below). It
imports nothing of the project.
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
import traceback
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


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda p: torch.save(state, p))


CHECKPOINT_KEYS = ("model", "epoch", "config", "classes")
# a run's sweeps through linear readouts (readouts.py), inside the run folder: refitted to every lesion, or fixed
def reliability_key(fraction: float) -> str:
    """rankings.json's name of a top set's split-half overlap: 'top20' for the top 20% (rankings.split_half_reliability
    writes it, verdict.reliability reads it)."""
    return f"top{round(float(fraction) * 100, 2):g}"


READOUT_DIRS = {"refit": "refit_readout", "fixed": "fixed_readout"}
READOUT_NAMES = {"refit": "refitted readouts", "fixed": "fixed readouts"}


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


# ----------------------------------------------------------------------------------------------------------
# What differs on a GPU
#
# Every place where the code behaves differently on CUDA asks one of the small functions below, which answer for
# a CUDA device one way and for any other the other. A test takes the GPU's branch on the CPU by patching the
# function here (monkeypatch.setattr(common, "use_bf16", lambda device: True)): the modules call them as
# common.<name>, and autocast() looks use_bf16 up here, so one patch reaches every caller. Unpatched, nothing
# changes on either device. The CPU twins are in tests/test_gpu_branches.py (gpu_like() patches them all) unless
# another file is named.
#
# - bf16 autocast of the training step, evaluate(), the health probe, site_activations, taylor_scores and
#   evaluate_lesions(_naive). Decided by use_bf16, through autocast(). Tests:
#   test_bf16_sweep_is_the_naive_sweep_within_tolerance, test_training_with_bf16_and_channels_last.
# - channels_last model and batches in training (dualtask.train, evaluate, health.probe_batch). Decided by
#   use_channels_last. Test: test_training_with_bf16_and_channels_last.
# - a task's images kept on the device when they fit a quarter of its free memory (dualtask.TaskImages), else
#   each batch copied through pinned memory without blocking (TaskImages.batch). Decided by free_memory, and
#   use_pinned_memory through host_to_device(). Test: test_images_on_the_device_and_pinned_copies_give_the_same_
#   batches (and the training test's batches).
# - lesions stacked per pass, as many copies of a cached batch as a quarter of the free memory holds, at most 32
#   (lesion_stage, the benchmarks); one on the CPU. Decided by free_memory, through lesion_utils.default_masks_
#   per_pass. Test: test_stacked_lesions_sized_from_free_memory_equal_the_naive_sweep (1, 7, and 64 clamped to 32).
# - the greedy ranking's prefix cache: 40% of the free GPU memory and PyTorch's idle reserve (a quarter of the
#   free RAM elsewhere); a prefix that does not fit is computed again (RankingImages). Decided by
#   free_memory(reserved=True), through lesion_utils._cache_budget. Test: test_racing_greedy_with_a_prefix_cache_
#   that_does_not_fit.
# - ranking_precision: "fp32" switches a bf16 device's autocast off and allows TF32 matrix products while it is
#   open, "bf16" keeps bf16 autocast; the CPU computes in float32 either way. Decided by use_bf16 and use_tf32,
#   in lesion_utils.ranking_precision. Test: test_ranking_precision_on_a_bf16_device.
# - ranking_precision="bf16": the first site ranked both ways, bf16 kept for later sites only where the top-20%
#   sets agree, the check recorded under "precision" in rankings.json (lesion_stage's rank_filters). Decided by
#   use_bf16. Test: test_bf16_ranking_check_records_its_precision_in_rankings_json.
# - torch.compile: the compile setting, not the device (on the CPU inductor compiles C++). Test:
#   test_compile_trains_one_epoch (slow).
# - DistributedDataParallel: nccl and device_ids on CUDA, gloo elsewhere (dualtask.Dist, dualtask.train). No
#   parameter goes unused in any head layout (split heads: every task is in every step; joint: one layer;
#   branched: every copy feeds its head), so DDP runs without find_unused_parameters. Tests:
#   test_every_parameter_takes_part_in_a_training_step; gloo on 2 CPU processes: tests/test_pipeline.py::
#   test_torchrun_two_cpu_processes (split heads), tests/test_branches.py::test_a_branched_network_trains_and_
#   sweeps_under_torchrun and test_a_joint_head_trains_and_sweeps_under_torchrun (both slow).
# Not routed, as they change no result: torch.cuda.synchronize before an epoch's timing, the device's name in
# config.json, the benchmarks' own timing and memory statistics (benchmarks/ call the functions above where
# they do what the scripts do, except gpu_check.py's channels_last, which asks device.type itself, and
# train_speed.py, which times each way on purpose).


def use_bf16(device: torch.device) -> bool:
    """Whether training, evaluation and the lesion sweep compute under bf16 autocast on `device`: on CUDA."""
    return device.type == "cuda"


def use_channels_last(device: torch.device) -> bool:
    """Whether training keeps the model and its batches in channels_last memory format on `device`: on CUDA."""
    return device.type == "cuda"


def use_pinned_memory(device: torch.device) -> bool:
    """Whether a batch read from host memory goes to `device` through pinned memory, non-blocking: on CUDA."""
    return device.type == "cuda"


def use_tf32(device: torch.device) -> bool:
    """Whether a float32 ranking (lesion_utils.ranking_precision) lets matrix products use TF32: on CUDA."""
    return device.type == "cuda"


def free_memory(device: torch.device, reserved: bool = False) -> int | None:
    """Bytes free on a CUDA device (what the lesion sweep and the image store size themselves by); with
    `reserved`, plus what PyTorch's caching allocator holds but no tensor uses. None elsewhere."""
    if device.type != "cuda":
        return None
    free = torch.cuda.mem_get_info(device)[0]
    if reserved:
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch read into host memory, for `device`: copied through pinned memory without blocking where
    use_pinned_memory(device) (CUDA); elsewhere the tensor as it is."""
    if use_pinned_memory(device):
        return t.pin_memory().to(device, non_blocking=True)
    return t


def autocast(device: torch.device, enabled: bool | None = None):
    """bf16 autocast where use_bf16(device) (CUDA), nothing elsewhere; `enabled` True or False decides instead."""
    if use_bf16(device) if enabled is None else enabled:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
