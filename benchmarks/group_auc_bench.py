"""A model's AUC and group AUC beside the planted model's (the oracle), on a synthetic split.

    .venv/bin/python benchmarks/group_auc_bench.py --data DATA --truth TRUTH.parquet --predictions PRED.parquet \
        [--split test] [--out benchmarks/results/group_auc.json]

DATA is a Parquet dataset converted from synthetic raw files, TRUTH the generator's ``truth_<split>.parquet``
(sample ids with the planted probabilities), PRED ``launch/predict.py``'s output on that split. Both are
joined to the split's impressions by sample id and scored with the trainer's metrics
(``dist_mtl.metrics.TaskMetrics``, ESMM's tasks: CTR and CTCVR over all impressions, CVR over clicked
ones) with ``user_row`` as the group column, so the oracle's figures are computed exactly as the model's.
The oracle AUCs are checked against ``synthetic.oracle_auc`` of the truth file (the join must lose no row).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import REPO, command_line, library_versions, rows_of_ids, write_result  # noqa: E402
from dist_mtl.data.reader import ParquetGroupReader  # noqa: E402
from dist_mtl.data.schema import SAMPLE_ID_COLUMN, USER_ROW_COLUMN  # noqa: E402
from dist_mtl.data.synthetic import oracle_auc  # noqa: E402
from dist_mtl.metrics import TaskMetrics  # noqa: E402
from dist_mtl.tasks import default_esmm_tasks  # noqa: E402

TASKS = tuple(t.name for t in default_esmm_tasks())
BATCH = 65536


class ScoresBySampleId:
    """Columns of a Parquet file looked up by sample id."""

    def __init__(self, path: Path, columns: list[str]):
        table = pq.read_table(path, columns=[SAMPLE_ID_COLUMN, *columns])
        self.ids = table.column(SAMPLE_ID_COLUMN).to_numpy()
        self.order = np.argsort(self.ids)  # sorted once, searched for every batch
        self.columns = {c: table.column(c).to_numpy().astype(np.float32) for c in columns}
        self.path = path

    def take(self, sample_ids: np.ndarray) -> dict[str, np.ndarray]:
        rows, present = rows_of_ids(self.ids, sample_ids, self.order)
        if not present.all():
            raise ValueError(f"{self.path}: no row for sample id {int(sample_ids[~present][0])}")
        return {c: v[rows] for c, v in self.columns.items()}


def measure(data: Path, split: str, truth_path: Path, predictions_path: Path) -> dict:
    start = time.perf_counter()
    truth = ScoresBySampleId(truth_path, ["p_ctr", "p_cvr"])
    model = ScoresBySampleId(predictions_path, [f"p_{t}" for t in TASKS])
    reader = ParquetGroupReader(data, split, BATCH, shuffle=False, extra_columns=[SAMPLE_ID_COLUMN, USER_ROW_COLUMN])
    metrics = {"model": TaskMetrics(default_esmm_tasks(), group_column=USER_ROW_COLUMN),
               "oracle": TaskMetrics(default_esmm_tasks(), group_column=USER_ROW_COLUMN)}
    for batch in reader:
        ids = batch.labels[SAMPLE_ID_COLUMN].numpy()
        t, m = truth.take(ids), model.take(ids)
        scores = {
            "oracle": {"ctr": t["p_ctr"], "cvr": t["p_cvr"], "ctcvr": t["p_ctr"] * t["p_cvr"]},
            "model": {task: m[f"p_{task}"] for task in TASKS},
        }
        for who, tracker in metrics.items():
            tracker.update({k: torch.from_numpy(v) for k, v in scores[who].items()}, batch.labels, source=batch.source)
    results = {who: tracker.compute() for who, tracker in metrics.items()}
    check = oracle_auc(truth_path)
    for task in TASKS:
        got, want = results["oracle"][f"{task}/auc"], check[task]
        if not math.isclose(got, want, abs_tol=1e-6):
            raise AssertionError(f"{task}: the joined oracle AUC {got} differs from oracle_auc's {want}")
    return {
        "tasks": {task: {"auc": results["model"][f"{task}/auc"], "oracle_auc": results["oracle"][f"{task}/auc"],
                         "gauc": results["model"][f"{task}/gauc"], "oracle_gauc": results["oracle"][f"{task}/gauc"],
                         "gauc_groups": results["model"][f"{task}/gauc_groups"],
                         "rows": results["model"][f"{task}/count"]} for task in TASKS},
        "impressions": reader.num_impressions,
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--truth", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "group_auc.json")
    args = parser.parse_args(argv)
    payload = {"data": str(args.data), "split": args.split, **measure(args.data, args.split, args.truth,
                                                                      args.predictions)}
    print(f"{'task':<7}{'AUC':>8}{'oracle':>8}{'gap':>8}{'GAUC':>8}{'oracle':>8}{'gap':>8}{'users':>9}")
    for task, r in payload["tasks"].items():
        print(f"{task:<7}{r['auc']:>8.4f}{r['oracle_auc']:>8.4f}{r['oracle_auc'] - r['auc']:>8.4f}"
              f"{r['gauc']:>8.4f}{r['oracle_gauc']:>8.4f}{r['oracle_gauc'] - r['gauc']:>8.4f}{r['gauc_groups']:>9,}")
    print(f"{payload['impressions']:,} impressions in {payload['seconds']:.1f} s")
    command = command_line(__file__, sys.argv[1:] if argv is None else argv)
    return write_result(args.out, "group_auc", command, payload, library_versions(["torch", "torchrec", "pyarrow"]))


if __name__ == "__main__":
    main()
