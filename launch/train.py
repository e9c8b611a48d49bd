"""Train a multi-task head (ESMM, MMOE, PLE or Shared-Bottom):
``torchrun --nproc_per_node=N launch/train.py --config configs/x.toml key=value ...``.

Also runs as a plain ``python launch/train.py`` (one process). Overrides use the config's dotted names,
e.g. ``model.head=mmoe data.batch_size=8192 'model.tower_dims=[16,8]'``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_mtl.config import ConfigError, JobConfig, load_config  # noqa: E402


def quiet_library_noise() -> None:
    """TorchRec, DDP and DCP log a screenful of notices per rank at start-up (deprecations, planner
    notes, a missing CPU autograd kernel for data-parallel tables whose gradients we test against an
    unsharded model); they would bury the progress bar and the sharding plan."""
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    for pattern in (".*autograd kernel was not registered.*", ".*Detected an existing checkpoint.*",
                    ".*TypedStorage is deprecated.*", ".*torch.cuda.amp.*"):
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    logging.getLogger("torchrec").setLevel(logging.ERROR)


def config_or_usage_error(parser: argparse.ArgumentParser, path: str | os.PathLike | None,
                          overrides: list[str]) -> JobConfig:
    """The job's config; a bad file, key or value is the script's usage error (exit 2 with its message)."""
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        parser.error(str(e))


def run_config_or_usage_error(parser: argparse.ArgumentParser, run_dir: Path, config: Path | None,
                              overrides: list[str]) -> JobConfig:
    """A run's resolved config, ``<run_dir>/config.toml`` unless ``config`` names another (export.py,
    evaluate.py), with ``overrides`` on top; a missing file is the script's usage error."""
    path = config or run_dir / "config.toml"
    if not path.is_file():
        parser.error(f"no config at {path}; pass --config")
    return config_or_usage_error(parser, path, overrides)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML config file (defaults apply where it is silent)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides (TOML values)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    cfg = config_or_usage_error(parser, args.config, args.overrides)
    if args.print_config:
        print(cfg.to_toml())
        return {}

    quiet_library_noise()
    from dist_mtl.distributed import init_distributed, shutdown_distributed
    from dist_mtl.trainer import INPUT_ERRORS, Trainer

    ctx = init_distributed(cfg.sharding.device)
    try:
        if ctx.is_main:
            print("resolved config:\n" + cfg.to_toml(), flush=True)
        return Trainer(cfg, ctx).train()
    except INPUT_ERRORS as e:
        # The message names what does not fit and its remedy; a traceback would only bury it.
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    finally:
        shutdown_distributed()


def exit_without_teardown(code: int) -> None:
    """Leave without running C++ static destructors.

    After a gloo job's work is done, interpreter teardown aborts now and then ("terminate called without
    an active exception": a library thread destroyed while joinable; about 1 run in 5 on 2 CPU ranks),
    which torchrun reports as a failed job. Nothing is left to write at that point.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_as_script(entry: Callable[[], object]) -> None:
    """Run a torchrun worker's main and leave through exit_without_teardown, keeping its exit status."""
    try:
        entry()
    except SystemExit as e:
        exit_without_teardown(e.code if isinstance(e.code, int) else 1)
    except BaseException:
        traceback.print_exc()
        exit_without_teardown(1)
    exit_without_teardown(0)


if __name__ == "__main__":
    run_as_script(main)
