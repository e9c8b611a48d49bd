"""Dense building blocks shared by the heads."""

from __future__ import annotations

import abc
from typing import Mapping, NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from dist_mtl.losses import ModelOutput

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


class GroupedRows(NamedTuple):
    """The heads' input kept factored by user: row ``b`` of the input is ``cat(user[user_index[b]],
    item[b])``. ``user`` is ``[U, Du]`` (one row per distinct user of the batch), ``item`` ``[B, Di]``."""

    user: torch.Tensor
    item: torch.Tensor
    user_index: torch.Tensor

    def dense(self) -> torch.Tensor:
        """The ``[B, Du + Di]`` rows themselves (what a layer that does not split its input reads)."""
        return torch.cat([self.user.index_select(0, self.user_index), self.item], dim=1)


HeadRows = Union[GroupedRows, torch.Tensor]


class UserItemFactors(nn.Module):
    """Low-rank user x item terms for task logits (``model.factor_rank``): the user rows and the item rows
    are projected to ``rank`` dims (``P u`` once per user, ``Q i`` per impression, both shared by the
    tasks); the first task's term is ``(P u) . (Q i)``, every later task's ``(P u)^T M_t (Q i)`` with its
    own ``M_t`` starting at the identity (the first task needs none: P and Q absorb it).

    Why shared P and Q: a task with few positives (CVR: purchases) then learns only its k x k mix of
    factors that the frequent task (CTR) trains. The terms are computed in float32 whatever the head's
    precision: they are added to float32 logits and cost ``k`` multiply-adds per impression."""

    def __init__(self, user_dim: int, item_dim: int, rank: int, tasks: Sequence[str]):
        super().__init__()
        self.tasks = list(tasks)
        self.user_projection = nn.Linear(user_dim, rank, bias=False)
        self.item_projection = nn.Linear(item_dim, rank, bias=False)
        self.mix = nn.ParameterDict({t: nn.Parameter(torch.eye(rank)) for t in self.tasks[1:]})

    def forward(self, x: HeadRows) -> dict[str, torch.Tensor]:
        """``[B]`` logit terms, one per task."""
        grouped = isinstance(x, GroupedRows)
        user_dim = self.user_projection.in_features
        user_rows, item_rows = (x.user, x.item) if grouped else (x[:, :user_dim], x[:, user_dim:])
        with torch.autocast(item_rows.device.type, enabled=False):
            user = self.user_projection(user_rows.float())
            if grouped:
                user = user.index_select(0, x.user_index)
            item = self.item_projection(item_rows.float())
            terms = {self.tasks[0]: (user * item).sum(1)}
            for task in self.tasks[1:]:
                terms[task] = ((user @ self.mix[task]) * item).sum(1)
        return terms


class MultiTaskHead(nn.Module, abc.ABC):
    """Base of the heads: ``forward`` runs the head's ``predict`` under bfloat16 ``torch.autocast`` when
    ``bfloat16`` is set (``model.head_precision``), on the device its input is on.

    The autocast sits here, inside the head, because TrainPipelineSparseDist fx-traces the model's
    forward with every module free of sharded tables as a leaf: a context manager in the model's own
    forward would run once at trace time and be missing from the pipelined forward. The towers hand
    back float32 (``Tower``), so sigmoids, pCTR x pCVR, losses and AUCs stay float32.

    ``attach_factors`` gives any head the taste factors (``model.factor_rank``): ``forward`` hands their
    terms to ``predict``, which adds each to its task's logit, and ``predict`` reads the input without the
    user columns the factors alone read (``model.factor_only_fields``); the head's layers are then built
    for that narrower input."""

    bfloat16: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.register_module("factors", None)
        self.register_buffer("visible_user_columns", None, persistent=False)
        self.register_buffer("visible_dense_columns", None, persistent=False)

    def forward(self, x: HeadRows) -> ModelOutput:
        rows = x.item if isinstance(x, GroupedRows) else x
        with torch.autocast(rows.device.type, dtype=torch.bfloat16, enabled=self.bfloat16):
            terms = self.factors(x) if self.factors is not None else {}
            return self.predict(self._visible(x), terms)

    def attach_factors(self, factors: UserItemFactors, visible_user_columns: Sequence[int] | None = None) -> None:
        """Add ``factors``' terms to the logits of its tasks; ``visible_user_columns`` (the user-row columns
        the head's layers read, in order; None: all) hides the others from every layer but the factors."""
        self.factors = factors
        if visible_user_columns is not None:
            user_dim = factors.user_projection.in_features
            in_dim = user_dim + factors.item_projection.in_features
            # Buffers, so that they move with the module; not saved: the config rebuilds them.
            self.register_buffer("visible_user_columns",
                                 torch.tensor(list(visible_user_columns), dtype=torch.int64), persistent=False)
            self.register_buffer("visible_dense_columns", torch.cat([
                self.visible_user_columns, torch.arange(user_dim, in_dim, dtype=torch.int64)]), persistent=False)

    def _visible(self, x: HeadRows) -> HeadRows:
        if self.visible_user_columns is None:
            return x
        if isinstance(x, GroupedRows):
            return GroupedRows(x.user.index_select(1, self.visible_user_columns), x.item, x.user_index)
        return x.index_select(1, self.visible_dense_columns)

    @abc.abstractmethod
    def predict(self, x: HeadRows, logit_terms: Mapping[str, torch.Tensor]) -> ModelOutput:
        """The head's outputs for ``x``, with ``logit_terms[task]`` added to the logit of each task it
        names; each head defines it (``forward`` adds the precision and the factors)."""


