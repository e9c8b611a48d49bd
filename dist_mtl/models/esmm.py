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
from dist_mtl.models.layers import HeadRows, MultiTaskHead, Tower
from dist_mtl.tasks import TaskConfig

ESMM_TASKS = ("ctr", "cvr", "ctcvr")
#: The tasks with a tower of their own (pCTCVR is their product).
ESMM_TOWERS = ("ctr", "cvr")


def check_esmm_tasks(tasks: Sequence[TaskConfig]) -> None:
    """ESMM's structure fixes its tasks: binary ctr and ctcvr over every impression and cvr over the clicked
    ones (the rows whose ctr label is 1); loss weights and label columns are free."""
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
    for name in ("ctr", "ctcvr"):
        if by_name[name].rows != "all":
            raise ValueError(f"task '{name}' of the esmm head is over every impression (rows = \"all\"), got "
                             f"rows = {by_name[name].rows!r}")
    click = by_name["ctr"].label
    if by_name["cvr"].rows != click:
        # pCVR is p(buy | click): scored (and, with a loss weight, trained) on other rows it is another task.
        raise ValueError(
            f"task 'cvr' of the esmm head is over the clicked impressions: rows = {click!r} (ctr's label), got "
            f"rows = {by_name['cvr'].rows!r}"
        )
    if by_name["cvr"].loss_weight == 0 and by_name["ctcvr"].loss_weight == 0:
        raise ValueError(
            "cvr and ctcvr both have loss_weight 0, so the CVR tower would never train and their metrics "
            "would score random weights; give one of them a weight"
        )


class ESMMHead(MultiTaskHead):
    """``task_tower_dims`` gives a tower other hidden sizes than ``tower_dims`` (``model.task_tower_dims``);
    the taste factors come through ``attach_factors`` (over tasks ctr and cvr: pCTCVR has no logit)."""

    def __init__(self, in_dim: int, tower_dims: Sequence[int], activation: str = "relu", dropout: float = 0.0,
                 task_tower_dims: Mapping[str, Sequence[int]] | None = None):
        super().__init__()
        dims = task_tower_dims or {}
        self.ctr_tower = Tower(in_dim, dims.get("ctr", tower_dims), activation, dropout)
        self.cvr_tower = Tower(in_dim, dims.get("cvr", tower_dims), activation, dropout)

    def output_layers(self) -> dict[str, nn.Linear]:
        """The last layer of each task that has a logit of its own (pCTCVR has none)."""
        return {"ctr": self.ctr_tower.out, "cvr": self.cvr_tower.out}

    def predict(self, x: HeadRows, logit_terms: Mapping[str, torch.Tensor]) -> ModelOutput:
        ctr_logit = self.ctr_tower(x)
        cvr_logit = self.cvr_tower(x)
        if "ctr" in logit_terms:
            ctr_logit = ctr_logit + logit_terms["ctr"]
        if "cvr" in logit_terms:
            cvr_logit = cvr_logit + logit_terms["cvr"]
        p_ctr = torch.sigmoid(ctr_logit)
        p_cvr = torch.sigmoid(cvr_logit)
        return ModelOutput(
            predictions={"ctr": p_ctr, "cvr": p_cvr, "ctcvr": p_ctr * p_cvr},
            logits={"ctr": ctr_logit, "cvr": cvr_logit},
            # pCTCVR is a product of probabilities and has no logit; its log is exact from the two logits.
            log_probabilities={"ctcvr": F.logsigmoid(ctr_logit) + F.logsigmoid(cvr_logit)},
        )
