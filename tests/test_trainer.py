"""The training job in one process (a 1-rank gloo group): artifacts, early stopping, bad run dirs."""

import json
import math
import os
import re
import socket
import tomllib
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from data_helpers import write_random_dataset
from training_paths import train_checking_path

from dist_mtl.config import ConfigError, load_config
from dist_mtl.data.schema import DatasetError
from dist_mtl.losses import NonFiniteLossError, NonFiniteLossWatch
from dist_mtl.trainer import Trainer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_random_dataset(root, splits={"train": 120, "test": 50}, seed=5)
    return root


def small_config(dataset, run_dir, *extra):
    return load_config(None, [f'data.path="{dataset}"', f'run_dir="{run_dir}"', "data.batch_size=64",
                              "data.eval_batch_size=256", "model.embedding_dim=8", "model.tower_dims=[16,8]",
                              "train.progress_bar=false", "train.log_every_steps=2", *extra])


def test_train_writes_config_summary_and_tensorboard(dataset, tmp_path, capsys):
    cfg = small_config(dataset, tmp_path / "run", "train.epochs=2")
    summary = Trainer(cfg).train()
    # Two evaluations chose the reported model on the test split itself: the job says so.
    assert summary["selection_split"] == "test"
    assert "note: data.val_split is unset, so early stopping and the best model are chosen on 'test'" in capsys.readouterr().out
    run = tmp_path / "run"
    assert tomllib.loads((run / "config.toml").read_text())["data"]["batch_size"] == 64
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["steps"] == summary["steps"] > 0
    meta_train = json.loads((dataset / "metadata.json").read_text())["splits"]["train"]["num_impressions"]
    assert summary["samples_trained"] == 2 * meta_train  # two epochs, every impression once each
    for task in ("ctr", "cvr", "ctcvr"):
        assert 0.0 <= summary["metrics"][f"{task}/auc"] <= 1.0
        assert math.isfinite(summary["metrics"][f"{task}/logloss"])
    assert len(summary["history"]) == 2  # one evaluation per epoch
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run / "tensorboard"))
    # Peak memory: logged by rank 0 as it grows, and the job's peak per rank in the summary.
    (peak,) = on_disk["peak_memory_mb"]["host_peak_rss_mb"]
    log = [json.loads(line) for line in (run / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    logged = [line["train/memory/host_peak_rss_mb"] for line in log if "train/memory/host_peak_rss_mb" in line]
    assert logged and logged == sorted(logged) and 0 < logged[-1] <= peak + 0.05  # the summary's is rounded to 0.1
    assert len(list((run / "best").glob("step-*/.metadata"))) == 1
    assert len(list((run / "checkpoints").glob("step-*/extra.pt"))) == 2  # one per epoch


def test_early_stopping_keeps_the_best_model(dataset, tmp_path, monkeypatch):
    cfg = small_config(dataset, tmp_path / "run", "train.epochs=6", "train.early_stop_patience=2")
    trainer = Trainer(cfg)
    scripted = iter([0.60, 0.70, 0.65, 0.64, 0.99, 0.99])  # best after epoch 2, then two worse ones
    loaded = []
    monkeypatch.setattr(trainer, "evaluate", lambda split: {"ctcvr/auc": next(scripted, 0.0)})
    real_load = trainer.best_checkpoint.load

    def load(path, *args, **kwargs):
        loaded.append((trainer.global_step, path.name))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(trainer.best_checkpoint, "load", load)
    summary = trainer.train()
    steps_per_epoch = trainer.train_reader.steps_per_epoch()
    assert [h["ctcvr/auc"] for h in summary["history"]] == [0.60, 0.70, 0.65, 0.64]
    assert summary["best_step"] == 2 * steps_per_epoch
    assert summary["steps"] == 4 * steps_per_epoch  # stopped after 2 evaluations without improvement
    # The best model (of step 2 epochs) was loaded into the model before the final evaluation.
    assert loaded == [(4 * steps_per_epoch, f"step-{2 * steps_per_epoch:08d}")]


def test_plain_loop_and_pipeline_train_the_same(dataset, tmp_path):
    a = train_checking_path(small_config(dataset, tmp_path / "a", "train.pipeline=true"))
    b = train_checking_path(small_config(dataset, tmp_path / "b", "train.pipeline=false"))
    for key, value in a["metrics"].items():
        assert b["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_ple_trains_through_the_pipeline(dataset, tmp_path):
    # The pipeline's symbolic trace runs through the head's per-level loops and gate lookups.
    ple = ("model.head=ple", "model.expert_dims=[16,8]", "model.num_experts=2", "model.task_experts=2")
    a = train_checking_path(small_config(dataset, tmp_path / "a", "train.pipeline=true", *ple))
    b = train_checking_path(small_config(dataset, tmp_path / "b", "train.pipeline=false", *ple))
    assert a["steps"] == b["steps"] > 0
    for key, value in a["metrics"].items():
        assert b["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_weight_features_train_through_the_pipeline(dataset, tmp_path):
    # TorchRec's pipeline traces the model's forward symbolically; the statistics must survive that.
    stats = 'model.weight_features=["sum", "last"]'
    a = train_checking_path(small_config(dataset, tmp_path / "a", "train.pipeline=true", stats))
    b = train_checking_path(small_config(dataset, tmp_path / "b", "train.pipeline=false", stats))
    assert a["steps"] == b["steps"] > 0
    assert a["metrics"]["ctr/auc"] == pytest.approx(b["metrics"]["ctr/auc"], abs=1e-6)


def test_bfloat16_heads_train_the_same_through_the_pipeline(dataset, tmp_path):
    # The pipeline fx-traces the model's forward; the heads' autocast must survive that (else the
    # pipelined run would train in float32 and match the float32 run instead).
    bf16 = 'model.head_precision="bfloat16"'
    a = train_checking_path(small_config(dataset, tmp_path / "a", "train.pipeline=true", bf16))
    b = train_checking_path(small_config(dataset, tmp_path / "b", "train.pipeline=false", bf16))
    f32 = train_checking_path(small_config(dataset, tmp_path / "c", "train.pipeline=false"))
    assert a["steps"] == b["steps"] == f32["steps"] > 0
    for key, value in a["metrics"].items():
        assert b["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert a["metrics"]["ctr/logloss"] != pytest.approx(f32["metrics"]["ctr/logloss"], rel=1e-6, abs=1e-7)
    assert a["metrics"]["ctr/logloss"] == pytest.approx(f32["metrics"]["ctr/logloss"], rel=0.02)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_reader_workers_train_the_same_model(dataset, tmp_path):
    """Workers split the windows (dist_mtl.data.reader); the batches, so the training, must not change."""
    runs = [Trainer(small_config(dataset, tmp_path / f"w{w}", "train.epochs=2", "data.window_blocks=1",
                                 f"data.num_workers={w}")).train() for w in (0, 2)]
    assert runs[0]["steps"] == runs[1]["steps"] > 0
    assert runs[0]["metrics"] == runs[1]["metrics"]


@pytest.mark.parametrize("workers", [0, 1])
def test_each_evaluation_reads_its_whole_split_again(dataset, tmp_path, workers):
    # The evaluation readers are built once and reused: a second pass must start from the first batch.
    trainer = Trainer(small_config(dataset, tmp_path / "run", f"data.num_workers={workers}"))
    first, second = trainer.evaluate("test"), trainer.evaluate("test")
    test_impressions = json.loads((dataset / "metadata.json").read_text())["splits"]["test"]["num_impressions"]
    assert first["ctr/count"] == test_impressions and first == second


def test_unwritable_run_dir_is_refused(dataset, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root ignores permission bits; a file in the way fails for everyone
        locked.chmod(0o700)
        (locked / "run").write_text("not a directory")
    with pytest.raises(OSError, match=r"run directory .*locked/run is not writable"):
        Trainer(small_config(dataset, locked / "run"))


@pytest.mark.parametrize("key", ["val_split", "eval_split", "train_split"])
def test_a_split_the_dataset_lacks_is_refused_before_training(dataset, tmp_path, key):
    # The evaluation splits are first read after a whole epoch: a typo must not cost that epoch.
    with pytest.raises(ConfigError, match=rf"data\.{key} = 'valid': .* has no such split \(it has \['test', 'train'\]\)"):
        Trainer(small_config(dataset, tmp_path / "run", f'data.{key}="valid"'))


def test_train_script_ends_a_refused_config_with_one_line(dataset, tmp_path, capsys):
    # The refusals above reach a user of launch/train.py as its usage error, not under a traceback.
    from script_helpers import load_script

    train_cli = load_script("launch/train.py")
    args = ["--config", str(tmp_path / "job.toml")]
    (tmp_path / "job.toml").write_text(small_config(dataset, tmp_path / "run", 'data.val_split="valid"').to_toml())
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert re.fullmatch(r"\S+: error: data\.val_split = 'valid': .* has no such split \(it has "
                        r"\['test', 'train'\]\)\n", err)


@pytest.mark.parametrize("key", ["eval_split", "train_split"])
def test_an_empty_split_name_is_refused(dataset, tmp_path, key):
    with pytest.raises(ConfigError, match=rf"data\.{key} must name a split of the dataset, got ''"):
        Trainer(small_config(dataset, tmp_path / "run", f'data.{key}=""'))


def test_an_evaluation_split_the_reader_refuses_is_refused_before_training(tmp_path):
    # The evaluation reader is otherwise first built after a whole epoch: its checks must run up front.
    data = tmp_path / "data"
    write_random_dataset(data, splits={"train": 120, "test": 30}, seed=6)
    (missing,) = [p for p in data.rglob("*.parquet") if "test" in str(p.relative_to(data)) and "impressions" in p.name]
    missing.unlink()
    with pytest.raises(DatasetError, match=r"no such file \(listed in metadata.json for split 'test'\)"):
        Trainer(small_config(data, tmp_path / "run"))


def test_diverging_loss_stops_with_the_step_and_the_batch_source(tmp_path):
    data = tmp_path / "data"
    write_random_dataset(data, splits={"train": 640, "test": 30}, extra_columns={"price": "float32"}, seed=4)
    # Losses are checked on the host only at logging steps and segment ends (log_every_steps=1000: once,
    # after all 20 steps); the error must still name the first bad step, not the step of the check.
    cfg = load_config(None, [f'data.path="{data}"', f'run_dir="{tmp_path / "run"}"', "data.batch_size=32",
                             "train.log_every_steps=1000",
                             'model.head="mmoe"', "model.embedding_dim=8", "model.tower_dims=[16,8]",
                             "model.expert_dims=[16]", "train.progress_bar=false", 'train.early_stop_metric="price/mse"',
                             'tasks=[{name = "price", label = "price", type = "regression"}]',
                             'optimizer.dense="sgd"', "optimizer.dense_lr=1e12"])
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step \d+ .* on batch from .*impressions-\d+\.parquet") as err:
        Trainer(cfg).train()
    step = int(re.search(r"at step (\d+)", str(err.value)).group(1))
    assert 1 <= step <= 3, str(err.value)


def _nonfinite_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        watch = NonFiniteLossWatch(rank, world_size, torch.device("cpu"))
        messages = []
        # Steps 0-4 finite everywhere; then only rank 1 sees a non-finite loss, at step 7 and again at 8.
        for steps in (range(0, 5), range(5, 10)):
            for step in steps:
                bad = rank == 1 and step in (7, 8)
                watch.watch(step, {"ctr": torch.tensor(math.nan if bad else 0.5), "cvr": torch.tensor(0.25)},
                            f"impressions-{step:05d}.parquet")
            try:
                watch.raise_if_any()
                messages.append("no error")
            except NonFiniteLossError as e:
                messages.append(str(e))
        message = "\n".join(messages)
        dist.barrier()  # the check left no rank behind in a collective
        Path(out_dir, f"rank{rank}.txt").write_text(message)
    finally:
        dist.destroy_process_group()


def test_a_nonfinite_loss_on_one_rank_stops_every_rank_with_a_message(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_nonfinite_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (Path(tmp_path, f"rank{r}.txt").read_text() for r in range(2))
    assert rank1 == ("no error\nnon-finite loss at step 7 on rank 1 (task losses {'ctr': nan, 'cvr': 0.25}) on "
                     "batch from impressions-00007.parquet")
    assert rank0 == "no error\nnon-finite loss at step 7 on rank 1 (that rank's error names its losses and batch)"


def test_early_stopping_on_an_error_metric_prefers_lower_values(dataset, tmp_path, monkeypatch):
    cfg = small_config(dataset, tmp_path / "run", "train.epochs=4", "train.early_stop_patience=2",
                       'train.early_stop_metric="ctr/logloss"')
    trainer = Trainer(cfg)
    scripted = iter([0.50, 0.40, 0.45, 0.41])  # best (lowest) after epoch 2
    monkeypatch.setattr(trainer, "evaluate", lambda split: {"ctr/logloss": next(scripted, 9.0)})
    monkeypatch.setattr(trainer, "_load_best", lambda: None)
    summary = trainer.train()
    assert summary["best_step"] == 2 * trainer.train_reader.steps_per_epoch()
    assert summary["stopped_by"] == "early_stop"


@pytest.mark.parametrize("init", ["label_rate", "default"])
def test_output_biases_start_at_the_train_splits_rates(dataset, tmp_path, init):
    cfg = small_config(dataset, tmp_path / "run", f'model.output_bias_init="{init}"')
    trainer = Trainer(cfg)
    train = json.loads((dataset / "metadata.json").read_text())["splits"]["train"]
    ctr_rate = train["num_clicks"] / train["num_impressions"]
    cvr_rate = train["num_buys"] / train["num_clicks"]
    head = trainer.model.module.model.head
    ctr_bias, cvr_bias = float(head.ctr_tower.out.bias), float(head.cvr_tower.out.bias)
    if init == "label_rate":
        assert ctr_bias == pytest.approx(math.log(ctr_rate / (1 - ctr_rate)), rel=1e-5)
        assert cvr_bias == pytest.approx(math.log(cvr_rate / (1 - cvr_rate)), rel=1e-5)
    else:  # PyTorch's init: uniform within +-1/sqrt(fan_in), far from the rates' logits
        assert abs(ctr_bias) < 1 and abs(cvr_bias) < 1


@pytest.mark.parametrize("head", ["esmm", "mmoe"])
def test_factor_model_trains_through_the_pipeline(dataset, tmp_path, head):
    overrides = ("model.factor_rank=4", 'model.factor_only_fields=["109_14", "110_14"]',
                 'model.mean_pooled_fields=["109_14", "110_14", "127_14", "150_14"]')
    if head == "mmoe":
        overrides += ('model.head="mmoe"', 'tasks=[{name="ctr", label="click"}, '
                      '{name="cvr", label="buy", rows="click"}, {name="ctcvr", label="buy"}]')
    piped = train_checking_path(small_config(dataset, tmp_path / "piped", *overrides))
    plain = train_checking_path(small_config(dataset, tmp_path / "plain", "train.pipeline=false", *overrides))
    for key in ("ctr/auc", "cvr/auc", "ctcvr/logloss"):
        assert piped["metrics"][key] == pytest.approx(plain["metrics"][key], rel=1e-5, abs=1e-7), key


def test_dense_gradient_clipping_logs_the_norm_and_resumes(dataset, tmp_path):
    clipped = Trainer(small_config(dataset, tmp_path / "clipped", "optimizer.dense_grad_clip_norm=1e-4")).train()
    log = (tmp_path / "clipped" / "tensorboard" / "metrics.jsonl").read_text()
    lines = [json.loads(line) for line in log.splitlines()]
    norms = [line["train/grad_norm/dense"] for line in lines if "train/grad_norm/dense" in line]
    assert norms and all(n > 1e-4 for n in norms)  # the norms before clipping, every one above the limit
    plain = Trainer(small_config(dataset, tmp_path / "plain")).train()
    assert clipped["metrics"]["ctr/logloss"] != plain["metrics"]["ctr/logloss"]
    assert not any("train/grad_norm/dense" in line
                   for line in (tmp_path / "plain" / "tensorboard" / "metrics.jsonl").read_text().splitlines())
    # The clipped optimizer's state goes through a checkpoint: a second epoch resumes from the first.
    resumed = Trainer(small_config(dataset, tmp_path / "clipped", "optimizer.dense_grad_clip_norm=1e-4",
                                   "train.epochs=2")).train()
    assert resumed["resumed_from"] is not None and resumed["steps"] == 2 * clipped["steps"]
