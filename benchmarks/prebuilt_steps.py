"""Training throughput with the reader taken out: a torchrun worker that times steps on batches held in memory.

    torchrun --standalone --nproc_per_node=2 benchmarks/prebuilt_steps.py --config configs/synthetic_cpu.toml \\
        --out /tmp/prebuilt.json --batches 16 --warmup 5 --steps 50 'data.path="data_out/x"' data.batch_size=4096

It takes the same ``--config`` and ``section.key=value`` overrides as ``launch/train.py`` and builds the
job with dist_mtl's own ``Trainer`` (model on the meta device, fused table optimizer, planner + DMP,
deterministic tables, dense optimizer, ``TrainPipelineSparseDist``), so the model, sharding plan and
step are those of the real job and only the data source differs: each rank first reads its first
``--batches`` batches with its train reader into memory, then trains ``--warmup`` steps and ``--steps``
timed steps cycling over them.

The figure is global: impressions trained by all ranks in the timed steps over the slowest rank's time
(ranks start timing together, after a barrier). Rank 0 writes it to ``--out`` as JSON. With
``--profile-steps N`` every rank then runs N more steps under torch.profiler, and rank 0 adds the
operators with the most self CPU time per step to the JSON (``profile``) and prints them: where a step's
time goes, e.g. what the history lists cost (RESULTS, User groups).

With ``--evaluate`` the steps are the evaluation's instead: batches of ``data.eval_batch_size`` from the
eval split's reader, the model in eval mode, and each step ``Trainer.eval_step`` (forward under no_grad,
then the metrics' update), as ``Trainer.evaluate`` runs them; the metrics are reset after every cycle over
the batches, so memory stays that of ``--batches`` batches.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch.train import quiet_library_noise, run_as_script  # noqa: E402

if TYPE_CHECKING:  # torch is imported where it is used, after the arguments are parsed
    import torch

RESULT_KEYS = ("samples_per_s", "timed_samples", "timed_seconds", "steps", "warmup_steps", "batches_in_memory",
               "world_size")


def timed_samples(batch_sizes: Sequence[int], warmup: int, steps: int) -> int:
    """Impressions one rank trains in the timed steps when cycling over batches of ``batch_sizes``.

    Step ``i`` trains batch ``i mod K`` (the pipeline trains batches in the order it fetches them), and
    the timed steps are ``warmup .. warmup + steps - 1``.
    """
    if not batch_sizes:
        raise ValueError("no batches to cycle over")
    if warmup < 0 or steps < 1:
        raise ValueError(f"need warmup >= 0 and steps >= 1, got warmup={warmup} steps={steps}")
    k = len(batch_sizes)
    full_cycles, rest = divmod(steps, k)
    start = warmup % k
    tail = [batch_sizes[(start + i) % k] for i in range(rest)]
    return full_cycles * sum(batch_sizes) + sum(tail)


def profile_steps(step, steps: int, top: int = 20, cuda: bool = False) -> dict:
    """Run ``steps`` more steps under torch.profiler: ``dist_mtl.profiling.operator_summary`` of them (the
    ``top`` operators by self CPU time per step, and with ``cuda`` the GPU's busy time and operators). Kept
    apart from the timed steps: the profiler's own overhead would slow them."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from dist_mtl.profiling import operator_summary

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    return operator_summary(prof.key_averages(), steps, top, device=cuda)


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it measures the work, not its launch."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML config file, as launch/train.py")
    parser.add_argument("--out", required=True, help="result JSON (written by rank 0)")
    parser.add_argument("--batches", type=int, default=16, help="batches per rank read into memory first")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones")
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="after the timed steps, run this many more under torch.profiler and report the "
                             "operators with the most self CPU time (rank 0's; the timed figure is unaffected)")
    parser.add_argument("--evaluate", action="store_true",
                        help="time evaluation steps (eval split, eval batch size, no backward) instead of training")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides (TOML values)")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.warmup < 0 or args.steps < 1 or args.profile_steps < 0:
        parser.error(f"need --batches >= 1, --warmup >= 0, --steps >= 1, --profile-steps >= 0 (got {args.batches}, "
                     f"{args.warmup}, {args.steps}, {args.profile_steps})")

    from dist_mtl.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        parser.error(str(e))

    quiet_library_noise()
    import torch
    import torch.distributed as dist

    from dist_mtl.data.schema import write_text_atomic
    from dist_mtl.distributed import init_distributed, shutdown_distributed
    from dist_mtl.trainer import Trainer

    ctx = init_distributed(cfg.sharding.device)
    try:
        trainer = Trainer(cfg, ctx)
        split = cfg.data.eval_split if args.evaluate else cfg.data.train_split
        reader = trainer.eval_readers[split] if args.evaluate else trainer.train_reader
        batches = list(itertools.islice(iter(reader), args.batches))
        if not batches:
            raise RuntimeError(f"rank {ctx.rank}: the {split} split of {cfg.data.path} gave no batch")
        sizes = [b.num_impressions for b in batches]
        users = [b.num_users for b in batches]
        source = itertools.cycle(batches)

        if args.evaluate:
            scored = itertools.count(1)

            def step() -> dict:
                if next(scored) % len(batches) == 0:
                    trainer.metrics.reset()  # the scores of one cycle, not of every step
                return trainer.eval_step(next(source))
        elif trainer.pipeline is not None:
            trainer.model.train()
            trainer.pipeline.attach(trainer.model)

            def step() -> dict:
                task_losses, _ = trainer.pipeline.progress(source)
                return task_losses
        else:
            def step() -> dict:
                return trainer.train_step(next(source))

        # Evaluation steps run as Trainer.evaluate runs them: in its eval mode (the plain forward).
        with trainer.eval_mode() if args.evaluate else contextlib.nullcontext():
            for _ in range(args.warmup):
                step()
            _synchronize(ctx.device)
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                task_losses = step()
            _synchronize(ctx.device)
            seconds = time.perf_counter() - start
            losses = {k: float(v) for k, v in task_losses.items()}
            bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
            if bad:
                raise RuntimeError(f"rank {ctx.rank}: non-finite task losses after the timed steps: {bad}")

            profile = (profile_steps(step, args.profile_steps, cuda=ctx.device.type == "cuda")
                       if args.profile_steps else None)

        totals = torch.tensor([timed_samples(sizes, args.warmup, args.steps)], dtype=torch.int64)
        slowest = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(totals)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        result = {
            "samples_per_s": int(totals) / float(slowest),
            "timed_samples": int(totals),
            "timed_seconds": float(slowest),
            "steps": args.steps,
            "warmup_steps": args.warmup,
            "batches_in_memory": len(batches),
            "world_size": ctx.world_size,
            "mode": "evaluate" if args.evaluate else "train",
            "split": split,
            "pipeline": trainer.pipeline is not None and not args.evaluate,
            "rank0_mean_impressions_per_batch": sum(sizes) / len(sizes),
            "rank0_mean_users_per_batch": sum(users) / len(users),
            "torch_threads": torch.get_num_threads(),
            "last_task_losses": losses,
            "model_config": cfg.to_dict()["model"],
        }
        if profile is not None:
            result["profile"] = profile
        if ctx.is_main:
            write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
            ranks = f"{ctx.world_size} rank{'s' if ctx.world_size > 1 else ''}"
            print(f"prebuilt {result['mode']} steps: {result['samples_per_s']:,.0f} samples/s ({ranks}, "
                  f"{args.steps} timed steps over {len(batches)} batches in memory)", flush=True)
            if profile is not None:
                print(f"rank 0's operators by self CPU time over {args.profile_steps} profiled steps (ms per step):",
                      flush=True)
                for op in profile["operators"]:
                    print(f"  {op['self_cpu_ms_per_step']:8.2f}  {op['calls_per_step']:6.1f} calls  {op['name']}",
                          flush=True)
                if "device_operators" in profile:
                    print(f"the GPU: {profile['self_device_ms_per_step']:.2f} ms busy per step; operators by self "
                          f"device time (ms per step):", flush=True)
                    for op in profile["device_operators"]:
                        print(f"  {op['self_device_ms_per_step']:8.2f}  {op['calls_per_step']:6.1f} calls  "
                              f"{op['name']}", flush=True)
        trainer.logger.close()
        return result
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    run_as_script(main)
