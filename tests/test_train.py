"""Contracts of dynadapter.train: priority schedule, multi-exit loss, gradient masking, the resumable loop."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from dynadapter.config import (
    BackboneConfig,
    ModelConfig,
    OptimConfig,
    PetlConfig,
    PretrainConfig,
    PriorityConfig,
    SparsityConfig,
    TrainConfig,
)
from dynadapter.models import build_model
from dynadapter.train import (
    AdamWStrategy,
    CheckpointMismatchError,
    GradientMasker,
    NonFiniteLossError,
    PrioritySchedule,
    evaluate,
    fit,
    fit_resumable,
    flatten_metrics,
    load_checkpoint,
    multi_exit_loss,
    param_groups,
    warmup_cosine,
)
from dynadapter.train.sparsity import masks_digest

from helpers import one_thread  # noqa: F401  (autouse fixture: one intra-op thread per module)

TINY = dict(img_size=16, patch_size=8, embed_dim=32, depth=4, num_heads=2)


def tiny_model(method: str = "adapter", early_exit: bool = True, seed: int = 0, sparsity: SparsityConfig | None = None):
    torch.manual_seed(seed)
    return build_model(
        BackboneConfig(name="vit_tiny_patch16_224", overrides=TINY),
        ModelConfig(petl=PetlConfig(method=method), early_exit=early_exit),
        num_classes=3,
        sparsity=sparsity if sparsity is not None else SparsityConfig(),
    )


def easy_data(n: int, seed: int, signal: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """3 classes, linearly separable: class c brightens colour channel c."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.5
    x[torch.arange(n), y] += signal
    return x, y


def train_cfg(**kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=16, lr=3e-3, warmup_epochs=0.5)
    return TrainConfig(**{**base, **kw})


def state(model: nn.Module, trainable: bool | None = None) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if trainable is None or p.requires_grad == trainable
    }


def timeless(history: list[dict]) -> list[dict]:
    """History without wall-clock times, the only entries that differ between identical runs."""
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------- priority schedule

SCHEDULE_CASES = [
    # shape, start, end, t, expected
    ("linear", [4, 2, 1, 0], [0, 1, 2, 4], 0.0, [4, 2, 1, 0]),
    ("linear", [4, 2, 1, 0], [0, 1, 2, 4], 1.0, [0, 1, 2, 4]),
    ("linear", [4, 2, 1, 0], [0, 1, 2, 4], 0.5, [2, 1.5, 1.5, 2]),  # midpoint = mean
    ("linear", [4, 2, 1, 0], [0, 1, 2, 4], 0.25, [3, 1.75, 1.25, 1]),
    ("cosine", [4, 2, 1, 0], [0, 1, 2, 4], 0.0, [4, 2, 1, 0]),
    ("cosine", [4, 2, 1, 0], [0, 1, 2, 4], 1.0, [0, 1, 2, 4]),
    ("cosine", [4, 2, 1, 0], [0, 1, 2, 4], 0.5, [2, 1.5, 1.5, 2]),  # half-cosine is symmetric
    ("cosine", [0, 0, 0, 0], [1, 1, 1, 1], 0.25, [(1 - math.cos(math.pi / 4)) / 2] * 4),
    ("constant", [4, 2, 1, 0], [0, 1, 2, 4], 0.7, [4, 2, 1, 0]),
    ("linear", None, None, 0.3, [1, 1, 1, 1]),
    ("linear", [2, 2, 2, 2], None, 1.0, [1, 1, 1, 1]),
    ("linear", [0, 1, 2, 3], [3, 2, 1, 0], 7.0, [3, 2, 1, 0]),  # t clamped to [0, 1]
]


@pytest.mark.parametrize("shape,start,end,t,expected", SCHEDULE_CASES)
def test_priority_schedule_values(shape, start, end, t, expected):
    sched = PrioritySchedule(4, start, end, shape)
    assert sched.weights(t) == pytest.approx(expected)


