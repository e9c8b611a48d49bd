import json
import math
import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_mtl.losses import PROBABILITY_EPS
from dist_mtl.metrics import METRICS_JSONL, DistributedExactAUC, DistributedGroupAUC, MetricsLogger, TaskMetrics
from dist_mtl.tasks import TaskConfig, default_esmm_tasks

# The reference AUC. CI installs scikit-learn; the GPU test machine has none, and there these tests skip
# (benchmarks/gpu/session.py runs the suite there).
roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score

TASKS = default_esmm_tasks() + [
    TaskConfig(name="dwell", label="dwell", type="regression", weight_column="dwell_w", rows="click")
]


def _data(n: int, seed: int, ctr_decimals: int = 1) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Predictions and labels as numpy; CTR predictions rounded so that most values tie."""
    rng = np.random.default_rng(seed)
    p_ctr = np.round(rng.uniform(0.05, 0.95, n), ctr_decimals).astype(np.float32)
    p_cvr = rng.uniform(0.0, 1.0, n).astype(np.float32)
    click = (rng.uniform(size=n) < p_ctr).astype(np.float32)
    buy = click * (rng.uniform(size=n) < p_cvr).astype(np.float32)
    dwell = np.where(click == 1, rng.gamma(2.0, 3.0, n), np.nan).astype(np.float32)  # undefined unless clicked
    predictions = {"ctr": p_ctr, "cvr": p_cvr, "ctcvr": p_ctr * p_cvr, "dwell": rng.gamma(2.0, 3.0, n).astype(np.float32)}
    labels = {"click": click, "buy": buy, "dwell": dwell, "dwell_w": np.ones(n, np.float32)}
    return predictions, labels


def _torch(d: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in d.items()}


def _expected(predictions: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, float]:
    """The metrics of TASKS computed with sklearn / numpy in float64."""
    out: dict[str, float] = {}
    clicked = labels["click"] == 1
    for task in TASKS:
        rows = clicked if task.rows == "click" else np.ones_like(clicked)
        p = predictions[task.name][rows].astype(np.float64)
        y = labels[task.label][rows].astype(np.float64)
        if task.type == "binary":
            both = 0 < y.sum() < len(y)
            out[f"{task.name}/auc"] = roc_auc_score(y, p) if both else math.nan
            pc = np.clip(p, PROBABILITY_EPS, 1 - PROBABILITY_EPS)
            out[f"{task.name}/logloss"] = float(-(y * np.log(pc) + (1 - y) * np.log1p(-pc)).mean())
            out[f"{task.name}/calibration"] = p.mean() / y.mean()
            out[f"{task.name}/count"] = float(len(y))
            out[f"{task.name}/positives"] = float(y.sum())
        else:
            out[f"{task.name}/mse"] = float(((p - y) ** 2).mean())
            out[f"{task.name}/mae"] = float(np.abs(p - y).mean())
            out[f"{task.name}/count"] = float(len(y))
    return out


def _assert_metrics_equal(actual: dict[str, float], expected: dict[str, float]) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(actual[key]), key
        else:
            # The AUC counts pairs exactly; the float64 sums add in another order than numpy.
            assert actual[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


def _update_in_batches(metrics: TaskMetrics, predictions, labels, sizes) -> None:
    start = 0
    for size in sizes:
        part = slice(start, start + size)
        metrics.update(_torch({k: v[part] for k, v in predictions.items()}),
                       _torch({k: v[part] for k, v in labels.items()}))
        start += size
    assert start == len(labels["click"])


def test_single_process_metrics_match_sklearn_and_numpy_with_ties_and_masks():
    predictions, labels = _data(700, seed=0)
    assert len(np.unique(predictions["ctr"])) <= 10  # many ties
    metrics = TaskMetrics(TASKS)
    _update_in_batches(metrics, predictions, labels, [250, 0, 333, 117])
    result = metrics.compute()
    _assert_metrics_equal(result, _expected(predictions, labels))
    # CVR is scored on clicked rows only: the same predictions over all rows give another AUC.
    assert result["cvr/count"] == labels["click"].sum()
    all_rows_auc = roc_auc_score(labels["buy"], predictions["cvr"])
    assert abs(result["cvr/auc"] - all_rows_auc) > 1e-3
    # compute() leaves the state alone: a second call and further updates build on the same rows.
    assert metrics.compute() == result
    more_p, more_l = _data(90, seed=1)
    metrics.update(_torch(more_p), _torch(more_l))
    both = ({k: np.concatenate([predictions[k], more_p[k]]) for k in predictions},
            {k: np.concatenate([labels[k], more_l[k]]) for k in labels})
    _assert_metrics_equal(metrics.compute(), _expected(*both))


def test_auc_is_nan_when_a_class_is_missing_and_everything_is_nan_without_rows():
    metrics = TaskMetrics(default_esmm_tasks())
    n = 20
    metrics.update(
        {"ctr": torch.rand(n), "cvr": torch.rand(n), "ctcvr": torch.rand(n)},
        {"click": torch.ones(n), "buy": torch.zeros(n)},
    )
    result = metrics.compute()
    assert math.isnan(result["ctr/auc"]) and math.isfinite(result["ctr/calibration"])
    assert math.isnan(result["ctcvr/auc"]) and math.isnan(result["ctcvr/calibration"])
    assert result["ctcvr/count"] == n and result["ctcvr/positives"] == 0
    assert math.isfinite(result["ctcvr/logloss"])

    metrics.reset()
    result = metrics.compute()
    assert all(result[f"{t}/count"] == 0 for t in ("ctr", "cvr", "ctcvr"))
    assert all(math.isnan(result[f"{t}/{m}"]) for t in ("ctr", "cvr") for m in ("auc", "logloss", "calibration"))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p, l: l.__setitem__("click", l["click"] * 2), "label column 'click' is 2.0 at batch row 1"),
        (lambda p, l: p.__setitem__("ctr", torch.full((8,), 3.5)), "prediction is 3.5 at batch row 0, expected a probability"),
        (lambda p, l: p["dwell"].__setitem__(5, math.nan), "task 'dwell': prediction is nan at batch row 5"),
        (lambda p, l: l.pop("buy"), "task 'cvr': label column 'buy' is missing"),
        (lambda p, l: p.pop("ctcvr"), "task 'ctcvr': no prediction"),
    ],
)
def test_bad_input_names_task_column_row_and_batch(change, message):
    predictions = _torch(_data(8, seed=2)[0])
    labels = {"click": torch.tensor([0, 1, 1, 1, 1, 1, 1, 1.0]), "buy": torch.zeros(8),
              "dwell": torch.ones(8), "dwell_w": torch.ones(8)}
    change(predictions, labels)
    with pytest.raises(ValueError, match=f"{message}.*train/impressions-00001.parquet rg 3"):
        TaskMetrics(TASKS).update(predictions, labels, source="train/impressions-00001.parquet rg 3")


def test_bad_values_outside_a_task_rows_are_ignored():
    predictions, labels = _data(50, seed=3)
    labels["buy"] = np.where(labels["click"] == 1, labels["buy"], 7.0).astype(np.float32)
    tasks = [t for t in TASKS if t.rows == "click"]
    metrics = TaskMetrics(tasks)
    metrics.update(_torch(predictions), _torch(labels))
    expected = {k: v for k, v in _expected(predictions, labels).items() if k.split("/")[0] in {"cvr", "dwell"}}
    _assert_metrics_equal(metrics.compute(), expected)


@pytest.mark.parametrize("positive_share", [0.02, 0.5, 0.97])
def test_exact_auc_matches_sklearn_whichever_class_is_smaller(positive_share):
    # Scores on a coarse grid, so that many positive/negative pairs tie (they count half), and both
    # counting directions: the positives gathered (rare) or the negatives (positives the majority).
    rng = np.random.default_rng(7)
    n = 5_000
    positive = rng.uniform(size=n) < positive_share
    scores = np.round(np.clip(rng.normal(0.5 + 0.1 * positive, 0.2), 0, 1), 2).astype(np.float32)
    auc = DistributedExactAUC(torch.device("cpu"))
    for part in np.array_split(np.arange(n), 7):
        auc.update(torch.from_numpy(scores[part]), torch.from_numpy(positive[part]))
    expected = roc_auc_score(positive, scores.astype(np.float64))
    assert auc.compute() == pytest.approx(expected, abs=1e-12)
    assert auc.compute() == pytest.approx(expected, abs=1e-12)  # compute() keeps the rows
    auc.reset()
    assert math.isnan(auc.compute())


# ------------------------------------------------------------------------------------------- 2 ranks

RANK_ROWS = (300, 170)


def _rank_slices(predictions, labels, rank):
    start = sum(RANK_ROWS[:rank])
    part = slice(start, start + RANK_ROWS[rank])
    return {k: v[part] for k, v in predictions.items()}, {k: v[part] for k, v in labels.items()}


def _two_rank_data():
    predictions, labels = _data(sum(RANK_ROWS), seed=4)
    # Rank 1 has no click: CVR and dwell have no rows there.
    labels["click"][RANK_ROWS[0]:] = 0
    labels["buy"][RANK_ROWS[0]:] = 0
    labels["dwell"][RANK_ROWS[0]:] = np.nan
    return predictions, labels


def _worker(rank: int, world_size: int, port: int, out_dir: str, grouped: bool = False) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    try:
        predictions, labels = _rank_slices(*(_two_rank_groups() if grouped else _two_rank_data()), rank)
        metrics = TaskMetrics(TASKS, group_column="user_row" if grouped else None)
        sizes = [128, 128, 44] if rank == 0 else [100, 70]
        _update_in_batches(metrics, predictions, labels, sizes)
        everything = metrics.compute()
        # A second round in which rank 1 sees no batch at all (e.g. fewer evaluation blocks than ranks).
        metrics.reset()
        if rank == 0:
            _update_in_batches(metrics, predictions, labels, [300])
        rank0_only = metrics.compute()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"all": everything, "rank0": rank0_only}))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_with_uneven_rows_match_the_gathered_data(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    predictions, labels = _two_rank_data()
    assert labels["click"][RANK_ROWS[0]:].sum() == 0
    expected_all = _expected(predictions, labels)
    expected_rank0 = _expected(*_rank_slices(predictions, labels, 0))
    assert expected_all["ctr/count"] == 470 and expected_rank0["ctr/count"] == 300
    for result in results:
        _assert_metrics_equal(result["all"], expected_all)
        _assert_metrics_equal(result["rank0"], expected_rank0)
    # Same values on every rank, to the bit (NaN compares unequal, so compare the JSON text).
    assert json.dumps(results[0]) == json.dumps(results[1])


def _auc_worker(rank: int, world_size: int, port: int, out_dir: str, positive_share: float) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    try:
        scores, positive = _auc_data(positive_share)
        auc = DistributedExactAUC(torch.device("cpu"))
        # Rank 0 holds the first 1,000 rows and only those; rank 1 the other 3,000, which hold every
        # row of the minority class: the gathered class is empty on one rank.
        part = slice(0, 1000) if rank == 0 else slice(1000, None)
        auc.update(torch.from_numpy(scores[part]), torch.from_numpy(positive[part]))
        Path(out_dir, f"auc{rank}.json").write_text(json.dumps(auc.compute()))
    finally:
        dist.destroy_process_group()


def _auc_data(positive_share: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    n, minority = 4000, positive_share < 0.5
    positive = np.zeros(n, bool) if minority else np.ones(n, bool)
    positive[1000:] = rng.uniform(size=n - 1000) < positive_share
    scores = np.round(rng.uniform(size=n) + 0.2 * positive, 1).astype(np.float32)
    return scores, positive


@pytest.mark.parametrize("positive_share", [0.1, 0.9])
def test_exact_auc_over_two_ranks_when_one_rank_lacks_the_gathered_class(tmp_path, positive_share):
    mp.spawn(_auc_worker, args=(2, _free_port(), str(tmp_path), positive_share), nprocs=2, join=True)
    scores, positive = _auc_data(positive_share)
    expected = roc_auc_score(positive, scores.astype(np.float64))
    for rank in range(2):
        assert json.loads((tmp_path / f"auc{rank}.json").read_text()) == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------------------------------ group AUC

def _expected_gauc(scores: np.ndarray, positive: np.ndarray, groups: np.ndarray) -> tuple[float, int]:
    """sklearn's AUC per group holding both classes, averaged weighted by the group's rows."""
    weighted = rows = counted = 0
    for g in np.unique(groups):
        m = groups == g
        if 0 < positive[m].sum() < m.sum():
            weighted += m.sum() * roc_auc_score(positive[m], scores[m].astype(np.float64))
            rows += m.sum()
            counted += 1
    return (weighted / rows if rows else math.nan), counted


def _grouped_data(n: int, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    predictions, labels = _data(n, seed)
    rng = np.random.default_rng(seed + 100)
    # Users of 1-30 impressions, stored one after another as the evaluation reads them.
    sizes = rng.integers(1, 31, n)
    labels["user_row"] = np.repeat(np.arange(n), sizes)[:n].astype(np.int64)
    return predictions, labels


def test_group_auc_matches_sklearn_per_group_with_ties_masks_and_groups_cut_by_batches():
    predictions, labels = _grouped_data(900, seed=5)
    metrics = TaskMetrics(TASKS, group_column="user_row")
    _update_in_batches(metrics, predictions, labels, [250, 0, 333, 317])  # cuts users at 250 and 583
    result = metrics.compute()
    groups, clicked = labels["user_row"], labels["click"] == 1
    for task, rows in (("ctr", np.ones_like(clicked)), ("cvr", clicked), ("ctcvr", np.ones_like(clicked))):
        label = labels["click" if task == "ctr" else "buy"] == 1
        gauc, counted = _expected_gauc(predictions[task][rows], label[rows], groups[rows])
        assert result[f"{task}/gauc"] == pytest.approx(gauc, abs=1e-12), task
        assert result[f"{task}/gauc_groups"] == counted > 5, task
    assert "dwell/gauc" not in result  # regression tasks have no AUC
    # Without the group column the metrics are those of before, and no gauc appears.
    plain = TaskMetrics(TASKS)
    _update_in_batches(plain, predictions, labels, [250, 0, 333, 317])
    assert {k: v for k, v in result.items() if "gauc" not in k} == plain.compute()


def test_group_auc_is_nan_without_a_group_holding_both_classes_and_needs_the_column():
    metrics = DistributedGroupAUC(torch.device("cpu"))
    gauc, counted = metrics.compute()
    assert math.isnan(gauc) and counted == 0
    metrics.update(torch.tensor([0, 0, 1, 1]), torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([True, True, False, False]))
    gauc, counted = metrics.compute()
    assert math.isnan(gauc) and counted == 0
    predictions, labels = _grouped_data(20, seed=6)
    del labels["user_row"]
    with pytest.raises(ValueError, match="group column 'user_row' is missing from the batch labels"):
        TaskMetrics(TASKS, group_column="user_row").update(_torch(predictions), _torch(labels))


def _two_rank_groups():
    predictions, labels = _grouped_data(sum(RANK_ROWS), seed=7)
    # The user at the rank boundary has impressions on both ranks, and so has a user whose rows a
    # shuffled stream put at both ends.
    assert labels["user_row"][RANK_ROWS[0] - 1] == labels["user_row"][RANK_ROWS[0]]
    labels["user_row"][-3:] = labels["user_row"][0]
    return predictions, labels


def test_group_auc_over_two_ranks_merges_users_seen_on_both(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), True), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert json.dumps(results[0]) == json.dumps(results[1])
    for key, (predictions, labels) in (("all", _two_rank_groups()), ("rank0", _rank_slices(*_two_rank_groups(), 0))):
        clicked = labels["click"] == 1
        for task, rows in (("ctr", np.ones_like(clicked)), ("cvr", clicked)):
            label = labels["click" if task == "ctr" else "buy"] == 1
            gauc, counted = _expected_gauc(predictions[task][rows], label[rows], labels["user_row"][rows])
            assert results[0][key][f"{task}/gauc"] == pytest.approx(gauc, abs=1e-12), (key, task)
            assert results[0][key][f"{task}/gauc_groups"] == counted, (key, task)


# -------------------------------------------------------------------------------------------- logger

def test_logger_writes_tensorboard_and_jsonl_on_rank_zero_only(tmp_path):
    with MetricsLogger(tmp_path / "rank1", rank=1) as other:
        other.log({"ctr/auc": 0.7}, step=1)
    assert not (tmp_path / "rank1").exists()

    log_dir = tmp_path / "tb"
    with MetricsLogger(log_dir, rank=0) as logger:
        logger.log({"ctr/auc": 0.625, "cvr/auc": math.nan}, step=10, prefix="eval/test/")
        logger.log({"loss": 0.5}, step=20, prefix="train/")
    with pytest.raises(RuntimeError, match="closed"):
        logger.log({"loss": 0.1}, step=30)

    assert list(log_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"eval/test/ctr/auc", "eval/test/cvr/auc", "train/loss"}
    (auc,) = events.Scalars("eval/test/ctr/auc")
    assert (auc.step, auc.value) == (10, 0.625)
    lines = [json.loads(line) for line in (log_dir / METRICS_JSONL).read_text().splitlines()]
    assert lines == [{"step": 10, "eval/test/ctr/auc": 0.625, "eval/test/cvr/auc": None},
                     {"step": 20, "train/loss": 0.5}]


def test_logger_rejects_non_numbers(tmp_path):
    with MetricsLogger(tmp_path, rank=0) as logger:
        with pytest.raises(ValueError, match="metric 'train/note' at step 3"):
            logger.log({"note": "fast"}, step=3, prefix="train/")
