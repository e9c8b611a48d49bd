"""Streaming, vectorised parser of the raw Tianchi Ali-CCP files (the skeleton / common-features pair).

A file is read as blocks of whole lines by a background thread, which also hashes every byte it reads
(so a file is read once, not once to convert and again to hash), and blocks are parsed ahead in a
small thread pool. Each block is parsed by pyarrow's CSV reader twice, with no Python work per row or
per feature:

1. the top-level columns (``sample_id, click, buy, common_feature_index, feature_num, feature_list``
   or ``common_feature_index, feature_num, feature_list``), typed by the reader;
2. the features: every row's ``feature_list`` ends with a newline, then ``\\x01`` becomes a newline and
   ``\\x02`` / ``\\x03`` become commas, so every feature is one ``field,id,value`` CSV line, read into a
   dictionary-encoded field column, int64 ids and float32 values.

Step 2 alone would accept ``f\\x03i\\x02v`` or ``f\\x02i\\x02v``; a numpy check that the ``\\x02``/``\\x03``
bytes strictly alternate (``\\x02`` first) makes it exact. Numbers are what pyarrow's CSV reader accepts
(it also takes spaces around a number and ``0x`` hexadecimal integers); non-finite values are rejected.

The fast path assumes a valid block and raises on the first inconsistency. Only then is the block
searched line by line (bisection with the same fast path, so "bad" means exactly what the fast path
rejects) and the bad line diagnosed in Python to name its field. Default: raise :class:`RawFormatError`;
with ``skip_bad_rows`` the bad lines are dropped and counted per reason.

Field semantics: features are grouped per field of the file's side (user fields in common features,
item/combination/context fields in the skeleton). Multi-valued fields keep every (id, weight) in file
order. A single-valued field repeated in a row keeps its last occurrence; the others are counted.
Field ids that are not one of the 23 Ali-CCP fields, or that belong to the other side, are ignored and
counted.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from dist_mtl.data.schema import ALI_CCP_FIELDS, FieldSpec, USER_KEY_COLUMN

SKELETON_FILE = "sample_skeleton_{split}.csv"
COMMON_FILE = "common_features_{split}.csv"
DEFAULT_BLOCK_BYTES = 32 << 20
#: Most bytes read without a line end before the reader gives up (a binary file, CR-only line ends): real
#: common-features rows run to ~60 KB (about 2,700 features). The check bounds the memory of one
#: unfinished line; a line that ends within the next read block may run up to a block longer.
MAX_LINE_BYTES = 64 << 20
#: Longest common_feature_index accepted (bytes). Real keys are 32-character md5-like hex strings. The key
#: join pads every key to the longest one it holds (convert.KeyIndex), so one long key would cost its
#: length for every key (a 100 KB key: GBs); a longer key is a bad common_feature_index instead. 256 leaves
#: room for other key formats and bounds the index at 256 B per key.
MAX_KEY_BYTES = 256
PARSE_WORKERS = 2  # blocks parsed at once: the target machine has 2 cores

# Reasons a row is skipped with skip_bad_rows (keys of the ``skipped`` counts).
WRONG_COLUMN_COUNT = "wrong_column_count"
BAD_LINE = "unparsable_line"
BAD_SAMPLE_ID = "bad_sample_id"
BAD_LABEL = "bad_label"
BAD_KEY = "bad_common_feature_index"
BAD_FEATURE_NUM = "bad_feature_num"
FEATURE_NUM_MISMATCH = "feature_num_mismatch"
BAD_FEATURE_TOKEN = "bad_feature_token"
BAD_FEATURE_ID = "bad_feature_id"
BAD_FEATURE_VALUE = "bad_feature_value"
UTF8_BOM = b"\xef\xbb\xbf"

_MAX_EXAMPLES = 20
#: A field id as Ali-CCP writes them: digits, or digits '_' digits (205, 109_14). Any other text is a
#: damaged token, not an unknown field to ignore.
_FIELD_ID = re.compile(r"[0-9]+(_[0-9]+)?")
_T = TypeVar("_T")
_CSV_BLOCK_BYTES = 4 << 20
# \x01 separates features, \x02 and \x03 separate field, id and value inside one feature.
_TOKENS_AS_CSV = bytes.maketrans(b"\x01\x02\x03", b"\n,,")


class RawFormatError(ValueError):
    """Bad raw input. ``line`` is 1-based (None when the problem is the file itself)."""

    def __init__(self, path: str | os.PathLike, line: int | None, field: str, detail: str):
        self.path = str(path)
        self.line = line
        self.field = field
        self.detail = detail
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"{where}, field '{field}': {detail}")

    def __reduce__(self):
        return (type(self), (self.path, self.line, self.field, self.detail))


@dataclass(frozen=True)
class RawFileKind:
    """The layout of one of the two raw files."""

    name: str
    file_pattern: str
    columns: tuple[str, ...]
    types: tuple[pa.DataType, ...]  # one per column
    side: str  # the schema side of the features it carries

    @property
    def fields(self) -> tuple[FieldSpec, ...]:
        return tuple(f for f in ALI_CCP_FIELDS if f.side == self.side)

    def path(self, raw_dir: str | os.PathLike, split: str) -> Path:
        return Path(raw_dir) / self.file_pattern.format(split=split)


SKELETON = RawFileKind(
    name="sample skeleton",
    file_pattern=SKELETON_FILE,
    columns=("sample_id", "click", "buy", USER_KEY_COLUMN, "feature_num", "feature_list"),
    types=(pa.int64(), pa.int8(), pa.int8(), pa.string(), pa.int32(), pa.string()),
    side="item",
)
COMMON = RawFileKind(
    name="common features",
    file_pattern=COMMON_FILE,
    columns=(USER_KEY_COLUMN, "feature_num", "feature_list"),
    types=(pa.string(), pa.int32(), pa.string()),
    side="user",
)


@dataclass
class FeatureLists:
    """One field's features for a block: row ``r`` holds ``ids[offsets[r]:offsets[r + 1]]``."""

    offsets: np.ndarray  # int32 [rows + 1]
    ids: np.ndarray  # int64 raw Tianchi feature ids
    weights: np.ndarray  # float32

    @classmethod
    def empty(cls, n_rows: int) -> "FeatureLists":
        return cls(np.zeros(n_rows + 1, np.int32), np.zeros(0, np.int64), np.zeros(0, np.float32))

    def rows(self, keep: np.ndarray) -> "FeatureLists":
        """Only the rows where ``keep`` (bool per row) is set."""
        lengths = np.diff(self.offsets)
        offsets = np.zeros(np.count_nonzero(keep) + 1, np.int32)
        np.cumsum(lengths[keep], out=offsets[1:])
        # Index the dropped features (few rows are dropped) rather than repeat a mask over all of them.
        dropped = np.flatnonzero(~keep)
        dropped_lengths = lengths[dropped]
        shift = self.offsets[dropped] - (np.cumsum(dropped_lengths) - dropped_lengths)
        features = np.ones(len(self.ids), bool)
        features[np.repeat(shift, dropped_lengths) + np.arange(dropped_lengths.sum())] = False
        return FeatureLists(offsets, self.ids[features], self.weights[features])

    def to_arrow(self) -> tuple[pa.ListArray, pa.ListArray]:
        offsets = pa.array(self.offsets, pa.int32())
        return (
            pa.ListArray.from_arrays(offsets, pa.array(self.ids, pa.int64())),
            pa.ListArray.from_arrays(offsets, pa.array(self.weights, pa.float32())),
        )


