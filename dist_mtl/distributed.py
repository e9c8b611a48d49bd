"""Everything that knows the backend: process group, device, topology, planner, DMP, optimizers.

The trainer asks for a ``DistContext`` and a sharded model; it never names gloo, nccl or a sharding type.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.model_parallel import get_default_sharders
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingEnv, ShardingPlan, ShardingType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper, OptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from dist_mtl.config import EPS_SPARSE_OPTIMIZERS, OptimizerConfig, ShardingConfig
from dist_mtl.models.embeddings import is_table_weight, table_of_weight

if TYPE_CHECKING:  # the planner only reads the loads; the data reader is not needed to shard a model
    from dist_mtl.data.reader import FeatureLoad

# What fbgemm's CPU kernels and TorchRec's gloo path support (row-wise sharding is GPU-only).
CPU_SHARDING_TYPES = (
    ShardingType.DATA_PARALLEL.value,
    ShardingType.TABLE_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
)
CPU_SPARSE_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistContext:
    """Join the job's process group: torchrun's env:// rendezvous, or a 1-process group when run plainly.

    A 1-process group keeps one code path: DMP, the planner and metric sync behave as on N ranks.
    """
    # The variables torchrun sets; nothing else is read from the environment.
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if launched else 1
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    use_cuda = resolve_device(device, local_world, gpus) == "cuda"
    backend = "nccl" if use_cuda else "gloo"
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if launched:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(backend=backend, store=_attempt_store(rank, world, timeout), rank=rank,
                                    world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=local_world,
        device=dev,
        backend=backend,
    )


def resolve_device(device: str, local_world_size: int, gpus: int) -> str:
    """"cpu" or "cuda" for sharding.device ("auto", "cpu" or "cuda") on a node that runs
    ``local_world_size`` processes and has ``gpus`` GPUs.

    Each process takes the GPU of its local rank, so CUDA needs one GPU per local process: "auto" picks
    CUDA only then (two CPU ranks on a one-GPU laptop, the README's main job, stay on the CPU rather than
    failing on a device that does not exist), and "cuda" without them is an error that says so.
    """
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        if gpus == 0:
            raise RuntimeError("sharding.device = 'cuda' but CUDA is not available on this machine")
        if gpus < local_world_size:
            raise RuntimeError(
                f"sharding.device = 'cuda' with {local_world_size} processes on this node but {gpus} GPU(s): "
                f"each process needs a GPU of its own (torchrun --nproc_per_node={gpus}), or use "
                f"sharding.device = 'cpu'")
        return "cuda"
    if device != "auto":
        raise ValueError(f"sharding.device = {device!r}: expected 'auto', 'cpu' or 'cuda'")
    if 0 < gpus < local_world_size:
        warnings.warn(f"sharding.device = 'auto': {local_world_size} processes on this node but {gpus} GPU(s), "
                      f"so the job runs on the CPU (gloo); set sharding.device = 'cuda' with "
                      f"--nproc_per_node={gpus} to train on the GPUs", stacklevel=2)
    return "cuda" if 0 < gpus and gpus >= local_world_size else "cpu"


def _attempt_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """torchrun's rendezvous store, with a key prefix of its own for every restart attempt.

    torch's env:// init assumes the elastic agent makes a new store for each restart ("no need to add
    prefix for each attempt"), but under c10d rendezvous the same store serves the next attempt: its
    ranks then read the gloo addresses the killed workers published and fail to connect (measured:
    "connectFullMesh failed ... Connection refused" after a worker was SIGKILLed).
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        world_size=world_size,
        is_master=not agent_store and rank == 0,
        timeout=timeout,
        multi_tenant=not agent_store,
    )
    return dist.PrefixStore(f"dist_mtl/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def sparse_optimizer(name: str, device: torch.device) -> type[torch.optim.Optimizer]:
    if device.type == "cpu" and name not in CPU_SPARSE_OPTIMIZERS:
        raise ValueError(
            f"optimizer.sparse = {name!r} has no CPU kernel in fbgemm; use one of {CPU_SPARSE_OPTIMIZERS}"
        )
    # torch.optim.Adagrad means full Adagrad to TorchRec; the row-wise variant is torchrec's own class.
    return {
        "sgd": torch.optim.SGD,
        "adagrad": torch.optim.Adagrad,
        "rowwise_adagrad": RowWiseAdagrad,
        "adam": torch.optim.Adam,
    }[name]


def table_optimizer_kwargs(cfg: OptimizerConfig, table: str) -> dict[str, Any]:
    """The table optimizer's settings for table ``table`` (``t_<field>``): the optimizer section's, with
    the field's entries of ``field_sparse_lr`` / ``field_sparse_eps`` in their place when it has any."""
    field = table.removeprefix("t_")
    kwargs: dict[str, Any] = {"lr": cfg.field_sparse_lr.get(field, cfg.sparse_lr)}
    if cfg.sparse in EPS_SPARSE_OPTIMIZERS:
        kwargs["eps"] = cfg.field_sparse_eps.get(field, cfg.sparse_eps)
    return kwargs


def sparse_modules(model: nn.Module) -> list[nn.Module]:
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    return [m for m in model.modules() if isinstance(m, EmbeddingBagCollection)]


def table_constraints(
    model: nn.Module, cfg: ShardingConfig, device: torch.device,
    loads: Mapping[str, FeatureLoad] | None = None,
) -> dict[str, ParameterConstraints]:
    """The planner's constraints per table: the sharding types and kernels allowed, and, with ``loads``
    (``reader.feature_loads``), the rows and ids per row its feature brings a batch, so that the planner
    prices the lookups a table really serves rather than one id per impression."""
    allowed = CPU_SHARDING_TYPES if device.type == "cpu" else None
    constraints = {}
    for ebc in sparse_modules(model):
        for table in ebc.embedding_bag_configs():
            feature = table.feature_names[0]
            forced = cfg.table_sharding.get(feature) or cfg.sharding_type
            if forced and allowed is not None and forced not in allowed:
                raise ValueError(
                    f"sharding type {forced!r} for table {table.name} is GPU-only; on CPU use one of {allowed}"
                )
            types = [forced] if forced else (list(allowed) if allowed else None)
            if forced == ShardingType.DATA_PARALLEL.value:
                kernels = [EmbeddingComputeKernel.DENSE.value]
            else:
                if cfg.compute_kernel != "fused":  # config validation refuses it; a direct caller may not
                    raise ValueError(f"sharding.compute_kernel = {cfg.compute_kernel!r} serves only data_parallel "
                                     f"tables; table {table.name} is not forced to data_parallel")
                kernels = [EmbeddingComputeKernel.FUSED.value]
                # data_parallel tables run TorchRec's dense kernel: offer it wherever data_parallel may be
                # chosen (types None: every type the device has), or the planner can never replicate a
                # table (for 8 GPUs it replicates the seven Ali-CCP tables of 4-9 rows).
                if types is None or ShardingType.DATA_PARALLEL.value in types:
                    kernels.append(EmbeddingComputeKernel.DENSE.value)
            load = loads.get(feature) if loads else None
            constraints[table.name] = ParameterConstraints(
                sharding_types=types, compute_kernels=kernels, is_weighted=True,
                **({"pooling_factors": [load.ids_per_row], "batch_sizes": [load.rows_per_batch]} if load else {}),
            )
    return constraints


def build_topology(ctx: DistContext) -> Topology:
    """The planner's view of the job: its world, node size and device, and on CUDA the GPU's real
    memory (TorchRec assumes 32 GB per GPU when not told; an H100 has 80)."""
    hbm = torch.cuda.get_device_properties(ctx.device).total_memory if ctx.device.type == "cuda" else None
    return topology_for(ctx.world_size, ctx.local_world_size, ctx.device.type, hbm)


def topology_for(world_size: int, local_world_size: int, compute_device: str,
                 hbm_cap_bytes: int | None = None) -> Topology:
    """A Topology for a job of this shape. local_world_size lets the planner price intra-node links
    (NVLink, shared memory) above inter-node ones, so it prefers placements whose traffic stays inside a
    node.

    ``Topology(...)`` rather than 1.8's ``TopologyFactory``: the factory is missing from torchrec 1.6,
    which the GPU machine runs.
    """
    return Topology(
        world_size=world_size,
        compute_device=compute_device,
        local_world_size=local_world_size,
        **({"hbm_cap": hbm_cap_bytes} if hbm_cap_bytes else {}),
    )


def attach_table_optimizers(model: nn.Module, optimizer: OptimizerConfig, device: torch.device) -> None:
    """The fused table optimizer, applied in backward; the planner also reads it to size each table's
    optimizer state."""
    opt_cls = sparse_optimizer(optimizer.sparse, device)
    for ebc in sparse_modules(model):
        # One call per table, so that tables can differ (optimizer.field_sparse_lr / _eps); TorchRec groups
        # the tables of equal settings into one fused kernel again.
        for name, table in ebc.embedding_bags.items():
            apply_optimizer_in_backward(opt_cls, [table.weight], table_optimizer_kwargs(optimizer, name))


def sharding_planner(model: nn.Module, sharding: ShardingConfig, batch_size: int, topology: Topology,
                     loads: Mapping[str, FeatureLoad] | None = None) -> EmbeddingShardingPlanner:
    return EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        constraints=table_constraints(model, sharding, torch.device(topology.compute_device), loads),
    )


