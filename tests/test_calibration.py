"""Contracts of the validation-only threshold calibration (`dynadapter.inference.calibrate`), on hand-made exit
logits and `StageCosts` whose right answers are known: `collect_exit_logits` reads every batch shape a loader
yields; `simulate` / `evaluate_thresholds` accept thresholds as lists or tensors, charge what `forward_dynamic`
executes and report one exit share per exit; `calibrate` handles single- and two-exit models, and its search
mode is exact where it can be (one early exit: every cut; one coordinate step: the best threshold of that exit
given the others); `sweep` is `calibrate` at each budget (default budgets 0.05 ... 1.00) plus `shared_points`
shared-threshold points, sorted and deduplicated; `compare_modes` scores both modes on held-out halves that
partition the validation set, reproducibly for a seed; the public defaults and error messages."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dynadapter.inference import (
    NEVER,
    StageCosts,
    calibrate,
    collect_exit_logits,
    compare_modes,
    evaluate_thresholds,
    simulate,
    sweep,
)
from dynadapter.models import confidence_score
from helpers import images, one_thread, tiny_model  # noqa: F401

MODES = ("path", "search")
DEFAULT_BUDGETS = [round(0.05 * i, 4) for i in range(1, 21)]


def random_problem(seed: int, num_exits: int = 4, n: int = 60, num_classes: int = 5, quantize: bool = False):
    """Exit logits that get more accurate with depth, their labels, and integer costs (heads not free)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    logits = torch.randn(num_exits, n, num_classes, generator=g) * torch.linspace(1.0, 2.5, num_exits).view(-1, 1, 1)
    logits[:, torch.arange(n), labels] += torch.linspace(0.3, 2.0, num_exits).view(-1, 1)
    if quantize:  # coarse logits: many samples share a confidence, so cuts must not split ties
        logits = (logits * 2).round() / 2
    costs = StageCosts(embed=7, stages=[20 + 3 * s for s in range(num_exits)], heads=[4] * num_exits,
                       exits=list(range(1, num_exits + 1)))
    return logits, labels, costs


def all_cuts(conf: torch.Tensor) -> list[float]:
    """Every threshold that makes a different decision on these confidences: 0, midpoints, NEVER."""
    u = np.unique(conf.numpy().astype(np.float32))
    return [0.0] + [float(v) for v in (u[1:] + u[:-1]) / 2] + [NEVER]


# ------------------------------------------------------------------------------------------ exit logits


def test_collect_exit_logits_reads_every_batch_shape_a_loader_yields():
    """Tensors, (images, labels[, extra]) tuples or lists, (images,) tuples, {"image", "label"} dicts and bare
    image batches all give the same logits; labels come from the second tuple item or the "label" key."""
    model = tiny_model("adapter", num_classes=5).eval()
    x = images(6, seed=1)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    ref = collect_exit_logits(model, x, batch_size=4)
    assert ref.shape == (4, 6, 5)
    chunks = [(x[:4], y[:4]), (x[4:], y[4:])]
    with_labels = {
        "tuples": chunks,
        "lists": [list(c) for c in chunks],
        "tuples with extras": [(a, b, torch.zeros(len(b))) for a, b in chunks],
        "dicts": [{"image": a, "label": b} for a, b in chunks],
    }
    for name, data in with_labels.items():
        logits, labels = collect_exit_logits(model, data, return_labels=True)
        assert torch.allclose(logits, ref, atol=1e-6), name
        assert labels.tolist() == y.tolist(), name
    without_labels = {
        "1-tuples": [(x[:4],), (x[4:],)],
        "dicts without labels": [{"image": x[:4]}, {"image": x[4:]}],
        "bare batches": [x[:4], x[4:]],
    }
    for name, data in without_labels.items():
        assert torch.allclose(collect_exit_logits(model, data), ref, atol=1e-6), name
        with pytest.raises(ValueError, match="yields no labels"):
            collect_exit_logits(model, data, return_labels=True)


# ------------------------------------------------------------------------------------------- simulation


