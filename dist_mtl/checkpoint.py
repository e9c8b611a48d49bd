"""Sharded checkpoints through torch.distributed.checkpoint (DCP): save, find, load at any world size, prune.

Layout of one checkpoint::

    <root>/step-NNNNNNNN/.metadata       DCP's global index; DCP renames it into place after every rank wrote
    <root>/step-NNNNNNNN/__R_K.distcp    DCP data files, written by each rank in parallel
    <root>/step-NNNNNNNN/extra.pt        side file: the caller's ``extra``, the step and world size, written
                                         by rank 0 (tmp + rename) only after ``dcp.save`` returned everywhere

A checkpoint is *committed* when both ``.metadata`` and ``extra.pt`` exist. A job killed while saving leaves
a folder without one of them: ``latest()`` skips it, the previous checkpoint is untouched, and the next save
of that step replaces the folder. Pruning un-commits a folder (removes ``extra.pt``) before deleting it, so a
crash while deleting never leaves a half-deleted folder that looks committed. Every rank must see the same
``root`` (a shared file system on several nodes), as DCP itself requires.

Saved under flat keys, in a form that does not depend on the world size or the sharding plan
    ``model/<fqn>``               every entry of ``dmp.state_dict()``: each table as its global
                                  ``[rows, dim]`` tensor (ShardedTensor chunks, or the plain tensor of a
                                  data-parallel table), dense parameters and buffers
    ``table_optim/<fqn>/<name>``  each table's optimizer state under fbgemm's names, e.g. row-wise
                                  Adagrad's ``t_101.momentum1`` (``[rows]``), whichever optimizer held it
    ``dense_optim/<fqn>/<name>``  the dense optimizer's tensor state (Adam's ``exp_avg``, ``exp_avg_sq``,
                                  ``step``) under the parameter's model name; non-tensor values go into
                                  the side file

World-size changes (TorchRec ships no tool for them; its issue 2534)
    DCP stores each tensor as chunks with global offsets and, on load, reads the parts of the saved chunks
    that overlap what each rank holds now. So a table saved table-wise on 2 ranks loads value for value
    into a table-wise, column-wise or data-parallel table on 1 rank, and back; the same holds for the
    fused optimizer state and for the dense parameters and their optimizer state.

    The plan may change a table's sharding type with the world size (small tables go data-parallel on
    1 rank and table-wise on 2). Its state then lives in another optimizer under other names and shapes:
    a sharded table's in ``dmp.fused_optimizer`` (``t_101.momentum1``, one value per row for row-wise
    Adagrad), a data-parallel table's in the dense ``CombinedOptimizer``'s ``data_parallel_tables`` part
    (``dist_mtl.distributed.dense_optimizer``: torchrec's RowWiseAdagrad ``sum`` ``[rows, 1]`` and
    ``step``, under the key ``data_parallel_tables.<fqn>``). Both run the same algorithm, so the
    checkpoint keeps one canonical form, fbgemm's: ``sum`` is saved as ``momentum1`` (reshaped to
    ``[rows]`` when it holds one value per row) and read back into either; ``step`` (used only by
    RowWiseAdagrad's ``lr_decay``, which is 0 here) is restored when saved and otherwise set to the
    checkpoint's step. Parameters are matched to the optimizer's keys by storage, not by name.

    State that has no exact counterpart starts fresh (zero, as a new table's would), is listed in
    ``LoadReport.optimizer_state_reset`` and warned about; ``strict_optimizer=True`` refuses instead. That
    happens when column-wise sharding cut a table into another number of column shards (fbgemm keeps one
    row-wise accumulator per row *per column shard*; dims up to the planner's column block, 128 by default,
    are never cut) or when ``optimizer.sparse`` itself changed.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torchrec.distributed import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

from dist_mtl.models.embeddings import is_table_weight, table_of_weight

FORMAT_VERSION = 1
DCP_METADATA_FILE = ".metadata"
SIDE_FILE = "extra.pt"
STEP_DIR_PATTERN = re.compile(r"^step-(\d+)$")
MODEL_PREFIX = "model/"
TABLE_OPTIM_PREFIX = "table_optim/"
DENSE_OPTIM_PREFIX = "dense_optim/"
# The state of torch's and torchrec's (row-wise) Adagrad that fbgemm's fused kernels call momentum1.
_ACCUMULATOR = "sum"
_FUSED_ACCUMULATOR = "momentum1"
_MAX_LISTED_DIFFERENCES = 12
T = TypeVar("T")


class CheckpointMismatchError(ValueError):
    """The checkpoint was written by a different model; the message names what differs."""


@dataclass
class LoadReport:
    """What ``CheckpointManager.load`` did, beyond restoring everything value for value."""

    path: str
    step: int
    saved_world_size: int
    world_size: int
    optimizer_state_reset: list[str] = field(default_factory=list)
    """Tables whose optimizer state started fresh because the saved state has no exact counterpart (see
    the module docstring)."""


@dataclass
class OptimizedParameter:
    """A parameter of a (possibly combined) keyed optimizer, under its name in the model state dict."""

    name: str
    param: torch.Tensor
    owner: KeyedOptimizer  # the innermost optimizer, whose ``state`` really holds this parameter's state

    @property
    def state(self) -> dict[str, Any]:
        return self.owner.state.get(self.param, {})


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _delete(path: Path) -> None:
    # Un-commit first: a deletion cut short leaves a folder that no longer counts as a checkpoint.
    (path / SIDE_FILE).unlink(missing_ok=True)
    shutil.rmtree(path)


def is_committed(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / DCP_METADATA_FILE).is_file() and (path / SIDE_FILE).is_file()


def _leaf_optimizers(optimizer: KeyedOptimizer) -> Iterator[KeyedOptimizer]:
    # CombinedOptimizer.state is rebuilt on every access, so state must be written to its parts.
    if isinstance(optimizer, CombinedOptimizer):
        for _, part in optimizer.optimizers:
            yield from _leaf_optimizers(part)
    else:
        yield optimizer


def optimized_parameters(
    model_state: Mapping[str, Any], optimizer: KeyedOptimizer
) -> dict[str, OptimizedParameter]:
    """The parameters of a (combined) keyed optimizer by their model state-dict name.

    Optimizer keys differ from model names (``dense.model.head...``, ``data_parallel_tables.model...``)
    and by plan. State-dict entries are detached views of the parameters, so storage identity maps them;
    a key that ends with a model name is taken as that name otherwise.
    """
    by_storage = {
        (value.data_ptr(), tuple(value.shape)): fqn
        for fqn, value in model_state.items()
        if isinstance(value, torch.Tensor) and not isinstance(value, ShardedTensor) and value.numel()
    }
    found = {}
    for leaf in _leaf_optimizers(optimizer):
        for key, param in leaf.params.items():
            name = by_storage.get((param.data_ptr(), tuple(param.shape)))
            if name is None:
                name = next((fqn for fqn in model_state if key == fqn or key.endswith("." + fqn)), None)
            if name is None:
                raise ValueError(f"optimizer parameter {key!r} is no entry of the model's state dict")
            found[name] = OptimizedParameter(name, param, leaf)
    return found


def canonical_table_state(fqn: str, name: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """A data-parallel table's optimizer state as the checkpoint key and value it is saved under: fbgemm's
    name and shape (see the module docstring)."""
    if name != _ACCUMULATOR:
        return f"{TABLE_OPTIM_PREFIX}{fqn}/{name}", value
    key = f"{TABLE_OPTIM_PREFIX}{fqn}/{table_of_weight(fqn)}.{_FUSED_ACCUMULATOR}"
    per_row = value.numel() == value.shape[0]
    return key, value.reshape(-1) if per_row else value


def _global_shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, ShardedTensor):
        return tuple(value.size())
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return None


def _describe(fqn: str, shape: tuple[int, ...]) -> str:
    if is_table_weight(fqn) and len(shape) == 2:
        return f"table {table_of_weight(fqn)} ({fqn}) of {shape[0]} rows x {shape[1]} dims"
    return f"{fqn} of shape {list(shape)}"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _barrier() -> None:
    if _distributed() and dist.get_world_size() > 1:
        dist.barrier()


def _gather_lists(local: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank (so that all ranks decide alike)."""
    if not _distributed() or dist.get_world_size() == 1:
        return list(local)
    gathered: list[list | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return [item for part in gathered for item in (part or [])]


def run_on_rank0(action: Callable[[], T], what: str) -> T | None:
    """Run a file-system action on rank 0 alone and return its result there (None elsewhere). Collective:
    if it fails, every rank raises, so that no rank waits forever for rank 0 in a later collective."""
    caught: Exception | None = None
    result: T | None = None
    if _rank() == 0:
        try:
            result = action()
        except Exception as e:  # re-raised below on rank 0, reported to the other ranks
            caught = e
    failures = _gather_lists([f"{type(caught).__name__}: {caught}"] if caught is not None else [])
    if caught is not None:
        raise caught
    if failures:
        raise RuntimeError(f"rank 0 failed to {what}: {failures[0]}")
    return result


def _zero_(value: Any) -> None:
    if isinstance(value, ShardedTensor):
        for shard in value.local_shards():
            shard.tensor.zero_()
    else:
        value.zero_()


def read_side_file(path: str | os.PathLike) -> dict:
    """The side file of a committed checkpoint: format_version, step, world_size, extra, ..."""
    if not is_committed(path):
        missing = [n for n in (DCP_METADATA_FILE, SIDE_FILE) if not (Path(path) / n).is_file()]
        raise FileNotFoundError(
            f"{path} is not a committed checkpoint (missing {', '.join(missing)}): its save was interrupted "
            f"or the folder is not a dist_mtl checkpoint"
        )
    side = Path(path) / SIDE_FILE
    content = torch.load(side, map_location="cpu", weights_only=True)
    found = content.get("format_version") if isinstance(content, dict) else type(content).__name__
    if found != FORMAT_VERSION:
        raise CheckpointMismatchError(f"{side}: checkpoint format {found!r}, this code reads {FORMAT_VERSION}")
    return content


def read_tensor_metadata(path: str | os.PathLike) -> dict[str, TensorStorageMetadata]:
    """DCP's record (global size, dtype) of every tensor in a checkpoint, by flat key."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    return {k: md for k, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)}


def read_tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Global shape of every tensor in a checkpoint, by flat key (``model/...``, ``table_optim/...``...)."""
    return {key: tuple(md.size) for key, md in read_tensor_metadata(path).items()}


def _entries(names: list[str]) -> str:
    return f"{len(names)} entr{'ies' if len(names) > 1 else 'y'}"


def _name_list(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def model_mismatches(saved: Mapping[str, tuple[int, ...]], current: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Differences between saved and current model entries (fqn -> global shape), in words: one line per
    entry of another shape, one for the entries the checkpoint lacks and one for those the model lacks."""
    problems = [
        f"{_describe(fqn, current[fqn])} in the model is {_describe(fqn, tuple(saved[fqn]))} in the checkpoint"
        for fqn in sorted(set(current) & set(saved))
        if tuple(saved[fqn]) != tuple(current[fqn])
    ]
    lacking = sorted(set(current) - set(saved))
    if lacking:
        problems.append(f"the model has {_entries(lacking)} which the checkpoint lacks: {_name_list(lacking)}")
    unexpected = sorted(set(saved) - set(current))
    if unexpected:
        problems.append(f"the checkpoint has {_entries(unexpected)} which the model lacks: "
                        f"{_name_list(unexpected)}")
    return problems


def raise_on_mismatch(path: str | os.PathLike, problems: list[str]) -> None:
    if not problems:
        return
    shown = problems[:_MAX_LISTED_DIFFERENCES]
    more = len(problems) - len(shown)
    raise CheckpointMismatchError(
        f"checkpoint {path} was written by a different model configuration ({len(problems)} "
        f"difference{'s' if len(problems) > 1 else ''}):\n  "
        + "\n  ".join(shown)
        + (f"\n  ... and {more} more" if more else "")
    )


class CheckpointManager:
    """Numbered DCP checkpoints under one root (``<run_dir>/checkpoints``).

    ``save`` and ``load`` are collective (every rank calls them); ``latest`` reads the file system and
    ``prune`` deletes on rank 0 only. ``save`` prunes to the newest ``keep`` committed checkpoints;
    with ``keep=None`` it keeps them all and the owner prunes with ``prune_except``.
    """

    def __init__(self, root: str | os.PathLike, keep: int | None = 3):
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 (the checkpoint just saved is always kept), got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.last_load: LoadReport | None = None

    # ------------------------------------------------------------------------------------------ finding

    def _step_dirs(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            match = STEP_DIR_PATTERN.match(child.name)
            if match and child.is_dir():
                found.append((int(match.group(1)), child))
        return sorted(found)

    def committed(self) -> list[Path]:
        """Committed checkpoints, oldest first."""
        return [path for _, path in self._step_dirs() if is_committed(path)]

    def latest(self) -> Path | None:
        committed = self.committed()
        return committed[-1] if committed else None

    def path_of(self, step: int) -> Path | None:
        """The committed checkpoint of ``step``, if there is one."""
        return next((path for s, path in self._step_dirs() if s == step and is_committed(path)), None)

    # ------------------------------------------------------------------------------------------- saving

    def save(
        self, step: int, model: DistributedModelParallel, dense_optimizer: KeyedOptimizer, extra: dict
    ) -> Path:
        """Write ``step-NNNNNNNN`` (collective), commit it, prune; returns its path.

        ``extra`` is taken from rank 0: values that differ per rank (RNG states) must be gathered into
        it by the caller. It may hold what ``torch.load(weights_only=True)`` reads back: numbers, strings,
        None, tensors, and lists, tuples and dicts of them.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        path = self.root / step_dir_name(step)

        def clear() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            if path.exists():
                # An earlier (possibly crashed) save of this step: un-commit it before anything else, so
                # that a crash during this save cannot leave old and new files looking committed.
                (path / SIDE_FILE).unlink(missing_ok=True)
                shutil.rmtree(path)

        run_on_rank0(clear, f"clear {path}")

        model_state = model.state_dict()
        flat: dict[str, Any] = {MODEL_PREFIX + fqn: value for fqn, value in model_state.items()}
        for fqn, states in model.fused_optimizer.state_dict()["state"].items():
            for name, value in states.items():
                flat[f"{TABLE_OPTIM_PREFIX}{fqn}/{name}"] = value
        objects: dict[str, dict[str, Any]] = {}
        for fqn, entry in optimized_parameters(model_state, dense_optimizer).items():
            for name, value in entry.state.items():
                if not isinstance(value, torch.Tensor):
                    objects.setdefault(fqn, {})[name] = value
                elif is_table_weight(fqn):
                    key, canonical = canonical_table_state(fqn, name, value)
                    flat[key] = canonical
                else:
                    flat[f"{DENSE_OPTIM_PREFIX}{fqn}/{name}"] = value
        dcp.save(flat, checkpoint_id=str(path))
        _barrier()

        def commit() -> None:
            content = {
                "format_version": FORMAT_VERSION,
                "step": step,
                "world_size": _world_size(),
                "extra": extra,
                "optimizer_objects": objects,
            }
            tmp = path / f".{SIDE_FILE}.tmp"
            torch.save(content, tmp)
            os.replace(tmp, path / SIDE_FILE)
            if self.keep is not None:
                self.prune()

        run_on_rank0(commit, f"commit {path}")
        return path

    def prune_except(self, step: int) -> None:
        """Delete every checkpoint but the committed one of ``step`` (all of them when ``step`` has none).
        Rank 0 only."""
        if _rank() != 0:
            return
        for s, path in self._step_dirs():
            if s != step or not is_committed(path):
                _delete(path)

    def prune(self) -> None:
        """Keep the newest ``keep`` committed checkpoints; also drop interrupted saves older than the newest
        committed one (newer ones are left: the run that resumed before them overwrites them). Rank 0 only."""
        if _rank() != 0:
            return
        steps = self._step_dirs()
        committed = [(s, p) for s, p in steps if is_committed(p)]
        if not committed:
            return
        newest = committed[-1][0]
        doomed = [p for _, p in committed[: -self.keep]]
        doomed += [p for s, p in steps if s < newest and not is_committed(p)]
        for path in doomed:
            _delete(path)

    # ------------------------------------------------------------------------------------------ loading

    def load(
        self,
        path: str | os.PathLike,
        model: DistributedModelParallel,
        dense_optimizer: KeyedOptimizer,
        *,
        strict_optimizer: bool = False,
    ) -> dict:
        """Restore ``model`` (a DMP) and ``dense_optimizer`` from ``path`` at any world size; returns extra.

        Collective. Raises ``CheckpointMismatchError`` (on every rank alike) if a table, parameter or buffer
        is missing, unexpected or of another shape. ``self.last_load`` tells what was restored.
        """
        path = Path(path)
        side = read_side_file(path)
        saved = read_tensor_metadata(path)
        saved_shapes = {k: tuple(md.size) for k, md in saved.items()}

        model_state = model.state_dict()
        problems = model_mismatches(
            {k[len(MODEL_PREFIX):]: s for k, s in saved_shapes.items() if k.startswith(MODEL_PREFIX)},
            {fqn: shape for fqn, v in model_state.items() if (shape := _global_shape(v)) is not None},
        )
        target: dict[str, Any] = {MODEL_PREFIX + fqn: v for fqn, v in model_state.items()}
        reset: list[str] = []
        fresh: list[Any] = []

        # Sharded tables: DCP loads straight into the fused optimizer's state tensors.
        fused = model.fused_optimizer
        fused_state = fused.state_dict()
        for fqn, states in fused_state["state"].items():
            for name, value in states.items():
                key = f"{TABLE_OPTIM_PREFIX}{fqn}/{name}"
                if saved_shapes.get(key) == _global_shape(value):
                    target[key] = value
                else:
                    fresh.append(value)
                    reset.append(fqn)

        # Data-parallel tables and dense parameters: loaded into buffers, then written into the optimizer.
        params = optimized_parameters(model_state, dense_optimizer)
        # A table's state is restored into the tensors its optimizer holds, but torch's Adam
        # (optimizer.sparse = "adam" on GPU) creates them at its first step: TorchRec's init_state runs
        # that step with zero gradients (the weights are loaded afterwards, so nothing it moves survives).
        lazy = {id(e.owner): e.owner for fqn, e in params.items() if is_table_weight(fqn) and not e.state}
        for leaf in lazy.values():
            leaf.init_state()
            leaf.zero_grad(set_to_none=True)
        buffers: dict[str, dict[str, torch.Tensor]] = {}
        for fqn, entry in params.items():
            if not is_table_weight(fqn):
                continue
            for name, value in entry.state.items():
                if not isinstance(value, torch.Tensor):
                    continue
                key, canonical = canonical_table_state(fqn, name, value)
                if key in saved and saved[key].size == canonical.shape:
                    buffers.setdefault(fqn, {})[name] = target[key] = torch.empty(
                        canonical.shape, dtype=saved[key].properties.dtype)
                elif name == "step" and any(k.startswith(f"{TABLE_OPTIM_PREFIX}{fqn}/") for k in saved):
                    continue  # saved by the fused optimizer, which keeps no step: set from the checkpoint's
                else:
                    reset.append(fqn)
        for key, md in saved.items():
            if not key.startswith(DENSE_OPTIM_PREFIX):
                continue
            fqn, _, name = key[len(DENSE_OPTIM_PREFIX):].rpartition("/")
            if fqn not in params:
                if fqn in model_state:  # otherwise already reported as a parameter the model lacks
                    problems.append(f"the checkpoint has dense optimizer state for {fqn}, which the dense "
                                    f"optimizer does not hold")
                continue
            buffer = torch.empty(tuple(md.size), dtype=md.properties.dtype)
            buffers.setdefault(fqn, {})[name] = target[key] = buffer

        raise_on_mismatch(path, list(dict.fromkeys(_gather_lists(problems))))
        reset = sorted(set(_gather_lists(reset)))
        if reset and strict_optimizer:
            raise CheckpointMismatchError(
                f"checkpoint {path}: the optimizer state of table(s) {reset} has no exact counterpart in the "
                f"current plan (another number of column shards, or another optimizer.sparse); load with "
                f"strict_optimizer=False to restart their optimizer state"
            )

        for value in fresh:
            _zero_(value)  # the fresh state of fbgemm's fused sgd / adagrad / row-wise adagrad
        dcp.load(target, checkpoint_id=str(path))
        model.load_state_dict(model_state)
        fused.load_state_dict(fused_state)
        objects = side.get("optimizer_objects", {})
        for fqn, entry in params.items():
            if is_table_weight(fqn):
                _restore_table_state(entry, buffers.get(fqn, {}), int(side["step"]))
            else:
                _restore_dense_state(entry, buffers.get(fqn, {}), objects.get(fqn, {}))

        if reset:
            warnings.warn(
                f"checkpoint {path}: the optimizer state of {len(reset)} table(s) restarted from zero (no "
                f"exact counterpart in this plan; weights restored exactly): {reset}",
                stacklevel=2,
            )
        self.last_load = LoadReport(
            path=str(path),
            step=int(side["step"]),
            saved_world_size=int(side["world_size"]),
            world_size=_world_size(),
            optimizer_state_reset=reset,
        )
        return side["extra"]


@torch.no_grad()
def _restore_table_state(entry: OptimizedParameter, loaded: Mapping[str, torch.Tensor], step: int) -> None:
    """Copy a data-parallel table's loaded optimizer state into its (eagerly created) state tensors."""
    for name, value in entry.state.items():
        if not isinstance(value, torch.Tensor):
            continue
        if name in loaded:
            value.copy_(loaded[name].reshape(value.shape))
        elif name == "step" and loaded:
            value.fill_(step)
        else:
            value.zero_()


def _restore_dense_state(entry: OptimizedParameter, loaded: Mapping[str, torch.Tensor],
                         objects: Mapping[str, Any]) -> None:
    """Replace a dense parameter's optimizer state by the loaded one (none saved: no state, as before its
    first step).

    Placement follows torch.optim.Optimizer.load_state_dict: ``step`` stays a CPU tensor unless the
    optimizer is capturable or fused; other tensors go to the parameter's device (floating ones in its
    dtype). Written into the innermost optimizer's ``state``: KeyedOptimizer.load_state_dict would insist
    that the saved and current states hold the same parameters, which they need not (a parameter that
    never had a gradient has no state).
    """
    param = entry.param
    group = next((g for g in entry.owner.param_groups if any(p is param for p in g["params"])), {})
    step_on_device = bool(group.get("capturable") or group.get("fused"))
    state: dict[str, Any] = dict(objects)
    for name, value in loaded.items():
        if name == "step" and not step_on_device:
            state[name] = value
        elif value.is_floating_point() and name != "step":
            state[name] = value.to(device=param.device, dtype=param.dtype)
        else:
            state[name] = value.to(device=param.device)
    if state:
        entry.owner.state[param] = state
    else:
        entry.owner.state.pop(param, None)


def load_unsharded(path: str | os.PathLike, module: nn.Module, prefix: str) -> None:
    """Load the model entries of a checkpoint into a plain (unsharded) module, in this process alone.

    ``prefix`` is what the checkpoint's model keys carry in front of ``module``'s own keys (``"model."``
    for a ``TrainStep``'s ``MultiTaskModel``). Tables come back whole whatever their sharding at save time.
    Raises ``CheckpointMismatchError`` naming any table or parameter that differs.
    """
    read_side_file(path)
    start = len(MODEL_PREFIX) + len(prefix)
    saved = {k[start:]: s for k, s in read_tensor_shapes(path).items() if k.startswith(MODEL_PREFIX + prefix)}
    state = module.state_dict()
    raise_on_mismatch(path, model_mismatches(saved, {k: tuple(v.shape) for k, v in state.items()}))
    # no_dist: this process reads alone, also inside a job whose process group is up (export on rank 0).
    dcp.load({MODEL_PREFIX + prefix + k: v for k, v in state.items()}, checkpoint_id=str(path), no_dist=True)
    module.load_state_dict(state)
