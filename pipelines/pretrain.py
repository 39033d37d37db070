"""DVC stage `pretrain`: put the backbone later stages use under <paths.models>/backbone (shipped, trained here,
or the user's checkpoint); `--ship` rebuilds the shipped weights (`make backbone`)."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from pipelines.common import (epoch_printer, load_stage_params, save_stage_config, stage_parser,
                              write_text_atomic)

DESCRIPTION = """Provide the backbone.

With base.backbone.checkpoint set, nothing is trained: the stage records which weights later stages use.
Otherwise the embedded default backbone (a timm ViT with a convolutional stem, base.backbone) comes from:
  pretrain.source=shipped  weights/embedded_backbone.safetensors, checked against the sha256 and the
                           architecture recorded in weights/embedded_backbone.json (seconds);
  pretrain.source=train    pretraining here on pretrain.scenes generated scenes labelled with 8 visual
                           factors (shape, fill, hue, x, y, scale, rotation, object count), pretrain.epochs
                           epochs (about 30 minutes on 2 CPU cores with the defaults). Interrupted runs resume
                           from the last finished epoch (checkpoint in <paths.models>/checkpoints/).
Either way the backbone lands in <paths.models>/backbone/ and its upstream figures in
<paths.outputs>/pretrain/metrics.json.

--ship trains (as source=train) and then replaces the shipped weights and their record in weights/: the
one command that rebuilds them (`make backbone` runs it and keeps the log in weights/)."""


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("pretrain", DESCRIPTION)
    parser.add_argument("--ship", action="store_true", help="pretrain, then replace the shipped weights in weights/")
    args = parser.parse_args(argv)
    params = load_stage_params(args)
    base, cfg = params.base, params.pretrain
    out_dir = Path(base.paths.models) / "backbone"
    metrics_dir = Path(base.paths.outputs) / "pretrain"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    save_stage_config(params, "pretrain", metrics_dir)
    start = time.perf_counter()
    from dynadapter.train.pretrain import (BACKBONE_FILE, BACKBONE_INFO, ShippedWeightsError, pretrain_backbone,
                                           ship, verify_shipped)

    if base.backbone.checkpoint and not args.ship:
        if not Path(base.backbone.checkpoint).is_file():
            print(f"error: base.backbone.checkpoint: {base.backbone.checkpoint}: file not found", file=sys.stderr)
            return 2
        out_dir.mkdir(parents=True, exist_ok=True)
        info = {"skipped": True, "checkpoint": base.backbone.checkpoint, "name": base.backbone.name}
        write_text_atomic(out_dir / BACKBONE_INFO, json.dumps(info, indent=2))
        metrics = {"source": "checkpoint"}
        print(f"pretrain: skipped, using checkpoint {base.backbone.checkpoint}")
    elif cfg.source == "shipped" and not args.ship:
        try:
            weights, info = verify_shipped(base.backbone)
        except ShippedWeightsError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(weights, out_dir / BACKBONE_FILE)
        write_text_atomic(out_dir / BACKBONE_INFO, json.dumps({**info, "source": "shipped"}, indent=2))
        metrics = {"source": "shipped", "upstream_val_accuracy": info["upstream_val_accuracy"],
                   "upstream_val_factor_accuracy": info["upstream_val_factor_accuracy"],
                   "pretrain_seconds": info["seconds"], "sha256": info["sha256"]}
        print(f"pretrain: shipped weights verified (sha256 {info['sha256'][:12]}...), upstream val accuracy "
              f"{info['upstream_val_accuracy']:.4f} (mean over factors), trained in {info['seconds']:.0f} s")
    else:
        result, info = pretrain_backbone(
            base.backbone, cfg, out_dir, seed=base.seed,
            checkpoint_path=Path(base.paths.models) / "checkpoints" / "pretrain.pt",
            on_epoch_end=epoch_printer("pretrain", cfg.epochs),
        )
        metrics = {"source": "train", "upstream_val_accuracy": info["upstream_val_accuracy"],
                   "upstream_val_factor_accuracy": info["upstream_val_factor_accuracy"],
                   "pretrain_seconds": round(time.perf_counter() - start, 1)}
        print(f"pretrain: upstream val accuracy {metrics['upstream_val_accuracy']:.4f} (mean over factors) "
              f"{info['upstream_val_factor_accuracy']} in {metrics['pretrain_seconds']} s")
        if args.ship:
            command = "python -m pipelines.pretrain --ship " + " ".join(
                ["--params", shlex.quote(args.params)] + [f"--set {shlex.quote(o)}" for o in args.overrides])
            shipped = ship(out_dir, command.strip())
            print(f"pretrain: shipped weights replaced (sha256 {shipped['sha256']}, {shipped['bytes']} bytes)")
    write_text_atomic(metrics_dir / "metrics.json", json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