def test_simulate_takes_thresholds_as_a_list_a_tensor_or_a_row():
    logits, labels, costs = random_problem(0)
    th = [0.6, 0.7, 0.8, 0.0]
    ref = simulate(logits, labels, th, costs)
    for other in (torch.tensor(th, dtype=torch.float64), torch.tensor([th]), np.array(th)):
        sim = simulate(logits, labels, other, costs)
        assert (sim.accuracy, sim.mean_macs) == (ref.accuracy, ref.mean_macs)
        assert torch.equal(sim.exit_index, ref.exit_index)
    with pytest.raises(ValueError, match="need 4 thresholds"):
        simulate(logits, labels, th[:3], costs)


def test_a_threshold_that_rounds_to_one_still_pays_for_its_head():
    """`forward_dynamic` holds thresholds in float32, where 1 + 1e-9 is exactly 1: a confidence of 1 can still
    leave, so the head runs and simulate must charge it (embed 0, stages 4 + 4, head 0 costs 1)."""
    costs = StageCosts(embed=0, stages=[4, 4], heads=[1, 0], exits=[1, 2])
    logits = torch.stack([torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[0.0, 3.0], [3.0, 0.0]])])
    labels = torch.tensor([1, 0])
    model_th = torch.as_tensor([1.0 + 1e-9, 0.0], dtype=torch.float32)  # what forward_dynamic compares with
    assert float(model_th[0]) <= 1.0
    sim = simulate(logits, labels, [1.0 + 1e-9, 0.0], costs)
    assert sim.exit_index.tolist() == [1, 1] and sim.mean_macs == 9.0
    assert simulate(logits, labels, [1.5, 0.0], costs).mean_macs == 8.0  # out of reach: head skipped


def test_simulate_exit_rule_and_skipped_heads_by_hand():
    """Three 2-class exits, costs embed 0, stages 4, heads 1. A confidence exactly equal to its threshold leaves
    (>=); a threshold of exactly 1 can still be met, so its head runs; above 1 only that exit's head is skipped."""
    costs = StageCosts(embed=0, stages=[4, 4, 4], heads=[1, 1, 0], exits=[1, 2, 3])
    even, sure = [0.0, 0.0], [0.0, 9.0]  # max softmax exactly 0.5; close to 1
    logits = torch.tensor([[even, sure], [sure, even], [sure, sure]])
    labels = torch.tensor([1, 1])
    sim = simulate(logits, labels, [0.5, 0.5, 0.0], costs)
    assert sim.exit_index.tolist() == [0, 0] and sim.mean_macs == 5.0 and sim.accuracy == 0.5
    sim = simulate(logits, labels, [1.0, 0.9, 0.0], costs)  # sample 0 leaves at exit 1, sample 1 at exit 2
    assert sim.exit_index.tolist() == [1, 2] and sim.mean_macs == (10 + 14) / 2
    sim = simulate(logits, labels, [0.9, NEVER, 0.0], costs)  # head 1 skipped, head 0 runs
    assert sim.exit_index.tolist() == [2, 0] and sim.mean_macs == (13 + 5) / 2
    sim = simulate(logits, labels, [NEVER, 0.9, 0.0], costs)  # head 0 skipped, head 1 runs
    assert sim.exit_index.tolist() == [1, 2] and sim.mean_macs == (9 + 13) / 2


def test_bad_inputs_are_rejected_with_a_clear_message():
    logits, labels, costs = random_problem(0, n=6)
    with pytest.raises(ValueError, match=r"\[S, N, C\] tensor, got torch.Size\(\[4, 6\]\)"):
        simulate(logits[:, :, 0], labels, [0.5] * 4, costs)
    with pytest.raises(ValueError, match="tensor, got <class 'list'>"):
        simulate(logits.tolist(), labels, [0.5] * 4, costs)
    with pytest.raises(ValueError, match="3 exits in the logits but 4 in the costs"):
        simulate(logits[:3], labels, [0.5] * 3, costs)
    with pytest.raises(ValueError, match="5 labels for 6 samples"):
        simulate(logits, labels[:5], [0.5] * 4, costs)
    with pytest.raises(ValueError, match="^no samples$"):
        simulate(logits[:, :0], labels[:0], [0.5] * 4, costs)
    one = simulate(logits[:, :1], labels[:1], [0.0] * 4, costs)  # a single sample is fine
    assert one.exit_index.tolist() == [0]
    with pytest.raises(ValueError, match="mode must be one of .*got 'best'"):
        calibrate(val_logits=logits, val_labels=labels, costs=costs, mode="best")
    for bad in (0.0, -0.5):
        with pytest.raises(ValueError, match=f"budget_fraction must be > 0, got {bad}"):
            calibrate(val_logits=logits, val_labels=labels, costs=costs, budget_fraction=bad)


