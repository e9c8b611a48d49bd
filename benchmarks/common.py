"""Helpers shared by the benchmark scripts: result records, machine facts, measured subprocesses.

Standard library only, so that scripts running in other environments (``rechub_baseline.py`` in the
torch-rechub venv) write the same record as those in the project venv.

Every result JSON carries ``name``, ``date`` (UTC), ``command`` (the command line that reproduces it),
``versions`` of the libraries involved, ``machine`` (cores, CPU model, memory) and ``peak_rss_mb``.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]


class BenchmarkError(RuntimeError):
    """A benchmark step failed; the message names the step and where its output is."""


def library_versions(distributions: Sequence[str]) -> dict[str, str | None]:
    """Installed version of each distribution (None where it is not installed), plus python's."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in distributions:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """Cores (all and usable by this process), CPU model, memory, OS."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "hostname": platform.node(),
    }
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gb"] = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        info["memory_gb"] = None
    return info


def _maxrss_mb(ru_maxrss: int) -> float:
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    return round(ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10), 1)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return _maxrss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def command_line(script: str | os.PathLike, argv: Sequence[str], python: str | None = None) -> str:
    """The shell command that reruns ``script`` with ``argv``; paths inside the repo are made relative
    to it (the command is meant to be run from the repo root)."""
    return shlex.join([_repo_relative(python or sys.executable), _repo_relative(script), *argv])


def _repo_relative(path: str | os.PathLike) -> str:
    # Not resolved: a venv's python is a symlink, and the link (the venv) is what reruns the command.
    p = Path(os.path.abspath(path))
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


def torchrun_command(script: str | os.PathLike, world_size: int, args: Sequence[str]) -> list[str]:
    """A single-node torchrun of ``script`` on ``world_size`` processes with this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
            str(script), *args]


def rows_of_ids(ids: np.ndarray, wanted: np.ndarray, order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``wanted``, its row in ``ids`` (distinct, in any order; ``order`` is ``np.argsort(ids)``
    where the caller keeps it), and whether it is there at all (an absent id's row is any row)."""
    if order is None:
        order = np.argsort(ids)
    at = np.searchsorted(ids, wanted, sorter=order)
    rows = order[np.minimum(at, len(order) - 1)]
    return rows, ids[rows] == wanted


def write_result(path: str | os.PathLike, name: str, command: str, payload: Mapping,
                 versions: Mapping[str, str | None]) -> dict:
    """Write a result record (tmp + rename, so a reader never sees half a file) and return it.

    Its ``peak_rss_mb`` is the writing process's own peak: a script whose work runs in subprocesses (the
    training jobs of train_cpu, grouping, sweep, accuracy, full_scale) records theirs in ``payload``
    (``peak_rss_mb_largest_process`` and ``peak_rss_all_processes_mb`` from ``run_logged``)."""
    record = {
        "name": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "versions": dict(versions),
        "machine": machine_info(),
        "peak_rss_mb": peak_rss_mb(),
        **payload,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return record


@dataclass(frozen=True)
class MeasuredRun:
    """A finished subprocess: wall seconds and the peak RSS of its largest process (itself or any
    descendant it waited for, e.g. torchrun's workers); ``peak_rss_all_mb``: the peak of the summed RSS of
    it and all its descendants at once (sampled every ``TREE_RSS_INTERVAL_S``, so a spike shorter than
    that can be missed; None where /proc is missing)."""

    seconds: float
    peak_rss_mb: float
    log: Path
    peak_rss_all_mb: float | None = None


TREE_RSS_INTERVAL_S = 0.5


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after "pid (comm) ": state, ppid, ... (comm may hold spaces and parentheses)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2:].split()


