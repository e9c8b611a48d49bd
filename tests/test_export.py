"""Export for serving: a model trained on 2 ranks (torchrun), exported from its checkpoint and live, scored
in this one process; launch/export.py, launch/predict.py; an MMOE head exported from a 1-rank DMP."""

import json
import re
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "workers"))
sys.path.insert(0, str(Path(__file__).parents[1] / "launch"))

import checkpoint_worker as worker  # noqa: E402
from data_helpers import write_random_dataset  # noqa: E402
from model_helpers import VOCAB_SIZES  # noqa: E402
from script_helpers import run_under_torchrun  # noqa: E402

import export as export_cli  # noqa: E402  (launch/export.py)
import predict as predict_cli  # noqa: E402  (launch/predict.py)
from dist_mtl.checkpoint import CheckpointMismatchError  # noqa: E402
from dist_mtl.config import computation_mismatches, load_config  # noqa: E402
from dist_mtl.data.reader import ParquetGroupReader  # noqa: E402
from dist_mtl.distributed import init_distributed, shutdown_distributed  # noqa: E402
from dist_mtl.export import (  # noqa: E402
    INFO_FILE,
    STATE_FILE,
    ExportError,
    export_model,
    load_exported,
    load_exported_eager,
)

WORKER = Path(__file__).parent / "workers" / "checkpoint_worker.py"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run directory trained 3 steps on 2 table-wise ranks, checkpointed, and exported live by the job."""
    root = tmp_path_factory.mktemp("trained")
    run_dir = root / "run"
    run_dir.mkdir()
    cfg = worker.job_config("table_wise", {})
    (run_dir / "config.toml").write_text(cfg.to_toml())
    spec = {"out_dir": str(root), "tag": "trained", "sharding_type": "table_wise", "train_until": 3,
            "save_at": [3], "ckpt_root": str(run_dir / "checkpoints"), "export_dir": str(root / "live_export")}
    (root / "spec.json").write_text(json.dumps(spec))
    run_under_torchrun(WORKER, 2, [root / "spec.json"])
    sharded = torch.load(root / "trained-save3-rank0.pt", weights_only=False)["predictions"]
    return {"root": root, "run_dir": run_dir, "cfg": cfg, "sharded_predictions": sharded}


def scores(model, batches) -> dict[str, torch.Tensor]:
    outputs = [model(b) for b in batches]
    return {task: torch.cat([o[task] for o in outputs]) for task in outputs[0]}


def test_exported_model_scores_like_the_sharded_model(trained, tmp_path):
    out = export_cli.main(["--run-dir", str(trained["run_dir"]), "--out", str(tmp_path / "export")])
    live = trained["root"] / "live_export"
    sharded = trained["sharded_predictions"]
    assert set(sharded) == {"ctr", "cvr", "ctcvr"} and sharded["ctr"].numel() == 50 + 6 + 1
    for path in (out, live):
        exported = load_exported(path)
        got = scores(exported, worker.scoring_batches())
        for task in sharded:
            torch.testing.assert_close(got[task], sharded[task], rtol=0, atol=1e-6)
        info = json.loads((path / INFO_FILE).read_text())
        assert info["vocab_sizes"] == VOCAB_SIZES and [t["name"] for t in info["tasks"]] == ["ctr", "cvr", "ctcvr"]
    from_checkpoint = torch.load(out / STATE_FILE, weights_only=True)
    from_live = torch.load(live / STATE_FILE, weights_only=True)
    assert sorted(from_checkpoint) == sorted(from_live)
    assert all(torch.equal(from_checkpoint[k], from_live[k]) for k in from_live)
    assert from_checkpoint["item_ebc.embedding_bags.t_205.weight"].shape == (40, 8)

    eager = load_exported_eager(out)
    with torch.no_grad():
        got = scores(lambda b: eager(b).predictions, worker.scoring_batches())
    for task in sharded:
        torch.testing.assert_close(got[task], sharded[task], rtol=0, atol=1e-6)


def test_predict_writes_every_impression_in_storage_order(trained, tmp_path):
    export_dir = export_cli.main(["--checkpoint", str(trained["run_dir"] / "checkpoints" / "step-00000003"),
                                  "--out", str(tmp_path / "export")])
    data = tmp_path / "data"
    meta = write_random_dataset(data, splits={"test": 40}, vocab_sizes=VOCAB_SIZES, block_impressions=64)
    n = meta.splits["test"].num_impressions
    summary = predict_cli.main(["--model", str(export_dir), "--data", str(data), "--split", "test",
                                "--out", str(tmp_path / "p.parquet"), "--batch-size", "48"])
    table = pq.read_table(tmp_path / "p.parquet")
    assert summary["rows"] == n == table.num_rows > 48
    assert table.column_names == ["index", "sample_id", "p_ctr", "p_cvr", "p_ctcvr"]
    assert table.column("index").to_pylist() == list(range(n))
    assert table.column("sample_id").to_pylist() == list(range(n))  # the helper numbers samples in storage order

    eager = load_exported_eager(export_dir)
    reader = ParquetGroupReader(data, "test", 48, shuffle=False)
    with torch.no_grad():
        expected = scores(lambda b: eager(b).predictions, list(reader))
    for task in ("ctr", "cvr", "ctcvr"):
        got = torch.from_numpy(table.column(f"p_{task}").to_numpy())
        torch.testing.assert_close(got, expected[task], rtol=0, atol=1e-6)

    # The summary's metrics, against an all-pairs AUC of the written scores: CVR over clicked rows only.
    labels = {c: torch.cat([b.labels[c] for b in ParquetGroupReader(data, "test", 48, shuffle=False)]) == 1
              for c in ("click", "buy")}
    score = {t: torch.from_numpy(table.column(f"p_{t}").to_numpy()).double() for t in ("ctr", "cvr", "ctcvr")}
    clicked = labels["click"]
    expected_auc = {"ctr": pairwise_auc(score["ctr"], labels["click"]),
                    "cvr": pairwise_auc(score["cvr"][clicked], labels["buy"][clicked]),
                    "ctcvr": pairwise_auc(score["ctcvr"], labels["buy"])}
    assert 0 < int(labels["buy"][clicked].sum()) < int(clicked.sum())  # CVR's AUC is defined on these rows
    m = summary["metrics"]
    for task, auc in expected_auc.items():
        assert m[f"{task}/auc"] == pytest.approx(auc, abs=1e-12), task
    assert (m["ctr/count"], m["cvr/count"], m["ctcvr/count"]) == (n, int(clicked.sum()), n)
    assert m["cvr/positives"] == int(labels["buy"].sum())

    bare = predict_cli.main(["--model", str(export_dir), "--data", str(data), "--split", "test",
                             "--out", str(tmp_path / "q.parquet"), "--batch-size", "48", "--no-metrics"])
    assert "metrics" not in bare and bare["rows"] == n
    assert pq.read_table(tmp_path / "q.parquet").equals(table)


def pairwise_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """AUC as the share of (positive, negative) pairs ranked right, ties counting half."""
    pos, neg = scores[positive], scores[~positive]
    right = (pos[:, None] > neg[None, :]).double().sum() + 0.5 * (pos[:, None] == neg[None, :]).double().sum()
    return float(right / (pos.numel() * neg.numel()))


def cli_error(capsys, main, args: list[str]) -> str:
    """The one-line error a launch script ends with (exit status 1, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert ": error: " in err and "Traceback" not in err
    return err


def test_mismatches_are_refused(trained, tmp_path, capsys):
    checkpoint = trained["run_dir"] / "checkpoints" / "step-00000003"
    tower = r"head\.ctr_tower\.body\.0\.weight of shape \[32, 184\] in the model"
    with pytest.raises(CheckpointMismatchError, match=tower):
        export_model(tmp_path / "x", load_config(trained["run_dir"] / "config.toml", ["model.tower_dims=[32,8]"]),
                     checkpoint=checkpoint)
    assert re.search(tower, cli_error(capsys, export_cli.main, ["--checkpoint", str(checkpoint), "--out",
                                                                str(tmp_path / "x"), "model.tower_dims=[32,8]"]))
    assert not (tmp_path / "x" / INFO_FILE).exists()
    with pytest.raises(ExportError, match="no export.json"):
        load_exported(tmp_path / "x")

    export_dir = export_model(tmp_path / "export", trained["cfg"], checkpoint=checkpoint)
    data = tmp_path / "data"
    write_random_dataset(data, splits={"test": 5})  # vocabularies of up to 1000 ids: not the model's 40
    vocab = r"vocab sizes \(dataset, model\) differ for fields \{'101': \(1000, 40\)"
    assert re.search(vocab, cli_error(capsys, predict_cli.main, ["--model", str(export_dir), "--data", str(data),
                                                                 "--out", str(tmp_path / "p.parquet")]))
    assert not (tmp_path / "p.parquet").exists()


@pytest.fixture
def one_rank():
    ctx = init_distributed("cpu")
    yield ctx
    shutdown_distributed()


def test_dot_interaction_exported_live_from_one_rank(one_rank, tmp_path):
    cfg = worker.job_config("table_wise", {}, ("model.interaction=dot",))
    dmp, opt = worker.build(cfg)
    worker.train(dmp, opt, 0, 2)
    expected = worker.predictions(dmp)
    got = scores(load_exported(export_model(tmp_path / "dot", cfg, dmp=dmp)), worker.scoring_batches())
    for task in expected:
        torch.testing.assert_close(got[task], expected[task], rtol=0, atol=1e-6)


def assert_exported_live_scores_as_trained(cfg, out_dir):
    """Train 2 steps, export from the live DMP: TorchScript and eager exports score as the DMP did."""
    dmp, opt = worker.build(cfg)
    worker.train(dmp, opt, 0, 2)
    expected = worker.predictions(dmp)
    path = export_model(out_dir, cfg, dmp=dmp)
    got = scores(load_exported(path), worker.scoring_batches())
    eager = load_exported_eager(path)
    first = worker.scoring_batches()[0]
    for task in expected:
        torch.testing.assert_close(got[task], expected[task], rtol=0, atol=1e-6)
        torch.testing.assert_close(eager(first).predictions[task], expected[task][: first.num_impressions],
                                   rtol=0, atol=1e-6)


def test_weight_features_exported_live_from_one_rank(one_rank, tmp_path):
    cfg = worker.job_config("table_wise", {}, ('model.weight_features=["sum", "last", "count"]',))
    assert_exported_live_scores_as_trained(cfg, tmp_path / "weights")


@pytest.mark.parametrize("head", ["esmm", "mmoe"])
def test_factors_and_mean_pooling_exported_live_from_one_rank(one_rank, tmp_path, head):
    mmoe = ("model.head=mmoe", "model.expert_dims=[16]", "model.num_experts=3",
            'tasks=[{name = "ctr", label = "click"}, {name = "ctcvr", label = "buy"}]')
    cfg = worker.job_config("table_wise", {}, (
        "model.factor_rank=4", 'model.factor_only_fields=["109_14", "127_14"]',
        'model.mean_pooled_fields=["109_14", "127_14", "508"]', 'model.weight_features=["sum"]',
        *(mmoe if head == "mmoe" else ())))
    assert_exported_live_scores_as_trained(cfg, tmp_path / "factors")


def test_bfloat16_trained_model_is_exported_in_float32(one_rank, tmp_path):
    cfg = worker.job_config("table_wise", {}, ('model.head_precision="bfloat16"', "model.tower_dims=[32,16]"))
    dmp, opt = worker.build(cfg)
    worker.train(dmp, opt, 0, 2)
    trained = worker.predictions(dmp)  # the job's bfloat16 heads
    got = scores(load_exported(export_model(tmp_path / "bf16", cfg, dmp=dmp)), worker.scoring_batches())
    for task in trained:
        assert got[task].dtype == torch.float32
        # The same model read in float32: close to the bfloat16 scores, not bit-equal to them.
        torch.testing.assert_close(got[task], trained[task], rtol=0.05, atol=0.01)
        assert not torch.equal(got[task], trained[task])


@pytest.mark.parametrize("head, expert_dims", [("mmoe", "[16]"), ("ple", "[16,8]")])
def test_multi_tower_heads_exported_live_from_one_rank(one_rank, tmp_path, head, expert_dims):
    tasks = '[{name = "ctr", label = "click"}, {name = "ctcvr", label = "buy"}]'
    cfg = worker.job_config("table_wise", {}, (f"model.head={head}", f"model.expert_dims={expert_dims}",
                                              "model.num_experts=3", f"tasks={tasks}"))
    dmp, opt = worker.build(cfg)
    worker.train(dmp, opt, 0, 2)
    expected = worker.predictions(dmp)
    path = export_model(tmp_path / head, cfg, dmp=dmp)
    got = scores(load_exported(path), worker.scoring_batches())
    assert sorted(got) == ["ctcvr", "ctr"]
    for task in got:
        torch.testing.assert_close(got[task], expected[task], rtol=0, atol=1e-6)

    data = tmp_path / "data"
    write_random_dataset(data, splits={"test": 10}, vocab_sizes=VOCAB_SIZES)
    predict_cli.main(["--model", str(path), "--data", str(data), "--out", str(tmp_path / "p.parquet")])
    assert pq.read_schema(tmp_path / "p.parquet").names == ["index", "sample_id", "p_ctr", "p_ctcvr"]


def test_a_checkpoint_is_exported_only_with_the_config_that_trained_it(tmp_path, capsys):
    # Shapes do not tell an activation, mean pooling or the reader's weight transform apart, and
    # <run_dir>/config.toml is rewritten by every run in that directory: the job records its config
    # in each checkpoint, and an export from the checkpoint compares.
    from dist_mtl.trainer import Trainer

    write_random_dataset(tmp_path / "data", splits={"train": 60, "test": 20}, seed=2)
    run_dir = tmp_path / "run"
    Trainer(load_config(None, [f'data.path="{tmp_path / "data"}"', f'run_dir="{run_dir}"', "data.batch_size=64",
                               "model.embedding_dim=8", "model.tower_dims=[16,8]", "train.progress_bar=false",
                               "train.max_steps=1"])).train()
    checkpoint = next((run_dir / "checkpoints").iterdir())
    for override, difference in [
        ('model.activation="tanh"', "model.activation: trained with 'relu', the config has 'tanh'"),
        ('model.mean_pooled_fields=["109_14"]', "model.mean_pooled_fields: trained with [], the config has ['109_14']"),
        ('data.weight_transform="none"', "data.weight_transform: trained with 'log1p', the config has 'none'"),
    ]:
        assert difference in cli_error(capsys, export_cli.main,
                                       ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "x"), override])
        assert not (tmp_path / "x" / INFO_FILE).exists()
    # Settings that only shape training are free (the trained bias replaces its init, an export serves
    # in float32), and so are those the head does not read (ESMM has no experts).
    export_cli.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "ok"), 'model.output_bias_init="default"',
                     'model.head_precision="bfloat16"', "model.expert_dims=[64,32]", "model.num_experts=8"])
    assert (tmp_path / "ok" / INFO_FILE).exists()


