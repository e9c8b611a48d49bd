"""Entry-point scripts (``launch/``, ``benchmarks/``) loaded as modules, for tests that call their functions,
and worker scripts run under torchrun."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]


def load_script(relative_path: str) -> ModuleType:
    """The script at ``relative_path`` (from the repository root), imported under a name of its own."""
    path = REPO / relative_path
    name = "script_" + path.with_suffix("").relative_to(REPO).as_posix().replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while a class is built
    spec.loader.exec_module(module)
    return module


def run_under_torchrun(script: str | os.PathLike, nproc: int, args: Sequence[str | os.PathLike],
                       timeout: int = 240) -> None:
    """Run ``script`` on ``nproc`` local processes (torchrun --standalone); fail the test with the tail of
    its standard error unless every process exits 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
