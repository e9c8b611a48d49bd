"""Dev diagnostic (#9): how far has training moved each table from its random start?

    .venv/bin/python benchmarks/dev/table_start_probe.py --checkpoint RUN/checkpoints/step-N \
        [--fields 109_14 110_14 127_14 150_14] [--out probe.json]

Reads one committed checkpoint (no process group; only the named tables and their row-wise Adagrad
accumulators are loaded) and the run's ``config.toml`` beside ``checkpoints/``. Per field: the rows;
percentiles of each row's accumulator root, sqrt(sum over steps of the mean squared gradient), the
quantity row-wise Adagrad divides by; the share of rows where it is still below ``optimizer.sparse_eps``
(the field's entry of ``field_sparse_eps`` where set), where a step is plain SGD at rate lr / eps; and the
median norm of the rows' start (recomputed from ``train.seed`` and ``model.field_init_scale`` as the
trainer drew it) beside the median distance the rows have moved from it. A row that moved less than its
start's size is mostly its start: for a history list pooled as a mean, noise every user row carries.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))
from common import command_line, library_versions, write_result  # noqa: E402

from dist_mtl.checkpoint import MODEL_PREFIX, TABLE_OPTIM_PREFIX, is_committed, read_tensor_shapes  # noqa: E402
from dist_mtl.config import load_config  # noqa: E402
from dist_mtl.distributed import initial_table  # noqa: E402

HISTORY_FIELDS = ["109_14", "110_14", "127_14", "150_14"]


def field_keys(shapes: dict[str, tuple[int, ...]], field: str) -> tuple[str, str]:
    """The checkpoint keys of a field's table and of its row-wise accumulator."""
    tables = [k for k in shapes if k.startswith(MODEL_PREFIX) and k.endswith(f".embedding_bags.t_{field}.weight")]
    if len(tables) != 1:
        raise ValueError(f"the checkpoint holds {len(tables)} tables for field {field!r}: {tables}")
    accumulators = [k for k in shapes if k.startswith(f"{TABLE_OPTIM_PREFIX}{tables[0][len(MODEL_PREFIX):]}/")
                    and len(shapes[k]) == 1]
    if len(accumulators) != 1:
        raise ValueError(f"table {tables[0]} has {len(accumulators)} per-row optimizer states "
                         f"(row-wise Adagrad keeps one): {accumulators}")
    return tables[0], accumulators[0]


def probe(checkpoint: Path, config: Path, fields: list[str]) -> dict:
    if not is_committed(checkpoint):
        raise ValueError(f"{checkpoint} is not a committed checkpoint")
    cfg = load_config(config)
    shapes = read_tensor_shapes(checkpoint)
    keys = {f: field_keys(shapes, f) for f in fields}
    state = {k: torch.empty(shapes[k]) for pair in keys.values() for k in pair}
    dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)  # as checkpoint.load_unsharded reads alone
    result = {}
    for f, (table_key, accumulator_key) in keys.items():
        rows = state[table_key]
        root = state[accumulator_key].sqrt().numpy()
        eps = cfg.optimizer.field_sparse_eps.get(f, cfg.optimizer.sparse_eps)
        # The start's key is the trainer's DMP state-dict key: the checkpoint's model key without its prefix.
        start = initial_table(cfg.train.seed, table_key[len(MODEL_PREFIX):], *rows.shape,
                              cfg.model.field_init_scale.get(f, 1.0))
        result[f] = {
            "rows": int(rows.shape[0]),
            "accumulator_root_percentiles_10_50_90_99": [float(f"{v:.3g}") for v in np.percentile(root, [10, 50, 90, 99])],
            "sparse_eps": eps,
            "share_below_eps": round(float((root < eps).mean()), 4),
            "start_norm_median": round(float(start.norm(dim=1).median()), 5),
            "moved_median": round(float((rows - start).norm(dim=1).median()), 5),
            "row_norm_median": round(float(rows.norm(dim=1).median()), 5),
        }
        print(f, result[f], flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a step directory of a run's checkpoints")
    parser.add_argument("--config", type=Path, help="the run's config.toml (default: beside checkpoints/)")
    parser.add_argument("--fields", nargs="+", default=HISTORY_FIELDS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    config = args.config or args.checkpoint.resolve().parents[1] / "config.toml"
    result = {"checkpoint": str(args.checkpoint), "fields": probe(args.checkpoint, config, args.fields)}
    if args.out:
        return write_result(args.out, "table_start_probe",
                            command_line(__file__, argv if argv is not None else sys.argv[1:]),
                            result, library_versions(["numpy"]))
    return result


if __name__ == "__main__":
    main()
