"""The interface every PETL method implements (peft-style): inject into a ViT, mark trainable, merge."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


class PetlModule(nn.Module, ABC):
    """A trainable branch wrapped around one frozen sub-module (`self.base`) of a ViT block."""

    base: nn.Module

    def branch_parameters(self) -> list[nn.Parameter]:
        """The PETL branch's own parameters (not those of the wrapped frozen module)."""
        wrapped = {id(p) for p in self.base.parameters()}
        return [p for p in self.parameters() if id(p) not in wrapped]

    @abstractmethod
    def merge(self) -> nn.Module:
        """Return a plain module computing the same function at inference (self if it cannot be merged)."""


class PetlMethod(ABC):
    """Injects one kind of PetlModule into every block of a timm VisionTransformer."""

    name: str
    mergeable: bool = False

    @abstractmethod
    def inject(self, vit: nn.Module, dropout: list[float]) -> None:
        """Wrap the block sub-modules in place; `dropout[i]` is the branch dropout of block i."""

    @staticmethod
    def branch_parameters(vit: nn.Module) -> list[nn.Parameter]:
        return [p for m in vit.modules() if isinstance(m, PetlModule) for p in m.branch_parameters()]

    def merge(self, vit: nn.Module) -> int:
        """Replace every mergeable PetlModule by its merged plain module; returns how many were merged."""
        merged = 0
        for parent in list(vit.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, PetlModule):
                    plain = child.merge()
                    if plain is not child:
                        setattr(parent, name, plain)
                        merged += 1
        return merged


def low_rank_pair(in_dim: int, rank: int, out_dim: int) -> tuple[nn.Linear, nn.Linear]:
    """down (Kaiming-uniform, as nn.Linear) and up (zeros) so the branch starts as an exact no-op."""
    down = nn.Linear(in_dim, rank)
    up = nn.Linear(rank, out_dim)
    nn.init.zeros_(up.weight)
    nn.init.zeros_(up.bias)
    return down, up


def copy_linear(base: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A frozen nn.Linear with the given weights (used by merges)."""
    out = nn.Linear(base.in_features, base.out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():  # a block, not a decorator: mutmut 3 does not mutate decorated functions
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    for p in out.parameters():
        p.requires_grad_(False)
    return out
