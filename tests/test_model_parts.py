"""Contracts of the model's parts, below what test_models.py and test_inference.py check end to end: the exit
heads (their layout, balanced widths, dropout on input and hidden layer, defaults), the confidence score's values
and shapes, what DynAdapterViT itself refuses and reports (exit lists, head counts, class count, uncalibrated
thresholds), pooling as the backbone configures it (average over patch tokens, register tokens skipped), an exit
threshold of exactly 1, outputs and merges staying on the model's device (checked on the `meta` device, so no
accelerator is needed), the factory's wiring (a given backbone, dropout past the reference exits, exits beyond the
depth) and the PETL arithmetic (the AdaptFormer branch, merge_petl on models with nothing to merge)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynadapter.config import ModelConfig, SparsityConfig
from dynadapter.inference import NEVER
from dynadapter.models import DynAdapterViT, build_model, confidence_score, create_backbone, merge_petl, resolve_exits
from dynadapter.models.factory import head_widths
from dynadapter.models.heads import ExitHead, balanced_widths
from dynadapter.models.petl import PetlModule
from dynadapter.models.petl.adapter import ParallelAdapterMLP
from dynadapter.models.petl.lora import LoRALinear
from dynadapter.models.petl.rep_adapter import RepAdapterLinear
from helpers import backbone_cfg, images, one_thread, randomize_petl, tiny_model  # noqa: F401

# ------------------------------------------------------------------------------------------------ exit heads

WIDTH_CASES = [
    # num_exits, dim, num_classes, widths: 2D, D, D/2, ... then 0 (LN + Linear) for the last exit
    (4, 32, None, [64, 32, 16, 0]),
    (8, 32, None, [64, 32, 16, 8, 4, 2, 1, 0]),
    (10, 8, None, [16, 8, 4, 2, 1, 1, 1, 1, 1, 0]),  # never narrower than a 1-wide bottleneck
    (4, 32, 100, [64, 32, 0, 0]),  # 16 * (32 + 100) < 32 * 100: cheaper than LN + Linear, so the plain head
    (4, 4, 4, [8, 4, 2, 0]),  # 2 * (4 + 4) == 4 * 4: exactly as costly as LN + Linear, kept
    (8, 32, 1, [64, 32, 16, 8, 4, 2, 1, 0]),  # one class: every bottleneck is cheaper than nothing else
    (1, 32, 5, [0]),  # a single exit: just the light head
]


@pytest.mark.parametrize("num_exits,dim,num_classes,expected", WIDTH_CASES)
def test_balanced_head_widths_halve_per_exit(num_exits, dim, num_classes, expected):
    assert balanced_widths(num_exits, dim, num_classes) == expected
    assert head_widths(ModelConfig(), num_exits, dim, num_classes) == expected


def test_heads_width_scales_the_balanced_widths_and_their_parameters():
    """base.model.heads.width: 0.25 gives D/2, D/4, D/8 for D = 64 (the default backbone) and about a quarter
    of the balanced heads' parameters; hidden lists and balanced: false still win."""
    quarter = ModelConfig.model_validate({"heads": {"width": 0.25}})
    assert head_widths(quarter, 4, 64, 6) == [32, 16, 8, 0]
    assert head_widths(quarter, 4, 64, 10) == [32, 16, 0, 0]  # 8 * (64 + 10) < 64 * 10: the LN + Linear rule
    assert head_widths(ModelConfig.model_validate({"heads": {"width": 0.25, "hidden": [5, 4, 3, 0]}}), 4, 64) == [5, 4, 3, 0]
    assert head_widths(ModelConfig.model_validate({"heads": {"width": 0.25, "balanced": False}}), 4, 64) == [0] * 4
    params = {w: sum(sum(p.numel() for p in ExitHead(64, 6, h).parameters())
                     for h in head_widths(ModelConfig.model_validate({"heads": {"width": w}}), 4, 64, 6))
              for w in (1.0, 0.25)}
    assert 0.25 < params[0.25] / params[1.0] < 0.35
    with pytest.raises(ValueError):
        ModelConfig.model_validate({"heads": {"width": 0}})


def test_the_factory_sizes_heads_for_the_real_class_count():
    model = tiny_model("adapter", num_classes=100)  # D = 32, four exits
    assert [h.hidden for h in model.heads] == [64, 32, 0, 0]
    assert [h.fc.in_features for h in model.heads] == [64, 32, 32, 32]
    assert {h.fc.out_features for h in model.heads} == {100} and model.num_classes == 100