@pytest.mark.parametrize("start,end", [([0.1, 0.5, 1, 2], [3, 2, 1, 0.5]), ([3, 2, 1, 0], [0, 1, 2, 3])])
def test_priority_cosine_is_monotone_per_exit(start, end):
    sched = PrioritySchedule(4, start, end, "cosine")
    ts = [i / 50 for i in range(51)]
    for s in range(4):
        w = [sched.weights(t)[s] for t in ts]
        steps = [b - a for a, b in zip(w, w[1:])]
        assert all(d >= -1e-12 for d in steps) if end[s] >= start[s] else all(d <= 1e-12 for d in steps)
    # ease in / ease out: flatter at the ends than in the middle
    w0 = [sched.weights(t)[0] for t in (0.0, 0.02, 0.49, 0.51)]
    assert abs(w0[1] - w0[0]) < abs(w0[3] - w0[2])


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(start=[1, 1, 1]), "train.priority.start"),
        (dict(end=[1, 1, 1, 1, 1]), "train.priority.end"),
        (dict(start=[1, -1, 1, 1]), "train.priority.start"),
        (dict(shape="step"), "train.priority.shape"),
    ],
)
def test_priority_schedule_rejects_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        PrioritySchedule(4, **kwargs)


@pytest.mark.parametrize("exits", [2, 4, 5])
def test_priority_pattern_moves_emphasis_without_changing_the_mean(exits):
    from dynadapter.train.losses import pattern_weights

    start, end = pattern_weights("shallow_first", 0.5, exits)
    assert start[0] == pytest.approx(1.5) and start[-1] == pytest.approx(0.5)  # shallow exits lead early
    assert end == pytest.approx(start[::-1])  # and hand over to the deep ones
    assert sum(start) == pytest.approx(exits) and sum(end) == pytest.approx(exits)
    assert all(a > b for a, b in zip(start, start[1:]))
    assert pattern_weights("deep_first", 0.5, exits) == (end, start)
    assert pattern_weights("flat", 0.5, exits) == ([1.0] * exits, [1.0] * exits)
    assert pattern_weights("shallow_first", 0.9, 1) == ([1.0], [1.0])  # a single head always weighs 1


def test_default_train_config_prioritizes_but_the_full_depth_baseline_does_not():
    """Audit #14: the headline ran without prioritization (all weights 1)."""
    from dynadapter.adapt import full_depth_baseline
    from dynadapter.config import ModelConfig, TrainConfig
    from dynadapter.train.loop import priority_schedule

    cfg = TrainConfig()
    sched = priority_schedule(tiny_model(), cfg)
    assert sched is not None and sched.weights(0.0)[0] > 1.0 > sched.weights(1.0)[0]
    _, base_cfg = full_depth_baseline(ModelConfig(), cfg)
    assert priority_schedule(tiny_model(early_exit=False), base_cfg) is None


def test_priority_from_config_and_fit_check_exit_count():
    assert PrioritySchedule.from_config(PriorityConfig(start=[2, 1], shape="linear"), 2).weights(1.0) == [1, 1]
    model = tiny_model()
    with pytest.raises(ValueError, match=r"train\.priority\.start has 3 weights .* 4 exits"):
        fit(model, easy_data(16, 0), cfg=train_cfg(epochs=1, priority=PriorityConfig(start=[1, 1, 1])))


# --------------------------------------------------------------------------------------- loss


def test_multi_exit_loss_is_weighted_ce():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(5, 3, generator=g) for _ in range(3)]
    y = torch.tensor([0, 1, 2, 2, 1])
    w = [0.5, 2.0, 1.5]
    loss, ces = multi_exit_loss(logits, y, w)
    by_hand = [-(z.log_softmax(-1)[torch.arange(5), y]).mean() for z in logits]
    assert torch.allclose(torch.stack(ces), torch.stack(by_hand))
    assert loss.item() == pytest.approx(sum(wi * c.item() for wi, c in zip(w, by_hand)), rel=1e-6)
    # a plain classifier (one tensor) is a single exit: plain CE; default weights are 1
    single, (ce,) = multi_exit_loss(logits[0], y)
    assert single.item() == pytest.approx(F.cross_entropy(logits[0], y).item())
    assert ce.item() == pytest.approx(single.item())
    with pytest.raises(ValueError, match="2 loss weights for 3 exits"):
        multi_exit_loss(logits, y, [1.0, 1.0])


