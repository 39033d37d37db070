"""Backbones, PETL modules, exit heads and the multi-exit Dyn-Adapter model."""

from dynadapter.models.backbone import CheckpointError, create_backbone, freeze, load_backbone_weights, normalization
from dynadapter.models.dyn_vit import DynAdapterViT, DynamicOutput, confidence_score
from dynadapter.models.factory import build_model, count_parameters, merge_petl, resolve_exits, stage_dropout

__all__ = [
    "CheckpointError",
    "DynAdapterViT",
    "DynamicOutput",
    "build_model",
    "confidence_score",
    "count_parameters",
    "create_backbone",
    "freeze",
    "load_backbone_weights",
    "merge_petl",
    "normalization",
    "resolve_exits",
    "stage_dropout",
]
