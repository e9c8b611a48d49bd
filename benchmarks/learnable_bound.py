"""How close to the oracle AUC can any learner get on a synthetic set of a given size?

    .venv/bin/python benchmarks/learnable_bound.py                      # the accuracy and full-scale worlds
    .venv/bin/python benchmarks/learnable_bound.py --settings 2M@4M     # train size @ vocabulary size
    .venv/bin/python benchmarks/learnable_bound.py --settings full@full:real   # the full-scale run's world

The oracle AUC scores the planted model's true probabilities, which know every id's effect exactly. A
learner sees each id only as often as the train split shows it, so part of that AUC is out of reach for
any model: this script estimates how much, so that a trainer's gap to the oracle can be split into the
part the data forces and the part the model leaves.

The idealised learner: it knows the form of the planted model, its history match terms exactly, the
taste term up to the per-id parts of the taste vectors (it uses their topic's vector, which every item
of a category shares) and the spread of every field's effects; it estimates each
id's effect from that id's train impressions alone, as the Bayes posterior mean under a Gaussian
approximation: an id seen ``n`` times with label rate ``p`` is measured with noise variance
``1 / (n p (1 - p))``, and its estimate is ``prior / (prior + noise) * (true effect + noise draw)``. CVR
effects are the shared part (``_CVR_SHARED`` x the CTR estimate, learnt from all impressions) plus the
own part, learnt from clicked impressions at the buy rate. The test split is then scored with these
estimates in place of the true effects, and AUCs are computed as for the oracle (CVR on clicked rows).

A second learner is handed less: the same, except that each category's taste vector (what every item of
the category shares) is estimated from that category's train impressions, given the users' tastes, in the
same Gaussian approximation (4-dim: Fisher information from CTR's term over all impressions and CVR's
rotated term over clicked ones, prior N(0, I) as the topics are drawn). It prices learning the item side
of the taste term. (Estimating each history id's vector the same way, alone, scored far below the
trained models at every size, 0.026 CVR gap at full scale against the models' CTR 0.008: a model pools
what history ids share, so that learner bounds nothing and is not kept.)

Writes ``benchmarks/results/learnable_bound.json`` (per setting: oracle AUC, learner AUC, gap) and
prints a markdown table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(1, str(BENCH_DIR.parent))

from accuracy_bench import DEFAULT_WORLD, parse_count  # noqa: E402
from common import command_line, library_versions, write_result  # noqa: E402

from dist_mtl.data import synthetic as S  # noqa: E402

TASKS = ("ctr", "cvr", "ctcvr")
# The accuracy benchmark's world (rates 10%/10%, vocabulary of 4M impressions) at its three sizes, and
# the full-scale run's (real sizes and rates).
DEFAULT_SETTINGS = "0.5M@4M,2M@4M,4M@4M,full@full:real"


def parse_size(text: str) -> int:
    """A count (see ``parse_count``) or ``full``: Ali-CCP's exact train size. The exact size matters: the
    vocabulary scale is train size / Ali-CCP's, and a scale a hair below 1.0 ("42.3M") draws another
    planted world than the full-scale run's (measured: oracle CTR AUC 0.743 against its 0.724)."""
    return S.REAL_TRAIN_IMPRESSIONS if text.strip().lower() == "full" else parse_count(text)


def parse_setting(text: str, test_impressions: int | None) -> tuple[str, S.SyntheticConfig]:
    """``TRAIN@VOCAB[:real]``: train impressions, the train size whose share of Ali-CCP sets the
    vocabulary, and ``:real`` for Ali-CCP's click and buy rates instead of the accuracy world's. Test
    impressions: ``test_impressions``, or when None the test split of the benchmark the world stands
    for (the accuracy benchmark's 500k; Ali-CCP's 43.0M for a full-size train split)."""
    spec, _, rates = text.partition(":")
    train, _, vocab = spec.partition("@")
    if rates not in ("", "real"):
        raise ValueError(f"setting {text!r}: the suffix must be ':real' or nothing")
    n_train = parse_size(train)
    n_vocab = parse_size(vocab) if vocab else n_train
    if test_impressions is None:
        test_impressions = (S.REAL_TEST_IMPRESSIONS if n_train == S.REAL_TRAIN_IMPRESSIONS
                            else DEFAULT_WORLD.test_impressions)
    cfg = replace(DEFAULT_WORLD, train_impressions=n_train, test_impressions=test_impressions,
                  vocab_scale=min(1.0, n_vocab / S.REAL_TRAIN_IMPRESSIONS))
    if rates == "real":
        default = S.SyntheticConfig()
        cfg = replace(cfg, click_rate=default.click_rate, buy_rate_after_click=default.buy_rate_after_click)
    return text, cfg


def _per_impression_ids(x) -> dict[str, np.ndarray]:
    iu = x.impression_user
    ids = {"101": x.user_id[iu], "205": x.item, "301": x.position, **x.attributes}
    for f in S.PROFILE_FIELDS:
        ids[f] = x.profile[f][iu]
    return ids


