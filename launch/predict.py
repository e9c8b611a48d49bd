"""Score a dataset split with an exported model:
``python launch/predict.py --model exports/x --data data_out/ali_ccp --split test --out preds.parquet``.

Reads the split in storage order (one process) and writes ``index`` (position in the split),
``sample_id`` and one ``p_<task>`` column per task (ESMM: p_ctr, p_cvr, p_ctcvr). Prints a JSON summary
whose ``metrics`` are the scores' metrics against the split's labels, task by task on the task's rows as
training evaluates them (ESMM: CTR and CTCVR AUC over all impressions, CVR AUC over clicked ones);
``--no-metrics`` leaves them out (a split without the tasks' label columns); ``--group-auc`` adds each
binary task's group AUC over user rows (default: as the model's training run did).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="export directory (launch/export.py)")
    parser.add_argument("--data", type=Path, required=True, help="dataset directory (holds metadata.json)")
    parser.add_argument("--split", default="test", help="split to score (default: test)")
    parser.add_argument("--out", type=Path, required=True, help="Parquet file to write")
    parser.add_argument("--batch-size", type=int, default=16384, help="impressions per scoring batch")
    parser.add_argument("--no-metrics", dest="metrics", action="store_false",
                        help="score only; do not evaluate the scores against the split's labels")
    parser.add_argument("--group-auc", action=argparse.BooleanOptionalAction, default=None,
                        help="evaluate each binary task's group AUC over user rows as well (default: as the "
                             "model's training run did, train.group_auc)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (on standard error) while scoring")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.group_auc and not args.metrics:
        parser.error("--group-auc is a metric: it cannot go with --no-metrics")

    from tqdm import tqdm

    from dist_mtl.export import INPUT_ERRORS, predict_split

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="scored", unit=" impressions", unit_scale=True, dynamic_ncols=True,
                       disable=not args.progress)
        bar.update(done - bar.n)

    try:
        summary = predict_split(args.model, args.data, args.split, args.out, args.batch_size, metrics=args.metrics,
                                group_auc=args.group_auc, progress=progress)
    except INPUT_ERRORS as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")  # the message names the problem; no traceback
    finally:
        if bar is not None:
            bar.close()
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