def test_predict_evaluates_an_export_as_the_trainer_evaluated_its_model(tmp_path):
    # MMOE with CVR as a task of its own on clicked rows: the task's rows come from the export's config.
    from dist_mtl.trainer import Trainer

    write_random_dataset(tmp_path / "data", splits={"train": 60, "test": 40}, seed=3)
    run_dir = tmp_path / "run"
    summary = Trainer(load_config(None, [
        f'data.path="{tmp_path / "data"}"', f'run_dir="{run_dir}"', "data.batch_size=64", "model.embedding_dim=8",
        'model.head="mmoe"', "model.tower_dims=[16,8]", "model.expert_dims=[16]", "model.num_experts=2",
        "train.progress_bar=false", "train.epochs=2", 'train.early_stop_metric="cvr/gauc"', "train.group_auc=true",
        'tasks=[{name="ctr", label="click"}, {name="cvr", label="buy", rows="click"}, {name="ctcvr", label="buy"}]',
    ])).train()
    best = next((run_dir / "best").iterdir())
    export_dir = export_cli.main(["--checkpoint", str(best), "--out", str(tmp_path / "export")])
    got = predict_cli.main(["--model", str(export_dir), "--data", str(tmp_path / "data"), "--split", "test",
                            "--out", str(tmp_path / "p.parquet"), "--batch-size", "100"])["metrics"]
    trained = summary["metrics"]  # the best model on the test split, as the job reported it
    assert trained["cvr/count"] == got["cvr/count"] < got["ctr/count"]
    for task in ("ctr", "cvr", "ctcvr"):
        for metric in ("auc", "gauc", "gauc_groups", "logloss", "calibration", "count", "positives"):
            assert got[f"{task}/{metric}"] == pytest.approx(trained[f"{task}/{metric}"], rel=1e-9), (task, metric)
    assert got["ctr/gauc_groups"] > 0 and got["ctr/gauc"] != got["ctr/auc"]
    # --no-group-auc overrides the training run's setting.
    plain = predict_cli.main(["--model", str(export_dir), "--data", str(tmp_path / "data"), "--split", "test",
                              "--out", str(tmp_path / "q.parquet"), "--batch-size", "100", "--no-group-auc"])
    assert not any("gauc" in k for k in plain["metrics"]) and plain["metrics"]["cvr/auc"] == got["cvr/auc"]
    with pytest.raises(SystemExit) as usage:
        predict_cli.main(["--model", str(export_dir), "--data", str(tmp_path / "data"), "--out",
                          str(tmp_path / "r.parquet"), "--no-metrics", "--group-auc"])
    assert usage.value.code == 2 and not (tmp_path / "r.parquet").exists()


