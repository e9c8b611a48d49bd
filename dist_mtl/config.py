"""The one configuration object: a dataclass tree, loaded as defaults < TOML file < ``key=value`` overrides.

Every field carries a docstring (the string literal under it). ``load_config`` validates the result;
``JobConfig.to_toml`` writes the resolved config into the run directory so a run can be repeated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from dist_mtl.tasks import RANKING_METRICS, TaskConfig, default_esmm_tasks, default_multi_tower_tasks

SHARDING_TYPES = ("data_parallel", "table_wise", "column_wise", "table_column_wise", "row_wise", "table_row_wise")
SPARSE_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")
#: The table optimizers that take an epsilon (optimizer.sparse_eps, optimizer.field_sparse_eps).
EPS_SPARSE_OPTIMIZERS = ("adagrad", "rowwise_adagrad")
DENSE_OPTIMIZERS = ("adam", "adagrad", "sgd")
DENSE_LR_DECAYS = ("none", "linear", "cosine")
HEADS = ("esmm", "mmoe", "ple", "shared_bottom")
HEAD_PRECISIONS = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names it."""


@dataclass
class DataConfig:
    path: str = "data_out/synthetic/parquet"
    """Dataset directory written by the converter (holds metadata.json)."""
    train_split: str = "train"
    """Split trained on."""
    val_split: str = ""
    """Split for periodic evaluation and early stopping; "" uses eval_split (the ESMM paper's data has
    only train and test; ``launch/convert.py raw --validation-share`` holds a "val" split out of train)."""
    eval_split: str = "test"
    """Split of the final evaluation."""
    batch_size: int = 4096
    """Impressions per batch per rank."""
    eval_batch_size: int = 16384
    """Impressions per evaluation batch per rank."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0 reads in the training process). Workers divide the
    shuffle windows between them (each loads its own) and send their batches through shared memory; each
    holds about two windows' worth of batches. On a 2-core CPU machine one worker per rank trains as fast
    as 0, which spares the workers' start-up at every epoch and evaluation."""
    shuffle: bool = True
    """Shuffle block order and user groups inside the buffer window, per (seed, epoch)."""
    window_blocks: int = 4
    """Blocks held in the shuffle buffer at once (bounds reader memory)."""
    weight_transform: str = "log1p"
    """Transform of multi-valued feature weights (count weights): "log1p" or "none"."""
    grouped: bool = True
    """Pool user features once per user (True) or copy them onto impressions first (the reference path;
    for tests and benchmarks)."""


#: The per-row statistics of the id weights that ``model.weight_features`` can name.
WEIGHT_STATS = ("sum", "last", "count")


