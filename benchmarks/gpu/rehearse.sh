#!/usr/bin/env bash
# Rehearse the GPU session on this CPU machine before spending device time on it:
#
#   bash benchmarks/gpu/rehearse.sh [OUT]          # default OUT: /tmp/dist_mtl_gpu_rehearsal
#
# Builds a Python 3.12 virtualenv with what the GPU machine has (../shared/GPU.md: torch 2.11.0, pyarrow,
# torchmetrics 1.9.0, tensorboard, tqdm, pyre-extensions, numpy, pytest; no torchrec, no fbgemm-gpu, no
# scikit-learn), then runs benchmarks/gpu/session.py --allow-cpu in it with the bundle of .gpu/
# (benchmarks/gpu/build_bundle.py), so the bring-up unpacks and imports the same slimmed CUDA fbgemm-gpu
# and every step runs as it will there, on the CPU. The CUDA build of fbgemm-gpu links the driver's NVML
# (libnvidia-ml.so.1), which a machine without a GPU lacks: a stub whose functions all fail is compiled
# from the symbols the libraries import (fbgemm calls NVML only to read NVLink topology).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${1:-/tmp/dist_mtl_gpu_rehearsal}"
venv="${VENV:-$root/.venv-gpu-rehearsal}"
python="${PYTHON:-python3.12}"
[ -f "$root/.gpu/manifest.json" ] || { echo "no bundle: run python3 benchmarks/gpu/build_bundle.py first" >&2; exit 2; }

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q torch==2.11.0
  "$venv/bin/python" -m pip install -q torch==2.11.0 "pyarrow>=16" torchmetrics==1.9.0 tensorboard tqdm \
    pyre-extensions numpy pytest
fi

stub="$venv/nvml_stub"
if [ ! -f "$stub/libnvidia-ml.so.1" ]; then
  mkdir -p "$stub/unpacked"
  tar -xJf "$root/.gpu/fbgemm_gpu.tar.xz" -C "$stub/unpacked" --wildcards 'fbgemm_gpu/*.so'
  {
    echo '/* CPU rehearsal only: every NVML call fails with NVML_ERROR_DRIVER_NOT_LOADED (9). */'
    nm -D --undefined-only "$stub"/unpacked/fbgemm_gpu/*.so | grep -o 'nvml[A-Za-z0-9_]*' | sort -u |
      sed 's/.*/int &(void) { return 9; }/'
  } > "$stub/nvml_stub.c"
  gcc -shared -fPIC -o "$stub/libnvidia-ml.so.1" "$stub/nvml_stub.c"
  rm -rf "$stub/unpacked"
fi

cd "$root"
LD_LIBRARY_PATH="$stub${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$venv/bin/python" benchmarks/gpu/session.py \
  --out "$out" --site "$out/site" --work "$out/work" --allow-cpu --budget-s "${BUDGET_S:-1200}"
