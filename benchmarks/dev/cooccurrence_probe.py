"""Dev diagnostic (#9): do the users' history lists alone (no labels) hold the planted taste topics?

    .venv/bin/python benchmarks/dev/cooccurrence_probe.py --data DATA [--lsa-users 100000] [--out probe.json]

DATA is a synthetic Parquet set written by ``launch/generate.py --format parquet`` (its layout stores a
history id of local id k as k + 1, so the planted model's vectors can be looked up). The CVR gap of #9 sits
in the taste term, which needs each history id's topic; a model learns those only from the clicks. This
asks whether co-occurrence in the train split's user rows, which costs no label, would hand them over:

1. LSA: the user x history-id matrix of all four lists (log1p(count) x idf, rows L2-normalised) of the
   first ``--lsa-users`` train user rows (whole files), its rank-k randomized SVD for each ``--ranks``;
   R^2 (weighted by document frequency) of each history id's planted vector on its k-dim embedding, per
   field, and of each user's planted taste (log1p-count weighted mean over the four lists) on the user's
   k-dim embedding and on the id embeddings pooled as a model pools its rows (log1p(count)-weighted mean
   per list, the four lists' columns side by side; what ``history_lsa.py`` hands a model).
2. Neighbours: positive PMI between the categories of 109_14 over all train user rows (each row's list
   weighted by 1/sqrt(length)); for each category, the share of its m strongest neighbours in its own
   topic and their median distance on the catalog line (categories are runs of the line, in id order).
3. With ``--model EXPORT`` (a trained model, ``launch/export.py``): does co-occurrence add to what training
   learnt? R^2 (weighted by train frequency) of each history id's planted vector on its trained row, per
   field; of the users' planted taste on their pooled trained rows (log1p(count)-weighted mean per list,
   the four lists' columns side by side, the LSA users); and both again with the 109_14 rows smoothed
   towards their m strongest PPMI neighbours (``(1 - a) row + a mean(neighbours' rows)``), which is
   what a co-occurrence regulariser of the tables could at best hand over; and the users' taste on the
   pooled trained rows beside the pooled LSA embeddings of the largest rank (not with ``--no-lsa``, which
   skips part 1). Also the users' taste on the pooled rows minus their random start (recomputed from the
   export's train.seed and model.field_init_scale as the trainer drew it): what training moved them by,
   without the start's noise (skipped for tables that started at zero).

Writes the figures with the command as JSON (``--out``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))
sys.path.insert(2, str(Path(__file__).resolve().parents[2]))
from common import command_line, library_versions, write_result  # noqa: E402
from factor_probe import r2  # noqa: E402
from gap_breakdown import planted_config  # noqa: E402

from dist_mtl.config import load_config  # noqa: E402
from dist_mtl.data import synthetic as S  # noqa: E402
from dist_mtl.distributed import initial_table  # noqa: E402
from dist_mtl.export import TRAIN_STEP_PREFIX  # noqa: E402

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


def list_entries(table, field: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A history list of a user table as (row, id, log1p(count)) per entry."""
    ids_col = table.column(field).combine_chunks()
    row = np.repeat(np.arange(table.num_rows), np.diff(ids_col.offsets.to_numpy()))
    return row, ids_col.values.to_numpy(), np.log1p(table.column(field + "_w").combine_chunks().values.to_numpy())


def user_taste(table, model: S.PlantedModel) -> np.ndarray:
    """Each user row's planted taste: the log1p(count)-weighted mean of its history ids' vectors over the
    four lists (the Parquet layout stores local id k as k + 1)."""
    users = table.num_rows
    num, den = np.zeros((users, model.history_vectors[HISTORY_FIELDS[0]].shape[1])), np.zeros(users)
    for h in HISTORY_FIELDS:
        row, ids, weight = list_entries(table, h)
        np.add.at(num, row, model.history_vectors[h][ids - 1] * weight[:, None])
        den += np.bincount(row, weights=weight, minlength=users)
    return num / den[:, None]


