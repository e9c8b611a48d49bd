"""Throughput sweep: ESMM and MMOE x batch sizes x world sizes, with and without the reader, in one command.

    .venv/bin/python benchmarks/sweep_bench.py            # the recorded figures (~15 min on 2 quiet cores)
    .venv/bin/python benchmarks/sweep_bench.py --quick    # tiny data and few steps: a smoke run

Every point trains on the same synthetic Ali-CCP (``write_parquet_direct``, ~500 history ids per user,
~58 impressions per user, 2M train impressions; reused when its ``SyntheticConfig`` matches) under
``torchrun --standalone``, in two modes:

* reader included: the real job, ``launch/train.py --config configs/synthetic_cpu.toml`` for one epoch
  capped at ``--warmup + --steps`` steps; the figure is the job's own ``train_samples_per_s`` from
  ``summary.json`` (every step, its first ones included; evaluation excluded);
* reader excluded: ``prebuilt_steps.py``, the same config built by the same ``Trainer``, trained on
  ``--prebuilt-batches`` batches per rank read into memory first; ``--warmup`` steps untimed, then
  ``--steps`` timed.

Model: embeddings 16, towers [16, 8] (``--towers paper``: 360x200x80); MMOE keeps the config's experts
(4 x [256, 128]) and trains CTR, CVR (clicked rows) and CTCVR directly. Batch sizes are per rank (the
config's ``data.batch_size``): a 2-rank point trains twice as many impressions per step. Samples/s is over all ranks. Each rank gets ``cores / ranks`` threads. Writes
``benchmarks/results/sweep.json`` and ``sweep.png`` and prints a markdown table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(1, str(BENCH_DIR.parent))

from common import (  # noqa: E402
    REPO,
    BenchmarkError,
    command_line,
    library_versions,
    machine_info,
    read_json_record,
    run_logged,
    torchrun_command,
    write_result,
)
from grouping_bench import TOWERS, ensure_dataset  # noqa: E402
from plots import SweepPoint, plot_sweep  # noqa: E402
from prebuilt_steps import RESULT_KEYS as PREBUILT_KEYS  # noqa: E402
from train_cpu_bench import read_summary  # noqa: E402

from dist_mtl.data.schema import DatasetMetadata  # noqa: E402
from dist_mtl.data.synthetic import SyntheticConfig  # noqa: E402

MODELS = ("esmm", "mmoe")
READER_MODES = ("included", "excluded")
DEFAULT_CONFIG = REPO / "configs" / "synthetic_cpu.toml"
# MMOE trains its three tasks directly (ESMM's CVR has loss weight 0 and learns through pCTCVR):
# CTR on clicks and CTCVR on purchases over all impressions, CVR on purchases over clicked ones.
MMOE_TASKS = ('tasks=[{name="ctr", label="click"}, {name="cvr", label="buy", rows="click"}, '
              '{name="ctcvr", label="buy"}]')
HEAD_OVERRIDES: dict[str, list[str]] = {
    "esmm": ["model.head=esmm"],
    "mmoe": ["model.head=mmoe", MMOE_TASKS],
    "ple": ["model.head=ple", MMOE_TASKS],  # not in MODELS, the default grid: on request (accuracy_bench)
}


@dataclass(frozen=True)
class SweepSettings:
    """Data size and step counts of a sweep; ``QUICK`` is the smoke-run preset."""

    train_impressions: int = 2_000_000
    test_impressions: int = 20_000  # only the job's closing evaluation reads it
    history_ids_per_user: float = 500.0
    batch_sizes: tuple[int, ...] = (1024, 4096, 16384)
    world_sizes: tuple[int, ...] = (1, 2)
    warmup: int = 5
    steps: int = 50
    prebuilt_batches: int = 16


QUICK = SweepSettings(train_impressions=30_000, test_impressions=3_000, history_ids_per_user=50.0,
                      batch_sizes=(256, 1024), warmup=2, steps=6, prebuilt_batches=4)


def resolve_settings(quick: bool, given: Mapping[str, object]) -> SweepSettings:
    """The preset (``QUICK`` or the defaults) with the flags the user gave (not None) on top."""
    base = QUICK if quick else SweepSettings()
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


@dataclass(frozen=True)
class SweepRun:
    """One point of the sweep."""

    model: str
    batch_size: int  # per rank
    world_size: int
    reader: str  # READER_MODES

    @property
    def name(self) -> str:
        return f"{self.model}-b{self.batch_size}-w{self.world_size}-reader_{self.reader}"


def sweep_runs(models: Sequence[str], settings: SweepSettings, readers: Sequence[str]) -> list[SweepRun]:
    """Every (model, batch size, world size, reader mode), in the order they run."""
    return [SweepRun(m, b, w, r) for m in models for w in settings.world_sizes for b in settings.batch_sizes
            for r in readers]


def threads_per_rank(usable_cores: int, world_size: int) -> int:
    """Every core busy and none shared: each rank gets its share (torchrun alone would give 1 thread)."""
    return max(1, usable_cores // world_size)


def job_overrides(model: str, data: Path, run_dir: Path, batch_size: int, towers: Sequence[int],
                  max_steps: int) -> list[str]:
    """``launch/train.py`` overrides of a sweep point: one epoch of at most ``max_steps`` steps on CPU."""
    return [
        f'data.path="{data}"', f'run_dir="{run_dir}"', f"data.batch_size={batch_size}", "sharding.device=cpu",
        "model.embedding_dim=16", f"model.tower_dims={list(towers)}", "train.epochs=1",
        f"train.max_steps={max_steps}", "train.progress_bar=false",
        f"train.log_every_steps={max(1, max_steps // 4)}", *HEAD_OVERRIDES[model],
    ]


def read_prebuilt(path: Path) -> dict:
    """prebuilt_steps.py's result, checked for the keys the sweep reads."""
    return read_json_record(path, PREBUILT_KEYS, "prebuilt-steps result", "the prebuilt-steps worker")


