"""Contracts of dynadapter.models: shapes and trainable sets per PETL method, merges, heads, exits, sparsity,
and strict backbone loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from dynadapter.config import (
    BackboneConfig,
    BaseSection,
    HeadsConfig,
    LoRAConfig,
    ModelConfig,
    PetlConfig,
    RepAdapterConfig,
    SparsityConfig,
)
from dynadapter.inference import measure_stage_costs
from dynadapter.models import (
    CheckpointError,
    DynAdapterViT,
    build_model,
    count_parameters,
    create_backbone,
    load_backbone_weights,
    merge_petl,
    resolve_exits,
    stage_dropout,
)
from dynadapter.models.heads import ExitHead
from dynadapter.models.petl import PetlMethod, PetlModule
from helpers import PETL_METHODS, backbone_cfg, images, one_thread, randomize_petl, tiny_model  # noqa: F401

# ------------------------------------------------------------------------ shapes and what trains, per method

MODEL_CASES = [(m, ee) for m in PETL_METHODS + ["linear_probe", "full_finetune"] for ee in (True, False)]


@pytest.mark.parametrize("method,early_exit", MODEL_CASES)
def test_forward_shapes_and_trainable_parameters(method, early_exit):
    model = tiny_model(method, early_exit=early_exit, num_classes=7)
    depth = len(model.backbone.blocks)
    assert model.exits == ([1, 2, 3, 4] if early_exit else [depth])

    out = model(images(3))
    assert isinstance(out, list) and len(out) == len(model.exits)
    assert all(o.shape == (3, 7) for o in out)

    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    heads = {id(p) for p in model.heads.parameters()}
    branch = {id(p) for p in PetlMethod.branch_parameters(model.backbone)}
    frozen_backbone = [
        n for n, p in model.backbone.named_parameters() if id(p) not in branch and p.requires_grad
    ]
    counts = count_parameters(model)
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["heads"] == sum(p.numel() for p in model.heads.parameters())
    assert counts["petl"] == sum(p.numel() for p in PetlMethod.branch_parameters(model.backbone))
    assert counts["backbone"] == sum(p.numel() for p in model.backbone.parameters()) - counts["petl"]

    if method in PETL_METHODS:
        assert branch and trainable == heads | branch  # exactly PETL branches + heads
        assert frozen_backbone == []
        assert counts["trainable"] == counts["heads"] + counts["petl"]
        assert 0 < counts["petl"] < counts["backbone"] / 5
        # a zero-initialised branch is an exact no-op: same logits as the bare backbone with the same heads
        probe = tiny_model("linear_probe", early_exit=early_exit, num_classes=7)
        probe.load_state_dict(_strip_branches(model.state_dict()))
        model.eval(), probe.eval()
        for a, b in zip(model(images(3)), probe(images(3))):
            torch.testing.assert_close(a, b)
    elif method == "linear_probe":
        assert not branch and trainable == heads
        assert counts["trainable"] == counts["heads"] and counts["petl"] == 0
    else:  # full_finetune: everything trains
        assert not branch and all(p.requires_grad for p in model.parameters())
        assert counts["trainable"] == sum(p.numel() for p in model.parameters())


def _strip_branches(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PETL model's state dict in the plain model's key space: wrapped `.base.` modules, branches dropped."""
    out = {}
    for k, v in state.items():
        if any(f".{b}." in k for b in ("down", "up")):
            continue
        out[k.replace(".base.", ".")] = v
    return out


@pytest.mark.parametrize("method", PETL_METHODS)
def test_backward_reaches_only_trainable_parameters(method):
    model = tiny_model(method)
    randomize_petl(model)
    sum(o.logsumexp(-1).sum() for o in model(images(4))).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


# --------------------------------------------------------------------------------------------------- merge

MERGE_CASES = [
    # method, merged modules (depth 4), mergeable
    ("lora", 4, True),  # qkv of each block
    ("rep_adapter", 8, True),  # qkv and fc1 of each block
    ("adapter", 0, False),  # non-linear branch: merge_petl leaves the model as it is
]


