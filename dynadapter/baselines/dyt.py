"""Dynamic Tuning (DyT, Zhao et al., NeurIPS 2024), the closest published rival, on our backbone and Adapter.

DyT ("MLP dispatch" variant) keeps the full depth but lets each block's MLP see only some tokens:

- a token dispatcher per block, one Linear(D, 1) + sigmoid on the MLP's input, decides per token whether the
  block's (frozen) MLP runs on it; the prefix (class) token is always processed, since the head reads it;
- every token passes the block's adapter (AdaptFormer, parallel to the MLP), so skipped tokens are still
  adapted: the block's MLP term is `mask * mlp(h) + adapter(h)`;
- training: Gumbel-sigmoid with temperature 5 and a straight-through hard mask (0/1 forward, the soft mask's
  gradient backward); the loss is CE of the dynamic model + CE of the complete model (every token through
  every MLP, same weights) + KL(complete || dynamic) with the complete model detached as teacher +
  `rate_weight * (activation rate - r)^2`, the rate being the mean mask over blocks and non-prefix tokens;
- inference: a token is processed when its dispatcher's sigmoid > 0.5; the processed tokens of the whole batch
  are gathered, run through the MLP, and scattered back: skipped work is really skipped, so the speed is
  measured, not assumed.

The model is our full-depth Adapter model (a `DynAdapterViT` with one head after the last block) whose block
MLPs are wrapped in `DispatchedMLP`; it trains with the shared trainer through `DyTObjective`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dynadapter.config import BackboneConfig, ModelConfig, SparsityConfig
from dynadapter.inference.flops import count_macs, unfused_attention
from dynadapter.models import DynAdapterViT, build_model
from dynadapter.models.petl.adapter import ParallelAdapterMLP

TEMPERATURE = 5.0
RATE_WEIGHT = 2.0


class DispatchedMLP(nn.Module):
    """`mask * mlp(h) + adapter(h)` with a per-token dispatcher deciding the mask (see the module docstring).

    `force`: None lets the dispatcher decide; True processes every token (the complete model); False only the
    prefix tokens (used to measure the fixed part of the cost). `record`: when set (eval), each call appends
    the number of processed non-prefix tokens per sample to `self.counts`.
    """

    def __init__(self, adapted: ParallelAdapterMLP, dim: int, num_prefix: int, temperature: float = TEMPERATURE):
        super().__init__()
        self.adapted = adapted
        self.router = nn.Linear(dim, 1)
        nn.init.trunc_normal_(self.router.weight, std=0.02)  # DyT's (timm's) Linear init: ~half the tokens at first
        nn.init.zeros_(self.router.bias)
        self.num_prefix = num_prefix
        self.temperature = temperature
        self.force: bool | None = None
        self.record = False
        self.counts: list[torch.Tensor] = []
        self.rate: torch.Tensor | None = None  # training: mean mask of the last call (carries the gradient)

    def _prefix_on(self, mask: torch.Tensor) -> torch.Tensor:
        p = self.num_prefix
        return torch.cat([torch.ones_like(mask[:, :p]), mask[:, p:]], dim=1) if p else mask

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mlp, adapter = self.adapted.base, self.adapted.branch(h)
        if self.force is True and self.training:  # the complete model: no dispatcher at all
            return mlp(h) + adapter
        logits = self.router(h).squeeze(-1)  # [B, N]
        if self.training:
            u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
            soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / self.temperature)  # Gumbel-sigmoid
            mask = self._prefix_on((soft > 0.5).to(soft.dtype) + soft - soft.detach())  # straight-through
            self.rate = mask[:, self.num_prefix:].mean()
            return mlp(h) * mask.unsqueeze(-1) + adapter
        keep = logits > 0 if self.force is None else torch.full_like(logits, bool(self.force), dtype=torch.bool)
        keep[:, : self.num_prefix] = True
        if self.record:
            self.counts.append(keep[:, self.num_prefix:].sum(1).cpu())
        flat = h.reshape(-1, h.shape[-1])
        idx = keep.reshape(-1).nonzero().squeeze(1)
        out = torch.zeros_like(flat).index_copy_(0, idx, mlp(flat.index_select(0, idx)))
        return out.view_as(h) + adapter


def dispatchers(model: nn.Module) -> list[DispatchedMLP]:
    return [m for m in model.modules() if isinstance(m, DispatchedMLP)]


@contextlib.contextmanager
def forced(model: nn.Module, force: bool | None) -> Iterator[None]:
    """Every dispatcher set to `force` for the duration (True: complete model, False: prefix tokens only)."""
    ds = dispatchers(model)
    saved = [d.force for d in ds]
    try:
        for d in ds:
            d.force = force
        yield
    finally:
        for d, f in zip(ds, saved):
            d.force = f


def build_dyt(backbone_cfg: BackboneConfig, model_cfg: ModelConfig, num_classes: int,
              sparsity: SparsityConfig | None = None, checkpoint: str | Path | None = None,
              backbone: nn.Module | None = None, temperature: float = TEMPERATURE) -> DynAdapterViT:
    """The full-depth Adapter model of `model_cfg` (its petl.adapter settings) with a dispatcher in every block
    (the arguments are `build_model`'s)."""
    cfg = model_cfg.model_copy(update={"early_exit": False, "exits": None,
                                       "petl": model_cfg.petl.model_copy(update={"method": "adapter"})})
    model = build_model(backbone_cfg, cfg, num_classes, sparsity, checkpoint, backbone=backbone)
    vit = model.backbone
    for block in vit.blocks:
        block.mlp = DispatchedMLP(block.mlp, vit.embed_dim, vit.num_prefix_tokens, temperature)
    return model


@dataclass
class DyTObjective:
    """DyT's training loss for the shared trainer (`fit(..., objective=DyTObjective(r))`); returns the loss and
    the CEs of the dynamic and the complete model."""

    target_rate: float
    rate_weight: float = RATE_WEIGHT
    distill_weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.target_rate <= 1.0:
            raise ValueError(f"DyT activation rate r must lie in [0, 1], got {self.target_rate}")

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with forced(model, True):
            complete = model(x)[-1].float()
        dynamic = model(x)[-1].float()
        rates = [d.rate for d in dispatchers(model)]
        if not rates or any(r is None for r in rates):
            raise ValueError("DyTObjective needs a model built by build_dyt, in training mode")
        rate = torch.stack(rates).mean()
        ce_dyn, ce_full = F.cross_entropy(dynamic, y), F.cross_entropy(complete, y)
        kl = F.kl_div(F.log_softmax(dynamic, -1), F.log_softmax(complete.detach(), -1), reduction="batchmean",
                      log_target=True)
        loss = ce_dyn + ce_full + self.distill_weight * kl + self.rate_weight * (rate - self.target_rate) ** 2
        return loss, [ce_dyn.detach(), ce_full.detach()]


@dataclass
class DyTCosts:
    """Per-image MACs of a DyT model: `fixed` (embedding, attention, adapters, dispatchers, head, and the MLP
    on the prefix tokens) + `per_token` for each non-prefix token an MLP processes."""

    fixed: int
    per_token: float
    tokens: int  # non-prefix tokens per block
    depth: int

    def macs(self, processed: torch.Tensor) -> torch.Tensor:
        """MACs per image given the processed non-prefix tokens summed over blocks ([N])."""
        return self.fixed + self.per_token * processed.double()

    @property
    def complete(self) -> float:
        return self.fixed + self.per_token * self.tokens * self.depth


def measure_dyt_costs(model: DynAdapterViT) -> DyTCosts:
    """Counted (FlopCounterMode) MACs of one image with every token processed and with none: the difference is
    the MLP's exact per-token cost, linear in the tokens processed."""
    vit = model.backbone
    pe = vit.patch_embed
    x = torch.zeros(1, pe.proj.in_channels, *pe.img_size, device=next(model.parameters()).device)
    was = model.training
    model.eval()
    try:
        with unfused_attention(model):
            with forced(model, True):
                every = count_macs(model, x)
            with forced(model, False):
                none = count_macs(model, x)
    finally:
        model.train(was)
    tokens, depth = pe.num_patches, len(vit.blocks)
    return DyTCosts(fixed=none, per_token=(every - none) / (tokens * depth), tokens=tokens, depth=depth)


@torch.no_grad()
def predict_dyt(model: DynAdapterViT, X: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, C] of real token-skipping inference and the processed non-prefix tokens per image summed
    over blocks [N] (what `DyTCosts.macs` prices)."""
    ds = dispatchers(model)
    was = model.training
    model.eval()
    logits, processed = [], []
    try:
        for d in ds:
            d.record, d.counts = True, []
        for i in range(0, X.shape[0], batch_size):
            logits.append(model(X[i: i + batch_size])[-1].float())
            processed.append(torch.stack([d.counts[-1] for d in ds]).sum(0))
    finally:
        for d in ds:
            d.record, d.counts = False, []
        model.train(was)
    return torch.cat(logits), torch.cat(processed)


def activation_rate(processed: torch.Tensor, costs: DyTCosts) -> float:
    """Mean share of (non-prefix token, block) pairs whose MLP ran."""
    return float(processed.double().mean()) / (costs.tokens * costs.depth)
