"""Pretraining of the embedded default backbone on the procedural upstream set (stand-in for ImageNet)."""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from dynadapter.atomic import replacing
from dynadapter.config import BackboneConfig, PretrainConfig
from dynadapter.data import load_split_tensors, read_manifest
from dynadapter.models.backbone import normalization
from dynadapter.train.loop import FitResult, fit_resumable

UPSTREAM_TASK = "upstream"
BACKBONE_FILE = "backbone.safetensors"
BACKBONE_INFO = "backbone.json"


def pretrain_backbone(
    backbone_cfg: BackboneConfig,
    cfg: PretrainConfig,
    upstream_root: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    progress: bool | None = None,
    on_epoch_end=None,
    checkpoint_path: str | Path | None = None,
) -> tuple[FitResult, dict]:
    """Train `backbone_cfg` with a classifier on the upstream set; save the backbone (no classifier).

    Writes `<out_dir>/backbone.safetensors` and `<out_dir>/backbone.json` (architecture, accuracy).
    `checkpoint_path` (default `<out_dir>/pretrain_ckpt.pt`) is written after every epoch so an interrupted
    run continues where it stopped; one written by a different configuration is discarded with a message.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    manifest = read_manifest(upstream_root, UPSTREAM_TASK)
    model = timm.create_model(
        backbone_cfg.name, pretrained=False, num_classes=manifest["num_classes"], **backbone_cfg.overrides
    )
    mean, std = normalization(model)
    train = load_split_tensors(upstream_root, UPSTREAM_TASK, "train", backbone_cfg.img_size, mean, std)
    val = load_split_tensors(upstream_root, UPSTREAM_TASK, "val", backbone_cfg.img_size, mean, std)
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else out_dir / "pretrain_ckpt.pt"
    result = fit_resumable(
        model, train, val, cfg, seed=seed, checkpoint_path=ckpt, select="val_acc_last", progress=progress,
        on_epoch_end=on_epoch_end,
    )
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    with replacing(out_dir / BACKBONE_FILE) as tmp:
        save_file(state, str(tmp))
    info = {
        "name": backbone_cfg.name,
        "overrides": backbone_cfg.overrides,
        "upstream_classes": manifest["num_classes"],
        "upstream_val_accuracy": float(result.best_metric) if result.best_metric is not None else None,
        "best_epoch": result.best_epoch,
        "epochs": cfg.epochs,
        "seed": seed,
    }
    (out_dir / BACKBONE_INFO).write_text(json.dumps(info, indent=2))
    return result, info


def backbone_checkpoint(backbone_cfg: BackboneConfig, models_dir: str | Path) -> Path:
    """The weights later stages load: the configured checkpoint, else the pretrained embedded backbone."""
    if backbone_cfg.checkpoint:
        return Path(backbone_cfg.checkpoint)
    path = Path(models_dir) / "backbone" / BACKBONE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no backbone weights; run the pretrain stage (dvc repro pretrain) first")
    return path
