"""The side-by-side benchmark harness (benchmarks/common.py, benchmarks/train_cpu_bench.py): the pieces
that run in the project venv. The torch-rechub side (rechub_baseline.py) needs its own venv and is
exercised by running the benchmark."""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import common  # noqa: E402
import train_cpu_bench as bench  # noqa: E402

from dist_mtl.config import load_config  # noqa: E402
from dist_mtl.data.schema import DatasetMetadata  # noqa: E402
from dist_mtl.data.synthetic import SyntheticConfig  # noqa: E402

# The reference AUC. CI installs scikit-learn; the GPU test machine has none, and there these tests skip
# (benchmarks/gpu/session.py runs the suite there).
roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score


# ------------------------------------------------------------------------------------------- common.py


def test_write_result_records_reproduction_facts(tmp_path):
    path = tmp_path / "sub" / "r.json"
    record = common.write_result(path, "demo", "python x.py --n 3", {"samples_per_s": 12.5},
                                 common.library_versions(["numpy", "no-such-distribution-xyz"]))
    on_disk = json.loads(path.read_text())
    assert on_disk == record
    assert on_disk["name"] == "demo" and on_disk["command"] == "python x.py --n 3"
    assert on_disk["samples_per_s"] == 12.5
    assert on_disk["versions"]["numpy"] == np.__version__
    assert on_disk["versions"]["no-such-distribution-xyz"] is None
    assert on_disk["machine"]["usable_cores"] >= 1 and on_disk["machine"]["cpu_model"]
    assert on_disk["peak_rss_mb"] > 0
    assert on_disk["date"].endswith("+00:00")
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary file left


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the process tree is read from /proc")
def test_run_logged_adds_up_the_rss_of_processes_alive_at_once(tmp_path):
    # Two children holding 150 MiB each at the same time (each waits until both hold it, then for 1.5 s:
    # several samples): the tree holds 300 MiB and more, which no one process here does. (peak_rss_mb is
    # not compared: ru_maxrss also counts the pytest process's pages a child shares between fork and exec.)
    child = ("import pathlib, sys, time; b = bytearray(150 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
             "d = pathlib.Path(sys.argv[1]); (d / sys.argv[2]).touch(); "
             "[time.sleep(0.05) for _ in iter(lambda: len(list(d.iterdir())) < 2, False)]; time.sleep(1.5)")
    ready = tmp_path / "ready"
    ready.mkdir()
    parent = (f"import subprocess, sys; ps = [subprocess.Popen([sys.executable, '-c', {child!r}, {str(ready)!r}, str(i)]) "
              f"for i in range(2)]; sys.exit(max(p.wait() for p in ps))")
    run = common.run_logged([sys.executable, "-c", parent], tmp_path / "tree.log", "two children")
    assert run.peak_rss_all_mb > 300


def test_command_line_is_repo_relative_and_shell_safe():
    argv = ["--work-dir", "/tmp/a b", "tasks=[{name=\"ctr\"}]"]
    cmd = common.command_line(REPO / "benchmarks" / "train_cpu_bench.py", argv, python=str(REPO / ".venv/bin/python"))
    assert shlex.split(cmd) == [".venv/bin/python", "benchmarks/train_cpu_bench.py", *argv]


def test_run_logged_measures_and_reports_failures(tmp_path):
    run = common.run_logged([sys.executable, "-c", "print('hello from child')"], tmp_path / "ok.log", "greeting")
    assert "hello from child" in run.log.read_text()
    assert run.seconds > 0 and run.peak_rss_mb > 1
    assert run.peak_rss_all_mb is None or run.peak_rss_all_mb >= 0

    script = "import sys\nfor i in range(50): print(f'line {i}')\nsys.exit(3)"
    with pytest.raises(common.BenchmarkError) as err:
        common.run_logged([sys.executable, "-c", script], tmp_path / "bad.log", "failing step")
    message = str(err.value)
    assert "failing step failed with exit status 3" in message
    assert str(tmp_path / "bad.log") in message
    assert "line 49" in message and "line 5\n" not in message  # only the tail


def test_log_tail_folds_progress_bars(tmp_path):
    log = tmp_path / "p.log"
    log.write_bytes(b"start\ntrain: 10%\rtrain: 50%\rtrain: 100%\ndone\n")
    assert common.log_tail(log, lines=2) == "train: 100%\ndone"


