"""Planner constraints and optimizers in one process (a 1-rank gloo group), and launch/plan.py."""

import pytest
import torch
from model_helpers import VOCAB_SIZES, random_batch
from script_helpers import load_script

from dist_mtl import distributed
from dist_mtl.config import ConfigError, load_config
from dist_mtl.data.schema import DatasetMetadata
from dist_mtl.distributed import dense_optimizer, init_distributed, init_embedding_tables, shard_model
from dist_mtl.losses import MultiTaskLoss
from dist_mtl.models import MultiTaskModel
from dist_mtl.trainer import TrainStep

PLAN_SCRIPT = load_script("launch/plan.py")


def build(*overrides):
    cfg = load_config(None, ["model.embedding_dim=8", "model.tower_dims=[16,8]", *overrides])
    ctx = init_distributed("cpu")
    torch.manual_seed(0)
    step = TrainStep(MultiTaskModel(cfg.model, VOCAB_SIZES, cfg.tasks), MultiTaskLoss(cfg.tasks))
    dmp, plan = shard_model(step, ctx, cfg.sharding, cfg.optimizer, 64)
    init_embedding_tables(dmp, 0, cfg.model.field_init_scale)
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


def test_dense_adam_is_fused_and_trains_as_the_for_loop_adam(monkeypatch):
    dmp, _, opt = build('sharding.sharding_type="table_wise"')
    groups = dict(opt.optimizers)["dense"].param_groups
    assert groups and all(g["fused"] for g in groups)
    fused = trajectory(dmp, opt, steps=6)
    monkeypatch.setattr(distributed, "_fusable", lambda params: False)
    loop_dmp, _, loop_opt = build('sharding.sharding_type="table_wise"')
    assert not any(g["fused"] for g in dict(loop_opt.optimizers)["dense"].param_groups)
    for a, b in zip(fused, trajectory(loop_dmp, loop_opt, steps=6)):
        assert a == pytest.approx(b, rel=1e-5)


def _dense_grads(dmp):
    return {k: p.grad.clone() for k, p in dmp.named_parameters()
            if p.grad is not None and "embedding_bags" not in k}


@pytest.mark.parametrize("max_norm", [1e-3, 1e6])
def test_dense_gradients_are_clipped_to_the_norm_before_the_step(max_norm):
    dmp, _, opt = build('sharding.sharding_type="data_parallel"', 'optimizer.dense="sgd"', "optimizer.dense_lr=0.5",
                        f"optimizer.dense_grad_clip_norm={max_norm}")
    clipping = distributed.dense_grad_clipping(opt)
    assert clipping is not None and dict(opt.optimizers)["dense"] is clipping
    loss, _ = dmp(random_batch(5, 40, seed=0))
    opt.zero_grad()
    loss.backward()
    grads = _dense_grads(dmp)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    before = {k: p.detach().clone() for k, p in dmp.named_parameters() if k in grads}
    opt.step()
    assert float(clipping.last_norm) == pytest.approx(float(norm), rel=1e-5)  # the norm before clipping
    scale = min(1.0, max_norm / float(norm))
    assert (scale < 1.0) == (max_norm < 1.0)
    for k, p in dmp.named_parameters():
        if k in grads:  # plain SGD: each dense parameter moved by lr x its clipped gradient
            torch.testing.assert_close(before[k] - p.detach(), 0.5 * scale * grads[k], rtol=1e-4, atol=1e-7)
    # The data-parallel tables, stepped by the table optimizer, are not clipped: their rows moved as far as
    # without clipping.
    unclipped, _, unclipped_opt = build('sharding.sharding_type="data_parallel"', 'optimizer.dense="sgd"',
                                        "optimizer.dense_lr=0.5")
    assert distributed.dense_grad_clipping(unclipped_opt) is None
    loss, _ = unclipped(random_batch(5, 40, seed=0))
    unclipped_opt.zero_grad()
    loss.backward()
    unclipped_opt.step()
    torch.testing.assert_close(_table(dmp, "205"), _table(unclipped, "205"))


