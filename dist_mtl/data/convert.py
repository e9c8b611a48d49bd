"""Raw Tianchi Ali-CCP files -> the dist_mtl Parquet dataset (layout in schema.py).

The train split goes first: the id maps are built on it and applied to every split, and kept with the
dataset (id_maps.py). Or the maps are an existing dataset's (``id_maps_from``): then no split is counted,
and new raw files are encoded in the id space a model was trained on.

Per split:

1. ``common_features_<split>.csv`` is parsed (raw.py) into a staged Arrow IPC file of raw user rows
   (int64 ids, a list per field) under the work directory, and a sorted index of its
   ``common_feature_index`` keys. Train only (when the maps are built): user-side ids are counted per
   field over these rows, once per common-features row (the same user row serves ~58 impressions but
   counts once), except over the rows a validation holdout takes (``holds_out``).
2. ``sample_skeleton_<split>.csv`` is parsed; each row's key is resolved to its staged user row, rows
   with click=0 and buy=1 are dropped and counted, and with ``keep_negatives`` < 1 the non-clicked rows
   a hash of their sample id does not keep (``keeps_negative``) are dropped and counted too. Train only
   (ditto): item-side ids are counted over the kept skeleton rows, which are staged (Arrow IPC) because
   the vocabularies exist only once the whole train skeleton has been counted; other splits are written
   while they are parsed. With a validation holdout, the train rows of held-out user rows are staged
   apart and written as the validation split once the train split is.
3. Impressions are cut into user groups (runs of consecutive rows with the same key; a key that comes
   back later, non-consecutively, starts a new group whose user row is stored again, and is counted),
   encoded and written through ``DatasetWriter`` in blocks of whole groups, each block's users fetched
   from the staged file.

Memory: nothing grows with the number of impressions. Held in memory are a few blocks of text (32 MiB by
default: up to two being parsed, two parsed ahead, one being written) with their parses, the key index
(fixed-width bytes: ~23 MB for 730k 32-character keys, 256 B a key at most: raw.py refuses longer keys),
a byte per staged user row, and the id counts and vocabularies (numpy; hundreds of MB at most at full
scale). Peak RSS on 2.2M synthetic impressions: 0.6-0.8 GB (benchmarks/results/convert.json). The
common-features table (~4.5 GB of raw ids per split at full scale) is staged to disk and read back
through a memory map that is reopened for every block written, so pages read for one block do not stay
resident. Staged files live in a fresh directory under ``work_dir`` (default: inside ``out_dir``) and are
removed when the conversion ends, whether it succeeded or not; measured ~6.2 KB per staged user row and
~200 B per staged train impression, so the full data needs ~13 GB free there. ``metadata.json`` is
written last, by ``DatasetWriter.commit``, so an interrupted conversion never leaves a dataset that looks
complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dist_mtl.data.id_maps import FieldVocabulary, IdMaps
from dist_mtl.data.raw import (
    COMMON,
    DEFAULT_BLOCK_BYTES,
    MAX_KEY_BYTES,
    SKELETON,
    ParsedBlock,
    RawFileKind,
    RawFileReader,
    RawFormatError,
)
from dist_mtl.data.schema import (
    ALI_CCP_FIELDS,
    ITEM_FIELDS,
    SAMPLE_WEIGHT_COLUMN,
    USER_COLUMN,
    USER_FIELDS,
    USER_KEY_COLUMN,
    DatasetMetadata,
    DatasetWriter,
    FieldSpec,
    SplitInfo,
    SplitWriter,
)

__all__ = ["ConvertError", "ConvertProgress", "IdCounter", "IdTally", "KeyIndex", "RawFormatError", "build_id_maps",
           "convert_raw", "encode_parsed"]

class ConvertError(ValueError):
    """convert_raw's arguments cannot work (an id maps source that is the output, a min_count that
    contradicts the given maps, no train split to build maps on, ...)."""


TRAIN_SPLIT = "train"
#: The split a validation holdout writes: the name torch-rechub's files give theirs (convert.py rechub --val).
VALIDATION_SPLIT = "val"
HOLDOUT_NOTE = (
    "user rows (common_feature_index keys) held out of the train split by a hash of the key and seed against "
    "share (convert.holds_out), each with all its impressions, and written as the validation split; their "
    "ids are not counted for the id maps (the validation split is unseen data, as the test split is)"
)
CLICK0_BUY1 = "click0_buy1"
NEGATIVE_DOWNSAMPLING_NOTE = (
    "non-clicked impressions kept by a hash of sample_id and seed against keep_rate (convert.keeps_negative); "
    "each kept one has sample_weight 1/keep_rate, every clicked one 1; num_impressions counts the stored rows"
)
NO_COMMON_FEATURES = "no_common_features"
USER_ROW_SKIPPED = "user_row_skipped"
DUPLICATE_KEY = "duplicate_common_feature_index"
COMMON_PREFIX = "common_features."  # skipped-count keys for common-features rows (user rows, not impressions)

ID_MAP_NOTE = (
    "Id maps are built on the train split: per field, raw feature ids seen at least min_count times get "
    "indices 1..V in ascending raw-id order; rarer ids, ids unseen in train and a missing single-valued "
    "field map to 0. User-side fields are counted over the well-formed common-features rows (each row "
    "once, however many impressions share it; every occurrence inside a row counts), item-side fields "
    "over the kept skeleton rows. They are kept in id_maps.parquet (dist_mtl/data/id_maps.py)."
)
ID_MAPS_FROM_NOTE = (
    "Id maps taken from another dataset (id_maps_from), not built: every split is encoded in that dataset's "
    "id space, and its min_count applies."
)
STAGING_NOTE = (
    "Common-features rows are staged to an Arrow IPC file of raw ids and fetched through a memory map "
    "reopened per written block; the train skeleton is staged the same way until the id maps exist. "
    "Staged files are deleted at the end."
)


@dataclass(frozen=True)
class ConvertProgress:
    """Where a conversion is; handed to the ``progress`` callback after every block."""

    split: str
    stage: str  # "user rows" (common features), "impressions" (skeleton), "write" (staged train rows)
    rows: int  # rows done in this stage
    rows_total: int | None  # known for "write" only
    bytes_done: int  # of the file this stage reads (0 for "write")
    bytes_total: int
    elapsed_s: float  # since the conversion started


ProgressCallback = Callable[[ConvertProgress], None]


# ---------------------------------------------------------------- id counts and vocabularies


class IdCounter:
    """Occurrences of raw ids per field.

    Per-block counts (np.unique) are kept pending and merged once they outgrow the merged table, so
    merging costs O(n log n) over the whole input instead of a full re-sort per block, and memory stays
    within about twice the number of distinct ids.
    """

    def __init__(self) -> None:
        self._merged: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._pending: dict[str, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
        self._pending_size: Counter = Counter()

    def add(self, field: str, ids: np.ndarray, sign: int = 1) -> None:
        if len(ids) == 0:
            return
        unique, counts = np.unique(ids, return_counts=True)
        self._pending[field].append((unique, counts.astype(np.int64) * sign))
        self._pending_size[field] += len(unique)
        merged = self._merged.get(field)
        if self._pending_size[field] > max(1 << 16, len(merged[0]) if merged else 0):
            self._merge(field)

    def _merge(self, field: str) -> None:
        parts = self._pending.pop(field, [])
        self._pending_size.pop(field, None)
        if field in self._merged:
            parts.append(self._merged[field])
        if not parts:
            return
        ids = np.concatenate([p[0] for p in parts])
        counts = np.concatenate([p[1] for p in parts])
        order = np.argsort(ids, kind="stable")
        ids, counts = ids[order], counts[order]
        starts = np.flatnonzero(np.concatenate([[True], ids[1:] != ids[:-1]]))
        ids, counts = ids[starts], np.add.reduceat(counts, starts)
        nonzero = counts != 0
        self._merged[field] = (ids[nonzero], counts[nonzero])

    def counts(self, field: str) -> tuple[np.ndarray, np.ndarray]:
        """(ascending distinct ids, their counts) for ``field``."""
        self._merge(field)
        return self._merged.get(field, (np.zeros(0, np.int64), np.zeros(0, np.int64)))


def build_id_maps(counter: IdCounter, min_count: int) -> IdMaps:
    vocab = {}
    for spec in ALI_CCP_FIELDS:
        ids, counts = counter.counts(spec.name)
        vocab[spec.name] = FieldVocabulary(ids[counts >= min_count])
    return IdMaps(vocab)


# ---------------------------------------------------------------- keys


def _fixed_width(keys: pa.Array, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys as numpy ``S<width>`` (zero-padded) and a mask of keys longer than ``width``."""
    keys = keys.cast(pa.binary())
    n = len(keys)
    if n == 0:
        return np.zeros(0, f"S{max(width, 1)}"), np.zeros(0, bool)
    offsets = np.frombuffer(keys.buffers()[1], np.int32, n + 1, keys.offset * 4).astype(np.int64)
    data = np.frombuffer(keys.buffers()[2], np.uint8)
    lengths = np.diff(offsets)
    too_long = lengths > width
    if (lengths == width).all():  # typical: 32-character md5 keys, a reshape with no gather
        out = data[offsets[0] : offsets[0] + n * width].reshape(n, width)
    else:
        out = np.zeros((n, width), np.uint8)
        columns = np.arange(width)
        for start in range(0, n, 1 << 16):
            rows = slice(start, min(n, start + (1 << 16)))
            take = columns < np.minimum(lengths[rows], width)[:, None]
            index = offsets[rows, None] + columns
            out[rows][take] = data[index[take]]
    return out.copy().view(f"S{width}").ravel(), too_long


