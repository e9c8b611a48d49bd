"""A model trained on one day's logs goes on to the next day's: id maps reused, training continued.

    python benchmarks/later_day_bench.py [--train-impressions 600000] [--test-impressions 100000] [--nproc 2]

One synthetic raw Ali-CCP set (the main job's shape and rates) has its train impressions cut in two
halves at a user-group boundary, "day 1" and "day 2", each with the common-features rows of its own
users, as two days of Tianchi logs would be. Then:

1. day 1 is converted (id maps built on its train half) and day 2 with day 1's maps
   (``launch/convert.py raw --id-maps-from``); the test split goes into both, encoded alike;
2. ESMM trains (the CPU preset: 2 epochs, 2 ranks) on day 1 (``day1``), then on day 2 starting from that
   run's last checkpoint (``day2_from_day1``, ``checkpoint.init_from``), on day 2 from scratch
   (``day2_alone``), and, for reference, on both halves converted as one dataset (``both_days``);
3. each run's test AUCs are set beside the oracle AUCs of the planted model.

Writes ``benchmarks/results/later_day.json``: per run the test AUCs, samples/s and wall time, the share of
day 2's ids outside day 1's maps, and the conversion times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    REPO,
    BenchmarkError,
    command_line,
    library_versions,
    run_logged,
    torchrun_command,
    write_result,
)
from train_cpu_bench import TASKS, read_summary  # noqa: E402

RESULT = REPO / "benchmarks" / "results" / "later_day.json"


def _key(line: bytes) -> bytes:
    """A skeleton line's common_feature_index (the 4th field)."""
    return line.split(b",", 4)[3]


