"""Synthetic Ali-CCP with a planted truth: realistic stand-ins for the raw Tianchi files.

The generator is streaming and deterministic per ``SyntheticConfig`` (seed included). It produces the
same rows in three encodings:

* ``write_raw``: the raw Tianchi text (``sample_skeleton_{split}.csv`` + ``common_features_{split}.csv``),
  byte-compatible with the real files, plus ``truth_{split}.parquet`` with the true probabilities;
* ``write_parquet_direct``: the dist_mtl dataset layout through ``schema.DatasetWriter``, for sizes whose
  raw text would not fit on disk;
* ``write_rechub_csv``: torch-rechub's preprocessed CSV layout (one id per field), for baselines.

The world behind the data
-------------------------
Items sit on a *catalog line* ``0..V_item-1``. Each attribute field (category 206, shop 207, intention
210, brand 216) partitions the line into contiguous blocks, so an item's attributes are fixed and
neighbouring items share them; categories are grouped into *topics*, each with a random taste vector.
A user row (one common-features row) is built from *history events*: items drawn near a few anchor items
of the user (runs of neighbouring items) or from global popularity. Its four history lists are the
distinct attributes of the event items with count weights, so the lists agree with each other. Most
impressions lean towards the user's history (an item of the category of a history item, sometimes that
very item or a neighbour), which makes the combination fields 508/509/702/853 present often: each is the
item's attribute crossed with a few of the user's entries of the matching history list when the
attribute is in that list, the match itself last (torch-rechub keeps the last id of a field), weight =
the history count. The number of crossed entries is calibrated to ~13.5 features per skeleton row.

The planted model (``PlantedModel``) is what an embedding + MLP model can learn: per-id effects, sums of a
few terms, ``log1p`` of the count of the item's attributes in the user's history lists, and a low-rank
interaction between a taste vector pooled from the weighted history and the item's vector. The CVR
logit shares part of its effects with the CTR logit. Labels are drawn from it: ``click ~ p_ctr``,
``buy ~ click * p_cvr`` plus rare click=0/buy=1 noise rows. Biases are calibrated (bisection on a
calibration sample) so that the realised rates match the configured ones.

Randomness is drawn per *cell* of ``USERS_PER_CELL`` consecutive user rows from its own seeded
generator, so the output does not depend on how many users a chunk holds.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dist_mtl.data import schema

REAL_TRAIN_IMPRESSIONS = 42_300_135
REAL_TEST_IMPRESSIONS = 43_016_840
SPLITS = ("train", "test")
USERS_PER_CELL = 256
#: Fields at most this large keep their real vocabulary at every scale (gender, age, position...).
TINY_VOCAB = 100
#: Smallest vocabulary of a scaled field, so that tiny data sets still have some variety.
MIN_SCALED_VOCAB = 100

SKELETON_SINGLE_FIELDS = ("205", "206", "207", "210", "216", "301")
ATTRIBUTE_FIELDS = ("206", "207", "210", "216")
PROFILE_FIELDS = ("121", "122", "124", "125", "126", "127", "128", "129")
USER_SINGLE_FIELDS = ("101",) + PROFILE_FIELDS
#: History field -> the item attribute field whose id space it shares.
HISTORY_FIELDS: dict[str, str] = {"109_14": "206", "110_14": "207", "127_14": "216", "150_14": "210"}
#: Combination field -> history field it crosses with the item's attribute of the same id space.
CROSS_FIELDS: dict[str, str] = {"508": "109_14", "509": "110_14", "702": "127_14", "853": "150_14"}
TRUTH_COLUMNS = ("sample_id", "click", "buy", "p_ctr", "p_cvr")
RECHUB_SPARSE_COLUMNS = (
    "101", "121", "122", "124", "125", "126", "127", "128", "129", "205", "206", "207", "210", "216",
    "508", "509", "702", "853", "301", "109_14", "110_14", "127_14", "150_14",
)
RECHUB_DENSE_FIELDS = ("109_14", "110_14", "127_14", "150_14", "508", "509", "702", "853")
RECHUB_HEADER = ",".join(("click", "purchase") + RECHUB_SPARSE_COLUMNS + tuple("D" + f for f in RECHUB_DENSE_FIELDS))
EXTRA_TARGET_COLUMNS = {"price": "float32", "dwell": "float32"}

_SPLIT_CODES = {"train": 1, "test": 2, "calibration": 3}
_GROUP_SIZE_SIGMA, _GROUP_SIZE_CLIP = 1.0, 30.0  # lognormal spread of impressions per user row
_HISTORY_SIGMA, _HISTORY_CLIP = 0.8, 5.5  # lognormal spread of history length; max ~5.5x mean as real
_USER_ZIPF = 0.6  # user ids repeat over a few rows each (730k rows, 238k ids), not Zipf-heavy like items
_BLOCK_ZIPF = 0.9  # skew of attribute block sizes (items per category/shop/...)
_GLOBAL_EVENT_SHARE = 0.3  # history events drawn from global popularity instead of near an anchor
_RUN_GAP_MEAN = 0.5  # skipped catalog positions between consecutive items of a history run
_LEAN_SHARE = 0.75  # impressions near one of the user's history items (its category, or a neighbour of it)
_LEAN_NEAR_SHARE = 0.3  # of those: the history item itself or a catalog neighbour
_LEAN_SAME_ITEM = 0.3  # of those: the history item itself
_LEAN_OFFSET_MEAN = 3.0
_FEATURES_PER_SKELETON_ROW = 13.5  # real mean; the number of cross entries is calibrated to it
_POSITION_PROBS = (0.45, 0.3, 0.15, 0.1)
_TASTE_RANK = 4
#: Per-id spread of the taste vectors around their topic's vector. An item's own part is as hard to learn
#: as an own effect (it is seen ~45 times at 2M impressions); at 0.5 it alone cost an idealised learner
#: 0.0055 CTR AUC at 2M.
_TASTE_ID_NOISE = 0.2
_CALIBRATION_USERS = 1024


@dataclass
class SyntheticConfig:
    """Size, rates and signal of a synthetic Ali-CCP; every output is a function of it."""

    train_impressions: int = 200_000
    test_impressions: int = 50_000
    impressions_per_user: float = 58.0  # mean of a long-tailed group size (>=1)
    history_ids_per_user: float = 500.0  # target mean total length of the four history lists per user row
    # (calibrated on a small sample of users: generated sets measured 500-518, by seed and size)
    vocab_scale: float | None = None  # None: train_impressions / real size, capped at 1
    click_rate: float = 0.039
    buy_rate_after_click: float = 0.0054
    click0_buy1_rate: float = 5e-5  # impressions written with click=0,buy=1 as in the real data
    zipf_exponent: float = 1.1  # id popularity skew
    signal: float = 1.0  # strength multiplier of the planted model
    extra_targets: bool = False  # "price" and "dwell" columns, direct-Parquet path only
    seed: int = 0

    def validate(self) -> None:
        checks = (
            ("train_impressions", self.train_impressions >= 1, "must be >= 1"),
            ("test_impressions", self.test_impressions >= 0, "must be >= 0"),
            ("impressions_per_user", self.impressions_per_user >= 1.0, "must be >= 1"),
            ("history_ids_per_user", self.history_ids_per_user >= 4.0,
             "must be >= 4 (every user row has at least one id in each of the four lists)"),
            ("vocab_scale", self.vocab_scale is None or 0.0 < self.vocab_scale <= 1.0, "must be in (0, 1]"),
            ("click_rate", 0.0 < self.click_rate < 1.0, "must be in (0, 1)"),
            ("buy_rate_after_click", 0.0 < self.buy_rate_after_click < 1.0, "must be in (0, 1)"),
            ("click0_buy1_rate", 0.0 <= self.click0_buy1_rate < 1.0 - self.click_rate,
             "must be in [0, 1 - click_rate)"),
            ("zipf_exponent", self.zipf_exponent > 0.0, "must be > 0"),
            ("signal", self.signal >= 0.0, "must be >= 0"),
            ("seed", 0 <= self.seed < 2**32, "must be in [0, 2**32)"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"SyntheticConfig.{name}={getattr(self, name)!r} {rule}")

    def impressions(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} (expected one of {SPLITS})")
        return self.train_impressions if split == "train" else self.test_impressions

    def resolved_vocab_scale(self) -> float:
        if self.vocab_scale is not None:
            return float(self.vocab_scale)
        return min(1.0, self.train_impressions / REAL_TRAIN_IMPRESSIONS)

    def _model_key(self) -> tuple:
        """Everything the planted model depends on (extra_targets adds columns, changes no draw)."""
        d = asdict(self)
        d.pop("extra_targets")
        return tuple(sorted(d.items()))


#: Bumped whenever the planted world changes for the same ``SyntheticConfig`` (effect spreads, catalog
#: rules...), so that a data set written by an older generator is never taken for a current one.
GENERATOR_VERSION = 2


def dataset_fingerprint(cfg: SyntheticConfig) -> dict:
    """What a written synthetic set depends on: its config and the generator version."""
    return {**asdict(cfg), "generator_version": GENERATOR_VERSION}


def field_vocab_sizes(cfg: SyntheticConfig) -> dict[str, int]:
    """Number of distinct ids of each of the 23 fields (local ids run ``0..size-1``).

    Real sizes (``schema.ALI_CCP_VOCAB_AFTER_FILTER``) times the vocabulary scale, with floors: tiny
    fields keep their real size, scaled ones keep at least ``MIN_SCALED_VOCAB`` ids, the item field keeps
    room for ``6 x history_ids_per_user`` distinct history items, and an attribute field never has more
    ids than there are items (every attribute id belongs to at least one item). A history field has the
    size of the attribute field whose id space it shares.
    """
    scale = cfg.resolved_vocab_scale()
    sizes: dict[str, int] = {}
    for name, real in schema.ALI_CCP_VOCAB_AFTER_FILTER.items():
        sizes[name] = real if real <= TINY_VOCAB else min(real, max(MIN_SCALED_VOCAB, round(real * scale)))
    sizes["205"] = max(sizes["205"], math.ceil(6 * cfg.history_ids_per_user))
    for attr in ATTRIBUTE_FIELDS:
        sizes[attr] = min(sizes[attr], sizes["205"])
    for hist, attr in HISTORY_FIELDS.items():
        sizes[hist] = sizes[attr]
    return {f.name: sizes[f.name] for f in schema.ALI_CCP_FIELDS}


# ---------------------------------------------------------------------------------------------------
# Small numeric tools


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mix: counter-based randomness for keys and hashed ids."""
    z = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _zipf_ranks(u: np.ndarray, n: np.ndarray | int, exponent: float) -> np.ndarray:
    """Ranks in ``[0, n)`` with probability ~ (rank+1)^-exponent, from uniforms ``u`` (inverse CDF of the
    continuous density, floored)."""
    n = np.asarray(n, dtype=np.float64)
    if abs(exponent - 1.0) < 1e-9:
        x = np.power(n + 1.0, u) - 1.0
    else:
        a = 1.0 - exponent
        x = np.power(1.0 + u * (np.power(n + 1.0, a) - 1.0), 1.0 / a) - 1.0
    return np.minimum(x.astype(np.int64), np.asarray(n, dtype=np.int64) - 1)


