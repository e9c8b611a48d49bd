"""Dev diagnostic (#9): do the users' history lists alone (no labels) hold the planted taste topics?

    .venv/bin/python benchmarks/dev/cooccurrence_probe.py --data DATA [--lsa-users 100000] [--out probe.json]

DATA is a synthetic Parquet set written by ``launch/generate.py --format parquet`` (its layout stores a
history id of local id k as k + 1, so the planted model's vectors can be looked up). The CVR gap of #9 sits
in the taste term, which needs each history id's topic; a model learns those only from the clicks. This
asks whether co-occurrence in the train split's user rows, which costs no label, would hand them over:

1. LSA: the user x history-id matrix of all four lists (log1p(count) x idf, rows L2-normalised) of the
   first ``--lsa-users`` train user rows (whole files), its rank-k randomized SVD for each ``--ranks``;
   R^2 (weighted by document frequency) of each history id's planted vector on its k-dim embedding, per
   field, and of each user's planted taste (log1p-count weighted mean over the four lists) on the user's.
2. Neighbours: positive PMI between the categories of 109_14 over all train user rows (each row's list
   weighted by 1/sqrt(length)); for each category, the share of its m strongest neighbours in its own
   topic and their median distance on the catalog line (categories are runs of the line, in id order).

Writes the figures with the command as JSON (``--out``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))
sys.path.insert(2, str(Path(__file__).resolve().parents[2]))
from common import command_line, library_versions, write_result  # noqa: E402
from factor_probe import r2  # noqa: E402
from gap_breakdown import planted_config  # noqa: E402

from dist_mtl.data import synthetic as S  # noqa: E402

HISTORY_FIELDS = ("109_14", "110_14", "127_14", "150_14")


def weighted_r2(y: np.ndarray, x: np.ndarray, weights: np.ndarray | None = None) -> list[float]:
    """``factor_probe.r2`` per column of ``y``, rounded for the report."""
    return [round(float(v), 4) for v in r2(y, x.astype(np.float64), weights)]


def randomized_svd(x: sp.csr_matrix, rank: int, power_iterations: int = 4, seed: int = 0):
    """Halko et al.'s randomized SVD (scipy has none for a sparse matrix and a rank this size)."""
    xt = x.T.tocsr()
    y = x @ np.random.default_rng(seed).standard_normal((x.shape[1], rank + 10)).astype(np.float32)
    for _ in range(power_iterations):
        y, _ = np.linalg.qr(y)
        z, _ = np.linalg.qr(xt @ y)
        y = x @ z
    y, _ = np.linalg.qr(y)
    u, s, vt = np.linalg.svd((xt @ y).T, full_matrices=False)
    return (y @ u)[:, :rank], s[:rank], vt[:rank].T


def user_files(data: Path) -> list[str]:
    return sorted(str(p) for p in (data / "train").glob("users-*.parquet"))