def test_distillation_zero_when_exits_agree_and_positive_otherwise():
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([0, 1, 2, 0])
    same = torch.randn(4, 3, generator=g)
    agree = [same.clone(), same.clone(), same.clone()]
    plain, _ = multi_exit_loss(agree, y, [1, 1, 1])
    distilled, _ = multi_exit_loss(agree, y, [1, 1, 1], distill=0.7, temperature=2.0)
    assert distilled.item() == pytest.approx(plain.item(), abs=1e-6)

    differ = [torch.randn(4, 3, generator=g).requires_grad_() for _ in range(3)]
    plain, _ = multi_exit_loss(differ, y, [1, 1, 1])
    distilled, _ = multi_exit_loss(differ, y, [1, 1, 1], distill=0.7, temperature=2.0)
    assert distilled.item() > plain.item() + 1e-4
    # the last exit is the teacher: distillation sends it no gradient
    (g_last_distilled,) = torch.autograd.grad(distilled, differ[-1])
    (g_last_plain,) = torch.autograd.grad(plain, differ[-1])
    assert torch.allclose(g_last_distilled, g_last_plain)


# --------------------------------------------------------------------------------------- gradient masking


def masked_grad(masker: GradientMasker, p: nn.Parameter) -> torch.Tensor:
    p.grad = None
    masker.resample()
    (p * torch.ones_like(p)).sum().backward()  # true gradient: all ones
    return p.grad.clone()


@pytest.mark.parametrize("q", [0.1, 0.5, 0.9])
def test_gradient_mask_zeroes_fraction_q(q):
    p = nn.Parameter(torch.zeros(200_000))
    masker = GradientMasker([p], q, seed=0)
    grad = masked_grad(masker, p)
    zero_frac = (grad == 0).float().mean().item()
    assert abs(zero_frac - q) < 0.01  # binomial std at n=2e5 is <= 0.0012
    assert set(grad.unique().tolist()) <= {0.0, 1.0}  # kept entries not rescaled by default
    masker.remove()


def test_gradient_mask_q0_disabled_and_removed_leave_grads_untouched():
    p = nn.Parameter(torch.zeros(10_000))
    for masker in (GradientMasker([p], 0.0), GradientMasker([p], 0.5, enabled=False)):
        assert not masker.active
        assert torch.equal(masked_grad(masker, p), torch.ones_like(p))
    masker = GradientMasker([p], 0.5)
    assert (masked_grad(masker, p) == 0).any()
    masker.remove()
    assert torch.equal(masked_grad(masker, p), torch.ones_like(p))
    masker.enabled = True
    assert (masked_grad(masker, p) == 0).any()
    masker.remove()


def test_gradient_mask_resamples_each_step_deterministically():
    p = nn.Parameter(torch.zeros(10_000))
    a = GradientMasker([p], 0.3, seed=7)
    g1, g2 = masked_grad(a, p), masked_grad(a, p)
    assert not torch.equal(g1, g2)  # a fresh mask every step
    a.remove()
    b = GradientMasker([p], 0.3, seed=7)
    assert torch.equal(masked_grad(b, p), g1) and torch.equal(masked_grad(b, p), g2)
    b.remove()


def test_gradient_mask_rescale_and_frozen_params():
    p, frozen = nn.Parameter(torch.zeros(10_000)), nn.Parameter(torch.zeros(5), requires_grad=False)
    masker = GradientMasker([p, frozen], 0.2, rescale=True)
    assert [id(x) for x in masker.params] == [id(p)]
    grad = masked_grad(masker, p)
    assert grad.unique().tolist() == pytest.approx([0.0, 1 / 0.8])
    masker.remove()


