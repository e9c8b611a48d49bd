"""Model assembly: the two EBCs at the top level (so TrainPipelineSparseDist finds and redistributes
them) and a head chosen by name from the config."""

from __future__ import annotations

import math
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from dist_mtl.config import ModelConfig
from dist_mtl.data.batch import GroupedBatch
from dist_mtl.data.schema import ITEM_FIELDS, USER_FIELDS, FieldSpec
from dist_mtl.losses import ModelOutput
from dist_mtl.models.embeddings import build_ebc, field_columns, pooled_by_name
from dist_mtl.models.interaction import GroupedDotInteraction
from dist_mtl.models.layers import GroupedRows, MultiTaskHead, UserItemFactors
from dist_mtl.models.esmm import ESMM_TOWERS, ESMMHead, check_esmm_tasks
from dist_mtl.models.mmoe import MMOEHead, PLEHead, SharedBottomHead
from dist_mtl.models.weight_features import RowWeightFeatures, WeightedMeanPooling
from dist_mtl.tasks import TaskConfig


class MultiTaskModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_sizes: Mapping[str, int], tasks: Sequence[TaskConfig],
                 sparse_device: torch.device | str = "meta"):
        super().__init__()
        self.user_ebc = build_ebc(USER_FIELDS, vocab_sizes, cfg.embedding_dim, cfg.field_dims, sparse_device)
        self.item_ebc = build_ebc(ITEM_FIELDS, vocab_sizes, cfg.embedding_dim, cfg.field_dims, sparse_device)
        self.user_means = side_mean_pooling(USER_FIELDS, cfg)
        self.item_means = side_mean_pooling(ITEM_FIELDS, cfg)
        self.user_weights = side_weight_features(USER_FIELDS, cfg.weight_features)
        self.item_weights = side_weight_features(ITEM_FIELDS, cfg.weight_features)
        self.head_input = HeadInput(cfg, self.user_weights.out_dim, self.item_weights.out_dim)
        self.head = build_head(self.head_input.out_dim, cfg, tasks, self.head_input.layout)
        self.head.bfloat16 = cfg.head_precision == "bfloat16"

    @torch.no_grad()
    def init_output_bias(self, label_rates: Mapping[str, float | None]) -> None:
        """Start each task's output bias at the logit of its label rate (tasks given None keep theirs).

        With a zero-mean bias the first steps' large "predict fewer clicks" gradient lands on the
        embedding rows those steps touch (the tables' learning rate dwarfs the dense one), leaving the
        ids seen early with an offset the later steps must unlearn; starting at the base rate avoids it.
        """
        for name, layer in self.head.output_layers().items():
            rate = label_rates.get(name)
            if rate is None:
                continue
            rate = min(max(rate, 1e-6), 1.0 - 1e-6)
            layer.bias.fill_(math.log(rate / (1.0 - rate)))

    def forward(self, batch: GroupedBatch) -> ModelOutput:
        user, item = pooled_by_name(self.user_ebc(batch.user_features), self.item_ebc(batch.item_features))
        user = self.user_means(user, batch.user_features)
        item = self.item_means(item, batch.item_features)
        user = self.user_weights.append_to(user, batch.user_features)
        item = self.item_weights.append_to(item, batch.item_features)
        return self.head(self.head_input(user, item, batch.user_index))


def side_weight_features(fields: Sequence[FieldSpec], stats: Sequence[str]) -> RowWeightFeatures:
    """``model.weight_features`` of one side's multi-valued fields (out_dim 0 when none are asked for)."""
    return RowWeightFeatures([f.name for f in fields], [f.name for f in fields if f.multi_valued], stats)


def side_mean_pooling(fields: Sequence[FieldSpec], cfg: ModelConfig) -> WeightedMeanPooling:
    """``model.mean_pooled_fields`` of one side (a module that changes nothing when it has none)."""
    columns = field_columns(fields, cfg.embedding_dim, cfg.field_dims)
    return WeightedMeanPooling([f.name for f in fields],
                               {k: c for k, c in columns.items() if k in cfg.mean_pooled_fields})


class InputLayout(NamedTuple):
    """Where things sit in the head input: the width of a user row and of an item row, and the
    ``[start, stop)`` columns of each user field's pooled embedding in a user row."""

    user_dim: int
    item_dim: int
    user_columns: dict[str, tuple[int, int]]