@dataclass
class ParsedBlock:
    """The well-formed rows of one block of lines, plus what was ignored or skipped in it."""

    lines: np.ndarray  # int64 [rows], 1-based line number of each row
    keys: pa.Array  # string [rows], common_feature_index
    features: dict[str, FeatureLists]  # every field of the file's side
    sample_id: np.ndarray | None = None  # int64 [rows] (skeleton only)
    click: np.ndarray | None = None  # int8 [rows] (skeleton only)
    buy: np.ndarray | None = None  # int8 [rows] (skeleton only)
    unknown_fields: Counter = field(default_factory=Counter)  # field id -> features ignored
    misplaced_fields: Counter = field(default_factory=Counter)  # field of the other side -> features ignored
    repeated_fields: Counter = field(default_factory=Counter)  # single-valued field -> extra occurrences
    # single-valued field -> features whose value was not 1 (a single-valued id is stored without weight)
    single_valued_weights: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)  # reason -> rows (skip_bad_rows only)
    skipped_keys: list[str] = field(default_factory=list)  # keys of skipped rows, where joinable
    skipped_examples: list[str] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return len(self.lines)

    def rows(self, keep: np.ndarray) -> "ParsedBlock":
        """The same block with only the rows where ``keep`` (bool per row) is set."""
        pick = None if self.sample_id is None else (lambda a: a[keep])
        return replace(
            self,
            lines=self.lines[keep],
            keys=self.keys.filter(pa.array(keep)),
            features={name: lists.rows(keep) for name, lists in self.features.items()},
            sample_id=pick and pick(self.sample_id),
            click=pick and pick(self.click),
            buy=pick and pick(self.buy),
        )