def test_gradient_mask_applies_before_post_accumulate_hooks():
    """DeepSpeed reduces gradients in post-accumulate-grad hooks: they must already see the masked gradient."""
    p = nn.Parameter(torch.zeros(1_000))
    seen = {}
    p.register_post_accumulate_grad_hook(lambda t: seen.__setitem__("grad", t.grad.clone()))
    masker = GradientMasker([p], 0.5, seed=0)
    grad = masked_grad(masker, p)
    assert torch.equal(seen["grad"], grad) and (grad == 0).any()
    masker.remove()


def test_gradient_mask_draws_lazily_when_resample_was_not_called():
    p = nn.Parameter(torch.zeros(10_000))
    masker = GradientMasker([p], 0.5, seed=0)
    (p * torch.ones_like(p)).sum().backward()  # no resample() first: the hook draws the step's mask itself
    assert masker.masks[0] is not None and torch.equal(p.grad, masker.masks[0].float())
    assert 0.4 < p.grad.mean().item() < 0.6
    masker.remove()


def test_gradient_mask_takes_the_full_shape_of_a_zero3_partitioned_parameter():
    """Under ZeRO-3, p.data holds only this rank's partition; the gradient autograd produces has `ds_shape`."""
    p = nn.Parameter(torch.zeros(3))  # the partition
    p.ds_shape = torch.Size([4, 5])
    masker = GradientMasker([p], 0.5, seed=0)
    masker.resample()
    assert masker.masks[0].shape == (4, 5)
    masker.remove()


