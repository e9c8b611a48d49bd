"""Id maps kept with a dataset: written by the raw converter, reused for new raw files (--id-maps-from),
checked on load, recorded in checkpoints, carried by exports and compared before scoring."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import write_random_dataset
from script_helpers import load_script
from test_convert import (
    T1,
    TEST_IMPRESSIONS,
    TRAIN_IMPRESSIONS,
    TRAIN_USERS,
    expected_vocab,
    kept_features,
    read_split,
    write_raw,
)
from test_trainer import small_config

from dist_mtl.checkpoint import CheckpointMismatchError, read_side_file
from dist_mtl.data.convert import convert_raw
from dist_mtl.data.id_maps import ID_MAPS_FILE, IdMaps
from dist_mtl.data.schema import ALI_CCP_FIELDS, DatasetError, DatasetMetadata

sys.path.insert(0, str(Path(__file__).parents[1] / "launch"))


@pytest.fixture
def converted(tmp_path):
    """The hand-written train and test splits converted with min_count 2 (so the test split and the rarer
    train ids fall outside the maps), and a raw folder holding the test split alone."""
    raw = tmp_path / "raw"
    write_raw(raw, "train", TRAIN_USERS, TRAIN_IMPRESSIONS)
    write_raw(raw, "test", [T1], TEST_IMPRESSIONS)
    meta = convert_raw(raw, tmp_path / "first", min_count=2, block_impressions=2)
    later = tmp_path / "raw_later"
    later.mkdir()
    for name in ("common_features_test.csv", "sample_skeleton_test.csv"):
        shutil.copy(raw / name, later / name.replace("_test", "_day2"))
    return {"raw": raw, "later": later, "root": tmp_path / "first", "meta": meta}


def test_the_maps_are_kept_with_the_dataset_and_count_what_they_lack(converted):
    meta, root = converted["meta"], converted["root"]
    maps = IdMaps.load(root)
    vocab = expected_vocab(TRAIN_USERS, TRAIN_IMPRESSIONS, min_count=2)
    assert {name: maps[name].kept_ids.tolist() for name in vocab} == vocab
    assert meta.id_maps == {"file": ID_MAPS_FILE, "sha256": maps.digest} and maps.vocab_sizes == meta.vocab_sizes
    assert DatasetMetadata.load(root).id_maps == meta.id_maps
    # The test split's ids outside the train maps, counted as each stored row holds them (T1's row once).
    want_outside, want_encoded = {}, {}
    for features, side in [(T1.features, "user")] + [(r.features, "item") for r in TEST_IMPRESSIONS]:
        for name, values in kept_features(features, side).items():
            if values:
                want_encoded[name] = want_encoded.get(name, 0) + len(values)
            outside = sum(1 for fid, _ in values if fid not in vocab[name])
            if outside:
                want_outside[name] = want_outside.get(name, 0) + outside
    notes = meta.notes["splits"]["test"]
    assert notes["ids_outside_id_maps"] == want_outside == {"101": 1, "121": 1, "109_14": 1, "206": 1, "508": 2}
    assert {k: v for k, v in notes["ids_encoded"].items() if v} == want_encoded
    # In train, below min_count: 30004, the single-valued 205 that impression 14 keeps (its last), seen once.
    assert meta.notes["splits"]["train"]["ids_outside_id_maps"]["205"] == 1


def test_new_raw_files_land_in_the_id_space_of_an_existing_dataset(converted, tmp_path):
    first, root = converted["meta"], converted["root"]
    later = convert_raw(converted["later"], tmp_path / "later", splits=["day2"], id_maps_from=root)
    assert list(later.splits) == ["day2"] and later.min_count == 2
    assert later.vocab_sizes == first.vocab_sizes and later.id_maps == first.id_maps
    assert later.notes["id_maps_from"]["dataset"] == str(root.resolve())
    assert "train_distinct_raw_ids" not in later.notes
    assert read_split(tmp_path / "later", later, "day2") == read_split(root, first, "test")
    assert later.notes["splits"]["day2"]["ids_outside_id_maps"] == first.notes["splits"]["test"]["ids_outside_id_maps"]
    # The train files again, under the given maps: nothing is counted, so nothing is re-ranked.
    again = convert_raw(converted["raw"], tmp_path / "again", splits=["train"], id_maps_from=root,
                        block_impressions=2)
    assert read_split(tmp_path / "again", again, "train") == read_split(root, first, "train")


def test_unusable_sources_of_id_maps_are_refused(converted, tmp_path):
    root = converted["root"]
    with pytest.raises(ValueError, match="is the dataset the id maps come from"):
        convert_raw(converted["raw"], root, splits=["test"], id_maps_from=root)
    with pytest.raises(ValueError, match="min_count 3 differs from the 2"):
        convert_raw(converted["raw"], tmp_path / "o", splits=["test"], id_maps_from=root, min_count=3)
    write_random_dataset(tmp_path / "direct", splits={"train": 3})
    with pytest.raises(DatasetError, match="keeps no id maps \\(source 'synthetic-test'"):
        convert_raw(converted["raw"], tmp_path / "o", splits=["test"], id_maps_from=tmp_path / "direct")
    with pytest.raises(DatasetError, match="no such file"):
        convert_raw(converted["raw"], tmp_path / "o", splits=["test"], id_maps_from=tmp_path / "nothing")
    assert not (tmp_path / "o" / "metadata.json").exists()


def _rewrite(path: Path, fields: list[str], ids: list[list[int]]) -> None:
    pq.write_table(pa.table({"field": pa.array(fields, pa.string()), "raw_ids": pa.array(ids, pa.list_(pa.int64()))}),
                   path)


def _damage(root: Path, how: str) -> None:
    path = root / ID_MAPS_FILE
    table = pq.read_table(path)
    fields, ids = table.column("field").to_pylist(), table.column("raw_ids").to_pylist()
    k = fields.index("205")
    if how == "unsorted":
        ids[k] = ids[k][::-1]
    elif how == "changed":
        ids[k] = [ids[k][0] - 1] + ids[k][1:]  # still ascending, still the right length
    elif how == "missing field":
        del fields[-1], ids[-1]
    elif how == "twice":
        fields[-1], ids[-1] = fields[k], ids[k]
    elif how == "length":
        ids[k] = ids[k][:-1]
    elif how == "null id":
        ids[k] = [ids[k][0], None]
    if how == "not parquet":
        path.write_text("field,raw_ids\n")
    elif how == "no file":
        path.unlink()
    else:
        _rewrite(path, fields, ids)


@pytest.mark.parametrize("how, message", [
    ("unsorted", r"row 13, field '205': raw ids are not strictly ascending at position 1 \(30002 then 30001\)"),
    ("changed", r"the maps' SHA-256 [0-9a-f]{64} is not the [0-9a-f]{64} that .*metadata.json gives"),
    ("missing field", r"fields \['301'\] are missing"),
    ("twice", r"row 22, field '205': the field is listed twice"),
    ("length", r"row 13, field '205': 1 raw ids, but .*metadata.json gives the field 3 embedding rows"),
    ("null id", r"row 13, field '205': raw_ids holds nulls"),
    ("not parquet", r"id_maps.parquet: not a Parquet file of id maps"),
    ("no file", r"id_maps.parquet: no such file; .*metadata.json names it as the id maps"),
])
def test_damaged_id_maps_are_refused_naming_file_and_field(converted, tmp_path, how, message):
    root = converted["root"]
    _damage(root, how)
    with pytest.raises(DatasetError, match=message):
        IdMaps.load(root)
    with pytest.raises(DatasetError, match=message):  # before a row is converted
        convert_raw(converted["raw"], tmp_path / "o", splits=["test"], id_maps_from=root)


def test_maps_written_by_another_parquet_writer_are_read(converted):
    """Another list item name, non-null items and large types, as Spark or polars may write them."""
    root = converted["root"]
    table = pq.read_table(root / ID_MAPS_FILE)
    item = pa.field("element", pa.int64(), nullable=False)
    other = pa.table({"field": table.column("field").cast(pa.large_string()),
                      "raw_ids": table.column("raw_ids").cast(pa.large_list(item))})
    pq.write_table(other, root / ID_MAPS_FILE)
    assert IdMaps.load(root).digest == converted["meta"].id_maps["sha256"]


def test_a_malformed_metadata_entry_is_refused(converted):
    path = converted["root"] / "metadata.json"
    raw = json.loads(path.read_text())
    raw["id_maps"] = {"file": ID_MAPS_FILE, "sha256": "abc"}
    path.write_text(json.dumps(raw))
    with pytest.raises(DatasetError, match=r"metadata.json: id_maps: .* is not \{'file': path, 'sha256'"):
        DatasetMetadata.load(converted["root"])


def test_launcher_converts_with_given_maps_and_refuses_min_count(converted, tmp_path, capsys):
    launcher = load_script("launch/convert.py")
    meta = launcher.main(["raw", "--raw-dir", str(converted["later"]), "--out", str(tmp_path / "later"),
                          "--splits", "day2", "--id-maps-from", str(converted["root"])])
    out = capsys.readouterr().out
    assert meta.id_maps == converted["meta"].id_maps
    assert "ids outside the id maps (index 0): 101=1 (100.0%), 121=1 (100.0%), 109_14=1 (50.0%)" in out
    assert f"taken from {converted['root'].resolve()}" in out
    with pytest.raises(SystemExit) as usage:
        launcher.main(["raw", "--raw-dir", str(converted["later"]), "--out", str(tmp_path / "o"), "--splits", "day2",
                       "--id-maps-from", str(converted["root"]), "--min-count", "2"])
    assert usage.value.code == 2 and "--min-count comes with the id maps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad:
        launcher.main(["raw", "--raw-dir", str(converted["later"]), "--out", str(tmp_path / "o"), "--splits", "day2",
                       "--id-maps-from", str(tmp_path / "nothing")])
    err = capsys.readouterr().err
    assert bad.value.code == 2 and "no such file" in err and "Traceback" not in err


# ---------------------------------------------------------------- checkpoints, exports, scoring


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-rank run on a dataset with id maps, and a second dataset: the same impressions and sizes in
    another id space."""
    from dist_mtl.distributed import shutdown_distributed
    from dist_mtl.trainer import Trainer

    root = tmp_path_factory.mktemp("id_maps_run")
    write_random_dataset(root / "data", splits={"train": 60, "test": 20}, seed=3, id_maps_seed=1)
    write_random_dataset(root / "other", splits={"train": 60, "test": 20}, seed=3, id_maps_seed=2)
    cfg = small_config(root / "data", root / "run")
    try:
        Trainer(cfg).train()
    finally:
        shutdown_distributed()
    checkpoints = sorted((root / "run" / "checkpoints").glob("step-*"))
    return {"root": root, "cfg": cfg, "checkpoint": checkpoints[-1]}


