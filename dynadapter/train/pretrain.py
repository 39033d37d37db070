"""Pretraining of the embedded default backbone on multi-factor procedural scenes (stand-in for ImageNet),
and the shipped copy of its weights that the default pipeline uses instead of retraining."""

from __future__ import annotations

import json
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dynadapter.atomic import replacing, write_text_atomic
from dynadapter.config import BackboneConfig, PretrainConfig
from dynadapter.data.store import file_sha256
from dynadapter.data.upstream import FACTORS, IGNORE, factor_slices, generate_scenes
from dynadapter.models.backbone import normalization
from dynadapter.train.loop import fit_resumable, FitResult

BACKBONE_FILE = "backbone.safetensors"
BACKBONE_INFO = "backbone.json"
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "weights"  # the repository's weights/ folder
SHIPPED_FILE = "embedded_backbone.safetensors"
SHIPPED_INFO = "embedded_backbone.json"
VAL_OFFSET = 1_000_000  # val scenes come from chunks no training set size reaches


class ShippedWeightsError(ValueError):
    """The shipped backbone is missing, altered, or was built for another architecture."""


def scene_tensors(n: int, size: int, seed: int, mean, std, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` scenes as normalised float images [n, 3, S, S] and factor labels [n, F]."""
    images, labels = generate_scenes(n, size, seed, offset)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return x.contiguous(), torch.from_numpy(labels)


def factor_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Sum over factors of the cross-entropy on that factor's slice of the logits (undefined labels ignored)."""
    logits = model(x)
    ces = [F.cross_entropy(logits[:, sl].float(), y[:, i], ignore_index=IGNORE)
           for i, sl in enumerate(factor_slices().values())]
    return sum(ces), [ce.detach() for ce in ces]


@torch.no_grad()
def factor_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> dict[str, float]:
    """Validation accuracy of each factor (samples whose factor is undefined are left out)."""
    was_training = model.training
    model.eval()
    try:
        logits = torch.cat([model(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    finally:
        model.train(was_training)
    out = {}
    for i, (name, sl) in enumerate(factor_slices().items()):
        ok = y[:, i] != IGNORE
        out[name] = round(float((logits[ok][:, sl].argmax(1) == y[ok, i]).float().mean()), 4)
    return out


def pretrain_backbone(
    backbone_cfg: BackboneConfig,
    cfg: PretrainConfig,
    out_dir: str | Path,
    seed: int = 0,
    progress: bool | None = None,
    on_epoch_end=None,
    checkpoint_path: str | Path | None = None,
) -> tuple[FitResult, dict]:
    """Train `backbone_cfg` with one classifier over every factor of `cfg.scenes` generated scenes; save the
    backbone without the classifier.

    Writes `<out_dir>/backbone.safetensors` and `<out_dir>/backbone.json` (architecture, per-factor val
    accuracy on `cfg.val_scenes` held-out scenes, time). `checkpoint_path` (default
    `<out_dir>/pretrain_ckpt.pt`) is written after every epoch, so an interrupted run continues where it
    stopped; one written by a different configuration is discarded with a message.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = timm.create_model(backbone_cfg.name, pretrained=False, num_classes=sum(FACTORS.values()),
                              **backbone_cfg.overrides)
    mean, std = normalization(model)
    size = backbone_cfg.img_size
    train = scene_tensors(cfg.scenes, size, seed, mean, std)
    val = scene_tensors(cfg.val_scenes, size, seed, mean, std, offset=VAL_OFFSET)

    def report(epoch: int, metrics: dict) -> bool | None:
        metrics["val_factor_acc"] = factor_accuracy(model, *val)
        return on_epoch_end(epoch, metrics) if on_epoch_end is not None else None

    ckpt = Path(checkpoint_path) if checkpoint_path is not None else out_dir / "pretrain_ckpt.pt"
    result = fit_resumable(model, train, None, cfg, seed=seed, checkpoint_path=ckpt, progress=progress,
                           on_epoch_end=report, objective=factor_loss)
    accuracy = factor_accuracy(model, *val)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    with replacing(out_dir / BACKBONE_FILE) as tmp:
        save_file(state, str(tmp))
    info = {
        "name": backbone_cfg.name,
        "overrides": backbone_cfg.overrides,
        "factors": FACTORS,
        "upstream_val_factor_accuracy": accuracy,
        "upstream_val_accuracy": round(sum(accuracy.values()) / len(accuracy), 4),
        "epochs": cfg.epochs,
        "scenes": cfg.scenes,
        "val_scenes": cfg.val_scenes,
        "seed": seed,
        "seconds": round(time.perf_counter() - start, 1),
        "history": [{"epoch": h["epoch"], "train_loss": round(h["train_loss"], 4),
                     "val_factor_acc": h.get("val_factor_acc")} for h in result.history],
    }
    write_text_atomic(out_dir / BACKBONE_INFO, json.dumps(info, indent=2))
    return result, info


def shipped_info(shipped_dir: str | Path = SHIPPED_DIR) -> dict:
    path = Path(shipped_dir) / SHIPPED_INFO
    if not path.is_file():
        raise ShippedWeightsError(f"{path}: no shipped backbone record; rebuild it with `make backbone` or set "
                                  "pretrain.source: train")
    return json.loads(path.read_text())


def verify_shipped(backbone_cfg: BackboneConfig, shipped_dir: str | Path = SHIPPED_DIR) -> tuple[Path, dict]:
    """The shipped weights file and its record, after checking its checksum and that it was built for
    `backbone_cfg` (name and overrides); anything else raises ShippedWeightsError saying what differs."""
    info = shipped_info(shipped_dir)
    weights = Path(shipped_dir) / SHIPPED_FILE
    if not weights.is_file():
        raise ShippedWeightsError(f"{weights}: shipped backbone weights missing")
    digest = file_sha256(weights)
    if digest != info["sha256"]:
        raise ShippedWeightsError(f"{weights}: sha256 {digest} does not match the recorded {info['sha256']} "
                                  f"({Path(shipped_dir) / SHIPPED_INFO}); the file was altered or truncated")
    built = (info["name"], info["overrides"])
    if built != (backbone_cfg.name, backbone_cfg.overrides):
        raise ShippedWeightsError(
            f"base.backbone is {backbone_cfg.name} {backbone_cfg.overrides}, but the shipped weights were built "
            f"for {built[0]} {built[1]}: set pretrain.source: train to pretrain this architecture, or point "
            "base.backbone.checkpoint at weights of your own")
    return weights, info


def ship(trained_dir: str | Path, command: str, shipped_dir: str | Path = SHIPPED_DIR) -> dict:
    """Copy a pretrain output (`pretrain_backbone`'s out_dir) into the shipped location with its checksum and
    the command that built it."""
    shipped_dir = Path(shipped_dir)
    shipped_dir.mkdir(parents=True, exist_ok=True)
    info = json.loads((Path(trained_dir) / BACKBONE_INFO).read_text())
    data = (Path(trained_dir) / BACKBONE_FILE).read_bytes()
    with replacing(shipped_dir / SHIPPED_FILE) as tmp:
        tmp.write_bytes(data)
    info = {**info, "sha256": file_sha256(shipped_dir / SHIPPED_FILE), "bytes": len(data), "command": command}
    write_text_atomic(shipped_dir / SHIPPED_INFO, json.dumps(info, indent=2) + "\n")
    return info


def backbone_checkpoint(backbone_cfg: BackboneConfig, models_dir: str | Path) -> Path:
    """The weights later stages load: the configured checkpoint, else the embedded backbone the pretrain stage
    put under <models>/backbone (shipped or pretrained)."""
    if backbone_cfg.checkpoint:
        return Path(backbone_cfg.checkpoint)
    path = Path(models_dir) / "backbone" / BACKBONE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no backbone weights; run the pretrain stage (dvc repro pretrain) first")
    return path