def split_days(raw: Path, day1: Path, day2: Path) -> dict:
    """Cut ``raw``'s train skeleton at the user-group boundary nearest its middle; each day keeps the
    common-features rows of the users its half references, and links the test files."""
    lines = (raw / "sample_skeleton_train.csv").read_bytes().splitlines(keepends=True)
    cut = len(lines) // 2
    while 0 < cut < len(lines) and _key(lines[cut]) == _key(lines[cut - 1]):
        cut += 1
    halves = {day1: lines[:cut], day2: lines[cut:]}
    common = (raw / "common_features_train.csv").read_bytes().splitlines(keepends=True)
    counts = {}
    for day, skeleton in halves.items():
        day.mkdir(parents=True, exist_ok=True)
        (day / "sample_skeleton_train.csv").write_bytes(b"".join(skeleton))
        keys = {_key(line) for line in skeleton}
        users = [row for row in common if row.split(b",", 1)[0] in keys]
        (day / "common_features_train.csv").write_bytes(b"".join(users))
        for name in ("sample_skeleton_test.csv", "common_features_test.csv"):
            link = day / name
            link.unlink(missing_ok=True)
            link.symlink_to((raw / name).resolve())
        counts[day.name.removeprefix("raw_")] = {"impressions": len(skeleton), "user_rows": len(users)}
    return counts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-impressions", type=int, default=600_000, help="both days together")
    parser.add_argument("--test-impressions", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--config", default=str(REPO / "configs" / "synthetic_cpu.toml"))
    parser.add_argument("--work-dir", default="/tmp/dist_mtl_later_day")
    parser.add_argument("--out", default=str(RESULT))
    args = parser.parse_args(argv)
    command = command_line(__file__, sys.argv[1:] if argv is None else argv)

    sys.path.insert(0, str(REPO / "launch"))
    from main_job import DEFAULT_DATA  # the main job's shape and label rates

    from dist_mtl.checkpoint import CheckpointManager
    from dist_mtl.data.synthetic import oracle_auc, write_raw

    work = Path(args.work_dir)
    raw = work / "raw"
    data_cfg = dataclasses.replace(DEFAULT_DATA, train_impressions=args.train_impressions,
                                   test_impressions=args.test_impressions, seed=args.seed)
    print(f"generating {args.train_impressions:,} + {args.test_impressions:,} impressions -> {raw}", flush=True)
    write_raw(raw, data_cfg)
    days = split_days(raw, work / "raw_day1", work / "raw_day2")
    oracle = oracle_auc(raw / "truth_test.parquet")

    python, convert = sys.executable, str(REPO / "launch" / "convert.py")
    conversions = {}
    for name, raw_dir, extra in (("day1", work / "raw_day1", []),
                                 ("day2", work / "raw_day2", ["--id-maps-from", str(work / "day1")]),
                                 ("both_days", raw, [])):
        run = run_logged([python, convert, "raw", "--raw-dir", str(raw_dir), "--out", str(work / name), *extra],
                         work / "logs" / f"convert_{name}.log", f"converting {name}", cwd=REPO)
        # The sampled tree RSS, not wait4's peak: a forked child's peak counts the pages it inherits from
        # this process, which holds the raw generator's memory (convert_bench.py generates in a subprocess
        # for that reason).
        conversions[name] = {"seconds": round(run.seconds, 1), "peak_rss_all_processes_mb": run.peak_rss_all_mb}
        print(f"converted {name} in {run.seconds:.1f}s", flush=True)
    day2_meta = json.loads((work / "day2" / "metadata.json").read_text())
    day2_notes = day2_meta["notes"]["splits"]["train"]
    outside = {k: {"ids": v, "share": v / day2_notes["ids_encoded"][k]}
               for k, v in day2_notes["ids_outside_id_maps"].items()}
    day1_maps = json.loads((work / "day1" / "metadata.json").read_text())["id_maps"]
    if day2_meta["id_maps"] != day1_maps:
        raise BenchmarkError(f"day 2 was not encoded with day 1's id maps: {day2_meta['id_maps']} vs {day1_maps}")

    def train(name: str, data: str, *overrides: str) -> dict:
        run_dir = work / "runs" / name
        cmd = torchrun_command(REPO / "launch" / "train.py", args.nproc, [
            "--config", args.config, f'data.path="{work / data}"', f'run_dir="{run_dir}"', "train.progress_bar=false",
            *overrides])
        shutil.rmtree(run_dir, ignore_errors=True)
        run = run_logged(cmd, work / "logs" / f"train_{name}.log", f"training {name}", cwd=REPO)
        summary = read_summary(run_dir / "summary.json")
        result = {
            "data": data, "overrides": list(overrides),
            "auc": {t: summary["metrics"][f"{t}/auc"] for t in TASKS},
            "gap_to_oracle": {t: oracle[t] - summary["metrics"][f"{t}/auc"] for t in TASKS},
            "samples_trained": summary["samples_trained"],
            "train_samples_per_s": round(summary["train_samples_per_s"]),
            "wall_seconds": round(run.seconds, 1),
            "initialized_from": summary.get("initialized_from"),
        }
        print(f"{name}: " + " / ".join(f"{t} {result['auc'][t]:.4f}" for t in TASKS), flush=True)
        return result

    runs = {"day1": train("day1", "day1")}
    day1_checkpoint = CheckpointManager(work / "runs" / "day1" / "checkpoints").latest()
    runs["day2_from_day1"] = train("day2_from_day1", "day2", f'checkpoint.init_from="{day1_checkpoint}"')
    runs["day2_alone"] = train("day2_alone", "day2")
    runs["both_days"] = train("both_days", "both_days")

    lines = [f"{'run':<16}{'impressions':>12}" + "".join(f"{t + ' AUC':>11}" for t in TASKS)]
    for name, r in runs.items():
        lines.append(f"{name:<16}{r['samples_trained']:>12,}" + "".join(f"{r['auc'][t]:>11.4f}" for t in TASKS))
    lines.append(f"{'oracle':<16}{'':>12}" + "".join(f"{oracle[t]:>11.4f}" for t in TASKS))
    print("\n".join(lines))
    payload = {
        "data": dataclasses.asdict(data_cfg), "days": days, "nproc": args.nproc, "config": args.config,
        "oracle_auc": oracle, "conversions": conversions, "day2_ids_outside_day1_maps": outside, "runs": runs,
    }
    if any(math.isnan(v) for r in runs.values() for v in r["auc"].values()):
        raise BenchmarkError(f"a run scored NaN: {runs}")
    return write_result(args.out, "later_day", command, payload,
                        library_versions(["torch", "torchrec", "fbgemm-gpu-cpu", "pyarrow"]))


if __name__ == "__main__":
    main()
