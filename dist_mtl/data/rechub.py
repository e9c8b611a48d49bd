"""torch-rechub's preprocessed Ali-CCP CSV -> the dist_mtl Parquet dataset (layout in schema.py).

The layout (ALI_CCP.md): a header, then per row ``click, purchase``, the 23 label-encoded sparse
columns (named by field id) and 8 MinMax-scaled dense columns ``D<field>`` that carry the weight of the
4 history and 4 combination fields. Mapping into the dataset schema:

* every row is its own user group: the layout keeps no user key, so impressions of one user cannot be
  regrouped. The user row's ``common_feature_index`` is ``<file name>:<line>``;
* ids are shifted by +1 so that 0 stays the reserved index; ``vocab_sizes[field]`` is the largest
  label-encoded id over all given splits (well-formed rows, dropped ones included) plus 2;
* history and combination fields become 1-element lists weighted by their D-column
  (``D109_14`` -> ``109_14``, ``D508`` -> ``508``, ...); the other fields are single-valued;
* ``purchase`` becomes ``buy``; rows with click=0 and purchase=1 are dropped and counted;
* ``sample_id`` is the row's 0-based position among the data rows of its file.

Files are streamed in blocks of lines (hashing as they are read) and parsed by pyarrow's CSV reader;
a block that does not parse is searched line by line to name the bad line and column, which then
raises :class:`RawFormatError` or, with ``skip_bad_rows``, is skipped and counted per reason.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dist_mtl.data.raw import (  # skip-reason names shared with the raw Tianchi reader
    BAD_LABEL,
    BAD_LINE,
    DEFAULT_BLOCK_BYTES,
    WRONG_COLUMN_COUNT,
    LineBlocks,
    RawFormatError,
    Rejected,
    csv_value,
    line_bounds,
    read_typed_csv,
    rejected_lines,
    split_line_ending,
    without_lines,
)
from dist_mtl.data.schema import (
    ALI_CCP_FIELDS,
    ITEM_FIELDS,
    USER_COLUMN,
    USER_FIELDS,
    USER_KEY_COLUMN,
    DatasetMetadata,
    DatasetWriter,
    SplitWriter,
)

__all__ = ["RECHUB_COLUMNS", "import_rechub_csv"]

LABEL_COLUMNS = ("click", "purchase")
SPARSE_COLUMNS = tuple(f.name for f in ALI_CCP_FIELDS)
DENSE_COLUMNS = tuple("D" + f.name for f in ALI_CCP_FIELDS if f.multi_valued)
RECHUB_COLUMNS = LABEL_COLUMNS + SPARSE_COLUMNS + DENSE_COLUMNS

CLICK0_BUY1 = "click0_buy1"
BAD_ID = "bad_id"
BAD_WEIGHT = "bad_weight"

_TYPES = {
    **{c: pa.int8() for c in LABEL_COLUMNS},
    **{c: pa.int64() for c in SPARSE_COLUMNS},
    **{c: pa.float32() for c in DENSE_COLUMNS},
}
_MAX_EXAMPLES = 20
_MAX_ID = 2**31 - 2

NOTE = (
    "Imported from torch-rechub's preprocessed CSV: one id per field (the multi-valued history is lost "
    "upstream), each row its own user group (no user key in the layout; common_feature_index is "
    "'<file>:<line>'), ids shifted by +1, history/combination fields as 1-element lists weighted by their "
    "D-column, purchase -> buy, sample_id = 0-based data row of the file."
)


class _Header:
    """The column order of one file, checked against the expected columns."""

    def __init__(self, line: bytes, path: Path):
        names = line.rstrip(b"\r\n").decode(errors="replace").split(",")
        seen = set()
        for name in names:
            if name not in _TYPES:
                raise RawFormatError(path, 1, name, f"unexpected column (expected {', '.join(RECHUB_COLUMNS)})")
            if name in seen:
                raise RawFormatError(path, 1, name, "column appears twice in the header")
            seen.add(name)
        missing = [c for c in RECHUB_COLUMNS if c not in seen]
        if missing:
            raise RawFormatError(path, 1, missing[0], f"column missing from the header (missing: {', '.join(missing)})")
        self.names = tuple(names)
        self.types = tuple(_TYPES[n] for n in names)


def _parse_fast(data: bytes, header: _Header) -> pa.Table:
    table = read_typed_csv(data, header.names, header.types)
    lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    if table.num_rows != lines:
        raise Rejected(f"{table.num_rows} CSV rows in {lines} lines")
    for name in LABEL_COLUMNS:
        if (table.column(name).to_numpy() & ~np.int8(1)).any():
            raise Rejected(f"{name} outside {{0, 1}}")
    for name in SPARSE_COLUMNS:
        low_high = pc.min_max(table.column(name)).as_py()
        if table.num_rows and (low_high["min"] < 0 or low_high["max"] > _MAX_ID):
            raise Rejected(f"id outside [0, {_MAX_ID}] in {name}")
    for name in DENSE_COLUMNS:
        if not np.isfinite(table.column(name).to_numpy()).all():
            raise Rejected(f"non-finite weight in {name}")
    return table


def _accepted(data: bytes, header: _Header) -> bool:
    try:
        _parse_fast(data, header)
    except Rejected:
        return False
    return True


def _diagnose(line: bytes, header: _Header) -> tuple[str, str, str]:
    """(column, reason, detail) for a line the fast path rejected."""
    line, problem = split_line_ending(line)
    if problem:
        return problem
    values = line.split(b",")
    if len(values) != len(header.names):
        return "line", WRONG_COLUMN_COUNT, f"has {len(values)} comma-separated columns, expected {len(header.names)}"
    for name, type_, value in zip(header.names, header.types, values):
        reason = BAD_LABEL if name in LABEL_COLUMNS else BAD_ID if name in SPARSE_COLUMNS else BAD_WEIGHT
        try:
            parsed = csv_value(value, type_)
        except ValueError:
            return name, reason, f"{value[:80]!r} is not {'an integer' if reason != BAD_WEIGHT else 'a number'}"
        if reason == BAD_LABEL and parsed not in (0, 1):
            return name, reason, f"label {parsed} is not 0 or 1"
        if reason == BAD_ID and not 0 <= parsed <= _MAX_ID:
            return name, reason, f"id {parsed} is outside [0, {_MAX_ID}] (shifted by +1 it must fit int32)"
        if reason == BAD_WEIGHT and not np.isfinite(parsed):
            return name, reason, f"weight {value[:80]!r} is not finite"
    return "line", BAD_LINE, "rejected by the CSV reader"


class _SplitImporter:
    """Streams one file into one split of the dataset."""

    def __init__(self, path: Path, writer: SplitWriter, skip_bad_rows: bool, block_impressions: int):
        self.path = path
        self.writer = writer
        self.skip_bad_rows = skip_bad_rows
        self.block_impressions = block_impressions
        self.skipped: Counter = Counter()
        self.examples: list[str] = []
        self.max_ids = {name: -1 for name in SPARSE_COLUMNS}

    def run(self, block_bytes: int) -> LineBlocks:
        blocks = LineBlocks(self.path, block_bytes, "torch-rechub CSV")
        header = None
        for data, first_line in blocks:
            if header is None:
                end = data.find(b"\n") + 1 or len(data)
                header = _Header(data[:end], self.path)
                data, first_line = data[end:], first_line + 1
            if data:
                table, lines = self._parse(data, first_line, header)
                self._write(table, lines)
        if header is None:
            raise RawFormatError(self.path, 1, "header", "file is empty")
        return blocks

    def _parse(self, data: bytes, first_line: int, header: _Header) -> tuple[pa.Table, np.ndarray]:
        try:
            table = _parse_fast(data, header)
            return table, np.arange(first_line, first_line + table.num_rows, dtype=np.int64)
        except Rejected:
            pass
        bounds = line_bounds(data)
        bad = rejected_lines(data, bounds, lambda part: _accepted(part, header), first_only=not self.skip_bad_rows)
        if not bad:
            raise RawFormatError(self.path, first_line, "block", "lines are rejected together but no line alone")
        for i in bad:
            column, reason, detail = _diagnose(data[bounds[i] : bounds[i + 1]].rstrip(b"\n"), header)
            if not self.skip_bad_rows:
                raise RawFormatError(self.path, first_line + i, column, detail)
            self.skipped[reason] += 1
            if len(self.examples) < _MAX_EXAMPLES:
                self.examples.append(f"{self.path}, line {first_line + i}, field '{column}': {detail}")
        keep = np.ones(len(bounds) - 1, bool)
        keep[bad] = False
        good = without_lines(data, bounds, bad)
        if not good:
            return pa.table({n: pa.array([], t) for n, t in zip(header.names, header.types)}), np.zeros(0, np.int64)
        try:
            table = _parse_fast(good, header)
        except Rejected as e:
            detail = f"lines left after skipping bad ones are rejected: {e}"
            raise RawFormatError(self.path, first_line, "block", detail) from None
        return table, np.flatnonzero(keep).astype(np.int64) + first_line

    def _write(self, table: pa.Table, lines: np.ndarray) -> None:
        if table.num_rows == 0:
            return
        for name in SPARSE_COLUMNS:
            self.max_ids[name] = max(self.max_ids[name], int(pc.max(table.column(name)).as_py()))
        click, buy = table.column("click").to_numpy(), table.column("purchase").to_numpy()
        dropped = (click == 0) & (buy == 1)
        self.skipped[CLICK0_BUY1] += int(np.count_nonzero(dropped))
        if dropped.any():
            table, lines = table.filter(pa.array(~dropped)), lines[~dropped]
        n = table.num_rows
        one_each = pa.array(np.arange(n + 1, dtype=np.int32))
        columns = {}
        for spec in ALI_CCP_FIELDS:
            ids = pc.add(table.column(spec.name).combine_chunks(), 1).cast(pa.int32())
            if spec.multi_valued:
                columns[spec.name] = pa.ListArray.from_arrays(one_each, ids)
                weights = table.column("D" + spec.name).combine_chunks()
                columns[spec.weight_column] = pa.ListArray.from_arrays(one_each, weights)
            else:
                columns[spec.name] = ids
        keys = pc.binary_join_element_wise(f"{self.path.name}:", pc.cast(pa.array(lines), pa.string()), "")
        users = pa.table({USER_KEY_COLUMN: keys, **{c: v for c, v in columns.items() if _side(c) == "user"}})
        impressions = pa.table(
            {
                "sample_id": pa.array(lines - 2),
                "click": click[~dropped] if dropped.any() else click,
                "buy": buy[~dropped] if dropped.any() else buy,
                **{c: v for c, v in columns.items() if _side(c) == "item"},
            }
        )
        # Every row is its own group: cut where the writer flushes so blocks hold block_impressions rows.
        for lo in range(0, n, self.block_impressions):
            hi = min(n, lo + self.block_impressions)
            user = pa.array(np.arange(hi - lo, dtype=np.int32))
            self.writer.add(users.slice(lo, hi - lo), impressions.slice(lo, hi - lo).append_column(USER_COLUMN, user))


_USER_NAMES = {f.name for f in USER_FIELDS} | {f.weight_column for f in USER_FIELDS if f.multi_valued}
_ITEM_NAMES = {f.name for f in ITEM_FIELDS} | {f.weight_column for f in ITEM_FIELDS if f.multi_valued}


def _side(column: str) -> str:
    return "user" if column in _USER_NAMES else "item"


def import_rechub_csv(
    paths: dict[str, str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    skip_bad_rows: bool = False,
    block_impressions: int = 65536,
    read_block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> DatasetMetadata:
    """Import torch-rechub CSV files (split name -> path) into a dataset at ``out_dir``.

    Bad input raises RawFormatError naming file, line and column, or with ``skip_bad_rows`` is skipped
    and counted per reason in the split's ``skipped`` counts, as are the dropped click=0/purchase=1 rows.
    """
    if not paths:
        raise ValueError("no torch-rechub CSV files given")
    files = {split: Path(p) for split, p in paths.items()}
    for path in files.values():
        if not path.is_file():
            raise RawFormatError(path, None, "file", "no such torch-rechub CSV file")
    writer = DatasetWriter(out_dir, block_impressions=block_impressions)
    infos, sources, examples = {}, [], {}
    max_ids = {name: -1 for name in SPARSE_COLUMNS}
    for split, path in files.items():
        importer = _SplitImporter(path, writer.split(split), skip_bad_rows, block_impressions)
        blocks = importer.run(read_block_bytes)
        sources.append(blocks.source_record())
        infos[split] = importer.writer.close(skipped=dict(sorted(importer.skipped.items())))
        examples[split] = importer.examples
        for name, value in importer.max_ids.items():
            max_ids[name] = max(max_ids[name], value)
    return writer.commit(
        infos,
        vocab_sizes={name: value + 2 for name, value in max_ids.items()},
        source="torch-rechub-csv",
        source_files=sources,
        notes={"import": NOTE, "skipped_examples": examples},
    )
