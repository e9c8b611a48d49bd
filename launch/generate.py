"""Generate a synthetic Ali-CCP with a planted truth.

    python launch/generate.py --out /data/synth --format raw --train-impressions 2000000 --test-impressions 500000

Formats: ``raw`` (Tianchi text + truth parquet), ``rechub`` (torch-rechub CSVs + truth), ``parquet``
(the dist_mtl dataset layout, written directly; truth beside it). Prints progress and a summary with the
oracle (Bayes) AUCs of the planted model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_mtl.data import synthetic  # noqa: E402


class _ProgressPrinter:
    """Prints at most every ``interval`` seconds, and at the end of each split."""

    def __init__(self, interval: float = 5.0):
        self.interval = interval
        self._last = 0.0

    def __call__(self, p: synthetic.GenerationProgress) -> None:
        now = time.monotonic()
        finished = p.impressions_done >= p.impressions_total
        if not finished and now - self._last < self.interval:
            return
        self._last = now
        rate = p.impressions_done / max(p.seconds, 1e-9)
        written = f", {p.bytes_written / 1e6:.0f} MB ({p.bytes_written / 1e6 / max(p.seconds, 1e-9):.1f} MB/s)" \
            if p.bytes_written else ""
        print(f"[{p.split}] {p.impressions_done:,}/{p.impressions_total:,} impressions "
              f"({rate:,.0f}/s){written}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--format", choices=("raw", "rechub", "parquet"), default="raw")
    defaults = synthetic.SyntheticConfig()
    parser.add_argument("--train-impressions", type=int, default=defaults.train_impressions)
    parser.add_argument("--test-impressions", type=int, default=defaults.test_impressions)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--history-ids-per-user", type=float, default=defaults.history_ids_per_user)
    parser.add_argument("--click-rate", type=float, default=defaults.click_rate)
    parser.add_argument("--buy-rate-after-click", type=float, default=defaults.buy_rate_after_click)
    parser.add_argument("--vocab-scale", type=float, default=None,
                        help="scale of the real vocabularies (default: automatic from --train-impressions)")
    parser.add_argument("--signal", type=float, default=defaults.signal, help="strength of the planted model")
    parser.add_argument("--extra-targets", action="store_true",
                        help="add price (regression) and dwell (sample weight) columns; parquet format only")
    parser.add_argument("--progress-seconds", type=float, default=5.0, help="seconds between progress lines")
    parser.add_argument("--skip-oracle", action="store_true",
                        help="do not compute the oracle AUCs (they sort every row of a split in memory)")
    args = parser.parse_args(argv)
    cfg = synthetic.SyntheticConfig(
        train_impressions=args.train_impressions,
        test_impressions=args.test_impressions,
        history_ids_per_user=args.history_ids_per_user,
        click_rate=args.click_rate,
        buy_rate_after_click=args.buy_rate_after_click,
        vocab_scale=args.vocab_scale,
        signal=args.signal,
        extra_targets=args.extra_targets,
        seed=args.seed,
    )
    try:
        cfg.validate()
        if cfg.extra_targets and args.format != "parquet":
            raise ValueError("--extra-targets needs --format parquet")
    except ValueError as e:
        parser.error(str(e))

    out = Path(args.out)
    progress = _ProgressPrinter(args.progress_seconds)
    started = time.perf_counter()
    if args.format == "raw":
        report = synthetic.write_raw(out, cfg, progress=progress)
        truths = {s: out / f"truth_{s}.parquet" for s in synthetic.SPLITS}
        rows = {s: report["splits"][s]["impressions"] for s in synthetic.SPLITS}
        written = report["bytes"]
    elif args.format == "rechub":
        report = synthetic.write_rechub_csv(out, cfg, progress=progress)
        truths = {s: out / f"truth_{s}.parquet" for s in ("train", "val", "test")}
        rows = {s: report["files"][s]["rows"] for s in truths}
        written = sum(f["bytes"] for f in report["files"].values())
    else:
        meta = synthetic.write_parquet_direct(out, cfg, progress=progress)
        report = {"metadata": meta}
        truths = {s: out / f"truth_{s}.parquet" for s in synthetic.SPLITS}
        rows = {s: meta.splits[s].num_impressions for s in synthetic.SPLITS}
        written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    seconds = time.perf_counter() - started
    generated = cfg.train_impressions + cfg.test_impressions
    print(f"wrote {args.format} to {out}: {written / 1e6:,.1f} MB in {seconds:,.1f} s "
          f"({generated / max(seconds, 1e-9):,.0f} impressions/s, {written / 1e6 / max(seconds, 1e-9):,.1f} MB/s)")
    oracle = {}
    for name, path in truths.items():
        if rows[name] == 0 or args.skip_oracle:
            continue
        oracle[name] = synthetic.oracle_auc(path)
        aucs = ", ".join(f"{task} {value:.4f}" for task, value in oracle[name].items())
        print(f"  {name}: {rows[name]:,} rows; oracle AUC {aucs}")
    return {"report": report, "oracle_auc": oracle, "seconds": seconds, "bytes": written}


if __name__ == "__main__":
    main()
