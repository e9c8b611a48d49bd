"""MMOE (Ma et al., KDD 2018) and the Shared-Bottom baseline: one tower per configured task."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dist_mtl.losses import ModelOutput
from dist_mtl.models.layers import Tower, mlp
from dist_mtl.tasks import TaskConfig


def _outputs(tasks: Sequence[TaskConfig], raw: dict[str, torch.Tensor]) -> ModelOutput:
    predictions, logits = {}, {}
    for t in tasks:
        if t.type == "binary":
            logits[t.name] = raw[t.name]
            predictions[t.name] = torch.sigmoid(raw[t.name])
        else:
            predictions[t.name] = raw[t.name]
    return ModelOutput(predictions=predictions, logits=logits)


class MMOEHead(nn.Module):
    """Shared experts; per task a softmax gate over experts and a tower on the gated mixture."""

    def __init__(
        self,
        in_dim: int,
        tasks: Sequence[TaskConfig],
        num_experts: int,
        expert_dims: Sequence[int],
        tower_dims: Sequence[int],
        activation: str = "relu",
        dropout: float = 0.0,
    ):
        super().__init__()
        self.tasks = list(tasks)
        self.experts = nn.ModuleList(mlp(in_dim, expert_dims, activation, dropout) for _ in range(num_experts))
        self.gates = nn.ModuleDict({t.name: nn.Linear(in_dim, num_experts) for t in tasks})
        self.towers = nn.ModuleDict(
            {t.name: Tower(expert_dims[-1], tower_dims, activation, dropout) for t in tasks}
        )

    def output_layers(self) -> dict[str, nn.Linear]:
        return {name: tower.out for name, tower in self.towers.items()}

    def forward(self, x: torch.Tensor) -> ModelOutput:
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # [B, E, H]
        raw = {}
        for t in self.tasks:
            gate = torch.softmax(self.gates[t.name](x), dim=-1).unsqueeze(-1)  # [B, E, 1]
            raw[t.name] = self.towers[t.name]((gate * experts).sum(dim=1))
        return _outputs(self.tasks, raw)


class SharedBottomHead(nn.Module):
    """One shared MLP, then a tower per task: the baseline MMOE is compared against."""

    def __init__(
        self,
        in_dim: int,
        tasks: Sequence[TaskConfig],
        bottom_dims: Sequence[int],
        tower_dims: Sequence[int],
        activation: str = "relu",
        dropout: float = 0.0,
    ):
        super().__init__()
        self.tasks = list(tasks)
        self.bottom = mlp(in_dim, bottom_dims, activation, dropout)
        self.towers = nn.ModuleDict(
            {t.name: Tower(bottom_dims[-1], tower_dims, activation, dropout) for t in tasks}
        )

    def output_layers(self) -> dict[str, nn.Linear]:
        return {name: tower.out for name, tower in self.towers.items()}

    def forward(self, x: torch.Tensor) -> ModelOutput:
        shared = self.bottom(x)
        return _outputs(self.tasks, {t.name: self.towers[t.name](shared) for t in self.tasks})
