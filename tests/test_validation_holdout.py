"""launch/convert.py --validation-share: whole user rows of the train split held out as the split "val",
for early stopping and the best model without the test split."""

from __future__ import annotations

import collections
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from script_helpers import load_script
from test_negative_downsampling import WEIGHTED_TASKS
from test_trainer import small_config

from dist_mtl.data import schema
from dist_mtl.data.convert import VALIDATION_SPLIT, ConvertError, convert_raw, holds_out
from dist_mtl.data.synthetic import SyntheticConfig, write_raw
from dist_mtl.distributed import shutdown_distributed
from dist_mtl.trainer import Trainer

CONVERT = load_script("launch/convert.py")
SHARE, SEED = 0.2, 4


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("holdout")
    write_raw(root / "raw", SyntheticConfig(train_impressions=4000, test_impressions=1000, history_ids_per_user=30.0,
                                            impressions_per_user=4.0, click_rate=0.1, buy_rate_after_click=0.1, seed=8,
                                            vocab_scale=0.02))  # many ids only a few user rows hold
    return root


def _lines(path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _split_raw(raw_dir, out_dir, held_keys: set[bytes], held: bool) -> None:
    """The train split's raw files with only the held-out user rows (``held``) or only the others."""
    out_dir.mkdir()
    common = [line for line in _lines(raw_dir / "common_features_train.csv")
              if (line.split(b",", 1)[0] in held_keys) == held]
    skeleton = [line for line in _lines(raw_dir / "sample_skeleton_train.csv")
                if (line.split(b",", 4)[3] in held_keys) == held]
    (out_dir / "common_features_train.csv").write_bytes(b"".join(common))
    (out_dir / "sample_skeleton_train.csv").write_bytes(b"".join(skeleton))


def _table(root, meta: schema.DatasetMetadata, split: str, side: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(root / getattr(part, side)) for part in meta.split(split).parts])


def test_the_held_out_split_is_the_conversion_of_the_held_out_rows(raw, tmp_path):
    # Tiny text blocks: user rows and their impressions straddle the parser's blocks.
    meta = convert_raw(raw / "raw", tmp_path / "held", validation_share=SHARE, validation_seed=SEED,
                       read_block_bytes=4096, block_impressions=500)
    keys = pa.array([line.split(b",", 1)[0] for line in _lines(raw / "raw" / "common_features_train.csv")], pa.binary())
    held_keys = set(keys.filter(pa.array(holds_out(keys, SHARE, SEED))).to_pylist())
    assert 0.1 * len(keys) < len(held_keys) < 0.3 * len(keys)

    # The train split and the id maps are those of the raw train files without the held-out user rows...
    _split_raw(raw / "raw", tmp_path / "kept_raw", held_keys, held=False)
    (tmp_path / "kept_raw" / "common_features_test.csv").symlink_to(raw / "raw" / "common_features_test.csv")
    (tmp_path / "kept_raw" / "sample_skeleton_test.csv").symlink_to(raw / "raw" / "sample_skeleton_test.csv")
    kept = convert_raw(tmp_path / "kept_raw", tmp_path / "kept", block_impressions=500)
    assert meta.id_maps["sha256"] == kept.id_maps["sha256"] and meta.vocab_sizes == kept.vocab_sizes
    for split in ("train", "test"):
        for side in ("users", "impressions"):
            assert _table(tmp_path / "held", meta, split, side).equals(_table(tmp_path / "kept", kept, split, side))
    # ... and the validation split is those rows converted in that id space.
    _split_raw(raw / "raw", tmp_path / "held_raw", held_keys, held=True)
    alone = convert_raw(tmp_path / "held_raw", tmp_path / "alone", splits=["train"], id_maps_from=tmp_path / "kept",
                        block_impressions=500)
    for side in ("users", "impressions"):
        assert _table(tmp_path / "held", meta, VALIDATION_SPLIT, side).equals(
            _table(tmp_path / "alone", alone, "train", side))
    val = meta.split(VALIDATION_SPLIT)
    assert val.num_impressions == alone.split("train").num_impressions > 0
    assert set(_table(tmp_path / "held", meta, VALIDATION_SPLIT, "users").column("common_feature_index")
               .cast(pa.binary()).to_pylist()) <= held_keys
    notes = meta.notes["splits"]
    assert notes["train"]["validation_holdout"]["impressions"] == val.num_impressions
    assert notes[VALIDATION_SPLIT]["held_out_of"]["user_rows"] == notes["train"]["validation_holdout"]["user_rows"]
    # Ids that only held-out rows hold are outside the maps, as a test split's unseen ids are: not counted.
    outside = notes[VALIDATION_SPLIT]["ids_outside_id_maps"]
    assert outside == alone.notes["splits"]["train"]["ids_outside_id_maps"] and outside["101"] > 0 and outside["205"] > 0
    assert notes["train"]["user_rows_without_impressions"] == kept.notes["splits"]["train"]["user_rows_without_impressions"]
    assert not list((tmp_path / "held").glob(".convert-staging-*"))


def test_the_choice_depends_on_the_key_and_seed_only():
    keys = pa.array([f"{i:032x}" for i in range(40_000)])
    held = holds_out(keys, 0.05, seed=0)
    assert abs(held.mean() - 0.05) < 0.005
    # Any slicing of the keys into blocks holds out the same rows.
    assert np.array_equal(np.concatenate([holds_out(keys.slice(i, 777), 0.05, 0) for i in range(0, 40_000, 777)]), held)
    assert not np.array_equal(holds_out(keys, 0.05, seed=1), held)
    assert np.array_equal(held & holds_out(keys, 0.2, seed=0), held)  # a larger share holds out more of the same