def test_fit_draws_a_fresh_mask_before_every_optimizer_step(monkeypatch):
    """The loop must resample every step: a mask drawn once and kept would still zero a fraction q."""
    maskers: list[GradientMasker] = []

    class Recorded(GradientMasker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            maskers.append(self)

    seen: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []  # (masks, gradients) at each step

    class Recording(AdamWStrategy):
        def step(self):
            (masker,) = maskers
            params = masker.params
            seen.append(([m.clone() for m in masker.masks], [p.grad.clone() for p in params]))
            super().step()

    monkeypatch.setattr("dynadapter.train.loop.GradientMasker", Recorded)
    model = tiny_model()
    cfg = train_cfg(epochs=2, sparsity=SparsityConfig(p_max=0.0, p_min=0.0, q=0.5))
    fit(model, easy_data(48, 0), None, cfg, strategy=Recording, progress=False)
    assert len(seen) == 2 * 3  # 48 samples in batches of 16, two epochs
    for step, (masks, grads) in enumerate(seen):
        assert all(m is not None for m in masks), step
        kept = torch.cat([m.flatten() for m in masks]).float().mean().item()
        assert abs(kept - 0.5) < 0.05, (step, kept)
        for m, g in zip(masks, grads):  # the gradient the optimizer sees is the masked one
            assert not g[~m].any()
    for step in range(1, len(seen)):  # and every step's mask is new
        before, now = seen[step - 1][0], seen[step][0]
        same = sum(int((a == b).sum()) for a, b in zip(before, now)) / sum(a.numel() for a in now)
        assert same < 0.6, (step, same)  # independent draws at q = 0.5 agree on about half the entries


def test_gradient_masker_rejects_q_outside_0_1_and_masks_nothing_without_trainable_params():
    p = nn.Parameter(torch.zeros(4))
    for q in (1.0, 1.5, -0.1):  # q = 1 would zero every gradient (and rescale by 1/0)
        with pytest.raises(ValueError, match=rf"q must be in \[0, 1\), got {q}"):
            GradientMasker([p], q)
    frozen = nn.Parameter(torch.zeros(4), requires_grad=False)
    for params in ([], [frozen]):  # its own generator then lives on the CPU
        masker = GradientMasker(params, 0.5, seed=0)
        assert masker.params == [] and not masker.active and masker.generator.device == torch.device("cpu")
        masker.resample()
        assert masker.masks == []
        masker.remove()


def test_gradient_masker_defaults_seed_0_and_records_nothing():
    p = nn.Parameter(torch.zeros(1_000))
    default, seeded, other = GradientMasker([p], 0.5), GradientMasker([p], 0.5, seed=0), GradientMasker([p], 0.5, seed=1)
    for m in (default, seeded, other):
        m.resample()
    assert torch.equal(default.masks[0], seeded.masks[0]) and default.digests is None
    assert not torch.equal(other.masks[0], seeded.masks[0])
    for m in (default, seeded, other):
        m.remove()


def test_gradient_masker_from_config_passes_every_setting_through():
    p = nn.Parameter(torch.zeros(1_000))
    on, off = SparsityConfig(q=0.25), SparsityConfig(q=0.25, backward=False)

    def masks_of(m: GradientMasker) -> torch.Tensor:
        m.resample()
        out = m.masks[0].clone()
        m.remove()
        return out

    default = GradientMasker.from_config([p], on)
    assert default.q == 0.25 and default.active and default.digests is None
    assert torch.equal(masks_of(default), masks_of(GradientMasker([p], 0.25, seed=0)))
    seeded = GradientMasker.from_config([p], on, seed=3, record=True)
    assert seeded.digests == []
    assert torch.equal(masks_of(seeded), masks_of(GradientMasker([p], 0.25, seed=3)))
    assert len(seeded.digests) == 1
    g = torch.Generator().manual_seed(11)
    given = GradientMasker.from_config([p], on, generator=g)
    assert given.generator is g
    assert torch.equal(masks_of(given), masks_of(GradientMasker([p], 0.25, torch.Generator().manual_seed(11))))
    disabled = GradientMasker.from_config([p], off)
    assert not disabled.enabled and not disabled.active


def test_gradient_masker_remove_twice_then_enable_again():
    p = nn.Parameter(torch.zeros(10_000))
    masker = GradientMasker([p], 0.5, seed=0)
    assert masker.enabled is True and masker.active
    masker.remove()
    masker.remove()  # idempotent
    assert masker.enabled is False and not masker.active and masker.masks == [None]
    assert torch.equal(masked_grad(masker, p), torch.ones_like(p))
    masker.enabled = True
    assert masker.active and (masked_grad(masker, p) == 0).any()
    masker.remove()


def test_recorded_digests_name_each_steps_masks():
    p, r = nn.Parameter(torch.zeros(64)), nn.Parameter(torch.zeros(3, 5))
    masker = GradientMasker([p, r], 0.5, seed=0, record=True)
    steps = []
    for _ in range(3):
        masker.resample()
        steps.append(masker.masks)
    assert masker.digests == [masks_digest(m) for m in steps]
    assert len(set(masker.digests)) == 3 and all(len(d) == 64 for d in masker.digests)  # SHA-256 hex
    masker.remove()


def test_masks_digest_tells_apart_values_shapes_and_missing_masks():
    a = torch.tensor([[True, False, True], [False, True, True]])
    b = a.clone()
    b[1, 2] = False
    digest = masks_digest
    assert digest([a]) == digest([a.clone()]) and digest([a]) != digest([b])
    assert digest([a]) != digest([a.reshape(3, 2)])  # same bytes, another shape
    assert digest([None, a]) != digest([None, b])  # masks after a missing one still count
    assert digest([None, a]) != digest([a, None]) != digest([a])
    assert digest([None]) != digest([])


# --------------------------------------------------------------------------------------- optimizer and LR


def test_lr_warmup_then_cosine_at_known_steps():
    model = tiny_model()
    cfg = OptimConfig(epochs=2, lr=0.1, warmup_epochs=0.5)
    strat = AdamWStrategy(model, cfg, steps_per_epoch=4)  # warm-up 2 steps, 8 steps in all
    lrs = []
    for _ in range(8):
        lrs.append(strat.lr)
        sum(p.sum() for p in model.parameters() if p.requires_grad).backward()
        strat.step()
    cos = lambda k: 0.5 * (1 + math.cos(math.pi * k / 6))  # noqa: E731
    expected = [0.1 / 3, 0.2 / 3, 0.1, 0.1 * cos(1), 0.1 * cos(2), 0.05, 0.1 * cos(4), 0.1 * cos(5)]
    assert lrs == pytest.approx(expected)
    assert warmup_cosine(8, 2, 8) == pytest.approx(0.0)  # reaches 0 one step after the last
    assert warmup_cosine(0, 0, 10) == 1.0  # no warm-up: starts at the peak


def test_weight_decay_only_on_trainable_matrices():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 and p.requires_grad for p in decay["params"])
    assert all(p.ndim == 1 and p.requires_grad for p in no_decay["params"])
    assert any(names[id(p)].endswith("norm.weight") for p in no_decay["params"])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in (decay, no_decay) for p in g["params"]} == trainable


