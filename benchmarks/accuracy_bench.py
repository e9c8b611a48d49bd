"""Learning curve: ESMM's and MMOE's per-task test AUC against the oracle AUC as the train set grows.

    .venv/bin/python benchmarks/accuracy_bench.py                       # 0.5M, 2M, 8M (~25 min on 2 quiet cores)
    .venv/bin/python benchmarks/accuracy_bench.py --sizes 0.5M,2M       # chosen sizes

Data: one synthetic world (``SyntheticConfig``: ~500 history ids and ~58 impressions per user, click
and purchase-after-click rates raised to 10% each, as in launch/main_job.py, so that the test split
holds thousands of conversions) written with ``write_parquet_direct`` once per size, each reused when its
config matches. The vocabulary scale is fixed (by default the largest size's share of Ali-CCP), so the
planted model and the test split do not depend on the train size: every size is scored on the same
test impressions (checked: a digest of ``truth_test.parquet`` per size), and a smaller train set is a
prefix of a larger one up to its last cell of 256 users (the generator's unit of randomness).

Training: the same recipe for every size, ``launch/train.py --config configs/synthetic_cpu.toml``
under torchrun (2 ranks by default, batch 2048 per rank, towers [64, 32], ``--epochs`` epochs with an
evaluation after each, early stopping and best-model choice on ``ctcvr/auc``). The data has only train
and test splits (as Ali-CCP and the ESMM paper): the job's validation split is left empty, so early
stopping and the best-model choice use ``data.eval_split`` (test), the split the AUCs are reported on;
they are therefore slightly optimistic, the same way for every size and model.

Tasks: ESMM's own (CTR and CTCVR trained over all impressions, CVR through pCTCVR only); MMOE (and PLE,
``--models ple``) trains all three directly: CTR on clicks, CVR on purchases over clicked impressions,
CTCVR on purchases. CVR AUC is over clicked test impressions, CTR and CTCVR over all. The oracle is
``oracle_auc`` of the planted model's true probabilities on the same test split.

Writes ``benchmarks/results/accuracy.json`` (per size, model and task: auc, oracle_auc, gap = oracle -
auc) and ``accuracy.png`` beside it, and prints a markdown table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Mapping, Sequence

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(1, str(BENCH_DIR.parent))

import pyarrow.parquet as pq  # noqa: E402
from common import (  # noqa: E402
    REPO,
    BenchmarkError,
    command_line,
    library_versions,
    machine_info,
    run_logged,
    torchrun_command,
    write_result,
)
from grouping_bench import ensure_dataset  # noqa: E402
from plots import AccuracyPoint, plot_accuracy  # noqa: E402
from sweep_bench import HEAD_OVERRIDES, MODELS, threads_per_rank  # noqa: E402
from train_cpu_bench import TASKS, read_summary  # noqa: E402

from dist_mtl.data.synthetic import REAL_TRAIN_IMPRESSIONS, TRUTH_COLUMNS, SyntheticConfig, oracle_auc  # noqa: E402

DEFAULT_SIZES = "0.5M,2M,8M"
DEFAULT_WORLD = SyntheticConfig(
    test_impressions=500_000,
    history_ids_per_user=500.0,
    click_rate=0.10,
    buy_rate_after_click=0.10,
    seed=0,
)
MODEL_SELECTION_NOTE = (
    "the data has only train and test splits (as Ali-CCP): early stopping and the best-model choice use "
    "data.eval_split (test), the split the AUCs are reported on"
)
_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_count(text: str) -> int:
    """'500000', '500_000', '500k', '0.5M' -> 500000 (a whole positive number of impressions)."""
    match = _COUNT.match(text.replace("_", ""))
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count such as 500000, 500k or 0.5M")
    number, unit = match.groups()
    value = float(number) * {"": 1, "k": 1_000, "m": 1_000_000}[unit.lower()]
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole positive number of impressions")
    return int(value)


def parse_sizes(text: str) -> list[int]:
    """Comma-separated counts -> sorted distinct train sizes."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("--sizes needs at least one size, e.g. 0.5M,2M,8M")
    return sorted({parse_count(p) for p in parts})


def world_config(sizes: Sequence[int], base: SyntheticConfig, vocab_scale: float | None) -> SyntheticConfig:
    """The world every size shares: ``base`` with a fixed vocabulary scale (default: the largest size's
    share of Ali-CCP's train impressions, what ``SyntheticConfig`` would pick for it alone)."""
    scale = min(1.0, max(sizes) / REAL_TRAIN_IMPRESSIONS) if vocab_scale is None else vocab_scale
    return dataclasses.replace(base, vocab_scale=scale)