# ------------------------------------------------------------------------------------ train_cpu_bench.py


def test_task_aucs_match_sklearn_with_ties_and_clicked_rows_for_cvr():
    rng = np.random.default_rng(0)
    n = 2000
    click = rng.random(n) < 0.3
    buy = click & (rng.random(n) < 0.3)
    labels = np.stack([click, buy], axis=1).astype(np.int8)
    # Rounded scores make many ties; columns in the tutorial ESMM order (pCVR, pCTR, pCTCVR).
    predictions = np.round(rng.random((n, 3)), 1).astype(np.float32)
    aucs = bench.task_aucs(predictions, ["cvr", "ctr", "ctcvr"], labels)
    assert aucs["ctr"] == pytest.approx(roc_auc_score(click, predictions[:, 1]), abs=1e-12)
    assert aucs["ctcvr"] == pytest.approx(roc_auc_score(buy, predictions[:, 2]), abs=1e-12)
    assert aucs["cvr"] == pytest.approx(roc_auc_score(buy[click], predictions[click, 0]), abs=1e-12)


def test_task_aucs_single_class_is_nan_and_shape_mismatch_raises():
    labels = np.array([[1, 0], [0, 0], [1, 0]], dtype=np.int8)  # no purchase at all
    aucs = bench.task_aucs(np.array([[0.1, 0.9], [0.2, 0.1], [0.3, 0.8]]), ["ctcvr", "ctr"], labels)
    assert math.isnan(aucs["ctcvr"]) and aucs["ctr"] == 1.0
    with pytest.raises(ValueError, match="do not match"):
        bench.task_aucs(np.zeros((3, 3)), ["ctcvr", "ctr"], labels)


def _overrides(cmd: list[str]) -> tuple[str, list[str]]:
    i = cmd.index("--config")
    return cmd[i + 1], cmd[i + 2:]


@pytest.mark.parametrize("model", bench.MODELS)
def test_dist_mtl_command_gives_the_tutorial_sizes(tmp_path, model):
    cmd = bench.dist_mtl_command(model, REPO / "configs" / "synthetic_cpu.toml", tmp_path / "data",
                                 tmp_path / "run", batch_size=4096, nproc=2)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    config, overrides = _overrides(cmd)
    cfg = load_config(config, overrides)  # every override is a valid key with a valid value
    assert cfg.data.batch_size == 2048 and cfg.data.path == str(tmp_path / "data")
    assert cfg.train.epochs == 1 and cfg.train.early_stop_patience >= 1000
    assert cfg.model.head == model
    if model == "esmm":
        assert (cfg.model.embedding_dim, cfg.model.tower_dims) == (16, [16, 8])
        assert [t.name for t in cfg.tasks] == ["ctr", "cvr", "ctcvr"]
    else:
        assert (cfg.model.embedding_dim, cfg.model.num_experts, cfg.model.expert_dims, cfg.model.tower_dims) == (
            4, 8, [16], [8])
        assert [(t.name, t.label, t.rows, t.loss_weight) for t in cfg.tasks] == [
            ("ctr", "click", "all", 1.0), ("ctcvr", "buy", "all", 1.0)]
    with pytest.raises(ValueError, match="not divisible"):
        bench.dist_mtl_command(model, Path(config), tmp_path, tmp_path, batch_size=4095, nproc=2)


def test_read_summary_names_the_file_and_missing_keys(tmp_path):
    path = tmp_path / "summary.json"
    with pytest.raises(common.BenchmarkError, match="no such file"):
        bench.read_summary(path)
    path.write_text(json.dumps({"train_samples_per_s": 1.0, "metrics": {}}))
    with pytest.raises(common.BenchmarkError, match=r"summary lacks \['samples_trained'"):
        bench.read_summary(path)


TINY = SyntheticConfig(train_impressions=600, test_impressions=300, history_ids_per_user=24.0,
                       click_rate=0.2, buy_rate_after_click=0.2, seed=3)


