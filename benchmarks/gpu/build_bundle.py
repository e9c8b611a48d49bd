"""Build the bundle that carries TorchRec and a slimmed fbgemm-gpu to the GPU test machine in one job.

    python3 benchmarks/gpu/build_bundle.py                 # -> .gpu/ (git-ignored), ~3 minutes
    python3 benchmarks/gpu/build_bundle.py --keep-all-libraries   # if a dropped kernel is missed on the GPU

The GPU machine (``../shared/GPU.md``) has Python 3.12 and torch 2.11.0+cu130 but no TorchRec, no
fbgemm-gpu and no network, and a job carries at most 64 MiB. The fbgemm-gpu 1.6.0 wheel is 465 MB, so this
script, on a machine that reaches the registry:

1. downloads the cp312 manylinux wheels of fbgemm-gpu 1.6.0 (CUDA), torchrec 1.6.1 and the small runtime
   dependencies of torchrec, tensordict and iopath;
2. unpacks fbgemm-gpu and keeps only one arch's device code in its fat binaries (``slim_fatbin.py`` of
   ``../shared/gpu``, sm_90 for H100/H200), and drops all device code from the libraries whose kernels a
   training job does not launch (``UNUSED_DEVICE_CODE``);
3. writes ``fbgemm_gpu.tar.xz`` (the slimmed package and its dist-info, to be unpacked into a site folder),
   the small wheels and ``manifest.json`` (versions, arch, sizes, what was dropped) to ``--out``.

``benchmarks/gpu/session.py`` unpacks it on the GPU machine. The bundle plus the repository's tracked files
must stay under the job's 64 MiB; the script says by how much they do, and fails if they do not.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import lzma
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

JOB_LIMIT_BYTES = 64 * 2**20
FBGEMM = "fbgemm-gpu==1.6.0"
# torchrec and the runtime needs of torchrec, tensordict and iopath that the GPU machine may lack; the
# session installs only those it cannot already import. Pinned to the versions CI's stack 1.6 runs.
SMALL_WHEELS = (
    "torchrec==1.6.1", "tensordict==0.10.0", "pyvers==0.1.0", "portalocker==4.4.2",
    "orjson==3.13.0", "cloudpickle==3.1.3", "importlib_metadata==10.2.0", "zipp==4.1.2",
    "typing_extensions==4.16.0", "packaging==25.0",
)
# Pure-Python packages published as source only: built into wheels here (py3-none-any).
SOURCE_ONLY = ("iopath==0.1.10",)
# fbgemm_gpu's libraries whose kernels a training job never launches: quantized inference, the
# variable-batch-per-feature (VBE) backward (the grouped batches have one stride per KJT) and global weight
# decay. Their device code is dropped entirely. GPU.md also drops the dense backward
# (``..._backward_dense.so``), but that library holds ``split_embedding_backward_codegen_dense_weighted_exact_cuda``,
# the backward of fbgemm's DenseTableBatchedEmbeddingBagsCodegen, which TorchRec runs for data_parallel
# tables (the planner replicates the smallest tables on several GPUs; tests/test_cuda.py forces it), so
# it stays.
UNUSED_DEVICE_CODE = (
    "fbgemm_gpu_tbe_inference.so", "fbgemm_gpu_tbe_training_backward_vbe.so",
    "fbgemm_gpu_tbe_training_backward_gwd.so",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def download(requirements: list[str], dest: Path, python_version: str) -> list[Path]:
    """pip download of exactly these pins for the target interpreter and platform, no dependencies."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           python_version, "--implementation", "cp", "-d", str(dest), "-q"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + requirements, check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dest), *SOURCE_ONLY],
                   check=True)
    return sorted(dest.glob("*.whl"))


