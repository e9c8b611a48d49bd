"""torch-rechub 0.9.0 baseline: ESMM or MMOE trained exactly as its Ali-CCP multi-task tutorial does.

Runs in benchmarks/.venv-rechub (``bash benchmarks/rechub_env.sh``), never in the project venv:

    benchmarks/.venv-rechub/bin/python benchmarks/rechub_baseline.py --data-dir DIR --model ESMM \
        --batch-size 4096 --out-dir OUT

The recipe is torch-rechub's ``examples/ranking/run_ali_ccp_multi_task.py`` (the tutorial the users start
from): the three CSVs concatenated in pandas, vocabularies from ``max() + 1`` over all of them, the
tutorial's features and model sizes, ``DataGenerator`` data loaders, ``MTLTrainer`` with Adam (lr 1e-3,
weight decay 1e-4) and seed 2022; only the batch size comes from the command line.

Times one training epoch (``MTLTrainer.train_one_epoch``, the method ``fit`` calls per epoch, so the
DataLoader is included and loading the CSVs into pandas is not), then predicts the val and test files
with ``MTLTrainer.predict`` and writes predictions and labels as ``.npy`` beside a JSON of timings. The
val and test files are the two halves of the generated test split, so together they are the rows the
dist_mtl side is evaluated on. AUCs are computed by the caller (train_cpu_bench.py), the same way as
dist_mtl's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from torch_rechub.basic.features import DenseFeature, SparseFeature
from torch_rechub.models.multi_task import ESMM, MMOE
from torch_rechub.trainers import MTLTrainer
from torch_rechub.utils.data import DataGenerator, PredictDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, library_versions, write_result  # noqa: E402

SPLITS = ("train", "val", "test")
DENSE_COLUMNS = ["D109_14", "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853"]
SPARSE_COLUMNS = ["101", "121", "122", "124", "125", "126", "127", "128", "129", "205", "206", "207", "210",
                  "216", "508", "509", "702", "853", "301", "109_14", "110_14", "127_14", "150_14"]
# The tutorial's user/item split for ESMM ("assumption features split for user and item").
ESMM_ITEM_COLUMNS = ["129", "205", "206", "207", "210", "216"]
LEARNING_RATE, WEIGHT_DECAY, SEED = 1e-3, 1e-4, 2022
MODELS = ("ESMM", "MMOE")
# The task each prediction column is, in dist_mtl's terms. The tutorial's label order is fixed:
# ESMM outputs (pCVR, pCTR, pCTCVR); MMOE is trained on (purchase, click) over all impressions, and a
# purchase is click-and-buy, so its first output is a pCTCVR.
TASKS_OF_COLUMNS = {"ESMM": ["cvr", "ctr", "ctcvr"], "MMOE": ["ctcvr", "ctr"]}


def csv_path(data_dir: Path, split: str) -> Path:
    return data_dir / f"ali_ccp_{split}.csv"


def load_split(path: Path) -> pd.DataFrame:
    """One CSV of the torch-rechub layout, checked for its columns and numeric values."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (write it with dist_mtl.data.synthetic.write_rechub_csv)")
    df = pd.read_csv(path)
    expected = ["click", "purchase", *SPARSE_COLUMNS, *DENSE_COLUMNS]
    missing = [c for c in expected if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (header has {list(df.columns)})")
    for column in expected:
        if not pd.api.types.is_numeric_dtype(df[column]):
            bad = pd.to_numeric(df[column], errors="coerce").isna() & df[column].notna()
            row = int(np.flatnonzero(bad.to_numpy())[0]) if bad.any() else 0
            raise ValueError(f"{path}: line {row + 2}, column {column!r}: {df[column].iloc[row]!r} is not a number")
        if df[column].isna().any():
            row = int(np.flatnonzero(df[column].isna().to_numpy())[0])
            raise ValueError(f"{path}: line {row + 2}, column {column!r}: empty value")
    return df


def tutorial_model(model_name: str, data: pd.DataFrame) -> tuple[torch.nn.Module, list[str], list[str], list[str]]:
    """(model, task types, input columns, label columns) as the tutorial's get_ali_ccp_data_dict and main."""
    if model_name == "ESMM":
        # ESMM uses the sparse features only, as in the paper; embeddings 16, towers [16, 8].
        user_cols = [c for c in SPARSE_COLUMNS if c not in ESMM_ITEM_COLUMNS]
        user_features = [SparseFeature(c, data[c].max() + 1, embed_dim=16) for c in user_cols]
        item_features = [SparseFeature(c, data[c].max() + 1, embed_dim=16) for c in ESMM_ITEM_COLUMNS]
        model = ESMM(user_features, item_features, cvr_params={"dims": [16, 8]}, ctr_params={"dims": [16, 8]})
        return model, ["classification"] * 3, list(SPARSE_COLUMNS), ["cvr_label", "ctr_label", "ctcvr_label"]
    if model_name == "MMOE":
        # Sparse embeddings 4 plus the 8 dense columns; 8 experts [16], towers [8].
        features = [SparseFeature(c, data[c].max() + 1, embed_dim=4) for c in SPARSE_COLUMNS]
        features += [DenseFeature(c) for c in DENSE_COLUMNS]
        task_types = ["classification", "classification"]
        model = MMOE(features, task_types, 8, expert_params={"dims": [16]},
                     tower_params_list=[{"dims": [8]}, {"dims": [8]}])
        return model, task_types, SPARSE_COLUMNS + DENSE_COLUMNS, ["cvr_label", "ctr_label"]
    raise ValueError(f"unknown model {model_name!r} (expected one of {MODELS})")


def _predict(trainer: MTLTrainer, x: dict[str, np.ndarray], batch_size: int) -> tuple[np.ndarray, float]:
    loader = DataLoader(PredictDataset(x), batch_size=batch_size, shuffle=False)
    start = time.perf_counter()
    predictions = np.asarray(trainer.predict(trainer.model, loader), dtype=np.float32)
    return predictions, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="directory with ali_ccp_{train,val,test}.csv")
    parser.add_argument("--model", required=True, choices=MODELS)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--out-dir", required=True, help="where predictions, labels and the JSON go")
    args = parser.parse_args(argv)
    if args.batch_size <= 0:
        parser.error(f"--batch-size must be > 0, got {args.batch_size}")
    data_dir, out_dir = Path(args.data_dir), Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)

    start = time.perf_counter()
    frames = {split: load_split(csv_path(data_dir, split)) for split in SPLITS}
    rows = {split: len(df) for split, df in frames.items()}
    if rows["train"] % args.batch_size == 1:
        # The tutorial's towers hold BatchNorm1d, which raises on a last training batch of one row.
        raise ValueError(f"{csv_path(data_dir, 'train')}: {rows['train']} rows leave a last batch of 1 at batch "
                         f"size {args.batch_size}, which torch-rechub's BatchNorm towers cannot train on; "
                         f"choose another batch size")
    data = pd.concat([frames[s] for s in SPLITS], axis=0)
    data.rename(columns={"purchase": "cvr_label", "click": "ctr_label"}, inplace=True)
    data["ctcvr_label"] = data["cvr_label"] * data["ctr_label"]
    model, task_types, input_cols, label_cols = tutorial_model(args.model, data)
    bounds = {"train": (0, rows["train"]), "val": (rows["train"], rows["train"] + rows["val"]),
              "test": (rows["train"] + rows["val"], len(data))}
    # Contiguous copies: pandas 3 hands out views that torch's default collate refuses (negative strides).
    x = {s: {c: np.ascontiguousarray(data[c].values[lo:hi]) for c in input_cols} for s, (lo, hi) in bounds.items()}
    y = {s: np.ascontiguousarray(data[label_cols].values[lo:hi]) for s, (lo, hi) in bounds.items()}
    train_loader, _, _ = DataGenerator(x["train"], y["train"]).generate_dataloader(
        x_val=x["val"], y_val=y["val"], x_test=x["test"], y_test=y["test"], batch_size=args.batch_size)
    trainer = MTLTrainer(model, task_types=task_types,
                         optimizer_params={"lr": LEARNING_RATE, "weight_decay": WEIGHT_DECAY},
                         n_epoch=1, earlystop_patience=30, device="cpu", model_path=str(out_dir))
    load_seconds = time.perf_counter() - start

    start = time.perf_counter()
    train_losses = trainer.train_one_epoch(train_loader)
    epoch_seconds = time.perf_counter() - start

    outputs, predict_seconds = {}, {}
    name = args.model.lower()
    for split in ("val", "test"):
        predictions, predict_seconds[split] = _predict(trainer, x[split], args.batch_size)
        labels = frames[split][["click", "purchase"]].to_numpy(dtype=np.int8)
        files = {"predictions": out_dir / f"rechub_{name}_{split}_predictions.npy",
                 "labels": out_dir / f"rechub_{name}_{split}_labels.npy"}
        np.save(files["predictions"], predictions)
        np.save(files["labels"], labels)
        outputs[split] = {k: str(v) for k, v in files.items()}

    payload = {
        "model": args.model,
        "batch_size": args.batch_size,
        "rows": rows,
        "num_parameters": sum(p.numel() for p in trainer.model.parameters()),
        "torch_threads": torch.get_num_threads(),
        "load_seconds": load_seconds,
        "epoch_seconds": epoch_seconds,
        "train_samples_per_s": rows["train"] / epoch_seconds,
        "train_losses": [float(v) for v in train_losses],
        "predict_seconds": predict_seconds,
        "prediction_columns": label_cols,
        "prediction_tasks": TASKS_OF_COLUMNS[args.model],
        "label_columns": ["click", "purchase"],
        "outputs": outputs,
    }
    record = write_result(
        out_dir / f"rechub_{name}.json", f"rechub_{name}",
        command_line(__file__, sys.argv[1:] if argv is None else argv),
        payload, library_versions(["torch", "torch-rechub", "pandas", "numpy"]),
    )
    print(f"torch-rechub {args.model}: {rows['train']:,} rows in {epoch_seconds:.1f}s = "
          f"{payload['train_samples_per_s']:,.0f} samples/s (batch {args.batch_size})", flush=True)
    return record


if __name__ == "__main__":
    main()
