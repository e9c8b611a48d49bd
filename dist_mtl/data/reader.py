"""Streaming reader: one split of a dist_mtl Parquet dataset -> ``GroupedBatch`` per rank and worker.

Epoch stream
    The split's blocks (aligned users/impressions row groups, see ``schema``) are permuted by
    ``(seed, epoch)``; consecutive runs of ``window_blocks`` permuted blocks form *windows*, the bounded
    shuffle buffer held in memory. Inside a window the user groups are permuted by
    ``(seed, epoch, window)``; a user's impressions stay together and in file order. With
    ``shuffle=False`` neither permutation is applied and the stream is the storage order of the user
    groups (a block that stores users' impressions interleaved is regrouped by user, stably). Window sizes
    come from metadata.json, so every stream position is known before any data is read.

Ranks and batches (nothing dropped, nothing padded)
    The epoch stream of N impressions is cut into ``world_size`` contiguous ranges whose sizes differ
    by at most one. Every rank takes the same number of steps ``S = ceil(ceil(N / world) / batch_size)``
    and cuts its range into S batches whose sizes differ by at most one and never exceed
    ``batch_size``. Every impression is read exactly once per epoch for any world size, and no rank
    runs out of batches before another (a collective never waits on a rank that has stopped). A split
    too small to give every rank S non-empty batches is rejected when the reader is built.

Users cut by a boundary
    A user group that straddles a batch (or rank) boundary has its user row in both batches; each
    batch's ``user_index`` points at its own copy. Within a batch a user's impressions are
    contiguous and ``user_index`` is nondecreasing.

DataLoader workers (``make_dataloader``)
    Loading windows is ~90% of the reader's time (reading, decoding, checking, permuting; assembling
    batches the rest), so workers divide the windows: of the windows this rank's batches touch from the
    cursor on, worker ``w`` of ``nw`` loads the ``w``-th, ``w+nw``-th, ... once each, assembles the
    batches that lie inside it into one shared-memory storage and sends them as one message (a
    ``_WindowPart``); a batch that straddles windows travels as pieces from each, which the main process
    assembles. The DataLoader's round-robin over workers returns the parts in window order, so the
    batches, their content and order are those of a single process for any number of workers. Each
    worker holds one window and may have ``prefetch_windows`` parts ready ahead. Iterating the reader
    itself in a DataLoader worker is refused: every worker would load every window.

Window loads line up across ranks (in-process reading)
    A rank loads a window synchronously (tens to hundreds of ms), and the next collective of the
    training step makes every other rank wait for it; ranks whose windows start at different steps
    would therefore each stall all of them in turn (W ranks: W stalls per window). So every rank loads
    at the same steps, those where rank 0 starts a window (``_window_load_steps``, the same on every
    rank since it depends on metadata.json only), and then loads every window its batches need until
    the next such step: the stalls overlap instead of adding up, at the cost of loading a window up to
    one of rank 0's windows early: a rank holds about one window more than it reads from when windows
    are of similar size, and up to about two of the largest when they differ a lot (measured: 156
    impressions beyond the one read, largest window 89). The batches are unchanged.
    Measured with 2 gloo ranks on 2 cores (``benchmarks/RESULTS.md``, User groups).

Cursor
    ``state_dict()["next_batch"]`` is the index of the next batch this rank yields. Iterating the
    reader in-process, or through ``make_dataloader`` with any number of workers, advances it as
    batches reach the consumer; a training pipeline that prefetches should instead save the number of
    batches it trained and pass it to ``load_state_dict`` on resume. An exhausted epoch yields nothing
    until ``set_epoch`` moves on. One iterator at a time per reader.

Checks
    Always (batches would be wrong without them): files present and readable, column types, row group
    counts and sizes against metadata.json, ``user`` within its block, no user row without
    impressions, no null single-valued id, ids and weights lists of equal lengths. With
    ``validate=True`` also: every id in ``[0, vocab_size)``, labels in {0, 1}, weights (after the
    transform) and float extra columns finite. All vectorised per window; an error names the file, row
    group, row and field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dist_mtl.data import schema
from dist_mtl.data.batch import GroupedBatch
from dist_mtl.data.schema import DatasetError, DatasetMetadata, FieldSpec

WEIGHT_TRANSFORMS = ("log1p", "none")


def transform_weights(weights: np.ndarray, transform: str) -> np.ndarray:
    """Multi-valued features' stored weights as the model reads them (a new array): "log1p" for count
    weights, or "none". The reader and the raw request encoder both apply it, so that a served request
    is weighted as training was."""
    if transform == "log1p":
        return np.log1p(weights)
    if transform == "none":
        return weights.copy()
    raise ValueError(f"weight_transform {transform!r} is not one of {WEIGHT_TRANSFORMS}")


_STATE_CONFIG_KEYS = ("split", "world_size", "batch_size", "seed", "shuffle", "window_blocks")


@dataclass(frozen=True)
class _Block:
    users_path: str  # relative to the dataset root
    impressions_path: str
    row_group: int
    num_users: int
    num_impressions: int
    first_user_row: int  # the split's user rows stored before this block's
    first_impression_row: int  # the split's impressions stored before this block's


@dataclass
class _Jagged:
    """One field of a window's rows, ready to slice per batch; single-valued fields have length 1."""

    values: np.ndarray  # ids as stored (int32); cast to int64 when a batch is packed
    weights: np.ndarray  # float32, aligned with values
    lengths: np.ndarray  # int32 [rows]
    offsets: np.ndarray  # int64 [rows + 1]
    multi_valued: bool