# --------------------------------------------------------------------------------------- the loop


@pytest.mark.parametrize("method", ["adapter", "lora", "rep_adapter", "linear_probe"])
def test_fit_trains_only_petl_and_heads(method):
    model = tiny_model(method)
    frozen0, trainable0 = state(model, trainable=False), state(model, trainable=True)
    fit(model, easy_data(32, 0), easy_data(16, 1), train_cfg(epochs=2), progress=False)
    assert_same_state(frozen0, state(model, trainable=False))
    after = state(model, trainable=True)
    changed = [n for n in trainable0 if not torch.equal(trainable0[n], after[n])]
    assert any(n.startswith("heads.") for n in changed)
    if method != "linear_probe":
        assert any(n.startswith("backbone.") for n in changed)  # the PETL branches


def test_fit_learns_an_easy_task_and_reports_metrics():
    model = tiny_model()
    train, val = easy_data(192, 0, signal=0.6), easy_data(96, 1, signal=0.6)
    before = evaluate(model, *val)
    seen = []
    res = fit(
        model, train, val, train_cfg(epochs=4, priority=PriorityConfig(start=[2, 1, 1, 0.5], end=[1, 1, 1, 1])),
        on_epoch_end=lambda e, m: seen.append((e, m["val_acc_mean"])), progress=False,
    )
    after = evaluate(model, *val)
    assert len(after) == 4 and len(res.history) == 4
    assert sum(after) / 4 > 0.8 and sum(after) / 4 > sum(before) / 4 + 0.2
    assert res.best_metric == pytest.approx(max(h["val_acc_mean"] for h in res.history))
    assert res.best_metric == pytest.approx(sum(after) / 4)  # best weights restored
    assert seen == [(h["epoch"], h["val_acc_mean"]) for h in res.history]
    h = res.history[-1]
    assert len(h["train_ce"]) == 4 and len(h["val_acc"]) == 4 and h["val_acc_last"] == h["val_acc"][-1]
    assert h["steps"] == 12 and h["seconds"] > 0
    assert res.history[0]["priority"][0] > 1.5 and h["priority"] == pytest.approx([1, 1, 1, 1])  # t=1 at last step
    assert res.history[0]["train_loss"] > h["train_loss"]
    assert h["lr"] < res.history[0]["lr"]
    flat = flatten_metrics(h)
    assert flat["val_acc_3"] == h["val_acc"][3] and flat["train_ce_0"] == h["train_ce"][0] and "epoch" in flat


def test_fit_is_deterministic_and_dataset_input_matches_tensors():
    train, val = easy_data(40, 0), easy_data(16, 1)
    runs = []
    for data in (train, train, TensorDataset(*train)):
        model = tiny_model()
        res = fit(model, data, val, train_cfg(epochs=2), seed=3, progress=False)
        runs.append((state(model), timeless(res.history)))
    for weights, history in runs[1:]:
        assert_same_state(runs[0][0], weights)
        assert history == runs[0][1]
    # another seed: another shuffling / dropout / masks
    model = tiny_model()
    fit(model, train, val, train_cfg(epochs=2), seed=4, progress=False)
    assert not torch.equal(state(model)["heads.0.fc.weight"], runs[0][0]["heads.0.fc.weight"])


