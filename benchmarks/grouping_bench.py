"""User groups vs copied user rows: ESMM training samples/s, reader included, in one run.

    .venv/bin/python benchmarks/grouping_bench.py                       # the recorded figures
    .venv/bin/python benchmarks/grouping_bench.py --train-impressions 200000 --steps 20 --repeats 1   # a quick look
    .venv/bin/python benchmarks/grouping_bench.py --towers paper --head-precision bfloat16 \
        --out benchmarks/results/grouping_bfloat16.json        # the heads in bfloat16 (model.head_precision)

For each tower size ([16, 8] and the paper's 360x200x80) and world size (1 and 2 ranks) it trains the
same ESMM on the same synthetic data (realistic histories: ~500 ids per user, ~58 impressions per user)
and batch size three ways through ``launch/train.py``: grouped (users pooled once per user), expanded
(``data.grouped=false``: user rows copied onto impressions before pooling), and grouped on the same
generator with the smallest history it makes, one id per history list (4 ids per user instead of ~500):
the ceiling, what the model costs when users carry next to nothing. Throughput is the
job's own ``train_samples_per_s`` (step time including the reader, excluding evaluation), the median of
``--repeats`` interleaved runs of ``--steps`` steps each (start-up of the first window and the first
steps is inside every run's time: at 120 steps it moved the figures by 10-25% from run to run). It also
measures input bytes per impression both ways on real reader batches. Writes
``benchmarks/results/grouping.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from common import REPO, command_line, library_versions, run_logged, torchrun_command, write_result  # noqa: E402
from dist_mtl.data.batch import GroupedBatch  # noqa: E402
from dist_mtl.data.reader import ParquetGroupReader  # noqa: E402
from dist_mtl.data.schema import METADATA_FILE  # noqa: E402
from dist_mtl.data.synthetic import SyntheticConfig, dataset_fingerprint, write_parquet_direct  # noqa: E402

TOWERS = {"small": [16, 8], "paper": [360, 200, 80]}
MIN_HISTORY = 4.0  # the generator's floor: one id in each of the four history lists


def ensure_dataset(root: Path, cfg: SyntheticConfig) -> Path:
    record = root / "synthetic.json"
    wanted = json.dumps(dataset_fingerprint(cfg), sort_keys=True)
    if not ((root / METADATA_FILE).exists() and record.exists() and record.read_text() == wanted):
        print(f"writing {root} ({cfg.train_impressions:,} train impressions)", flush=True)
        write_parquet_direct(root, cfg)
        record.write_text(wanted)
    return root


def batch_bytes(batch: GroupedBatch) -> int:
    total = batch.user_index.numel() * batch.user_index.element_size()
    for kjt in (batch.user_features, batch.item_features):
        for t in (kjt.values(), kjt.lengths(), kjt.weights()):
            total += t.numel() * t.element_size()
    return total + sum(t.numel() * t.element_size() for t in batch.labels.values())


def bytes_per_impression(data: Path, batch_size: int, batches: int = 20) -> dict[str, float]:
    reader = ParquetGroupReader(data, "train", batch_size, shuffle=True)
    grouped = expanded = impressions = users = 0
    for i, batch in enumerate(reader):
        if i == batches:
            break
        grouped += batch_bytes(batch)
        expanded += batch_bytes(batch.expanded())
        impressions += batch.num_impressions
        users += batch.num_users
    return {"grouped": grouped / impressions, "expanded": expanded / impressions,
            "users_per_batch": users / min(batches, i + 1)}


def train(data: Path, run_dir: Path, nproc: int, towers: list[int], grouped: bool, args) -> dict:
    # A fresh run directory: the job resumes from checkpoints it finds, which would fold an earlier
    # (interrupted) run's time and samples into this measurement.
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = torchrun_command(REPO / "launch" / "train.py", nproc, [
        "--config", str(REPO / "configs" / "synthetic_cpu.toml"), f'data.path="{data}"', f'run_dir="{run_dir}"',
        f"data.batch_size={args.batch_size}", f"data.grouped={'true' if grouped else 'false'}",
        "model.embedding_dim=16", f"model.tower_dims={towers}", f'model.head_precision="{args.head_precision}"',
        "train.epochs=1", f"train.max_steps={args.steps}", "train.progress_bar=false",
        f"train.log_every_steps={max(args.steps // 4, 1)}"])
    measured = run_logged(cmd, run_dir / "log.txt", f"training {run_dir.name}", cwd=REPO)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"samples_per_s": summary["train_samples_per_s"], "steps": summary["steps"],
            "samples": summary["samples_trained"], "peak_rss_mb_largest_process": measured.peak_rss_mb,
            "peak_rss_all_processes_mb": measured.peak_rss_all_mb}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=str(REPO / "data_out" / "bench" / "grouping"))
    parser.add_argument("--train-impressions", type=int, default=2_000_000)
    parser.add_argument("--history-ids-per-user", type=float, default=500.0)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=400,
                        help="training steps per measurement (at most one epoch: 489 steps on 1 rank, 245 on 2)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each variant, interleaved; the figure is their median")
    parser.add_argument("--nproc", default="1,2", help="world sizes to measure")
    parser.add_argument("--towers", default="small,paper", help=f"tower sizes among {sorted(TOWERS)}")
    parser.add_argument("--head-precision", choices=("float32", "bfloat16"), default="float32",
                        help="model.head_precision of every variant")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "grouping.json"))
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        parser.error(f"--steps and --repeats must be >= 1, got {args.steps} and {args.repeats}")

    work = Path(args.work_dir)
    base = SyntheticConfig(train_impressions=args.train_impressions, test_impressions=20_000,
                           history_ids_per_user=args.history_ids_per_user, seed=0)
    with_history = ensure_dataset(work / "history", base)
    no_history = ensure_dataset(work / "no_history", dataclasses.replace(base, history_ids_per_user=MIN_HISTORY))
    torch.set_num_threads(1)
    sizes = bytes_per_impression(with_history, args.batch_size)
    print(f"input bytes per impression: grouped {sizes['grouped']:.0f}, expanded {sizes['expanded']:.0f} "
          f"({sizes['users_per_batch']:.0f} users per batch of {args.batch_size})", flush=True)

    # label -> (dataset, grouped)
    variants = {"grouped": (with_history, True), "expanded": (with_history, False), "no_history": (no_history, True)}
    entries = []
    for tower_name in args.towers.split(","):
        towers = TOWERS[tower_name]
        for nproc in (int(n) for n in args.nproc.split(",")):
            runs: dict[str, list[dict]] = {label: [] for label in variants}
            # Interleaved repeats, so that a slow spell of the machine hits every variant alike.
            for repeat in range(args.repeats):
                for label, (data, grouped) in variants.items():
                    run = train(data, work / "runs" / f"{tower_name}-{nproc}-{label}-{repeat}", nproc, towers,
                                grouped, args)
                    runs[label].append(run)
                    print(f"towers {towers} ranks {nproc} {label} (run {repeat + 1}/{args.repeats}): "
                          f"{run['samples_per_s']:,.0f} samples/s", flush=True)
            rate = {label: statistics.median(r["samples_per_s"] for r in runs[label]) for label in variants}
            entries.append({
                "towers": towers,
                "head_precision": args.head_precision,
                "world_size": nproc,
                "grouped_samples_per_s": rate["grouped"],
                "expanded_samples_per_s": rate["expanded"],
                "ratio": rate["grouped"] / rate["expanded"],
                "no_history_samples_per_s": rate["no_history"],
                "grouped_vs_no_history": rate["grouped"] / rate["no_history"],
                "bytes_per_impression_grouped": sizes["grouped"],
                "bytes_per_impression_expanded": sizes["expanded"],
                "steps": runs["grouped"][0]["steps"],
                "runs_samples_per_s": {label: [r["samples_per_s"] for r in runs[label]] for label in variants},
                # The most any repeat took: copied user rows cost memory as well as time.
                "peak_rss_mb_largest_process": {
                    label: max(r["peak_rss_mb_largest_process"] for r in runs[label]) for label in variants},
                "peak_rss_all_processes_mb": {
                    label: max((r["peak_rss_all_processes_mb"] for r in runs[label]
                                if r["peak_rss_all_processes_mb"] is not None), default=None)
                    for label in variants},
            })
    payload = {
        "batch_size": args.batch_size,
        "train_impressions": args.train_impressions,
        "history_ids_per_user": args.history_ids_per_user,
        "no_history_ids_per_user": MIN_HISTORY,
        "users_per_batch": sizes["users_per_batch"],
        "repeats": args.repeats,
        "entries": entries,
    }
    return write_result(args.out, "grouping", command_line(__file__, argv if argv is not None else sys.argv[1:]),
                        payload, library_versions(["torch", "torchrec", "fbgemm-gpu-cpu", "pyarrow"]))


if __name__ == "__main__":
    main()