@dataclass
class _Window:
    """A window in stream order: users permuted, impressions grouped by (nondecreasing) user."""

    user_columns: list[_Jagged]  # schema.USER_FIELDS order
    item_columns: list[_Jagged]  # schema.ITEM_FIELDS order
    user_index: np.ndarray  # int64 [impressions], row of the impression's user in user_columns
    labels: dict[str, np.ndarray]
    source: str
    row_offset: int = 0  # window-local row of this object's row 0 (non-zero for a piece cut by ``rows``)

    def rows(self, lo: int, hi: int) -> "_Window":
        """Impressions [lo, hi) (``hi > lo``) and their users as a window of their own: what a DataLoader
        worker sends of a batch that other windows complete."""
        first_user, end_user = int(self.user_index[lo]), int(self.user_index[hi - 1]) + 1
        return _Window(
            user_columns=[_slice_rows(c, first_user, end_user) for c in self.user_columns],
            item_columns=[_slice_rows(c, lo, hi) for c in self.item_columns],
            user_index=self.user_index[lo:hi] - first_user,
            labels={name: values[lo:hi] for name, values in self.labels.items()},
            source=self.source,
            row_offset=self.row_offset + lo,
        )

    @property
    def num_impressions(self) -> int:
        return len(self.user_index)


def _slice_rows(column: _Jagged, lo: int, hi: int) -> _Jagged:
    start, end = int(column.offsets[lo]), int(column.offsets[hi])
    return _Jagged(column.values[start:end], column.weights[start:end], column.lengths[lo:hi],
                   column.offsets[lo:hi + 1] - start, column.multi_valued)


@dataclass
class _WindowPart:
    """One window's share of a rank's batches, as a DataLoader worker sends it (see ``make_dataloader``).

    ``entries`` are in batch order: ``(batch index, GroupedBatch, True)`` for a batch inside the window,
    ``(batch index, _Window piece, last)`` for a batch that straddles windows; its pieces arrive in order
    over consecutive parts, ``last`` on the final one, and the main process assembles them.
    """

    window: int
    entries: list[tuple[int, "GroupedBatch | _Window", bool]]

    def pin_memory(self) -> "_WindowPart":
        """What the DataLoader's pinning thread calls: the whole batches pinned; pieces are pinned once
        the main process has assembled them."""
        return _WindowPart(self.window, [(index, item.pin_memory() if isinstance(item, GroupedBatch) else item, last)
                                         for index, item, last in self.entries])


