"""Wall-clock throughput of dynamic (compacted early-exit) vs full-depth inference, and batched dynamic runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dynadapter.models import DynAdapterViT


def _sync(device: torch.device) -> None:
    # Kernels run asynchronously on accelerators: wait for them so the clock measures the work.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _time_once(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> float:
    _sync(x.device)
    start = time.perf_counter()
    fn(x)
    _sync(x.device)
    return time.perf_counter() - start


def measure_throughput(
    fn: Callable[[torch.Tensor], object], x: torch.Tensor, repeats: int = 5, warmup: int = 1
) -> float:
    """Images per second of `fn(x)` (median over `repeats` timed calls after `warmup` untimed ones, no_grad)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        seconds = statistics.median(_time_once(fn, x) for _ in range(repeats))
    return x.shape[0] / max(seconds, 1e-12)


def exit_shares(exit_index: torch.Tensor, num_exits: int) -> list[float]:
    """The share of samples leaving at each of `num_exits` exits (zeros for an exit nobody takes; all zeros when
    `exit_index` is empty). `exit_index` may live on any device."""
    counts = torch.bincount(exit_index.detach().reshape(-1).cpu(), minlength=num_exits).double()
    return (counts / max(exit_index.numel(), 1)).tolist()


@torch.inference_mode()
def full_depth_forward(model: DynAdapterViT, x: torch.Tensor) -> torch.Tensor:
    """The static model's forward: every stage, only the last head (what `full_depth_baseline()` costs)."""
    tokens = model.embed(x)
    for s in range(len(model.exits)):
        tokens = model.run_stage(tokens, s)
    return model.exit_logits(tokens, len(model.exits) - 1)


@dataclass(frozen=True)
class ThroughputComparison:
    dynamic_images_per_s: float
    full_images_per_s: float
    speedup: float  # dynamic / full, > 1 when early exits pay off
    batch_size: int
    exit_fraction: list[float]  # share of the batch leaving at each exit


def compare_throughput(
    fns: dict[str, Callable[[torch.Tensor], object]], x: torch.Tensor, repeats: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Images per second of each `fns[name](x)` on the same batch, timed interleaved (a, b, c, a, b, c, ...)
    so that machine-load drift hits all alike; each figure is the median over `repeats` (no_grad)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn(x)
        for _ in range(repeats):
            for name, fn in fns.items():
                times[name].append(_time_once(fn, x))
    return {name: x.shape[0] / max(statistics.median(t), 1e-12) for name, t in times.items()}


def dynamic_vs_full(
    model: DynAdapterViT,
    x: torch.Tensor,
    thresholds: torch.Tensor | Sequence[float] | None = None,
    repeats: int = 5,
    warmup: int = 1,
) -> ThroughputComparison:
    """Time compacted `forward_dynamic` and the full-depth forward on the same batch, interleaved
    (`compare_throughput`). `thresholds` None: the model's own `thresholds` buffer."""
    was_training = model.training
    model.eval()
    try:
        ips = compare_throughput({
            "dynamic": lambda inp: model.forward_dynamic(inp, thresholds),
            "full": lambda inp: full_depth_forward(model, inp),
        }, x, repeats=repeats, warmup=warmup)
        with torch.no_grad():
            exits = model.forward_dynamic(x, thresholds).exit_index
    finally:
        model.train(was_training)
    return ThroughputComparison(ips["dynamic"], ips["full"], ips["dynamic"] / ips["full"], x.shape[0],
                                exit_shares(exits, len(model.exits)))


@torch.no_grad()
def run_dynamic(
    model: DynAdapterViT,
    X: torch.Tensor,
    thresholds: torch.Tensor | Sequence[float] | None = None,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic inference over a large image tensor in batches: (predictions [N], exit index [N]).

    Batches are moved to the model's device; results stay there. `thresholds` None: the model's buffer.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    preds, exits = [], []
    try:
        for i in range(0, X.shape[0], batch_size):
            out = model.forward_dynamic(X[i : i + batch_size].to(device), thresholds)
            preds.append(out.preds)
            exits.append(out.exit_index)
    finally:
        model.train(was_training)
    if not preds:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty.clone()
    return torch.cat(preds), torch.cat(exits)


__all__ = [
    "ThroughputComparison",
    "compare_throughput",
    "dynamic_vs_full",
    "exit_shares",
    "full_depth_forward",
    "measure_throughput",
    "run_dynamic",
]