def measure(run: SweepRun, data: Path, work: Path, settings: SweepSettings, towers: Sequence[int],
            config: Path, env: Mapping[str, str]) -> dict:
    """Train one sweep point under torchrun; its entry of sweep.json."""
    run_dir = work / "runs" / run.name
    shutil.rmtree(run_dir, ignore_errors=True)  # never read a stale summary or result
    overrides = job_overrides(run.model, data, run_dir, run.batch_size, towers, settings.warmup + settings.steps)
    log = work / "logs" / f"{run.name}.log"
    if run.reader == "included":
        cmd = torchrun_command(REPO / "launch" / "train.py", run.world_size, ["--config", str(config), *overrides])
    else:
        out = run_dir / "prebuilt.json"
        cmd = torchrun_command(BENCH_DIR / "prebuilt_steps.py", run.world_size, [
            "--config", str(config), "--out", str(out), "--batches", str(settings.prebuilt_batches),
            "--warmup", str(settings.warmup), "--steps", str(settings.steps), *overrides])
    measured = run_logged(cmd, log, f"sweep point {run.name}", cwd=REPO, env=env)
    entry = {"model": run.model, "batch_size_per_rank": run.batch_size,
             "global_batch_size": run.batch_size * run.world_size, "world_size": run.world_size,
             "reader": run.reader}
    if run.reader == "included":
        summary = read_summary(run_dir / "summary.json")
        if summary["world_size"] != run.world_size:
            raise BenchmarkError(f"{run_dir}/summary.json: world_size {summary['world_size']} != {run.world_size}")
        entry.update(samples_per_s=summary["train_samples_per_s"], steps=summary["steps"],
                     samples=summary["samples_trained"], seconds=summary["train_seconds"],
                     model_config=summary["config"]["model"])
        if summary["steps"] < settings.warmup + settings.steps:
            entry["note"] = (f"the epoch ended after {summary['steps']} of {settings.warmup + settings.steps} steps "
                             f"(the train split is too small for this batch size and world size)")
    else:
        result = read_prebuilt(run_dir / "prebuilt.json")
        entry.update(samples_per_s=result["samples_per_s"], steps=result["steps"],
                     warmup_steps=result["warmup_steps"], samples=result["timed_samples"],
                     seconds=result["timed_seconds"], batches_in_memory=result["batches_in_memory"],
                     users_per_batch_rank0=result.get("rank0_mean_users_per_batch"),
                     model_config=result.get("model_config"))
    entry.update(process_seconds=measured.seconds, peak_rss_mb_largest_process=measured.peak_rss_mb,
                 peak_rss_all_processes_mb=measured.peak_rss_all_mb,
                 omp_num_threads_per_rank=env.get("OMP_NUM_THREADS"), command=shlex.join(cmd), log=str(log))
    return entry