class _EpochPlan:
    """Which blocks form which window, and where each window starts in the epoch stream."""

    def __init__(self, blocks: Sequence[_Block], seed: int, epoch: int, shuffle: bool, window_blocks: int):
        if shuffle:
            order = np.random.default_rng([seed, epoch, 0]).permutation(len(blocks))
        else:
            order = np.arange(len(blocks))
        self.windows: list[list[int]] = [
            order[i:i + window_blocks].tolist() for i in range(0, len(blocks), window_blocks)
        ]
        sizes = [sum(blocks[b].num_impressions for b in w) for w in self.windows]
        self.window_starts = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=self.window_starts[1:])

    def pieces(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """(window, first, last) window-local impression ranges covering stream positions [start, end)."""
        first = int(np.searchsorted(self.window_starts, start, side="right")) - 1
        out = []
        w = first
        while w < len(self.windows) and self.window_starts[w] < end:
            lo = max(start, int(self.window_starts[w])) - int(self.window_starts[w])
            hi = min(end, int(self.window_starts[w + 1])) - int(self.window_starts[w])
            if hi > lo:
                out.append((w, lo, hi))
            w += 1
        return out


def _balanced_bounds(start: int, size: int, parts: int) -> np.ndarray:
    """``parts + 1`` boundaries cutting [start, start+size) into ranges whose sizes differ by <= 1."""
    return start + (np.arange(parts + 1, dtype=np.int64) * size) // parts


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _segment_gather_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices that concatenate the segments [starts[i], starts[i] + lengths[i]) in order."""
    total = int(lengths.sum())
    out_starts = np.cumsum(lengths) - lengths
    return np.repeat(starts - out_starts, lengths) + np.arange(total, dtype=np.int64)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _same_type(actual: pa.DataType, expected: pa.DataType) -> bool:
    # List item field names and nullability differ between writers ("item" vs "element"); only the
    # value types matter to the reader.
    if pa.types.is_list(actual) and pa.types.is_list(expected):
        return _same_type(actual.value_type, expected.value_type)
    return actual == expected


def _rows_of_positions(offsets: np.ndarray, positions: np.ndarray) -> np.ndarray:
    return np.searchsorted(offsets, positions, side="right") - 1


@dataclass(frozen=True)
class _ReadSpec:
    """What loading a window needs, fixed when the reader is built."""

    root: Path
    blocks: list[_Block]
    row_groups_per_file: dict[str, int]  # relative path -> row groups listed in metadata.json
    user_types: dict[str, pa.DataType]  # users columns read -> expected type
    impression_types: dict[str, pa.DataType]  # impressions columns read -> expected type
    label_columns: tuple[str, ...]
    vocab_sizes: dict[str, int]
    validate: bool
    weight_transform: str
    shuffle: bool
    seed: int


class _WindowLoader:
    """Reads, checks and permutes windows; keeps the Parquet files of one iteration open."""

    def __init__(self, spec: _ReadSpec, plan: _EpochPlan, epoch: int):
        self._spec = spec
        self._plan = plan
        self._epoch = epoch
        self._files: dict[str, pq.ParquetFile] = {}

    def close(self) -> None:
        for pf in self._files.values():
            pf.close()
        self._files.clear()

    # -- files -----------------------------------------------------------------------------------
    def _path(self, rel: str) -> Path:
        return self._spec.root / rel

    def _open(self, rel: str, expected_types: dict[str, pa.DataType], num_row_groups: int) -> pq.ParquetFile:
        pf = self._files.get(rel)
        if pf is not None:
            return pf
        path = self._path(rel)
        try:
            pf = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as e:
            raise DatasetError(f"{path}: cannot open as Parquet (missing, truncated or corrupt): {e}") from e
        try:
            actual = pf.schema_arrow
            for name, expected in expected_types.items():
                index = actual.get_field_index(name)
                if index < 0:
                    raise DatasetError(f"{path}: schema mismatch: column '{name}' is missing")
                if not _same_type(actual.field(index).type, expected):
                    raise DatasetError(
                        f"{path}: schema mismatch: column '{name}' has type {actual.field(index).type}, "
                        f"expected {expected}"
                    )
            if pf.metadata.num_row_groups != num_row_groups:
                raise DatasetError(
                    f"{path}: {pf.metadata.num_row_groups} row groups, metadata.json lists {num_row_groups}"
                )
        except DatasetError:
            pf.close()
            raise
        self._files[rel] = pf
        return pf

    def _read(self, rel: str, row_group: int, expected_rows: int, columns: dict[str, pa.DataType],
              num_row_groups: int) -> pa.Table:
        pf = self._open(rel, columns, num_row_groups)
        path = self._path(rel)
        rows = pf.metadata.row_group(row_group).num_rows
        if rows != expected_rows:
            raise DatasetError(
                f"{path} row group {row_group}: {rows} rows, metadata.json lists {expected_rows}"
            )
        try:
            table = pf.read_row_group(row_group, columns=list(columns))
        except (OSError, pa.ArrowException) as e:
            raise DatasetError(f"{path} row group {row_group}: cannot be read (corrupt file?): {e}") from e
        if table.num_rows != expected_rows:
            raise DatasetError(f"{path} row group {row_group}: read {table.num_rows} rows, expected {expected_rows}")
        return table

    # -- one window ------------------------------------------------------------------------------
    def load(self, window: int) -> _Window:
        spec = self._spec
        blocks = [spec.blocks[b] for b in self._plan.windows[window]]
        user_tables, impression_tables = [], []
        for block in blocks:
            user_tables.append(self._read(block.users_path, block.row_group, block.num_users,
                                          spec.user_types, spec.row_groups_per_file[block.users_path]))
            impression_tables.append(self._read(block.impressions_path, block.row_group, block.num_impressions,
                                                spec.impression_types,
                                                spec.row_groups_per_file[block.impressions_path]))
        user_starts = _offsets(np.array([b.num_users for b in blocks], dtype=np.int64))
        impression_starts = _offsets(np.array([b.num_impressions for b in blocks], dtype=np.int64))

        def where(kind: str, row: int) -> str:
            starts = user_starts if kind == "users" else impression_starts
            b = int(np.searchsorted(starts, row, side="right")) - 1
            rel = blocks[b].users_path if kind == "users" else blocks[b].impressions_path
            return f"{self._path(rel)} row group {blocks[b].row_group} row {row - int(starts[b])}"

        user_of_impression = self._user_of_impression(impression_tables, blocks, user_starts, where)
        num_users = int(user_starts[-1])
        counts = np.bincount(user_of_impression, minlength=num_users)
        if num_users and counts.min() == 0:
            orphan = int(np.flatnonzero(counts == 0)[0])
            raise DatasetError(f"{where('users', orphan)}: user row with no impressions")

        user_unit = _unit_column(num_users)
        item_unit = _unit_column(len(user_of_impression))
        user_columns = [self._field(user_tables, f, "users", where, user_unit) for f in schema.USER_FIELDS]
        item_columns = [self._field(impression_tables, f, "impressions", where, item_unit)
                        for f in schema.ITEM_FIELDS]
        labels = {name: self._made_column(name, user_of_impression, blocks, user_starts)
                  if name in schema.READER_MADE_COLUMNS else self._label(impression_tables, name, where)
                  for name in spec.label_columns}

        user_order = self._user_order(window, num_users)
        impression_order = self._impression_order(user_of_impression, counts, user_order)
        if user_order is not None:
            user_columns = [_gather_rows(c, user_order) for c in user_columns]
            counts = counts[user_order]
        if impression_order is not None:
            item_columns = [_gather_rows(c, impression_order) for c in item_columns]
            labels = {k: v[impression_order] for k, v in labels.items()}
        user_index = np.repeat(np.arange(num_users, dtype=np.int64), counts)
        parts = ", ".join(f"{b.impressions_path} rg {b.row_group}" for b in blocks)
        return _Window(user_columns, item_columns, user_index, labels,
                       source=f"epoch {self._epoch} window {window} [{parts}]")

    @staticmethod
    def _made_column(name: str, user_of_impression: np.ndarray, blocks: list[_Block],
                     user_starts: np.ndarray) -> np.ndarray:
        """A reader-made column of the window's impressions in file order: each impression's user row
        (``user_of_impression`` counts the window's blocks' users in window order) or its own row, both
        positions in the split's storage order."""
        impressions = [b.num_impressions for b in blocks]
        if name == schema.USER_ROW_COLUMN:
            shift = np.array([b.first_user_row for b in blocks], dtype=np.int64) - user_starts[:-1]
            return user_of_impression + np.repeat(shift, impressions)
        # impression_row: the window's impressions are its blocks' rows, block after block.
        shift = np.array([b.first_impression_row for b in blocks], dtype=np.int64) - _offsets(
            np.array(impressions, dtype=np.int64))[:-1]
        return np.arange(len(user_of_impression), dtype=np.int64) + np.repeat(shift, impressions)

    def _user_order(self, window: int, num_users: int) -> np.ndarray | None:
        if not self._spec.shuffle:
            return None
        return np.random.default_rng([self._spec.seed, self._epoch, 1, window]).permutation(num_users)

    @staticmethod
    def _impression_order(user_of_impression: np.ndarray, counts: np.ndarray,
                          user_order: np.ndarray | None) -> np.ndarray | None:
        """Gather index putting impressions in stream order: grouped by permuted user, file order inside."""
        grouped = bool(np.all(user_of_impression[1:] >= user_of_impression[:-1]))
        if user_order is None and grouped:
            return None
        # A stable sort keeps each user's impressions in file order when a block interleaves users.
        by_user = None if grouped else np.argsort(user_of_impression, kind="stable")
        starts = np.cumsum(counts) - counts
        rows = user_order if user_order is not None else np.arange(len(counts))
        order = _segment_gather_index(starts[rows], counts[rows])
        return order if by_user is None else by_user[order]

    def _user_of_impression(self, tables: list[pa.Table], blocks: list[_Block], user_starts: np.ndarray,
                            where: Callable[[str, int], str]) -> np.ndarray:
        local = self._int_column(tables, schema.USER_COLUMN, "impressions", where).astype(np.int64)
        block_users = np.repeat(np.array([b.num_users for b in blocks], dtype=np.int64),
                                [b.num_impressions for b in blocks])
        bad = (local < 0) | (local >= block_users)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DatasetError(
                f"{where('impressions', row)}: field '{schema.USER_COLUMN}' = {int(local[row])} is outside "
                f"the block's {int(block_users[row])} users"
            )
        return local + np.repeat(user_starts[:-1], [b.num_impressions for b in blocks])

    @staticmethod
    def _int_column(tables: list[pa.Table], name: str, kind: str, where: Callable[[str, int], str]) -> np.ndarray:
        arrays = []
        row_base = 0
        for table in tables:
            column = table.column(name)
            if column.null_count:
                row = pc.index(pc.is_null(column), True).as_py()
                raise DatasetError(f"{where(kind, row_base + row)}: field '{name}' is null")
            arrays.append(column.to_numpy())
            row_base += table.num_rows
        return np.concatenate(arrays)

    @staticmethod
    def _list_column(tables: list[pa.Table], name: str, kind: str,
                     where: Callable[[str, int], str]) -> tuple[np.ndarray, np.ndarray]:
        """(lengths, flat values) of a list column; a null list counts as empty."""
        lengths, values = [], []
        row_base = 0
        for table in tables:
            for chunk in table.column(name).chunks:
                flat = chunk.flatten()
                if flat.null_count:
                    offsets = _offsets(pc.list_value_length(chunk).fill_null(0).to_numpy())
                    position = pc.index(pc.is_null(flat), True).as_py()
                    row = int(_rows_of_positions(offsets, np.array([position]))[0])
                    raise DatasetError(f"{where(kind, row_base + row)}: field '{name}' holds a null element")
                if chunk.null_count:
                    lengths.append(pc.list_value_length(chunk).fill_null(0).to_numpy())
                else:
                    lengths.append(np.diff(chunk.offsets.to_numpy()))
                values.append(flat.to_numpy())
                row_base += len(chunk)
        return np.concatenate(lengths).astype(np.int32), np.concatenate(values)

    def _field(self, tables: list[pa.Table], feature: FieldSpec, kind: str, where: Callable[[str, int], str],
               unit: _Jagged) -> _Jagged:
        """``unit`` carries the shared lengths, offsets and weights of single-valued columns."""
        if not feature.multi_valued:
            values = self._int_column(tables, feature.name, kind, where)
            if self._spec.validate:
                self._check_ids(feature.name, values, unit.offsets, kind, where)
            return _Jagged(values, unit.weights, unit.lengths, unit.offsets, False)
        lengths, values = self._list_column(tables, feature.name, kind, where)
        weight_lengths, weights = self._list_column(tables, feature.weight_column, kind, where)
        if not np.array_equal(lengths, weight_lengths):
            row = int(np.flatnonzero(lengths != weight_lengths)[0])
            raise DatasetError(
                f"{where(kind, row)}: field '{feature.name}' has {int(lengths[row])} ids but "
                f"'{feature.weight_column}' has {int(weight_lengths[row])} weights"
            )
        offsets = _offsets(lengths)
        weights = weights.astype(np.float32, copy=False)
        transformed = transform_weights(weights, self._spec.weight_transform)
        if self._spec.validate:
            self._check_ids(feature.name, values, offsets, kind, where)
            finite = np.isfinite(transformed)
            if not finite.all():
                position = int(np.flatnonzero(~finite)[0])
                row = int(_rows_of_positions(offsets, np.array([position]))[0])
                raise DatasetError(
                    f"{where(kind, row)}: field '{feature.weight_column}' weight {float(weights[position])} "
                    f"is not finite after the '{self._spec.weight_transform}' transform"
                )
        return _Jagged(values, transformed, lengths, offsets, True)

    def _check_ids(self, name: str, values: np.ndarray, offsets: np.ndarray, kind: str,
                   where: Callable[[str, int], str]) -> None:
        if not len(values):
            return
        vocab = self._spec.vocab_sizes[name]
        if int(values.min()) >= 0 and int(values.max()) < vocab:
            return
        position = int(np.flatnonzero((values < 0) | (values >= vocab))[0])
        row = int(_rows_of_positions(offsets, np.array([position]))[0])
        raise DatasetError(
            f"{where(kind, row)}: field '{name}' id {int(values[position])} is outside its vocabulary "
            f"[0, {vocab})"
        )

    def _label(self, tables: list[pa.Table], name: str, where: Callable[[str, int], str]) -> np.ndarray:
        column_type = self._spec.impression_types[name]
        if name == schema.SAMPLE_ID_COLUMN:
            return self._int_column(tables, name, "impressions", where)
        values = self._int_column(tables, name, "impressions", where)
        if self._spec.validate:
            if name in schema.LABEL_COLUMNS:
                bad = (values != 0) & (values != 1)
                what = "is not 0 or 1"
            elif pa.types.is_floating(column_type):
                bad = ~np.isfinite(values)
                what = "is not finite"
            else:
                bad = np.zeros(len(values), dtype=bool)
                what = ""
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise DatasetError(f"{where('impressions', row)}: label '{name}' value {values[row]} {what}")
        return values


def _unit_column(rows: int) -> _Jagged:
    return _Jagged(np.empty(0, dtype=np.int64), np.ones(rows, dtype=np.float32), np.ones(rows, dtype=np.int32),
                   np.arange(rows + 1, dtype=np.int64), False)


def _gather_rows(column: _Jagged, rows: np.ndarray) -> _Jagged:
    """The column's rows in the order ``rows`` (a permutation of all rows)."""
    if not column.multi_valued:
        # One id per row: lengths, offsets and unit weights are the same after any permutation.
        return _Jagged(column.values[rows], column.weights, column.lengths, column.offsets, False)
    lengths = column.lengths[rows]
    index = _segment_gather_index(column.offsets[rows], lengths.astype(np.int64))
    return _Jagged(column.values[index], column.weights[index], lengths, _offsets(lengths), True)


_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32,
                 np.dtype(np.float32): torch.float32}