def test_evaluate_thresholds_reports_one_share_per_exit_and_uses_the_confidence():
    logits, labels, costs = random_problem(1)
    ev = evaluate_thresholds(logits, labels, [0.0, 0.0, 0.0, 0.0], costs)
    assert ev.exit_fraction == [1.0, 0.0, 0.0, 0.0]  # unused later exits are reported, as 0
    assert ev.macs == costs.cumulative()[0] and ev.fraction == ev.macs / costs.full_depth_baseline()
    assert ev.accuracy == float((logits[0].argmax(-1) == labels).double().mean())
    th = [0.5, 0.5, 0.5, 0.0]
    default = evaluate_thresholds(logits, labels, th, costs)
    assert default == evaluate_thresholds(logits, labels, th, costs, "max_softmax")
    entropy = evaluate_thresholds(logits, labels, th, costs, "entropy")
    assert entropy == evaluate_thresholds(logits, labels, th, costs, confidence="entropy")
    assert entropy.exit_fraction != default.exit_fraction  # the confidence really reached the exit rule


# ------------------------------------------------------------------------------------------ calibration


@pytest.mark.parametrize("mode", MODES)
def test_a_single_exit_model_calibrates_to_its_only_exit(mode):
    """No early exit: threshold [0], the exit's accuracy at exactly the full-depth cost, feasible from budget 1
    on; the sweep has only budget points (there is no shared threshold to vary)."""
    costs = StageCosts(embed=3, stages=[10], heads=[2], exits=[4])
    logits, labels, _ = random_problem(2, num_exits=1, n=20)
    acc = float((logits[0].argmax(-1) == labels).double().mean())
    for b, feasible in ((0.5, False), (1.0, True), (1.3, True)):
        cal = calibrate(val_logits=logits, val_labels=labels, costs=costs, budget_fraction=b, mode=mode)
        assert cal.thresholds == [0.0] and cal.feasible == feasible
        assert cal.val_accuracy == pytest.approx(acc) and cal.val_macs == 15.0 and cal.fraction == 1.0
    assert sweep(val_logits=logits, val_labels=labels, costs=costs, budgets=[0.5], mode=mode) == []
    points = sweep(val_logits=logits, val_labels=labels, costs=costs, budgets=[0.5, 1.0], mode=mode)
    assert [(p.thresholds, p.macs, p.budget_fraction) for p in points] == [([0.0], 15.0, 1.0)]


@pytest.mark.parametrize("budget", [0.6, 0.7, 0.8, 0.9, 1.0, 1.05, 1.1])
def test_two_exit_search_finds_the_best_single_threshold(budget):
    """One early exit: the search tries every cut, so it returns the most accurate threshold within the budget,
    the cheapest among equally accurate ones (checked against every cut by simulation)."""
    logits, labels, costs = random_problem(3, num_exits=2, n=40)
    base = costs.full_depth_baseline()
    cal = calibrate(val_logits=logits, val_labels=labels, costs=costs, budget_fraction=budget, mode="search")
    options = []
    for t in all_cuts(confidence_score(logits[0])):
        sim = simulate(logits, labels, [t, 0.0], costs)
        if sim.mean_macs <= budget * base:
            options.append((sim.accuracy, -sim.mean_macs))
    best_acc, neg_macs = max(options)
    assert len(cal.thresholds) == 2 and cal.thresholds[-1] == 0.0
    assert cal.val_accuracy == pytest.approx(best_acc) and cal.val_macs == pytest.approx(-neg_macs)


