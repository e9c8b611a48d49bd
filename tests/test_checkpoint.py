"""CheckpointManager: commit marker, pruning, config mismatches, and loading at another world size value for
value (1 rank in this process, 2 ranks through torchrun; see tests/workers/checkpoint_worker.py)."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "workers"))

import checkpoint_worker as worker  # noqa: E402
from model_helpers import VOCAB_SIZES  # noqa: E402
from script_helpers import run_under_torchrun  # noqa: E402

from dist_mtl import checkpoint as ckpt  # noqa: E402
from dist_mtl.checkpoint import CheckpointManager, CheckpointMismatchError  # noqa: E402
from dist_mtl.distributed import init_distributed, shutdown_distributed  # noqa: E402

WORKER = Path(__file__).parent / "workers" / "checkpoint_worker.py"
DP_FIELDS = {"101": "data_parallel", "205": "data_parallel"}  # data-parallel on 1 rank, table-wise on 2
DP_TABLES = ["model.item_ebc.embedding_bags.t_205.weight", "model.user_ebc.embedding_bags.t_101.weight"]


@pytest.fixture(scope="module")
def one_rank():
    ctx = init_distributed("cpu")
    yield ctx
    shutdown_distributed()


def torchrun(spec: dict, nproc: int) -> None:
    spec_path = Path(spec["out_dir"]) / f"{spec['tag']}-spec.json"
    spec_path.write_text(json.dumps(spec))
    run_under_torchrun(WORKER, nproc, [spec_path])


def load_dumps(out_dir: Path, name: str, world_size: int) -> list[dict]:
    return [torch.load(out_dir / f"{name}-rank{r}.pt", weights_only=False) for r in range(world_size)]


def assemble(dumps: list[dict], section: str) -> dict[str, torch.Tensor]:
    """Full tensors from every rank's local pieces; every element must be covered by some rank."""
    full: dict[str, torch.Tensor] = {}
    covered: dict[str, torch.Tensor] = {}
    for d in dumps:
        for key, entry in d["state"][section].items():
            for offsets, piece in entry["shards"]:
                if key not in full:
                    full[key] = torch.zeros(entry["size"], dtype=piece.dtype)
                    covered[key] = torch.zeros(entry["size"], dtype=torch.bool)
                where = tuple(slice(o, o + n) for o, n in zip(offsets, piece.shape))
                full[key][where] = piece
                covered[key][where] = True
    for key, mask in covered.items():
        assert bool(mask.all()), f"{section} {key}: no rank holds part of it"
    return full


def assert_equal_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(got) == sorted(expected), what
    for key in expected:
        assert torch.equal(got[key], expected[key]), f"{what}: {key} differs"


def assert_same_extra(got: dict, expected: dict) -> None:
    assert torch.equal(got["rng"], expected["rng"])
    assert {k: v for k, v in got.items() if k != "rng"} == {k: v for k, v in expected.items() if k != "rng"}


