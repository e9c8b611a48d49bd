"""Side-by-side CPU training benchmark: dist_mtl against torch-rechub 0.9.0, in one run, on the same data.

    bash benchmarks/rechub_env.sh                        # once: benchmarks/.venv-rechub
    .venv/bin/python benchmarks/train_cpu_bench.py       # writes benchmarks/results/train_cpu.json

1. Generates one synthetic Ali-CCP (``SyntheticConfig``) in both layouts: the raw Tianchi files converted
   to Parquet with ``convert_raw`` (dist_mtl's input) and torch-rechub's preprocessed CSVs
   (``write_rechub_csv``). Each step is reused when its record in the work directory matches the config.
2. Trains dist_mtl ESMM and MMOE for one epoch under torchrun (``launch/train.py``, the real job, reader
   included) and reads ``train_samples_per_s`` and the test metrics from ``summary.json``.
3. Trains torch-rechub's tutorial ESMM and MMOE (``rechub_baseline.py`` in the torch-rechub venv) on the
   same rows with the same batch size.
4. Scores torch-rechub's predictions here the way dist_mtl scores its own (CTR and CTCVR over all test
   impressions, CVR over clicked ones) and the planted model's true probabilities (the oracle).
5. Writes the result JSON and prints a markdown table for benchmarks/RESULTS.md.

Model sizes follow torch-rechub's tutorial on both sides: ESMM with embeddings 16 and towers [16, 8];
MMOE with embeddings 4, 8 experts [16] and towers [8], trained on click and purchase over all
impressions (its purchase output is a pCTCVR). The batch size is global: each of N ranks takes 1/N.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(1, str(REPO))

from common import (  # noqa: E402
    BenchmarkError,
    command_line,
    library_versions,
    machine_info,
    read_json_record,
    run_logged,
    torchrun_command,
    write_result,
)

from dist_mtl.data.convert import convert_raw  # noqa: E402
from dist_mtl.data.schema import METADATA_FILE, DatasetMetadata  # noqa: E402
from dist_mtl.data.synthetic import (  # noqa: E402
    SyntheticConfig,
    dataset_fingerprint,
    binary_auc,
    oracle_auc,
    write_parquet_direct,
    write_raw,
    write_rechub_csv,
)

# ~500 history ids per user and the real (count > 10 filtered) table sizes of Ali-CCP, whatever the
# number of impressions: torch-rechub steps Adam densely over every embedding row, so its speed depends
# on the table sizes users train with, not on how many impressions a benchmark run holds (RESULTS.md:
# 38.6k samples/s with tables of the ids 1M impressions hold, 27.6k with every id of the full tables).
# Click and conversion rates are raised from Ali-CCP's 3.9% / 0.54% (as in launch/main_job.py) so that
# the test split holds enough conversions for CVR and CTCVR AUCs worth comparing; speed does not
# depend on them.
DEFAULT_DATA = SyntheticConfig(
    train_impressions=2_000_000,
    test_impressions=400_000,
    history_ids_per_user=500.0,
    vocab_scale=1.0,
    click_rate=0.10,
    buy_rate_after_click=0.10,
    seed=0,
)
DEFAULT_BATCH_SIZE = 4096
TARGET_ESMM_RATIO = 40.0
MODELS = ("esmm", "mmoe")
TASKS = ("ctr", "cvr", "ctcvr")
RECHUB_PYTHON = BENCH_DIR / ".venv-rechub" / "bin" / "python"

# dist_mtl overrides giving torch-rechub's tutorial model sizes (run_ali_ccp_multi_task.py).
MODEL_OVERRIDES: dict[str, list[str]] = {
    "esmm": ["model.head=esmm", "model.embedding_dim=16", "model.tower_dims=[16,8]"],
    "mmoe": [
        "model.head=mmoe", "model.embedding_dim=4", "model.num_experts=8", "model.expert_dims=[16]",
        "model.tower_dims=[8]",
        # The tutorial's MMOE predicts click and purchase over all impressions: CTR and CTCVR.
        'tasks=[{name="ctr", label="click"}, {name="ctcvr", label="buy"}]',
        "train.early_stop_metric=ctcvr/auc",
    ],
}
RECHUB_MODEL_NAMES = {"esmm": "ESMM", "mmoe": "MMOE"}


# ------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class BenchData:
    raw: Path  # Tianchi files (or the directly written dataset) + truth_{train,test}.parquet
    parquet: Path  # dist_mtl dataset converted from raw
    rechub: Path  # ali_ccp_{train,val,test}.csv + truths


def _reusable(record: Path, wanted: dict) -> bool:
    try:
        return json.loads(record.read_text()) == wanted
    except (OSError, json.JSONDecodeError):
        return False


def _run_step(record: Path, wanted: dict, force: bool, title: str, step: Callable[[], None],
              say: Callable[[str], None]) -> float:
    """Run ``step`` unless its record says it already ran for ``wanted``; returns seconds spent."""
    if not force and _reusable(record, wanted):
        say(f"{title}: reusing ({record.name} matches)")
        return 0.0
    record.unlink(missing_ok=True)
    say(f"{title} ...")
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    record.write_text(json.dumps(wanted, sort_keys=True))
    say(f"{title}: {seconds:.1f}s")
    return seconds


def prepare_data(work: Path, cfg: SyntheticConfig, force: bool,
                 say: Callable[[str], None] = print, tables: str = "data") -> tuple[BenchData, dict[str, float]]:
    """Both layouts of one synthetic data set under ``work``, each reused when generated from ``cfg``.

    ``tables="data"``: tables hold the ids the training data has (rechub's preprocessor numbering; our
    converter). ``tables="full"``: both systems get tables of the full vocabulary of the data set this one
    samples (rechub ids numbered over the generator's id space; our dataset written directly, whose
    vocabularies count every possible id); the rows are the same.
    """
    if tables == "full":
        data = BenchData(raw=work / "parquet_full", parquet=work / "parquet_full", rechub=work / "rechub_csv_full")
        wanted = {**dataset_fingerprint(cfg), "tables": tables}
        seconds = {
            "parquet": _run_step(work / "parquet_full.done.json", wanted, force, "Parquet, full-vocabulary tables",
                                 lambda: write_parquet_direct(data.parquet, cfg), say),
            "rechub_csv": _run_step(work / "rechub_csv_full.done.json", wanted, force,
                                    "torch-rechub CSV, full-vocabulary tables",
                                    lambda: write_rechub_csv(data.rechub, cfg, table_rows="full"), say),
        }
        return data, seconds
    data = BenchData(raw=work / "raw", parquet=work / "parquet", rechub=work / "rechub_csv")
    wanted = dataset_fingerprint(cfg)
    seconds = {
        "raw": _run_step(work / "raw.done.json", wanted, force, "synthetic raw Ali-CCP",
                         lambda: write_raw(data.raw, cfg), say),
    }
    # A reused raw set may be older than the Parquet made from it: redo when metadata.json is missing.
    parquet_force = force or seconds["raw"] > 0 or not (data.parquet / METADATA_FILE).exists()
    seconds["parquet"] = _run_step(work / "parquet.done.json", wanted, parquet_force,
                                   "convert raw -> Parquet", lambda: convert_raw(data.raw, data.parquet), say)
    seconds["rechub_csv"] = _run_step(work / "rechub_csv.done.json", wanted, force, "torch-rechub CSV",
                                      lambda: write_rechub_csv(data.rechub, cfg), say)
    return data, seconds


def check_same_rows(metadata: DatasetMetadata, rechub_rows: Mapping[str, int]) -> None:
    """Both systems must see the same impressions: rechub's train file is the train split, its val and
    test files are the two halves of the test split."""
    train = metadata.split("train").num_impressions
    test = metadata.split("test").num_impressions
    if rechub_rows["train"] != train or rechub_rows["val"] + rechub_rows["test"] != test:
        raise BenchmarkError(
            f"the two layouts disagree: Parquet train/test impressions {train}/{test}, torch-rechub CSV "
            f"train/val/test rows {rechub_rows['train']}/{rechub_rows['val']}/{rechub_rows['test']}"
        )


# --------------------------------------------------------------------------------------------- dist_mtl


def dist_mtl_command(model: str, config: Path, data_dir: Path, run_dir: Path, batch_size: int,
                     nproc: int) -> list[str]:
    """torchrun over launch/train.py with the tutorial sizes, one epoch, no early stop."""
    if batch_size % nproc:
        raise ValueError(f"batch size {batch_size} is not divisible by {nproc} ranks")
    overrides = [
        f'data.path="{data_dir}"', f'run_dir="{run_dir}"', f"data.batch_size={batch_size // nproc}",
        "train.epochs=1", "train.early_stop_patience=1000000", "train.progress_bar=false",
        "sharding.device=cpu", *MODEL_OVERRIDES[model],
    ]
    return torchrun_command(REPO / "launch" / "train.py", nproc, ["--config", str(config), *overrides])


SUMMARY_KEYS = ("train_samples_per_s", "samples_trained", "train_seconds", "wall_seconds", "world_size", "metrics")


def read_summary(path: Path) -> dict:
    """A run's summary.json, checked for the keys the benchmark reads."""
    return read_json_record(path, SUMMARY_KEYS, "summary", "the training run")


