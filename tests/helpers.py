"""Tiny multi-exit ViTs and small utilities shared by the model and inference tests."""

from __future__ import annotations

import pytest
import torch

from dynadapter.config import BackboneConfig, HeadsConfig, ModelConfig, PetlConfig, SparsityConfig
from dynadapter.models import DynAdapterViT, build_model
from dynadapter.models.petl import PetlModule

# 16x16 images, 8x8 patches: 4 patches + cls = 5 tokens; a forward pass is well under a millisecond.
TINY = dict(img_size=16, patch_size=8, embed_dim=32, depth=4, num_heads=2)
PETL_METHODS = ["adapter", "lora", "rep_adapter"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def backbone_cfg(**overrides) -> BackboneConfig:
    return BackboneConfig(name="vit_tiny_patch16_224", overrides={**TINY, **overrides})


def tiny_model(
    method: str = "adapter",
    early_exit: bool = True,
    num_classes: int = 5,
    seed: int = 0,
    sparsity: SparsityConfig | None = None,
    exits: list[int] | None = None,
    heads: HeadsConfig | None = None,
    confidence: str = "max_softmax",
    **overrides,
) -> DynAdapterViT:
    torch.manual_seed(seed)
    model_cfg = ModelConfig(
        petl=PetlConfig(method=method),
        early_exit=early_exit,
        exits=exits,
        heads=heads if heads is not None else HeadsConfig(),
        confidence=confidence,
    )
    return build_model(backbone_cfg(**overrides), model_cfg, num_classes=num_classes, sparsity=sparsity)


@torch.no_grad()
def randomize_petl(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> int:
    """Give every PETL branch non-zero weights (the up projections start at zero, an exact no-op)."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for m in model.modules():
        if isinstance(m, PetlModule):
            for p in m.branch_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)
                n += 1
    return n


@torch.no_grad()
def sharpen_heads(model: DynAdapterViT, seed: int = 0, scale: float = 3.0) -> None:
    """Spread the exits' confidences (freshly initialised heads are all close to uniform)."""
    g = torch.Generator().manual_seed(seed)
    for head in model.heads:
        head.fc.weight.copy_(torch.randn(head.fc.weight.shape, generator=g) * scale / head.fc.in_features**0.5)


def images(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