def _geometric(u: np.ndarray, mean: float) -> np.ndarray:
    """Geometric counts ``0, 1, 2...`` with the given mean, from uniforms."""
    return np.floor(np.log1p(-u) / math.log(mean / (1.0 + mean))).astype(np.int64)


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


@lru_cache(maxsize=None)
def _clipped_lognormal_mu(sigma: float, clip: float) -> float:
    """``mu`` such that ``E[min(exp(N(mu, sigma^2)), clip)] == 1``: long tails with a known mean."""

    def clipped_mean(mu: float) -> float:
        lc = math.log(clip)
        return math.exp(mu + sigma**2 / 2) * _normal_cdf((lc - mu - sigma**2) / sigma) + clip * (
            1.0 - _normal_cdf((lc - mu) / sigma)
        )

    lo, hi = -20.0, math.log(clip)
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if clipped_mean(mid) < 1.0 else (lo, mid)
    return (lo + hi) / 2


def _long_tail(z: np.ndarray, sigma: float, clip: float) -> np.ndarray:
    """Mean-1 clipped lognormal values from standard normals ``z``."""
    return np.minimum(np.exp(_clipped_lognormal_mu(sigma, clip) + sigma * z), clip)


def _offsets_from_lengths(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _segment_positions(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, position within row) of every element of a jagged layout."""
    lengths = np.diff(offsets)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    return rows, np.arange(int(offsets[-1])) - offsets[:-1][rows]


def _bisect_increasing(fn: Callable[[float], float], target: float, lo: float, hi: float, steps: int = 60) -> float:
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fn(mid) < target else (lo, mid)
    return (lo + hi) / 2


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


# ---------------------------------------------------------------------------------------------------
# Ids


@dataclass(frozen=True)
class FieldIds:
    """Maps a field's local ids ``0..size-1`` to the global Tianchi feature ids (a bijection onto
    ``base..base+size-1``, scrambled so that id order says nothing about popularity)."""

    name: str
    base: int
    size: int
    multiplier: int
    shift: int

    def to_global(self, local: np.ndarray) -> np.ndarray:
        local = np.asarray(local, dtype=np.int64)
        return self.base + (local * self.multiplier + self.shift) % self.size

    def to_local(self, global_ids: np.ndarray) -> np.ndarray:
        g = np.asarray(global_ids, dtype=np.int64) - self.base
        if g.size and (g.min() < 0 or g.max() >= self.size):
            bad = g[(g < 0) | (g >= self.size)][0] + self.base
            raise ValueError(f"feature id {bad} is not an id of field {self.name} "
                             f"(its ids are {self.base}..{self.base + self.size - 1})")
        inverse = pow(self.multiplier, -1, self.size) if self.size > 1 else 0
        return ((g - self.shift) % self.size) * inverse % self.size


def _affine_permutation(rng: np.random.Generator, n: int) -> tuple[int, int, int]:
    """(a, b, n) with gcd(a, n) = 1: ``x -> (a x + b) mod n`` permutes ``0..n-1`` with no table."""
    a = int(rng.integers(max(1, n // 3), n)) if n > 1 else 1
    while math.gcd(a, n) != 1:
        a += 1
    return a, int(rng.integers(0, n)), n


def _permute(perm: tuple[int, int, int], x: np.ndarray) -> np.ndarray:
    a, b, n = perm
    return (x * a + b) % n


def _zipf_probs(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Zipf probabilities over ``0..n-1`` in a random order (popularity says nothing about the index)."""
    p = rng.permutation(np.power(np.arange(1, n + 1, dtype=np.float64), -exponent))
    return p / p.sum()


def _build_field_ids(vocab: dict[str, int], rng: np.random.Generator) -> dict[str, FieldIds]:
    """Disjoint global id ranges, one per field, in a seed-shuffled field order with small gaps."""
    names = [f.name for f in schema.ALI_CCP_FIELDS]
    out, base = {}, 1
    for i in rng.permutation(len(names)):
        name, size = names[i], vocab[names[i]]
        multiplier, shift, _ = _affine_permutation(rng, size)
        out[name] = FieldIds(name, base, size, multiplier, shift)
        base += size + int(rng.integers(1, 1000))
    return out


# ---------------------------------------------------------------------------------------------------
# Chunks


