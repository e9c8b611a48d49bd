"""The dense learning-rate schedule: its shape, its config errors, and that the job applies it to the
dense parameters only, step by step, through the pipeline and the plain loop alike."""

import re

import pytest
import torch
from data_helpers import write_random_dataset
from training_paths import assert_path, count_training_paths

from dist_mtl.config import ConfigError, OptimizerConfig, load_config
from dist_mtl.lr_schedule import dense_lr_factor
from dist_mtl.trainer import Trainer


def factors(total: int, **kw) -> list[float]:
    cfg = OptimizerConfig(**kw)
    return [dense_lr_factor(step, total, cfg) for step in range(1, total + 1)]


def test_no_schedule_is_a_constant_rate():
    assert factors(10) == [1.0] * 10


def test_warmup_rises_linearly_then_holds():
    f = factors(10, dense_lr_warmup_steps=3)
    assert f[:3] == pytest.approx([0.25, 0.5, 0.75])
    assert f[3:] == [1.0] * 7


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_decay_falls_to_the_floor_without_reaching_it(decay):
    f = factors(100, dense_lr_decay=decay, dense_lr_min_factor=0.1)
    assert all(a > b for a, b in zip(f, f[1:]))  # decays from the first step (ratio 1.0, no warm-up)
    assert f[0] < 1.0 and 0.1 < f[-1] < 0.15  # the last step still moves the weights


def test_linear_decay_shape():
    f = factors(9, dense_lr_decay="linear")
    assert f == pytest.approx([1 - k / 10 for k in range(1, 10)])


def test_cosine_is_half_way_at_the_middle():
    f = factors(99, dense_lr_decay="cosine")
    assert f[49] == pytest.approx(0.5)


def test_decay_ratio_keeps_the_rate_until_the_last_share():
    f = factors(20, dense_lr_warmup_steps=4, dense_lr_decay="linear", dense_lr_decay_ratio=0.5)
    assert f[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f[4:12] == [1.0] * 8  # 16 steps after the warm-up, the last 8 decay
    assert f[12:] == pytest.approx([1 - k / 9 for k in range(1, 9)])


def test_warmup_longer_than_the_run_still_reaches_the_rate_at_the_last_step():
    assert factors(3, dense_lr_warmup_steps=50) == pytest.approx([1 / 3, 2 / 3, 1.0])


@pytest.mark.parametrize("override, message", [
    ('optimizer.dense_lr_decay="step"', "optimizer.dense_lr_decay must be one of"),
    ("optimizer.dense_lr_decay_ratio=0.0", "optimizer.dense_lr_decay_ratio must be in (0, 1]"),
    ("optimizer.dense_lr_decay_ratio=1.5", "optimizer.dense_lr_decay_ratio must be in (0, 1]"),
    ("optimizer.dense_lr_min_factor=2.0", "optimizer.dense_lr_min_factor must be in [0, 1]"),
    ("optimizer.dense_lr_warmup_steps=-1", "optimizer.dense_lr_warmup_steps must be >= 0"),
])
def test_bad_schedule_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("lr-data")
    write_random_dataset(root, splits={"train": 200, "test": 40}, seed=3)
    return root


def schedule_config(dataset, run_dir, *extra):
    return load_config(None, [
        f'data.path="{dataset}"', f'run_dir="{run_dir}"', "data.batch_size=32", "data.eval_batch_size=256",
        "model.embedding_dim=8", "model.tower_dims=[16,8]", "train.progress_bar=false", "train.epochs=2",
        "train.early_stop_patience=5", "optimizer.dense_lr_warmup_steps=2", 'optimizer.dense_lr_decay="linear"',
        # Replicated tables are stepped by the combined optimizer: their rate must not follow the schedule.
        'sharding.sharding_type="data_parallel"', *extra,
    ])


@pytest.mark.parametrize("pipeline", [True, False])
def test_the_job_steps_the_dense_rate_and_leaves_the_tables_rate(dataset, tmp_path, monkeypatch, pipeline):
    cfg = schedule_config(dataset, tmp_path / "run", f"train.pipeline={str(pipeline).lower()}")
    trainer = Trainer(cfg)
    # The rates in effect when each optimizer step runs (inside the pipeline's progress() or the loop).
    seen: list[tuple[int, dict[str, list[float]]]] = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        rates = {name: [g["lr"] for g in opt.param_groups] for name, opt in trainer.optimizer.optimizers}
        seen.append((trainer.global_step + 1, rates))
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizer, "step", recording_step)
    paths = count_training_paths(monkeypatch)
    summary = trainer.train()
    assert_path(paths, pipeline=pipeline)
    total = summary["steps"]
    assert total == 2 * trainer.train_reader.steps_per_epoch() > 4
    assert [step for step, _ in seen] == list(range(1, total + 1))
    for step, rates in seen:
        lr = cfg.optimizer.dense_lr * dense_lr_factor(step, total, cfg.optimizer)
        assert rates["dense"] == pytest.approx([lr] * len(rates["dense"]))
        assert rates["data_parallel_tables"] == [cfg.optimizer.sparse_lr] * len(rates["data_parallel_tables"])
    assert seen[0][1]["dense"][0] < seen[2][1]["dense"][0] > seen[-1][1]["dense"][0]  # warm-up, then decay


