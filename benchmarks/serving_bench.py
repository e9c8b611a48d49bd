"""Serving raw requests: an export scoring raw Tianchi lines in one call (``ExportedModel.score_raw``), its
latency per request, and its scores beside those of the converted dataset.

    .venv/bin/python benchmarks/serving_bench.py --model EXPORT --raw-dir RAW [--split test] \
        [--predictions PRED.parquet] [--users 300] [--candidates 1 50 200 1000] [--threads 1] \
        [--out benchmarks/results/serving.json]

EXPORT is ``launch/export.py``'s output with id maps, RAW the raw files of a split (``common_features_<split>.csv``,
``sample_skeleton_<split>.csv``). The first ``--users`` user groups of the split's skeleton, with their users'
common-features lines, are the requests.

- Scores: each group as one request (its user, its impressions); with ``--predictions`` (``launch/predict.py``'s
  output of the same export on the converted split) every score is compared with the converted row's, by
  sample id, and the largest difference is recorded: 0 means that raw text and the converter's Parquet
  reach the model as the same batch.
- Latency: one user per request with C candidate impressions (drawn in turn from the sampled impressions),
  each request encoded (``RawRequestEncoder.encode``) and scored (the TorchScript module) and timed apart,
  the candidate counts taking turns; percentiles over the requests after a warm-up, on ``--threads``
  intra-op threads (a serving worker's share of a machine). Plus the sampled groups in one request, for throughput.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import REPO, BenchmarkError, command_line, library_versions, write_result  # noqa: E402
from group_auc_bench import ScoresBySampleId  # noqa: E402

from dist_mtl.export import load_exported  # noqa: E402

WARMUP = 20
MIN_TIMED = 100  # requests timed per candidate count (at least one per sampled user)


def read_groups(raw_dir: Path, split: str, users: int) -> list[tuple[bytes, list[bytes], list[int]]]:
    """The split's first ``users`` user groups: (user feature list, impressions' feature lists, sample ids),
    without the click=0/buy=1 rows the converter drops; the common-features file is read until every
    sampled user's line is found."""
    groups: dict[bytes, tuple[list[bytes], list[int]]] = {}
    with open(raw_dir / f"sample_skeleton_{split}.csv", "rb") as f:
        for line in f:
            sample_id, click, buy, key, _, features = line.rstrip(b"\n").split(b",", 5)
            if key not in groups and len(groups) == users:
                break
            if click == b"0" and buy == b"1":
                continue
            items, ids = groups.setdefault(key, ([], []))
            items.append(features)
            ids.append(int(sample_id))
    found: dict[bytes, bytes] = {}
    with open(raw_dir / f"common_features_{split}.csv", "rb") as f:
        for line in f:
            key, _, features = line.rstrip(b"\n").split(b",", 2)
            if key in groups:
                found[key] = features
                if len(found) == len(groups):
                    break
    missing = [k for k in groups if k not in found]
    if missing:
        raise BenchmarkError(f"{raw_dir}: no common-features line for user {missing[0].decode()}")
    return [(found[key], items, ids) for key, (items, ids) in groups.items()]


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean())}