def test_prepare_data_writes_both_layouts_and_reuses_them(tmp_path):
    said: list[str] = []
    data, seconds = bench.prepare_data(tmp_path, TINY, force=False, say=said.append)
    assert all(s > 0 for s in seconds.values())
    metadata = DatasetMetadata.load(data.parquet)
    rows = {s: sum(1 for _ in open(data.rechub / f"ali_ccp_{s}.csv")) - 1 for s in ("train", "val", "test")}
    bench.check_same_rows(metadata, rows)  # the two layouts hold the same impressions
    assert (data.raw / "truth_test.parquet").exists()

    _, again = bench.prepare_data(tmp_path, TINY, force=False, say=said.append)
    assert again == {"raw": 0.0, "parquet": 0.0, "rechub_csv": 0.0}
    assert sum("reusing" in line for line in said) == 3

    (data.parquet / "metadata.json").unlink()  # an interrupted conversion is redone, alone
    _, partial = bench.prepare_data(tmp_path, TINY, force=False, say=said.append)
    assert partial["raw"] == 0.0 and partial["rechub_csv"] == 0.0 and partial["parquet"] > 0

    with pytest.raises(common.BenchmarkError, match="layouts disagree"):
        bench.check_same_rows(metadata, {**rows, "val": rows["val"] + 1})


def test_prepare_data_redoes_every_step_for_another_config(tmp_path):
    bench.prepare_data(tmp_path, TINY, force=False, say=lambda _: None)
    _, seconds = bench.prepare_data(tmp_path, dataclasses.replace(TINY, seed=4), force=False, say=lambda _: None)
    assert all(s > 0 for s in seconds.values())


def _result() -> dict:
    row = {"auc": 0.6, "oracle_auc": 0.7}
    return {
        "models": ["esmm", "mmoe"], "command": "python bench.py", "date": "2026-01-01T00:00:00+00:00",
        "batch_size": 4096, "batch_size_per_rank": 2048, "world_size": 2,
        "machine": {"usable_cores": 2, "cpu_model": "cpu"},
        "data": {"train_impressions": 1000, "test_impressions": 500, "history_ids_per_user": 500.0,
                 "embedding_rows": 1_700_000},
        "esmm_samples_per_s": 200_000.0, "rechub_esmm_samples_per_s": 5000.0, "ratio_vs_rechub": 40.0,
        "mmoe_samples_per_s": 150_000.0, "rechub_mmoe_samples_per_s": 6000.0, "mmoe_ratio_vs_rechub": 25.0,
        "tasks": {
            "esmm": {s: {"ctr": row, "cvr": row, "ctcvr": row} for s in ("dist_mtl", "torch_rechub")},
            "mmoe": {s: {"ctr": row, "ctcvr": row} for s in ("dist_mtl", "torch_rechub")},
        },
        "oracle_auc": {"ctr": 0.71, "cvr": 0.69, "ctcvr": 0.8},
    }


def test_markdown_table_rows():
    lines = bench.markdown_table(_result()).splitlines()
    assert "1,700,000 embedding rows; batch 4096 (dist_mtl: 2 ranks x 2048)" in lines[0]
    assert "| ESMM | dist_mtl | 200,000 | 40.0x | 0.6000 | 0.6000 | 0.6000 |" in lines
    assert "| MMOE | torch-rechub 0.9.0 | 6,000 | 1.0x | 0.6000 | - | 0.6000 |" in lines
    assert "| - | planted model (oracle) | - | - | 0.7100 | 0.6900 | 0.8000 |" in lines


def test_main_rejects_bad_arguments_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--batch-size", "4095", "--nproc", "2", "--work-dir", str(tmp_path)])
    assert "positive multiple of --nproc" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--rechub-python", str(tmp_path / "missing" / "python"), "--work-dir", str(tmp_path)])
    assert "benchmarks/rechub_env.sh" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--vocab-scale", "2", "--rechub-python", sys.executable, "--work-dir", str(tmp_path)])
    assert "vocab_scale=2.0 must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--vocab-scale", "half", "--rechub-python", sys.executable, "--work-dir", str(tmp_path)])
    assert "expected a number in (0, 1] or 'auto'" in capsys.readouterr().err
    assert bench._vocab_scale("auto") is None and bench._vocab_scale("0.5") == 0.5
    assert list(tmp_path.iterdir()) == []


def test_task_table_keeps_undefined_aucs_and_drops_absent_tasks():
    aucs = bench.dist_mtl_task_aucs({"ctr/auc": 0.61, "ctcvr/auc": math.nan, "ctr/count": 10.0})
    table = bench.task_table(aucs, {"ctr": 0.7, "cvr": 0.69, "ctcvr": 0.8})
    assert table == {"ctr": {"auc": 0.61, "oracle_auc": 0.7}, "ctcvr": {"auc": None, "oracle_auc": 0.8}}
