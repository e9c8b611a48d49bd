"""Raw requests -> GroupedBatch: raw Tianchi feature lists scored in the id space a model was trained in.

A request is what a serving system holds for one ranking call: its users' features as the common-features
file writes them, its candidate impressions' features as the sample skeleton writes them (each a
``feature_list``: ``field\\x02id\\x03value`` joined by ``\\x01``, the last column of a raw line), and which
user each impression belongs to. ``RawRequestEncoder.encode`` turns it into the GroupedBatch the reader would
have made of the same rows after conversion:

- it parses with the raw converter's parser (``raw.parse_block``), so a feature list reads as in conversion;
- it encodes with the converter's own two steps (``convert.encode_parsed``) and the model's id maps, so
  that a raw id maps to the row of the table it was trained in, a rare or new id to index 0, and a
  missing single-valued field to index 0;
- it weights multi-valued features with the reader's transform (``reader.transform_weights``).

Nothing of that path is written a second time here, so training and serving cannot drift apart:
tests/test_raw_request.py scores a model's test split from its raw text lines through this encoder and
from the converted dataset through the reader, and gets the same scores.

Checks. A feature list that does not parse raises ``RawRequestError`` naming the side, the row (0-based,
as the caller's lists count) and the field. Features the converter drops or resolves and counts (a field
id that is not Ali-CCP's, a field of the other side, a single-valued field given twice, a single-valued
feature whose value is not 1) raise as well when ``strict`` (the default: a request is assembled by
code, and such a feature points at a bug in it); with ``strict=False`` they are handled as the converter
handles them (ignored; the last of a repeated field kept; the weight dropped) and counted in ``ignored``.
Raw ids the maps do not hold are counted per field in ``ids`` (``encoded`` and ``outside``): the share
of ids a served model has no trained row for.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dist_mtl.data.batch import GroupedBatch
from dist_mtl.data.convert import IdTally, encode_parsed
from dist_mtl.data.id_maps import IdMaps
from dist_mtl.data.raw import COMMON, SKELETON, ParsedBlock, RawFileKind, RawFormatError, parse_block
from dist_mtl.data.reader import WEIGHT_TRANSFORMS, transform_weights
from dist_mtl.data.schema import ITEM_FIELDS, ITEM_KEYS, USER_FIELDS, USER_KEYS, FieldSpec

__all__ = ["RawRequestEncoder", "RawRequestError"]

RawFeatureLists = Sequence["str | bytes"]

# What the converter drops or resolves with a count (ParsedBlock's counters), and how a request names it.
_RESOLVED = {
    "unknown_fields": "is not an Ali-CCP field (the converter ignores it)",
    "misplaced_fields": "belongs to the other side's features (the converter ignores it here)",
    "repeated_fields": "is single-valued but given more than once (the converter keeps the last)",
    "single_valued_weights": "is single-valued but its value is not 1 (the converter drops the weight)",
}


class RawRequestError(ValueError):
    """A raw request that cannot be encoded; the message names the side, row and field."""


class _Side:
    def __init__(self, name: str, kind: RawFileKind, fields: tuple[FieldSpec, ...], keys: list[str]):
        self.name = name  # "user" or "item"
        self.kind = kind
        self.fields = fields
        self.keys = keys

    def line(self, row: int, features: bytes) -> bytes:
        """One raw line around a feature list; its count is the list's own, so only the list is checked."""
        count = features.count(b"\x01") + 1 if features else 0
        if self.kind is COMMON:
            return b"r%d,%d,%s\n" % (row, count, features)
        return b"%d,0,0,r,%d,%s\n" % (row, count, features)


_USER_SIDE = _Side("user", COMMON, USER_FIELDS, USER_KEYS)
_ITEM_SIDE = _Side("item", SKELETON, ITEM_FIELDS, ITEM_KEYS)