def _tree_pids(root: int) -> list[int] | None:
    """``root`` and its descendants, walked through /proc/<pid>/task/<tid>/children, so that a sample
    reads the tree's processes only, not every process of the host (a benchmark sampling a few times a
    second beside its timed loop would otherwise pay for all of them). None where the kernel has no
    ``children`` files (CONFIG_PROC_CHILDREN off)."""
    pids, stack = [], [root]
    while stack:
        pid = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # the process ended while being read
        pids.append(pid)
        for tid in tasks:
            path = Path(f"/proc/{pid}/task/{tid}/children")
            try:
                stack.extend(int(child) for child in path.read_text().split())
            except FileNotFoundError:
                if not Path(f"/proc/{pid}/task/{tid}").exists():
                    continue  # the thread ended while being read
                return None
            except OSError:
                continue
    return pids


def _tree_rss_bytes(root: int) -> int | None:
    """The summed resident set of process ``root`` and its descendants now (Linux /proc; None elsewhere)."""
    if not Path("/proc").is_dir():
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    pids = _tree_pids(root)
    if pids is not None:
        total = 0
        for pid in pids:
            try:
                total += int(_stat_fields(pid)[21]) * page
            except (OSError, ValueError, IndexError):
                continue  # the process ended while being read
        return total
    # Without the children files: every process's parent, from every process's stat.
    parent, rss = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry.name))
            parent[int(entry.name)] = int(fields[1])
            rss[int(entry.name)] = int(fields[21]) * page
        except (OSError, ValueError, IndexError):
            continue  # the process ended while being read
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


class TreeRssSampler:
    """Samples the summed RSS of a process tree in a background thread until stopped (``stop()`` returns
    the peak in MB). Pages shared between the processes count once per process that maps them."""

    def __init__(self, root: int, interval_s: float = TREE_RSS_INTERVAL_S):
        self.root, self.peak, self._stop = root, None, threading.Event()
        self.interval_s = interval_s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = _tree_rss_bytes(self.root)
            if now is not None:
                self.peak = now if self.peak is None else max(self.peak, now)
            self._stop.wait(self.interval_s)

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return None if self.peak is None else round(self.peak / 2**20, 1)


def run_logged(cmd: Sequence[str], log: str | os.PathLike, what: str, cwd: str | os.PathLike | None = None,
               env: Mapping[str, str] | None = None) -> MeasuredRun:
    """Run ``cmd`` with stdout and stderr into ``log``; raise BenchmarkError naming ``what``, the exit
    status and the log's last lines if it fails."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "wb") as out:
        out.write(f"$ {shlex.join(map(str, cmd))}\n".encode())
        out.flush()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                env=None if env is None else dict(env))
        sampler = TreeRssSampler(proc.pid)
        try:
            # wait4 rather than Popen.wait: it also returns the child's resource usage.
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            sampler.stop()
            # SIGTERM first: torchrun forwards it to its workers, a SIGKILL would orphan them.
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        peak_all = sampler.stop()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise BenchmarkError(
            f"{what} failed with exit status {proc.returncode} after {seconds:.0f}s; last lines of {log}:\n"
            + log_tail(log)
        )
    return MeasuredRun(seconds=seconds, peak_rss_mb=_maxrss_mb(usage.ru_maxrss), log=log, peak_rss_all_mb=peak_all)


def read_json_record(path: str | os.PathLike, required: Sequence[str], kind: str, producer: str) -> dict:
    """A JSON file another process wrote (``kind``, e.g. "summary"), checked for the keys the caller reads."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise BenchmarkError(f"{path}: no such file; {producer} wrote no {kind}") from e
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{path}: not JSON ({e})") from e
    missing = [k for k in required if k not in record]
    if missing:
        raise BenchmarkError(f"{path}: {kind} lacks {missing}")
    return record


def log_tail(log: str | os.PathLike, lines: int = 30) -> str:
    """The last ``lines`` lines of a log, progress-bar carriage returns folded away."""
    text = Path(log).read_bytes()[-200_000:].decode(errors="replace")
    kept = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join(kept[-lines:])
