"""Contracts of dynadapter.inference and DynAdapterViT.forward_dynamic: compacted early exit, MACs accounting,
validation-only calibration, the Pareto frontier, throughput comparison."""

from __future__ import annotations

import inspect
from collections import namedtuple

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dynadapter.inference.flops as flops_module
from dynadapter.inference import (
    MODES,
    NEVER,
    CurvePoint,
    compare_modes,
    StageCosts,
    calibrate,
    collect_exit_logits,
    count_macs,
    dynamic_macs,
    dynamic_vs_full,
    evaluate_thresholds,
    full_depth_forward,
    measure_stage_costs,
    measure_throughput,
    pareto_front,
    run_dynamic,
    simulate,
    sweep,
    vit_macs_closed_form,
)
from dynadapter.config import SparsityConfig
from dynadapter.models import confidence_score
from helpers import images, one_thread, randomize_petl, sharpen_heads, tiny_model  # noqa: F401

CONFIDENCES = ["max_softmax", "entropy"]


def dyn_model(confidence: str = "max_softmax", seed: int = 0):
    """A 4-exit tiny model with non-trivial PETL branches and heads whose confidences spread out."""
    model = tiny_model("adapter", num_classes=5, seed=seed, confidence=confidence)
    randomize_petl(model, seed)
    sharpen_heads(model, seed)
    return model.eval()


def reference_exits(exit_logits: torch.Tensor, thresholds, kind: str) -> torch.Tensor:
    """The exit rule from its definition: the first exit whose confidence >= its threshold, else the last."""
    s_count, n, _ = exit_logits.shape
    conf = torch.stack([confidence_score(lg, kind) for lg in exit_logits]).tolist()
    out = torch.full((n,), s_count - 1, dtype=torch.long)
    for i in range(n):
        for s in range(s_count - 1):
            if conf[s][i] >= thresholds[s]:
                out[i] = s
                break
    return out


def random_thresholds(exit_logits: torch.Tensor, kind: str, gen: torch.Generator, margin: float = 1e-4) -> list[float]:
    """Per-exit thresholds drawn between observed confidences, never within `margin` of one (so the tiny float
    differences between the full and the compacted batch cannot flip a decision)."""
    th = []
    for s in range(exit_logits.shape[0]):
        conf = np.sort(confidence_score(exit_logits[s], kind).numpy())
        gaps = np.diff(conf)
        cands = list((conf[:-1] + gaps / 2)[gaps > 4 * margin]) + [conf[0] - 0.01, conf[-1] + 0.01]
        th.append(float(cands[int(torch.randint(len(cands), (1,), generator=gen))]))
    conf_all = torch.stack([confidence_score(lg, kind) for lg in exit_logits])
    assert (conf_all - torch.tensor(th)[:, None]).abs().min() > margin
    return th


# ------------------------------------------------------------------------------------- dynamic inference

DYNAMIC_CASES = [(kind, n) for kind in CONFIDENCES for n in (1, 7, 33)]


@pytest.mark.parametrize("kind,n", DYNAMIC_CASES)
def test_forward_dynamic_matches_full_forward(kind, n):
    model = dyn_model(kind)
    x = images(n, seed=n)
    with torch.no_grad():
        exit_logits = torch.stack(model(x))  # [S, N, C] training forward, eval mode
    last = len(model.exits) - 1

    # nobody confident enough anywhere: every sample runs to the last exit
    for thresholds in ([2.0] * 4, None):  # None: the model's buffer, 2.0 by default
        out = model.forward_dynamic(x, thresholds)
        assert out.exit_index.tolist() == [last] * n
        assert torch.equal(out.preds, exit_logits[-1].argmax(-1))
        torch.testing.assert_close(out.logits, exit_logits[-1], atol=1e-5, rtol=1e-5)

    # everybody leaves at the first exit
    out = model.forward_dynamic(x, [0.0] * 4)
    assert out.exit_index.tolist() == [0] * n
    assert torch.equal(out.preds, exit_logits[0].argmax(-1))

    # a confidence exactly at the threshold leaves (>=); exit 0 always sees the whole batch, so this is exact
    conf0 = confidence_score(exit_logits[0], kind)
    th = [conf0.median().item(), 2.0, 2.0, 2.0]
    out = model.forward_dynamic(x, th)
    assert out.exit_index.tolist() == [0 if c >= th[0] else last for c in conf0.tolist()]
    assert int((out.exit_index == 0).sum()) == (n + 1) // 2

    # random thresholds: each sample's prediction comes from its own exit, the first confident one
    gen = torch.Generator().manual_seed(n)
    seen = set()
    for _ in range(6):
        th = random_thresholds(exit_logits, kind, gen)
        out = model.forward_dynamic(x, th)
        expected = reference_exits(exit_logits, th, kind)
        assert torch.equal(out.exit_index, expected)
        own = exit_logits[out.exit_index, torch.arange(n)]
        torch.testing.assert_close(out.logits, own, atol=1e-5, rtol=1e-5)
        assert torch.equal(out.preds, own.argmax(-1))
        seen.update(out.exit_index.tolist())
    if n > 1:
        assert len(seen) >= 3  # the draws really exercised several exits