class Rejected(Exception):
    """A fast parser found a block inconsistent; :func:`rejected_lines` then finds the bad lines."""


def read_typed_csv(data: bytes, names: Sequence[str], types: Sequence[pa.DataType]) -> pa.Table:
    """Headerless, unquoted CSV with exactly these typed columns (no null values); Rejected if not."""
    if data.startswith(UTF8_BOM):
        # pyarrow drops a byte-order mark at the start of the buffer it reads, and only there: whether a
        # line with one passed would hang on where a block starts, and line-by-line bisection assumes
        # that a line's fate does not.
        raise Rejected("a UTF-8 byte-order mark starts the data")
    convert = pacsv.ConvertOptions(
        column_types=dict(zip(names, types)),
        null_values=[],
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    parse = pacsv.ParseOptions(delimiter=",", quote_char=False, escape_char=False, ignore_empty_lines=False)
    for block_size in (_CSV_BLOCK_BYTES, len(data) + 1):
        read = pacsv.ReadOptions(column_names=list(names), use_threads=True, block_size=block_size)
        try:
            return pacsv.read_csv(pa.py_buffer(data), read_options=read, parse_options=parse, convert_options=convert)
        except pa.ArrowInvalid as e:
            # A line longer than the reader's block is not an input error: retry as one block.
            if "straddl" in str(e) and block_size < len(data) + 1:
                continue
            raise Rejected(str(e)) from None
    raise AssertionError("unreachable")


def _count_lines(data: bytes) -> int:
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def _column_numpy(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy()


def _field_codes(kind: RawFileKind) -> dict[str, int]:
    """Field id -> index among the file's side fields; -2 for a field of the other side."""
    codes = {f.name: -2 for f in ALI_CCP_FIELDS}
    codes.update({f.name: i for i, f in enumerate(kind.fields)})
    return codes


def _parse_fast(data: bytes, kind: RawFileKind) -> ParsedBlock:
    """Parse a block assumed valid; raise Rejected at the first inconsistency."""
    n_lines = _count_lines(data)
    top = read_typed_csv(data, kind.columns, kind.types)
    n = top.num_rows
    if n != n_lines:
        # pyarrow also ends a row at a lone carriage return; rows must be lines.
        raise Rejected(f"{n} CSV rows in {n_lines} lines")
    keys = top.column(USER_KEY_COLUMN).combine_chunks()
    key_bytes = pc.binary_length(keys)
    if n and pc.min(key_bytes).as_py() == 0:
        raise Rejected("empty common_feature_index")
    if n and pc.max(key_bytes).as_py() > MAX_KEY_BYTES:
        raise Rejected(f"common_feature_index longer than {MAX_KEY_BYTES} bytes")
    # The key join compares fixed-width byte strings, which do not tell 'a' from 'a\x00'.
    if n and pc.any(pc.match_substring(keys, "\x00")).as_py():
        raise Rejected("NUL byte in a common_feature_index")
    # A byte-order mark that read_typed_csv did not catch (not at the start of the data): the key would
    # silently differ from the same key without one.
    if n and pc.any(pc.starts_with(keys, "\ufeff")).as_py():
        raise Rejected("a UTF-8 byte-order mark starts a common_feature_index")
    block = ParsedBlock(lines=np.arange(n, dtype=np.int64), keys=keys, features={})
    if kind is SKELETON:
        block.sample_id = _column_numpy(top, "sample_id")
        block.click = _column_numpy(top, "click")
        block.buy = _column_numpy(top, "buy")
        if ((block.click | block.buy) & ~np.int8(1)).any():
            raise Rejected("label outside {0, 1}")
    feature_num = _column_numpy(top, "feature_num")
    feature_lists = top.column("feature_list").combine_chunks()
    del top
    nonempty = pc.binary_length(feature_lists).to_numpy() > 0
    if not nonempty.any():
        if feature_num.any():
            raise Rejected("feature_num differs from the number of features")
        block.features = {f.name: FeatureLists.empty(n) for f in kind.fields}
        return block
    if not nonempty.all():
        feature_lists = feature_lists.filter(pa.array(nonempty))

    # One newline-terminated line per row, as contiguous bytes.
    joined = pc.binary_join_element_wise(feature_lists, "", "\n")
    del feature_lists
    row_ends = np.frombuffer(joined.buffers()[1], np.int32, len(joined) + 1, joined.offset * 4)
    text = bytes(memoryview(joined.buffers()[2])[row_ends[0] : row_ends[-1]])
    row_ends = row_ends - row_ends[0]
    del joined
    raw = np.frombuffer(text, np.uint8)
    separators = np.flatnonzero((raw - np.uint8(2)) <= 1)  # positions of \x02 and \x03
    kinds = raw[separators]
    if len(separators) % 2 or (kinds[0::2] != 2).any() or (kinds[1::2] != 3).any():
        raise Rejected("features are not field\\x02id\\x03value")
    field_separators = separators[0::2]
    counts = np.zeros(n, np.int32)
    counts[nonempty] = np.diff(np.searchsorted(field_separators, row_ends))
    if (counts != feature_num).any():
        raise Rejected("feature_num differs from the number of features")
    del raw, separators, kinds

    tokens = read_typed_csv(
        text.translate(_TOKENS_AS_CSV),
        ("field", "id", "value"),
        (pa.dictionary(pa.int32(), pa.string()), pa.int64(), pa.float32()),
    )
    del text
    if tokens.num_rows != len(field_separators):
        raise Rejected("feature count differs from the number of field\\x02id\\x03value items")
    ids = _column_numpy(tokens, "id")
    weights = _column_numpy(tokens, "value")
    if not np.isfinite(weights).all():
        raise Rejected("non-finite feature value")
    if (weights < 0).any():
        raise Rejected("negative feature value")
    codes = _encode_fields(tokens.column("field"), kind, block)
    del tokens
    rows = np.repeat(np.arange(n, dtype=np.int32), counts)
    block.features = _group_by_field(rows, codes, ids, weights, n, kind.fields, block.repeated_fields,
                                     block.single_valued_weights)
    return block


def _encode_fields(fields: pa.ChunkedArray, kind: RawFileKind, block: ParsedBlock) -> np.ndarray:
    """Dictionary-encoded field ids -> int8 codes (index among the side's fields, < 0 ignored)."""
    known = _field_codes(kind)
    parts = []
    for chunk in fields.chunks:
        names = chunk.dictionary.to_pylist()
        if "" in names:
            raise Rejected("empty field id")
        if not all(_FIELD_ID.fullmatch(name) for name in names):
            raise Rejected("malformed field id")
        table = np.array([known.get(name, -1) for name in names], dtype=np.int8)
        indices = chunk.indices.to_numpy()
        parts.append(table[indices])
        if (table < 0).any():
            per_name = np.bincount(indices, minlength=len(names))
            for name, code, count in zip(names, table, per_name):
                if code == -1 and count:
                    block.unknown_fields[name] += int(count)
                elif code == -2 and count:
                    block.misplaced_fields[name] += int(count)
    return np.concatenate(parts) if parts else np.zeros(0, np.int8)


def _group_by_field(
    rows: np.ndarray,
    codes: np.ndarray,
    ids: np.ndarray,
    weights: np.ndarray,
    n_rows: int,
    fields: tuple[FieldSpec, ...],
    repeated: Counter,
    dropped_weights: Counter,
) -> dict[str, FeatureLists]:
    # A stable sort on int8 is a radix sort: features of one field become contiguous, still in row order.
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(fields) + 1))
    out = {}
    for i, spec in enumerate(fields):
        take = order[bounds[i] : bounds[i + 1]]
        field_rows = rows[take]
        if not spec.multi_valued and len(field_rows) > 1:
            last = np.empty(len(field_rows), bool)
            last[-1] = True
            np.not_equal(field_rows[1:], field_rows[:-1], out=last[:-1])
            extra = len(field_rows) - int(np.count_nonzero(last))
            if extra:
                repeated[spec.name] += extra
                take, field_rows = take[last], field_rows[last]
        if not spec.multi_valued:
            not_one = int(np.count_nonzero(weights[take] != 1))
            if not_one:
                dropped_weights[spec.name] += not_one
        offsets = np.zeros(n_rows + 1, np.int32)
        np.cumsum(np.bincount(field_rows, minlength=n_rows), out=offsets[1:])
        out[spec.name] = FeatureLists(offsets, ids[take], weights[take])
    return out


