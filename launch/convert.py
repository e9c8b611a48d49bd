"""Build a dist_mtl dataset from the raw Tianchi Ali-CCP files or from torch-rechub's preprocessed CSV.

    python launch/convert.py raw --raw-dir D --out O [--min-count N] [--skip-bad-rows] [--splits train,test]
    python launch/convert.py raw --raw-dir D --out O --id-maps-from DATASET --splits day8   (another dataset's id maps)
    python launch/convert.py raw --raw-dir D --out O --keep-negatives 0.1   (train: every click, 10% of the rest)
    python launch/convert.py raw --raw-dir D --out O --validation-share 0.05   (a "val" split held out of train)
    python launch/convert.py rechub --train F --val F --test F --out O [--skip-bad-rows]

Prints progress (rows/s, ETA of the file being read from its size) and a summary with skipped counts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TextIO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_mtl.data.convert import ConvertError, ConvertProgress, convert_raw  # noqa: E402
from dist_mtl.data.raw import RawFormatError  # noqa: E402
from dist_mtl.data.rechub import import_rechub_csv  # noqa: E402
from dist_mtl.data.schema import DatasetError, DatasetMetadata  # noqa: E402


def _positive_int(text: str) -> int:
    """An argparse type: a usage error here, not a ValueError traceback from convert_raw."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class ProgressPrinter:
    """Prints a progress line at most every ``every_s`` seconds and at every change of stage."""

    def __init__(self, out: TextIO, every_s: float = 5.0):
        self.out = out
        self.every_s = every_s
        self._last_print = float("-inf")
        self._stage: tuple[str, str] | None = None
        self._stage_started = 0.0
        self._stage_printed = False

    def __call__(self, p: ConvertProgress) -> None:
        stage = (p.split, p.stage)
        if stage != self._stage:
            self._stage, self._stage_started, self._stage_printed = stage, p.elapsed_s, False
        if p.rows == 0:  # a stage's start event: nothing to rate yet
            return
        if self._stage_printed and p.elapsed_s - self._last_print < self.every_s:
            return
        self._last_print, self._stage_printed = p.elapsed_s, True
        spent = max(p.elapsed_s - self._stage_started, 1e-9)
        done, total = (p.rows, p.rows_total) if p.rows_total else (p.bytes_done, p.bytes_total)
        eta = f", ETA {_duration(spent * (total - done) / done)}" if done and total else ""
        where = f"{_size(p.bytes_done)}/{_size(p.bytes_total)}" if p.bytes_total else f"{p.rows}/{p.rows_total}"
        print(
            f"[{_duration(p.elapsed_s)}] {p.split} {p.stage}: {where}, {p.rows:,} rows, "
            f"{p.rows / spent:,.0f} rows/s{eta}",
            file=self.out,
            flush=True,
        )


_DROPPED_FEATURE_NOTES = (
    ("ignored_unknown_field_features", "features of unknown fields ignored"),
    ("ignored_other_side_field_features", "features of the other file's fields ignored"),
    ("repeated_single_valued_features_dropped", "repeats of single-valued fields dropped"),
    ("single_valued_values_other_than_1_dropped", "values other than 1 of single-valued fields dropped"),
)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v:,}" for k, v in counts.items() if v)


