"""Export a trained model for serving: ``python launch/export.py --run-dir runs/x --out exports/x``.

Takes the newest committed checkpoint of a run (``--run-dir``, reading ``<run-dir>/checkpoints``) or a
given one (``--checkpoint <run-dir>/checkpoints/step-NNNNNNNN``), and the run's resolved config
(``<run-dir>/config.toml`` unless ``--config`` names another; ``key=value`` overrides apply on top). Writes
model.pt (whole tables), config.toml, serving.pt (TorchScript), the id maps the tables were trained in
(id_maps.parquet, from the training dataset: the config's data.path unless ``--id-maps-from`` names
another) and export.json; see dist_mtl/export.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.train import run_config_or_usage_error  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", type=Path, help="run directory: export its newest committed checkpoint")
    source.add_argument("--checkpoint", type=Path, help="a checkpoint folder (step-NNNNNNNN)")
    parser.add_argument("--out", type=Path, required=True, help="export directory to write")
    parser.add_argument("--config", type=Path, help="job config (default: the run directory's config.toml)")
    maps = parser.add_mutually_exclusive_group()
    maps.add_argument("--id-maps-from", type=Path, metavar="DATASET",
                      help="dataset holding the id maps the model was trained in (default: the config's data.path)")
    maps.add_argument("--without-id-maps", action="store_true",
                      help="export without the id maps (the export then scores encoded data only)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides (TOML values)")
    args = parser.parse_args(argv)

    from dist_mtl.checkpoint import CheckpointManager
    from dist_mtl.export import INPUT_ERRORS, export_model, read_export_info

    if args.run_dir is not None:
        run_dir = args.run_dir
        checkpoint = CheckpointManager(run_dir / "checkpoints").latest()
        if checkpoint is None:
            parser.error(f"{run_dir / 'checkpoints'} holds no committed checkpoint")
    else:
        checkpoint = args.checkpoint
        # <run_dir>/checkpoints/step-NNNNNNNN
        run_dir = checkpoint.resolve().parent.parent
    cfg = run_config_or_usage_error(parser, run_dir, args.config, args.overrides)
    try:
        out = export_model(args.out, cfg, checkpoint=checkpoint, id_maps_from=args.id_maps_from,
                           with_id_maps=not args.without_id_maps)
    except INPUT_ERRORS as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")  # the message names the problem; no traceback
    carried = (read_export_info(out).get("id_maps") or {}).get("file")
    maps = "with its id maps" if carried else "without id maps"
    print(f"exported {checkpoint} ({cfg.model.head}) to {out}, {maps}", flush=True)
    return out


if __name__ == "__main__":
    main()