def test_checkpoints_record_the_id_maps_and_exports_carry_them(trained, tmp_path):
    import export as export_cli  # launch/export.py

    from dist_mtl.export import load_exported

    root = trained["root"]
    maps = IdMaps.load(root / "data")
    assert read_side_file(trained["checkpoint"])["extra"]["id_maps_sha256"] == maps.digest
    out = export_cli.main(["--checkpoint", str(trained["checkpoint"]), "--out", str(tmp_path / "export")])
    exported = load_exported(out)
    assert exported.info["id_maps"] == {"file": ID_MAPS_FILE, "sha256": maps.digest}
    carried = exported.id_maps()
    for spec in ALI_CCP_FIELDS:  # serving encodes raw ids as the dataset did
        np.testing.assert_array_equal(carried[spec.name].kept_ids, maps[spec.name].kept_ids)
    raw = maps["205"].kept_ids[[4, 0]]
    assert carried.encode("205", np.append(raw, -7)).tolist() == [5, 1, 0]

    bare = export_cli.main(["--checkpoint", str(trained["checkpoint"]), "--out", str(out), "--without-id-maps"])
    assert load_exported(bare).id_maps() is None and not (bare / ID_MAPS_FILE).exists()
    # The digest stays in export.json: scoring still tells another id space apart (next test).
    assert load_exported(bare).info["id_maps"] == {"file": None, "sha256": maps.digest}