@dataclass
class ModelConfig:
    head: str = "esmm"
    """Multi-task head: "esmm", "mmoe", "ple" or "shared_bottom"."""
    embedding_dim: int = 16
    """Embedding dimension of every table; must be divisible by 4 (fbgemm's fused kernel). The ESMM
    paper's 18 is not allowed: 16 or 20 are the nearest."""
    field_dims: dict[str, int] = field(default_factory=dict)
    """Per-field embedding dimension overrides, e.g. {"205" = 32}."""
    field_init_scale: dict[str, float] = field(default_factory=dict)
    """Per-field multiple of the tables' initial range, uniform(+-sqrt(1/rows)) (TorchRec's default, which
    the trainer draws itself so that runs match across world sizes), e.g. {"110_14" = 0.0}; 0 starts the
    table at zero. A row that few gradients reach keeps much of its random start: at full scale the
    history rows of the best ESMM moved by about their start's size, and without the start the users'
    pooled rows hold their planted taste better (R^2 +0.06 to +0.08), yet starting those tables, or every
    table, at zero moved no test AUC by more than 0.0004 (benchmarks/RESULTS.md, Full scale (8)). A table
    at zero still learns when its pooled vector meets trained weights (a tower, the factors); two sides at
    zero that meet only in a product (model.interaction = "dot" between them) would not."""
    tower_dims: list[int] = field(default_factory=lambda: [360, 200, 80])
    """Hidden layer sizes of each task tower (ESMM paper: 360x200x80)."""
    task_tower_dims: dict[str, list[int]] = field(default_factory=dict)
    """Per-task tower hidden sizes in place of tower_dims, e.g. {cvr = []}; an empty list makes the task's
    tower a linear readout of its input. ESMM's towers are "ctr" and "cvr" (pCTCVR has none); the other
    heads have one per task. With the taste factors (model.factor_rank) a linear CVR readout scored CVR
    AUC +0.0009 / +0.0008 at full scale after one / two epochs (benchmarks/RESULTS.md, Full scale): the
    planted CVR logit is additive in what the rows hold, and a smaller tower fits less of the purchases'
    noise."""
    expert_dims: list[int] = field(default_factory=lambda: [256, 128])
    """Hidden layer sizes of each MMOE expert (and of the shared bottom); for PLE, one extraction level
    per entry, whose experts are one layer of that size."""
    num_experts: int = 4
    """MMOE experts; for PLE, the shared experts of each level."""
    task_experts: int = 1
    """PLE: experts of each task's own at each level."""
    dropout: float = 0.0
    """Dropout after each hidden layer."""
    activation: str = "relu"
    """Hidden activation: relu, gelu, silu, tanh or sigmoid."""
    interaction: str = "none"
    """"none": heads read the concatenated pooled embeddings; "dot": also every pairwise dot product of
    the pooled field embeddings (DLRM-style; user-user products once per user). "dot" needs one
    embedding dim for all fields."""
    weight_features: list[str] = field(default_factory=list)
    """Per-row statistics of the multi-valued fields' id weights fed to the heads beside the pooled
    embeddings, from "sum", "last" and "count" (log1p of the weight sum, of the last entry's weight,
    of the number of ids; see dist_mtl/models/weight_features.py). torch-rechub's Ali-CCP recipe feeds
    the last id's weight as dense columns. Not with interaction = "dot"."""
    head_precision: str = "float32"
    """Precision of the heads' matrix products: "float32", or "bfloat16" to run the head (towers, experts,
    gates) under ``torch.autocast`` (weights, their gradients and optimizer state, the embedding tables,
    the logits, predictions and losses stay float32; exported models serve in float32). On a CPU with
    AVX512-BF16 the paper's towers run 2.9x faster (benchmarks/head_precision_bench.py); on a CPU without
    AVX512-BF16 or AMX bfloat16 is slower."""
    mean_pooled_fields: list[str] = field(default_factory=list)
    """Multi-valued fields pooled as weighted means instead of weighted sums: a field's weighted sum of
    embeddings divided by the row's total weight in that field, so that a history's pooled vector says
    what the user does, not also how much (model.weight_features "sum" hands the towers that). One mean
    over all the listed fields together was measured as well and scored lower (benchmarks/RESULTS.md,
    Full scale)."""
    factor_rank: int = 0
    """Rank k of a low-rank user x item interaction added to the task logits (0: none). The user row
    (pooled embeddings and weight features, once per user) and the item row are projected to k dims by
    projections P and Q shared by the tasks; the first task's logit gains (P u) . (Q i) and every later
    one's (P u)^T M_t (Q i), M_t a learned k x k matrix starting at the identity. The tasks: ESMM's ctr
    and cvr towers; for the other heads every binary task in config order (regression tasks get none).
    CVR learns from the few purchases; with P and Q trained by every task it has only M of its own to
    learn. At full scale they narrowed ESMM's CVR gap by 0.004 and left MMOE's unchanged
    (benchmarks/RESULTS.md, Full scale (10))."""
    factor_only_fields: list[str] = field(default_factory=list)
    """User-side fields whose pooled embeddings reach the logits only through the factors
    (model.factor_rank): the head's layers (towers, experts, gates) do not read their embedding columns
    (their model.weight_features columns, if any, they still read)."""
    output_bias_init: str = "label_rate"
    """"label_rate": each binary task's output bias starts at the logit of its label rate in the train
    split (clicks per impression for CTR, purchases per click for a CVR over clicked rows), so the first
    steps need not push the base rate into every embedding row they touch; "default": PyTorch's init."""


