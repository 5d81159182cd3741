"""File, column and method names that several layers read: one definition each."""
from __future__ import annotations

CHECKPOINT_KEYS = ("model", "epoch", "config", "classes")


def reliability_key(fraction: float) -> str:
    """rankings.json's name of a top set's split-half overlap: 'top20' for the top 20% (rankings.split_half_reliability
    writes it, verdict.reliability reads it)."""
    return f"top{round(float(fraction) * 100, 2):g}"


# a run's sweeps through linear readouts (lesion/readouts.py), inside the run folder: refitted to every lesion, or
# fixed
READOUT_DIRS = {"refit": "refit_readout", "fixed": "fixed_readout"}


READOUT_NAMES = {"refit": "refitted readouts", "fixed": "fixed readouts"}


RANKING_PRECISIONS = ("fp32", "bf16")


HEALTH_FILE = "train_health.json"


ACTIONS = ("stop", "warn")  # what the training health check does on a problem (health_check)


SWEEP_FILES = {"results": "lesion_results.csv", "rankings": "rankings.json", "dissociation": "dissociation.csv",
               "progress": "lesion_progress.json", "per_class": "lesion_per_class.csv",
               "per_image": "lesion_per_image.npz", "subgroups": "lesion_subgroups.csv"}


# the lesion rankings (lesion/rankings.py), and "random", the control
METHODS = ("activation", "localiser", "loss", "greedy", "taylor", "mask", "random")

