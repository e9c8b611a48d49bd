"""Tasks as data: what a head predicts, against which label, with which loss and on which rows."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from dist_mtl.data.schema import LABEL_COLUMNS, SAMPLE_WEIGHT_COLUMN, DatasetMetadata, SplitInfo

TASK_TYPES = ("binary", "regression")
#: The metrics that can rank models of a task type (early stopping, the best model), each with whether a
#: higher value is better; config validation and the trainer's ranking read this one table.
RANKING_METRICS: dict[str, dict[str, bool]] = {
    "binary": {"auc": True, "gauc": True, "logloss": False},
    "regression": {"mse": False, "mae": False},
}


@dataclass
class TaskConfig:
    """One prediction target.

    A task's loss and metrics run over its ``rows``: every impression ("all"), or those whose
    ``rows`` column is 1 (e.g. "click" for CVR, the ESMM paper's evaluation set for conversion).
    """

    name: str
    """Key of the prediction in the model output and prefix of its metrics, e.g. "ctr"."""
    label: str
    """Column of ``GroupedBatch.labels`` holding the target: "click", "buy" (a purchase; the converter
    drops click=0/buy=1 rows, so it is click-and-buy) or an extra column of the dataset."""
    type: str = "binary"
    """"binary" (BCE, AUC / log-loss / calibration) or "regression" (MSE, MSE / MAE)."""
    loss_weight: float = 1.0
    """Multiplies this task's loss in the total; 0 trains nothing directly (ESMM's CVR)."""
    weight_column: str = ""
    """Optional per-sample weight column of ``GroupedBatch.labels`` (e.g. dwell time); "" = all 1."""
    rows: str = "all"
    """"all", or a label column whose rows equal to 1 are the task's loss and evaluation rows."""

    def validate(self, available_columns: set[str] | None = None) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"task name {self.name!r} must be a non-empty identifier")
        if self.type not in TASK_TYPES:
            raise ValueError(f"task '{self.name}': unknown type {self.type!r} (expected one of {TASK_TYPES})")
        if not (self.loss_weight >= 0.0):
            raise ValueError(f"task '{self.name}': loss_weight must be >= 0, got {self.loss_weight}")
        if available_columns is not None:
            for what, col in (("label", self.label), ("weight", self.weight_column),
                              ("rows", "" if self.rows == "all" else self.rows)):
                if col and col not in available_columns:
                    raise ValueError(
                        f"task '{self.name}': {what} column {col!r} is not in the dataset "
                        f"(available: {sorted(available_columns)})"
                    )


def default_esmm_tasks() -> list[TaskConfig]:
    """The ESMM paper's three tasks; CVR has no direct loss and is evaluated on clicked impressions."""
    return [
        TaskConfig(name="ctr", label="click"),
        TaskConfig(name="cvr", label="buy", loss_weight=0.0, rows="click"),
        TaskConfig(name="ctcvr", label="buy"),
    ]


def default_multi_tower_tasks() -> list[TaskConfig]:
    """MMOE's, PLE's and Shared-Bottom's default: CTR and CTCVR, each trained over all impressions.

    These heads give every task its own tower, so ESMM's zero-weight CVR task would be an untrained
    tower there; CVR on clicked rows is a task a user adds with its own loss (``rows = "click"``).
    """
    return [
        TaskConfig(name="ctr", label="click"),
        TaskConfig(name="ctcvr", label="buy"),
    ]


def task_columns(tasks: Sequence[TaskConfig], weights: bool = True) -> list[str]:
    """Dataset columns the tasks read beyond click and buy (``weights=False``: without the per-sample weight
    columns, which only the losses read)."""
    cols = []
    for t in tasks:
        for c in (t.label, t.weight_column if weights else "", "" if t.rows == "all" else t.rows):
            if c and c not in LABEL_COLUMNS and c not in cols:
                cols.append(c)
    return cols


def check_task_columns(tasks: Sequence[TaskConfig], metadata: DatasetMetadata, weights: bool = True) -> None:
    """Raise ValueError naming the task and column when a dataset lacks a column the tasks read."""
    available = set(LABEL_COLUMNS) | set(metadata.extra_columns)
    for t in tasks:
        (t if weights else replace(t, weight_column="")).validate(available)


def label_rate(task: TaskConfig, split: SplitInfo) -> float | None:
    """The share of a binary task's rows whose label is 1, from a split's stored counts; None where the
    counts do not say (regression, extra label columns, rows other than "all" or "click", empty split)."""
    if task.type != "binary":
        return None
    # A split of kept negatives (convert --keep-negatives) stands for the whole: each stored non-clicked
    # row for 1 / negative_keep_rate impressions, as its sample_weight says.
    impressions = split.num_clicks + (split.num_impressions - split.num_clicks) / split.negative_keep_rate
    denominator = {"all": impressions, "click": split.num_clicks}.get(task.rows)
    # "buy" is click-and-buy (the converter drops click=0/buy=1 rows), so buys / clicks is the CVR.
    numerator = {"click": split.num_clicks, "buy": split.num_buys}.get(task.label)
    if denominator is None or numerator is None or denominator <= 0:
        return None
    return numerator / denominator


def check_downsampled_split(tasks: Sequence[TaskConfig], name: str, split: SplitInfo, training: bool) -> None:
    """Raise ValueError where a split whose non-clicked impressions were downsampled (``split
    .negative_keep_rate`` < 1) would be misused: trained on by a binary task over all impressions that does
    not weight its loss by SAMPLE_WEIGHT_COLUMN (it would learn a click rate 1 / rate times too high), or
    evaluated at all (its AUCs and log-losses would not be those of the impressions it stands for)."""
    rate = split.negative_keep_rate
    if rate >= 1.0:
        return
    kept = f"split '{name}' keeps a share {rate:g} of its non-clicked impressions (launch/convert.py --keep-negatives)"
    if not training:
        raise ValueError(f"{kept}: its metrics would not be those of the impressions it stands for; evaluate on "
                         f"a split converted whole")
    for t in tasks:
        if t.type == "binary" and t.rows == "all" and t.loss_weight > 0 and t.weight_column != SAMPLE_WEIGHT_COLUMN:
            raise ValueError(
                f"{kept}: task '{t.name}' trains on all of its rows without weight_column = "
                f"\"{SAMPLE_WEIGHT_COLUMN}\", so it would learn rates {1 / rate:g} times too high; set it on every "
                f"task over all impressions, e.g. tasks=[{{name=\"ctr\", label=\"click\", "
                f"weight_column=\"{SAMPLE_WEIGHT_COLUMN}\"}}, ...]"
            )