@dataclass
class ShardingConfig:
    device: str = "auto"
    """"auto" (cuda when the node has a GPU for each of its processes, else cpu), "cpu" or "cuda"."""
    sharding_type: str = ""
    """Sharding type forced on every table ("" lets the planner choose among those the device supports)."""
    table_sharding: dict[str, str] = field(default_factory=dict)
    """Per-field sharding type, e.g. {"205" = "row_wise"}; overrides sharding_type."""
    compute_kernel: str = "fused"
    """Embedding compute kernel of the sharded tables: "fused" (fbgemm TBE, optimizer in backward), or
    "dense", TorchRec's kernel for data_parallel tables only (so it needs sharding_type = "data_parallel",
    which takes it anyway)."""


@dataclass
class OptimizerConfig:
    sparse: str = "rowwise_adagrad"
    """Optimizer fused into the embedding backward: sgd, adagrad, rowwise_adagrad (adam on CUDA only)."""
    sparse_lr: float = 0.05
    """Learning rate of the embedding tables."""
    sparse_eps: float = 1e-8
    """Adagrad / row-wise Adagrad epsilon of the tables (step = lr * g / (sqrt(sum g^2) + eps)); also given
    to data-parallel tables (torchrec's RowWiseAdagrad defaults to 1e-10, fbgemm's fused one to 1e-8), so
    a table trains the same sharded or replicated."""
    field_sparse_lr: dict[str, float] = field(default_factory=dict)
    """Per-field learning rates of the tables, e.g. {"109_14" = 0.1}; overrides sparse_lr."""
    field_sparse_eps: dict[str, float] = field(default_factory=dict)
    """Per-field (row-wise) Adagrad epsilons, e.g. {"109_14" = 1e-8}; overrides sparse_eps. A field pooled
    as a weighted mean (model.mean_pooled_fields) passes each id 1/(row weight) of the gradient a sum
    passes (for the full-scale set's histories 1e-8 instead of the preset's 1e-3 changed no AUC by more
    than 0.0006: benchmarks/RESULTS.md, Full scale)."""
    dense: str = "adam"
    """Optimizer of the dense (tower, expert, gate) parameters: adam, adagrad or sgd."""
    dense_lr: float = 1e-3
    """Learning rate of the dense parameters."""
    weight_decay: float = 0.0
    """Weight decay of the dense parameters."""
    dense_grad_clip_norm: float = 0.0
    """Clip the dense parameters' gradients to this total (L2) norm before each dense step (0: no
    clipping); the norm before clipping is then logged as train/grad_norm/dense. The tables' gradients
    are not clipped: their (row-wise) Adagrad normalises each row's steps already."""
    dense_lr_warmup_steps: int = 0
    """Steps over which the dense learning rate rises linearly to dense_lr (0: no warm-up)."""
    dense_lr_decay: str = "none"
    """Decay of the dense learning rate over the run's last steps: "none", "linear" or "cosine". The run
    is train.epochs epochs (train.max_steps stops a run early without shortening it). The tables keep
    their learning rate: (row-wise) Adagrad already shrinks each row's steps as its gradients add up."""
    dense_lr_decay_ratio: float = 1.0
    """Share of the run's steps, at its end, over which the dense learning rate decays (1.0: all steps
    after the warm-up)."""
    dense_lr_min_factor: float = 0.0
    """Dense learning rate at the end of the decay, as a multiple of dense_lr."""
    dense_epochs: int = 0
    """Epochs in which the dense parameters train (0: all of train.epochs). The dense rate's warm-up and
    decay span these epochs; the later ones train the embedding tables alone (the dense rate is 0)."""