def summary(meta: DatasetMetadata, out_dir: str, seconds: float) -> str:
    impressions = sum(s.num_impressions for s in meta.splits.values())
    rate = impressions / seconds if seconds > 0 else 0.0
    lines = [
        f"dataset written to {out_dir} in {_duration(seconds)} ({impressions:,} impressions, {rate:,.0f}/s; "
        f"source: {meta.source})"
    ]
    for name, s in meta.splits.items():
        lines.append(
            f"  {name}: {s.num_impressions:,} impressions, {s.num_users:,} user rows, {s.num_clicks:,} clicks, "
            f"{s.num_buys:,} buys, {s.num_blocks} blocks"
        )
        lines.append(f"    skipped: {_counts(s.skipped) or 'none'}")
        notes = meta.notes.get("splits", {}).get(name, {}) if isinstance(meta.notes, dict) else {}
        if s.negative_keep_rate < 1.0:
            dropped = notes.get("negative_downsampling", {}).get("non_clicked_dropped", 0)
            lines.append(f"    non-clicked impressions kept: a share {s.negative_keep_rate:g} ({dropped:,} dropped), "
                         f"each weighted {1 / s.negative_keep_rate:g} in sample_weight")
        held = notes.get("validation_holdout") or notes.get("held_out_of")
        if held:
            other = held["split"]
            lines.append(f"    {'held out as' if 'validation_holdout' in notes else 'held out of'} '{other}': "
                         f"{held['user_rows']:,} user rows with {held['impressions']:,} impressions (a share "
                         f"{held['share']:g} of the user rows, seed {held['seed']})")
        # Features dropped inside kept rows (recorded in metadata.json's notes): shown so that a field
        # lost to, say, a changed field id is seen at once.
        for key, label in _DROPPED_FEATURE_NOTES:
            dropped = _counts(notes.get(key) or {})
            if dropped:
                lines.append(f"    {label}: {dropped}")
        outside, encoded = notes.get("ids_outside_id_maps") or {}, notes.get("ids_encoded") or {}
        if outside:
            # Index 0 stands for every id the maps lack: a large share here (a new day converted with
            # --id-maps-from, a high --min-count) is signal the tables cannot tell apart.
            shares = ", ".join(f"{k}={v:,} ({v / max(encoded.get(k, 0), 1):.1%})" for k, v in outside.items())
            lines.append(f"    ids outside the id maps (index 0): {shares}")
    vocab = ", ".join(f"{k}={v:,}" for k, v in meta.vocab_sizes.items())
    lines.append(f"  vocab sizes (index 0 reserved): {vocab}")
    if meta.id_maps is not None:
        taken = meta.notes.get("id_maps_from", {}).get("dataset") if isinstance(meta.notes, dict) else None
        lines.append(f"  id maps: {meta.id_maps['file']} (sha256 {meta.id_maps['sha256'][:16]}...)"
                     + (f", taken from {taken}" if taken else ", built on train"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> DatasetMetadata:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    raw = commands.add_parser("raw", help="raw Tianchi files (sample_skeleton_*.csv + common_features_*.csv)")
    raw.add_argument("--raw-dir", required=True, help="directory holding the raw files")
    raw.add_argument("--out", required=True, help="dataset directory to write")
    raw.add_argument(
        "--min-count", type=_positive_int, help="keep raw ids seen at least this often in train (default 1)"
    )
    raw.add_argument("--splits", default="train,test",
                     help="comma-separated splits; must include train unless --id-maps-from gives the id maps")
    raw.add_argument("--id-maps-from", metavar="DATASET",
                     help="encode with this existing dataset's id maps (and its min count) instead of building "
                          "them on train: new raw files in the id space a model was trained on")
    raw.add_argument("--work-dir", help="where staged files go (default: inside --out)")
    raw.add_argument("--block-impressions", type=_positive_int, default=65536, help="impressions per Parquet block")
    raw.add_argument("--keep-negatives", type=float, default=1.0, metavar="SHARE",
                     help="keep this share of the non-clicked impressions of --downsample (every clicked one is "
                          "kept), each weighted 1/SHARE in a sample_weight column; train with weight_column="
                          "\"sample_weight\" on the tasks over all impressions (default 1: keep all)")
    raw.add_argument("--downsample", default="train", metavar="SPLITS",
                     help="comma-separated splits --keep-negatives applies to (default: train)")
    raw.add_argument("--negative-seed", type=int, default=0, help="seed of the kept negatives' choice")
    raw.add_argument("--validation-share", type=float, default=0.0, metavar="SHARE",
                     help="hold this share of the train split's user rows (each with all its impressions) out "
                          "as the split \"val\", for early stopping and the best model without the test split: "
                          "train with data.val_split=\"val\" (default 0: none)")
    raw.add_argument("--validation-seed", type=int, default=0, help="seed of the held-out user rows' choice")
    rechub = commands.add_parser("rechub", help="torch-rechub preprocessed CSV (one file per split)")
    rechub.add_argument("--train", required=True)
    rechub.add_argument("--val")
    rechub.add_argument("--test")
    rechub.add_argument("--out", required=True, help="dataset directory to write")
    for sub in (raw, rechub):
        sub.add_argument("--skip-bad-rows", action="store_true", help="skip and count bad rows instead of failing")
    args = parser.parse_args(argv)

    splits = [s.strip() for s in getattr(args, "splits", "").split(",") if s.strip()]
    if args.command == "raw" and args.id_maps_from is None and "train" not in splits:
        parser.error(f"--splits {args.splits!r} must include train (the id maps are built on it), "
                     f"or take an existing dataset's with --id-maps-from")
    if args.command == "raw" and args.id_maps_from is not None and args.min_count is not None:
        parser.error("--min-count comes with the id maps of --id-maps-from; leave it out")
    started = time.monotonic()
    try:
        if args.command == "raw":
            meta = convert_raw(
                args.raw_dir,
                args.out,
                splits=splits,
                min_count=args.min_count,
                skip_bad_rows=args.skip_bad_rows,
                block_impressions=args.block_impressions,
                work_dir=args.work_dir,
                progress=ProgressPrinter(sys.stdout),
                id_maps_from=args.id_maps_from,
                keep_negatives=args.keep_negatives,
                downsampled_splits=[s.strip() for s in args.downsample.split(",") if s.strip()],
                negative_seed=args.negative_seed,
                validation_share=args.validation_share,
                validation_seed=args.validation_seed,
            )
        else:
            paths = {split: getattr(args, split) for split in ("train", "val", "test") if getattr(args, split)}
            meta = import_rechub_csv(paths, args.out, skip_bad_rows=args.skip_bad_rows)
    except (RawFormatError, ConvertError, DatasetError) as e:  # DatasetError: an unusable --id-maps-from
        parser.exit(2, f"error: {e}\n")
    print(summary(meta, args.out, time.monotonic() - started), flush=True)
    return meta


if __name__ == "__main__":
    main()
