"""ParquetGroupReader: exactly-once coverage per rank and worker, grouping, content, resume and errors."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_helpers import write_random_dataset
from dist_mtl.data import schema
from dist_mtl.data.reader import ParquetGroupReader, make_dataloader
from dist_mtl.data.schema import DatasetError

BATCH = 40
WINDOW_BLOCKS = 5
EXTRA = {"dwell": "float32"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reader_ds")
    # ~780 impressions in ~12 uneven blocks over 4 part files; windows of 5, 5 and 2 blocks.
    write_random_dataset(root, splits={"train": 120, "tiny": 1}, impressions_per_user=(1, 12),
                         block_impressions=64, blocks_per_file=3, extra_columns=EXTRA, seed=3)
    return root


@pytest.fixture(scope="module")
def expected(dataset) -> dict:
    """sample_id -> the impression's user key, item features, labels; user key -> user features."""
    meta = schema.DatasetMetadata.load(dataset)
    impressions, users = {}, {}
    for part in meta.split("train").parts:
        upf, ipf = pq.ParquetFile(dataset / part.users), pq.ParquetFile(dataset / part.impressions)
        for rg in range(upf.num_row_groups):
            urows = upf.read_row_group(rg).to_pylist()
            for row in urows:
                users[row[schema.USER_KEY_COLUMN]] = _features(row, schema.USER_FIELDS)
            for row in ipf.read_row_group(rg).to_pylist():
                impressions[row[schema.SAMPLE_ID_COLUMN]] = {
                    "user": urows[row[schema.USER_COLUMN]][schema.USER_KEY_COLUMN],
                    "item": _features(row, schema.ITEM_FIELDS),
                    "click": row["click"], "buy": row["buy"], "dwell": row["dwell"],
                }
    return {"impressions": impressions, "users": users}


def _features(row: dict, fields) -> dict[str, tuple[list[int], list[float]]]:
    out = {}
    for f in fields:
        if f.multi_valued:
            out[f.name] = (row[f.name], row[f.weight_column])
        else:
            out[f.name] = ([row[f.name]], [1.0])
    return out


def _reader(root, split="train", batch_size=BATCH, **kw) -> ParquetGroupReader:
    kw.setdefault("window_blocks", WINDOW_BLOCKS)
    kw.setdefault("extra_columns", ("sample_id", "dwell"))
    return ParquetGroupReader(root, split, batch_size, **kw)


def _sample_ids(batches) -> list[list[int]]:
    return [b.labels["sample_id"].tolist() for b in batches]


def _kjt_rows(kjt) -> dict[str, list[tuple[list[int], list[float]]]]:
    return {k: list(zip(jt.to_dense(), jt.to_dense_weights())) for k, jt in kjt.to_dict().items()}


# -- partition: exactly once, equal steps, any world size and worker count -----------------------

@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_exactly_once_for_any_world_size_and_worker_count(dataset, world_size):
    n = schema.DatasetMetadata.load(dataset).split("train").num_impressions
    reference = None
    for num_workers in (0, 1, 2):
        per_rank = []
        for rank in range(world_size):
            reader = _reader(dataset, rank=rank, world_size=world_size)
            batches = _sample_ids(make_dataloader(reader, num_workers=num_workers))
            assert len(batches) == reader.steps_per_epoch()
            sizes = [len(b) for b in batches]
            assert max(sizes) <= BATCH and max(sizes) - min(sizes) <= 1
            per_rank.append(batches)
        steps = {len(b) for b in per_rank}
        assert len(steps) == 1, f"ranks took different step counts {steps}"
        flat = [s for batches in per_rank for b in batches for s in b]
        assert sorted(flat) == list(range(n))
        # The DataLoader's round-robin over workers reproduces the single-process order exactly.
        if reference is None:
            reference = per_rank
        else:
            assert per_rank == reference, f"order differs with {num_workers} workers"


def _batch_content(batch) -> tuple:
    """Everything a batch holds, as plain values: equal content means the same batch."""
    def kjt(k):
        return (k.keys(), k.values().tolist(), k.weights().tolist(), k.lengths().tolist())
    return (kjt(batch.user_features), kjt(batch.item_features), batch.user_index.tolist(),
            {name: v.tolist() for name, v in batch.labels.items()}, batch.source)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("batch_size,window_blocks", [(BATCH, WINDOW_BLOCKS), (300, 1)])
