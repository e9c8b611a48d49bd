"""A window of training steps recorded with ``torch.profiler``, on every rank (``[profile]`` in the config).

Where a step's time goes on a given machine (the towers' GEMMs, the tables' lookups and fused backward,
the all-to-alls, the reader) is the first question of anyone tuning a job, and a timed throughput alone
does not answer it. As torchtitan's ``profiling.py`` does, the trainer records a few steps after a
warm-up rather than a whole run: a trace of every step would be gigabytes, and the profiler's overhead
would slow the steps it measures.

``profile.steps = N`` records the N steps after the first ``profile.start_step`` of the run (the last of
those is the profiler's own warm-up step, whose events are dropped). Each rank writes to
``<run_dir>/profile/``:

- ``rank<r>.pt.trace.json.gz``: the Chrome trace of the window (Perfetto, ``chrome://tracing``;
  TensorBoard's profiler plugin reads the ``*.pt.trace.json.gz`` name), one ``ProfilerStep#`` range per
  step, CUDA kernels included on a GPU;
- ``rank<r>_operators.json``: ``operator_summary`` of the window, the operators with the most self host
  time per step (and on a GPU those with the most device time, with the device's busy time per step:
  host time against device time says which side bounds the step).

What runs between the window's steps is recorded with them: an evaluation or a checkpoint that falls
inside it shows in the trace and the operators. A run that ends inside the window writes what it
recorded, and says how many steps that was.

``peak_memory_mb`` is the other half of sizing a job: the process's peak resident memory and, on a GPU,
the device's peak allocated and reserved memory, which the trainer logs and reports per rank.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, schedule

from dist_mtl.config import ProfileConfig

__all__ = ["StepProfiler", "operator_summary", "peak_memory_by_rank", "peak_memory_mb"]

TOP_OPERATORS = 30


def operator_summary(averages, steps: int, top: int = TOP_OPERATORS, device: bool = False) -> dict:
    """``torch.profiler``'s ``key_averages()`` of ``steps`` steps as JSON-ready figures per step: the
    ``top`` operators by self host (CPU) time, and with ``device`` the device's busy time per step and the
    ``top`` operators by self device time."""
    events = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
    result = {
        "steps": steps,
        "self_cpu_ms_per_step": round(sum(e.self_cpu_time_total for e in events) / 1e3 / steps, 3),
        "operators": [{"name": e.key, "self_cpu_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3),
                       "calls_per_step": round(e.count / steps, 2)} for e in events[:top]],
    }
    if device:
        on_device = sorted(averages, key=lambda e: e.self_device_time_total, reverse=True)
        result["self_device_ms_per_step"] = round(
            sum(e.self_device_time_total for e in on_device) / 1e3 / steps, 3)
        result["device_operators"] = [
            {"name": e.key, "self_device_ms_per_step": round(e.self_device_time_total / 1e3 / steps, 3),
             "calls_per_step": round(e.count / steps, 2)} for e in on_device[:top] if e.self_device_time_total > 0]
    return result


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """This process's peak resident memory so far (``ru_maxrss``: the process alone, not its reader
    workers) and, on CUDA, ``device``'s peak allocated and reserved memory, in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"host_peak_rss_mb": rss / (2**20 if sys.platform == "darwin" else 2**10)}  # Linux: KiB; macOS: bytes
    if device.type == "cuda":
        out["device_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["device_peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
    return out


def peak_memory_by_rank(device: torch.device, world_size: int) -> dict[str, list[float]]:
    """Every rank's ``peak_memory_mb`` so far, by rank (collective: every rank calls it)."""
    mine = peak_memory_mb(device)
    local = torch.tensor(list(mine.values()), dtype=torch.float64, device=device)
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local)
    by_rank = torch.stack(gathered).cpu()
    return {k: [round(float(v), 1) for v in by_rank[:, i]] for i, k in enumerate(mine)}


class StepProfiler:
    """The trainer's profiler: a context around the training loop, ``step(global_step)`` after each step.
    With ``cfg.steps == 0`` it does nothing (and creates no folder)."""

    def __init__(self, cfg: ProfileConfig, out_dir: str | Path, rank: int, device: torch.device):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.rank = rank
        self.cuda = device.type == "cuda"
        self.steps_done = 0  # steps of this run so far
        self.global_steps: list[int] = []  # the recorded steps' numbers
        self.report: dict | None = None  # set once the window's files are written
        self._profile: profile | None = None

    @property
    def enabled(self) -> bool:
        return self.cfg.steps > 0

    def __enter__(self) -> "StepProfiler":
        if not self.enabled:
            return self
        self.out_dir.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        # One warm-up step (the profiler's setup costs land there and are dropped), then the window, once.
        window = schedule(skip_first=self.cfg.start_step - 1, wait=0, warmup=1, active=self.cfg.steps, repeat=1)
        self._profile = profile(activities=activities, schedule=window, on_trace_ready=self._write,
                                record_shapes=self.cfg.record_shapes, profile_memory=self.cfg.profile_memory,
                                with_stack=self.cfg.with_stack)
        self._profile.__enter__()
        return self

    def step(self, global_step: int) -> None:
        """After each training step; ``global_step`` is the step just trained, for the report."""
        if self._profile is None:
            return
        self.steps_done += 1
        if self.cfg.start_step < self.steps_done <= self.cfg.start_step + self.cfg.steps:
            self.global_steps.append(global_step)
        self._profile.step()

    def __exit__(self, *exc) -> None:
        if self._profile is not None:
            prof, self._profile = self._profile, None
            prof.__exit__(*exc)  # writes a window the run ended inside of

    def describe(self) -> str:
        """What the window recorded, with this rank's top operators; or why nothing was recorded."""
        report = self.report
        if report is None:
            return (f"profile: the run trained {self.steps_done} steps, not more than profile.start_step = "
                    f"{self.cfg.start_step}: nothing recorded")
        first, last = report["global_steps"]
        lines = [f"profile of steps {first}-{last} ({report['steps']} recorded on each rank) in {report['dir']}; "
                 f"rank {self.rank}'s operators by self CPU ms per step:"]
        lines += [f"  {op['self_cpu_ms_per_step']:9.3f}  {op['name']}" for op in report["operators"][:10]]
        return "\n".join(lines)

    def _write(self, prof: profile) -> None:
        recorded = len(self.global_steps)
        if recorded == 0:  # the run ended before the window began: nothing was recorded
            return
        trace = self.out_dir / f"rank{self.rank}.pt.trace.json.gz"
        prof.export_chrome_trace(str(trace))
        summary = operator_summary(prof.key_averages(), recorded, device=self.cuda)
        self.report = {"dir": str(self.out_dir), "trace": trace.name,
                       "global_steps": [self.global_steps[0], self.global_steps[-1]], **summary}
        (self.out_dir / f"rank{self.rank}_operators.json").write_text(json.dumps(self.report, indent=1))
