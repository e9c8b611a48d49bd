"""Per-impression scores as Parquet: what ``launch/predict.py`` writes in one process and
``launch/evaluate.py --predictions`` writes on every rank, in one layout.

Columns: ``index`` (int64, the impression's position in its split's storage order, which the reader makes:
``schema.IMPRESSION_ROW_COLUMN``), ``sample_id`` (int64, from the dataset) and ``p_<task>`` (float32) per
task. A file is written under a temporary name and renamed when complete, so a file under its own name is
never a partial one. Several ranks' files together hold each impression of the split once; ``index``
orders them as the split is stored (``pyarrow.parquet.read_table(folder).sort_by("index")``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dist_mtl.data.schema import IMPRESSION_ROW_COLUMN, SAMPLE_ID_COLUMN

INDEX_COLUMN = "index"
#: The label columns a reader must give for a PredictionWriter's batches.
PREDICTION_ID_COLUMNS = (SAMPLE_ID_COLUMN, IMPRESSION_ROW_COLUMN)
#: Where ``Trainer.evaluate_checkpoint`` puts each rank's file, under its run directory.
PREDICTIONS_DIR = "predictions"
RANK_FILE_GLOB = "rank-*.parquet"


def prediction_columns(task_names: Sequence[str]) -> list[str]:
    return [f"p_{name}" for name in task_names]


def rank_file_name(rank: int) -> str:
    return f"rank-{rank:05d}.parquet"


class PredictionWriter:
    """Streams one reader's batches of scores into one Parquet file (a context manager: the file appears
    under ``path`` on a clean exit only)."""

    def __init__(self, path: str | os.PathLike, task_names: Sequence[str]):
        self.path = Path(path)
        self.task_names = list(task_names)
        self.columns = [INDEX_COLUMN, SAMPLE_ID_COLUMN, *prediction_columns(self.task_names)]
        self.schema = pa.schema([pa.field(INDEX_COLUMN, pa.int64()), pa.field(SAMPLE_ID_COLUMN, pa.int64())]
                                + [pa.field(c, pa.float32()) for c in prediction_columns(self.task_names)])
        self.rows = 0
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> "PredictionWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(self._tmp, self.schema)
        return self

    def write(self, labels: Mapping[str, torch.Tensor], predictions: Mapping[str, torch.Tensor]) -> None:
        """One batch: ``labels`` as the reader gave them (with ``PREDICTION_ID_COLUMNS``), ``predictions``
        by task name, one score per impression of the batch, on any device."""
        missing = [c for c in PREDICTION_ID_COLUMNS if c not in labels]
        if missing:
            raise ValueError(f"the batch lacks {missing}: read it with extra_columns {list(PREDICTION_ID_COLUMNS)}")
        arrays = [pa.array(labels[IMPRESSION_ROW_COLUMN].cpu().numpy()),
                  pa.array(labels[SAMPLE_ID_COLUMN].cpu().numpy())]
        arrays += [pa.array(predictions[t].detach().float().cpu().numpy()) for t in self.task_names]
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))
        self.rows += len(arrays[0])

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._writer.close()
            if exc_type is None:
                os.replace(self._tmp, self.path)
        finally:
            if self._tmp.exists():
                self._tmp.unlink()
