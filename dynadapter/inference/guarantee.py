"""Exit thresholds with a stated guarantee on new data: a MACs budget met with confidence, or an accuracy drop
against the last exit bounded with confidence.

Plain `path` calibration takes the largest shared threshold whose mean MACs on the validation images stay within
the budget. It fills the budget on val, so on new data the mean cost is that estimate plus sampling noise, over
the budget about half the time. Here the question is put as a test, with the validation images as the sample:

- **Budget** (`budget_confidence` = 1 - alpha): choose thresholds so that the expected per-image MACs on new
  images from the same distribution, mu(theta), is at most the budget with probability >= 1 - alpha over the
  draw of the validation set.
- **Accuracy drop** (`target: accuracy_drop`, `max_drop` = eps): the cheapest thresholds whose expected accuracy
  drop against the last exit (every image to full depth) is at most eps, with probability >= 1 - alpha.

How (Learn then Test, Angelopoulos et al. 2021, with fixed-sequence testing):
1. The candidate thresholds are a fixed grid (`GRID`, shared by every early exit, chosen before any data), ordered
   by cost: from "everybody leaves at the first exit" to "nobody leaves early".
2. At each candidate an upper confidence bound of the risk at level alpha:
   - the mean cost is exit 0's cost plus, for each later exit s, its extra cost times P(exit >= s); each
     P(exit >= s) gets an exact one-sided Clopper-Pearson bound at alpha / m (m: the probabilities that are not
     known to be 0 or 1 for this candidate; Bonferroni), so the bound needs no normal approximation and holds for
     rare deep exits too;
   - the accuracy drop is P(early exit wrong, last right) - P(early exit right, last wrong): Clopper-Pearson
     upper bound of the first minus lower bound of the second, alpha / 2 each.
3. The candidates are tested in their fixed order (budget: cheap to dear; drop: full depth to cheap), each at
   level alpha, stopping at the first that fails. Fixed-sequence testing keeps the chance that any accepted
   candidate's true risk is over the limit at most alpha, so the chosen one is within it with >= 1 - alpha.

Costs that are known without data need no bound: "everybody at the first exit" costs exactly exit 0's cost and
"nobody leaves early" exactly full depth with accuracy drop 0, whatever the images; they are accepted outside the
sequence (a budget of 1.0 always gets full depth).

`PathStats` holds what this needs from the validation set (counts only), so the served model re-decides at
request time, for any budget, confidence or eps, exactly as the evaluate stage did. numpy + scipy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dynadapter.models.dyn_vit import MAX_CONFIDENCE  # a threshold above it: the head is skipped

NEVER = 2.0  # above any confidence in [0, 1]: nobody leaves at that exit (its head is skipped)
ALWAYS = 0.0  # every confidence reaches it: everybody leaves at that exit
# thresholds shared by the early exits, fixed before any data: every 0.001, plus 1 - 10^-k steps for
# confidences that crowd near 1 (max-softmax of a well-trained head)
GRID = np.unique(np.concatenate([np.linspace(0.0, 1.0, 1001), 1.0 - np.logspace(-7, -3, 41)]).astype(np.float32))


def binomial_upper(k: np.ndarray, n: int, alpha: np.ndarray | float) -> np.ndarray:
    """Exact (Clopper-Pearson) one-sided upper confidence bound of p from k successes in n trials: p <= bound
    with probability >= 1 - alpha."""
    from scipy.stats import beta

    k = np.asarray(k, dtype=np.float64)
    alpha = np.broadcast_to(np.asarray(alpha, dtype=np.float64), k.shape)
    out = np.ones_like(k)
    some = k < n
    out[some] = beta.ppf(1.0 - alpha[some], k[some] + 1, n - k[some])
    return out


def binomial_lower(k: np.ndarray, n: int, alpha: np.ndarray | float) -> np.ndarray:
    """Exact (Clopper-Pearson) one-sided lower confidence bound of p: p >= bound with probability >= 1 - alpha."""
    from scipy.stats import beta

    k = np.asarray(k, dtype=np.float64)
    alpha = np.broadcast_to(np.asarray(alpha, dtype=np.float64), k.shape)
    out = np.zeros_like(k)
    some = k > 0
    out[some] = beta.ppf(alpha[some], k[some], n - k[some] + 1)
    return out


def _check_level(level: float) -> float:
    if not (isinstance(level, (int, float)) and 0.0 < float(level) < 1.0):
        raise ValueError(f"confidence must be a probability in (0, 1), e.g. 0.9; got {level!r}")
    return float(level)


@dataclass
class PathStats:
    """Validation counts along the fixed threshold grid, cheapest candidate first.

    thresholds [K, S] (early exits share one value from GRID, then NEVER; the last exit's is ALWAYS); costs [K, S]
    MACs of leaving at exit s under row k (skipped heads cost nothing); reach [K, S] how many of the n images
    leave at exit s or later; correct [K] right predictions; worse / better [K] images the row gets wrong that the
    last exit gets right / right that the last exit gets wrong; base: full-depth MACs.
    """

    thresholds: np.ndarray
    costs: np.ndarray
    reach: np.ndarray
    correct: np.ndarray
    worse: np.ndarray
    better: np.ndarray
    n: int
    base: float

    # ------------------------------------------------------------------------------------ what val shows

    @property
    def num_exits(self) -> int:
        return self.thresholds.shape[1]

    @property
    def val_macs(self) -> np.ndarray:
        """[K] mean MACs per image on val."""
        shares = self.reach / self.n
        steps = np.diff(self.costs, axis=1)
        return self.costs[:, 0] + (steps * shares[:, 1:]).sum(axis=1)

    @property
    def val_accuracy(self) -> np.ndarray:
        return self.correct / self.n

    @property
    def val_drop(self) -> np.ndarray:
        return (self.worse - self.better) / self.n

    # --------------------------------------------------------------------------------- the bounds

    def _known(self) -> tuple[np.ndarray, np.ndarray]:
        """[K, S] P(exit >= s) known to be 0 (an earlier exit takes everybody) / 1 (no earlier exit takes anyone)."""
        th = self.thresholds
        zero = np.zeros(th.shape, dtype=bool)
        one = np.ones(th.shape, dtype=bool)
        for s in range(1, self.num_exits):
            zero[:, s] = (th[:, :s] <= ALWAYS).any(axis=1)
            one[:, s] = (th[:, :s] > MAX_CONFIDENCE).all(axis=1)
        return zero, one

    def macs_upper(self, level: float) -> np.ndarray:
        """[K] upper confidence bound (level) of the expected MACs per image on new data, each row alone."""
        alpha = 1.0 - _check_level(level)
        zero, one = self._known()
        unknown = ~(zero | one)
        unknown[:, 0] = False  # everybody reaches exit 0
        m = np.maximum(unknown.sum(axis=1, keepdims=True), 1)
        p = np.where(one, 1.0, 0.0)
        bound = binomial_upper(self.reach, self.n, np.broadcast_to(alpha / m, self.reach.shape))
        p = np.where(unknown, bound, p)
        steps = np.diff(self.costs, axis=1)
        return self.costs[:, 0] + (steps * p[:, 1:]).sum(axis=1)

    def drop_upper(self, level: float) -> np.ndarray:
        """[K] upper confidence bound (level) of the expected accuracy drop against the last exit; exactly 0 for
        rows that send everybody to the last exit."""
        alpha = 1.0 - _check_level(level)
        bound = binomial_upper(self.worse, self.n, alpha / 2) - binomial_lower(self.better, self.n, alpha / 2)
        _, one = self._known()
        return np.where(one[:, -1], 0.0, bound)

    # ---------------------------------------------------------------------------------- the choices

    def _full_depth(self) -> int | None:
        """The last row when it sends nobody out early (its cost and drop need no estimate), else None. The first
        row, everybody at exit 0, needs none either: `macs_upper` gives it its exact cost."""
        _, one = self._known()
        return len(self.thresholds) - 1 if one[-1].all() else None

    def for_budget(self, budget: float, level: float) -> tuple[int | None, float]:
        """The dearest candidate accepted by fixed-sequence testing of "expected MACs <= budget" from the
        cheapest up, and its certified bound (a fraction of full depth); (None, bound of the cheapest) when even
        the cheapest cannot be certified. Full depth is accepted whenever budget >= 1 (its cost is exact)."""
        limit = budget * self.base * (1 + 1e-12)  # a budget given as a rounded fraction of this very cost
        upper = self.macs_upper(level)
        last = self._full_depth()
        chosen = None
        for k in range(len(upper) if last is None else last):
            if upper[k] > limit:
                break
            chosen = k
        if last is not None and self.costs[last, -1] <= limit:
            chosen = last
        return chosen, float((upper[chosen] if chosen is not None else upper[0]) / self.base)

    def for_drop(self, max_drop: float, level: float) -> tuple[int, float]:
        """The cheapest candidate accepted by fixed-sequence testing of "expected accuracy drop against the last
        exit <= max_drop" from full depth down, and its certified bound. Full depth itself (drop exactly 0) is
        always accepted."""
        if not (isinstance(max_drop, (int, float)) and 0.0 <= float(max_drop) < 1.0):
            raise ValueError(f"max_drop must be an accuracy drop in [0, 1), e.g. 0.005; got {max_drop!r}")
        upper = self.drop_upper(level)
        last = self._full_depth()
        if last is None:
            raise ValueError("the candidates must end with full depth (nobody leaves early)")
        chosen = last
        for k in range(last - 1, -1, -1):
            if upper[k] > max_drop:
                break
            if self.val_macs[k] <= self.val_macs[chosen]:
                chosen = k
        return chosen, float(upper[chosen])

    # ---------------------------------------------------------------------------------- stored form

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (counts and the early-exit threshold per row; costs come back from the stage costs)."""
        return {"n": int(self.n), "base": float(self.base), "thresholds": self.thresholds.tolist(),
                "costs": self.costs.tolist(), "reach": self.reach.tolist(), "correct": self.correct.tolist(),
                "worse": self.worse.tolist(), "better": self.better.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PathStats:
        return cls(np.asarray(d["thresholds"], dtype=np.float32), np.asarray(d["costs"], dtype=np.float64),
                   np.asarray(d["reach"], dtype=np.int64), np.asarray(d["correct"], dtype=np.int64),
                   np.asarray(d["worse"], dtype=np.int64), np.asarray(d["better"], dtype=np.int64),
                   int(d["n"]), float(d["base"]))


def path_stats(conf: np.ndarray, correct: np.ndarray, cost_table, base: float) -> PathStats:
    """Counts along GRID (then NEVER) from validation confidences conf [S, N] and correctness [S, N].

    cost_table(thresholds [K, S]) -> [K, S] MACs of leaving at each exit. Rows with the same counts are merged
    (keeping the largest threshold: same decisions on val, the fewest early exits elsewhere); the order and the
    test results do not change.
    """
    s_count, n = conf.shape
    if s_count < 2:
        raise ValueError("a guarantee needs at least two exits")
    grid = np.concatenate([GRID, [NEVER]]).astype(np.float32)
    th = np.repeat(grid[:, None], s_count, axis=1)
    th[:, -1] = ALWAYS
    cols = np.arange(n)
    last_right = correct[-1][None, :]
    stats = np.zeros((len(grid), s_count + 3), dtype=np.int64)
    rows = max(1, 2**22 // max(n, 1))  # grid rows per chunk: about 4M entries, whatever the val size
    for lo in range(0, len(grid), rows):
        part = th[lo : lo + rows]
        idx = np.full((len(part), n), s_count - 1, dtype=np.int8 if s_count < 128 else np.int64)
        for s in range(s_count - 2, -1, -1):  # first exit whose confidence reaches the threshold
            idx = np.where(conf[s][None, :] >= part[:, s : s + 1], s, idx)
        right = correct[idx, cols[None, :]]
        for s in range(s_count):
            stats[lo : lo + rows, s] = (idx >= s).sum(axis=1)
        stats[lo : lo + rows, s_count] = right.sum(axis=1)
        stats[lo : lo + rows, s_count + 1] = (last_right & ~right).sum(axis=1)
        stats[lo : lo + rows, s_count + 2] = (right & ~last_right).sum(axis=1)
    reach = stats[:, :s_count]
    keep = np.ones(len(grid), dtype=bool)
    keep[:-1] = (stats[1:] != stats[:-1]).any(axis=1)  # the last row of each run of equal counts
    keep[0] = True  # ALWAYS: its cost is known without data (everybody at exit 0), unlike its run's last row
    th, reach, stats = th[keep], reach[keep], stats[keep]
    return PathStats(th, np.asarray(cost_table(th), dtype=np.float64), reach.astype(np.int64),
                     stats[:, s_count].astype(np.int64), stats[:, s_count + 1].astype(np.int64),
                     stats[:, s_count + 2].astype(np.int64), int(n), float(base))
