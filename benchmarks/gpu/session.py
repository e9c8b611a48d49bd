"""The whole GPU session in one job: bring-up, checks, tests and the first figures, within a time budget.

On the GPU test machine (no network, one job at a time, 64 MiB carried; ``../shared/GPU.md``), with the
bundle of ``benchmarks/gpu/build_bundle.py`` carried as ``.gpu``:

    python3 benchmarks/gpu/session.py --out "$OUT"

It unpacks fbgemm-gpu and installs the small wheels the machine lacks into a site folder, then runs the
steps below in order, each a subprocess with its own timeout, its log in ``logs/<step>.log`` and its
figures beside it (under ``--work``/out); ``session.json`` records every step's status and seconds. After
each step all of it is delivered to ``$OUT`` as ``session.tar.gz`` beside a copy of ``session.json`` (the
device tool brings back at most 8 files), so a job stopped at its limit still returns what had finished.
A step whose prerequisite failed, or that no longer fits in ``--budget-s``, is skipped and says why; the
steps are ordered so that the bring-up checks come first and each later one adds a figure.

  bringup     unpack the bundle into --site, install the missing small wheels
  env         import torch, fbgemm_gpu, torchrec; the device, driver and versions (env.json)
  tbe         one fused TBE forward/backward checked against torch, then Ali-CCP-sized tables timed (tbe.json)
  cuda_tests  tests/test_cuda.py (cuda_tests.xml)
  data        a synthetic Ali-CCP set with a planted truth (launch/generate.py --format parquet)
  train       launch/train.py, 1 rank, the CPU preset on this device: samples/s with the reader, AUCs
              next to the oracle's (train_summary.json), and 10 of its steps profiled (train_profile.json:
              host and device ms per step, operators; train_trace.json.gz: the Chrome trace)
  model_step  benchmarks/prebuilt_steps.py: the training step without the reader, preset towers, batch
              4096, 10 more steps profiled for the host's time against the GPU's busy time
              (prebuilt_4096.json), then the paper's towers in bfloat16 at batch 16384 (prebuilt_paper.json)
  reader      benchmarks/reader_bench.py --dataset: the reader per worker count (reader.json)
  suite       the whole test suite, with what time is left (suite.xml)

Without a GPU, ``--allow-cpu`` runs the same steps on the CPU (the CUDA tests then skip): the rehearsal
that checks the bundle and this script before a GPU session is spent on them (README, GPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]

# The small wheels' import names; the session installs a wheel only where its module cannot already be
# imported, so the machine's own (newer) packaging or typing_extensions are never shadowed.
WHEEL_MODULES = {
    "torchrec": "torchrec", "tensordict": "tensordict", "pyvers": "pyvers", "iopath": "iopath",
    "portalocker": "portalocker", "orjson": "orjson", "cloudpickle": "cloudpickle",
    "importlib_metadata": "importlib_metadata", "zipp": "zipp", "typing_extensions": "typing_extensions",
    "packaging": "packaging",
}

# The accuracy benchmark's world (benchmarks/accuracy_bench.py): Ali-CCP's shape with 10% clicks and 10%
# purchases after a click, so that 500k test rows give AUCs steady enough to compare devices.
GENERATOR_WORLD = ("--click-rate", "0.10", "--buy-rate-after-click", "0.10")

ENV_PROBE = r"""
import json, os, platform, subprocess, sys
import torch, fbgemm_gpu, torchrec, tensordict, pyarrow, torchmetrics
info = {
    "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
    "fbgemm_gpu": fbgemm_gpu.__version__, "torchrec": torchrec.__version__, "tensordict": tensordict.__version__,
    "pyarrow": pyarrow.__version__, "torchmetrics": torchmetrics.__version__, "cpus": os.cpu_count(),
    "cuda_available": torch.cuda.is_available(),
}
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(device=props.name, capability=f"{props.major}.{props.minor}", devices=torch.cuda.device_count(),
                memory_gib=round(props.total_memory / 2**30, 1))
