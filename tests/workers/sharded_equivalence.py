"""torchrun worker: train a few steps on fixed batches and write the global loss trajectory.

World size 1 trains on whole batches; world size 2 on their two halves (split at an impression, so a
user straddling the cut is in both halves and the two ranks hold different numbers of users). With
equal halves, the mean of the rank losses equals the whole-batch loss, and DDP's averaged dense
gradients equal the whole-batch ones; so do the table gradients (TorchRec's sharded backward divides
them by the world size, as DDP's average does: one SGD step moves every table identically on 1 and on 2
ranks). So both world sizes must follow the same trajectory, whatever the table optimizer.

With ``direct_cvr`` the CVR tower is also trained on purchases over clicked rows (a task over masked
rows): the halves hold different numbers of clicks, and the trajectories agree only because the loss
divides by the click count over both ranks.

usage: sharded_equivalence.py OUT.json SHARDING_TYPE grouped|expanded STEPS SPARSE_OPTIMIZER [direct_cvr]
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))

from model_helpers import VOCAB_SIZES, random_batch  # noqa: E402

from train import run_as_script  # noqa: E402  (launch/train.py)
from dist_mtl.config import load_config  # noqa: E402
from dist_mtl.data.batch import GroupedBatch, gather_kjt_rows  # noqa: E402
from dist_mtl.distributed import dense_optimizer, init_distributed, init_embedding_tables, shard_model  # noqa: E402
from dist_mtl.losses import MultiTaskLoss  # noqa: E402
from dist_mtl.models import MultiTaskModel  # noqa: E402
from dist_mtl.trainer import TrainStep  # noqa: E402


def impression_slice(batch: GroupedBatch, start: int, end: int) -> GroupedBatch:
    u_lo, u_hi = int(batch.user_index[start]), int(batch.user_index[end - 1]) + 1
    return GroupedBatch(
        user_features=gather_kjt_rows(batch.user_features, torch.arange(u_lo, u_hi)),
        item_features=gather_kjt_rows(batch.item_features, torch.arange(start, end)),
        user_index=batch.user_index[start:end] - u_lo,
        labels={k: v[start:end] for k, v in batch.labels.items()},
    )


def main() -> None:
    out, sharding_type, path, steps, sparse = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    direct_cvr = sys.argv[6:] == ["direct_cvr"]
    ctx = init_distributed("cpu")
    # column_wise splits a table into shards of at least 128 columns: one wide table makes it really
    # split (at dim 8 every "column_wise" table is a single shard, as table_wise).
    wide = ['model.field_dims={"205" = 256}']
    cfg = load_config(None, ["model.embedding_dim=8", "model.tower_dims=[16,8]",
                             f'sharding.sharding_type="{sharding_type}"', "optimizer.sparse_lr=0.1",
                             "optimizer.dense_lr=0.01", f'optimizer.sparse="{sparse}"', *wide,
                             *(['tasks=[{name="ctr", label="click"}, {name="cvr", label="buy", rows="click"}, '
                                '{name="ctcvr", label="buy"}]'] if direct_cvr else [])])
    torch.manual_seed(0)
    step = TrainStep(MultiTaskModel(cfg.model, VOCAB_SIZES, cfg.tasks), MultiTaskLoss(cfg.tasks),
                     expand_users=path == "expanded")
    dmp, _ = shard_model(step, ctx, cfg.sharding, cfg.optimizer, 64)
    init_embedding_tables(dmp, 0)
    opt = dense_optimizer(dmp, cfg.optimizer)
    half = 32
    trajectory, user_counts, click_counts = [], [], []
    for k in range(steps):
        full = random_batch(num_users=5 + k % 4, num_impressions=2 * half, seed=100 + k)
        batch = full if ctx.world_size == 1 else impression_slice(
            full, ctx.rank * half, (ctx.rank + 1) * half)
        batch.validate()
        user_counts.append(batch.num_users)
        click_counts.append(int(batch.labels["click"].sum()))
        loss, _ = dmp(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        trajectory.append(float(global_loss) / ctx.world_size)
    # The first batch again after training: its loss must have fallen (a check that does not depend
    # on how hard the later random batches happen to be).
    full = random_batch(num_users=5, num_impressions=2 * half, seed=100)
    batch = full if ctx.world_size == 1 else impression_slice(full, ctx.rank * half, (ctx.rank + 1) * half)
    with torch.no_grad():
        first_again, _ = dmp(batch)
    first_again = first_again.detach().clone()
    dist.all_reduce(first_again)
    counts, clicks = [None] * ctx.world_size, [None] * ctx.world_size
    dist.all_gather_object(counts, user_counts)
    dist.all_gather_object(clicks, click_counts)
    if ctx.rank == 0:
        Path(out).write_text(json.dumps({"losses": trajectory, "user_counts": counts, "click_counts": clicks,
                                         "first_batch_after": float(first_again) / ctx.world_size}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    # Leaves like launch/train.py, past the gloo teardown abort its exit_without_teardown describes.
    run_as_script(main)
