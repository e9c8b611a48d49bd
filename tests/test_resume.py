"""Checkpoint, resume (same and other world size) and elastic restart of the whole training job."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from data_helpers import write_random_dataset

from dist_mtl import distributed
from dist_mtl.checkpoint import CheckpointMismatchError
from dist_mtl.config import ConfigError, load_config
from dist_mtl.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume-data")
    write_random_dataset(root, splits={"train": 500, "test": 80}, seed=11)
    return root


def overrides(dataset: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f'data.path="{dataset}"', f'run_dir="{run_dir}"', "data.batch_size=32", "data.eval_batch_size=512",
            "model.embedding_dim=8", "model.tower_dims=[16,8]", "train.epochs=2", "train.progress_bar=false",
            "train.early_stop_patience=5", 'sharding.sharding_type="table_wise"', *extra]


def epoch_end_evals(summary: dict, steps_per_epoch: int) -> list[dict]:
    return [h for h in summary["history"] if h["step"] % steps_per_epoch == 0]


def test_resume_mid_epoch_continues_exactly(dataset, tmp_path):
    # Dropout: the resumed run must also continue the random stream (the loader iterator draws a seed
    # from it when an epoch starts); ctr/logloss: a pause must not add an evaluation that picks a best.
    extra = ("model.dropout=0.3", 'train.early_stop_metric="ctr/logloss"')
    whole = Trainer(load_config(None, overrides(dataset, tmp_path / "whole", *extra))).train()
    steps_per_epoch = whole["steps"] // 2
    cut = steps_per_epoch // 2 + 1
    first = Trainer(load_config(None, overrides(dataset, tmp_path / "cut", f"train.max_steps={cut}", *extra))).train()
    assert first["steps"] == cut and first["stopped_by"] == "max_steps"
    assert first["history"] == []  # the pause is not an evaluation point of the uninterrupted run
    second = Trainer(load_config(None, overrides(dataset, tmp_path / "cut", *extra))).train()
    assert [h["step"] for h in second["history"]] == [h["step"] for h in whole["history"]]
    assert second["best_step"] == whole["best_step"]
    assert second["resumed_from"]["step"] == cut and second["resumed_from"]["next_batch"] == cut
    assert second["steps"] == whole["steps"]
    # Every impression of both epochs trained exactly once over the two runs.
    assert second["samples_trained"] == whole["samples_trained"]
    assert second["samples_trained_this_run"] == whole["samples_trained"] - first["samples_trained"]
    # The resumed model is the uninterrupted one: same evaluations at both epoch ends.
    for a, b in zip(epoch_end_evals(whole, steps_per_epoch), epoch_end_evals(second, steps_per_epoch)):
        assert a["step"] == b["step"]
        for key in ("ctr/auc", "ctr/logloss", "ctcvr/logloss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def test_resume_at_an_epoch_boundary_continues_the_random_stream(dataset, tmp_path):
    extra = ("model.dropout=0.3", 'train.early_stop_metric="ctr/logloss"')
    whole = Trainer(load_config(None, overrides(dataset, tmp_path / "whole", *extra))).train()
    steps_per_epoch = whole["steps"] // 2
    Trainer(load_config(None, overrides(dataset, tmp_path / "cut", f"train.max_steps={steps_per_epoch}", *extra))).train()
    second = Trainer(load_config(None, overrides(dataset, tmp_path / "cut", *extra))).train()
    assert second["resumed_from"]["next_batch"] == 0 and second["resumed_from"]["epoch"] == 1
    for key in ("ctr/auc", "ctr/logloss", "ctcvr/logloss"):
        assert second["history"][-1][key] == pytest.approx(whole["history"][-1][key], rel=1e-5, abs=1e-7), key


def test_after_a_crash_the_final_model_is_the_resumed_state_s_best(dataset, tmp_path, monkeypatch):
    # Every evaluation (each 4 steps) is a new best; the checkpoint of step 10 records step 8's. The job
    # dies saving the checkpoint of step 20, after the bests of steps 12, 16 and 20 were saved.
    from dist_mtl.checkpoint import CheckpointManager

    extra = ("train.epochs=1", "train.eval_every_steps=4", "checkpoint.interval_steps=10",
             "train.early_stop_patience=100", 'train.early_stop_metric="ctr/logloss"')
    losses = iter(range(100, 0, -1))
    monkeypatch.setattr(Trainer, "evaluate", lambda self, split: {"ctr/logloss": float(next(losses))})
    saves = []
    real_save = Trainer._save_checkpoint

    def save_then_die(self):
        saves.append(self.global_step)
        if len(saves) == 2:
            raise RuntimeError("killed while saving")
        real_save(self)

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        Trainer(load_config(None, overrides(dataset, tmp_path / "run", *extra))).train()
    monkeypatch.setattr(Trainer, "_save_checkpoint", real_save)
    assert saves == [10, 20]
    assert sorted(p.name for p in (tmp_path / "run" / "best").iterdir())[-1] == "step-00000020"
    loaded = []
    real_load = CheckpointManager.load
    monkeypatch.setattr(CheckpointManager, "load", lambda self, path, *a, **k: (loaded.append(Path(path).name),
                                                                             real_load(self, path, *a, **k))[1])
    # Resumed with another batch size the rest of the epoch is skipped: the final report loads the best
    # model of the resumed state (step 8), not the newest one in best/ (step 20, an abandoned trajectory).
    resumed = Trainer(load_config(None, overrides(dataset, tmp_path / "run", *extra, "data.batch_size=64"))).train()
    assert resumed["resumed_from"]["step"] == 10 and resumed["best_step"] == 8
    assert loaded == ["step-00000010", "step-00000008"]  # the checkpoint, then the best model


def test_a_checkpoint_written_before_the_reader_state_and_cuda_rng_were_kept_resumes(dataset, tmp_path):
    import torch

    from dist_mtl.checkpoint import SIDE_FILE

    whole = Trainer(load_config(None, overrides(dataset, tmp_path / "whole"))).train()
    Trainer(load_config(None, overrides(dataset, tmp_path / "cut", "train.max_steps=30"))).train()
    side = sorted((tmp_path / "cut" / "checkpoints").glob("step-*"))[-1] / SIDE_FILE
    content = torch.load(side, map_location="cpu", weights_only=True)
    extra = content["extra"]
    del extra["reader"]  # the older layout: no reader settings, one CPU RNG tensor per rank
    extra["rng"] = [state["cpu"] for state in extra["rng"]]
    torch.save(content, side)
    resumed = Trainer(load_config(None, overrides(dataset, tmp_path / "cut"))).train()
    assert resumed["resumed_from"]["step"] == 30 and resumed["steps"] == whole["steps"]
    assert resumed["samples_trained"] == whole["samples_trained"]
    for key in ("ctr/auc", "ctcvr/logloss"):
        assert resumed["metrics"][key] == pytest.approx(whole["metrics"][key], rel=1e-5, abs=1e-7), key


def test_a_job_told_not_to_resume_refuses_an_earlier_runs_checkpoints(dataset, tmp_path):
    # Their higher step numbers would outrank this run's: its checkpoints pruned as they commit, and a
    # later resume loading the other run's state.
    earlier = Trainer(load_config(None, overrides(dataset, tmp_path / "run", "train.epochs=1"))).train()
    config_before = (tmp_path / "run" / "config.toml").read_text()
    newest = f"step-{earlier['steps']:08d}"
    with pytest.raises(ConfigError, match=rf"checkpoint.resume = false, but .*run/checkpoints holds an earlier "
                                          rf"run's checkpoints \(newest {newest}\)"):
        Trainer(load_config(None, overrides(dataset, tmp_path / "run", "checkpoint.resume=false")))
    assert (tmp_path / "run" / "config.toml").read_text() == config_before  # the earlier run's, untouched
    fresh = Trainer(load_config(None, overrides(dataset, tmp_path / "fresh", "checkpoint.resume=false",
                                                "train.epochs=1"))).train()
    assert fresh["resumed_from"] is None and fresh["steps"] == earlier["steps"]


def test_a_data_parallel_tables_lazily_created_optimizer_state_is_restored(dataset, tmp_path, monkeypatch):
    # optimizer.sparse = "adam" is a GPU option (fbgemm has no CPU kernel for it) but data-parallel tables
    # step with torch's Adam, which also runs here; its state appears only at its first step.
    monkeypatch.setattr(distributed, "CPU_SPARSE_OPTIMIZERS", distributed.CPU_SPARSE_OPTIMIZERS + ("adam",))
    extra = ('sharding.sharding_type="data_parallel"', 'optimizer.sparse="adam"', "train.epochs=1")
    first = Trainer(load_config(None, overrides(dataset, tmp_path / "run", *extra, "train.max_steps=3")))
    assert first.train()["stopped_by"] == "max_steps"  # a pause: no best model reloaded after the last save

    def table_states(trainer):
        leaf = dict(trainer.optimizer.optimizers)["data_parallel_tables"]
        return {key: {k: v.clone() for k, v in leaf.state.get(param, {}).items()}
                for key, param in leaf.params.items()}

    saved = table_states(first)
    resumed = Trainer(load_config(None, overrides(dataset, tmp_path / "run", *extra)))
    resumed._resume()
    restored = table_states(resumed)
    assert saved.keys() == restored.keys() and len(saved) > 3
    for key, state in saved.items():
        assert sorted(state) == sorted(restored[key]) == ["exp_avg", "exp_avg_sq", "step"], key
        assert float(state["exp_avg_sq"].abs().sum()) > 0, key
        for name, value in state.items():
            assert torch.equal(restored[key][name].to(value.device), value), (key, name)
    assert resumed.checkpoints.last_load.optimizer_state_reset == []


def test_resume_with_another_batch_size_skips_the_rest_of_the_epoch(dataset, tmp_path, capsys):
    first = Trainer(load_config(None, overrides(dataset, tmp_path / "run", "train.max_steps=5"))).train()
    resumed = Trainer(load_config(None, overrides(dataset, tmp_path / "run", "data.batch_size=64"))).train()
    train_impressions = json.loads((dataset / "metadata.json").read_text())["splits"]["train"]["num_impressions"]
    # Batch 5 of batch size 32 names other impressions at batch size 64: not resumed as if it did.
    assert "other data settings (batch_size 32 -> 64)" in capsys.readouterr().out
    assert resumed["impressions_skipped_on_resume"] == train_impressions - first["samples_trained"]
    assert resumed["samples_trained_this_run"] == train_impressions  # epoch 1, whole


def test_resume_with_another_dense_optimizer_is_refused_by_name(dataset, tmp_path):
    Trainer(load_config(None, overrides(dataset, tmp_path / "run", "train.max_steps=3"))).train()
    with pytest.raises(CheckpointMismatchError, match=r"step-00000003 was trained with optimizer.dense = 'adam', "
                                                      r"this run asks for 'adagrad'"):
        Trainer(load_config(None, overrides(dataset, tmp_path / "run", 'optimizer.dense="adagrad"'))).train()


def test_the_best_model_is_found_by_its_step_not_as_the_newest(tmp_path):
    from dist_mtl.checkpoint import DCP_METADATA_FILE, SIDE_FILE, CheckpointManager

    manager = CheckpointManager(tmp_path / "best", keep=3)
    for step, committed in ((10, True), (20, True), (30, False)):
        folder = tmp_path / "best" / f"step-{step:08d}"
        folder.mkdir(parents=True)
        (folder / DCP_METADATA_FILE).touch()
        if committed:
            (folder / SIDE_FILE).touch()
    # The trainer loads best/ by its recorded best step: a newer best saved by a run that crashed before
    # its next checkpoint (step 20 here) belongs to a trajectory the resumed run did not take.
    assert manager.path_of(10) == tmp_path / "best" / "step-00000010"
    assert manager.latest() == tmp_path / "best" / "step-00000020"
    assert manager.path_of(30) is None and manager.path_of(15) is None
    # When the next checkpoint commits, the trainer keeps only the best of the state it saved.
    manager.prune_except(10)
    assert [p.name for p in (tmp_path / "best").iterdir()] == ["step-00000010"]


def test_resume_on_another_world_size(dataset, tmp_path):
    run = tmp_path / "run"
    args = [str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "synthetic_cpu.toml")]
    two = subprocess.run(TORCHRUN + ["--standalone", "--nproc_per_node=2"] + args
                         + overrides(dataset, run, "train.max_steps=7"), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    saved = json.loads((run / "summary.json").read_text())
    # The model itself carries over: resumed on one rank and stopped at once (step 7 is max_steps), it
    # scores the test split as the two-rank job did at step 7.
    check = tmp_path / "check"
    shutil.copytree(run, check)
    stopped = subprocess.run(TORCHRUN + ["--standalone", "--nproc_per_node=1"] + args
                             + overrides(dataset, check, "train.max_steps=7"), capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    reloaded = json.loads((check / "summary.json").read_text())
    assert reloaded["resumed_from"]["step"] == 7 and reloaded["samples_trained_this_run"] == 0
    for key in ("ctr/auc", "ctr/logloss", "cvr/auc", "ctcvr/logloss"):
        assert reloaded["metrics"][key] == pytest.approx(saved["metrics"][key], rel=1e-5, abs=1e-6), key
    one = subprocess.run(TORCHRUN + ["--standalone", "--nproc_per_node=1"] + args + overrides(dataset, run),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["world_size"] == 1 and resumed["resumed_from"]["world_size"] == 2
    assert resumed["resumed_from"]["step"] == 7
    # The rest of epoch 0 cannot be mapped onto one rank's split: skipped, counted, reported.
    train_impressions = json.loads((dataset / "metadata.json").read_text())["splits"]["train"]["num_impressions"]
    assert resumed["impressions_skipped_on_resume"] == train_impressions - saved["samples_trained"]
    assert "impressions of epoch 0 not yet trained are skipped" in one.stdout
    assert resumed["samples_trained_this_run"] == train_impressions  # epoch 1, whole, on one rank
    assert 0.0 <= resumed["metrics"]["ctr/auc"] <= 1.0


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def test_elastic_restart_after_sigkill_finishes_like_an_uninterrupted_run(dataset, tmp_path):
    args = [str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "synthetic_cpu.toml")]
    whole = subprocess.run(TORCHRUN + ["--standalone", "--nproc_per_node=2"] + args
                           + overrides(dataset, tmp_path / "whole", "checkpoint.interval_steps=4"),
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]

    run = tmp_path / "elastic"
    proc = subprocess.Popen(TORCHRUN + ["--standalone", "--nproc_per_node=2", "--max-restarts=1"] + args
                            + overrides(dataset, run, "checkpoint.interval_steps=4"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    killed = None
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        if list((run / "checkpoints").glob("step-*/extra.pt")):
            workers = [c for c in _children(proc.pid)]
            if workers:
                killed = workers[-1]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    out, err = proc.communicate(timeout=300)
    assert killed is not None, "the job finished before a worker could be killed"
    assert proc.returncode == 0, err[-4000:]

    a = json.loads((tmp_path / "whole" / "summary.json").read_text())
    b = json.loads((run / "summary.json").read_text())
    assert b["resumed_from"] is not None and b["resumed_from"]["world_size"] == 2
    for task in ("ctr", "cvr", "ctcvr"):
        if a["metrics"][f"{task}/auc"] == a["metrics"][f"{task}/auc"]:  # defined (not NaN)
            assert abs(a["metrics"][f"{task}/auc"] - b["metrics"][f"{task}/auc"]) < 0.002, task
    # What the restarted job trained is exactly what the reader still owed after the checkpoint.
    assert b["samples_trained"] == a["samples_trained"]
    assert b["samples_trained_this_run"] == a["samples_trained"] - b["resumed_from"]["samples_trained"]