def test_a_negative_or_infinite_clip_norm_is_refused():
    for value in ("-1.0", "inf"):
        with pytest.raises(ConfigError, match="optimizer.dense_grad_clip_norm must be >= 0 and finite"):
            load_config(None, [f"optimizer.dense_grad_clip_norm={value}"])


def _table(dmp, field):
    """The whole table of ``field`` (one rank holds every shard here)."""
    (value,) = [v for k, v in dmp.state_dict().items() if k.endswith(f".embedding_bags.t_{field}.weight")]
    return value.local_shards()[0].tensor.clone() if hasattr(value, "local_shards") else value.clone()


def test_field_init_scale_scales_a_tables_start_and_a_table_at_zero_still_learns():
    scaled, _, opt = build('sharding.sharding_type="table_wise"',
                           'model.field_init_scale={"109_14" = 0, "110_14" = 0.25}')
    default, _, _ = build('sharding.sharding_type="table_wise"')
    assert torch.count_nonzero(_table(scaled, "109_14")) == 0
    assert torch.equal(_table(scaled, "110_14"), 0.25 * _table(default, "110_14"))
    assert torch.equal(_table(scaled, "205"), _table(default, "205"))
    assert torch.count_nonzero(_table(default, "205")) > 0
    trajectory(scaled, opt, steps=2)
    assert torch.count_nonzero(_table(scaled, "109_14")) > 0


def test_gpu_only_choices_are_refused_on_cpu():
    with pytest.raises(ValueError, match="row_wise.*GPU-only"):
        build('sharding.sharding_type="row_wise"')
    with pytest.raises(ValueError, match="'adam' has no CPU kernel"):
        build('optimizer.sparse="adam"')



def test_the_dense_kernel_is_for_data_parallel_tables_only():
    # Left to the planner, 'dense' would replicate every table on every rank without saying so.
    with pytest.raises(ConfigError, match=r"compute_kernel = 'dense'.*data_parallel tables.*asks for \[''\]"):
        build('sharding.compute_kernel="dense"')
    with pytest.raises(ConfigError, match=r"asks for \['table_wise'\]"):
        build('sharding.compute_kernel="dense"', 'sharding.sharding_type="data_parallel"',
              'sharding.table_sharding={"205" = "table_wise"}')
    _, plan, _ = build('sharding.compute_kernel="dense"', 'sharding.sharding_type="data_parallel"')
    plans = [p for module_plan in plan.plan.values() for p in module_plan.values()]
    assert len(plans) == 23
    assert {(p.sharding_type, p.compute_kernel) for p in plans} == {("data_parallel", "dense")}


def test_per_table_sharding_constraint_is_honoured():
    _, plan, _ = build('sharding.sharding_type="table_wise"', 'sharding.table_sharding={"205" = "column_wise"}')
    plans = {name: p for module_plan in plan.plan.values() for name, p in module_plan.items()}
    assert plans["t_205"].sharding_type == "column_wise"
    assert plans["t_206"].sharding_type == "table_wise"


@pytest.mark.parametrize("sharding_type", ["table_wise", "data_parallel"])
def test_data_weights_get_no_gradient_and_training_is_unchanged(sharding_type, monkeypatch):
    dmp, _, opt = build(f'sharding.sharding_type="{sharding_type}"')
    modules = distributed.table_batched_modules(dmp)
    assert modules
    flags_seen = []
    for m in modules:  # registered after shard_model's hook, so it sees the arguments the kernel gets
        m.register_forward_pre_hook(
            lambda mod, args, kwargs: flags_seen.append((mod, kwargs.get("feature_requires_grad"))),
            with_kwargs=True,
        )
    hooked = trajectory(dmp, opt)
    assert len(flags_seen) == 4 * len(modules)
    for module, flags in flags_seen:
        assert flags is not None and flags.numel() == module.D_offsets.numel() - 1 and not flags.any()

    monkeypatch.setattr(distributed, "skip_unused_id_weight_grads", lambda dmp: [])
    plain_dmp, _, plain_opt = build(f'sharding.sharding_type="{sharding_type}"')
    assert hooked == pytest.approx(trajectory(plain_dmp, plain_opt), rel=1e-6)


