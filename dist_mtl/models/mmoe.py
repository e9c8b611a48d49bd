"""MMOE (Ma et al., KDD 2018), PLE (Tang et al., RecSys 2020) and the Shared-Bottom baseline: one tower
per configured task."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from dist_mtl.losses import ModelOutput
from dist_mtl.models.layers import GroupedInputLinear, HeadRows, MultiTaskHead, Tower, mlp
from dist_mtl.tasks import TaskConfig


def _outputs(tasks: Sequence[TaskConfig], raw: dict[str, torch.Tensor],
             logit_terms: Mapping[str, torch.Tensor]) -> ModelOutput:
    """Each task's output from its tower's ``raw`` value plus its entry of ``logit_terms`` (if any)."""
    predictions, logits = {}, {}
    for t in tasks:
        value = raw[t.name] + logit_terms[t.name] if t.name in logit_terms else raw[t.name]
        if t.type == "binary":
            logits[t.name] = value
            predictions[t.name] = torch.sigmoid(value)
        else:
            predictions[t.name] = value
    return ModelOutput(predictions=predictions, logits=logits)


def _towers(tasks: Sequence[TaskConfig], in_dim: int, tower_dims: Sequence[int],
            task_tower_dims: Mapping[str, Sequence[int]] | None, activation: str, dropout: float) -> nn.ModuleDict:
    """A tower per task, of ``task_tower_dims[task]`` hidden sizes where given, else ``tower_dims``."""
    dims = task_tower_dims or {}
    return nn.ModuleDict({t.name: Tower(in_dim, dims.get(t.name, tower_dims), activation, dropout) for t in tasks})


def _gated_mixture(gate_logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """A softmax gate's mixture of expert outputs: logits [B, E], experts [B, E, H] -> [B, H]."""
    weights = torch.softmax(gate_logits, dim=-1).unsqueeze(-1)  # [B, E, 1]
    return (weights * experts).sum(dim=1)


class MMOEHead(MultiTaskHead):
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
        task_tower_dims: Mapping[str, Sequence[int]] | None = None,
    ):
        super().__init__()
        self.tasks = list(tasks)
        self.experts = nn.ModuleList(mlp(in_dim, expert_dims, activation, dropout) for _ in range(num_experts))
        self.gates = nn.ModuleDict({t.name: GroupedInputLinear(in_dim, num_experts) for t in tasks})
        self.towers = _towers(tasks, expert_dims[-1], tower_dims, task_tower_dims, activation, dropout)

    def output_layers(self) -> dict[str, nn.Linear]:
        return {name: tower.out for name, tower in self.towers.items()}

    def predict(self, x: HeadRows, logit_terms: Mapping[str, torch.Tensor]) -> ModelOutput:
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # [B, E, H]
        raw = {t.name: self.towers[t.name](_gated_mixture(self.gates[t.name](x), experts)) for t in self.tasks}
        return _outputs(self.tasks, raw, logit_terms)


class SharedBottomHead(MultiTaskHead):
    """One shared MLP, then a tower per task: the baseline MMOE is compared against."""

    def __init__(
        self,
        in_dim: int,
        tasks: Sequence[TaskConfig],
        bottom_dims: Sequence[int],
        tower_dims: Sequence[int],
        activation: str = "relu",
        dropout: float = 0.0,
        task_tower_dims: Mapping[str, Sequence[int]] | None = None,
    ):
        super().__init__()
        self.tasks = list(tasks)
        self.bottom = mlp(in_dim, bottom_dims, activation, dropout)
        self.towers = _towers(tasks, bottom_dims[-1], tower_dims, task_tower_dims, activation, dropout)

    def output_layers(self) -> dict[str, nn.Linear]:
        return {name: tower.out for name, tower in self.towers.items()}

    def predict(self, x: HeadRows, logit_terms: Mapping[str, torch.Tensor]) -> ModelOutput:
        shared = self.bottom(x)
        return _outputs(self.tasks, {t.name: self.towers[t.name](shared) for t in self.tasks}, logit_terms)


class PLEHead(MultiTaskHead):
    """Progressive Layered Extraction: levels of task-specific and shared experts, then a tower per task.

    At each level every task has ``task_experts`` experts of its own and all tasks share ``shared_experts``;
    a task's softmax gate (on the task's input to the level) mixes its own experts with the shared ones,
    so no task reads another task's experts directly (the customized gate control that keeps MMOE's
    seesaw between tasks down). Below the last level a shared branch also runs: its gate, on the shared
    input, mixes every expert of the level, and its mixture is the next level's shared input. Level ``j``'s
    experts are one layer of ``level_dims[j]`` units; the first level reads the head input on every branch.
    """

    def __init__(
        self,
        in_dim: int,
        tasks: Sequence[TaskConfig],
        shared_experts: int,
        task_experts: int,
        level_dims: Sequence[int],
        tower_dims: Sequence[int],
        activation: str = "relu",
        dropout: float = 0.0,
        task_tower_dims: Mapping[str, Sequence[int]] | None = None,
    ):
        super().__init__()
        self.tasks = list(tasks)
        names = [t.name for t in tasks]

        def experts(d_in: int, width: int, count: int) -> nn.ModuleList:
            return nn.ModuleList(mlp(d_in, [width], activation, dropout) for _ in range(count))

        self.levels = nn.ModuleList()
        d_in = in_dim
        for j, width in enumerate(level_dims):
            gate = GroupedInputLinear if j == 0 else nn.Linear  # the first level reads the head input
            level = nn.ModuleDict({
                "task_experts": nn.ModuleDict({n: experts(d_in, width, task_experts) for n in names}),
                "shared_experts": experts(d_in, width, shared_experts),
                "task_gates": nn.ModuleDict({n: gate(d_in, task_experts + shared_experts) for n in names}),
            })
            if j < len(level_dims) - 1:
                level["shared_gate"] = gate(d_in, len(names) * task_experts + shared_experts)
            self.levels.append(level)
            d_in = width
        self.towers = _towers(tasks, d_in, tower_dims, task_tower_dims, activation, dropout)

    def output_layers(self) -> dict[str, nn.Linear]:
        return {name: tower.out for name, tower in self.towers.items()}

    def predict(self, x: HeadRows, logit_terms: Mapping[str, torch.Tensor]) -> ModelOutput:
        names = [t.name for t in self.tasks]
        task_in = {n: x for n in names}
        shared_in = x
        for level in self.levels:
            shared_out = [e(shared_in) for e in level["shared_experts"]]
            task_out = {n: [e(task_in[n]) for e in level["task_experts"][n]] for n in names}
            if "shared_gate" in level:
                every = [o for n in names for o in task_out[n]] + shared_out
                shared_in = _gated_mixture(level["shared_gate"](shared_in), torch.stack(every, dim=1))
            task_in = {n: _gated_mixture(level["task_gates"][n](task_in[n]),
                                         torch.stack(task_out[n] + shared_out, dim=1))
                       for n in names}
        return _outputs(self.tasks, {n: self.towers[n](task_in[n]) for n in names}, logit_terms)
