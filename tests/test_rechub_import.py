"""torch-rechub preprocessed CSV -> Parquet dataset, on the real sample files and corrupted copies."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from data_helpers import RECHUB_SAMPLE_DIR
from script_helpers import load_script

from dist_mtl.data import schema
from dist_mtl.data.raw import RawFormatError
from dist_mtl.data.rechub import RECHUB_COLUMNS, import_rechub_csv

SAMPLES = RECHUB_SAMPLE_DIR
FILES = {split: SAMPLES / f"ali_ccp_{split}_sample.csv" for split in ("train", "val", "test")}

pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"torch-rechub sample files not present at {SAMPLES}")


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def dataset_rows(root: Path, meta: schema.DatasetMetadata, split: str) -> list[tuple[dict, dict]]:
    out = []
    for part in meta.split(split).parts:
        users = pq.ParquetFile(root / part.users)
        impressions = pq.ParquetFile(root / part.impressions)
        for rg in range(users.num_row_groups):
            u, i = users.read_row_group(rg).to_pylist(), impressions.read_row_group(rg).to_pylist()
            assert len(u) == len(i) and [r["user"] for r in i] == list(range(len(u)))  # a user row per impression
            out += [(row, u[row["user"]]) for row in i]
    return out


def test_imports_the_real_sample_files(tmp_path):
    meta = import_rechub_csv(FILES, tmp_path / "out", block_impressions=32)
    assert meta.source == "torch-rechub-csv" and set(meta.splits) == set(FILES)
    source = {split: read_rows(path) for split, path in FILES.items()}
    assert list(source["train"][0]) == list(source["test"][0]) and set(source["train"][0]) == set(RECHUB_COLUMNS)
    assert [len(source[s]) for s in ("train", "val", "test")] == [100, 50, 50]
    max_id = {name: max(int(r[name]) for rows in source.values() for r in rows) for name in schema.FIELDS_BY_NAME}
    assert meta.vocab_sizes == {name: m + 2 for name, m in max_id.items()}

    for split, rows in source.items():
        info = meta.split(split)
        dropped = [r for r in rows if r["click"] == "0" and r["purchase"] == "1"]
        assert info.skipped == {"click0_buy1": len(dropped)}
        got = dataset_rows(tmp_path / "out", meta, split)
        kept = [(i, r) for i, r in enumerate(rows) if not (r["click"] == "0" and r["purchase"] == "1")]
        assert len(got) == len(kept) == info.num_impressions == info.num_users
        assert info.num_clicks == sum(int(r["click"]) for _, r in kept)
        assert info.num_buys == sum(int(r["purchase"]) for _, r in kept)
        for (impression, user), (index, want) in zip(got, kept):
            assert impression["sample_id"] == index
            assert (impression["click"], impression["buy"]) == (int(want["click"]), int(want["purchase"]))
            assert user["common_feature_index"] == f"{FILES[split].name}:{index + 2}"
            for spec in schema.ALI_CCP_FIELDS:
                row = user if spec.side == "user" else impression
                if spec.multi_valued:
                    assert row[spec.name] == [int(want[spec.name]) + 1]
                    assert row[spec.weight_column] == [np.float32(want["D" + spec.name])]
                else:
                    assert row[spec.name] == int(want[spec.name]) + 1
    hashes = {Path(f["path"]).name: f["bytes"] for f in meta.source_files}
    assert hashes == {p.name: p.stat().st_size for p in FILES.values()}


def corrupted(tmp_path: Path, line: int, column: str, value: str) -> Path:
    lines = FILES["train"].read_text().split("\n")
    cells = lines[line - 1].split(",")
    cells[lines[0].split(",").index(column)] = value
    lines[line - 1] = ",".join(cells)
    path = tmp_path / "train.csv"
    path.write_text("\n".join(lines))
    return path


@pytest.mark.parametrize(
    "column, value, reason",
    [("205", "x7", "bad_id"), ("206", "-3", "bad_id"), ("click", "2", "bad_label"), ("purchase", "no", "bad_label"),
     ("D508", "heavy", "bad_weight"), ("D109_14", "inf", "bad_weight")],
)
def test_bad_value_names_file_line_and_column(tmp_path, column, value, reason):
    path = corrupted(tmp_path, 5, column, value)
    with pytest.raises(RawFormatError) as err:
        import_rechub_csv({"train": path}, tmp_path / "out")
    assert (Path(err.value.path).name, err.value.line, err.value.field) == ("train.csv", 5, column)
    assert "train.csv" in str(err.value) and "line 5" in str(err.value) and column in str(err.value)
    assert not (tmp_path / "out" / schema.METADATA_FILE).exists()

    meta = import_rechub_csv({"train": path}, tmp_path / "out", skip_bad_rows=True)
    train = meta.split("train")
    assert train.skipped == {"click0_buy1": 0, reason: 1} and train.num_impressions == 99
    assert [i["sample_id"] for i, _ in dataset_rows(tmp_path / "out", meta, "train")][3:5] == [4, 5]  # line 5 gone


def test_wrong_column_count_and_click0_purchase1(tmp_path):
    lines = FILES["train"].read_text().split("\n")
    lines[2] = lines[2] + ",0.5"  # line 3: one column too many
    cells = lines[9].split(",")
    cells[0], cells[1] = "0", "1"  # line 10: click=0, purchase=1
    lines[9] = ",".join(cells)
    path = tmp_path / "train.csv"
    path.write_text("\n".join(lines))
    with pytest.raises(RawFormatError, match=r"train.csv, line 3, field 'line'"):
        import_rechub_csv({"train": path}, tmp_path / "out")
    meta = import_rechub_csv({"train": path}, tmp_path / "out", skip_bad_rows=True)
    assert meta.split("train").skipped == {"click0_buy1": 1, "wrong_column_count": 1}
    assert meta.split("train").num_impressions == 98


def test_header_must_hold_the_expected_columns(tmp_path):
    text = FILES["train"].read_text()
    path = tmp_path / "train.csv"
    path.write_text(text.replace("D702,", "", 1))
    with pytest.raises(RawFormatError, match="line 1, field 'D702'"):
        import_rechub_csv({"train": path}, tmp_path / "out")
    path.write_text(text.replace("click,", "clicked,", 1))
    with pytest.raises(RawFormatError, match="line 1, field 'clicked'"):
        import_rechub_csv({"train": path}, tmp_path / "out")
    with pytest.raises(RawFormatError, match="no such"):
        import_rechub_csv({"train": tmp_path / "absent.csv"}, tmp_path / "out")


def test_launcher_rechub(tmp_path, capsys):
    launcher = load_script("launch/convert.py")
    meta = launcher.main(["rechub", "--train", str(FILES["train"]), "--val", str(FILES["val"]),
                          "--out", str(tmp_path / "out")])
    assert list(meta.splits) == ["train", "val"]
    out = capsys.readouterr().out
    assert "train: 100 impressions" in out and "val: 50 impressions" in out
