"""Dev experiment (#9): label-free spectral embeddings of the history categories, for ``history_lsa.patch``.

    .venv/bin/python benchmarks/dev/history_spectral.py --data DATA --out spectral.npz [--neighbours 10] [--dims 64]

The LSA of ``history_lsa.py`` finds the directions of most variance of the user x id matrix; a topic
(a run of the catalog's categories) is not one of them: co-occurrence links a category to its neighbours
on the catalog line (``cooccurrence_probe.py``: its two or three strongest PPMI neighbours are the
categories beside it), and a topic is reached only by chaining those links. Laplacian eigenmaps follow
such chains: the smoothest functions on the co-occurrence graph vary slowly along it, so a few dozen of
them can hold a property that is constant over long runs of it. This builds the PPMI graph of the
categories of 109_14 over all train user rows (``cooccurrence_probe.cooccurrence``, ``ppmi``),
keeps each category's ``--neighbours`` strongest links (symmetrised), and takes the eigenvectors of the
smallest eigenvalues of its normalised Laplacian (the first, constant one dropped). It prints, for
several numbers of eigenvectors, the R^2 of the categories' planted vectors on them (weighted by the
number of user rows holding the category) and of the users' planted taste on the pooled vectors
(log1p(count)-weighted mean, on the first ``--users`` train rows), and writes the ``--dims`` first in
``history_lsa.py``'s format (field 109_14 only; row = the id as stored in the Parquet set, standardised
so that the users' pooled vectors have mean 0 and variance 1 per column), for ``history_lsa.patch``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))
sys.path.insert(2, str(Path(__file__).resolve().parents[2]))
from cooccurrence_probe import cooccurrence, history_lists, ppmi, pooled_per_list  # noqa: E402
from factor_probe import r2  # noqa: E402
from gap_breakdown import planted_config  # noqa: E402

from dist_mtl.data import synthetic as S  # noqa: E402

FIELD = "109_14"


def knn_laplacian_eigenvectors(weights: np.ndarray, neighbours: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` smoothest non-constant eigenvectors of the normalised Laplacian of the symmetrised
    ``neighbours``-strongest-links graph, scaled by D^-1/2 (the random-walk form), and their eigenvalues."""
    n = weights.shape[0]
    top = np.argpartition(-weights, neighbours, axis=1)[:, :neighbours]
    rows = np.repeat(np.arange(n), neighbours)
    w = sp.csr_matrix((weights[rows, top.ravel()], (rows, top.ravel())), shape=(n, n))
    w = w.maximum(w.T)
    w.eliminate_zeros()
    degree = np.asarray(w.sum(1)).ravel()
    isolated = degree == 0
    d_half = sp.diags(1 / np.sqrt(np.where(isolated, 1, degree)))
    # Largest eigenvalues of D^-1/2 W D^-1/2 are the smallest of the normalised Laplacian; shifting by the
    # identity makes them the largest algebraic ones, which eigsh finds fast.
    a = d_half @ w @ d_half + sp.identity(n)
    values, vectors = spla.eigsh(a.tocsc(), k=count + 1, which="LA", tol=1e-6)
    order = np.argsort(-values)
    vectors = (d_half @ vectors[:, order])[:, 1:]
    vectors[isolated] = 0
    return vectors, 2 - values[order][1:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--neighbours", type=int, default=10)
    parser.add_argument("--dims", type=int, default=64, help="eigenvectors written to --out")
    parser.add_argument("--report-dims", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128])
    parser.add_argument("--users", type=int, default=120_000, help="train user rows for the users' R^2")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    t = time.perf_counter()
    model = S.planted_model(planted_config(args.data))
    vectors_planted = model.history_vectors[FIELD]
    n_ids = len(vectors_planted) + 1  # the Parquet layout stores local id k as k + 1; row 0 holds no id
    counts, df, _ = cooccurrence(args.data, FIELD, n_ids)
    weights = ppmi(counts)
    print(f"PPMI {weights.shape}, {time.perf_counter() - t:.0f} s", flush=True)
    most = max(max(args.report_dims), args.dims)
    emb, eigenvalues = knn_laplacian_eigenvectors(weights, args.neighbours, most)
    print(f"{most} eigenvectors, {time.perf_counter() - t:.0f} s; eigenvalues {eigenvalues[:6].round(5).tolist()} "
          f"... {eigenvalues[-1]:.4f}", flush=True)
    seen = df[1:] > 0
    position = np.arange(n_ids - 1)
    fiedler = emb[1:, 0]
    rank_corr = np.corrcoef(np.argsort(np.argsort(fiedler[seen])), position[seen])[0, 1]
    print(f"Spearman correlation of the first eigenvector with the catalog position: {rank_corr:.3f}")
    lists, taste = history_lists(args.data, model, args.users)
    planted_pooled = pooled_per_list(lists, {FIELD: np.vstack([np.zeros((1, 4)), vectors_planted])}, [FIELD])
    print(f"users' taste on their pooled planted {FIELD} vectors: {r2(taste, planted_pooled).round(3).tolist()}")
    for k in args.report_dims:
        ids = r2(vectors_planted[seen].astype(np.float64), emb[1:][seen][:, :k], df[1:][seen].astype(np.float64))
        pooled = pooled_per_list(lists, {FIELD: emb[:, :k]}, [FIELD])
        print(f"{k:4d} eigenvectors: category vectors R^2 {ids.round(3).tolist()}, users' taste "
              f"{r2(taste, pooled).round(3).tolist()}", flush=True)
    if args.out:
        e = emb[:, :args.dims].astype(np.float64)
        pooled = pooled_per_list(lists, {FIELD: e}, [FIELD])
        e = (e - pooled.mean(0)) / (pooled.std(0) + 1e-12)
        np.savez(args.out, **{FIELD: e.astype(np.float32)})
        print(f"wrote {args.out} ({e.shape}) in {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
