#!/usr/bin/env bash
# Creates .venv in the repo root with the CPU stack dist_mtl is tested on.
#
#   bash launch/setup_env.sh            # torch 2.13.0 / fbgemm-gpu-cpu 1.8.0 / torchrec 1.8.0 (default)
#   bash launch/setup_env.sh 1.6        # torch 2.11.0 / fbgemm-gpu-cpu 1.6.0 / torchrec 1.6.1 (the GPU box's versions)
#   bash launch/setup_env.sh cuda       # torch 2.11.0 (CUDA 13 build) / fbgemm-gpu 1.6.0 (CUDA) / torchrec 1.6.1: GPU hosts
#   VENV=/path/to/venv bash launch/setup_env.sh
#
# torchrec is installed with --no-deps: its metadata requires the multi-GB CUDA `fbgemm-gpu`,
# which must never be downloaded here; fbgemm-gpu-cpu provides the same torch.ops.fbgemm.
set -euo pipefail
stack="${1:-1.8}"
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${VENV:-$root/.venv}"
python="${PYTHON:-python3.11}"

case "$stack" in
  1.8) torch_pin="torch==2.13.0"; fbgemm_pin="fbgemm-gpu-cpu==1.8.0"; torchrec_pin="torchrec==1.8.0" ;;
  1.6) torch_pin="torch==2.11.0"; fbgemm_pin="fbgemm-gpu-cpu==1.6.0"; torchrec_pin="torchrec==1.6.1" ;;
  # The registry's torch 2.11.0 is the CUDA 13 build; fbgemm-gpu 1.6.0 is linked against libcudart.so.13.
  cuda) torch_pin="torch==2.11.0"; fbgemm_pin="fbgemm-gpu==1.6.0"; torchrec_pin="torchrec==1.6.1" ;;
  *) echo "unknown stack '$stack' (expected 1.8, 1.6 or cuda)" >&2; exit 2 ;;
esac

"$python" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip
# torch first and alone, so nothing later can pull a different (CUDA) build.
$pip install -q "$torch_pin"
$pip install -q "$fbgemm_pin"
$pip install -q --no-deps "$torchrec_pin"
# torchrec's runtime needs, pinned so that nothing upgrades torch. torchrec pins torchmetrics==1.0.3
# in its metadata; with --no-deps a recent one imports, and 1.9.0 is what the GPU machine carries.
$pip install -q "$torch_pin" tensordict==0.10.0 torchmetrics==1.9.0 tqdm pyre-extensions iopath \
  "pyarrow>=16" tensorboard numpy pytest scikit-learn matplotlib
$pip install -q --no-deps -e "$root"
"$venv/bin/python" - <<'PY'
import torch, torchrec, fbgemm_gpu, pyarrow
print(f"dist_mtl env ready: torch {torch.__version__}, torchrec {torchrec.__version__}, "
      f"fbgemm_gpu {fbgemm_gpu.__version__}, pyarrow {pyarrow.__version__}")
PY