def test_calibrate_defaults_to_half_the_full_depth_cost_in_path_mode():
    logits, labels, costs = random_problem(4)
    cal = calibrate(val_logits=logits, val_labels=labels, costs=costs)
    assert cal.budget_fraction == 0.5 and cal.fraction <= 0.5
    assert cal == calibrate(val_logits=logits, val_labels=labels, costs=costs, budget_fraction=0.5,
                            confidence="max_softmax", mode="path")


# ------------------------------------------------------------------------------------------------- sweep


@pytest.mark.parametrize("mode", MODES)
def test_sweep_budget_points_are_calibrate_at_each_budget(mode):
    """Each budget point is exactly `calibrate` at its budget (thresholds, accuracy, MACs, fraction), and every
    feasible budget is represented (possibly by an equal setting found first)."""
    logits, labels, costs = random_problem(5, quantize=True)
    budgets = [0.4, 0.5, 0.55, 0.7, 0.9]
    points = sweep(val_logits=logits, val_labels=labels, costs=costs, budgets=budgets, mode=mode, shared_points=0)
    by_budget = {p.budget_fraction: p for p in points}
    assert set(by_budget) <= set(budgets) and len(by_budget) == len(points)
    for b in budgets:
        cal = calibrate(val_logits=logits, val_labels=labels, costs=costs, budget_fraction=b, mode=mode)
        assert cal.feasible
        same = [p for p in points if p.thresholds == cal.thresholds]
        assert len(same) == 1
        p = same[0]
        assert (p.accuracy, p.macs, p.fraction) == (cal.val_accuracy, cal.val_macs, cal.fraction)
        if b in by_budget:
            assert by_budget[b] is p


def test_sweep_default_budgets_are_every_five_percent_up_to_full_depth():
    """Exit 0 costs 4% of full depth and its head 3% more at every later exit. Sample 0 is right only at exit 0
    (and most confident there), the other 39 only at the last exit: the perfect setting costs
    (4 + 39 x 103) / 40 = 100.525 MACs, 1.00525 of full depth, so it is outside every default budget (the last is 1.00), while budget 0.05 already affords exit 0."""
    costs = StageCosts(embed=0, stages=[1, 99], heads=[3, 0], exits=[1, 2])
    n = 40
    labels = torch.zeros(n, dtype=torch.long)
    first = torch.tensor([[0.0, 1.0]] * n)
    first[0] = torch.tensor([3.0, 0.0])
    last = torch.tensor([[2.0, 0.0]] * n)
    last[0] = torch.tensor([0.0, 2.0])
    logits = torch.stack([first, last])
    for mode in MODES:
        default = sweep(val_logits=logits, val_labels=labels, costs=costs, mode=mode)
        explicit = sweep(val_logits=logits, val_labels=labels, costs=costs, budgets=DEFAULT_BUDGETS, mode=mode)
        assert default == explicit
        fractions = {p.budget_fraction for p in default} - {None}
        assert 0.05 in fractions and fractions <= set(DEFAULT_BUDGETS)
        assert max(p.accuracy for p in default if p.budget_fraction is not None) == 39 / 40
    wider = sweep(val_logits=logits, val_labels=labels, costs=costs, budgets=[1.05], mode="search")
    assert [(p.accuracy, p.fraction) for p in wider if p.budget_fraction == 1.05] == [(1.0, 1.00525)]
    assert sweep(val_logits=logits, val_labels=labels, costs=costs) == sweep(
        val_logits=logits, val_labels=labels, costs=costs, confidence="max_softmax", mode="path")


