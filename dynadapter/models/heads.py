"""Exit heads: LN -> [Linear(D,h) -> GELU -> Dropout] -> Linear(., C). Early exits get the heavier ones."""

from __future__ import annotations

from torch import nn


class ExitHead(nn.Module):
    def __init__(self, dim: int, num_classes: int, hidden: int = 0, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.hidden = hidden
        if hidden > 0:
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout))
            self.fc = nn.Linear(hidden, num_classes)
        else:
            self.mlp = nn.Identity()
            self.fc = nn.Linear(dim, num_classes)

    def forward(self, pooled):
        return self.fc(self.mlp(self.drop(self.norm(pooled))))


def balanced_widths(num_exits: int, dim: int) -> list[int]:
    """Heavier heads early, the light LN+Linear head last: 2D, D, D/2, ... and 0 for the final exit."""
    return [max(1, (2 * dim) >> i) for i in range(num_exits - 1)] + [0]
