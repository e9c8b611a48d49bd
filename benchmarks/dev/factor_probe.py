"""Dev diagnostic (#9): what a `model.factor_rank` model's learnt factors hold of the planted taste.

    .venv/bin/python launch/export.py --run-dir RUN --out EXPORT          # a run with model.factor_rank
    .venv/bin/python benchmarks/dev/factor_probe.py --model EXPORT --data DATA [--out probe.json]

DATA is a synthetic Parquet set (``launch/generate.py --format parquet``; its metadata rebuilds the planted
model). The script scores the test split with the exported model (eager, one process) and keeps, for every
clicked impression, the factors ``P u`` and ``Q i`` of ``UserItemFactors`` and the model's CVR logit. Then:

1. *CVR mix refit*: logistic regression of the purchases on the model's CVR logit (offset) plus the 64
   products ``(P u)_a (Q i)_b`` (a free k x k mix), fitted on one half of the clicked test rows (blocks of
   5,000 sample ids) and scored on the other half, both ways. Gains here would mean the CVR mix ``M`` is
   under-trained; none means the factors lack what CVR needs.
2. *Planted terms on the factors*: on the first ``--test-impressions`` test impressions' clicked rows,
   R^2 of the planted CTR and CVR taste terms on those 64 products (least squares; also within a category),
   and R^2 of each dimension of the user's planted taste vector on ``P u`` and of the item's planted vector
   on ``Q i`` (with each dimension's spread over those rows).
3. *Topics in the tables*: R^2 of each category's planted topic vector on its row of the item category
   table (206) and of the history category table (109_14), weighted by the ids' train frequency.

Prints the figures and writes them, with the command, versions and machine, as JSON (``--out``). Needs ~4.6 GB; ~3 minutes at full scale.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))
from common import command_line, library_versions, write_result  # noqa: E402
from gap_breakdown import _group_means, planted_config  # noqa: E402

from dist_mtl.data import synthetic as S  # noqa: E402
from dist_mtl.data.reader import ParquetGroupReader  # noqa: E402
from dist_mtl.export import load_exported_eager, read_export_info  # noqa: E402


def clicked_factors(export: Path, data: Path, keep_rows: bool = False) -> dict[str, np.ndarray]:
    """P u, Q i, the CVR logit, the purchase label and the sample id of every clicked test impression;
    with ``keep_rows`` also the whole user and item rows the projections read (~2.5 GB at full scale)."""
    model = load_exported_eager(export).eval()
    factors = model.head.factors
    if factors is None:
        raise ValueError(f"{export}: the model has no user x item factors (model.factor_rank = 0)")
    seen: dict[str, torch.Tensor] = {}

    def keep_factors(module, args, output):
        rows = args[0]
        seen["pu"] = module.user_projection(rows.user.float()).index_select(0, rows.user_index)
        seen["qi"] = module.item_projection(rows.item.float())
        if keep_rows:
            seen["user_row"] = rows.user.float().index_select(0, rows.user_index)
            seen["item_row"] = rows.item.float()

    factors.register_forward_hook(keep_factors)
    reader = ParquetGroupReader(data, "test", 16384, rank=0, world_size=1, shuffle=False,
                                weight_transform=read_export_info(export)["weight_transform"],
                                extra_columns=["sample_id"])
    kept = ("pu", "qi", "user_row", "item_row") if keep_rows else ("pu", "qi")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in (*kept, "cvr_logit", "buy", "sample_id")}
    with torch.no_grad():
        for batch in reader:
            out = model(batch)
            click = batch.labels["click"] > 0.5
            for k in kept:
                parts[k].append(seen[k][click].numpy())
            parts["cvr_logit"].append(out.logits["cvr"][click].float().numpy())
            parts["buy"].append(batch.labels["buy"][click].numpy())
            parts["sample_id"].append(batch.labels["sample_id"][click].numpy())
    result = {k: np.concatenate(v) for k, v in parts.items()}
    result["mix"] = factors.mix["cvr"].detach().numpy()
    return result


def products(pu: np.ndarray, qi: np.ndarray) -> np.ndarray:
    return np.einsum("ba,bc->bac", pu.astype(np.float64), qi.astype(np.float64)).reshape(len(pu), -1)


def fit_logistic(x: np.ndarray, offset: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    """Weights (then a bias) of ``y ~ sigmoid(offset + x w + b)`` with an L2 penalty on ``w`` (L-BFGS)."""
    xt, off, yt = (torch.tensor(a, dtype=torch.float64) for a in (x, offset, y))
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = off + xt @ w[:-1] + w[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, yt) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy()


def mix_refit(probe: dict[str, np.ndarray], l2s=(1e-4, 1e-3, 1e-2)) -> list[dict]:
    return cvr_refit(products(probe["pu"], probe["qi"]), probe, l2s)


def cvr_refit(x: np.ndarray, probe: dict[str, np.ndarray], l2s, rows: np.ndarray | None = None) -> list[dict]:
    """Purchases on the model's CVR logit (offset) plus the features ``x``, fitted on one half of the
    clicked rows (blocks of 5,000 sample ids) and scored on the other, both ways; ``rows`` (a mask) limits
    both halves to those rows."""
    z, y = probe["cvr_logit"], probe["buy"]
    half = (probe["sample_id"] // 5000) % 2 == 0
    used = np.ones(len(z), dtype=bool) if rows is None else rows
    result = []
    for l2 in l2s:
        for fit_on, score_on in ((half & used, ~half & used), (~half & used, half & used)):
            mean, std = x[fit_on].mean(0), x[fit_on].std(0) + 1e-9
            w = fit_logistic((x[fit_on] - mean) / std, z[fit_on], y[fit_on], l2)
            refit = z[score_on] + ((x[score_on] - mean) / std) @ w[:-1]
            result.append({"l2": l2, "held_out_auc_model": S.binary_auc(y[score_on], z[score_on]),
                           "held_out_auc_refit": S.binary_auc(y[score_on], refit)})
    return result


def r2(y: np.ndarray, x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """R^2 of a least-squares fit of ``y`` (per column) on ``x`` and a constant."""
    x1 = np.column_stack([x, np.ones(len(x))])
    w = np.ones(len(x)) if weights is None else weights.astype(np.float64)
    root = np.sqrt(w)[:, None]
    coef, *_ = np.linalg.lstsq(x1 * root, (y.reshape(len(y), -1)) * root, rcond=None)
    resid = y.reshape(len(y), -1) - x1 @ coef
    centred = y.reshape(len(y), -1) - (y.reshape(len(y), -1) * w[:, None]).sum(0) / w.sum()
    return 1.0 - (resid ** 2 * w[:, None]).sum(0) / (centred ** 2 * w[:, None]).sum(0)


def within_category(values: np.ndarray, category: np.ndarray) -> np.ndarray:
    """``values`` (per column) less their category's mean."""
    cols = values.reshape(len(values), -1)
    return (cols - np.column_stack([_group_means(category, c) for c in cols.T])).reshape(values.shape)


