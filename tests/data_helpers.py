"""Random but valid dist_mtl datasets for tests and benchmarks, written through ``schema.DatasetWriter``.

Everything is generated with vectorised numpy per split, then handed to the writer in chunks of whole
user groups of about ``block_impressions`` impressions, so a few million impressions take seconds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
import pyarrow as pa

from dist_mtl.data import schema
from dist_mtl.data.id_maps import FieldVocabulary, IdMaps

#: The real torch-rechub sample files, in the shared folder beside the checkout (where CI has it too).
RECHUB_SAMPLE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "torch-rechub-sample"

#: Small vocabularies (reserved index 0 included) so that random ids repeat and tests stay light.
TEST_VOCAB_SIZES: dict[str, int] = {
    name: min(size, 1000) for name, size in schema.ALI_CCP_VOCAB_AFTER_FILTER.items()
}


def write_random_dataset(
    root: str | os.PathLike,
    *,
    splits: Mapping[str, int] | None = None,
    impressions_per_user: tuple[int, int] = (1, 12),
    history_len: tuple[int, int] = (0, 30),
    seed: int = 0,
    extra_columns: Mapping[str, str] | None = None,
    block_impressions: int = 512,
    combination_len: tuple[int, int] = (0, 4),
    blocks_per_file: int = 4,
    vocab_sizes: Mapping[str, int] | None = None,
    id_maps_seed: int | None = None,
) -> schema.DatasetMetadata:
    """Write ``splits`` (split name -> number of users; default ``{"train": 200}``) under ``root`` and
    commit metadata.json.

    Ranges are inclusive ``(low, high)``: impressions per user, ids per user history field and ids per
    item combination field. ``sample_id`` runs 0..N-1 per split in storage order, so tests can check
    exactly-once coverage. ``extra_columns`` (name -> arrow type alias) get random values: floats in
    [0, 1), integers in 0..9. ``id_maps_seed``: also keep id maps (``dist_mtl.data.id_maps``) of random
    raw ids drawn from this seed, as a dataset converted from raw files has; other seeds, other maps of the
    same sizes.
    """
    vocab = dict(vocab_sizes or TEST_VOCAB_SIZES)
    writer = schema.DatasetWriter(
        root, extra_columns=dict(extra_columns or {}), block_impressions=block_impressions,
        blocks_per_file=blocks_per_file,
    )
    rng = np.random.default_rng(seed)
    infos = {}
    for name, num_users in (splits or {"train": 200}).items():
        users, impressions = _random_split(
            rng, num_users, impressions_per_user, history_len, combination_len, vocab, writer.extra_columns
        )
        split_writer = writer.split(name)
        for user_rows, impression_rows in _chunks_of_whole_groups(users, impressions, block_impressions):
            split_writer.add(user_rows, impression_rows)
        infos[name] = split_writer.close()
    id_maps = None
    if id_maps_seed is not None:
        maps_rng = np.random.default_rng(id_maps_seed)
        id_maps = IdMaps({
            name: FieldVocabulary(np.sort(maps_rng.choice(10 * size, size=size - 1, replace=False)))
            for name, size in vocab.items()
        }).write(root)
    return writer.commit(infos, vocab, source="synthetic-test", notes={"seed": seed}, id_maps=id_maps)


def _random_ids(rng: np.random.Generator, vocab_size: int, n: int) -> np.ndarray:
    return rng.integers(0, vocab_size, size=n, dtype=np.int32)


def _random_list_column(
    rng: np.random.Generator, vocab_size: int, num_rows: int, length_range: tuple[int, int]
) -> tuple[pa.Array, pa.Array]:
    lengths = rng.integers(length_range[0], length_range[1] + 1, size=num_rows)
    offsets = np.zeros(num_rows + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    ids = _random_ids(rng, vocab_size, total)
    # Count weights as in Tianchi's history lists: small positive integers stored as floats.
    weights = rng.integers(1, 20, size=total).astype(np.float32)
    offsets_arr = pa.array(offsets, pa.int32())
    return (pa.ListArray.from_arrays(offsets_arr, pa.array(ids, pa.int32())),
            pa.ListArray.from_arrays(offsets_arr, pa.array(weights, pa.float32())))


def _field_columns(
    rng: np.random.Generator,
    fields: tuple[schema.FieldSpec, ...],
    num_rows: int,
    list_lengths: tuple[int, int],
    vocab: Mapping[str, int],
) -> dict[str, pa.Array]:
    columns: dict[str, pa.Array] = {}
    for f in fields:
        if f.multi_valued:
            columns[f.name], columns[f.weight_column] = _random_list_column(
                rng, vocab[f.name], num_rows, list_lengths
            )
        else:
            columns[f.name] = pa.array(_random_ids(rng, vocab[f.name], num_rows), pa.int32())
    return columns


def _random_split(
    rng: np.random.Generator,
    num_users: int,
    impressions_per_user: tuple[int, int],
    history_len: tuple[int, int],
    combination_len: tuple[int, int],
    vocab: Mapping[str, int],
    extra_columns: Mapping[str, str],
) -> tuple[pa.Table, pa.Table]:
    """Users and impressions of one split; the impressions' ``user`` column is the split-wide user row."""
    if impressions_per_user[0] < 1:
        raise ValueError("every user needs at least one impression (impressions_per_user low >= 1)")
    counts = rng.integers(impressions_per_user[0], impressions_per_user[1] + 1, size=num_users)
    num_impressions = int(counts.sum())
    user_keys = pa.array([f"{seed_hex:032x}" for seed_hex in rng.integers(0, 2**62, size=num_users)])
    users = pa.table({schema.USER_KEY_COLUMN: user_keys,
                      **_field_columns(rng, schema.USER_FIELDS, num_users, history_len, vocab)})
    click = (rng.random(num_impressions) < 0.2).astype(np.int8)
    buy = (click & (rng.random(num_impressions) < 0.2)).astype(np.int8)
    columns: dict[str, pa.Array] = {
        schema.USER_COLUMN: pa.array(np.repeat(np.arange(num_users, dtype=np.int32), counts)),
        schema.SAMPLE_ID_COLUMN: pa.array(np.arange(num_impressions, dtype=np.int64)),
        "click": pa.array(click),
        "buy": pa.array(buy),
        **_field_columns(rng, schema.ITEM_FIELDS, num_impressions, combination_len, vocab),
    }
    for name, alias in extra_columns.items():
        arrow_type = pa.type_for_alias(alias)
        if pa.types.is_floating(arrow_type):
            values = rng.random(num_impressions)
        else:
            values = rng.integers(0, 10, size=num_impressions)
        columns[name] = pa.array(values).cast(arrow_type)
    return users, pa.table(columns)


