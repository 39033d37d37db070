"""The multi-exit Dyn-Adapter ViT: a frozen timm ViT cut into stages, an exit head after each stage.

`forward` (training) returns every exit's logits. `forward_dynamic` (inference) runs stage by stage and
compacts the batch: samples confident enough at an exit leave with that prediction, only the rest go on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from timm.layers import global_pool_nlc


@dataclass
class DynamicOutput:
    logits: torch.Tensor  # [B, C] logits of the exit each sample left at
    exit_index: torch.Tensor  # [B] int64, 0-based index into model.exits

    @property
    def preds(self) -> torch.Tensor:
        return self.logits.argmax(dim=-1)


def confidence_score(logits: torch.Tensor, kind: str = "max_softmax") -> torch.Tensor:
    """Higher = more confident, in [0, 1]: max softmax probability, or 1 - normalised entropy."""
    probs = logits.float().softmax(dim=-1)
    if kind == "max_softmax":
        return probs.max(dim=-1).values
    if kind == "entropy":
        ent = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        return 1.0 - ent / torch.log(torch.tensor(float(logits.shape[-1])))
    raise ValueError(f"confidence must be 'max_softmax' or 'entropy', got {kind!r}")


MAX_CONFIDENCE = 1.0  # confidence_score lies in [0, 1]: a threshold above it is never met


class DynAdapterViT(nn.Module):
    def __init__(self, backbone: nn.Module, exits: list[int], heads: nn.ModuleList, confidence: str = "max_softmax"):
        super().__init__()
        depth = len(backbone.blocks)
        if not exits or any(b < 1 or b > depth for b in exits) or sorted(set(exits)) != list(exits):
            raise ValueError(f"exits must be strictly increasing block numbers in 1..{depth}, got {exits}")
        if len(heads) != len(exits):
            raise ValueError(f"{len(heads)} heads for {len(exits)} exits")
        self.backbone = backbone
        self.exits = list(exits)
        self.heads = heads
        self.confidence = confidence
        self.num_classes = heads[-1].fc.out_features
        self.register_buffer("thresholds", torch.full((len(exits),), 2.0), persistent=True)

    # ---- pieces, shared by training, dynamic inference and FLOPs accounting
    @property
    def stage_bounds(self) -> list[tuple[int, int]]:
        starts = [0] + self.exits[:-1]
        return list(zip(starts, self.exits))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.patch_embed(x)
        x = b._pos_embed(x)
        x = b.patch_drop(x)
        return b.norm_pre(x)

    def run_stage(self, tokens: torch.Tensor, stage: int) -> torch.Tensor:
        start, end = self.stage_bounds[stage]
        for block in self.backbone.blocks[start:end]:
            tokens = block(tokens)
        return tokens

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        return global_pool_nlc(tokens, pool_type=b.global_pool or "token", num_prefix_tokens=b.num_prefix_tokens)

    def exit_logits(self, tokens: torch.Tensor, stage: int) -> torch.Tensor:
        return self.heads[stage](self.pool(tokens))

    # ---- training: all exits
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        tokens = self.embed(x)
        out = []
        for s in range(len(self.exits)):
            tokens = self.run_stage(tokens, s)
            out.append(self.exit_logits(tokens, s))
        return out

    # ---- inference: compacted early exit
    def forward_dynamic(self, x: torch.Tensor, thresholds: torch.Tensor | list[float] | None = None) -> DynamicOutput:
        """Each sample leaves at the first exit whose confidence >= its threshold (the last exit takes the rest).

        Only the samples still in flight are computed at each stage, so skipped work is really skipped; an
        early head whose threshold is above 1 (no confidence can reach it) is not run at all. Runs in eval
        mode (dropout off) whatever the caller's mode, which is restored afterwards, under `inference_mode`.
        """
        th = self.thresholds if thresholds is None else torch.as_tensor(thresholds, dtype=torch.float32)
        if th.numel() != len(self.exits):
            raise ValueError(f"need {len(self.exits)} thresholds (one per exit), got {th.numel()}")
        # float32 values, as the buffer holds them, compared in Python (no tensor op per exit)
        th_list = th.to(torch.float32).tolist()
        with torch.inference_mode():
            if not self.training:  # the usual case; switching modes walks every module (a cost at small batches)
                return self._forward_dynamic(x, th_list)
            self.eval()
            try:
                return self._forward_dynamic(x, th_list)
            finally:
                self.train()

    def _forward_dynamic(self, x: torch.Tensor, th: list[float]) -> DynamicOutput:
        n, last = x.shape[0], len(self.exits) - 1
        exit_index = torch.full((n,), last, dtype=torch.long, device=x.device)
        out_logits = None
        alive = None  # indices (into x) of the samples still in flight; None: all of them, in order
        tokens = self.embed(x)
        for s in range(last + 1):
            tokens = self.run_stage(tokens, s)
            if s < last and th[s] > MAX_CONFIDENCE:  # nobody can leave here: don't pay for the head
                continue
            logits = self.exit_logits(tokens, s)
            if s == last:
                if out_logits is None:  # every sample went the whole way: nothing to scatter
                    return DynamicOutput(logits, exit_index)
                out_logits.index_copy_(0, alive, logits)  # alive is set once anyone has left
                break
            stay = confidence_score(logits, self.confidence) < th[s]
            kept = stay.nonzero().squeeze(1)  # one host sync per exit: how many go on
            if kept.numel() == stay.numel():  # nobody leaves here
                continue
            if kept.numel() == 0 and out_logits is None:  # the whole batch leaves together: nothing to scatter
                return DynamicOutput(logits, exit_index.fill_(s))
            if out_logits is None:
                out_logits = logits.new_empty((n, logits.shape[-1]))
            left = (~stay).nonzero().squeeze(1)
            rows = left if alive is None else alive.index_select(0, left)
            out_logits.index_copy_(0, rows, logits.index_select(0, left))
            exit_index.index_fill_(0, rows, s)
            if kept.numel() == 0:
                break
            alive = kept if alive is None else alive.index_select(0, kept)
            tokens = tokens.index_select(0, kept)
        return DynamicOutput(out_logits, exit_index)

    def set_thresholds(self, thresholds) -> None:
        self.thresholds.copy_(torch.as_tensor(thresholds, dtype=torch.float32))
