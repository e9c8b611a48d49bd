"""Per-task evaluation metrics, synchronised across ranks, and the rank-0 TensorBoard / JSON-lines logger.

Metrics per task, over the task's rows only (CVR: clicked impressions):

- binary: ``<task>/auc`` (exact ROC AUC on the probabilities, ties counting half as in sklearn; see
  ``DistributedExactAUC``), ``<task>/logloss`` (mean BCE of the probability
  clamped to [``PROBABILITY_EPS``, 1 - ``PROBABILITY_EPS``]), ``<task>/calibration`` (mean prediction /
  mean label), ``<task>/count`` (rows), ``<task>/positives``; with a group column (``TaskMetrics``'s
  ``group_column``, the reader's ``user_row``) also ``<task>/gauc`` and ``<task>/gauc_groups`` (see
  ``DistributedGroupAUC``).
- regression: ``<task>/mse``, ``<task>/mae``, ``<task>/count``.

Undefined values are NaN, never a stand-in: AUC when the rows hold only one class (TorchRec's AUC
says 0.5 there, which reads like a trained-but-useless model), calibration without positives, and
every mean over zero rows. Sample weights (``weight_column``) shape the loss only: the metrics weigh
every row equally.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence, TextIO

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter

from dist_mtl.losses import PROBABILITY_EPS
from dist_mtl.tasks import TaskConfig

METRICS_JSONL = "metrics.jsonl"
"""File in the logger's directory holding one JSON object per ``MetricsLogger.log`` call."""

# Columns of the per-task running sums. Binary: count, positives, sum of predictions, sum of log-loss.
# Regression: count, sum of squared errors, sum of absolute errors (last column unused).
_NUM_SUMS = 4


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class DistributedExactAUC:
    """Exact ROC AUC over every rank's rows, without gathering them: ties count half, as in sklearn.

    AUC = (pairs (positive, negative) with the positive scored higher + half the tied pairs) / (P * N).
    ``compute`` gathers only the rows of the globally smaller class (the positives, in click and
    purchase data: 3.9% of the impressions for CTR, 0.02% for CTCVR), sorts each rank's own rows of
    the other class, counts with two binary searches how many of them fall below and tie with each
    gathered score, and sums the integer counts over the ranks. Each rank holds its own scores in
    float32, ~4 bytes per row, and computes over its own share.

    Why not torchmetrics' ``BinaryAUROC`` or TorchRec's AUC: both gather all ranks' predictions onto
    every rank and build the whole ROC curve there (an argsort and cumulative sums over every row). On
    the full-size test split (43M rows, 3 tasks, 2 ranks) that held ~6 GB on each rank at once and
    took 12.0 GB for the training job (benchmarks/RESULTS.md, Full scale), and it grows with the
    world size: each of 8 ranks would hold the whole split.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        # Per class (0: negatives, 1: positives), the rows' scores, batch by batch.
        self._scores: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    def update(self, scores: torch.Tensor, positive: torch.Tensor) -> None:
        """Adds rows: ``scores`` [B] (any float dtype; compared in float32) and ``positive`` [B] bool."""
        scores = scores.detach().to(self.device, torch.float32)
        self._scores[0].append(scores[~positive])
        self._scores[1].append(scores[positive])

    def _class_scores(self, label: int) -> torch.Tensor:
        parts = self._scores[label]
        merged = torch.cat(parts) if parts else torch.empty(0, dtype=torch.float32, device=self.device)
        self._scores[label][:] = [merged]  # later calls and updates build on one tensor, not a copy
        return merged

    def compute(self) -> float:
        """The AUC over all ranks' rows since ``reset``; NaN unless both classes occur (a collective)."""
        local = [self._class_scores(0), self._class_scores(1)]
        counts = torch.tensor([len(local[0]), len(local[1])], dtype=torch.int64, device=self.device)
        if _distributed():
            dist.all_reduce(counts)
        negatives, positives = counts.tolist()
        if negatives == 0 or positives == 0:
            return math.nan
        gathered_label = 1 if positives <= negatives else 0
        gathered = _all_gather_uneven(local[gathered_label])
        others = torch.sort(local[1 - gathered_label]).values
        below = torch.searchsorted(others, gathered, right=False)
        below_or_tied = torch.searchsorted(others, gathered, right=True)
        tied = (below_or_tied - below).sum()
        # A gathered positive beats the negatives below it; a gathered negative is beaten by the
        # positives above it.
        wins = below.sum() if gathered_label == 1 else (len(others) - below_or_tied).sum()
        # Twice the pair count, in integers: exact up to 2^63 (P * N of the full Ali-CCP is ~7e13).
        twice_pairs = (2 * wins + tied).reshape(1)
        if _distributed():
            dist.all_reduce(twice_pairs)
        return int(twice_pairs.item()) / (2.0 * positives * negatives)