@pytest.mark.parametrize("kind", CONFIDENCES)
def test_forward_dynamic_compacts_the_batch(kind):
    """Only the samples still in flight enter each stage: skipped work is really skipped."""
    model = dyn_model(kind)
    x = images(40, seed=3)
    with torch.no_grad():
        exit_logits = torch.stack(model(x))
    seen: list[int] = []
    starts = [0] + model.exits[:-1]
    record = lambda module, args: seen.append(args[0].shape[0])  # noqa: E731
    hooks = [model.backbone.blocks[b].register_forward_pre_hook(record) for b in starts]
    try:
        gen = torch.Generator().manual_seed(0)
        drawn = [random_thresholds(exit_logits, kind, gen) for _ in range(2)]
        for th in ([0.0] * 4, [2.0] * 4, *drawn):
            seen.clear()
            exits = model.forward_dynamic(x, th).exit_index
            in_flight = [int((exits >= s).sum()) for s in range(len(model.exits))]
            assert seen == [k for k in in_flight if k > 0]
    finally:
        for h in hooks:
            h.remove()
    with pytest.raises(ValueError, match="4 thresholds"):
        model.forward_dynamic(x, [0.5, 0.5])


@pytest.mark.parametrize("method", ["adapter", "lora"])
def test_unreachable_heads_are_skipped_and_cost_nothing(method):
    """Regression (audit #14.1): "everyone to the last exit" used to run every early head and cost more than
    full depth, so budget 1.0 could never choose it. Heads whose threshold is above 1 are now skipped: the
    executed MACs equal the full-depth baseline exactly, and predictions equal the last exit's."""
    model = tiny_model(method, sparsity=None)
    model.eval()
    costs = measure_stage_costs(model)
    x1 = images(1, seed=4)
    with flops_module.unfused_attention(model):
        executed = flops_module.count_macs(model.forward_dynamic, x1, [NEVER] * 3 + [0.0])
        one_head = flops_module.count_macs(model.forward_dynamic, x1, [NEVER, 0.5, NEVER, 0.0])
    assert executed == costs.full_depth_baseline() == costs.cumulative([NEVER] * 3 + [0.0])[-1]
    assert executed < costs.full()
    assert one_head in (costs.cumulative([NEVER, 0.5, NEVER, 0.0])[1], costs.cumulative([NEVER, 0.5, NEVER, 0.0])[3])
    x = images(12, seed=5)
    out = model.forward_dynamic(x, [NEVER] * 3 + [0.0])
    assert torch.equal(out.exit_index, torch.full((12,), 3))
    assert torch.allclose(out.logits, model(x)[-1], atol=1e-5)
    assert dynamic_macs(costs, out.exit_index, [NEVER] * 3 + [0.0]) == costs.full_depth_baseline()


def test_forward_dynamic_runs_in_eval_mode_and_restores_the_mode():
    """Regression (audit #14.5): a caller in train mode got dropout inside forward_dynamic."""
    model = tiny_model("adapter", sparsity=SparsityConfig(p_max=0.9, p_min=0.9, backward=False))
    x = images(8, seed=6)
    model.eval()
    reference = model.forward_dynamic(x, [0.0] * 4).logits
    model.train()
    again = model.forward_dynamic(x, [0.0] * 4).logits
    assert model.training and torch.equal(reference, again)