def _reference_head(head: ExitHead, x: torch.Tensor) -> torch.Tensor:
    """LN -> [Linear(D, h) -> GELU] -> Linear(., C), dropout off."""
    z = F.layer_norm(x, (x.shape[-1],), head.norm.weight, head.norm.bias, head.norm.eps)
    if head.hidden > 0:
        z = F.gelu(head.mlp[0](z))
    return head.fc(z)


def test_a_default_exit_head_is_the_plain_layernorm_linear_head_without_dropout():
    torch.manual_seed(0)
    head = ExitHead(32, 5).train()
    assert head.hidden == 0 and head.fc.in_features == 32 and head.fc.out_features == 5
    x = torch.randn(6, 32)
    with torch.no_grad():
        torch.testing.assert_close(head(x), _reference_head(head, x))  # train mode, yet nothing dropped


@pytest.mark.parametrize("hidden", [1, 16, 64])
def test_a_hidden_exit_head_computes_ln_linear_gelu_linear(hidden):
    torch.manual_seed(0)
    head = ExitHead(32, 5, hidden=hidden, dropout=0.3).eval()
    assert head.hidden == hidden and head.fc.in_features == hidden
    x = torch.randn(6, 32) * 3 + 1
    with torch.no_grad():
        out = head(x)
        torch.testing.assert_close(out, _reference_head(head, x))
        # the GELU matters (a purely linear head would give other logits)
        linear = head.fc(head.mlp[0](F.layer_norm(x, (32,), head.norm.weight, head.norm.bias)))
        assert (out - linear).abs().max() > 1e-3


@pytest.mark.parametrize("hidden", [0, 16])
def test_head_dropout_hits_its_input_and_its_hidden_layer_at_the_configured_rate(hidden):
    """Forward sparsity regularises a head twice: dropout on the pooled features and on the hidden layer."""
    torch.manual_seed(0)
    head = ExitHead(32, 5, hidden=hidden, dropout=0.5)
    seen: dict[str, torch.Tensor] = {}
    first = head.mlp[0] if hidden else head.fc
    hooks = [first.register_forward_pre_hook(lambda m, a: seen.__setitem__("input", a[0]))]
    if hidden:
        hooks.append(head.fc.register_forward_pre_hook(lambda m, a: seen.__setitem__("hidden", a[0])))
    x = torch.randn(512, 32)
    try:
        with torch.no_grad():
            head.train()(x)
            dropped = {k: float((v == 0).float().mean()) for k, v in seen.items()}
            head.eval()(x)
            kept = {k: float((v == 0).float().mean()) for k, v in seen.items()}
    finally:
        for h in hooks:
            h.remove()
    assert set(dropped) == ({"input", "hidden"} if hidden else {"input"})
    assert all(abs(f - 0.5) < 0.05 for f in dropped.values()), dropped
    assert all(f == 0 for f in kept.values()), kept


# ----------------------------------------------------------------------------------------- confidence score


def test_confidence_score_values():
    c = 3
    uniform = torch.zeros(2, c)
    assert confidence_score(uniform, "max_softmax").tolist() == pytest.approx([1 / c] * 2)
    assert confidence_score(uniform, "entropy").tolist() == pytest.approx([0.0] * 2, abs=1e-6)
    certain = torch.tensor([[200.0, 0.0, 0.0], [0.0, 0.0, 200.0]])
    for kind in ("max_softmax", "entropy"):
        assert confidence_score(certain, kind).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    # probabilities (1/2, 1/4, 1/4): entropy 1.5 ln 2, normalised by ln 3 (the class count, not the batch size)
    half = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.25, 0.5]]))
    assert confidence_score(half, "max_softmax").tolist() == pytest.approx([0.5, 0.5])
    expected = 1 - 1.5 * math.log(2) / math.log(3)
    assert confidence_score(half, "entropy").tolist() == pytest.approx([expected] * 2, rel=1e-5)
    assert confidence_score(half).tolist() == pytest.approx([0.5, 0.5])  # max softmax by default
    with pytest.raises(ValueError, match="confidence must be 'max_softmax' or 'entropy', got 'margin'"):
        confidence_score(half, "margin")


@pytest.mark.parametrize("kind", ["max_softmax", "entropy"])
def test_confidence_score_reduces_over_classes_only(kind):
    """Stacked exit logits [S, N, C] give [S, N]: each row's score, whatever the leading dimensions."""
    logits = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0)) * 2
    scores = confidence_score(logits, kind)
    assert scores.shape == (2, 4)
    torch.testing.assert_close(scores, torch.stack([confidence_score(lg, kind) for lg in logits]))
    assert ((scores >= 0) & (scores <= 1)).all()


