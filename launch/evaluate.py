"""Evaluate a checkpoint on a split, on N ranks, without training:

    torchrun --nproc_per_node=N launch/evaluate.py --checkpoint runs/x/best/step-00000148 --out runs/x_eval \
        [--split test] [--predictions] [--config CONFIG] [key=value ...]

The model is the checkpoint's (its tables resharded for this job's ranks), the config the run's
(``<run_dir>/config.toml`` beside the checkpoint's folder unless ``--config`` names another; ``key=value``
overrides apply on top, e.g. ``data.path="data_out/day2"`` for a later day converted with
``--id-maps-from``), the split ``--split`` (default: the config's ``data.eval_split``). Prints the metrics
training reports (ESMM: CTR and CTCVR AUC over all impressions, CVR AUC over clicked ones; the group AUC
with ``train.group_auc=true``) and writes them to ``<out>/evaluation.json`` (see
``Trainer.evaluate_checkpoint``). ``--predictions`` also keeps every score: each rank writes its
impressions' to ``<out>/predictions/rank-<r>.parquet``, in the columns of ``launch/predict.py``'s file
(``index``, the impression's position in the split, ``sample_id``, ``p_<task>``), so that
``pyarrow.parquet.read_table("<out>/predictions").sort_by("index")`` is what predict.py writes of an
export of the same checkpoint in one process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.train import quiet_library_noise, run_as_script, run_config_or_usage_error  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a committed checkpoint (<run_dir>/checkpoints/step-N or <run_dir>/best/step-N)")
    parser.add_argument("--out", type=Path, required=True,
                        help="directory of this evaluation (must not hold checkpoints)")
    parser.add_argument("--split", help="split to evaluate (default: the config's data.eval_split)")
    parser.add_argument("--predictions", action="store_true",
                        help="also write every impression's scores, one Parquet file per rank under <out>/predictions")
    parser.add_argument("--config", type=Path,
                        help="job config (default: the config.toml of the checkpoint's run directory)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides (TOML values)")
    args = parser.parse_args(argv)

    # <run_dir>/checkpoints/step-N or <run_dir>/best/step-N
    cfg = run_config_or_usage_error(parser, args.checkpoint.resolve().parent.parent, args.config, args.overrides)
    split = args.split or cfg.data.eval_split
    cfg.run_dir = str(args.out)
    cfg.checkpoint.resume = False
    cfg.checkpoint.init_from = ""
    # Only this split is read. It stands in for the train split too, which the job's planner reads its
    # table loads from and which a dataset of one later day may not have.
    cfg.data.eval_split = cfg.data.train_split = split
    cfg.data.val_split = ""
    cfg.profile.steps = 0

    quiet_library_noise()
    from dist_mtl.distributed import init_distributed, shutdown_distributed
    from dist_mtl.trainer import INPUT_ERRORS, Trainer

    ctx = init_distributed(cfg.sharding.device)
    try:
        return Trainer(cfg, ctx).evaluate_checkpoint(args.checkpoint, predictions=args.predictions)
    except INPUT_ERRORS as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")  # the message names the problem; no traceback
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    run_as_script(main)
