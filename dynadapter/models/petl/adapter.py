"""AdaptFormer-style Adapter: a bottleneck `up(act(down(h))) * s` parallel to each block's MLP."""

from __future__ import annotations

from torch import nn

from dynadapter.config import AdapterConfig
from dynadapter.models.petl.base import PetlMethod, PetlModule, low_rank_pair


class ParallelAdapterMLP(PetlModule):
    """mlp(h) + s * up(gelu(down(drop(h)))), h being the MLP's (normalised) input."""

    def __init__(self, mlp: nn.Module, dim: int, bottleneck: int, scale: float, dropout: float):
        super().__init__()
        self.base = mlp
        self.drop = nn.Dropout(dropout)
        self.down, self.up = low_rank_pair(dim, bottleneck, dim)
        self.act = nn.GELU()
        self.scale = scale

    def branch(self, h):
        """The adapter's own term, s * up(gelu(down(drop(h))))."""
        return self.up(self.act(self.down(self.drop(h)))) * self.scale

    def forward(self, h):
        return self.base(h) + self.branch(h)

    def merge(self) -> nn.Module:
        return self  # non-linear branch: nothing to fold


class Adapter(PetlMethod):
    name = "adapter"

    def __init__(self, cfg: AdapterConfig):
        self.cfg = cfg

    def inject(self, vit: nn.Module, dropout: list[float]) -> None:
        for block, p in zip(vit.blocks, dropout, strict=True):
            block.mlp = ParallelAdapterMLP(block.mlp, vit.embed_dim, self.cfg.dim, self.cfg.scale, p)
