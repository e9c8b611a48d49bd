"""Checkpoint test phases: train a small ESMM DMP on fixed batches, save / load through CheckpointManager,
and dump what each rank holds so that the test can rebuild every full tensor and compare runs.

Runs under torchrun (``checkpoint_worker.py SPEC.json``) or in the test process at world size 1
(``run_phase(spec)`` after ``init_distributed``). The batch of step ``k`` is fixed (seed ``100 + k``, 64
impressions); on 2 ranks each rank trains its half, as in ``sharded_equivalence.py``.

Spec keys: ``out_dir``, ``tag``; ``sharding_type`` and ``table_sharding`` (field -> type); ``load`` (a
checkpoint path or null); ``start`` (first step when not loading); ``train_until``; ``save_at`` (steps
after which to save into ``ckpt_root``); ``reload_and_retrain`` (after training, load ``reload`` and
train again up to ``train_until``); ``export_dir`` (export the live model there at the end).

Outputs: ``<tag>-after_load-rank<R>.pt``, ``<tag>-save<S>-rank<R>.pt`` (local state, predictions on the
scoring batch, extra, load report) and ``<tag>.json`` (loss trajectories, rank 0).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))

from model_helpers import VOCAB_SIZES, random_batch  # noqa: E402
from sharded_equivalence import impression_slice  # noqa: E402
from torch.distributed._shard.sharded_tensor import ShardedTensor  # noqa: E402

from train import run_as_script  # noqa: E402  (launch/train.py)
from dist_mtl.checkpoint import (  # noqa: E402
    TABLE_OPTIM_PREFIX,
    CheckpointManager,
    canonical_table_state,
    optimized_parameters,
)
from dist_mtl.config import JobConfig, load_config  # noqa: E402
from dist_mtl.data.batch import GroupedBatch  # noqa: E402
from dist_mtl.distributed import (  # noqa: E402
    dense_optimizer,
    init_distributed,
    init_embedding_tables,
    shard_model,
)
from dist_mtl.losses import MultiTaskLoss  # noqa: E402
from dist_mtl.models import MultiTaskModel  # noqa: E402
from dist_mtl.models.embeddings import is_table_weight  # noqa: E402
from dist_mtl.trainer import TrainStep  # noqa: E402

HALF = 32
SCORING_SEED = 900


def job_config(
    sharding_type: str, table_sharding: dict[str, str], extra_overrides: tuple[str, ...] = ()
) -> JobConfig:
    tables = ", ".join(f'"{k}" = "{v}"' for k, v in table_sharding.items())
    return load_config(None, [
        "model.embedding_dim=8", "model.tower_dims=[16,8]", f'sharding.sharding_type="{sharding_type}"',
        f"sharding.table_sharding={{{tables}}}", "optimizer.sparse_lr=0.1", "optimizer.dense_lr=0.01",
        *extra_overrides,
    ])


def build(cfg: JobConfig, vocab_sizes: dict[str, int] = VOCAB_SIZES):
    """DMP of a TrainStep, its dense optimizer: the trainer's build order."""
    ctx = init_distributed("cpu")
    torch.manual_seed(0)
    step = TrainStep(MultiTaskModel(cfg.model, vocab_sizes, cfg.tasks), MultiTaskLoss(cfg.tasks))
    dmp, _ = shard_model(step, ctx, cfg.sharding, cfg.optimizer, 64)
    init_embedding_tables(dmp, 0)
    return dmp, dense_optimizer(dmp, cfg.optimizer)


def local_batch(step: int) -> GroupedBatch:
    full = random_batch(num_users=5 + step % 4, num_impressions=2 * HALF, seed=100 + step)
    if dist.get_world_size() == 1:
        return full
    rank = dist.get_rank()
    return impression_slice(full, rank * HALF, (rank + 1) * HALF)


def scoring_batches() -> list[GroupedBatch]:
    """Fixed batches every rank scores whole: many users, one user (the serving case), one impression."""
    return [random_batch(num_users=u, num_impressions=b, seed=SCORING_SEED + i)
            for i, (u, b) in enumerate([(7, 50), (1, 6), (1, 1)])]


def train(dmp, opt, start: int, end: int) -> list[float]:
    """Global (rank-averaged) loss of each step in [start, end)."""
    dmp.train()
    losses = []
    for k in range(start, end):
        loss, _ = dmp(local_batch(k))
        opt.zero_grad()
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / dist.get_world_size())
    return losses