def load_slim_tool(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the fat-binary slimming tool of ../shared/gpu (pass --slim-tool)")
    spec = importlib.util.spec_from_file_location("slim_fatbin", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def slim_package(site: Path, slim_tool, keep_sm: int, drop: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """Slim every shared library under ``site/fbgemm_gpu``; returns bytes of device code kept and dropped."""
    report = {}
    for lib in sorted((site / "fbgemm_gpu").rglob("*.so")):
        keep = 0 if lib.name in drop else keep_sm
        kept, dropped = slim_tool.slim(str(lib), keep)
        report[lib.relative_to(site).as_posix()] = {"kept": kept, "dropped": dropped, "keep_sm": keep}
    missing = [name for name in drop if not any(Path(k).name == name for k in report)]
    if missing:  # a renamed library would silently keep its device code and overflow the job
        raise FileNotFoundError(f"libraries to drop not in the wheel: {missing}")
    return report


def tracked_bytes(repo: Path) -> int:
    files = subprocess.run(["git", "-C", str(repo), "ls-files", "-z"], check=True, capture_output=True).stdout
    return sum((repo / f).stat().st_size for f in files.decode().split("\0") if f and (repo / f).is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / ".gpu", help="bundle folder (git-ignored)")
    parser.add_argument("--keep-sm", type=int, default=90, help="the arch whose device code stays (90: H100/H200)")
    parser.add_argument("--keep-all-libraries", action="store_true",
                        help="keep sm_XX device code in every library, UNUSED_DEVICE_CODE's too")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    parser.add_argument("--slim-tool", type=Path, default=REPO.parent / "shared" / "gpu" / "slim_fatbin.py")
    parser.add_argument("--wheels", type=Path, default=None,
                        help="folder that already holds the downloaded wheels (skips the download)")
    args = parser.parse_args(argv)

    slim_tool = load_slim_tool(args.slim_tool)
    drop = () if args.keep_all_libraries else UNUSED_DEVICE_CODE
    started = time.monotonic()
    if args.out.exists():
        shutil.rmtree(args.out)
    (args.out / "wheels").mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="dist_mtl_bundle_") as tmp:
        tmp = Path(tmp)
        wheels = args.wheels or tmp / "wheels"
        if args.wheels is None:
            wheels.mkdir()
            print(f"downloading {FBGEMM} and {len(SMALL_WHEELS) + len(SOURCE_ONLY)} small wheels "
                  f"for cp{args.python_version}", flush=True)
            download([FBGEMM, *SMALL_WHEELS], wheels, args.python_version)
        fbgemm_wheel = next(iter(sorted(wheels.glob("fbgemm_gpu-*.whl"))), None)
        if fbgemm_wheel is None:
            raise FileNotFoundError(f"no fbgemm_gpu wheel in {wheels}")
        small = [w for w in sorted(wheels.glob("*.whl")) if w != fbgemm_wheel]
        expected = len(SMALL_WHEELS) + len(SOURCE_ONLY)
        if len(small) != expected:
            raise RuntimeError(f"expected {expected} small wheels in {wheels}, found {[w.name for w in small]}")
        for wheel in small:
            shutil.copy2(wheel, args.out / "wheels" / wheel.name)

        site = tmp / "site"
        print(f"unpacking {fbgemm_wheel.name} ({fbgemm_wheel.stat().st_size / 1e6:.0f} MB)", flush=True)
        with zipfile.ZipFile(fbgemm_wheel) as zf:
            zf.extractall(site)
        unpacked = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
        print(f"slimming to sm_{args.keep_sm}" + (f", no device code in {len(drop)} libraries" if drop else ""),
              flush=True)
        slimmed = slim_package(site, slim_tool, args.keep_sm, drop)
        # xz at its strongest setting: the emptied device code is long runs of zeros, and the job's limit is
        # on compressed bytes, so the compression level is worth its minute here.
        print("compressing (xz -9e)", flush=True)
        with tarfile.open(args.out / "fbgemm_gpu.tar.xz", "w:xz", preset=9 | lzma.PRESET_EXTREME) as tar:
            for entry in sorted(site.iterdir()):
                tar.add(entry, arcname=entry.name)

    bundle = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    repo_bytes = tracked_bytes(REPO)
    manifest = {
        "fbgemm_wheel": fbgemm_wheel.name,
        "small_wheels": [w.name for w in small],
        "python_version": args.python_version,
        "keep_sm": args.keep_sm,
        "device_code_dropped_from": list(drop),
        "unpacked_bytes": unpacked,
        "device_code_kept_bytes": sum(r["kept"] for r in slimmed.values()),
        "device_code_dropped_bytes": sum(r["dropped"] for r in slimmed.values()),
        "bundle_bytes": bundle,
        "repo_tracked_bytes": repo_bytes,
        "job_limit_bytes": JOB_LIMIT_BYTES,
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = bundle + repo_bytes
    print(f"bundle {bundle / 2**20:.1f} MiB + tracked files {repo_bytes / 2**20:.1f} MiB = {total / 2**20:.1f} MiB "
          f"of the job's {JOB_LIMIT_BYTES / 2**20:.0f} MiB; built in {manifest['build_seconds']:.0f} s -> {args.out}")
    if total > JOB_LIMIT_BYTES:
        print("too large for one job: drop device code from more libraries, or carry less of the tree",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
