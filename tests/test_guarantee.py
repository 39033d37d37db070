"""Certified thresholds (dynadapter.inference.guarantee): the stated probability holds over many simulated
validation draws from distributions whose true mean cost / accuracy drop is known, and `null` is today's
calibration exactly.

The populations are large simulated samples (50,000 images: their means are the truth to about 3e-3); each
"validation set" is a fresh draw of n images from the same distribution. A method without a margin (the val
mean, today's `budget_confidence: null`) is over the budget about half the time, so the tolerance used here
(alpha plus 2.5 binomial standard errors over 200 draws) cannot pass it, and the tests check that too.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dynadapter.inference import StageCosts, calibrate, calibrate_drop
from dynadapter.inference.guarantee import GRID, NEVER, binomial_lower, binomial_upper, path_stats

STAGES = np.array([3.0, 2.5, 2.5, 2.5])
HEADS = np.array([0.1, 0.1, 0.1, 0.1])
BASE = STAGES.sum() + HEADS[-1]  # full depth: every stage, the last head only


def cost_table(th: np.ndarray) -> np.ndarray:
    runs = np.ones(th.shape, dtype=bool)
    runs[:, :-1] = th[:, :-1] <= 1.0
    return np.cumsum(STAGES)[None, :] + np.cumsum(HEADS[None, :] * runs, axis=1)


def population(kind: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Confidences [4, n] and correctness [4, n] of a constructed 4-exit model."""
    if kind == "uniform":  # exit costs spread evenly
        conf = rng.random((4, n))
    elif kind == "skewed":  # most images confident at exit 0, rare expensive ones (a right-skewed cost)
        conf = np.stack([rng.beta(a, 1.0, size=n) for a in (6.0, 2.0, 2.0, 2.0)])
    else:
        raise ValueError(kind)
    # later exits are more accurate; an image an early exit gets right is more often right at the last too
    base = rng.random(n)
    correct = np.stack([base < p for p in (0.70, 0.80, 0.86, 0.90)])
    flip = rng.random(n) < 0.03  # some images only early exits get right (the drop can go both ways)
    correct[0] = np.where(flip, ~correct[-1], correct[0])
    return conf.astype(np.float32), correct


def true_at(pop, thresholds_row0: float) -> tuple[float, float]:
    """(mean cost fraction, accuracy drop) of the population at a shared early-exit threshold."""
    k = min(int(np.searchsorted(pop.thresholds[:, 0], thresholds_row0)), len(pop.thresholds) - 1)
    return float(pop.val_macs[k] / pop.base), float(pop.val_drop[k])


def test_clopper_pearson_closed_forms():
    # 0 successes in n: the upper bound solves (1 - p)^n = alpha; n of n: the lower bound solves p^n = alpha
    assert binomial_upper(np.array([0]), 200, 0.1)[0] == pytest.approx(1 - 0.1 ** (1 / 200), rel=1e-9)
    assert binomial_lower(np.array([200]), 200, 0.1)[0] == pytest.approx(0.1 ** (1 / 200), rel=1e-9)
    assert binomial_upper(np.array([200]), 200, 0.1)[0] == 1.0 and binomial_lower(np.array([0]), 200, 0.1)[0] == 0.0
    # exact coverage: over every true p on a grid, P(p <= upper bound) >= 1 - alpha
    n, alpha = 50, 0.1
    from scipy.stats import binom

    upper = binomial_upper(np.arange(n + 1), n, alpha)
    for p in np.linspace(0.01, 0.99, 99):
        assert binom.pmf(np.arange(n + 1), n, p)[upper >= p].sum() >= 1 - alpha - 1e-9


@pytest.mark.parametrize("kind", ["uniform", "skewed"])
@pytest.mark.parametrize("budget,level", [(0.45, 0.9), (0.6, 0.8), (0.75, 0.95)])
def test_budget_holds_at_the_stated_rate(kind, budget, level):
    rng = np.random.default_rng(hash((kind, budget)) % 2**32)
    pop = path_stats(*population(kind, 50_000, rng), cost_table, BASE)
    draws, n = 200, 200
    over_certified = over_mean = 0
    spent = []
    for _ in range(draws):
        stats = path_stats(*population(kind, n, rng), cost_table, BASE)
        k, bound = stats.for_budget(budget, level)
        assert k is not None and bound <= budget
        true_cost, _ = true_at(pop, stats.thresholds[k, 0])
        over_certified += true_cost > budget
        spent.append(true_cost)
        mean_k = np.flatnonzero(stats.val_macs <= budget * BASE)[-1]  # no margin: the val mean fills the budget
        over_mean += true_at(pop, stats.thresholds[mean_k, 0])[0] > budget
    alpha = 1 - level
    tolerance = alpha + 2.5 * math.sqrt(alpha * (1 - alpha) / draws)
    assert over_certified / draws <= tolerance
    assert over_mean / draws > tolerance  # the test can fail a method without a margin
    assert np.mean(spent) > budget - 0.12  # and the guarantee is not bought by spending nothing


