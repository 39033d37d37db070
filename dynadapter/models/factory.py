"""One factory for every model variant: Dyn-Adapter (any PETL method), full-depth PETL, probe, fine-tune."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from dynadapter.config import BackboneConfig, ModelConfig, SparsityConfig
from dynadapter.models.backbone import create_backbone, freeze
from dynadapter.models.dyn_vit import DynAdapterViT
from dynadapter.models.heads import ExitHead, balanced_widths
from dynadapter.models.petl import PetlMethod, create_petl


def resolve_exits(cfg: ModelConfig, depth: int) -> list[int]:
    """Exit blocks: the configured ones, every depth/4 by default, only the last block without early exit."""
    if not cfg.early_exit:
        return [depth]
    if cfg.exits is not None:
        if cfg.exits[-1] > depth:
            raise ValueError(f"base.model.exits {cfg.exits} go beyond the backbone depth {depth}")
        return list(cfg.exits)
    # four exits at the quarters of the depth (rounded), fewer only when the backbone has fewer blocks
    return sorted({max(1, round(depth * i / 4)) for i in range(1, 5)})


def reference_exits(cfg: ModelConfig, depth: int) -> list[int]:
    """The exit layout that sets forward-sparsity rates: Dyn-Adapter's (the configured exits when there are
    several, else every depth/4 blocks), whatever this model's own exits are.

    So every variant trained with the same sparsity settings gets the same dropout at the same depth: the
    full-depth baseline (one head after the last block) gets Dyn-Adapter's per-block rates and its last
    head's rate, and a static truncation after block k gets the rates Dyn-Adapter has up to block k.
    """
    if cfg.exits is not None and len(cfg.exits) > 1:
        return list(cfg.exits)
    return resolve_exits(cfg.model_copy(update={"exits": None, "early_exit": True}), depth)


def depth_dropout(sparsity: SparsityConfig | None, reference: list[int], depth: int,
                  exits: list[int]) -> tuple[list[float], list[float]]:
    """Per-block and per-head dropout rates: block b (1-based) and a head after block b get the rate of the
    reference stage holding block b (`stage_dropout` over `reference`); blocks past the reference's last
    exit get its last rate."""
    rates = stage_dropout(sparsity, len(reference))

    def rate_at(block: int) -> float:
        return next((rates[s] for s, end in enumerate(reference) if block <= end), rates[-1])

    return [rate_at(b) for b in range(1, depth + 1)], [rate_at(e) for e in exits]


def stage_dropout(sparsity: SparsityConfig | None, num_stages: int) -> list[float]:
    """Forward sparsity: dropout falls linearly from p_max at the first stage to p_min at the last."""
    if sparsity is None or not sparsity.forward:
        return [0.0] * num_stages
    if num_stages == 1:
        return [sparsity.p_max]
    span = sparsity.p_max - sparsity.p_min
    return [max(0.0, sparsity.p_max - span * s / (num_stages - 1)) for s in range(num_stages)]


def head_widths(cfg: ModelConfig, num_exits: int, dim: int, num_classes: int | None = None) -> list[int]:
    if not cfg.heads.balanced:
        return [0] * num_exits
    if cfg.heads.hidden is not None:
        if len(cfg.heads.hidden) != num_exits:
            raise ValueError(f"base.model.heads.hidden has {len(cfg.heads.hidden)} widths for {num_exits} exits")
        return list(cfg.heads.hidden)
    return balanced_widths(num_exits, dim, num_classes, scale=cfg.heads.width)


def build_model(
    backbone_cfg: BackboneConfig,
    model_cfg: ModelConfig,
    num_classes: int,
    sparsity: SparsityConfig | None = None,
    checkpoint: str | Path | None = None,
    backbone: nn.Module | None = None,
) -> DynAdapterViT:
    """Frozen backbone + PETL modules + exit heads; only PETL and heads train (all of it for full_finetune)."""
    vit = backbone if backbone is not None else create_backbone(backbone_cfg, checkpoint)
    depth = len(vit.blocks)
    exits = resolve_exits(model_cfg, depth)
    block_rates, head_rates = depth_dropout(sparsity, reference_exits(model_cfg, depth), depth, exits)

    if model_cfg.petl.method != "full_finetune":
        freeze(vit)
    petl = create_petl(model_cfg.petl)
    if petl is not None:
        petl.inject(vit, block_rates)
    widths = head_widths(model_cfg, len(exits), vit.embed_dim, num_classes)
    heads = nn.ModuleList(ExitHead(vit.embed_dim, num_classes, h, head_rates[s]) for s, h in enumerate(widths))
    model = DynAdapterViT(vit, exits, heads, model_cfg.confidence)
    model.petl = petl  # plain attribute (not a module): used for merge / counting
    return model


def merge_petl(model: DynAdapterViT) -> int:
    """Fold mergeable PETL branches into the frozen weights (Rep-Adapter, LoRA) for inference."""
    petl = getattr(model, "petl", None)
    return petl.merge(model.backbone) if petl is not None and petl.mergeable else 0


def count_parameters(model: DynAdapterViT) -> dict[str, int]:
    """Trainable parameters (PETL branches, heads, all) and the pretrained backbone's size, for reporting."""
    petl = sum(p.numel() for p in PetlMethod.branch_parameters(model.backbone))
    total_backbone = sum(p.numel() for p in model.backbone.parameters())
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "heads": sum(p.numel() for p in model.heads.parameters()),
        "petl": petl,
        "backbone": total_backbone - petl,
    }