def _posterior_estimate(rng: np.random.Generator, true: np.ndarray, prior_std: float, n: np.ndarray,
                        info_per_row: float) -> np.ndarray:
    noise_var = 1.0 / np.maximum(info_per_row * n, 1e-12)
    shrink = prior_std**2 / (prior_std**2 + noise_var)
    return shrink * (true + rng.standard_normal(len(true)) * np.sqrt(noise_var))


@contextmanager
def _topic_taste_vectors(model: S.PlantedModel, item_vectors: np.ndarray | None = None) -> Iterator[None]:
    """Swap the taste vectors of items (for ``item_vectors`` when given) and history ids for their topic's
    vector, then restore them."""
    saved = model.item_vectors, model.history_vectors
    model.item_vectors = (model.topic_vectors[model.item_topic].astype(np.float32) if item_vectors is None
                          else item_vectors)
    model.history_vectors = {
        hist: model.topic_vectors[model.item_topic[model._block_starts[attr]]].astype(np.float32)
        for hist, attr in S.HISTORY_FIELDS.items()
    }
    try:
        yield
    finally:
        model.item_vectors, model.history_vectors = saved


def _outer_sums(index: np.ndarray, vectors: np.ndarray, weights: np.ndarray | float, size: int) -> np.ndarray:
    """``out[k] = sum over rows i with index[i] == k of weights[i] * vectors[i] vectors[i]^T``: [size, R, R]."""
    rank = vectors.shape[1]
    out = np.empty((size, rank, rank))
    for r in range(rank):
        for q in range(r, rank):
            out[:, r, q] = out[:, q, r] = np.bincount(index, weights=weights * vectors[:, r] * vectors[:, q],
                                                      minlength=size)
    return out


def _estimated_vectors(rng: np.random.Generator, true: np.ndarray, information: np.ndarray,
                       prior_var: float) -> np.ndarray:
    """Posterior means of taste vectors (Gaussian approximation, each vector alone): a vector ``v`` whose
    train impressions give Fisher information ``F`` is measured as ``v + e`` with ``e ~ N(0, F^-1)``; its
    estimate is ``(I / prior_var + F)^-1 F (v + e) = (I / prior_var + F)^-1 (F v + F^1/2 xi)``."""
    rank = true.shape[1]
    eye = np.eye(rank)
    # F^1/2 from the eigendecomposition: F of a rarely seen id is (numerically) singular.
    values, vectors = np.linalg.eigh(information)
    noise = np.einsum("nrq,nq->nr", vectors, np.sqrt(np.maximum(values, 0.0)) * rng.standard_normal(true.shape))
    rhs = np.einsum("nrq,nq->nr", information, true) + noise
    return np.linalg.solve(eye / prior_var + information, rhs[:, :, None])[:, :, 0].astype(np.float32)