@pytest.mark.parametrize("max_drop", [0.02, 0.04])
def test_accuracy_drop_holds_at_the_stated_rate(max_drop):
    rng = np.random.default_rng(7)
    pop = path_stats(*population("uniform", 50_000, rng), cost_table, BASE)
    draws, n, level = 120, 1000, 0.9
    over, spent = 0, []
    for _ in range(draws):
        stats = path_stats(*population("uniform", n, rng), cost_table, BASE)
        k, bound = stats.for_drop(max_drop, level)
        assert bound <= max_drop
        cost, drop = true_at(pop, stats.thresholds[k, 0])
        over += drop > max_drop
        spent.append(cost)
    alpha = 1 - level
    assert over / draws <= alpha + 2.5 * math.sqrt(alpha * (1 - alpha) / draws)
    assert np.mean(spent) < 0.98  # it does find cheaper thresholds than full depth


def test_deterministic_ends_need_no_estimate():
    rng = np.random.default_rng(1)
    stats = path_stats(*population("uniform", 200, rng), cost_table, BASE)
    floor = (STAGES[0] + HEADS[0]) / BASE
    # budget 1.0: full depth, whose cost is exact (early heads skipped), whatever the confidence asked
    k, bound = stats.for_budget(1.0, 0.99)
    assert stats.thresholds[k].tolist() == [NEVER, NEVER, NEVER, 0.0] and bound == pytest.approx(1.0)
    # exactly the floor: everybody at the first exit; below it: nothing can be certified
    k, bound = stats.for_budget(floor, 0.99)
    assert stats.thresholds[k, 0] == 0.0 and bound == pytest.approx(floor)
    assert stats.for_budget(floor - 0.01, 0.9)[0] is None
    # no drop is allowed: full depth
    k, bound = stats.for_drop(0.0, 0.9)
    assert k == len(stats.thresholds) - 1 and bound == 0.0
    # 200 images cannot certify a drop below the rule of three: 0 errors still leave 1 - 0.05^(1/200)
    assert stats.drop_upper(0.9)[:-1].min() >= 1 - 0.05 ** (1 / 200) - 1e-12


def test_grid_is_fixed_and_ordered():
    assert GRID[0] == 0.0 and GRID[-1] == 1.0 and np.all(np.diff(GRID) > 0)


# ----------------------------------------------------------------- through calibrate (logits -> thresholds)


def logits_case(seed: int, n: int = 200, classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(4, n, classes, generator=g) * torch.tensor([1.0, 1.5, 2.0, 3.0]).view(4, 1, 1)
    logits[torch.arange(4).view(4, 1), torch.arange(n).view(1, n), labels.view(1, n)] += 2.0
    costs = StageCosts(embed=0, stages=[3_000, 2_500, 2_500, 2_500], heads=[100, 100, 100, 100])
    return logits, labels, costs


def reference_path(logits, labels, costs, budget) -> list[float]:
    """Today's rule, written out: the largest cut between observed early-exit confidences whose val mean MACs
    fit the budget."""
    conf = torch.softmax(logits, -1).max(-1).values.numpy()
    u = np.unique(conf[:-1].astype(np.float32))
    cuts = np.concatenate([[0.0], (u[1:] + u[:-1]) / 2, [2.0]]).astype(np.float32)
    best = None
    for t in cuts:
        th = [float(t)] * 3 + [0.0]
        exit_ = np.full(conf.shape[1], 3)
        for s in (2, 1, 0):
            exit_ = np.where(conf[s] >= np.float32(t), s, exit_)
        cum = np.array(costs.cumulative(th), dtype=np.float64)
        if cum[exit_].mean() <= budget * costs.full_depth_baseline():
            best = th
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("budget", [0.4, 0.55, 0.8])
def test_null_is_todays_calibration_exactly(seed, budget):
    logits, labels, costs = logits_case(seed)
    cal = calibrate(val_logits=logits, val_labels=labels, costs=costs, budget_fraction=budget)
    assert cal.thresholds == pytest.approx(reference_path(logits, labels, costs, budget), abs=0)
    assert cal.confidence_level is None and cal.bound is None and cal.target == "budget"
    same = calibrate(val_logits=logits, val_labels=labels, costs=costs, budget_fraction=budget,
                     budget_confidence=None)
    assert same == cal


def test_certified_calibration_through_logits():
    logits, labels, costs = logits_case(3)
    plain = calibrate(val_logits=logits, val_labels=labels, costs=costs, budget_fraction=0.6)
    cal = calibrate(val_logits=logits, val_labels=labels, costs=costs, budget_fraction=0.6, budget_confidence=0.9)
    assert cal.feasible and cal.confidence_level == 0.9
    assert cal.fraction <= cal.bound <= 0.6 and cal.fraction < plain.fraction  # a margin below the val mean
    drop = calibrate_drop(val_logits=logits, val_labels=labels, costs=costs, max_drop=0.1, confidence_level=0.9)
    assert drop.target == "accuracy_drop" and drop.bound <= 0.1 and drop.budget_fraction is None
    with pytest.raises(ValueError, match="certifies the path calibration"):
        calibrate(val_logits=logits, val_labels=labels, costs=costs, budget_fraction=0.6, budget_confidence=0.9,
                  mode="search")
    with pytest.raises(ValueError, match=r"confidence must be a probability in \(0, 1\)"):
        calibrate(val_logits=logits, val_labels=labels, costs=costs, budget_fraction=0.6, budget_confidence=1.5)
