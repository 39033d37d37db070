"""Contracts of dynadapter.train.losses beyond tests/test_train.py: a priority schedule may have a single exit
(a full-depth baseline given explicit weights) but not zero; `PrioritySchedule.from_config` honours the
configured end weights and shape on both of its paths (explicit start/end and a pattern); bad patterns, empty
outputs and bad distillation settings are refused with messages that name the setting; the self-distillation
term equals its definition, distill · T² · Σ_{s<S-1} KL(softmax(ŷ_S/T) ‖ softmax(ŷ_s/T)) averaged over the
batch, for any number of exits and any temperature > 0 (default 2); distill = 0 adds nothing at all, not even
NaN from masked (-inf) classes; and a loss evaluation raises no warnings (it runs every training step)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from dynadapter.config import PriorityConfig
from dynadapter.train import PrioritySchedule, multi_exit_loss
from dynadapter.train.losses import pattern_weights

from helpers import one_thread  # noqa: F401  (autouse fixture: one intra-op thread per module)


def exit_logits(num_exits: int, batch: int = 4, classes: int = 3, seed: int = 0) -> list[torch.Tensor]:
    """Per-exit logits that disagree with each other (distinct random draws)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, classes, generator=g) * 2 for _ in range(num_exits)]


def distillation_by_hand(logits: list[torch.Tensor], temperature: float) -> float:
    """T² · Σ over the earlier exits of the batch-mean KL(teacher ‖ student), teacher = last exit, in float64."""
    t = temperature
    p = torch.softmax(logits[-1].double() / t, dim=1)
    total = 0.0
    for z in logits[:-1]:
        q = torch.softmax(z.double() / t, dim=1)
        total += (p * (p.log() - q.log())).sum(dim=1).mean().item()
    return t * t * total


# --------------------------------------------------------------------------------------- priority schedule


def test_single_exit_schedule_moves_its_one_weight():
    """A full-depth baseline (one exit) with explicit weights gets a schedule like any other model."""
    sched = PrioritySchedule(1, [2.0], [0.5], "linear")
    assert sched.weights(0.0) == [2.0]
    assert sched.weights(0.5) == pytest.approx([1.25])
    assert PrioritySchedule(1).weights(0.3) == [1.0]
    assert PrioritySchedule.from_config(PriorityConfig(start=[3.0], shape="linear"), 1).weights(0.5) == [2.0]


def test_schedule_needs_at_least_one_exit():
    with pytest.raises(ValueError, match="num_exits must be >= 1, got 0"):
        PrioritySchedule(0)


def test_from_config_uses_the_explicit_end_weights_and_the_configured_shape():
    cfg = PriorityConfig(start=[2.0, 0.0], end=[0.0, 4.0], shape="linear")
    sched = PrioritySchedule.from_config(cfg, 2)
    assert sched.weights(1.0) == [0.0, 4.0]  # end as configured, not the all-ones default
    assert sched.weights(0.25) == pytest.approx([1.5, 1.0])  # linear: a quarter of the way, not the cosine ease
    constant = PrioritySchedule.from_config(cfg.model_copy(update={"shape": "constant"}), 2)
    assert constant.weights(1.0) == [2.0, 0.0]


@pytest.mark.parametrize("shape,t,expected", [
    ("linear", 0.25, [1.25, 0.75]),
    ("constant", 1.0, [1.5, 0.5]),
    ("cosine", 0.25, [1.5 - 0.5 * (1 - math.cos(math.pi / 4)), 0.5 + 0.5 * (1 - math.cos(math.pi / 4))]),
])
def test_from_config_pattern_follows_the_configured_shape(shape, t, expected):
    """shallow_first, strength 0.5, two exits: start [1.5, 0.5] -> end [0.5, 1.5] along the configured shape."""
    cfg = PriorityConfig(pattern="shallow_first", strength=0.5, shape=shape)
    assert PrioritySchedule.from_config(cfg, 2).weights(t) == pytest.approx(expected)


def test_pattern_weights_rejects_an_unknown_pattern_by_name():
    with pytest.raises(ValueError, match=r"train\.priority\.pattern must be flat, shallow_first or deep_first, "
                                         r"got 'shallow'"):
        pattern_weights("shallow", 0.5, 4)


# --------------------------------------------------------------------------------------- multi-exit loss


def test_multi_exit_loss_refuses_an_empty_output():
    with pytest.raises(ValueError, match=r"^multi_exit_loss needs at least one exit's logits$"):
        multi_exit_loss([], torch.tensor([0, 1]))


@pytest.mark.parametrize("distill,temperature", [(-0.1, 2.0), (0.5, 0.0), (0.0, 0.0), (0.5, -1.0)])
def test_multi_exit_loss_refuses_negative_distill_or_non_positive_temperature(distill, temperature):
    with pytest.raises(ValueError, match=rf"need distill >= 0 and temperature > 0, got distill={distill}, "
                                         rf"temperature={temperature}"):
        multi_exit_loss(exit_logits(3), torch.tensor([0, 1, 2, 0]), distill=distill, temperature=temperature)


@pytest.mark.parametrize("num_exits", [2, 3, 4])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_distillation_term_matches_its_definition(num_exits, temperature):
    """Every earlier exit learns from the last one, KL averaged over the batch (not over batch × classes),
    scaled by T² so its gradients keep their size across temperatures; temperatures below 1 are valid."""
    logits, y = exit_logits(num_exits), torch.tensor([0, 1, 2, 0])
    weights = [0.5 + s for s in range(num_exits)]
    plain, _ = multi_exit_loss(logits, y, weights)
    distilled, ces = multi_exit_loss(logits, y, weights, distill=0.7, temperature=temperature)
    assert distilled.item() - plain.item() == pytest.approx(0.7 * distillation_by_hand(logits, temperature),
                                                            rel=1e-5)
    assert torch.allclose(torch.stack(ces), torch.stack([F.cross_entropy(z, y) for z in logits]))


def test_distillation_temperature_defaults_to_two():
    logits, y = exit_logits(3), torch.tensor([0, 1, 2, 0])
    default, _ = multi_exit_loss(logits, y, distill=0.7)
    explicit, _ = multi_exit_loss(logits, y, distill=0.7, temperature=2.0)
    assert default.item() == pytest.approx(explicit.item(), rel=1e-7)


def test_distill_zero_adds_nothing_even_with_masked_classes():
    """distill = 0 is plain weighted CE: logits that mask classes with -inf (where the KL term would be
    0·log(0/0) = NaN) still give a finite loss and finite gradients."""
    g = torch.Generator().manual_seed(3)
    y = torch.tensor([0, 1, 0, 1])
    logits = []
    for _ in range(3):
        z = torch.randn(4, 3, generator=g)
        z[:, 2] = float("-inf")  # class 2 is masked out at every exit
        logits.append(z.requires_grad_())
    loss, ces = multi_exit_loss(logits, y, [1.0, 2.0, 0.5], distill=0.0)
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(sum(w * c.item() for w, c in zip([1.0, 2.0, 0.5], ces)), rel=1e-6)
    grads = torch.autograd.grad(loss, logits)
    assert all(torch.isfinite(gr).all() for gr in grads)


def test_loss_with_distillation_raises_no_warnings():
    """The loss runs every training step: any warning it raised would flood the logs."""
    logits, y = exit_logits(3), torch.tensor([0, 1, 2, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, _ = multi_exit_loss(logits, y, [1.0, 1.0, 1.0], distill=0.5, temperature=2.0)
    assert math.isfinite(loss.item())