def learnable_bound(cfg: S.SyntheticConfig, seed: int = 1) -> dict[str, dict[str, float]]:
    model = S.planted_model(cfg)
    fields = list(S._CTR_ID_STD)
    impressions = {f: np.zeros(model.vocab[f]) for f in fields}
    clicks = {f: np.zeros(model.vocab[f]) for f in fields}
    p_click, p_buy = cfg.click_rate, cfg.buy_rate_after_click
    rank = S._TASTE_RANK
    # d logit / d (item vector) is c_ctr * taste (CTR) and c_cvr * (taste R) (CVR): a category's Fisher
    # information adds these outer products, weighted by the label variance, over its train impressions
    # (CVR's over clicked ones).
    c_ctr = cfg.signal * model.history_scale["ctr_taste"] / rank
    c_cvr = cfg.signal * model.history_scale["cvr_taste"] / rank
    mix = model.cvr_taste_mix
    n_cat = model.vocab["206"]
    category_info = np.zeros((n_cat, rank, rank))
    for chunk in S.generate_chunks(cfg, "train", 8192):
        with _topic_taste_vectors(model):
            x = model._local_inputs(chunk)
        ids = _per_impression_ids(x)
        clicked = chunk.click.astype(np.float64)
        for f in fields:
            impressions[f] += np.bincount(ids[f], minlength=model.vocab[f])
            clicks[f] += np.bincount(ids[f], weights=clicked, minlength=model.vocab[f])
        iu, category = x.impression_user, x.attributes["206"]
        buy_var = clicked * p_buy * (1 - p_buy)
        category_info += _outer_sums(category, c_ctr * x.taste[iu], p_click * (1 - p_click), n_cat)
        category_info += _outer_sums(category, c_cvr * (x.taste @ mix)[iu], buy_var, n_cat)

    rng = np.random.default_rng(seed)
    # Its own stream, so that the per-id estimates below draw what they drew before this learner.
    category_est = _estimated_vectors(np.random.default_rng(seed + 1), model.topic_vectors[model.topic_of_category],
                                      category_info, 1.0)
    item_vectors_est = category_est[model.item_attributes["206"]]
    z = {"oracle": ([], []), "learner": ([], []), "learner_items_estimated": ([], [])}
    labels: tuple[list, list] = ([], [])
    for chunk in S.generate_chunks(cfg, "test", 8192):
        x = model._local_inputs(chunk)
        ids = _per_impression_ids(x)
        z_ctr, z_cvr = model._logits(x, use_history=True)
        with _topic_taste_vectors(model):
            l_ctr, l_cvr = model._logits(x, use_history=True)
        with _topic_taste_vectors(model, item_vectors_est):
            e_ctr, e_cvr = model._logits(x, use_history=True)
        for f in fields:
            ctr_true = model.ctr_effects[f][ids[f]]
            own_true = model.cvr_effects[f][ids[f]] - S._CVR_SHARED * ctr_true
            ctr_est = _posterior_estimate(rng, ctr_true, S._CTR_ID_STD[f], impressions[f][ids[f]],
                                          p_click * (1 - p_click))
            own_est = _posterior_estimate(rng, own_true, S._CVR_OWN_ID_STD[f], clicks[f][ids[f]],
                                          p_buy * (1 - p_buy))
            for c, v in ((l_ctr, l_cvr), (e_ctr, e_cvr)):
                c += cfg.signal * (ctr_est - ctr_true)
                v += cfg.signal * (S._CVR_SHARED * (ctr_est - ctr_true) + own_est - own_true)
        for key, (c, v) in (("oracle", (z_ctr, z_cvr)), ("learner", (l_ctr, l_cvr)),
                            ("learner_items_estimated", (e_ctr, e_cvr))):
            z[key][0].append(c)
            z[key][1].append(v)
        labels[0].append(chunk.click)
        labels[1].append(chunk.buy)

    click = np.concatenate(labels[0]).astype(bool)
    buy = np.concatenate(labels[1]).astype(bool)
    keep = click | ~buy  # converters drop click=0/buy=1 rows; oracle_auc does too
    click, buy = click[keep], buy[keep]
    out = {}
    for key, (zc, zv) in z.items():
        p_ctr = S._sigmoid(np.concatenate(zc))[keep]
        p_cvr = S._sigmoid(np.concatenate(zv))[keep]
        out[key] = {"ctr": S.binary_auc(click, p_ctr), "cvr": S.binary_auc(buy[click], p_cvr[click]),
                    "ctcvr": S.binary_auc(buy, p_ctr * p_cvr)}
    out["gap"] = {t: out["oracle"][t] - out["learner"][t] for t in TASKS}
    out["gap_items_estimated"] = {t: out["oracle"][t] - out["learner_items_estimated"][t] for t in TASKS}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=DEFAULT_SETTINGS,
                        help=f"comma-separated TRAIN@VOCAB[:real] (default {DEFAULT_SETTINGS})")
    parser.add_argument("--test-impressions", type=parse_count, default=None,
                        help="test impressions scored per setting (default: the accuracy benchmark's 0.5M; "
                             "the whole 43.0M test split for a full-size train split)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "learnable_bound.json")
    args = parser.parse_args()
    try:
        settings = [parse_setting(s.strip(), args.test_impressions) for s in args.settings.split(",") if s.strip()]
    except ValueError as err:
        parser.error(str(err))

    rows, results = [], {}
    for name, cfg in settings:
        start = time.perf_counter()
        r = learnable_bound(cfg)
        results[name] = {"train_impressions": cfg.train_impressions, "test_impressions": cfg.test_impressions,
                         "vocab_scale": cfg.resolved_vocab_scale(),
                         "click_rate": cfg.click_rate, "buy_rate_after_click": cfg.buy_rate_after_click,
                         "seconds": time.perf_counter() - start, **r}
        cells = " | ".join(f"{r['oracle'][t]:.4f} / {r['learner'][t]:.4f} ({r['gap'][t]:+.4f})" for t in TASKS)
        items = " / ".join(f"{r['gap_items_estimated'][t]:+.4f}" for t in TASKS)
        rows.append(f"| {cfg.train_impressions:,} | {cfg.test_impressions:,} | {cfg.resolved_vocab_scale():.4f} | "
                    f"{cfg.click_rate:g} / {cfg.buy_rate_after_click:g} | {cells} | {items} |")
        print(rows[-1], flush=True)
    write_result(args.out, "learnable_bound", command_line(__file__, sys.argv[1:]), {"settings": results},
                 library_versions(["numpy", "pyarrow"]))
    print("\n| train impressions | test impressions | vocab scale | click / buy rate | CTR oracle / learner (gap) | "
          "CVR oracle / learner (gap) | CTCVR oracle / learner (gap) | gaps, items' vectors estimated |\n"
          "| ---: | ---: | ---: | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