def _all_gather_uneven(local: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D ``local`` concatenated, in rank order; ranks may hold different lengths.

    gloo's all_gather wants equal shapes (``all_gather_into_tensor`` is NCCL-only, and
    ``all_gather_object`` pickles), so each rank pads to the longest and the padding is cut off."""
    if not _distributed():
        return local
    world = dist.get_world_size()
    length = torch.tensor([len(local)], dtype=torch.int64, device=local.device)
    lengths = [torch.empty_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    sizes = [int(n.item()) for n in lengths]
    padded = torch.zeros(max(sizes), dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def _group_auc_sums(groups: torch.Tensor, scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """float64 [3]: (sum over groups with both classes of rows x AUC, their rows, their number).

    One pass for all groups: rows sorted by (group, score), then per group the Mann-Whitney AUC
    (positives' rank sum - P(P+1)/2) / (P N), a positive's rank being the mid-rank of its run of tied
    scores within the group, so tied pairs count half as in ``DistributedExactAUC``. Ranks are taken for
    the positive rows only (a few percent of the rows in click data), which keeps the per-row temporaries
    to the sort's.
    """
    out = torch.zeros(3, dtype=torch.float64)
    n = len(groups)
    if n == 0:
        return out
    order = torch.sort(scores, stable=True).indices
    order = order[torch.sort(groups[order], stable=True).indices]
    g, s = groups[order], scores[order]
    positives_at = torch.nonzero(positive[order]).squeeze(1)
    del order
    new_group = torch.ones(n, dtype=torch.bool)
    torch.ne(g[1:], g[:-1], out=new_group[1:])
    del g
    new_run = torch.ones(n, dtype=torch.bool)
    torch.ne(s[1:], s[:-1], out=new_run[1:])
    del s
    new_run |= new_group
    group_start = torch.nonzero(new_group).squeeze(1)
    del new_group
    run_start = torch.nonzero(new_run).squeeze(1)
    del new_run
    run_end = torch.cat([run_start[1:], torch.tensor([n])]) - 1  # last row of each run
    # The positives' groups and tie runs, and their 1-based mid-ranks within the group.
    group_of = torch.searchsorted(group_start, positives_at, right=True) - 1
    run_of = torch.searchsorted(run_start, positives_at, right=True) - 1
    rank = (run_start[run_of] + run_end[run_of]).double() / 2 - group_start[group_of].double() + 1
    num_groups = len(group_start)
    size = torch.diff(group_start, append=torch.tensor([n])).double()
    pos = torch.bincount(group_of, minlength=num_groups).double()
    rank_sum = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_of, rank)
    neg = size - pos
    both = (pos > 0) & (neg > 0)
    auc = (rank_sum[both] - pos[both] * (pos[both] + 1) / 2) / (pos[both] * neg[both])
    out[0] = (size[both] * auc).sum()
    out[1] = size[both].sum()
    out[2] = both.sum()
    return out


class DistributedGroupAUC:
    """Group AUC (GAUC) over every rank's rows: each group's exact AUC (ties half), averaged over the
    groups that hold both classes, weighted by their rows (the impression-weighted user AUC of DIN).

    A group's rows may lie on several ranks and in several batches: the trainer's evaluation cuts the
    split's stream at batch and rank boundaries, and a user row cut by one has impressions on both
    sides. ``compute`` gathers every rank's distinct group keys (a few MB on the full Ali-CCP test
    split), gathers the rows of the groups seen on more than one rank (two per rank boundary in the
    evaluation's storage order) to every rank, and sums the other groups where they lie.

    Why not TorchRec's ``GAUCMetric``: it scores each batch's sessions on their own (a group cut by a
    batch or rank boundary becomes two sessions), averages sessions unweighted, and breaks score ties by
    sort order.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self._parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def update(self, groups: torch.Tensor, scores: torch.Tensor, positive: torch.Tensor) -> None:
        """Adds rows: ``groups`` [B] int64 keys, ``scores`` [B] (compared in float32), ``positive`` [B] bool."""
        # Kept on the CPU: the sort and scatter of compute are host work, and GPU memory is the tables'.
        # Copies: a batch's label tensors are views into the batch's few buffers, which a kept view would
        # keep whole (measured: 24 GB by the end of the full-size test split's 43M rows).
        self._parts.append((groups.detach().to("cpu", torch.int64, copy=True),
                            scores.detach().to("cpu", torch.float32, copy=True),
                            positive.detach().to("cpu", copy=True)))

    def _rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self._parts:
            return (torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.float32),
                    torch.empty(0, dtype=torch.bool))
        merged = tuple(torch.cat(column) for column in zip(*self._parts))
        self._parts = [merged]  # later calls and updates build on one set of tensors, not a copy
        return merged

    def compute(self) -> tuple[float, int]:
        """(GAUC, groups counted) over all ranks' rows since ``reset``; NaN and 0 without a group holding
        both classes (a collective)."""
        groups, scores, positive = self._rows()
        if _distributed():
            keys = torch.unique(groups)
            every_rank = torch.unique(_all_gather_uneven(keys.to(self.device)).cpu(), return_counts=True)
            shared_keys = every_rank[0][every_rank[1] > 1]
            shared = torch.isin(groups, shared_keys)
            local = _group_auc_sums(groups[~shared], scores[~shared], positive[~shared]).to(self.device)
            dist.all_reduce(local)
            # Every rank holds the same gathered rows, so each adds the same sums once.
            gathered = [_all_gather_uneven(column[shared].to(self.device)).cpu()
                        for column in (groups, scores, positive.to(torch.int8))]
            sums = local.cpu() + _group_auc_sums(gathered[0], gathered[1], gathered[2].bool())
        else:
            sums = _group_auc_sums(groups, scores, positive)
        weighted, rows, counted = sums.tolist()
        return _ratio(weighted, rows), int(counted)