class Crash(RuntimeError):
    pass


def test_checkpoint_resume_continues_exactly(tmp_path):
    train, val = easy_data(40, 0), easy_data(16, 1)
    cfg = train_cfg(epochs=4, distill=0.5)
    straight = tiny_model()
    ref = fit(straight, train, val, cfg, seed=1, progress=False)

    def crash_after_2(epoch, metrics):
        if epoch == 2:
            raise Crash

    ckpt = tmp_path / "run" / "last.pt"
    first = tiny_model()
    with pytest.raises(Crash):
        fit(first, train, val, cfg, seed=1, checkpoint_path=ckpt, on_epoch_end=crash_after_2, progress=False)
    saved = torch.load(ckpt, weights_only=True)  # safe loading: plain tensors and containers only
    assert saved["epoch"] == 2 and len(saved["history"]) == 2
    assert all(v.isfinite().all() for v in saved["model"].values())
    assert not list(ckpt.parent.glob(".*tmp*"))  # atomic write leaves no temporary behind

    resumed = tiny_model()  # a fresh process: same backbone, freshly initialised branches
    res = fit(resumed, train, val, cfg, seed=1, checkpoint_path=ckpt, progress=False)
    assert res.resumed_from == 2
    assert timeless(res.history) == timeless(ref.history)
    assert res.history[:2] == saved["history"]  # epochs before the crash come back as recorded
    assert (res.best_epoch, res.best_metric) == (ref.best_epoch, ref.best_metric)
    assert_same_state(state(straight), state(resumed))

    # a finished run resumes to the same result without training
    again = tiny_model()
    res2 = fit(again, train, val, cfg, seed=1, checkpoint_path=ckpt, progress=False)
    assert timeless(res2.history) == timeless(ref.history)
    assert_same_state(state(straight), state(again))
    assert load_checkpoint(ckpt)["epoch"] == 4

    # a checkpoint from another run is refused, naming what differs
    with pytest.raises(CheckpointMismatchError, match="config"):
        fit(tiny_model(), train, val, train_cfg(epochs=5), seed=1, checkpoint_path=ckpt, progress=False)
    with pytest.raises(CheckpointMismatchError, match="frozen backbone"):
        fit(tiny_model(seed=9), train, val, cfg, seed=1, checkpoint_path=ckpt, progress=False)


def test_fit_resumable_starts_over_when_params_changed(tmp_path, capsys):
    """The pipelines' resume: a stale checkpoint (params edited since the interrupted run) is not an error."""
    train, val = easy_data(24, 0), easy_data(8, 1)
    ckpt = tmp_path / "ckpt.pt"
    fit(tiny_model(), train, val, train_cfg(epochs=1), seed=1, checkpoint_path=ckpt, progress=False)
    ref = fit(tiny_model(), train, val, train_cfg(epochs=2), seed=1, progress=False)
    res = fit_resumable(tiny_model(), train, val, train_cfg(epochs=2), seed=1, checkpoint_path=ckpt, progress=False)
    assert res.resumed_from is None and len(res.history) == 2
    assert timeless(res.history) == timeless(ref.history)
    assert "starting over" in capsys.readouterr().err
    assert load_checkpoint(ckpt)["epoch"] == 2  # the new run's checkpoint replaced the stale one


def test_fit_resumable_clears_a_checkpoint_write_cut_short_by_a_kill(tmp_path):
    train, val = easy_data(24, 0), easy_data(8, 1)
    ckpt = tmp_path / "ckpt.pt"

    def crash_after_1(epoch, metrics):
        raise Crash

    with pytest.raises(Crash):
        fit(tiny_model(), train, val, train_cfg(epochs=2), seed=1, checkpoint_path=ckpt, on_epoch_end=crash_after_1,
            progress=False)
    half = tmp_path / f".{ckpt.name}.tmp-99999"  # what SIGKILL inside save_checkpoint leaves behind
    half.write_bytes(ckpt.read_bytes()[:100])
    other = tmp_path / ".other.pt.tmp-99999"  # another run's file is not ours to remove
    other.write_bytes(b"x")
    res = fit_resumable(tiny_model(), train, val, train_cfg(epochs=2), seed=1, checkpoint_path=ckpt,
                        progress=False)
    assert res.resumed_from == 1 and len(res.history) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.tmp-99999", "ckpt.pt"]