def test_a_scheduled_run_resumed_after_a_step_limit_trains_like_the_uninterrupted_one(dataset, tmp_path):
    whole = Trainer(schedule_config(dataset, tmp_path / "whole")).train()
    cut = whole["steps"] // 2 - 1
    first = Trainer(schedule_config(dataset, tmp_path / "cut", f"train.max_steps={cut}")).train()
    assert first["stopped_by"] == "max_steps"
    resumed = Trainer(schedule_config(dataset, tmp_path / "cut")).train()
    assert resumed["resumed_from"]["step"] == cut and resumed["steps"] == whole["steps"]
    for key in ("ctr/auc", "ctr/logloss", "ctcvr/logloss"):
        assert resumed["metrics"][key] == pytest.approx(whole["metrics"][key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("decay", ["linear", "none"])
def test_dense_epochs_train_the_tables_alone_afterwards(dataset, tmp_path, monkeypatch, decay):
    cfg = schedule_config(dataset, tmp_path / "run", "optimizer.dense_epochs=1", f'optimizer.dense_lr_decay="{decay}"')
    trainer = Trainer(cfg)
    seen: dict[int, float] = {}
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    step = trainer.optimizer.step
    dense_steps = trainer.train_reader.steps_per_epoch()

    def recording_step(*args, **kwargs):
        number = trainer.global_step + 1
        seen[number] = dict(trainer.optimizer.optimizers)["dense"].param_groups[0]["lr"]
        if number in (dense_steps + 1, 2 * dense_steps):  # as the dense epoch left them; before the last step
            snapshots[number] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizer, "step", recording_step)
    paths = count_training_paths(monkeypatch)
    summary = trainer.train()
    assert_path(paths, pipeline=cfg.train.pipeline)
    assert summary["steps"] == 2 * dense_steps
    # The schedule (warm-up, then linear decay) spans the first epoch; the second has a dense rate of 0.
    for number, lr in seen.items():
        want = cfg.optimizer.dense_lr * dense_lr_factor(number, dense_steps, cfg.optimizer) if number <= dense_steps else 0.0
        assert lr == pytest.approx(want), number
    # (Compared inside the run: at its end the trainer loads the best model, which may be epoch 1's.)
    start, late = snapshots[dense_steps + 1], snapshots[2 * dense_steps]
    tables = [n for n in start if "embedding_bags" in n]
    dense = [n for n in start if "embedding_bags" not in n]
    assert tables and dense and dense_steps > 2
    assert all(torch.equal(late[n], start[n]) for n in dense)
    assert any(not torch.equal(late[n], start[n]) for n in tables)


def record_dense_rates(trainer: Trainer, monkeypatch) -> list[float]:
    """The dense learning rate in effect at each of the trainer's optimizer steps, filled as it trains."""
    rates: list[float] = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        rates.append(dict(trainer.optimizer.optimizers)["dense"].param_groups[0]["lr"])
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizer, "step", recording_step)
    return rates


def test_tables_only_epochs_stay_tables_only_when_resumed_with_another_batch_size(dataset, tmp_path, monkeypatch):
    # Epoch 1 at batch 32, then epoch 2 resumed at batch 16: twice the steps per epoch, so a cut-off counted
    # in steps (steps per epoch x dense_epochs) would let the dense layers train through epoch 2.
    first = Trainer(schedule_config(dataset, tmp_path / "run", "optimizer.dense_epochs=1", "train.epochs=1"))
    first_steps = first.train()["steps"]
    resumed = Trainer(schedule_config(dataset, tmp_path / "run", "optimizer.dense_epochs=1", "data.batch_size=16"))
    rates = record_dense_rates(resumed, monkeypatch)
    summary = resumed.train()
    assert summary["resumed_from"]["epoch"] == 1
    assert len(rates) == resumed.train_reader.steps_per_epoch() > first_steps
    assert rates == [0.0] * len(rates)


@pytest.mark.parametrize("mid_epoch", [False, True])
def test_a_schedule_resumed_with_another_batch_size_continues_where_its_epochs_are(dataset, tmp_path, monkeypatch,
                                                                                     mid_epoch):
    # Epoch 0 (or a quarter of it) at batch 16, then the job resumed at batch 32, as a restart on twice the ranks:
    # half the steps per epoch. Counted in steps, the run would already be past the end of its schedule.
    probe = Trainer(schedule_config(dataset, tmp_path / "probe", "data.batch_size=16"))
    small_batch_steps = probe.train_reader.steps_per_epoch()
    cut = small_batch_steps // (4 if mid_epoch else 1)
    first = Trainer(schedule_config(dataset, tmp_path / "run", "data.batch_size=16", f"train.max_steps={cut}"))
    assert first.train()["steps"] == cut
    resumed = Trainer(schedule_config(dataset, tmp_path / "run"))
    rates = record_dense_rates(resumed, monkeypatch)
    summary = resumed.train()
    per_epoch = resumed.train_reader.steps_per_epoch()
    assert summary["resumed_from"]["step"] == cut and 2 < per_epoch < 0.75 * small_batch_steps
    # Epoch 1 (a mid-epoch position cannot be mapped onto other batches: the rest of epoch 0 is skipped)
    # runs the second half of the schedule of a 2-epoch run at the new steps per epoch.
    cfg = resumed.cfg.optimizer
    want = [cfg.dense_lr * dense_lr_factor(per_epoch + k, 2 * per_epoch, cfg) for k in range(1, per_epoch + 1)]
    assert rates == pytest.approx(want)
    assert rates[0] > rates[-1] > 0.0
