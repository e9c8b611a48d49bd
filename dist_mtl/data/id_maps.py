"""A dataset's id maps: per field, which raw Tianchi feature id has which embedding index.

Layout: ``<root>/id_maps.parquet``, one row per field: ``field`` (the field id, e.g. "205") and
``raw_ids`` (list<int64>, strictly ascending). The raw id at position k of a field's list has index
k + 1; every other raw id (rarer than the conversion's ``min_count``, or unseen in its train split) and a
missing single-valued field have index 0. ``metadata.json`` names the file and the SHA-256 of the maps
(``IdMaps.digest``), so a replaced or damaged file is refused on load, and two datasets, a checkpoint and
an export can tell whether they share one id space by comparing digests alone.

The raw converter writes them. It also converts new raw files with an existing dataset's maps
(``convert_raw(id_maps_from=...)``): a later day of logs, or a split converted after the model was
trained, then lands in the id space the model's tables were trained on. An export carries them, so that a
serving system encodes raw requests with the maps the model was trained with.

Datasets that never saw raw ids (torch-rechub's encoded CSV, the synthetic generator's direct Parquet)
have none.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dist_mtl.data.schema import ALI_CCP_FIELDS, FIELDS_BY_NAME, DatasetError, DatasetMetadata

__all__ = ["ID_MAPS_FILE", "FieldVocabulary", "IdMaps"]

ID_MAPS_FILE = "id_maps.parquet"
_SCHEMA = pa.schema([pa.field("field", pa.string()), pa.field("raw_ids", pa.list_(pa.int64()))])


def _maps_schema(schema: pa.Schema) -> bool:
    """The written schema up to what other writers vary (a list's item name and nullability, large types),
    as the reader's own column check allows."""
    if schema.names != _SCHEMA.names:
        return False
    field, raw_ids = schema.field("field").type, schema.field("raw_ids").type
    return ((pa.types.is_string(field) or pa.types.is_large_string(field))
            and (pa.types.is_list(raw_ids) or pa.types.is_large_list(raw_ids))
            and raw_ids.value_type == pa.int64())


class FieldVocabulary:
    """One field's kept raw ids -> indices 1..V (ascending raw id); every other id -> 0.

    Encodes through a dense table over the kept ids' range when that range is small next to V (raw
    Ali-CCP ids are compact per field: a table gather is ~4x faster than a binary search), else through
    np.searchsorted.
    """

    def __init__(self, kept_ids: np.ndarray):
        self.kept_ids = np.asarray(kept_ids, np.int64)
        self._table: np.ndarray | None = None
        if len(self.kept_ids):
            self._low = int(self.kept_ids[0])
            span = int(self.kept_ids[-1]) - self._low + 1
            if span <= 4 * len(self.kept_ids) + (1 << 20):
                self._table = np.zeros(span, np.int32)
                self._table[self.kept_ids - self._low] = np.arange(1, len(self.kept_ids) + 1, dtype=np.int32)

    @property
    def size(self) -> int:
        """Embedding rows needed: V kept ids plus the reserved index 0."""
        return len(self.kept_ids) + 1

    def encode(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        if not len(self.kept_ids) or not len(ids):
            return np.zeros(len(ids), np.int32)
        if self._table is not None:
            position = ids - self._low
            outside = (position < 0) | (position >= len(self._table))
            np.clip(position, 0, len(self._table) - 1, out=position)
            out = self._table[position]
            out[outside] = 0
            return out
        position = np.searchsorted(self.kept_ids, ids)
        np.minimum(position, len(self.kept_ids) - 1, out=position)
        found = self.kept_ids[position] == ids
        return np.where(found, position + 1, 0).astype(np.int32)


class IdMaps:
    """Every Ali-CCP field's ``FieldVocabulary``."""

    def __init__(self, vocabularies: Mapping[str, FieldVocabulary]):
        missing = [f.name for f in ALI_CCP_FIELDS if f.name not in vocabularies]
        unknown = sorted(set(vocabularies) - set(FIELDS_BY_NAME))
        if missing or unknown:
            raise ValueError(f"id maps need exactly the Ali-CCP fields: missing {missing}, unknown {unknown}")
        self._fields = {f.name: vocabularies[f.name] for f in ALI_CCP_FIELDS}
        self._digest: str | None = None

    def __getitem__(self, field: str) -> FieldVocabulary:
        return self._fields[field]

    def encode(self, field: str, raw_ids: np.ndarray) -> np.ndarray:
        """Raw feature ids of ``field`` -> int32 indices (0 for ids the maps do not hold)."""
        return self._fields[field].encode(raw_ids)

    @property
    def vocab_sizes(self) -> dict[str, int]:
        return {name: v.size for name, v in self._fields.items()}

    @property
    def digest(self) -> str:
        """SHA-256 over every field's name, length and raw ids (little-endian int64), in schema order."""
        if self._digest is None:
            h = hashlib.sha256()
            for name, vocab in self._fields.items():
                h.update(name.encode() + b"\0" + len(vocab.kept_ids).to_bytes(8, "little"))
                h.update(vocab.kept_ids.astype("<i8", copy=False).tobytes())
            self._digest = h.hexdigest()
        return self._digest

    def write(self, root: str | os.PathLike) -> dict:
        """Write ``<root>/id_maps.parquet`` (tmp + rename); returns the entry for ``metadata.json``."""
        path = Path(root) / ID_MAPS_FILE
        table = pa.table(
            [pa.array(list(self._fields), pa.string()),
             pa.array([v.kept_ids for v in self._fields.values()], pa.list_(pa.int64()))],
            schema=_SCHEMA,
        )
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
        return {"file": ID_MAPS_FILE, "sha256": self.digest}

    @classmethod
    def load(cls, root: str | os.PathLike, metadata: DatasetMetadata | None = None) -> "IdMaps":
        """The maps of the dataset at ``root``, checked against its ``metadata.json``."""
        meta = metadata if metadata is not None else DatasetMetadata.load(root)
        if meta.id_maps is None:
            raise DatasetError(
                f"{root} keeps no id maps (source '{meta.source}'): datasets converted from raw Tianchi files "
                f"by this version or later have them; torch-rechub imports and the synthetic generator's direct "
                f"Parquet never saw raw ids"
            )
        return cls.read(Path(root) / meta.id_maps["file"], meta.id_maps["sha256"], meta.vocab_sizes,
                        Path(root) / "metadata.json")

    @classmethod
    def read(cls, path: str | os.PathLike, sha256: str, vocab_sizes: Mapping[str, int],
             described_by: str | os.PathLike) -> "IdMaps":
        """Read an id maps file that ``described_by`` (a metadata.json, an export.json) gives with the
        digest ``sha256`` and the tables' ``vocab_sizes``; a DatasetError names the file, row and field of
        anything that does not fit."""
        path = Path(path)
        if not path.is_file():
            raise DatasetError(f"{path}: no such file; {described_by} names it as the id maps")
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise DatasetError(f"{path}: not a Parquet file of id maps ({e})") from e
        if not _maps_schema(table.schema):
            raise DatasetError(f"{path}: columns {table.schema} are not the id maps' (field: string, "
                               f"raw_ids: list of int64)")
        vocabularies: dict[str, FieldVocabulary] = {}
        raw_ids = table.column("raw_ids").combine_chunks()
        for row, name in enumerate(table.column("field").to_pylist()):
            where = f"{path}: row {row}, field '{name}'"
            if name not in FIELDS_BY_NAME:
                raise DatasetError(f"{where}: not an Ali-CCP field")
            if name in vocabularies:
                raise DatasetError(f"{where}: the field is listed twice")
            if not raw_ids[row].is_valid:
                raise DatasetError(f"{where}: raw_ids is null")
            if raw_ids[row].values.null_count:
                raise DatasetError(f"{where}: raw_ids holds nulls")
            ids = raw_ids[row].values.to_numpy(zero_copy_only=False)
            unsorted = np.flatnonzero(ids[1:] <= ids[:-1])
            if len(unsorted):
                k = int(unsorted[0]) + 1
                raise DatasetError(f"{where}: raw ids are not strictly ascending at position {k} "
                                   f"({ids[k - 1]} then {ids[k]}); every index after it would be wrong")
            if len(ids) + 1 != vocab_sizes[name]:
                raise DatasetError(f"{where}: {len(ids)} raw ids, but {described_by} gives the field "
                                   f"{vocab_sizes[name]} embedding rows, which means {vocab_sizes[name] - 1}")
            vocabularies[name] = FieldVocabulary(ids)
        missing = [f.name for f in ALI_CCP_FIELDS if f.name not in vocabularies]
        if missing:
            raise DatasetError(f"{path}: fields {missing} are missing")
        maps = cls(vocabularies)
        if maps.digest != sha256:
            raise DatasetError(f"{path}: the maps' SHA-256 {maps.digest} is not the {sha256} that "
                               f"{described_by} gives (the file was replaced or damaged)")
        return maps