def history_lists(data: Path, model: S.PlantedModel, max_users: int) -> tuple[dict[str, sp.csr_matrix], np.ndarray]:
    """The first ``max_users`` train user rows (whole files): per history field a users x ids matrix of
    log1p(count), and each user's planted taste (``user_taste``)."""
    parts, tastes, n = {h: [] for h in HISTORY_FIELDS}, [], 0
    for f in user_files(data):
        table = pq.read_table(f, columns=[c for h in HISTORY_FIELDS for c in (h, h + "_w")])
        for h in HISTORY_FIELDS:
            row, ids, weight = list_entries(table, h)
            parts[h].append(sp.csr_matrix((weight.astype(np.float32), (row, ids)),
                                          shape=(table.num_rows, len(model.history_vectors[h]) + 1)))
        tastes.append(user_taste(table, model))
        n += table.num_rows
        if n >= max_users:
            break
    return {h: sp.vstack(parts[h]).tocsr() for h in HISTORY_FIELDS}, np.concatenate(tastes)


def pooled_per_list(lists: dict[str, sp.csr_matrix], rows: dict[str, np.ndarray],
                    fields: Sequence[str] = HISTORY_FIELDS) -> np.ndarray:
    """Each user's log1p(count)-weighted mean of each list's ``rows``, the lists' columns side by side."""
    return np.column_stack([(lists[h] @ rows[h]) / np.maximum(np.asarray(lists[h].sum(1)), 1e-9)
                            for h in fields])


def field_columns(lists: dict[str, sp.csr_matrix]) -> dict[str, slice]:
    """Each history field's columns in ``lsa_matrix`` (the four lists side by side, in HISTORY_FIELDS order)."""
    out, start = {}, 0
    for h in HISTORY_FIELDS:
        out[h], start = slice(start, start + lists[h].shape[1]), start + lists[h].shape[1]
    return out


def lsa_matrix(lists: dict[str, sp.csr_matrix]) -> tuple[sp.csr_matrix, np.ndarray]:
    """The four lists side by side, log1p(count) x idf, rows L2-normalised; and each column's document
    frequency."""
    x = sp.hstack([lists[h] for h in HISTORY_FIELDS]).tocsr()
    n = x.shape[0]
    df = np.asarray((x > 0).sum(0)).ravel()
    x = x @ sp.diags(np.log(n / np.maximum(df, 1)).astype(np.float32))
    norms = np.sqrt(np.asarray(x.multiply(x).sum(1)).ravel())
    return (sp.diags(1 / np.maximum(norms, 1e-9)) @ x).tocsr(), df


def lsa(lists: dict[str, sp.csr_matrix], taste: np.ndarray, model: S.PlantedModel,
        ranks: list[int]) -> tuple[dict, np.ndarray]:
    """The LSA figures, and the users' pooled id embeddings of the largest rank."""
    columns = field_columns(lists)
    x, df = lsa_matrix(lists)
    n = x.shape[0]
    result = {"user_rows": n, "nonzeros": int(x.nnz), "columns": x.shape[1], "ranks": {}}
    for rank in ranks:
        t = time.perf_counter()
        u, s, v = randomized_svd(x, rank)
        user_emb, id_emb = u * s, v * s
        per_field = {}
        for h in HISTORY_FIELDS:
            ids = slice(columns[h].start + 1, columns[h].stop)  # column 0 of a field holds no id
            seen = df[ids] > 0
            per_field[h] = weighted_r2(model.history_vectors[h][seen], id_emb[ids][seen], df[ids][seen])
        pooled = pooled_per_list(lists, {h: id_emb[columns[h]] for h in HISTORY_FIELDS})
        if rank == max(ranks):
            largest = pooled
        figures = {"seconds": round(time.perf_counter() - t, 1), "top_singular_values": s[:8].round(2).tolist(),
                   "id_vector_r2": per_field, "user_taste_r2": weighted_r2(taste, user_emb),
                   "user_taste_r2_pooled_ids": weighted_r2(taste, pooled)}
        result["ranks"][str(rank)] = figures
        print(f"rank {rank}: id vectors {per_field}, user taste {figures['user_taste_r2']}, on pooled ids "
              f"{figures['user_taste_r2_pooled_ids']}", flush=True)
    return result, largest


