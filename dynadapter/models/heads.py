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


def balanced_widths(num_exits: int, dim: int, num_classes: int | None = None, scale: float = 1.0) -> list[int]:
    """Heavier heads early, the light LN+Linear head last: 2D, D, D/2, ... (times `scale`) and 0 for the final
    exit.

    With `num_classes`, a width whose head would cost fewer MACs than LN + Linear (h (D + C) < D C: many
    exits or many classes) becomes 0, that plain head, so head size never grows with depth.
    """
    widths = [max(1, round(2 * dim * scale) >> i) for i in range(num_exits - 1)] + [0]
    if num_classes is not None:
        widths = [h if h * (dim + num_classes) >= dim * num_classes else 0 for h in widths]
    return widths
