"""Rep-Adapter: a linear bottleneck before attention (qkv) and MLP (fc1), folded into the frozen weights.

W (h + s U D drop(h)) + b  ==  (W + s W U D) h + b   at inference, so the merged model costs no extra FLOPs.
"""

from __future__ import annotations

import torch
from torch import nn

from dynadapter.config import RepAdapterConfig
from dynadapter.models.petl.base import PetlMethod, PetlModule, copy_linear, low_rank_pair


class RepAdapterLinear(PetlModule):
    def __init__(self, base: nn.Linear, bottleneck: int, scale: float, dropout: float):
        super().__init__()
        self.base = base
        self.drop = nn.Dropout(dropout)
        self.down, self.up = low_rank_pair(base.in_features, bottleneck, base.in_features)
        self.scale = scale

    def forward(self, h):
        return self.base(h + self.up(self.down(self.drop(h))) * self.scale)

    def merge(self) -> nn.Module:
        # h' = (I + s U D) h + s (U b_d + b_u);  base(h') = W' h + b'
        with torch.no_grad():  # a block, not a decorator: mutmut 3 does not mutate decorated functions
            w, b = self.base.weight, self.base.bias
            a = torch.eye(w.shape[1], device=w.device, dtype=w.dtype) + self.scale * self.up.weight @ self.down.weight
            shift = self.scale * (self.up.weight @ self.down.bias + self.up.bias)
            new_bias = w @ shift + (b if b is not None else 0)
            return copy_linear(self.base, w @ a, new_bias)


class RepAdapter(PetlMethod):
    name = "rep_adapter"
    mergeable = True

    def __init__(self, cfg: RepAdapterConfig):
        self.cfg = cfg

    def inject(self, vit: nn.Module, dropout: list[float]) -> None:
        for block, p in zip(vit.blocks, dropout, strict=True):
            block.attn.qkv = RepAdapterLinear(block.attn.qkv, self.cfg.dim, self.cfg.scale, p)
            block.mlp.fc1 = RepAdapterLinear(block.mlp.fc1, self.cfg.dim, self.cfg.scale, p)