# ------------------------------------------------------------------------------- DynAdapterViT's own checks


def _hand_built(exits: list[int], num_heads: int | None = None, num_classes: int = 3, **kw) -> DynAdapterViT:
    vit = create_backbone(backbone_cfg())  # depth 4
    heads = nn.ModuleList(ExitHead(32, num_classes) for _ in range(len(exits) if num_heads is None else num_heads))
    return DynAdapterViT(vit, exits, heads, **kw)


@pytest.mark.parametrize("exits", [[], [0, 2], [2, 2], [0]])
def test_model_refuses_empty_or_out_of_range_exit_lists(exits):
    with pytest.raises(ValueError, match=r"strictly increasing block numbers in 1\.\.4"):
        _hand_built(exits, num_heads=max(len(exits), 1))


def test_model_needs_one_head_per_exit():
    with pytest.raises(ValueError, match="3 heads for 2 exits"):
        _hand_built([2, 4], num_heads=3)
    with pytest.raises(ValueError, match="1 heads for 2 exits"):
        _hand_built([2, 4], num_heads=1)


def test_hand_built_model_defaults_max_softmax_reports_classes_and_is_uncalibrated():
    torch.manual_seed(0)
    model = _hand_built([2, 4], num_classes=7).eval()
    assert model.confidence == "max_softmax" and model.num_classes == 7
    # never calibrated: every threshold is NEVER (everyone runs to the last exit), saved with the weights
    assert model.thresholds.tolist() == [NEVER, NEVER]
    assert torch.equal(model.state_dict()["thresholds"], model.thresholds)
    x = images(5, seed=2)
    assert model.forward_dynamic(x).exit_index.tolist() == [1] * 5
    out = model.forward_dynamic(x, [0.0, 0.0])  # the default confidence works: everybody leaves at once
    assert out.exit_index.tolist() == [0] * 5 and out.logits.shape == (5, 7)
    # a model with nothing to merge: merge_petl leaves it alone
    assert merge_petl(model) == 0


@pytest.mark.parametrize("kind", ["max_softmax", "entropy"])
def test_a_threshold_of_exactly_one_is_reachable(kind):
    """Only thresholds above 1 mean "never": a sample whose confidence rounds to exactly 1 leaves at 1.0."""
    model = tiny_model("adapter", confidence=kind).eval()
    with torch.no_grad():
        model.heads[0].fc.weight.mul_(1e4)  # logits thousands apart: softmax is one-hot in float32
    x = images(6, seed=1)
    with torch.no_grad():
        conf0 = confidence_score(model(x)[0], kind)
    assert conf0.tolist() == [1.0] * 6
    out = model.forward_dynamic(x, [1.0, NEVER, NEVER, NEVER])
    assert out.exit_index.tolist() == [0] * 6
    assert model.forward_dynamic(x, [1.0 + 1e-6, NEVER, NEVER, NEVER]).exit_index.tolist() == [3] * 6


def test_forward_dynamic_answers_on_the_inputs_device():
    """exit_index and logits live where the input does (checked on `meta`: shapes and devices, no data)."""
    model = tiny_model("adapter").eval().to("meta")
    x = torch.empty(3, 3, 16, 16, device="meta")
    out = model.forward_dynamic(x, [NEVER, NEVER, NEVER, 0.0])
    assert out.exit_index.device.type == "meta" and out.exit_index.dtype == torch.long
    assert out.logits.device.type == "meta" and out.logits.shape == (3, 5)


# ---------------------------------------------------------------------------------------------- pooling