def dist_mtl_task_aucs(metrics: Mapping[str, float]) -> dict[str, float | None]:
    """Each task's test AUC from summary.json metrics: None for a task the model lacks, NaN where the
    AUC is undefined (one class only)."""
    return {t: metrics.get(f"{t}/auc") for t in TASKS}


# ----------------------------------------------------------------------------------------- torch-rechub


def rechub_command(rechub_python: Path, model: str, csv_dir: Path, out_dir: Path, batch_size: int) -> list[str]:
    return [str(rechub_python), str(BENCH_DIR / "rechub_baseline.py"), "--data-dir", str(csv_dir),
            "--model", RECHUB_MODEL_NAMES[model], "--batch-size", str(batch_size), "--out-dir", str(out_dir)]


def _auc_or_nan(labels: np.ndarray, scores: np.ndarray) -> float:
    # As dist_mtl's metrics: undefined (NaN) when the rows hold one class only.
    if labels.size == 0 or labels.all() or not labels.any():
        return math.nan
    return binary_auc(labels, scores)


def task_aucs(predictions: np.ndarray, tasks: Sequence[str], labels: np.ndarray) -> dict[str, float]:
    """AUC of each prediction column by its task, as dist_mtl evaluates it.

    ``labels`` is [N, 2] (click, purchase). CTR: click over all rows; CTCVR: click-and-purchase over
    all rows; CVR: purchase over clicked rows.
    """
    if predictions.ndim != 2 or predictions.shape[1] != len(tasks) or predictions.shape[0] != labels.shape[0]:
        raise ValueError(f"predictions {predictions.shape} do not match tasks {list(tasks)} and "
                         f"labels {labels.shape}")
    click = labels[:, 0].astype(bool)
    buy = labels[:, 1].astype(bool) & click
    out = {}
    for column, task in enumerate(tasks):
        scores = predictions[:, column]
        if task == "ctr":
            out[task] = _auc_or_nan(click, scores)
        elif task == "ctcvr":
            out[task] = _auc_or_nan(buy, scores)
        elif task == "cvr":
            out[task] = _auc_or_nan(buy[click], scores[click])
        else:
            raise ValueError(f"unknown task {task!r} (expected one of {TASKS})")
    return out


