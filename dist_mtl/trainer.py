"""The training job: a fixed build order, a short train loop, evaluation, early stopping, checkpoints.

Build order (as torchtitan and TorchRec's examples do it): process group and device; dataset metadata;
model with tables on the meta device; fused table optimizer in backward; planner + DMP; deterministic
table init; dense optimizer; TrainPipelineSparseDist; readers; metrics, logger and checkpoint managers.
``train()`` resumes from the newest checkpoint if there is one, then runs epochs in segments that end
where the job evaluates, checkpoints or stops (each segment drains the pipeline, so the model has
trained exactly the batches counted), keeps the best model by ``early_stop_metric`` and finally reports
the best model's metrics on the evaluation split.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import platform
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from dist_mtl.checkpoint import (
    DCP_METADATA_FILE,
    SIDE_FILE,
    CheckpointManager,
    CheckpointMismatchError,
    is_committed,
    read_side_file,
)
from dist_mtl.config import ConfigError, JobConfig, computation_mismatches
from dist_mtl.data.batch import GroupedBatch
from dist_mtl.data.reader import ParquetGroupReader, feature_loads, make_dataloader
from dist_mtl.data.schema import USER_ROW_COLUMN, DatasetError, DatasetMetadata
from dist_mtl.distributed import (
    DistContext,
    dense_grad_clipping,
    dense_optimizer,
    init_distributed,
    init_embedding_tables,
    shard_model,
)
from dist_mtl.losses import ModelOutput, MultiTaskLoss, NonFiniteLossWatch
from dist_mtl.lr_schedule import DenseLRSchedule
from dist_mtl.metrics import MetricsLogger, TaskMetrics
from dist_mtl.models import MultiTaskModel
from dist_mtl.predictions import (
    PREDICTION_ID_COLUMNS,
    PREDICTIONS_DIR,
    RANK_FILE_GLOB,
    PredictionWriter,
    rank_file_name,
)
from dist_mtl.profiling import StepProfiler, peak_memory_by_rank, peak_memory_mb
from dist_mtl.tasks import RANKING_METRICS, check_downsampled_split, check_task_columns, label_rate, task_columns


def _not_committed(what: str) -> ConfigError:
    return ConfigError(f"{what} is not a committed checkpoint (a step-NNNNNNNN folder holding {DCP_METADATA_FILE} "
                       f"and {SIDE_FILE})")


#: What the trainer raises for input that does not fit (a split, a task's column, a checkpoint, a data
#: file); the launchers report these in one line, anything else with its traceback.
INPUT_ERRORS = (ConfigError, CheckpointMismatchError, DatasetError)


class TrainingError(RuntimeError):
    """Training cannot go on (a run directory without the best model its state names); a non-finite loss
    raises ``losses.NonFiniteLossError``."""


class TrainStep(nn.Module):
    """Model plus loss, the module DMP wraps.

    ``forward(batch)`` returns ``(loss, (task_losses, predictions))``, the shape TorchRec's train
    pipelines expect. ``expand_users`` switches to the reference path that copies user rows onto
    impressions before pooling (tests and benchmarks only).
    """

    def __init__(self, model: MultiTaskModel, loss: MultiTaskLoss, expand_users: bool = False):
        super().__init__()
        self.model = model
        self.loss = loss
        self.expand_users = expand_users

    def forward(self, batch: GroupedBatch) -> tuple[torch.Tensor, tuple[dict[str, torch.Tensor], ModelOutput]]:
        if self.expand_users:
            batch = batch.expanded()
        output = self.model(batch)
        loss, task_losses = self.loss(output, batch.labels)
        return loss, (task_losses, output)


def build_train_step(cfg: JobConfig, metadata: DatasetMetadata) -> TrainStep:
    """The job's model and losses, tables on the meta device (DMP materialises each rank's shards), output
    biases at the train split's label rates when the config asks; what the planner and DMP shard."""
    model = MultiTaskModel(cfg.model, metadata.vocab_sizes, cfg.tasks, sparse_device="meta")
    if cfg.model.output_bias_init == "label_rate":
        train_split = metadata.split(cfg.data.train_split)  # the trainer checked the split exists
        model.init_output_bias({t.name: label_rate(t, train_split) for t in cfg.tasks})
    return TrainStep(model, MultiTaskLoss(cfg.tasks), expand_users=not cfg.data.grouped)


def check_run_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{platform.node()}-{id(path)}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OSError(f"run directory {path} is not writable: {e}") from e


def refuse_earlier_checkpoints(run_dir: Path) -> None:
    """A job told not to resume must not start over an earlier run's checkpoints: keeping the newest
    step numbers, the managers would prune this run's checkpoints in favour of those, and a later resume
    (or the best model's reload) would load the other run's state."""
    for folder in ("checkpoints", "best"):
        earlier = CheckpointManager(run_dir / folder, keep=None).committed()
        if earlier:
            raise ConfigError(
                f"checkpoint.resume = false, but {run_dir / folder} holds an earlier run's checkpoints (newest "
                f"{earlier[-1].name}), which would outrank and prune this run's; give the job another run_dir, "
                f"or delete them to start over (a job restarted by torchrun --max-restarts needs "
                f"checkpoint.resume = true)")