@dataclass
class TrainConfig:
    epochs: int = 1
    """Passes over the train split."""
    max_steps: int = 0
    """Stop after this many steps in total (0: no limit)."""
    eval_every_steps: int = 0
    """Evaluate on the validation split every N steps as well as after each epoch (0: epochs only)."""
    early_stop_metric: str = "ctcvr/auc"
    """Metric watched for early stopping and for choosing the best model: higher is better, except for
    errors (names ending in /mse, /mae or /logloss). ``<task>/gauc`` needs ``train.group_auc``."""
    early_stop_patience: int = 2
    """Evaluations without improvement before training stops."""
    seed: int = 0
    """Seed of model initialisation and data order."""
    log_every_steps: int = 50
    """Steps between loss / throughput logs."""
    progress_bar: bool = True
    """Show a tqdm progress bar on rank 0."""
    group_auc: bool = False
    """Evaluate each binary task's group AUC as well (``<task>/gauc``, ``<task>/gauc_groups``): the AUC of
    each user row's impressions among the task's rows, averaged over the users holding both classes and
    weighted by their rows (dist_mtl.metrics.DistributedGroupAUC). Costs 13 bytes per evaluated row and
    binary task on the host until the evaluation ends, and a sort of them."""
    pipeline: bool = True
    """Train through TorchRec's TrainPipelineSparseDist, which overlaps the next batches' input
    distribution and host-to-device copy with this step's compute (it runs on CPU too, with the same
    losses as the plain loop); False runs the plain loop."""


@dataclass
class CheckpointConfig:
    interval_steps: int = 0
    """Save a sharded checkpoint every N steps, as well as at the end of every epoch (0: epochs only)."""
    keep: int = 3
    """Committed checkpoints kept in <run_dir>/checkpoints; older ones are deleted."""
    resume: bool = True
    """Continue from the newest committed checkpoint in <run_dir>/checkpoints when there is one. False
    starts from scratch and refuses a run_dir that holds checkpoints (their step numbers would outrank and
    prune the new run's); a job restarted by torchrun --max-restarts needs True, as its restarted attempt
    finds the first attempt's checkpoints."""
    init_from: str = ""
    """Start this run from a committed checkpoint of another run (a step-NNNNNNNN folder of its
    checkpoints/ or best/): its tables, dense layers and the state of both optimizers, at any world size.
    For training on later data in the same id space (launch/convert.py raw --id-maps-from): row-wise
    Adagrad with its accumulators reset would take full-sized steps on every row the first run trained.
    The data cursor, step count, dense learning-rate schedule, early-stopping state and random state start
    afresh. Used only while run_dir holds no checkpoint of its own: a resumed or restarted job continues
    from those. Empty: the tables start from their seeded initialisation."""


@dataclass
class ProfileConfig:
    steps: int = 0
    """Training steps to record with torch.profiler on every rank (0: off): each rank writes the window's
    Chrome trace and its operators with the most self time per step to <run_dir>/profile/
    (dist_mtl.profiling); rank 0 prints its top operators and summary.json keeps them."""
    start_step: int = 20
    """Steps this run trains before the recorded ones, the last of them the profiler's warm-up: the first
    steps (pipeline fill, one-off allocations) are not what a job spends its time on. Counted from this
    run's first step, a resumed run included."""
    record_shapes: bool = False
    """Record each operator's input shapes (in the trace; larger files)."""
    profile_memory: bool = False
    """Record tensor allocations (memory columns in the trace)."""
    with_stack: bool = False
    """Record the Python stack of each operator (in the trace; much larger files)."""


