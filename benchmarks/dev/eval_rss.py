"""A torchrun worker that runs the trainer's evaluation steps on an untrained model and reports each rank's
resident memory as it goes: where an evaluation's RSS comes from.

    .venv/bin/torchrun --standalone --nproc_per_node=2 benchmarks/dev/eval_rss.py --batches 150 \\
        --config configs/synthetic_cpu.toml 'data.path="data_out/full_scale/parquet"' data.eval_batch_size=32768 \\
        'model.tower_dims=[360,200,80]' 'model.head_precision="bfloat16"' model.head=ple 'model.expert_dims=[64,32]' \\
        'tasks=[{name="ctr", label="click"}, {name="cvr", label="buy", rows="click"}, {name="ctcvr", label="buy"}]'

The job is built by dist_mtl's ``Trainer`` (same model, plan and eval reader as ``launch/train.py``), then
each step is ``Trainer.eval_step`` on the next batch of the eval split, as ``Trainer.evaluate`` runs them
(``--batches 0``: the whole split, then the metrics' ``compute``). Every ``--every`` batches each rank
prints its RSS (``/proc/self/statm``) and its rows per second since the last print, at the end its peak
RSS. ``--trim-every K`` calls glibc's ``malloc_trim(0)`` every K batches and prints the RSS before and
after it: what the heap holds freed but not returned. ``--no-metrics`` skips the metrics' update (the
model's forward only).
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from launch.train import quiet_library_noise, run_as_script  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML config file, as launch/train.py")
    parser.add_argument("--batches", type=int, default=150, help="evaluation batches per rank (0: the whole split)")
    parser.add_argument("--every", type=int, default=25, help="print every this many batches")
    parser.add_argument("--trim-every", type=int, default=0, help="malloc_trim(0) every this many batches (0: never)")
    parser.add_argument("--no-metrics", action="store_true", help="skip the metrics' update")
    parser.add_argument("--run-dir", default="/tmp/eval_rss_run", help="the Trainer's run_dir (config, logs)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides (TOML values)")
    args = parser.parse_args(argv)
    if args.batches < 0 or args.every < 1 or args.trim_every < 0:
        parser.error("need --batches >= 0, --every >= 1, --trim-every >= 0")

    from dist_mtl.config import load_config

    cfg = load_config(args.config, [*args.overrides, f'run_dir="{args.run_dir}"', "checkpoint.resume=false"])
    quiet_library_noise()
    from dist_mtl.distributed import init_distributed, shutdown_distributed
    from dist_mtl.trainer import Trainer

    ctx = init_distributed(cfg.sharding.device)
    try:
        trainer = Trainer(cfg, ctx)
        if args.no_metrics:
            trainer.metrics.update = lambda *a, **k: None  # type: ignore[method-assign]
        libc = ctypes.CDLL("libc.so.6") if args.trim_every else None
        with trainer.eval_mode():
            reader = trainer.eval_readers[cfg.data.eval_split]
            reader.set_epoch(0)
            start = last = time.perf_counter()
            rows = rows_since = batches = 0
            for batch in trainer._batches(reader):
                trainer.eval_step(batch)
                batches += 1
                rows += batch.num_impressions
                rows_since += batch.num_impressions
                note = ""
                if libc is not None and batches % args.trim_every == 0:
                    before = rss_mb()
                    libc.malloc_trim(0)
                    note = f" (before malloc_trim {before:.0f} MB)"
                if batches % args.every == 0:
                    now = time.perf_counter()
                    rate = rows_since / (now - last)
                    print(f"rank {ctx.rank} batch {batches}: RSS {rss_mb():.0f} MB{note}, {rate:,.0f} rows/s",
                          flush=True)
                    last, rows_since = now, 0
                if batches == args.batches:
                    break
            metrics = trainer.metrics.compute() if not args.no_metrics else {}
            seconds = time.perf_counter() - start
        auc = f"; ctr/auc {metrics['ctr/auc']:.5f}" if metrics else ""
        print(f"rank {ctx.rank}: {batches} batches, {rows:,} rows in {seconds:.1f} s ({rows / seconds:,.0f} rows/s); "
              f"RSS {rss_mb():.0f} MB, peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB{auc}",
              flush=True)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    run_as_script(main)