_VALUES_DTYPE, _WEIGHTS_DTYPE, _LENGTHS_DTYPE = np.dtype(np.int64), np.dtype(np.float32), np.dtype(np.int32)


def _pack(groups: Sequence[tuple[np.dtype, Sequence[np.ndarray]]], shared: bool = False) -> list[torch.Tensor]:
    """Concatenate (and cast) each group of arrays into one tensor of the group's dtype.

    All tensors are views of a single storage: a DataLoader worker then sends them through one
    shared-memory segment instead of one per tensor, which costs about 1 ms each on the 2-core test
    machine and dominated the worker path. ``shared``: allocate that storage in shared memory at once;
    otherwise sending it copies it there (tens of ms for a window's batches).
    """
    starts, total = [], 0
    for dtype, parts in groups:
        total = _ceil_div(total, 8) * 8  # every dtype view must start aligned
        starts.append(total)
        total += sum(len(p) for p in parts) * dtype.itemsize
    if shared:
        # What Tensor.share_memory_() allocates, without its copy (torch has no public allocator for it).
        storage = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(total, 1)))
    else:
        storage = torch.empty(max(total, 1), dtype=torch.uint8)
    flat = storage.numpy()
    tensors = []
    for (dtype, parts), start in zip(groups, starts):
        end = start + sum(len(p) for p in parts) * dtype.itemsize
        np.concatenate(parts, out=flat[start:end].view(dtype), casting="same_kind")
        tensors.append(storage[start:end].view(_TORCH_DTYPES[dtype]))
    return tensors


