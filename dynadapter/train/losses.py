"""Adaptive prioritization: per-exit loss weights that move over training, and the multi-exit loss they weight."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dynadapter.config import PriorityConfig

SHAPES = ("linear", "cosine", "constant")


class PrioritySchedule:
    """λ_s(t) for exit s at training progress t ∈ [0, 1]: from `start` (t=0) to `end` (t=1).

    shape: linear | cosine (half-cosine ease: flat at both ends, fastest in the middle) | constant (start only).
    `start` / `end` None means every exit weighs 1.0.
    """

    def __init__(
        self,
        num_exits: int,
        start: Sequence[float] | None = None,
        end: Sequence[float] | None = None,
        shape: str = "cosine",
    ):
        if num_exits < 1:
            raise ValueError(f"num_exits must be >= 1, got {num_exits}")
        if shape not in SHAPES:
            raise ValueError(f"train.priority.shape must be one of {SHAPES}, got {shape!r}")
        self.num_exits = num_exits
        self.shape = shape
        self.start = self._weights("start", start)
        self.end = self._weights("end", end)

    def _weights(self, field: str, values: Sequence[float] | None) -> list[float]:
        if values is None:
            return [1.0] * self.num_exits
        values = [float(v) for v in values]
        if len(values) != self.num_exits:
            raise ValueError(
                f"train.priority.{field} has {len(values)} weights but the model has {self.num_exits} exits: {values}"
            )
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise ValueError(f"train.priority.{field} weights must be finite and >= 0, got {values}")
        return values

    @classmethod
    def from_config(cls, cfg: PriorityConfig, num_exits: int) -> PrioritySchedule:
        """Explicit start/end weights when given, else the weights of `cfg.pattern` (see `pattern_weights`)."""
        if cfg.start is not None or cfg.end is not None:
            return cls(num_exits, cfg.start, cfg.end, cfg.shape)
        start, end = pattern_weights(cfg.pattern, cfg.strength, num_exits)
        return cls(num_exits, start, end, cfg.shape)

    def progress(self, t: float) -> float:
        """Fraction of the way from start to end at progress t (t clamped to [0, 1])."""
        t = min(1.0, max(0.0, float(t)))
        if self.shape == "constant":
            return 0.0
        if self.shape == "linear":
            return t
        return 0.5 * (1.0 - math.cos(math.pi * t))

    def weights(self, t: float) -> list[float]:
        a = self.progress(t)
        return [s + (e - s) * a for s, e in zip(self.start, self.end)]

    __call__ = weights

    def __repr__(self) -> str:
        return f"PrioritySchedule(num_exits={self.num_exits}, start={self.start}, end={self.end}, shape={self.shape!r})"


def pattern_weights(pattern: str, strength: float, num_exits: int) -> tuple[list[float], list[float]]:
    """(start, end) per-exit loss weights of a prioritization pattern.

    With u_s = s / (S - 1) the exit's relative depth, shallow_first gives start 1 + ρ(1 - 2u_s) and end
    1 - ρ(1 - 2u_s): shallow exits lead early in training and hand over to deep ones, whose weights rise
    (the paper's heads that "progressively increase / gradually decline"). The idea is curriculum-like: the
    shallow exits fit the easy samples while the frozen features are all they have, then the deep exits take
    the hard ones. deep_first is the mirror image; flat gives 1 everywhere. The mean weight is 1 at every
    step, so the pattern moves emphasis between exits without changing the overall learning rate. One exit
    (a full-depth baseline) always weighs 1.

    Why shallow_first is the default: on the embedded suite, strength 0.5, the train section's settings, val
    prefers it (`bench/priority_patterns.py`, BENCHMARKS.md §2.3: val accuracy at budget 0.5 0.837 vs 0.829
    for deep_first; last exit 0.873 vs 0.862). The tune stage searches the direction and the strength anyway.
    """
    if pattern not in ("flat", "shallow_first", "deep_first"):
        raise ValueError(f"train.priority.pattern must be flat, shallow_first or deep_first, got {pattern!r}")
    if num_exits == 1 or pattern == "flat":
        return [1.0] * num_exits, [1.0] * num_exits
    tilt = [strength * (1 - 2 * s / (num_exits - 1)) for s in range(num_exits)]
    start, end = [1 + t for t in tilt], [1 - t for t in tilt]
    return (start, end) if pattern == "shallow_first" else (end, start)


def as_logits_list(out: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A model's output as a list of per-exit logits (a plain classifier is a single exit)."""
    if isinstance(out, torch.Tensor):
        return [out]
    return list(out)


def multi_exit_loss(
    logits_list: torch.Tensor | Sequence[torch.Tensor],
    targets: torch.Tensor,
    weights: Sequence[float] | torch.Tensor | None = None,
    distill: float = 0.0,
    temperature: float = 2.0,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Σ_s λ_s·CE(ŷ_s, y)  [+ distill · Σ_{s<S-1} T²·KL(softmax(ŷ_S/T) ‖ softmax(ŷ_s/T)), teacher detached].

    Returns the loss and each exit's (detached) cross-entropy. The weights are not normalised: their sum is
    part of what the tuner searches. One exit (full-depth baseline, plain classifier) gives λ_0·CE.
    """
    logits = as_logits_list(logits_list)
    if not logits:
        raise ValueError("multi_exit_loss needs at least one exit's logits")
    if weights is None:
        weights = [1.0] * len(logits)
    if len(weights) != len(logits):
        raise ValueError(f"{len(weights)} loss weights for {len(logits)} exits (train.priority.start/end)")
    if distill < 0 or temperature <= 0:
        raise ValueError(f"need distill >= 0 and temperature > 0, got distill={distill}, temperature={temperature}")

    # Loss maths in fp32 whatever the autocast / engine dtype: CE of bf16 logits loses too much.
    ces = [F.cross_entropy(z.float(), targets) for z in logits]
    loss = sum(w * ce for w, ce in zip(weights, ces))
    if distill > 0 and len(logits) > 1:
        t = float(temperature)
        teacher = F.log_softmax(logits[-1].detach().float() / t, dim=-1)
        kl = sum(
            F.kl_div(F.log_softmax(z.float() / t, dim=-1), teacher, reduction="batchmean", log_target=True)
            for z in logits[:-1]
        )
        loss = loss + distill * (t * t) * kl
    return loss, [ce.detach() for ce in ces]
