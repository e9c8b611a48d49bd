"""Converter benchmark: synthetic raw Ali-CCP text -> dist_mtl dataset; wall time, peak RSS, full-data estimate.

    python benchmarks/convert_bench.py [--impressions 2000000] [--test-impressions 200000] [--work-dir DIR]

Generates the raw files with ``synthetic.write_raw`` (default history length, ~500 ids per user row) in
one subprocess, converts them with ``launch/convert.py raw`` in another (wall time, peak RSS and CPU
time of that process), and extrapolates to the full data (42.3M + 43.0M impressions, ~730k user rows
of ~518 features per split) by the larger of the impression ratio and the user-feature ratio. Writes
``benchmarks/results/convert.json``. The parent imports nothing heavy before the conversion ends, so
the child's peak RSS is not inflated by the pages it inherits at fork.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

FULL_IMPRESSIONS = 42_300_135 + 43_016_840
FULL_USER_ROWS_PER_SPLIT = 730_000
FULL_FEATURES_PER_USER_ROW = 518
FULL_USER_FEATURES = 2 * FULL_USER_ROWS_PER_SPLIT * FULL_FEATURES_PER_USER_ROW
FULL_RAW_BYTES = 2 * (10.9e9 + 8.6e9)  # train sizes from ALI_CCP.md; the test split is about as large
RESULT = common.REPO / "benchmarks" / "results" / "convert.json"


def _generate(raw_dir: Path, impressions: int, test_impressions: int, history: float, seed: int) -> None:
    from dist_mtl.data.synthetic import SyntheticConfig, dataset_fingerprint, write_raw

    cfg = SyntheticConfig(
        train_impressions=impressions, test_impressions=test_impressions, history_ids_per_user=history, seed=seed
    )
    report = write_raw(raw_dir, cfg)
    for split in report["splits"]:
        (raw_dir / f"truth_{split}.parquet").unlink()  # not read by the converter
    (raw_dir / "generated.json").write_text(json.dumps(
        {"config": cfg.__dict__, "fingerprint": dataset_fingerprint(cfg), "report": report}, default=str))


def _generated_by_this_generator(raw_dir: Path, impressions: int, test_impressions: int, history: float,
                                 seed: int) -> bool:
    """Whether ``raw_dir`` holds finished raw files of these sizes written by the current generator
    version (the folder name says the sizes, not the version: text of an older generator is redone)."""
    from dist_mtl.data.synthetic import SyntheticConfig, dataset_fingerprint

    record = raw_dir / "generated.json"
    if not record.exists():
        return False
    cfg = SyntheticConfig(
        train_impressions=impressions, test_impressions=test_impressions, history_ids_per_user=history, seed=seed
    )
    return json.loads(record.read_text()).get("fingerprint") == json.loads(json.dumps(dataset_fingerprint(cfg), default=str))


def _dataset_sizes(out_dir: Path) -> dict:
    """Counts read back from the written dataset (after the measured run, so imports cost it nothing)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from dist_mtl.data.schema import USER_FIELDS, DatasetMetadata

    meta = DatasetMetadata.load(out_dir)
    user_features = 0
    for info in meta.splits.values():
        for part in info.parts:
            users = pq.read_table(out_dir / part.users, columns=[f.name for f in USER_FIELDS])
            for spec in USER_FIELDS:
                column = users.column(spec.name)
                user_features += (
                    int(pc.sum(pc.list_value_length(column)).as_py() or 0) if spec.multi_valued
                    else int(pc.sum(pc.not_equal(column, 0)).as_py() or 0)
                )
    return {
        "impressions": sum(s.num_impressions for s in meta.splits.values()),
        "user_rows": sum(s.num_users for s in meta.splits.values()),
        "user_features_kept": user_features,
        "skipped": {name: s.skipped for name, s in meta.splits.items()},
        "dataset_bytes": sum(p.stat().st_size for p in out_dir.rglob("*.parquet")),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impressions", type=int, default=2_000_000, help="train impressions to generate")
    parser.add_argument("--test-impressions", type=int, default=200_000)
    parser.add_argument("--history-ids-per-user", type=float, default=500.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default="/tmp/dist_mtl_convert_bench", help="raw files and dataset go here")
    parser.add_argument("--result", default=str(RESULT), help="result JSON to write")
    parser.add_argument("--generate-into", help=argparse.SUPPRESS)  # internal: the generation subprocess
    args = parser.parse_args(argv)
    if args.generate_into:
        _generate(Path(args.generate_into), args.impressions, args.test_impressions, args.history_ids_per_user,
                  args.seed)
        return {}

    work = Path(args.work_dir)
    raw_dir = work / f"raw-{args.impressions}-{args.test_impressions}-{args.history_ids_per_user:g}-{args.seed}"
    if not _generated_by_this_generator(raw_dir, args.impressions, args.test_impressions,
                                        args.history_ids_per_user, args.seed):
        shutil.rmtree(raw_dir, ignore_errors=True)
        common.run_logged(
            [sys.executable, __file__, "--generate-into", raw_dir, "--impressions", args.impressions,
             "--test-impressions", args.test_impressions, "--history-ids-per-user", args.history_ids_per_user,
             "--seed", args.seed],
            work / "generate.log", "synthetic raw generation", cwd=common.REPO,
        )
    out_dir = work / "dataset"
    shutil.rmtree(out_dir, ignore_errors=True)
    convert_cmd = [sys.executable, common.REPO / "launch" / "convert.py", "raw", "--raw-dir", raw_dir,
                   "--out", out_dir]
    load_before = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = common.run_logged(convert_cmd, work / "convert.log", "conversion", cwd=common.REPO)
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)

    sizes = _dataset_sizes(out_dir)
    raw_bytes = sum(p.stat().st_size for p in raw_dir.glob("*.csv"))
    generated = json.loads((raw_dir / "generated.json").read_text())["report"]
    common_bytes = sum(s["common_features_bytes"] for s in generated["splits"].values())
    impression_ratio = FULL_IMPRESSIONS / sizes["impressions"]
    feature_ratio = FULL_USER_FEATURES / sizes["user_features_kept"]
    payload = {
        "conversion_command": common.command_line(convert_cmd[1], [str(c) for c in convert_cmd[2:]]),
        "impressions_per_s": round(sizes["impressions"] / run.seconds),
        "raw_mb_per_s": round(raw_bytes / 1e6 / run.seconds, 1),
        "peak_rss_mb": run.peak_rss_mb,
        "wall_seconds": round(run.seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "full_data_minutes_estimate": round(run.seconds * max(impression_ratio, feature_ratio) / 60, 1),
        "full_data_minutes_estimate_by_raw_bytes": round(run.seconds * FULL_RAW_BYTES / raw_bytes / 60, 1),
        "full_data_cpu_minutes_estimate": round(cpu_seconds * max(impression_ratio, feature_ratio) / 60, 1),
        "extrapolation": {
            "full_impressions": FULL_IMPRESSIONS,
            "full_user_features": FULL_USER_FEATURES,
            "impression_ratio": round(impression_ratio, 1),
            "user_feature_ratio": round(feature_ratio, 1),
            "rule": "wall seconds x max(impression ratio, user-feature ratio); the raw-byte figure uses "
            f"{FULL_RAW_BYTES / 1e9:.0f} GB of raw text",
        },
        "sizes": {
            **sizes,
            "raw_bytes": raw_bytes,
            "raw_common_features_bytes": common_bytes,
            "user_features_per_impression": round(sizes["user_features_kept"] / sizes["impressions"], 2),
        },
        "synthetic": {
            "train_impressions": args.impressions,
            "test_impressions": args.test_impressions,
            "history_ids_per_user": args.history_ids_per_user,
            "seed": args.seed,
        },
    }
    argv_used = sys.argv[1:] if argv is None else list(argv)
    record = common.write_result(
        args.result, "convert", common.command_line(__file__, argv_used), payload,
        common.library_versions(["pyarrow", "numpy"]),
    )
    print(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