def test_weights_that_require_grad_still_get_their_gradient():
    dmp, _, _ = build('sharding.sharding_type="table_wise"')
    tbe = distributed.table_batched_modules(dmp)[0]
    features = tbe.D_offsets.numel() - 1
    indices = torch.zeros(2 * features, dtype=torch.int64)
    offsets = torch.arange(0, 2 * features + 1, dtype=torch.int64)
    weights = torch.ones(2 * features, requires_grad=True)
    tbe(indices=indices, offsets=offsets, per_sample_weights=weights).sum().backward()
    assert weights.grad is not None and weights.grad.abs().sum() > 0


def _table_values(dmp) -> dict[str, torch.Tensor]:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    out = {}
    for key, value in dmp.state_dict().items():
        if "embedding_bags" in key and key.endswith(".weight"):
            table = key.split(".embedding_bags.")[1].removesuffix(".weight")
            local = value.local_shards()[0].tensor if isinstance(value, ShardedTensor) else value
            out[table] = local.detach().clone()
    return out


@pytest.mark.parametrize("setting", ["field_sparse_lr", "field_sparse_eps"])
def test_per_field_table_settings_reach_fused_and_data_parallel_tables(setting):
    # 101 and 121 get a setting that stops their steps (a tiny rate, or an epsilon that swamps every
    # gradient); 205 (fused, table-wise) and 122 (data-parallel) keep the section's settings.
    stop = 1e-12 if setting == "field_sparse_lr" else 1e12
    dmp, _, opt = build('sharding.sharding_type="table_wise"', 'sharding.table_sharding={"121" = "data_parallel", '
                        '"122" = "data_parallel"}', f'optimizer.{setting}={{"101" = {stop}, "121" = {stop}}}')
    before = _table_values(dmp)
    trajectory(dmp, opt, steps=2)
    after = _table_values(dmp)
    for table in ("t_101", "t_121"):
        torch.testing.assert_close(after[table], before[table], rtol=0, atol=1e-9)
    for table in ("t_205", "t_122"):
        assert (after[table] - before[table]).abs().max() > 1e-4, table
    groups = dict(opt.optimizers)["data_parallel_tables"].param_groups
    assert sorted((g["lr"], g["eps"]) for g in groups) == sorted(
        [(0.05, 1e-8), ((stop, 1e-8) if setting == "field_sparse_lr" else (0.05, stop))])


def test_the_planner_is_told_each_features_rows_and_ids_per_batch():
    from dist_mtl.data.reader import FeatureLoad

    cfg = load_config(None, ["model.embedding_dim=8", "model.tower_dims=[16,8]"])
    model = MultiTaskModel(cfg.model, VOCAB_SIZES, cfg.tasks)
    loads = {"101": FeatureLoad(72, 1.0), "110_14": FeatureLoad(72, 198.2), "205": FeatureLoad(4096, 1.0)}
    constraints = distributed.table_constraints(model, cfg.sharding, torch.device("cpu"), loads)
    assert constraints["t_110_14"].pooling_factors == [198.2] and constraints["t_110_14"].batch_sizes == [72]
    assert constraints["t_205"].batch_sizes == [4096]
    # A feature without a load keeps TorchRec's defaults (the job's batch size, one id per row).
    default = distributed.table_constraints(model, cfg.sharding, torch.device("cpu"))["t_110_14"]
    assert constraints["t_206"].pooling_factors == default.pooling_factors and default.batch_sizes is None
    assert constraints["t_110_14"].sharding_types == default.sharding_types  # the loads change nothing else


@pytest.mark.parametrize("device,local_world,gpus,expected", [
    ("auto", 1, 0, "cpu"), ("auto", 8, 8, "cuda"), ("auto", 1, 2, "cuda"),
    ("cpu", 8, 8, "cpu"), ("cuda", 4, 8, "cuda"),
])
def test_each_process_needs_a_gpu_of_its_own(device, local_world, gpus, expected):
    assert distributed.resolve_device(device, local_world, gpus) == expected