class GroupedInputLinear(nn.Linear):
    """``nn.Linear`` over ``[user row ; item row]`` that multiplies each distinct user's row once.

    ``W @ cat(u, i) = W_u @ u + W_i @ i``: the user columns' product is taken per user and gathered to
    impressions, so a batch of B impressions from U users costs ``U x Du + B x Di`` multiply-adds per
    output unit instead of ``B x (Du + Di)``, and neither the ``[B, Du + Di]`` input nor its gradient is
    ever built. With ~55 impressions per user this is most of a first layer's work (measured at batch
    4096, 75 users, 212 user and 164 item columns, two towers, forward and backward on 2 cores: towers
    [64, 32] 11.6 -> 4.9 ms, 360x200x80 61 -> 45 ms). Same parameters, initialisation and state-dict
    entries as ``nn.Linear``, which it is on a plain tensor.
    """

    def forward(self, x: HeadRows) -> torch.Tensor:  # type: ignore[override]
        if isinstance(x, torch.Tensor):
            return super().forward(x)
        user_columns = x.user.shape[1]
        per_user = F.linear(x.user, self.weight[:, :user_columns], self.bias)
        # addmm adds the gathered user products inside the item GEMM: no separate [B, out] sum and temporary.
        return torch.addmm(per_user.index_select(0, x.user_index), x.item, self.weight[:, user_columns:].t())


def mlp(in_dim: int, hidden: Sequence[int], activation: str = "relu", dropout: float = 0.0) -> nn.Sequential:
    """Linear + activation (+ dropout) per hidden size; the first layer also takes ``GroupedRows``.

    torchrec.modules.mlp.MLP has no dropout, which the towers need, hence this small builder.
    """
    layers: list[nn.Module] = []
    for k, size in enumerate(hidden):
        linear = GroupedInputLinear if k == 0 else nn.Linear
        layers += [linear(in_dim, size), ACTIVATIONS[activation]()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_dim = size
    return nn.Sequential(*layers)


class Tower(nn.Module):
    """An MLP ending in one output unit per row: a logit for binary tasks, a value for regression.

    The output is float32 even under bfloat16 autocast (``model.head_precision``): a bfloat16 logit keeps
    8 bits of mantissa, so its sigmoids would tie across many impressions and blunt the AUCs."""

    def __init__(self, in_dim: int, hidden: Sequence[int], activation: str, dropout: float):
        super().__init__()
        self.body = mlp(in_dim, hidden, activation, dropout)
        self.out = nn.Linear(hidden[-1], 1) if hidden else GroupedInputLinear(in_dim, 1)

    def forward(self, x: HeadRows) -> torch.Tensor:
        h = self.body(x)
        rows = h.item if isinstance(h, GroupedRows) else h
        # The output unit itself runs in float32: under autocast it would round the logit to bfloat16
        # before any cast back (a few distinct values per batch near a label rate's logit).
        with torch.autocast(rows.device.type, enabled=False):
            if isinstance(h, torch.Tensor):
                h = h.float()
            return self.out(h).squeeze(-1)
