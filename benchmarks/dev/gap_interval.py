"""Dev diagnostic (#9): how precisely the test split measures a model's gap to the oracle AUC.

    .venv/bin/python benchmarks/dev/gap_interval.py --data DATA --predictions PRED.parquet [--tasks cvr ctr ctcvr]

DATA is a synthetic Parquet set (its truth_test.parquet holds the labels and the planted probabilities),
PRED a ``launch/predict.py`` output on its test split. Prints, per task (CVR over clicked impressions by
default; CTR and CTCVR over all impressions with ``--tasks``), the model's AUC, the oracle's and their gap, with the gap's standard error and 95%
interval from a block bootstrap: blocks of 5,000 consecutive sample ids (a user's impressions are
consecutive, so a block holds whole users, ~86 of them), drawn with replacement. The gap is what #9's
"within 0.02 of its oracle" is about; the interval says whether a gap near 0.02 is above it or noise of a
test split with ~9,000 purchases.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dist_mtl.data.synthetic import binary_auc  # noqa: E402

BLOCK = 5000


class RankedScores:
    """Scores sorted once, so that the AUC of any row weighting (a bootstrap replicate) is one pass:
    binary_auc's Mann-Whitney statistic with weights, ties counted 1/2."""

    def __init__(self, labels: np.ndarray, scores: np.ndarray):
        order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")
        sorted_scores = np.asarray(scores, dtype=np.float64)[order]
        self.order = order
        self.positive = np.asarray(labels, dtype=bool)[order]
        # Tie group of each sorted row.
        self.group = np.concatenate([[0], np.cumsum(sorted_scores[1:] != sorted_scores[:-1])])
        self.groups = int(self.group[-1]) + 1

    def auc(self, weight: np.ndarray) -> float:
        w = weight[self.order]
        pos = np.bincount(self.group, weights=np.where(self.positive, w, 0.0), minlength=self.groups)
        neg = np.bincount(self.group, weights=np.where(self.positive, 0.0, w), minlength=self.groups)
        below = np.cumsum(neg) - neg
        return float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, required=True)
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="+", default=["cvr"], choices=["ctr", "cvr", "ctcvr"],
                        help="tasks to measure (CTR and CTCVR replicates weigh all 43M rows: ~4 s each at full scale)")
    args = parser.parse_args(argv)
    truth = pq.read_table(args.data / "truth_test.parquet")
    pred = pq.read_table(args.predictions, columns=["sample_id", "p_ctr", "p_cvr", "p_ctcvr"])
    ids = truth["sample_id"].to_numpy()
    order = np.argsort(ids)
    at = order[np.searchsorted(ids, pred["sample_id"].to_numpy(), sorter=order)]
    if not np.array_equal(ids[at], pred["sample_id"].to_numpy()):
        raise ValueError(f"{args.predictions}: sample ids that {args.data / 'truth_test.parquet'} lacks")
    click = truth["click"].to_numpy()[at].astype(bool)
    buy = truth["buy"].to_numpy()[at].astype(bool)
    oracle_ctr = truth["p_ctr"].to_numpy()[at].astype(np.float64)
    oracle_cvr = truth["p_cvr"].to_numpy()[at].astype(np.float64)
    tasks = {  # name: (rows, label, model score, oracle score)
        "ctr": (np.ones(len(at), dtype=bool), click, pred["p_ctr"].to_numpy(), oracle_ctr),
        "cvr": (click, buy, pred["p_cvr"].to_numpy(), oracle_cvr),
        "ctcvr": (np.ones(len(at), dtype=bool), buy, pred["p_ctcvr"].to_numpy(), oracle_ctr * oracle_cvr),
    }
    block = pred["sample_id"].to_numpy() // BLOCK
    _, block = np.unique(block, return_inverse=True)
    n_blocks = int(block.max()) + 1
    rng = np.random.default_rng(args.seed)
    draws = [np.bincount(rng.integers(0, n_blocks, n_blocks), minlength=n_blocks) for _ in range(args.replicates)]
    result = {}
    for name, (rows, label, model, oracle) in tasks.items():
        if name not in args.tasks:
            continue
        y, b = label[rows], block[rows]
        auc, oracle_auc = binary_auc(y, model[rows]), binary_auc(y, oracle[rows])
        gap = oracle_auc - auc
        ranked = [RankedScores(y, oracle[rows]), RankedScores(y, model[rows])]
        gaps = []
        for counts in draws:
            weight = counts[b].astype(np.float64)  # each row as often as its block was drawn
            gaps.append(ranked[0].auc(weight) - ranked[1].auc(weight))
        gaps = np.array(gaps)
        result[name] = {"auc": auc, "oracle_auc": oracle_auc, "gap": gap,
                        "gap_se": float(gaps.std(ddof=1)),
                        "gap_95": [float(np.quantile(gaps, 0.025)), float(np.quantile(gaps, 0.975))]}
        r = result[name]
        print(f"{name}: AUC {r['auc']:.4f}, oracle {r['oracle_auc']:.4f}, gap {gap:.4f} (standard error "
              f"{r['gap_se']:.4f}; 95% {r['gap_95'][0]:.4f} .. {r['gap_95'][1]:.4f}; {args.replicates} block "
              f"bootstrap replicates)", flush=True)
    return result


if __name__ == "__main__":
    main()
