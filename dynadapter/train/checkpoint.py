"""Trainer checkpoints: the trainable state of a model (PETL + heads + buffers, never the frozen backbone),
atomic saves, safe (weights_only) loads, and the per-rank file layout of a Ray Train epoch checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from dynadapter.atomic import replacing
from dynadapter.devices import to_host

CHECKPOINT_FORMAT = "dynadapter.train.checkpoint/1"


class CheckpointMismatchError(ValueError):
    """A checkpoint to resume from was written by a different run (config, data size, seed or backbone)."""


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters that train plus all (persistent) buffers: all a checkpoint needs when the
    frozen backbone is rebuilt from its own pretrained weights."""
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, nn.Parameter) and not t.requires_grad:
            continue
        out[name] = to_host(t)
    return out


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path | None = None) -> None:
    """Load what `trainable_state` saved. Checked before anything is copied: keys or shapes that do not fit
    (another architecture, PETL method or number of classes) raise CheckpointMismatchError naming `source`
    (the file), the keys and the shapes, and leave the model as it was."""
    own = model.state_dict()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and k not in frozen]
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and tuple(getattr(v, "shape", ())) != tuple(own[k].shape)]
    if unexpected or missing or shapes:
        where = f"{source}: " if source is not None else ""
        raise CheckpointMismatchError(
            f"{where}checkpoint state does not fit the model: unexpected {unexpected[:10]}, missing {missing[:10]}"
            + (f", shape mismatches ({len(shapes)}) {shapes[:10]}" if shapes else "")
        )
    model.load_state_dict(state, strict=False)


def frozen_fingerprint(model: nn.Module) -> float:
    """A cheap checksum of the frozen weights, so a resume onto a different backbone is caught."""
    total = 0.0
    for p in model.parameters():
        if not p.requires_grad:
            total += float(p.detach().double().abs().sum()) + 0.5 * float(p.detach().double().sum())
    return total


def save_checkpoint(obj: dict, path: str | Path) -> None:
    """torch.save to a temporary file next to `path`, fsync, then atomic os.replace: a crash never leaves a
    half-written checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(path: str | Path) -> dict:
    """A trainer checkpoint, loaded safely (weights_only=True) onto the CPU. An unreadable file (truncated,
    corrupt, not a checkpoint, or holding objects other than tensors and primitives) raises
    CheckpointMismatchError naming it, so `fit_resumable` starts over instead of crashing."""
    try:
        ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as err:  # RuntimeError (bad zip), EOFError (empty), UnpicklingError (unsafe objects), ...
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise CheckpointMismatchError(f"{path}: unreadable trainer checkpoint ({type(err).__name__}: {first})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatchError(f"{path}: not a dynadapter trainer checkpoint ({CHECKPOINT_FORMAT})")
    return ckpt


def rank_file(rank: int) -> str:
    """A rank's file in an epoch checkpoint: each rank writes its own (under ZeRO 1/2 optimizer state is
    per rank)."""
    return f"rank{rank}.pt"