@pytest.mark.parametrize("method,merged,mergeable", MERGE_CASES)
@pytest.mark.parametrize("early_exit", [True, False])
def test_merge_equivalence_and_cost(method, merged, mergeable, early_exit):
    model = tiny_model(method, early_exit=early_exit).eval()
    plain = tiny_model("linear_probe", early_exit=early_exit).eval()
    assert randomize_petl(model) > 0
    x = images(6, seed=1)
    before = [o.clone() for o in model(x)]
    costs_before = measure_stage_costs(model)
    plain_costs = measure_stage_costs(plain)
    assert costs_before.stages[0] > plain_costs.stages[0]  # an unmerged branch costs MACs

    assert merge_petl(model) == merged
    after = model(x)
    for a, b in zip(before, after):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
        assert a.abs().max() > 1e-2  # not trivially equal
    remaining = [m for m in model.modules() if isinstance(m, PetlModule)]
    costs_after = measure_stage_costs(model)
    if mergeable:
        assert remaining == []
        assert costs_after == plain_costs  # zero extra MACs: the merged model is the plain ViT
        assert count_parameters(model)["backbone"] == count_parameters(plain)["backbone"]
        assert all(not p.requires_grad for p in model.backbone.parameters())
    else:
        assert len(remaining) == len(model.backbone.blocks)
        assert costs_after == costs_before
    # the branch must have mattered, or the equivalence above proves nothing
    fresh = tiny_model(method, early_exit=early_exit).eval()
    assert not torch.allclose(fresh(x)[-1], before[-1], atol=1e-3)


SCALED_MERGE_CASES = [
    # PETL config with a branch scale other than 1 (the defaults hide a merge that forgets the scale), qkv bias
    (PetlConfig(method="lora", lora=LoRAConfig(rank=4, alpha=8.0)), True),  # scaling alpha / rank = 2
    (PetlConfig(method="lora", lora=LoRAConfig(rank=2, alpha=1.0)), False),  # 0.5
    (PetlConfig(method="rep_adapter", rep_adapter=RepAdapterConfig(dim=4, scale=0.5)), True),
    (PetlConfig(method="rep_adapter", rep_adapter=RepAdapterConfig(dim=8, scale=3.0)), False),
]


@pytest.mark.parametrize("petl,qkv_bias", SCALED_MERGE_CASES,
                         ids=lambda c: f"{c.method}-{c.model_dump()[c.method]}" if isinstance(c, PetlConfig) else f"qkv_bias={c}")
def test_merge_keeps_a_non_default_branch_scale(petl, qkv_bias):
    def build(cfg: PetlConfig) -> DynAdapterViT:
        torch.manual_seed(0)
        return build_model(backbone_cfg(qkv_bias=qkv_bias), ModelConfig(petl=cfg), num_classes=5).eval()

    model = build(petl)
    # the same branch weights at scale 1: the scale really changes the function, or equality proves nothing
    unit_cfg = {"lora": LoRAConfig(rank=petl.lora.rank, alpha=petl.lora.rank),
                "rep_adapter": RepAdapterConfig(dim=petl.rep_adapter.dim, scale=1.0)}[petl.method]
    unit = build(petl.model_copy(update={petl.method: unit_cfg}))
    randomize_petl(model, std=0.1)
    with torch.no_grad():  # timm starts every bias at zero: a merge that drops or flips the frozen bias would pass
        g = torch.Generator().manual_seed(1)
        for name, p in model.backbone.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    assert (model.backbone.blocks[0].attn.qkv.base.bias is not None) == qkv_bias
    unit.load_state_dict(model.state_dict())
    x = images(6, seed=1)
    with torch.no_grad():
        before = model(x)
        assert (before[-1] - unit(x)[-1]).abs().max() > 1e-2
        assert merge_petl(model) > 0
        assert not any(isinstance(m, PetlModule) for m in model.modules())
        after = model(x)
    for a, b in zip(before, after):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "rep_adapter"])
def test_merge_in_bfloat16_stays_bfloat16(method):
    model = tiny_model(method).to(torch.bfloat16).eval()
    randomize_petl(model, std=0.1)
    x = images(4, seed=2).to(torch.bfloat16)
    with torch.no_grad():
        before = model(x)
        merge_petl(model)
        after = model(x)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for a, b in zip(before, after):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), a.float(), atol=0.1, rtol=0.05)


