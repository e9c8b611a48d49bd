"""The heads alone in float32 and bfloat16: forward + backward of ESMM's two towers on one batch.

    .venv/bin/python benchmarks/head_precision_bench.py

A batch as the reader builds it for ESMM with weight features (batch 4096 impressions of 75 users; user
rows of 212 columns, item rows of 164), on ``--threads`` threads, for each tower size: the time of one
forward and backward (the Adam step is not included: it does not depend on the precision), the median of
``--repeats`` timings of ``--steps`` steps each. This isolates what ``model.head_precision`` changes;
the end-to-end effect, reader and tables included, is in ``grouping_bench.py --head-precision``.
Writes ``benchmarks/results/head_precision.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from common import REPO, command_line, library_versions, write_result  # noqa: E402
from dist_mtl.models.esmm import ESMMHead  # noqa: E402
from dist_mtl.models.layers import GroupedRows  # noqa: E402

TOWERS = {"small": [16, 8], "preset": [64, 32], "paper": [360, 200, 80]}


def step_ms(head: ESMMHead, rows: GroupedRows, steps: int, repeats: int) -> float:
    def step() -> None:
        out = head(rows)
        (out.logits["ctr"].sum() + out.predictions["ctcvr"].sum()).backward()

    for _ in range(3):
        step()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        timings.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(timings)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--users", type=int, default=75)
    parser.add_argument("--user-columns", type=int, default=212)
    parser.add_argument("--item-columns", type=int, default=164)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "head_precision.json"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    user_index = torch.sort(torch.randint(0, args.users, (args.batch_size,))).values
    rows = GroupedRows(torch.randn(args.users, args.user_columns, requires_grad=True),
                       torch.randn(args.batch_size, args.item_columns, requires_grad=True), user_index)
    entries = []
    for name, dims in TOWERS.items():
        head = ESMMHead(args.user_columns + args.item_columns, dims)
        ms = {}
        for precision in ("float32", "bfloat16"):
            head.bfloat16 = precision == "bfloat16"
            ms[precision] = step_ms(head, rows, args.steps, args.repeats)
        entries.append({"towers": dims, "float32_ms": ms["float32"], "bfloat16_ms": ms["bfloat16"],
                        "speedup": ms["float32"] / ms["bfloat16"]})
        print(f"towers {dims}: float32 {ms['float32']:.1f} ms, bfloat16 {ms['bfloat16']:.1f} ms "
              f"({ms['float32'] / ms['bfloat16']:.2f}x)", flush=True)
    cpu_flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
        cpu_flags = " ".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags.split())
    payload = {"batch_size": args.batch_size, "users": args.users, "user_columns": args.user_columns,
               "item_columns": args.item_columns, "threads": args.threads,
               "cpu_bfloat16_flags": cpu_flags or "none", "entries": entries}
    return write_result(args.out, "head_precision", command_line(__file__, argv if argv is not None else sys.argv[1:]),
                        payload, library_versions(["torch"]))


if __name__ == "__main__":
    main()