class TaskMetrics:
    """Accumulates every task's metrics over batches; ``compute`` merges all ranks.

    ``compute`` is a collective: every rank must call it, in the same order relative to other
    collectives, even a rank that saw no batch. Ranks may hold different numbers of rows, or none,
    for any task. Counts and sums are float64 and all-reduced; the AUC counts ranked pairs across
    ranks (``DistributedExactAUC``), so each rank returns the same values, equal to the metric of one
    process over all rows.
    """

    def __init__(self, tasks: Sequence[TaskConfig], device: torch.device | None = None,
                 group_column: str | None = None):
        """``group_column``: a label column of int64 group keys (the reader's ``user_row``); each binary task
        then also reports its group AUC over those groups."""
        self.tasks = list(tasks)
        self.group_column = group_column
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        for task in self.tasks:
            task.validate()
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self._sums = torch.zeros(len(self.tasks), _NUM_SUMS, dtype=torch.float64, device=self.device)
        self._auroc = {t.name: DistributedExactAUC(self.device) for t in self.tasks if t.type == "binary"}
        self._group_auroc = {name: DistributedGroupAUC(self.device) for name in self._auroc} if group_column else {}
        self.reset()

    def reset(self) -> None:
        self._sums.zero_()
        for auroc in (*self._auroc.values(), *self._group_auroc.values()):
            auroc.reset()

    @torch.no_grad()
    def update(
        self,
        predictions: Mapping[str, torch.Tensor],
        labels: Mapping[str, torch.Tensor],
        source: str = "",
    ) -> None:
        """Adds one batch. ``source`` (the batch's origin) is quoted in error messages.

        Raises ValueError naming the task, column and batch row for a missing column, a shape
        mismatch, a binary label other than 0/1, a binary prediction outside [0, 1] (logits passed by
        mistake) or a non-finite value.
        """
        where = f" (batch from {source})" if source else ""
        groups = self._groups(labels, where) if self.group_column else None
        for index, task in enumerate(self.tasks):
            prediction, target, in_rows = self._task_rows(task, predictions, labels, where)
            sums = self._sums[index]
            sums[0] += prediction.numel()
            if task.type == "binary":
                p = prediction.double()
                clamped = p.clamp(PROBABILITY_EPS, 1.0 - PROBABILITY_EPS)
                logloss = -(target * torch.log(clamped) + (1.0 - target) * torch.log1p(-clamped))
                sums[1] += target.sum()
                sums[2] += p.sum()
                sums[3] += logloss.sum()
                self._auroc[task.name].update(prediction, target == 1)
                if groups is not None:
                    self._group_auroc[task.name].update(groups if in_rows is None else groups[in_rows],
                                                        prediction, target == 1)
            else:
                error = prediction.double() - target
                sums[1] += (error * error).sum()
                sums[2] += error.abs().sum()

    def _groups(self, labels: Mapping[str, torch.Tensor], where: str) -> torch.Tensor:
        if self.group_column not in labels:
            raise ValueError(f"group column '{self.group_column}' is missing from the batch labels{where} "
                             f"(have: {sorted(labels)})")
        groups = labels[self.group_column].to(self.device)
        if groups.dtype != torch.int64 or groups.dim() != 1:
            raise ValueError(f"group column '{self.group_column}' must be int64 [B], got {groups.dtype} "
                             f"{tuple(groups.shape)}{where}")
        return groups

    def _task_rows(
        self,
        task: TaskConfig,
        predictions: Mapping[str, torch.Tensor],
        labels: Mapping[str, torch.Tensor],
        where: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The task's validated (prediction, float64 target) on its rows, on the metrics' device, and the
        batch rows they are (a mask; None: all)."""
        if task.name not in predictions:
            raise ValueError(f"task '{task.name}': no prediction for it{where} (have: {sorted(predictions)})")
        prediction = predictions[task.name].detach().to(self.device)
        if prediction.dim() != 1:
            raise ValueError(
                f"task '{task.name}': prediction has shape {tuple(prediction.shape)}, expected [B]{where}"
            )
        columns = {"label": task.label}
        if task.rows != "all":
            columns["rows"] = task.rows
        values = {}
        for role, name in columns.items():
            if name not in labels:
                raise ValueError(
                    f"task '{task.name}': {role} column '{name}' is missing from the batch labels{where} "
                    f"(have: {sorted(labels)})"
                )
            values[role] = labels[name].to(self.device)
            if values[role].shape != prediction.shape:
                raise ValueError(
                    f"task '{task.name}': {role} column '{name}' has shape {tuple(values[role].shape)}, "
                    f"prediction has {tuple(prediction.shape)}{where}"
                )
        target = values["label"].double()
        in_rows = values["rows"] == 1 if "rows" in values else torch.ones_like(target, dtype=torch.bool)

        if task.type == "binary":
            bad_label = in_rows & (target != 0) & (target != 1)
            bad_prediction = in_rows & ~((prediction >= 0) & (prediction <= 1))
            label_rule, prediction_rule = "0 or 1", "a probability in [0, 1]"
        else:
            bad_label = in_rows & ~torch.isfinite(target)
            bad_prediction = in_rows & ~torch.isfinite(prediction)
            label_rule, prediction_rule = "finite", "finite"
        # One device-to-host sync for both checks.
        any_bad_label, any_bad_prediction = torch.stack([bad_label.any(), bad_prediction.any()]).tolist()
        if any_bad_label:
            row = int(torch.nonzero(bad_label)[0])
            raise ValueError(
                f"task '{task.name}': label column '{task.label}' is {float(target[row])!r} at batch row "
                f"{row}, expected {label_rule}{where}"
            )
        if any_bad_prediction:
            row = int(torch.nonzero(bad_prediction)[0])
            raise ValueError(
                f"task '{task.name}': prediction is {float(prediction[row])!r} at batch row {row}, "
                f"expected {prediction_rule}{where}"
            )
        if "rows" in values:
            return prediction[in_rows], target[in_rows], in_rows
        return prediction, target, None

    def compute(self) -> dict[str, float]:
        """Every task's metrics over all rows seen on all ranks since ``reset`` (a collective)."""
        sums = self._sums.clone()
        if _distributed():
            dist.all_reduce(sums)
        totals = sums.tolist()
        results: dict[str, float] = {}
        for index, task in enumerate(self.tasks):
            count, a, b, c = totals[index]
            name = task.name
            if task.type == "binary":
                positives, sum_prediction, sum_logloss = a, b, c
                # A collective on every rank (NaN without both classes, decided on global counts).
                results[f"{name}/auc"] = self._auroc[name].compute()
                if name in self._group_auroc:
                    results[f"{name}/gauc"], results[f"{name}/gauc_groups"] = self._group_auroc[name].compute()
                results[f"{name}/logloss"] = _ratio(sum_logloss, count)
                results[f"{name}/calibration"] = _ratio(sum_prediction, positives)
                results[f"{name}/count"] = count
                results[f"{name}/positives"] = positives
            else:
                results[f"{name}/mse"] = _ratio(a, count)
                results[f"{name}/mae"] = _ratio(b, count)
                results[f"{name}/count"] = count
        return results


class MetricsLogger:
    """Scalars to TensorBoard and to ``metrics.jsonl`` in ``log_dir``, on rank 0 only.

    Other ranks create no file and ``log`` does nothing there, so every rank can call it alike. The
    JSON-lines file is appended to (a resumed run continues it); each line is
    ``{"step": step, "<prefix><key>": value, ...}`` with NaN and infinities written as null, which
    strict JSON readers accept.
    """

    def __init__(self, log_dir: str | os.PathLike, rank: int):
        self.log_dir = Path(log_dir)
        self.rank = rank
        self._closed = False
        self._writer: SummaryWriter | None = None
        self._jsonl: TextIO | None = None
        if rank == 0:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.log_dir))
            self._jsonl = open(self.log_dir / METRICS_JSONL, "a", encoding="utf-8")

    def log(self, values: Mapping[str, float], step: int, prefix: str = "") -> None:
        """Writes each value under the tag ``prefix + key`` (e.g. prefix "eval/test/" + "ctr/auc")."""
        if self._closed:
            raise RuntimeError(f"MetricsLogger for {self.log_dir} is closed")
        if self._writer is None or self._jsonl is None:
            return
        record: dict[str, float | int | None] = {"step": int(step)}
        for key, value in values.items():
            tag = f"{prefix}{key}"
            try:
                number = float(value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"metric '{tag}' at step {step}: {value!r} is not a number") from e
            self._writer.add_scalar(tag, number, global_step=int(step))
            record[tag] = number if math.isfinite(number) else None
        self._jsonl.write(json.dumps(record) + "\n")
        # Flushed per call: calls are rare (every log_every_steps or evaluation) and a killed job
        # should not lose its last minutes of curves.
        self._jsonl.flush()
        self._writer.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
