"""What the model returns, and the weighted sum of per-task losses computed from it.

A task's loss (see ``MultiTaskLoss``) is a mean over the task's rows of per-row losses scaled by the
optional per-sample weight: ``loss_t = sum_i(w_i * l_i) / n_t`` with ``i`` over the task's rows and
``n_t`` their count. Dividing by the row count rather than by ``sum_i(w_i)`` makes weights absolute, so
``w = 2`` on every row doubles the loss (and the gradient) instead of cancelling out. In distributed
training ``n_t`` is the count over all ranks' batches (see ``MultiTaskLoss``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_mtl.tasks import TaskConfig

PROBABILITY_EPS = 1e-7
"""Probabilities are clamped to [eps, 1 - eps] before a log: BCE on a probability (a task without a
logit) and the log-loss metric. 1e-7 keeps 1 - eps below 1.0 in float32."""


@dataclass
class ModelOutput:
    """Per-task model outputs, keyed by task name."""

    predictions: dict[str, torch.Tensor]
    """[B] per task: a probability for binary tasks, the predicted value for regression tasks."""
    logits: dict[str, torch.Tensor] = field(default_factory=dict)
    """[B] logit of a binary task whose head has one."""
    log_probabilities: dict[str, torch.Tensor] = field(default_factory=dict)
    """[B] log of the probability of a binary task without a logit whose head can give it exactly:
    ESMM's ctcvr, ``logsigmoid(ctr_logit) + logsigmoid(cvr_logit)``. Its loss is then exact where the
    probability underflows, instead of BCE on the clamped probability, whose clamp zeroes the gradient
    of exactly the rows (a purchase the model rates near 0) it most needs to learn from."""


def _column(labels: Mapping[str, torch.Tensor], task: TaskConfig, role: str, name: str) -> torch.Tensor:
    if name not in labels:
        raise ValueError(
            f"task '{task.name}': {role} column '{name}' is missing from the batch labels "
            f"(have: {sorted(labels)})"
        )
    return labels[name]


def _check_rows(task: TaskConfig, what: str, tensor: torch.Tensor, expected: torch.Size) -> None:
    if tensor.shape != expected:
        raise ValueError(
            f"task '{task.name}': {what} has shape {tuple(tensor.shape)}, expected {tuple(expected)} "
            f"(one value per impression)"
        )


def binary_cross_entropy_on_probability(probability: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row BCE of a probability clamped to [eps, 1 - eps].

    Written out rather than ``F.binary_cross_entropy`` because that one is refused under autocast and
    asserts on the device (killing a CUDA context) for a target outside [0, 1].
    """
    p = probability.clamp(PROBABILITY_EPS, 1.0 - PROBABILITY_EPS)
    return -(target * torch.log(p) + (1.0 - target) * torch.log1p(-p))