def test_a_recorded_config_of_an_older_version_compares_its_missing_keys_as_defaults():
    current = load_config(None, ['model.activation="tanh"'])
    older = current.to_dict()
    del older["model"]["factor_only_fields"], older["data"]["weight_transform"], older["tasks"][0]["type"]
    assert computation_mismatches(older, current) == []
    older["model"]["activation"] = "relu"
    assert computation_mismatches(older, current) == ["model.activation: trained with 'relu', the config has 'tanh'"]


def test_field_sets_compare_as_sets_and_weight_features_in_order():
    trained = load_config(None, ["model.factor_rank=4", 'model.factor_only_fields=["109_14", "110_14"]',
                                 'model.mean_pooled_fields=["109_14", "110_14"]', 'model.weight_features=["sum", "last"]'])
    reordered = load_config(None, ["model.factor_rank=4", 'model.factor_only_fields=["110_14", "109_14"]',
                                   'model.mean_pooled_fields=["110_14", "109_14"]', 'model.weight_features=["sum", "last"]'])
    assert computation_mismatches(trained.to_dict(), reordered) == []
    reordered.model.weight_features = ["last", "sum"]  # the columns' order: another model
    assert computation_mismatches(trained.to_dict(), reordered) == [
        "model.weight_features: trained with ['sum', 'last'], the config has ['last', 'sum']"]