def test_sweep_shared_points_cover_every_early_exit_confidence():
    """Three exits with hand-picked confidences: exit 0 at 0.55/0.65, exit 1 at 0.75/0.85 (the last exit's are
    never cut). With enough shared points the shared-threshold points are every cut, 0, 0.6, 0.7, 0.8, 2, the same
    for both early exits, the last exit's threshold 0; `shared_points` = k gives k of them (32 by default)."""
    def two_class_logits(p_top: float) -> list[float]:
        return [float(np.log(p_top)), float(np.log(1 - p_top))]  # max softmax = p_top

    conf = [[0.55, 0.65], [0.75, 0.85], [0.95, 0.95]]
    logits = torch.tensor([[two_class_logits(c) for c in row] for row in conf])
    labels = torch.tensor([0, 0])
    costs = StageCosts(embed=1, stages=[2, 3, 4], heads=[1, 1, 1], exits=[1, 2, 3])
    base = costs.full_depth_baseline()
    points = sweep(val_logits=logits, val_labels=labels, costs=costs, budgets=[], shared_points=50)
    assert all(p.budget_fraction is None for p in points)
    expected = [0.0, 0.6, 0.7, 0.8, NEVER]
    got = sorted(p.thresholds[0] for p in points)
    assert got == pytest.approx(expected, abs=1e-6)
    for p in points:
        assert p.thresholds[:2] == [p.thresholds[0]] * 2 and p.thresholds[2] == 0.0
        sim = simulate(logits, labels, p.thresholds, costs)
        assert (p.accuracy, p.macs) == (sim.accuracy, sim.mean_macs) and p.fraction == p.macs / base
    logits, labels, costs = random_problem(6)
    for k in (1, 5, 32):
        kw = {} if k == 32 else {"shared_points": k}
        shared = sweep(val_logits=logits, val_labels=labels, costs=costs, budgets=[], **kw)
        assert len(shared) == k and all(0.0 <= p.accuracy <= 1.0 for p in shared)
        thresholds = sorted(p.thresholds[0] for p in shared)  # from "everybody leaves at exit 0" to "nobody early"
        assert (thresholds[0], thresholds[-1]) == ((0.0, NEVER) if k > 1 else (0.0, 0.0))
    assert sweep(val_logits=logits, val_labels=labels, costs=costs, budgets=[], shared_points=0) == []


def test_sweep_sorts_by_cost_most_accurate_first_without_duplicates():
    """Two samples, both wrong at exit 0, right at the last; head 0 costs 2. Letting sample 0 leave at exit 0
    costs (6 + 10) / 2 = 8 MACs, exactly the full-depth cost of sending both to the last exit with head 0
    skipped; the latter is right on both, so it comes first. A budget given twice gives one point (and the
    shared point with the same thresholds is not repeated)."""
    costs = StageCosts(embed=0, stages=[4, 4], heads=[2, 0], exits=[1, 2])
    labels = torch.tensor([0, 0])
    logits = torch.stack([torch.tensor([[0.0, 3.0], [0.0, 1.0]]), torch.tensor([[3.0, 0.0], [3.0, 0.0]])])
    points = sweep(val_logits=logits, val_labels=labels, costs=costs, budgets=[1.0, 1.0], shared_points=50)
    assert [(p.macs, p.accuracy) for p in points] == [(6.0, 0.0), (8.0, 1.0), (8.0, 0.5)]
    assert [p.budget_fraction for p in points] == [None, 1.0, None]


# ------------------------------------------------------------------------------------------ search mode


def test_coordinate_step_is_the_exact_best_threshold_of_one_exit():
    """`_best_at_exit`: with every other threshold fixed, the most accurate threshold of exit s within the limit
    (cheapest among ties), and its correct count and mean MACs; None when nothing fits. Checked against
    simulating every cut of exit s, on coarse logits where many confidences tie."""
    from dynadapter.inference.calibrate import _best_at_exit, _prepare

    rng = np.random.default_rng(0)
    for seed in range(6):
        logits, labels, costs = random_problem(seed, num_exits=3 + seed % 2, n=14, num_classes=3, quantize=True)
        s_count, n = logits.shape[:2]
        p = _prepare(logits, labels, costs, "max_softmax")
        conf = confidence_score(logits.reshape(-1, 3)).reshape(s_count, n)
        for _ in range(3):
            current = np.array([rng.choice(all_cuts(conf[s])) for s in range(s_count - 1)] + [0.0], np.float32)
            for s in range(s_count - 1):
                outcomes = []
                for t in all_cuts(conf[s]):
                    th = current.copy()
                    th[s] = t
                    sim = simulate(logits, labels, th, costs)
                    outcomes.append((round(sim.accuracy * n), sim.mean_macs))
                all_macs = sorted({m for _, m in outcomes})
                for limit in [all_macs[0] - 1] + all_macs + [(all_macs[0] + all_macs[-1]) / 2]:
                    found = _best_at_exit(p, current, s, limit)
                    fits = [(c, -m) for c, m in outcomes if m <= limit]
                    if not fits:
                        assert found is None
                        continue
                    best_count, neg_macs = max(fits)
                    th_s, count, macs = found
                    assert (count, macs) == (best_count, pytest.approx(-neg_macs)), (seed, s, limit)
                    assert th_s == NEVER or 0.0 <= th_s <= 1.0
                    th = current.copy()
                    th[s] = th_s
                    sim = simulate(logits, labels, th, costs)
                    assert (round(sim.accuracy * n), sim.mean_macs) == (count, pytest.approx(macs))