BRANCH_CASES = [
    # method, rank / bottleneck, alpha or scale, what the module must compute from base, h, down D and up U
    ("lora", 4, 8.0, lambda base, h, d, u: base(h) + 2.0 * (u(d(h)))),  # W h + (alpha / r) U D h
    ("lora", 2, 1.0, lambda base, h, d, u: base(h) + 0.5 * (u(d(h)))),
    ("rep_adapter", 4, 0.5, lambda base, h, d, u: base(h + 0.5 * u(d(h)))),  # W (h + s U D h) + b
]


@pytest.mark.parametrize("method,rank,scale,expected", BRANCH_CASES)
def test_branch_is_scaled_as_configured(method, rank, scale, expected):
    from dynadapter.models.petl.lora import LoRALinear
    from dynadapter.models.petl.rep_adapter import RepAdapterLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(6, 6)
    module = LoRALinear(base, rank, scale, 0.0) if method == "lora" else RepAdapterLinear(base, rank, scale, 0.0)
    torch.nn.init.normal_(module.up.weight)  # up starts at zero: the branch would be a no-op
    h = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(module(h), expected(base, h, module.down, module.up))
        torch.testing.assert_close(module.merge()(h), expected(base, h, module.down, module.up), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", PETL_METHODS)
def test_inject_needs_one_dropout_rate_per_block(method):
    from dynadapter.models.petl import create_petl

    vit = create_backbone(backbone_cfg())
    with pytest.raises(ValueError):
        create_petl(PetlConfig(method=method)).inject(vit, [0.0] * (len(vit.blocks) - 1))


# ------------------------------------------------------------------------------------ heads and exit lists

HEAD_CASES = [
    # dim, num_classes, exits (None: default), depth
    (32, 5, None, 4),
    (32, 100, None, 4),  # many classes: a narrow hidden layer would be lighter than LN + Linear
    (32, 10, [1, 2, 3, 4, 5, 6, 7, 8], 8),  # many exits: widths halve down to tiny bottlenecks
    (24, 3, [2, 4], 4),
]


@pytest.mark.parametrize("dim,num_classes,exits,depth", HEAD_CASES)
def test_balanced_heads_heavier_early(dim, num_classes, exits, depth):
    model = tiny_model("adapter", num_classes=num_classes, exits=exits, embed_dim=dim, depth=depth)
    widths = [h.hidden for h in model.heads]
    sizes = [sum(p.numel() for p in h.parameters()) for h in model.heads]
    head_macs = measure_stage_costs(model).heads
    assert widths[0] > 0 and widths[-1] == 0  # heaviest first, the light LN + Linear head last
    assert widths == sorted(widths, reverse=True)
    assert sizes == sorted(sizes, reverse=True), sizes
    assert head_macs == sorted(head_macs, reverse=True), head_macs
    assert sizes[0] > sizes[-1]

    flat = tiny_model(
        "adapter", num_classes=num_classes, exits=exits, embed_dim=dim, depth=depth,
        heads=HeadsConfig(balanced=False),
    )
    assert [h.hidden for h in flat.heads] == [0] * len(flat.exits)
    assert len({sum(p.numel() for p in h.parameters()) for h in flat.heads}) == 1


def test_explicit_head_widths():
    model = tiny_model("lora", heads=HeadsConfig(hidden=[16, 8, 0, 4]))
    assert [h.hidden for h in model.heads] == [16, 8, 0, 4]
    assert isinstance(model.heads[1], ExitHead) and model.heads[1].fc.in_features == 8
    with pytest.raises(ValueError, match="heads.hidden"):
        tiny_model("lora", heads=HeadsConfig(hidden=[16, 8]))
    with pytest.raises(ValidationError, match="hidden"):
        HeadsConfig(hidden=[8, -1])


@pytest.mark.parametrize("depth,expected", [(4, [1, 2, 3, 4]), (8, [2, 4, 6, 8]), (12, [3, 6, 9, 12]),
                                            (6, [2, 3, 4, 6]), (10, [2, 5, 8, 10]), (2, [1, 2])])
def test_default_exits_every_quarter(depth, expected):
    assert resolve_exits(ModelConfig(), depth) == expected
    assert resolve_exits(ModelConfig(early_exit=False), depth) == [depth]
    assert resolve_exits(ModelConfig(exits=[1, depth]), depth) == [1, depth]


BAD_EXITS = [
    # exits, where it is rejected, message fragment
    ([3, 2], "config", "strictly increasing"),
    ([2, 2], "config", "strictly increasing"),
    ([0, 2], "config", "strictly increasing"),
    ([], "config", "at least one"),
    ([2, 5], "factory", "beyond the backbone depth"),
    ([2, 5], "base", "beyond the backbone depth"),
    ([3, 1], "model", "strictly increasing"),
    ([1, 9], "model", "strictly increasing"),
]


@pytest.mark.parametrize("exits,where,message", BAD_EXITS)
def test_invalid_exit_lists_rejected(exits, where, message):
    if where == "config":
        with pytest.raises(ValidationError, match=message):
            ModelConfig(exits=exits)
    elif where == "base":
        with pytest.raises(ValidationError, match=message):
            BaseSection(backbone=backbone_cfg(), model=ModelConfig(exits=exits))
    elif where == "factory":
        with pytest.raises(ValueError, match=message):
            build_model(backbone_cfg(), ModelConfig(exits=exits), num_classes=3)
    else:  # the model itself refuses what a config never validated
        vit = create_backbone(backbone_cfg())
        heads = torch.nn.ModuleList(ExitHead(32, 3) for _ in exits)
        with pytest.raises(ValueError, match=message):
            DynAdapterViT(vit, exits, heads)


# ------------------------------------------------------------------------------------- forward sparsity

SPARSITY_CASES = [
    # sparsity, exits, depth, expected per-block rates
    (SparsityConfig(p_max=0.4, p_min=0.1), None, 4, [0.4, 0.3, 0.2, 0.1]),
    (SparsityConfig(p_max=0.3, p_min=0.0), None, 8, [0.3, 0.3, 0.2, 0.2, 0.1, 0.1, 0.0, 0.0]),
    (SparsityConfig(p_max=0.5, p_min=0.1), [1, 4], 4, [0.5, 0.1, 0.1, 0.1]),
    (SparsityConfig(p_max=0.4, p_min=0.4), None, 4, [0.4] * 4),
    (SparsityConfig(forward=False, p_max=0.4, p_min=0.1), None, 4, [0.0] * 4),
    (None, None, 4, [0.0] * 4),
]


@pytest.mark.parametrize("method", PETL_METHODS)
@pytest.mark.parametrize("sparsity,exits,depth,expected", SPARSITY_CASES)
def test_forward_sparsity_falls_with_depth(method, sparsity, exits, depth, expected):
    model = tiny_model(method, sparsity=sparsity, exits=exits, depth=depth)
    per_block = []
    for block in model.backbone.blocks:
        ps = {m.drop.p for m in block.modules() if isinstance(m, PetlModule)}
        assert len(ps) == 1  # Rep-Adapter's two branches in a block share the rate
        per_block.append(ps.pop())
    assert per_block == pytest.approx(expected)
    assert per_block == sorted(per_block, reverse=True)
    head_rates = [[m.p for m in h.modules() if isinstance(m, torch.nn.Dropout)] for h in model.heads]
    stage_first_block = [0] + model.exits[:-1]
    for rates, b in zip(head_rates, stage_first_block):
        assert rates and all(r == pytest.approx(expected[b]) for r in rates)
    n = len(model.exits)
    assert stage_dropout(sparsity, n) == pytest.approx([expected[b] for b in stage_first_block])


def _rates(model):
    blocks = [{m.drop.p for m in b.modules() if isinstance(m, PetlModule)}.pop() for b in model.backbone.blocks]
    heads = [[m.p for m in h.modules() if isinstance(m, torch.nn.Dropout)][0] for h in model.heads]
    return blocks, heads


@pytest.mark.parametrize("method", PETL_METHODS)
def test_baselines_get_dyn_adapters_dropout_at_the_same_depth(method):
    """Regression (audit #14.3): the one-head full-depth baseline used to get p_max in every block and in its
    head, where Dyn-Adapter's deep blocks and last head get p_min. Every variant now shares one per-depth rule."""
    sparsity = SparsityConfig(p_max=0.4, p_min=0.1)
    dyn_blocks, dyn_heads = _rates(tiny_model(method, sparsity=sparsity, depth=8))
    full_blocks, full_heads = _rates(tiny_model(method, early_exit=False, sparsity=sparsity, depth=8))
    trunc_blocks, trunc_heads = _rates(tiny_model(method, exits=[4], sparsity=sparsity, depth=8))
    assert dyn_blocks == pytest.approx([0.4, 0.4, 0.3, 0.3, 0.2, 0.2, 0.1, 0.1])
    assert full_blocks == pytest.approx(dyn_blocks) and full_heads == pytest.approx([dyn_heads[-1]]) == [0.1]
    assert trunc_blocks[:4] == pytest.approx(dyn_blocks[:4]) and trunc_heads == pytest.approx([dyn_heads[1]])


def test_stage_dropout_endpoints():
    rates = stage_dropout(SparsityConfig(p_max=0.3, p_min=0.05), 6)
    assert rates[0] == pytest.approx(0.3) and rates[-1] == pytest.approx(0.05)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert stage_dropout(SparsityConfig(p_max=0.3, p_min=0.05), 1) == [0.3]
    with pytest.raises(ValidationError, match="p_min"):
        SparsityConfig(p_max=0.1, p_min=0.2)


# -------------------------------------------------------------------------------------- backbone loading


from vit_weights import vit_to_npz as _vit_to_npz  # noqa: E402 - the original JAX ViT (.npz) layout


def _save(vit, path, wrap: str | None = None) -> None:
    if path.suffix == ".npz":
        np.savez(path, **_vit_to_npz(vit))
        return
    state = {k: v.detach().clone().contiguous() for k, v in vit.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    elif wrap == "deepspeed":
        torch.save({"module": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        torch.save(state, path)


LOAD_CASES = [
    # suffix, checkpoint's architecture overrides (vs TINY), expected error fragments (None: loads exactly)
    (".safetensors", {}, None),
    (".pth", {}, None),
    (".npz", {}, None),
    (".safetensors", {"depth": 6}, ["unexpected keys", "blocks.4.attn.qkv.weight"]),
    (".safetensors", {"depth": 2}, ["missing keys", "blocks.2.attn.qkv.weight"]),
    (".safetensors", {"embed_dim": 24}, ["shape mismatches", "blocks.0.attn.qkv.weight", "(72, 24) vs model (96, 32)"]),
    (".pth", {"depth": 6}, ["unexpected keys", "blocks.5.attn.qkv.weight"]),
    (".pth", {"depth": 3}, ["missing keys", "blocks.3.norm1.weight"]),
    (".pth", {"embed_dim": 24, "depth": 5}, ["shape mismatches", "unexpected keys", "blocks.4.norm1.weight"]),
    (".npz", {"depth": 3}, ["encoderblock_3"]),
    (".npz", {"depth": 6}, ["encoderblock_4"]),
    (".npz", {"embed_dim": 24}, ["do not fit"]),
]


@pytest.mark.parametrize("suffix,arch,errors", LOAD_CASES)
def test_backbone_checkpoint_loading(tmp_path, suffix, arch, errors):
    torch.manual_seed(1)
    source = create_backbone(backbone_cfg(**arch))
    path = tmp_path / f"vit{suffix}"
    _save(source, path)
    torch.manual_seed(2)
    target = create_backbone(backbone_cfg())
    if errors is None:
        load_backbone_weights(target, path)
        src = source.state_dict()
        for k, v in target.state_dict().items():
            assert torch.allclose(v, src[k], atol=1e-6 if suffix == ".npz" else 0), k
        # the same through the config, into a full model whose forward uses them
        model = build_model(backbone_cfg(), ModelConfig(), num_classes=3, checkpoint=path)
        assert torch.equal(model.backbone.pos_embed, target.pos_embed)
        return
    untouched = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(target, path)
    message = str(info.value)
    assert str(path) in message
    for fragment in errors:
        assert fragment in message, message
    if suffix != ".npz":  # the strict path checks everything before it copies anything
        assert all(torch.equal(v, untouched[k]) for k, v in target.state_dict().items())


def test_checkpoint_wrappers_and_bad_files(tmp_path):
    source = create_backbone(backbone_cfg())
    wrapped = tmp_path / "ds.pt"
    _save(source, wrapped, wrap="deepspeed")  # {"module": {"module.<key>": ...}}
    target = create_backbone(backbone_cfg())
    load_backbone_weights(target, wrapped)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())

    with pytest.raises(CheckpointError, match="not found"):
        load_backbone_weights(target, tmp_path / "missing.pth")
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported checkpoint type"):
        load_backbone_weights(target, tmp_path / "w.ckpt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_backbone_weights(target, tmp_path / "junk.safetensors")


# ------------------------------------------------------------------------------ the embedded conv-stem ViT


def _stem_layout(stem) -> list[tuple]:
    out = []
    for m in stem.layers:
        if isinstance(m, torch.nn.Conv2d):
            out.append(("conv", m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.bias is not None))
        elif isinstance(m, torch.nn.GroupNorm):
            out.append(("gn", m.num_groups, m.num_channels))
        else:
            out.append((type(m).__name__,))
    return out


@pytest.mark.parametrize("embed_dim,patch_size,bias,widths", [
    (32, 8, True, [8, 16, 32]),  # channels double per stride-2 stage up to embed_dim
    (24, 16, False, [8, 8, 12, 24]),  # never below 8 channels
    (64, 2, True, [64]),
])
def test_convstem_layout(embed_dim, patch_size, bias, widths):
    from dynadapter.models.convstem import ConvStem

    stem = ConvStem(3, embed_dim, patch_size, bias=bias)
    expected, c_in = [], 3
    for w in widths:
        expected += [("conv", c_in, w, (3, 3), (2, 2), (1, 1), False), ("gn", 1, w), ("GELU",)]
        c_in = w
    expected.append(("conv", c_in, embed_dim, (1, 1), (1, 1), (0, 0), bias))
    assert _stem_layout(stem) == expected and stem.in_channels == 3
    assert ConvStem(3, embed_dim, patch_size).layers[-1].bias is not None  # a patchify conv has a bias by default
    x = torch.randn(2, 3, 4 * patch_size, 4 * patch_size)
    assert stem(x).shape == (2, embed_dim, 4, 4)  # one token per patch_size x patch_size patch


@pytest.mark.parametrize("patch_size", [1, 3, 6, 12])
def test_convstem_needs_a_power_of_two_patch(patch_size):
    from dynadapter.models.convstem import ConvStem

    with pytest.raises(ValueError, match=f"power-of-two patch_size >= 2, got {patch_size}"):
        ConvStem(3, 32, patch_size)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_convstem_embed_keeps_timm_patch_geometry(qkv_bias):
    from dynadapter.models.convstem import ConvStem, ConvStemEmbed

    embed = ConvStemEmbed(img_size=32, patch_size=8, in_chans=1, embed_dim=16, bias=qkv_bias)
    assert isinstance(embed.proj, ConvStem) and embed.proj.in_channels == 1
    assert embed.num_patches == 16 and embed.grid_size == (4, 4)
    last = embed.proj.layers[-1]
    assert last.out_channels == 16 and (last.bias is not None) == qkv_bias
    assert embed(torch.randn(2, 1, 32, 32)).shape == (2, 16, 16)  # flattened to (batch, tokens, dim)
    positional = ConvStemEmbed(32, 8, 1, 16)  # PatchEmbed's own positional order: img_size, patch_size, in_chans, dim
    assert positional.num_patches == 16 and positional.proj.in_channels == 1
    assert positional.proj.layers[-1].out_channels == 16


def test_convstem_pretrained_cfg_names_real_modules_and_no_hub():
    import timm

    from dynadapter.models import normalization

    small = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)
    vit = create_backbone(BackboneConfig(name="vit_convstem", overrides=dict(img_size=48, **small)))
    cfg = vit.pretrained_cfg
    assert cfg["url"] == "" and cfg["num_classes"] == 0  # nothing to download; no classifier shipped
    assert cfg["input_size"] == (3, 48, 48)
    assert normalization(vit) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # inputs to [-1, 1]
    modules = dict(vit.named_modules())
    assert isinstance(modules[cfg["first_conv"]], torch.nn.Conv2d) and modules[cfg["first_conv"]].in_channels == 3
    assert cfg["classifier"] == "head" and cfg["classifier"] in modules
    deit = create_backbone(BackboneConfig(name="deit_tiny_patch16_224", overrides=dict(img_size=16, **small)))
    assert normalization(deit) == (timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD)