@torch.no_grad()
def predictions(dmp) -> dict[str, torch.Tensor]:
    """Predictions on the scoring batches, concatenated; every rank scores the same whole batches, so any
    rank's predictions are the model's."""
    dmp.eval()
    outputs = [dmp(batch)[1][1].predictions for batch in scoring_batches()]
    dmp.train()
    return {task: torch.cat([o[task] for o in outputs]) for task in outputs[0]}


def _local(value) -> dict:
    if isinstance(value, ShardedTensor):
        shards = [(list(s.metadata.shard_offsets), s.tensor.detach().clone()) for s in value.local_shards()]
        return {"size": list(value.size()), "shards": shards}
    return {"size": list(value.shape), "shards": [([0] * value.dim(), value.detach().clone())]}


def local_state(dmp, opt) -> dict:
    """This rank's pieces of every table, dense parameter and their optimizer states. Table optimizer state
    is in the checkpoint's canonical form whichever optimizer holds it (fused: sharded tables; dense:
    data-parallel tables), dense optimizer state under the parameters' model names."""
    model_state = dmp.state_dict()
    table_optim = {f"{fqn}/{name}": _local(v)
                   for fqn, states in dmp.fused_optimizer.state_dict()["state"].items()
                   for name, v in states.items()}
    dense_optim = {}
    for fqn, entry in optimized_parameters(model_state, opt).items():
        for name, value in entry.state.items():
            if is_table_weight(fqn):
                key, canonical = canonical_table_state(fqn, name, value)
                table_optim[key[len(TABLE_OPTIM_PREFIX):]] = _local(canonical)
            else:
                dense_optim[f"{fqn}/{name}"] = _local(value)
    return {"model": {k: _local(v) for k, v in model_state.items()}, "table_optim": table_optim,
            "dense_optim": dense_optim}


def make_extra(step: int) -> dict:
    return {
        "step": step,
        "epoch": 0,
        "reader": {"epoch": 0, "next_batch": step},
        "rng": torch.get_rng_state(),
        "early_stop": {"best_value": float("-inf"), "best_step": -1, "bad_evals": 0},
        "world_size": dist.get_world_size(),
        "config_fingerprint": "test-fingerprint",
    }


def dump(out_dir: Path, name: str, dmp, opt, **info) -> None:
    payload = {"state": local_state(dmp, opt), "predictions": predictions(dmp), **info}
    torch.save(payload, out_dir / f"{name}-rank{dist.get_rank()}.pt")


def run_phase(spec: dict) -> dict:
    out_dir = Path(spec["out_dir"])
    tag = spec["tag"]
    cfg = job_config(spec.get("sharding_type", "table_wise"), spec.get("table_sharding", {}))
    dmp, opt = build(cfg)
    manager = CheckpointManager(spec["ckpt_root"], keep=spec.get("keep", 3))
    result: dict = {"world_size": dist.get_world_size()}

    step = spec.get("start", 0)
    if spec.get("load"):
        extra = manager.load(spec["load"], dmp, opt)
        step = extra["step"]
        dump(out_dir, f"{tag}-after_load", dmp, opt, extra=extra, report=dataclasses.asdict(manager.last_load))

    losses: list[float] = []
    save_at = sorted(s for s in spec.get("save_at", []) if s > step)
    for stop in save_at + [spec["train_until"]]:
        losses += train(dmp, opt, step, stop)
        step = stop
        if stop in save_at:
            extra = make_extra(step)
            manager.save(step, dmp, opt, extra)
            dump(out_dir, f"{tag}-save{step}", dmp, opt, extra=extra)
    result["losses"] = losses

    if spec.get("reload"):
        extra = manager.load(spec["reload"], dmp, opt)
        result["reloaded_step"] = extra["step"]
        result["losses_after_reload"] = train(dmp, opt, extra["step"], spec["train_until"])
    if spec.get("export_dir"):
        from dist_mtl.export import export_model

        export_model(spec["export_dir"], cfg, dmp=dmp)
    if dist.get_rank() == 0:
        (out_dir / f"{tag}.json").write_text(json.dumps(result))
    return result


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    init_distributed("cpu")
    run_phase(spec)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    # Leaves like launch/train.py, past the gloo teardown abort its exit_without_teardown describes.
    run_as_script(main)
