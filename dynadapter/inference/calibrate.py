"""Exit-threshold calibration under a MACs budget, on the validation split only; test is evaluated apart.

Per-exit logits are computed once (`collect_exit_logits`); every threshold setting is then simulated
without touching the model (`simulate`), with the same exit rule and the same costs as
`DynAdapterViT.forward_dynamic` (an early head whose threshold is above 1 is skipped and costs nothing).
Budgets are fractions of `StageCosts.full_depth_baseline()`: the static model (all blocks, last head only).

Two modes:
- `path` (default): one threshold shared by every early exit, the largest the budget affords. Raising it only
  moves samples to later exits, so cost grows with it, and a larger budget never sends a sample to an earlier
  exit: accuracy follows the budget instead of the noise of 200 validation images. Budget 1.0 sends every
  sample to the last exit at exactly the full-depth cost.
- `search`: per-exit thresholds maximising validation accuracy within the budget (shared-threshold grid plus
  coordinate ascent). It fits the validation set harder; `compare_modes` measures whether that pays on
  held-out validation halves.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from dynadapter.devices import module_device
from dynadapter.inference.flops import StageCosts
from dynadapter.models import confidence_score
from dynadapter.inference.guarantee import ALWAYS, NEVER, PathStats, path_stats
from dynadapter.inference.runtime import exit_shares
from dynadapter.models.dyn_vit import MAX_CONFIDENCE

# NEVER: a threshold above any confidence in [0, 1]: nobody leaves at that exit, and its head is skipped;
# ALWAYS: everybody leaves; also stored for the last exit, whose threshold is never read
MODES = ("path", "search")


def _batches(data, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    if isinstance(data, torch.Tensor):
        for i in range(0, data.shape[0], batch_size):
            yield data[i : i + batch_size], None
        return
    for batch in data:  # a DataLoader of images or of (images, labels, ...)
        if isinstance(batch, (tuple, list)):
            yield batch[0], (batch[1] if len(batch) > 1 else None)
        elif isinstance(batch, dict):
            yield batch["image"], batch.get("label")
        else:
            yield batch, None


@torch.no_grad()
def collect_exit_logits(
    model: nn.Module, data, batch_size: int = 256, return_labels: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Every exit's logits for every sample, [S, N, C] float32 on the model's device (eval mode, no_grad).

    `data`: an image tensor [N, 3, H, W] (batched here) or an iterable of image batches / (images, labels)
    batches (a DataLoader). With `return_labels`, also returns the loader's labels [N] (tensor input: none).
    """
    device = module_device(model)
    was_training = model.training
    model.eval()
    chunks, labels = [], []
    try:
        for x, y in _batches(data, batch_size):
            chunks.append(torch.stack(model(x.to(device)), dim=0).float())
            if y is not None:
                labels.append(torch.as_tensor(y).to(device))
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError("collect_exit_logits got no data")
    logits = torch.cat(chunks, dim=1)
    if not return_labels:
        return logits
    if not labels:
        raise ValueError("return_labels=True but the data yields no labels")
    return logits, torch.cat(labels).long()


# --------------------------------------------------------------------------------------------- simulation
# Scores and predictions are computed on the logits' device; the search itself runs on the host in NumPy:
# it works on S x N numbers, and single-threaded NumPy stays fast where torch's intra-op threads contend.


class Simulation(NamedTuple):
    accuracy: float
    mean_macs: float  # MACs per sample actually executed
    exit_index: torch.Tensor  # [N] 0-based exit each sample leaves at (on the logits' device)


@dataclass(frozen=True)
class _Prepared:
    conf: np.ndarray  # [S, N] float32 confidence of each exit
    correct: np.ndarray  # [S, N] bool, exit s predicts sample n right
    stage_cum: np.ndarray  # [S] float64 MACs of embed + stages 0..s (no heads)
    heads: np.ndarray  # [S] float64 MACs of each exit head
    device: torch.device

    def cost_table(self, thresholds: np.ndarray) -> np.ndarray:
        """[K, S] -> [K, S]: MACs of leaving at exit s under each setting (skipped heads cost nothing)."""
        runs = np.ones(thresholds.shape, dtype=bool)
        runs[:, :-1] = thresholds[:, :-1] <= MAX_CONFIDENCE
        return self.stage_cum[None, :] + np.cumsum(self.heads[None, :] * runs, axis=1)

    @property
    def num_exits(self) -> int:
        return self.conf.shape[0]

    @property
    def num_samples(self) -> int:
        return self.conf.shape[1]