def markdown_table(record: Mapping) -> str:
    """The RESULTS.md section: a row per (model, batch size), a column per (world size, reader mode)."""
    entries = record["entries"]
    columns = sorted({(e["world_size"], e["reader"]) for e in entries},
                     key=lambda c: (c[0], READER_MODES.index(c[1])))
    rows = sorted({(e["model"], e["batch_size_per_rank"]) for e in entries},
                  key=lambda r: (MODELS.index(r[0]) if r[0] in MODELS else len(MODELS), r[0], r[1]))
    rate = {(e["model"], e["batch_size_per_rank"], e["world_size"], e["reader"]): e["samples_per_s"]
            for e in entries}
    data, machine = record["data"], record["machine"]
    header = [f"{w} rank{'s' if w > 1 else ''}, reader {r}" for w, r in columns]
    lines = [
        f"Throughput sweep (training samples/s over all ranks), synthetic Ali-CCP {data['train_impressions']:,} "
        f"train impressions, ~{data['history_ids_per_user']:.0f} history ids per user, "
        f"~{data['impressions_per_user']:.0f} impressions per user; embeddings 16, towers {record['towers']}; "
        f"batch per rank; {machine['usable_cores']} cores ({machine['cpu_model']}), {record['date']}",
        "",
        "| model | batch/rank | " + " | ".join(header) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in header) + " |",
    ]
    for model, batch in rows:
        cells = [rate.get((model, batch, w, r)) for w, r in columns]
        lines.append(f"| {model.upper()} | {batch:,} | "
                     + " | ".join("-" if c is None else f"{c:,.0f}" for c in cells) + " |")
    lines += ["", "Reader included: the job's `train_samples_per_s` over all its steps; reader excluded: "
              f"{record['steps']} timed steps after {record['warmup']} on batches held in memory.", "",
              f"`{record['command']}`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK.train_impressions:,} impressions, batch sizes "
                             f"{list(QUICK.batch_sizes)}, {QUICK.warmup}+{QUICK.steps} steps (flags below override)")
    parser.add_argument("--work-dir", default=None,
                        help="data, run directories and logs (default data_out/bench/sweep, or sweep_quick)")
    parser.add_argument("--out", default=None,
                        help="result JSON; the PNG goes beside it (default benchmarks/results/sweep.json; "
                             "with --quick, sweep_quick.json in the work dir)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--readers", nargs="+", choices=READER_MODES, default=list(READER_MODES))
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="per rank (default 1024 4096 16384)")
    parser.add_argument("--world-sizes", type=int, nargs="+", help="ranks per point (default 1 2)")
    parser.add_argument("--towers", choices=sorted(TOWERS), default="small",
                        help=f"tower sizes: {TOWERS} (default: %(default)s)")
    parser.add_argument("--train-impressions", type=int)
    parser.add_argument("--history-ids-per-user", type=float)
    parser.add_argument("--warmup", type=int, help="untimed steps (reader excluded); default 5")
    parser.add_argument("--steps", type=int, help="timed steps; the reader-included job runs warmup + steps")
    parser.add_argument("--prebuilt-batches", type=int, help="batches per rank held in memory (default 16)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    args = parser.parse_args(argv)
    settings = resolve_settings(args.quick, {
        "train_impressions": args.train_impressions, "history_ids_per_user": args.history_ids_per_user,
        "batch_sizes": None if args.batch_sizes is None else tuple(args.batch_sizes),
        "world_sizes": None if args.world_sizes is None else tuple(args.world_sizes),
        "warmup": args.warmup, "steps": args.steps, "prebuilt_batches": args.prebuilt_batches,
    })
    if min(settings.batch_sizes) < 1 or min(settings.world_sizes) < 1:
        parser.error("batch and world sizes must be >= 1")
    if settings.warmup < 1 or settings.steps < 1 or settings.prebuilt_batches < 1:
        parser.error("--warmup, --steps and --prebuilt-batches must be >= 1 (the first step fills the pipeline)")
    command = command_line(__file__, sys.argv[1:] if argv is None else argv)
    work = Path(args.work_dir or REPO / "data_out" / "bench" / ("sweep_quick" if args.quick else "sweep")).resolve()
    out = Path(args.out or (work / "sweep_quick.json" if args.quick else BENCH_DIR / "results" / "sweep.json"))
    towers = TOWERS[args.towers]
    config = Path(args.config).resolve()
    data_cfg = SyntheticConfig(train_impressions=settings.train_impressions,
                               test_impressions=settings.test_impressions,
                               history_ids_per_user=settings.history_ids_per_user, seed=0)
    try:
        data_cfg.validate()
    except ValueError as e:
        parser.error(str(e))

    def say(text: str) -> None:
        print(f"[sweep_bench] {text}", flush=True)

    data = ensure_dataset(work / "data", data_cfg)
    cores = machine_info()["usable_cores"] or 1
    runs = sweep_runs(args.models, settings, args.readers)
    started = datetime.datetime.now()
    entries = []
    for i, run in enumerate(runs):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_rank(cores, run.world_size))}
        say(f"[{i + 1}/{len(runs)}] {run.name} ...")
        entry = measure(run, data, work, settings, towers, config, env)
        entries.append(entry)
        note = f"; {entry['note']}" if "note" in entry else ""
        say(f"[{i + 1}/{len(runs)}] {run.name}: {entry['samples_per_s']:,.0f} samples/s "
            f"({entry['process_seconds']:.0f}s, log {entry['log']}){note}")
    metadata = DatasetMetadata.load(data)
    payload = {
        "towers": list(towers),
        "embedding_dim": 16,
        "config": str(config.relative_to(REPO)) if config.is_relative_to(REPO) else str(config),
        "warmup": settings.warmup,
        "steps": settings.steps,
        "prebuilt_batches": settings.prebuilt_batches,
        "batch_size_meaning": "per rank (data.batch_size); samples/s over all ranks",
        "sweep_seconds": (datetime.datetime.now() - started).total_seconds(),
        "data": {
            "synthetic_config": dataclasses.asdict(data_cfg),
            "path": str(data),
            "train_impressions": metadata.split("train").num_impressions,
            "train_users": metadata.split("train").num_users,
            "history_ids_per_user": settings.history_ids_per_user,
            "impressions_per_user": metadata.split("train").num_impressions / max(metadata.split("train").num_users, 1),
            "embedding_rows": sum(metadata.vocab_sizes.values()),
        },
        "entries": entries,
    }
    record = write_result(out, "sweep", command, payload,
                          library_versions(["torch", "torchrec", "fbgemm-gpu-cpu", "pyarrow", "numpy"]))
    png = plot_sweep(
        [SweepPoint(e["model"], e["world_size"], e["reader"], e["batch_size_per_rank"], e["samples_per_s"])
         for e in entries],
        out.with_suffix(".png"),
        f"dist_mtl training throughput, synthetic Ali-CCP ({record['data']['train_impressions']:,} train "
        f"impressions, ~{settings.history_ids_per_user:.0f} history ids/user), towers {list(towers)}, "
        f"{record['machine']['usable_cores']} cores",
    )
    say(f"wrote {out} and {png}")
    print("\n" + markdown_table(record), flush=True)
    return record


if __name__ == "__main__":
    main()
