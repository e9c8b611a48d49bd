"""The sharding plan a job would get on a cluster that is not at hand, computed on this machine.

    python launch/plan.py --config configs/esmm_paper_gpu.toml --world-size 8
    python launch/plan.py --config configs/esmm_paper_gpu.toml --world-size 16 --local-world-size 8 \\
        'data.path="data_out/aliccp/parquet"' data.batch_size=8192

It builds the job's model from the config and the dataset's metadata (vocabularies and each feature's ids
per batch, as the trainer does), runs TorchRec's planner for a topology of ``--world-size`` ranks,
``--local-world-size`` per node, on ``--device`` (default: the config's, "auto" meaning cuda) with
``--hbm-gib`` of memory per GPU, and prints the plan and the bytes of tables and table optimizer state
each rank would hold. No process group, no GPU: the job plans the same way on its ranks at start-up.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.train import config_or_usage_error, quiet_library_noise  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML config file, as launch/train.py")
    parser.add_argument("--world-size", type=int, required=True, help="ranks of the job")
    parser.add_argument("--local-world-size", type=int, default=None,
                        help="ranks per node (default: the world size up to 8)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: the config's sharding.device, 'auto' meaning cuda")
    parser.add_argument("--hbm-gib", type=float, default=80.0, help="memory per GPU (80: H100)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides (TOML values)")
    args = parser.parse_args(argv)
    cfg = config_or_usage_error(parser, args.config, args.overrides)
    local = args.local_world_size or min(args.world_size, 8)
    if args.world_size < 1 or not 1 <= local <= args.world_size or args.world_size % local:
        parser.error(f"--world-size {args.world_size} must be a positive multiple of --local-world-size {local}")
    device = args.device or ("cpu" if cfg.sharding.device == "cpu" else "cuda")

    quiet_library_noise()
    from dist_mtl.data.reader import feature_loads
    from dist_mtl.data.schema import DatasetMetadata
    from dist_mtl.distributed import plan_for_topology, table_bytes_per_rank, topology_for
    from dist_mtl.trainer import build_train_step

    metadata = DatasetMetadata.load(cfg.data.path)
    step = build_train_step(cfg, metadata)
    loads = feature_loads(cfg.data.path, cfg.data.train_split, cfg.data.batch_size, cfg.data.grouped, metadata)
    hbm = int(args.hbm_gib * 2**30) if device == "cuda" else None
    topology = topology_for(args.world_size, local, device, hbm)
    plan = plan_for_topology(step, cfg.sharding, cfg.optimizer, cfg.data.batch_size, topology, loads)
    per_rank = table_bytes_per_rank(plan, step, cfg.optimizer.sparse, args.world_size)

    print(f"{args.world_size} ranks ({args.world_size // local} node(s) of {local}) on {device}, "
          f"batch {cfg.data.batch_size} per rank, data {cfg.data.path}")
    print(f"sharding plan:\n{plan}")
    print("tables and table optimizer state per rank (float32): "
          + ", ".join(f"{r}: {b / 2**20:,.1f} MiB" for r, b in enumerate(per_rank)))
    types = dict(Counter(sharding.sharding_type for module_plan in plan.plan.values()
                         for sharding in module_plan.values()))
    print("tables per sharding type: " + ", ".join(f"{k} {v}" for k, v in sorted(types.items())))
    return {"plan": plan, "bytes_per_rank": per_rank, "sharding_types": types}


if __name__ == "__main__":
    main()