def rechub_eval_outputs(record: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, labels) over rechub's val and test files together: the whole test split."""
    predictions, labels = [], []
    for split in ("val", "test"):
        files = record["outputs"][split]
        predictions.append(np.load(files["predictions"]))
        labels.append(np.load(files["labels"]))
    return np.concatenate(predictions), np.concatenate(labels)


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BenchmarkError(f"{what}: cannot read {path}: {e}") from e


# -------------------------------------------------------------------------------------------- reporting


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def ratio_key(model: str) -> str:
    """Result key of a model's dist_mtl / torch-rechub throughput ratio (ESMM's is the headline one)."""
    return "ratio_vs_rechub" if model == "esmm" else f"{model}_ratio_vs_rechub"


def task_table(aucs: Mapping[str, float | None], oracle: Mapping[str, float]) -> dict[str, dict]:
    """{task: {"auc", "oracle_auc"}} for the tasks a model predicts (an undefined AUC becomes None)."""
    return {t: {"auc": _finite_or_none(aucs.get(t)), "oracle_auc": _finite_or_none(oracle.get(t))}
            for t in TASKS if aucs.get(t) is not None}


def markdown_table(result: Mapping) -> str:
    """The RESULTS.md section: one row per model and system, then the oracle."""
    def fmt_auc(task_row: Mapping | None) -> str:
        return "-" if not task_row or task_row.get("auc") is None else f"{task_row['auc']:.4f}"

    lines = [
        f"Ali-CCP synthetic, {result['data']['train_impressions']:,} train / "
        f"{result['data']['test_impressions']:,} test impressions, ~{result['data']['history_ids_per_user']:.0f} "
        f"history ids per user, {result['data']['embedding_rows']:,} embedding rows; batch {result['batch_size']} (dist_mtl: {result['world_size']} ranks x "
        f"{result['batch_size_per_rank']}); {result['machine']['usable_cores']} cores "
        f"({result['machine']['cpu_model']}); {result['date']}",
        "",
        "| model | system | train samples/s | vs torch-rechub | CTR AUC | CVR AUC | CTCVR AUC |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for model in result["models"]:
        ratio = result[ratio_key(model)]
        for system, label, rate, rel in (
            ("dist_mtl", "dist_mtl", result[f"{model}_samples_per_s"], f"{ratio:.1f}x"),
            ("torch_rechub", "torch-rechub 0.9.0", result[f"rechub_{model}_samples_per_s"], "1.0x"),
        ):
            aucs = result["tasks"][model][system]
            lines.append(f"| {model.upper()} | {label} | {rate:,.0f} | {rel} | "
                         + " | ".join(fmt_auc(aucs.get(t)) for t in TASKS) + " |")
    oracle = result["oracle_auc"]
    lines.append("| - | planted model (oracle) | - | - | "
                 + " | ".join("-" if oracle.get(t) is None else f"{oracle[t]:.4f}" for t in TASKS) + " |")
    lines += ["", f"`{result['command']}`"]
    return "\n".join(lines)


def run_dist_mtl(model: str, args: argparse.Namespace, data: BenchData, work: Path, env: Mapping[str, str],
                 say: Callable[[str], None]) -> tuple[dict, dict]:
    """(summary.json, run record) of one dist_mtl training run under torchrun."""
    run_dir = work / "runs" / f"dist_mtl_{model}"
    shutil.rmtree(run_dir, ignore_errors=True)  # never read a stale summary.json
    cmd = dist_mtl_command(model, Path(args.config).resolve(), data.parquet, run_dir, args.batch_size, args.nproc)
    log = work / "logs" / f"dist_mtl_{model}.log"
    say(f"dist_mtl {model}: torchrun x{args.nproc}, log {log}")
    measured = run_logged(cmd, log, f"dist_mtl {model} training", cwd=REPO, env=env)
    summary = read_summary(run_dir / "summary.json")
    if summary["world_size"] != args.nproc:
        raise BenchmarkError(f"{run_dir}/summary.json: world_size {summary['world_size']} != {args.nproc}")
    return summary, {
        "command": shlex.join(cmd), "omp_num_threads_per_rank": env.get("OMP_NUM_THREADS"),
        "samples_trained": summary["samples_trained"], "train_seconds": summary["train_seconds"],
        "wall_seconds": summary["wall_seconds"], "process_seconds": measured.seconds,
        "peak_rss_mb_largest_process": measured.peak_rss_mb,
        "peak_rss_all_processes_mb": measured.peak_rss_all_mb, "eval_rows": summary["metrics"].get("ctr/count"),
        "run_dir": str(run_dir),
    }


def run_rechub(model: str, rechub_python: Path, batch_size: int, data: BenchData, work: Path,
               say: Callable[[str], None]) -> tuple[dict, dict]:
    """(rechub_baseline.py's record, run record) of one torch-rechub run in its venv."""
    out_dir = work / "rechub_out"
    record_path = out_dir / f"rechub_{model}.json"
    record_path.unlink(missing_ok=True)
    log = work / "logs" / f"rechub_{model}.log"
    say(f"torch-rechub {model}: log {log}")
    measured = run_logged(rechub_command(rechub_python, model, data.rechub, out_dir, batch_size), log,
                          f"torch-rechub {model} baseline", cwd=REPO)
    record = read_json(record_path, f"torch-rechub {model} baseline")
    return record, {
        "command": record["command"], "rows": record["rows"], "epoch_seconds": record["epoch_seconds"],
        "load_seconds": record["load_seconds"], "num_parameters": record["num_parameters"],
        "torch_threads": record["torch_threads"], "process_seconds": measured.seconds,
        "peak_rss_mb": record["peak_rss_mb"], "versions": record["versions"],
    }


# ------------------------------------------------------------------------------------------------- main


def _vocab_scale(text: str) -> float | None:
    """--vocab-scale: a fraction in (0, 1], or 'auto' (SyntheticConfig's scaling with the data size)."""
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] or 'auto', got {text!r}") from None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=str(REPO / "data_out" / "bench_train_cpu"),
                        help="generated data, run directories and logs")
    parser.add_argument("--out", default=str(BENCH_DIR / "results" / "train_cpu.json"))
    parser.add_argument("--train-impressions", type=int, default=DEFAULT_DATA.train_impressions)
    parser.add_argument("--test-impressions", type=int, default=DEFAULT_DATA.test_impressions)
    parser.add_argument("--history-ids-per-user", type=float, default=DEFAULT_DATA.history_ids_per_user)
    parser.add_argument("--vocab-scale", type=_vocab_scale, default=DEFAULT_DATA.vocab_scale,
                        help="table sizes as a fraction of Ali-CCP's real ones, in (0, 1]; 'auto' scales them "
                             "with --train-impressions (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_DATA.seed)
    parser.add_argument("--tables", choices=("data", "full"), default="data",
                        help="table rows: the ids this data holds (rechub's own preprocessing), or the full "
                             "vocabulary of the data set it samples (what a full-data run pays per step)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="global batch: torch-rechub's batch, split over the dist_mtl ranks")
    parser.add_argument("--nproc", type=int, default=2, help="dist_mtl ranks (torchrun --nproc_per_node)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--config", default=str(REPO / "configs" / "synthetic_cpu.toml"))
    parser.add_argument("--rechub-python", default=str(RECHUB_PYTHON),
                        help="python of the torch-rechub venv (bash benchmarks/rechub_env.sh)")
    parser.add_argument("--force", action="store_true", help="regenerate the data even when reusable")
    args = parser.parse_args(argv)
    if args.nproc < 1 or args.batch_size < args.nproc or args.batch_size % args.nproc:
        parser.error(f"--batch-size {args.batch_size} must be a positive multiple of --nproc {args.nproc}")
    rechub_python = Path(args.rechub_python)
    if not rechub_python.exists():
        parser.error(f"{rechub_python} not found: create the torch-rechub venv with bash benchmarks/rechub_env.sh")
    command = command_line(__file__, sys.argv[1:] if argv is None else argv)
    cfg = dataclasses.replace(DEFAULT_DATA, train_impressions=args.train_impressions,
                              test_impressions=args.test_impressions,
                              history_ids_per_user=args.history_ids_per_user,
                              vocab_scale=args.vocab_scale, seed=args.seed)
    try:
        cfg.validate()
    except ValueError as e:
        parser.error(str(e))
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)

    def say(text: str) -> None:
        print(f"[train_cpu_bench] {text}", flush=True)

    data, data_seconds = prepare_data(work, cfg, args.force, say, tables=args.tables)
    metadata = DatasetMetadata.load(data.parquet)
    oracle = oracle_auc(data.raw / "truth_test.parquet")

    # Every core busy on both sides: torch-rechub's one process uses them all by default; each rank
    # gets its share (torchrun alone would give each rank 1 thread).
    threads_per_rank = max(1, (machine_info()["usable_cores"] or 1) // args.nproc)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads_per_rank))}

    result: dict = {"models": list(args.models), "tasks": {}, "runs": {}}
    for model in args.models:
        summary, dist_mtl_run = run_dist_mtl(model, args, data, work, env, say)
        rechub, rechub_run = run_rechub(model, rechub_python, args.batch_size, data, work, say)
        check_same_rows(metadata, rechub["rows"])
        predictions, labels = rechub_eval_outputs(rechub)
        ours, theirs = summary["train_samples_per_s"], rechub["train_samples_per_s"]
        result[f"{model}_samples_per_s"] = ours
        result[f"rechub_{model}_samples_per_s"] = theirs
        result[ratio_key(model)] = ours / theirs
        result["tasks"][model] = {
            "dist_mtl": task_table(dist_mtl_task_aucs(summary["metrics"]), oracle),
            "torch_rechub": task_table(task_aucs(predictions, rechub["prediction_tasks"], labels), oracle),
        }
        result["runs"][model] = {"dist_mtl": dist_mtl_run, "torch_rechub": rechub_run}
        say(f"{model}: dist_mtl {ours:,.0f} samples/s, torch-rechub {theirs:,.0f} samples/s, {ours / theirs:.1f}x")

    esmm_ratio = result.get(ratio_key("esmm"))
    payload = {
        **result,
        "target": {"esmm_ratio_vs_rechub_at_least": TARGET_ESMM_RATIO,
                   "met": None if esmm_ratio is None else esmm_ratio >= TARGET_ESMM_RATIO},
        "tables": args.tables,
        "batch_size": args.batch_size,
        "batch_size_per_rank": args.batch_size // args.nproc,
        "world_size": args.nproc,
        "oracle_auc": {t: _finite_or_none(v) for t, v in oracle.items()},
        "data": {
            "synthetic_config": dataclasses.asdict(cfg),
            "train_impressions": metadata.split("train").num_impressions,
            "test_impressions": metadata.split("test").num_impressions,
            "train_users": metadata.split("train").num_users,
            "history_ids_per_user": cfg.history_ids_per_user,
            "embedding_rows": sum(metadata.vocab_sizes.values()),
            "generation_seconds": data_seconds,
            "work_dir": str(work),
        },
    }
    record = write_result(args.out, "train_cpu", command, payload,
                          library_versions(["torch", "torchrec", "fbgemm-gpu-cpu", "pyarrow", "numpy", "torchmetrics"]))
    say(f"wrote {args.out}")
    print("\n" + markdown_table(record), flush=True)
    return record


if __name__ == "__main__":
    main()