def cooccurrence(data: Path, field: str, n_ids: int) -> tuple[np.ndarray, np.ndarray, int]:
    """How often each two ids of the history list ``field`` share a train user row (each row's list
    weighted by 1/sqrt(length), the diagonal zero; dense ``[n_ids, n_ids]``), each id's number of user
    rows, and the number of user rows."""
    rows, cols, n = [], [], 0
    for f in user_files(data):
        col = pq.read_table(f, columns=[field]).column(field).combine_chunks()
        offsets = col.offsets.to_numpy()
        rows.append(np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)) + n)
        cols.append(col.values.to_numpy())
        n += len(offsets) - 1
    x = sp.csr_matrix((np.ones(sum(len(r) for r in rows), np.float32), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(n, n_ids))
    df = np.asarray((x > 0).sum(0)).ravel()
    length = np.asarray(x.sum(1)).ravel()
    x = sp.diags(1 / np.sqrt(np.maximum(length, 1))) @ x  # a long list links many categories by chance
    c = (x.T @ x).toarray().astype(np.float64)
    np.fill_diagonal(c, 0)
    return c, df, n


def ppmi(c: np.ndarray) -> np.ndarray:
    """Positive PMI of a co-occurrence matrix (0 where two ids never co-occur)."""
    degree = c.sum(1)
    expected = np.outer(degree, degree) / max(degree.sum(), 1e-300)
    return np.where(c > 0, np.maximum(np.log(np.maximum(c, 1e-300) / np.maximum(expected, 1e-300)), 0), 0)


def category_neighbours(data: Path, model: S.PlantedModel, ms: list[int], keep: int) -> tuple[dict, np.ndarray]:
    """The neighbour figures, and each category's ``keep`` strongest neighbours by PPMI (as ids, a row per
    id of the table; an id without links is its own neighbour)."""
    n_ids = len(model.history_vectors["109_14"]) + 1
    c, _, n = cooccurrence(data, "109_14", n_ids)
    linked = np.flatnonzero(c.sum(1) > 0)
    ppmi_linked = ppmi(c[np.ix_(linked, linked)])  # an unlinked id's row and column are zero
    position = linked - 1  # local id = the category's place among the catalog line's category runs
    topic = model.topic_of_category[position]
    order = np.argsort(-ppmi_linked, 1)
    result = {"user_rows": n, "categories_linked": int(len(linked)), "neighbours": {}}
    for m in ms:
        nb = order[:, :m]
        result["neighbours"][str(m)] = {
            "same_topic_share": round(float(np.mean(topic[nb] == topic[:, None])), 4),
            "median_catalog_distance": float(np.median(np.abs(position[nb] - position[:, None])))}
        print(f"top {m} PPMI neighbours: {result['neighbours'][str(m)]}", flush=True)
    result["categories_per_topic"] = round(len(position) / (topic.max() + 1), 1)
    by_id = np.repeat(np.arange(n_ids)[:, None], keep, 1)
    by_id[linked] = linked[order[:, :keep]]
    return result, by_id


def trained_rows(export: Path, data: Path, model: S.PlantedModel, lists: dict[str, sp.csr_matrix],
                 taste: np.ndarray, neighbours: np.ndarray, ms: list[int], shares: list[float],
                 lsa_pooled: np.ndarray | None) -> dict:
    """Part 3 (see the module's text)."""
    state = torch.load(export / "model.pt", map_location="cpu", weights_only=True)
    keys = {h: f"user_ebc.embedding_bags.t_{h}.weight" for h in HISTORY_FIELDS}
    tables = {h: state[keys[h]].float().numpy() for h in HISTORY_FIELDS}
    frequency = {h: np.zeros(len(tables[h])) for h in HISTORY_FIELDS}
    for f in user_files(data):
        table = pq.read_table(f, columns=list(HISTORY_FIELDS))
        for h in HISTORY_FIELDS:
            ids = table.column(h).combine_chunks().values.to_numpy()
            frequency[h] += np.bincount(ids, minlength=len(tables[h]))[:len(tables[h])]

    def id_r2(h: str, rows: np.ndarray) -> list[float]:
        seen = np.flatnonzero(frequency[h][1:] > 0)
        return weighted_r2(model.history_vectors[h][seen], rows[1:][seen], frequency[h][1:][seen])

    trained = pooled_per_list(lists, tables)
    result = {"model": str(export), "user_rows": int(len(taste)),
              "id_vector_r2": {h: id_r2(h, tables[h]) for h in HISTORY_FIELDS},
              "user_taste_r2": weighted_r2(taste, trained), "smoothed_109_14": []}
    cfg = load_config(export / "config.toml")
    if any(cfg.model.field_init_scale.get(h, 1.0) for h in HISTORY_FIELDS):
        # The start was drawn under the trainer's key, which TrainStep prefixes to the model's own.
        moved = {h: tables[h] - initial_table(cfg.train.seed, TRAIN_STEP_PREFIX + keys[h], *tables[h].shape,
                                              cfg.model.field_init_scale.get(h, 1.0)).numpy()
                 for h in HISTORY_FIELDS}
        result["user_taste_r2_minus_start"] = weighted_r2(taste, pooled_per_list(lists, moved))
        print(f"trained rows minus their start: user taste {result['user_taste_r2_minus_start']}", flush=True)
    if lsa_pooled is not None:
        result["user_taste_r2_with_lsa"] = weighted_r2(taste, np.column_stack([trained, lsa_pooled]))
        print(f"trained rows and LSA: user taste {result['user_taste_r2_with_lsa']}", flush=True)
    print(f"trained rows: id vectors {result['id_vector_r2']}, user taste {result['user_taste_r2']}", flush=True)
    field = "109_14"
    for m in ms:
        for a in shares:
            rows = (1 - a) * tables[field] + a * tables[field][neighbours[:, :m]].mean(1)
            row = {"neighbours": m, "share": a, "id_vector_r2": id_r2(field, rows),
                   "user_taste_r2": weighted_r2(taste, pooled_per_list(lists, {**tables, field: rows}))}
            result["smoothed_109_14"].append(row)
            print(f"109_14 smoothed over {m} neighbours, share {a}: {row}", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--lsa-users", type=int, default=100_000)
    parser.add_argument("--ranks", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--neighbours", type=int, nargs="+", default=[1, 3, 5, 10, 20])
    parser.add_argument("--model", type=Path, help="export of a trained model: part 3")
    parser.add_argument("--smooth-neighbours", type=int, nargs="+", default=[1, 3, 10])
    parser.add_argument("--smooth-shares", type=float, nargs="+", default=[0.3, 0.5, 0.8])
    parser.add_argument("--no-lsa", action="store_true", help="skip part 1")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    model = S.planted_model(planted_config(args.data))
    lists, taste = history_lists(args.data, model, args.lsa_users)
    result, lsa_pooled = {"data": str(args.data)}, None
    if not args.no_lsa:
        result["lsa"], lsa_pooled = lsa(lists, taste, model, args.ranks)
    result["category_neighbours"], neighbours = category_neighbours(
        args.data, model, args.neighbours, max(args.smooth_neighbours))
    if args.model:
        result["trained_rows"] = trained_rows(args.model, args.data, model, lists, taste, neighbours,
                                              args.smooth_neighbours, args.smooth_shares, lsa_pooled)
    if args.out:
        return write_result(args.out, "cooccurrence_probe",
                            command_line(__file__, argv if argv is not None else sys.argv[1:]),
                            result, library_versions(["numpy", "scipy", "pyarrow"]))
    return result


if __name__ == "__main__":
    main()
