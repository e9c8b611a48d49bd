"""Dev probe: ESMM's heads alone, eager vs ``torch.compile(dynamic=True)``, float32 and bfloat16.

    .venv/bin/python benchmarks/dev/compile_heads.py

Forward and backward of ESMM's two towers as ``benchmarks/head_precision_bench.py`` times them (4096
impressions, 212 user and 164 item columns, 2 threads), cycling over four batches of 66-80 users, as the
reader's batches differ in their user count (so a compiled head must not specialise on it). Prints the
median ms per step of each and the compile's wall time (first calls included). Not a product option: on
this CPU the compiled heads were no faster (benchmarks/RESULTS.md, Heads in bfloat16).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dist_mtl.models.esmm import ESMMHead  # noqa: E402
from dist_mtl.models.layers import GroupedRows  # noqa: E402

BATCH, USER_COLUMNS, ITEM_COLUMNS = 4096, 212, 164


def rows_of(users: int) -> GroupedRows:
    user_index = torch.sort(torch.cat([torch.arange(users), torch.randint(0, users, (BATCH - users,))])).values
    return GroupedRows(torch.randn(users, USER_COLUMNS, requires_grad=True),
                       torch.randn(BATCH, ITEM_COLUMNS, requires_grad=True), user_index)


def step_ms(heads: dict[str, object], batches: list[GroupedRows], steps: int = 20, repeats: int = 7
            ) -> tuple[dict[str, float], dict[str, float]]:
    """Median ms per step of each head, the heads taking turns repeat by repeat (this VM's speed drifts
    by more than the difference measured); and each head's warm-up seconds (a compiled head compiles)."""
    def step(head, rows: GroupedRows) -> None:
        out = head(rows)
        (out.logits["ctr"].sum() + out.predictions["ctcvr"].sum()).backward()

    first = {}
    for name, head in heads.items():
        start = time.perf_counter()
        for rows in batches:
            step(head, rows)
        first[name] = time.perf_counter() - start
    timings = {name: [] for name in heads}
    for _ in range(repeats):
        for name, head in heads.items():
            start = time.perf_counter()
            for i in range(steps):
                step(head, batches[i % len(batches)])
            timings[name].append((time.perf_counter() - start) / steps * 1e3)
    return {name: statistics.median(t) for name, t in timings.items()}, first


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    batches = [rows_of(u) for u in (75, 71, 80, 66)]
    for dims in ([64, 32], [360, 200, 80]):
        for bfloat16 in (False, True):
            head = ESMMHead(USER_COLUMNS + ITEM_COLUMNS, dims)
            head.bfloat16 = bfloat16
            ms, first = step_ms({"eager": head, "compiled": torch.compile(head, dynamic=True)}, batches)
            print(f"towers {dims} {'bfloat16' if bfloat16 else 'float32'}: eager {ms['eager']:.2f} ms, compiled "
                  f"{ms['compiled']:.2f} ms ({ms['eager'] / ms['compiled']:.2f}x; compiling and the first steps "
                  f"{first['compiled']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
