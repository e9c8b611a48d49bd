"""launch/convert.py --keep-negatives: a share of the non-clicked impressions kept and weighted, and the
checks that keep such a split from training unweighted or being evaluated."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from script_helpers import load_script
from test_trainer import small_config

from dist_mtl.data import schema
from dist_mtl.data.convert import ConvertError, convert_raw, keeps_negative
from dist_mtl.data.reader import ParquetGroupReader
from dist_mtl.data.synthetic import SyntheticConfig, write_raw
from dist_mtl.distributed import shutdown_distributed
from dist_mtl.export import ExportError, export_model, predict_split
from dist_mtl.tasks import TaskConfig, label_rate
from dist_mtl.trainer import Trainer

CONVERT = load_script("launch/convert.py")
RATE = 0.25
WEIGHTED_TASKS = ('tasks=[{name="ctr", label="click", weight_column="sample_weight"}, '
                  '{name="cvr", label="buy", rows="click", loss_weight=0.0}, '
                  '{name="ctcvr", label="buy", weight_column="sample_weight"}]')


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("downsampling")
    write_raw(root / "raw", SyntheticConfig(train_impressions=4000, test_impressions=1500, history_ids_per_user=30.0,
                                            impressions_per_user=4.0, click_rate=0.1, buy_rate_after_click=0.1, seed=5))
    whole = convert_raw(root / "raw", root / "whole")
    kept = convert_raw(root / "raw", root / "kept", keep_negatives=RATE, negative_seed=3)
    return root, whole, kept


def _rows(root, split: str) -> dict[str, np.ndarray]:
    meta = schema.DatasetMetadata.load(root)
    columns = ["sample_id", "click", "buy"] + list(meta.extra_columns)
    tables = [pq.read_table(root / part.impressions, columns=columns) for part in meta.split(split).parts]
    return {c: np.concatenate([t.column(c).to_numpy() for t in tables]) for c in columns}


def test_every_click_and_the_hashed_share_of_the_rest_are_kept_and_weighted(converted):
    root, whole, kept = converted
    full, down = _rows(root / "whole", "train"), _rows(root / "kept", "train")
    clicked = full["click"] == 1
    chosen = clicked | keeps_negative(full["sample_id"], RATE, seed=3)
    # The same rows, in the same order: every clicked one (so every purchase) and the hash's non-clicked.
    assert np.array_equal(down["sample_id"], full["sample_id"][chosen])
    assert down["buy"].sum() == full["buy"].sum() > 0
    negatives, kept_negatives = int((~clicked).sum()), int((down["click"] == 0).sum())
    assert abs(kept_negatives - RATE * negatives) < 4 * np.sqrt(negatives * RATE * (1 - RATE))
    assert np.array_equal(down["sample_weight"], np.where(down["click"] == 1, 1.0, 1 / RATE).astype(np.float32))
    train = kept.split("train")
    assert train.negative_keep_rate == RATE and whole.split("train").negative_keep_rate == 1.0
    notes = kept.notes["splits"]["train"]["negative_downsampling"]
    assert notes["non_clicked_dropped"] == negatives - kept_negatives and notes["seed"] == 3
    # The test split is whole, with weights of 1.
    test = _rows(root / "kept", "test")
    assert np.array_equal(test["sample_id"], _rows(root / "whole", "test")["sample_id"])
    assert kept.split("test").negative_keep_rate == 1.0 and (test["sample_weight"] == 1.0).all()
    # Users left without impressions are not stored (and counted): the reader reads the whole split.
    reader = ParquetGroupReader(root / "kept", "train", 256, shuffle=False, extra_columns=["sample_weight"])
    assert sum(b.num_impressions for b in reader) == train.num_impressions == len(down["sample_id"])
    users_left_out = whole.split("train").num_users - train.num_users
    assert users_left_out > 0 and kept.notes["splits"]["train"]["user_rows_without_impressions"] == users_left_out


def test_the_choice_depends_on_sample_id_and_seed_only():
    ids = np.arange(200_000, dtype=np.int64) * 7919 + 13
    mask = keeps_negative(ids, 0.1, seed=0)
    assert abs(mask.mean() - 0.1) < 0.003
    assert np.array_equal(keeps_negative(ids[::-1], 0.1, seed=0), mask[::-1])  # per id, whatever the order
    other = keeps_negative(ids, 0.1, seed=1)
    assert abs(other.mean() - 0.1) < 0.003 and (mask != other).mean() > 0.15
    assert keeps_negative(ids, 1.0, seed=0).all()


def test_label_rates_are_those_of_the_impressions_the_split_stands_for(converted):
    _, whole, kept = converted
    ctr, cvr = TaskConfig(name="ctr", label="click"), TaskConfig(name="cvr", label="buy", rows="click")
    split = kept.split("train")
    negatives = split.num_impressions - split.num_clicks
    assert label_rate(ctr, split) == pytest.approx(split.num_clicks / (split.num_clicks + negatives / RATE))
    # Within the hash's binomial noise of the whole split's rate; CVR's rows (clicks) are all kept.
    assert label_rate(ctr, split) == pytest.approx(label_rate(ctr, whole.split("train")), rel=0.08)
    assert label_rate(cvr, split) == label_rate(cvr, whole.split("train"))


def test_training_needs_the_weights_and_evaluating_the_split_is_refused(converted, tmp_path):
    root, _, _ = converted
    with pytest.raises(ValueError, match="task 'ctr' trains on all of its rows without weight_column"):
        Trainer(small_config(root / "kept", tmp_path / "unweighted"))
    with pytest.raises(ValueError, match="its metrics would not be those of the impressions it stands for"):
        Trainer(small_config(root / "kept", tmp_path / "eval_on_train", WEIGHTED_TASKS, 'data.eval_split="train"'))
    cfg = small_config(root / "kept", tmp_path / "weighted", WEIGHTED_TASKS)
    try:
        summary = Trainer(cfg).train()
    finally:
        shutdown_distributed()
    assert summary["samples_trained"] == json.loads((root / "kept" / "metadata.json").read_text()
                                                    )["splits"]["train"]["num_impressions"]
    assert 0.0 < summary["metrics"]["ctr/auc"] < 1.0
    checkpoint = sorted((tmp_path / "weighted" / "checkpoints").glob("step-*"))[-1]
    export = export_model(tmp_path / "export", cfg, checkpoint=checkpoint)
    with pytest.raises(ExportError, match="its metrics would not be those"):
        predict_split(export, root / "kept", "train", tmp_path / "p.parquet")
    scored = predict_split(export, root / "kept", "train", tmp_path / "p.parquet", metrics=False)
    assert scored["rows"] == schema.DatasetMetadata.load(root / "kept").split("train").num_impressions


def test_bad_shares_and_damaged_metadata_are_refused(converted, tmp_path, capsys):
    root, _, _ = converted
    for share in (0.0, 1.5):
        with pytest.raises(ConvertError, match="share of non-clicked impressions kept"):
            convert_raw(root / "raw", tmp_path / "bad", keep_negatives=share)
    with pytest.raises(ConvertError, match="none of which is converted"):
        convert_raw(root / "raw", tmp_path / "bad", keep_negatives=0.5, downsampled_splits=["day8"])
    with pytest.raises(SystemExit) as exit_:
        CONVERT.main(["raw", "--raw-dir", str(root / "raw"), "--out", str(tmp_path / "bad"), "--keep-negatives", "0"])
    assert exit_.value.code == 2 and "share of non-clicked impressions kept" in capsys.readouterr().err
    record = json.loads((root / "kept" / "metadata.json").read_text())
    record["extra_columns"] = {}
    with pytest.raises(schema.DatasetError, match="no 'sample_weight' column to weight them"):
        schema.DatasetMetadata.from_json(json.dumps(record))
    record = json.loads((root / "kept" / "metadata.json").read_text())
    record["splits"]["train"]["negative_keep_rate"] = 0
    with pytest.raises(schema.DatasetError, match=r"negative_keep_rate: 0 is not a number in \(0, 1\]"):
        schema.DatasetMetadata.from_json(json.dumps(record))


def test_the_launcher_reports_the_kept_share(converted, tmp_path, capsys):
    root, _, _ = converted
    CONVERT.main(["raw", "--raw-dir", str(root / "raw"), "--out", str(tmp_path / "cli"), "--keep-negatives", "0.25",
                  "--negative-seed", "3"])
    out = capsys.readouterr().out
    assert "non-clicked impressions kept: a share 0.25 (" in out and "each weighted 4 in sample_weight" in out
    assert np.array_equal(_rows(tmp_path / "cli", "train")["sample_id"], _rows(root / "kept", "train")["sample_id"])