def lsa(data: Path, model: S.PlantedModel, max_users: int, ranks: list[int]) -> dict:
    sizes = {h: len(model.history_vectors[h]) + 1 for h in HISTORY_FIELDS}
    offset, start = {}, 0
    for h in HISTORY_FIELDS:
        offset[h], start = start, start + sizes[h]
    rows, cols, vals, tastes, n = [], [], [], [], 0
    for f in user_files(data):
        table = pq.read_table(f, columns=[c for h in HISTORY_FIELDS for c in (h, h + "_w")])
        users = table.num_rows
        num, den = np.zeros((users, 4)), np.zeros(users)
        for h in HISTORY_FIELDS:
            ids_col = table.column(h).combine_chunks()
            ids, counts = ids_col.values.to_numpy(), table.column(h + "_w").combine_chunks().values.to_numpy()
            row = np.repeat(np.arange(users), np.diff(ids_col.offsets.to_numpy()))
            weight = np.log1p(counts)
            rows.append(row + n), cols.append(ids + offset[h]), vals.append(weight.astype(np.float32))
            np.add.at(num, row, model.history_vectors[h][ids - 1] * weight[:, None])
            den += np.bincount(row, weights=weight, minlength=users)
        tastes.append(num / den[:, None])
        n += users
        if n >= max_users:
            break
    x = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(n, start), dtype=np.float32)
    taste = np.concatenate(tastes)
    df = np.asarray((x > 0).sum(0)).ravel()
    x = x @ sp.diags(np.log(n / np.maximum(df, 1)).astype(np.float32))
    norms = np.sqrt(np.asarray(x.multiply(x).sum(1)).ravel())
    x = (sp.diags(1 / np.maximum(norms, 1e-9)) @ x).tocsr()
    result = {"user_rows": n, "nonzeros": int(x.nnz), "columns": start, "ranks": {}}
    for rank in ranks:
        t = time.perf_counter()
        u, s, v = randomized_svd(x, rank)
        user_emb, id_emb = u * s, v * s
        per_field = {}
        for h in HISTORY_FIELDS:
            ids = slice(offset[h] + 1, offset[h] + sizes[h])
            seen = df[ids] > 0
            per_field[h] = weighted_r2(model.history_vectors[h][seen], id_emb[ids][seen], df[ids][seen])
        result["ranks"][str(rank)] = {
            "seconds": round(time.perf_counter() - t, 1), "top_singular_values": s[:8].round(2).tolist(),
            "id_vector_r2": per_field, "user_taste_r2": weighted_r2(taste, user_emb)}
        print(f"rank {rank}: id vectors {per_field}, user taste {result['ranks'][str(rank)]['user_taste_r2']}",
              flush=True)
    return result


def category_neighbours(data: Path, model: S.PlantedModel, ms: list[int]) -> dict:
    field = "109_14"
    n_ids = len(model.history_vectors[field]) + 1
    rows, cols, n = [], [], 0
    for f in user_files(data):
        col = pq.read_table(f, columns=[field]).column(field).combine_chunks()
        offsets = col.offsets.to_numpy()
        rows.append(np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)) + n)
        cols.append(col.values.to_numpy())
        n += len(offsets) - 1
    x = sp.csr_matrix((np.ones(sum(len(r) for r in rows), np.float32), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(n, n_ids))
    length = np.asarray(x.sum(1)).ravel()
    x = sp.diags(1 / np.sqrt(np.maximum(length, 1))) @ x  # a long list links many categories by chance
    c = (x.T @ x).toarray().astype(np.float64)
    np.fill_diagonal(c, 0)
    degree = c.sum(1)
    linked = np.flatnonzero(degree > 0)
    c = c[np.ix_(linked, linked)]
    expected = np.outer(degree[linked], degree[linked]) / degree.sum()
    ppmi = np.where(c > 0, np.maximum(np.log(np.maximum(c, 1e-300) / expected), 0), 0)
    position = linked - 1  # local id = the category's place among the catalog line's category runs
    topic = model.topic_of_category[position]
    order = np.argsort(-ppmi, 1)
    result = {"user_rows": n, "categories_linked": int(len(linked)), "neighbours": {}}
    for m in ms:
        nb = order[:, :m]
        result["neighbours"][str(m)] = {
            "same_topic_share": round(float(np.mean(topic[nb] == topic[:, None])), 4),
            "median_catalog_distance": float(np.median(np.abs(position[nb] - position[:, None])))}
        print(f"top {m} PPMI neighbours: {result['neighbours'][str(m)]}", flush=True)
    result["categories_per_topic"] = round(len(position) / (topic.max() + 1), 1)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--lsa-users", type=int, default=100_000)
    parser.add_argument("--ranks", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--neighbours", type=int, nargs="+", default=[1, 3, 5, 10, 20])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    model = S.planted_model(planted_config(args.data))
    result = {"data": str(args.data), "lsa": lsa(args.data, model, args.lsa_users, args.ranks),
              "category_neighbours": category_neighbours(args.data, model, args.neighbours)}
    if args.out:
        return write_result(args.out, "cooccurrence_probe",
                            command_line(__file__, argv if argv is not None else sys.argv[1:]),
                            result, library_versions(["numpy", "scipy", "pyarrow"]))
    return result


if __name__ == "__main__":
    main()
