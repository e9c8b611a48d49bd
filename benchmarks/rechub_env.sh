#!/usr/bin/env bash
# Creates benchmarks/.venv-rechub: torch-rechub 0.9.0 (the tutorials' library) for the side-by-side
# benchmark (benchmarks/train_cpu_bench.py runs benchmarks/rechub_baseline.py in it). torch-rechub is
# never a dependency of dist_mtl; this venv is git-ignored (the `.venv*/` pattern).
#
#   bash benchmarks/rechub_env.sh
#   VENV=/path/to/venv PYTHON=python3.11 bash benchmarks/rechub_env.sh
#
# torch is installed first and alone, with the same pin as the project venv, so that pip resolves the
# CPU build; torch-rechub is then installed with torch pinned in the same command, so its requirement
# `torch` can never make pip fetch a different (CUDA, multi-GB) build.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${VENV:-$root/benchmarks/.venv-rechub}"
python="${PYTHON:-python3.11}"
torch_pin="torch==2.13.0"
rechub_pin="torch-rechub==0.9.0"

"$python" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip
$pip install -q "$torch_pin"
$pip install -q "$torch_pin" "$rechub_pin"
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import torch
import torch_rechub  # noqa: F401  (fails here, not in the benchmark, if the install is broken)

if torch.version.cuda is not None:
    raise SystemExit(f"torch {torch.__version__} is a CUDA build; the benchmark venv must hold the CPU build")
print(f"torch-rechub env ready: torch {torch.__version__}, torch-rechub {md.version('torch-rechub')}, "
      f"pandas {md.version('pandas')}, numpy {md.version('numpy')}")
PY