class RawRequestEncoder:
    """Encodes raw requests for a model trained on data converted with ``id_maps`` (see module docstring).

    ``weight_transform`` is the one the model was trained with (an export's ``info["weight_transform"]``).
    """

    def __init__(self, id_maps: IdMaps, weight_transform: str = "log1p", *, strict: bool = True):
        if weight_transform not in WEIGHT_TRANSFORMS:
            raise ValueError(f"weight_transform {weight_transform!r} is not one of {WEIGHT_TRANSFORMS}")
        self.id_maps = id_maps
        self.weight_transform = weight_transform
        self.strict = strict
        self.ids = IdTally()
        self.ignored: Counter = Counter()  # (side, what, field) -> features; strict=False only

    def encode(self, user_features: RawFeatureLists, item_features: RawFeatureLists,
               user_index: Sequence[int] | np.ndarray | torch.Tensor | None = None) -> GroupedBatch:
        """``user_features[u]``: user row u's feature list; ``item_features[i]``: impression i's;
        ``user_index[i]``: impression i's user row (may be left out when there is one user). Every user
        row needs at least one impression; the order of impressions is free."""
        users = self._feature_lists(user_features, _USER_SIDE)
        items = self._feature_lists(item_features, _ITEM_SIDE)
        if not users or not items:
            raise RawRequestError(f"a request needs at least one user and one impression, got {len(users)} users "
                                  f"and {len(items)} impressions")
        index = _user_index(user_index, len(users), len(items))
        # Counted apart and added once both sides encode, so that a refused request counts nothing.
        ids, ignored = IdTally(), Counter()
        user_kjt = self._encode_side(users, _USER_SIDE, ids, ignored)
        item_kjt = self._encode_side(items, _ITEM_SIDE, ids, ignored)
        for total, part in ((self.ids.encoded, ids.encoded), (self.ids.outside, ids.outside), (self.ignored, ignored)):
            total.update(part)
        return GroupedBatch(user_features=user_kjt, item_features=item_kjt, user_index=torch.from_numpy(index),
                            labels={}, source=f"raw request of {len(users)} users and {len(items)} impressions")

    @staticmethod
    def _feature_lists(lists: RawFeatureLists, side: _Side) -> list[bytes]:
        if isinstance(lists, (str, bytes)):
            raise TypeError(f"{side.name} features must be a sequence of feature lists, one per {side.name} row, "
                            f"not one {type(lists).__name__}")
        out = []
        for row, features in enumerate(lists):
            if isinstance(features, str):
                features = features.encode()
            elif not isinstance(features, bytes):
                raise TypeError(f"request {side.name} {row}: a feature list is str or bytes, not "
                                f"{type(features).__name__}")
            # A feature list is the last column of a raw line: no line break, and no comma in it.
            for char, what in ((b"\n", "a line break"), (b"\r", "a line break"), (b",", "a comma")):
                if char in features:
                    raise RawRequestError(f"request {side.name} {row}, field 'feature_list': holds {what} at "
                                          f"byte {features.index(char)}")
            out.append(features)
        return out

    def _parse(self, lists: list[bytes], side: _Side, first_row: int = 0) -> ParsedBlock:
        data = b"".join(side.line(first_row + k, features) for k, features in enumerate(lists))
        try:
            return parse_block(data, 1, f"request {side.name}s", side.kind)
        except RawFormatError as e:
            row = first_row + (e.line - 1 if e.line is not None else 0)
            raise RawRequestError(f"request {side.name} {row}, field '{e.field}': {e.detail}") from None

    def _encode_side(self, lists: list[bytes], side: _Side, ids: IdTally, ignored: Counter) -> KeyedJaggedTensor:
        block = self._parse(lists, side)
        resolved = {what: getattr(block, what) for what in _RESOLVED if getattr(block, what)}
        if resolved and self.strict:
            self._raise_first_resolved(lists, side)
        for what, counts in resolved.items():
            for field_name, n in counts.items():
                ignored[(side.name, what, field_name)] += n
        encoded = encode_parsed(block, side.fields, self.id_maps, ids)
        values, weights, lengths = [], [], []
        rows = len(lists)
        for spec in side.fields:
            column = encoded[spec.name]
            if not spec.multi_valued:
                values.append(column.to_numpy().astype(np.int64))
                weights.append(np.ones(rows, np.float32))
                lengths.append(np.ones(rows, np.int32))
                continue
            offsets = column.offsets.to_numpy()
            raw_weights = encoded[spec.weight_column].flatten().to_numpy(zero_copy_only=False).astype(np.float32)
            values.append(column.flatten().to_numpy().astype(np.int64))
            # The parser refuses values that are negative or not finite, so the transform's are finite.
            weights.append(transform_weights(raw_weights, self.weight_transform))
            lengths.append(np.diff(offsets).astype(np.int32))
        return KeyedJaggedTensor(keys=side.keys, values=torch.from_numpy(np.concatenate(values)),
                                 weights=torch.from_numpy(np.concatenate(weights)),
                                 lengths=torch.from_numpy(np.concatenate(lengths)))

    def _raise_first_resolved(self, lists: list[bytes], side: _Side) -> None:
        """The first row and field the converter would have resolved, found row by row (the error path)."""
        for row, features in enumerate(lists):
            block = self._parse([features], side, first_row=row)
            for what, text in _RESOLVED.items():
                counts = getattr(block, what)
                if counts:
                    field_name = next(iter(counts))
                    raise RawRequestError(f"request {side.name} {row}, field '{field_name}': {text}; "
                                          f"strict=False encodes it as the converter does and counts it")
        raise AssertionError("a block resolved features that none of its rows resolves alone")


def _user_index(user_index, num_users: int, num_items: int) -> np.ndarray:
    if user_index is None:
        if num_users != 1:
            raise RawRequestError(f"a request of {num_users} users needs user_index (each impression's user row)")
        return np.zeros(num_items, np.int64)
    if isinstance(user_index, torch.Tensor):
        user_index = user_index.cpu().numpy()
    index = np.asarray(user_index)
    if index.ndim != 1 or len(index) != num_items:
        raise RawRequestError(f"user_index has shape {index.shape}; the request has {num_items} impressions")
    if len(index) and not np.issubdtype(index.dtype, np.integer):
        raise RawRequestError(f"user_index holds {index.dtype} values, not integers")
    index = index.astype(np.int64)
    outside = np.flatnonzero((index < 0) | (index >= num_users))
    if len(outside):
        i = int(outside[0])
        raise RawRequestError(f"user_index[{i}] = {int(index[i])} is not a user row of the request's {num_users}")
    lonely = np.flatnonzero(np.bincount(index, minlength=num_users) == 0)
    if len(lonely):
        raise RawRequestError(f"request user {int(lonely[0])} has no impression in user_index")
    return index
