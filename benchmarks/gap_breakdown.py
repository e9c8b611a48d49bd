"""Where a trained model's AUC gap to the oracle is: its test logits against the planted model's terms.

    .venv/bin/python launch/export.py --run-dir RUN --out EXPORT
    .venv/bin/python launch/predict.py --model EXPORT --data DATA --split test --out PREDS.parquet
    .venv/bin/python benchmarks/gap_breakdown.py --data DATA --predictions PREDS.parquet

``DATA`` is a synthetic set written by ``launch/generate.py --format parquet`` (its metadata holds the
generator's config, so the planted model is rebuilt exactly). Per task (CTR over all test impressions,
CVR over clicked ones), the model's logit is regressed on the planted model's terms (per-field id
effects, history match, taste); the script reports

- the coefficients (1 = the term is captured at full strength, 0 = not at all);
- AUC of the oracle, of the model, and of the model's projection on the terms (what the model would
  score without its residual);
- what the residual costs: the oracle's AUC with the residual added, whole and split into its
  per-item, per-user and remaining parts;
- the taste term split into its per-category mean and the per-user part within a category, with the
  model's coefficient on each: the taste term is a dot product of the user's history mixture with the
  item's vector, the one term pooled embeddings and an MLP tower do not represent directly.

Writes ``benchmarks/results/gap_breakdown.json`` (``--out``) and prints the figures.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from common import REPO, command_line, library_versions, rows_of_ids, write_result  # noqa: E402

from dist_mtl.data import synthetic as S  # noqa: E402
from dist_mtl.data.schema import DatasetMetadata  # noqa: E402


def planted_config(data: Path) -> S.SyntheticConfig:
    """The generator config a synthetic Parquet set was written with (``notes.config`` of its metadata)."""
    notes = DatasetMetadata.load(data).notes or {}
    config = notes.get("config")
    if notes.get("generator") != "dist_mtl.data.synthetic" or not isinstance(config, dict):
        raise ValueError(f"{data}: metadata holds no synthetic generator config (not written by "
                         "launch/generate.py --format parquet), so there is no planted model to compare with")
    version = config.get("generator_version")
    if version != S.GENERATOR_VERSION:
        raise ValueError(f"{data}: written by synthetic generator version {version}; this code plants "
                         f"version {S.GENERATOR_VERSION}")
    return S.SyntheticConfig(**{f.name: config[f.name] for f in fields(S.SyntheticConfig) if f.name in config})


def test_terms(cfg: S.SyntheticConfig, max_impressions: int = 0, users_per_chunk: int = 8192) -> dict[str, np.ndarray]:
    """Per test impression: each additive term of the planted CTR and CVR logits, and grouping keys.
    With ``max_impressions``, only the test split's first whole users up to about that many impressions."""
    model = S.planted_model(cfg)
    parts: list[dict[str, np.ndarray]] = []
    generated = 0
    for chunk in S.generate_chunks(cfg, "test", users_per_chunk):
        if max_impressions and generated >= max_impressions:
            break
        generated += chunk.num_impressions
        x = model._local_inputs(chunk)
        iu = x.impression_user
        ids = {"101": x.user_id[iu], "205": x.item, "301": x.position, **x.attributes,
               **{f: x.profile[f][iu] for f in S.PROFILE_FIELDS}}
        ctr_ids = {f: model.ctr_effects[f][ids[f]].astype(np.float64) for f in ids}
        own_ids = {f: model.cvr_effects[f][ids[f]] - S._CVR_SHARED * ctr_ids[f] for f in ids}
        history = {k: model.history_scale[k] * v for k, v in model._history_terms(x).items()}
        z_ctr, z_cvr = model._logits(x, use_history=True)
        s = cfg.signal
        part = {
            "ctr/user": s * ctr_ids["101"],
            "ctr/profile": s * sum(ctr_ids[f] for f in S.PROFILE_FIELDS),
            **{f"ctr/{f}": s * ctr_ids[f] for f in ("205", "206", "207", "210", "216", "301")},
            "ctr/match": s * history["ctr_match"], "ctr/taste": s * history["ctr_taste"],
            "cvr/shared_ids": s * S._CVR_SHARED * sum(ctr_ids.values()),
            "cvr/own_ids": s * sum(own_ids.values()),
            "cvr/match": s * history["cvr_match"], "cvr/taste": s * history["cvr_taste"],
            "z/ctr": z_ctr, "z/cvr": z_cvr,
            "sample_id": chunk.sample_id, "click": chunk.click, "buy": chunk.buy,
            "item": x.item, "category": x.attributes["206"], "user_row": iu.astype(np.int64),
        }
        parts.append(part)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _group_means(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=values) / counts)[inverse]


