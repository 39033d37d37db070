"""Exact per-stage inference cost of a DynAdapterViT, in multiply-accumulates (MACs) per image.

Unit: MACs, fvcore's convention (ViT-B/16 at 224² = 17.58 G, which the field calls "17.58 GFLOPs").
`FlopCounterMode` counts FLOPs = 2 x MACs; we halve it. Only matmuls and convolutions are counted (norms,
softmax, GELU and residual adds are a fraction of a percent of a ViT and fvcore ignores them too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dynadapter.models.dyn_vit import MAX_CONFIDENCE


@contextlib.contextmanager
def unfused_attention(model: nn.Module) -> Iterator[None]:
    """Temporarily switch every timm Attention to its explicit-matmul path.

    Fused `scaled_dot_product_attention` is invisible to FlopCounterMode on CPU (it counts 0), so the two
    attention matmuls would be missing; the explicit path computes the same function with counted matmuls.
    """
    saved = [(m, m.fused_attn) for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    try:
        for m, _ in saved:
            m.fused_attn = False
        yield
    finally:
        for m, flag in saved:
            m.fused_attn = flag


def count_macs(fn: Callable[..., object], *args, **kwargs) -> int:
    """MACs of one call `fn(*args, **kwargs)` under no_grad (FlopCounterMode FLOPs / 2)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops()) // 2


def head_runs(thresholds: Sequence[float] | torch.Tensor | None, num_exits: int) -> list[bool]:
    """Which exit heads run at inference: the last always; an early one only if its threshold can be met
    (<= 1). None: all of them."""
    if thresholds is None:
        return [True] * num_exits
    th = [float(t) for t in (thresholds.tolist() if isinstance(thresholds, torch.Tensor) else thresholds)]
    if len(th) != num_exits:
        raise ValueError(f"need {num_exits} thresholds (one per exit), got {len(th)}")
    return [t <= MAX_CONFIDENCE for t in th[:-1]] + [True]


@dataclass
class StageCosts:
    """Per-image inference cost of each piece of a multi-exit model, all in MACs.

    embed: patch embedding (+ position embedding, no MACs); stages[s]: the blocks of stage s with their PETL
    branches; heads[s]: exit head s (pooling + head). exits: the 1-based block after which each head sits.
    """

    embed: int
    stages: list[int]
    heads: list[int]
    exits: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.stages) != len(self.heads) or not self.stages:
            raise ValueError(f"need one head per stage, got {len(self.stages)} stages and {len(self.heads)} heads")

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def cumulative(self, thresholds: Sequence[float] | torch.Tensor | None = None) -> list[int]:
        """MACs of a sample that leaves at exit s: embed + stages 0..s + the heads 0..s that ran.

        Without `thresholds` every head runs. With them, an early head whose threshold no confidence can reach
        (> 1) is skipped, as `forward_dynamic` skips it: so "everyone to the last exit" costs exactly
        `full_depth_baseline()`.
        """
        active = head_runs(thresholds, self.num_exits)
        out, total = [], self.embed
        for stage, head, runs in zip(self.stages, self.heads, active):
            total += stage + (head if runs else 0)
            out.append(total)
        return out

    def full(self) -> int:
        """MACs of a sample that leaves at the last exit (every stage and every head evaluated)."""
        return self.cumulative()[-1]

    def full_depth_baseline(self) -> int:
        """MACs of the static full-depth model: embed + every stage + only the last head.

        This is the reference for budgets and "fraction of full depth": what the same backbone + PETL method
        costs without early exits (the single head of an `early_exit=False` model is the light last head).
        """
        return self.embed + sum(self.stages) + self.heads[-1]

    def to_dict(self) -> dict[str, object]:
        """Plain data for logging (every value in MACs)."""
        return {
            "embed_macs": self.embed,
            "stage_macs": list(self.stages),
            "head_macs": list(self.heads),
            "cumulative_macs": self.cumulative(),
            "full_macs": self.full(),
            "full_depth_baseline_macs": self.full_depth_baseline(),
            "exits": list(self.exits),
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> StageCosts:
        """The inverse of `to_dict` (derived entries are recomputed, not read)."""
        return cls(int(d["embed_macs"]), list(d["stage_macs"]), list(d["head_macs"]), list(d.get("exits", [])))


def _probe_input(model: nn.Module) -> torch.Tensor:
    backbone = model.backbone
    pe = backbone.patch_embed
    size = pe.img_size if pe.img_size is not None else (224, 224)
    ref = next(model.parameters())
    return torch.zeros(1, pe.proj.in_channels, *size, device=ref.device, dtype=ref.dtype)


def measure_stage_costs(model: nn.Module, x: torch.Tensor | None = None) -> StageCosts:
    """Measure embed / per-stage / per-head MACs of a DynAdapterViT on one image (eval mode, attention unfused).

    `x`: an optional 1-image probe (default: zeros at the backbone's img_size on the model's device; a model
    on the `meta` device is measured without computing anything). Measure the model you deploy: after
    `merge_petl`, mergeable branches cost nothing.
    """
    if x is None:
        x = _probe_input(model)
    if x.shape[0] != 1:
        raise ValueError(f"measure_stage_costs expects a 1-image probe, got batch {x.shape[0]}")
    was_training = model.training
    model.eval()
    try:
        with unfused_attention(model), torch.no_grad():
            embed = count_macs(model.embed, x)
            tokens = model.embed(x)
            stages, heads = [], []
            for s in range(len(model.exits)):
                stages.append(count_macs(model.run_stage, tokens, s))
                tokens = model.run_stage(tokens, s)
                heads.append(count_macs(model.exit_logits, tokens, s))
    finally:
        model.train(was_training)
    return StageCosts(embed=embed, stages=stages, heads=heads, exits=list(model.exits))


def dynamic_macs(costs: StageCosts, exit_index: torch.Tensor | Sequence[int],
                 thresholds: Sequence[float] | torch.Tensor | None = None) -> float:
    """Mean MACs per sample actually executed when sample i leaves at exit `exit_index[i]` (0-based);
    `thresholds` (optional) tell which early heads were skipped (see `StageCosts.cumulative`)."""
    idx = torch.as_tensor(exit_index, dtype=torch.long)
    if idx.numel() == 0:
        raise ValueError("dynamic_macs needs at least one sample")
    cum = torch.tensor(costs.cumulative(thresholds), dtype=torch.float64, device=idx.device)
    return float(cum[idx].mean())


def vit_macs_closed_form(
    img_size: int,
    patch: int,
    dim: int,
    depth: int,
    mlp_ratio: float = 4.0,
    num_classes: int = 1000,
    num_prefix_tokens: int = 1,
    in_chans: int = 3,
) -> int:
    """Analytic MACs of a plain ViT with an LN + Linear head (matmuls and the patch conv only).

    patch embed P·(c·p²)·D; per block with N = P + prefix tokens: qkv 3ND², attention scores and weighted sum
    2N²D, proj ND², MLP 2·N·D·(rD); head D·C.
    """
    patches = (img_size // patch) ** 2
    n = patches + num_prefix_tokens
    hidden = int(dim * mlp_ratio)
    embed = patches * in_chans * patch * patch * dim
    block = 3 * n * dim * dim + 2 * n * n * dim + n * dim * dim + 2 * n * dim * hidden
    return embed + depth * block + dim * num_classes
