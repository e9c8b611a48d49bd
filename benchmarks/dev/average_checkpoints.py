"""Dev diagnostic (#9): an export whose weights are the mean of several checkpoints of one run.

    .venv/bin/python benchmarks/dev/average_checkpoints.py --run-dir RUN --out EXPORT step-00005164 step-00010328

Loads each named checkpoint of ``RUN/checkpoints`` into the unsharded model (as ``launch/export.py`` does),
averages every floating-point entry of the state dicts (tables, towers, factors) with equal weights and
writes an export directory, which ``launch/predict.py`` scores. The question it answers: is the CVR gap
left by the tables' last steps (iterate noise, which averaging along the trajectory removes) or by what
they learn? Writing goes through ``dist_mtl.export._write_export`` because the product has no "export
these weights" entry point: an export is always of one checkpoint or one live model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dist_mtl.checkpoint import MODEL_PREFIX, CheckpointManager, load_unsharded, read_tensor_shapes  # noqa: E402
from dist_mtl.config import load_config  # noqa: E402
from dist_mtl.export import (TRAIN_STEP_PREFIX, _write_export, build_unsharded_model,  # noqa: E402
                             vocab_sizes_from_shapes)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="export directory to write")
    parser.add_argument("steps", nargs="+", help="checkpoint folders of RUN/checkpoints (step-NNNNNNNN)")
    args = parser.parse_args(argv)
    cfg = load_config(args.run_dir / "config.toml", [])
    manager = CheckpointManager(args.run_dir / "checkpoints", keep=None)
    committed = {p.name: p for p in manager.committed()}
    total: dict[str, torch.Tensor] = {}
    model = vocab = None
    for name in args.steps:
        if name not in committed:
            parser.error(f"{args.run_dir / 'checkpoints'} has no committed checkpoint {name} "
                         f"(it has {sorted(committed)})")
        vocab = vocab_sizes_from_shapes(read_tensor_shapes(committed[name]), MODEL_PREFIX + TRAIN_STEP_PREFIX)
        model = build_unsharded_model(cfg, vocab)
        load_unsharded(committed[name], model, TRAIN_STEP_PREFIX)
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                total[key] = total.get(key, 0) + value.double() / len(args.steps)
        print(f"loaded {committed[name]}", flush=True)
    state = model.state_dict()
    model.load_state_dict({k: total[k].to(v.dtype) if k in total else v for k, v in state.items()})
    out = _write_export(args.out, model, cfg, vocab, {"averaged_checkpoints": [str(committed[s]) for s in args.steps]})
    print(f"wrote {out}", flush=True)
    return out


if __name__ == "__main__":
    main()