def test_compare_modes_scores_both_modes_on_held_out_val_halves(costs):
    logits, labels = synthetic_exit_logits(200, 2)
    report = compare_modes(val_logits=logits, val_labels=labels, costs=costs, budget_fraction=0.6, repeats=2)
    assert set(report) == set(MODES)
    for r in report.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.2 < r["fraction"] < 0.75  # held-out halves: near the budget
    chance = 1 / logits.shape[-1]
    assert all(r["accuracy"] > chance for r in report.values())


# ------------------------------------------------------------------------------------------------- FLOPs

GEOMETRIES = [
    # timm overrides, num_classes, num_prefix_tokens
    (dict(img_size=16, patch_size=8, embed_dim=32, depth=4, num_heads=2), 5, 1),
    (dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3), 10, 1),
    (dict(img_size=24, patch_size=4, embed_dim=24, depth=2, num_heads=2), 7, 1),
    (dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, reg_tokens=2), 3, 3),
    (dict(img_size=16, patch_size=8, embed_dim=32, depth=3, num_heads=2, class_token=False, global_pool="avg"), 4, 0),
]


def _set_fused(model: nn.Module, flag: bool) -> int:
    mods = [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    for m in mods:
        m.fused_attn = flag
    return len(mods)


@pytest.mark.parametrize("overrides,num_classes,prefix", GEOMETRIES)
def test_measured_macs_match_closed_form_with_attention(overrides, num_classes, prefix):
    model = tiny_model("linear_probe", early_exit=False, num_classes=num_classes, **overrides)
    o = overrides
    closed = vit_macs_closed_form(
        o["img_size"], o["patch_size"], o["embed_dim"], o["depth"], num_classes=num_classes, num_prefix_tokens=prefix
    )
    n_tok = (o["img_size"] // o["patch_size"]) ** 2 + prefix
    attention_matmuls = o["depth"] * 2 * n_tok * n_tok * o["embed_dim"]  # q @ k^T and attn @ v

    assert _set_fused(model, True) == o["depth"]
    fused = measure_stage_costs(model)
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))  # restored afterwards
    _set_fused(model, False)
    unfused = measure_stage_costs(model)
    assert fused == unfused  # the fused path is not counted as 0
    total = fused.full_depth_baseline()
    assert total == fused.full()  # a single exit: one head
    assert abs(total - closed) <= 0.01 * closed
    assert total > closed - attention_matmuls  # the attention matmuls are in there
    assert fused.embed == (o["img_size"] // o["patch_size"]) ** 2 * 3 * o["patch_size"] ** 2 * o["embed_dim"]


@pytest.mark.parametrize("method", ["adapter", "lora", "rep_adapter", "linear_probe"])
def test_stage_costs_cumulative_and_dynamic_macs(method):
    model = tiny_model(method)
    costs = measure_stage_costs(model)
    cum = costs.cumulative()
    assert len(cum) == len(model.exits) == costs.num_exits and costs.exits == model.exits
    assert all(b > a for a, b in zip(cum, cum[1:]))
    assert cum[0] == costs.embed + costs.stages[0] + costs.heads[0]
    assert costs.full() == cum[-1] == costs.embed + sum(costs.stages) + sum(costs.heads)
    assert costs.full_depth_baseline() == costs.embed + sum(costs.stages) + costs.heads[-1]
    n = 9
    assert dynamic_macs(costs, [0] * n) == costs.embed + costs.stages[0] + costs.heads[0]
    assert dynamic_macs(costs, torch.full((n,), 3)) == costs.full()
    assert dynamic_macs(costs, [0, 1, 3]) == pytest.approx((cum[0] + cum[1] + cum[3]) / 3)
    # the full-depth model built without exits costs what full_depth_baseline says
    static = measure_stage_costs(tiny_model(method, early_exit=False))
    assert static.full() == costs.full_depth_baseline()
    d = costs.to_dict()
    assert d["full_macs"] == costs.full() and d["cumulative_macs"] == cum


def test_stage_costs_round_trip_through_their_logged_dict():
    costs = StageCosts(embed=7, stages=[10, 20, 30], heads=[1, 2, 3], exits=[1, 2, 4])
    d = costs.to_dict()
    assert d == {"embed_macs": 7, "stage_macs": [10, 20, 30], "head_macs": [1, 2, 3],
                 "cumulative_macs": [18, 40, 73], "full_macs": 73, "full_depth_baseline_macs": 70, "exits": [1, 2, 4]}
    back = StageCosts.from_dict(d)
    assert back == costs and back.cumulative() == [18, 40, 73]
    logged = {"embed_macs": 7.0, "stage_macs": (10, 20, 30), "head_macs": (1, 2, 3)}  # as JSON may give it back
    old = StageCosts.from_dict(logged)
    assert old.embed == 7 and isinstance(old.embed, int) and old.stages == [10, 20, 30] and old.exits == []


def test_mac_unit_is_multiply_accumulates():
    lin = nn.Linear(32, 5)
    x = torch.zeros(1, 32)
    assert count_macs(lin, x) == 32 * 5
    with FlopCounterMode(display=False) as counter:
        lin(x)
    assert counter.get_total_flops() == 2 * count_macs(lin, x)  # FLOPs = 2 x MACs
    for doc in (flops_module.__doc__, StageCosts.__doc__, measure_stage_costs.__doc__, count_macs.__doc__):
        assert "MACs" in doc


# ------------------------------------------------------------------------------------------- calibration


def synthetic_exit_logits(n: int, seed: int, num_exits: int = 4, num_classes: int = 5):
    """Exit logits that get more accurate and more confident with depth, and their labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    scale = torch.linspace(1.0, 3.0, num_exits).view(-1, 1, 1)
    logits = torch.randn(num_exits, n, num_classes, generator=g) * scale
    boost = torch.linspace(0.5, 2.0, num_exits).view(-1, 1)
    logits[:, torch.arange(n), labels] += boost
    return logits, labels


@pytest.fixture(scope="module")
def costs() -> StageCosts:
    return measure_stage_costs(tiny_model("adapter", num_classes=5))


def test_calibrate_takes_only_validation_data():
    for fn in (calibrate, sweep):
        params = inspect.signature(fn).parameters
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
        assert {"val_logits", "val_labels"} <= set(params) and not any("test" in name for name in params)
    with pytest.raises(TypeError):
        calibrate(torch.zeros(4, 2, 5), torch.zeros(2), None)  # type: ignore[misc]


@pytest.mark.parametrize("kind", CONFIDENCES)
def test_thresholds_do_not_depend_on_test(kind, costs):
    """Calibrate on val, report on test: permuting or corrupting the test set changes nothing chosen."""
    model = dyn_model(kind)
    val_logits = collect_exit_logits(model, images(60, seed=10), batch_size=16)
    val_labels = val_logits[-1].argmax(-1)  # the last exit is right by construction, earlier ones partly
    val_labels[::5] = (val_labels[::5] + 1) % 5
    test_logits = collect_exit_logits(model, images(50, seed=11), batch_size=16)
    test_labels = test_logits[-1].argmax(-1)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    test_sets = {
        "clean": (test_logits, test_labels),
        "permuted": (test_logits[:, perm], test_labels[perm]),
        "corrupted": (torch.randn_like(test_logits) * 5, (test_labels + 1) % 5),
    }
    val_before = (val_logits.clone(), val_labels.clone())
    chosen, reports = {}, {}
    for name, (tl, ty) in test_sets.items():
        cal = calibrate(val_logits=val_logits, val_labels=val_labels, costs=costs, budget_fraction=0.7, confidence=kind)
        ev = evaluate_thresholds(tl, ty, cal.thresholds, costs, kind)
        chosen[name], reports[name] = cal, ev
    assert chosen["clean"] == chosen["permuted"] == chosen["corrupted"]
    assert torch.equal(val_logits, val_before[0]) and torch.equal(val_labels, val_before[1])
    assert reports["clean"].accuracy == pytest.approx(reports["permuted"].accuracy)
    assert reports["clean"].accuracy != pytest.approx(reports["corrupted"].accuracy)  # test really differed
    ev = reports["clean"]
    assert sum(ev.exit_fraction) == pytest.approx(1.0) and len(ev.exit_fraction) == 4
    assert ev.fraction == pytest.approx(ev.macs / costs.full_depth_baseline())


BUDGETS = [0.05, 0.3, 0.45, 0.6, 0.8, 1.0, 1.5]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", CONFIDENCES)
@pytest.mark.parametrize("seed", [0, 1])
def test_calibration_respects_budget(kind, seed, mode, costs):
    logits, labels = synthetic_exit_logits(200, seed)
    base = costs.full_depth_baseline()
    cheapest = costs.cumulative()[0]
    last_exit_accuracy = int((logits[-1].argmax(-1) == labels).sum()) / 200
    for b in BUDGETS:
        cal = calibrate(val_logits=logits, val_labels=labels, costs=costs, budget_fraction=b, confidence=kind,
                        mode=mode)
        assert cal.feasible == (cheapest <= b * base)
        sim = simulate(logits, labels, cal.thresholds, costs, kind)
        assert sim.accuracy == pytest.approx(cal.val_accuracy) and sim.mean_macs == pytest.approx(cal.val_macs)
        assert cal.fraction == pytest.approx(cal.val_macs / base)
        if cal.feasible:
            assert cal.val_macs <= b * base and cal.fraction <= b
        else:  # the cheapest setting, flagged: everybody leaves at exit 0
            assert cal.val_macs == cheapest and sim.exit_index.tolist() == [0] * 200
        if b >= 1.0:  # "everyone to the last exit" costs exactly full depth (early heads skipped): it fits
            assert cal.val_accuracy >= last_exit_accuracy
            if mode == "path":
                assert cal.thresholds[:-1] == [NEVER] * 3 and cal.val_macs == base


@pytest.mark.parametrize("kind", CONFIDENCES)
@pytest.mark.parametrize("seed", [1, 5, 10])
def test_path_calibration_is_monotone_in_the_budget(kind, seed, costs):
    """Default mode: a larger budget never sends a sample to an earlier exit and spends at least as much;
    budget 1.0 is the last exit alone at exactly the full-depth cost."""
    logits, labels = synthetic_exit_logits(150, seed)
    prev_exit, prev_macs = None, -1.0
    for b in np.linspace(0.35, 1.0, 14):
        cal = calibrate(val_logits=logits, val_labels=labels, costs=costs, budget_fraction=float(b), confidence=kind)
        exits = simulate(logits, labels, cal.thresholds, costs, kind).exit_index
        if prev_exit is not None:
            assert bool((exits >= prev_exit).all()) and cal.val_macs >= prev_macs - 1e-6
        prev_exit, prev_macs = exits, cal.val_macs
    assert cal.val_macs == costs.full_depth_baseline() and bool((exits == 3).all())


def test_path_calibration_fills_the_budget(costs):
    """The largest affordable threshold: one step further along the path would break the budget."""
    logits, labels = synthetic_exit_logits(200, 3)
    base = costs.full_depth_baseline()
    path = np.unique(confidence_score(logits[:-1].reshape(-1, logits.shape[-1])).numpy())
    for b in (0.4, 0.55, 0.7, 0.85):
        cal = calibrate(val_logits=logits, val_labels=labels, costs=costs, budget_fraction=b)
        assert len(set(cal.thresholds[:-1])) == 1 and cal.fraction <= b
        higher = path[path > cal.thresholds[0]]
        if higher.size:  # the next threshold on the path (just above the next confidence) costs too much
            nxt = float(higher[0]) + 1e-6
            assert simulate(logits, labels, [nxt] * 3 + [0.0], costs).mean_macs > b * base


@pytest.mark.parametrize("kind", CONFIDENCES)
@pytest.mark.parametrize("seed", [1, 5, 10])  # seeds where searching at each budget alone broke monotonicity
def test_larger_budget_never_less_accurate(kind, seed, costs):
    logits, labels = synthetic_exit_logits(150, seed)
    accs = []
    for b in np.linspace(0.35, 1.2, 12):  # on and between the search's 1% steps
        cal = calibrate(val_logits=logits, val_labels=labels, costs=costs, budget_fraction=float(b), confidence=kind,
                        mode="search")
        assert cal.feasible
        accs.append(cal.val_accuracy)
    assert accs == sorted(accs), accs
    assert accs[-1] > accs[0]


BEST_CASES = [
    # correct counts, mean MACs, limit, expected index: the most accurate within the limit, ties to the cheapest
    ([5, 7, 7, 3], [1.0, 5.0, 3.0, 2.0], 10.0, 2),  # two equally accurate: the cheaper one, not the first
    ([5, 7, 7, 3], [1.0, 3.0, 5.0, 2.0], 10.0, 1),  # ... whatever their order
    ([4, 6, 6, 6], [1.0, 4.0, 2.5, 2.5], 10.0, 2),  # equal accuracy and cost: the first of them
    ([5, 7, 9], [1.0, 3.0, 5.0], 3.0, 1),  # a cost exactly equal to the limit is within it
    ([5, 7, 9], [1.0, 3.0, 5.0], 2.999, 0),
    ([5, 7, 9], [1.0, 3.0, 5.0], 0.5, None),  # nothing fits
]


@pytest.mark.parametrize("counts,macs,limit,expected", BEST_CASES)
def test_best_setting_within_limit_ties_to_cheapest(counts, macs, limit, expected):
    from dynadapter.inference.calibrate import _best

    assert _best(np.array(counts), np.array(macs), limit) == expected


def test_calibration_allows_a_cost_exactly_at_the_budget():
    """Two exits costing 4 and 8 MACs (full depth 8). Samples 0-1 are right at exit 0 and the most confident
    there; 2-3 are right only at exit 1. Letting exactly 0-1 leave early is the only perfect setting and costs
    (4 + 4 + 8 + 8) / 4 = 6 MACs = 0.75 of full depth: a budget of 0.75 must afford it, one just below must not."""
    costs = StageCosts(embed=0, stages=[4, 4], heads=[0, 0], exits=[1, 2])
    labels = torch.tensor([0, 0, 0, 0])
    right, wrong = [3.0, 0.0], [0.0, 3.0]
    first = torch.tensor([[4.0, 0.0], [3.5, 0.0], wrong, [0.0, 2.0]])  # confidences 0.98, 0.97, 0.95, 0.88
    last = torch.tensor([right] * 4)
    logits = torch.stack([first, last])
    for kind in CONFIDENCES:
        conf = confidence_score(first, kind)
        assert conf[0] > conf[1] > conf[2:].max()  # 0 and 1 lead, so one threshold can let exactly them go
        cal = calibrate(val_logits=logits, val_labels=labels, costs=costs, budget_fraction=0.75, confidence=kind)
        assert cal.feasible and cal.val_accuracy == 1.0 and cal.val_macs == 6.0 and cal.fraction == 0.75
        assert simulate(logits, labels, cal.thresholds, costs, kind).exit_index.tolist() == [0, 0, 1, 1]
        below = calibrate(val_logits=logits, val_labels=labels, costs=costs, budget_fraction=0.7499, confidence=kind)
        assert below.val_macs <= 0.7499 * 8 and below.val_accuracy == 0.75


def _dominates(a, b) -> bool:
    return a.macs <= b.macs and a.accuracy >= b.accuracy and (a.macs < b.macs or a.accuracy > b.accuracy)


@pytest.mark.parametrize("kind", CONFIDENCES)
def test_sweep_pareto_front_is_non_dominated(kind, costs):
    logits, labels = synthetic_exit_logits(150, seed=5)
    points = sweep(val_logits=logits, val_labels=labels, costs=costs, confidence=kind)
    assert len(points) > 5
    assert [p.macs for p in points] == sorted(p.macs for p in points)
    for p in points:
        if p.budget_fraction is not None:
            assert p.fraction <= p.budget_fraction
    front = pareto_front(points)
    assert front
    for f in front:  # nothing beats a frontier point
        assert not any(_dominates(p, f) for p in points)
    for p in points:  # every other point is beaten, or ties exactly with a frontier point
        if not any(p is f for f in front):
            assert any(_dominates(f, p) or (f.macs == p.macs and f.accuracy == p.accuracy) for f in front)
    assert all(a.macs < b.macs and a.accuracy < b.accuracy for a, b in zip(front, front[1:]))


P = namedtuple("P", "cost acc name")
PARETO_CASES = [
    # points (cost, accuracy, name), names of the expected frontier, in order
    ([(10, 0.5, "a"), (20, 0.6, "b"), (15, 0.4, "c"), (20, 0.7, "d"), (30, 0.7, "e"), (5, 0.1, "f"), (5, 0.1, "g")],
     ["f", "a", "d"]),
    ([(1, 0.9, "a"), (2, 0.5, "b"), (3, 0.95, "c")], ["a", "c"]),
    ([(3, 0.3, "a"), (2, 0.2, "b"), (1, 0.1, "c")], ["c", "b", "a"]),
    ([(1, 0.5, "a"), (1, 0.6, "b")], ["b"]),
    ([(4, 0.5, "only")], ["only"]),
    ([], []),
]


@pytest.mark.parametrize("points,expected", PARETO_CASES)
def test_pareto_front_hand_made(points, expected):
    assert [p[2] for p in pareto_front(points)] == expected  # plain (cost, accuracy, ...) tuples
    curve = [CurvePoint([], acc, cost, cost / 100) for cost, acc, _ in points]
    names = {id(c): p[2] for c, p in zip(curve, points)}
    assert [names[id(c)] for c in pareto_front(curve)] == expected  # .macs / .accuracy objects
    keyed = [P(*p) for p in points]
    assert [p.name for p in pareto_front(keyed, cost=lambda p: p.cost, accuracy=lambda p: p.acc)] == expected


# --------------------------------------------------------------------------------------------- runtime


@pytest.mark.parametrize("kind", CONFIDENCES)
def test_dynamic_vs_full_and_batched_runs(kind):
    model = dyn_model(kind).train()  # the helpers must switch to eval and back
    x = images(13, seed=4)
    with torch.no_grad():
        model.eval()
        exit_logits = torch.stack(model(x))
        th = random_thresholds(exit_logits, kind, torch.Generator().manual_seed(1))
        reference = model.forward_dynamic(x, th)
        model.train()

    outputs = []
    original = model.forward_dynamic

    def spy(inp, thresholds=None):
        out = original(inp, thresholds)
        outputs.append(out)
        return out

    model.forward_dynamic = spy  # the timed dynamic path is forward_dynamic itself
    try:
        cmp = dynamic_vs_full(model, x, th, repeats=2, warmup=1)
    finally:
        del model.forward_dynamic
    assert model.training
    assert cmp.speedup == pytest.approx(cmp.dynamic_images_per_s / cmp.full_images_per_s)
    assert cmp.batch_size == 13
    assert len(outputs) == 2 + 1 + 1  # timed, warm-up, and the exit count
    for out in outputs:
        assert torch.equal(out.preds, reference.preds) and torch.equal(out.exit_index, reference.exit_index)
    shares = torch.bincount(reference.exit_index, minlength=4).double() / 13
    assert cmp.exit_fraction == pytest.approx(shares.tolist())

    preds, exits = run_dynamic(model, x, th, batch_size=4)  # batches of 4, 4, 4, 1
    assert model.training
    assert torch.equal(preds, reference.preds) and torch.equal(exits, reference.exit_index)
    model.eval()
    torch.testing.assert_close(full_depth_forward(model, x), exit_logits[-1], atol=1e-5, rtol=1e-5)
    empty_preds, empty_exits = run_dynamic(model, x[:0], th)
    assert empty_preds.numel() == 0 and empty_exits.numel() == 0


SPEEDUP_CASES = [
    # thresholds, exit every sample takes; the MACs-implied speed-up limit is full depth / executed MACs
    ([0.0] * 4, 0),  # everybody leaves after 2 of 8 blocks: well over 2x fewer MACs, so it must run faster
    ([2.0] * 4, 3),  # nobody leaves early: every exit head runs too, so it cannot be faster than full depth
]


@pytest.mark.parametrize("thresholds,exit_taken", SPEEDUP_CASES)
def test_measured_speedup_is_consistent_with_the_exit_histogram(thresholds, exit_taken):
    model = tiny_model("adapter", num_classes=5, depth=8).eval()  # exits after blocks 2, 4, 6 and 8
    costs = measure_stage_costs(model)
    cum, base = costs.cumulative(), costs.full_depth_baseline()
    # a large batch and many interleaved repeats: on a loaded machine a single timing can be off by 2x
    cmp = dynamic_vs_full(model, images(256, seed=5), thresholds, repeats=15, warmup=2)
    assert cmp.exit_fraction[exit_taken] == 1.0
    limit = base / sum(f * c for f, c in zip(cmp.exit_fraction, cum))
    assert cmp.speedup < 1.5 * limit, (cmp, limit)  # timing noise aside, skipped MACs bound the gain
    if exit_taken == 0:
        assert limit > 2.5 and cmp.speedup > 1.4, (cmp, limit)  # measured 2.5-2.9; all exits timed: 0.8-1.2
    else:
        assert limit < 1.0


def test_measure_throughput_is_images_over_the_median_timed_call(monkeypatch):
    import dynadapter.inference.runtime as runtime

    durations = iter([0.5, 0.1, 0.3, 9.0, 0.2])  # median 0.3 s
    timed, calls = [], []
    monkeypatch.setattr(runtime, "_time_once", lambda fn, x: (timed.append(x), next(durations))[1])

    def fn(x):
        calls.append(torch.is_grad_enabled())

    x = torch.zeros(6, 3)  # 6 images
    assert measure_throughput(fn, x, repeats=5, warmup=2) == pytest.approx(6 / 0.3)
    assert len(timed) == 5 and calls == [False, False]  # the warm-up calls run fn directly, under no_grad
    for repeats in (0, -1):
        with pytest.raises(ValueError, match=f"repeats must be >= 1, got {repeats}"):
            measure_throughput(fn, x, repeats=repeats)


def test_set_thresholds_are_what_forward_dynamic_uses_by_default():
    model = dyn_model()
    x = images(11, seed=3)
    th = [0.6, 0.7, 0.8, 2.0]
    model.set_thresholds(th)
    assert model.thresholds.dtype == torch.float32 and model.thresholds.tolist() == pytest.approx(th)
    assert "thresholds" in model.state_dict()  # calibrated thresholds travel with the weights
    implicit, explicit = model.forward_dynamic(x), model.forward_dynamic(x, th)
    assert torch.equal(implicit.exit_index, explicit.exit_index) and torch.equal(implicit.preds, explicit.preds)
    model.set_thresholds([0, 0, 0, 0])  # integers are fine; everybody then leaves at the first exit
    assert model.thresholds.dtype == torch.float32 and not model.forward_dynamic(x).exit_index.any()
    with pytest.raises(RuntimeError):
        model.set_thresholds([0.5, 0.5])  # one per exit


def test_curve_at_budgets_fills_budgets_whose_point_was_deduplicated():
    from dynadapter.adapt import curve_at_budgets

    curve = [  # as sweep leaves it: 0.3 and 0.35 chose the same thresholds, so 0.35 has no label of its own
        {"budget": None, "val_accuracy": 0.1, "test_accuracy": 0.1},
        {"budget": 0.3, "val_accuracy": 0.5, "test_accuracy": 0.4},
        {"budget": 0.4, "val_accuracy": 0.6, "test_accuracy": 0.5},
    ]
    at = curve_at_budgets(curve, [0.2, 0.3, 0.35, 0.4, 1.0])
    assert 0.2 not in at  # below every feasible budget
    assert at[0.3]["test_accuracy"] == 0.4 and at[0.35]["test_accuracy"] == 0.4
    assert at[0.4]["test_accuracy"] == 0.5 and at[1.0]["test_accuracy"] == 0.5


def test_exit_shares_counts_every_exit_including_untaken_ones():
    from dynadapter.inference import exit_shares

    assert exit_shares(torch.tensor([0, 0, 3, 1]), 4) == [0.5, 0.25, 0.0, 0.25]
    assert exit_shares(torch.tensor([[2], [2]]), 3) == [0.0, 0.0, 1.0]  # any shape: one entry per sample
    assert exit_shares(torch.empty(0, dtype=torch.long), 2) == [0.0, 0.0]  # no samples: no share, no division
