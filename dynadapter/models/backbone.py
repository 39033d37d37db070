"""Frozen timm VisionTransformer backbones, weights from local files only (never a hub download)."""

from __future__ import annotations

from pathlib import Path

import torch
import timm
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from timm.data import resolve_data_config

from dynadapter.config import BackboneConfig
from dynadapter.models import convstem  # noqa: F401 - registers vit_convstem with timm

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".npz", ".safetensors")


class CheckpointError(ValueError):
    """A weights file that is missing, unreadable or does not fit the architecture."""


def create_backbone(cfg: BackboneConfig, checkpoint: str | Path | None = None) -> VisionTransformer:
    """Build `cfg.name` with `cfg.overrides` (no classifier) and load `checkpoint` (or cfg.checkpoint) if any."""
    try:
        model = timm.create_model(cfg.name, pretrained=False, num_classes=0, **cfg.overrides)
    except Exception as err:  # unknown name, bad kwarg: name the config keys
        raise CheckpointError(f"base.backbone: cannot build {cfg.name!r} with overrides {cfg.overrides}: {err}") from err
    if not isinstance(model, VisionTransformer):
        raise CheckpointError(f"base.backbone.name: {cfg.name!r} is a {type(model).__name__}, not a VisionTransformer")
    if model.attn_pool is not None:
        raise CheckpointError(f"base.backbone.name: {cfg.name!r} uses attention pooling, which exits do not support")
    path = checkpoint if checkpoint is not None else cfg.checkpoint
    if path is not None:
        load_backbone_weights(model, path)
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(err).__name__}: {err})") from err
    # Common wrappers: {"model": sd}, {"state_dict": sd}, {"module": sd} (DeepSpeed)
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return obj


def _check_npz_depth(model: VisionTransformer, path: Path) -> None:
    import re

    import numpy as np

    try:
        with np.load(path) as w:
            blocks = {int(m.group(1)) for k in w.files if (m := re.search(r"Transformer/encoderblock_(\d+)/", k))}
            stacked = [k for k in w.files if k.endswith("Transformer/encoderblock/LayerNorm_0/scale")]
            depth = max(blocks) + 1 if blocks else (int(w[stacked[0]].shape[0]) if stacked else None)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(err).__name__}: {err})") from err
    own = len(model.blocks)
    if depth is not None and depth != own:
        kind, first, last = ("unexpected", own, depth - 1) if depth > own else ("missing", depth, own - 1)
        raise CheckpointError(
            f"{path}: .npz weights do not fit {type(model).__name__}: checkpoint has {depth} blocks, model {own}; "
            f"{kind} keys Transformer/encoderblock_{first}/... to encoderblock_{last}/..."
        )


def load_backbone_weights(model: VisionTransformer, path: str | Path) -> None:
    """Load local weights strictly (classifier keys ignored); errors list missing/unexpected keys and shapes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"{path}: unsupported checkpoint type (expected one of {WEIGHT_SUFFIXES})")
    if path.suffix.lower() == ".npz":  # big_vision / original JAX ViT weights
        from timm.models.vision_transformer import _load_weights

        _check_npz_depth(model, path)  # timm reads only the model's blocks: a deeper file would load silently
        try:
            _load_weights(model, str(path))
        except Exception as err:
            raise CheckpointError(f"{path}: .npz weights do not fit {type(model).__name__}: {err}") from err
        return
    state = _read_state_dict(path)
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    try:
        state = checkpoint_filter_fn(state, model)  # resamples pos_embed / patch_embed to this geometry
    except Exception as err:
        raise CheckpointError(f"{path}: cannot adapt checkpoint to the architecture: {err}") from err
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.")) or k in model.state_dict()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:
        parts = [f"{path}: checkpoint does not fit the architecture"]
        if missing:
            parts.append(f"  missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
        if shapes:
            parts.append(f"  shape mismatches ({len(shapes)}): {shapes[:20]}")
        raise CheckpointError("\n".join(parts))
    model.load_state_dict(state, strict=True)


def freeze(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def normalization(model: VisionTransformer) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The backbone's own input mean/std (from its timm pretrained_cfg)."""
    cfg = resolve_data_config(model=model)
    return tuple(cfg["mean"]), tuple(cfg["std"])