def binary_cross_entropy_on_log_probability(log_p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row BCE of a probability given by its log: ``-(t log p + (1 - t) log(1 - p))``.

    ``log(1 - p)`` is ``log1mexp(log p)``: ``log(-expm1(x))`` near 0 and ``log1p(-exp(x))`` below
    ``-log 2`` (Maechler's split, accurate on both sides). Each branch gets a harmless input where it is
    not chosen, so no inf or NaN reaches the gradient through ``torch.where``. ``log p`` is kept below
    -1e-12: a product of two sigmoids is never 1, and log(1 - 1) would be -inf.
    """
    x = log_p.clamp(max=-1e-12)
    near_zero = x > -0.6931471805599453
    log_1m_p = torch.where(
        near_zero,
        torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, -1.0)))),
        torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, -1.0), x))),
    )
    return -(target * log_p + (1.0 - target) * log_1m_p)


def _mean_over_rows(total: torch.Tensor, rows: torch.Tensor | int) -> torch.Tensor:
    """``total / rows``; a task without rows (count 0) divides by 1, so its loss is 0 with a valid graph.
    A count summed over ranks and divided by the world size may lie in (0, 1) and is kept as it is."""
    if isinstance(rows, int):
        return total / max(rows, 1)
    return total / torch.where(rows > 0, rows, 1.0)


class MultiTaskLoss(torch.nn.Module):
    """``total = sum_t loss_weight_t * loss_t`` over the configured tasks.

    Per task: binary tasks use BCE-with-logits when the model gives the task a logit (numerically
    stable), else BCE computed from the log probability when the model gives that (ESMM's ctcvr), else
    BCE on the probability clamped to [``PROBABILITY_EPS``, 1 - ``PROBABILITY_EPS``] (the clamp stops the
    gradient of saturated rows); regression tasks use squared error. The task's loss is
    ``sum_i(w_i * l_i) / n_t`` over its rows (all rows, or those whose ``rows`` column is 1), ``w_i``
    the ``weight_column`` value or 1, ``n_t`` the number of such rows; a batch without any of the task's
    rows gives 0 with a valid graph and zero gradients.

    Across ranks (training mode, a process group of more than one rank, a trained task over masked
    rows): each rank divides its sum by ``n_t / world_size`` with ``n_t`` counted over every rank's batch
    (one all-reduce of the task counts per step), so that the data-parallel gradient average is the
    gradient of the global mean. Dividing by the local count instead would weigh a task's rows by how few
    of them a rank happened to get (a CVR loss over clicked rows: a rank with 80 clicks counting each twice
    as much as one with 160, and a rank with none halving that step's gradient). Tasks over all rows keep
    the local batch size (ranks' batches differ by at most one impression). In eval mode nothing is
    exchanged: ranks may then run different numbers of batches. A rank's returned task losses are its
    share of the global mean, so their mean over ranks (what the trainer logs) is the global mean, except
    for a weight-0 task over masked rows (ESMM's CVR): it trains nothing, so no count is exchanged for it,
    and each rank returns the mean over its own rows (0 without any); the logged value is then the mean
    of the ranks' means, the global mean only when the ranks hold as many of its rows.

    Tasks with ``loss_weight`` 0 are computed and reported but left out of the total, so their heads
    get no gradient from this loss. Rows outside a task's mask may hold anything (NaN labels included):
    they are replaced before the per-row loss so neither the value nor the gradient sees them.

    Label values are not range-checked here (that would cost a device sync every step); the reader
    guarantees click/buy in {0, 1} and ``TaskMetrics`` rejects bad labels in evaluation. Register this
    module as a child of the trained module: TorchRec's pipeline tracer then keeps it a leaf and its
    Python checks run eagerly.
    """

    def __init__(self, tasks: Sequence[TaskConfig]):
        super().__init__()
        self.tasks = list(tasks)
        if not self.tasks:
            raise ValueError("MultiTaskLoss needs at least one task")
        names = [t.name for t in self.tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"task names must be unique; repeated: {duplicates}")
        for task in self.tasks:
            task.validate()
        if not any(t.loss_weight > 0 for t in self.tasks):
            raise ValueError(f"every task in {names} has loss_weight 0: the total loss would train nothing")
        self._masked_trained_task = any(t.loss_weight > 0 and t.rows != "all" for t in self.tasks)

    def forward(
        self, output: ModelOutput, labels: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns the weighted total and every task's loss (detached, weight-0 tasks included)."""
        weighted: list[torch.Tensor] = []
        task_losses: dict[str, torch.Tensor] = {}
        sums, counts = zip(*(self.task_sum_and_rows(task, output, labels) for task in self.tasks))
        if self._sync_rows():
            # Masked counts are device tensors; a batch size is filled on the device (a host-to-device
            # copy of a Python number would wait for the step's queued work on a GPU).
            device = sums[0].device
            rows = torch.stack([c.float() if isinstance(c, torch.Tensor)
                                else torch.full((), float(c), dtype=torch.float32, device=device) for c in counts])
            dist.all_reduce(rows)
            counts = rows / dist.get_world_size()
        for i, task in enumerate(self.tasks):
            loss = _mean_over_rows(sums[i], counts[i])
            task_losses[task.name] = loss.detach()
            if task.loss_weight > 0:
                weighted.append(loss * task.loss_weight)
        # __init__ guarantees at least one task with a positive weight, so the stack is never empty.
        return torch.stack(weighted).sum(), task_losses

    def _sync_rows(self) -> bool:
        """Whether this step's row counts are summed over ranks: in training, with several ranks, when a
        trained task averages over masked rows. Over all rows the ranks' batch sizes differ by at most one
        impression (the reader balances them), and the all-reduce would cost every step (5-7% of the
        2-rank CPU main job's throughput) for nothing."""
        return (self.training and self._masked_trained_task and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1)

    @staticmethod
    def task_loss(task: TaskConfig, output: ModelOutput, labels: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One task's unweighted loss on this batch alone, as defined in the class docstring (a 0-dim
        float32 tensor)."""
        return _mean_over_rows(*MultiTaskLoss.task_sum_and_rows(task, output, labels))

    @staticmethod
    def task_sum_and_rows(task: TaskConfig, output: ModelOutput,
                          labels: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | int]:
        """``(sum_i(w_i * l_i), n_t)`` of one task on this batch; ``n_t`` a device tensor for masked rows
        (counted without a device-to-host sync), else the batch size."""
        if task.name not in output.predictions:
            raise ValueError(
                f"task '{task.name}': the model output has no prediction for it "
                f"(has: {sorted(output.predictions)})"
            )
        prediction = output.predictions[task.name]
        if prediction.dim() != 1:
            raise ValueError(f"task '{task.name}': prediction has shape {tuple(prediction.shape)}, expected [B]")
        target = _column(labels, task, "label", task.label).float()
        _check_rows(task, f"label column '{task.label}'", target, prediction.shape)

        row_weight: torch.Tensor | None = None
        if task.weight_column:
            row_weight = _column(labels, task, "weight", task.weight_column).float()
            _check_rows(task, f"weight column '{task.weight_column}'", row_weight, prediction.shape)
        if task.rows == "all":
            num_rows: torch.Tensor | int = prediction.shape[0]
        else:
            rows_column = _column(labels, task, "rows", task.rows)
            _check_rows(task, f"rows column '{task.rows}'", rows_column, prediction.shape)
            in_rows = rows_column == 1
            # Replace rather than multiply: 0 * NaN is NaN, and labels outside the rows may be undefined.
            target = torch.where(in_rows, target, torch.zeros_like(target))
            mask = in_rows.to(target.dtype)
            row_weight = mask if row_weight is None else torch.where(in_rows, row_weight, torch.zeros_like(mask))
            num_rows = mask.sum()

        if task.type == "binary":
            logit = output.logits.get(task.name)
            log_p = output.log_probabilities.get(task.name)
            if logit is not None:
                _check_rows(task, "logit", logit, prediction.shape)
                per_row = F.binary_cross_entropy_with_logits(logit.float(), target, reduction="none")
            elif log_p is not None:
                _check_rows(task, "log probability", log_p, prediction.shape)
                per_row = binary_cross_entropy_on_log_probability(log_p.float(), target)
            else:
                per_row = binary_cross_entropy_on_probability(prediction.float(), target)
        else:
            per_row = (prediction.float() - target) ** 2
        if row_weight is not None:
            per_row = per_row * row_weight
        return per_row.sum(), num_rows


class NonFiniteLossError(RuntimeError):
    """A step's task loss was not finite; the message names the step, the rank, the losses and the batch."""


class NonFiniteLossWatch:
    """Finds the first training step whose task losses are not all finite, without a host sync per step.

    Reading a loss on the host every step would make every CUDA step wait for the GPU. ``watch`` records the
    first bad step on the device instead, and ``raise_if_any``, called at logging steps and at the end of a
    segment, reads it: the error still names the first bad step, its losses and its batch.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, device
        self._first_step: torch.Tensor | None = None  # -1 until a step is not finite
        self._losses: dict[str, torch.Tensor] = {}  # that step's task losses
        self._sources: dict[int, str] = {}  # the batch source of every step since the last check

    def watch(self, step: int, task_losses: Mapping[str, torch.Tensor], source: str) -> None:
        losses = {k: v.detach().reshape(()) for k, v in task_losses.items()}
        if self._first_step is None:
            self._first_step = torch.full((), -1, dtype=torch.int64, device=next(iter(losses.values())).device)
            self._losses = {k: torch.zeros_like(v) for k, v in losses.items()}
        finite = torch.stack([torch.isfinite(v) for v in losses.values()]).all()
        first_here = ~finite & (self._first_step < 0)
        self._first_step = torch.where(first_here, step, self._first_step)
        self._losses = {k: torch.where(first_here, v, self._losses[k]) for k, v in losses.items()}
        self._sources[step] = source

    def raise_if_any(self) -> None:
        """Collective (every rank calls it at the same steps): a non-finite loss on any rank stops every
        rank with a NonFiniteLossError, the rank that saw it first naming its step, losses and batch.
        Raising on that rank alone would leave the others to fail inside their next collective, with an
        error that does not say why."""
        world, none = self.world_size, torch.iinfo(torch.int64).max
        local = -1 if self._first_step is None else int(self._first_step)
        # One MIN over (step, rank) pairs encoded as step * world + rank; a rank without one sends `none`.
        code = torch.tensor([local * world + self.rank if local >= 0 else none], dtype=torch.int64,
                            device=self.device)
        dist.all_reduce(code, op=dist.ReduceOp.MIN)
        first = int(code)
        if first != none:
            step, rank = divmod(first, world)
            if rank == self.rank:
                bad = {k: float(v) for k, v in self._losses.items()}
                raise NonFiniteLossError(f"non-finite loss at step {step} on rank {rank} (task losses {bad}) on "
                                         f"batch from {self._sources.get(step, 'an unrecorded batch')}")
            raise NonFiniteLossError(f"non-finite loss at step {step} on rank {rank} (that rank's error names "
                                     f"its losses and batch)")
        self._sources.clear()