def plan_for_topology(
    model: nn.Module,
    sharding: ShardingConfig,
    optimizer: OptimizerConfig,
    batch_size: int,
    topology: Topology,
    loads: Mapping[str, FeatureLoad] | None = None,
) -> ShardingPlan:
    """The plan a job of this topology would get, computed in this process alone: no process group, no
    GPU. For a cluster not at hand (``launch/plan.py``); ``shard_model`` plans the same way on the job's
    ranks, collectively."""
    attach_table_optimizers(model, optimizer, torch.device(topology.compute_device))
    return sharding_planner(model, sharding, batch_size, topology, loads).plan(model, get_default_sharders())


# Optimizer state per table row, in float32 values: row-wise Adagrad keeps one sum per row, Adagrad one per
# value, Adam two per value.
_STATE_VALUES_PER_ROW = {"sgd": lambda dim: 0, "rowwise_adagrad": lambda dim: 1, "adagrad": lambda dim: dim,
                         "adam": lambda dim: 2 * dim}


def table_bytes_per_rank(plan: ShardingPlan, model: nn.Module, sparse_optimizer_name: str,
                         world_size: int) -> list[int]:
    """Bytes of table weights and table optimizer state (float32) that ``plan`` puts on each rank: a
    shard on its rank, a data_parallel table on every rank.

    Counted from the plan's shards because the planner's own storage estimates (which also price input
    and output buffers) stay inside the planner: the returned plan does not carry them."""
    sizes = {t.name: (t.num_embeddings, t.embedding_dim)
             for ebc in sparse_modules(model) for t in ebc.embedding_bag_configs()}
    state = _STATE_VALUES_PER_ROW[sparse_optimizer_name]
    per_rank = [0] * world_size
    for module_plan in plan.plan.values():
        for table, sharding in module_plan.items():
            rows, dim = sizes[table]
            if sharding.sharding_type == ShardingType.DATA_PARALLEL.value:
                for r in range(world_size):
                    per_rank[r] += 4 * rows * (dim + state(dim))
                continue
            for shard in sharding.sharding_spec.shards:
                shard_rows, shard_cols = shard.shard_sizes
                # a column shard carries its own row-wise state (fbgemm keeps one per shard)
                per_rank[shard.placement.rank()] += 4 * shard_rows * (shard_cols + state(shard_cols))
    return per_rank