def best_per_exit_setting(logits, labels, costs, limit):
    """Brute force over every combination of early-exit cuts: (accuracy, -MACs) of the best within the limit."""
    s_count = logits.shape[0]
    conf = confidence_score(logits.reshape(-1, logits.shape[-1])).reshape(s_count, -1)
    best = None
    for combo in itertools.product(*[all_cuts(conf[s]) for s in range(s_count - 1)]):
        sim = simulate(logits, labels, list(combo) + [0.0], costs)
        if sim.mean_macs <= limit:
            best = max(best or (-1, 0), (sim.accuracy, -sim.mean_macs))
    return best


@pytest.mark.parametrize("seed", [1, 3, 4, 5, 6, 7, 8, 9])
def test_search_finds_the_best_per_exit_thresholds_on_small_problems(seed):
    """Three exits, 12 samples: on these problems the shared grid plus coordinate ascent reaches the best of all
    per-exit threshold combinations at every budget (most accurate, then cheapest)."""
    logits, labels, costs = random_problem(seed, num_exits=3, n=12, num_classes=3, quantize=True)
    base = costs.full_depth_baseline()
    for b in (0.4, 0.55, 0.7, 0.85, 1.0, 1.15):
        cal = calibrate(val_logits=logits, val_labels=labels, costs=costs, budget_fraction=b, mode="search")
        acc, neg_macs = best_per_exit_setting(logits, labels, costs, b * base)
        assert (cal.val_accuracy, cal.val_macs) == (pytest.approx(acc), pytest.approx(-neg_macs)), b
        assert cal.thresholds[-1] == 0.0 and all(t == NEVER or 0.0 <= t <= 1.0 for t in cal.thresholds)


LADDER_CASES = [
    # seed, costs, budgets: expensive early heads (running every head costs 1.2 x full depth) near and above
    # full depth; then exit 0 at 0.5% and exit 1 at 1.5% of full depth, budgets around the first 1% step
    (25, StageCosts(embed=7, stages=[20, 23, 26], heads=[10, 10, 4], exits=[1, 2, 3]), [1.0, 1.2]),
    (5, StageCosts(embed=0, stages=[1, 2, 197], heads=[0, 0, 0], exits=[1, 2, 3]), [0.01, 0.015]),
]


@pytest.mark.parametrize("seed,costs,budgets", LADDER_CASES)
def test_search_covers_every_limit_from_one_percent_to_every_head_running(seed, costs, budgets):
    """The search's limits run from 1% of full depth up to the cost of running every head: at the ends of
    that range it still reaches the best per-exit setting (checked by brute force)."""
    logits, labels, _ = random_problem(seed, num_exits=3, n=12, num_classes=3, quantize=True)
    base = costs.full_depth_baseline()
    for b in budgets:
        cal = calibrate(val_logits=logits, val_labels=labels, costs=costs, budget_fraction=b, mode="search")
        acc, neg_macs = best_per_exit_setting(logits, labels, costs, b * base)
        assert (cal.val_accuracy, cal.val_macs) == (pytest.approx(acc), pytest.approx(-neg_macs)), b


