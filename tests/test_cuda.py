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


def sharded_model(*overrides: str):
    """(config, context, DMP-wrapped TrainStep) of a 1-rank CUDA job with these config overrides."""
    cfg = load_config(None, ["model.embedding_dim=16", 'sharding.device="cuda"', *overrides])
    ctx = init_distributed("cuda")
    torch.manual_seed(0)
    step = TrainStep(MultiTaskModel(cfg.model, VOCAB_SIZES, cfg.tasks), MultiTaskLoss(cfg.tasks))
    dmp, _ = shard_model(step, ctx, cfg.sharding, cfg.optimizer, 256)
    init_embedding_tables(dmp, 0)
    return cfg, ctx, dmp


def pipeline_outputs(dmp, cfg, ctx, steps: int = 4) -> list:
    """(task losses, model output) of each step of TorchRec's pipeline over ``steps`` random batches."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    pipeline = TrainPipelineSparseDist(dmp, dense_optimizer(dmp, cfg.optimizer), ctx.device)
    batches = iter([random_batch(6, 64, seed=i).pin_memory() for i in range(steps)])
    outputs = []
    while True:
        try:
            outputs.append(pipeline.progress(batches))
        except StopIteration:
            return outputs


@pytest.mark.parametrize("sharding", ["row_wise", "table_row_wise", "table_wise", "data_parallel"])
def test_one_rank_pipeline_step_on_cuda(sharding):
    cfg, ctx, dmp = sharded_model("model.tower_dims=[16,8]", f'sharding.sharding_type="{sharding}"')
    flags_seen = []  # shard_model's hook must hand fbgemm's CUDA kernels device flags too
    for module in distributed.table_batched_modules(dmp):
        module.register_forward_pre_hook(
            lambda mod, args, kwargs: flags_seen.append(kwargs.get("feature_requires_grad")), with_kwargs=True)
    outputs = pipeline_outputs(dmp, cfg, ctx)
    losses = [float(task_losses["ctr"]) for task_losses, _ in outputs]
    assert all(output.predictions["ctr"].device.type == "cuda" for _, output in outputs)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert flags_seen and all(f is not None and f.is_cuda and not f.any() for f in flags_seen)


def test_pinned_batch_moves_to_cuda():
    batch = random_batch(4, 16).pin_memory()
    moved = batch.to(torch.device("cuda"), non_blocking=True)
    assert moved.user_features.values().is_cuda and moved.user_index.is_cuda
    assert moved.labels["click"].is_cuda
    torch.testing.assert_close(moved.labels["click"].cpu(), batch.labels["click"])


def test_bfloat16_heads_train_through_the_pipeline_on_cuda():
    cfg, ctx, dmp = sharded_model("model.tower_dims=[64,32]", 'model.head_precision="bfloat16"')
    outputs = pipeline_outputs(dmp, cfg, ctx)
    assert len(outputs) == 4
    for task_losses, output in outputs:
        assert all(p.dtype == torch.float32 and p.is_cuda for p in output.predictions.values())
        assert all(torch.isfinite(v).all() for v in task_losses.values())
    assert all(p.dtype == torch.float32 for p in dmp.parameters())


def test_reader_workers_hand_over_pinned_batches(tmp_path):
    """With workers, whole batches are pinned by the DataLoader's thread and the batches that straddle
    windows by make_dataloader after it assembles them: every batch must arrive pinned, CUDA initialised."""
    from data_helpers import write_random_dataset

    from dist_mtl.data.reader import ParquetGroupReader, make_dataloader

    torch.zeros(1, device="cuda")  # workers fork from a process that has initialised CUDA, as in training
    write_random_dataset(tmp_path, splits={"train": 120}, block_impressions=64, blocks_per_file=3, seed=3)
    reader = ParquetGroupReader(tmp_path, "train", 40, window_blocks=2)
    batches = list(make_dataloader(reader, num_workers=2, pin_memory=True))
    assert len(batches) == reader.steps_per_epoch()
    assert any(b.source.count("window") >= 2 for b in batches), "no batch straddles windows"
    for b in batches:
        assert b.user_features.values().is_pinned() and b.item_features.weights().is_pinned(), b.source
        assert b.user_index.is_pinned() and all(v.is_pinned() for v in b.labels.values()), b.source


def test_exact_auc_over_nccl_counts_ties_half():
    """DistributedExactAUC on CUDA tensors and the job's NCCL group (the evaluation's path on a GPU) against
    the Mann-Whitney AUC in float64 on the host, on scores with many ties."""
    import numpy as np

    from dist_mtl.metrics import DistributedExactAUC

    init_distributed("cuda")
    gen = torch.Generator().manual_seed(0)
    auc = DistributedExactAUC(torch.device("cuda"))
    all_scores, all_labels = [], []
    for _ in range(5):
        scores = torch.randint(0, 40, (3000,), generator=gen).float() / 40  # 40 distinct values: ties
        positive = torch.rand(3000, generator=gen) < 0.2 + 0.5 * scores
        auc.update(scores.cuda(), positive.cuda())
        all_scores.append(scores)
        all_labels.append(positive)
    s, y = torch.cat(all_scores).double().numpy(), torch.cat(all_labels).numpy()
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # average rank of each tie group
    p, n = y.sum(), (~y).sum()
    expected = (ranks[y].sum() - p * (p + 1) / 2) / (p * n)
    assert abs(auc.compute() - expected) < 1e-12


def test_profiled_steps_report_the_gpu_time_of_each_operator():
    """benchmarks/prebuilt_steps.py --profile-steps on CUDA: the GPU's busy time per step beside the host's."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import prebuilt_steps

    a = torch.randn(256, 256, device="cuda")
    profile = prebuilt_steps.profile_steps(lambda: {"loss": (a @ a).sum()}, 4, top=5, cuda=True)
    names = {op["name"] for op in profile["device_operators"]}
    assert profile["self_device_ms_per_step"] > 0 and any("mm" in n or "gemm" in n.lower() for n in names), names


def test_the_trainer_profiles_reports_device_memory_and_evaluates_its_checkpoint_on_cuda(tmp_path):
    """The job on CUDA with the reader: a profiled window with the GPU's operators, the device's peak memory
    in the summary, and launch/evaluate.py's path (Trainer.evaluate_checkpoint) giving the run's AUCs."""
    from data_helpers import write_random_dataset

    from dist_mtl.trainer import Trainer

    write_random_dataset(tmp_path / "data", splits={"train": 120, "test": 50}, seed=5)

    def config(run: str, *extra: str):
        return load_config(None, [f'data.path="{tmp_path / "data"}"', f'run_dir="{tmp_path / run}"',
                                  'sharding.device="cuda"', "data.batch_size=16", "data.eval_batch_size=256",
                                  "model.embedding_dim=8", "model.tower_dims=[16,8]", "train.progress_bar=false",
                                  *extra])

    summary = Trainer(config("run", "profile.steps=2", "profile.start_step=3")).train()
    profile = summary["profile"]
    assert profile["steps"] == 2 and profile["self_device_ms_per_step"] > 0 and profile["device_operators"]
    assert summary["peak_memory_mb"]["device_peak_allocated_mb"][0] > 0
    (best,) = sorted((tmp_path / "run" / "best").glob("step-*"))
    report = Trainer(config("eval", "checkpoint.resume=false")).evaluate_checkpoint(best)
    for task in ("ctr", "cvr", "ctcvr"):
        assert report["metrics"][f"{task}/auc"] == summary["metrics"][f"{task}/auc"]
