"""Raw Tianchi files -> Parquet dataset: round trip, id maps, joins, bad input, interruption, memory."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from script_helpers import load_script

from dist_mtl.data import convert as convert_module
from dist_mtl.data import schema
from dist_mtl.data.convert import IdCounter, KeyIndex, convert_raw
from dist_mtl.data.id_maps import FieldVocabulary
from dist_mtl.data.raw import MAX_KEY_BYTES, LineBlocks, RawFormatError

REPO = Path(__file__).resolve().parents[1]
Feature = tuple[str, int, float]  # (field id, raw feature id, weight)


@dataclass
class User:
    key: str
    features: list[Feature]


@dataclass
class Impression:
    sample_id: int
    click: int
    buy: int
    key: str
    features: list[Feature] = field(default_factory=list)


def feature_list(features: list[Feature]) -> str:
    return "\x01".join(f"{f}\x02{i}\x03{w}" for f, i, w in features)


def write_raw(raw_dir: Path, split: str, users: list[User], impressions: list[Impression], newline: str = "\n") -> None:
    raw_dir.mkdir(parents=True, exist_ok=True)
    common = [f"{u.key},{len(u.features)},{feature_list(u.features)}" for u in users]
    skeleton = [
        f"{r.sample_id},{r.click},{r.buy},{r.key},{len(r.features)},{feature_list(r.features)}" for r in impressions
    ]
    (raw_dir / f"common_features_{split}.csv").write_bytes("".join(x + newline for x in common).encode())
    (raw_dir / f"sample_skeleton_{split}.csv").write_bytes("".join(x + newline for x in skeleton).encode())


# ---------------------------------------------------------------- a small hand-written data set

U1 = User("u1", [("101", 1001, 1.0), ("121", 2001, 1.0), ("124", 2101, 1.0),
                 ("109_14", 5001, 2.0), ("109_14", 5002, 3.5), ("109_14", 5001, 1.0),
                 ("110_14", 6001, 1.0), ("150_14", 8001, 0.5), ("150_14", 8002, 0.25)])
U2 = User("u2", [("101", 1002, 1.0), ("121", 2001, 1.0), ("122", 2201, 1.0), ("999", 1, 1.0),
                 ("109_14", 5002, 4.0), ("110_14", 6001, 2.0), ("110_14", 6002, 1.0), ("127_14", 7001, 1.0),
                 ("205", 30009, 1.0)])
U3 = User("u3", [("101", 1003, 1.0), ("121", 2001, 1.0), ("121", 2002, 1.0), ("109_14", 5003, 1.0)])
U4 = User("u4", [("101", 1004, 1.0), ("110_14", 6003, 7.0)])  # no impressions
TRAIN_IMPRESSIONS = [
    Impression(11, 0, 0, "u1", [("205", 30001, 1.0), ("206", 40001, 1.0), ("301", 90001, 1.0),
                                ("508", 50801, 1.5), ("508", 50802, 2.5)]),
    Impression(12, 1, 0, "u1", [("205", 30002, 1.0), ("206", 40001, 1.0), ("207", 41001, 1.0), ("509", 50901, 0.5)]),
    Impression(13, 1, 1, "u1", [("205", 30001, 1.0), ("210", 42001, 1.0), ("216", 43001, 1.0),
                                ("702", 70201, 1.0), ("853", 85301, 2.0), ("853", 85302, 3.0)]),
    Impression(14, 0, 0, "u2", [("205", 30003, 1.0), ("205", 30004, 1.0)]),
    Impression(15, 0, 1, "u2", [("205", 39999, 1.0)]),  # click=0, buy=1: dropped
    Impression(16, 0, 0, "u2", [("205", 30001, 1.0), ("998", 5, 1.0), ("101", 1002, 1.0)]),
    Impression(17, 1, 0, "u3", [("205", 30002, 1.0), ("301", 90002, 1.0)]),
    Impression(18, 0, 0, "u1", [("205", 30001, 1.0)]),  # u1 again, not consecutive: a new group
]
# Common features in another order than the skeleton, with a user that has no impression.
TRAIN_USERS = [U3, U4, U1, U2]
T1 = User("t1", [("101", 1001, 1.0), ("121", 2999, 1.0), ("109_14", 5001, 1.0), ("109_14", 5999, 2.0)])
TEST_IMPRESSIONS = [Impression(21, 0, 0, "t1", [("205", 30001, 1.0), ("206", 49999, 1.0)]),
                    Impression(22, 1, 0, "t1", [("205", 30002, 1.0), ("508", 50801, 4.0), ("508", 50899, 1.0)])]


def kept_features(features: list[Feature], side: str) -> dict[str, list[tuple[int, float]]]:
    """What the converter keeps of a row: the side's fields, a single-valued field's last occurrence."""
    out: dict[str, list[tuple[int, float]]] = {f.name: [] for f in schema.ALI_CCP_FIELDS if f.side == side}
    for name, fid, w in features:
        if name not in out:
            continue
        if schema.FIELDS_BY_NAME[name].multi_valued:
            out[name].append((fid, w))
        else:
            out[name] = [(fid, w)]
    return out


def expected_vocab(users: list[User], impressions: list[Impression], min_count: int = 1) -> dict[str, list[int]]:
    counts: dict[str, dict[int, int]] = {f.name: {} for f in schema.ALI_CCP_FIELDS}
    rows = [kept_features(u.features, "user") for u in users]
    rows += [kept_features(r.features, "item") for r in impressions if not (r.click == 0 and r.buy == 1)]
    for row in rows:
        for name, values in row.items():
            for fid, _ in values:
                counts[name][fid] = counts[name].get(fid, 0) + 1
    return {name: sorted(i for i, c in ids.items() if c >= min_count) for name, ids in counts.items()}


def encode(vocab: dict[str, list[int]], name: str, fid: int) -> int:
    return vocab[name].index(fid) + 1 if fid in vocab[name] else 0


def expected_row(features: list[Feature], side: str, vocab: dict[str, list[int]]) -> dict:
    out = {}
    for name, values in kept_features(features, side).items():
        spec = schema.FIELDS_BY_NAME[name]
        if spec.multi_valued:
            out[name] = [encode(vocab, name, fid) for fid, _ in values]
            out[spec.weight_column] = [w for _, w in values]
        else:
            out[name] = encode(vocab, name, values[-1][0]) if values else 0
    return out


def read_split(root: Path, meta: schema.DatasetMetadata, split: str) -> list[dict]:
    """Every impression joined with its user row, checking the block layout on the way."""
    info = meta.split(split)
    rows = []
    for part in info.parts:
        users_file, impressions_file = pq.ParquetFile(root / part.users), pq.ParquetFile(root / part.impressions)
        assert users_file.num_row_groups == impressions_file.num_row_groups == len(part.blocks)
        for rg, (n_users, n_impressions) in enumerate(part.blocks):
            users = users_file.read_row_group(rg).to_pylist()
            impressions = impressions_file.read_row_group(rg).to_pylist()
            assert (len(users), len(impressions)) == (n_users, n_impressions)
            referenced = [r["user"] for r in impressions]
            # A block holds whole groups: every user row is referenced, in order, by consecutive rows.
            assert referenced == sorted(referenced) and set(referenced) == set(range(n_users))
            rows += [{**r, "user_row": users[r["user"]]} for r in impressions]
    return rows


def check_split(rows: list[dict], impressions: list[Impression], users: list[User], vocab: dict) -> None:
    kept = [r for r in impressions if not (r.click == 0 and r.buy == 1)]
    assert len(rows) == len(kept)
    by_key = {u.key: u for u in users}
    for got, want in zip(rows, kept):
        assert (got["sample_id"], got["click"], got["buy"]) == (want.sample_id, want.click, want.buy)
        assert got["user_row"]["common_feature_index"] == want.key
        item = {k: got[k] for k in expected_row([], "item", vocab)}
        assert item == expected_row(want.features, "item", vocab)  # weights here are exact in float32
        user = {k: got["user_row"][k] for k in expected_row([], "user", vocab)}
        assert user == expected_row(by_key[want.key].features, "user", vocab)


def user_groups(impressions: list[Impression]) -> int:
    keys = [r.key for r in impressions if not (r.click == 0 and r.buy == 1)]
    return sum(1 for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k)


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_round_trip(tmp_path, newline):
    raw = tmp_path / "raw"
    write_raw(raw, "train", TRAIN_USERS, TRAIN_IMPRESSIONS, newline)
    write_raw(raw, "test", [T1], TEST_IMPRESSIONS, newline)
    # Tiny text blocks and Parquet blocks: lines and user groups straddle block boundaries.
    meta = convert_raw(raw, tmp_path / "out", block_impressions=2, read_block_bytes=64)

    vocab = expected_vocab(TRAIN_USERS, TRAIN_IMPRESSIONS)
    assert meta.vocab_sizes == {name: len(ids) + 1 for name, ids in vocab.items()}
    loaded = schema.DatasetMetadata.load(tmp_path / "out")
    assert loaded.to_json() == meta.to_json()
    for split, users, impressions in (("train", TRAIN_USERS, TRAIN_IMPRESSIONS), ("test", [T1], TEST_IMPRESSIONS)):
        rows = read_split(tmp_path / "out", meta, split)
        check_split(rows, impressions, users, vocab)
        info = meta.split(split)
        assert info.num_users == user_groups(impressions)  # users stored once per group
        assert info.num_clicks == sum(r.click for r in impressions)
    train = meta.split("train")
    assert train.skipped == {"click0_buy1": 1}
    assert train.num_blocks == 3  # groups of 3, 2, 1 + 1 impressions with block_impressions=2
    notes = meta.notes["splits"]["train"]
    assert notes["user_group_reappearances"] == 1 and notes["user_rows_without_impressions"] == 1
    assert notes["ignored_unknown_field_features"] == {"998": 1, "999": 1}
    assert notes["ignored_other_side_field_features"] == {"101": 1, "205": 1}
    assert notes["repeated_single_valued_features_dropped"] == {"121": 1, "205": 1}
    files = [Path(f["path"]).name for f in meta.source_files]
    assert files == ["common_features_train.csv", "sample_skeleton_train.csv",
                     "common_features_test.csv", "sample_skeleton_test.csv"]
    assert meta.source_files[0]["sha256"] == hashlib.sha256((raw / files[0]).read_bytes()).hexdigest()
    assert meta.source_files[0]["bytes"] == (raw / files[0]).stat().st_size
    assert not list((tmp_path / "out").glob(".convert-staging-*"))


def test_min_count_and_unseen_ids_map_to_zero(tmp_path):
    raw = tmp_path / "raw"
    write_raw(raw, "train", TRAIN_USERS, TRAIN_IMPRESSIONS)
    write_raw(raw, "test", [T1], TEST_IMPRESSIONS)
    meta = convert_raw(raw, tmp_path / "out", min_count=2, work_dir=tmp_path / "work")
    assert list((tmp_path / "work").iterdir()) == []  # staged files are gone
    vocab = expected_vocab(TRAIN_USERS, TRAIN_IMPRESSIONS, min_count=2)
    assert vocab["205"] == [30001, 30002] and vocab["109_14"] == [5001, 5002] and vocab["121"] == [2001]
    assert meta.min_count == 2 and meta.vocab_sizes["205"] == 3 and meta.vocab_sizes["101"] == 1
    check_split(read_split(tmp_path / "out", meta, "train"), TRAIN_IMPRESSIONS, TRAIN_USERS, vocab)
    test_rows = read_split(tmp_path / "out", meta, "test")
    check_split(test_rows, TEST_IMPRESSIONS, [T1], vocab)
    assert test_rows[0]["206"] == 0 and test_rows[0]["user_row"]["121"] == 0  # unseen in train
    assert test_rows[0]["user_row"]["109_14"] == [1, 0]  # 5001 kept, 5999 unseen


def test_rows_without_features(tmp_path):
    users = [User("e", []), User("f", [("101", 7, 1.0)])]
    impressions = [Impression(1, 0, 0, "e"), Impression(2, 1, 0, "f"), Impression(3, 0, 0, "f", [("205", 9, 1.0)])]
    write_raw(tmp_path / "raw", "train", users, impressions)
    meta = convert_raw(tmp_path / "raw", tmp_path / "out", splits=("train",))
    vocab = expected_vocab(users, impressions)
    check_split(read_split(tmp_path / "out", meta, "train"), impressions, users, vocab)
    assert meta.vocab_sizes["101"] == 2 and meta.vocab_sizes["205"] == 2 and meta.vocab_sizes["109_14"] == 1


# ---------------------------------------------------------------- bad input


def good_train() -> tuple[list[User], list[Impression]]:
    users = [User("a", [("101", 1, 1.0), ("109_14", 7, 2.0)]), User("b", [("101", 2, 1.0)])]
    impressions = [Impression(1, 0, 0, "a", [("205", 3, 1.0)]), Impression(2, 1, 0, "a", [("205", 4, 1.0)]),
                   Impression(3, 0, 0, "b", [("205", 3, 1.0)])]
    return users, impressions


def replace_line(path: Path, line: int, text: str) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[line - 1] = text.encode()
    path.write_bytes(b"\n".join(lines))


SKELETON_CASES = {
    "wrong_column_count": ("2,1,0,a,1", "line"),
    "token_without_separators": ("2,1,0,a,2,205\x024\x031.0\x01206", "feature_list"),
    "token_with_swapped_separators": ("2,1,0,a,1,205\x034\x021.0", "feature_list"),
    "non_numeric_feature_id": ("2,1,0,a,1,205\x02x4\x031.0", "205"),
    "non_numeric_value": ("2,1,0,a,1,205\x024\x03one", "205"),
    "feature_num_mismatch": ("2,1,0,a,3,205\x024\x031.0\x01206\x025\x031.0", "feature_num"),
    "non_numeric_label": ("2,yes,0,a,1,205\x024\x031.0", "click"),
    "label_outside_0_1": ("2,1,2,a,1,205\x024\x031.0", "buy"),
    "no_common_features_row": ("2,1,0,zz,1,205\x024\x031.0", "common_feature_index"),
    "malformed_field_id": ("2,1,0,a,1,2O5\x024\x031.0", "feature_list"),  # letter O: not an unknown field
    "negative_value": ("2,1,0,a,1,205\x024\x03-7", "205"),
    # Fixed-width byte keys would match 'a\x00' to user 'a'.
    "nul_byte_in_key": ("2,1,0,a\x00,1,205\x024\x031.0", "common_feature_index"),
    # The key join pads every key to the longest: one long key would cost its length for every key.
    "overlong_key": ("2,1,0," + "k" * (MAX_KEY_BYTES + 1) + ",1,205\x024\x031.0", "common_feature_index"),
}


@pytest.mark.parametrize("case", sorted(SKELETON_CASES))
def test_bad_skeleton_line_names_file_line_and_field(tmp_path, case):
    text, field_name = SKELETON_CASES[case]
    write_raw(tmp_path / "raw", "train", *good_train())
    skeleton = tmp_path / "raw" / "sample_skeleton_train.csv"
    replace_line(skeleton, 2, text)
    with pytest.raises(RawFormatError) as err:
        convert_raw(tmp_path / "raw", tmp_path / "out", splits=("train",))
    e = err.value
    assert (Path(e.path).name, e.line, e.field) == (skeleton.name, 2, field_name)
    assert skeleton.name in str(e) and "line 2" in str(e) and f"'{field_name}'" in str(e)
    assert not (tmp_path / "out" / schema.METADATA_FILE).exists()
    assert not list((tmp_path / "out").glob(".convert-staging-*"))


@pytest.mark.parametrize(
    "text, field_name",
    [("b,1,101\x02two\x031.0", "101"), ("b,2,101\x022\x031.0", "feature_num"), ("b", "line"),
     ("a,1,101\x029\x031.0", "common_feature_index"),  # repeats key "a" from line 1
     ("b\x00,1,101\x022\x031.0", "common_feature_index"),  # fixed-width keys would join it to "b"
     ("k" * (MAX_KEY_BYTES + 1) + ",1,101\x022\x031.0", "common_feature_index")],
)
def test_bad_common_features_line(tmp_path, text, field_name):
    write_raw(tmp_path / "raw", "train", *good_train())
    common = tmp_path / "raw" / "common_features_train.csv"
    replace_line(common, 2, text)
    with pytest.raises(RawFormatError) as err:
        convert_raw(tmp_path / "raw", tmp_path / "out", splits=("train",))
    assert (Path(err.value.path).name, err.value.line, err.value.field) == (common.name, 2, field_name)
    assert common.name in str(err.value) and "line 2" in str(err.value)


BOM_CASES = [  # (file, line 2's text, field): a UTF-8 byte-order mark, as concatenated exports leave them
    ("sample_skeleton_train.csv", "\ufeff2,1,0,a,1,205\x024\x031.0", "sample_id"),
    ("sample_skeleton_train.csv", "2,1,0,\ufeffa,1,205\x024\x031.0", "common_feature_index"),
    ("sample_skeleton_train.csv", "2,1,0,a,1,\ufeff205\x024\x031.0", "feature_list"),
    ("common_features_train.csv", "\ufeffb,1,101\x022\x031.0", "common_feature_index"),
]


@pytest.mark.parametrize("file_name, text, field_name", BOM_CASES)
@pytest.mark.parametrize("read_block_bytes", [1 << 20, 16])
def test_a_byte_order_mark_is_bad_wherever_the_blocks_start(tmp_path, file_name, text, field_name, read_block_bytes):
    # pyarrow drops a BOM at the start of the buffer it reads: with 16-byte blocks the line starts a
    # block, with 1 MiB it does not, and the line must be refused (or skipped) the same way in both.
    write_raw(tmp_path / "raw", "train", *good_train())
    replace_line(tmp_path / "raw" / file_name, 2, text)
    with pytest.raises(RawFormatError) as err:
        convert_raw(tmp_path / "raw", tmp_path / "out", splits=("train",), read_block_bytes=read_block_bytes)
    assert (Path(err.value.path).name, err.value.line, err.value.field) == (file_name, 2, field_name)
    meta = convert_raw(tmp_path / "raw", tmp_path / "skip", splits=("train",), read_block_bytes=read_block_bytes,
                       skip_bad_rows=True)
    skipped = {k: v for k, v in meta.split("train").skipped.items() if v}
    assert sum(skipped.values()) >= 1 and meta.split("train").num_impressions < 3, skipped


def test_values_of_single_valued_fields_other_than_1_are_counted(tmp_path):
    users, impressions = good_train()
    impressions[1] = Impression(2, 1, 0, "a", [("205", 4, 99.5), ("206", 5, 1.0)])
    write_raw(tmp_path / "raw", "train", users, impressions)
    meta = convert_raw(tmp_path / "raw", tmp_path / "out", splits=("train",))
    # The id is kept; its value cannot be (single-valued ids are stored without weights): counted.
    assert meta.notes["splits"]["train"]["single_valued_values_other_than_1_dropped"] == {"205": 1}
    assert meta.split("train").num_impressions == 3


def test_an_empty_split_is_an_error_naming_its_file(tmp_path):
    write_raw(tmp_path / "raw", "train", *good_train())
    skeleton = tmp_path / "raw" / "sample_skeleton_train.csv"
    skeleton.write_bytes(b"")
    with pytest.raises(RawFormatError, match="no impressions to write for split 'train'") as err:
        convert_raw(tmp_path / "raw", tmp_path / "out", splits=("train",))
    assert Path(err.value.path) == skeleton and err.value.line is None
    assert not (tmp_path / "out" / schema.METADATA_FILE).exists()


def test_a_line_without_end_stops_at_the_line_limit(tmp_path):
    # CR-only line ends: no '\n' anywhere. The reader must not buffer the whole file as one line.
    path = tmp_path / "common_features_train.csv"
    path.write_bytes(b"a,1,101\x021\x031.0\r" * 400)  # ~6 KB
    blocks = LineBlocks(path, block_bytes=512, max_line_bytes=2048)
    with pytest.raises(RawFormatError, match="no line end") as err:
        list(blocks)
    assert (err.value.line, err.value.field) == (1, "line")
    # Lines before the long one are handed out and counted.
    path.write_bytes(b"x\ny\n" + b"z" * 5000)
    seen = []
    with pytest.raises(RawFormatError) as err:
        for data, first in LineBlocks(path, block_bytes=512, max_line_bytes=2048):
            seen.append((data, first))
    assert seen == [(b"x\ny\n", 1)] and err.value.line == 3


def test_missing_input_file(tmp_path):
    write_raw(tmp_path / "raw", "train", *good_train())
    with pytest.raises(RawFormatError, match="common_features_test.csv"):
        convert_raw(tmp_path / "raw", tmp_path / "out")  # no test split files
    (tmp_path / "raw" / "sample_skeleton_train.csv").unlink()
    with pytest.raises(RawFormatError, match="sample_skeleton_train.csv") as err:
        convert_raw(tmp_path / "raw", tmp_path / "out", splits=("train",))
    assert err.value.line is None


def test_skip_bad_rows_counts_every_reason(tmp_path):
    users = [User("a", [("101", 1, 1.0)]), User("b", [("101", 2, 1.0)]), User("c", [("101", 3, 1.0)]),
             User("d", [("101", 4, 1.0)])]
    good = [Impression(100 + i, 0, 0, "a", [("205", 3, 1.0)]) for i in range(3)]
    good += [Impression(200, 1, 1, "b", [("205", 4, 1.0)]), Impression(201, 0, 1, "b", [("205", 5, 1.0)])]
    good += [Impression(300 + i, 0, 0, "c", [("205", 6, 1.0)]) for i in range(2)]
    write_raw(tmp_path / "raw", "train", users, good)
    common = tmp_path / "raw" / "common_features_train.csv"
    common.write_bytes(common.read_bytes() + b"a,1,101\x029\x031.0\n")  # duplicate key: user row skipped
    replace_line(common, 3, "c,1,101\x02x\x031.0")  # bad user row: its 2 impressions are skipped too
    bad = [text for text, _ in SKELETON_CASES.values()] + ["5,1,1,a,1,205\x023\x03nan"]
    skeleton = tmp_path / "raw" / "sample_skeleton_train.csv"
    skeleton.write_bytes(skeleton.read_bytes() + "\n".join(bad).encode())  # last line has no newline

    meta = convert_raw(tmp_path / "raw", tmp_path / "out", splits=("train",), skip_bad_rows=True, read_block_bytes=80)
    train = meta.split("train")
    assert train.skipped == {
        "bad_common_feature_index": 2, "bad_feature_id": 1, "bad_feature_token": 3, "bad_feature_value": 3,
        "bad_label": 2, "click0_buy1": 1,
        "common_features.bad_feature_id": 1, "common_features.duplicate_common_feature_index": 1,
        "feature_num_mismatch": 1, "no_common_features": 1, "user_row_skipped": 2, "wrong_column_count": 1,
    }
    assert train.num_impressions == 4 and train.num_users == 2
    # Only d: the duplicate row of key "a" is counted once, as skipped.
    assert meta.notes["splits"]["train"]["user_rows_without_impressions"] == 1
    examples = meta.notes["splits"]["train"]["skipped_examples"]
    assert any("common_features_train.csv, line 3, field '101'" in e for e in examples)
    # The duplicate's ids are not counted: 101 keeps 1, 2 and 4 (user c is bad).
    assert meta.vocab_sizes["101"] == 4
    rows = read_split(tmp_path / "out", meta, "train")
    assert [r["sample_id"] for r in rows] == [100, 101, 102, 200]
    assert {r["user_row"]["101"] for r in rows[:3]} == {1}  # the first row of key "a", not the duplicate


def test_overlong_keys_are_bad_and_never_widen_the_key_index(tmp_path, monkeypatch):
    widths = []

    class RecordingKeyIndex(KeyIndex):
        def __init__(self, keys: pa.Array, rows: np.ndarray):
            super().__init__(keys, rows)
            widths.append(self.width)

    monkeypatch.setattr(convert_module, "KeyIndex", RecordingKeyIndex)
    longest, too_long = "k" * MAX_KEY_BYTES, "k" * (MAX_KEY_BYTES + 1)
    users = [User("a", [("101", 1, 1.0)]), User(longest, [("101", 2, 1.0)]), User(too_long, [("101", 3, 1.0)])]
    impressions = [Impression(1, 0, 0, "a", [("205", 3, 1.0)]), Impression(2, 1, 0, longest, [("205", 4, 1.0)]),
                   Impression(3, 0, 0, too_long, [("205", 5, 1.0)])]
    write_raw(tmp_path / "raw", "train", users, impressions)
    common = tmp_path / "raw" / "common_features_train.csv"
    with pytest.raises(RawFormatError) as err:
        convert_raw(tmp_path / "raw", tmp_path / "out", splits=("train",))
    assert (Path(err.value.path).name, err.value.line, err.value.field) == (common.name, 3, "common_feature_index")
    assert f"{MAX_KEY_BYTES + 1} bytes long" in str(err.value)

    # Lines skipped for other reasons must not bring their long first column into the index of skipped
    # keys either: a line with no comma, and a run of NUL bytes as a damaged download leaves.
    junk = b"z" * 20_000 + b"\n" + b"\x00" * 20_000 + b"ux,1,101\x029\x031\n"
    common.write_bytes(common.read_bytes() + junk)
    widths.clear()
    meta = convert_raw(tmp_path / "raw", tmp_path / "out", splits=("train",), skip_bad_rows=True)
    assert {reason: n for reason, n in meta.split("train").skipped.items() if n} == {
        "bad_common_feature_index": 1,  # the skeleton row with the long key
        "common_features.bad_common_feature_index": 2, "common_features.wrong_column_count": 1,
    }
    assert [r["sample_id"] for r in read_split(tmp_path / "out", meta, "train")] == [1, 2]
    assert widths and max(widths) == MAX_KEY_BYTES, widths


def test_interrupted_conversion_leaves_no_metadata(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_raw(raw, "train", TRAIN_USERS, TRAIN_IMPRESSIONS)
    write_raw(raw, "test", [T1], TEST_IMPRESSIONS)
    convert_raw(raw, out)
    assert (out / schema.METADATA_FILE).exists()

    def interrupt(p):
        if p.split == "test" and p.stage == "impressions":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_raw(raw, out, progress=interrupt)
    assert not (out / schema.METADATA_FILE).exists()
    assert not list(out.glob(".convert-staging-*"))
    with pytest.raises(schema.DatasetError, match="interrupted"):
        schema.DatasetMetadata.load(out)


def test_a_conversion_stopped_mid_split_closes_that_splits_part_files(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    write_raw(raw, "train", TRAIN_USERS, TRAIN_IMPRESSIONS)
    write_raw(raw, "test", [T1], TEST_IMPRESSIONS)
    aborted = []
    original = schema.SplitWriter.abort

    def spy(self):
        original(self)
        aborted.append((self.split, self._writers))

    monkeypatch.setattr(schema.SplitWriter, "abort", spy)

    def interrupt(p):
        if p.split == "train" and p.stage == "write" and p.rows > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_raw(raw, tmp_path / "out", progress=interrupt, block_impressions=1)
    assert aborted == [("train", None)]


def test_launcher_raw_prints_progress_and_summary(tmp_path, capsys):
    launcher = load_script("launch/convert.py")
    write_raw(tmp_path / "raw", "train", TRAIN_USERS, TRAIN_IMPRESSIONS)
    meta = launcher.main(["raw", "--raw-dir", str(tmp_path / "raw"), "--out", str(tmp_path / "out"),
                          "--splits", "train", "--min-count", "2"])
    out = capsys.readouterr().out
    assert meta.min_count == 2 and list(meta.splits) == ["train"]
    assert "train impressions:" in out and "rows/s" in out and "skipped: click0_buy1=1" in out
    # Features dropped inside kept rows are printed, not only kept in metadata.json's notes.
    assert "features of unknown fields ignored: 998=1, 999=1" in out
    assert "features of the other file's fields ignored: 101=1, 205=1" in out
    assert "repeats of single-valued fields dropped: 121=1, 205=1" in out
    with pytest.raises(SystemExit) as usage:
        launcher.main(["raw", "--raw-dir", str(tmp_path / "raw"), "--out", str(tmp_path / "o2"), "--splits", "test"])
    assert usage.value.code == 2
    assert "--splits 'test' must include train" in capsys.readouterr().err
    with pytest.raises(SystemExit) as missing:  # the test split's files are missing
        launcher.main(["raw", "--raw-dir", str(tmp_path / "raw"), "--out", str(tmp_path / "o2")])
    assert missing.value.code != 0
    assert "common_features_test.csv" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--min-count", "--block-impressions"])
def test_launcher_refuses_numbers_below_one_as_usage_errors(tmp_path, capsys, option):
    write_raw(tmp_path / "raw", "train", *good_train())
    with pytest.raises(SystemExit) as exit_:
        load_script("launch/convert.py").main(["raw", "--raw-dir", str(tmp_path / "raw"), "--out", str(tmp_path / "out"),
                              "--splits", "train", option, "0"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {option}: must be at least 1, got 0" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- building blocks


def test_id_counter_merges_blocks_and_subtracts():
    counter = IdCounter()
    rng = np.random.default_rng(0)
    blocks = [rng.integers(0, 50, 200) for _ in range(30)]
    for b in blocks:
        counter.add("205", b)
    counter.add("205", blocks[0], sign=-1)
    ids, counts = counter.counts("205")
    want_ids, want_counts = np.unique(np.concatenate(blocks[1:]), return_counts=True)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(counts, want_counts)


@pytest.mark.parametrize("kept", [np.array([5, 9, 10, 400]), np.array([3, 10**12, 10**15])])  # dense, sparse
def test_field_vocabulary_encodes_kept_ids_only(kept):
    vocab = FieldVocabulary(kept)
    queries = np.concatenate([kept, kept - 1, kept + 1, [-(2**40), 2**62]])
    want = [list(kept).index(q) + 1 if q in kept else 0 for q in queries]
    assert vocab.encode(queries).tolist() == want and vocab.size == len(kept) + 1


def test_key_index_lookup_and_duplicates():
    keys = pa.array(["b", "abc", "a", "b", "zz", "abc"])
    index = KeyIndex(keys, np.arange(6))
    assert index.lookup(pa.array(["a", "zz", "ab", "abcd", "", "c"])).tolist() == [2, 4, -1, -1, -1, -1]
    again, first = index.duplicates()
    assert sorted(zip(again.tolist(), first.tolist())) == [(3, 0), (5, 1)]
    assert index.without_rows(again).lookup(pa.array(["b", "abc"])).tolist() == [0, 1]
    with pytest.raises(ValueError, match="MAX_KEY_BYTES"):  # raw.py refuses such keys before they get here
        KeyIndex(pa.array(["k" * (MAX_KEY_BYTES + 1)]), np.arange(1))


# ---------------------------------------------------------------- memory


PEAK_RSS_CHILD = textwrap.dedent(
    """
    import json, sys
    from dist_mtl.data.convert import convert_raw
    convert_raw(sys.argv[1], sys.argv[2], splits=("train",), read_block_bytes=1 << 20, block_impressions=4096)
    # VmHWM is this process's own peak; ru_maxrss would include the forked parent's pages.
    peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
    print(json.dumps({"peak_rss_kb": peak}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_peak_memory_does_not_grow_with_impressions(tmp_path):
    from dist_mtl.data.synthetic import SyntheticConfig, write_raw as write_synthetic

    peaks, sizes = {}, {}
    for name, impressions in (("small", 50_000), ("large", 500_000)):
        raw = tmp_path / name
        cfg = SyntheticConfig(train_impressions=impressions, test_impressions=0, history_ids_per_user=250.0, seed=3)
        sizes[name] = write_synthetic(raw, cfg, splits=("train",))["bytes"]
        done = subprocess.run([sys.executable, "-c", PEAK_RSS_CHILD, str(raw), str(tmp_path / f"{name}-out")],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert done.returncode == 0, done.stderr
        peaks[name] = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_kb"] / 1024
    assert sizes["large"] - sizes["small"] > 120e6
    # 10x the impressions (~130 MB more text) moves the peak by allocator noise only (measured: <= 30 MB).
    assert peaks["large"] < peaks["small"] + 40, (peaks, sizes)
