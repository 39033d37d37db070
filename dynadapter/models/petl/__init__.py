"""PETL methods, one file each, behind one registry (`create_petl`)."""

from __future__ import annotations

from dynadapter.config import PetlConfig
from dynadapter.models.petl.adapter import Adapter
from dynadapter.models.petl.base import PetlMethod, PetlModule
from dynadapter.models.petl.lora import LoRA
from dynadapter.models.petl.rep_adapter import RepAdapter

PETL_METHODS = {"adapter": Adapter, "lora": LoRA, "rep_adapter": RepAdapter}


def create_petl(cfg: PetlConfig) -> PetlMethod | None:
    """The configured method, or None for the baselines that inject nothing (linear_probe, full_finetune)."""
    if cfg.method not in PETL_METHODS:
        return None
    return PETL_METHODS[cfg.method](getattr(cfg, cfg.method))


__all__ = ["PETL_METHODS", "PetlMethod", "PetlModule", "create_petl"]
