"""Dense building blocks shared by the heads."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def mlp(in_dim: int, hidden: Sequence[int], activation: str = "relu", dropout: float = 0.0) -> nn.Sequential:
    """Linear + activation (+ dropout) per hidden size.

    torchrec.modules.mlp.MLP has no dropout, which the towers need, hence this small builder.
    """
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Linear(in_dim, size), ACTIVATIONS[activation]()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_dim = size
    return nn.Sequential(*layers)


class Tower(nn.Module):
    """An MLP ending in one output unit per row: a logit for binary tasks, a value for regression."""

    def __init__(self, in_dim: int, hidden: Sequence[int], activation: str, dropout: float):
        super().__init__()
        self.body = mlp(in_dim, hidden, activation, dropout)
        self.out = nn.Linear(hidden[-1] if hidden else in_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x)).squeeze(-1)
