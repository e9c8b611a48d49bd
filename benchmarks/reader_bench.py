"""Reader throughput: impressions/s into ready GroupedBatches, next to plain pyarrow iter_batches.

Writes a synthetic dataset per case (tests/data_helpers.write_random_dataset), then times one epoch of
``ParquetGroupReader`` through ``make_dataloader`` for each worker count, and a plain
``ParquetFile.iter_batches`` pass over the same files and columns. Cases:

- flat: no multi-valued content (empty history and combination lists), ~58 impressions per user;
- multi: ~500 history ids per user (4 fields x ~125), ~58 impressions per user, 1-4 ids per
  combination field per impression (Ali-CCP-like).

    .venv/bin/python benchmarks/reader_bench.py            # writes benchmarks/results/reader.json

With ``--dataset PATH`` it times an existing dataset instead (no synthetic cases, no pyarrow pass): one
rank's share of a split (``--rank``, ``--world-size``), its first ``--batches`` batches, for each worker
count, with the summed RSS of the process and its workers. The workers' split of the windows shows on a
dataset of many windows, such as the full-scale set:

    .venv/bin/python benchmarks/reader_bench.py --dataset data_out/full_scale/parquet --world-size 2 \
        --batches 1200 --workers 0 1 2 --repeats 2 --out benchmarks/results/reader_full_scale.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the dataset writer shared with the tests

from common import TreeRssSampler, command_line, library_versions, write_result  # noqa: E402
from data_helpers import write_random_dataset  # noqa: E402

from dist_mtl.data import schema  # noqa: E402
from dist_mtl.data.reader import ParquetGroupReader, make_dataloader  # noqa: E402

CASES = {
    "flat": {"history_len": (0, 0), "combination_len": (0, 0)},
    "multi": {"history_len": (100, 150), "combination_len": (1, 4)},
}
IMPRESSIONS_PER_USER = (1, 115)  # mean 58, as in Ali-CCP


def _reader_pass(root: Path, batch_size: int, num_workers: int, validate: bool, split: str = "train",
                 rank: int = 0, world_size: int = 1, max_batches: int = 0) -> dict:
    """One pass of ``make_dataloader`` over the rank's batches (the first ``max_batches`` if > 0)."""
    reader = ParquetGroupReader(root, split, batch_size, rank=rank, world_size=world_size, validate=validate)
    sampler = TreeRssSampler(os.getpid(), interval_s=0.1)
    start = time.perf_counter()
    impressions = users = batches = 0
    for batch in make_dataloader(reader, num_workers=num_workers):
        impressions += batch.num_impressions
        users += batch.num_users
        batches += 1
        if batches == max_batches:
            break
    seconds = time.perf_counter() - start
    return {"num_workers": num_workers, "validate": validate, "seconds": round(seconds, 3),
            "impressions": impressions, "batches": batches, "mean_users_per_batch": round(users / batches, 1),
            "impressions_per_s": round(impressions / seconds), "peak_tree_rss_mb": sampler.stop()}


def _columns(fields) -> list[str]:
    return [c for f in fields for c in ((f.name, f.weight_column) if f.multi_valued else (f.name,))]


def _pyarrow_pass(root: Path) -> dict:
    """iter_batches over the users and impressions files, reading the columns the reader reads."""
    meta = schema.DatasetMetadata.load(root)
    user_columns = _columns(schema.USER_FIELDS)
    impression_columns = [schema.USER_COLUMN, *schema.LABEL_COLUMNS, *_columns(schema.ITEM_FIELDS)]
    start = time.perf_counter()
    impression_rows = user_rows = 0
    for part in meta.split("train").parts:
        for batch in pq.ParquetFile(root / part.users).iter_batches(batch_size=65536, columns=user_columns):
            user_rows += batch.num_rows
        for batch in pq.ParquetFile(root / part.impressions).iter_batches(
                batch_size=65536, columns=impression_columns):
            impression_rows += batch.num_rows
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 3), "impression_rows": impression_rows, "user_rows": user_rows,
            "rows_per_s": round((impression_rows + user_rows) / seconds),
            "impression_rows_per_s": round(impression_rows / seconds)}


def _best(runs: list[dict], key: str) -> dict:
    return max(runs, key=lambda r: r[key])