def _jagged_parts(num_keys: int, pieces: list[tuple[list[_Jagged], int, int]]) -> list[tuple[np.dtype, list]]:
    """(values, weights, lengths) groups of a KJT over row ranges [first, last) of several windows."""
    values, weights, lengths = [], [], []
    for field_index in range(num_keys):
        for columns, first, last in pieces:
            column = columns[field_index]
            lo, hi = int(column.offsets[first]), int(column.offsets[last])
            values.append(column.values[lo:hi])
            weights.append(column.weights[lo:hi])
            lengths.append(column.lengths[first:last])
    return [(_VALUES_DTYPE, values), (_WEIGHTS_DTYPE, weights), (_LENGTHS_DTYPE, lengths)]


def _field_columns(fields: Sequence[FieldSpec]) -> list[str]:
    columns = []
    for f in fields:
        columns.append(f.name)
        if f.multi_valued:
            columns.append(f.weight_column)
    return columns


class ParquetGroupReader(IterableDataset):
    """Yields this rank's ``GroupedBatch``es of one split, exactly once per epoch (see module docstring).

    ``extra_columns`` are impression columns listed in metadata.json's ``extra_columns`` (float32 in
    ``batch.labels``), ``"sample_id"`` (int64, exact) for prediction output and coverage checks, or
    ``"user_row"`` (int64; ``schema.USER_ROW_COLUMN``), made by the reader, for per-user metrics, or
    ``"impression_row"`` (int64; ``schema.IMPRESSION_ROW_COLUMN``), made by the reader, the impression's
    position in the split's storage order, for scores written by several ranks.
    ``weight_transform`` applies to multi-valued weights: "log1p" (count weights) or "none".
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        window_blocks: int = 4,
        extra_columns: Sequence[str] = (),
        weight_transform: str = "log1p",
        validate: bool = True,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if window_blocks < 1:
            raise ValueError(f"window_blocks must be >= 1, got {window_blocks}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if weight_transform not in WEIGHT_TRANSFORMS:
            raise ValueError(f"weight_transform {weight_transform!r} is not one of {WEIGHT_TRANSFORMS}")
        self.root = Path(root)
        self.metadata: DatasetMetadata = DatasetMetadata.load(self.root)
        self.split = split
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.window_blocks = window_blocks
        self.weight_transform = weight_transform
        self.validate = validate
        self.label_columns = tuple(schema.LABEL_COLUMNS) + tuple(self._checked_extra_columns(extra_columns))
        # sample_id and user_row stay exact (int64); labels and extra columns become float32.
        self._label_dtypes = {
            name: np.dtype(np.int64) if name in schema.ID_LABEL_COLUMNS else np.dtype(np.float32)
            for name in self.label_columns
        }

        info = self.metadata.split(split)
        table = info.block_table()
        first_user_rows = np.cumsum([0] + [users for _, _, users, _ in table[:-1]]).tolist()
        first_impression_rows = np.cumsum([0] + [impressions for _, _, _, impressions in table[:-1]]).tolist()
        self._blocks = [
            _Block(info.parts[p].users, info.parts[p].impressions, rg, users, impressions, first_user, first_row)
            for (p, rg, users, impressions), first_user, first_row
            in zip(table, first_user_rows, first_impression_rows)
        ]
        row_groups_per_file: dict[str, int] = {}
        for part in info.parts:
            for rel in (part.users, part.impressions):
                if not (self.root / rel).is_file():
                    raise DatasetError(f"{self.root / rel}: no such file (listed in metadata.json for split '{split}')")
                row_groups_per_file[rel] = len(part.blocks)
        users_types = schema.users_schema()
        impressions_types = schema.impressions_schema(self.metadata.extra_columns)
        stored_labels = [c for c in self.label_columns if c not in schema.READER_MADE_COLUMNS]
        impression_columns = [schema.USER_COLUMN, *_field_columns(schema.ITEM_FIELDS), *stored_labels]
        self._spec = _ReadSpec(
            root=self.root,
            blocks=self._blocks,
            row_groups_per_file=row_groups_per_file,
            user_types={n: users_types.field(n).type for n in _field_columns(schema.USER_FIELDS)},
            impression_types={n: impressions_types.field(n).type for n in impression_columns},
            label_columns=self.label_columns,
            vocab_sizes=dict(self.metadata.vocab_sizes),
            validate=validate,
            weight_transform=weight_transform,
            shuffle=shuffle,
            seed=seed,
        )

        self.num_impressions = sum(b.num_impressions for b in self._blocks)
        self._steps = self._check_sizes()
        self._rank_bounds = _balanced_bounds(0, self.num_impressions, world_size)
        rank_start = int(self._rank_bounds[rank])
        rank_size = int(self._rank_bounds[rank + 1]) - rank_start
        self._batch_bounds = _balanced_bounds(rank_start, rank_size, self._steps)
        self._epoch = 0
        self._next_batch = 0
        self._plan_cache: tuple[int, _EpochPlan] | None = None

    def _checked_extra_columns(self, extra_columns: Sequence[str]) -> list[str]:
        available = self.metadata.extra_columns
        out = []
        for name in extra_columns:
            if name in out or name in schema.LABEL_COLUMNS:
                raise ValueError(f"extra column '{name}' is requested twice (click and buy are always read)")
            if name in schema.ID_LABEL_COLUMNS:
                out.append(name)
                continue
            if name not in available:
                raise DatasetError(
                    f"extra column '{name}' is not in the dataset at {self.root} (it has {sorted(available)} "
                    f"and {list(schema.ID_LABEL_COLUMNS)})"
                )
            arrow_type = pa.type_for_alias(available[name])
            if not (pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)
                    or pa.types.is_boolean(arrow_type)):
                raise DatasetError(f"extra column '{name}' has type {arrow_type}; labels must be numeric")
            out.append(name)
        return out

    def _check_sizes(self) -> int:
        n, world = self.num_impressions, self.world_size
        if n < world:
            raise DatasetError(
                f"split '{self.split}' has {n} impressions, fewer than world_size {world}: some rank would "
                f"get no data"
            )
        steps = _ceil_div(_ceil_div(n, world), self.batch_size)
        if n // world < steps:
            # Only batch_size 1 with N not divisible by world_size gets here (see module docstring).
            raise DatasetError(
                f"split '{self.split}': {n} impressions over {world} ranks at batch_size {self.batch_size} "
                f"would give a rank an empty batch; use batch_size >= 2"
            )
        return steps

    # -- plan and cursor -------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return self._steps

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch = epoch
        self._next_batch = 0

    def state_dict(self) -> dict:
        return {
            "epoch": self._epoch,
            "next_batch": self._next_batch,
            "split": self.split,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "window_blocks": self.window_blocks,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state["next_batch"]`` of ``state["epoch"]``. The other keys of ``state_dict`` are
        optional; when present they must match this reader for a mid-epoch position, because the batch
        index only names the same impressions under the same split, world size, batch size and shuffle."""
        try:
            epoch, next_batch = int(state["epoch"]), int(state["next_batch"])
        except KeyError as e:
            raise ValueError(f"reader state lacks {e}; it needs 'epoch' and 'next_batch'") from e
        if epoch < 0 or not 0 <= next_batch <= self._steps:
            raise ValueError(
                f"reader state epoch {epoch}, next_batch {next_batch} is outside [0, {self._steps}] steps"
            )
        if next_batch:
            changed = self.settings_changed(state)
            if changed:
                raise ValueError(
                    "reader state was saved mid-epoch with different "
                    + ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in changed.items())
                    + "; such a position cannot be resumed exactly: resume from an epoch boundary"
                )
        self._epoch, self._next_batch = epoch, next_batch

    def settings_changed(self, state: dict) -> dict[str, tuple]:
        """``{key: (saved, now)}`` for the settings of ``state_dict`` (split, world size, batch size, seed,
        shuffle, window) that ``state`` holds and that differ from this reader's: where any does, a
        mid-epoch batch index of ``state`` names other impressions here."""
        mine = self.state_dict()
        return {k: (state[k], mine[k]) for k in _STATE_CONFIG_KEYS if k in state and state[k] != mine[k]}

    def _advance_cursor(self) -> None:
        self._next_batch += 1

    def _plan(self, epoch: int) -> _EpochPlan:
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            self._plan_cache = (epoch, _EpochPlan(self._blocks, self.seed, epoch, self.shuffle, self.window_blocks))
        return self._plan_cache[1]

    def stats(self) -> dict:
        """Plan figures for this epoch; ``dropped`` and ``padded`` are counted from every rank's batches."""
        rank_sizes = np.diff(self._rank_bounds)
        batch_sizes = np.diff(self._batch_bounds)
        all_batches = sum(
            int(np.diff(_balanced_bounds(int(self._rank_bounds[r]), int(rank_sizes[r]), self._steps)).sum())
            for r in range(self.world_size)
        )
        return {
            "split": self.split,
            "epoch": self._epoch,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_impressions": self.num_impressions,
            "num_blocks": len(self._blocks),
            "num_windows": len(self._plan(self._epoch).windows),
            "steps_per_epoch": self._steps,
            "impressions_per_rank": rank_sizes.tolist(),
            "rank_impressions": int(rank_sizes[self.rank]),
            "batch_impressions_min": int(batch_sizes.min()),
            "batch_impressions_max": int(batch_sizes.max()),
            "dropped": self.num_impressions - int(rank_sizes.sum()),
            "padded": all_batches - self.num_impressions,
        }

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[GroupedBatch]:
        if get_worker_info() is not None:
            # A DataLoader over the reader would have every worker load every window (and yield only
            # its share of the batches); make_dataloader gives each worker its own windows instead.
            raise RuntimeError(
                "ParquetGroupReader is iterated in a DataLoader worker: use "
                "dist_mtl.data.reader.make_dataloader(reader, num_workers=N) for worker processes"
            )
        epoch, first = self._epoch, self._next_batch
        plan = self._plan(epoch)
        loader = _WindowLoader(self._spec, plan, epoch)
        load_steps = self._window_load_steps(plan)
        windows: dict[int, _Window] = {}
        next_load = 0  # index into load_steps of the next shared load step ahead of this batch
        try:
            for batch_index in range(first, self._steps):
                pieces = plan.pieces(int(self._batch_bounds[batch_index]), int(self._batch_bounds[batch_index + 1]))
                for stale in [w for w in windows if w < pieces[0][0]]:
                    del windows[stale]
                needed = pieces
                if load_steps[next_load] <= batch_index:
                    while load_steps[next_load] <= batch_index:
                        next_load += 1
                    # A shared load step (or the first batch): what this rank needs until the next one.
                    needed = plan.pieces(int(self._batch_bounds[batch_index]),
                                         int(self._batch_bounds[load_steps[next_load]]))
                for w, _, _ in needed:
                    if w not in windows:
                        windows[w] = loader.load(w)
                batch = self._assemble(batch_index, [(windows[w], lo, hi) for w, lo, hi in pieces])
                self._next_batch = batch_index + 1
                yield batch
        finally:
            loader.close()

    def _window_parts(self, worker_id: int, num_workers: int) -> Iterator[_WindowPart]:
        """This rank's batches from the cursor on, one ``_WindowPart`` per window they touch, of the
        windows ``worker_id``, ``worker_id + num_workers``, ... of that list: each window is loaded by one
        worker only, and the DataLoader's round-robin over workers hands the parts over in window order."""
        epoch, first = self._epoch, self._next_batch
        if first >= self._steps:
            return
        plan = self._plan(epoch)
        first_window = int(np.searchsorted(plan.window_starts, self._batch_bounds[first], side="right")) - 1
        last_window = int(np.searchsorted(plan.window_starts, self._batch_bounds[-1] - 1, side="right")) - 1
        loader = _WindowLoader(self._spec, plan, epoch)
        try:
            for w in range(first_window + worker_id, last_window + 1, num_workers):
                # Built in a call of its own, so that neither the window nor the part outlives the yield:
                # a worker holds one window while it loads the next, not two.
                yield self._window_part(loader, plan, w, first)
        finally:
            loader.close()

    def _window_part(self, loader: _WindowLoader, plan: _EpochPlan, w: int, first: int) -> _WindowPart:
        lo_w, hi_w = int(plan.window_starts[w]), int(plan.window_starts[w + 1])
        bounds = self._batch_bounds
        # The batches from the cursor on whose impressions overlap [lo_w, hi_w).
        k_first = max(first, int(np.searchsorted(bounds, lo_w, side="right")) - 1)
        k_end = min(int(np.searchsorted(bounds, hi_w, side="left")), self._steps)
        if k_end <= k_first:
            return _WindowPart(w, [])
        window = loader.load(w)
        entries: list[tuple[int, GroupedBatch | _Window | None, bool]] = []
        inside = []
        for k in range(k_first, k_end):
            b_lo, b_hi = int(bounds[k]), int(bounds[k + 1])
            lo, hi = max(b_lo, lo_w) - lo_w, min(b_hi, hi_w) - lo_w
            if lo_w <= b_lo and b_hi <= hi_w:
                inside.append((k, [(window, lo, hi)]))
                entries.append((k, None, True))  # filled below, all in one storage
            else:
                entries.append((k, window.rows(lo, hi), b_hi <= hi_w))
        assembled = iter(self._assemble_many(inside, shared=get_worker_info() is not None))
        return _WindowPart(w, [(k, next(assembled) if item is None else item, last) for k, item, last in entries])

    def _window_load_steps(self, plan: _EpochPlan) -> list[int]:
        """The steps at which rank 0 starts a window (0 included), then ``steps`` as a sentinel."""
        rank0 = _balanced_bounds(0, int(self._rank_bounds[1]), self._steps)
        # The window holding the last impression of each of rank 0's batches.
        last_window = np.searchsorted(plan.window_starts, rank0[1:] - 1, side="right") - 1
        starts = np.flatnonzero(np.diff(last_window)) + 1
        return [0, *starts.tolist(), self._steps]

    def _assemble(self, batch_index: int, pieces: list[tuple[_Window, int, int]]) -> GroupedBatch:
        return self._assemble_many([(batch_index, pieces)])[0]

    def _assemble_many(self, batches: list[tuple[int, list[tuple[_Window, int, int]]]],
                       shared: bool = False) -> list[GroupedBatch]:
        """``(batch index, window pieces)`` -> batches whose tensors are all views of one storage, in
        shared memory if ``shared`` (see ``_pack``).

        One storage is what crosses processes as one shared-memory segment: a worker sends a window's
        batches for the cost of one segment instead of one per batch (~1 ms each on the 2-core machine).
        """
        groups: list[tuple[np.dtype, Sequence[np.ndarray]]] = []
        for _, pieces in batches:
            user_pieces, item_pieces, user_index = [], [], []
            users_so_far = 0
            for window, lo, hi in pieces:
                first_user = int(window.user_index[lo])
                end_user = int(window.user_index[hi - 1]) + 1
                user_pieces.append((window.user_columns, first_user, end_user))
                item_pieces.append((window.item_columns, lo, hi))
                user_index.append(window.user_index[lo:hi] - (first_user - users_so_far))
                users_so_far += end_user - first_user
            groups += (_jagged_parts(len(schema.USER_KEYS), user_pieces)
                       + _jagged_parts(len(schema.ITEM_KEYS), item_pieces))
            groups.append((_VALUES_DTYPE, user_index))
            groups += [(self._label_dtypes[name], [w.labels[name][lo:hi] for w, lo, hi in pieces])
                       for name in self.label_columns]
        tensors = _pack(groups, shared)
        per_batch = len(groups) // max(len(batches), 1)
        out = []
        for i, (batch_index, pieces) in enumerate(batches):
            user_values, user_weights, user_lengths, item_values, item_weights, item_lengths, index, *labels = (
                tensors[i * per_batch:(i + 1) * per_batch])
            source = "; ".join(f"{w.source} rows {lo + w.row_offset}-{hi + w.row_offset}" for w, lo, hi in pieces)
            out.append(GroupedBatch(
                user_features=KeyedJaggedTensor(keys=schema.USER_KEYS, values=user_values, weights=user_weights,
                                                lengths=user_lengths),
                item_features=KeyedJaggedTensor(keys=schema.ITEM_KEYS, values=item_values, weights=item_weights,
                                                lengths=item_lengths),
                user_index=index,
                labels=dict(zip(self.label_columns, labels)),
                dense=None,
                source=f"{self.root}/{self.split} rank {self.rank} batch {batch_index}: {source}",
            ))
        return out