def _prepare(exit_logits: torch.Tensor, labels: torch.Tensor, costs: StageCosts, confidence: str) -> _Prepared:
    if not isinstance(exit_logits, torch.Tensor) or exit_logits.dim() != 3:
        raise ValueError(f"exit logits must be a [S, N, C] tensor, got {getattr(exit_logits, 'shape', type(exit_logits))}")
    s, n, c = exit_logits.shape
    if s != costs.num_exits:
        raise ValueError(f"{s} exits in the logits but {costs.num_exits} in the costs")
    labels = torch.as_tensor(labels, device=exit_logits.device).long().reshape(-1)
    if labels.numel() != n:
        raise ValueError(f"{labels.numel()} labels for {n} samples")
    if n == 0:
        raise ValueError("no samples")
    with torch.no_grad():
        conf = confidence_score(exit_logits.reshape(s * n, c), confidence).reshape(s, n)
        correct = exit_logits.argmax(-1) == labels.unsqueeze(0)
    return _Prepared(
        conf.float().cpu().numpy(),
        correct.cpu().numpy(),
        costs.embed + np.cumsum(np.asarray(costs.stages, dtype=np.float64)),
        np.asarray(costs.heads, dtype=np.float64),
        exit_logits.device,
    )


def _exit_of(conf: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """First exit with confidence >= threshold, the last exit for the rest: thresholds [K, S] -> [K, N]."""
    s_count = conf.shape[0]
    idx = np.full((thresholds.shape[0], conf.shape[1]), s_count - 1, dtype=np.int64)
    for s in range(s_count - 2, -1, -1):  # backwards, so the earliest qualifying exit wins
        idx = np.where(conf[s] >= thresholds[:, s : s + 1], s, idx)
    return idx


def _evaluate(p: _Prepared, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Many settings at once: thresholds [K, S] -> correct counts [K] (int), mean MACs [K], exit index [K, N]."""
    idx = _exit_of(p.conf, thresholds.astype(np.float32))
    counts = p.correct[idx, np.arange(p.num_samples)].sum(axis=1)
    macs = np.take_along_axis(p.cost_table(thresholds), idx, axis=1).mean(axis=1)
    return counts, macs, idx


def _as_thresholds(thresholds, num_exits: int) -> np.ndarray:
    if isinstance(thresholds, torch.Tensor):
        thresholds = thresholds.detach().float().cpu().numpy()
    th = np.asarray(thresholds, dtype=np.float32).reshape(-1)
    if th.size != num_exits:
        raise ValueError(f"need {num_exits} thresholds (one per exit), got {th.size}")
    return th


def simulate(
    exit_logits: torch.Tensor,
    labels: torch.Tensor,
    thresholds: torch.Tensor | Sequence[float],
    costs: StageCosts,
    confidence: str = "max_softmax",
) -> Simulation:
    """Accuracy, mean MACs and exit of each sample for one threshold setting, from precomputed exit logits.

    The exit rule is `forward_dynamic`'s: a sample leaves at the first exit whose confidence >= its threshold;
    the last exit takes the rest.
    """
    p = _prepare(exit_logits, labels, costs, confidence)
    th = _as_thresholds(thresholds, p.num_exits)
    counts, macs, idx = _evaluate(p, th[None])
    return Simulation(int(counts[0]) / p.num_samples, float(macs[0]), torch.from_numpy(idx[0]).to(p.device))


# -------------------------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Calibration:
    """Thresholds chosen on validation data and what they achieve there (MACs per image)."""

    thresholds: list[float]
    val_accuracy: float
    val_macs: float
    fraction: float  # val_macs / full_depth_baseline
    budget_fraction: float | None  # None under target accuracy_drop
    feasible: bool  # False: no setting meets the budget; thresholds are then the cheapest setting
    target: str = "budget"  # budget | accuracy_drop (dynadapter.inference.guarantee)
    confidence_level: float | None = None  # None: the val mean meets the budget, nothing certified
    bound: float | None = None  # certified at confidence_level: MACs fraction (budget) or accuracy drop
    max_drop: float | None = None  # the accuracy_drop target's eps


@dataclass(frozen=True)
class Evaluation:
    """Fixed thresholds applied to held-out (test) data."""

    accuracy: float
    macs: float
    fraction: float  # macs / full_depth_baseline
    exit_fraction: list[float]  # share of samples leaving at each exit


@dataclass(frozen=True)
class CurvePoint:
    thresholds: list[float]
    accuracy: float
    macs: float
    fraction: float
    budget_fraction: float | None = None  # the budget that produced it; None for a shared-threshold point


def _cuts(values: np.ndarray) -> np.ndarray:
    """Thresholds halfway between consecutive distinct values, plus 'everybody leaves' and 'nobody leaves'.

    Cutting between observed confidences (rather than at them) keeps decisions stable under the tiny float
    differences between `forward` and the compacted `forward_dynamic`.
    """
    u = np.unique(values.astype(np.float32))  # sorted ascending
    return np.concatenate([[ALWAYS], (u[1:] + u[:-1]) / 2, [NEVER]]).astype(np.float32)


def _shared_candidates(conf: np.ndarray, num: int) -> np.ndarray:
    cuts = _cuts(conf)
    pick = np.unique(np.round(np.linspace(0, cuts.size - 1, min(num, cuts.size))).astype(np.int64))
    return cuts[pick]


def _best(counts: np.ndarray, macs: np.ndarray, limit: float) -> int | None:
    """Index of the most accurate setting within the budget (ties: cheapest, then first); None if none fits."""
    ok = macs <= limit
    if not ok.any():
        return None
    tied = ok & (counts == counts[ok].max())
    return int(np.argmin(np.where(tied, macs, np.inf)))


def _best_at_exit(p: _Prepared, current: np.ndarray, s: int, limit: float) -> tuple[float, int, float] | None:
    """Exact best threshold of exit s with every other threshold fixed: (threshold, correct count, mean MACs).

    Samples reaching exit s either leave there or follow their fixed path through the later exits; sorting
    them by confidence, every cut is one prefix, so all cuts are scored with two cumulative sums.
    """
    n = p.num_samples
    cols = np.arange(n)
    passed = current.copy()
    passed[s] = NEVER
    after = _exit_of(p.conf, passed[None])[0]  # exit of each sample if nobody leaves at s
    reach = after >= s
    on = passed.copy()
    on[s] = ALWAYS
    cum_on, cum_off = p.cost_table(np.stack([on, passed]))  # head s runs / is skipped (nobody leaves at s)
    fixed_count = int(p.correct[after, cols][~reach].sum())
    fixed_cost = float(cum_on[after][~reach].sum())  # exits before s: the same either way
    order = np.argsort(-p.conf[s][reach], kind="stable")
    c_sorted = p.conf[s][reach][order]
    down_correct = p.correct[after[reach], cols[reach]][order].astype(np.int64)
    down_cost = cum_on[after[reach]][order]
    gain_correct = np.concatenate([[0], np.cumsum(p.correct[s][reach][order].astype(np.int64) - down_correct)])
    gain_cost = np.concatenate([[0.0], np.cumsum(cum_on[s] - down_cost)])
    counts = fixed_count + int(down_correct.sum()) + gain_correct  # [R+1]: the top-j samples leave at s
    macs = (fixed_cost + float(down_cost.sum()) + gain_cost) / n
    macs[0] = (fixed_cost + float(cum_off[after[reach]].sum())) / n  # nobody leaves at s: its head is skipped
    r = c_sorted.size
    valid = np.ones(r + 1, dtype=bool)  # a cut must not split equal confidences
    if r > 1:
        valid[1:r] = c_sorted[:-1] > c_sorted[1:]
    k = _best(np.where(valid, counts, -1), np.where(valid, macs, np.inf), limit)
    if k is None:
        return None
    if k == 0:
        th = NEVER
    elif k == r:
        th = ALWAYS
    else:
        th = float((c_sorted[k - 1] + c_sorted[k]) / 2)
    return th, int(counts[k]), float(macs[k])


LADDER_STEPS = 100  # search limits at every 1% of full depth: the candidate settings do not depend on the budget


def _ascend(p: _Prepared, start: np.ndarray, limit: float, passes: int) -> tuple[np.ndarray, int, float]:
    """Coordinate ascent from a setting within `limit`: each early exit's threshold set to its exact best
    given the others, for up to `passes` rounds."""
    current = start.copy()
    counts, macs, _ = _evaluate(p, current[None])
    cur_count, cur_macs = int(counts[0]), float(macs[0])
    for _ in range(passes):
        improved = False
        for s in range(p.num_exits - 1):
            found = _best_at_exit(p, current, s, limit)
            if found is None:
                continue
            th, count, cost = found
            if count > cur_count or (count == cur_count and cost < cur_macs - 1e-9 * max(cur_macs, 1.0)):
                current[s], cur_count, cur_macs = th, count, cost
                improved = True
        if not improved:
            break
    return current, cur_count, cur_macs


def _candidates(p: _Prepared, base: int, num_candidates: int, passes: int) -> np.ndarray:
    """Every setting the search finds, [K, S], for a ladder of limits that does not depend on any budget.

    1) `num_candidates` thresholds shared by all early exits (from "everybody leaves at exit 0" to "nobody
    leaves early"); 2) at each limit of 1%, 2%, ... of `base` (up to the cost of running every exit),
    coordinate ascent from the best shared setting within it. A budget then picks the most accurate
    candidate within it, so a larger budget can never pick a less accurate one (searching at the budget
    itself could: coordinate ascent reaches different local optima from different limits).
    """
    s_count = p.num_exits
    if s_count == 1:
        return np.full((1, 1), ALWAYS, dtype=np.float32)
    grid = np.repeat(_shared_candidates(p.conf[:-1], num_candidates)[:, None], s_count, axis=1)
    grid[:, -1] = ALWAYS
    counts, macs, _ = _evaluate(p, grid)
    found = [grid]
    top = float(p.cost_table(np.full((1, s_count), ALWAYS, dtype=np.float32))[0, -1])  # every head runs
    for k in range(1, int(np.ceil(max(top, base) / base * LADDER_STEPS)) + 1):
        limit = (k / LADDER_STEPS) * base  # k / 100, not k * 0.01: budgets like 0.35 land exactly on a step
        j = _best(counts, macs, limit)
        if j is None:  # even leaving everyone at exit 0 is over this limit
            continue
        found.append(_ascend(p, grid[j], limit, passes)[0][None])
    return np.unique(np.concatenate(found).astype(np.float32), axis=0)


def _path_grid(p: _Prepared) -> np.ndarray:
    """The shared-threshold path [K, S], thresholds increasing: every cut between observed early-exit
    confidences, from "everybody leaves at exit 0" to NEVER ("everybody to the last exit", early heads
    skipped). Along it each sample's exit only moves later, so the cost grows (until NEVER, which costs
    exactly the full-depth baseline)."""
    if p.num_exits == 1:
        return np.full((1, 1), ALWAYS, dtype=np.float32)
    cuts = _cuts(p.conf[:-1])
    grid = np.repeat(cuts[:, None], p.num_exits, axis=1)
    grid[:, -1] = ALWAYS
    return grid


def _mode_candidates(p: _Prepared, base: int, mode: str, num_candidates: int, passes: int) -> np.ndarray:
    if mode not in MODES:
        raise ValueError(f"calibration mode must be one of {MODES}, got {mode!r}")
    return _path_grid(p) if mode == "path" else _candidates(p, base, num_candidates, passes)


def _choose(counts: np.ndarray, macs: np.ndarray, limit: float, mode: str) -> int | None:
    """path: the last (largest-threshold) candidate within the limit; search: `_best`."""
    if mode == "path":
        ok = np.flatnonzero(macs <= limit)
        return int(ok[-1]) if ok.size else None
    return _best(counts, macs, limit)


def calibrate(
    *,
    val_logits: torch.Tensor,
    val_labels: torch.Tensor,
    costs: StageCosts,
    budget_fraction: float = 0.5,
    confidence: str = "max_softmax",
    mode: str = "path",
    num_candidates: int = 64,
    passes: int = 4,
    budget_confidence: float | None = None,
) -> Calibration:
    """Thresholds for mean MACs <= budget x full-depth MACs, chosen on VALIDATION data.

    budget_confidence (path mode only): instead of the val mean, the expected MACs on new data from the same
    distribution stay within the budget with at least this probability (dynadapter.inference.guarantee); the
    certified bound is returned in `bound`. None: the val mean (below).

    Validation data only: `val_logits` [S, N, C] and `val_labels` [N] must come from the validation split,
    never from test (keyword-only, so every call site names the split it passes). Report test results with
    `evaluate_thresholds` afterwards. The reference is `costs.full_depth_baseline()` (the static model:
    all blocks, last head only).

    mode "path" (default): the largest threshold shared by every early exit whose validation cost fits the
    budget (see the module docstring). mode "search": per-exit thresholds maximising validation accuracy:
    the best of `num_candidates` thresholds shared by all early exits,
    refined by up to `passes` rounds of coordinate ascent (each exit's threshold set to its exact best given
    the others) at limits of every 1% of full depth; the most accurate of these settings within the budget
    wins (ties: the cheapest). The candidates do not depend on the budget, so a larger budget never gives a
    lower validation accuracy. If no setting meets the budget, the cheapest one (everybody leaves at exit
    0) is returned with feasible=False. The last exit's threshold is never read; it is reported as 0.
    """
    p = _prepare(val_logits, val_labels, costs, confidence)
    base = costs.full_depth_baseline()
    if budget_confidence is not None and p.num_exits > 1:
        return _certify_budget(_check_path(p, base, mode), budget_fraction, budget_confidence)
    cal = _calibrate(p, base, budget_fraction, _mode_candidates(p, base, mode, num_candidates, passes), mode)
    if budget_confidence is not None:  # one exit: its cost is the same for every image, known without data
        cal = replace(cal, confidence_level=float(budget_confidence), bound=cal.fraction)
    return cal


def curve_accuracy(*, val_logits: torch.Tensor, val_labels: torch.Tensor, costs: StageCosts,
                   budgets: Sequence[float], confidence: str = "max_softmax", mode: str = "path",
                   num_candidates: int = 64, passes: int = 4) -> float:
    """The mean over `budgets` of the val accuracy `calibrate` (same arguments) reaches at each (validation data
    only): how good one trained model is over the budget curve it serves, the tune stage's `curve` objective.
    The candidates are built once for all budgets."""
    if not budgets:
        raise ValueError("curve_accuracy needs at least one budget")
    p = _prepare(val_logits, val_labels, costs, confidence)
    base = costs.full_depth_baseline()
    candidates = _mode_candidates(p, base, mode, num_candidates, passes)
    return float(np.mean([_calibrate(p, base, float(b), candidates, mode).val_accuracy for b in budgets]))


def _check_path(p: _Prepared, base: int, mode: str) -> PathStats:
    if mode != "path":
        raise ValueError("budget_confidence certifies the path calibration (a fixed, ordered set of candidates); "
                         f"calibration mode {mode!r} searches per-exit thresholds, which it cannot certify")
    return _path_stats(p, base)


def _path_stats(p: _Prepared, base: int) -> PathStats:
    return path_stats(p.conf, p.correct, p.cost_table, base)


def _from_stats(stats: PathStats, k: int, **fields) -> Calibration:
    macs = float(stats.val_macs[k])
    return Calibration(thresholds=[float(t) for t in stats.thresholds[k]], val_accuracy=float(stats.val_accuracy[k]),
                       val_macs=macs, fraction=macs / stats.base, **fields)


def _certify_budget(stats: PathStats, budget_fraction: float, level: float) -> Calibration:
    if not budget_fraction > 0:
        raise ValueError(f"budget_fraction must be > 0, got {budget_fraction}")
    k, bound = stats.for_budget(budget_fraction, level)
    fields = dict(budget_fraction=float(budget_fraction), confidence_level=float(level), bound=bound)
    if k is None:  # not even "everybody at exit 0" fits: the cheapest setting, flagged
        return _from_stats(stats, 0, feasible=False, **fields)
    return _from_stats(stats, k, feasible=True, **fields)


def validation_path_stats(*, val_logits: torch.Tensor, val_labels: torch.Tensor, costs: StageCosts,
                          confidence: str = "max_softmax") -> PathStats:
    """The validation counts along the fixed threshold grid (`guarantee.PathStats`), from which a budget or an
    accuracy drop is certified at any confidence without the logits (what the served model stores)."""
    return _path_stats(_prepare(val_logits, val_labels, costs, confidence), costs.full_depth_baseline())


def calibrate_drop(
    *,
    val_logits: torch.Tensor,
    val_labels: torch.Tensor,
    costs: StageCosts,
    max_drop: float,
    confidence_level: float = 0.9,
    confidence: str = "max_softmax",
) -> Calibration:
    """The cheapest shared threshold whose expected accuracy drop against the last exit is at most `max_drop`
    with probability >= `confidence_level` (dynadapter.inference.guarantee), chosen on VALIDATION data only.
    Always feasible: full depth has drop 0."""
    p = _prepare(val_logits, val_labels, costs, confidence)
    if p.num_exits == 1:  # the last exit is the only one: no drop
        cal = _calibrate(p, costs.full_depth_baseline(), 1.0, np.full((1, 1), ALWAYS, dtype=np.float32))
        return replace(cal, budget_fraction=None, target="accuracy_drop", confidence_level=float(confidence_level),
                       bound=0.0, max_drop=float(max_drop))
    stats = _path_stats(p, costs.full_depth_baseline())
    k, bound = stats.for_drop(max_drop, confidence_level)
    return _from_stats(stats, k, budget_fraction=None, feasible=True, target="accuracy_drop",
                       confidence_level=float(confidence_level), bound=bound, max_drop=float(max_drop))


def _calibrate(p: _Prepared, base: int, budget_fraction: float, candidates: np.ndarray,
               mode: str = "search") -> Calibration:
    if not budget_fraction > 0:
        raise ValueError(f"budget_fraction must be > 0, got {budget_fraction}")
    counts, macs, _ = _evaluate(p, candidates)
    k = _choose(counts, macs, budget_fraction * base, mode)
    feasible = k is not None
    th = candidates[k] if feasible else np.full(p.num_exits, ALWAYS, dtype=np.float32)
    counts, macs, _ = _evaluate(p, th[None])
    return Calibration(
        thresholds=[float(t) for t in th],
        val_accuracy=int(counts[0]) / p.num_samples,
        val_macs=float(macs[0]),
        fraction=float(macs[0]) / base,
        budget_fraction=float(budget_fraction),
        feasible=feasible,
    )


def sweep(
    *,
    val_logits: torch.Tensor,
    val_labels: torch.Tensor,
    costs: StageCosts,
    budgets: Sequence[float] | None = None,
    confidence: str = "max_softmax",
    shared_points: int = 32,
    mode: str = "path",
    num_candidates: int = 64,
    passes: int = 4,
    budget_confidence: float | None = None,
) -> list[CurvePoint]:
    """The validation accuracy-MACs curve: `calibrate` (in `mode`) at each budget plus a shared-threshold sweep.

    Validation data only (see `calibrate`). Points are sorted by MACs, duplicates removed; feed them to
    `pareto_front` for the frontier. Default budgets: 0.05, 0.10, ..., 1.00 of full depth; infeasible
    budgets give no point.
    """
    budgets = [round(0.05 * i, 4) for i in range(1, 21)] if budgets is None else list(budgets)
    p = _prepare(val_logits, val_labels, costs, confidence)
    base = costs.full_depth_baseline()
    if budget_confidence is not None and p.num_exits > 1:
        stats = _check_path(p, base, mode)
        calibrated = [_certify_budget(stats, float(b), budget_confidence) for b in budgets]
    else:
        candidates = _mode_candidates(p, base, mode, num_candidates, passes)
        calibrated = [_calibrate(p, base, float(b), candidates, mode) for b in budgets]
    points: list[CurvePoint] = []
    for b, cal in zip(budgets, calibrated):
        if cal.feasible:
            points.append(CurvePoint(cal.thresholds, cal.val_accuracy, cal.val_macs, cal.fraction, float(b)))
    if p.num_exits > 1 and shared_points > 0:
        grid = np.repeat(_shared_candidates(p.conf[:-1], shared_points)[:, None], p.num_exits, axis=1)
        grid[:, -1] = ALWAYS
        counts, macs, _ = _evaluate(p, grid)
        for th, c, m in zip(grid, counts.tolist(), macs.tolist()):
            points.append(CurvePoint([float(t) for t in th], c / p.num_samples, m, m / base))
    seen, unique = set(), []
    for pt in sorted(points, key=lambda q: (q.macs, -q.accuracy)):
        key = (round(pt.macs, 6), pt.accuracy, tuple(pt.thresholds))
        if key not in seen:
            seen.add(key)
            unique.append(pt)
    return unique


def evaluate_thresholds(
    test_logits: torch.Tensor,
    test_labels: torch.Tensor,
    thresholds: torch.Tensor | Sequence[float],
    costs: StageCosts,
    confidence: str = "max_softmax",
) -> Evaluation:
    """Apply thresholds chosen on validation to held-out data: accuracy, mean MACs, exit shares."""
    sim = simulate(test_logits, test_labels, thresholds, costs, confidence)
    return Evaluation(sim.accuracy, sim.mean_macs, sim.mean_macs / costs.full_depth_baseline(),
                      exit_shares(sim.exit_index, costs.num_exits))


def compare_modes(
    *,
    val_logits: torch.Tensor,
    val_labels: torch.Tensor,
    costs: StageCosts,
    budget_fraction: float = 0.5,
    confidence: str = "max_softmax",
    repeats: int = 5,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Each calibration mode judged fairly on validation data alone: split val in random halves, calibrate on
    one half, score the other (both ways, `repeats` random splits). Returns {mode: {"accuracy", "fraction"}},
    the means over the 2 x repeats held-out halves, so "does `search` win?" is answered without test."""
    p = _prepare(val_logits, val_labels, costs, confidence)
    n = p.num_samples
    if n < 4:
        raise ValueError(f"compare_modes needs at least 4 validation samples, got {n}")
    base = costs.full_depth_baseline()
    rng = np.random.default_rng(seed)
    scores: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    for _ in range(repeats):
        perm = rng.permutation(n)
        halves = (perm[: n // 2], perm[n // 2 :])
        for fit_idx, held_idx in (halves, halves[::-1]):
            fit_p = _Prepared(p.conf[:, fit_idx], p.correct[:, fit_idx], p.stage_cum, p.heads, p.device)
            held_p = _Prepared(p.conf[:, held_idx], p.correct[:, held_idx], p.stage_cum, p.heads, p.device)
            for mode in MODES:
                cal = _calibrate(fit_p, base, budget_fraction, _mode_candidates(fit_p, base, mode, 64, 4), mode)
                counts, macs, _ = _evaluate(held_p, np.asarray([cal.thresholds], dtype=np.float32))
                scores[mode].append((int(counts[0]) / held_p.num_samples, float(macs[0]) / base))
    return {m: {"accuracy": float(np.mean([a for a, _ in v])), "fraction": float(np.mean([f for _, f in v]))}
            for m, v in scores.items()}
