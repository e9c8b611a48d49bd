"""Planner constraints and optimizers in one process (a 1-rank gloo group)."""

import pytest
import torch
from model_helpers import VOCAB_SIZES, random_batch

from dist_mtl.config import load_config
from dist_mtl.distributed import dense_optimizer, init_distributed, init_embedding_tables, shard_model
from dist_mtl.losses import MultiTaskLoss
from dist_mtl.models import MultiTaskModel
from dist_mtl.trainer import TrainStep


def build(*overrides):
    cfg = load_config(None, ["model.embedding_dim=8", "model.tower_dims=[16,8]", *overrides])
    ctx = init_distributed("cpu")
    torch.manual_seed(0)
    step = TrainStep(MultiTaskModel(cfg.model, VOCAB_SIZES, cfg.tasks), MultiTaskLoss(cfg.tasks))
    dmp, plan = shard_model(step, ctx, cfg.sharding, cfg.optimizer, 64)
    init_embedding_tables(dmp, 0)
    return dmp, plan, dense_optimizer(dmp, cfg.optimizer)


def trajectory(dmp, opt, steps=4):
    out = []
    for k in range(steps):
        loss, _ = dmp(random_batch(5, 40, seed=k))
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(float(loss))
    return out


def test_no_dense_optimizer_steps_a_table_and_every_table_uses_the_table_optimizer():
    dmp, plan, opt = build('sharding.sharding_type="data_parallel"')
    dense_names = [k for k in opt.params if k.startswith("dense.")]
    table_names = [k for k in opt.params if k.startswith("data_parallel_tables.")]
    assert dense_names and not any("embedding_bags" in k for k in dense_names)
    assert len(table_names) == 23  # every table is data-parallel here, all under the table optimizer
    # Data-parallel tables trained by the (non-fused) row-wise Adagrad follow the fused table-wise run.
    dp = trajectory(dmp, opt)
    tw_dmp, _, tw_opt = build('sharding.sharding_type="table_wise"')
    assert not any(k.startswith("data_parallel_tables.") for k in tw_opt.params)
    for a, b in zip(dp, trajectory(tw_dmp, tw_opt)):
        assert a == pytest.approx(b, rel=1e-4)


def test_gpu_only_choices_are_refused_on_cpu():
    with pytest.raises(ValueError, match="row_wise.*GPU-only"):
        build('sharding.sharding_type="row_wise"')
    with pytest.raises(ValueError, match="'adam' has no CPU kernel"):
        build('optimizer.sparse="adam"')
    with pytest.raises(ValueError, match="compute_kernel = 'dense'"):
        build('sharding.compute_kernel="dense"')


def test_per_table_sharding_constraint_is_honoured():
    _, plan, _ = build('sharding.sharding_type="table_wise"', 'sharding.table_sharding={"205" = "column_wise"}')
    plans = {name: p for module_plan in plan.plan.values() for name, p in module_plan.items()}
    assert plans["t_205"].sharding_type == "column_wise"
    assert plans["t_206"].sharding_type == "table_wise"