class Trainer:
    def __init__(self, cfg: JobConfig, ctx: DistContext | None = None):
        cfg.validate()
        self.cfg = cfg
        self.ctx = ctx or init_distributed(cfg.sharding.device)
        self.run_dir = Path(cfg.run_dir)
        if not cfg.checkpoint.resume:
            refuse_earlier_checkpoints(self.run_dir)
        if self.ctx.is_main:
            check_run_dir(self.run_dir)
            (self.run_dir / "config.toml").write_text(cfg.to_toml())
        dist.barrier()

        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", keep=cfg.checkpoint.keep)
        # Checked before anything starts, but only where it will be read: a run resuming from its own
        # checkpoints no longer needs the one it started from (which may have been pruned since).
        if (cfg.checkpoint.init_from and not is_committed(cfg.checkpoint.init_from)
                and self._own_checkpoint() is None):
            raise _not_committed(f"checkpoint.init_from = {cfg.checkpoint.init_from!r}")
        self.metadata = DatasetMetadata.load(cfg.data.path)
        # Checked here, not when first read: the evaluation split is first opened after a whole epoch.
        for key, split in (("train_split", cfg.data.train_split), ("val_split", cfg.data.val_split),
                           ("eval_split", cfg.data.eval_split)):
            if split and split not in self.metadata.splits:
                raise ConfigError(f"data.{key} = {split!r}: {cfg.data.path} has no such split (it has "
                                  f"{sorted(self.metadata.splits)})")
        check_task_columns(cfg.tasks, self.metadata)
        check_downsampled_split(cfg.tasks, cfg.data.train_split, self.metadata.split(cfg.data.train_split),
                                training=True)
        for split in {cfg.data.val_split, cfg.data.eval_split} - {""}:
            check_downsampled_split(cfg.tasks, split, self.metadata.split(split), training=False)

        torch.manual_seed(cfg.train.seed)
        step = build_train_step(cfg, self.metadata)
        loads = feature_loads(cfg.data.path, cfg.data.train_split, cfg.data.batch_size, cfg.data.grouped,
                              self.metadata)
        self.model, self.plan = shard_model(step, self.ctx, cfg.sharding, cfg.optimizer, cfg.data.batch_size, loads)
        init_embedding_tables(self.model, cfg.train.seed, cfg.model.field_init_scale)
        self.optimizer = dense_optimizer(self.model, cfg.optimizer)
        self.grad_clipping = dense_grad_clipping(self.optimizer)
        self.pipeline = (
            TrainPipelineSparseDist(self.model, self.optimizer, self.ctx.device) if cfg.train.pipeline else None
        )

        self.train_reader = self._reader(cfg.data.train_split, cfg.data.batch_size, shuffle=cfg.data.shuffle)
        # The evaluation readers are built here, once, and every evaluation reuses its split's: their checks
        # (the split's size against the world size and eval_batch_size, its files) then run before the
        # first epoch rather than after it.
        # Only the evaluation reads user_row (the group AUC's groups); training batches stay as they were.
        group_column = USER_ROW_COLUMN if cfg.train.group_auc else None
        # The split that evaluations during training read: early stopping's and the best model's.
        self.selection_split = cfg.data.val_split or cfg.data.eval_split
        self.eval_readers = {split: self._reader(split, cfg.data.eval_batch_size, shuffle=False,
                                                 group_column=group_column)
                             for split in dict.fromkeys((self.selection_split, cfg.data.eval_split))}
        self.metrics = TaskMetrics(cfg.tasks, device=self.ctx.device, group_column=group_column)
        self.logger = MetricsLogger(self.run_dir / "tensorboard", self.ctx.rank)
        self.profiler = StepProfiler(cfg.profile, self.run_dir / "profile", self.ctx.rank, self.ctx.device)
        # Every best saved since the last checkpoint is kept until the next one commits (then only the
        # best of that checkpoint's state stays): a job resumed after a crash finds the best of the state
        # it resumes, not only a newer best of the trajectory it abandoned.
        self.best_checkpoint = CheckpointManager(self.run_dir / "best", keep=None)
        self.nonfinite = NonFiniteLossWatch(self.ctx.rank, self.ctx.world_size, self.ctx.device)
        # Training state: everything a checkpoint holds besides model and optimizers.
        self.global_step = 0
        self.epoch = 0
        self.batches_in_epoch = 0  # batches this rank trained in self.epoch (equal on every rank)
        self.epoch_samples = 0  # impressions all ranks trained in self.epoch
        self.samples_trained = 0
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        self.history: list[dict] = []
        self.best = (-math.inf, -1, 0)  # best (signed) metric value, its step, evaluations since
        self.stopped_by = ""  # "early_stop" or "max_steps" once training stopped before its epochs ran out
        self.resumed_from: dict | None = None
        self.initialized_from: dict | None = None
        self.skipped_on_resume = 0
        # RNG states of a mid-epoch checkpoint, restored once the epoch's loader iterator exists: building
        # the iterator draws a seed from the global generator, which the saved state already includes.
        self._pending_rng: dict | None = None

    # ------------------------------------------------------------------------------------------ data

    def _reader(self, split: str, batch_size: int, shuffle: bool, group_column: str | None = None,
                ids: Sequence[str] = ()) -> ParquetGroupReader:
        return ParquetGroupReader(
            self.cfg.data.path,
            split,
            batch_size,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            shuffle=shuffle,
            seed=self.cfg.train.seed,
            window_blocks=self.cfg.data.window_blocks,
            extra_columns=task_columns(self.cfg.tasks) + ([group_column] if group_column else []) + list(ids),
            weight_transform=self.cfg.data.weight_transform,
        )

    def _batches(self, reader: ParquetGroupReader) -> Iterator[GroupedBatch]:
        """Host batches (pinned on CUDA); the pipeline or the plain step moves them to the device."""
        return iter(make_dataloader(
            reader, num_workers=self.cfg.data.num_workers, pin_memory=self.ctx.device.type == "cuda"
        ))

    # ------------------------------------------------------------------------------------------ train

    def train_step(self, batch: GroupedBatch) -> dict[str, torch.Tensor]:
        """One step of the plain loop (train.pipeline = false)."""
        batch = batch.to(self.ctx.device, non_blocking=True)
        loss, (task_losses, _) = self.model(batch)
        self.optimizer.zero_grad()
        loss.backward()  # also steps the embedding tables (optimizer fused into the backward)
        self.optimizer.step()
        return task_losses

    def _dense_epochs(self) -> int:
        return self.cfg.optimizer.dense_epochs or self.cfg.train.epochs

    def _trains_dense(self) -> bool:
        # By epoch, not by step count: a job resumed on another world size or batch size has other
        # steps per epoch, and its tables-only epochs must stay tables-only.
        return self.epoch < self._dense_epochs()

    def _schedule_step(self) -> int:
        """The dense schedule's position (1-based) of the step about to run: by epoch and batch, not by
        global_step, so that a job resumed on another world size or batch size (other steps per epoch)
        continues the schedule where its epochs are, not where its step count would put it."""
        return self.epoch * self.steps_per_epoch + self.batches_in_epoch + 1

    def _segment_steps(self, fetched: "_FetchLog") -> Iterator[dict[str, torch.Tensor]]:
        """Trains every batch of one segment, yielding each step's task losses; ``fetched.trained()``
        describes the step's batch."""
        if self.pipeline is None:
            for batch in fetched:
                self.lr_schedule.set_for_step(self._schedule_step(), self._trains_dense())
                yield self.train_step(batch)
            return
        self.model.train()
        self.pipeline.attach(self.model)
        while True:
            # progress() runs this step's optimizer step (and prefetches the next batches' inputs).
            self.lr_schedule.set_for_step(self._schedule_step(), self._trains_dense())
            try:
                task_losses, _ = self.pipeline.progress(fetched)
            except StopIteration:
                # Drained: put the EBCs' own forward back. Attaching a drained pipeline makes it rewrite
                # the model again on the next fill, and a rewrite over a rewrite would record the
                # pipelined forward as the "original" that a later detach() restores.
                self.pipeline.detach()
                return
            yield task_losses

    def _job_losses(self, task_losses: dict[str, torch.Tensor]) -> dict[str, float]:
        """The step's task losses over the whole job (collective: every rank logs at the same steps). A
        rank's loss is its share of the global mean (MultiTaskLoss), so rank 0's alone could read up to
        world_size times off for a task over masked rows. A weight-0 task over masked rows is the mean of
        the ranks' own means (MultiTaskLoss says why)."""
        names = list(task_losses)
        values = torch.stack([task_losses[n].float() for n in names])
        dist.all_reduce(values)
        return {f"loss/{n}": v / self.ctx.world_size for n, v in zip(names, values.tolist())}

    def _steps_to_next_stop(self) -> int | None:
        t = self.cfg.train
        limits = []
        if t.eval_every_steps:
            limits.append(t.eval_every_steps - self.global_step % t.eval_every_steps)
        if t.max_steps:
            limits.append(max(t.max_steps - self.global_step, 0))
        interval = self.cfg.checkpoint.interval_steps
        if interval:
            limits.append(interval - self.global_step % interval)
        return min(limits) if limits else None

    def _train_segment(self, segment: "_FetchLog", bar) -> None:
        log_every = self.cfg.train.log_every_steps
        t0, window_samples, local_samples = time.perf_counter(), 0, 0
        step_start = time.perf_counter()
        for task_losses in self._segment_steps(segment):
            num_impressions, source = segment.trained()
            self.global_step += 1
            self.nonfinite.watch(self.global_step, task_losses, source)
            self.train_seconds += time.perf_counter() - step_start
            local_samples += num_impressions
            self.batches_in_epoch += 1
            # For the displayed rate only: readers balance ranks to within one impression.
            window_samples += num_impressions * self.ctx.world_size
            if bar is not None:
                bar.update(1)
            if self.global_step % log_every == 0:
                self.nonfinite.raise_if_any()
                losses = self._job_losses(task_losses)
                rate = window_samples / max(time.perf_counter() - t0, 1e-9)
                logged = {**losses, "samples_per_s": rate, "lr/dense": self.optimizer.param_groups[0]["lr"],
                          **{f"memory/{k}": v for k, v in peak_memory_mb(self.ctx.device).items()}}  # rank 0's
                if self.grad_clipping is not None and self.grad_clipping.last_norm is not None:
                    logged["grad_norm/dense"] = float(self.grad_clipping.last_norm)  # this step's, before clipping
                self.logger.log(logged, self.global_step, prefix="train/")
                if bar is not None:
                    bar.set_postfix({**{k: f"{v:.4f}" for k, v in losses.items()}, "samples/s": f"{rate:,.0f}"})
                t0, window_samples = time.perf_counter(), 0
            self.profiler.step(self.global_step)
            step_start = time.perf_counter()
        self.nonfinite.raise_if_any()
        # Exact count across ranks, once per segment (every rank ends its segment at the same step).
        count = torch.tensor([local_samples], dtype=torch.int64, device=self.ctx.device)
        dist.all_reduce(count)
        self.samples_trained += int(count)
        self.epoch_samples += int(count)

    def train(self) -> dict:
        cfg = self.cfg
        wall_start = time.perf_counter()
        steps_per_epoch = self.steps_per_epoch = self.train_reader.steps_per_epoch()
        # The schedule spans train.epochs (optimizer.dense_epochs when set); train.max_steps stops a run
        # without shortening it, so that a run paused by a step limit and resumed trains with the rates of
        # the uninterrupted run.
        self.lr_schedule = DenseLRSchedule(self.optimizer, cfg.optimizer, steps_per_epoch * self._dense_epochs())
        self._print(self._header(steps_per_epoch))
        start_epoch, next_batch = self._resume()
        samples_at_start = self.samples_trained
        # Early stopping is final; a step limit holds only while the config still sets it that low.
        stop = self.stopped_by == "early_stop" or bool(cfg.train.max_steps and self.global_step >= cfg.train.max_steps)
        if not stop:
            self.stopped_by = ""
        with self.profiler:
            self._train_epochs(start_epoch, next_batch, stop)
        if self.profiler.enabled:
            self._print(self.profiler.describe())
        best_value, best_step, _ = self.best

        last = self.history[-1] if self.history else {}
        if best_step == self.global_step and last.get("split") == cfg.data.eval_split:
            # The model in hand is the best one and was just evaluated on this split.
            final = {k: v for k, v in last.items() if k not in ("step", "epoch", "split")}
        else:
            if best_step >= 0 and best_step != self.global_step:
                self._load_best()
            final = self.evaluate(cfg.data.eval_split)
        self._print(f"final {cfg.data.eval_split} (model of step {best_step}): {self._fmt(final)}")
        peak_memory = peak_memory_by_rank(self.ctx.device, self.ctx.world_size)
        self._print("peak memory per rank (MiB): " + "; ".join(
            f"{k.removesuffix('_mb')} " + " / ".join(f"{v:,.0f}" for v in per_rank)
            for k, per_rank in peak_memory.items()))
        self.logger.log(final, self.global_step, prefix=f"final/{cfg.data.eval_split}/")
        summary = {
            "config": cfg.to_dict(),
            "world_size": self.ctx.world_size,
            "local_world_size": self.ctx.local_world_size,
            "num_nodes": self.ctx.num_nodes,
            "device": str(self.ctx.device),
            "steps": self.global_step,
            "best_step": best_step,
            "samples_trained": self.samples_trained,
            "samples_trained_this_run": self.samples_trained - samples_at_start,
            "resumed_from": self.resumed_from,
            "initialized_from": self.initialized_from,
            "impressions_skipped_on_resume": self.skipped_on_resume,
            "stopped_by": self.stopped_by,
            "train_seconds": self.train_seconds,
            "train_samples_per_s": self.samples_trained / max(self.train_seconds, 1e-9),
            "eval_seconds": self.eval_seconds,
            "wall_seconds": time.perf_counter() - wall_start,
            "eval_split": cfg.data.eval_split,
            "selection_split": self.selection_split,
            "metrics": final,
            "history": self.history,
            "profile": self.profiler.report,
            "peak_memory_mb": peak_memory,
            "versions": _versions(),
        }
        if self.ctx.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        self.logger.close()
        return summary

    def _train_epochs(self, start_epoch: int, next_batch: int, stop: bool) -> None:
        """The epochs from ``start_epoch`` (its first ``next_batch`` batches trained already), each evaluated
        and checkpointed at its end, until they run out or ``stop`` (set by early stopping or the step
        limit)."""
        cfg = self.cfg
        for epoch in range(start_epoch, cfg.train.epochs):
            if stop:
                break
            self.train_reader.set_epoch(epoch)
            if next_batch:
                self.train_reader.load_state_dict({"epoch": epoch, "next_batch": next_batch})
            else:
                self.epoch_samples = 0
            self.epoch, self.batches_in_epoch, next_batch = epoch, next_batch, 0
            batches = self._batches(self.train_reader)
            if self._pending_rng is not None:
                self._restore_rng(self._pending_rng)
                self._pending_rng = None
            bar = self._progress(self.steps_per_epoch, f"epoch {epoch}", initial=self.batches_in_epoch)
            epoch_done = self.batches_in_epoch >= self.steps_per_epoch
            # An epoch runs in segments that end where the job evaluates, checkpoints or stops, and each
            # segment drains the pipeline: nothing is in flight at those points, so the model in hand
            # has trained exactly the batches counted (the checkpoint's data cursor), and the
            # pipeline's prefetched state never meets a forward of another mode.
            while not (epoch_done or stop):
                segment = _FetchLog(batches, self._steps_to_next_stop())
                self._train_segment(segment, bar)
                epoch_done = segment.exhausted or self.batches_in_epoch >= self.steps_per_epoch
                if cfg.train.eval_every_steps and self.global_step % cfg.train.eval_every_steps == 0:
                    if self._evaluate_and_track(epoch):
                        stop, self.stopped_by = True, "early_stop"
                if cfg.train.max_steps and self.global_step >= cfg.train.max_steps:
                    stop, self.stopped_by = True, self.stopped_by or "max_steps"
                interval = cfg.checkpoint.interval_steps
                if interval and self.global_step % interval == 0 and not (epoch_done or stop):
                    self._save_checkpoint()
            if bar is not None:
                bar.close()
            # A max_steps pause inside an epoch is not an evaluation point: an uninterrupted run has none
            # there, so evaluating (and possibly keeping a best model, counting patience) would make the
            # paused-and-resumed run choose differently. The final report below still scores a model.
            paused = self.stopped_by == "max_steps" and not epoch_done
            if not paused and (not self.history or self.history[-1]["step"] != self.global_step):
                if self._evaluate_and_track(epoch):
                    stop, self.stopped_by = True, self.stopped_by or "early_stop"
            if epoch_done:
                self.epoch, self.batches_in_epoch, self.epoch_samples = epoch + 1, 0, 0
            self._save_checkpoint()

    # ------------------------------------------------------------------------------------------- eval

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """The model in eval mode with the plain forward, for ``eval_step``; training mode and the pipeline
        are given back on exit."""
        was_training = self.model.training
        if self.pipeline is not None:
            # The pipeline rewrote the EBCs' forward for its own input distribution; give the plain
            # forward back (batches in flight are kept, and attach() resumes them).
            self.pipeline.detach()
        self.model.eval()
        try:
            yield
        finally:
            # Back to training mode before any further step: in eval mode TorchRec's input distribution
            # asserts that the global batch divides by the world size, which unequal user counts break.
            self.model.train(was_training)
            if self.pipeline is not None:
                self.pipeline.attach(self.model)

    @torch.no_grad()
    def eval_step(self, batch: GroupedBatch, predictions: PredictionWriter | None = None) -> dict[str, torch.Tensor]:
        """Scores one batch into ``self.metrics`` (inside ``eval_mode``), and into ``predictions`` when
        given; returns the batch's task losses."""
        batch = batch.to(self.ctx.device, non_blocking=True)
        _, (task_losses, output) = self.model(batch)
        self.metrics.update(output.predictions, batch.labels, source=batch.source)
        if predictions is not None:
            predictions.write(batch.labels, output.predictions)
        return task_losses

    @torch.no_grad()
    def evaluate(self, split: str, predictions: PredictionWriter | None = None) -> dict[str, float]:
        """The metrics of ``split``; with ``predictions``, this rank's scores go there too (its reader must
        read ``PREDICTION_ID_COLUMNS``, as ``evaluate_checkpoint``'s does)."""
        start = time.perf_counter()
        with self.eval_mode():
            self.metrics.reset()
            reader = self.eval_readers[split]
            reader.set_epoch(0)  # from its first batch, whatever an earlier (maybe interrupted) pass left
            for batch in self._batches(reader):
                self.eval_step(batch, predictions)
            metrics = self.metrics.compute()
        self.eval_seconds += time.perf_counter() - start
        return metrics

    def evaluate_checkpoint(self, path: str | Path, predictions: bool = False) -> dict:
        """A committed checkpoint's model on ``data.eval_split``, on this job's ranks, without training
        (launch/evaluate.py): the metrics a training run reports for it, at any world size (the tables are
        resharded on load). Refused as ``checkpoint.init_from`` refuses: another id space, model shape or
        computing setting. Writes ``<run_dir>/evaluation.json`` and TensorBoard's ``final/<split>/``; with
        ``predictions``, every rank also writes its impressions' scores to
        ``<run_dir>/predictions/rank-<r>.parquet`` (``dist_mtl.predictions``: together, each impression of
        the split once, ``index`` its position in the split), after the folder's earlier rank files are
        removed, since they may be of another world size."""
        path = Path(path)
        if not is_committed(path):
            raise _not_committed(str(path))
        wall_start = time.perf_counter()
        self._load_other_run(path)
        step = self.checkpoints.last_load.step
        split = self.cfg.data.eval_split
        writer = None
        if predictions:
            folder = self.run_dir / PREDICTIONS_DIR
            if self.ctx.is_main:
                folder.mkdir(parents=True, exist_ok=True)
                for old in folder.glob(RANK_FILE_GLOB):
                    old.unlink()
            dist.barrier()
            # This split's reader again, with the ids a score file needs; training batches never carry them.
            self.eval_readers[split] = self._reader(split, self.cfg.data.eval_batch_size, shuffle=False,
                                                    group_column=self.metrics.group_column,
                                                    ids=PREDICTION_ID_COLUMNS)
            writer = PredictionWriter(folder / rank_file_name(self.ctx.rank), [t.name for t in self.cfg.tasks])
        with writer if writer is not None else contextlib.nullcontext():
            metrics = self.evaluate(split, writer)
        self._print(f"{split} (model of {path}, step {step}): {self._fmt(metrics)}")
        self.logger.log(metrics, step, prefix=f"final/{split}/")
        report = {
            "checkpoint": str(path),
            "step": step,
            "data_path": self.cfg.data.path,
            "split": split,
            "world_size": self.ctx.world_size,
            "device": str(self.ctx.device),
            "metrics": metrics,
            "predictions": self._predictions_report(writer) if writer is not None else None,
            "eval_seconds": self.eval_seconds,
            "wall_seconds": time.perf_counter() - wall_start,
            "peak_memory_mb": peak_memory_by_rank(self.ctx.device, self.ctx.world_size),
            "config": self.cfg.to_dict(),
            "versions": _versions(),
        }
        if self.ctx.is_main:
            (self.run_dir / "evaluation.json").write_text(json.dumps(report, indent=1, default=str))
        self.logger.close()
        return report

    def _predictions_report(self, writer: PredictionWriter) -> dict:
        """The score files of every rank (``evaluate_checkpoint``), each committed before this returns."""
        rows = torch.tensor([writer.rows], dtype=torch.int64, device=self.ctx.device)
        gathered = [torch.zeros_like(rows) for _ in range(self.ctx.world_size)]
        dist.all_gather(gathered, rows)
        rows_by_rank = [int(r) for r in gathered]
        return {"dir": str(writer.path.parent), "columns": writer.columns,
                "files": [rank_file_name(r) for r in range(self.ctx.world_size)],
                "rows_by_rank": rows_by_rank, "rows": sum(rows_by_rank)}

    def _evaluate_and_track(self, epoch: int) -> bool:
        """Evaluate on the validation split, keep the best model; True when early stopping says stop."""
        best_value, best_step, bad_evals = self.best
        split = self.selection_split
        metrics = self.evaluate(split)
        self.history.append({"step": self.global_step, "epoch": epoch, "split": split, **metrics})
        self.logger.log(metrics, self.global_step, prefix=f"eval/{split}/")
        metric = self.cfg.train.early_stop_metric
        # Errors (mse, mae, logloss) improve downwards; the tracked value is signed so that higher wins.
        metric_task, _, metric_name = metric.partition("/")
        task_type = next(task.type for task in self.cfg.tasks if task.name == metric_task)
        sign = 1.0 if RANKING_METRICS[task_type][metric_name] else -1.0
        value = sign * metrics.get(metric, math.nan)
        improved = value > best_value
        if improved:
            best_value, best_step, bad_evals = value, self.global_step, 0
            self._save_best()
        else:
            bad_evals += 1
        self.best = (best_value, best_step, bad_evals)
        self._print(f"step {self.global_step} {split}: {self._fmt(metrics)}" + ("  (best)" if improved else ""))
        return bad_evals >= self.cfg.train.early_stop_patience

    def _save_best(self) -> None:
        self.best_checkpoint.save(self.global_step, self.model, self.optimizer,
                                  {"step": self.global_step, "config": self.cfg.to_dict(),
                                   "id_maps_sha256": self._id_maps_sha256()})

    def _id_maps_sha256(self) -> str | None:
        # Recorded with the weights: an export then carries the id maps the tables were trained in, or
        # refuses a dataset at data.path that was reconverted into another id space since.
        return self.metadata.id_maps["sha256"] if self.metadata.id_maps else None

    def _load_best(self) -> None:
        # The best step this run's state names, not the newest folder: a crash after a new best was
        # saved but before the next checkpoint leaves best/ a step ahead of the resumed trajectory.
        _, best_step, _ = self.best
        path = self.best_checkpoint.path_of(best_step)
        if path is None:
            raise TrainingError(
                f"the best model of step {best_step} is missing from {self.best_checkpoint.root} (a run "
                f"directory written before best models were kept until the next checkpoint?)"
            )
        self.best_checkpoint.load(path, self.model, self.optimizer)

    # ------------------------------------------------------------------------------------ checkpoints

    def _rng_state(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if self.ctx.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.ctx.device)
        return state

    def _restore_rng(self, state) -> None:
        if isinstance(state, torch.Tensor):  # checkpoints before the CUDA state was kept
            state = {"cpu": state}
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and self.ctx.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.ctx.device)

    def _save_checkpoint(self) -> None:
        rng = [None] * self.ctx.world_size
        dist.all_gather_object(rng, self._rng_state())
        extra = {
            "step": self.global_step,
            "epoch": self.epoch,
            "next_batch": self.batches_in_epoch,
            "epoch_samples": self.epoch_samples,
            "samples_trained": self.samples_trained,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "history": self.history,
            "best": list(self.best),
            "stopped_by": self.stopped_by,
            "world_size": self.ctx.world_size,
            "rng": rng,
            "id_maps_sha256": self._id_maps_sha256(),
            "initialized_from": self.initialized_from,
            "reader": self.train_reader.state_dict(),
            # What built the model: an export compares it with its own config (see
            # config.computation_mismatches), since <run_dir>/config.toml is rewritten by every run.
            "config": self.cfg.to_dict(),
        }
        self.checkpoints.save(self.global_step, self.model, self.optimizer, extra)
        self.best_checkpoint.prune_except(self.best[1])

    def _resume(self) -> tuple[int, int]:
        """Load the newest committed checkpoint, if any; returns (epoch, next batch) to continue from.

        Same world size: the epoch continues at the batch after the last one trained, so no impression
        is trained twice or skipped, and dropout continues with the RNG state it would have had. Another
        world size (or batch size, seed, shuffle or window_blocks): the tables are resharded and the model
        continues exactly, but a mid-epoch data position cannot be mapped onto other batches; the rest of
        that epoch is skipped, counted and reported, and training continues with the next epoch.
        """
        latest = self._own_checkpoint()
        if latest is None:
            if self.cfg.checkpoint.init_from:
                self._initialize_from(Path(self.cfg.checkpoint.init_from))
            return 0, 0
        self._check_carries_over(latest, "resume")
        extra = self.checkpoints.load(latest, self.model, self.optimizer)
        self.initialized_from = extra.get("initialized_from")
        self.global_step, self.epoch = int(extra["step"]), int(extra["epoch"])
        self.batches_in_epoch, self.epoch_samples = int(extra["next_batch"]), int(extra["epoch_samples"])
        self.samples_trained = int(extra["samples_trained"])
        self.train_seconds, self.eval_seconds = float(extra["train_seconds"]), float(extra["eval_seconds"])
        self.history = list(extra["history"])
        self.best = (float(extra["best"][0]), int(extra["best"][1]), int(extra["best"][2]))
        self.stopped_by = str(extra["stopped_by"])
        self.resumed_from = {"checkpoint": str(latest), "step": self.global_step, "epoch": self.epoch,
                             "next_batch": self.batches_in_epoch, "samples_trained": self.samples_trained,
                             "world_size": int(extra["world_size"])}
        epoch, next_batch = self.epoch, self.batches_in_epoch
        # A mid-epoch batch index names the same impressions only under the same rank split and batching.
        saved_reader = extra.get("reader", {"world_size": int(extra["world_size"])})  # older checkpoints
        changed = self.train_reader.settings_changed(saved_reader)
        if next_batch and not changed:
            self._pending_rng = extra["rng"][self.ctx.rank]
        elif not next_batch and int(extra["world_size"]) == self.ctx.world_size:
            self._restore_rng(extra["rng"][self.ctx.rank])
        elif next_batch:
            self.skipped_on_resume = self.train_reader.num_impressions - self.epoch_samples
            what = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
            self._print(
                f"resuming from {latest}, saved mid-epoch with other data settings ({what}): the "
                f"{self.skipped_on_resume:,} impressions of epoch {epoch} not yet trained are skipped; "
                f"training continues with epoch {epoch + 1}")
            epoch, next_batch = epoch + 1, 0
            self.epoch, self.batches_in_epoch, self.epoch_samples = epoch, 0, 0
        self._print(f"resumed from {latest}: step {self.global_step}, epoch {epoch}, batch {next_batch}")
        return epoch, next_batch

    def _own_checkpoint(self) -> Path | None:
        """The newest committed checkpoint of this run_dir that a start resumes from (None: none, or
        checkpoint.resume is off)."""
        return self.checkpoints.latest() if self.cfg.checkpoint.resume else None

    def _check_carries_over(self, path: Path, use: str) -> None:
        """Refuse a checkpoint whose state would not mean the same in this run; ``use``: "resume" (this
        run's own) or "init_from" (another run's, whose config may differ in more than shapes)."""
        saved = read_side_file(path)["extra"]
        remedy = ("start in another run_dir" if use == "resume"
                  else "start from another checkpoint, or without checkpoint.init_from")
        saved_maps, maps = saved.get("id_maps_sha256"), self._id_maps_sha256()
        if saved_maps is not None and saved_maps != maps:
            # Same vocabulary sizes can hold another id space (a reconversion on other raw files): the
            # tables' rows would then mean other ids, and the sizes alone would never tell.
            raise CheckpointMismatchError(
                f"{path} was trained on data encoded with the id maps {saved_maps[:16]}..., but the dataset "
                f"at data.path ({self.cfg.data.path}) has {maps[:16] + '...' if maps else 'none'}: convert new "
                f"data with launch/convert.py raw --id-maps-from <the training dataset>, or {remedy}"
            )
        # The dense optimizer's state is restored as saved; another optimizer's would fail at its first
        # step (Adagrad looking for Adam's moments). Tables' state under another optimizer.sparse restarts
        # (with a warning) instead, as CheckpointManager.load does for any plan without a counterpart.
        saved_dense = saved.get("config", {}).get("optimizer", {}).get("dense")
        if saved_dense is not None and saved_dense != self.cfg.optimizer.dense:
            raise CheckpointMismatchError(
                f"{path} was trained with optimizer.dense = {saved_dense!r}, this run asks for "
                f"{self.cfg.optimizer.dense!r}: its state cannot carry over; set optimizer.dense = "
                f"{saved_dense!r}, or {remedy}"
            )
        if use == "init_from" and saved.get("config") is not None:
            # Settings that change what the weights compute without changing a shape (an activation,
            # mean pooling, the weight transform): the checkpoint's shapes alone would load silently.
            differ = computation_mismatches(saved["config"], self.cfg)
            if differ:
                raise CheckpointMismatchError(f"{path} computes otherwise under this run's config: "
                                              + "; ".join(differ) + f"; {remedy}")

    def _load_other_run(self, path: Path) -> dict:
        """Another run's committed checkpoint into this job's model and optimizers, once it is known to mean
        the same here (checkpoint.init_from, evaluate_checkpoint); returns its extra."""
        self._check_carries_over(path, "init_from")
        return self.checkpoints.load(path, self.model, self.optimizer)

    def _initialize_from(self, path: Path) -> None:
        """checkpoint.init_from: another run's model and optimizer state, none of its training position."""
        extra = self._load_other_run(path)
        report = self.checkpoints.last_load
        self.initialized_from = {"checkpoint": str(path), "step": report.step,
                                 "world_size": report.saved_world_size,
                                 "optimizer_state_reset": report.optimizer_state_reset}
        trained = extra.get("samples_trained")
        self._print(f"initialised from {path} (step {report.step} of its run"
                    + (f", {int(trained):,} impressions trained" if trained is not None else "")
                    + "): training starts at step 0 of this run")

    # ---------------------------------------------------------------------------------------- printing

    def _print(self, text: str) -> None:
        if self.ctx.is_main:
            print(text, flush=True)

    def _progress(self, total: int, desc: str, initial: int = 0):
        if not (self.ctx.is_main and self.cfg.train.progress_bar):
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def _header(self, steps_per_epoch: int) -> str:
        header = (
            f"dist_mtl: {self.cfg.model.head} on {self.cfg.data.path} | world {self.ctx.world_size} "
            f"({self.ctx.backend}, {self.ctx.device.type}) | batch {self.cfg.data.batch_size}/rank | "
            f"{steps_per_epoch} steps/epoch\nsharding plan:\n{self.plan}"
        )
        t = self.cfg.train
        if not self.cfg.data.val_split and (t.epochs > 1 or t.eval_every_steps):
            # Several evaluations choose the reported model, so the eval split's figures would be those of
            # the model that scored best on them: say so once, with the remedy.
            split = self.cfg.data.eval_split
            header += (f"\nnote: data.val_split is unset, so early stopping and the best model are chosen on "
                       f"'{split}', and the final '{split}' figures are those of the model that scored best "
                       f"there; for figures that did not choose the model, hold a split out of train "
                       f"(launch/convert.py raw --validation-share) and set data.val_split")
        return header

    @staticmethod
    def _fmt(metrics: dict[str, float]) -> str:
        keys = [k for k in metrics if k.endswith(("/auc", "/gauc", "/logloss", "/mse"))]
        return "  ".join(f"{k}={metrics[k]:.4f}" for k in keys)


