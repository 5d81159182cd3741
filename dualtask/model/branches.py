"""Branched networks: the trunk shared up to a branch point, then one copy of the rest per task.

The reference study's code (sdnn, `VGG16Split(split_index)`) and the identity/expression study train such
networks: sharing late layers costs accuracy, sharing early layers little. Here a branched network is also the
positive control of the lesion engine: after the branch point a filter belongs to exactly one task, so the
engine must find a complete double dissociation there.

Every trunk step after the branch point is replaced by a `BranchPair` holding one copy of it per task (all
copies start from the same weights). A pair's output is its copies' outputs side by side along the channels,
the first task's copy first, so the trunk still runs as one module and its features are the copies' features
concatenated; each task's head reads its own copy's part. A lesion site after the branch point is the pair:
its filters are numbered across the copies, and a lesion mask over them silences filters of either copy.
Imports nothing of the project.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

BRANCH_PREFIX = "branch:"  # a lesion site after the branch point: branch:<module path of the pair>


class BranchPair(nn.Module):
    """One copy of a trunk step per task. `fork`: the first pair, whose input is the shared trunk's output (each
    copy reads all of it); every later pair splits its input along the channels, one equal part per copy."""

    def __init__(self, step: nn.Module, n_copies: int, fork: bool):
        super().__init__()
        self.copies = nn.ModuleList(copy.deepcopy(step) for _ in range(n_copies))
        self.fork = fork
        for module in self.copies.modules():  # a copy's part of the input is a view of it: never overwritten
            if isinstance(module, nn.ReLU):
                module.inplace = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self.copies)  # the parts as narrow views (x.chunk's), written so that torch.fx can trace it
        parts = [x] * n if self.fork else [x.narrow(1, k * (x.shape[1] // n), x.shape[1] // n) for k in range(n)]
        return torch.cat([c(p) for c, p in zip(self.copies, parts)], dim=1)


def module_path(site_name: str) -> str:
    """The module path of a lesion site's module (a branched site's name carries BRANCH_PREFIX)."""
    return site_name[len(BRANCH_PREFIX):] if site_name.startswith(BRANCH_PREFIX) else site_name


def branch_steps(model: nn.Module, steps: list, after: str, n_copies: int) -> list:
    """Replace every step of `steps` ([(module path, module)], the trunk's forward chain) after the step named
    `after` by a BranchPair of `n_copies` copies; steps that are no module of the model (the flatten between
    VGG's pool and classifier) are left as they are. Returns the paths of the pairs."""
    names = [n for n, _ in steps]
    start = names.index(after) + 1
    paired = []
    for name, step in steps[start:]:
        parent_path, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if getattr(parent, attr, None) is not step:
            continue
        setattr(parent, attr, BranchPair(step, n_copies, fork=not paired))
        paired.append(name)
    return paired


def copy_of_filter(n_filters: int, tasks: list) -> list:
    """Per filter of a branched site (numbered across the copies, the first task's copy first): its task."""
    per = n_filters // len(tasks)
    return [tasks[i // per] for i in range(n_filters)]
