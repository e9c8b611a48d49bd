"""Under torchrun: build the trainer of a config that sets checkpoint.init_from, load it as a run starts,
and export the live model (``init_from_worker.py OUT_DIR override...``), so that a test can compare the
loaded tables and layers, whole, with the checkpoint's at the world size that wrote it."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dist_mtl.config import load_config  # noqa: E402
from dist_mtl.distributed import shutdown_distributed  # noqa: E402
from dist_mtl.export import export_model  # noqa: E402
from dist_mtl.trainer import Trainer  # noqa: E402
from launch.train import run_as_script  # noqa: E402


def main() -> None:
    out_dir, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg)
    assert trainer._resume() == (0, 0)
    assert trainer.initialized_from is not None and trainer.initialized_from["world_size"] == 1
    export_model(out_dir, cfg, dmp=trainer.model)  # collective: every rank sends its shards to rank 0
    shutdown_distributed()


if __name__ == "__main__":
    # Leaves like launch/train.py, past the gloo teardown abort its exit_without_teardown describes.
    run_as_script(main)