def run_case(name: str, root: Path, impressions: int, batch_size: int, workers: list[int], repeats: int) -> dict:
    users = max(1, round(impressions / (sum(IMPRESSIONS_PER_USER) / 2)))
    start = time.perf_counter()
    meta = write_random_dataset(root, splits={"train": users}, impressions_per_user=IMPRESSIONS_PER_USER,
                                block_impressions=65536, blocks_per_file=16, seed=0, **CASES[name])
    write_seconds = time.perf_counter() - start
    split = meta.split("train")
    disk_bytes = sum((root / rel).stat().st_size for p in split.parts for rel in (p.users, p.impressions))
    result = {
        "dataset": {"impressions": split.num_impressions, "users": split.num_users, "blocks": split.num_blocks,
                    "bytes_on_disk": disk_bytes, "write_seconds": round(write_seconds, 1), **CASES[name]},
        "pyarrow": _best([_pyarrow_pass(root) for _ in range(repeats)], "rows_per_s"),
        "reader": [
            _best([_reader_pass(root, batch_size, w, validate=True) for _ in range(repeats)], "impressions_per_s")
            for w in workers
        ],
    }
    result["reader_validate_off"] = _best(
        [_reader_pass(root, batch_size, 0, validate=False) for _ in range(repeats)], "impressions_per_s")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flat-impressions", type=int, default=3_000_000)
    parser.add_argument("--multi-impressions", type=int, default=1_500_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=2, help="passes per measurement; the best is kept")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where to write the datasets (default: a temporary directory, removed after)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/reader.json, with --dataset reader_dataset.json")
    parser.add_argument("--dataset", type=Path, default=None,
                        help="time this existing dataset instead of the synthetic cases (see the docstring)")
    parser.add_argument("--split", default="train", help="with --dataset: the split to read")
    parser.add_argument("--rank", type=int, default=0, help="with --dataset: the rank whose share is read")
    parser.add_argument("--world-size", type=int, default=1, help="with --dataset: ranks the split is cut for")
    parser.add_argument("--batches", type=int, default=0,
                        help="with --dataset: batches per pass (0: all of the rank's batches)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = REPO / "benchmarks/results" / ("reader.json" if args.dataset is None else "reader_dataset.json")
    command = command_line(__file__, argv if argv is not None else sys.argv[1:])
    versions = library_versions(["torch", "torchrec", "pyarrow"])

    load_before = os.getloadavg()
    if args.dataset is not None:
        passes = {w: [] for w in args.workers}
        for _ in range(args.repeats):  # worker counts alternate, so drift on a shared machine hits all alike
            for w in args.workers:
                passes[w].append(_reader_pass(args.dataset, args.batch_size, w, True, args.split, args.rank,
                                              args.world_size, args.batches))
        payload = {
            "dataset": str(args.dataset), "split": args.split, "rank": args.rank, "world_size": args.world_size,
            "batch_size": args.batch_size,
            "reader": [_best(runs, "impressions_per_s") for runs in passes.values()],
            "passes": [r for runs in passes.values() for r in runs],
            "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        }
        return write_result(args.out, "reader_dataset", command, payload, versions)
    with tempfile.TemporaryDirectory(prefix="reader_bench_") as tmp:
        base = args.data_dir or Path(tmp)
        cases = {
            name: run_case(name, base / name, impressions, args.batch_size, args.workers, args.repeats)
            for name, impressions in (("flat", args.flat_impressions), ("multi", args.multi_impressions))
        }
    flat = cases["flat"]
    payload = {
        "batch_size": args.batch_size,
        # Headline figures: the flat case, one process (0 DataLoader workers), validation on.
        "reader_impressions_per_s": flat["reader"][0]["impressions_per_s"],
        "pyarrow_rows_per_s": flat["pyarrow"]["rows_per_s"],
        "cases": cases,
        # The test machine's 2 cores are shared: the 1-minute load average says how contended it was.
        "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    return write_result(args.out, "reader", command, payload, versions)


if __name__ == "__main__":
    summary = main()
    for r in summary.get("reader", []):  # --dataset
        print(f"{r['num_workers']} workers: {r['impressions_per_s']:,} impressions/s, "
              f"peak RSS (process and workers) {r['peak_tree_rss_mb']:,} MB")
    for case, figures in summary.get("cases", {}).items():
        readers = ", ".join(f"{r['num_workers']} workers {r['impressions_per_s']:,}/s" for r in figures["reader"])
        print(f"{case}: reader {readers}; validate off {figures['reader_validate_off']['impressions_per_s']:,}/s; "
              f"pyarrow iter_batches {figures['pyarrow']['rows_per_s']:,} rows/s")
