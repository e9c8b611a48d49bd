"""Ali-CCP at full size on one box: generate, convert, train one ESMM epoch on 2 CPU ranks, evaluate.

    .venv/bin/python benchmarks/full_scale.py                  # full size: 42.3M train + 43.0M test
    .venv/bin/python benchmarks/full_scale.py --scale 0.02     # the same recipe at 2% (a rehearsal)
    .venv/bin/python benchmarks/full_scale.py --heads mmoe ple esmm_factors esmm_best  # more lines, same data

``--heads`` adds a step per head (``train_mmoe``, ``train_ple``, ``train_esmm_factors``, ``train_esmm_best``)
that trains it on the same Parquet set and evaluates it the same way; these heads train the three tasks
directly (CVR on purchases over clicked impressions, as ``accuracy_bench.py`` does), MMOE and PLE with
experts (PLE: levels) ``--expert-dims`` and ESMM's towers, ``esmm_factors`` is ESMM with its
``FACTOR_OVERRIDES``, ``esmm_best`` that with a linear CVR readout and a second epoch that trains the tables
alone (``BEST_ESMM_OVERRIDES``, the closest ESMM has come to the CVR oracle); the others train one epoch.
The towers are the ESMM paper's 360x200x80 with the heads in bfloat16 (``--tower-dims``,
``--head-precision``); a training step whose command or preset changed is redone, the data steps are kept.

The synthetic stand-in has the real row counts, ~58 impressions per user (~730k user rows per split),
~500 history ids per user row, the real per-field vocabularies and label rates (Ali-CCP's 3.9% CTR and
0.54% CVR after click), and keeps its planted truth for the oracle AUCs. Each step runs as its own
process (peak RSS measured per step) and records itself in ``<work>/steps/<step>.json`` when done, so an
interrupted run resumes at the first unfinished step (``--force STEP`` redoes one).

Disk: the raw text of the full set is ~40 GB. When the free space cannot hold raw text, Parquet and the
converter's staging, raw text is generated for a stated share only (same per-field vocabularies), the
converter is timed on that share and extrapolated, and the training set is written straight to Parquet by
the same generator; the report says which was done.
Writes ``benchmarks/results/full_scale.json``; prints a markdown table for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from common import REPO, command_line, library_versions, run_logged, write_result  # noqa: E402
from sweep_bench import MMOE_TASKS  # noqa: E402
from dist_mtl.data.schema import DatasetMetadata  # noqa: E402
from dist_mtl.data.synthetic import SyntheticConfig, dataset_fingerprint, oracle_auc  # noqa: E402

EXTRA_HEADS = ("mmoe", "ple", "esmm_factors", "esmm_best")
HISTORY_FIELDS = '["109_14", "110_14", "127_14", "150_14"]'
#: ESMM with user x item taste factors of rank 8 (model.factor_rank), each history field pooled as a
#: weighted mean and its embeddings reaching the logits through the factors only, and CVR also trained directly on the
#: clicked impressions: what narrowed ESMM's CVR gap in the dev runs of benchmarks/RESULTS.md (Full scale).
FACTOR_OVERRIDES = ("model.head=esmm", "model.factor_rank=8", f"model.factor_only_fields={HISTORY_FIELDS}",
                    f"model.mean_pooled_fields={HISTORY_FIELDS}", MMOE_TASKS)
#: FACTOR_OVERRIDES with CVR read linearly off the head input (a tower fits more of the ~9k purchases'
#: noise) and, over BEST_ESMM_EPOCHS, the dense rate decaying to 0 in the first epoch so that the second
#: trains the tables alone (a second epoch of the towers overfits): RESULTS.md, Full scale (5).
BEST_ESMM_OVERRIDES = (*FACTOR_OVERRIDES, "model.task_tower_dims={cvr=[]}", "optimizer.dense_epochs=1")
BEST_ESMM_EPOCHS = 2
# What a training step records of its run's summary.json.
SUMMARY_KEYS = ("train_seconds", "eval_seconds", "train_samples_per_s", "samples_trained", "metrics", "wall_seconds")

REAL_TRAIN, REAL_TEST = 42_300_135, 43_016_840
# Measured on this generator at the default history length (write_raw of 200k impressions):
# ~0.47 KB of raw text per impression including its share of the common-features rows.
RAW_BYTES_PER_IMPRESSION = 470
PARQUET_BYTES_PER_IMPRESSION = 120


def disk_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9


class Steps:
    """Finished steps and their figures, one JSON file per step."""

    def __init__(self, work: Path, force: set[str], fingerprint: dict):
        self.dir = work / "steps"
        self.dir.mkdir(parents=True, exist_ok=True)
        record = self.dir / "fingerprint.json"
        if record.exists() and json.loads(record.read_text()) != fingerprint:
            # Another size or generator version: none of the finished steps is this run's.
            print(f"[full_scale] {work} holds steps of another config or generator; redoing all", flush=True)
            force = {p.stem for p in self.dir.glob("*.json") if p != record}
        for name in force:
            (self.dir / f"{name}.json").unlink(missing_ok=True)
        record.write_text(json.dumps(fingerprint, sort_keys=True))

    @staticmethod
    def recorded_fingerprint(work: Path) -> dict | None:
        record = work / "steps" / "fingerprint.json"
        return json.loads(record.read_text()) if record.exists() else None

    def forget(self, name: str) -> None:
        (self.dir / f"{name}.json").unlink(missing_ok=True)

    def done(self, name: str) -> dict | None:
        path = self.dir / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def record(self, name: str, figures: dict) -> dict:
        tmp = self.dir / f".{name}.json.tmp"
        tmp.write_text(json.dumps(figures, indent=1))
        tmp.replace(self.dir / f"{name}.json")
        return figures


def raw_text_share(option: float | None, recorded: dict | None, data: dict, free: int, need_total: float) -> float:
    """The share of the set generated as raw text: ``--raw-share`` when given; else the share of the
    finished steps of the same data set in the work directory (their own files now take up the disk this
    run would measure free, and a share measured again would mix steps of two shares); else all of it
    when the disk holds the whole path, or what half the free space holds."""
    if option is not None:
        return option
    if recorded is not None and recorded.get("raw_share") and {**recorded, "raw_share": None} == {
            **data, "raw_share": None}:
        return recorded["raw_share"]
    return 1.0 if free > need_total else max(0.01, (free * 0.5) / need_total)


def run_summary(run_dir: Path) -> dict:
    """What a step records of its run's summary.json, with the test AUCs of each evaluation."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return {**{k: v for k, v in summary.items() if k in SUMMARY_KEYS}, "auc_by_epoch": auc_by_epoch(summary)}


