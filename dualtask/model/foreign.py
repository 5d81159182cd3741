"""A network this tool did not train, made into what the lesion engine reads: its graph cut at a readout layer
(graph.GraphTrunk: the sites its graph gives, one tap each) and one linear head per task on that layer's
features. The heads start untrained: `fit_heads` (training.readout_heads) fits them to the frozen network's
features, so that every ranking, the sweep and the report read the network through them."""
from __future__ import annotations

import torch
import torch.nn as nn

from dualtask.model.graph import GraphTrunk


class ReadoutNet(nn.Module):
    """`model(x)` -> {task: logits}, as DualTaskNet's: the network's features at `readout` (default: its
    classifier's input) read by one linear head per task. name: what the network is (its zoo name or a path)."""

    def __init__(self, network: nn.Module, name: str, num_classes: dict, image_size: int = 64,
                 readout: str | None = None):
        super().__init__()
        self.trunk = GraphTrunk(network, image_size, readout)
        width = self.trunk.width
        self.task_names = list(num_classes)
        self.heads = nn.ModuleDict({t: nn.Linear(width, n) for t, n in num_classes.items()})
        self.backbone = self.arch = name
        self.head, self.branch_site = "split", None

    @property
    def tasks(self) -> list:
        return list(self.task_names)

    @property
    def readout(self) -> str:
        return self.trunk.readout

    def head_inputs(self, features: torch.Tensor) -> dict:
        return {task: features for task in self.task_names}

    def head_outputs(self, features: torch.Tensor) -> dict:
        return {task: head(features) for task, head in self.heads.items()}

    def forward(self, x: torch.Tensor) -> dict:
        return self.head_outputs(self.trunk(x))