def test_model_selection_uses_val_and_restores_best(tmp_path):
    train, val = easy_data(32, 0), easy_data(16, 1)
    model = tiny_model()
    per_epoch = {}
    res = fit(
        model, train, val, train_cfg(epochs=3), select=lambda m: -m["epoch"],  # prefers epoch 1
        on_epoch_end=lambda e, m: per_epoch.__setitem__(e, state(model, trainable=True)), progress=False,
    )
    assert res.best_epoch == 1 and res.best_metric == -1
    assert_same_state(per_epoch[1], state(model, trainable=True))
    with pytest.raises(ValueError, match="validation metric"):
        fit(tiny_model(), train, val, train_cfg(epochs=1), select="train_loss")
    # without validation data the last epoch is kept
    model = tiny_model()
    res = fit(model, train, None, train_cfg(epochs=2), progress=False)
    assert res.best_epoch == 2 and res.best_metric is None and "val_acc" not in res.history[-1]


def test_early_stop_from_callback_is_final(tmp_path):
    train, ckpt = easy_data(32, 0), tmp_path / "c.pt"
    res = fit(tiny_model(), train, None, train_cfg(epochs=4), checkpoint_path=ckpt,
              on_epoch_end=lambda e, m: e == 2, progress=False)
    assert res.stopped_early and len(res.history) == 2
    res = fit(tiny_model(), train, None, train_cfg(epochs=4), checkpoint_path=ckpt, progress=False)
    assert res.stopped_early and len(res.history) == 2 and res.resumed_from == 2


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    train, val, ckpt = easy_data(32, 0), easy_data(16, 1), tmp_path / "c.pt"
    model = tiny_model()
    calls = {"n": 0}

    def poison(module, args, out):  # NaN logits at the 2nd training step of epoch 2 (2 steps per epoch)
        if module.training:
            calls["n"] += 1
            if calls["n"] == 4:
                return [o * float("nan") for o in out]
        return None

    model.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 2"):
        fit(model, train, val, train_cfg(epochs=3), checkpoint_path=ckpt, progress=False)
    saved = load_checkpoint(ckpt)
    assert saved["epoch"] == 1
    assert all(v.isfinite().all() for v in saved["model"].values())
    assert all(p.isfinite().all() for p in model.parameters())  # the bad step was never applied


def test_diverging_lr_never_writes_a_checkpoint(tmp_path):
    ckpt = tmp_path / "c.pt"
    with pytest.raises(NonFiniteLossError, match="epoch 1"):
        fit(tiny_model(), easy_data(64, 0), None, train_cfg(epochs=2, lr=1e30, warmup_epochs=0), checkpoint_path=ckpt,
            progress=False)
    assert not ckpt.exists()


def test_fit_trains_a_plain_classifier_and_full_depth_baseline():
    train, val = easy_data(32, 0), easy_data(16, 1)
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **TINY)
    w0 = vit.head.weight.detach().clone()
    res = fit(vit, train, val, PretrainConfig(epochs=1, batch_size=16), progress=False)  # tensor output
    assert len(res.history[0]["train_ce"]) == 1 and len(res.history[0]["val_acc"]) == 1
    assert not torch.equal(w0, vit.head.weight)
    baseline = tiny_model(early_exit=False)
    res = fit(baseline, train, val, train_cfg(epochs=1), progress=False)
    assert baseline.exits == [4] and len(res.history[0]["val_acc"]) == 1
    assert res.history[0]["train_loss"] == pytest.approx(res.history[0]["train_ce"][0])  # plain CE