def _stage_tokens(model: DynAdapterViT, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each exit's token sequence (the output of the block it sits after), with the exits' logits."""
    seen: list[torch.Tensor] = []
    hooks = [model.backbone.blocks[e - 1].register_forward_hook(lambda m, a, out: seen.append(out))
             for e in model.exits]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen, logits


POOL_CASES = [
    # backbone overrides, how the exit pools tokens [B, N, D]
    (dict(global_pool="avg", reg_tokens=2), lambda t: t[:, 3:].mean(1)),  # class + 2 register tokens skipped
    (dict(global_pool="avg", class_token=False), lambda t: t.mean(1)),  # no prefix: every token
    (dict(global_pool=""), lambda t: t[:, 0]),  # no pooling configured: the class token
    ({}, lambda t: t[:, 0]),  # the ViT default, token pooling
]


@pytest.mark.parametrize("overrides,pool", POOL_CASES, ids=["avg-reg", "avg-no-cls", "none", "token"])
def test_exits_pool_tokens_as_the_backbone_is_configured(overrides, pool):
    model = tiny_model("adapter", **overrides).eval()
    tokens, logits = _stage_tokens(model, images(3, seed=5))
    assert len(tokens) == len(logits) == 4
    with torch.no_grad():
        for s, (t, lg) in enumerate(zip(tokens, logits)):
            torch.testing.assert_close(lg, model.heads[s](pool(t)))


# --------------------------------------------------------------------------------------- factory wiring


def test_build_model_wraps_the_backbone_it_is_given():
    vit = create_backbone(backbone_cfg(depth=2))  # the config says depth 4: the given module wins
    model = build_model(backbone_cfg(), ModelConfig(), num_classes=3, backbone=vit)
    assert model.backbone is vit and model.exits == [1, 2]


def test_blocks_past_the_last_exit_get_the_last_stages_dropout():
    """A static truncation (exits 2, 4, 6 of 8 blocks): stages fall 0.4 -> 0.25 -> 0.1, blocks 7-8 keep 0.1."""
    model = tiny_model("adapter", sparsity=SparsityConfig(p_max=0.4, p_min=0.1), exits=[2, 4, 6], depth=8)
    blocks = [{m.drop.p for m in b.modules() if isinstance(m, PetlModule)}.pop() for b in model.backbone.blocks]
    heads = [{m.p for m in h.modules() if isinstance(m, nn.Dropout)}.pop() for h in model.heads]
    assert blocks == pytest.approx([0.4, 0.4, 0.25, 0.25, 0.1, 0.1, 0.1, 0.1])
    assert heads == pytest.approx([0.4, 0.25, 0.1])


def test_any_exit_beyond_the_depth_is_refused():
    with pytest.raises(ValueError, match="beyond the backbone depth 4"):
        resolve_exits(ModelConfig(exits=[1, 2, 6]), 4)
    assert resolve_exits(ModelConfig(exits=[1, 2, 4]), 4) == [1, 2, 4]


@pytest.mark.parametrize("method", ["linear_probe", "full_finetune", "adapter"])
def test_merge_petl_on_a_model_with_nothing_to_merge_changes_nothing(method):
    model = tiny_model(method).eval()
    randomize_petl(model)
    x = images(4, seed=3)
    with torch.no_grad():
        before = model(x)
        assert merge_petl(model) == 0
        after = model(x)
    for a, b in zip(before, after):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------- PETL arithmetic


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_adapter_adds_its_scaled_bottleneck_to_the_mlp(scale):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    module = ParallelAdapterMLP(mlp, 8, 4, scale, 0.0)
    nn.init.normal_(module.up.weight)  # up starts at zero: the branch would be a no-op
    nn.init.normal_(module.up.bias)
    h = torch.randn(3, 5, 8)
    with torch.no_grad():
        branch = scale * module.up(F.gelu(module.down(h)))
        assert branch.abs().max() > 0.1
        torch.testing.assert_close(module.branch(h), branch)
        torch.testing.assert_close(module(h), mlp(h) + branch)


@pytest.mark.parametrize("cls", [LoRALinear, RepAdapterLinear])
@pytest.mark.parametrize("bias", [True, False])
def test_merged_linear_stays_on_the_branchs_device(cls, bias):
    """A merge on an accelerator must not build its plain nn.Linear on the CPU (`meta` stands in for one)."""
    module = cls(nn.Linear(6, 6, bias=bias), 2, 1.0, 0.0).to("meta")
    merged = module.merge()
    assert isinstance(merged, nn.Linear) and not any(p.requires_grad for p in merged.parameters())
    assert {p.device.type for p in merged.parameters()} == {"meta"}
    assert merged.weight.shape == (6, 6)


def test_the_shipped_default_trains_at_most_5_percent_of_the_backbone():
    """Issue 25: params.yaml's default Dyn-Adapter (Rep-Adapter + balanced heads at heads.width) trains at most
    5 % of the backbone's parameters on every default task, whatever its class count (the heads' last layers grow
    with it: width 0.25 gave 5.01 % on the six-task suite)."""
    from dynadapter.config import load_params
    from dynadapter.data import TASKS
    from dynadapter.models import count_parameters
    from helpers import ROOT

    params = load_params(ROOT / "params.yaml")
    fractions = {}
    for task in params.base.tasks:
        n = count_parameters(build_model(params.base.backbone, params.base.model, TASKS[task].num_classes))
        fractions[task] = n["trainable"] / n["backbone"]
    assert max(fractions.values()) <= 0.05, fractions
    assert min(fractions.values()) > 0.04, fractions  # the adapters are there: not a count of nothing