def test_workers_yield_the_very_batches_of_one_process(dataset, batch_size, window_blocks):
    """Workers load disjoint windows and send each window's batches; batches that straddle windows
    (all of them at 300 impressions over one-block windows) are assembled from pieces of several workers."""
    for rank, world in ((0, 1), (1, 3)):
        reference = [_batch_content(b) for b in _reader(dataset, batch_size=batch_size, window_blocks=window_blocks,
                                                         rank=rank, world_size=world)]
        if window_blocks == 1:
            assert any(c[-1].count("window") >= 3 for c in reference), "no batch spans three windows"
        for num_workers in (1, 2, 3):
            reader = _reader(dataset, batch_size=batch_size, window_blocks=window_blocks, rank=rank, world_size=world)
            got = [_batch_content(b) for b in make_dataloader(reader, num_workers=num_workers)]
            assert got == reference, f"rank {rank}/{world}, {num_workers} workers"
            assert reader.state_dict()["next_batch"] == reader.steps_per_epoch()


def test_each_window_is_loaded_by_one_worker_once(dataset, tmp_path, monkeypatch):
    from dist_mtl.data import reader as reader_module

    log = tmp_path / "loads.txt"
    original = reader_module._WindowLoader.load

    def recording_load(self, window):  # runs in the (forked) worker processes
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {window}\n")
        return original(self, window)

    monkeypatch.setattr(reader_module._WindowLoader, "load", recording_load)
    reader = _reader(dataset, window_blocks=1, rank=1, world_size=2)
    read = {int(w) for b in reader for w in re.findall(r"window (\d+)", b.source)}
    log.unlink()
    reader.set_epoch(0)
    batches = list(make_dataloader(reader, num_workers=2))
    loads = [line.split() for line in log.read_text().splitlines()]
    windows = [int(w) for _, w in loads]
    assert sorted(windows) == sorted(read), "a window loaded twice, or one the rank does not read"
    assert len({pid for pid, _ in loads}) == 2, "the loads were not shared by the two workers"
    assert len(batches) == reader.steps_per_epoch()


def test_the_dataloaders_pinning_thread_pins_every_batch_of_a_window_part(dataset, monkeypatch):
    """Pinning needs CUDA; here a stand-in records what the DataLoader's pin step would pin."""
    from torch.utils.data._utils.pin_memory import pin_memory as dataloader_pin_memory

    from dist_mtl.data.batch import GroupedBatch
    from dist_mtl.data.reader import _WindowPart

    pinned = []
    monkeypatch.setattr(GroupedBatch, "pin_memory", lambda self: pinned.append(self.source) or self)
    parts = [dataloader_pin_memory(part) for part in _reader(dataset)._window_parts(0, 1)]
    assert all(isinstance(p, _WindowPart) for p in parts)
    whole = [item.source for p in parts for _, item, _ in p.entries if isinstance(item, GroupedBatch)]
    pieces = [item for p in parts for _, item, _ in p.entries if not isinstance(item, GroupedBatch)]
    assert whole and pieces and pinned == whole


@pytest.mark.filterwarnings("ignore:.*pin_memory")
def test_pin_memory_with_workers_yields_the_same_batches(dataset):
    """Pinned on a CUDA machine (tests/test_cuda.py moves pinned batches); here it must change nothing."""
    reference = [_batch_content(b) for b in _reader(dataset, batch_size=300, window_blocks=1)]
    loader = make_dataloader(_reader(dataset, batch_size=300, window_blocks=1), num_workers=2, pin_memory=True)
    assert [_batch_content(b) for b in loader] == reference


def test_the_reader_itself_refuses_to_run_in_a_dataloader_worker(dataset):
    loader = torch.utils.data.DataLoader(_reader(dataset), batch_size=None, num_workers=1)
    with pytest.raises(RuntimeError, match="make_dataloader"):
        next(iter(loader))