class _WindowParts(IterableDataset):
    """What DataLoader workers run: the reader's batches as ``_WindowPart``s, one window per worker in turn."""

    def __init__(self, reader: ParquetGroupReader):
        super().__init__()
        self.reader = reader

    def __iter__(self) -> Iterator[_WindowPart]:
        worker = get_worker_info()
        worker_id, num_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        return self.reader._window_parts(worker_id, num_workers)


class _WindowPartLoader(DataLoader):
    """Worker processes load disjoint windows; the main process yields their batches in order, assembles
    the batches that straddle windows, and advances the reader's cursor as batches reach the consumer."""

    def __init__(self, reader: ParquetGroupReader, num_workers: int, pin_memory: bool, prefetch_windows: int):
        super().__init__(_WindowParts(reader), batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=False, prefetch_factor=prefetch_windows)
        self.reader = reader

    def __iter__(self) -> Iterator[GroupedBatch]:
        # The DataLoader pins only where there is a device to pin for; the straddling batches follow it.
        return self._batches(super().__iter__(), pin=self.pin_memory and torch.cuda.is_available())

    def _batches(self, parts: Iterator[_WindowPart], pin: bool) -> Iterator[GroupedBatch]:
        pieces: list[_Window] = []
        for part in parts:
            for index, item, last in part.entries:
                if isinstance(item, GroupedBatch):
                    batch = item
                else:
                    pieces.append(item)
                    if not last:
                        continue
                    batch = self.reader._assemble(index, [(p, 0, p.num_impressions) for p in pieces])
                    pieces = []
                    if pin:
                        batch = batch.pin_memory()
                self.reader._advance_cursor()
                yield batch


