"""Export for serving: an unsharded model from a checkpoint or a live DMP, and scoring with it.

An export directory holds::

    model.pt      plain state dict of the MultiTaskModel (whole tables, CPU), loadable into
                  ``MultiTaskModel(cfg.model, vocab_sizes, cfg.tasks, sparse_device="cpu")``
    config.toml   the resolved job config the model was built from
    serving.pt    a TorchScript module scoring plain tensors (see ``ServingModule.forward``)
    id_maps.parquet  the raw feature id -> index maps the tables were trained in (dist_mtl/data/id_maps.py),
                  when the training data had them: ``ExportedModel.score_raw`` scores raw Tianchi feature
                  lists with them (dist_mtl/data/raw_request.py), and a serving system encodes with them
    export.json   written last (its presence marks a complete export): format version, head, tasks,
                  vocab sizes, feature keys of each side, the weight transform the reader must apply,
                  the id maps' file and digest, library versions and where the weights came from

Why TorchScript. ``torch.jit.script`` compiles TorchRec's unsharded EmbeddingBagCollection and
KeyedJaggedTensor as they are, for every batch shape, one user included. ``torch.export`` (non-strict,
dynamic shapes) traces the EBC too, but specialises the number of users to >= 2: KJT's length-per-key
computation views ``lengths`` as ``[keys, users]``, and the contiguity check of that view guards
``users != 1``, so a one-user request (the common serving case: one user, many candidate items) fails
the program's guards (torch 2.13). The heads are traced (``torch.jit.trace``) because they return dicts
built in Python from task configs. torch 2.13 marks torch.jit deprecated in favour of torch.export; the
warnings it prints are silenced here on purpose, and ``model.pt`` + ``config.toml`` rebuild the eager
model wherever TorchScript is unavailable. Loading ``serving.pt`` needs torchrec imported (it registers
the KJT TorchScript class and fbgemm's operators), which this module does.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torchrec
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

# Importing torchrec's KJT also registers its TorchScript class and fbgemm's operators, which loading
# serving.pt needs.
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dist_mtl.checkpoint import (
    MODEL_PREFIX,
    CheckpointMismatchError,
    load_unsharded,
    model_mismatches,
    raise_on_mismatch,
    read_side_file,
    read_tensor_shapes,
    run_on_rank0,
)
from dist_mtl.config import JobConfig, computation_mismatches, load_config
from dist_mtl.data.batch import GroupedBatch
from dist_mtl.data.id_maps import ID_MAPS_FILE, IdMaps
from dist_mtl.data.raw_request import RawRequestEncoder
from dist_mtl.data.schema import ALI_CCP_FIELDS, USER_ROW_COLUMN, DatasetError, DatasetMetadata
from dist_mtl.metrics import TaskMetrics
from dist_mtl.models import MultiTaskModel
from dist_mtl.models.embeddings import ITEM_KEYS, USER_KEYS, table_name
from dist_mtl.predictions import PREDICTION_ID_COLUMNS, PredictionWriter
from dist_mtl.tasks import check_downsampled_split, check_task_columns, task_columns

EXPORT_FORMAT_VERSION = 1
STATE_FILE = "model.pt"
CONFIG_FILE = "config.toml"
SERVING_FILE = "serving.pt"
INFO_FILE = "export.json"
TRAIN_STEP_PREFIX = "model."  # TrainStep holds the MultiTaskModel as ``model``
# MultiTaskModel's state-dict key of each field's table.
_TABLE_KEY = {f.name: f"{f.side}_ebc.embedding_bags.{table_name(f.name)}.weight" for f in ALI_CCP_FIELDS}


class ExportError(ValueError):
    """An export directory is incomplete or does not fit the data it is asked to score."""


#: What export_model and predict_split raise for bad input (a checkpoint, an export, a dataset or a path
#: that does not fit); the launchers report these in one line, anything else with its traceback.
INPUT_ERRORS = (ExportError, CheckpointMismatchError, DatasetError, FileNotFoundError)


@contextmanager
def _jit_without_deprecation_notices() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        warnings.filterwarnings("ignore", message=r".*TorchScript.*")
        yield


class _HeadPredictions(nn.Module):
    """The head input and the head, with ModelOutput reduced to the predictions dict, so that it can be
    traced."""

    def __init__(self, head_input: nn.Module, head: nn.Module):
        super().__init__()
        self.head_input = head_input
        self.head = head

    def forward(self, user: torch.Tensor, item: torch.Tensor, user_index: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.head(self.head_input(user, item, user_index)).predictions


class ServingModule(nn.Module):
    """The model on plain tensors: each side's KJT as values, lengths and weights in schema key order."""

    def __init__(self, user_ebc: nn.Module, item_ebc: nn.Module, user_means: nn.Module, item_means: nn.Module,
                 user_weights: nn.Module, item_weights: nn.Module, head: nn.Module):
        super().__init__()
        self.user_ebc = user_ebc
        self.item_ebc = item_ebc
        self.user_means = user_means
        self.item_means = item_means
        self.user_weights = user_weights
        self.item_weights = item_weights
        self.head = head
        self.user_keys: List[str] = list(USER_KEYS)
        self.item_keys: List[str] = list(ITEM_KEYS)

    def forward(
        self,
        user_values: torch.Tensor,
        user_lengths: torch.Tensor,
        user_weights: torch.Tensor,
        item_values: torch.Tensor,
        item_lengths: torch.Tensor,
        item_weights: torch.Tensor,
        user_index: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        """``*_lengths`` are key-major (``[keys x rows]``: every row of the first key, then the next);
        ``user_index[i]`` is the user row of impression ``i``. Returns one ``[B]`` tensor per task."""
        users = KeyedJaggedTensor(keys=self.user_keys, values=user_values, lengths=user_lengths,
                                  weights=user_weights)
        items = KeyedJaggedTensor(keys=self.item_keys, values=item_values, lengths=item_lengths,
                                  weights=item_weights)
        # By name, as in embeddings.pooled_by_name: an EBC's output key order is its own.
        user = KeyedTensor.regroup([self.user_ebc(users)], [self.user_keys])[0]
        item = KeyedTensor.regroup([self.item_ebc(items)], [self.item_keys])[0]
        user = self.user_means(user, users)
        item = self.item_means(item, items)
        user = self.user_weights.append_to(user, users)
        item = self.item_weights.append_to(item, items)
        return self.head(user, item, user_index)


def script_serving_module(model: MultiTaskModel) -> torch.jit.ScriptModule:
    model = model.eval()
    user_dim, item_dim = (sum(t.embedding_dim for t in ebc.embedding_bag_configs()) + weights.out_dim
                          for ebc, weights in ((model.user_ebc, model.user_weights),
                                               (model.item_ebc, model.item_weights)))
    # Two users, three impressions: shapes the trace must not specialise on.
    example = (torch.zeros(2, user_dim), torch.zeros(3, item_dim), torch.tensor([0, 1, 1]))
    with _jit_without_deprecation_notices():
        head = torch.jit.trace(_HeadPredictions(model.head_input, model.head), example, strict=False)
        return torch.jit.script(ServingModule(model.user_ebc, model.item_ebc, model.user_means, model.item_means,
                                               model.user_weights, model.item_weights,
                                               head))


def vocab_sizes_from_shapes(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> dict[str, int]:
    """Each field's vocabulary size: the row count of its table in ``shapes`` (keys start with ``prefix``)."""
    found = {field: shapes[prefix + key][0] for field, key in _TABLE_KEY.items() if prefix + key in shapes}
    missing = sorted(set(_TABLE_KEY) - set(found))
    if missing:
        raise CheckpointMismatchError(f"no table for field(s) {missing} under '{prefix}': not a dist_mtl model")
    return found


def build_unsharded_model(cfg: JobConfig, vocab_sizes: Mapping[str, int]) -> MultiTaskModel:
    model = MultiTaskModel(cfg.model, vocab_sizes, cfg.tasks, sparse_device="cpu").eval()
    # Served in float32 whatever model.head_precision trained it, so that served scores do not depend on
    # the serving machine's bfloat16 support (they differ from the job's bfloat16 evaluation by rounding).
    model.head.bfloat16 = False
    return model


def export_model(
    out_dir: str | os.PathLike,
    cfg: JobConfig,
    *,
    checkpoint: str | os.PathLike | None = None,
    dmp: nn.Module | None = None,
    id_maps_from: str | os.PathLike | None = None,
    with_id_maps: bool = True,
) -> Path | None:
    """Write an export directory from a committed checkpoint or from a live DMP of a ``TrainStep``.

    From a checkpoint: this process alone. From a DMP: collective (every rank gathers its shards to rank
    0, which writes); returns the path on rank 0 and None elsewhere. Vocabulary sizes are the tables'
    row counts; ``cfg`` must describe the same model (``CheckpointMismatchError`` names what differs).

    Id maps: a checkpoint records the digest of the id maps its training data was encoded with; the
    export copies those maps from ``id_maps_from`` (a dataset directory; default ``cfg.data.path``) and
    raises ExportError if that dataset has none or other ones. Without a recorded digest (data without
    maps, an older checkpoint, a live DMP) maps are copied only from an explicit ``id_maps_from``, checked
    against the tables' sizes. ``with_id_maps=False`` copies none, but export.json still records the
    digest, so that scoring can refuse data of another id space.
    """
    if (checkpoint is None) == (dmp is None):
        raise ValueError("export_model needs exactly one of checkpoint= or dmp=")
    if checkpoint is not None:
        extra = read_side_file(checkpoint)["extra"]
        trained_with = extra.get("config")
        if trained_with is not None:  # checkpoints written before the job recorded its config have none
            raise_on_mismatch(checkpoint, computation_mismatches(trained_with, cfg))
        vocab_sizes = vocab_sizes_from_shapes(read_tensor_shapes(checkpoint), MODEL_PREFIX + TRAIN_STEP_PREFIX)
        trained_sha256 = extra.get("id_maps_sha256")
        id_maps = _training_id_maps(cfg, trained_sha256, id_maps_from, vocab_sizes) if with_id_maps else None
        model = build_unsharded_model(cfg, vocab_sizes)
        load_unsharded(checkpoint, model, TRAIN_STEP_PREFIX)
        source = {"checkpoint": str(Path(checkpoint).resolve())}
        return _write_export(Path(out_dir), model, cfg, vocab_sizes, source, id_maps, trained_sha256)

    state = _gather_full_state(dmp)

    def write() -> Path:
        vocab_sizes = vocab_sizes_from_shapes({k: tuple(v.shape) for k, v in state.items()}, TRAIN_STEP_PREFIX)
        model = build_unsharded_model(cfg, vocab_sizes)
        own = {k[len(TRAIN_STEP_PREFIX):]: v for k, v in state.items() if k.startswith(TRAIN_STEP_PREFIX)}
        saved = {k: tuple(v.shape) for k, v in own.items()}
        current = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        raise_on_mismatch(f"live model ({type(dmp).__name__})", model_mismatches(saved, current))
        model.load_state_dict(own)
        id_maps = _training_id_maps(cfg, None, id_maps_from, vocab_sizes) if with_id_maps else None
        return _write_export(Path(out_dir), model, cfg, vocab_sizes, {"live_model_world_size": _world_size()},
                             id_maps, None)

    return run_on_rank0(write, f"export to {out_dir}")


def _training_id_maps(cfg: JobConfig, trained_sha256: str | None, id_maps_from: str | os.PathLike | None,
                      vocab_sizes: Mapping[str, int]) -> IdMaps | None:
    """The id maps a model was trained in (its checkpoint's ``trained_sha256``), read from the dataset
    ``id_maps_from`` (default ``cfg.data.path``); None when the training data had none."""
    if trained_sha256 is None and id_maps_from is None:
        return None
    source = Path(id_maps_from if id_maps_from is not None else cfg.data.path)
    hint = ("name the training dataset, or one converted with its id maps (id_maps_from, --id-maps-from), or "
            "export without them (with_id_maps=False, --without-id-maps)")
    trained = (f"the model was trained on data encoded with the id maps {trained_sha256[:16]}..."
               if trained_sha256 else "")
    try:
        meta = DatasetMetadata.load(source)
    except DatasetError as e:
        raise ExportError(f"{trained or f'id maps asked of {source}'}; {e}; {hint}") from e
    have = meta.id_maps["sha256"] if meta.id_maps else None
    if trained_sha256 is not None and have != trained_sha256:
        raise ExportError(f"{trained}, the dataset at {source} has {have[:16] + '...' if have else 'none'}; {hint}")
    maps = IdMaps.load(source, meta)
    if maps.vocab_sizes != dict(vocab_sizes):
        differ = sorted(f for f in vocab_sizes if maps.vocab_sizes.get(f) != vocab_sizes[f])
        raise ExportError(f"the id maps of {source} do not fit the model's tables: fields {differ} differ in size")
    return maps


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_full_state(dmp: nn.Module) -> dict[str, torch.Tensor] | None:
    """Every entry of the DMP's state dict as a whole CPU tensor on rank 0 (None on other ranks)."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    full: dict[str, torch.Tensor] = {}
    for key, value in dmp.state_dict().items():
        if isinstance(value, ShardedTensor):
            out = torch.empty(tuple(value.size()), dtype=value.dtype) if rank == 0 else None
            value.gather(dst=0, out=out)  # collective: every rank sends its shards
            if rank == 0:
                full[key] = out
        elif rank == 0:
            full[key] = value.detach().cpu().clone()
    return full if rank == 0 else None


def _write_export(out_dir: Path, model: MultiTaskModel, cfg: JobConfig, vocab_sizes: Mapping[str, int],
                  source: dict, id_maps: IdMaps | None, trained_sha256: str | None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INFO_FILE).unlink(missing_ok=True)  # an old export here is incomplete until the new info lands
    if id_maps is not None:
        maps_entry = id_maps.write(out_dir)
    else:
        (out_dir / ID_MAPS_FILE).unlink(missing_ok=True)  # an older export's maps would not be this model's
        maps_entry = {"file": None, "sha256": trained_sha256} if trained_sha256 else None
    torch.save(model.state_dict(), out_dir / STATE_FILE)
    (out_dir / CONFIG_FILE).write_text(cfg.to_toml())
    with _jit_without_deprecation_notices():
        script_serving_module(model).save(str(out_dir / SERVING_FILE))
    info = {
        "format_version": EXPORT_FORMAT_VERSION,
        "head": cfg.model.head,
        "tasks": [{"name": t.name, "type": t.type} for t in cfg.tasks],
        "vocab_sizes": dict(vocab_sizes),
        "user_keys": list(USER_KEYS),
        "item_keys": list(ITEM_KEYS),
        "weight_transform": cfg.data.weight_transform,
        "id_maps": maps_entry,
        "source": source,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"torch": torch.__version__, "torchrec": torchrec.__version__},
    }
    tmp = out_dir / f".{INFO_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, out_dir / INFO_FILE)
    return out_dir


def read_export_info(path: str | os.PathLike) -> dict:
    info_path = Path(path) / INFO_FILE
    if not info_path.is_file():
        raise ExportError(f"{path} is not a complete dist_mtl export (no {INFO_FILE}; an interrupted export "
                          f"leaves none)")
    info = json.loads(info_path.read_text())
    if info.get("format_version") != EXPORT_FORMAT_VERSION:
        raise ExportError(f"{info_path}: export format {info.get('format_version')!r}, this code reads "
                          f"{EXPORT_FORMAT_VERSION}")
    return info


def serving_inputs(batch: GroupedBatch, user_keys: List[str], item_keys: List[str]) -> tuple[torch.Tensor, ...]:
    """A GroupedBatch as ``ServingModule.forward``'s tensors (keys reordered to the export's order)."""
    return (*_side(batch.user_features, user_keys, "user_features"),
            *_side(batch.item_features, item_keys, "item_features"), batch.user_index)


def _side(kjt: KeyedJaggedTensor, keys: List[str], what: str) -> tuple[torch.Tensor, ...]:
    have = kjt.keys()
    if have != keys:
        missing = sorted(set(keys) - set(have))
        if missing:
            raise ExportError(f"{what} lacks feature(s) {missing} the exported model reads")
        kjt = kjt.permute([have.index(k) for k in keys])
    weights = kjt.weights_or_none()
    if weights is None:
        weights = torch.ones(kjt.values().numel(), dtype=torch.float32)
    return kjt.values(), kjt.lengths(), weights


class ExportedModel(nn.Module):
    """A loaded export: ``forward(batch)`` or ``score(...)`` give ``{task: [B] predictions}``."""

    def __init__(self, serving: torch.jit.ScriptModule, info: dict, path: Path):
        super().__init__()
        self.serving = serving
        self.info = info
        self.path = path
        self.task_names: list[str] = [t["name"] for t in info["tasks"]]
        self.user_keys: List[str] = list(info["user_keys"])
        self.item_keys: List[str] = list(info["item_keys"])
        self._raw_encoder: RawRequestEncoder | None = None

    def forward(self, batch: GroupedBatch) -> dict[str, torch.Tensor]:
        return self.score(*serving_inputs(batch, self.user_keys, self.item_keys))

    @torch.no_grad()
    def score(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """``ServingModule.forward``'s seven tensors."""
        return dict(self.serving(*inputs))

    def score_raw(self, user_features: Sequence[str | bytes], item_features: Sequence[str | bytes],
                  user_index: Sequence[int] | np.ndarray | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Score a raw request in one call: raw Tianchi feature lists of its users and candidate impressions,
        encoded with the export's id maps and weight transform (``RawRequestEncoder.encode``, strict), gives
        ``{task: [impressions] predictions}``."""
        if self._raw_encoder is None:
            self._raw_encoder = self.request_encoder()
        return self(self._raw_encoder.encode(user_features, item_features, user_index))

    def request_encoder(self, strict: bool = True) -> RawRequestEncoder:
        """A ``RawRequestEncoder`` in this model's id space (``strict``: see dist_mtl/data/raw_request.py)."""
        maps = self.id_maps()
        if maps is None:
            entry = self.info.get("id_maps")
            why = ("it was exported without them (--without-id-maps); export it again with them"
                   if entry and entry.get("sha256") else
                   "its training data had none (only data converted from raw Tianchi files has id maps)")
            raise ExportError(f"{self.path} carries no id maps, so raw requests cannot be encoded: {why}")
        return RawRequestEncoder(maps, self.info["weight_transform"], strict=strict)

    def id_maps(self) -> IdMaps | None:
        """The raw id -> index maps the tables were trained in (None: the training data had none), checked
        against export.json's digest: ``id_maps().encode("205", raw_item_ids)`` gives the model's indices."""
        entry = self.info.get("id_maps")
        if not entry or entry["file"] is None:
            return None
        return IdMaps.read(self.path / entry["file"], entry["sha256"], self.info["vocab_sizes"],
                           self.path / INFO_FILE)


def load_exported(path: str | os.PathLike) -> ExportedModel:
    path = Path(path)
    info = read_export_info(path)
    with _jit_without_deprecation_notices():
        serving = torch.jit.load(str(path / SERVING_FILE), map_location="cpu")
    return ExportedModel(serving.eval(), info, path)


def load_exported_eager(path: str | os.PathLike) -> MultiTaskModel:
    """The eager MultiTaskModel of an export (``model.pt`` + ``config.toml``), without TorchScript."""
    path = Path(path)
    info = read_export_info(path)
    cfg = load_config(path / CONFIG_FILE)
    model = build_unsharded_model(cfg, info["vocab_sizes"])
    model.load_state_dict(torch.load(path / STATE_FILE, map_location="cpu", weights_only=True))
    return model


def predict_split(
    model_dir: str | os.PathLike,
    data_root: str | os.PathLike,
    split: str,
    out_path: str | os.PathLike,
    batch_size: int = 16384,
    metrics: bool = True,
    group_auc: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Score one split in storage order into a Parquet file, and (``metrics``) evaluate the scores against
    the split's labels.

    Columns as ``dist_mtl.predictions`` writes them: ``index`` (int64, the impression's position in the
    split's storage order), ``sample_id`` (int64, from the dataset) and ``p_<task>`` (float32) per task.
    Written to a temporary name and renamed, so a file at ``out_path`` is always complete. Returns row
    count, seconds, impressions per second and, with ``metrics``, ``metrics``: every task's metrics on its
    rows as the trainer computes them (CTR and CTCVR AUC over all impressions, CVR AUC over clicked ones
    for ESMM), from the export's task config; ``group_auc`` adds each binary task's group AUC over user
    rows (None: as the export's training did, ``train.group_auc``). ``progress(impressions scored,
    impressions in the split)`` is called after each batch. A split whose negatives were downsampled
    (convert --keep-negatives) is scored with ``metrics=False`` only.
    """
    from dist_mtl.data.reader import ParquetGroupReader

    model = load_exported(model_dir)
    # The export's config.toml holds the tasks whole (label, rows); export.json names them only.
    trained_cfg = load_config(Path(model_dir) / CONFIG_FILE)
    tasks = trained_cfg.tasks if metrics else []
    if group_auc is None:
        group_auc = trained_cfg.train.group_auc
    group_column = USER_ROW_COLUMN if metrics and group_auc else None
    if metrics:
        try:
            data_meta = DatasetMetadata.load(data_root)
            check_task_columns(tasks, data_meta, weights=False)
            check_downsampled_split(tasks, split, data_meta.split(split), training=False)
        except ValueError as e:
            raise ExportError(f"dataset {data_root} cannot evaluate the exported model {model_dir}: {e}; "
                              f"--no-metrics scores it without evaluating") from None
    reader = ParquetGroupReader(
        data_root, split, batch_size, rank=0, world_size=1, shuffle=False,
        extra_columns=[*PREDICTION_ID_COLUMNS, *task_columns(tasks, weights=False),
                       *([group_column] if group_column else [])],
        weight_transform=model.info["weight_transform"],
    )
    evaluation = TaskMetrics(tasks, group_column=group_column) if metrics else None
    expected = model.info["vocab_sizes"]
    different = {f: (reader.metadata.vocab_sizes.get(f), expected[f]) for f in expected
                 if reader.metadata.vocab_sizes.get(f) != expected[f]}
    if different:
        raise ExportError(
            f"dataset {data_root} does not fit the exported model {model_dir}: vocab sizes (dataset, model) "
            f"differ for fields {different}; score data converted with the training data's vocabularies"
        )
    # Equal sizes do not make one id space; equal digests do. A dataset or export without maps (older, or
    # not converted from raw files) can only be checked by size.
    model_maps, data_maps = model.info.get("id_maps"), reader.metadata.id_maps
    if model_maps and data_maps and model_maps["sha256"] != data_maps["sha256"]:
        raise ExportError(
            f"dataset {data_root} was encoded with the id maps {data_maps['sha256'][:16]}..., the exported model "
            f"{model_dir} was trained in {model_maps['sha256'][:16]}...: its ids would name other rows of the "
            f"tables; convert the raw files with launch/convert.py raw --id-maps-from <the training dataset>"
        )
    out_path = Path(out_path)
    start, rows = time.perf_counter(), 0
    with PredictionWriter(out_path, model.task_names) as writer:
        for batch in reader:
            predictions = model(batch)
            writer.write(batch.labels, predictions)
            if evaluation is not None:
                evaluation.update(predictions, batch.labels, source=batch.source)
            rows += batch.num_impressions
            if progress is not None:
                progress(rows, reader.num_impressions)
    summary = {"path": str(out_path), "rows": rows, "columns": writer.columns}
    if evaluation is not None:
        summary["metrics"] = evaluation.compute()
    seconds = time.perf_counter() - start
    return {**summary, "seconds": seconds, "impressions_per_s": rows / max(seconds, 1e-9)}
