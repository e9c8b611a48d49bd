"""PNG plots of the benchmark results (throughput sweep, accuracy learning curve).

matplotlib is imported inside the functions, on the Agg canvas without pyplot: no display is needed, no
global figure state is left behind, and scripts that never plot do not need matplotlib at all.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

MODEL_COLORS = {"esmm": "tab:blue", "mmoe": "tab:orange", "shared_bottom": "tab:green"}
READER_LINESTYLES = {"included": "-", "excluded": "--"}
WORLD_MARKERS = ("o", "s", "^", "D", "v", "P")


@dataclass(frozen=True)
class SweepPoint:
    """One throughput measurement: global samples/s of a model at a per-rank batch size."""

    model: str
    world_size: int
    reader: str  # "included" (the real job) or "excluded" (steps on batches held in memory)
    batch_size_per_rank: int
    samples_per_s: float


@dataclass(frozen=True)
class AccuracyPoint:
    """One task's test AUC of a model trained on ``train_impressions``, and the oracle AUC on that test set."""

    model: str
    task: str
    train_impressions: int
    auc: float | None  # None where the AUC is undefined (one class only)
    oracle_auc: float | None


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, format="png", bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plot_sweep(points: Sequence[SweepPoint], path: str | os.PathLike, title: str) -> Path:
    """Samples/s against per-rank batch size (log x): a line per model x world size x reader mode.

    Colour is the model, line style the reader mode (solid: reader included, dashed: excluded), marker
    the world size.
    """
    if not points:
        raise ValueError("plot_sweep: no points to plot")
    unknown = sorted({p.reader for p in points} - set(READER_LINESTYLES))
    if unknown:
        raise ValueError(f"plot_sweep: unknown reader modes {unknown} (expected {sorted(READER_LINESTYLES)})")
    from matplotlib.ticker import StrMethodFormatter

    worlds = sorted({p.world_size for p in points})
    fig = _new_figure(8.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    lines: dict[tuple[str, int, str], list[SweepPoint]] = {}
    for p in points:
        lines.setdefault((p.model, p.world_size, p.reader), []).append(p)
    for (model, world, reader), line in sorted(lines.items()):
        line.sort(key=lambda p: p.batch_size_per_rank)
        ax.plot(
            [p.batch_size_per_rank for p in line],
            [p.samples_per_s for p in line],
            color=MODEL_COLORS.get(model, "tab:gray"),
            linestyle=READER_LINESTYLES[reader],
            marker=WORLD_MARKERS[worlds.index(world) % len(WORLD_MARKERS)],
            label=f"{model.upper()}, {world} rank{'s' if world > 1 else ''}, reader {reader}",
        )
    ax.set_xscale("log", base=2)
    batch_sizes = sorted({p.batch_size_per_rank for p in points})
    ax.set_xticks(batch_sizes)
    ax.set_xticklabels([f"{b:,}" for b in batch_sizes])
    ax.set_xlabel("batch size per rank (impressions)")
    ax.set_ylabel("training samples/s (all ranks)")
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.set_ylim(bottom=0)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_accuracy(points: Sequence[AccuracyPoint], path: str | os.PathLike, title: str) -> Path:
    """Test AUC against train impressions (log x): a panel per task, a line per model, the oracle dashed."""
    if not points:
        raise ValueError("plot_accuracy: no points to plot")
    tasks = list(dict.fromkeys(p.task for p in points))
    fig = _new_figure(4.2 * len(tasks), 4.2)
    sizes = sorted({p.train_impressions for p in points})
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        of_task = [p for p in points if p.task == task]
        for model in dict.fromkeys(p.model for p in of_task):
            line = sorted((p for p in of_task if p.model == model and _finite(p.auc)),
                          key=lambda p: p.train_impressions)
            if line:
                ax.plot([p.train_impressions for p in line], [p.auc for p in line], marker="o",
                        color=MODEL_COLORS.get(model, "tab:gray"), label=model.upper())
        # The oracle depends on the test set only; one value per size (equal when the test set is shared).
        oracle: dict[int, float] = {}
        for p in of_task:
            if _finite(p.oracle_auc):
                oracle.setdefault(p.train_impressions, float(p.oracle_auc))
        if oracle:
            xs = sorted(oracle)
            ax.plot(xs, [oracle[x] for x in xs], color="black", linestyle="--", marker="", label="oracle")
        ax.set_xscale("log")
        ax.set_xticks(sizes)
        ax.set_xticklabels([_short_count(s) for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("train impressions")
        ax.set_ylabel("test AUC")
        ax.set_title(task.upper() + (" (clicked impressions)" if task == "cvr" else ""), fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.subplots_adjust(wspace=0.3)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _short_count(n: int) -> str:
    """500000 -> '500k', 2000000 -> '2M', 2500000 -> '2.5M'."""
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size:
            return f"{n / size:g}{unit}"
    return str(n)