def test_auto_says_why_it_stays_on_the_cpu_and_cuda_says_what_is_missing():
    with pytest.warns(UserWarning, match="2 processes on this node but 1 GPU"):
        assert distributed.resolve_device("auto", 2, 1) == "cpu"
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        distributed.resolve_device("cuda", 1, 0)
    with pytest.raises(RuntimeError, match=r"2 processes on this node but 1 GPU.*--nproc_per_node=1"):
        distributed.resolve_device("cuda", 2, 1)


def test_cuda_constraints_let_the_planner_replicate_small_tables():
    """On CUDA the planner chooses among every sharding type, data_parallel included, so the dense kernel
    that data_parallel tables run must be on offer beside the fused one."""
    cfg = load_config(None, ["model.embedding_dim=8"])
    model = MultiTaskModel(cfg.model, VOCAB_SIZES, cfg.tasks, sparse_device="meta")
    constraints = distributed.table_constraints(model, cfg.sharding, torch.device("cuda"))
    assert constraints and all(c.sharding_types is None and set(c.compute_kernels) == {"fused", "dense"}
                               for c in constraints.values())
    forced = distributed.table_constraints(model, load_config(None, ['sharding.sharding_type="row_wise"']).sharding,
                                           torch.device("cuda"))
    assert all(c.sharding_types == ["row_wise"] and c.compute_kernels == ["fused"] for c in forced.values())


@pytest.mark.parametrize("device,world", [("cuda", 8), ("cpu", 2)])
def test_plan_preview_places_every_table_and_counts_its_bytes(tmp_path, device, world):
    """launch/plan.py: the plan of a cluster not at hand, from this process alone."""
    from data_helpers import write_random_dataset

    write_random_dataset(tmp_path, splits={"train": 600, "test": 200}, seed=1)
    result = PLAN_SCRIPT.main(["--world-size", str(world), "--device", device, f'data.path="{tmp_path}"',
                               "model.embedding_dim=8", "data.batch_size=64"])
    cfg = load_config(None, ["model.embedding_dim=8"])
    model = MultiTaskModel(cfg.model, DatasetMetadata.load(tmp_path).vocab_sizes, cfg.tasks, sparse_device="meta")
    tables = {t.name: t for ebc in distributed.sparse_modules(model) for t in ebc.embedding_bag_configs()}
    planned = {name: s for module_plan in result["plan"].plan.values() for name, s in module_plan.items()}
    assert set(planned) == set(tables)
    if device == "cpu":
        assert {s.sharding_type for s in planned.values()} <= set(distributed.CPU_SHARDING_TYPES)
    expected = 0
    for name, s in planned.items():
        assert s.compute_kernel == ("dense" if s.sharding_type == "data_parallel" else "fused")
        rows, dim = tables[name].num_embeddings, tables[name].embedding_dim
        replicas = world if s.sharding_type == "data_parallel" else 1
        column_shards = 1 if replicas > 1 else len({sh.shard_offsets[1] for sh in s.sharding_spec.shards})
        # row-wise Adagrad: the weights, and one state value per row of each column shard
        expected += 4 * rows * (dim + column_shards) * replicas
    assert len(result["bytes_per_rank"]) == world and sum(result["bytes_per_rank"]) == expected


def test_every_script_run_under_torchrun_leaves_through_run_as_script():
    """gloo's interpreter teardown aborts now and then after the work is done (launch/train.py,
    exit_without_teardown), which torchrun reports as a failed job; a worker script that returns normally
    fails a test about one run in five."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    scripts = [*sorted((repo / "tests" / "workers").glob("*.py")), repo / "launch" / "train.py",
               repo / "benchmarks" / "prebuilt_steps.py"]
    assert len(scripts) >= 5
    for script in scripts:
        text = script.read_text()
        main_block = text[text.index('if __name__ == "__main__":'):]
        assert "run_as_script(main)" in main_block, f"{script.relative_to(repo)} leaves without run_as_script"
