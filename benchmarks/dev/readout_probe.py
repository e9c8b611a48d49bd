"""Dev diagnostic (#9): do the tables hold more of the planted taste than the factors read out of them?

    .venv/bin/python benchmarks/dev/readout_probe.py --model EXPORT --data DATA [--out probe.json]

EXPORT is a ``model.factor_rank`` model (``launch/export.py``), DATA its synthetic Parquet set. The factors
are rank-``k`` linear read-outs (``P u``, ``Q i``) of the whole pooled user and item rows. This script
scores the test split with the model (eager, one process), keeps those rows for every clicked impression,
and on the clicked rows of the first ``--fit-impressions`` test impressions measures:

1. R^2 of the user's planted taste vector on ``P u``, on the whole user row, on the four history fields'
   columns and on each of them; of the item's planted vector on ``Q i``, on the whole item row and on each
   item field's columns. Whole rows well above the factors: the tables hold taste that the projections,
   trained mostly by CTR, leave out.
2. An upper bound on what better projections of the same rows could give CVR: least-squares read-outs of
   the planted taste and item vector from the whole rows (fitted on those rows, *with* the planted truth),
   their 16 products appended to the model's CVR logit in the refit of ``factor_probe.py`` (purchases on
   the logit as offset plus the features, fitted on one half of the remaining clicked rows and scored on
   the other), beside the refit with the factors' own 64 products and with both.

Writes the figures, with the command, versions and machine, as JSON (``--out``). ~11 GB and ~5 minutes at
full scale (one pass over the 43M test impressions, one over the planted model's first ones).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))
sys.path.insert(2, str(Path(__file__).resolve().parents[2]))
from common import command_line, library_versions, write_result  # noqa: E402
from factor_probe import clicked_factors, cvr_refit, planted_clicked, probe_rows_of, products, r2  # noqa: E402
from gap_breakdown import planted_config  # noqa: E402

from dist_mtl.config import load_config  # noqa: E402
from dist_mtl.data.schema import ITEM_FIELDS, USER_FIELDS  # noqa: E402
from dist_mtl.models.embeddings import field_columns  # noqa: E402

HISTORY_FIELDS = ("109_14", "110_14", "127_14", "150_14")
ITEM_ATTRIBUTE_FIELDS = ("205", "206", "207", "210", "216")


def least_squares(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Coefficients (then a constant) of the least-squares fit of ``y`` (per column) on ``x``."""
    x1 = np.column_stack([x, np.ones(len(x))]).astype(np.float64)
    coef, *_ = np.linalg.lstsq(x1, y.astype(np.float64), rcond=None)
    return coef


def apply(x: np.ndarray, coef: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ coef[:-1] + coef[-1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="export directory of a factor_rank model")
    parser.add_argument("--data", type=Path, required=True, help="synthetic Parquet set")
    parser.add_argument("--fit-impressions", type=int, default=8_000_000,
                        help="test impressions (first users) whose clicked rows are compared with the planted "
                             "model and fit the read-outs; the refit scores the other clicked rows")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = planted_config(args.data)
    probe = clicked_factors(args.model, args.data, keep_rows=True)
    planted = planted_clicked(cfg, args.fit_impressions)
    at = probe_rows_of(probe, planted)
    taste, vector = planted["taste"], planted["vector"]
    user_row, item_row = probe["user_row"], probe["item_row"]

    model_cfg = load_config(args.model / "config.toml", []).model
    user_cols = field_columns(USER_FIELDS, model_cfg.embedding_dim, model_cfg.field_dims)
    item_cols = field_columns(ITEM_FIELDS, model_cfg.embedding_dim, model_cfg.field_dims)
    history = [c for f in HISTORY_FIELDS for c in range(*user_cols[f])]
    attributes = [c for f in ITEM_ATTRIBUTE_FIELDS[1:] for c in range(*item_cols[f])]

    def dims(values: np.ndarray) -> list[float]:
        return values.round(4).tolist()

    user_r2 = {"P u": dims(r2(taste, probe["pu"][at])), "whole user row": dims(r2(taste, user_row[at])),
               "four history fields": dims(r2(taste, user_row[at][:, history]))}
    user_r2.update({f: dims(r2(taste, user_row[at][:, slice(*user_cols[f])])) for f in HISTORY_FIELDS})
    item_r2 = {"Q i": dims(r2(vector, probe["qi"][at])), "whole item row": dims(r2(vector, item_row[at])),
               "206, 207, 210, 216": dims(r2(vector, item_row[at][:, attributes]))}
    item_r2.update({f: dims(r2(vector, item_row[at][:, slice(*item_cols[f])])) for f in ITEM_ATTRIBUTE_FIELDS})

    taste_hat = apply(user_row, least_squares(user_row[at], taste))
    vector_hat = apply(item_row, least_squares(item_row[at], vector))
    scored = np.ones(len(user_row), dtype=bool)
    scored[at] = False  # the read-outs saw the planted truth of these rows
    factor_products, readout_products = products(probe["pu"], probe["qi"]), products(taste_hat, vector_hat)
    l2s = (1e-4, 1e-3)
    refits = {
        "factor products (k^2)": cvr_refit(factor_products, probe, l2s, scored),
        "read-out products (16)": cvr_refit(readout_products, probe, l2s, scored),
        "both": cvr_refit(np.column_stack([factor_products, readout_products]), probe, l2s, scored),
    }
    result = {"model": str(args.model), "data": str(args.data), "fit_impressions": args.fit_impressions,
              "fit_clicked_rows": int(len(at)), "scored_clicked_rows": int(scored.sum()),
              "scored_purchases": int(probe["buy"][scored].sum()),
              "user_taste_std": dims(taste.std(0, dtype=np.float64)),
              "item_vector_std": dims(vector.std(0, dtype=np.float64)),
              "user_taste_r2": user_r2, "item_vector_r2": item_r2, "cvr_refit": refits}
    for name, values in user_r2.items():
        print(f"user taste on {name}: R^2 per dimension {values}")
    for name, values in item_r2.items():
        print(f"item vector on {name}: R^2 per dimension {values}")
    for name, rows in refits.items():
        for row in rows:
            print(f"CVR refit with {name} (l2 {row['l2']}): held-out half {row['held_out_auc_model']:.4f} -> "
                  f"{row['held_out_auc_refit']:.4f}")
    if args.out:
        return write_result(args.out, "readout_probe", command_line(__file__, argv if argv is not None else sys.argv[1:]),
                            result, library_versions(["torch", "torchrec", "pyarrow"]))
    return result


if __name__ == "__main__":
    main()