def shard_model(
    model: nn.Module,
    ctx: DistContext,
    sharding: ShardingConfig,
    optimizer: OptimizerConfig,
    batch_size: int,
    loads: Mapping[str, FeatureLoad] | None = None,
) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Fused table optimizer in backward, a planner over the real topology (and, with ``loads``, the
    data's rows and ids per batch of each feature), then DMP."""
    attach_table_optimizers(model, optimizer, ctx.device)
    planner = sharding_planner(model, sharding, batch_size, build_topology(ctx), loads)
    sharders = get_default_sharders()
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(
        module=model,
        env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
        device=ctx.device,
        plan=plan,
        sharders=sharders,
    )
    skip_unused_id_weight_grads(dmp)
    return dmp, plan


def skip_unused_id_weight_grads(dmp: nn.Module) -> list[RemovableHandle]:
    """Stop fbgemm computing the gradient of per-id weights that come from the data.

    fbgemm's table-batched kernels compute d(loss)/d(per_sample_weights) in every weighted backward
    unless told per feature that it is not needed (``feature_requires_grad``), and TorchRec's lookup
    never passes that argument. Here every weight is a count or score read from the dataset, so the
    gradient is thrown away: on CPU it cost 1.6 ms of a 14 ms grouped step (~37k history ids per batch).
    A forward pre-hook on each table-batched module passes all-zero flags, unless the weights do require
    a gradient (a model that learns them keeps getting it). Returns the hooks' handles.
    """
    def pass_no_grad_flags(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        weights = kwargs.get("per_sample_weights")
        if weights is None or weights.requires_grad or kwargs.get("feature_requires_grad") is not None:
            return None
        flags = torch.zeros(module.D_offsets.numel() - 1, dtype=torch.int32, device=weights.device)
        return args, {**kwargs, "feature_requires_grad": flags}

    return [module.register_forward_pre_hook(pass_no_grad_flags, with_kwargs=True)
            for module in table_batched_modules(dmp)]


def table_batched_modules(dmp: nn.Module) -> list[nn.Module]:
    """fbgemm's table-batched embedding modules under each sharded collection's lookups.

    A sharded EmbeddingBagCollection keeps its lookups in a plain list (``_lookups``, the same in
    torchrec 1.6 and 1.8), so ``dmp.modules()`` does not reach them.
    """
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        DenseTableBatchedEmbeddingBagsCodegen,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    kinds = (SplitTableBatchedEmbeddingBagsCodegen, DenseTableBatchedEmbeddingBagsCodegen)
    return [module
            for sharded in dmp.modules()
            for lookup in getattr(sharded, "_lookups", ())
            for module in lookup.modules()
            if isinstance(module, kinds)]


def dense_optimizer(dmp: nn.Module, cfg: OptimizerConfig) -> CombinedOptimizer:
    """The optimizer of everything not stepped inside the embedding backward.

    Data-parallel tables (small tables the planner replicates on every rank) come out of DMP as plain
    parameters with all-reduced gradients and without the fused optimizer of the sharded tables; they
    are stepped here by the configured *table* optimizer and learning rate, so that ``optimizer.sparse``
    means the same for every table and no dense optimizer (Adam) ever steps an embedding table.
    """
    params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    tables = {k: p for k, p in params.items() if is_table_weight(k)}
    dense = {k: p for k, p in params.items() if k not in tables}
    factories = {
        "adam": lambda p: torch.optim.Adam(p, lr=cfg.dense_lr, weight_decay=cfg.weight_decay, fused=_fusable(p)),
        "adagrad": lambda p: torch.optim.Adagrad(p, lr=cfg.dense_lr, weight_decay=cfg.weight_decay),
        "sgd": lambda p: torch.optim.SGD(p, lr=cfg.dense_lr, weight_decay=cfg.weight_decay),
    }
    dense_part: KeyedOptimizer = KeyedOptimizerWrapper(dense, factories[cfg.dense])
    if cfg.dense_grad_clip_norm > 0:
        dense_part = DenseGradClipping(dense_part, cfg.dense_grad_clip_norm)
    optimizers = [("dense", dense_part)]
    if tables:
        table_cls = sparse_optimizer(cfg.sparse, next(iter(tables.values())).device)
        # One parameter group per table: each with its table's settings (optimizer.field_sparse_*).
        groups = [{"params": [p], **table_optimizer_kwargs(cfg, table_of_weight(k))} for k, p in tables.items()]
        optimizers.append(
            ("data_parallel_tables", KeyedOptimizerWrapper(tables, lambda _: table_cls(groups)))
        )
    return CombinedOptimizer(optimizers)


class DenseGradClipping(OptimizerWrapper):
    """Clips the wrapped optimizer's gradients to a total L2 norm before its step, and keeps the norm
    they had (``last_norm``, a tensor: read it when logging, not every step, to spare a device sync).

    TorchRec's GradientClippingOptimizer clips the same way, but keeps the norm only from torchrec 1.8
    on (``track_grad_norm``); the GPU stack's 1.6.1 does not, and the norm is what a user picks the
    limit by. The dense parameters' gradients are all-reduced by DDP before the step, so every rank
    computes the same norm and clips alike.
    """

    def __init__(self, optimizer: KeyedOptimizer, max_norm: float):
        super().__init__(optimizer)
        self.max_norm = max_norm
        self.last_norm: torch.Tensor | None = None

    def step(self, closure: Any = None) -> None:
        grads = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.last_norm = torch.nn.utils.clip_grad_norm_(grads, self.max_norm) if grads else None
        super().step(closure)


def dense_grad_clipping(optimizer: CombinedOptimizer) -> DenseGradClipping | None:
    """``dense_optimizer``'s clipping wrapper, when it clips."""
    return next((o for _, o in optimizer.optimizers if isinstance(o, DenseGradClipping)), None)


def _fusable(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused Adam (one kernel per device and dtype, CPU and CUDA) can step ``params``.

    Left to its default, torch.optim.Adam runs its for-loop implementation on CPU, several small ops per
    parameter; the fused kernel updates each parameter in one pass (torchtitan asks for it too).
    """
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def _table_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "little") & (2**63 - 1)


def initial_table(seed: int, key: str, rows: int, cols: int, scale: float = 1.0) -> torch.Tensor:
    """The start of the table whose DMP state-dict key is ``key``: uniform(+-scale * sqrt(1/rows)) from a
    per-table seed (also how a probe recomputes what a trained table started from)."""
    bound = (1.0 / rows) ** 0.5 * scale
    gen = torch.Generator().manual_seed(_table_seed(seed, key))
    return torch.empty(rows, cols).uniform_(-bound, bound, generator=gen)


@torch.no_grad()
def init_embedding_tables(dmp: nn.Module, seed: int, field_scale: Mapping[str, float] | None = None) -> None:
    """Give every table the same values whatever the world size and sharding.

    TorchRec initialises each shard on its own, so a 1-rank and a 2-rank job would start from different
    tables; generating the whole table from a per-table seed and copying each rank's slice makes runs
    comparable across world sizes (and resharding testable). Uniform(+-sqrt(1/rows)), TorchRec's default,
    times ``field_scale[field]`` where given (model.field_init_scale; 0: zeros).
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    field_scale = field_scale or {}
    for key, value in dmp.state_dict().items():
        if not is_table_weight(key):
            continue
        rows, cols = (value.size() if isinstance(value, ShardedTensor) else value.shape)
        full = initial_table(seed, key, rows, cols, field_scale.get(table_of_weight(key).removeprefix("t_"), 1.0))
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                r0, c0 = shard.metadata.shard_offsets
                nr, nc = shard.metadata.shard_sizes
                shard.tensor.copy_(full[r0 : r0 + nr, c0 : c0 + nc])
        else:
            value.copy_(full)