def test_world_size_changes_value_for_value_and_resume(tmp_path, one_rank):
    """1 rank (101, 205 data-parallel; the rest table-wise) -> 2 ranks (all table-wise) -> 1 rank."""
    ckpt1, ckpt2 = tmp_path / "ckpt1", tmp_path / "ckpt2"
    common = {"out_dir": str(tmp_path), "sharding_type": "table_wise"}
    worker.run_phase({**common, "tag": "one", "table_sharding": DP_FIELDS, "train_until": 3, "save_at": [3],
                      "ckpt_root": str(ckpt1)})
    assert CheckpointManager(ckpt1).latest() == ckpt1 / "step-00000003"
    torchrun({**common, "tag": "two", "load": str(ckpt1 / "step-00000003"), "train_until": 6, "save_at": [4],
              "ckpt_root": str(ckpt2), "reload": str(ckpt2 / "step-00000004")}, nproc=2)
    worker.run_phase({**common, "tag": "three", "table_sharding": DP_FIELDS, "load": str(ckpt2 / "step-00000004"),
                      "train_until": 4, "ckpt_root": str(tmp_path / "unused")})

    # 1 -> 2 ranks.
    saved = load_dumps(tmp_path, "one-save3", 1)
    loaded = load_dumps(tmp_path, "two-after_load", 2)
    assert_equal_tensors(assemble(loaded, "model"), assemble(saved, "model"), "tables and dense parameters")
    saved_optim = assemble(saved, "table_optim")
    assert sorted(k for k in saved_optim if k.endswith("/step")) == [f"{t}/step" for t in DP_TABLES]
    assert_equal_tensors(assemble(loaded, "table_optim"),
                         {k: v for k, v in saved_optim.items() if not k.endswith("/step")}, "row-wise momentum")
    assert all(bool(v.any()) for v in saved_optim.values())  # trained: zero accumulators would prove nothing
    assert_equal_tensors(assemble(loaded, "dense_optim"), assemble(saved, "dense_optim"), "Adam state")
    assert_same_extra(loaded[0]["extra"], saved[0]["extra"])
    report = loaded[0]["report"]
    assert (report["saved_world_size"], report["world_size"], report["step"]) == (1, 2, 3)
    assert report["optimizer_state_reset"] == []
    for task, p in saved[0]["predictions"].items():
        torch.testing.assert_close(loaded[1]["predictions"][task], p, rtol=0, atol=1e-6)

    # 2 -> 1 rank.
    saved = load_dumps(tmp_path, "two-save4", 2)
    loaded = load_dumps(tmp_path, "three-after_load", 1)
    assert_equal_tensors(assemble(loaded, "model"), assemble(saved, "model"), "tables and dense parameters")
    loaded_optim = assemble(loaded, "table_optim")
    for table in DP_TABLES:  # row-wise Adagrad's step counter, which the fused kernel does not keep
        assert loaded_optim.pop(f"{table}/step") == 4
    assert_equal_tensors(loaded_optim, assemble(saved, "table_optim"), "row-wise momentum")
    loaded_dense = assemble(loaded, "dense_optim")
    assert_equal_tensors(loaded_dense, assemble(saved, "dense_optim"), "Adam state")
    assert {k.rsplit("/", 1)[1] for k in loaded_dense} == {"step", "exp_avg", "exp_avg_sq"}
    assert_same_extra(loaded[0]["extra"], saved[0]["extra"])
    report = loaded[0]["report"]
    assert (report["saved_world_size"], report["world_size"], report["step"]) == (2, 1, 4)
    assert report["optimizer_state_reset"] == []
    for task, p in saved[0]["predictions"].items():
        torch.testing.assert_close(loaded[0]["predictions"][task], p, rtol=0, atol=1e-6)

    # Same world size: resuming from step 4 retraces the uninterrupted steps 4 and 5.
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["reloaded_step"] == 4
    assert len(two["losses"]) == 3 and two["losses"][1] != two["losses"][2]
    assert two["losses_after_reload"] == pytest.approx(two["losses"][1:], rel=1e-6, abs=0)


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory, one_rank):
    """A 1-rank, all table-wise checkpoint after 2 training steps."""
    root = tmp_path_factory.mktemp("saved")
    dmp, opt = worker.build(worker.job_config("table_wise", {}))
    worker.train(dmp, opt, 0, 2)
    return CheckpointManager(root).save(2, dmp, opt, worker.make_extra(2))


def expect_mismatch(path: Path, cfg, vocab_sizes=VOCAB_SIZES) -> str:
    dmp, opt = worker.build(cfg, vocab_sizes)
    with pytest.raises(CheckpointMismatchError) as err:
        CheckpointManager(path.parent).load(path, dmp, opt)
    return str(err.value)


def test_other_model_config_is_refused_naming_the_difference(saved_checkpoint):
    path = saved_checkpoint
    message = expect_mismatch(path, worker.job_config("table_wise", {}, ("model.tower_dims=[32,8]",)))
    assert "model.head.ctr_tower.body.0.weight of shape [32, 184] in the model is " in message
    assert "[16, 184] in the checkpoint" in message

    message = expect_mismatch(path, worker.job_config("table_wise", {}), {**VOCAB_SIZES, "205": 50})
    assert "table t_205 (model.item_ebc.embedding_bags.t_205.weight) of 50 rows x 8 dims in the model" in message
    assert "40 rows x 8 dims in the checkpoint" in message
    assert "t_101" not in message

    message = expect_mismatch(path, worker.job_config("table_wise", {}, ("model.head=mmoe",)))
    assert "the model has 32 entries which the checkpoint lacks: model.head.experts.0.0.bias, " in message
    assert "the checkpoint has 12 entries which the model lacks: model.head.ctr_tower.body.0.bias, " in message