try:
    info["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.TimeoutExpired) as e:
    info["nvidia_smi"] = f"unavailable: {e}"
with open(sys.argv[1], "w") as f:
    json.dump(info, f, indent=2)
print(json.dumps(info))
"""


@dataclass
class Session:
    """Where a session reads and writes, and the environment its subprocesses run in."""

    out: Path
    work: Path
    site: Path | None
    bundle: Path
    python: str
    device: str
    budget_s: float
    train_impressions: int
    test_impressions: int
    deliver: Path | None = None
    """The device tool's $OUT: what the session writes to ``out`` comes back through it as two files,
    rewritten after each step (``deliver``)."""
    started: float = field(default_factory=time.monotonic)

    def env(self) -> dict[str, str]:
        paths = [str(self.site)] if self.site else []
        paths += [str(REPO), os.environ.get("PYTHONPATH", "")]
        return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "PYTHONUNBUFFERED": "1"}

    def remaining_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)


@dataclass
class Step:
    """One step: a subprocess (``argv``) or an in-process call (``call``), then an optional reading of
    the figures it wrote (``collect``)."""

    name: str
    timeout_s: float
    argv: Callable[[Session], list[list[str]]] | None = None
    call: Callable[[Session, Path], dict] | None = None
    collect: Callable[[Session], dict] | None = None
    needs: tuple[str, ...] = ()
    fresh: tuple[str, ...] = ()
    """Folders under the work folder removed before the step: a rerun on a warm machine must not resume
    the previous run's checkpoints or write over its dataset."""


def run_commands(commands: list[list[str]], session: Session, log: Path, timeout_s: float) -> tuple[str, int]:
    """Run the commands one after another into ``log``; (status, exit code of the last one run)."""
    deadline = time.monotonic() + timeout_s
    with log.open("a") as f:
        for argv in commands:
            f.write(f"$ {' '.join(argv)}\n")
            f.flush()
            # A session of its own, so that a timeout kills torchrun's workers and DataLoader workers too.
            proc = subprocess.Popen(argv, cwd=REPO, env=session.env(), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                f.write(f"\n[session] killed after the step's {timeout_s:.0f} s\n")
                return "timeout", -9
            if rc != 0:
                return "failed", rc
    return "ok", 0


def run_steps(steps: list[Step], session: Session, min_step_s: float = 10.0) -> dict:
    """Run ``steps`` in order within the session's budget; returns (and keeps writing) session.json."""
    logs = session.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    report = {"device": session.device, "budget_s": session.budget_s, "steps": {}}
    for step in steps:
        failed_needs = [n for n in step.needs if report["steps"].get(n, {}).get("status") != "ok"]
        remaining = session.remaining_s()
        entry: dict = {}
        if failed_needs:
            entry = {"status": "skipped", "why": f"needs {', '.join(failed_needs)}"}
        elif remaining < min_step_s:
            entry = {"status": "skipped", "why": f"budget: {remaining:.0f} s left"}
        else:
            timeout = min(step.timeout_s, remaining)
            log = logs / f"{step.name}.log"
            start = time.monotonic()
            try:
                for name in step.fresh:
                    shutil.rmtree(session.work / name, ignore_errors=True)
                if step.call is not None:
                    entry = {"status": "ok", **step.call(session, log)}
                else:
                    status, rc = run_commands(step.argv(session), session, log, timeout)
                    entry = {"status": status, "rc": rc}
                if entry["status"] == "ok" and step.collect is not None:
                    entry.update(step.collect(session))
            except Exception as e:  # a step's own error is that step's failure, not the session's
                entry = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
                with log.open("a") as f:
                    f.write(f"[session] {entry['error']}\n")
            entry["seconds"] = round(time.monotonic() - start, 1)
        report["steps"][step.name] = entry
        report["elapsed_s"] = round(time.monotonic() - session.started, 1)
        (session.out / "session.json").write_text(json.dumps(report, indent=2) + "\n")
        if session.deliver is not None:
            deliver(session.out, session.deliver)
        print(f"[{step.name}] {entry['status']}" + (f" ({entry['why']})" if "why" in entry else "")
              + (f" in {entry['seconds']} s" if "seconds" in entry else "")
              + (f": {entry['summary']}" if "summary" in entry else ""), flush=True)
        log = logs / f"{step.name}.log"
        if entry["status"] in ("failed", "timeout") and log.is_file():
            tail = log.read_text(errors="replace").splitlines()[-40:]
            print("\n".join(f"    {line}" for line in tail), flush=True)
    return report


# The device tool brings back at most 8 files of at most 16 MiB from $OUT (/work/.library/device/README.md),
# while a session writes a figure file per step, a log per step and a trace: they travel as one archive.
DELIVER_MAX_BYTES = 15 << 20


def deliver(out: Path, to: Path, max_bytes: int = DELIVER_MAX_BYTES) -> list[str]:
    """Everything under ``out`` as ``to/session.tar.gz``, beside a copy of ``out/session.json`` (the
    figures at a glance), each replaced whole so that a job stopped mid-write still returns the previous
    pair. Files that would take the archive past ``max_bytes`` (counted uncompressed, the largest left
    out first: the traces) stay out, and ``to/left_out.txt`` names them; returns their names."""
    files = sorted((p for p in out.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    kept, total = [], 0
    for path in files:
        size = path.stat().st_size
        if total + size > max_bytes:
            break
        kept.append(path)
        total += size
    left_out = [str(p.relative_to(out)) for p in files[len(kept):]]
    to.mkdir(parents=True, exist_ok=True)
    staged = to / ".session.tar.gz.partial"
    with tarfile.open(staged, "w:gz") as tar:
        for path in kept:
            tar.add(path, arcname=str(path.relative_to(out)))
    staged.replace(to / "session.tar.gz")
    if (out / "session.json").is_file():
        shutil.copy(out / "session.json", to / ".session.json.partial")
        (to / ".session.json.partial").replace(to / "session.json")
    if left_out:
        (to / "left_out.txt").write_text("".join(f"{name}\n" for name in left_out))
    else:
        (to / "left_out.txt").unlink(missing_ok=True)
    return left_out


def wheels_to_install(wheels: list[Path], importable: Callable[[str], bool]) -> list[Path]:
    """The bundle's small wheels whose modules this interpreter cannot import yet."""
    chosen = []
    for wheel in wheels:
        dist = wheel.name.split("-", 1)[0].lower()
        module = WHEEL_MODULES.get(dist)
        if module is None:
            raise ValueError(f"{wheel.name}: not a wheel the bundle is known to carry ({sorted(WHEEL_MODULES)})")
        if not importable(module):
            chosen.append(wheel)
    return chosen


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def bring_up(session: Session, log: Path, importable: Callable[[str], bool] = _importable) -> dict:
    """Unpack the slimmed fbgemm-gpu and install the small wheels the machine lacks into the site folder.
    A site folder already unpacked from the same bundle (a warm machine's rerun) is kept."""
    if session.site is None:
        return {"summary": "no site folder: using the interpreter's own packages"}
    manifest = json.loads((session.bundle / "manifest.json").read_text())
    stamp = session.site / ".dist_mtl_bundle.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == manifest:
        return {"summary": f"{session.site} already holds this bundle"}
    if session.site.exists():
        shutil.rmtree(session.site)
    session.site.mkdir(parents=True)
    start = time.monotonic()
    with tarfile.open(session.bundle / "fbgemm_gpu.tar.xz") as tar:
        tar.extractall(session.site, filter="data")
    unpack_s = time.monotonic() - start
    wheels = wheels_to_install(sorted((session.bundle / "wheels").glob("*.whl")), importable)
    if wheels:
        with log.open("a") as f:
            subprocess.run([session.python, "-m", "pip", "install", "--no-index", "--no-deps", "--target",
                            str(session.site), *map(str, wheels)], check=True, stdout=f, stderr=subprocess.STDOUT)
    stamp.write_text(json.dumps(manifest))
    names = [w.name.split("-", 1)[0] for w in wheels]
    return {"unpack_s": round(unpack_s, 1), "installed": names,
            "summary": f"fbgemm-gpu unpacked in {unpack_s:.0f} s; installed {', '.join(names) or 'nothing'}"}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _collect_env(s: Session) -> dict:
    info = _json(s.out / "env.json")
    return {"summary": f"{info.get('device', 'no CUDA device')}, torch {info['torch']}, "
                       f"fbgemm_gpu {info['fbgemm_gpu']}, torchrec {info['torchrec']}, {info['cpus']} CPUs"}


def _collect_tbe(s: Session) -> dict:
    r = _json(s.out / "tbe.json")
    c, t = r["correctness"], r["timing"]
    return {"summary": f"forward error {c['forward_max_abs_error']:.1e}, update error {c['update_max_abs_error']:.1e}; "
                       f"{t['ms_per_step']} ms per step of {t['ids_per_step']:,} ids"}


def _collect_train(s: Session) -> dict:
    run = s.work / "run_train"
    shutil.copy(run / "summary.json", s.out / "train_summary.json")
    summary = _json(s.out / "train_summary.json")
    aucs = {k: v for k, v in summary["metrics"].items() if k.endswith("/auc")}
    text = (f"{summary['train_samples_per_s']:,.0f} samples/s with the reader "
            f"({summary['config']['data']['num_workers']} workers); "
            + ", ".join(f"{k} {v:.4f}" for k, v in sorted(aucs.items())))
    profile = summary.get("profile")
    if profile:  # the job's profile window, the reader included: its operators and its trace come back
        shutil.copy(run / "profile" / "rank0_operators.json", s.out / "train_profile.json")
        shutil.copy(run / "profile" / profile["trace"], s.out / "train_trace.json.gz")
        text += (f"; steps {profile['global_steps'][0]}-{profile['global_steps'][1]} profiled: host "
                 f"{profile['self_cpu_ms_per_step']} ms/step")
        if "self_device_ms_per_step" in profile:
            text += f", device {profile['self_device_ms_per_step']} ms/step"
    return {"summary": text}


def _junit(path: Path) -> dict:
    """pytest's counts from its JUnit XML."""
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "summary": f"{passed} passed, {counts['skipped']} skipped, {counts['failures']} failed, "
                                 f"{counts['errors']} errors"}


def _collect_prebuilt(s: Session) -> dict:
    parts = []
    for name in ("prebuilt_4096", "prebuilt_paper"):
        path = s.out / f"{name}.json"
        if path.is_file():
            result = _json(path)
            parts.append(f"{name} {result['samples_per_s']:,.0f} samples/s")
            profile = result.get("profile") or {}
            if "self_cpu_ms_per_step" in profile:
                gpu = (f", GPU busy {profile['self_device_ms_per_step']:.2f}"
                       if "self_device_ms_per_step" in profile else "")
                parts[-1] += f" (profiled: host {profile['self_cpu_ms_per_step']:.2f} ms per step{gpu})"
    return {"summary": "; ".join(parts)}


def _collect_reader(s: Session) -> dict:
    runs = _json(s.out / "reader.json")["reader"]
    return {"summary": "; ".join(f"{r['num_workers']} workers {r['impressions_per_s']:,}/s" for r in runs)}


def train_workers(shm: str = "/dev/shm", need_bytes: int = 1 << 30) -> int:
    """Reader workers for the training step: 2, unless /dev/shm (where their batches travel) has less than
    a GiB free, as in a container left at Docker's 64 MB; then the reader runs in the training process
    rather than the step dying of a bus error."""
    try:
        return 2 if shutil.disk_usage(shm).free >= need_bytes else 0
    except OSError:
        return 0


def default_steps(python: str) -> list[Step]:
    run = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]

    def dataset(s: Session) -> str:
        return f'data.path="{s.work / "synth"}"'

    def train(s: Session) -> list[list[str]]:
        return [[*run, "launch/train.py", "--config", "configs/synthetic_cpu.toml", dataset(s),
                 f'run_dir="{s.work / "run_train"}"', f'sharding.device="{s.device}"', "train.epochs=1",
                 "train.progress_bar=false", "data.batch_size=4096", f"data.num_workers={train_workers()}",
                 # 10 steps of the job profiled, the reader included (train_profile.json, train_trace.json.gz)
                 "profile.steps=10"]]

    def prebuilt(s: Session) -> list[list[str]]:
        def command(name: str, options: tuple[str, ...], *settings: str) -> list[str]:
            # prebuilt_steps.py takes its options first and the config overrides last
            return [*run, "benchmarks/prebuilt_steps.py", "--config", "configs/synthetic_cpu.toml", "--batches", "16",
                    "--warmup", "10", "--steps", "100", "--out", str(s.out / f"{name}.json"), *options, dataset(s),
                    f'sharding.device="{s.device}"', *settings]

        # The first also profiles 10 steps: the host's time per step against the GPU's busy time.
        return [command("prebuilt_4096", ("--profile-steps", "10"), "data.batch_size=4096"),
                command("prebuilt_paper", (), "data.batch_size=16384", "model.tower_dims=[360,200,80]",
                        'model.head_precision="bfloat16"')]

    return [
        Step("bringup", 120, call=bring_up),
        Step("env", 60, argv=lambda s: [[python, "-c", ENV_PROBE, str(s.out / "env.json")]], collect=_collect_env,
             needs=("bringup",)),
        Step("tbe", 90, argv=lambda s: [[python, "benchmarks/gpu/tbe_check.py", "--device", s.device,
                                         "--out", str(s.out / "tbe.json")]], collect=_collect_tbe, needs=("env",)),
        Step("cuda_tests", 180, argv=lambda s: [[python, "-m", "pytest", "tests/test_cuda.py", "-q", "-rfEs",
                                                 "-p", "no:cacheprovider", f"--junitxml={s.out / 'cuda_tests.xml'}"]],
             collect=lambda s: _junit(s.out / "cuda_tests.xml"), needs=("env",)),
        Step("data", 150, argv=lambda s: [[python, "launch/generate.py", "--out", str(s.work / "synth"),
                                           "--format", "parquet", "--train-impressions", str(s.train_impressions),
                                           "--test-impressions", str(s.test_impressions), *GENERATOR_WORLD]],
             needs=("env",), fresh=("synth",)),
        Step("train", 180, argv=train, collect=_collect_train, needs=("data",), fresh=("run_train",)),
        Step("model_step", 200, argv=prebuilt, collect=_collect_prebuilt, needs=("data",)),
        Step("reader", 120, argv=lambda s: [[python, "benchmarks/reader_bench.py", "--dataset", str(s.work / "synth"),
                                             "--workers", "0", "1", "2", "4", "--repeats", "1",
                                             "--out", str(s.out / "reader.json")]],
             collect=_collect_reader, needs=("data",)),
        Step("suite", 600, argv=lambda s: [[python, "-m", "pytest", "tests", "-q", "-rfEs", "-p", "no:cacheprovider",
                                            f"--junitxml={s.out / 'suite.xml'}"]],
             collect=lambda s: _junit(s.out / "suite.xml"), needs=("env",)),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where figures and logs go ($OUT on the device)")
    parser.add_argument("--bundle", type=Path, default=REPO / ".gpu", help="build_bundle.py's output")
    parser.add_argument("--site", type=Path, default=Path("/tmp/dist_mtl_gpu_site"),
                        help="where the bundle is unpacked; --no-bundle uses the interpreter's own packages")
    parser.add_argument("--no-bundle", action="store_true", help="torchrec and fbgemm-gpu are installed already")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dist_mtl_gpu_work"), help="data and run folders")
    # 300 s: the device tool lends 15 minutes a task, machine start included, and a rerun must still fit.
    parser.add_argument("--budget-s", type=float, default=300.0, help="the whole session's time")
    parser.add_argument("--only", default="", help="comma-separated step names to run (default: all)")
    parser.add_argument("--allow-cpu", action="store_true", help="rehearse on the CPU when there is no GPU")
    parser.add_argument("--train-impressions", type=int, default=2_000_000)
    parser.add_argument("--test-impressions", type=int, default=500_000)
    args = parser.parse_args(argv)

    if not args.no_bundle and not (args.bundle / "manifest.json").is_file():
        parser.error(f"{args.bundle}: no bundle (run benchmarks/gpu/build_bundle.py and carry .gpu)")
    import torch  # the machine's own torch; only to choose the device

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.allow_cpu:
        parser.error("CUDA is not available here; pass --allow-cpu to rehearse the session on the CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    # The figures and logs are written under the work folder and delivered to --out as an archive.
    figures = args.work / "out"
    shutil.rmtree(figures, ignore_errors=True)  # a rerun on a warm machine delivers its own files only
    figures.mkdir()
    session = Session(out=figures, work=args.work, site=None if args.no_bundle else args.site, bundle=args.bundle,
                      python=sys.executable, device=device, budget_s=args.budget_s,
                      train_impressions=args.train_impressions, test_impressions=args.test_impressions,
                      deliver=args.out)
    steps = default_steps(sys.executable)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s.name for s in steps}
        if unknown:
            parser.error(f"unknown steps {sorted(unknown)}; known: {[s.name for s in steps]}")
        steps = [s for s in steps if s.name in wanted]
        for s in steps:  # a step asked for alone runs on what an earlier call left
            s.needs = tuple(n for n in s.needs if n in wanted)
    report = run_steps(steps, session)
    failed = [n for n, e in report["steps"].items() if e["status"] in ("failed", "timeout")]
    print(f"session: {len(report['steps'])} steps in {report['elapsed_s']} s on {device}; "
          + (f"failed: {', '.join(failed)}" if failed else "none failed")
          + f"; figures and logs in {figures}, delivered as {args.out / 'session.tar.gz'} and session.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
