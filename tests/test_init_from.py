"""checkpoint.init_from: a new run starts from another run's model and optimizer state (later data in the
same id space), not from its training position; what would not carry over is refused."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from data_helpers import write_random_dataset
from script_helpers import run_under_torchrun
from test_trainer import small_config

sys.path.insert(0, str(Path(__file__).parent / "workers"))

from checkpoint_worker import local_state  # noqa: E402
from test_checkpoint import assemble, assert_equal_tensors  # noqa: E402

from dist_mtl.checkpoint import CheckpointManager, CheckpointMismatchError  # noqa: E402
from dist_mtl.config import ConfigError  # noqa: E402
from dist_mtl.export import STATE_FILE, export_model  # noqa: E402
from dist_mtl.trainer import Trainer  # noqa: E402


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """Day 1 trained for an epoch; day 2: other impressions in the same id space; and a dataset of the
    same sizes in another one."""
    root = tmp_path_factory.mktemp("init_from")
    write_random_dataset(root / "day1", splits={"train": 60, "test": 20}, seed=3, id_maps_seed=1)
    write_random_dataset(root / "day2", splits={"train": 50, "test": 20}, seed=4, id_maps_seed=1)
    write_random_dataset(root / "other", splits={"train": 50, "test": 20}, seed=4, id_maps_seed=2)
    trainer = Trainer(small_config(root / "day1", root / "run1"))
    summary = trainer.train()
    assert summary["best_step"] == summary["steps"]  # the model in hand is the one checkpointed last
    checkpoint = CheckpointManager(root / "run1" / "checkpoints").latest()
    return {"root": root, "trainer": trainer, "checkpoint": checkpoint}


def _full_state(trainer: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    """Every table, dense parameter and optimizer state of a 1-rank trainer, as whole tensors."""
    dump = {"state": local_state(trainer.model, trainer.optimizer)}
    return {section: assemble([dump], section) for section in dump["state"]}


def test_a_run_starts_from_another_runs_model_and_optimizer_state(first_run, tmp_path):
    first = first_run["trainer"]
    checkpoint = tmp_path / "source" / first_run["checkpoint"].name  # a copy: pruned below
    shutil.copytree(first_run["checkpoint"], checkpoint)
    cfg = small_config(first_run["root"] / "day2", tmp_path / "run2", f'checkpoint.init_from="{checkpoint}"')
    second = Trainer(cfg)
    assert second._resume() == (0, 0)  # from the first batch of epoch 0 of its own data
    loaded, trained = _full_state(second), _full_state(first)
    assert sorted(loaded) == sorted(trained)
    for section in trained:
        assert_equal_tensors(loaded[section], trained[section], section)
    assert second.initialized_from == {"checkpoint": str(checkpoint), "step": first.global_step,
                                       "world_size": 1, "optimizer_state_reset": []}
    assert second.global_step == 0 and second.samples_trained == 0 and second.resumed_from is None

    summary = Trainer(cfg).train()
    day2 = second.train_reader.num_impressions
    assert summary["initialized_from"]["checkpoint"] == str(checkpoint) and summary["resumed_from"] is None
    assert summary["steps"] == second.train_reader.steps_per_epoch() and summary["samples_trained"] == day2
    # Run again (the first run's checkpoint pruned meanwhile): the run's own checkpoint wins over
    # init_from, and its record of where it started travels with it.
    shutil.rmtree(checkpoint)
    again = Trainer(cfg).train()
    assert again["resumed_from"]["step"] == summary["steps"] and again["samples_trained_this_run"] == 0
    assert again["initialized_from"] == summary["initialized_from"]


def test_what_would_not_carry_over_is_refused(first_run, tmp_path):
    root, checkpoint = first_run["root"], first_run["checkpoint"]
    with pytest.raises(ConfigError, match=r"checkpoint.init_from = '.*nothing' is not a committed checkpoint"):
        Trainer(small_config(root / "day2", tmp_path / "a", f'checkpoint.init_from="{tmp_path / "nothing"}"'))
    with pytest.raises(CheckpointMismatchError, match=r"trained on data encoded with the id maps [0-9a-f]{16}\.\.\., "
                                                      r"but the dataset at data.path .*other\) has [0-9a-f]{16}"):
        Trainer(small_config(root / "other", tmp_path / "b", f'checkpoint.init_from="{checkpoint}"')).train()
    with pytest.raises(CheckpointMismatchError, match=r"trained with optimizer.dense = 'adam', this run asks for "
                                                      r"'sgd'.*start from another checkpoint, or without"):
        Trainer(small_config(root / "day2", tmp_path / "d", f'checkpoint.init_from="{checkpoint}"',
                             'optimizer.dense="sgd"')).train()
    # Same shapes, other computation: refused by name, where a resume of the run's own checkpoint never meets it.
    with pytest.raises(CheckpointMismatchError, match=r"computes otherwise under this run's config: model.activation: "
                                                      r"trained with 'relu', the config has 'tanh'"):
        Trainer(small_config(root / "day2", tmp_path / "e", f'checkpoint.init_from="{checkpoint}"',
                             'model.activation="tanh"')).train()
    shape = r"table t_205 .* of 1000 rows x 12 dims in the model is .* x 8 dims in the checkpoint"
    with pytest.raises(CheckpointMismatchError, match=shape):
        Trainer(small_config(root / "day2", tmp_path / "c", f'checkpoint.init_from="{checkpoint}"',
                        "model.embedding_dim=12")).train()


def test_a_run_on_two_ranks_starts_from_a_one_rank_checkpoint_value_for_value(first_run, tmp_path):
    root, checkpoint = first_run["root"], first_run["checkpoint"]
    overrides = [f'data.path="{root / "day2"}"', f'run_dir="{tmp_path / "run"}"', "data.batch_size=32",
                 "data.eval_batch_size=256", "model.embedding_dim=8", "model.tower_dims=[16,8]",
                 "train.progress_bar=false", 'sharding.sharding_type="column_wise"',
                 f'checkpoint.init_from="{checkpoint}"']
    worker = Path(__file__).parent / "workers" / "init_from_worker.py"
    run_under_torchrun(worker, 2, [tmp_path / "loaded", *overrides])
    saved = export_model(tmp_path / "saved", first_run["trainer"].cfg, checkpoint=checkpoint)
    loaded = torch.load(tmp_path / "loaded" / STATE_FILE, weights_only=True)
    expected = torch.load(saved / STATE_FILE, weights_only=True)
    assert_equal_tensors(loaded, expected, "model")
