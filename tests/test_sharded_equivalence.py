"""2 gloo ranks with unequal user counts vs 1 rank; grouped vs expanded users (see the worker's docstring)."""

import json
from pathlib import Path

import pytest
from script_helpers import run_under_torchrun

WORKER = Path(__file__).parent / "workers" / "sharded_equivalence.py"
STEPS = 6


def run(tmp_path: Path, nproc: int, sharding: str, path: str, sparse: str = "rowwise_adagrad",
        *extra: str) -> dict:
    out = tmp_path / f"{nproc}-{sharding}-{path}-{sparse}{''.join('-' + e for e in extra)}.json"
    run_under_torchrun(WORKER, nproc, [out, sharding, path, str(STEPS), sparse, *extra])
    return json.loads(out.read_text())


@pytest.mark.parametrize("sharding", ["table_wise", "data_parallel", "column_wise"])
def test_two_ranks_follow_the_one_rank_trajectory(tmp_path, sharding):
    one = run(tmp_path, 1, sharding, "grouped")
    two = run(tmp_path, 2, sharding, "grouped")
    if sharding != "table_wise":
        # Every sharding also follows 1-rank table_wise: a fault both rank counts share (say, shards of a
        # column_wise table initialised from the wrong columns) would otherwise pass unseen. With SGD:
        # row-wise Adagrad keeps one accumulator per row of each column shard, so column_wise steps
        # differently from table_wise by design.
        reference = run(tmp_path, 1, "table_wise", "grouped", "sgd")
        for a, b in zip(reference["losses"], run(tmp_path, 2, sharding, "grouped", "sgd")["losses"]):
            assert a == pytest.approx(b, rel=2e-4, abs=1e-5)
    # The ranks really held different numbers of users in some steps.
    assert any(a != b for a, b in zip(*two["user_counts"]))
    assert len(one["losses"]) == len(two["losses"]) == STEPS
    assert one["first_batch_after"] < one["losses"][0] - 0.01  # it trains
    assert two["first_batch_after"] == pytest.approx(one["first_batch_after"], rel=2e-4, abs=1e-5)
    for a, b in zip(one["losses"], two["losses"]):
        assert a == pytest.approx(b, rel=2e-4, abs=1e-5)


def test_grouped_and_expanded_train_identically_on_two_ranks(tmp_path):
    grouped = run(tmp_path, 2, "table_wise", "grouped")
    expanded = run(tmp_path, 2, "table_wise", "expanded")
    for a, b in zip(grouped["losses"], expanded["losses"]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_a_loss_over_clicked_rows_is_the_global_mean_whatever_the_ranks_clicks(tmp_path):
    # The direct CVR loss averages over clicked rows; the two halves hold different numbers of clicks, so
    # a per-rank mean averaged across ranks would weigh the clicks of the rank with fewer more.
    one = run(tmp_path, 1, "table_wise", "grouped", "rowwise_adagrad", "direct_cvr")
    two = run(tmp_path, 2, "table_wise", "grouped", "rowwise_adagrad", "direct_cvr")
    assert any(a != b for a, b in zip(*two["click_counts"]))
    for a, b in zip(one["losses"], two["losses"]):
        assert a == pytest.approx(b, rel=2e-4, abs=1e-5)
