"""DVC stage `pretrain`: train the embedded default backbone on the upstream set (skipped with a checkpoint)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pipelines.common import (epoch_printer, load_stage_params, save_stage_config, stage_parser,
                              write_text_atomic)

DESCRIPTION = """Pretrain the default backbone.

With base.backbone.checkpoint unset (the offline default), trains base.backbone (a small timm ViT) with a
classifier on the procedural upstream set written by `prepare`, and saves the backbone without its
classifier to <paths.models>/backbone/backbone.safetensors. With a checkpoint configured, nothing is
trained: the stage records which weights later stages use. Interrupted runs resume from the last finished epoch
(checkpoint in <paths.models>/checkpoints/, outside the DVC output so `dvc repro` does not delete it).
Outputs: <paths.models>/backbone/, <paths.outputs>/pretrain/metrics.json."""


def main(argv: list[str] | None = None) -> int:
    args = stage_parser("pretrain", DESCRIPTION).parse_args(argv)
    params = load_stage_params(args)
    base, cfg = params.base, params.pretrain
    out_dir = Path(base.paths.models) / "backbone"
    metrics_dir = Path(base.paths.outputs) / "pretrain"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    save_stage_config(params, "pretrain", metrics_dir)
    start = time.perf_counter()
    if base.backbone.checkpoint:
        if not Path(base.backbone.checkpoint).is_file():
            print(f"error: base.backbone.checkpoint: {base.backbone.checkpoint}: file not found", file=sys.stderr)
            return 2
        out_dir.mkdir(parents=True, exist_ok=True)
        info = {"skipped": True, "checkpoint": base.backbone.checkpoint, "name": base.backbone.name}
        write_text_atomic(out_dir / "backbone.json", json.dumps(info, indent=2))
        metrics = {"skipped": True}
        print(f"pretrain: skipped, using checkpoint {base.backbone.checkpoint}")
    else:
        from dynadapter.train.pretrain import pretrain_backbone

        result, info = pretrain_backbone(
            base.backbone, cfg, base.paths.upstream, out_dir, seed=base.seed,
            checkpoint_path=Path(base.paths.models) / "checkpoints" / "pretrain.pt",
            on_epoch_end=epoch_printer("pretrain", cfg.epochs),
        )
        metrics = {
            "upstream_val_accuracy": info["upstream_val_accuracy"],
            "best_epoch": info["best_epoch"],
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(f"pretrain: upstream val accuracy {metrics['upstream_val_accuracy']:.4f} in {metrics['seconds']} s")
    write_text_atomic(metrics_dir / "metrics.json", json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
