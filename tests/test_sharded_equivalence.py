"""2 gloo ranks with unequal user counts vs 1 rank; grouped vs expanded users (see the worker's docstring)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "workers" / "sharded_equivalence.py"
STEPS = 6


def run(tmp_path: Path, nproc: int, sharding: str, path: str) -> dict:
    out = tmp_path / f"{nproc}-{sharding}-{path}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), str(out), sharding, path, str(STEPS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("sharding", ["table_wise", "data_parallel", "column_wise"])
def test_two_ranks_follow_the_one_rank_trajectory(tmp_path, sharding):
    one = run(tmp_path, 1, sharding, "grouped")
    two = run(tmp_path, 2, sharding, "grouped")
    # The ranks really held different numbers of users in some steps.
    assert any(a != b for a, b in zip(*two["user_counts"]))
    assert len(one["losses"]) == len(two["losses"]) == STEPS
    assert one["losses"][-1] < one["losses"][0]  # it trains
    for a, b in zip(one["losses"], two["losses"]):
        assert a == pytest.approx(b, rel=2e-4, abs=1e-5)


def test_grouped_and_expanded_train_identically_on_two_ranks(tmp_path):
    grouped = run(tmp_path, 2, "table_wise", "grouped")
    expanded = run(tmp_path, 2, "table_wise", "expanded")
    for a, b in zip(grouped["losses"], expanded["losses"]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
