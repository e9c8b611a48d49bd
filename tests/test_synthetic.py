"""The synthetic Ali-CCP generator: raw byte format, determinism, grouping, rates, history lengths, AUC,
the planted truth, torch-rechub CSV layout and the direct-Parquet path."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import RECHUB_SAMPLE_DIR

from dist_mtl.data import schema, synthetic
from dist_mtl.data.synthetic import SyntheticConfig

# The reference AUC. CI installs scikit-learn; the GPU test machine has none, and there these tests skip
# (benchmarks/gpu/session.py runs the suite there).
roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score

REPO = Path(__file__).resolve().parents[1]
SKELETON_FIELDS = set(synthetic.SKELETON_SINGLE_FIELDS) | set(synthetic.CROSS_FIELDS)
COMMON_FIELDS = set(synthetic.USER_SINGLE_FIELDS) | set(synthetic.HISTORY_FIELDS)
HEX32 = re.compile(r"^[0-9a-f]{32}$")

# Small but not trivial: ~70 user groups, high rates so that every label has both classes.
SMALL = SyntheticConfig(train_impressions=4000, test_impressions=1500, history_ids_per_user=40,
                        click_rate=0.2, buy_rate_after_click=0.2, click0_buy1_rate=0.01, seed=3)


def parse_features(text: str, where: str) -> list[tuple[str, int, float]]:
    out = []
    for feature in text.split("\x01"):
        field, rest = feature.split("\x02")
        feature_id, value = rest.split("\x03")
        out.append((field, int(feature_id), float(value)))
    return out


def read_raw(directory: Path, split: str) -> tuple[list[dict], dict[str, list[tuple[str, int, float]]], list[str]]:
    """(skeleton rows, common features by key, common keys in file order), parsed with plain Python."""
    skeleton = []
    with open(directory / f"sample_skeleton_{split}.csv", "rb") as f:
        for line_no, raw in enumerate(f, 1):
            line = raw.decode("ascii")
            assert line.endswith("\n"), f"skeleton line {line_no} has no newline"
            cols = line[:-1].split(",")
            assert len(cols) == 6, f"skeleton line {line_no}: {len(cols)} columns"
            sample_id, click, buy, key, num, features = cols
            feats = parse_features(features, f"skeleton line {line_no}")
            assert int(num) == len(feats), f"skeleton line {line_no}: feature_num {num} != {len(feats)}"
            skeleton.append({"sample_id": int(sample_id), "click": int(click), "buy": int(buy), "key": key,
                             "features": feats})
    common, keys = {}, []
    with open(directory / f"common_features_{split}.csv", "rb") as f:
        for line_no, raw in enumerate(f, 1):
            key, num, features = raw.decode("ascii")[:-1].split(",")
            feats = parse_features(features, f"common line {line_no}")
            assert int(num) == len(feats)
            assert key not in common, f"common_features key {key} appears twice"
            common[key] = feats
            keys.append(key)
    return skeleton, common, keys


@pytest.fixture(scope="module")
def raw_small(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("raw_small")
    return out, synthetic.write_raw(out, SMALL)


def test_raw_byte_format_and_global_ids(raw_small):
    out, report = raw_small
    field_of_id: dict[int, str] = {}
    for split in synthetic.SPLITS:
        skeleton, common, _ = read_raw(out, split)
        assert len(skeleton) == SMALL.impressions(split) == report["splits"][split]["impressions"]
        assert [r["sample_id"] for r in skeleton] == list(range(1, len(skeleton) + 1))
        for row in skeleton:
            assert HEX32.match(row["key"])
            assert row["click"] in (0, 1) and row["buy"] in (0, 1)
            fields = [f for f, _, _ in row["features"]]
            assert set(fields) <= SKELETON_FIELDS
            for single in synthetic.SKELETON_SINGLE_FIELDS:
                assert fields.count(single) == 1
            for field, fid, value in row["features"]:
                assert value >= 1.0 and value == int(value)
                assert field_of_id.setdefault(fid, field) == field, f"id {fid} used by two fields"
        for key, feats in common.items():
            assert HEX32.match(key)
            fields = [f for f, _, _ in feats]
            assert set(fields) == COMMON_FIELDS
            for single in synthetic.USER_SINGLE_FIELDS:
                assert fields.count(single) == 1
            for field, fid, value in feats:
                assert value >= 1.0
                assert field_of_id.setdefault(fid, field) == field, f"id {fid} used by two fields"
            # History lists hold distinct ids.
            for hist in synthetic.HISTORY_FIELDS:
                ids = [fid for f, fid, _ in feats if f == hist]
                assert len(ids) == len(set(ids)) >= 1
    # About 13.5 features per skeleton row, as in the real data (small data: loose bounds).
    skeleton, _, _ = read_raw(out, "train")
    mean_features = np.mean([len(r["features"]) for r in skeleton])
    assert 10.0 < mean_features < 17.0


def test_grouping_and_common_features(raw_small):
    out, _ = raw_small
    for split in synthetic.SPLITS:
        skeleton, common, keys = read_raw(out, split)
        runs = [skeleton[0]["key"]]
        for row in skeleton[1:]:
            if row["key"] != runs[-1]:
                runs.append(row["key"])
        assert len(runs) == len(set(runs)), "a user group is split into non-consecutive runs"
        assert runs == keys, "common_features lists users in skeleton order, each once"
    train_keys = set(read_raw(out, "train")[2])
    assert train_keys.isdisjoint(read_raw(out, "test")[2])


def test_truth_file_matches_labels(raw_small):
    out, _ = raw_small
    skeleton, _, _ = read_raw(out, "train")
    truth = pq.read_table(out / "truth_train.parquet")
    assert truth.schema.names == list(synthetic.TRUTH_COLUMNS)
    assert truth.column("sample_id").to_pylist() == [r["sample_id"] for r in skeleton]
    assert truth.column("click").to_pylist() == [r["click"] for r in skeleton]
    assert truth.column("buy").to_pylist() == [r["buy"] for r in skeleton]
    p = truth.column("p_ctr").to_numpy()
    assert ((p > 0) & (p < 1)).all()


def test_deterministic_per_seed(tmp_path, raw_small):
    out, _ = raw_small
    again = tmp_path / "again"
    synthetic.write_raw(again, SMALL, splits=("train",))
    for name in ("sample_skeleton_train.csv", "common_features_train.csv"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    other = tmp_path / "other"
    synthetic.write_raw(other, replace(SMALL, seed=4), splits=("train",))
    assert (other / "sample_skeleton_train.csv").read_bytes() != (out / "sample_skeleton_train.csv").read_bytes()


def test_chunking_does_not_change_rows():
    cfg = SyntheticConfig(train_impressions=40_000, test_impressions=0, history_ids_per_user=30, seed=1)
    big = list(synthetic.generate_chunks(cfg, "train", users_per_chunk=4096))
    small = list(synthetic.generate_chunks(cfg, "train", users_per_chunk=1))
    assert len(small) > len(big) == 1
    for name in ("sample_id", "click", "buy", "p_ctr"):
        assert np.array_equal(np.concatenate([getattr(c, name) for c in small]), getattr(big[0], name))
    assert np.array_equal(np.concatenate([c.item_fields["205"] for c in small]), big[0].item_fields["205"])
    assert np.array_equal(np.concatenate([c.history["110_14"].ids for c in small]), big[0].history["110_14"].ids)
    assert b"".join(k for c in small for k in c.user_keys) == b"".join(big[0].user_keys)


def test_rates_near_target_with_high_rates():
    cfg = SyntheticConfig(train_impressions=300_000, test_impressions=0, history_ids_per_user=20,
                          click_rate=0.2, buy_rate_after_click=0.1, click0_buy1_rate=0.002, seed=5)
    n = clicks = buys = noise = users = 0
    for chunk in synthetic.generate_chunks(cfg, "train"):
        n += chunk.num_impressions
        users += chunk.num_users
        clicks += int(chunk.click.sum())
        buys += int((chunk.click & chunk.buy).sum())
        noise += int(((chunk.click == 0) & (chunk.buy == 1)).sum())
    assert n == 300_000
    assert abs(clicks / n / 0.2 - 1) < 0.1
    assert abs(buys / clicks / 0.1 - 1) < 0.1
    assert abs(noise / n / 0.002 - 1) < 0.25
    assert abs(n / users / cfg.impressions_per_user - 1) < 0.15


def test_history_lengths_long_tailed_with_configured_mean():
    cfg = SyntheticConfig(train_impressions=120_000, test_impressions=0, history_ids_per_user=300, seed=2)
    lengths, groups = [], []
    for chunk in synthetic.generate_chunks(cfg, "train"):
        lengths.append(sum(chunk.history[h].lengths for h in synthetic.HISTORY_FIELDS))
        groups.append(np.bincount(chunk.impression_user))
    lengths, groups = np.concatenate(lengths), np.concatenate(groups)
    assert abs(lengths.mean() / 300 - 1) < 0.1
    assert np.median(lengths) < lengths.mean() < lengths.max() / 2.5  # right-skewed, long tail
    assert lengths.min() >= 4
    assert groups.min() >= 1 and np.median(groups) < groups.mean() < groups.max() / 4


def test_field_vocab_sizes():
    full = synthetic.field_vocab_sizes(SyntheticConfig(train_impressions=synthetic.REAL_TRAIN_IMPRESSIONS))
    assert full == schema.ALI_CCP_VOCAB_AFTER_FILTER | {"205": full["205"]}
    assert full["205"] == schema.ALI_CCP_VOCAB_AFTER_FILTER["205"]
    small = synthetic.field_vocab_sizes(SyntheticConfig(train_impressions=10_000))
    assert list(small) == [f.name for f in schema.ALI_CCP_FIELDS]
    for name in ("121", "122", "124", "125", "126", "127", "128", "129", "301"):
        assert small[name] == schema.ALI_CCP_VOCAB_AFTER_FILTER[name]
    assert small["101"] < full["101"] and small["205"] < full["205"]
    for hist, attr in synthetic.HISTORY_FIELDS.items():
        assert small[hist] == small[attr] <= small["205"]


def test_binary_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 5000)
    scores = np.round(rng.random(5000) + 0.3 * labels, 1)  # few distinct values: many ties
    assert synthetic.binary_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert synthetic.binary_auc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert synthetic.binary_auc(np.array([1, 0]), np.array([0.9, 0.1])) == 1.0
    with pytest.raises(ValueError, match="single class"):
        synthetic.binary_auc(np.zeros(4), np.arange(4.0))


def test_oracle_beats_history_blind_and_truth_is_a_function_of_features():
    cfg = SyntheticConfig(train_impressions=150_000, test_impressions=0, history_ids_per_user=150,
                          click_rate=0.1, buy_rate_after_click=0.15, seed=7)
    model = synthetic.planted_model(cfg)
    chunks = list(synthetic.generate_chunks(cfg, "train"))
    truth = pa.concat_tables([c.truth_table() for c in chunks])
    oracle = synthetic.oracle_auc(truth)
    assert oracle["ctr"] > 0.65 and oracle["cvr"] > 0.65 and oracle["ctcvr"] > 0.7
    click = truth.column("click").to_numpy().astype(bool)
    buy = truth.column("buy").to_numpy().astype(bool)
    blind_ctr, blind_cvr = map(np.concatenate, zip(*(model.probabilities(c, use_history=False) for c in chunks)))
    full_ctr, full_cvr = map(np.concatenate, zip(*(model.probabilities(c) for c in chunks)))
    # The truth is recomputed exactly from the written features (history order included).
    assert np.array_equal(full_ctr, truth.column("p_ctr").to_numpy())
    assert np.array_equal(full_cvr, truth.column("p_cvr").to_numpy())
    keep = click | ~buy
    assert synthetic.binary_auc(click[keep], blind_ctr[keep]) < oracle["ctr"] - 0.03
    clicked = click & keep
    assert synthetic.binary_auc(buy[clicked], blind_cvr[clicked]) < oracle["cvr"] - 0.02


def test_rechub_csv_layout(tmp_path):
    sample = RECHUB_SAMPLE_DIR / "ali_ccp_train_sample.csv"
    if not sample.exists():
        pytest.skip(f"{sample} is not on this machine")
    real_lines = sample.read_text().splitlines()
    report = synthetic.write_rechub_csv(tmp_path, SMALL)
    # Value formats per column kind, checked on the real sample first.
    label, sparse, dense = re.compile(r"^[01]$"), re.compile(r"^\d+$"), re.compile(r"^\d(\.\d+)?(e-\d+)?$")
    kinds = [label] * 2 + [sparse] * 23 + [dense] * 8

    def check_row(line: str) -> list[str]:
        cols = line.split(",")
        assert len(cols) == 33
        for col, kind in zip(cols, kinds):
            assert kind.match(col), col
        return cols

    for line in real_lines[1:]:
        check_row(line)
    rows = 0
    for name in ("train", "val", "test"):
        lines = (tmp_path / f"ali_ccp_{name}.csv").read_text().splitlines()
        assert lines[0] == real_lines[0] == synthetic.RECHUB_HEADER
        cols = [check_row(line) for line in lines[1:]]
        assert len(cols) == report["files"][name]["rows"] > 0
        truth = pq.read_table(tmp_path / f"truth_{name}.parquet")
        assert truth.column("click").to_pylist() == [int(c[0]) for c in cols]
        assert truth.column("buy").to_pylist() == [int(c[1]) for c in cols]
        assert not any(c[0] == "0" and c[1] == "1" for c in cols)
        dense_values = np.array([[float(v) for v in c[25:]] for c in cols])
        assert dense_values.min() >= 0.0 and dense_values.max() <= 1.0
        rows += len(cols)
    raw_rows = sum(c.num_impressions - int(((c.click == 0) & (c.buy == 1)).sum())
                   for split in synthetic.SPLITS for c in synthetic.generate_chunks(SMALL, split))
    assert rows == raw_rows


def test_parquet_direct_rows_equal_raw_text(tmp_path, raw_small):
    raw_dir, _ = raw_small
    meta = synthetic.write_parquet_direct(tmp_path / "direct", SMALL, block_impressions=1024)
    assert meta.source == "synthetic-direct"
    vocab = synthetic.field_vocab_sizes(SMALL)
    assert meta.vocab_sizes == {k: v + 1 for k, v in vocab.items()}
    reloaded = schema.DatasetMetadata.load(tmp_path / "direct")
    # Encoding seen so far per field: raw global id <-> dataset index, which must be a bijection.
    forward: dict[str, dict[int, int]] = defaultdict(dict)
    backward: dict[str, dict[int, int]] = defaultdict(dict)

    def same_id(field: str, raw_id: int, index: int) -> None:
        assert 1 <= index < meta.vocab_sizes[field]
        assert forward[field].setdefault(raw_id, index) == index
        assert backward[field].setdefault(index, raw_id) == raw_id

    for split in synthetic.SPLITS:
        skeleton, common, _ = read_raw(raw_dir, split)
        expected = [r for r in skeleton if not (r["click"] == 0 and r["buy"] == 1)]
        info = reloaded.split(split)
        assert info.num_impressions == len(expected)
        assert info.skipped.get("click0_buy1", 0) == len(skeleton) - len(expected)
        got = []
        for part in info.parts:
            users_file = pq.ParquetFile(tmp_path / "direct" / part.users)
            impr_file = pq.ParquetFile(tmp_path / "direct" / part.impressions)
            for rg, (num_users, num_impr) in enumerate(part.blocks):
                users = users_file.read_row_group(rg).to_pylist()
                impressions = impr_file.read_row_group(rg).to_pylist()
                assert (len(users), len(impressions)) == (num_users, num_impr)
                got += [(users[r["user"]], r) for r in impressions]
        assert len(got) == len(expected)
        for want, (user, row) in zip(expected, got):
            assert (row["sample_id"], row["click"], row["buy"]) == (want["sample_id"], want["click"], want["buy"])
            assert user["common_feature_index"] == want["key"]
            by_field = defaultdict(list)
            for field, fid, value in want["features"] + common[want["key"]]:
                by_field[field].append((fid, value))
            for field, entries in by_field.items():
                source = user if field in COMMON_FIELDS else row
                if schema.FIELDS_BY_NAME[field].multi_valued:
                    assert len(source[field]) == len(entries)
                    for (fid, value), index, weight in zip(entries, source[field], source[field + "_w"]):
                        same_id(field, fid, index)
                        assert weight == value
                else:
                    same_id(field, entries[0][0], source[field])
            for cross in synthetic.CROSS_FIELDS:
                if cross not in by_field:
                    assert row[cross] == [] and row[cross + "_w"] == []
    truth_raw = pq.read_table(raw_dir / "truth_train.parquet")
    assert pq.read_table(tmp_path / "direct" / "truth_train.parquet").equals(truth_raw)


def test_parquet_direct_extra_targets(tmp_path):
    base = SyntheticConfig(train_impressions=3000, test_impressions=0, history_ids_per_user=30, seed=9)
    with_extra = replace(base, extra_targets=True)
    plain = synthetic.write_parquet_direct(tmp_path / "plain", base, splits=("train",))
    extra = synthetic.write_parquet_direct(tmp_path / "extra", with_extra, splits=("train",))
    assert plain.extra_columns == {} and extra.extra_columns == synthetic.EXTRA_TARGET_COLUMNS
    a = pq.read_table(tmp_path / "plain" / plain.splits["train"].parts[0].impressions)
    b = pq.read_table(tmp_path / "extra" / extra.splits["train"].parts[0].impressions)
    assert b.drop_columns(["price", "dwell"]).equals(a)  # extra targets change no other column
    assert (b.column("dwell").to_numpy() > 0).all()
    truth = pq.read_table(tmp_path / "extra" / "truth_train.parquet")
    price_mean = truth.column("price_mean").to_numpy()
    assert truth.column("sample_id").to_pylist() == list(range(1, 3001))
    residual = b.column("price").to_numpy() - price_mean[b.column("sample_id").to_numpy() - 1]
    assert abs(residual.mean()) < 0.05 and 0.2 < residual.std() < 0.4
    assert price_mean.std() > 0.3  # the price depends on item and user features


def test_bad_config_and_ids_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="click_rate"):
        SyntheticConfig(click_rate=1.5).validate()
    with pytest.raises(ValueError, match="history_ids_per_user"):
        SyntheticConfig(history_ids_per_user=2).validate()
    with pytest.raises(ValueError, match="extra_targets"):
        synthetic.write_raw(tmp_path, SyntheticConfig(train_impressions=100, extra_targets=True))
    with pytest.raises(ValueError, match="unknown split"):
        next(synthetic.generate_chunks(SMALL, "validation"))
    ids = synthetic.planted_model(SMALL).ids["205"]
    assert np.array_equal(ids.to_local(ids.to_global(np.arange(ids.size))), np.arange(ids.size))
    with pytest.raises(ValueError, match="not an id of field 205"):
        ids.to_local(np.array([ids.base + ids.size]))


def test_generate_cli(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "launch"))
    import generate

    result = generate.main(["--out", str(tmp_path / "raw"), "--format", "raw", "--train-impressions", "2000",
                            "--test-impressions", "500", "--history-ids-per-user", "30", "--click-rate", "0.2",
                            "--buy-rate-after-click", "0.2", "--seed", "1"])
    printed = capsys.readouterr().out
    assert "impressions/s" in printed and "oracle AUC" in printed
    assert (tmp_path / "raw" / "sample_skeleton_train.csv").stat().st_size == \
        result["report"]["splits"]["train"]["skeleton_bytes"]
    assert set(result["oracle_auc"]) == {"train", "test"}
    generate.main(["--out", str(tmp_path / "pq"), "--format", "parquet", "--train-impressions", "1000",
                   "--test-impressions", "0", "--history-ids-per-user", "20", "--extra-targets"])
    assert schema.DatasetMetadata.load(tmp_path / "pq").extra_columns == synthetic.EXTRA_TARGET_COLUMNS
    with pytest.raises(SystemExit):
        generate.main(["--out", str(tmp_path / "x"), "--format", "raw", "--extra-targets"])
    assert "needs --format parquet" in capsys.readouterr().err
    # Runs as a script too.
    done = subprocess.run([sys.executable, str(REPO / "launch" / "generate.py"), "--help"], capture_output=True)
    assert done.returncode == 0 and b"--train-impressions" in done.stdout