def test_downsampled_training_stops_early_on_the_whole_validation_split(raw, tmp_path, capsys):
    meta = convert_raw(raw / "raw", tmp_path / "data", keep_negatives=0.25, validation_share=SHARE,
                       validation_seed=SEED)
    val = meta.split(VALIDATION_SPLIT)
    assert val.negative_keep_rate == 1.0 and meta.split("train").negative_keep_rate == 0.25
    impressions = _table(tmp_path / "data", meta, VALIDATION_SPLIT, "impressions")
    assert (impressions.column("sample_weight").to_numpy() == 1.0).all()
    assert (impressions.column("click").to_numpy() == 0).mean() > 0.8  # every non-clicked one kept
    try:
        summary = Trainer(small_config(tmp_path / "data", tmp_path / "run", WEIGHTED_TASKS,
                                       f'data.val_split="{VALIDATION_SPLIT}"', "train.epochs=2")).train()
    finally:
        shutdown_distributed()
    assert [h["split"] for h in summary["history"]] == [VALIDATION_SPLIT] * 2
    assert summary["selection_split"] == VALIDATION_SPLIT and "data.val_split is unset" not in capsys.readouterr().out
    assert summary["eval_split"] == "test" and 0.0 < summary["metrics"]["ctr/auc"] < 1.0


@pytest.mark.parametrize("kwargs, message", [
    ({"validation_share": 1.0}, r"validation_share is the share .* in \[0, 1\); got 1.0"),
    ({"validation_share": -0.1}, r"in \[0, 1\); got -0.1"),
    ({"validation_share": 0.1, "splits": ["test"], "id_maps_from": "MAPS"}, r"holds out part of the 'train' split"),
    ({"validation_share": 1e-9}, r"held out no impression of the train split's [\d,]+ user rows \(0 held out\)"),
])
def test_shares_that_cannot_work_are_refused(raw, tmp_path, kwargs, message):
    if kwargs.get("id_maps_from") == "MAPS":
        convert_raw(raw / "raw", tmp_path / "maps", splits=["train"])
        kwargs = {**kwargs, "id_maps_from": tmp_path / "maps"}
    with pytest.raises(ConvertError, match=message):
        convert_raw(raw / "raw", tmp_path / "out", **kwargs)
    assert not (tmp_path / "out" / "metadata.json").exists()


def test_a_raw_split_of_the_holdouts_name_is_refused(raw, tmp_path):
    for kind in ("common_features", "sample_skeleton"):
        (tmp_path / f"{kind}_val.csv").symlink_to(raw / "raw" / f"{kind}_test.csv")
        (tmp_path / f"{kind}_train.csv").symlink_to(raw / "raw" / f"{kind}_train.csv")
    with pytest.raises(ConvertError, match=r"writes the split 'val', which the raw files to convert have already"):
        convert_raw(tmp_path, tmp_path / "out", splits=["train", "val"], validation_share=0.1)


def test_the_launcher_reports_the_holdout(raw, tmp_path, capsys):
    meta = CONVERT.main(["raw", "--raw-dir", str(raw / "raw"), "--out", str(tmp_path / "out"),
                         "--validation-share", str(SHARE), "--validation-seed", str(SEED)])
    out = capsys.readouterr().out
    held = meta.notes["splits"]["train"]["validation_holdout"]
    assert (f"held out as 'val': {held['user_rows']:,} user rows with {held['impressions']:,} impressions "
            f"(a share {SHARE:g} of the user rows, seed {SEED})") in out
    assert f"  val: {held['impressions']:,} impressions" in out
    with pytest.raises(SystemExit) as exit_info:
        CONVERT.main(["raw", "--raw-dir", str(raw / "raw"), "--out", str(tmp_path / "bad"), "--validation-share", "2"])
    assert exit_info.value.code == 2 and "validation_share is the share" in capsys.readouterr().err


def test_skipped_duplicate_user_rows_leave_the_id_maps_as_they_were(raw, tmp_path):
    # A duplicate common-features row is skipped and its ids uncounted: only if they were counted, that is
    # only if its key is not held out.
    lines = _lines(raw / "raw" / "common_features_train.csv")
    keys = pa.array([line.split(b",", 1)[0] for line in lines], pa.binary())
    held = holds_out(keys, SHARE, SEED)
    duplicated = tmp_path / "raw"
    duplicated.mkdir()
    for name in ("sample_skeleton_train.csv", "common_features_test.csv", "sample_skeleton_test.csv"):
        (duplicated / name).symlink_to(raw / "raw" / name)
    # The held-out row repeated holds a user id (field 101) that exactly one counted row holds: uncounting
    # it would take that id out of the maps.
    user_id = [re.search(rb"(?:^|[,\x01])101\x02(\d+)\x03", line).group(1) for line in lines]
    counted = collections.Counter(u for u, h in zip(user_id, held) if not h)
    held_row = next(i for i, h in enumerate(held) if h and counted[user_id[i]] == 1)
    repeats = [lines[held_row], lines[int(np.argmin(held))]]  # one held-out key, one kept
    (duplicated / "common_features_train.csv").write_bytes(b"".join(lines + repeats))
    meta = convert_raw(duplicated, tmp_path / "out", validation_share=SHARE, validation_seed=SEED, skip_bad_rows=True)
    plain = convert_raw(raw / "raw", tmp_path / "plain", validation_share=SHARE, validation_seed=SEED)
    assert meta.split("train").skipped["common_features.duplicate_common_feature_index"] == 2
    assert meta.id_maps["sha256"] == plain.id_maps["sha256"]
    assert meta.split(VALIDATION_SPLIT).num_impressions == plain.split(VALIDATION_SPLIT).num_impressions
