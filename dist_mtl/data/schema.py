"""The Ali-CCP field schema and the on-disk dataset layout every producer and the reader agree on.

Layout of a dataset directory::

    <root>/metadata.json                 written last (tmp + rename): its presence marks a complete dataset
    <root>/<split>/users-NNNNN.parquet   one row per user group (a Tianchi common-features row)
    <root>/<split>/impressions-NNNNN.parquet   one row per impression
    <root>/id_maps.parquet               raw feature id -> index, per field (converted from raw files; id_maps.py)

The two files of a part are aligned by row group: row group ``j`` of ``impressions-N`` refers only to
users in row group ``j`` of ``users-N`` (a *block*), through the int32 column ``user``, the row of its
user inside that users row group. A block holds whole user groups, so a reader rebuilds full
impressions from one block without any join, and each user's ~518 history ids are stored once instead of
once per impression (~58x less).

Ids are per-field indices (int32): 0 is reserved for missing, unseen and rare ids, 1..vocab_size-1 are
the kept ids of the train split. Multi-valued fields are ``list<int32>`` ids with a parallel
``list<float32>`` column named ``<field>_w`` holding their weights; single-valued fields are plain int32.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
USER_COLUMN = "user"
USER_KEY_COLUMN = "common_feature_index"
SAMPLE_ID_COLUMN = "sample_id"
#: Not stored: the reader makes it on request, the position of an impression's user row among its split's
#: user rows in storage order (one per common_feature_index in raw Ali-CCP). Per-user metrics group by it.
USER_ROW_COLUMN = "user_row"
#: Not stored either: the reader makes it on request, the position of an impression among its split's
#: impressions in storage order, so that scores written by several ranks line up with the split's rows.
IMPRESSION_ROW_COLUMN = "impression_row"
#: Columns the reader makes rather than reads.
READER_MADE_COLUMNS = (USER_ROW_COLUMN, IMPRESSION_ROW_COLUMN)
#: Stored where the converter kept a share of the non-clicked impressions (``--keep-negatives``): each
#: impression's importance weight, 1 / (kept share) for a kept non-clicked one, 1 otherwise.
SAMPLE_WEIGHT_COLUMN = "sample_weight"
#: Label columns the reader gives as exact int64 rather than float32.
ID_LABEL_COLUMNS = (SAMPLE_ID_COLUMN, *READER_MADE_COLUMNS)
LABEL_COLUMNS = ("click", "buy")
RESERVED_INDEX = 0


@dataclass(frozen=True)
class FieldSpec:
    """One Ali-CCP field (a TorchRec feature)."""

    name: str  # the Tianchi field id, e.g. "205" or "109_14"; also the KJT key
    side: str  # "user" (stored once per group) or "item" (stored per impression)
    multi_valued: bool  # weighted list of ids (history and combination fields)
    description: str

    @property
    def weight_column(self) -> str:
        return f"{self.name}_w"


def _f(name: str, side: str, multi: bool, description: str) -> FieldSpec:
    return FieldSpec(name, side, multi, description)


#: All 23 Ali-CCP fields in a fixed order (user side first). The KJT key order follows this list.
ALI_CCP_FIELDS: tuple[FieldSpec, ...] = (
    _f("101", "user", False, "user id"),
    _f("121", "user", False, "user profile (categorical)"),
    _f("122", "user", False, "user group"),
    _f("124", "user", False, "gender"),
    _f("125", "user", False, "age"),
    _f("126", "user", False, "consumption level I"),
    _f("127", "user", False, "consumption level II"),
    _f("128", "user", False, "occupation"),
    _f("129", "user", False, "geography"),
    _f("109_14", "user", True, "categories the user acted on, last 14 days (count weights)"),
    _f("110_14", "user", True, "shops the user acted on, last 14 days (count weights)"),
    _f("127_14", "user", True, "brands the user acted on, last 14 days (count weights)"),
    _f("150_14", "user", True, "intention nodes the user acted on, last 14 days (count weights)"),
    _f("205", "item", False, "item id"),
    _f("206", "item", False, "item category"),
    _f("207", "item", False, "item shop"),
    _f("210", "item", False, "item intention node"),
    _f("216", "item", False, "item brand"),
    _f("508", "item", True, "combination 109_14 x 206 (weighted)"),
    _f("509", "item", True, "combination 110_14 x 207 (weighted)"),
    _f("702", "item", True, "combination 127_14 x 216 (weighted)"),
    _f("853", "item", True, "combination 150_14 x 210 (weighted)"),
    _f("301", "item", False, "position (context)"),
)
FIELDS_BY_NAME: dict[str, FieldSpec] = {f.name: f for f in ALI_CCP_FIELDS}
USER_FIELDS: tuple[FieldSpec, ...] = tuple(f for f in ALI_CCP_FIELDS if f.side == "user")
ITEM_FIELDS: tuple[FieldSpec, ...] = tuple(f for f in ALI_CCP_FIELDS if f.side == "item")
#: Each side's feature keys in schema order: the keys of its KeyedJaggedTensor and of its pooled embeddings.
USER_KEYS: list[str] = [f.name for f in USER_FIELDS]
ITEM_KEYS: list[str] = [f.name for f in ITEM_FIELDS]

#: Publicly reported distinct-id counts after a count>10 filter (AITM), used to size synthetic data.
#: Not reported, so assumed: 210 (AITM drops the field) takes 853's count, since 853 crosses 150_14 with
#: 210; each history field takes the count of the item field it describes (a user's categories, shops,
#: brands and intention nodes are drawn from the items').
ALI_CCP_VOCAB_AFTER_FILTER: dict[str, int] = {
    "101": 238_635, "121": 98, "122": 14, "124": 3, "125": 8, "126": 4, "127": 4, "128": 3, "129": 5,
    "205": 467_298, "206": 6_929, "207": 263_942, "210": 37_148, "216": 106_399,
    "508": 5_888, "509": 104_830, "702": 51_878, "853": 37_148, "301": 4,
    "109_14": 6_929, "110_14": 263_942, "127_14": 106_399, "150_14": 37_148,
}


def _column_types(fields: Iterable[FieldSpec]) -> list[pa.Field]:
    cols = []
    for f in fields:
        if f.multi_valued:
            cols.append(pa.field(f.name, pa.list_(pa.int32())))
            cols.append(pa.field(f.weight_column, pa.list_(pa.float32())))
        else:
            cols.append(pa.field(f.name, pa.int32()))
    return cols


def users_schema() -> pa.Schema:
    return pa.schema([pa.field(USER_KEY_COLUMN, pa.string())] + _column_types(USER_FIELDS))


def impressions_schema(extra_columns: dict[str, str] | None = None) -> pa.Schema:
    """Impression columns: user row, sample id, labels, item-side fields, then extra label/weight columns."""
    cols = [
        pa.field(USER_COLUMN, pa.int32()),
        pa.field(SAMPLE_ID_COLUMN, pa.int64()),
        pa.field("click", pa.int8()),
        pa.field("buy", pa.int8()),
    ]
    cols += _column_types(ITEM_FIELDS)
    for name, dtype in (extra_columns or {}).items():
        cols.append(pa.field(name, pa.type_for_alias(dtype)))
    return pa.schema(cols)


class DatasetError(ValueError):
    """A dataset on disk is missing, incomplete or does not match its metadata."""


@dataclass
class PartInfo:
    users: str  # path relative to the dataset root
    impressions: str
    blocks: list[list[int]]  # per row group: [num_users, num_impressions]


@dataclass
class SplitInfo:
    parts: list[PartInfo] = field(default_factory=list)
    num_impressions: int = 0
    num_users: int = 0
    num_clicks: int = 0
    num_buys: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    # The share of the non-clicked impressions the converter kept (``--keep-negatives``); each stored one
    # stands for 1 / rate, which its SAMPLE_WEIGHT_COLUMN says. 1.0: every impression is stored.
    negative_keep_rate: float = 1.0

    @property
    def num_blocks(self) -> int:
        return sum(len(p.blocks) for p in self.parts)

    def block_table(self) -> list[tuple[int, int, int, int]]:
        """(part index, row group, num_users, num_impressions) for every block in storage order."""
        return [(pi, rg, b[0], b[1]) for pi, p in enumerate(self.parts) for rg, b in enumerate(p.blocks)]


@dataclass
class DatasetMetadata:
    """What ``metadata.json`` holds. ``vocab_sizes`` include the reserved index 0."""

    vocab_sizes: dict[str, int]
    splits: dict[str, SplitInfo]
    source: str  # "tianchi-raw", "torch-rechub-csv", "synthetic-direct"
    min_count: int = 1
    extra_columns: dict[str, str] = field(default_factory=dict)  # name -> arrow type alias
    source_files: list[dict] = field(default_factory=list)  # {"path", "bytes", "sha256"}
    notes: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    id_maps: dict | None = None  # {"file", "sha256"} of the raw id -> index maps (id_maps.py); None: none kept

    def to_json(self) -> str:
        record = asdict(self)
        if record["id_maps"] is None:
            del record["id_maps"]  # the file of a dataset without maps stays readable by older versions
        for split in record["splits"].values():
            if split["negative_keep_rate"] == 1.0:
                del split["negative_keep_rate"]  # likewise for a split converted whole
        return json.dumps(record, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "metadata.json") -> "DatasetMetadata":
        try:
            raw = json.loads(text)
            if raw.get("format_version") != FORMAT_VERSION:
                raise DatasetError(
                    f"{source}: format_version {raw.get('format_version')} != supported {FORMAT_VERSION}"
                )
            splits = {
                name: SplitInfo(
                    parts=[PartInfo(**p) for p in s.pop("parts")],
                    **s,
                )
                for name, s in raw.pop("splits").items()
            }
            meta = cls(splits=splits, **raw)
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
            raise DatasetError(f"{source}: not a dist_mtl metadata file ({type(e).__name__}: {e})") from e
        meta._check(source)
        return meta

    def _check(self, source: str) -> None:
        """The structure every reader relies on, so that a damaged or hand-edited file fails here, naming
        the key, and not later as an IndexError or a silently misread split."""

        def bad(where: str, detail: str) -> DatasetError:
            return DatasetError(f"{source}: {where}: {detail}")

        def count(value, where: str, minimum: int = 0) -> None:
            if type(value) is not int or value < minimum:
                raise bad(where, f"{value!r} is not an integer >= {minimum}")

        if not isinstance(self.vocab_sizes, dict):
            raise bad("vocab_sizes", "is not an object")
        for f in ALI_CCP_FIELDS:
            if f.name not in self.vocab_sizes:
                raise bad("vocab_sizes", f"field '{f.name}' is missing")
            count(self.vocab_sizes[f.name], f"vocab_sizes['{f.name}']", 1)
        count(self.min_count, "min_count", 1)
        if self.id_maps is not None:
            if (not isinstance(self.id_maps, dict) or not isinstance(self.id_maps.get("file"), str)
                    or not self.id_maps["file"] or not isinstance(self.id_maps.get("sha256"), str)
                    or len(self.id_maps["sha256"]) != 64):
                raise bad("id_maps", f"{self.id_maps!r} is not {{'file': path, 'sha256': 64 hex digits}}")
        if not isinstance(self.extra_columns, dict):
            raise bad("extra_columns", "is not an object")
        for name, alias in self.extra_columns.items():
            try:
                pa.type_for_alias(alias)
            except (ValueError, TypeError) as e:
                raise bad(f"extra_columns['{name}']", f"{alias!r} is not an Arrow type name") from e
        if not isinstance(self.splits, dict):
            raise bad("splits", "is not an object")
        seen: dict[str, str] = {}
        for name, split in self.splits.items():
            users = impressions = 0
            for i, part in enumerate(split.parts):
                where = f"splits['{name}'].parts[{i}]"
                for kind in ("users", "impressions"):
                    rel = getattr(part, kind)
                    if not isinstance(rel, str) or not rel:
                        raise bad(f"{where}.{kind}", f"{rel!r} is not a file path")
                    if rel in seen:
                        raise bad(f"{where}.{kind}", f"'{rel}' is listed twice (also at {seen[rel]})")
                    seen[rel] = f"{where}.{kind}"
                if not isinstance(part.blocks, list):
                    raise bad(f"{where}.blocks", "is not a list")
                for j, block in enumerate(part.blocks):
                    if not isinstance(block, list) or len(block) != 2:
                        raise bad(f"{where}.blocks[{j}]", f"{block!r} is not [num_users, num_impressions]")
                    count(block[0], f"{where}.blocks[{j}][0]")
                    count(block[1], f"{where}.blocks[{j}][1]")
                    users += block[0]
                    impressions += block[1]
            for key in ("num_impressions", "num_users", "num_clicks", "num_buys"):
                count(getattr(split, key), f"splits['{name}'].{key}")
            rate = split.negative_keep_rate
            if type(rate) not in (int, float) or not 0.0 < rate <= 1.0:
                raise bad(f"splits['{name}'].negative_keep_rate", f"{rate!r} is not a number in (0, 1]")
            if rate < 1.0 and SAMPLE_WEIGHT_COLUMN not in self.extra_columns:
                raise bad(f"splits['{name}']", f"keeps a share {rate} of its negatives but the dataset has no "
                                               f"'{SAMPLE_WEIGHT_COLUMN}' column to weight them")
            if (split.num_impressions, split.num_users) != (impressions, users):
                raise bad(
                    f"splits['{name}']",
                    f"num_impressions / num_users are {split.num_impressions} / {split.num_users} but its blocks "
                    f"hold {impressions} / {users}",
                )

    @classmethod
    def load(cls, root: str | os.PathLike) -> "DatasetMetadata":
        path = Path(root) / METADATA_FILE
        if not path.exists():
            hint = " (an interrupted conversion leaves no metadata.json)" if Path(root).exists() else ""
            raise DatasetError(f"{path}: no such file; {root} is not a complete dist_mtl dataset{hint}")
        try:
            text = path.read_text()
        except UnicodeDecodeError as e:
            raise DatasetError(f"{path}: not a dist_mtl metadata file (not UTF-8 text: {e})") from e
        return cls.from_json(text, str(path))

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DatasetError(f"dataset has no split '{name}' (it has {sorted(self.splits)})")
        return self.splits[name]


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write then rename, so that a reader never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class SplitWriter:
    """Writes one split as aligned (users, impressions) Parquet parts, a block per row group.

    ``add`` takes whole user groups: ``users`` rows in order and ``impressions`` whose ``user`` column
    is the row in that same ``users`` table. Buffered groups are flushed as one block once they hold at
    least ``block_impressions`` impressions; a new part file starts every ``blocks_per_file`` blocks.
    """

    def __init__(
        self,
        root: Path,
        split: str,
        extra_columns: dict[str, str],
        block_impressions: int,
        blocks_per_file: int,
        compression: str = "zstd",
    ):
        self.root = root
        self.split = split
        self.info = SplitInfo()
        self._users_schema = users_schema()
        self._impr_schema = impressions_schema(extra_columns)
        self._block_impressions = block_impressions
        self._blocks_per_file = blocks_per_file
        self._compression = compression
        self._pending: list[tuple[pa.Table, pa.Table]] = []
        self._pending_impressions = 0
        self._writers: tuple[pq.ParquetWriter, pq.ParquetWriter] | None = None
        (root / split).mkdir(parents=True, exist_ok=True)

    def add(self, users: pa.Table, impressions: pa.Table) -> None:
        if users.num_rows == 0 and impressions.num_rows == 0:
            return
        users = users.select(self._users_schema.names).cast(self._users_schema)
        impressions = impressions.select(self._impr_schema.names).cast(self._impr_schema)
        self._pending.append((users, impressions))
        self._pending_impressions += impressions.num_rows
        if self._pending_impressions >= self._block_impressions:
            self._flush_block()

    def _flush_block(self) -> None:
        if not self._pending:
            return
        user_tables, impr_tables, offset = [], [], 0
        for users, impressions in self._pending:
            user_tables.append(users)
            col = impressions.column(USER_COLUMN)
            impr_tables.append(impressions.set_column(0, USER_COLUMN, pc.add(col, pa.scalar(offset, pa.int32()))))
            offset += users.num_rows
        users = pa.concat_tables(user_tables).combine_chunks()
        impressions = pa.concat_tables(impr_tables).combine_chunks()
        self._pending, self._pending_impressions = [], 0
        if self._writers is None or len(self.info.parts[-1].blocks) >= self._blocks_per_file:
            self._open_part()
        uw, iw = self._writers
        uw.write_table(users, row_group_size=max(users.num_rows, 1))
        iw.write_table(impressions, row_group_size=max(impressions.num_rows, 1))
        self.info.parts[-1].blocks.append([users.num_rows, impressions.num_rows])
        self.info.num_users += users.num_rows
        self.info.num_impressions += impressions.num_rows
        self.info.num_clicks += int(pc.sum(impressions.column("click")).as_py() or 0)
        self.info.num_buys += int(pc.sum(impressions.column("buy")).as_py() or 0)

    def _open_part(self) -> None:
        self._close_writers()
        n = len(self.info.parts)
        users_rel = f"{self.split}/users-{n:05d}.parquet"
        impr_rel = f"{self.split}/impressions-{n:05d}.parquet"
        self._writers = (
            pq.ParquetWriter(self.root / users_rel, self._users_schema, compression=self._compression),
            pq.ParquetWriter(self.root / impr_rel, self._impr_schema, compression=self._compression),
        )
        self.info.parts.append(PartInfo(users=users_rel, impressions=impr_rel, blocks=[]))

    def _close_writers(self) -> None:
        if self._writers is not None:
            for w in self._writers:
                w.close()
            self._writers = None

    def abort(self) -> None:
        """Close the open part files without writing what is buffered (after an error: the dataset is not
        committed, so its parts are never read)."""
        self._pending, self._pending_impressions = [], 0
        self._close_writers()

    def close(self, skipped: dict[str, int] | None = None) -> SplitInfo:
        self._flush_block()
        self._close_writers()
        self.info.skipped = dict(skipped or {})
        return self.info


class DatasetWriter:
    """Creates a dataset directory; ``commit`` writes metadata.json last, which marks it complete.

    Opening a writer removes an existing metadata.json first, so a conversion interrupted while
    overwriting an old dataset never leaves something that looks complete.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        extra_columns: dict[str, str] | None = None,
        block_impressions: int = 65536,
        blocks_per_file: int = 16,
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / METADATA_FILE).unlink(missing_ok=True)
        self.extra_columns = dict(extra_columns or {})
        self.block_impressions = block_impressions
        self.blocks_per_file = blocks_per_file
        self.splits: dict[str, SplitInfo] = {}

    def split(self, name: str) -> SplitWriter:
        return SplitWriter(
            self.root, name, self.extra_columns, self.block_impressions, self.blocks_per_file
        )

    def commit(
        self,
        splits: dict[str, SplitInfo],
        vocab_sizes: dict[str, int],
        source: str,
        min_count: int = 1,
        source_files: Sequence[dict] = (),
        notes: dict | None = None,
        id_maps: dict | None = None,
    ) -> DatasetMetadata:
        missing = [f.name for f in ALI_CCP_FIELDS if f.name not in vocab_sizes]
        if missing:
            raise DatasetError(f"vocab_sizes lacks fields {missing}")
        meta = DatasetMetadata(
            vocab_sizes={k: int(v) for k, v in vocab_sizes.items()},
            splits=splits,
            source=source,
            min_count=min_count,
            extra_columns=self.extra_columns,
            source_files=list(source_files),
            notes=dict(notes or {}),
            id_maps=id_maps,
        )
        write_text_atomic(self.root / METADATA_FILE, meta.to_json())
        return meta
