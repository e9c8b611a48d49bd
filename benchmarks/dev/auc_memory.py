"""Time and peak RSS of one exact AUC over N rows in one process: torchmetrics vs dist_mtl.

    /usr/bin/time -v .venv/bin/python benchmarks/dev/auc_memory.py --impl torchmetrics --rows 43000000
    /usr/bin/time -v .venv/bin/python benchmarks/dev/auc_memory.py --impl dist_mtl --rows 43000000

Rows arrive in evaluation batches of 32,768 (the full-scale run's), 3.9% positives (CTR). Run each
implementation in its own process and read "Maximum resident set size" from /usr/bin/time; the script
prints the AUC and the seconds of the update and compute phases.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=("torchmetrics", "dist_mtl"), required=True)
    parser.add_argument("--rows", type=int, default=43_000_000)
    parser.add_argument("--positive-rate", type=float, default=0.039)
    parser.add_argument("--batch", type=int, default=32_768)
    args = parser.parse_args()

    if args.impl == "torchmetrics":
        from torchmetrics.classification import BinaryAUROC

        metric = BinaryAUROC(thresholds=None, validate_args=False)
        update = lambda p, y: metric.update(p, y.to(torch.uint8))  # noqa: E731
    else:
        from dist_mtl.metrics import DistributedExactAUC

        metric = DistributedExactAUC(torch.device("cpu"))
        update = lambda p, y: metric.update(p, y)  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for first in range(0, args.rows, args.batch):
        n = min(args.batch, args.rows - first)
        positive = torch.rand(n, generator=gen) < args.positive_rate
        scores = torch.sigmoid(torch.randn(n, generator=gen) + positive.float())
        update(scores, positive)
    updated = time.perf_counter()
    auc = float(metric.compute())
    done = time.perf_counter()
    print(f"{args.impl}: AUC {auc:.6f} over {args.rows:,} rows; update {updated - start:.1f} s, "
          f"compute {done - updated:.1f} s")


if __name__ == "__main__":
    main()