def job_figures(step: dict) -> dict:
    """A training step's times and rate, as the report gives them."""
    return {"train_minutes": step["train_seconds"] / 60, "eval_minutes": step["eval_seconds"] / 60,
            "train_job_minutes": step["minutes"], "train_samples_per_s": step["train_samples_per_s"]}


def head_job(head: str, expert_dims: str) -> tuple[tuple[str, ...], int, dict]:
    """An extra head's config overrides, its epochs and what the report says of its settings."""
    if head == "esmm_factors":
        return FACTOR_OVERRIDES, 1, {"overrides": list(FACTOR_OVERRIDES)}
    if head == "esmm_best":
        return BEST_ESMM_OVERRIDES, BEST_ESMM_EPOCHS, {"overrides": list(BEST_ESMM_OVERRIDES),
                                                      "epochs": BEST_ESMM_EPOCHS}
    if head in ("mmoe", "ple"):
        return ((f"model.head={head}", f"model.expert_dims={expert_dims}", MMOE_TASKS), 1,
                {"expert_dims": json.loads(expert_dims)})
    raise ValueError(f"unknown head {head!r} (expected one of {EXTRA_HEADS})")


def auc_by_epoch(summary: dict) -> list[dict]:
    """Test AUCs of each end-of-epoch evaluation in a run's summary."""
    return [{"epoch": h["epoch"] + 1, "step": h["step"], **{t: h[f"{t}/auc"] for t in ("ctr", "cvr", "ctcvr")}}
            for h in summary["history"]]


