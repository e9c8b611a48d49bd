"""profile.steps: a window of training steps recorded with torch.profiler (dist_mtl.profiling)."""

import gzip
import json

import pytest
import torch
from data_helpers import write_random_dataset

from dist_mtl.config import ConfigError, ProfileConfig, load_config
from dist_mtl.profiling import StepProfiler
from dist_mtl.trainer import Trainer


def _trace_steps(path) -> list[str]:
    with gzip.open(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    return sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")})


def _matmul_steps(profiler: StepProfiler, steps: int) -> None:
    x = torch.randn(64, 64)
    with profiler:
        for step in range(1, steps + 1):
            for _ in range(step):  # step k runs k matmuls: the window's per-step figures tell which steps it holds
                x = torch.mm(x, x).tanh()
            profiler.step(100 + step)


def test_the_window_is_the_steps_after_start_step(tmp_path):
    profiler = StepProfiler(ProfileConfig(steps=3, start_step=2), tmp_path / "profile", 0, torch.device("cpu"))
    _matmul_steps(profiler, steps=8)
    report = profiler.report
    assert report["steps"] == 3 and report["global_steps"] == [103, 105]
    assert len(_trace_steps(tmp_path / "profile" / "rank0.pt.trace.json.gz")) == 3
    on_disk = json.loads((tmp_path / "profile" / "rank0_operators.json").read_text())
    assert on_disk == report
    mm = next(op for op in report["operators"] if op["name"] == "aten::mm")
    assert mm["calls_per_step"] == pytest.approx((3 + 4 + 5) / 3, abs=0.01)  # steps 3-5, not the warm-up step 2
    assert "device_operators" not in report


def test_a_run_ending_inside_the_window_writes_what_it_recorded(tmp_path):
    profiler = StepProfiler(ProfileConfig(steps=10, start_step=2), tmp_path / "profile", 3, torch.device("cpu"))
    _matmul_steps(profiler, steps=5)
    assert profiler.report["steps"] == 3 and profiler.report["global_steps"] == [103, 105]
    assert (tmp_path / "profile" / "rank3.pt.trace.json.gz").exists()


@pytest.mark.parametrize("steps, start_step", [(0, 20), (4, 6)])
def test_nothing_is_written_when_off_or_when_the_run_ends_first(tmp_path, steps, start_step):
    profiler = StepProfiler(ProfileConfig(steps=steps, start_step=start_step), tmp_path / "profile", 0,
                            torch.device("cpu"))
    _matmul_steps(profiler, steps=5)
    assert profiler.report is None
    folder = tmp_path / "profile"
    assert folder.exists() == (steps > 0)
    assert not folder.exists() or not any(folder.iterdir())


@pytest.mark.parametrize("override, message", [("profile.steps=-1", "profile.steps must be >= 0"),
                                               ("profile.start_step=0", "profile.start_step must be > 0")])
def test_bad_profile_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def _small_config(data, run, *extra):
    return load_config(None, [f'data.path="{data}"', f'run_dir="{run}"', "data.batch_size=16",
                              "data.eval_batch_size=256", "model.embedding_dim=8", "model.tower_dims=[16,8]",
                              "train.progress_bar=false", *extra])


def test_training_records_its_window_and_reports_it(tmp_path, capsys):
    data = tmp_path / "data"
    write_random_dataset(data, splits={"train": 120, "test": 50}, seed=5)
    run = tmp_path / "run"
    summary = Trainer(_small_config(data, run, "profile.steps=2", "profile.start_step=3")).train()
    report = summary["profile"]
    assert report["steps"] == 2 and report["global_steps"] == [4, 5]
    assert len(_trace_steps(run / "profile" / "rank0.pt.trace.json.gz")) == 2
    names = [op["name"] for op in report["operators"]]
    # The recorded steps are training steps: the model's GEMMs and the fused tables' backward.
    assert any(n in ("aten::addmm", "aten::mm") for n in names)
    assert any("backward" in n.lower() for n in names)
    assert json.loads((run / "summary.json").read_text())["profile"] == report
    assert "profile of steps 4-5 (2 recorded on each rank)" in capsys.readouterr().out
    # Recording changes nothing of what is trained.
    unprofiled = Trainer(_small_config(data, tmp_path / "unprofiled")).train()
    assert unprofiled["metrics"] == summary["metrics"] and unprofiled["profile"] is None
    assert not (tmp_path / "unprofiled" / "profile").exists()


def test_a_run_shorter_than_start_step_says_nothing_was_recorded(tmp_path, capsys):
    data = tmp_path / "data"
    write_random_dataset(data, splits={"train": 120, "test": 50}, seed=5)
    summary = Trainer(_small_config(data, tmp_path / "run", "profile.steps=2", "profile.start_step=100")).train()
    assert summary["profile"] is None and summary["steps"] < 100
    assert (f"profile: the run trained {summary['steps']} steps, not more than profile.start_step = 100: "
            "nothing recorded") in capsys.readouterr().out
    assert not any((tmp_path / "run" / "profile").iterdir())
