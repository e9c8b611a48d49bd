"""Dev diagnostic (#9): would a spectral estimate from the clicks hand the model the categories' topics?

    .venv/bin/python benchmarks/dev/coclick_probe.py --data DATA [--ranks 4 8 16 32 64] [--out probe.json]

DATA is a synthetic Parquet set written by ``launch/generate.py --format parquet``. The trained model's
history category rows (109_14) hold their planted topic vectors at R^2 ~0.3 (RESULTS Full scale (7));
the planted vectors of that list alone would be worth +0.005 CVR AUC. SGD reaches each history row only
through a mean over ~50 categories; a moment estimate over all train impressions at once might do better.
This measures whether it would, without training anything:

  S[c, d] = sum over train user rows u of a_uc * (clicks of u's impressions in item category d)

with ``a_uc`` the log1p(count) weight of category c in u's 109_14 list over the list's total (the weighted
mean a model pools), likewise the impressions ``N[c, d]``. The lift ``L = S - N * p_d - N * r_c`` takes
off the item category's click rate ``p_d`` and the history category's own residual rate ``r_c``; its
diagonal (the item's category in the history: the match terms) is zeroed. The rank-k SVD of L (``raw``)
and of L / sqrt(N * p_d) (``pearson``, correspondence analysis' scaling) give each history category a
k-dim embedding (left singular vectors x singular values), scored by the R^2 of the planted category
vectors on it (weighted by the number of user rows holding the category) and of the users' planted taste
on the pooled embeddings (first ~100k user rows). Four matrices: every impression or only those without
any match (all four combination fields empty), and the drawn clicks or the planted click probabilities
(``truth_train.parquet``'s p_ctr: the same lift without the labels' noise, what infinite data would give).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))
sys.path.insert(2, str(Path(__file__).resolve().parents[2]))
from common import command_line, library_versions, write_result  # noqa: E402
from cooccurrence_probe import list_entries, user_taste, weighted_r2  # noqa: E402
from gap_breakdown import planted_config  # noqa: E402

from dist_mtl.data import synthetic as S  # noqa: E402

CROSS = tuple(S.CROSS_FIELDS)
TASTE_USERS = 100_000


def planted_click_probabilities(data: Path) -> np.ndarray:
    """p_ctr by sample id - 1 (the generator numbers every train impression from 1, dropped rows included)."""
    table = pq.read_table(data / "truth_train.parquet", columns=["sample_id", "p_ctr"])
    ids = table.column("sample_id").to_numpy()
    if not np.array_equal(ids, np.arange(1, len(ids) + 1)):
        raise ValueError(f"{data}/truth_train.parquet: sample ids are not 1..{len(ids)} in order")
    return table.column("p_ctr").to_numpy()


def accumulate(data: Path, model: S.PlantedModel, p_ctr: np.ndarray) -> dict:
    """One pass over the train split: the co-click sums for the four matrices and the taste users."""
    size = model.vocab["206"] + 1  # the Parquet layout stores local id k as k + 1
    sums = {(rows, target): (np.zeros((size, size)), np.zeros((size, size)), np.zeros(size), np.zeros(size))
            for rows in ("all", "no_match") for target in ("clicks", "p_ctr")}
    holders, pooled_rows, tastes = np.zeros(size), [], []
    t = time.perf_counter()
    files = sorted((data / "train").glob("users-*.parquet"))
    for k, user_file in enumerate(files):
        users = pq.read_table(user_file, columns=[c for h in S.HISTORY_FIELDS for c in (h, h + "_w")])
        n = users.num_rows
        row, ids, weight = list_entries(users, "109_14")
        a = sp.csr_matrix((weight, (row, ids)), shape=(n, size))
        a = (sp.diags(1 / np.maximum(np.asarray(a.sum(1)).ravel(), 1e-12)) @ a).tocsr()
        holders += np.bincount(ids, minlength=size)
        if sum(len(p) for p in tastes) < TASTE_USERS:
            tastes.append(user_taste(users, model))
            pooled_rows.append(a)
        imp = pq.read_table(data / "train" / user_file.name.replace("users", "impressions"),
                            columns=["user", "sample_id", "206", "click", *CROSS])
        no_match = np.ones(imp.num_rows, dtype=bool)
        for c in CROSS:
            no_match &= pc.list_value_length(imp.column(c)).to_numpy(zero_copy_only=False) == 0
        user, category = imp.column("user").to_numpy(), imp.column("206").to_numpy()
        targets = {"clicks": imp.column("click").to_numpy().astype(np.float64),
                   "p_ctr": p_ctr[imp.column("sample_id").to_numpy() - 1].astype(np.float64)}
        at = a.T.tocsr()
        for (rows, target), (s_sum, n_sum, d_sum, d_imp) in sums.items():
            keep = no_match if rows == "no_match" else slice(None)
            u, d, y = user[keep], category[keep], targets[target][keep]
            n_sum += (at @ sp.csr_matrix((np.ones(len(u)), (u, d)), shape=(n, size))).toarray()
            s_sum += (at @ sp.csr_matrix((y, (u, d)), shape=(n, size))).toarray()
            d_sum += np.bincount(d, weights=y, minlength=size)
            d_imp += np.bincount(d, minlength=size)
        print(f"part {k + 1}/{len(files)}: {time.perf_counter() - t:.0f} s", flush=True)
    return {"sums": sums, "holders": holders, "pooled": sp.vstack(pooled_rows).tocsr(),
            "taste": np.concatenate(tastes)}


def embeddings(s_sum: np.ndarray, n_sum: np.ndarray, d_sum: np.ndarray, d_imp: np.ndarray,
               weighting: str, rank: int) -> np.ndarray:
    expected = n_sum * (d_sum / np.maximum(d_imp, 1))[None, :]
    lift = s_sum - expected
    lift -= n_sum * (lift.sum(1) / np.maximum(n_sum.sum(1), 1e-9))[:, None]
    if weighting == "pearson":
        lift /= np.sqrt(np.maximum(expected, 1e-3))
    np.fill_diagonal(lift, 0.0)
    u, s, _ = np.linalg.svd(lift, full_matrices=False)
    return u[:, :rank] * s[:rank]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    t = time.perf_counter()
    model = S.planted_model(planted_config(args.data))
    acc = accumulate(args.data, model, planted_click_probabilities(args.data))
    planted = np.vstack([np.zeros((1, model.history_vectors["109_14"].shape[1])), model.history_vectors["109_14"]])
    result = {"data": str(args.data), "taste_users": len(acc["taste"]),
              "users_taste_r2_on_pooled_planted_109_14": weighted_r2(acc["taste"], acc["pooled"] @ planted),
              "matrices": {}}
    for (rows, target), sums in acc["sums"].items():
        for weighting in ("raw", "pearson"):
            emb = embeddings(*sums, weighting, max(args.ranks))
            name = f"{rows}/{target}/{weighting}"
            result["matrices"][name] = {
                "clicks_or_p_ctr_sum": round(float(sums[2].sum()), 1),
                "by_rank": {k: {"category_r2": weighted_r2(planted[1:], emb[1:, :k], acc["holders"][1:]),
                                "users_taste_r2": weighted_r2(acc["taste"], acc["pooled"] @ emb[:, :k])}
                            for k in args.ranks}}
            print(name, result["matrices"][name], f"{time.perf_counter() - t:.0f} s", flush=True)
    result["seconds"] = round(time.perf_counter() - t, 1)
    if args.out:
        return write_result(args.out, "coclick_probe", command_line(__file__, argv if argv is not None else sys.argv[1:]),
                            result, library_versions(["numpy", "scipy", "pyarrow"]))
    return result


if __name__ == "__main__":
    main()