@dataclass
class JobConfig:
    run_dir: str = "runs/default"
    """Directory of this run: resolved config, TensorBoard events, best model, summary.json."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: list[TaskConfig] = field(default_factory=default_esmm_tasks)
    """Prediction targets; see dist_mtl.tasks.TaskConfig. ESMM needs binary tasks ctr, cvr, ctcvr. When
    neither the file nor an override sets them, ``load_config`` gives the head's default: ESMM's three
    (dist_mtl.tasks.default_esmm_tasks), or CTR and CTCVR for the heads with a tower per task
    (default_multi_tower_tasks)."""
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return _to_toml(self.to_dict())

    def validate(self) -> None:
        _validate(self)


# ---------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> JobConfig:
    """Defaults, then the TOML file (if any), then ``section.key=value`` overrides (TOML values)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path} not found") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from e
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        _set_dotted(raw, key.strip(), _parse_value(text.strip()))
    cfg = _build(JobConfig, raw, "")
    if "tasks" not in raw and cfg.model.head != "esmm":
        cfg.tasks = default_multi_tower_tasks()
    cfg.validate()
    return cfg


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word is a string: head=mmoe


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: '{p}' is not a section")
    node[parts[-1]] = value


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(_join(where, k)) for k in unknown)}; valid keys{' in [' + where + ']' if where else ''}: "
            f"{sorted(names)}"
        )
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in raw]
    if missing:
        raise ConfigError(f"{where or 'config'}: missing required key{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(repr(_join(where, k)) for k in missing)}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, _join(where, name))
    return cls(**kwargs)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return {str(k): _coerce(val_tp, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp}")


# ------------------------------------------------------------------------------------------- validation


def _require_fields(where: str, names: typing.Iterable[str]) -> None:
    """A per-field setting must name Ali-CCP fields: a table's name or a typo would be ignored silently."""
    from dist_mtl.data.schema import ALI_CCP_FIELDS

    fields = [f.name for f in ALI_CCP_FIELDS]
    unknown = sorted(set(names) - set(fields))
    if unknown:
        raise ConfigError(f"{where} names no field: {unknown} (fields: {fields})")


def _validate(cfg: JobConfig) -> None:
    def positive(where: str, v: int | float) -> None:
        if not v > 0:
            raise ConfigError(f"{where} must be > 0, got {v}")

    for key in ("train_split", "eval_split"):
        if not getattr(cfg.data, key):
            raise ConfigError(f"data.{key} must name a split of the dataset, got ''")
    positive("data.batch_size", cfg.data.batch_size)
    positive("data.eval_batch_size", cfg.data.eval_batch_size)
    positive("data.window_blocks", cfg.data.window_blocks)
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {cfg.data.num_workers}")
    if cfg.data.weight_transform not in ("log1p", "none"):
        raise ConfigError(f"data.weight_transform must be 'log1p' or 'none', got {cfg.data.weight_transform!r}")

    m = cfg.model
    if m.head not in HEADS:
        raise ConfigError(f"model.head must be one of {HEADS}, got {m.head!r}")
    from dist_mtl.data.schema import ALI_CCP_FIELDS

    _require_fields("model.field_dims", m.field_dims)
    for where, dim in [("model.embedding_dim", m.embedding_dim)] + [
        (f"model.field_dims.{k}", v) for k, v in m.field_dims.items()
    ]:
        if dim <= 0 or dim % 4:
            raise ConfigError(
                f"{where} = {dim}: embedding dims must be positive multiples of 4 (fbgemm's fused kernel "
                f"asserts it; the ESMM paper's 18 is not allowed, use 16 or 20)"
            )
    for where, dims in (("model.tower_dims", m.tower_dims), ("model.expert_dims", m.expert_dims)):
        if not dims or any(d <= 0 for d in dims):
            raise ConfigError(f"{where} must be a non-empty list of positive sizes, got {dims}")
    for task, dims in m.task_tower_dims.items():
        if any(d <= 0 for d in dims):
            raise ConfigError(f"model.task_tower_dims.{task} must be a list of positive sizes (empty: a linear "
                              f"readout), got {dims}")
    positive("model.num_experts", m.num_experts)
    positive("model.task_experts", m.task_experts)
    if m.interaction not in ("none", "dot"):
        raise ConfigError(f"model.interaction must be 'none' or 'dot', got {m.interaction!r}")
    bad_stats = [s for s in m.weight_features if s not in WEIGHT_STATS]
    if bad_stats or len(set(m.weight_features)) != len(m.weight_features):
        raise ConfigError(f"model.weight_features must be distinct names from {list(WEIGHT_STATS)}, "
                          f"got {m.weight_features!r}")
    if m.weight_features and m.interaction == "dot":
        raise ConfigError("model.weight_features cannot be combined with model.interaction = 'dot', whose "
                          "dot products read each side as whole field embeddings")
    if m.interaction == "dot" and any(d != m.embedding_dim for d in m.field_dims.values()):
        raise ConfigError(
            f"model.interaction = 'dot' takes dot products between fields, so every field needs the same "
            f"dim; model.field_dims {dict(m.field_dims)} differ from model.embedding_dim = {m.embedding_dim}"
        )
    _require_fields("model.field_init_scale", m.field_init_scale)
    for name, scale in m.field_init_scale.items():
        if not (math.isfinite(scale) and scale >= 0):
            raise ConfigError(f"model.field_init_scale.{name} must be a finite number >= 0, got {scale}")
    if m.head_precision not in HEAD_PRECISIONS:
        raise ConfigError(f"model.head_precision must be one of {list(HEAD_PRECISIONS)}, got {m.head_precision!r}")
    from dist_mtl.data.schema import USER_FIELDS

    multi_valued = {f.name for f in ALI_CCP_FIELDS if f.multi_valued}
    if not set(m.mean_pooled_fields) <= multi_valued or len(set(m.mean_pooled_fields)) != len(m.mean_pooled_fields):
        raise ConfigError(f"model.mean_pooled_fields must be distinct multi-valued fields from {sorted(multi_valued)}, "
                          f"got {m.mean_pooled_fields!r}")
    if m.factor_rank < 0:
        raise ConfigError(f"model.factor_rank must be >= 0, got {m.factor_rank}")
    user_names = {f.name for f in USER_FIELDS}
    if m.factor_only_fields:
        if not m.factor_rank:
            raise ConfigError("model.factor_only_fields needs model.factor_rank > 0: without the factors "
                              "those fields would reach no logit")
        if not set(m.factor_only_fields) <= user_names or len(set(m.factor_only_fields)) != len(m.factor_only_fields):
            raise ConfigError(f"model.factor_only_fields must be distinct user-side fields from {sorted(user_names)}, "
                              f"got {m.factor_only_fields!r}")
        if m.interaction == "dot":
            raise ConfigError("model.factor_only_fields cannot be combined with model.interaction = 'dot', whose "
                              "dot products would hand those fields to the towers")
    if m.output_bias_init not in ("label_rate", "default"):
        raise ConfigError(f"model.output_bias_init must be 'label_rate' or 'default', got {m.output_bias_init!r}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
    from dist_mtl.models.layers import ACTIVATIONS

    if m.activation not in ACTIVATIONS:
        raise ConfigError(f"model.activation must be one of {sorted(ACTIVATIONS)}, got {m.activation!r}")

    s = cfg.sharding
    if s.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"sharding.device must be auto, cpu or cuda, got {s.device!r}")
    for where, st in [("sharding.sharding_type", s.sharding_type)] + [
        (f"sharding.table_sharding.{k}", v) for k, v in s.table_sharding.items()
    ]:
        if st and st not in SHARDING_TYPES:
            raise ConfigError(f"{where} must be one of {SHARDING_TYPES}, got {st!r}")
    _require_fields("sharding.table_sharding", s.table_sharding)
    if s.compute_kernel not in ("fused", "dense"):
        raise ConfigError(f"sharding.compute_kernel must be 'fused' or 'dense', got {s.compute_kernel!r}")
    if s.compute_kernel == "dense":
        others = sorted({st for st in [s.sharding_type, *s.table_sharding.values()] if st != "data_parallel"})
        if others:
            # Left to the planner, 'dense' would silently replicate every table on every rank.
            raise ConfigError(
                f"sharding.compute_kernel = 'dense': TorchRec's dense kernel serves only data_parallel tables "
                f"(a whole copy of each table on every rank), but the sharding asks for {others} ('' is the "
                f"planner's choice); set sharding.sharding_type = \"data_parallel\" (whose tables take the "
                f"dense kernel anyway) or keep 'fused'"
            )

    o = cfg.optimizer
    if o.sparse not in SPARSE_OPTIMIZERS:
        raise ConfigError(f"optimizer.sparse must be one of {SPARSE_OPTIMIZERS}, got {o.sparse!r}")
    if o.dense not in DENSE_OPTIMIZERS:
        raise ConfigError(f"optimizer.dense must be one of {DENSE_OPTIMIZERS}, got {o.dense!r}")
    positive("optimizer.sparse_lr", o.sparse_lr)
    positive("optimizer.dense_lr", o.dense_lr)
    if not (o.dense_grad_clip_norm >= 0 and math.isfinite(o.dense_grad_clip_norm)):
        raise ConfigError(f"optimizer.dense_grad_clip_norm must be >= 0 and finite (0: no clipping), "
                          f"got {o.dense_grad_clip_norm}")
    positive("optimizer.sparse_eps", o.sparse_eps)
    for where, per_field in (("optimizer.field_sparse_lr", o.field_sparse_lr),
                             ("optimizer.field_sparse_eps", o.field_sparse_eps)):
        _require_fields(where, per_field)
        for k, v in per_field.items():
            positive(f"{where}.{k}", v)
    if o.field_sparse_eps and o.sparse not in EPS_SPARSE_OPTIMIZERS:
        raise ConfigError(f"optimizer.field_sparse_eps is an Adagrad epsilon; optimizer.sparse = {o.sparse!r} has none")
    if o.dense_lr_warmup_steps < 0:
        raise ConfigError(f"optimizer.dense_lr_warmup_steps must be >= 0, got {o.dense_lr_warmup_steps}")
    if o.dense_lr_decay not in DENSE_LR_DECAYS:
        raise ConfigError(f"optimizer.dense_lr_decay must be one of {DENSE_LR_DECAYS}, got {o.dense_lr_decay!r}")
    if not 0.0 < o.dense_lr_decay_ratio <= 1.0:
        raise ConfigError(f"optimizer.dense_lr_decay_ratio must be in (0, 1], got {o.dense_lr_decay_ratio}")
    if not 0.0 <= o.dense_lr_min_factor <= 1.0:
        raise ConfigError(f"optimizer.dense_lr_min_factor must be in [0, 1], got {o.dense_lr_min_factor}")
    if not 0 <= o.dense_epochs <= cfg.train.epochs:
        raise ConfigError(f"optimizer.dense_epochs must be in [0, train.epochs = {cfg.train.epochs}], "
                          f"got {o.dense_epochs}")

    t = cfg.train
    positive("train.epochs", t.epochs)
    if t.max_steps < 0 or t.eval_every_steps < 0:
        raise ConfigError("train.max_steps and train.eval_every_steps must be >= 0")
    positive("train.log_every_steps", t.log_every_steps)
    positive("train.early_stop_patience", t.early_stop_patience)
    if cfg.checkpoint.interval_steps < 0:
        raise ConfigError(f"checkpoint.interval_steps must be >= 0, got {cfg.checkpoint.interval_steps}")
    positive("checkpoint.keep", cfg.checkpoint.keep)
    if cfg.profile.steps < 0:
        raise ConfigError(f"profile.steps must be >= 0, got {cfg.profile.steps}")
    positive("profile.start_step", cfg.profile.start_step)

    if not cfg.tasks:
        raise ConfigError("tasks: at least one task is needed")
    names = [task.name for task in cfg.tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"tasks: duplicate task names in {names}")
    for task in cfg.tasks:
        try:
            task.validate()
        except ValueError as e:
            raise ConfigError(f"tasks: {e}") from e
    if not any(task.loss_weight > 0 for task in cfg.tasks):
        raise ConfigError("tasks: every task has loss_weight 0, nothing would be trained")
    metric_task, _, metric_name = t.early_stop_metric.partition("/")
    if metric_task not in names:
        raise ConfigError(f"train.early_stop_metric {t.early_stop_metric!r} names no task in {names}")
    # Only metrics that rank models: a name the evaluation does not produce would read as NaN, never
    # improve, and stop the run early without a best model.
    task_type = next(task.type for task in cfg.tasks if task.name == metric_task)
    if metric_name == "gauc" and task_type == "binary" and not t.group_auc:
        raise ConfigError(f"train.early_stop_metric {t.early_stop_metric!r} needs train.group_auc = true")
    if metric_name not in RANKING_METRICS[task_type]:
        raise ConfigError(
            f"train.early_stop_metric {t.early_stop_metric!r}: a {task_type} task is ranked by "
            f"{[f'{metric_task}/{n}' for n in RANKING_METRICS[task_type]]}"
        )
    if m.head != "esmm":
        # Only ESMM derives a prediction from other tasks' towers (pCTCVR = pCTR x pCVR); elsewhere a
        # zero-weight task's tower and gate never get a gradient and its metrics score random weights.
        idle = [task.name for task in cfg.tasks if task.loss_weight == 0]
        if idle:
            raise ConfigError(
                f"tasks: {idle} have loss_weight 0, so the {m.head} head's towers for them would never "
                "train (only ESMM learns CVR through pCTCVR); give them a loss weight (CVR over clicked "
                'impressions: rows = "click") or leave them out'
            )
    if m.head == "esmm":
        from dist_mtl.models.esmm import ESMM_TOWERS, check_esmm_tasks

        try:
            check_esmm_tasks(cfg.tasks)
        except ValueError as e:
            raise ConfigError(f"tasks: {e}") from e
        towers = list(ESMM_TOWERS)
    else:
        towers = [task.name for task in cfg.tasks]
    stray = sorted(set(m.task_tower_dims) - set(towers))
    if stray:
        raise ConfigError(f"model.task_tower_dims names {stray}, which have no tower in the {m.head} head "
                          f"(its towers: {towers})")
    if m.factor_rank and not any(task.type == "binary" for task in cfg.tasks):
        raise ConfigError("model.factor_rank adds its terms to the binary tasks' logits, and tasks has none "
                          f"(types: {sorted({task.type for task in cfg.tasks})})")


# ------------------------------------------------------------------------------------ comparing configs


# Settings that change what a model computes without changing any tensor's shape (the checkpoint's shapes
# catch the rest: dims, towers, experts, factor rank, vocabularies). Compared by name so that settings a
# head ignores (expert_dims for ESMM) and settings added later (filled with their defaults) never refuse a
# valid export or warm start.
_SHAPELESS_MODEL_KEYS = ("head", "activation", "interaction", "weight_features", "mean_pooled_fields",
                         "factor_only_fields")
#: Of those, the lists whose order the model does not depend on (weight_features' order is its columns').
_FIELD_SET_KEYS = ("mean_pooled_fields", "factor_only_fields")


def computation_mismatches(trained_with: Mapping, cfg: JobConfig) -> list[str]:
    """The settings in which ``cfg`` would build a model that computes otherwise than the one trained
    with the config ``trained_with`` (a ``JobConfig.to_dict()``, possibly of an older version that lacked
    some keys: those count as their defaults), described for an error."""
    defaults = JobConfig().to_dict()

    def settings(d: Mapping) -> dict:
        model = {**defaults["model"], **d.get("model", {})}
        out = {f"model.{k}": sorted(model[k]) if k in _FIELD_SET_KEYS else model[k] for k in _SHAPELESS_MODEL_KEYS}
        out["data.weight_transform"] = {**defaults["data"], **d.get("data", {})}["weight_transform"]
        out["tasks (name, type)"] = [(t["name"], t.get("type", "binary")) for t in d.get("tasks", defaults["tasks"])]
        return out

    saved, current = settings(trained_with), settings(cfg.to_dict())
    return [f"{k}: trained with {saved[k]!r}, the config has {current[k]!r}" for k in saved if saved[k] != current[k]]


# ----------------------------------------------------------------------------------------------- TOML out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def _to_toml(d: dict) -> str:
    # JobConfig's table-valued fields are all sections (nested dataclasses) and its list of tables is
    # [[tasks]]; maps inside a section (field_dims, table_sharding) are written inline.
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, (dict, list))]
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
        elif isinstance(v, list):
            for item in v:
                lines.append(f"\n[[{k}]]")
                lines += [f"{kk} = {_toml_value(vv)}" for kk, vv in item.items()]
    return "\n".join(lines) + "\n"
