"""LoRA on each block's fused qkv projection: W h + (alpha/r) * B A drop(h); mergeable into W."""

from __future__ import annotations

import torch
from torch import nn

from dynadapter.config import LoRAConfig
from dynadapter.models.petl.base import PetlMethod, PetlModule, copy_linear, low_rank_pair


class LoRALinear(PetlModule):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.drop = nn.Dropout(dropout)
        self.down, self.up = low_rank_pair(base.in_features, rank, base.out_features)
        self.down.bias = None  # a pure low-rank product B A, as in the LoRA paper
        self.up.bias = None
        self.scaling = alpha / rank

    def forward(self, h):
        return self.base(h) + self.up(self.down(self.drop(h))) * self.scaling

    def merge(self) -> nn.Module:
        with torch.no_grad():  # a block, not a decorator: mutmut 3 does not mutate decorated functions
            delta = self.up.weight @ self.down.weight * self.scaling
            return copy_linear(self.base, self.base.weight + delta, self.base.bias)


class LoRA(PetlMethod):
    name = "lora"
    mergeable = True

    def __init__(self, cfg: LoRAConfig):
        self.cfg = cfg

    def inject(self, vit: nn.Module, dropout: list[float]) -> None:
        for block, p in zip(vit.blocks, dropout, strict=True):
            block.attn.qkv = LoRALinear(block.attn.qkv, self.cfg.rank, self.cfg.alpha, p)