def planted_clicked(cfg: S.SyntheticConfig, max_impressions: int) -> dict[str, np.ndarray]:
    """The planted model's taste parts on the clicked rows of the first ``max_impressions`` test impressions
    (whole generator chunks): sample id, user taste, item vector, item category and the two taste terms."""
    model = S.planted_model(cfg)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("sample_id", "taste", "vector", "category",
                                                          "ctr_taste", "cvr_taste")}
    generated = 0
    for chunk in S.generate_chunks(cfg, "test", 8192):
        if generated >= max_impressions:
            break
        generated += chunk.num_impressions
        x = model._local_inputs(chunk)
        terms = model._history_terms(x)
        click = chunk.click.astype(bool)
        parts["sample_id"].append(chunk.sample_id[click])
        parts["taste"].append(x.taste[x.impression_user][click])
        parts["vector"].append(model.item_vectors[x.item][click])
        parts["category"].append(x.attributes["206"][click])
        parts["ctr_taste"].append(cfg.signal * model.history_scale["ctr_taste"] * terms["ctr_taste"][click])
        parts["cvr_taste"].append(cfg.signal * model.history_scale["cvr_taste"] * terms["cvr_taste"][click])
    return {k: np.concatenate(v) for k, v in parts.items()}


def probe_rows_of(probe: dict[str, np.ndarray], planted: dict[str, np.ndarray]) -> np.ndarray:
    """Index of each planted row's impression among the probe's rows."""
    order = np.argsort(probe["sample_id"])
    at = order[np.searchsorted(probe["sample_id"], planted["sample_id"], sorter=order)]
    if not np.array_equal(probe["sample_id"][at], planted["sample_id"]):
        raise ValueError("the probe's clicked rows are not the planted model's: another data set?")
    return at


