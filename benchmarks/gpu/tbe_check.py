"""One fused fbgemm TBE forward and backward, checked against plain torch: the GPU bring-up's first test.

    python benchmarks/gpu/tbe_check.py --device cuda --out /tmp/tbe.json

The kernel dist_mtl's tables run (``SplitTableBatchedEmbeddingBagsCodegen``: weighted sum pooling,
row-wise Adagrad fused into the backward, the tables in device memory) on a few tables with repeated ids
across bags. The pooled output must equal the weighted sums of the table rows, and one backward must move
every looked-up row exactly as row-wise Adagrad does (per row: G += mean(g^2); w -= lr * g / (sqrt(G) + eps),
g the row's summed gradient) and leave every other row alone. Then it times forward+backward steps of
Ali-CCP-sized tables (`schema.ALI_CCP_VOCAB_AFTER_FILTER`, batch 4096 impressions, ~1 id per item field
and ~500 per user's history row) and writes the figures. Runs on CPU too (``--device cpu``: fbgemm's host
kernels), which is how it is tested without a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dist_mtl.data.schema import ALI_CCP_FIELDS, ALI_CCP_VOCAB_AFTER_FILTER  # noqa: E402

LEARNING_RATE = 0.05
EPS = 1e-3
# Ids per row a batch brings where it is more than one: the history lists of a user row (the item side
# has one id per field and impression, a combination field a few at most).
HISTORY_IDS_PER_ROW = {"109_14": 50.0, "110_14": 200.0, "127_14": 150.0, "150_14": 100.0}


def _tbe(rows: list[int], dim: int, device: torch.device):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    on_cuda = device.type == "cuda"
    location, compute = ((EmbeddingLocation.DEVICE, ComputeDevice.CUDA) if on_cuda
                         else (EmbeddingLocation.HOST, ComputeDevice.CPU))
    return SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(r, dim, location, compute) for r in rows],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=LEARNING_RATE,
        eps=EPS,
        pooling_mode=PoolingMode.SUM,
        device=device,
    )


def _bags(rows: list[int], batch: int, ids_per_bag: list[float], gen: torch.Generator):
    """TBE's input layout: per table, per sample, a bag of ids; one offsets array over all bags."""
    indices, lengths = [], []
    for r, mean_len in zip(rows, ids_per_bag):
        n = torch.poisson(torch.full((batch,), mean_len), generator=gen).long()
        lengths.append(n)
        indices.append(torch.randint(0, r, (int(n.sum()),), generator=gen))
    lengths_all = torch.cat(lengths)
    offsets = torch.zeros(lengths_all.numel() + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths_all, 0)
    values = torch.cat(indices)
    weights = torch.rand(values.numel(), generator=gen) + 0.5
    return values, offsets, weights


def check_correctness(device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    rows, dim, batch = [50, 7, 300], 16, 64
    tbe = _tbe(rows, dim, device)
    # Few rows and several ids per bag, so that ids repeat within and across bags.
    values, offsets, weights = _bags(rows, batch, [3.0, 2.0, 5.0], gen)
    before = [w.detach().cpu().clone() for w in tbe.split_embedding_weights()]

    out = tbe(values.to(device), offsets.to(device), per_sample_weights=weights.to(device))
    upstream = torch.randn(batch, len(rows) * dim, generator=gen)
    expected = torch.zeros(batch, len(rows) * dim)
    row_grads = [torch.zeros(r, dim, dtype=torch.float64) for r in rows]
    touched = [torch.zeros(r, dtype=torch.bool) for r in rows]
    for t in range(len(rows)):
        cols = slice(t * dim, (t + 1) * dim)
        for b in range(batch):
            lo, hi = offsets[t * batch + b], offsets[t * batch + b + 1]
            ids, w = values[lo:hi], weights[lo:hi]
            expected[b, cols] = (before[t][ids] * w[:, None]).sum(0)
            row_grads[t].index_add_(0, ids, w[:, None].double() * upstream[b, cols].double())
            touched[t][ids] = True
    forward_error = float((out.detach().cpu() - expected).abs().max())

    out.backward(upstream.to(device))  # the fused optimizer updates the rows inside this backward
    after = [w.detach().cpu() for w in tbe.split_embedding_weights()]
    update_error, untouched_moved = 0.0, 0
    for t in range(len(rows)):
        g = row_grads[t]
        state = (g ** 2).mean(1)  # the accumulator started at 0
        reference = before[t].double() - LEARNING_RATE * g / (state.sqrt() + EPS)[:, None]
        update_error = max(update_error, float((after[t].double() - reference)[touched[t]].abs().max()))
        untouched_moved += int((after[t][~touched[t]] != before[t][~touched[t]]).any(1).sum())
    return {
        "forward_max_abs_error": forward_error,
        "update_max_abs_error": update_error,
        "untouched_rows_moved": untouched_moved,
        "rows_updated": int(sum(int(t.sum()) for t in touched)),
        # float32 rounding is ~1e-7 here; a wrong eps alone would be off by ~5e-5
        "ok": forward_error < 1e-5 and update_error < 1e-5 and untouched_moved == 0,
    }


def time_full_scale(device: torch.device, batch: int, steps: int, warmup: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    # The user side is pooled once per user: ~70 user rows per 4096 impressions.
    users = max(1, batch * 70 // 4096)
    inputs = []
    for side, n in (("item", batch), ("user", users)):
        fields = [f.name for f in ALI_CCP_FIELDS if f.side == side]
        rows = [ALI_CCP_VOCAB_AFTER_FILTER[name] + 1 for name in fields]  # + the reserved index 0
        v, o, w = _bags(rows, n, [HISTORY_IDS_PER_ROW.get(name, 1.0) for name in fields], gen)
        inputs.append((_tbe(rows, 16, device), v.to(device), o.to(device), w.to(device)))

    def step() -> None:
        for sub, v, o, w in inputs:
            sub(v, o, per_sample_weights=w).sum().backward()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    ids = sum(int(v.numel()) for _, v, _, _ in inputs)
    return {"batch": batch, "user_rows": users, "ids_per_step": ids, "steps": steps,
            "ms_per_step": round(1000 * seconds / steps, 3),
            "impressions_per_s": round(batch * steps / seconds)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("tbe_check: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "correctness": check_correctness(device)}
    print(json.dumps(result["correctness"]), flush=True)
    result["timing"] = time_full_scale(device, args.batch, args.steps, args.warmup)
    print(json.dumps(result["timing"]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["correctness"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