def truth_digest(path: Path) -> str:
    """sha256 of a truth file's rows (ids, labels, probabilities), independent of Parquet encoding."""
    table = pq.read_table(path, columns=list(TRUTH_COLUMNS))
    digest = hashlib.sha256()
    for name in TRUTH_COLUMNS:
        digest.update(table.column(name).to_numpy().tobytes())
    return digest.hexdigest()


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def task_results(metrics: Mapping[str, float], oracle: Mapping[str, float]) -> dict[str, dict]:
    """{task: {"auc", "oracle_auc", "gap"}} for the tasks in ``metrics``; gap = oracle - auc. An
    undefined AUC (one class only) is None, and so is the gap then."""
    out = {}
    for task in TASKS:
        if f"{task}/auc" not in metrics:
            continue
        auc = _finite_or_none(metrics[f"{task}/auc"])
        best = _finite_or_none(oracle.get(task))
        out[task] = {"auc": auc, "oracle_auc": best,
                     "gap": None if auc is None or best is None else best - auc}
    return out


def job_overrides(model: str, data: Path, run_dir: Path, epochs: int, extra: Sequence[str]) -> list[str]:
    """``launch/train.py`` overrides: the recipe of the config file, the model's head and tasks."""
    return [f'data.path="{data}"', f'run_dir="{run_dir}"', "sharding.device=cpu", f"train.epochs={epochs}",
            "train.progress_bar=false", *HEAD_OVERRIDES[model], *extra]