class _FetchLog:
    """Iterator over at most ``limit`` batches that remembers the size and source of those fetched but
    not yet trained (pipelines fetch ahead of the step they train, so a step's batch is the oldest one).
    ``exhausted`` tells whether the underlying iterator ran out (the epoch ended)."""

    def __init__(self, batches: Iterator[GroupedBatch], limit: int | None = None):
        self._batches = batches
        self._left = limit
        self._pending: collections.deque[tuple[int, str]] = collections.deque()
        self.exhausted = False

    def __iter__(self) -> "_FetchLog":
        return self

    def __next__(self) -> GroupedBatch:
        if self._left is not None:
            if self._left <= 0:
                raise StopIteration
            self._left -= 1
        try:
            batch = next(self._batches)
        except StopIteration:
            self.exhausted = True
            raise
        self._pending.append((batch.num_impressions, batch.source))
        return batch

    def trained(self) -> tuple[int, str]:
        return self._pending.popleft()


def _versions() -> dict[str, str]:
    import pyarrow
    import torchrec

    out = {"torch": torch.__version__, "torchrec": torchrec.__version__, "pyarrow": pyarrow.__version__,
           "python": platform.python_version()}
    try:
        import fbgemm_gpu

        out["fbgemm_gpu"] = fbgemm_gpu.__version__
    except ImportError:  # fbgemm is loaded through torchrec; its version attribute is informational
        pass
    return out
