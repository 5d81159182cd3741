"""What differs on a GPU: the device policy, and checkpoints saved and loaded weights-only."""
from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import torch

from dualtask.core.common import UsageError, atomic_write
from dualtask.core.names import CHECKPOINT_KEYS

# ----------------------------------------------------------------------------------------------------------
# What differs on a GPU
#
# Every place where the code behaves differently on CUDA asks one of the small functions below, which answer for
# a CUDA device one way and for any other the other. A test takes the GPU's branch on the CPU by patching the
# function here (monkeypatch.setattr(device, "use_bf16", lambda device: True)): the modules call them as
# device.<name>, and autocast() looks use_bf16 up here, so one patch reaches every caller. Unpatched, nothing
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


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda p: torch.save(state, p))


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