def planted_on_factors(probe: dict[str, np.ndarray], cfg: S.SyntheticConfig, max_impressions: int) -> dict:
    planted = planted_clicked(cfg, max_impressions)
    at = probe_rows_of(probe, planted)
    pu, qi = probe["pu"][at], probe["qi"][at]
    x = products(pu, qi)
    category = planted["category"]
    result = {"clicked_rows": int(len(at))}
    for name in ("ctr_taste", "cvr_taste"):
        y = planted[name]
        result[name] = {"std": float(y.std()), "r2_on_products": float(r2(y, x)[0]),
                        "r2_within_category": float(r2(within_category(y, category),
                                                       within_category(x, category))[0])}
    result["user_taste_std"] = planted["taste"].std(0, dtype=np.float64).round(4).tolist()
    result["item_vector_std"] = planted["vector"].std(0, dtype=np.float64).round(4).tolist()
    result["user_taste_r2_on_pu"] = r2(planted["taste"], pu).round(4).tolist()
    result["item_vector_r2_on_qi"] = r2(planted["vector"], qi).round(4).tolist()
    result["planted_cvr_mix"] = S.planted_model(cfg).cvr_taste_mix.round(3).tolist()
    return result


def topics_in_tables(export: Path, data: Path, cfg: S.SyntheticConfig) -> dict:
    """Frequency-weighted R^2 of each category's topic vector on its rows of tables 206 and 109_14 (the
    direct Parquet layout stores local id k as index k + 1 in both)."""
    model = S.planted_model(cfg)
    state = torch.load(export / "model.pt", map_location="cpu", weights_only=True)
    topic = model.topic_vectors[model.topic_of_category]
    n = len(topic) + 1
    counts = {"206": np.zeros(n), "109_14": np.zeros(n)}
    for path in sorted((data / "train").glob("impressions-*.parquet")):
        counts["206"] += np.bincount(pq.read_table(path, columns=["206"])["206"].to_numpy(), minlength=n)[:n]
    for path in sorted((data / "train").glob("users-*.parquet")):
        ids = pc.list_flatten(pq.read_table(path, columns=["109_14"])["109_14"]).to_numpy()
        counts["109_14"] += np.bincount(ids, minlength=n)[:n]
    result = {}
    for field, side in (("206", "item_ebc"), ("109_14", "user_ebc")):
        table = state[f"{side}.embedding_bags.t_{field}.weight"].float().numpy()[1:n]
        result[field] = r2(topic, table, counts[field][1:]).round(4).tolist()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="export directory of a factor_rank model")
    parser.add_argument("--data", type=Path, required=True, help="synthetic Parquet set")
    parser.add_argument("--test-impressions", type=int, default=8_000_000,
                        help="test impressions (first users) compared with the planted terms")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = planted_config(args.data)
    probe = clicked_factors(args.model, args.data)
    result = {"model": str(args.model), "data": str(args.data), "test_impressions": args.test_impressions,
              "learnt_cvr_mix": probe["mix"].round(3).tolist(),
              "mix_refit": mix_refit(probe),
              "planted_on_factors": planted_on_factors(probe, cfg, args.test_impressions),
              "topic_r2_in_tables": topics_in_tables(args.model, args.data, cfg)}
    for row in result["mix_refit"]:
        print(f"CVR mix refit (l2 {row['l2']}): held-out half {row['held_out_auc_model']:.4f} -> "
              f"{row['held_out_auc_refit']:.4f}")
    planted = result["planted_on_factors"]
    for name in ("ctr_taste", "cvr_taste"):
        t = planted[name]
        print(f"{name}: R^2 on the {probe['pu'].shape[1] ** 2} factor products {t['r2_on_products']:.3f} "
              f"(within a category {t['r2_within_category']:.3f})")
    print("user taste on P u, per dimension:", planted["user_taste_r2_on_pu"], "(std", planted["user_taste_std"], ")")
    print("item vector on Q i, per dimension:", planted["item_vector_r2_on_qi"], "(std", planted["item_vector_std"], ")")
    print("topic vectors on the tables' rows (frequency-weighted):", result["topic_r2_in_tables"])
    if args.out:
        return write_result(args.out, "factor_probe", command_line(__file__, argv if argv is not None else sys.argv[1:]),
                            result, library_versions(["torch", "torchrec", "pyarrow"]))
    return result


if __name__ == "__main__":
    main()