def test_column_shard_count_change_restarts_only_that_tables_optimizer(tmp_path, one_rank):
    """t_205 at 256 dims: column-wise in 2 column shards (two row-wise accumulators per row), then table-wise."""
    wide = ("model.field_dims={\"205\" = 256}",)
    dmp, opt = worker.build(worker.job_config("table_wise", {"205": "column_wise"}, wide))
    worker.train(dmp, opt, 0, 2)
    path = CheckpointManager(tmp_path).save(2, dmp, opt, {"step": 2})
    t205 = "model.item_ebc.embedding_bags.t_205.weight"
    assert ckpt.read_tensor_shapes(path)[f"table_optim/{t205}/t_205.momentum1"] == (80,)

    dmp, opt = worker.build(worker.job_config("table_wise", {}, wide))
    with pytest.raises(CheckpointMismatchError, match=r"\['model\.item_ebc\.embedding_bags\.t_205\.weight'\]"):
        CheckpointManager(tmp_path).load(path, dmp, opt, strict_optimizer=True)
    manager = CheckpointManager(tmp_path)
    with pytest.warns(UserWarning, match="t_205"):
        manager.load(path, dmp, opt)
    assert manager.last_load.optimizer_state_reset == ["model.item_ebc.embedding_bags.t_205.weight"]
    momentum = dmp.fused_optimizer.state_dict()["state"]
    assert not bool(momentum[t205]["t_205.momentum1"].local_shards()[0].tensor.any())
    assert bool(momentum[t205.replace("205", "206")]["t_206.momentum1"].local_shards()[0].tensor.any())


def test_interrupted_save_is_ignored_and_old_checkpoints_pruned(tmp_path, one_rank, monkeypatch):
    dmp, opt = worker.build(worker.job_config("table_wise", {}))
    manager = CheckpointManager(tmp_path, keep=2)
    (tmp_path / "step-00000000").mkdir()  # an older save that died before DCP committed
    (tmp_path / "step-00000000" / "__0_0.distcp").write_bytes(b"partial")
    (tmp_path / "notes").mkdir()
    for step in (1, 2, 3):
        manager.save(step, dmp, opt, {"step": step})
    assert [p.name for p in manager.committed()] == ["step-00000002", "step-00000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "step-00000002", "step-00000003"]

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "replace", crash)  # dies after DCP wrote .metadata, before the side file
    with pytest.raises(OSError, match="disk full"):
        manager.save(4, dmp, opt, {"step": 4})
    monkeypatch.undo()
    assert (tmp_path / "step-00000004" / ".metadata").is_file()
    assert manager.latest() == tmp_path / "step-00000003"
    with pytest.raises(FileNotFoundError, match=r"missing extra\.pt"):
        manager.load(tmp_path / "step-00000004", dmp, opt)

    (tmp_path / "step-00000009").mkdir()  # newer than anything committed, side file but no .metadata
    (tmp_path / "step-00000009" / ckpt.SIDE_FILE).write_bytes(b"")
    assert manager.latest() == tmp_path / "step-00000003"

    manager.save(5, dmp, opt, {"step": 5})
    assert [p.name for p in manager.committed()] == ["step-00000003", "step-00000005"]
    assert not (tmp_path / "step-00000004").exists()  # interrupted and older than the newest: removed
    assert (tmp_path / "step-00000009").exists()  # newer: left for the resumed run to overwrite
    assert manager.load(manager.latest(), dmp, opt) == {"step": 5}


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep must be >= 1"):
        CheckpointManager(tmp_path, keep=0)
    assert CheckpointManager(tmp_path / "absent").latest() is None