def test_steps_and_stats_follow_the_balanced_policy(dataset):
    n = schema.DatasetMetadata.load(dataset).split("train").num_impressions
    for world_size in (1, 2, 3, 4, 7):
        readers = [_reader(dataset, rank=r, world_size=world_size) for r in range(world_size)]
        expected_steps = -(-(-(-n // world_size)) // BATCH)
        assert {r.steps_per_epoch() for r in readers} == {expected_steps}
        stats = readers[-1].stats()
        assert sum(stats["impressions_per_rank"]) == n
        assert max(stats["impressions_per_rank"]) - min(stats["impressions_per_rank"]) <= 1
        assert stats["dropped"] == 0 and stats["padded"] == 0
        assert stats["batch_impressions_max"] <= BATCH
        # The stats are the plan; the batches themselves must follow it.
        sizes = [[b.num_impressions for b in r] for r in readers]
        assert [sum(s) for s in sizes] == stats["impressions_per_rank"]
        assert {len(s) for s in sizes} == {expected_steps}
        assert max(max(s) for s in sizes) <= BATCH and min(min(s) for s in sizes) > 0


def test_batches_spanning_several_windows(dataset, expected):
    n = schema.DatasetMetadata.load(dataset).split("train").num_impressions
    seen = []
    for rank in range(2):
        reader = _reader(dataset, batch_size=300, window_blocks=1, rank=rank, world_size=2)
        for batch in reader:
            batch.validate()
            assert batch.source.count("window") >= 2 or batch.num_impressions < 150
            _assert_matches_parquet(batch, expected)
            seen += batch.labels["sample_id"].tolist()
    assert sorted(seen) == list(range(n))


def test_every_rank_loads_windows_at_the_steps_where_rank_0_starts_one(dataset, monkeypatch):
    """A window load stalls every rank at the next collective, so ranks load at the same steps."""
    from dist_mtl.data import reader as reader_module

    original = reader_module._WindowLoader.load
    active: list[ParquetGroupReader] = []
    load_steps: dict[int, set[int]] = {}
    first_use: dict[int, dict[int, int]] = {}  # rank -> window -> first batch that reads it

    def recording_load(self, window):
        reader = active[0]
        load_steps.setdefault(reader.rank, set()).add(reader.state_dict()["next_batch"])
        return original(self, window)

    monkeypatch.setattr(reader_module._WindowLoader, "load", recording_load)
    world = 3
    for rank in range(world):
        reader = _reader(dataset, batch_size=12, window_blocks=1, rank=rank, world_size=world)
        active[:] = [reader]
        for step, batch in enumerate(reader):
            for window in {int(w) for w in re.findall(r"window (\d+)", batch.source)}:
                first_use.setdefault(rank, {}).setdefault(window, step)
    assert all(load_steps[r] <= load_steps[0] for r in range(world)), load_steps
    # Not vacuous: some rank loads a window before the first batch that reads it.
    early = [(r, w) for r in range(1, world) for w, step in first_use[r].items() if step not in load_steps[r]]
    assert early


# -- order: determinism, shuffling, grouping -------------------------------------------------------

def test_order_is_deterministic_by_seed_and_epoch(dataset):
    def order(seed=0, epoch=0, shuffle=True):
        reader = _reader(dataset, seed=seed, shuffle=shuffle)
        reader.set_epoch(epoch)
        return [s for b in _sample_ids(reader) for s in b]

    first = order()
    assert order() == first
    assert order(seed=1) != first
    assert order(epoch=1) != first
    assert order(seed=1, epoch=1) == order(seed=1, epoch=1)
    assert order(shuffle=False) == sorted(first)  # storage order; the helper numbers samples that way


def test_users_stay_together_and_straddling_users_are_copied(dataset, expected):
    reader = _reader(dataset, rank=1, world_size=2)
    batches = list(reader)
    impressions = expected["impressions"]
    stream_users = []
    straddling = 0
    for i, batch in enumerate(batches):
        ids = batch.labels["sample_id"].tolist()
        keys = [impressions[s]["user"] for s in ids]
        user_index = batch.user_index.tolist()
        assert user_index == sorted(user_index)
        assert batch.num_users == len(set(keys)) == user_index[-1] + 1
        row_of_key = {}
        for key, row in zip(keys, user_index):
            assert row_of_key.setdefault(key, row) == row, "one user split over two rows of a batch"
        if i and keys[0] == stream_users[-1]:
            # Cut by the boundary: the last user row of the previous batch and the first of this one.
            straddling += 1
            want = expected["users"][keys[0]]
            before = _kjt_rows(batches[i - 1].user_features)
            after = _kjt_rows(batch.user_features)
            last = batches[i - 1].num_users - 1
            for f in schema.USER_FIELDS:
                _assert_feature(before[f.name][last], want[f.name], f, np.log1p)
                _assert_feature(after[f.name][0], want[f.name], f, np.log1p)
        stream_users += keys
        # A user's impressions keep their file order.
        for key in set(keys):
            mine = [s for s, k in zip(ids, keys) if k == key]
            assert mine == sorted(mine)
    runs = [k for j, k in enumerate(stream_users) if j == 0 or k != stream_users[j - 1]]
    assert len(runs) == len(set(runs)), "a user's impressions are not contiguous in the stream"
    assert straddling > 0, "the fixture should produce users cut by a batch boundary"


def _assert_matches_parquet(batch, expected, transform=np.log1p):
    impressions, users = expected["impressions"], expected["users"]
    assert batch.user_features.keys() == [f.name for f in schema.USER_FIELDS]
    assert batch.item_features.keys() == [f.name for f in schema.ITEM_FIELDS]
    for kjt in (batch.user_features, batch.item_features):
        assert kjt.values().dtype == torch.int64 and kjt.lengths().dtype == torch.int32
        assert kjt.weights().dtype == torch.float32
    assert batch.user_index.dtype == torch.int64 and batch.dense is None
    user_rows, item_rows = _kjt_rows(batch.user_features), _kjt_rows(batch.item_features)
    for i, sample_id in enumerate(batch.labels["sample_id"].tolist()):
        want = impressions[sample_id]
        for f in schema.ITEM_FIELDS:
            _assert_feature(item_rows[f.name][i], want["item"][f.name], f, transform)
        for f in schema.USER_FIELDS:
            u = int(batch.user_index[i])
            _assert_feature(user_rows[f.name][u], users[want["user"]][f.name], f, transform)
        for label in ("click", "buy", "dwell"):
            assert batch.labels[label][i].item() == pytest.approx(want[label])
    assert {k: v.dtype for k, v in batch.labels.items()} == {
        "click": torch.float32, "buy": torch.float32, "sample_id": torch.int64, "dwell": torch.float32}


def _assert_feature(got, want, spec, transform):
    ids, weights = got
    assert ids.tolist() == want[0], spec.name
    want_weights = np.asarray(want[1], dtype=np.float32)
    if spec.multi_valued:
        want_weights = transform(want_weights)
    np.testing.assert_allclose(weights.numpy(), want_weights, rtol=1e-6, err_msg=spec.name)


def test_batches_equal_the_parquet_rows(dataset, expected):
    reader = _reader(dataset, rank=0, world_size=2)
    batches = list(reader)
    for batch in batches[:3] + batches[-2:]:
        batch.validate()
        assert ".parquet rg " in batch.source and "window" in batch.source
        _assert_matches_parquet(batch, expected)
    raw = _reader(dataset, weight_transform="none")
    _assert_matches_parquet(next(iter(raw)), expected, transform=lambda w: w)


def test_batches_survive_pickling(dataset):
    batch = next(iter(_reader(dataset)))
    copy = pickle.loads(pickle.dumps(batch))
    assert torch.equal(copy.user_features.values(), batch.user_features.values())
    assert torch.equal(copy.item_features.weights(), batch.item_features.weights())
    assert copy.user_features.keys() == batch.user_features.keys()


# -- cursor and resume -------------------------------------------------------------------------------

@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_yields_exactly_the_rest(dataset, num_workers):
    epoch, taken = 1, 3
    full = _reader(dataset, rank=2, world_size=3)
    full.set_epoch(epoch)
    uninterrupted = _sample_ids(full)

    first = _reader(dataset, rank=2, world_size=3)
    first.set_epoch(epoch)
    head = []
    for batch in make_dataloader(first, num_workers=num_workers):
        head.append(batch.labels["sample_id"].tolist())
        if len(head) == taken:
            break
    state = first.state_dict()
    assert (state["epoch"], state["next_batch"]) == (epoch, taken)

    resumed = _reader(dataset, rank=2, world_size=3)
    resumed.load_state_dict(state)
    tail = _sample_ids(make_dataloader(resumed, num_workers=num_workers))
    assert head + tail == uninterrupted
    assert resumed.state_dict()["next_batch"] == resumed.steps_per_epoch()

    # The trainer's own form of the cursor (an odd start, so workers end unevenly) works the same.
    trainer_state = {"epoch": epoch, "next_batch": taken + 2}
    again = _reader(dataset, rank=2, world_size=3)
    again.load_state_dict(trainer_state)
    assert _sample_ids(make_dataloader(again, num_workers=num_workers)) == uninterrupted[taken + 2:]


def test_exhausted_epoch_yields_nothing_until_set_epoch(dataset):
    reader = _reader(dataset)
    n_batches = len(list(reader))
    assert list(reader) == []
    reader.set_epoch(1)
    assert reader.state_dict()["next_batch"] == 0
    assert len(list(reader)) == n_batches


def test_mid_epoch_state_rejects_another_world_size(dataset):
    state = {**_reader(dataset, world_size=2).state_dict(), "next_batch": 2}
    with pytest.raises(ValueError, match="world_size"):
        _reader(dataset, world_size=3).load_state_dict(state)
    _reader(dataset, world_size=3).load_state_dict({**state, "next_batch": 0})
    with pytest.raises(ValueError, match="outside"):
        _reader(dataset).load_state_dict({"epoch": 0, "next_batch": 10_000})


# -- configuration errors ----------------------------------------------------------------------------

def test_tiny_split_and_bad_arguments_are_rejected(dataset):
    tiny = schema.DatasetMetadata.load(dataset).split("tiny").num_impressions
    with pytest.raises(DatasetError, match="split 'tiny'"):
        _reader(dataset, split="tiny", world_size=tiny + 1)
    with pytest.raises(DatasetError, match="no split 'nope'"):
        _reader(dataset, split="nope")
    with pytest.raises(DatasetError, match="extra column 'clicks_7d'"):
        _reader(dataset, extra_columns=("clicks_7d",))
    with pytest.raises(ValueError, match="weight_transform"):
        _reader(dataset, weight_transform="sqrt")
    with pytest.raises(ValueError, match="rank 2"):
        _reader(dataset, rank=2, world_size=2)


# -- data errors -------------------------------------------------------------------------------------

@pytest.fixture
def small(tmp_path) -> Path:
    write_random_dataset(tmp_path, splits={"train": 30}, block_impressions=48, blocks_per_file=2,
                         history_len=(2, 6), combination_len=(1, 3), seed=5)
    return tmp_path


def _first_error(root, **kw) -> str:
    with pytest.raises(DatasetError) as info:
        for _ in ParquetGroupReader(root, "train", 16, shuffle=False, **kw):
            pass
    return str(info.value)


def _rewrite(path: Path, edit: Callable[[int, pa.Table], pa.Table]) -> None:
    """Rewrite a part file row group by row group (keeping the row group layout) through ``edit``."""
    pf = pq.ParquetFile(path)
    tables = [edit(rg, pf.read_row_group(rg)) for rg in range(pf.num_row_groups)]
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, tables[0].schema) as writer:
        for table in tables:
            writer.write_table(table, row_group_size=max(table.num_rows, 1))
    os.replace(tmp, path)


def _set_value(table: pa.Table, name: str, row: int, value) -> pa.Table:
    column = table.column(name).combine_chunks()
    index = table.schema.get_field_index(name)
    if pa.types.is_list(column.type):
        values = column.flatten().to_numpy().copy()
        values[int(column.offsets[row].as_py())] = value
        new = pa.ListArray.from_arrays(column.offsets, pa.array(values, column.type.value_type))
    else:
        values = column.to_numpy().copy()
        values[row] = value
        new = pa.array(values, column.type)
    return table.set_column(index, name, new)


def _at(rg_wanted: int, row: int, name: str, value):
    return lambda rg, t: _set_value(t, name, row, value) if rg == rg_wanted else t


def test_missing_metadata_means_incomplete_dataset(small):
    (small / schema.METADATA_FILE).unlink()
    with pytest.raises(DatasetError, match="metadata.json: no such file.*not a complete"):
        ParquetGroupReader(small, "train", 16)


def test_missing_part_file_is_named(small):
    (small / "train/impressions-00001.parquet").unlink()
    with pytest.raises(DatasetError, match="impressions-00001.parquet: no such file"):
        ParquetGroupReader(small, "train", 16)


def test_truncated_part_file_is_named(small):
    path = small / "train/users-00000.parquet"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "users-00000.parquet: cannot open as Parquet (missing, truncated or corrupt)" in _first_error(small)


def test_corrupt_row_group_is_named(small):
    # Zero the data pages but keep the footer: the file opens, its first row group cannot be decoded.
    path = small / "train/impressions-00000.parquet"
    data = bytearray(path.read_bytes())
    data[4:len(data) // 2] = bytes(len(data) // 2 - 4)
    path.write_bytes(bytes(data))
    assert "impressions-00000.parquet row group 0: cannot be read" in _first_error(small)


def test_schema_mismatch_names_file_and_column(small):
    path = small / "train/impressions-00000.parquet"
    _rewrite(path, lambda rg, t: t.set_column(t.schema.get_field_index("206"), "206",
                                               t.column("206").cast(pa.int64())))
    message = _first_error(small)
    assert "impressions-00000.parquet: schema mismatch: column '206' has type int64, expected int32" in message


def test_row_count_mismatch_with_metadata(small):
    meta_path = small / schema.METADATA_FILE
    meta = json.loads(meta_path.read_text())
    meta["splits"]["train"]["parts"][0]["blocks"][1][1] += 1
    meta["splits"]["train"]["num_impressions"] += 1  # the totals agree: the files are what disagrees
    meta_path.write_text(json.dumps(meta))
    assert "impressions-00000.parquet row group 1: " in _first_error(small)


def _edit(meta: dict, path: str, value) -> None:
    keys = path.split("/")
    for k in keys[:-1]:
        meta = meta[int(k) if isinstance(meta, list) else k]
    last = keys[-1]
    if value is _DELETE:
        del meta[last]
    else:
        meta[int(last) if isinstance(meta, list) else last] = value


_DELETE = object()
_TRAIN_PART = "splits/train/parts/0"
METADATA_DAMAGE = {
    "block_of_one_number": (f"{_TRAIN_PART}/blocks/0", [5], "blocks[0]: [5] is not [num_users, num_impressions]"),
    "block_of_strings": (f"{_TRAIN_PART}/blocks/0", ["5", "7"], "blocks[0][0]: '5' is not an integer >= 0"),
    "blocks_null": (f"{_TRAIN_PART}/blocks", None, "blocks: is not a list"),
    "part_path_not_a_string": (f"{_TRAIN_PART}/users", 5, "users: 5 is not a file path"),
    "vocab_field_missing": ("vocab_sizes/205", _DELETE, "vocab_sizes: field '205' is missing"),
    "vocab_size_a_string": ("vocab_sizes/205", "1000", "vocab_sizes['205']: '1000' is not an integer >= 1"),
    "wrong_total": ("splits/train/num_impressions", 5, "num_impressions / num_users are 5 / "),
    "splits_a_list": ("splits", [], "not a dist_mtl metadata file"),
    "split_null": ("splits/train", None, "not a dist_mtl metadata file"),
    "bad_extra_type": ("extra_columns", {"x": "int33"}, "extra_columns['x']: 'int33' is not an Arrow type name"),
}


@pytest.mark.parametrize("case", sorted(METADATA_DAMAGE))
def test_damaged_metadata_is_an_error_naming_the_key(small, case):
    path, value, expected = METADATA_DAMAGE[case]
    meta_path = small / schema.METADATA_FILE
    meta = json.loads(meta_path.read_text())
    _edit(meta, path, value)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DatasetError) as info:
        ParquetGroupReader(small, "train", 16)
    assert "metadata.json" in str(info.value) and expected in str(info.value)


def test_a_part_listed_twice_is_an_error(small):
    meta_path = small / schema.METADATA_FILE
    meta = json.loads(meta_path.read_text())
    split = meta["splits"]["train"]
    split["parts"].append(dict(split["parts"][0]))  # its rows would be read twice
    split["num_impressions"] += sum(b[1] for b in split["parts"][0]["blocks"])
    split["num_users"] += sum(b[0] for b in split["parts"][0]["blocks"])
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"parts\[\d\]\.users: 'train/users-00000.parquet' is listed twice"):
        ParquetGroupReader(small, "train", 16)
    meta_path.write_bytes(b"\xff\xfe not json")
    with pytest.raises(DatasetError, match="metadata.json: not a dist_mtl metadata file"):
        ParquetGroupReader(small, "train", 16)


def test_id_beyond_vocabulary_names_field_file_row_group_row(small):
    vocab = schema.DatasetMetadata.load(small).vocab_sizes
    _rewrite(small / "train/impressions-00000.parquet", _at(1, 3, "206", vocab["206"]))
    message = _first_error(small)
    assert f"impressions-00000.parquet row group 1 row 3: field '206' id {vocab['206']} is outside" in message
    # validate=False trusts the ids (the structural checks still run).
    assert sum(b.num_impressions for b in ParquetGroupReader(small, "train", 16, validate=False)) > 0


def test_a_workers_data_error_reaches_the_consumer_naming_file_row_and_field(small):
    vocab = schema.DatasetMetadata.load(small).vocab_sizes
    _rewrite(small / "train/impressions-00000.parquet", _at(1, 3, "206", vocab["206"]))
    with pytest.raises(DatasetError, match=r"impressions-00000.parquet row group 1 row 3: field '206' id \d+ is "
                                           r"outside"):
        for _ in make_dataloader(ParquetGroupReader(small, "train", 16, shuffle=False), num_workers=2):
            pass


def test_history_id_beyond_vocabulary_is_located_by_user_row(small):
    vocab = schema.DatasetMetadata.load(small).vocab_sizes
    _rewrite(small / "train/users-00001.parquet", _at(0, 2, "110_14", vocab["110_14"] + 5))
    message = _first_error(small)
    assert f"users-00001.parquet row group 0 row 2: field '110_14' id {vocab['110_14'] + 5}" in message


def test_orphan_user_row(small):
    # Point user 0's impressions of block 0 at user 1: user row 0 is left without impressions.
    def edit(rg, t):
        if rg:
            return t
        users = t.column("user").to_numpy().copy()
        users[users == 0] = 1
        return t.set_column(0, "user", pa.array(users, pa.int32()))

    _rewrite(small / "train/impressions-00000.parquet", edit)
    assert "users-00000.parquet row group 0 row 0: user row with no impressions" in _first_error(small)


def test_user_column_outside_its_block(small):
    users_in_block0 = schema.DatasetMetadata.load(small).split("train").parts[0].blocks[0][0]
    _rewrite(small / "train/impressions-00000.parquet", _at(0, 4, "user", users_in_block0))
    message = _first_error(small)
    assert f"impressions-00000.parquet row group 0 row 4: field 'user' = {users_in_block0} is outside" in message


def test_label_outside_zero_one(small):
    _rewrite(small / "train/impressions-00000.parquet", _at(0, 1, "click", 2))
    assert "row group 0 row 1: label 'click' value 2 is not 0 or 1" in _first_error(small)


def test_non_finite_weight(small):
    _rewrite(small / "train/users-00000.parquet", _at(0, 0, "127_14_w", float("nan")))
    assert "users-00000.parquet row group 0 row 0: field '127_14_w' weight nan is not finite" in _first_error(small)


def test_interleaved_users_in_a_block_are_regrouped_in_file_order(small):
    # Reverse the rows of block 0: users are still whole in the block but their impressions interleave
    # with the stream order; the reader regroups them and keeps each user's impressions in file order.
    _rewrite(small / "train/impressions-00000.parquet",
             lambda rg, t: t.take(pa.array(np.arange(t.num_rows)[::-1])) if rg == 0 else t)
    block0 = schema.DatasetMetadata.load(small).split("train").parts[0].blocks[0][1]
    reader = ParquetGroupReader(small, "train", 16, shuffle=False, extra_columns=("sample_id",))
    stream = [s for b in reader for s in b.labels["sample_id"].tolist()]
    head = stream[:block0]
    assert sorted(head) == list(range(block0))
    pf = pq.ParquetFile(small / "train/impressions-00000.parquet")
    rows = pf.read_row_group(0, columns=["user", "sample_id"]).to_pydict()
    order = sorted(range(block0), key=lambda i: (rows["user"][i], i))  # stable by user
    assert head == [rows["sample_id"][i] for i in order]
    # impression_row still names each impression's row in the file, not its place in the stream.
    reader = ParquetGroupReader(small, "train", 16, shuffle=False,
                                extra_columns=("sample_id", schema.IMPRESSION_ROW_COLUMN))
    rows_of = {s: r for b in reader
               for s, r in zip(b.labels["sample_id"].tolist(), b.labels[schema.IMPRESSION_ROW_COLUMN].tolist())}
    assert [rows_of[s] for s in rows["sample_id"]] == list(range(block0))


def test_null_list_reads_as_empty_and_null_id_is_an_error(small):
    def null_first_list(rg, t):
        if rg:
            return t
        for name in ("508", "508_w"):
            rows = t.column(name).to_pylist()
            rows[0] = None
            t = t.set_column(t.schema.get_field_index(name), name, pa.array(rows, t.schema.field(name).type))
        return t

    path = small / "train/impressions-00000.parquet"
    _rewrite(path, null_first_list)
    reader = ParquetGroupReader(small, "train", 16, shuffle=False)
    first = next(iter(reader))
    assert first.item_features["508"].lengths()[0] == 0
    _rewrite(path, lambda rg, t: t.set_column(t.schema.get_field_index("205"), "205",
                                               pa.array([None] + t.column("205").to_pylist()[1:], pa.int32())))
    assert "impressions-00000.parquet row group 0 row 0: field '205' is null" in _first_error(small)


def test_ids_and_weights_of_different_lengths(small):
    def drop_a_weight(rg, t):
        rows = t.column("109_14_w").to_pylist()
        rows[1] = rows[1][:-1]
        return t.set_column(t.schema.get_field_index("109_14_w"), "109_14_w",
                            pa.array(rows, t.schema.field("109_14_w").type))

    _rewrite(small / "train/users-00000.parquet", lambda rg, t: drop_a_weight(rg, t) if rg == 1 else t)
    message = _first_error(small)
    assert "users-00000.parquet row group 1 row 1: field '109_14' has" in message and "'109_14_w' has" in message


def test_batch_size_one_that_would_leave_a_rank_an_empty_batch(dataset):
    n = schema.DatasetMetadata.load(dataset).split("train").num_impressions
    uneven = next(w for w in (2, 3, 5, 7) if n % w)
    with pytest.raises(DatasetError, match="empty batch"):
        _reader(dataset, batch_size=1, world_size=uneven)
    even = next(w for w in (2, 3, 4, 5, 6) if n % w == 0)
    assert _reader(dataset, batch_size=1, world_size=even).steps_per_epoch() == n // even


def test_feature_loads_are_what_the_readers_batches_hold(tmp_path):
    from dist_mtl.data.reader import feature_loads

    # One file per part, one row group per file: the sampled row groups are the whole split.
    write_random_dataset(tmp_path, splits={"train": 400}, impressions_per_user=(20, 40), history_len=(10, 60),
                         combination_len=(0, 3), block_impressions=1 << 20, blocks_per_file=1, seed=3)
    batch_size = 256
    loads = feature_loads(tmp_path, "train", batch_size)
    batches = list(ParquetGroupReader(tmp_path, "train", batch_size, shuffle=False))
    users = np.mean([b.num_users for b in batches])
    assert abs(loads["101"].rows_per_batch - users) <= 1.5  # impressions per user from metadata.json
    assert loads["205"].rows_per_batch == batch_size and loads["205"].ids_per_row == 1.0
    for field in ("109_14", "150_14", "508", "853"):
        kjt = "user_features" if schema.FIELDS_BY_NAME[field].side == "user" else "item_features"
        lengths = np.concatenate([getattr(b, kjt)[field].lengths().numpy() for b in batches])
        # Batches repeat a user cut at a boundary, so their user rows run a little above the split's.
        assert loads[field].ids_per_row == pytest.approx(lengths.mean(), rel=0.03), field
    assert loads["109_14"].ids_per_row > 5 and loads["508"].ids_per_row < 3
    # Users copied onto impressions: the user side has the batch's rows.
    assert feature_loads(tmp_path, "train", batch_size, grouped=False)["101"].rows_per_batch == batch_size


def _stored_user_rows(root) -> dict[int, int]:
    """sample_id -> position of its user row among the split's user rows, from the files."""
    meta = schema.DatasetMetadata.load(root)
    out, first = {}, 0
    for part in meta.split("train").parts:
        upf, ipf = pq.ParquetFile(root / part.users), pq.ParquetFile(root / part.impressions)
        for rg in range(upf.num_row_groups):
            table = ipf.read_row_group(rg, columns=[schema.SAMPLE_ID_COLUMN, schema.USER_COLUMN]).to_pydict()
            for sample_id, user in zip(table[schema.SAMPLE_ID_COLUMN], table[schema.USER_COLUMN]):
                out[sample_id] = first + user
            first += upf.metadata.row_group(rg).num_rows
    return out


def _stored_impression_rows(root) -> dict[int, int]:
    """sample_id -> its impression's position among the split's impressions, from the files."""
    meta = schema.DatasetMetadata.load(root)
    ids = [s for part in meta.split("train").parts
           for s in pq.read_table(root / part.impressions, columns=[schema.SAMPLE_ID_COLUMN]).column(0).to_pylist()]
    return {s: row for row, s in enumerate(ids)}


@pytest.mark.parametrize("shuffle,num_workers", [(False, 0), (True, 2)])
def test_impression_row_names_each_impressions_position_in_storage_order(dataset, shuffle, num_workers):
    want = _stored_impression_rows(dataset)
    got = {}
    for rank in range(2):
        reader = _reader(dataset, rank=rank, world_size=2, shuffle=shuffle, seed=4,
                         extra_columns=("sample_id", schema.IMPRESSION_ROW_COLUMN))
        for batch in make_dataloader(reader, num_workers=num_workers):
            rows = batch.labels[schema.IMPRESSION_ROW_COLUMN]
            assert rows.dtype == torch.int64
            ids = batch.labels["sample_id"].tolist()
            assert not got.keys() & set(ids)  # each impression once over both ranks
            got.update(zip(ids, rows.tolist()))
    assert got == want and len(want) > 700


@pytest.mark.parametrize("shuffle,num_workers", [(False, 0), (True, 0), (True, 2)])
def test_user_row_names_each_impressions_user_row_in_storage_order(dataset, shuffle, num_workers):
    want = _stored_user_rows(dataset)
    got, streams = {}, []
    for rank in range(2):
        reader = _reader(dataset, rank=rank, world_size=2, shuffle=shuffle, seed=4,
                         extra_columns=("sample_id", schema.USER_ROW_COLUMN))
        stream = []
        for batch in make_dataloader(reader, num_workers=num_workers):
            rows = batch.labels[schema.USER_ROW_COLUMN]
            assert rows.dtype == torch.int64
            # One user row per batch user: impressions of a batch share a user_row exactly when they share
            # a user_index.
            pairs = set(zip(batch.user_index.tolist(), rows.tolist()))
            assert len(pairs) == batch.num_users == len({r for _, r in pairs})
            got.update(zip(batch.labels["sample_id"].tolist(), rows.tolist()))
            stream += rows.tolist()
        streams.append(stream)
    assert got == want and len(want) > 700
    whole = streams[0] + streams[1]
    assert (whole == sorted(whole)) == (not shuffle)  # storage order unless shuffled
