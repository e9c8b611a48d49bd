"""Dev diagnostic (#9): test AUCs of several runs' predictions and of their mean logits.

    .venv/bin/python benchmarks/dev/ensemble_auc.py DATA PRED_A.parquet PRED_B.parquet ...

DATA is a synthetic Parquet set (its truth_test.parquet holds the labels), each PRED a launch/predict.py
output on its test split. Prints CTR (all rows), CVR (clicked rows) and CTCVR (all rows) AUC per run and for
the mean of the runs' logits: whether the model's CVR gap is seed noise that averaging would remove.
"""
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dist_mtl.data.synthetic import binary_auc  # noqa: E402


def main(data: str, paths: list[str]) -> None:
    truth = pq.read_table(Path(data) / "truth_test.parquet", columns=["sample_id", "click", "buy"])
    ids = truth["sample_id"].to_numpy()
    order = np.argsort(ids)
    logits, rows = [], None
    for path in paths:
        table = pq.read_table(path)
        at = order[np.searchsorted(ids, table["sample_id"].to_numpy(), sorter=order)]
        if rows is not None and not np.array_equal(at, rows):
            raise ValueError(f"{path}: not the rows of {paths[0]}")
        rows = at
        p = {c: table[c].to_numpy().astype(np.float64) for c in ("p_ctr", "p_cvr")}
        logits.append({c: np.log(v) - np.log1p(-v) for c, v in p.items()})
    click, buy = truth["click"].to_numpy()[rows].astype(bool), truth["buy"].to_numpy()[rows].astype(bool)

    def report(name: str, ctr: np.ndarray, cvr: np.ndarray) -> None:
        log_ctcvr = -np.log1p(np.exp(-ctr)) - np.log1p(np.exp(-cvr))
        print(f"{name}: CTR {binary_auc(click, ctr):.4f}  CVR {binary_auc(buy[click], cvr[click]):.4f}  "
              f"CTCVR {binary_auc(buy, log_ctcvr):.4f}", flush=True)

    for path, lg in zip(paths, logits):
        report(path, lg["p_ctr"], lg["p_cvr"])
    report("mean of logits", np.mean([lg["p_ctr"] for lg in logits], 0), np.mean([lg["p_cvr"] for lg in logits], 0))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