def make_dataloader(
    reader: ParquetGroupReader, num_workers: int = 0, pin_memory: bool = False, prefetch_windows: int = 1
) -> Iterable[GroupedBatch]:
    """The reader's batches, in the same order for any ``num_workers`` (see the module docstring).

    With ``num_workers = 0`` the reader runs in this process (a plain DataLoader over it, which pins
    batches when asked). With workers, each worker loads its own share of the windows, one window at a
    time, and sends that window's batches in one message; ``prefetch_windows`` is how many such parts
    each worker may have ready ahead of the consumer (the host memory of about one window's batches
    each). Windows are where the reader's time goes (reading, decoding, checking, permuting: ~90% of it),
    so workers divide it; a DataLoader over the reader itself would have every worker load every window.
    """
    if num_workers == 0:
        return DataLoader(reader, batch_size=None, num_workers=0, pin_memory=pin_memory)
    if prefetch_windows < 1:
        raise ValueError(f"prefetch_windows must be >= 1, got {prefetch_windows}")
    return _WindowPartLoader(reader, num_workers, pin_memory, prefetch_windows)


@dataclass(frozen=True)
class FeatureLoad:
    """What a batch feeds one feature's table, on average: rows (bags) and ids per row."""

    rows_per_batch: int
    ids_per_row: float