def _chunks_of_whole_groups(users: pa.Table, impressions: pa.Table, block_impressions: int):
    """Yield (users, impressions) slices of whole user groups holding about ``block_impressions`` each,
    with ``user`` rebased to the slice, so that each ``SplitWriter.add`` call closes one block."""
    user_of_impression = impressions.column(schema.USER_COLUMN).to_numpy()
    counts = np.bincount(user_of_impression, minlength=users.num_rows)
    ends_in_impressions = np.cumsum(counts)
    # A chunk ends at the first user whose cumulative impressions reach the next multiple.
    targets = np.arange(block_impressions, int(ends_in_impressions[-1]) + block_impressions, block_impressions)
    user_ends = np.unique(np.minimum(np.searchsorted(ends_in_impressions, targets) + 1, users.num_rows))
    user_start, impression_start = 0, 0
    for user_end in user_ends.tolist():
        impression_end = int(ends_in_impressions[user_end - 1])
        chunk = impressions.slice(impression_start, impression_end - impression_start)
        local_user = pa.array(
            user_of_impression[impression_start:impression_end] - np.int32(user_start), pa.int32()
        )
        yield users.slice(user_start, user_end - user_start), chunk.set_column(0, schema.USER_COLUMN, local_user)
        user_start, impression_start = user_end, impression_end