class KeyIndex:
    """common_feature_index -> row number, as a sorted fixed-width byte array (no Python objects)."""

    def __init__(self, keys: pa.Array, rows: np.ndarray):
        self.width = int(pc.max(pc.binary_length(keys)).as_py() or 1) if len(keys) else 1
        if self.width > MAX_KEY_BYTES:
            # Every key is padded to the longest: one long key would cost its length times the key count.
            raise ValueError(f"a key of {self.width:,} bytes is longer than MAX_KEY_BYTES ({MAX_KEY_BYTES})")
        fixed, _ = _fixed_width(keys, self.width)
        order = np.argsort(fixed, kind="stable")
        self._keys = fixed[order]
        self._rows = np.asarray(rows, np.int64)[order]

    def __len__(self) -> int:
        return len(self._keys)

    def duplicates(self) -> tuple[np.ndarray, np.ndarray]:
        """(row, first row with the same key) for every key seen again; rows in insertion order."""
        if len(self._keys) < 2:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        again = np.flatnonzero(self._keys[1:] == self._keys[:-1]) + 1
        group_start = np.flatnonzero(np.concatenate([[True], self._keys[1:] != self._keys[:-1]]))
        first = self._rows[group_start[np.searchsorted(group_start, again, side="right") - 1]]
        return self._rows[again], first

    def without_rows(self, rows: np.ndarray) -> "KeyIndex":
        keep = ~np.isin(self._rows, rows)
        index = object.__new__(KeyIndex)
        index.width, index._keys, index._rows = self.width, self._keys[keep], self._rows[keep]
        return index

    def lookup(self, keys: pa.Array) -> np.ndarray:
        """Row of each key, -1 where absent."""
        if not len(keys) or not len(self._keys):
            return np.full(len(keys), -1, np.int64)
        fixed, too_long = _fixed_width(keys, self.width)
        position = np.searchsorted(self._keys, fixed)
        np.minimum(position, len(self._keys) - 1, out=position)
        found = (self._keys[position] == fixed) & ~too_long
        return np.where(found, self._rows[position], -1)