def breakdown(task: str, logit: np.ndarray, terms: dict[str, np.ndarray], label: np.ndarray) -> dict:
    names = sorted(k for k in terms if k.startswith(f"{task}/"))
    oracle = terms[f"z/{task}"]
    design = np.column_stack([terms[n] for n in names] + [np.ones(len(logit))])
    coef, *_ = np.linalg.lstsq(design, logit, rcond=None)
    projection = design @ coef
    residual = logit - projection
    by_item = _group_means(terms["item"], residual)
    by_user = _group_means(terms["user_row"], residual)
    taste = terms[f"{task}/taste"]
    taste_category = _group_means(terms["category"], taste)
    split = np.column_stack([terms[n] for n in names if n != f"{task}/taste"]
                            + [taste_category, taste - taste_category, np.ones(len(logit))])
    split_coef, *_ = np.linalg.lstsq(split, logit, rcond=None)
    within = float(split_coef[-2])

    def auc(score: np.ndarray) -> float:
        return S.binary_auc(label, score)

    return {
        "rows": int(len(logit)),
        "coefficients": {n.split("/", 1)[1]: float(c) for n, c in zip(names, coef)},
        "auc": {"oracle": auc(oracle), "model": auc(logit), "projection": auc(projection)},
        "residual_std": float(residual.std()),
        "oracle_plus_residual_auc": {
            "whole": auc(oracle + residual), "per_item_part": auc(oracle + by_item),
            "per_user_part": auc(oracle + by_user), "rest": auc(oracle + residual - by_item - by_user),
        },
        "taste": {
            "between_category_coefficient": float(split_coef[-3]), "within_category_coefficient": within,
            "between_category_std": float(taste_category.std()),
            "within_category_std": float((taste - taste_category).std()),
            "oracle_auc_with_within_category_taste_at_model_coefficient":
                auc(oracle - (1.0 - within) * (taste - taste_category)),
        },
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="synthetic Parquet set (holds metadata.json)")
    parser.add_argument("--predictions", type=Path, required=True, help="launch/predict.py output on its test split")
    parser.add_argument("--test-impressions", type=int, default=0,
                        help="score only the test split's first users up to about this many impressions "
                             "(the full-scale split's 43M rows need ~9 GB of terms); 0 = all")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gap_breakdown.json")
    args = parser.parse_args(argv)
    if args.test_impressions < 0:
        parser.error(f"--test-impressions must be >= 0, got {args.test_impressions}")

    cfg = planted_config(args.data)
    terms = test_terms(cfg, args.test_impressions)
    predictions = pq.read_table(args.predictions)
    if args.test_impressions:
        # Sample ids run in generation order within a split: the first users' rows are those up to
        # the last id generated.
        predictions = predictions.filter(pc.less_equal(predictions["sample_id"], int(terms["sample_id"].max())))
    found, present = rows_of_ids(terms["sample_id"], predictions["sample_id"].to_numpy())
    if not present.all():
        raise ValueError(f"{args.predictions}: sample ids that the test split of {args.data} does not hold")
    terms = {k: v[found] for k, v in terms.items()}

    click = terms["click"].astype(bool)
    result: dict = {"data": str(args.data), "predictions": str(args.predictions)}
    p_ctr = predictions["p_ctr"].to_numpy().astype(np.float64)
    result["ctr"] = breakdown("ctr", np.log(p_ctr) - np.log1p(-p_ctr), terms, click)
    if "p_cvr" in predictions.column_names:
        p_cvr = predictions["p_cvr"].to_numpy().astype(np.float64)[click]
        clicked = {k: v[click] for k, v in terms.items()}
        result["cvr"] = breakdown("cvr", np.log(p_cvr) - np.log1p(-p_cvr), clicked, terms["buy"][click].astype(bool))
    for task in ("ctr", "cvr"):
        if task not in result:
            continue
        r = result[task]
        print(f"{task.upper()} ({r['rows']:,} rows): AUC oracle {r['auc']['oracle']:.4f}, model {r['auc']['model']:.4f}, "
              f"projection on the planted terms {r['auc']['projection']:.4f}; residual std {r['residual_std']:.3f}")
        print("  coefficients: " + ", ".join(f"{k} {v:.2f}" for k, v in r["coefficients"].items()))
        o = r["oracle_plus_residual_auc"]
        print(f"  oracle + residual {o['whole']:.4f} (per-item part {o['per_item_part']:.4f}, per-user part "
              f"{o['per_user_part']:.4f}, rest {o['rest']:.4f})")
        t = r["taste"]
        print(f"  taste: coefficient {t['between_category_coefficient']:.2f} on its per-category mean "
              f"(std {t['between_category_std']:.3f}), {t['within_category_coefficient']:.2f} on the per-user "
              f"part within a category (std {t['within_category_std']:.3f}); oracle with that part at the "
              f"model's coefficient: {t['oracle_auc_with_within_category_taste_at_model_coefficient']:.4f}")
    return write_result(args.out, "gap_breakdown", command_line(__file__, argv if argv is not None else sys.argv[1:]),
                        result, library_versions(["torch", "torchrec", "pyarrow"]))


if __name__ == "__main__":
    main()