@dataclass
class Jagged:
    """Rows of weighted id lists: row ``r`` holds ``ids[offsets[r]:offsets[r+1]]``."""

    offsets: np.ndarray  # int64 [rows + 1]
    ids: np.ndarray  # int64 global feature ids
    weights: np.ndarray  # float32 count weights

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def last_of_row(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(has an entry, last id, last weight) per row; id/weight are 0 where the row is empty."""
        present = self.lengths > 0
        last = np.maximum(self.offsets[1:] - 1, 0)
        ids = np.where(present, self.ids[last] if len(self.ids) else 0, 0)
        weights = np.where(present, self.weights[last] if len(self.weights) else 0.0, 0.0)
        return present, ids, weights


@dataclass
class SyntheticChunk:
    """Whole user groups: U user rows and the B impressions pointing at them, with raw global ids."""

    split: str
    user_keys: np.ndarray  # [U] 'S32' md5-like hex common_feature_index
    user_fields: dict[str, np.ndarray]  # "101" and the profile fields: int64 [U]
    history: dict[str, Jagged]  # the four history fields, U rows
    impression_user: np.ndarray  # int32 [B]: row in the user arrays
    sample_id: np.ndarray  # int64 [B], sequential per split
    click: np.ndarray  # int8 [B]
    buy: np.ndarray  # int8 [B]
    p_ctr: np.ndarray  # float32 [B] planted click probability
    p_cvr: np.ndarray  # float32 [B] planted buy-after-click probability
    item_fields: dict[str, np.ndarray]  # 205, 206, 207, 210, 216, 301: int64 [B]
    crosses: dict[str, Jagged]  # 508, 509, 702, 853, B rows
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # price, price_mean, dwell (extra_targets)

    @property
    def num_users(self) -> int:
        return len(self.user_keys)

    @property
    def num_impressions(self) -> int:
        return len(self.sample_id)

    def truth_table(self) -> pa.Table:
        cols = {
            "sample_id": pa.array(self.sample_id, pa.int64()),
            "click": pa.array(self.click, pa.int8()),
            "buy": pa.array(self.buy, pa.int8()),
            "p_ctr": pa.array(self.p_ctr, pa.float32()),
            "p_cvr": pa.array(self.p_cvr, pa.float32()),
        }
        if "price_mean" in self.extras:
            cols["price_mean"] = pa.array(self.extras["price_mean"], pa.float32())
        return pa.table(cols)


@dataclass
class _Cells:
    """The seeded generators of consecutive cells in a chunk and how many user rows each holds."""

    generators: list[np.random.Generator]
    users: np.ndarray  # users per cell

    def draw(self, per_cell_counts: np.ndarray,
             fn: Callable[[np.random.Generator, int, int], np.ndarray]) -> np.ndarray:
        """Concatenate ``fn(generator, lo, hi)`` over cells, where ``[lo, hi)`` is the cell's slice of the
        result (``per_cell_counts`` long each)."""
        bounds = _offsets_from_lengths(np.asarray(per_cell_counts, dtype=np.int64))
        parts = [fn(g, int(bounds[i]), int(bounds[i + 1])) for i, g in enumerate(self.generators)]
        return np.concatenate(parts) if parts else np.zeros(0)

    def per_cell(self, per_row_counts: np.ndarray, rows_per_cell: np.ndarray) -> np.ndarray:
        """Sum ``per_row_counts`` over the rows of each cell."""
        bounds = _offsets_from_lengths(rows_per_cell)
        sums = np.concatenate([[0], np.cumsum(per_row_counts, dtype=np.int64)])
        return sums[bounds[1:]] - sums[bounds[:-1]]


@dataclass
class _IdList:
    """Rows of distinct local ids with counts, sorted by (row, id); ``keys = row * size + id``."""

    offsets: np.ndarray
    ids: np.ndarray
    counts: np.ndarray
    keys: np.ndarray

    @classmethod
    def build(cls, offsets: np.ndarray, ids: np.ndarray, counts: np.ndarray, size: int) -> "_IdList":
        rows, _ = _segment_positions(offsets)
        keys = rows * size + np.asarray(ids, dtype=np.int64)
        if len(keys) > 1 and not bool(np.all(keys[1:] > keys[:-1])):
            order = np.argsort(keys, kind="stable")
            keys, ids, counts = keys[order], np.asarray(ids)[order], np.asarray(counts)[order]
        return cls(offsets, np.asarray(ids, dtype=np.int64), np.asarray(counts), keys)

    def find(self, rows: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
        """Flat index of ``values[i]`` in row ``rows[i]``, or -1."""
        query = rows.astype(np.int64) * size + values
        pos = np.searchsorted(self.keys, query)
        found = pos < len(self.keys)
        found[found] = self.keys[pos[found]] == query[found]
        return np.where(found, pos, -1)


@dataclass
class _Histories:
    """Local-id history of U user rows: distinct event items and the four attribute lists."""

    item_offsets: np.ndarray
    items: np.ndarray  # catalog positions, sorted within a user
    lists: dict[str, _IdList]  # history field -> distinct attributes with counts


@dataclass
class _LocalInputs:
    """What the planted model reads, as local ids."""

    user_id: np.ndarray  # [U]
    profile: dict[str, np.ndarray]  # [U] per profile field
    taste: np.ndarray  # [U, rank]
    impression_user: np.ndarray  # [B]
    item: np.ndarray  # [B]
    attributes: dict[str, np.ndarray]  # 206/207/210/216 -> [B]
    position: np.ndarray  # [B]
    match_counts: dict[str, np.ndarray]  # history field -> [B] count of the item's attribute (0 = absent)


# ---------------------------------------------------------------------------------------------------
# The planted world


#: Standard deviations (logit units, at signal 1) of the per-id effects. The idiosyncratic effects of
#: the large fields (user 101, item 205, shop 207, brand 216) are small, and CVR's own effects sit on the
#: small profile fields: most of the signal is in what many impressions share (category, intention,
#: position, profile, the history match and taste, and CVR's share of the CTR effects). An id seen ~100
#: times in train (the median user or item at the real density) cannot have its own effect estimated to
#: better than about +-0.3 logits, so large own effects put the oracle AUC out of every learner's reach:
#: with the earlier spreads (generator version 1) an idealised learner that knew every history term
#: exactly and had only the per-id effects to estimate (benchmarks/learnable_bound.py's method) fell
#: 0.019 / 0.038 / 0.030 short of the oracle CTR / CVR / CTCVR AUC at 2M impressions, and the planted
#: model must be learnable (issue 2).
_CTR_ID_STD = {"101": 0.05, "205": 0.1, "206": 0.35, "207": 0.07, "210": 0.2, "216": 0.1, "301": 0.35,
               "121": 0.1, "122": 0.05, "124": 0.05, "125": 0.08, "126": 0.05, "127": 0.05, "128": 0.05,
               "129": 0.05}
_CVR_OWN_ID_STD = {"101": 0.02, "205": 0.03, "206": 0.05, "207": 0.03, "210": 0.03, "216": 0.03, "301": 0.05,
                   "121": 0.1, "122": 0.05, "124": 0.05, "125": 0.2, "126": 0.2, "127": 0.2, "128": 0.05,
                   "129": 0.05}
_CVR_SHARED = 0.5  # CVR effect = _CVR_SHARED * CTR effect + own effect: correlated but distinct
#: Relative logit per log1p(count of the item's attribute in the user's history list).
_CTR_MATCH = {"109_14": 0.3, "110_14": 0.25, "127_14": 0.2, "150_14": 0.15}
_CVR_MATCH = {"109_14": 0.15, "110_14": 0.35, "127_14": 0.3, "150_14": 0.1}
#: Standard deviation (at signal 1) of each history term on the calibration sample; history lengths and
#: counts change with the scale, so the terms are scaled to these rather than given fixed coefficients.
_HISTORY_TERM_STD = {"ctr_match": 0.6, "ctr_taste": 0.45, "cvr_match": 0.5, "cvr_taste": 0.35}
_PRICE_STD = {"205": 0.4, "206": 0.4, "207": 0.2, "126": 0.2, "127": 0.2}
_PRICE_BASE, _PRICE_NOISE = 4.0, 0.3


class PlantedModel:
    """The catalog, the id codec and the true model of one config; deterministic from ``cfg``.

    ``probabilities`` (on a chunk's written features) is how every ``p_ctr`` / ``p_cvr`` is computed::

        z_ctr = bias_ctr + signal * (per-id effects of user, profile, item, attributes and position
                    + history_scale["ctr_match"] * sum_g _CTR_MATCH[g] * log1p(count of the item's
                                                       attribute in history list g, 0 if absent)
                    + history_scale["ctr_taste"] * taste . item_vector / rank)
        z_cvr = bias_cvr + signal * (_CVR_SHARED * the CTR per-id effects + own per-id effects
                    + history_scale["cvr_match"] * sum_g _CVR_MATCH[g] * log1p(...)
                    + history_scale["cvr_taste"] * taste . (R item_vector) / rank)

    ``taste`` is the log1p(count)-weighted mean of the history ids' vectors (their topic's vector plus
    noise); item vectors are their category topic's vector plus noise; ``R`` mixes the identity with a
    random rotation, so the CVR taste is partly the CTR taste. ``history_scale`` gives each history term
    a fixed spread on the calibration sample (history lengths and counts change with the scale), and the
    biases hit the configured rates. ``use_history=False`` drops the history terms: a history-blind score.
    """

    def __init__(self, cfg: SyntheticConfig):
        cfg.validate()
        # Extra targets add columns from their own random stream; the model itself ignores the flag.
        self.cfg = replace(cfg, extra_targets=False)
        self.vocab = field_vocab_sizes(cfg)
        rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(0,)))
        self.ids = _build_field_ids(self.vocab, rng)
        n_items = self.vocab["205"]
        self._item_perm = _affine_permutation(rng, n_items)
        self._user_perm = _affine_permutation(rng, self.vocab["101"])
        # Attribute blocks on the catalog line: every attribute id owns >= 1 consecutive items.
        self.item_attributes: dict[str, np.ndarray] = {}
        self._block_starts: dict[str, np.ndarray] = {}
        for attr in ATTRIBUTE_FIELDS:
            size = self.vocab[attr]
            counts = 1 + rng.multinomial(n_items - size, _zipf_probs(rng, size, _BLOCK_ZIPF))
            self.item_attributes[attr] = np.repeat(np.arange(size, dtype=np.int32), counts)
            self._block_starts[attr] = _offsets_from_lengths(counts)[:-1]
        self.profiles = {
            f: rng.choice(self.vocab[f], size=self.vocab["101"],
                          p=_zipf_probs(rng, self.vocab[f], 1.0)).astype(np.int32)
            for f in PROFILE_FIELDS
        }
        self._position_cdf = np.cumsum(_POSITION_PROBS)
        # Topics: runs of consecutive categories share a random taste direction.
        n_topics = int(np.clip(round(math.sqrt(self.vocab["206"]) / 2), 4, 64))
        topic_of_category = (np.arange(self.vocab["206"]) * n_topics) // self.vocab["206"]
        topics = rng.standard_normal((n_topics, _TASTE_RANK))
        item_topic = topic_of_category[self.item_attributes["206"]]
        self.topic_vectors = topics
        self.topic_of_category = topic_of_category
        self.item_topic = item_topic
        self.item_vectors = (topics[item_topic]
                             + _TASTE_ID_NOISE * rng.standard_normal((n_items, _TASTE_RANK))).astype(np.float32)
        self.history_vectors = {
            hist: (topics[item_topic[self._block_starts[attr]]]
                   + _TASTE_ID_NOISE * rng.standard_normal((self.vocab[attr], _TASTE_RANK))).astype(np.float32)
            for hist, attr in HISTORY_FIELDS.items()
        }
        rotation, _ = np.linalg.qr(rng.standard_normal((_TASTE_RANK, _TASTE_RANK)))
        self.cvr_taste_mix = (0.6 * np.eye(_TASTE_RANK) + 0.8 * rotation).astype(np.float32)
        self.ctr_effects = {f: (s * rng.standard_normal(self.vocab[f])).astype(np.float32)
                            for f, s in _CTR_ID_STD.items()}
        self.cvr_effects = {
            f: (_CVR_SHARED * self.ctr_effects[f] + s * rng.standard_normal(self.vocab[f])).astype(np.float32)
            for f, s in _CVR_OWN_ID_STD.items()
        }
        self.price_effects = {f: (s * rng.standard_normal(self.vocab[f])).astype(np.float32)
                              for f, s in _PRICE_STD.items()}
        self.cross_salts = {c: int(rng.integers(1, 2**62)) for c in CROSS_FIELDS}
        self.key_salt = int(rng.integers(0, 2**62))
        self.bias_ctr = 0.0
        self.bias_cvr = 0.0
        self.history_scale = {name: 1.0 for name in _HISTORY_TERM_STD}  # calibrated below
        self.cross_extra_mean = 3.5  # cross entries besides the match; calibrated below
        self.mean_history_events = self._calibrate_history_length()
        self._calibrate_on_sample()

    # -- construction helpers ------------------------------------------------------------------------

    def _calibrate_history_length(self) -> float:
        """Mean history events per user row (before the long-tail factor) that give the configured mean
        history length: the mean length per event count is measured on a grid, then interpolated."""
        target = self.cfg.history_ids_per_user
        grid = np.unique(np.geomspace(1, max(2.0, 2 * target * _HISTORY_CLIP), 20).round().astype(np.int64))
        per_point = 16
        activity = np.repeat(grid, per_point).astype(np.float64)
        cells = _Cells([np.random.default_rng(np.random.SeedSequence(self.cfg.seed, spawn_key=(1,)))],
                       np.array([len(activity)]))
        hist = self._histories(cells, activity)
        total = sum(np.diff(lst.offsets) for lst in hist.lists.values())
        mean_length = total.reshape(len(grid), per_point).mean(axis=1)
        factors = _long_tail(np.random.default_rng(self.cfg.seed).standard_normal(4096), _HISTORY_SIGMA, _HISTORY_CLIP)

        def mean_for(scale: float) -> float:
            m = scale * factors
            return float(np.interp(m, grid, mean_length).mean())

        return _bisect_increasing(mean_for, target, 1e-3, float(grid[-1]))

    def _calibrate_on_sample(self) -> None:
        """On a calibration sample: bisect the two biases so that the mean planted click probability is
        ``click_rate`` and the click-weighted mean buy probability is ``buy_rate_after_click``, and the
        mean number of extra cross entries so that a skeleton row has ~13.5 features."""
        n_cells = math.ceil(_CALIBRATION_USERS / USERS_PER_CELL)
        gens = [self._cell_generator("calibration", c) for c in range(n_cells)]
        sizes = [self._draw_group_sizes(g) for g in gens]
        inputs, written = self._features(_Cells(gens, np.array([len(s) for s in sizes])), np.concatenate(sizes))
        for name, term in self._history_terms(inputs).items():
            spread = float(np.std(term))
            self.history_scale[name] = _HISTORY_TERM_STD[name] / spread if spread > 1e-9 else 0.0
        z_ctr, z_cvr = self._logits(inputs, use_history=True)

        def click_rate(b: float) -> float:
            return float(_sigmoid(z_ctr + b).mean())

        self.bias_ctr = _bisect_increasing(click_rate, self.cfg.click_rate, -30.0, 30.0)
        p_ctr = _sigmoid(z_ctr + self.bias_ctr)

        def buy_rate(b: float) -> float:
            return float((p_ctr * _sigmoid(z_cvr + b)).sum() / p_ctr.sum())

        self.bias_cvr = _bisect_increasing(buy_rate, self.cfg.buy_rate_after_click, -30.0, 30.0)

        matched_lengths = [
            np.diff(written["history"][h].offsets)[inputs.impression_user][inputs.match_counts[h] > 0]
            for h in CROSS_FIELDS.values()
        ]

        def features_per_row(extra_mean: float) -> float:
            # E[min(1 + Poisson(extra_mean), length)] = sum_{j < length} P(Poisson >= j)
            j = np.arange(1, 400)
            pmf = np.exp(-extra_mean) * np.concatenate([[1.0], np.cumprod(extra_mean / j)])
            at_least = np.concatenate([[1.0], 1.0 - np.cumsum(pmf)[:-1]])
            expected = np.cumsum(np.maximum(at_least, 0.0))
            entries = sum(float(expected[np.minimum(n, len(expected)) - 1].sum()) for n in matched_lengths)
            return len(SKELETON_SINGLE_FIELDS) + entries / len(inputs.item)

        self.cross_extra_mean = _bisect_increasing(features_per_row, _FEATURES_PER_SKELETON_ROW, 0.0, 100.0, steps=40)

    # -- per-cell randomness -------------------------------------------------------------------------

    def _cell_generator(self, split: str, cell: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(self.cfg.seed, spawn_key=(_SPLIT_CODES[split], cell)))

    def _extras_generator(self, split: str, cell: int) -> np.random.Generator:
        """A separate stream, so that extra targets change no other column."""
        return np.random.default_rng(np.random.SeedSequence(self.cfg.seed, spawn_key=(_SPLIT_CODES[split], cell, 1)))

    def _draw_group_sizes(self, gen: np.random.Generator, n: int = USERS_PER_CELL) -> np.ndarray:
        """Impressions per user row: long-tailed, mean ``impressions_per_user``, at least 1."""
        tail = _long_tail(gen.standard_normal(n), _GROUP_SIZE_SIGMA, _GROUP_SIZE_CLIP)
        return np.maximum(1, np.rint(self.cfg.impressions_per_user * tail)).astype(np.int64)

    # -- features ------------------------------------------------------------------------------------

    def _global_items(self, u: np.ndarray) -> np.ndarray:
        return _permute(self._item_perm, _zipf_ranks(u, self.vocab["205"], self.cfg.zipf_exponent))

    def _histories(self, cells: _Cells, activity: np.ndarray) -> _Histories:
        """History lists of users with about ``activity`` history events each.

        Events are either popular items (global Zipf) or runs of increasing catalog positions starting
        near one of the user's anchor items, so that a run's items are distinct and share categories,
        brands and shops; the few repeats across runs are merged (their counts add up).
        """
        n_items = self.vocab["205"]
        users = len(activity)
        per_user = cells.draw(cells.users, lambda g, lo, hi: np.stack(
            [g.poisson(_GLOBAL_EVENT_SHARE * activity[lo:hi]),
             # Interests broaden slowly with activity: ~sqrt(activity)/2 anchors.
             1 + g.poisson(np.sqrt(activity[lo:hi]) / 2)], axis=1))
        n_global, n_anchor = per_user[:, 0], per_user[:, 1]
        anchor_user = np.repeat(np.arange(users), n_anchor)
        run_mean = np.maximum((1 - _GLOBAL_EVENT_SHARE) * activity / n_anchor - 1.0, 0.0)[anchor_user]
        per_anchor = cells.draw(cells.per_cell(n_anchor, cells.users), lambda g, lo, hi: np.stack(
            [g.random(hi - lo), 1 + g.poisson(run_mean[lo:hi])], axis=1))
        anchor_item = self._global_items(per_anchor[:, 0])
        run_length = per_anchor[:, 1].astype(np.int64)
        run_offsets = _offsets_from_lengths(run_length)
        run_per_user = np.bincount(anchor_user, weights=run_length, minlength=users).astype(np.int64)
        steps = 1 + _geometric(cells.draw(cells.per_cell(run_per_user, cells.users),
                                          lambda g, lo, hi: g.random(hi - lo)), _RUN_GAP_MEAN)
        walk = np.cumsum(steps)
        walk -= np.repeat(walk[run_offsets[:-1]] - steps[run_offsets[:-1]], run_length)
        run_start = anchor_item - (run_length * (1.0 + _RUN_GAP_MEAN) / 2).astype(np.int64)
        run_items = np.clip(np.repeat(run_start, run_length) + walk, 0, n_items - 1)
        global_items = self._global_items(cells.draw(cells.per_cell(n_global, cells.users),
                                                     lambda g, lo, hi: g.random(hi - lo)))
        keys = np.concatenate([np.repeat(anchor_user, run_length) * n_items + run_items,
                               np.repeat(np.arange(users), n_global) * n_items + global_items])
        keys.sort()
        starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
        multiplicity = np.diff(np.append(starts, len(keys)))
        keys = keys[starts]
        item_user = keys // n_items
        distinct_items = keys - item_user * n_items
        item_offsets = _offsets_from_lengths(np.bincount(item_user, minlength=users))
        repeats = cells.draw(cells.per_cell(np.diff(item_offsets), cells.users),
                             lambda g, lo, hi: _geometric(g.random(hi - lo), 1.0))
        counts = multiplicity + repeats
        lists = {}
        for hist, attr in HISTORY_FIELDS.items():
            size = self.vocab[attr]
            # Sorted by (user, catalog position) and attributes are monotone along the catalog line,
            # so equal (user, attribute) pairs are adjacent: distinct values by run starts, no sort.
            attr_key = item_user * size + self.item_attributes[attr][distinct_items]
            run = np.flatnonzero(np.concatenate([[True], attr_key[1:] != attr_key[:-1]]))
            list_keys = attr_key[run]
            list_rows = item_user[run]
            lists[hist] = _IdList(_offsets_from_lengths(np.bincount(list_rows, minlength=users)),
                                  list_keys - list_rows * size, np.add.reduceat(counts, run), list_keys)
        return _Histories(item_offsets, distinct_items, lists)

    def _features(self, cells: _Cells, group_sizes: np.ndarray) -> tuple[_LocalInputs, dict]:
        """Features of the users of ``cells`` and their impressions, as local ids."""
        users = len(group_sizes)
        u = cells.draw(cells.users, lambda g, lo, hi: g.random(hi - lo))
        z = cells.draw(cells.users, lambda g, lo, hi: g.standard_normal(hi - lo))
        user_id = _permute(self._user_perm, _zipf_ranks(u, self.vocab["101"], _USER_ZIPF))
        tail = _long_tail(z, _HISTORY_SIGMA, _HISTORY_CLIP)
        hist = self._histories(cells, self.mean_history_events * tail)

        n_items = self.vocab["205"]
        impression_user = np.repeat(np.arange(users), group_sizes)
        per_cell_impressions = cells.per_cell(group_sizes, cells.users)
        u = cells.draw(per_cell_impressions, lambda g, lo, hi: g.random((hi - lo, 8)))
        item_count = np.diff(hist.item_offsets)[impression_user]
        seen = hist.items[hist.item_offsets[:-1][impression_user] + (u[:, 1] * item_count).astype(np.int64)]
        # Leaning impressions stay near one of the user's history items: that very item, a catalog
        # neighbour (then shop, brand and intention often match too, and the neighbour may sit across a
        # category boundary) or another item of its category. The neighbour's distance and its side share
        # one uniform, so neighbours below are 1-2 items away and those above 2 or more: a quirk of
        # generator version 2 kept as it is, since changing it changes the planted world that every
        # recorded figure was measured on.
        offset = np.where(u[:, 3] < _LEAN_SAME_ITEM, 0,
                          (1 + _geometric(u[:, 4], _LEAN_OFFSET_MEAN - 1)) * np.where(u[:, 4] < 0.5, -1, 1))
        near = np.clip(seen + offset, 0, n_items - 1)
        category = self.item_attributes["206"][seen]
        block_start = self._block_starts["206"][category]
        block_size = np.append(self._block_starts["206"][1:], n_items)[category] - block_start
        same_category = block_start + (u[:, 7] * block_size).astype(np.int64)
        item = np.where(u[:, 2] < _LEAN_NEAR_SHARE, near, same_category)
        popular = np.flatnonzero(u[:, 0] >= _LEAN_SHARE)
        item[popular] = self._global_items(u[popular, 5])
        position = np.searchsorted(self._position_cdf, u[:, 6] * self._position_cdf[-1], side="right")
        position = np.minimum(position, len(_POSITION_PROBS) - 1)
        cross_extra = cells.draw(per_cell_impressions,
                                 lambda g, lo, hi: g.poisson(self.cross_extra_mean, (hi - lo, len(CROSS_FIELDS))))
        attributes = {a: self.item_attributes[a][item].astype(np.int64) for a in ATTRIBUTE_FIELDS}
        match_index = {h: lst.find(impression_user, attributes[HISTORY_FIELDS[h]], self.vocab[h])
                       for h, lst in hist.lists.items()}
        match_counts = {h: np.where(idx >= 0, hist.lists[h].counts[np.maximum(idx, 0)], 0)
                        for h, idx in match_index.items()}
        inputs = _LocalInputs(
            user_id=user_id,
            profile={f: self.profiles[f][user_id].astype(np.int64) for f in PROFILE_FIELDS},
            taste=self._taste(hist.lists),
            impression_user=impression_user,
            item=item,
            attributes=attributes,
            position=position,
            match_counts=match_counts,
        )
        crosses = {
            c: self._cross_entries(c, hist.lists[h], impression_user, attributes[HISTORY_FIELDS[h]],
                                   match_index[h], cross_extra[:, k])
            for k, (c, h) in enumerate(CROSS_FIELDS.items())
        }
        return inputs, {"history": hist.lists, "crosses": crosses}

    def _cross_entries(self, cross: str, hist_list: _IdList, impression_user: np.ndarray, attribute: np.ndarray,
                       match_index: np.ndarray, extra: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Entries of one combination field: when the item's attribute is in the user's list, the
        attribute crossed with ``min(extra, len-1)`` entries following the match, then the match itself
        (last). Weight = the crossed history entry's count."""
        start = hist_list.offsets[:-1][impression_user]
        length = hist_list.offsets[1:][impression_user] - start
        matched = match_index >= 0
        n_entries = np.where(matched, np.minimum(extra + 1, length), 0)
        row_offsets = _offsets_from_lengths(n_entries)
        rows, t = _segment_positions(row_offsets)
        m = match_index[rows]
        s, n = start[rows], n_entries[rows]
        flat = np.where(t == n - 1, m, s + (m - s + 1 + t) % np.maximum(length[rows], 1))
        hashed = _splitmix64(hist_list.ids[flat].astype(np.uint64) * np.uint64(1_000_003)
                             + attribute[rows].astype(np.uint64) + np.uint64(self.cross_salts[cross]))
        local = (hashed % np.uint64(self.vocab[cross])).astype(np.int64)
        return row_offsets, local, hist_list.counts[flat]

    def _taste(self, lists: dict[str, _IdList]) -> np.ndarray:
        """log1p(count)-weighted mean of the history ids' vectors, over the four lists."""
        users = len(next(iter(lists.values())).offsets) - 1
        total = np.zeros((users, _TASTE_RANK + 1), dtype=np.float64)
        for hist, lst in lists.items():
            w = np.log1p(lst.counts.astype(np.float32))
            weighted = np.empty((len(w), _TASTE_RANK + 1), dtype=np.float32)
            np.multiply(self.history_vectors[hist][lst.ids], w[:, None], out=weighted[:, :_TASTE_RANK])
            weighted[:, _TASTE_RANK] = w
            nonempty = np.diff(lst.offsets) > 0
            if nonempty.any():
                # Rows are contiguous: one reduceat over the starts of the non-empty rows.
                total[nonempty] += np.add.reduceat(weighted, lst.offsets[:-1][nonempty], axis=0)
        return (total[:, :_TASTE_RANK] / np.maximum(total[:, _TASTE_RANK:], 1e-12)).astype(np.float32)

    # -- the planted model ---------------------------------------------------------------------------

    def _logits(self, x: _LocalInputs, use_history: bool) -> tuple[np.ndarray, np.ndarray]:
        s = self.cfg.signal
        iu = x.impression_user
        singles = {"205": x.item, "301": x.position, **x.attributes}
        z_ctr = self.ctr_effects["101"][x.user_id][iu].astype(np.float64)
        z_cvr = self.cvr_effects["101"][x.user_id][iu].astype(np.float64)
        for f in PROFILE_FIELDS:
            z_ctr += self.ctr_effects[f][x.profile[f]][iu]
            z_cvr += self.cvr_effects[f][x.profile[f]][iu]
        for f, ids in singles.items():
            z_ctr += self.ctr_effects[f][ids]
            z_cvr += self.cvr_effects[f][ids]
        if use_history:
            for name, term in self._history_terms(x).items():
                target = z_ctr if name.startswith("ctr") else z_cvr
                target += self.history_scale[name] * term
        return self.bias_ctr + s * z_ctr, self.bias_cvr + s * z_cvr

    def _history_terms(self, x: _LocalInputs) -> dict[str, np.ndarray]:
        """The unscaled terms that read the history lists."""
        match = {h: np.log1p(c.astype(np.float64)) for h, c in x.match_counts.items()}
        vec = self.item_vectors[x.item]
        # taste . (R v) == (R^T taste) . v: mix the U user rows rather than the B impression rows.
        cvr_taste = x.taste @ self.cvr_taste_mix
        return {
            "ctr_match": sum(_CTR_MATCH[h] * m for h, m in match.items()),
            "ctr_taste": np.einsum("br,br->b", x.taste[x.impression_user], vec) / _TASTE_RANK,
            "cvr_match": sum(_CVR_MATCH[h] * m for h, m in match.items()),
            "cvr_taste": np.einsum("br,br->b", cvr_taste[x.impression_user], vec) / _TASTE_RANK,
        }

    def _local_inputs(self, chunk: SyntheticChunk) -> _LocalInputs:
        """Decode a chunk's written features into what the planted model reads."""
        user_id = self.ids["101"].to_local(chunk.user_fields["101"])
        lists = {h: _IdList.build(j.offsets, self.ids[h].to_local(j.ids), j.weights, self.vocab[h])
                 for h, j in ((h, chunk.history[h]) for h in HISTORY_FIELDS)}
        iu = chunk.impression_user.astype(np.int64)
        attributes = {a: self.ids[a].to_local(chunk.item_fields[a]) for a in ATTRIBUTE_FIELDS}
        match_counts = {}
        for h, lst in lists.items():
            idx = lst.find(iu, attributes[HISTORY_FIELDS[h]], self.vocab[h])
            match_counts[h] = np.where(idx >= 0, lst.counts[np.maximum(idx, 0)], 0)
        return _LocalInputs(
            user_id=user_id,
            profile={f: self.ids[f].to_local(chunk.user_fields[f]) for f in PROFILE_FIELDS},
            taste=self._taste(lists),
            impression_user=iu,
            item=self.ids["205"].to_local(chunk.item_fields["205"]),
            attributes=attributes,
            position=self.ids["301"].to_local(chunk.item_fields["301"]),
            match_counts=match_counts,
        )

    def probabilities(self, chunk: SyntheticChunk, use_history: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(p_ctr, p_cvr) of every impression of ``chunk``, computed from its written features only.
        ``use_history=False`` drops the terms that read the history lists (a history-blind score)."""
        z_ctr, z_cvr = self._logits(self._local_inputs(chunk), use_history)
        return _sigmoid(z_ctr).astype(np.float32), _sigmoid(z_cvr).astype(np.float32)

    def _price_mean(self, x: _LocalInputs) -> np.ndarray:
        iu = x.impression_user
        z = (self.price_effects["205"][x.item] + self.price_effects["206"][x.attributes["206"]]
             + self.price_effects["207"][x.attributes["207"]]
             + self.price_effects["126"][x.profile["126"]][iu] + self.price_effects["127"][x.profile["127"]][iu])
        return (_PRICE_BASE + self.cfg.signal * z).astype(np.float32)

    # -- chunks --------------------------------------------------------------------------------------

    def _user_keys(self, split: str, first_row: int, n: int) -> np.ndarray:
        """md5-like 32-hex common_feature_index of user rows ``first_row..first_row+n-1``; unique across
        rows and splits (splitmix64 is a bijection)."""
        rows = (np.uint64(_SPLIT_CODES[split]) << np.uint64(48)) | np.arange(first_row, first_row + n, dtype=np.uint64)
        hi = _splitmix64(rows ^ np.uint64(self.key_salt))
        lo = _splitmix64(hi ^ np.uint64(0x5DEECE66D))
        raw = np.stack([hi.astype(">u8"), lo.astype(">u8")], axis=1).view(np.uint8).reshape(n, 16)
        hex_digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
        chars = np.stack([hex_digits[raw >> 4], hex_digits[raw & 15]], axis=2).reshape(n, 32)
        return chars.view("S32").reshape(n)

    def _make_chunk(self, split: str, cells: _Cells, group_sizes: np.ndarray, first_user_row: int,
                   first_sample_id: int, first_cell: int, extra_targets: bool = False) -> SyntheticChunk:
        inputs, written = self._features(cells, group_sizes)
        users, impressions = len(group_sizes), len(inputs.item)
        z_ctr, z_cvr = self._logits(inputs, use_history=True)
        p_ctr, p_cvr = _sigmoid(z_ctr), _sigmoid(z_cvr)
        u = cells.draw(cells.per_cell(group_sizes, cells.users), lambda g, lo, hi: g.random((hi - lo, 3)))
        click = u[:, 0] < p_ctr
        buy = click & (u[:, 1] < p_cvr)
        noise = ~click & (u[:, 2] < self.cfg.click0_buy1_rate / (1.0 - self.cfg.click_rate))
        buy |= noise
        ids = self.ids
        chunk = SyntheticChunk(
            split=split,
            user_keys=self._user_keys(split, first_user_row, users),
            user_fields={"101": ids["101"].to_global(inputs.user_id),
                         **{f: ids[f].to_global(inputs.profile[f]) for f in PROFILE_FIELDS}},
            history={h: _written_history(lst, ids[h]) for h, lst in written["history"].items()},
            impression_user=inputs.impression_user.astype(np.int32),
            sample_id=np.arange(first_sample_id, first_sample_id + impressions, dtype=np.int64),
            click=click.astype(np.int8),
            buy=buy.astype(np.int8),
            p_ctr=p_ctr.astype(np.float32),
            p_cvr=p_cvr.astype(np.float32),
            item_fields={"205": ids["205"].to_global(inputs.item), "301": ids["301"].to_global(inputs.position),
                         **{a: ids[a].to_global(inputs.attributes[a]) for a in ATTRIBUTE_FIELDS}},
            crosses={c: Jagged(o, ids[c].to_global(i), w.astype(np.float32))
                     for c, (o, i, w) in written["crosses"].items()},
        )
        if extra_targets:
            extra_cells = _Cells([self._extras_generator(split, first_cell + k)
                                  for k in range(len(cells.generators))], cells.users)
            e = extra_cells.draw(cells.per_cell(group_sizes, cells.users),
                                 lambda g, lo, hi: g.standard_normal((hi - lo, 2)))
            price_mean = self._price_mean(inputs)
            chunk.extras = {
                "price_mean": price_mean,
                "price": (price_mean + _PRICE_NOISE * e[:, 0]).astype(np.float32),
                # Seconds on the item page: positive, longer after a click; a per-sample loss weight.
                "dwell": np.exp(1.0 + 0.8 * click + 0.6 * e[:, 1]).astype(np.float32),
            }
        return chunk


def _written_history(lst: _IdList, field_ids: FieldIds) -> Jagged:
    """A history list in written order: in each row the (first) entry with the largest count swaps places
    with the last entry, because one-id-per-field readers (torch-rechub) keep a field's last entry."""
    lengths = np.diff(lst.offsets)
    nonempty = np.flatnonzero(lengths > 0)
    starts = lst.offsets[:-1][nonempty]
    row_max = np.maximum.reduceat(lst.counts, starts) if len(starts) else lst.counts[:0]
    flat = np.arange(len(lst.counts), dtype=np.int64)
    candidates = np.where(lst.counts == np.repeat(row_max, lengths[nonempty]), flat, len(flat))
    first_max = np.minimum.reduceat(candidates, starts) if len(starts) else flat[:0]
    last = lst.offsets[1:][nonempty] - 1
    order = flat
    order[last] = first_max
    order[first_max] = last
    return Jagged(lst.offsets, field_ids.to_global(lst.ids[order]), lst.counts[order].astype(np.float32))


@lru_cache(maxsize=2)
def _cached_model(key: tuple) -> PlantedModel:
    return PlantedModel(SyntheticConfig(**dict(key)))


def planted_model(cfg: SyntheticConfig) -> PlantedModel:
    """The planted model of ``cfg`` (cached: building one calibrates on a sample)."""
    cfg.validate()
    return _cached_model(cfg._model_key())


def generate_chunks(cfg: SyntheticConfig, split: str, users_per_chunk: int = 2048) -> Iterator[SyntheticChunk]:
    """Stream a split as chunks of about ``users_per_chunk`` whole user groups (rounded up to whole cells
    of ``USERS_PER_CELL``); the rows do not depend on ``users_per_chunk``. Memory is bounded by a chunk."""
    if users_per_chunk < 1:
        raise ValueError(f"users_per_chunk must be >= 1, got {users_per_chunk}")
    total = cfg.impressions(split)
    model = planted_model(cfg)
    cells_per_chunk = max(1, math.ceil(users_per_chunk / USERS_PER_CELL))
    done, cell, user_row, sample_id = 0, 0, 0, 1
    while done < total:
        gens, sizes, first_cell = [], [], cell
        while len(gens) < cells_per_chunk and done < total:
            gen = model._cell_generator(split, cell)
            s = model._draw_group_sizes(gen)
            cum = np.cumsum(s)
            if cum[-1] >= total - done:
                keep = int(np.searchsorted(cum, total - done)) + 1
                s = s[:keep].copy()
                s[-1] -= int(cum[keep - 1]) - (total - done)
            done += int(s.sum())
            gens.append(gen)
            sizes.append(s)
            cell += 1
        group_sizes = np.concatenate(sizes)
        chunk = model._make_chunk(split, _Cells(gens, np.array([len(s) for s in sizes])), group_sizes,
                                 user_row, sample_id, first_cell, cfg.extra_targets)
        user_row += chunk.num_users
        sample_id += chunk.num_impressions
        yield chunk


# ---------------------------------------------------------------------------------------------------
# AUC


def binary_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC, ties counted 1/2 (the Mann-Whitney statistic with mid-ranks)."""
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"binary_auc: {labels.size} labels but {scores.size} scores")
    positive = labels.astype(bool)
    if not np.array_equal(labels, positive.astype(labels.dtype)):
        raise ValueError("binary_auc: labels must be 0/1")
    n_pos = int(positive.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"binary_auc: undefined with a single class (positives {n_pos}, negatives {n_neg})")
    if np.isnan(scores).any():
        raise ValueError("binary_auc: scores contain NaN")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    group_start = np.flatnonzero(np.concatenate([[True], sorted_scores[1:] != sorted_scores[:-1]]))
    group_end = np.append(group_start[1:], len(sorted_scores))
    mid_rank = (group_start + group_end + 1) / 2.0  # 1-based average rank of the tie group
    positives_per_group = np.add.reduceat(positive[order].astype(np.int64), group_start)
    rank_sum = float((mid_rank * positives_per_group).sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def oracle_auc(truth: str | os.PathLike | pa.Table) -> dict[str, float]:
    """AUCs of the true probabilities: {"ctr", "cvr" (clicked rows), "ctcvr"}, after dropping the
    click=0/buy=1 rows as converters do. A task whose rows hold a single class gives NaN."""
    table = truth if isinstance(truth, pa.Table) else pq.read_table(truth, columns=list(TRUTH_COLUMNS[1:]))
    click = table.column("click").to_numpy().astype(bool)
    buy = table.column("buy").to_numpy().astype(bool)
    p_ctr = table.column("p_ctr").to_numpy().astype(np.float64)
    p_cvr = table.column("p_cvr").to_numpy().astype(np.float64)
    keep = click | ~buy
    click, buy, p_ctr, p_cvr = click[keep], buy[keep], p_ctr[keep], p_cvr[keep]

    def auc(labels: np.ndarray, scores: np.ndarray) -> float:
        if labels.size == 0 or labels.all() or not labels.any():
            return float("nan")
        return binary_auc(labels, scores)

    return {
        "ctr": auc(click, p_ctr),
        "cvr": auc(buy[click], p_cvr[click]),
        "ctcvr": auc(buy, p_ctr * p_cvr),
    }


# ---------------------------------------------------------------------------------------------------
# Text


@dataclass
class GenerationProgress:
    """Reported after every chunk."""

    split: str
    impressions_done: int
    impressions_total: int
    bytes_written: int
    seconds: float


ProgressFn = Callable[[GenerationProgress], None]


class _TextTables:
    """Pre-rendered text pieces, so that a line is a concatenation of table entries (one pyarrow take).

    Tables are indexed by ``global id - field base``: ``"205\\x02<id>\\x031.0"`` for single-valued fields
    (with a leading ``\\x01`` unless the field opens its line) and ``"\\x01<field>\\x02<id>\\x03"`` for
    the entries of weighted fields, whose value text (``"3.0"``) comes from ``values``.
    """

    LINE_OPENERS = ("101", "205")

    def __init__(self, model: PlantedModel):
        self._model = model
        self._tables: dict[str, pa.Array] = {}
        self._values = pa.array([], pa.string())
        self._counts = pa.array([], pa.string())

    def ids(self, name: str) -> pa.Array:
        if name not in self._tables:
            fid = self._model.ids[name]
            ids = pc.cast(pa.array(np.arange(fid.base, fid.base + fid.size, dtype=np.int64)), pa.string())
            if schema.FIELDS_BY_NAME[name].multi_valued:
                head, tail = f"\x01{name}\x02", "\x03"
            else:
                head = ("" if name in self.LINE_OPENERS else "\x01") + f"{name}\x02"
                tail = "\x031.0"
            self._tables[name] = pc.binary_join_element_wise(pa.scalar(head), ids, pa.scalar(tail), "")
        return self._tables[name]

    def counts(self, feature_num: np.ndarray) -> pa.Array:
        """``",<feature_num>,"`` texts."""
        top = int(feature_num.max()) + 1 if len(feature_num) else 0
        if top > len(self._counts):
            size = max(top, 2 * len(self._counts), 1024)
            self._counts = pa.array([f",{i}," for i in range(size)], pa.string())
        return self._counts.take(pa.array(feature_num))

    def values(self, weights: np.ndarray, name: str) -> pa.Array:
        """Text of the integral count weights ("3.0") of field ``name``."""
        counts = np.asarray(weights).astype(np.int64)
        if len(counts) and (counts.min() < 0 or not np.array_equal(counts, weights)):
            bad = int(np.flatnonzero((counts < 0) | (counts != weights))[0])
            raise ValueError(f"field {name}: weight {weights[bad]!r} (entry {bad}) is not a non-negative integer count")
        top = int(counts.max()) + 1 if len(counts) else 0
        if top > len(self._values):
            size = max(top, 2 * len(self._values), 1024)
            self._values = pa.array([f"{i}.0" for i in range(size)], pa.string())
        return self._values.take(pa.array(counts))


def _gather_text(pieces: list[pa.Array], order: np.ndarray) -> pa.Buffer:
    """The bytes of ``concat(pieces)[order]`` joined without separators."""
    if len(order) == 0:
        return pa.py_buffer(b"")
    pool = pa.concat_arrays([p.cast(pa.string()) if p.type != pa.string() else p for p in pieces])
    taken = pool.take(pa.array(order, pa.int64()))
    offsets = np.frombuffer(taken.buffers()[1], dtype=np.int32, count=len(taken) + 1, offset=taken.offset * 4)
    return taken.buffers()[2][int(offsets[0]):int(offsets[-1])]


def _key_strings(keys: np.ndarray) -> pa.Array:
    """A string array over the bytes of 'S32' keys, without a per-key Python object."""
    n = len(keys)
    offsets = np.arange(0, 32 * (n + 1), 32, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(keys).tobytes()))


def _int_text(values: np.ndarray, suffix: str) -> pa.Array:
    return pc.binary_join_element_wise(pc.cast(pa.array(np.asarray(values, dtype=np.int64)), pa.string()),
                                       pa.scalar(suffix), "")


def _line_order(single_counts: int, rows: int, jagged: list[np.ndarray], prefix_pieces: int) -> np.ndarray:
    """Order of the text pieces of ``rows`` lines, each: ``prefix_pieces`` per-row pieces, ``single_counts``
    single-field tokens, the (id, value) pieces of every jagged field's entries in turn, a newline.

    Pieces are laid out in the pool as: prefix pieces (rows each), single tokens (rows each), then per
    jagged field its id texts followed by its value texts, then one newline piece.
    """
    lengths = [np.diff(o) for o in jagged]
    per_row = prefix_pieces + single_counts + 2 * sum(lengths, np.zeros(rows, np.int64)) + 1
    line_start = _offsets_from_lengths(per_row)
    order = np.empty(int(line_start[-1]), dtype=np.int64)
    row_index = np.arange(rows, dtype=np.int64)
    for k in range(prefix_pieces + single_counts):
        order[line_start[:-1] + k] = k * rows + row_index
    pool_at = (prefix_pieces + single_counts) * rows
    before = np.full(rows, prefix_pieces + single_counts, dtype=np.int64)
    for offsets, n in zip(jagged, lengths):
        entries = int(offsets[-1])
        # Entry e of row r goes to line_start[r] + before[r] + 2 * (e - offsets[r]): a per-row constant + 2e.
        dest = np.repeat(line_start[:-1] + before - 2 * offsets[:-1], n) + 2 * np.arange(entries)
        order[dest] = pool_at + np.arange(entries)
        order[dest + 1] = pool_at + entries + np.arange(entries)
        pool_at += 2 * entries
        before += 2 * n
    order[line_start[1:] - 1] = pool_at
    return order


_LABEL_TEXT = pa.array([",0,0,", ",1,0,", ",0,1,", ",1,1,"])  # indexed by click + 2 * buy


def _skeleton_text(chunk: SyntheticChunk, tables: _TextTables, model: PlantedModel) -> pa.Buffer:
    """``sample_id,click,buy,common_feature_index,feature_num,feature_list`` lines of a chunk."""
    b = chunk.num_impressions
    cross = [chunk.crosses[c] for c in CROSS_FIELDS]
    feature_num = len(SKELETON_SINGLE_FIELDS) + sum(j.lengths for j in cross)
    pieces = [
        pc.cast(pa.array(chunk.sample_id), pa.string()),
        _LABEL_TEXT.take(pa.array(chunk.click.astype(np.int64) + 2 * chunk.buy.astype(np.int64))),
        _key_strings(chunk.user_keys).take(pa.array(chunk.impression_user)),
        tables.counts(feature_num),
    ]
    pieces += _feature_pieces(tables, model, {f: chunk.item_fields[f] for f in SKELETON_SINGLE_FIELDS},
                              dict(zip(CROSS_FIELDS, cross)))
    pieces.append(pa.array(["\n"]))
    order = _line_order(len(SKELETON_SINGLE_FIELDS), b, [j.offsets for j in cross], 4)
    return _gather_text(pieces, order)


def _feature_pieces(tables: _TextTables, model: PlantedModel, singles: dict[str, np.ndarray],
                    lists: dict[str, Jagged]) -> list[pa.Array]:
    """Text pieces of a feature list, in the order ``_line_order`` interleaves: one ``field\\x02id``
    piece per single-valued field, then per multi-valued field its ids and their ``\\x03value``s."""
    pieces = [tables.ids(f).take(pa.array(v - model.ids[f].base)) for f, v in singles.items()]
    for f, j in lists.items():
        pieces.append(tables.ids(f).take(pa.array(j.ids - model.ids[f].base)))
        pieces.append(tables.values(j.weights, f))
    return pieces


def _common_features_text(chunk: SyntheticChunk, tables: _TextTables, model: PlantedModel) -> pa.Buffer:
    """``common_feature_index,feature_num,feature_list`` lines of a chunk's users."""
    u = chunk.num_users
    hist = [chunk.history[h] for h in HISTORY_FIELDS]
    feature_num = len(USER_SINGLE_FIELDS) + sum(j.lengths for j in hist)
    pieces = [_key_strings(chunk.user_keys), tables.counts(feature_num)]
    pieces += _feature_pieces(tables, model, {f: chunk.user_fields[f] for f in USER_SINGLE_FIELDS},
                              dict(zip(HISTORY_FIELDS, hist)))
    pieces.append(pa.array(["\n"]))
    order = _line_order(len(USER_SINGLE_FIELDS), u, [j.offsets for j in hist], 2)
    return _gather_text(pieces, order)


def _truth_schema(extra_targets: bool) -> pa.Schema:
    cols = [pa.field("sample_id", pa.int64()), pa.field("click", pa.int8()), pa.field("buy", pa.int8()),
            pa.field("p_ctr", pa.float32()), pa.field("p_cvr", pa.float32())]
    if extra_targets:
        cols.append(pa.field("price_mean", pa.float32()))
    return pa.schema(cols)


def write_raw(out_dir: str | os.PathLike, cfg: SyntheticConfig, splits: Sequence[str] = SPLITS,
              progress: ProgressFn | None = None) -> dict:
    """Write the raw Tianchi files of ``splits`` and their truth; return paths, counts, bytes, seconds."""
    if cfg.extra_targets:
        raise ValueError("extra_targets has no place in the raw Tianchi format; use write_parquet_direct")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = planted_model(cfg)
    tables = _TextTables(model)
    report: dict = {"out_dir": str(out), "splits": {}}
    started = time.perf_counter()
    for split in splits:
        t0 = time.perf_counter()
        paths = {
            "skeleton": out / f"sample_skeleton_{split}.csv",
            "common_features": out / f"common_features_{split}.csv",
            "truth": out / f"truth_{split}.parquet",
        }
        counts = {"impressions": 0, "users": 0, "clicks": 0, "buys": 0, "click0_buy1": 0,
                  "skeleton_bytes": 0, "common_features_bytes": 0}
        total = cfg.impressions(split)
        with open(paths["skeleton"], "wb") as skeleton, open(paths["common_features"], "wb") as common, \
                pq.ParquetWriter(paths["truth"], _truth_schema(False), compression="zstd") as truth:
            for chunk in generate_chunks(cfg, split):
                common_bytes = _common_features_text(chunk, tables, model)
                skeleton_bytes = _skeleton_text(chunk, tables, model)
                common.write(common_bytes)
                skeleton.write(skeleton_bytes)
                truth.write_table(chunk.truth_table())
                counts["impressions"] += chunk.num_impressions
                counts["users"] += chunk.num_users
                counts["clicks"] += int(chunk.click.sum())
                counts["buys"] += int(chunk.buy.sum())
                counts["click0_buy1"] += int(((chunk.click == 0) & (chunk.buy == 1)).sum())
                counts["skeleton_bytes"] += skeleton_bytes.size
                counts["common_features_bytes"] += common_bytes.size
                if progress is not None:
                    progress(GenerationProgress(split, counts["impressions"], total,
                                                counts["skeleton_bytes"] + counts["common_features_bytes"],
                                                time.perf_counter() - t0))
        report["splits"][split] = {**{k: str(v) for k, v in paths.items()}, **counts,
                                   "seconds": time.perf_counter() - t0}
    report["bytes"] = sum(s["skeleton_bytes"] + s["common_features_bytes"] for s in report["splits"].values())
    report["seconds"] = time.perf_counter() - started
    return report


# ---------------------------------------------------------------------------------------------------
# Parquet, straight into the dist_mtl layout


def _list_array(offsets: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, value_type))


def _select_jagged(offsets: np.ndarray, ids: np.ndarray, weights: np.ndarray, keep: np.ndarray):
    """Rows ``keep`` (bool) of a jagged layout."""
    lengths = np.diff(offsets)
    rows, _ = _segment_positions(offsets)
    entry_keep = keep[rows]
    return _offsets_from_lengths(lengths[keep]), ids[entry_keep], weights[entry_keep]


def _jagged_columns(name: str, jagged: Jagged, keep: np.ndarray, field_ids: FieldIds) -> dict[str, pa.Array]:
    """A multi-valued field's id and weight columns over the kept rows, ids as local + 1."""
    o, i, w = _select_jagged(jagged.offsets, jagged.ids, jagged.weights, keep)
    return {name: _list_array(o, (field_ids.to_local(i) + 1).astype(np.int32), pa.int32()),
            schema.FIELDS_BY_NAME[name].weight_column: _list_array(o, w.astype(np.float32), pa.float32())}


def _direct_tables(chunk: SyntheticChunk, model: PlantedModel,
                   extra_targets: bool) -> tuple[pa.Table, pa.Table, int, int]:
    """(users, impressions, dropped click0/buy1 rows, dropped users) with ids as local + 1."""
    keep = ~((chunk.click == 0) & (chunk.buy == 1))
    user_has_rows = np.bincount(chunk.impression_user[keep], minlength=chunk.num_users) > 0
    new_user_row = np.cumsum(user_has_rows) - 1
    ids = model.ids
    users = {schema.USER_KEY_COLUMN: _key_strings(chunk.user_keys[user_has_rows])}
    for f in USER_SINGLE_FIELDS:
        users[f] = pa.array((ids[f].to_local(chunk.user_fields[f][user_has_rows]) + 1).astype(np.int32))
    for h in HISTORY_FIELDS:
        users.update(_jagged_columns(h, chunk.history[h], user_has_rows, ids[h]))
    impressions = {
        schema.USER_COLUMN: pa.array(new_user_row[chunk.impression_user[keep]].astype(np.int32)),
        schema.SAMPLE_ID_COLUMN: pa.array(chunk.sample_id[keep]),
        "click": pa.array(chunk.click[keep]),
        "buy": pa.array(chunk.buy[keep]),
    }
    for f in SKELETON_SINGLE_FIELDS:
        impressions[f] = pa.array((ids[f].to_local(chunk.item_fields[f][keep]) + 1).astype(np.int32))
    for c in CROSS_FIELDS:
        impressions.update(_jagged_columns(c, chunk.crosses[c], keep, ids[c]))
    if extra_targets:
        for name in EXTRA_TARGET_COLUMNS:
            impressions[name] = pa.array(chunk.extras[name][keep], pa.float32())
    return (pa.table(users), pa.table(impressions), int((~keep).sum()),
            int((~user_has_rows).sum()))


def write_parquet_direct(out_dir: str | os.PathLike, cfg: SyntheticConfig, splits: Sequence[str] = SPLITS,
                         block_impressions: int = 65536, progress: ProgressFn | None = None) -> schema.DatasetMetadata:
    """Write the generator's rows straight into the dist_mtl dataset layout (ids = local index + 1).

    The rows equal what converting ``write_raw``'s text of the same ``cfg`` gives: same sample ids,
    labels and per-field ids up to the id encoding; click=0/buy=1 rows are dropped (counted in
    ``skipped``), as are user rows left without impressions. Truth files of every generated row go to
    ``<out>/truth_{split}.parquet``.

    The id encoding differs in one way a model could notice: here an attribute and its history field
    share indices (category ``k`` is index ``k + 1`` both in 206 and in 109_14; likewise 207 / 110_14,
    216 / 127_14, 210 / 150_14), while the real files' global feature ids, and so the converter's
    per-field numbering, relate nothing across fields (measured on 300k train impressions, generator
    version 2, seed 0: the item's 206 index is in the user's 109_14 list for 97.2% of impressions here,
    27.8% after converting the raw text). No
    model in this project shares tables or compares ids across fields, so none learns from it; a model
    that did should be measured on converted raw text (``write_raw``).
    """
    out = Path(out_dir)
    model = planted_model(cfg)
    extra = dict(EXTRA_TARGET_COLUMNS) if cfg.extra_targets else {}
    writer = schema.DatasetWriter(out, extra_columns=extra, block_impressions=block_impressions)
    infos = {}
    # Hand whole groups to the split writer in pieces of ~1/8 block, so blocks end close to the size.
    piece_impressions = max(1, block_impressions // 8)
    for split in splits:
        t0 = time.perf_counter()
        split_writer = writer.split(split)
        skipped = {"click0_buy1": 0, "user_without_impressions": 0}
        total, done = cfg.impressions(split), 0
        with pq.ParquetWriter(out / f"truth_{split}.parquet", _truth_schema(cfg.extra_targets),
                              compression="zstd") as truth:
            for chunk in generate_chunks(cfg, split):
                truth.write_table(chunk.truth_table())
                users, impressions, dropped_rows, dropped_users = _direct_tables(chunk, model, cfg.extra_targets)
                skipped["click0_buy1"] += dropped_rows
                skipped["user_without_impressions"] += dropped_users
                for u0, u1, i0, i1 in _pieces(impressions.column(schema.USER_COLUMN).to_numpy(), users.num_rows,
                                              piece_impressions):
                    piece = impressions.slice(i0, i1 - i0)
                    user_col = pc.subtract(piece.column(schema.USER_COLUMN), pa.scalar(u0, pa.int32()))
                    piece = piece.set_column(0, schema.USER_COLUMN, user_col)
                    split_writer.add(users.slice(u0, u1 - u0), piece)
                done += chunk.num_impressions
                if progress is not None:
                    progress(GenerationProgress(split, done, total, 0, time.perf_counter() - t0))
        infos[split] = split_writer.close({k: v for k, v in skipped.items() if v})
    vocab = {name: size + 1 for name, size in model.vocab.items()}
    notes = {"generator": "dist_mtl.data.synthetic", "config": dataset_fingerprint(cfg),
             "bias_ctr": model.bias_ctr, "bias_cvr": model.bias_cvr}
    return writer.commit(infos, vocab, source="synthetic-direct", notes=notes)


def _pieces(impression_user: np.ndarray, num_users: int, piece_impressions: int) -> Iterator[tuple[int, int, int, int]]:
    """(first user, end user, first impression, end impression) of consecutive whole-group pieces."""
    if num_users == 0:
        return
    group_end = np.searchsorted(impression_user, np.arange(1, num_users + 1))
    user_cuts = np.unique(np.searchsorted(group_end, np.arange(piece_impressions, group_end[-1], piece_impressions)))
    bounds = np.concatenate([[0], user_cuts + 1, [num_users]])
    bounds = np.unique(np.minimum(bounds, num_users))
    for u0, u1 in zip(bounds[:-1], bounds[1:]):
        i0 = 0 if u0 == 0 else int(group_end[u0 - 1])
        yield int(u0), int(u1), i0, int(group_end[u1 - 1])


# ---------------------------------------------------------------------------------------------------
# torch-rechub CSV


def _rechub_columns(chunk: SyntheticChunk,
                    model: PlantedModel) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(kept rows, sparse columns as local+1 with 0 = absent, raw dense weights) like rechub's
    preprocessor: the last id (and weight) of every field, click=0/buy=1 rows dropped."""
    keep = ~((chunk.click == 0) & (chunk.buy == 1))
    iu = chunk.impression_user.astype(np.int64)[keep]
    ids = model.ids
    sparse: dict[str, np.ndarray] = {}
    dense: dict[str, np.ndarray] = {}
    for f in USER_SINGLE_FIELDS:
        sparse[f] = (ids[f].to_local(chunk.user_fields[f]) + 1)[iu]
    for f in SKELETON_SINGLE_FIELDS:
        sparse[f] = ids[f].to_local(chunk.item_fields[f][keep]) + 1
    for h in HISTORY_FIELDS:
        present, last, weight = chunk.history[h].last_of_row()
        local = np.where(present, ids[h].to_local(np.where(present, last, ids[h].base)) + 1, 0)
        sparse[h], dense[h] = local[iu], weight[iu]
    for c in CROSS_FIELDS:
        present, last, weight = chunk.crosses[c].last_of_row()
        local = np.where(present, ids[c].to_local(np.where(present, last, ids[c].base)) + 1, 0)
        sparse[c], dense[c] = local[keep], weight[keep]
    return keep, sparse, dense


def _float16_text(scaled: np.ndarray) -> pa.Array:
    """pandas' text of float16 values (shortest repr, "0.0" for zero), via the few distinct values."""
    halves = scaled.astype(np.float16)
    distinct, inverse = np.unique(halves, return_inverse=True)
    return pa.array([repr(float(str(v))) for v in distinct], pa.string()).take(pa.array(inverse.reshape(-1)))


def write_rechub_csv(out_dir: str | os.PathLike, cfg: SyntheticConfig, progress: ProgressFn | None = None,
                     table_rows: str = "train") -> dict:
    """torch-rechub's preprocessed layout: ``ali_ccp_{train,val,test}.csv`` (val/test = a seeded half
    each of the test split) and aligned ``truth_{train,val,test}.parquet``.

    As rechub's preprocessor: one id per field (the last written), click=0/buy=1 rows dropped, the dense
    ``D*`` columns are the kept ids' weights MinMax-scaled over all three files and printed as float16.
    Sparse ids are label-encoded per column as rechub's preprocessor does: the ids seen in train get
    1..n, anything else (absent, or seen only in val/test) 0, without a frequency filter (as
    ``convert_raw(min_count=1)``), so both sides of a benchmark see the same ids. Numbering over the
    generator's whole id space instead would size rechub's tables (``max() + 1``) for ids that never
    occur, and rechub steps Adam over every row.

    ``table_rows="full"`` numbers every id of the generator's vocabulary instead (local index + 1), so
    rechub's tables have the rows they would have on the full data set this one samples: what a user
    training on the full Ali-CCP pays per step, on a slice small enough to time.
    """
    if table_rows not in ("train", "full"):
        raise ValueError(f"table_rows must be 'train' or 'full', got {table_rows!r}")
    if cfg.extra_targets:
        raise ValueError("extra_targets are not part of the torch-rechub layout; use write_parquet_direct")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = planted_model(cfg)
    started = time.perf_counter()
    # Pass 1: MinMaxScaler's range over every written row of every file.
    # Also the ids each sparse column takes in train, for the label encoding.
    low = {f: np.inf for f in RECHUB_DENSE_FIELDS}
    high = {f: -np.inf for f in RECHUB_DENSE_FIELDS}
    train_ids: dict[str, list[np.ndarray]] = {}
    for split in SPLITS:
        for chunk in generate_chunks(cfg, split):
            _, sparse, dense = _rechub_columns(chunk, model)
            for f, v in dense.items():
                if len(v):
                    low[f], high[f] = min(low[f], float(v.min())), max(high[f], float(v.max()))
            if split == "train":
                for f, v in sparse.items():
                    train_ids.setdefault(f, []).append(np.unique(v[v > 0]))
    encoding = {f: np.unique(np.concatenate(parts)) for f, parts in train_ids.items()}
    report: dict = {"out_dir": str(out), "files": {}}
    files, truths, rows = {}, {}, {}
    try:
        for name in ("train", "val", "test"):
            files[name] = open(out / f"ali_ccp_{name}.csv", "wb")
            files[name].write((RECHUB_HEADER + "\n").encode())
            truths[name] = pq.ParquetWriter(out / f"truth_{name}.parquet", _truth_schema(False), compression="zstd")
            rows[name] = 0
        for split in SPLITS:
            t0, done = time.perf_counter(), 0
            for chunk in generate_chunks(cfg, split):
                keep, sparse, dense = _rechub_columns(chunk, model)
                if table_rows == "train":
                    sparse = {f: _label_encode(v, encoding[f]) for f, v in sparse.items()}
                truth = chunk.truth_table().filter(pa.array(keep))
                if split == "train":
                    targets = [("train", np.ones(len(sparse["205"]), bool))]
                else:
                    # A seeded half of the test split each (rechub uses train_test_split(0.5)).
                    coin = _splitmix64(chunk.sample_id[keep].astype(np.uint64) ^ np.uint64(model.key_salt))
                    to_val = (coin & np.uint64(1)) == 0
                    targets = [("val", to_val), ("test", ~to_val)]
                for name, mask in targets:
                    text = _rechub_text(chunk, keep, mask, sparse, dense, low, high)
                    files[name].write(text)
                    truths[name].write_table(truth.filter(pa.array(mask)))
                    rows[name] += int(mask.sum())
                done += chunk.num_impressions
                if progress is not None:
                    progress(GenerationProgress(split, done, cfg.impressions(split), 0, time.perf_counter() - t0))
    finally:
        for f in files.values():
            f.close()
        for t in truths.values():
            t.close()
    for name in ("train", "val", "test"):
        report["files"][name] = {"csv": str(out / f"ali_ccp_{name}.csv"), "truth": str(out / f"truth_{name}.parquet"),
                                 "rows": rows[name], "bytes": (out / f"ali_ccp_{name}.csv").stat().st_size}
    report["dense_range"] = {f: [low[f], high[f]] for f in RECHUB_DENSE_FIELDS}
    report["seconds"] = time.perf_counter() - started
    return report


def _label_encode(values: np.ndarray, train_ids: np.ndarray) -> np.ndarray:
    """1..n for ids in ``train_ids`` (sorted), 0 for anything else."""
    if len(train_ids) == 0:
        return np.zeros_like(values)
    pos = np.minimum(np.searchsorted(train_ids, values), len(train_ids) - 1)
    return np.where((train_ids[pos] == values) & (values > 0), pos + 1, 0).astype(values.dtype)


def _rechub_text(chunk: SyntheticChunk, keep: np.ndarray, mask: np.ndarray, sparse: dict, dense: dict,
                 low: dict, high: dict) -> pa.Buffer:
    n = int(mask.sum())
    columns: list[pa.Array] = [
        _int_text(chunk.click[keep][mask], ","),
        _int_text(chunk.buy[keep][mask], ","),
    ]
    columns += [_int_text(sparse[f][mask], ",") for f in RECHUB_SPARSE_COLUMNS]
    for k, f in enumerate(RECHUB_DENSE_FIELDS):
        span = high[f] - low[f]
        # sklearn's MinMaxScaler maps a constant column to 0.
        scaled = (dense[f][mask] - low[f]) / span if span > 0 else np.zeros(n)
        sep = "\n" if k == len(RECHUB_DENSE_FIELDS) - 1 else ","
        columns.append(pc.binary_join_element_wise(_float16_text(scaled), pa.scalar(sep), ""))
    order = (np.arange(len(columns) * n, dtype=np.int64).reshape(len(columns), n).T).reshape(-1)
    return _gather_text(columns, order)