def measure(model_dir: Path, raw_dir: Path, split: str, users: int, candidates: list[int],
            predictions: Path | None, threads: int) -> dict:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = load_exported(model_dir)
    encoder = model.request_encoder()
    load_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    groups = read_groups(raw_dir, split, users)
    read_seconds = time.perf_counter() - t0
    impressions = sum(len(items) for _, items, _ in groups)
    print(f"{len(groups)} user groups, {impressions} impressions read in {read_seconds:.1f} s; export loaded in "
          f"{load_seconds:.1f} s", file=sys.stderr)

    check = None
    if predictions is not None:
        recorded = ScoresBySampleId(predictions, [f"p_{t}" for t in model.task_names])
        worst = {t: 0.0 for t in model.task_names}
        for user, items, ids in groups:
            got = model(encoder.encode([user], items))
            want = recorded.take(np.asarray(ids, np.int64))
            for t in model.task_names:
                worst[t] = max(worst[t], float(np.abs(got[t].numpy() - want[f"p_{t}"]).max()))
        check = {"predictions": str(predictions), "impressions_compared": impressions,
                 "max_abs_difference": worst}
        print(f"scores against {predictions}: largest difference {worst}", file=sys.stderr)

    pool = [features for _, items, _ in groups for features in items]
    # The candidate counts take turns request by request, so that a slow stretch of a shared VM falls on
    # every count alike rather than on whichever ran then.
    timings = {c: ([], []) for c in candidates}  # count -> (encode seconds, score seconds)
    timed = max(len(groups), MIN_TIMED)
    for r in range(WARMUP + timed):
        user = groups[r % len(groups)][0]
        for c in candidates:
            start = r * c
            items = [pool[(start + k) % len(pool)] for k in range(c)]
            t0 = time.perf_counter()
            batch = encoder.encode([user], items)
            t1 = time.perf_counter()
            model(batch)
            t2 = time.perf_counter()
            if r >= WARMUP:
                timings[c][0].append(t1 - t0)
                timings[c][1].append(t2 - t1)
    latency = {}
    for c, (encode_s, score_s) in timings.items():
        total = [a + b for a, b in zip(encode_s, score_s)]
        latency[str(c)] = {"requests": len(total), "encode_ms": percentiles(encode_s),
                           "score_ms": percentiles(score_s), "total_ms": percentiles(total),
                           "impressions_per_s": c * len(total) / sum(total)}
        print(f"1 user x {c} candidates: {latency[str(c)]['total_ms']['p50']:.2f} ms p50, "
              f"{latency[str(c)]['total_ms']['p99']:.2f} ms p99 (encode {latency[str(c)]['encode_ms']['p50']:.2f}, "
              f"score {latency[str(c)]['score_ms']['p50']:.2f})", file=sys.stderr)

    user_lists = [user for user, _, _ in groups]
    index = [u for u, (_, items, _) in enumerate(groups) for _ in items]
    batch_s = []
    for _ in range(3):
        t0 = time.perf_counter()
        model.score_raw(user_lists, pool, index)
        batch_s.append(time.perf_counter() - t0)
    return {
        "model": str(model_dir), "raw_dir": str(raw_dir), "split": split, "threads": threads,
        "head": model.info["head"], "vocab_sizes": model.info["vocab_sizes"],
        "export_load_seconds": load_seconds, "users": len(groups), "impressions": impressions,
        "mean_user_features": float(np.mean([u.count(b"\x01") + 1 for u in user_lists])),
        "scores_check": check, "latency_one_user": latency,
        "whole_sample_one_request": {"users": len(groups), "impressions": impressions,
                                     "seconds_best_of_3": min(batch_s),
                                     "impressions_per_s": impressions / min(batch_s)},
        "ids_outside_id_maps": {f: n for f, n in encoder.ids.outside.items() if n},
        "ids_encoded": dict(encoder.ids.encoded),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="an export with id maps")
    parser.add_argument("--raw-dir", type=Path, required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--predictions", type=Path, help="predict.py output of the export on the converted split")
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--candidates", type=int, nargs="+", default=[1, 50, 200, 1000])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serving.json")
    args = parser.parse_args(argv)
    if args.users < 1 or args.threads < 1 or min(args.candidates) < 1:
        parser.error("--users, --threads and --candidates must be >= 1")
    payload = measure(args.model, args.raw_dir, args.split, args.users, args.candidates, args.predictions,
                      args.threads)
    record = write_result(args.out, "serving", command_line(__file__, sys.argv[1:] if argv is None else argv),
                          payload, library_versions(["torch", "torchrec", "fbgemm-gpu-cpu", "pyarrow"]))
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    try:
        main()
    except BenchmarkError as e:
        sys.exit(f"serving_bench: {e}")