class HeadInput(nn.Module):
    """What every head reads: ``GroupedRows`` of the user rows (one per distinct user) and the item rows,
    with ``model.interaction = "dot"`` the pairwise dot products of all pooled field embeddings appended
    (user-user ones to the user rows, user-item and item-item ones to the item rows).

    A side's rows are its pooled embeddings, then its ``weight_dims`` columns of weight features
    (``model.weight_features``) when there are any. The user rows are not copied to impressions here:
    the heads' first layers multiply them once per user (``GroupedInputLinear``). ``layout`` says where
    each user field's columns are (the heads that treat fields apart read it)."""

    def __init__(self, cfg: ModelConfig, user_weight_dims: int = 0, item_weight_dims: int = 0):
        super().__init__()
        user_columns = field_columns(USER_FIELDS, cfg.embedding_dim, cfg.field_dims)
        item_columns = field_columns(ITEM_FIELDS, cfg.embedding_dim, cfg.field_dims)
        user_dim = user_columns[USER_FIELDS[-1].name][1] + user_weight_dims
        item_dim = item_columns[ITEM_FIELDS[-1].name][1] + item_weight_dims
        self.dot = None
        if cfg.interaction == "dot":
            self.dot = GroupedDotInteraction(len(USER_FIELDS), len(ITEM_FIELDS), cfg.embedding_dim)
            per_user, per_impression = GroupedDotInteraction.num_pairs(len(USER_FIELDS), len(ITEM_FIELDS))
            user_dim, item_dim = user_dim + per_user, item_dim + per_impression
        self.layout = InputLayout(user_dim, item_dim, user_columns)
        self.out_dim = user_dim + item_dim

    def forward(self, user: torch.Tensor, item: torch.Tensor, user_index: torch.Tensor) -> GroupedRows:
        if self.dot is None:
            return GroupedRows(user, item, user_index)
        per_user, per_impression = self.dot(user, item, user_index)
        return GroupedRows(torch.cat([user, per_user], dim=1), torch.cat([item, per_impression], dim=1), user_index)


def _esmm(in_dim: int, cfg: ModelConfig, tasks: Sequence[TaskConfig]) -> MultiTaskHead:
    check_esmm_tasks(tasks)
    return ESMMHead(in_dim, cfg.tower_dims, cfg.activation, cfg.dropout, task_tower_dims=cfg.task_tower_dims)


def _mmoe(in_dim: int, cfg: ModelConfig, tasks: Sequence[TaskConfig]) -> MultiTaskHead:
    return MMOEHead(in_dim, tasks, cfg.num_experts, cfg.expert_dims, cfg.tower_dims, cfg.activation, cfg.dropout,
                    cfg.task_tower_dims)


def _shared_bottom(in_dim: int, cfg: ModelConfig, tasks: Sequence[TaskConfig]) -> MultiTaskHead:
    return SharedBottomHead(in_dim, tasks, cfg.expert_dims, cfg.tower_dims, cfg.activation, cfg.dropout,
                            cfg.task_tower_dims)


def _ple(in_dim: int, cfg: ModelConfig, tasks: Sequence[TaskConfig]) -> MultiTaskHead:
    return PLEHead(in_dim, tasks, cfg.num_experts, cfg.task_experts, cfg.expert_dims, cfg.tower_dims,
                   cfg.activation, cfg.dropout, cfg.task_tower_dims)


def factor_tasks(head: str, tasks: Sequence[TaskConfig]) -> list[str]:
    """The tasks whose logits get a taste factor term (``model.factor_rank``), the first without a mix:
    ESMM's two towers; for the other heads every binary task, in config order (a regression target's
    scale has nothing to do with a click logit's, so it gets none)."""
    if head == "esmm":
        return list(ESMM_TOWERS)
    return [t.name for t in tasks if t.type == "binary"]


def build_head(in_dim: int, cfg: ModelConfig, tasks: Sequence[TaskConfig],
               layout: InputLayout | None = None) -> MultiTaskHead:
    """The head ``cfg.head`` over ``in_dim`` input columns, with the taste factors when
    ``cfg.factor_rank`` asks for them; its layers then read all but the ``cfg.factor_only_fields``' user
    columns (``layout`` says where those are)."""
    if not cfg.factor_rank:
        return HEADS[cfg.head](in_dim, cfg, tasks)
    if layout is None or layout.user_dim + layout.item_dim != in_dim:
        raise ValueError(f"model.factor_rank needs the head input's layout (user and item row widths), got {layout}")
    factors = UserItemFactors(layout.user_dim, layout.item_dim, cfg.factor_rank, factor_tasks(cfg.head, tasks))
    hidden = {c for f in cfg.factor_only_fields for c in range(*layout.user_columns[f])}
    visible = [c for c in range(layout.user_dim) if c not in hidden] if hidden else None
    head = HEADS[cfg.head](in_dim - len(hidden), cfg, tasks)
    head.attach_factors(factors, visible)
    return head


HEADS: dict[str, Callable[..., MultiTaskHead]] = {
    "esmm": _esmm,
    "mmoe": _mmoe,
    "ple": _ple,
    "shared_bottom": _shared_bottom,
}