#: Row groups sampled per file kind by ``feature_loads`` (spread over the split's parts).
_LOAD_SAMPLE_ROW_GROUPS = 4


def feature_loads(root: str | os.PathLike, split: str, batch_size: int, grouped: bool = True,
                  meta: DatasetMetadata | None = None) -> dict[str, FeatureLoad]:
    """Each feature's expected input per batch of ``batch_size`` impressions, for the sharding planner.

    TorchRec's planner prices a table's lookups and all-to-all by its batch size and pooling factor, and
    assumes the job's batch size and one id per row unless told: here a grouped batch holds ~75 user rows
    per 4096 impressions, and a history list ~40-240 ids per row, so the planner would balance ranks by
    everything but the work. Users per batch follow metadata.json's impressions per user (plus the user
    cut at the batch's end); ids per row of the multi-valued fields are measured on up to
    ``_LOAD_SAMPLE_ROW_GROUPS`` row groups of each file kind (the first row group of evenly spread
    parts; only the list columns are read). With
    ``grouped=False`` the user side is copied onto impressions, so its rows are the batch's. ``meta``:
    the dataset's metadata where the caller has loaded it already (else read from ``root``).
    """
    meta = DatasetMetadata.load(root) if meta is None else meta
    info = meta.split(split)
    if info.num_impressions < 1 or not info.parts:
        raise DatasetError(f"{root}: split '{split}' holds no impressions")
    users = min(batch_size, int(np.ceil(batch_size * info.num_users / info.num_impressions)) + 1)
    rows = {"user": users if grouped else batch_size, "item": batch_size}
    picks = np.unique(np.linspace(0, len(info.parts) - 1, _LOAD_SAMPLE_ROW_GROUPS).round().astype(int))
    ids_per_row = {f.name: 1.0 for f in schema.ALI_CCP_FIELDS if not f.multi_valued}
    for kind, fields in (("users", schema.USER_FIELDS), ("impressions", schema.ITEM_FIELDS)):
        multi = [f.name for f in fields if f.multi_valued]
        values, lists = dict.fromkeys(multi, 0), 0
        for p in picks:
            path = Path(root) / getattr(info.parts[p], kind)
            table = pq.ParquetFile(path).read_row_group(0, columns=multi)
            lists += table.num_rows
            for name in multi:
                values[name] += pc.sum(pc.list_value_length(table.column(name))).as_py() or 0
        for name in multi:
            # A pooling factor of 0 (a list empty in every sampled row) would divide by zero in the
            # planner's estimates; a small positive one prices the table as the near-idle one it is.
            ids_per_row[name] = max(values[name] / max(lists, 1), 1e-3)
    return {f.name: FeatureLoad(rows[f.side], ids_per_row[f.name]) for f in schema.ALI_CCP_FIELDS}
