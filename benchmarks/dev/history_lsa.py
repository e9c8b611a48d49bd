"""Dev experiment (#9): label-free LSA embeddings of the history ids, for ``history_lsa.patch``.

    .venv/bin/python benchmarks/dev/history_lsa.py --data DATA --out lsa.npz [--users 150000] [--rank 128]

The user x history-id matrix of the first ``--users`` train user rows (all four lists; log1p(count) x
idf, rows L2-normalised, as ``cooccurrence_probe.py``'s LSA), its rank-k randomized SVD, and each id's
k-dim embedding (right singular vectors x singular values). Per field, the embeddings are shifted and
scaled so that the users' pooled vectors (log1p(count)-weighted mean of a list's rows, what the patch
computes) have mean 0 and variance 1 per column. Writes one ``[ids, k]`` float32 array per field (row =
the id as stored in the Parquet set; an id no sampled user holds gets the shift alone, i.e. zero after
it) and prints the R^2 of the users' planted taste on their pooled vectors.

With ``--planted`` it writes the planted model's own id vectors instead (4 dims per field, the same
shift and scale): the most any per-id embedding could hand the model, a diagnostic of whether better
history embeddings could close the CVR gap at all.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))
sys.path.insert(2, str(Path(__file__).resolve().parents[2]))
from cooccurrence_probe import (HISTORY_FIELDS, field_columns, history_lists, lsa_matrix,  # noqa: E402
                                pooled_per_list, randomized_svd)
from factor_probe import r2  # noqa: E402
from gap_breakdown import planted_config  # noqa: E402

from dist_mtl.data import synthetic as S  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--users", type=int, default=150_000)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--planted", action="store_true", help="write the planted id vectors instead")
    parser.add_argument("--fields", nargs="+", default=list(HISTORY_FIELDS), choices=HISTORY_FIELDS,
                        help="the history fields to write (the others get no columns)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    t = time.perf_counter()
    model = S.planted_model(planted_config(args.data))
    lists, taste = history_lists(args.data, model, args.users)
    print(f"{len(taste)} users, {time.perf_counter() - t:.0f} s", flush=True)
    if args.planted:
        # Row k + 1 is local id k (the direct Parquet layout); row 0 holds no id and starts at zero.
        planted = {h: np.vstack([np.zeros((1, model.history_vectors[h].shape[1])), model.history_vectors[h]])
                   for h in HISTORY_FIELDS}
    else:
        x, _ = lsa_matrix(lists)
        print(f"LSA matrix: {x.nnz} non-zeros", flush=True)
        _, s, v = randomized_svd(x, args.rank)
        print(f"SVD rank {args.rank}: {time.perf_counter() - t:.0f} s", flush=True)
    out, pooled_all, columns = {}, [], field_columns(lists)
    for h in HISTORY_FIELDS:
        width = lists[h].shape[1]
        emb = planted[h].astype(np.float64) if args.planted else (v[columns[h]] * s).astype(np.float64)
        if h not in args.fields:
            continue
        pooled = pooled_per_list(lists, {h: emb}, [h])
        emb = (emb - pooled.mean(0)) / (pooled.std(0) + 1e-12)
        out[h] = emb.astype(np.float32)
        pooled_all.append(pooled_per_list(lists, {h: emb}, [h]))
        covered = float((np.asarray((lists[h] > 0).sum(0)).ravel() > 0).mean())
        print(f"{h}: {width} ids, {covered:.3f} held by a sampled user", flush=True)
    print("R^2 of the users' planted taste on their pooled vectors:",
          r2(taste, np.column_stack(pooled_all)).round(3).tolist(), flush=True)
    np.savez(args.out, **out)
    print(f"wrote {args.out} in {time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