def test_a_coordinate_step_never_splits_equal_confidences():
    """Two samples tie at exit 0 (same logits): one is right there, the other only at the last exit. No
    threshold lets just one of them leave, so the best step is 1 of 2 right, the cheaper way (both leave)."""
    from dynadapter.inference.calibrate import _best_at_exit, _prepare

    costs = StageCosts(embed=0, stages=[4, 4], heads=[0, 0], exits=[1, 2])
    logits = torch.tensor([[[0.0, 1.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    labels = torch.tensor([1, 0])
    p = _prepare(logits, labels, costs, "max_softmax")
    th, count, macs = _best_at_exit(p, np.array([NEVER, 0.0], np.float32), 0, 100.0)
    assert (count, macs) == (1, 4.0)
    sim = simulate(logits, labels, [th, 0.0], costs)
    assert (sim.accuracy, sim.mean_macs) == (0.5, 4.0)


# ----------------------------------------------------------------------------------------- compare_modes


def identical_samples_problem(n: int = 10):
    """n samples with the same logits at every exit: exit 0 predicts class 1, exits 1 and 2 class 0; all labels 0
    but one. Costs: exit 0 = 3, exit 1 = 5 with head 0 skipped, last = 8 = full depth with early heads skipped."""
    row = {0: [0.0, 1.0, 0.0], 1: [2.0, 0.0, 0.0], 2: [3.0, 0.0, 0.0]}
    logits = torch.tensor([[row[s]] * n for s in range(3)])
    labels = torch.zeros(n, dtype=torch.long)
    labels[0] = 1
    costs = StageCosts(embed=0, stages=[2, 2, 4], heads=[1, 1, 0], exits=[1, 2, 3])
    return logits, labels, costs


def test_compare_modes_scores_held_out_halves_that_partition_validation():
    """Every sample takes the same exit, and exits 1 and 2 are right on 9 of the 10: whatever the split, the mean
    held-out accuracy over both halves is exactly 0.9. At budget 1.0, path keeps the largest shared threshold
    (everybody to the last exit, fraction 1) and search the cheapest most accurate setting (exit 1 with head 0
    skipped: 5 / 8)."""
    logits, labels, costs = identical_samples_problem()
    report = compare_modes(val_logits=logits, val_labels=labels, costs=costs, budget_fraction=1.0, repeats=3)
    assert report == {"path": {"accuracy": pytest.approx(0.9), "fraction": 1.0},
                      "search": {"accuracy": pytest.approx(0.9), "fraction": 0.625}}


def test_compare_modes_is_reproducible_and_has_documented_defaults():
    logits, labels, costs = random_problem(7, num_exits=3, n=16)
    kw = dict(val_logits=logits, val_labels=labels, costs=costs)
    default = compare_modes(**kw)
    assert default == compare_modes(**kw)  # same seed, same splits
    assert default == compare_modes(**kw, budget_fraction=0.5, confidence="max_softmax", repeats=5, seed=0)
    assert default != compare_modes(**kw, seed=1)  # the seed really picks the splits


def test_compare_modes_needs_four_samples():
    logits, labels, costs = identical_samples_problem(4)
    report = compare_modes(val_logits=logits, val_labels=labels, costs=costs, budget_fraction=1.0, repeats=1)
    assert report["path"]["fraction"] == 1.0
    with pytest.raises(ValueError, match="at least 4 validation samples, got 3"):
        compare_modes(val_logits=logits[:, :3], val_labels=labels[:3], costs=costs)


@pytest.mark.parametrize("mode", MODES)
def test_curve_accuracy_is_the_mean_of_each_budgets_calibrated_val_accuracy(mode):
    """The tune stage's `curve` objective: one model, scored over the budgets it will serve."""
    from dynadapter.inference import curve_accuracy

    logits, labels, costs = random_problem(3)
    budgets = [0.4, 0.6, 0.8, 1.0]
    each = [calibrate(val_logits=logits, val_labels=labels, costs=costs, budget_fraction=b, mode=mode).val_accuracy
            for b in budgets]
    got = curve_accuracy(val_logits=logits, val_labels=labels, costs=costs, budgets=budgets, mode=mode)
    assert got == pytest.approx(sum(each) / len(each), abs=1e-12)
    assert len(set(each)) > 1  # the budgets really differ: the mean is not one point's accuracy
    last_exit = float((logits[-1].argmax(-1) == labels).float().mean())
    assert curve_accuracy(val_logits=logits, val_labels=labels, costs=costs, budgets=[1.0], mode=mode) >= last_exit - 1e-6
    with pytest.raises(ValueError, match="at least one budget"):
        curve_accuracy(val_logits=logits, val_labels=labels, costs=costs, budgets=[])
