"""2 nodes x 1 process through torchrun's c10d rendezvous on loopback == 1 node x 2 processes."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import torch
from data_helpers import write_random_dataset

from dist_mtl.distributed import DistContext, build_topology

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(data: Path, run: Path) -> list[str]:
    return [str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "synthetic_cpu.toml"),
            f'data.path="{data}"', f'run_dir="{run}"', "data.batch_size=128", "data.eval_batch_size=512",
            "model.tower_dims=[16,8]", "train.epochs=1", "train.progress_bar=false",
            # Evaluating mid-epoch puts the model in eval mode between training steps; it must come back.
            "train.eval_every_steps=3",
            # The planner may pick other placements for 2 nodes than for 1 (that is its job); one
            # sharding type for every table makes the two runs compute the same thing.
            'sharding.sharding_type="table_wise"',
            # Every rank records its own profile window, wherever it runs.
            "profile.steps=2", "profile.start_step=1"]


def test_two_nodes_match_one_node_two_processes(tmp_path):
    data = tmp_path / "data"
    write_random_dataset(data, splits={"train": 150, "test": 60}, seed=3)
    torchrun = [sys.executable, "-m", "torch.distributed.run"]

    one_node = subprocess.run(
        torchrun + ["--standalone", "--nproc_per_node=2"] + _train_args(data, tmp_path / "one"),
        capture_output=True, text=True, timeout=300)
    assert one_node.returncode == 0, one_node.stderr[-3000:]

    port = _free_port()
    nodes = [
        subprocess.Popen(
            torchrun + ["--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}", "--rdzv_backend=c10d",
                        f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=multinode-test"]
            + _train_args(data, tmp_path / "two"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in (0, 1)
    ]
    for proc in nodes:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]

    a = json.loads((tmp_path / "one" / "summary.json").read_text())
    b = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (a["world_size"], a["num_nodes"], a["local_world_size"]) == (2, 1, 2)
    assert (b["world_size"], b["num_nodes"], b["local_world_size"]) == (2, 2, 1)
    assert a["steps"] == b["steps"] and a["samples_trained"] == b["samples_trained"]
    for summary in (a, b):  # every rank's peak memory reaches the summary
        assert len(summary["peak_memory_mb"]["host_peak_rss_mb"]) == 2
        assert all(v > 0 for v in summary["peak_memory_mb"]["host_peak_rss_mb"])
    for key, value in a["metrics"].items():
        assert b["metrics"][key] == value or abs(b["metrics"][key] - value) < 1e-6, key
    for run in ("one", "two"):
        for rank in (0, 1):
            report = json.loads((tmp_path / run / "profile" / f"rank{rank}_operators.json").read_text())
            assert report["global_steps"] == [2, 3] and (tmp_path / run / "profile" / report["trace"]).exists()


def test_topology_knows_local_world_size():
    ctx = DistContext(rank=0, world_size=16, local_rank=0, local_world_size=8, device=torch.device("cpu"),
                      backend="gloo")
    topology = build_topology(ctx)
    assert topology.world_size == 16 and topology.local_world_size == 8
    assert ctx.num_nodes == 2