def test_an_export_refuses_a_dataset_in_another_id_space(trained, tmp_path, capsys):
    import export as export_cli  # launch/export.py
    import predict as predict_cli  # launch/predict.py

    from dist_mtl.export import ExportError, export_model

    root = trained["root"]
    other = IdMaps.load(root / "other")
    with pytest.raises(ExportError, match=f"the dataset at {root / 'other'} has {other.digest[:16]}"):
        export_model(tmp_path / "x", trained["cfg"], checkpoint=trained["checkpoint"], id_maps_from=root / "other")
    with pytest.raises(SystemExit):
        export_cli.main(["--checkpoint", str(trained["checkpoint"]), "--out", str(tmp_path / "x"),
                         "--id-maps-from", str(tmp_path / "moved")])
    err = capsys.readouterr().err
    assert "trained on data encoded with the id maps" in err and "--id-maps-from" in err and "Traceback" not in err

    for with_id_maps in (True, False):
        out = export_model(tmp_path / f"export_{with_id_maps}", trained["cfg"], checkpoint=trained["checkpoint"],
                           with_id_maps=with_id_maps)
        predict_cli.main(["--model", str(out), "--data", str(root / "data"), "--out", str(tmp_path / "ok.parquet")])
        with pytest.raises(SystemExit):
            predict_cli.main(["--model", str(out), "--data", str(root / "other"), "--out",
                              str(tmp_path / "p.parquet")])
        err = capsys.readouterr().err
        assert f"was encoded with the id maps {other.digest[:16]}" in err and "--id-maps-from" in err
        assert not (tmp_path / "p.parquet").exists()


def test_a_run_does_not_resume_on_a_dataset_in_another_id_space(trained, tmp_path):
    from dist_mtl.distributed import shutdown_distributed
    from dist_mtl.trainer import Trainer

    run_dir = tmp_path / "run"
    shutil.copytree(trained["root"] / "run", run_dir)
    try:
        with pytest.raises(CheckpointMismatchError, match="trained on data encoded with the id maps"):
            Trainer(small_config(trained["root"] / "other", run_dir)).train()
    finally:
        shutdown_distributed()