def _runs(keys: pa.Array) -> np.ndarray:
    """Start of every run of equal consecutive keys."""
    n = len(keys)
    if n == 0:
        return np.zeros(0, np.int64)
    change = pc.not_equal(keys.slice(1), keys.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    return np.flatnonzero(np.concatenate([[True], change]))


# ---------------------------------------------------------------- staged user rows


def _raw_fields(fields: Iterable[FieldSpec]) -> list[pa.Field]:
    """Staged raw ids: weighted lists for multi-valued fields, a nullable int64 (null: missing) else."""
    out = []
    for f in fields:
        if f.multi_valued:
            out += [pa.field(f.name, pa.list_(pa.int64())), pa.field(f.weight_column, pa.list_(pa.float32()))]
        else:
            out.append(pa.field(f.name, pa.int64()))
    return out


STAGED_USERS_SCHEMA = pa.schema(
    [pa.field(USER_KEY_COLUMN, pa.string()), pa.field("line", pa.int64())] + _raw_fields(USER_FIELDS)
)
STAGED_IMPRESSIONS_SCHEMA = pa.schema(
    [
        pa.field("line", pa.int64()),
        pa.field("sample_id", pa.int64()),
        pa.field("click", pa.int8()),
        pa.field("buy", pa.int8()),
        pa.field(USER_COLUMN, pa.int64()),  # row in the staged users file
    ]
    + _raw_fields(ITEM_FIELDS)
)


def _staged_columns(block: ParsedBlock, fields: Iterable[FieldSpec]) -> list[pa.Array]:
    out = []
    for spec in fields:
        lists = block.features[spec.name]
        if spec.multi_valued:
            out += lists.to_arrow()
        else:
            present = np.diff(lists.offsets) > 0  # at most one id per row once repeats are resolved
            ids = np.zeros(len(present), np.int64)
            ids[present] = lists.ids
            out.append(pa.array(ids, mask=~present))
    return out


def _raw_ids(column: pa.ChunkedArray | pa.Array, spec: FieldSpec) -> np.ndarray:
    """Every raw id of a staged column, as counted for the vocabularies."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return (column.flatten() if spec.multi_valued else column.drop_null()).to_numpy()


class StagedUsers:
    """One split's raw user rows in an Arrow IPC file, fetched by row number."""

    def __init__(self, path: Path, source: Path, batch_starts: np.ndarray, index: KeyIndex, skipped: KeyIndex):
        self.path = path
        self.source = source  # the common-features file, for messages
        self.batch_starts = batch_starts  # first row of every record batch, plus the row count
        self.index = index  # key -> row, duplicates removed
        self.skipped = skipped  # keys of common-features rows skipped as bad
        self.held_out: np.ndarray | None = None  # per staged row: held out for validation (None: no holdout)

    @property
    def num_rows(self) -> int:
        return int(self.batch_starts[-1])

    def resolve(self, keys: pa.Array) -> np.ndarray:
        """Staged row of each key (-1 where absent); one lookup per run of equal keys."""
        starts = _runs(keys)
        rows = self.index.lookup(keys.take(pa.array(starts)))
        return np.repeat(rows, np.diff(np.append(starts, len(keys))))

    def take(self, rows: np.ndarray) -> pa.Table:
        """The staged rows, in the order asked (repeats allowed)."""
        if len(rows) == 0:
            return STAGED_USERS_SCHEMA.empty_table()
        batch = np.searchsorted(self.batch_starts, rows, side="right") - 1
        order = np.argsort(batch, kind="stable")
        parts = []
        # A fresh map per call: pages touched for one block are unmapped with it.
        with pa.memory_map(str(self.path)) as source:
            reader = pa.ipc.open_file(source)
            sorted_batch, sorted_rows = batch[order], rows[order]
            bounds = np.flatnonzero(np.concatenate([[True], sorted_batch[1:] != sorted_batch[:-1], [True]]))
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                b = int(sorted_batch[lo])
                local = sorted_rows[lo:hi] - self.batch_starts[b]
                parts.append(reader.get_batch(b).take(pa.array(local)))
            table = pa.Table.from_batches(parts, STAGED_USERS_SCHEMA).combine_chunks()
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return table.take(pa.array(inverse))


# ---------------------------------------------------------------- encoding and writing


class IdTally:
    """Per field: raw ids encoded, and those of them outside the id maps (index 0: rare or unseen in train)."""

    def __init__(self) -> None:
        self.encoded: Counter = Counter()
        self.outside: Counter = Counter()

    def add(self, name: str, codes: np.ndarray) -> None:
        self.encoded[name] += len(codes)
        self.outside[name] += len(codes) - int(np.count_nonzero(codes))


def _encode_fields(
    table: pa.Table, fields: Iterable[FieldSpec], id_maps: IdMaps, tally: IdTally
) -> dict[str, pa.Array]:
    """Staged raw ids -> the dataset's int32 indices (weighted lists, or one id per row with 0 if missing)."""
    out = {}
    for spec in fields:
        column = table.column(spec.name).combine_chunks()
        if spec.multi_valued:
            offsets = column.offsets.to_numpy()
            codes = id_maps.encode(spec.name, column.flatten().to_numpy())
            tally.add(spec.name, codes)
            rebased = pa.array(offsets - offsets[0], pa.int32())
            out[spec.name] = pa.ListArray.from_arrays(rebased, pa.array(codes, pa.int32()))
            weights = table.column(spec.weight_column).combine_chunks().flatten()
            out[spec.weight_column] = pa.ListArray.from_arrays(rebased, weights)
        else:
            present = column.is_valid().to_numpy(zero_copy_only=False)
            single = np.zeros(len(column), np.int32)
            codes = id_maps.encode(spec.name, column.drop_null().to_numpy())
            tally.add(spec.name, codes)
            single[present] = codes
            out[spec.name] = pa.array(single, pa.int32())
    return out


def encode_parsed(block: ParsedBlock, fields: Sequence[FieldSpec], id_maps: IdMaps,
                  tally: IdTally) -> dict[str, pa.Array]:
    """A parsed block's features as the dataset stores them, by the converter's own two steps (staged raw
    ids, then encoded): the raw request encoder (dist_mtl/data/raw_request.py) serves through this, so a
    request's ids and weights are those its rows would have had in a converted dataset."""
    staged = pa.Table.from_arrays(_staged_columns(block, fields), schema=pa.schema(_raw_fields(fields)))
    return _encode_fields(staged, fields, id_maps, tally)


def keeps_negative(sample_ids: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """Which impressions a negative share ``rate`` keeps if they are not clicked: a hash of each sample id
    (splitmix64 of id and seed) against the rate, so the choice is the same whatever the text blocks, the
    split's order or the machine, and rerunning a conversion writes the same rows."""
    with np.errstate(over="ignore"):
        z = sample_ids.astype(np.uint64) ^ np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53 < rate


def holds_out(keys: pa.Array, share: float, seed: int) -> np.ndarray:
    """Which user rows (by ``common_feature_index`` key) a validation ``share`` holds out of the train split:
    a keyed hash of each key against the share, so the choice depends on the key alone (not the file's
    order, the text blocks or the machine), and a user row goes, with every impression of it, to one split.

    Whole user rows, not impressions: a held-out impression whose user row also served training impressions
    would store that row in both splits, ~58 impressions' worth of user features for each one held out.
    BLAKE2 per key in Python (once per user row: 0.5 s for 730k keys, a full split's), since numpy has no
    string hash and Python's own ``hash`` changes from process to process."""
    salt = (seed % 2**64).to_bytes(16, "little")
    hashes = np.fromiter(
        (int.from_bytes(hashlib.blake2b(key, digest_size=8, salt=salt).digest(), "little")
         for key in keys.cast(pa.binary()).to_pylist()),
        dtype=np.uint64, count=len(keys),
    )
    return (hashes >> np.uint64(11)).astype(np.float64) * 2.0**-53 < share


class _GroupWriter:
    """Cuts resolved impressions into user groups and writes them as blocks of whole groups.

    A group is a run of consecutive impressions of one user row; the last run of a pushed batch is
    held back until the next batch shows whether it continues.
    """

    def __init__(
        self,
        writer: SplitWriter,
        users: StagedUsers,
        id_maps: IdMaps,
        block_impressions: int,
        negative_weight: float | None = None,
    ):
        """``negative_weight``: write SAMPLE_WEIGHT_COLUMN, this for non-clicked impressions and 1 for
        clicked ones (None: the dataset has no such column)."""
        self._writer = writer
        self._negative_weight = negative_weight
        self._users = users
        self._id_maps = id_maps
        self.ids = IdTally()
        self._block_impressions = block_impressions
        self._pending = 0  # impressions the SplitWriter holds unflushed (it flushes at >= block_impressions)
        self._carry: pa.Table | None = None
        self._used = np.zeros(users.num_rows, bool)
        self.reappearances = 0
        self.impressions = 0

    @property
    def unreferenced_users(self) -> int:
        # Indexed rows only: a duplicate key's row stays staged but is already counted as skipped.
        return len(self._users.index) - int(np.count_nonzero(self._used))

    @property
    def used(self) -> np.ndarray:
        """Per staged user row: whether a written group refers to it."""
        return self._used

    def push(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        table = pa.Table.from_batches([batch])
        if self._carry is not None:
            table = pa.concat_tables([self._carry, table])
        user = table.column(USER_COLUMN).to_numpy()
        last_run = int(np.flatnonzero(np.concatenate([[True], user[1:] != user[:-1]]))[-1])
        self._emit(table.slice(0, last_run))
        self._carry = table.slice(last_run)

    def finish(self) -> None:
        if self._carry is not None:
            self._emit(self._carry)
            self._carry = None

    def _emit(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        user = table.column(USER_COLUMN).to_numpy()
        starts = np.flatnonzero(np.concatenate([[True], user[1:] != user[:-1]]))
        sizes = np.diff(np.append(starts, len(user)))
        first = 0
        while first < len(starts):
            # Cut where the writer will flush, so each block holds about block_impressions.
            reach = np.cumsum(sizes[first:])
            last = int(np.searchsorted(reach, self._block_impressions - self._pending))
            if last < len(reach):
                self._pending = 0
            else:
                last = len(reach) - 1
                self._pending += int(reach[-1])
            lo, hi = int(starts[first]), int(starts[first + last] + sizes[first + last])
            self._add(table.slice(lo, hi - lo), user[starts[first : first + last + 1]], sizes[first : first + last + 1])
            first += last + 1

    def _add(self, impressions: pa.Table, group_users: np.ndarray, group_sizes: np.ndarray) -> None:
        distinct = np.unique(group_users)
        self.reappearances += len(group_users) - len(distinct) + int(np.count_nonzero(self._used[distinct]))
        self._used[distinct] = True
        raw_users = self._users.take(group_users)
        users = {USER_KEY_COLUMN: raw_users.column(USER_KEY_COLUMN)}
        users.update(_encode_fields(raw_users, USER_FIELDS, self._id_maps, self.ids))
        items = {
            USER_COLUMN: pa.array(np.repeat(np.arange(len(group_sizes), dtype=np.int32), group_sizes)),
            "sample_id": impressions.column("sample_id"),
            "click": impressions.column("click"),
            "buy": impressions.column("buy"),
        }
        if self._negative_weight is not None:
            clicked = impressions.column("click").to_numpy() == 1
            items[SAMPLE_WEIGHT_COLUMN] = pa.array(np.where(clicked, 1.0, self._negative_weight).astype(np.float32))
        items.update(_encode_fields(impressions, ITEM_FIELDS, self._id_maps, self.ids))
        self._writer.add(pa.table(users), pa.table(items))
        self.impressions += impressions.num_rows


# ---------------------------------------------------------------- the conversion


@dataclass
class _SplitStats:
    skipped: Counter
    unknown_fields: Counter
    misplaced_fields: Counter
    repeated_fields: Counter
    single_valued_weights: Counter
    examples: list
    negatives_dropped: int = 0

    @classmethod
    def empty(cls) -> "_SplitStats":
        return cls(Counter(), Counter(), Counter(), Counter(), Counter(), [])

    def absorb(self, block: ParsedBlock, prefix: str = "") -> None:
        for reason, count in block.skipped.items():
            self.skipped[prefix + reason] += count
        self.unknown_fields.update(block.unknown_fields)
        self.misplaced_fields.update(block.misplaced_fields)
        self.repeated_fields.update(block.repeated_fields)
        self.single_valued_weights.update(block.single_valued_weights)
        self.examples.extend(block.skipped_examples[: max(0, 20 - len(self.examples))])


class _RawConverter:
    def __init__(
        self,
        raw_dir: Path,
        staging: Path,
        skip_bad_rows: bool,
        block_bytes: int,
        progress: ProgressCallback | None,
        negative_seed: int = 0,
        validation_seed: int = 0,
    ):
        self.raw_dir = raw_dir
        self.negative_seed = negative_seed
        self.validation_seed = validation_seed
        self.staging = staging
        self.skip_bad_rows = skip_bad_rows
        self.block_bytes = block_bytes
        self.progress = progress
        self.started = time.monotonic()
        self.source_files: list[dict] = []

    def _report(self, split: str, stage: str, rows: int, rows_total: int | None, reader: RawFileReader | None) -> None:
        if self.progress is not None:
            self.progress(
                ConvertProgress(
                    split=split,
                    stage=stage,
                    rows=rows,
                    rows_total=rows_total,
                    bytes_done=reader.bytes_done if reader else 0,
                    bytes_total=reader.bytes_total if reader else 0,
                    elapsed_s=time.monotonic() - self.started,
                )
            )

    def _reader(self, split: str, kind: RawFileKind) -> RawFileReader:
        return RawFileReader(
            kind.path(self.raw_dir, split), kind, skip_bad_rows=self.skip_bad_rows, block_bytes=self.block_bytes
        )

    def stage_users(self, split: str, stats: _SplitStats, counter: IdCounter | None,
                    validation_share: float = 0.0) -> StagedUsers:
        """The split's user rows staged; with ``validation_share`` > 0, each row marked held out or not
        (``holds_out``), and the held-out rows' ids not counted."""
        reader = self._reader(split, COMMON)
        path = self.staging / f"{split}-users.arrow"
        starts, keys, skipped_keys, rows, held_parts = [0], [], [], 0, []
        self._report(split, "user rows", 0, None, reader)
        with pa.ipc.new_file(str(path), STAGED_USERS_SCHEMA) as sink:
            for block in reader.blocks():
                stats.absorb(block, COMMON_PREFIX)
                skipped_keys += block.skipped_keys
                if block.num_rows:
                    columns = [block.keys, pa.array(block.lines)] + _staged_columns(block, USER_FIELDS)
                    sink.write_batch(pa.record_batch(columns, schema=STAGED_USERS_SCHEMA))
                    keys.append(block.keys)
                    rows += block.num_rows
                    starts.append(rows)
                    held = holds_out(block.keys, validation_share, self.validation_seed) if validation_share else None
                    if held is not None:
                        held_parts.append(held)
                    if counter is not None:
                        for spec in USER_FIELDS:
                            lists = block.features[spec.name]
                            ids = lists.ids if held is None else lists.ids[~np.repeat(held, np.diff(lists.offsets))]
                            counter.add(spec.name, ids)
                self._report(split, "user rows", rows, None, reader)
        self.source_files.append(reader.source_record())
        all_keys = pa.concat_arrays(keys) if keys else pa.array([], pa.string())
        index = KeyIndex(all_keys, np.arange(rows))
        skipped = KeyIndex(pa.array(skipped_keys, pa.string()), np.arange(len(skipped_keys)))
        users = StagedUsers(path, reader.path, np.array(starts, np.int64), index, skipped)
        if validation_share:
            users.held_out = np.concatenate(held_parts) if held_parts else np.zeros(0, bool)
        again, first = index.duplicates()
        if len(again):
            self._drop_duplicates(users, again, first, stats, counter)
        return users

    def _drop_duplicates(
        self, users: StagedUsers, again: np.ndarray, first: np.ndarray, stats: _SplitStats, counter: IdCounter | None
    ) -> None:
        rows = np.concatenate([again, first])
        lines = users.take(rows).column("line").to_numpy()
        again_lines, first_lines = lines[: len(again)], lines[len(again) :]
        if not self.skip_bad_rows:
            i = int(np.argmin(again_lines))
            key = users.take(again[i : i + 1]).column(USER_KEY_COLUMN)[0].as_py()
            raise RawFormatError(
                users.source, int(again_lines[i]), USER_KEY_COLUMN, f"{key!r} already appeared on line {first_lines[i]}"
            )
        stats.skipped[COMMON_PREFIX + DUPLICATE_KEY] += len(again)
        users.index = users.index.without_rows(again)
        if counter is not None:
            # A duplicate has its first row's key, so the same holdout: only counted rows are uncounted.
            dropped = users.take(again if users.held_out is None else again[~users.held_out[again]])
            for spec in USER_FIELDS:
                counter.add(spec.name, _raw_ids(dropped.column(spec.name), spec), sign=-1)

    def resolved_impressions(
        self, split: str, users: StagedUsers, stats: _SplitStats, counter: IdCounter | None,
        negative_keep_rate: float = 1.0, held_out: Callable[[pa.RecordBatch], None] | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """Skeleton rows with their staged user row, bad joins and click=0/buy=1 rows removed, and the
        non-clicked rows that ``negative_keep_rate`` (< 1) does not keep (``keeps_negative``). The rows
        of user rows held out for validation (``users.held_out``) go to ``held_out`` instead, all of them
        (a validation split is not downsampled), and are not counted."""
        reader = self._reader(split, SKELETON)
        rows = 0
        self._report(split, "impressions", 0, None, reader)
        for block in reader.blocks():
            stats.absorb(block)
            batch, held_batch = self._resolve(block, users, stats, reader.path, negative_keep_rate)
            if held_batch is not None:
                assert held_out is not None, "users are marked held out, but nothing takes their impressions"
                held_out(held_batch)
            if counter is not None:
                for spec in ITEM_FIELDS:
                    counter.add(spec.name, _raw_ids(batch.column(spec.name), spec))
            rows += batch.num_rows
            yield batch
            self._report(split, "impressions", rows, None, reader)
        self.source_files.append(reader.source_record())

    def _resolve(self, block: ParsedBlock, users: StagedUsers, stats: _SplitStats, path: Path,
                 negative_keep_rate: float) -> tuple[pa.RecordBatch, pa.RecordBatch | None]:
        """The block's kept rows staged, and those of held-out user rows apart (None: no holdout, or none
        in this block)."""
        user = users.resolve(block.keys)
        missing = user < 0
        if missing.any():
            first = int(np.argmax(missing))
            if not self.skip_bad_rows:
                key = block.keys[first].as_py()
                raise RawFormatError(
                    path, int(block.lines[first]), USER_KEY_COLUMN, f"{key!r} has no row in {users.source}"
                )
            was_skipped = users.skipped.lookup(block.keys.filter(pa.array(missing))) >= 0
            stats.skipped[USER_ROW_SKIPPED] += int(np.count_nonzero(was_skipped))
            stats.skipped[NO_COMMON_FEATURES] += int(np.count_nonzero(~was_skipped))
        click0_buy1 = (block.click == 0) & (block.buy == 1) & ~missing
        stats.skipped[CLICK0_BUY1] += int(np.count_nonzero(click0_buy1))
        keep = ~(missing | click0_buy1)
        held = None
        if users.held_out is not None:
            held = keep.copy()
            held[keep] = users.held_out[user[keep]]
            keep &= ~held
        if negative_keep_rate < 1.0:
            dropped = keep & (block.click == 0) & ~keeps_negative(block.sample_id, negative_keep_rate,
                                                                  self.negative_seed)
            stats.negatives_dropped += int(np.count_nonzero(dropped))
            keep &= ~dropped
        held_batch = _staged_impressions(block, user, held) if held is not None and held.any() else None
        return _staged_impressions(block, user, keep), held_batch

    def staged_impressions(self, split: str, batches: Iterator[pa.RecordBatch]) -> tuple[Path, int]:
        with _StagedSink(self.staging / f"{split}-impressions.arrow") as sink:
            for batch in batches:
                sink.write(batch)
        return sink.path, sink.rows

    def read_staged(self, split: str, path: Path, total: int) -> Iterator[pa.RecordBatch]:
        # Read into memory batch by batch (not memory-mapped): a sequential pass must not stay resident.
        with pa.OSFile(str(path)) as source:
            reader = pa.ipc.open_file(source)
            rows = 0
            self._report(split, "write", 0, total, None)
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                rows += batch.num_rows
                yield batch
                self._report(split, "write", rows, total, None)


class _StagedSink:
    """An Arrow IPC file of staged impressions, written batch by batch, that counts its rows."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = 0
        self._sink = pa.ipc.new_file(str(path), STAGED_IMPRESSIONS_SCHEMA)

    def write(self, batch: pa.RecordBatch) -> None:
        self._sink.write_batch(batch)
        self.rows += batch.num_rows

    def __enter__(self) -> "_StagedSink":
        return self

    def __exit__(self, *exc) -> None:
        self._sink.close()


def _write_groups(writer: DatasetWriter, split: str, users: StagedUsers, id_maps: IdMaps, block_impressions: int,
                  negative_weight: float | None, batches: Iterator[pa.RecordBatch],
                  stats: _SplitStats) -> tuple[SplitInfo, _GroupWriter]:
    """Writes ``batches`` (staged impressions, in order) as ``split``, in blocks of whole user groups, and
    closes it with ``stats``' skipped counts (complete once the batches are)."""
    split_writer = writer.split(split)
    try:
        groups = _GroupWriter(split_writer, users, id_maps, block_impressions, negative_weight)
        # closing: an error here also stops the background reader of the file being parsed.
        with closing(batches):
            for batch in batches:
                groups.push(batch)
        groups.finish()
    except BaseException:
        split_writer.abort()  # close its part files now, not at garbage collection
        raise
    return split_writer.close(skipped=dict(sorted(stats.skipped.items()))), groups


def _split_notes(stats: _SplitStats, groups: _GroupWriter, user_rows_without_impressions: int) -> dict:
    return {
        "ignored_unknown_field_features": dict(sorted(stats.unknown_fields.items())),
        "ignored_other_side_field_features": dict(sorted(stats.misplaced_fields.items())),
        "repeated_single_valued_features_dropped": dict(sorted(stats.repeated_fields.items())),
        "single_valued_values_other_than_1_dropped": dict(sorted(stats.single_valued_weights.items())),
        "ids_encoded": dict(groups.ids.encoded),
        "ids_outside_id_maps": {k: v for k, v in groups.ids.outside.items() if v},
        "user_group_reappearances": groups.reappearances,
        "user_rows_without_impressions": user_rows_without_impressions,
        "skipped_examples": stats.examples,
    }


def _staged_impressions(block: ParsedBlock, user: np.ndarray, rows: np.ndarray) -> pa.RecordBatch:
    """The ``rows`` (bool per row) of a skeleton block with their staged user rows, as staged."""
    if not rows.all():
        # numpy, not RecordBatch.filter: filtering Arrow list columns costs ~20x more here.
        block, user = block.rows(rows), user[rows]
    columns = [
        pa.array(block.lines),
        pa.array(block.sample_id),
        pa.array(block.click),
        pa.array(block.buy),
        pa.array(user),
    ] + _staged_columns(block, ITEM_FIELDS)
    return pa.record_batch(columns, schema=STAGED_IMPRESSIONS_SCHEMA)


def _check_inputs(raw_dir: Path, splits: Sequence[str]) -> None:
    for split in splits:
        for kind in (COMMON, SKELETON):
            path = kind.path(raw_dir, split)
            if not path.is_file():
                raise RawFormatError(path, None, "file", f"no such {kind.name} file (split '{split}')")


def convert_raw(
    raw_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    splits: Sequence[str] = ("train", "test"),
    min_count: int | None = None,
    skip_bad_rows: bool = False,
    block_impressions: int = 65536,
    work_dir: str | os.PathLike | None = None,
    progress: ProgressCallback | None = None,
    read_block_bytes: int = DEFAULT_BLOCK_BYTES,
    id_maps_from: str | os.PathLike | None = None,
    keep_negatives: float = 1.0,
    downsampled_splits: Sequence[str] = (TRAIN_SPLIT,),
    negative_seed: int = 0,
    validation_share: float = 0.0,
    validation_seed: int = 0,
) -> DatasetMetadata:
    """Convert ``<raw_dir>/{sample_skeleton,common_features}_<split>.csv`` into a dataset at ``out_dir``.

    ``splits`` must include "train" (the id maps are built on it, of the raw ids seen at least
    ``min_count`` times there; default 1); it is converted first. With ``id_maps_from`` (an existing
    dataset's directory) the maps are that dataset's instead, and its min_count with them (a different
    ``min_count`` is refused): any splits, in the given order, encoded in the id space of the tables a
    model was trained on (a later day's logs, a split added after training). The maps are written to
    ``out_dir`` in both cases (id_maps.py), and each split's notes count the ids they do not hold. Bad input
    raises RawFormatError naming file, line and field, or with ``skip_bad_rows`` is skipped and counted
    per reason in each split's ``skipped`` (keys starting with "common_features." count user rows, the
    others impressions). Staged files go to a fresh directory under ``work_dir`` (default ``out_dir``)
    that is removed at the end. ``read_block_bytes`` is the size of the text blocks parsed at a time.

    ``keep_negatives`` < 1 keeps that share of the non-clicked impressions of ``downsampled_splits`` (the
    train split by default; never evaluate on such a split), chosen by a hash of the sample id and
    ``negative_seed`` (``keeps_negative``), and keeps every clicked one (so every purchase). Every split
    then gets a SAMPLE_WEIGHT_COLUMN: 1 / keep_negatives for a kept non-clicked impression of a
    downsampled split, 1 for the rest; training tasks over all impressions weight their loss by it
    (``weight_column``), which keeps the loss, and the click and purchase rates the model learns, those
    of the whole split. The split's ``negative_keep_rate`` records the share, its notes the rows dropped.

    ``validation_share`` > 0 holds that share of the train split's user rows out, each with all its
    impressions (``holds_out``: a hash of the key and ``validation_seed``), and writes them as the split
    VALIDATION_SPLIT ("val", for ``data.val_split``), so that early stopping and the best model are chosen
    without the test split. Its ids are not counted for the id maps, and it is never downsampled. Both
    splits' notes say what was held out. Arguments that cannot work raise ConvertError.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    splits = list(dict.fromkeys(splits))
    if not splits:
        raise ConvertError("no splits to convert")
    if min_count is not None and min_count < 1:
        raise ConvertError(f"min_count must be >= 1, got {min_count}")
    if block_impressions < 1 or read_block_bytes < 1:
        raise ConvertError("block_impressions and read_block_bytes must be positive")
    if not 0.0 < keep_negatives <= 1.0:
        raise ConvertError(f"keep_negatives is the share of non-clicked impressions kept, in (0, 1]; got "
                           f"{keep_negatives}")
    if keep_negatives < 1.0 and not set(downsampled_splits) & set(splits):
        raise ConvertError(f"keep_negatives {keep_negatives} applies to the splits {list(downsampled_splits)}, "
                           f"none of which is converted (splits {splits})")
    downsampled = set(downsampled_splits) if keep_negatives < 1.0 else set()
    if not 0.0 <= validation_share < 1.0:
        raise ConvertError(f"validation_share is the share of the train split's user rows held out, in [0, 1); "
                           f"got {validation_share}")
    if validation_share and TRAIN_SPLIT not in splits:
        raise ConvertError(f"validation_share {validation_share} holds out part of the '{TRAIN_SPLIT}' split, "
                           f"which is not converted (splits {splits})")
    if validation_share and VALIDATION_SPLIT in splits:
        raise ConvertError(f"validation_share {validation_share} writes the split '{VALIDATION_SPLIT}', which "
                           f"the raw files to convert have already (splits {splits}): convert one or the other")
    given_maps: IdMaps | None = None
    if id_maps_from is not None:
        if out_dir.resolve() == Path(id_maps_from).resolve():
            raise ConvertError(f"out_dir {out_dir} is the dataset the id maps come from: write the new splits to "
                             f"a directory of their own (its metadata.json would lose the existing splits)")
        source_meta = DatasetMetadata.load(id_maps_from)
        if min_count not in (None, source_meta.min_count):
            raise ConvertError(f"min_count {min_count} differs from the {source_meta.min_count} the id maps of "
                             f"{id_maps_from} were built with; it comes with them")
        min_count = source_meta.min_count
        given_maps = IdMaps.load(id_maps_from, source_meta)
    else:
        if TRAIN_SPLIT not in splits:
            raise ConvertError(f"splits {splits} lack '{TRAIN_SPLIT}': the id maps are built on the train split "
                             f"(or take an existing dataset's with id_maps_from)")
        splits.remove(TRAIN_SPLIT)
        splits.insert(0, TRAIN_SPLIT)
        min_count = 1 if min_count is None else min_count
    _check_inputs(raw_dir, splits)

    writer = DatasetWriter(out_dir, block_impressions=block_impressions,
                           extra_columns={SAMPLE_WEIGHT_COLUMN: "float"} if downsampled else None)
    staging_parent = Path(work_dir) if work_dir is not None else out_dir
    staging_parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-staging-", dir=staging_parent))
    try:
        converter = _RawConverter(raw_dir, staging, skip_bad_rows, read_block_bytes, progress, negative_seed,
                                  validation_seed)
        infos: dict[str, SplitInfo] = {}
        split_notes: dict[str, dict] = {}
        id_maps = given_maps
        distinct_train_ids: dict[str, int] = {}
        for split in splits:
            stats = _SplitStats.empty()
            counter = IdCounter() if split == TRAIN_SPLIT and given_maps is None else None
            holdout = validation_share if split == TRAIN_SPLIT else 0.0
            users = converter.stage_users(split, stats, counter, holdout)
            rate = keep_negatives if split in downsampled else 1.0
            with ExitStack() as held_stack:
                held = held_stack.enter_context(_StagedSink(staging / f"{VALIDATION_SPLIT}-impressions.arrow")) \
                    if holdout else None
                # The ids only dropped impressions hold get no rows; the user rows' ids were counted before
                # the impressions were read, so a user left without impressions still has its ids' rows.
                impressions = converter.resolved_impressions(split, users, stats, counter, rate,
                                                             held.write if held else None)
                if counter is not None:
                    with closing(impressions):
                        staged_path, staged_rows = converter.staged_impressions(split, impressions)
                    id_maps = build_id_maps(counter, min_count)
                    distinct_train_ids = {f.name: len(counter.counts(f.name)[0]) for f in ALI_CCP_FIELDS}
                    impressions = converter.read_staged(split, staged_path, staged_rows)
                assert id_maps is not None  # built on train, which goes first, or given
                infos[split], groups = _write_groups(writer, split, users, id_maps, block_impressions,
                                                     1.0 / rate if downsampled else None, impressions, stats)
            infos[split].negative_keep_rate = rate
            if infos[split].num_impressions == 0:
                skipped = ", ".join(f"{k}={v:,}" for k, v in sorted(stats.skipped.items()) if v) or "none"
                raise RawFormatError(
                    SKELETON.path(raw_dir, split), None, "file",
                    f"no impressions to write for split '{split}' (rows skipped: {skipped})",
                )
            unreferenced = groups.unreferenced_users
            if holdout:
                infos[VALIDATION_SPLIT], val_groups = _write_groups(
                    writer, VALIDATION_SPLIT, users, id_maps, block_impressions, 1.0 if downsampled else None,
                    converter.read_staged(VALIDATION_SPLIT, held.path, held.rows), _SplitStats.empty())
                if infos[VALIDATION_SPLIT].num_impressions == 0:
                    raise ConvertError(
                        f"validation_share {validation_share} held out no impression of the train split's "
                        f"{len(users.index):,} user rows ({int(users.held_out.sum()):,} held out): raise the share")
                # A user row the other split stores is not "without impressions": only those neither holds.
                unreferenced = len(users.index) - int(np.count_nonzero(groups.used | val_groups.used))
                held_out = {"share": validation_share, "seed": validation_seed,
                            "user_rows": int(np.count_nonzero(val_groups.used)),
                            "impressions": infos[VALIDATION_SPLIT].num_impressions, "note": HOLDOUT_NOTE}
                split_notes[VALIDATION_SPLIT] = {**_split_notes(_SplitStats.empty(), val_groups, unreferenced),
                                                 "held_out_of": {"split": split, **held_out}}
                held.path.unlink()
            split_notes[split] = _split_notes(stats, groups, unreferenced)
            if rate < 1.0:
                split_notes[split]["negative_downsampling"] = {
                    "keep_rate": rate, "seed": negative_seed, "non_clicked_dropped": stats.negatives_dropped,
                    "note": NEGATIVE_DOWNSAMPLING_NOTE}
            if holdout:
                split_notes[split]["validation_holdout"] = {"split": VALIDATION_SPLIT, **held_out}
            for staged in staging.glob(f"{split}-*"):
                staged.unlink()
        assert id_maps is not None
        notes: dict = {"id_maps": ID_MAP_NOTE, "staging": STAGING_NOTE, "splits": split_notes}
        if given_maps is None:
            notes["train_distinct_raw_ids"] = distinct_train_ids
        else:
            notes["id_maps_from"] = {"dataset": str(Path(id_maps_from).resolve()), "note": ID_MAPS_FROM_NOTE}
        return writer.commit(
            infos,
            vocab_sizes=id_maps.vocab_sizes,
            source="tianchi-raw",
            min_count=min_count,
            source_files=converter.source_files,
            notes=notes,
            id_maps=id_maps.write(out_dir),
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