# ---------------------------------------------------------------- the slow path, for bad blocks only


def line_bounds(data: bytes) -> np.ndarray:
    """Start of every line plus the end of the block: line i is data[b[i]:b[i + 1]]."""
    ends = np.flatnonzero(np.frombuffer(data, np.uint8) == 10) + 1
    bounds = np.concatenate([[0], ends])
    if bounds[-1] != len(data):
        bounds = np.append(bounds, len(data))
    return bounds


def without_lines(data: bytes, bounds: np.ndarray, bad: list[int]) -> bytes:
    """``data`` minus the lines ``bad`` (ascending), copied as the few ranges between them."""
    starts = [0] + [i + 1 for i in bad]
    ends = bad + [len(bounds) - 1]
    return b"".join(data[bounds[a] : bounds[b]] for a, b in zip(starts, ends) if b > a)


def _accepted(data: bytes, kind: RawFileKind) -> bool:
    try:
        _parse_fast(data, kind)
    except Rejected:
        return False
    return True


def rejected_lines(
    data: bytes, bounds: np.ndarray, accepts: Callable[[bytes], bool], first_only: bool
) -> list[int]:
    """Lines ``accepts`` rejects on their own, in order (bisection: ~log2(lines) parses per bad line).

    ``accepts`` must judge every line independently of the others, as the fast parsers do.
    """
    bad: list[int] = []
    n = len(bounds) - 1
    stack = [(n // 2, n), (0, n // 2)] if n > 1 else [(0, n)]
    while stack:
        lo, hi = stack.pop()
        if hi <= lo or accepts(data[bounds[lo] : bounds[hi]]):
            continue
        if hi - lo == 1:
            bad.append(lo)
            if first_only:
                break
            continue
        mid = (lo + hi) // 2
        stack.append((mid, hi))
        stack.append((lo, mid))
    return bad


def csv_value(value: bytes, type_: pa.DataType):
    """The value pyarrow's CSV reader gives ``value`` as ``type_``, or ValueError if it rejects it."""
    try:
        table = read_typed_csv(value + b"\n", ("v",), (type_,))
    except Rejected as e:
        raise ValueError(str(e)) from None
    return table.column(0)[0].as_py()


def _first_rejected(values: list[bytes], type_: pa.DataType) -> int | None:
    if not values:
        return None
    try:
        read_typed_csv(b"\n".join(values) + b"\n", ("v",), (type_,))
        return None
    except Rejected:
        pass
    for i, v in enumerate(values):
        try:
            csv_value(v, type_)
        except ValueError:
            return i
    return None


def split_line_ending(line: bytes) -> tuple[bytes, tuple[str, str, str] | None]:
    """The line without a ``\\r`` of its ``\\r\\n`` ending, and a diagnosis when a carriage return
    sits inside it (shared by the diagnosers of every line-oriented input)."""
    if line.endswith(b"\r"):
        line = line[:-1]
    if b"\r" in line:
        return line, ("line", BAD_LINE, "contains a carriage return inside the line")
    return line, None


def _diagnose(line: bytes, kind: RawFileKind) -> tuple[str, str, str]:
    """(field, reason, detail) for a line the fast path rejected."""
    line, problem = split_line_ending(line)
    if problem:
        return problem
    columns = line.split(b",")
    if len(columns) != len(kind.columns):
        return (
            "line",
            WRONG_COLUMN_COUNT,
            f"has {len(columns)} comma-separated columns, expected {len(kind.columns)} ({', '.join(kind.columns)})",
        )
    values = dict(zip(kind.columns, columns))

    def reason_of(name: str) -> str:
        reason = {"sample_id": BAD_SAMPLE_ID, "click": BAD_LABEL, "buy": BAD_LABEL}.get(name)
        return reason or (BAD_KEY if name == USER_KEY_COLUMN else BAD_FEATURE_NUM)

    if line.startswith(UTF8_BOM):
        first = kind.columns[0]
        return (first, reason_of(first),
                "the line starts with a UTF-8 byte-order mark (EF BB BF); write the file without one")
    for name, type_ in zip(kind.columns, kind.types):
        if name == "feature_list":
            continue
        if name == USER_KEY_COLUMN and values[name].startswith(UTF8_BOM):
            return name, BAD_KEY, "starts with a UTF-8 byte-order mark (EF BB BF); write the file without one"
        try:
            parsed = csv_value(values[name], type_)
        except ValueError:
            reason = reason_of(name)
            what = "valid UTF-8 text" if type_ == pa.string() else f"an integer ({type_})"
            return name, reason, f"{values[name][:80]!r} is not {what}"
        if name in ("click", "buy") and parsed not in (0, 1):
            return name, BAD_LABEL, f"label {parsed} is not 0 or 1"
        if name == USER_KEY_COLUMN and not parsed:
            return name, BAD_KEY, "is empty"
        if name == USER_KEY_COLUMN and "\x00" in parsed:
            return name, BAD_KEY, f"{values[name][:80]!r} contains a NUL byte"
        if name == USER_KEY_COLUMN and len(values[name]) > MAX_KEY_BYTES:
            return (name, BAD_KEY, f"{values[name][:40]!r}... is {len(values[name]):,} bytes long, more than "
                                   f"{MAX_KEY_BYTES} (Ali-CCP's keys are 32-character hex strings)")
    features = values["feature_list"].split(b"\x01") if values["feature_list"] else []
    parts = []
    for i, token in enumerate(features):
        f_sep, v_sep = token.find(b"\x02"), token.find(b"\x03")
        if token.count(b"\x02") != 1 or token.count(b"\x03") != 1 or f_sep > v_sep:
            return "feature_list", BAD_FEATURE_TOKEN, f"feature {i + 1} {token[:80]!r} is not field\\x02id\\x03value"
        field_id, feature_id, value = token[:f_sep], token[f_sep + 1 : v_sep], token[v_sep + 1 :]
        try:
            name = field_id.decode()
        except UnicodeDecodeError:
            name = ""
        if not name:
            return "feature_list", BAD_FEATURE_TOKEN, f"feature {i + 1} {token[:80]!r} has no valid field id"
        if not _FIELD_ID.fullmatch(name):
            return ("feature_list", BAD_FEATURE_TOKEN,
                    f"feature {i + 1} {token[:80]!r}: field id {name[:40]!r} is not of the form 205 or 109_14")
        parts.append((name, feature_id, value))
    bad_id = _first_rejected([p[1] for p in parts], pa.int64())
    if bad_id is not None:
        name, feature_id, _ = parts[bad_id]
        return name, BAD_FEATURE_ID, f"feature {bad_id + 1}: feature id {feature_id[:80]!r} is not an integer"
    bad_value = _first_rejected([p[2] for p in parts], pa.float32())
    if bad_value is not None:
        name, _, value = parts[bad_value]
        return name, BAD_FEATURE_VALUE, f"feature {bad_value + 1}: value {value[:80]!r} is not a number"
    for i, (name, _, value) in enumerate(parts):
        number = np.float32(csv_value(value, pa.float32()))
        if not np.isfinite(number):
            return name, BAD_FEATURE_VALUE, f"feature {i + 1}: value {value[:80]!r} is not finite"
        if number < 0:
            return (name, BAD_FEATURE_VALUE,
                    f"feature {i + 1}: value {value[:80]!r} is negative (Ali-CCP's values are non-negative weights)")
    declared = csv_value(values["feature_num"], pa.int32())
    if declared != len(parts):
        return "feature_num", FEATURE_NUM_MISMATCH, f"is {declared} but feature_list holds {len(parts)} features"
    return "line", BAD_LINE, "rejected by the CSV reader"


def _joinable_key(line: bytes) -> str | None:
    """The first column of a skipped common-features line, if an accepted skeleton row could carry it.

    Only such keys are worth keeping (to tell impressions of a skipped user row from ones with no row
    at all); anything else, such as a junk line with no comma, would be held and padded to at full length
    by the key index.
    """
    key = split_line_ending(line)[0].split(b",", 1)[0]
    if not key or len(key) > MAX_KEY_BYTES or b"\x00" in key or b"\r" in key:
        return None
    try:
        return key.decode()
    except UnicodeDecodeError:
        return None


def parse_block(
    data: bytes, first_line: int, path: str | os.PathLike, kind: RawFileKind, skip_bad_rows: bool = False
) -> ParsedBlock:
    """Parse whole lines starting at 1-based ``first_line``; bad lines raise or, if skipping, are counted."""
    if not data:
        return _empty_block(kind)
    try:
        block = _parse_fast(data, kind)
        block.lines += first_line
        return block
    except Rejected as rejected:
        first_error = str(rejected)
    bounds = line_bounds(data)
    bad = rejected_lines(data, bounds, lambda part: _accepted(part, kind), first_only=not skip_bad_rows)
    if not bad:
        last = first_line + len(bounds) - 2
        detail = f"lines {first_line}-{last} are rejected together but no line alone: {first_error[:300]}"
        raise RawFormatError(path, first_line, "block", detail)
    if not skip_bad_rows:
        i = bad[0]
        field_name, _, detail = _diagnose(data[bounds[i] : bounds[i + 1]].rstrip(b"\n"), kind)
        raise RawFormatError(path, first_line + i, field_name, detail)
    skipped: Counter = Counter()
    skipped_keys, examples = [], []
    for i in bad:
        line = data[bounds[i] : bounds[i + 1]].rstrip(b"\n")
        field_name, reason, detail = _diagnose(line, kind)
        skipped[reason] += 1
        if len(examples) < _MAX_EXAMPLES:
            examples.append(f"{path}, line {first_line + i}, field '{field_name}': {detail}")
        key = _joinable_key(line) if kind is COMMON else None
        if key is not None:
            skipped_keys.append(key)
    keep = np.ones(len(bounds) - 1, bool)
    keep[bad] = False
    good = without_lines(data, bounds, bad)
    if good:
        try:
            block = _parse_fast(good, kind)
        except Rejected as e:
            detail = f"the lines left after skipping bad ones are rejected: {e}"
            raise RawFormatError(path, first_line, "block", detail) from None
        block.lines = np.flatnonzero(keep).astype(np.int64) + first_line
    else:
        block = _empty_block(kind)
    block.skipped, block.skipped_keys, block.skipped_examples = skipped, skipped_keys, examples
    return block


def _empty_block(kind: RawFileKind) -> ParsedBlock:
    block = ParsedBlock(
        lines=np.zeros(0, np.int64),
        keys=pa.array([], pa.string()),
        features={f.name: FeatureLists.empty(0) for f in kind.fields},
    )
    if kind is SKELETON:
        block.sample_id, block.click, block.buy = np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros(0, np.int8)
    return block


# ---------------------------------------------------------------- reading


_END = object()


class LineBlocks:
    """A text file as blocks of whole lines, each with its 1-based first line number.

    A background thread reads, hashes and cuts the file at line ends while the caller works on earlier
    blocks, so the sha256 costs no second read and I/O overlaps the caller's work. Subclasses also parse
    blocks ahead, in a small thread pool (pyarrow and numpy release the GIL). ``sha256`` is known once
    the file was read to the end.
    """

    def __init__(self, path: str | os.PathLike, block_bytes: int = DEFAULT_BLOCK_BYTES, what: str = "input",
                 max_line_bytes: int = MAX_LINE_BYTES):
        self.path = Path(path)
        if not self.path.is_file():
            raise RawFormatError(self.path, None, "file", f"no such {what} file")
        self.block_bytes = block_bytes
        self.max_line_bytes = max_line_bytes
        self.bytes_total = self.path.stat().st_size
        self.bytes_done = 0
        self._sha256: str | None = None

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            raise RuntimeError(f"{self.path} has not been read to the end")
        return self._sha256

    def source_record(self) -> dict:
        """The ``source_files`` entry of dataset metadata."""
        return {"path": str(self.path), "bytes": self.bytes_done, "sha256": self.sha256}

    def __iter__(self) -> Iterator[tuple[bytes, int]]:
        return self._in_background(lambda data, first_line: (data, first_line))

    def _in_background(self, work: Callable[[bytes, int], _T], workers: int = 1) -> Iterator[_T]:
        """``work(block, first_line)`` of every block, computed ahead by ``workers`` threads, in order."""
        results: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"parse {self.path.name}")
        thread = threading.Thread(
            target=self._read, args=(work, pool, results, stop), name=f"read {self.path.name}", daemon=True
        )
        thread.start()
        try:
            while True:
                item = results.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                size, future = item
                result = future.result()
                self.bytes_done += size
                yield result
        finally:
            stop.set()
            thread.join()
            pool.shutdown(wait=True, cancel_futures=True)

    def _read(
        self, work: Callable[[bytes, int], _T], pool: ThreadPoolExecutor, results: queue.Queue, stop: threading.Event
    ) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    results.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            digest = hashlib.sha256()
            # The unfinished line's pieces: each new chunk is searched alone, so a line longer than a
            # block (or a file with no '\n' at all) costs linear time, and is cut off at max_line_bytes.
            pending: list[bytes] = []
            pending_bytes, line = 0, 1
            with open(self.path, "rb") as f:
                while not stop.is_set():
                    chunk = f.read(self.block_bytes)
                    if not chunk:
                        if pending:
                            tail = b"".join(pending)
                            if not put((len(tail), pool.submit(work, tail, line))):
                                return
                        break
                    digest.update(chunk)
                    cut = chunk.rfind(b"\n") + 1
                    if cut == 0:
                        pending.append(chunk)
                        pending_bytes += len(chunk)
                        if pending_bytes > self.max_line_bytes:
                            raise RawFormatError(
                                self.path, line, "line",
                                f"no line end ('\\n') in {pending_bytes:,} bytes (more than {self.max_line_bytes:,}: "
                                f"a binary file, or one with CR-only line ends?)",
                            )
                        continue
                    block = b"".join([*pending, chunk[:cut]]) if pending else chunk[:cut]
                    rest = chunk[cut:]
                    pending, pending_bytes = ([rest], len(rest)) if rest else ([], 0)
                    if not put((len(block), pool.submit(work, block, line))):
                        return
                    line += block.count(b"\n")
            if not stop.is_set():
                self._sha256 = digest.hexdigest()
                put(_END)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(e)


class RawFileReader(LineBlocks):
    """The parsed blocks of one raw Tianchi file (see :func:`parse_block`)."""

    def __init__(
        self,
        path: str | os.PathLike,
        kind: RawFileKind,
        *,
        skip_bad_rows: bool = False,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
    ):
        super().__init__(path, block_bytes, kind.name)
        self.kind = kind
        self.skip_bad_rows = skip_bad_rows

    def blocks(self) -> Iterator[ParsedBlock]:
        """Parsed blocks; a bad line raises RawFormatError here (or is counted when skipping)."""
        return self._in_background(
            lambda data, first_line: parse_block(data, first_line, self.path, self.kind, self.skip_bad_rows),
            workers=PARSE_WORKERS,
        )
