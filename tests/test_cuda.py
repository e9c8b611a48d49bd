"""The CUDA path: runs on a GPU machine, skips cleanly elsewhere (CI has no GPU)."""

import pytest
import torch
from model_helpers import VOCAB_SIZES, random_batch

from dist_mtl import distributed
from dist_mtl.config import load_config
from dist_mtl.distributed import dense_optimizer, init_distributed, init_embedding_tables, shard_model
from dist_mtl.losses import MultiTaskLoss
from dist_mtl.models import MultiTaskModel
from dist_mtl.trainer import TrainStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("sharding", ["row_wise", "table_row_wise", "table_wise"])
def test_one_rank_pipeline_step_on_cuda(sharding):
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    cfg = load_config(None, ["model.embedding_dim=16", "model.tower_dims=[16,8]", 'sharding.device="cuda"',
                             f'sharding.sharding_type="{sharding}"'])
    ctx = init_distributed("cuda")
    torch.manual_seed(0)
    step = TrainStep(MultiTaskModel(cfg.model, VOCAB_SIZES, cfg.tasks), MultiTaskLoss(cfg.tasks))
    dmp, _ = shard_model(step, ctx, cfg.sharding, cfg.optimizer, 256)
    init_embedding_tables(dmp, 0)
    flags_seen = []  # shard_model's hook must hand fbgemm's CUDA kernels device flags too
    for module in distributed.table_batched_modules(dmp):
        module.register_forward_pre_hook(
            lambda mod, args, kwargs: flags_seen.append(kwargs.get("feature_requires_grad")), with_kwargs=True)
    pipeline = TrainPipelineSparseDist(dmp, dense_optimizer(dmp, cfg.optimizer), ctx.device)
    batches = iter([random_batch(6, 64, seed=i).pin_memory() for i in range(4)])
    losses = []
    while True:
        try:
            task_losses, output = pipeline.progress(batches)
        except StopIteration:
            break
        assert output.predictions["ctr"].device.type == "cuda"
        losses.append(float(task_losses["ctr"]))
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert flags_seen and all(f is not None and f.is_cuda and not f.any() for f in flags_seen)


def test_pinned_batch_moves_to_cuda():
    batch = random_batch(4, 16).pin_memory()
    moved = batch.to(torch.device("cuda"), non_blocking=True)
    assert moved.user_features.values().is_cuda and moved.user_index.is_cuda
    assert moved.labels["click"].is_cuda
    torch.testing.assert_close(moved.labels["click"].cpu(), batch.labels["click"])