def accuracy_points(accuracy: Mapping[str, Mapping[str, Mapping[str, Mapping]]]) -> list[AccuracyPoint]:
    """The plot's points from the result's ``accuracy`` section ({size: {model: {task: row}}})."""
    return [AccuracyPoint(model, task, int(size), row["auc"], row["oracle_auc"])
            for size, models in accuracy.items() for model, tasks in models.items() for task, row in tasks.items()]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def markdown_table(record: Mapping) -> str:
    """The RESULTS.md section: a row per (size, model), AUC and gap to the oracle per task."""
    def cell(row: Mapping | None) -> str:
        if not row or row["auc"] is None:
            return "-"
        return f"{row['auc']:.4f} ({row['gap']:+.4f})" if row["gap"] is not None else f"{row['auc']:.4f}"

    data, world = record["data"], record["data"]["synthetic_config"]
    lines = [
        f"Learning curve, synthetic Ali-CCP: test split of {data['test_impressions']:,} impressions shared by every "
        f"size, ~{world['history_ids_per_user']:.0f} history ids per user, click rate {world['click_rate']:.0%}, "
        f"purchase after click {world['buy_rate_after_click']:.0%}; "
        f"{record['recipe']['config']}, {_plural(record['recipe']['epochs'], 'epoch')}, "
        f"{_plural(record['recipe']['world_size'], 'rank')}; "
        f"{record['machine']['usable_cores']} cores ({record['machine']['cpu_model']}), {record['date']}",
        "",
        f"Model selection: {record['model_selection']}. Cells: test AUC (gap to the oracle, oracle - AUC).",
        "",
        "| train impressions | model | " + " | ".join(f"{t.upper()} AUC" for t in TASKS) + " | best step / steps |",
        "| ---: | --- | " + " | ".join("---:" for _ in TASKS) + " | ---: |",
    ]
    for size, models in record["accuracy"].items():
        for model, tasks in models.items():
            run = record["runs"][size][model]
            lines.append(f"| {int(size):,} | {model.upper()} | " + " | ".join(cell(tasks.get(t)) for t in TASKS)
                         + f" | {run['best_step']} / {run['steps']} |")
    oracle = record["oracle_auc"]
    lines.append("| - | oracle | " + " | ".join("-" if oracle.get(t) is None else f"{oracle[t]:.4f}" for t in TASKS)
                 + " | - |")
    lines += ["", f"`{record['command']}`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes(DEFAULT_SIZES),
                        help=f"train impressions, comma-separated (default {DEFAULT_SIZES})")
    parser.add_argument("--test-impressions", type=parse_count, default=DEFAULT_WORLD.test_impressions)
    parser.add_argument("--history-ids-per-user", type=float, default=DEFAULT_WORLD.history_ids_per_user)
    parser.add_argument("--vocab-scale", type=float, default=None,
                        help="table sizes as a share of Ali-CCP's, in (0, 1] (default: largest size / 42.3M)")
    parser.add_argument("--seed", type=int, default=DEFAULT_WORLD.seed)
    parser.add_argument("--models", nargs="+", choices=tuple(HEAD_OVERRIDES), default=list(MODELS))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2, help="ranks (torchrun --nproc_per_node)")
    parser.add_argument("--config", default=str(REPO / "configs" / "synthetic_cpu.toml"))
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra launch/train.py override for every run (repeatable)")
    parser.add_argument("--work-dir", default=str(REPO / "data_out" / "bench" / "accuracy"))
    parser.add_argument("--out", default=str(BENCH_DIR / "results" / "accuracy.json"),
                        help="result JSON; the PNG goes beside it")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.nproc < 1:
        parser.error("--epochs and --nproc must be >= 1")
    world = world_config(args.sizes, dataclasses.replace(
        DEFAULT_WORLD, test_impressions=args.test_impressions, history_ids_per_user=args.history_ids_per_user,
        seed=args.seed), args.vocab_scale)
    try:
        world.validate()
    except ValueError as e:
        parser.error(str(e))
    command = command_line(__file__, sys.argv[1:] if argv is None else argv)
    work = Path(args.work_dir).resolve()
    config = Path(args.config).resolve()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_rank(machine_info()["usable_cores"] or 1, args.nproc))}

    def say(text: str) -> None:
        print(f"[accuracy_bench] {text}", flush=True)

    say(f"model selection: {MODEL_SELECTION_NOTE}")
    accuracy: dict[str, dict] = {}
    runs: dict[str, dict] = {}
    oracles: dict[str, dict] = {}
    digests: dict[str, str] = {}
    for size in args.sizes:
        data = ensure_dataset(work / "data" / f"train_{size}", dataclasses.replace(world, train_impressions=size))
        digests[str(size)] = truth_digest(data / "truth_test.parquet")
        oracle = oracle_auc(data / "truth_test.parquet")
        oracles[str(size)] = {t: _finite_or_none(v) for t, v in oracle.items()}
        accuracy[str(size)], runs[str(size)] = {}, {}
        for model in args.models:
            run_dir = work / "runs" / f"{model}-{size}"
            shutil.rmtree(run_dir, ignore_errors=True)  # never read a stale summary.json
            cmd = torchrun_command(REPO / "launch" / "train.py", args.nproc, [
                "--config", str(config), *job_overrides(model, data, run_dir, args.epochs, args.override)])
            log = work / "logs" / f"{model}-{size}.log"
            say(f"{model} on {size:,} train impressions: log {log}")
            measured = run_logged(cmd, log, f"{model} training on {size:,} impressions", cwd=REPO, env=env)
            summary = read_summary(run_dir / "summary.json")
            splits = (summary["config"]["data"]["val_split"] or summary["eval_split"], summary["eval_split"])
            if splits != ("test", "test"):
                raise BenchmarkError(f"{run_dir}/summary.json: validation/evaluation splits {splits}, expected "
                                     f"('test', 'test'): the data has no other split to select models on")
            accuracy[str(size)][model] = task_results(summary["metrics"], oracle)
            runs[str(size)][model] = {
                "steps": summary["steps"], "best_step": summary["best_step"],
                "samples_trained": summary["samples_trained"], "train_samples_per_s": summary["train_samples_per_s"],
                "wall_seconds": summary["wall_seconds"], "process_seconds": measured.seconds,
                "peak_rss_mb_largest_process": measured.peak_rss_mb,
                "peak_rss_all_processes_mb": measured.peak_rss_all_mb, "eval_history": summary["history"],
                "command": shlex.join(cmd), "log": str(log),
            }
            say(f"{model} {size:,}: " + ", ".join(
                f"{t} {r['auc']:.4f} (oracle {r['oracle_auc']:.4f})" for t, r in accuracy[str(size)][model].items()
                if r["auc"] is not None and r["oracle_auc"] is not None))
    same_test = len(set(digests.values())) == 1
    if not same_test:
        say("WARNING: the test split differs between sizes (truth digests differ); each size's own oracle is kept")
    first = str(args.sizes[0])
    payload = {
        "sizes": args.sizes,
        "models": list(args.models),
        "model_selection": MODEL_SELECTION_NOTE,
        "recipe": {"config": str(config.relative_to(REPO)) if config.is_relative_to(REPO) else str(config),
                   "epochs": args.epochs, "world_size": args.nproc, "extra_overrides": list(args.override),
                   "omp_num_threads_per_rank": env["OMP_NUM_THREADS"],
                   "tasks": {m: HEAD_OVERRIDES[m] for m in args.models}},
        "accuracy": accuracy,
        "oracle_auc": oracles[first],
        "oracle_auc_per_size": oracles,
        "runs": runs,
        "data": {"synthetic_config": dataclasses.asdict(world), "test_impressions": args.test_impressions,
                 "same_test_split_for_every_size": same_test, "truth_test_sha256": digests,
                 "work_dir": str(work)},
    }
    record = write_result(args.out, "accuracy", command, payload,
                          library_versions(["torch", "torchrec", "fbgemm-gpu-cpu", "pyarrow", "numpy", "torchmetrics"]))
    out = Path(args.out)
    png = plot_accuracy(
        accuracy_points(accuracy), out.with_suffix(".png"),
        f"dist_mtl test AUC vs train size, synthetic Ali-CCP ({args.test_impressions:,} test impressions); "
        f"oracle dashed; model selection on test (no validation split)",
    )
    say(f"wrote {out} and {png}")
    print("\n" + markdown_table(record), flush=True)
    return record


if __name__ == "__main__":
    main()
