"""ESMM (Ma et al., SIGIR 2018): CTR and CVR towers over shared embeddings, pCTCVR = pCTR x pCVR.

Trained on CTR and CTCVR over all impressions, so the CVR tower learns from the whole impression space
(no sample selection bias) and gets gradient only through pCTCVR; CVR is evaluated on clicked rows.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dist_mtl.losses import ModelOutput
from dist_mtl.models.layers import GroupedRows, HeadRows, MultiTaskHead, Tower
from dist_mtl.tasks import TaskConfig

ESMM_TASKS = ("ctr", "cvr", "ctcvr")
#: The tasks with a tower of their own (pCTCVR is their product).
ESMM_TOWERS = ("ctr", "cvr")


def check_esmm_tasks(tasks: Sequence[TaskConfig]) -> None:
    """ESMM's structure fixes its tasks: binary ctr, cvr and ctcvr (weights and columns are free)."""
    by_name = {t.name: t for t in tasks}
    if set(by_name) != set(ESMM_TASKS):
        raise ValueError(
            f"the esmm head predicts exactly the tasks {list(ESMM_TASKS)}; got {sorted(by_name)} "
            f"(use head = \"mmoe\" or \"shared_bottom\" for other tasks)"
        )
    for t in tasks:
        if t.type != "binary":
            raise ValueError(
                f"task '{t.name}' is {t.type}, but the esmm head carries only binary tasks "
                f"(pCTCVR = pCTR x pCVR); use head = \"mmoe\" for regression tasks"
            )
    if by_name["cvr"].loss_weight == 0 and by_name["ctcvr"].loss_weight == 0:
        raise ValueError(
            "cvr and ctcvr both have loss_weight 0, so the CVR tower would never train and their metrics "
            "would score random weights; give one of them a weight"
        )


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


class ESMMHead(MultiTaskHead):
    """``factors`` (``UserItemFactors`` over tasks ctr and cvr) adds its terms to the two logits;
    ``tower_user_columns`` (the user-row columns the towers read, in order; None: all) hides the
    ``model.factor_only_fields`` from the towers; ``task_tower_dims`` gives a tower other hidden sizes than
    ``tower_dims`` (``model.task_tower_dims``)."""

    def __init__(self, in_dim: int, tower_dims: Sequence[int], activation: str = "relu", dropout: float = 0.0,
                 factors: UserItemFactors | None = None, tower_user_columns: Sequence[int] | None = None,
                 task_tower_dims: Mapping[str, Sequence[int]] | None = None):
        super().__init__()
        self.factors = factors
        tower_dim = in_dim
        if tower_user_columns is None:
            self.register_buffer("tower_user_columns", None, persistent=False)
            self.register_buffer("tower_dense_columns", None, persistent=False)
        else:
            if factors is None:
                raise ValueError("tower_user_columns hides user columns from the towers; without factors "
                                 "they would reach no logit")
            user_dim = factors.user_projection.in_features
            # A buffer, so that it moves with the module; not saved: the config rebuilds it.
            self.register_buffer("tower_user_columns", torch.tensor(list(tower_user_columns), dtype=torch.int64),
                                 persistent=False)
            self.register_buffer("tower_dense_columns", torch.cat([
                self.tower_user_columns, torch.arange(user_dim, in_dim, dtype=torch.int64)]), persistent=False)
            tower_dim = in_dim - (user_dim - len(tower_user_columns))
        dims = task_tower_dims or {}
        self.ctr_tower = Tower(tower_dim, dims.get("ctr", tower_dims), activation, dropout)
        self.cvr_tower = Tower(tower_dim, dims.get("cvr", tower_dims), activation, dropout)

    def output_layers(self) -> dict[str, nn.Linear]:
        """The last layer of each task that has a logit of its own (pCTCVR has none)."""
        return {"ctr": self.ctr_tower.out, "cvr": self.cvr_tower.out}

    def _tower_rows(self, x: HeadRows) -> HeadRows:
        if self.tower_user_columns is None:
            return x
        if isinstance(x, GroupedRows):
            return GroupedRows(x.user.index_select(1, self.tower_user_columns), x.item, x.user_index)
        return x.index_select(1, self.tower_dense_columns)

    def predict(self, x: HeadRows) -> ModelOutput:
        rows = self._tower_rows(x)
        ctr_logit = self.ctr_tower(rows)
        cvr_logit = self.cvr_tower(rows)
        if self.factors is not None:
            terms = self.factors(x)
            ctr_logit = ctr_logit + terms["ctr"]
            cvr_logit = cvr_logit + terms["cvr"]
        p_ctr = torch.sigmoid(ctr_logit)
        p_cvr = torch.sigmoid(cvr_logit)
        return ModelOutput(
            predictions={"ctr": p_ctr, "cvr": p_cvr, "ctcvr": p_ctr * p_cvr},
            logits={"ctr": ctr_logit, "cvr": cvr_logit},
            # pCTCVR is a product of probabilities and has no logit; its log is exact from the two logits.
            log_probabilities={"ctcvr": F.logsigmoid(ctr_logit) + F.logsigmoid(cvr_logit)},
        )
