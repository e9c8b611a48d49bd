"""launch/evaluate.py: a checkpoint evaluated on N ranks without training (Trainer.evaluate_checkpoint)."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from data_helpers import write_random_dataset
from script_helpers import load_script

from dist_mtl.config import load_config
from dist_mtl.export import export_model, predict_split
from dist_mtl.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
EVALUATE = load_script("launch/evaluate.py")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-rank run on a dataset with id maps, and two more datasets: a later day in the same id space
    (one split, "day8") and a dataset in other id maps."""
    root = tmp_path_factory.mktemp("evaluate")
    data, day8, other = root / "data", root / "day8", root / "other"
    write_random_dataset(data, splits={"train": 120, "test": 50}, seed=5, id_maps_seed=1)
    write_random_dataset(day8, splits={"day8": 40}, seed=9, id_maps_seed=1)
    write_random_dataset(other, splits={"test": 40}, seed=9, id_maps_seed=2)
    run = root / "run"
    cfg = load_config(None, [f'data.path="{data}"', f'run_dir="{run}"', "data.batch_size=64",
                             "data.eval_batch_size=256", "model.embedding_dim=8", "model.tower_dims=[16,8]",
                             "train.progress_bar=false"])
    summary = Trainer(cfg).train()
    (best,) = sorted((run / "best").glob("step-*"))
    return SimpleNamespace(root=root, data=data, day8=day8, other=other, summary=summary, best=best)


def _torchrun(*args, nproc=2) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(ROOT / "launch" / "evaluate.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_two_ranks_evaluate_a_one_rank_checkpoint_as_its_run_did(trained):
    out = trained.root / "eval_test"
    done = _torchrun("--checkpoint", trained.best, "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "evaluation.json").read_text())
    assert report["world_size"] == 2 and report["split"] == "test" and report["step"] == trained.summary["best_step"]
    assert len(report["peak_memory_mb"]["host_peak_rss_mb"]) == 2
    final = trained.summary["metrics"]
    assert report["metrics"].keys() == final.keys()
    for key, value in final.items():
        # The exact AUC does not depend on how the rows are split over ranks; sums of log-losses round
        # in another order.
        if key.endswith(("/auc", "/count", "/positives")):
            assert report["metrics"][key] == value, key
        else:
            assert report["metrics"][key] == pytest.approx(value, rel=1e-9), key
    assert "test (model of" in done.stdout and "ctr/auc=" in done.stdout


def test_a_later_day_holding_one_split_is_evaluated_in_the_runs_id_space(trained):
    out = trained.root / "eval_day8"
    done = _torchrun("--checkpoint", trained.best, "--out", out, "--split", "day8", f'data.path="{trained.day8}"')
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "evaluation.json").read_text())
    impressions = json.loads((trained.day8 / "metadata.json").read_text())["splits"]["day8"]["num_impressions"]
    assert report["split"] == "day8" and report["metrics"]["ctr/count"] == impressions
    assert 0.0 <= report["metrics"]["ctr/auc"] <= 1.0


def test_data_in_other_id_maps_and_a_folder_that_is_no_checkpoint_are_refused(trained, capsys):
    with pytest.raises(SystemExit) as exit_:
        EVALUATE.main(["--checkpoint", str(trained.best), "--out", str(trained.root / "eval_other"),
                       f'data.path="{trained.other}"'])
    assert exit_.value.code == 1
    assert "was trained on data encoded with the id maps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        EVALUATE.main(["--checkpoint", str(trained.best.parent / "step-00099999"),
                       "--out", str(trained.root / "eval_nothing")])
    assert exit_.value.code == 1
    assert "is not a committed checkpoint" in capsys.readouterr().err


def test_predictions_of_two_ranks_are_the_scores_predict_gives_an_export_of_the_checkpoint(trained):
    out = trained.root / "eval_predictions"
    stale = out / "predictions" / "rank-00007.parquet"  # an earlier evaluation's, on more ranks
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"not this evaluation's")
    done = _torchrun("--checkpoint", trained.best, "--out", out, "--predictions")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "evaluation.json").read_text())["predictions"]
    assert report["files"] == ["rank-00000.parquet", "rank-00001.parquet"] and not stale.exists()
    assert sorted(p.name for p in (out / "predictions").iterdir()) == report["files"]  # no temporary left
    got = pq.read_table(out / "predictions").sort_by("index")
    n = json.loads((trained.data / "metadata.json").read_text())["splits"]["test"]["num_impressions"]
    assert report["rows"] == got.num_rows == n and sum(report["rows_by_rank"]) == n and min(report["rows_by_rank"]) > 0
    assert got.column_names == report["columns"] == ["index", "sample_id", "p_ctr", "p_cvr", "p_ctcvr"]

    cfg = load_config(trained.best.parent.parent / "config.toml")
    export = export_model(trained.root / "export_for_predictions", cfg, checkpoint=trained.best)
    predict_split(export, trained.data, "test", trained.root / "predict.parquet", metrics=False)
    want = pq.read_table(trained.root / "predict.parquet")
    assert got.column("index").to_pylist() == want.column("index").to_pylist() == list(range(n))
    assert got.column("sample_id").to_pylist() == want.column("sample_id").to_pylist()
    for column in ("p_ctr", "p_cvr", "p_ctcvr"):
        np.testing.assert_allclose(got.column(column).to_numpy(), want.column(column).to_numpy(), atol=1e-6)
