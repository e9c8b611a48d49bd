"""The benchmark scripts' helpers (sweep, prebuilt and profiled steps, accuracy, plots, learnable bound,
gap breakdown, full scale, converter) and a tiny reader_bench.py run. The training runs themselves are
exercised by running the benchmarks (``sweep_bench.py --quick``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import accuracy_bench  # noqa: E402
import learnable_bound  # noqa: E402
import plots  # noqa: E402
import prebuilt_steps  # noqa: E402
import sweep_bench  # noqa: E402
from common import BenchmarkError  # noqa: E402

from dist_mtl.config import load_config  # noqa: E402
from dist_mtl.data.synthetic import REAL_TEST_IMPRESSIONS, REAL_TRAIN_IMPRESSIONS, TRUTH_COLUMNS  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- sweep_bench


def test_resolve_settings_takes_the_preset_then_the_given_flags():
    assert sweep_bench.resolve_settings(False, {}) == sweep_bench.SweepSettings()
    assert sweep_bench.SweepSettings().batch_sizes == (1024, 4096, 16384)
    quick = sweep_bench.resolve_settings(True, {"steps": None, "batch_sizes": (64,)})
    assert quick.batch_sizes == (64,)
    assert quick.steps == sweep_bench.QUICK.steps != sweep_bench.SweepSettings().steps
    assert quick.train_impressions == sweep_bench.QUICK.train_impressions


def test_sweep_runs_cover_every_combination_once():
    settings = sweep_bench.SweepSettings()
    runs = sweep_bench.sweep_runs(sweep_bench.MODELS, settings, sweep_bench.READER_MODES)
    assert len(runs) == 2 * 3 * 2 * 2
    assert len({r.name for r in runs}) == len(runs)
    assert {(r.model, r.batch_size, r.world_size, r.reader) for r in runs} == {
        (m, b, w, r) for m in ("esmm", "mmoe") for b in (1024, 4096, 16384) for w in (1, 2)
        for r in ("included", "excluded")}


def test_threads_per_rank_shares_the_cores():
    assert sweep_bench.threads_per_rank(2, 1) == 2
    assert sweep_bench.threads_per_rank(2, 2) == 1
    assert sweep_bench.threads_per_rank(2, 4) == 1
    assert sweep_bench.threads_per_rank(16, 3) == 5


@pytest.mark.parametrize("model", ["esmm", "mmoe"])
def test_sweep_overrides_resolve_to_the_intended_job(tmp_path, model):
    overrides = sweep_bench.job_overrides(model, tmp_path / "data", tmp_path / "run", 4096, [16, 8], 55)
    cfg = load_config(sweep_bench.DEFAULT_CONFIG, overrides)
    assert cfg.model.head == model
    assert cfg.data.path == str(tmp_path / "data") and cfg.run_dir == str(tmp_path / "run")
    assert cfg.data.batch_size == 4096 and cfg.model.tower_dims == [16, 8] and cfg.model.embedding_dim == 16
    assert cfg.train.epochs == 1 and cfg.train.max_steps == 55 and cfg.sharding.device == "cpu"
    tasks = {t.name: t for t in cfg.tasks}
    assert set(tasks) == {"ctr", "cvr", "ctcvr"}
    assert (tasks["cvr"].label, tasks["cvr"].rows) == ("buy", "click")
    # ESMM's CVR learns through pCTCVR only; MMOE trains it directly on clicked rows.
    assert tasks["cvr"].loss_weight == (0.0 if model == "esmm" else 1.0)
    assert (tasks["ctcvr"].label, tasks["ctcvr"].rows) == ("buy", "all")


def test_torchrun_command_is_standalone_with_the_world_size(tmp_path):
    cmd = sweep_bench.torchrun_command(tmp_path / "w.py", 2, ["--x", "1"])
    assert cmd[0] == sys.executable and cmd[1:3] == ["-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc_per_node=2" in cmd
    assert cmd[-3:] == [str(tmp_path / "w.py"), "--x", "1"]


def test_read_prebuilt_names_the_file_and_missing_keys(tmp_path):
    path = tmp_path / "prebuilt.json"
    with pytest.raises(BenchmarkError, match="no such file"):
        sweep_bench.read_prebuilt(path)
    path.write_text("{not json")
    with pytest.raises(BenchmarkError, match="not JSON"):
        sweep_bench.read_prebuilt(path)
    path.write_text(json.dumps({"samples_per_s": 1.0}))
    with pytest.raises(BenchmarkError, match="timed_samples"):
        sweep_bench.read_prebuilt(path)
    full = {k: 1 for k in sweep_bench.PREBUILT_KEYS}
    path.write_text(json.dumps(full))
    assert sweep_bench.read_prebuilt(path) == full


def _sweep_record(entries):
    return {"entries": entries, "towers": [16, 8], "steps": 50, "warmup": 5, "command": "python sweep.py",
            "date": "2026-01-01T00:00:00+00:00", "machine": {"usable_cores": 2, "cpu_model": "cpu"},
            "data": {"train_impressions": 2_000_000, "history_ids_per_user": 500.0, "impressions_per_user": 58.0}}


def test_sweep_markdown_table_places_each_rate_in_its_row_and_column():
    def entry(model, batch, world, reader, rate):
        return {"model": model, "batch_size_per_rank": batch, "world_size": world, "reader": reader,
                "samples_per_s": rate}

    entries = [entry("mmoe", 1024, 2, "excluded", 7000.4), entry("esmm", 4096, 1, "included", 123456.7),
               entry("esmm", 1024, 2, "excluded", 50000.0)]
    lines = sweep_bench.markdown_table(_sweep_record(entries)).splitlines()
    header = next(line for line in lines if line.startswith("| model"))
    assert header == "| model | batch/rank | 1 rank, reader included | 2 ranks, reader excluded |"
    rows = [line for line in lines if line.startswith("| ESMM") or line.startswith("| MMOE")]
    assert rows == ["| ESMM | 1,024 | - | 50,000 |", "| ESMM | 4,096 | 123,457 | - |", "| MMOE | 1,024 | - | 7,000 |"]
    assert lines[-1] == "`python sweep.py`"


# ----------------------------------------------------------------------------------------- prebuilt_steps


def test_timed_samples_counts_the_batches_of_the_timed_steps():
    sizes = [3, 4, 5]
    for warmup in range(5):
        for steps in range(1, 8):
            expected = sum(sizes[(warmup + i) % len(sizes)] for i in range(steps))
            assert prebuilt_steps.timed_samples(sizes, warmup, steps) == expected
    assert prebuilt_steps.timed_samples([3, 4, 5], 2, 4) == 5 + 3 + 4 + 5
    with pytest.raises(ValueError, match="no batches"):
        prebuilt_steps.timed_samples([], 0, 1)
    with pytest.raises(ValueError, match="steps >= 1"):
        prebuilt_steps.timed_samples([1], 0, 0)


# ----------------------------------------------------------------------------------------- accuracy_bench


@pytest.mark.parametrize("text,value", [("500000", 500_000), ("500_000", 500_000), ("500k", 500_000),
                                        ("0.5M", 500_000), ("2M", 2_000_000), ("2.5m", 2_500_000), ("7", 7)])
def test_parse_count_accepts_suffixes(text, value):
    assert accuracy_bench.parse_count(text) == value


@pytest.mark.parametrize("text", ["", "abc", "0", "1.5", "0.0000001M", "-3", "2G"])
def test_parse_count_rejects_what_is_not_a_count(text):
    with pytest.raises(argparse.ArgumentTypeError):
        accuracy_bench.parse_count(text)


def test_parse_sizes_sorts_and_deduplicates():
    assert accuracy_bench.parse_sizes("8M,0.5M,2M,2000000") == [500_000, 2_000_000, 8_000_000]
    with pytest.raises(argparse.ArgumentTypeError, match="at least one"):
        accuracy_bench.parse_sizes(" , ")


def test_world_config_fixes_the_vocabulary_for_every_size():
    base = accuracy_bench.DEFAULT_WORLD
    world = accuracy_bench.world_config([500_000, 8_000_000], base, None)
    assert world.vocab_scale == pytest.approx(8_000_000 / REAL_TRAIN_IMPRESSIONS)
    assert accuracy_bench.world_config([1, 10**9], base, None).vocab_scale == 1.0
    assert accuracy_bench.world_config([500_000], base, 0.25).vocab_scale == 0.25
    assert world.test_impressions == base.test_impressions and world.click_rate == base.click_rate


def test_task_results_gap_and_undefined_auc():
    metrics = {"ctr/auc": 0.61, "ctr/logloss": 0.3, "cvr/auc": float("nan"), "ctcvr/auc": 0.70}
    oracle = {"ctr": 0.71, "cvr": 0.74, "ctcvr": float("nan")}
    out = accuracy_bench.task_results(metrics, oracle)
    assert out["ctr"]["auc"] == 0.61 and out["ctr"]["gap"] == pytest.approx(0.10)
    assert out["cvr"] == {"auc": None, "oracle_auc": 0.74, "gap": None}
    assert out["ctcvr"] == {"auc": 0.70, "oracle_auc": None, "gap": None}
    assert accuracy_bench.task_results({"ctr/auc": 0.6}, oracle).keys() == {"ctr"}


@pytest.mark.parametrize("model", ["esmm", "mmoe"])
def test_accuracy_overrides_keep_the_recipe_and_select_on_test(tmp_path, model):
    config = REPO / "configs" / "synthetic_cpu.toml"
    recipe = load_config(config)
    cfg = load_config(config, accuracy_bench.job_overrides(model, tmp_path, tmp_path / "run", 2,
                                                           ["train.eval_every_steps=100"]))
    assert cfg.model.head == model and cfg.train.epochs == 2 and cfg.train.eval_every_steps == 100
    assert cfg.data.batch_size == recipe.data.batch_size and cfg.model.tower_dims == recipe.model.tower_dims
    assert cfg.train.early_stop_metric == "ctcvr/auc"
    assert (cfg.data.val_split, cfg.data.eval_split) == ("", "test")


def test_truth_digest_follows_rows_not_encoding(tmp_path):
    table = pa.table({"sample_id": pa.array([1, 2, 3], pa.int64()), "click": pa.array([0, 1, 1], pa.int8()),
                      "buy": pa.array([0, 0, 1], pa.int8()), "p_ctr": pa.array([0.1, 0.5, 0.7], pa.float32()),
                      "p_cvr": pa.array([0.2, 0.1, 0.9], pa.float32())})
    assert table.column_names == list(TRUTH_COLUMNS)
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=1, compression="zstd")
    pq.write_table(table, tmp_path / "b.parquet", compression="none")
    changed = table.set_column(3, "p_ctr", pa.array([0.1, 0.5, 0.8], pa.float32()))
    pq.write_table(changed, tmp_path / "c.parquet")
    digest = accuracy_bench.truth_digest
    assert digest(tmp_path / "a.parquet") == digest(tmp_path / "b.parquet") != digest(tmp_path / "c.parquet")


def _accuracy_record():
    def row(auc, oracle):
        return {"auc": auc, "oracle_auc": oracle, "gap": None if auc is None else oracle - auc}

    accuracy = {
        "500000": {"esmm": {"ctr": row(0.60, 0.71), "cvr": row(0.65, 0.74), "ctcvr": row(0.70, 0.83)},
                   "mmoe": {"ctr": row(0.59, 0.71), "cvr": row(None, 0.74), "ctcvr": row(0.69, 0.83)}},
        "2000000": {"esmm": {"ctr": row(0.66, 0.71), "cvr": row(0.70, 0.74), "ctcvr": row(0.78, 0.83)}},
    }
    runs = {size: {m: {"steps": 100, "best_step": 50} for m in models} for size, models in accuracy.items()}
    return {"accuracy": accuracy, "runs": runs, "oracle_auc": {"ctr": 0.71, "cvr": 0.74, "ctcvr": 0.83},
            "model_selection": accuracy_bench.MODEL_SELECTION_NOTE, "command": "python acc.py",
            "recipe": {"config": "configs/synthetic_cpu.toml", "epochs": 2, "world_size": 2},
            "date": "2026-01-01", "machine": {"usable_cores": 2, "cpu_model": "cpu"},
            "data": {"test_impressions": 500_000, "synthetic_config": {
                "history_ids_per_user": 500.0, "click_rate": 0.1, "buy_rate_after_click": 0.1}}}


def test_accuracy_markdown_table_and_plot_points():
    record = _accuracy_record()
    text = accuracy_bench.markdown_table(record)
    assert "| 500,000 | ESMM | 0.6000 (+0.1100) | 0.6500 (+0.0900) | 0.7000 (+0.1300) | 50 / 100 |" in text
    assert "| 500,000 | MMOE | 0.5900 (+0.1200) | - | 0.6900 (+0.1400) | 50 / 100 |" in text
    assert "| - | oracle | 0.7100 | 0.7400 | 0.8300 | - |" in text
    assert "2 epochs, 2 ranks" in text and "only train and test splits" in text
    points = accuracy_bench.accuracy_points(record["accuracy"])
    assert len(points) == 9
    assert plots.AccuracyPoint("esmm", "cvr", 2_000_000, 0.70, 0.74) in points
    assert plots.AccuracyPoint("mmoe", "cvr", 500_000, None, 0.74) in points


# ------------------------------------------------------------------------------------------------ plots


def test_plots_write_png_files_and_nothing_else(tmp_path):
    pytest.importorskip("matplotlib")  # CI installs it; the GPU test machine has none
    sweep = [plots.SweepPoint(m, w, r, b, 1000.0 * b / w) for m in ("esmm", "mmoe") for w in (1, 2)
             for r in ("included", "excluded") for b in (1024, 4096)]
    path = plots.plot_sweep(sweep, tmp_path / "out" / "sweep.png", "sweep")
    accuracy = plots.plot_accuracy(accuracy_bench.accuracy_points(_accuracy_record()["accuracy"]),
                                   tmp_path / "out" / "accuracy.png", "accuracy")
    for p in (path, accuracy):
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == ["accuracy.png", "sweep.png"]


def test_plots_reject_empty_or_unknown_input(tmp_path):
    with pytest.raises(ValueError, match="no points"):
        plots.plot_sweep([], tmp_path / "s.png", "x")
    with pytest.raises(ValueError, match="no points"):
        plots.plot_accuracy([], tmp_path / "a.png", "x")
    with pytest.raises(ValueError, match="unknown reader modes"):
        plots.plot_sweep([plots.SweepPoint("esmm", 1, "cached", 1024, 1.0)], tmp_path / "s.png", "x")
    assert not list(tmp_path.iterdir())



# ----------------------------------------------------------------------------------------- gap_breakdown


@pytest.fixture(scope="module")
def planted_set(tmp_path_factory):
    from dist_mtl.data.synthetic import SyntheticConfig, write_parquet_direct

    root = tmp_path_factory.mktemp("planted")
    cfg = SyntheticConfig(train_impressions=2000, test_impressions=20_000, history_ids_per_user=40,
                          click_rate=0.3, buy_rate_after_click=0.3, seed=5)
    write_parquet_direct(root, cfg, splits=("test",))
    return root, cfg


def write_predictions(path, sample_id, z_ctr, z_cvr):
    p_ctr, p_cvr = 1 / (1 + np.exp(-z_ctr)), 1 / (1 + np.exp(-z_cvr))
    pq.write_table(pa.table({"sample_id": sample_id, "p_ctr": p_ctr.astype(np.float32),
                             "p_cvr": p_cvr.astype(np.float32), "p_ctcvr": (p_ctr * p_cvr).astype(np.float32)}),
                   path)


def test_gap_breakdown_reads_the_planted_config_and_refuses_other_sets(planted_set, tmp_path):
    import gap_breakdown

    root, cfg = planted_set
    assert gap_breakdown.planted_config(root) == cfg
    (tmp_path / "metadata.json").write_text(
        (root / "metadata.json").read_text().replace('"dist_mtl.data.synthetic"', '"someone else"'))
    with pytest.raises(ValueError, match="no synthetic generator config"):
        gap_breakdown.planted_config(tmp_path)


def test_gap_breakdown_finds_the_oracle_whole_and_a_missing_taste_part(planted_set, tmp_path):
    import gap_breakdown

    root, cfg = planted_set
    terms = gap_breakdown.test_terms(cfg)
    # The terms add up to the planted logits.
    ctr_sum = sum(v for k, v in terms.items() if k.startswith("ctr/"))
    cvr_sum = sum(v for k, v in terms.items() if k.startswith("cvr/"))
    assert np.allclose(ctr_sum - terms["z/ctr"], (ctr_sum - terms["z/ctr"]).mean(), atol=1e-4)
    assert np.allclose(cvr_sum - terms["z/cvr"], (cvr_sum - terms["z/cvr"]).mean(), atol=1e-4)

    # Predictions = the oracle, in another row order and with the click=0/buy=1 rows left out as the
    # reader does: every coefficient 1, no residual, the model's AUC the oracle's.
    keep = (terms["click"] == 1) | (terms["buy"] == 0)
    order = np.random.default_rng(0).permutation(np.flatnonzero(keep))
    oracle = tmp_path / "oracle.parquet"
    write_predictions(oracle, terms["sample_id"][order], terms["z/ctr"][order], terms["z/cvr"][order])
    result = gap_breakdown.main(["--data", str(root), "--predictions", str(oracle), "--out", str(tmp_path / "o.json")])
    for task in ("ctr", "cvr"):
        r = result[task]
        assert all(abs(c - 1) < 1e-3 for c in r["coefficients"].values()), r["coefficients"]
        assert r["residual_std"] < 1e-3
        assert r["auc"]["model"] == pytest.approx(r["auc"]["oracle"], abs=1e-4)
        assert r["taste"]["within_category_coefficient"] == pytest.approx(1.0, abs=1e-3)
    assert result["ctr"]["rows"] == keep.sum() and result["cvr"]["rows"] == (terms["click"] == 1).sum()

    # A model blind to the per-user taste within a category: that coefficient falls to 0 while the
    # per-category one stays, and the oracle with that part removed scores what the model scores.
    category_mean = gap_breakdown._group_means(terms["category"][keep], terms["ctr/taste"][keep])
    blind = terms["z/ctr"][keep] - (terms["ctr/taste"][keep] - category_mean)
    partial = tmp_path / "partial.parquet"
    write_predictions(partial, terms["sample_id"][keep], blind, terms["z/cvr"][keep])
    r = gap_breakdown.main(["--data", str(root), "--predictions", str(partial), "--out", str(tmp_path / "p.json")])["ctr"]
    assert r["taste"]["within_category_coefficient"] == pytest.approx(0.0, abs=1e-3)
    assert r["taste"]["between_category_coefficient"] == pytest.approx(1.0, abs=1e-3)
    assert r["taste"]["oracle_auc_with_within_category_taste_at_model_coefficient"] == pytest.approx(
        r["auc"]["model"], abs=1e-4)
    assert r["auc"]["model"] < r["auc"]["oracle"] - 0.005

    # The first users only: a prefix of the split in generation order, terms equal to the whole run's.
    first = gap_breakdown.test_terms(cfg, max_impressions=3000, users_per_chunk=20)
    assert 3000 <= len(first["sample_id"]) < len(terms["sample_id"])
    assert np.array_equal(first["z/ctr"], terms["z/ctr"][:len(first["sample_id"])])

    unknown = tmp_path / "unknown.parquet"
    write_predictions(unknown, np.array([10**12]), np.zeros(1), np.zeros(1))
    with pytest.raises(ValueError, match="sample ids that the test split"):
        gap_breakdown.main(["--data", str(root), "--predictions", str(unknown), "--out", str(tmp_path / "u.json")])


# ---------------------------------------------------------------------------------------- learnable_bound


def test_the_full_setting_is_the_full_scale_runs_world():
    # "42.3M" is not Ali-CCP's train size: its vocabulary scale falls a hair below 1.0, another world.
    _, approx = learnable_bound.parse_setting("42.3M@42.3M:real", None)
    assert approx.resolved_vocab_scale() < 1.0
    _, full = learnable_bound.parse_setting("full@full:real", None)
    assert full.train_impressions == REAL_TRAIN_IMPRESSIONS and full.vocab_scale == 1.0
    assert full.test_impressions == REAL_TEST_IMPRESSIONS  # the full-scale run scores the whole test split
    assert (full.click_rate, full.buy_rate_after_click) == (0.039, 0.0054)
    _, small = learnable_bound.parse_setting("2M@4M", None)
    assert small.test_impressions == accuracy_bench.DEFAULT_WORLD.test_impressions
    assert small.vocab_scale == pytest.approx(4_000_000 / REAL_TRAIN_IMPRESSIONS)
    assert learnable_bound.parse_setting("full:real", 1000)[1].test_impressions == 1000
    with pytest.raises(ValueError, match="suffix"):
        learnable_bound.parse_setting("2M:fake", None)


def test_estimated_taste_vectors_follow_their_information():
    rng = np.random.default_rng(0)
    true = rng.standard_normal((3, 4))
    # Row 0 never seen: the prior mean. Row 1 seen a great deal: the truth. Row 2 seen along one axis
    # only: that coordinate is learnt, the others stay at the prior.
    info = np.zeros((3, 4, 4))
    info[1] = 1e8 * np.eye(4)
    info[2, 0, 0] = 1e8
    est = learnable_bound._estimated_vectors(np.random.default_rng(1), true, info, 1.0)
    np.testing.assert_allclose(est[0], 0.0)
    np.testing.assert_allclose(est[1], true[1], atol=1e-3)
    assert est[2, 0] == pytest.approx(true[2, 0], abs=1e-3)
    np.testing.assert_allclose(est[2, 1:], 0.0, atol=1e-6)
    # Rows of outer products summed by index, each weighted.
    vectors = np.array([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0]])
    sums = learnable_bound._outer_sums(np.array([0, 0, 1]), vectors, np.array([1.0, 2.0, 3.0]), 3)
    np.testing.assert_allclose(sums[0], np.outer(vectors[0], vectors[0]) + 2 * np.outer(vectors[1], vectors[1]))
    np.testing.assert_allclose(sums[1], 3 * np.outer(vectors[2], vectors[2]))
    np.testing.assert_allclose(sums[2], 0.0)


# ---------------------------------------------------------------------------------------------- full_scale


def test_full_scale_redoes_a_training_step_when_its_settings_change_and_keeps_the_data_steps(tmp_path):
    import full_scale

    def step(steps, name, settings):
        return full_scale.run_step(steps, name, [sys.executable, "-c", "pass"], tmp_path / "out" / name,
                                   tmp_path / "logs", settings=settings)

    steps = full_scale.Steps(tmp_path, set(), {"train_impressions": 100})
    first = step(steps, "generate", None)
    trained = step(steps, "train", {"tower_dims": [64, 32], "head_precision": "float32"})
    assert trained["settings"] == {"tower_dims": [64, 32], "head_precision": "float32"}
    # Same settings: both steps are reused (their records come back, nothing reruns).
    assert step(steps, "generate", None) == first
    assert step(steps, "train", {"tower_dims": [64, 32], "head_precision": "float32"}) == trained
    # Other training settings redo the training step only.
    again = step(steps, "train", {"tower_dims": [64, 32], "head_precision": "bfloat16"})
    assert again["settings"]["head_precision"] == "bfloat16" and again["minutes"] != trained["minutes"]
    assert step(full_scale.Steps(tmp_path, set(), {"train_impressions": 100}), "generate", None) == first
    # Another data set redoes everything.
    other = full_scale.Steps(tmp_path, set(), {"train_impressions": 200})
    assert other.done("generate") is None and other.done("train") is None


def test_full_scale_keeps_the_raw_share_its_finished_steps_used():
    from full_scale import raw_text_share

    data = {"train_impressions": 100, "generator_version": 2}
    gb = 10**9
    assert raw_text_share(None, None, data, free=100 * gb, need_total=50 * gb) == 1.0
    assert raw_text_share(None, None, data, free=20 * gb, need_total=50 * gb) == pytest.approx(0.2)
    # Resumed: the finished steps' own files now fill the disk; their share stands, for this data set only.
    assert raw_text_share(None, {**data, "raw_share": 0.2}, data, free=200 * gb, need_total=50 * gb) == 0.2
    assert raw_text_share(None, {**data, "raw_share": 1.0}, data, free=5 * gb, need_total=50 * gb) == 1.0
    other = {**data, "train_impressions": 200}
    assert raw_text_share(None, {**other, "raw_share": 0.2}, data, free=200 * gb, need_total=50 * gb) == 1.0
    assert raw_text_share(0.5, {**data, "raw_share": 0.2}, data, free=200 * gb, need_total=50 * gb) == 0.5


def test_full_scale_extra_heads_are_valid_configs_and_esmm_best_trains_the_tables_alone_in_epoch_two():
    import full_scale

    configs = {}
    for head in full_scale.EXTRA_HEADS:
        overrides, epochs, described = full_scale.head_job(head, "[64,32]")
        cfg = configs[head] = load_config(REPO / "configs" / "synthetic_cpu.toml",
                                          [*overrides, f"train.epochs={epochs}"])
        assert described.get("epochs", 1) == cfg.train.epochs
        assert cfg.model.head == (head if head in ("mmoe", "ple") else "esmm")
        assert [t.name for t in cfg.tasks] == ["ctr", "cvr", "ctcvr"] and cfg.tasks[1].rows == "click"
    cfg = configs["esmm_best"]
    assert cfg.train.epochs == 2 and cfg.optimizer.dense_epochs == 1
    assert cfg.model.task_tower_dims == {"cvr": []}
    assert cfg.model.factor_rank == 8
    with pytest.raises(ValueError, match="unknown head"):
        full_scale.head_job("dcn", "[64,32]")


def test_full_scale_reads_the_test_aucs_of_each_epoch_from_a_runs_summary(tmp_path):
    import full_scale

    history = [{"step": s, "epoch": e, "split": "test", "ctr/auc": 0.7 + e, "cvr/auc": 0.6 + e, "ctcvr/auc": 0.8 + e,
                "ctr/logloss": 0.1} for e, s in ((0, 10), (1, 20))]
    (tmp_path / "summary.json").write_text(json.dumps({"history": history, "train_seconds": 5.0, "config": {}}))
    assert full_scale.run_summary(tmp_path) == {"train_seconds": 5.0, "auc_by_epoch": [
        {"epoch": 1, "step": 10, "ctr": 0.7, "cvr": 0.6, "ctcvr": 0.8},
        {"epoch": 2, "step": 20, "ctr": 1.7, "cvr": 1.6, "ctcvr": 1.8}]}


# -------------------------------------------------------------------------------------------- convert_bench


def test_convert_bench_regenerates_raw_text_of_another_generator_version(tmp_path):
    import convert_bench

    raw = tmp_path / "raw"
    assert not convert_bench._generated_by_this_generator(raw, 300, 100, 20.0, 0)  # nothing there yet
    convert_bench._generate(raw, 300, 100, 20.0, 0)
    assert convert_bench._generated_by_this_generator(raw, 300, 100, 20.0, 0)
    assert not convert_bench._generated_by_this_generator(raw, 300, 100, 20.0, 1)  # another seed
    record = json.loads((raw / "generated.json").read_text())
    record["fingerprint"]["generator_version"] -= 1  # text an older generator wrote
    (raw / "generated.json").write_text(json.dumps(record))
    assert not convert_bench._generated_by_this_generator(raw, 300, 100, 20.0, 0)


def test_reader_bench_counts_every_impression_and_writes_a_result_record(tmp_path):
    import reader_bench

    out = tmp_path / "reader.json"
    reader_bench.main(["--flat-impressions", "3000", "--multi-impressions", "2000", "--workers", "0",
                       "--repeats", "1", "--batch-size", "512", "--out", str(out)])
    record = json.loads(out.read_text())
    # The facts every result record carries (common.write_result), beside the reader's own figures.
    assert record["name"] == "reader" and record["versions"]["torchrec"] and record["machine"]["cpu_count"] >= 1
    assert "benchmarks/reader_bench.py --flat-impressions 3000" in record["command"]
    for case in ("flat", "multi"):
        figures = record["cases"][case]
        impressions = figures["dataset"]["impressions"]
        assert [r["impressions"] for r in figures["reader"]] == [impressions]
        assert figures["reader_validate_off"]["impressions"] == impressions
        assert figures["pyarrow"]["impression_rows"] == impressions
    assert record["reader_impressions_per_s"] == record["cases"]["flat"]["reader"][0]["impressions_per_s"]


def test_reader_bench_times_an_existing_dataset_per_worker_count(tmp_path):
    import reader_bench
    from data_helpers import write_random_dataset

    from dist_mtl.data.reader import ParquetGroupReader

    root = tmp_path / "ds"
    write_random_dataset(root, splits={"train": 150}, impressions_per_user=(1, 12), block_impressions=64,
                         blocks_per_file=3, seed=1)
    rank_batches = [b.num_impressions for b in ParquetGroupReader(root, "train", 32, rank=1, world_size=2)]
    for batches, want in ((3, sum(rank_batches[:3])), (0, sum(rank_batches))):
        out = tmp_path / f"reader_{batches}.json"
        record = reader_bench.main(["--dataset", str(root), "--rank", "1", "--world-size", "2", "--batch-size",
                                    "32", "--batches", str(batches), "--workers", "0", "2", "--repeats", "1",
                                    "--out", str(out)])
        assert json.loads(out.read_text()) == json.loads(json.dumps(record, default=str))
        assert record["name"] == "reader_dataset" and "--dataset" in record["command"]
        assert [r["num_workers"] for r in record["reader"]] == [0, 2]
        assert [r["impressions"] for r in record["reader"]] == [want, want]
        assert all(r["peak_tree_rss_mb"] > 0 for r in record["reader"])


@pytest.mark.parametrize("evaluate", [False, True])
def test_prebuilt_steps_time_the_split_and_batches_of_their_mode(tmp_path, evaluate):
    from data_helpers import write_random_dataset

    meta = write_random_dataset(tmp_path / "data", splits={"train": 40, "test": 50}, seed=5)
    train, test = meta.splits["train"].num_impressions, meta.splits["test"].num_impressions
    assert train <= 8 * 64 and 64 < test <= 1024
    # The whole train split in batches of at most 64 impressions; the test split in one evaluation batch.
    result = prebuilt_steps.main([
        "--out", str(tmp_path / "steps.json"), "--batches", "8", "--warmup", "1", "--steps", "5",
        *(["--evaluate"] if evaluate else []), f'data.path="{tmp_path / "data"}"', f'run_dir="{tmp_path / "run"}"',
        "data.batch_size=64", "data.eval_batch_size=1024", "model.embedding_dim=8", "model.tower_dims=[16,8]",
        "train.progress_bar=false"])
    assert result == json.loads((tmp_path / "steps.json").read_text())
    assert result["mode"] == ("evaluate" if evaluate else "train")
    assert result["split"] == ("test" if evaluate else "train")
    batches, mean_size = result["batches_in_memory"], result["rank0_mean_impressions_per_batch"]
    if evaluate:
        assert (batches, mean_size, result["timed_samples"]) == (1, test, 5 * test)
    else:
        assert batches * mean_size == pytest.approx(train) and batches >= 2
    assert result["pipeline"] is not evaluate and result["samples_per_s"] > 0


def test_profile_steps_reports_each_operator_per_step():
    import torch

    a = torch.randn(64, 64)
    calls = []

    def step():
        calls.append(1)
        return {"loss": (a @ a).sum()}

    profile = prebuilt_steps.profile_steps(step, 3, top=5)
    assert len(calls) == 3 and profile["steps"] == 3 and len(profile["operators"]) <= 5
    by_name = {op["name"]: op for op in profile["operators"]}
    assert by_name["aten::mm"]["calls_per_step"] == 1.0  # counted over the steps, reported per step
    times = [op["self_cpu_ms_per_step"] for op in profile["operators"]]
    assert times == sorted(times, reverse=True)
    # Every figure is rounded to 0.001 ms: the total may fall short of its parts' sum by half that each.
    assert profile["self_cpu_ms_per_step"] >= sum(times) - 0.0005 * (len(times) + 1)
    assert "device_operators" not in profile  # the GPU's side only when asked for


# ------------------------------------------------------------------------------------- later_day_bench


def test_later_day_split_cuts_at_a_user_group_and_keeps_each_days_users(tmp_path):
    import later_day_bench

    raw = tmp_path / "raw"
    raw.mkdir()
    keys = ["a", "a", "b", "b", "b", "c"]
    (raw / "sample_skeleton_train.csv").write_text("".join(f"{i},0,0,{k},0,\n" for i, k in enumerate(keys)))
    (raw / "common_features_train.csv").write_text("".join(f"{k},0,\n" for k in "dcba"))
    for name in ("sample_skeleton_test.csv", "common_features_test.csv"):
        (raw / name).write_text(f"{name}\n")
    days = later_day_bench.split_days(raw, tmp_path / "raw_day1", tmp_path / "raw_day2")
    # The middle (row 3) is inside b's group: the cut moves to the next group.
    assert days == {"day1": {"impressions": 5, "user_rows": 2}, "day2": {"impressions": 1, "user_rows": 1}}
    day1, day2 = tmp_path / "raw_day1", tmp_path / "raw_day2"
    skeleton = (raw / "sample_skeleton_train.csv").read_text()
    halves = [(day / "sample_skeleton_train.csv").read_text() for day in (day1, day2)]
    assert "".join(halves) == skeleton
    assert (day1 / "common_features_train.csv").read_text() == "b,0,\na,0,\n"  # its users, in the file's order
    assert (day2 / "common_features_train.csv").read_text() == "c,0,\n"
    for day in (day1, day2):
        assert (day / "sample_skeleton_test.csv").read_text() == "sample_skeleton_test.csv\n"


# ----------------------------------------------------------------------------------------- group_auc_bench

def test_group_auc_bench_scores_the_oracle_as_a_model_and_refuses_missing_rows(planted_set, tmp_path):
    import group_auc_bench

    root, _ = planted_set
    truth = pq.read_table(root / "truth_test.parquet")
    sample_id = truth.column("sample_id").to_numpy()
    z = {c: np.log(truth.column(c).to_numpy().astype(np.float64)) - np.log1p(-truth.column(c).to_numpy())
         for c in ("p_ctr", "p_cvr")}
    write_predictions(tmp_path / "oracle.parquet", sample_id, z["p_ctr"], z["p_cvr"])
    result = group_auc_bench.main(["--data", str(root), "--truth", str(root / "truth_test.parquet"),
                                   "--predictions", str(tmp_path / "oracle.parquet"), "--out", str(tmp_path / "r.json")])
    for task, r in result["tasks"].items():
        # float32 probabilities through a logit and back: equal ranks, up to ties the rounding makes.
        assert r["auc"] == pytest.approx(r["oracle_auc"], abs=2e-4), task
        assert r["gauc"] == pytest.approx(r["oracle_gauc"], abs=2e-4), task
        assert r["gauc_groups"] > 20 and r["gauc"] != pytest.approx(r["auc"], abs=1e-3), task
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["tasks"]["ctr"]["rows"] == result["impressions"] and record["name"] == "group_auc"
    assert record["command"].split()[1] == "benchmarks/group_auc_bench.py"

    rng = np.random.default_rng(0)
    write_predictions(tmp_path / "noisy.parquet", sample_id, z["p_ctr"] + rng.normal(0, 2, len(sample_id)), z["p_cvr"])
    noisy = group_auc_bench.main(["--data", str(root), "--truth", str(root / "truth_test.parquet"),
                                  "--predictions", str(tmp_path / "noisy.parquet"),
                                  "--out", str(tmp_path / "n.json")])["tasks"]["ctr"]
    assert noisy["gauc"] < noisy["oracle_gauc"] - 0.02 and noisy["auc"] < noisy["oracle_auc"] - 0.02

    write_predictions(tmp_path / "short.parquet", sample_id[1:], z["p_ctr"][1:], z["p_cvr"][1:])
    with pytest.raises(ValueError, match=rf"short.parquet: no row for sample id {sample_id[0]}"):
        group_auc_bench.main(["--data", str(root), "--truth", str(root / "truth_test.parquet"),
                              "--predictions", str(tmp_path / "short.parquet"), "--out", str(tmp_path / "s.json")])
    assert not (tmp_path / "s.json").exists()
