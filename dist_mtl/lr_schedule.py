"""The dense learning rate over a run: linear warm-up, a constant stretch, then linear or cosine decay.

The shape is torchtitan's ``linear_warmup_stable_decay``. It is applied as a pure function of the step's
position in the run (epoch x steps per epoch + batch, see ``Trainer._schedule_step``) rather than through
``torch.optim.lr_scheduler.LambdaLR`` for two reasons: the checkpoint already holds the epoch and batch,
so a resumed job gets the same learning rate without any scheduler state to save (on another world size
or batch size, the rate of its epoch at the new steps per epoch),
and only the dense parameters' groups are scaled, while a LambdaLR over the combined optimizer would also
scale the data-parallel tables' group, so a table would train differently replicated than sharded (the
sharded tables' fused optimizer keeps its rate).
"""

from __future__ import annotations

import math

from torchrec.optim.keyed import CombinedOptimizer

from dist_mtl.config import OptimizerConfig


def dense_lr_factor(step: int, total_steps: int, cfg: OptimizerConfig) -> float:
    """Multiple of ``cfg.dense_lr`` for the ``step``-th optimizer step (1-based) of a run of ``total_steps``."""
    warmup = min(cfg.dense_lr_warmup_steps, max(total_steps - 1, 0))
    if step <= warmup:
        return step / (warmup + 1)
    if cfg.dense_lr_decay == "none":
        return 1.0
    decay_steps = max(round(cfg.dense_lr_decay_ratio * (total_steps - warmup)), 1)
    decay_start = total_steps - decay_steps
    if step <= decay_start:
        return 1.0
    # As torchtitan: the last step still moves the weights (progress stays below 1).
    progress = min((step - decay_start) / (decay_steps + 1), 1.0)
    shape = 1.0 - progress if cfg.dense_lr_decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.dense_lr_min_factor + (1.0 - cfg.dense_lr_min_factor) * shape


class DenseLRSchedule:
    """Sets the learning rate of the ``"dense"`` optimizer of ``optimizer`` before each step; ``total_steps``
    are the steps the schedule spans (those of the epochs that train the dense parameters)."""

    def __init__(self, optimizer: CombinedOptimizer, cfg: OptimizerConfig, total_steps: int):
        named = dict(optimizer.optimizers)
        if "dense" not in named:
            raise ValueError(f"the combined optimizer has no 'dense' optimizer (it has {sorted(named)})")
        self._groups = named["dense"].param_groups
        self._cfg = cfg
        self.total_steps = total_steps

    def set_for_step(self, step: int, train_dense: bool = True) -> float:
        """Sets and returns the dense learning rate of the ``step``-th step (1-based); 0 when
        ``train_dense`` is False (an epoch after ``optimizer.dense_epochs``: the tables train alone)."""
        lr = self._cfg.dense_lr * dense_lr_factor(step, self.total_steps, self._cfg) if train_dense else 0.0
        for group in self._groups:
            group["lr"] = lr
        return lr