def run_step(steps: Steps, name: str, cmd: list[str], output: Path, log_dir: Path, figures=lambda: {},
             settings: dict | None = None) -> dict:
    """Run a step unless it finished before with the same ``settings`` (a training step's command and the
    preset it reads: the data steps stay valid when only those change). ``output`` (the directory the
    step writes) is removed first: a rerun must not build on an earlier attempt's files, nor the trainer
    resume an earlier run."""
    previous = steps.done(name)
    if previous is not None and settings is not None and previous.get("settings") != settings:
        print(f"[{name}] done before with other settings ({previous.get('settings')}); redoing it", flush=True)
        steps.forget(name)
        previous = None
    if previous is not None:
        print(f"[{name}] done before: {previous}", flush=True)
        return previous
    shutil.rmtree(output, ignore_errors=True)
    print(f"[{name}] {' '.join(cmd)}\n  log: {log_dir / (name + '.log')}", flush=True)
    run = run_logged(cmd, log_dir / f"{name}.log", name, cwd=REPO)
    result = {"minutes": run.seconds / 60, "peak_rss_mb": run.peak_rss_mb,
              "peak_rss_all_processes_mb": run.peak_rss_all_mb, **figures()}
    if settings is not None:
        result["settings"] = settings
    print(f"[{name}] {result}", flush=True)
    return steps.record(name, result)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=str(REPO / "data_out" / "full_scale"))
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the real row counts")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--tower-dims", default="[360,200,80]",
                        help="the towers (the ESMM paper's by default; also the extra heads' towers)")
    parser.add_argument("--head-precision", choices=("float32", "bfloat16"), default="bfloat16",
                        help="model.head_precision of the training steps; bfloat16 pays on a CPU with "
                             "AVX512-BF16 (on one without it, pass float32 and --tower-dims \"[64,32]\"); "
                             "measured rates: benchmarks/RESULTS.md, Full scale")
    parser.add_argument("--raw-share", type=float, default=None,
                        help="force raw text for this share only (default: all of it if the disk has room)")
    parser.add_argument("--heads", nargs="*", choices=EXTRA_HEADS, default=[],
                        help="also train and evaluate these heads (steps train_<head>)")
    parser.add_argument("--expert-dims", default="[64,32]",
                        help="the extra heads' expert MLP (MMOE: 4 experts; PLE: one level per entry, 4 shared "
                             "and 1 per-task expert each)")
    parser.add_argument("--force", default="", help="comma-separated steps to redo")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "full_scale.json"))
    args = parser.parse_args(argv)

    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    train_n, test_n = int(REAL_TRAIN * args.scale), int(REAL_TEST * args.scale)
    # Vocabularies of the full data whatever the scale, so a rehearsal exercises the same tables.
    cfg = SyntheticConfig(train_impressions=train_n, test_impressions=test_n, vocab_scale=1.0, seed=0)
    need_raw = (train_n + test_n) * RAW_BYTES_PER_IMPRESSION
    need_total = need_raw * 1.15 + 2 * (train_n + test_n) * PARQUET_BYTES_PER_IMPRESSION
    free = shutil.disk_usage(work).free
    share = raw_text_share(args.raw_share, Steps.recorded_fingerprint(work), dataset_fingerprint(cfg), free,
                           need_total)
    print(f"disk: {free / 1e9:.0f} GB free at {work}; the full path needs ~{need_total / 1e9:.0f} GB "
          f"(raw text ~{need_raw / 1e9:.0f} GB); raw text share: {share:.0%}", flush=True)
    # The share in use, not the option: finished data steps are this run's only if they had the same.
    steps = Steps(work, {s for s in args.force.split(",") if s}, {**dataset_fingerprint(cfg), "raw_share": share})
    logs = work / "logs"

    py = sys.executable
    raw_dir, data_dir, run_dir = work / "raw", work / "parquet", work / "run"
    raw_cfg = cfg if share >= 1.0 else dataclasses.replace(
        cfg, train_impressions=int(train_n * share), test_impressions=int(test_n * share))
    generate = run_step(steps, "generate", [
        py, "launch/generate.py", "--out", str(raw_dir), "--format", "raw",
        "--train-impressions", str(raw_cfg.train_impressions), "--test-impressions", str(raw_cfg.test_impressions),
        "--vocab-scale", "1.0", "--seed", "0"], raw_dir, logs, lambda: {"disk_gb": disk_gb(raw_dir)})
    convert = run_step(steps, "convert", [
        py, "launch/convert.py", "raw", "--raw-dir", str(raw_dir), "--out", str(data_dir)], data_dir, logs,
        lambda: {"disk_gb": disk_gb(data_dir)})
    direct = None
    if share < 1.0:
        # The converter was timed on the share; the training set comes straight from the generator.
        data_dir = work / "parquet_direct"
        direct = run_step(steps, "generate_parquet", [
            py, "launch/generate.py", "--out", str(data_dir), "--format", "parquet",
            "--train-impressions", str(train_n), "--test-impressions", str(test_n), "--vocab-scale", "1.0",
            "--seed", "0"], data_dir, logs, lambda: {"disk_gb": disk_gb(data_dir)})
    def train_job(out: Path, *overrides: str, epochs: int = 1) -> list[str]:
        """``epochs`` of the CPU preset on ``data_dir`` under torchrun, evaluated on the whole test split.

        The dense learning rate decays linearly to 0 over the run (the preset keeps it constant for its
        two epochs with early stopping); measured on this set: +0.0003 / +0.0016 / +0.0013 AUC."""
        return [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                "launch/train.py", "--config", "configs/synthetic_cpu.toml", f'data.path="{data_dir}"',
                f'run_dir="{out}"', f"data.batch_size={args.batch_size}", "data.eval_batch_size=32768",
                f"model.tower_dims={args.tower_dims}", f'model.head_precision="{args.head_precision}"',
                'optimizer.dense_lr_decay="linear"', *overrides,
                f"train.epochs={epochs}", "train.log_every_steps=200"]

    # A training step is redone when anything that shapes it changed: its whole command and the preset
    # it reads, not only the options of this script (its overrides and the preset file change too).
    preset = hashlib.sha256((REPO / "configs" / "synthetic_cpu.toml").read_bytes()).hexdigest()

    def settings(cmd: list[str]) -> dict:
        return {"command": cmd[1:], "preset_sha256": preset}  # not the interpreter's path

    train_cmd = train_job(run_dir)
    train = run_step(steps, "train", train_cmd, run_dir, logs, lambda: run_summary(run_dir), settings(train_cmd))

    extra: dict[str, dict] = {}
    for head in args.heads:
        name, head_dir = f"train_{head}", work / f"run_{head}"
        overrides, epochs, described = head_job(head, args.expert_dims)
        head_cmd = train_job(head_dir, *overrides, epochs=epochs)
        extra[head] = run_step(
            steps, name, head_cmd, head_dir, logs,
            lambda head_dir=head_dir, described=described: {**described, **run_summary(head_dir)},
            settings(head_cmd))

    truth_dir = raw_dir if share >= 1.0 else data_dir
    oracle = oracle_auc(truth_dir / "truth_test.parquet")
    meta = DatasetMetadata.load(data_dir)
    convert_minutes_full = convert["minutes"] / share
    report = {
        "scale": args.scale,
        "raw_text_share": share,
        "what_was_done": ("raw text generated and converted for the whole set" if share >= 1.0 else
                          f"raw text for {share:.0%} (converter timed on it, minutes extrapolated); training "
                          "set written straight to Parquet by the same generator"),
        "train_impressions": meta.split("train").num_impressions,
        "test_impressions": meta.split("test").num_impressions,
        "generate_minutes": generate["minutes"],
        "convert_minutes": convert_minutes_full,
        "convert_minutes_measured": convert["minutes"],
        **job_figures(train),
        "generate_parquet_minutes": None if direct is None else direct["minutes"],
        "peak_rss_mb": {"generate": generate["peak_rss_mb"], "convert": convert["peak_rss_mb"],
                        "train": train["peak_rss_mb"],
                        **({} if direct is None else {"generate_parquet": direct["peak_rss_mb"]})},
        # The step's processes together (sampled; None for steps recorded before it was measured).
        "peak_rss_all_processes_mb": {
            name: step.get("peak_rss_all_processes_mb")
            for name, step in (("generate", generate), ("convert", convert), ("train", train),
                               ("generate_parquet", direct)) if step is not None},
        "disk_gb": {"raw": generate["disk_gb"], "parquet": disk_gb(data_dir), "total": disk_gb(work)},
        "auc": {t: train["metrics"][f"{t}/auc"] for t in ("ctr", "cvr", "ctcvr")},
        "oracle_auc": oracle,
        "embedding_rows": meta.vocab_sizes,
        "world_size": args.nproc,
        "batch_size": args.batch_size,
        "tower_dims": json.loads(args.tower_dims),
        "head_precision": args.head_precision,
        "total_minutes": sum(s["minutes"] for s in (generate, convert, direct, train) if s is not None),
    }
    for head, figures in extra.items():
        report[head] = {
            **{k: figures[k] for k in ("expert_dims", "overrides", "epochs") if k in figures},
            "tower_dims": json.loads(args.tower_dims),
            "head_precision": args.head_precision,
            **job_figures(figures),
            "peak_rss_mb": figures["peak_rss_mb"],
            "peak_rss_all_processes_mb": figures.get("peak_rss_all_processes_mb"),
            "auc": {t: figures["metrics"][f"{t}/auc"] for t in ("ctr", "cvr", "ctcvr")},
            **({"auc_by_epoch": figures["auc_by_epoch"]} if len(figures.get("auc_by_epoch", [])) > 1 else {}),
        }
    rows = [f"| {t} | {report['auc'][t]:.4f} | {oracle[t]:.4f} | {oracle[t] - report['auc'][t]:.4f} |"
            for t in ("ctr", "cvr", "ctcvr")]
    for head in extra:
        rows += [f"| {t} ({head.upper()}) | {report[head]['auc'][t]:.4f} | {oracle[t]:.4f} | "
                 f"{oracle[t] - report[head]['auc'][t]:.4f} |" for t in ("ctr", "cvr", "ctcvr")]
    print("\n| task | test AUC | oracle AUC | gap |\n| --- | --- | --- | --- |\n" + "\n".join(rows))
    print(json.dumps({k: v for k, v in report.items() if k != "embedding_rows"}, indent=1))
    return write_result(args.out, "full_scale", command_line(__file__, argv if argv is not None else sys.argv[1:]),
                        report, library_versions(["torch", "torchrec", "fbgemm-gpu-cpu", "pyarrow"]))


if __name__ == "__main__":
    main()
