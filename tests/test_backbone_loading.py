"""Loading user checkpoints into the frozen ViT backbone (`dynadapter.models.backbone`): the file layouts people
actually bring (DeiT `{"model": ...}`, Lightning-style `{"state_dict": ...}`, DeepSpeed `{"module": ...}`,
`module.` / `backbone.` key prefixes, classifier heads left in the file, safetensors with any suffix case,
checkpoints saved from GPU training, Google/AugReg per-block `.npz` and big_vision stacked `.npz`) load exactly
into the model; files that cannot be used (not tensors, pickled code, unreadable, the wrong depth or width) raise
`CheckpointError` naming the file, the reader's error, and the keys/blocks that do not fit, in a readable,
bounded message; and `create_backbone` takes the explicit checkpoint over the config's."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.serialization
from safetensors.torch import save_file

from dynadapter.config import BackboneConfig
from dynadapter.models.backbone import CheckpointError, create_backbone, freeze, load_backbone_weights
from helpers import TINY, backbone_cfg, one_thread  # noqa: F401
from vit_weights import save_big_vision_npz, save_google_npz

DEPTH = TINY["depth"]  # 4 blocks in the tiny target model


def _vit(seed: int = 0, **arch):
    torch.manual_seed(seed)
    return create_backbone(backbone_cfg(**arch))


def _state(vit) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in vit.state_dict().items()}


def _assert_loaded(target, source_state: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    own = target.state_dict()
    assert set(own) == set(source_state)
    for k, v in own.items():
        assert torch.allclose(v, source_state[k], atol=atol, rtol=0), k


def _assert_untouched(target, before: dict[str, torch.Tensor]) -> None:
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


# ------------------------------------------------------------------------------ torch / safetensors layouts


@pytest.mark.parametrize("layout", ["deit", "lightning", "deepspeed", "backbone_prefix", "ddp_backbone_prefix"])
def test_wrapped_and_prefixed_checkpoints_load_exactly(tmp_path, layout):
    """Training frameworks wrap or prefix the backbone's state dict; each of these layouts loads bit-exactly."""
    sd = _state(_vit(seed=1))
    if layout == "deit":  # DeiT / MAE release: {"model": sd, ...} next to non-tensor training state
        obj = {"model": sd, "epoch": 299, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}}
    elif layout == "lightning":
        obj = {"state_dict": sd, "global_step": 10}
    elif layout == "deepspeed":
        obj = {"module": {f"module.{k}": v for k, v in sd.items()}}
    elif layout == "backbone_prefix":  # the ViT as `.backbone` of a detector / segmenter / our own wrapper
        obj = {f"backbone.{k}": v for k, v in sd.items()}
    else:  # DDP around such a model
        obj = {f"module.backbone.{k}": v for k, v in sd.items()}
    path = tmp_path / "weights.pth"
    torch.save(obj, path)
    target = _vit(seed=2)
    load_backbone_weights(target, path)
    _assert_loaded(target, sd)


def test_safetensors_suffix_is_case_insensitive(tmp_path):
    """`W.SAFETENSORS` is accepted as a weights file, so it must be read as safetensors (torch.load only
    recognises the lower-case suffix and would fail on it)."""
    sd = _state(_vit(seed=1))
    path = tmp_path / "ViT-Tiny.SafeTensors"
    save_file(sd, str(path))
    target = _vit(seed=2)
    load_backbone_weights(target, path)
    _assert_loaded(target, sd)


def test_checkpoint_saved_from_gpu_training_loads_on_cpu(tmp_path, monkeypatch):
    """Checkpoints written during GPU training record CUDA storages; they are mapped to the CPU on load (on a
    CPU-only machine reading them as saved fails)."""
    sd = _state(_vit(seed=1))
    path = tmp_path / "gpu.pth"
    with monkeypatch.context() as m:  # record every storage as CUDA, as torch.save does for GPU tensors
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save({"model": sd}, path)
    target = _vit(seed=2)
    load_backbone_weights(target, path)
    _assert_loaded(target, sd)
    assert all(v.device.type == "cpu" for v in target.state_dict().values())


class _RunsCodeOnLoad:
    """A pickle payload that creates a directory when unpickled (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("force_unsafe_env", [False, True])
def test_pickled_code_in_a_checkpoint_is_refused_not_run(tmp_path, monkeypatch, force_unsafe_env):
    """Checkpoints are read weights-only: a file whose pickle would call a function is refused, unexecuted,
    even where the environment sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD (for some other tool), which turns
    torch.load's weights-only default off for callers that do not ask for it explicitly."""
    if force_unsafe_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": _state(_vit()), "payload": _RunsCodeOnLoad(marker)}, path)
    target = _vit(seed=2)
    before = _state(target)
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(target, path)
    assert str(info.value).startswith(f"{path}: cannot read checkpoint (UnpicklingError: ")
    assert not marker.exists()
    _assert_untouched(target, before)


@pytest.mark.parametrize("suffix", [".pth", ".npz"])
def test_unreadable_file_error_names_the_reader_error(tmp_path, suffix):
    """A corrupt file is reported with its path and the underlying reader's exception type and text."""
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(b"definitely not a checkpoint")
    reader = torch.load if suffix == ".pth" else np.load
    with pytest.raises(Exception) as raw:
        reader(path)
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(_vit(), path)
    assert str(info.value).startswith(f"{path}: cannot read checkpoint ({type(raw.value).__name__}: ")


@pytest.mark.parametrize("content", [
    pytest.param({"epoch": 3, "pos_embed": torch.zeros(1, 5, 32)}, id="dict_with_non_tensors"),
    pytest.param([torch.zeros(2)], id="list_of_tensors"),
    pytest.param(torch.zeros(3), id="bare_tensor"),
])
def test_file_that_is_not_a_state_dict_is_refused(tmp_path, content):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(_vit(), path)
    assert str(info.value) == f"{path}: not a state dict of tensors"


def test_classifier_keys_are_ignored_unless_the_backbone_has_them(tmp_path):
    """An ImageNet classifier checkpoint (head.*, a pooled fc_norm.*) loads into the head-less backbone; a
    backbone that does have fc_norm (global_pool='avg') gets it from the file."""
    torch.manual_seed(1)
    classifier = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **TINY)
    sd = _state(classifier)
    assert {"head.weight", "head.bias"} <= set(sd)
    extra = {"fc_norm.weight": torch.rand(32), "fc_norm.bias": torch.rand(32)}
    path = tmp_path / "in1k.pth"
    torch.save({**sd, **extra}, path)
    target = _vit(seed=2)
    load_backbone_weights(target, path)
    _assert_loaded(target, {k: v for k, v in sd.items() if not k.startswith("head.")})

    pooled_sd = _state(_vit(seed=3, global_pool="avg"))
    assert "fc_norm.weight" in pooled_sd
    path = tmp_path / "pooled.safetensors"
    save_file(pooled_sd, str(path))
    pooled = _vit(seed=4, global_pool="avg")
    load_backbone_weights(pooled, path)
    _assert_loaded(pooled, pooled_sd)


def test_patch_projection_that_cannot_be_adapted_is_reported(tmp_path):
    """Old linear patch projections are reshaped to the conv layout; one whose size does not fit is refused."""
    target = _vit()
    sd = _state(target)
    sd["patch_embed.proj.weight"] = torch.zeros(32, 100)  # 100 is not in_chans * 8 * 8
    path = tmp_path / "old.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(target, path)
    assert str(info.value).startswith(f"{path}: cannot adapt checkpoint to the architecture: ")


def _key_line(message: str, what: str) -> tuple[int, list[str], bool]:
    """(count, listed names, truncated) from the `  <what> (<n>): [...]` line of a CheckpointError."""
    (line,) = [ln for ln in message.splitlines() if ln.startswith(f"  {what} (")]
    head, _, listing = line.partition(": ")
    truncated = listing.endswith(" ...")
    return int(head[len(f"  {what} ("):-1]), ast.literal_eval(listing.removesuffix(" ...")), truncated


@pytest.mark.parametrize("n", [1, 20, 21])
def test_missing_keys_message_lists_at_most_20_then_ellipsis(tmp_path, n):
    target = _vit()
    sd = _state(target)
    dropped = sorted(sd)[-n:]
    path = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in sd.items() if k not in dropped}, str(path))
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(target, path)
    message = str(info.value)
    assert message.splitlines()[0] == f"{path}: checkpoint does not fit the architecture"
    assert message.splitlines()[1].startswith("  missing keys (")
    assert _key_line(message, "missing keys") == (n, dropped[:20], n > 20)


@pytest.mark.parametrize("n", [1, 20, 21])
def test_unexpected_keys_message_lists_at_most_20_then_ellipsis(tmp_path, n):
    target = _vit()
    extra = {f"aux.{i:02d}.weight": torch.zeros(2) for i in range(n)}
    path = tmp_path / "extra.pth"
    torch.save({**_state(target), **extra}, path)
    before = _state(target)
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(target, path)
    message = str(info.value)
    assert message.splitlines() == [
        f"{path}: checkpoint does not fit the architecture",
        message.splitlines()[1],
    ]
    assert _key_line(message, "unexpected keys") == (n, sorted(extra)[:20], n > 20)
    _assert_untouched(target, before)


def test_shape_mismatch_message_lists_at_most_20(tmp_path):
    """A narrower ViT (embed_dim 24 vs 32): every tensor mismatches; the message counts all, lists 20."""
    narrow = _state(_vit(embed_dim=24))
    path = tmp_path / "narrow.pth"
    torch.save(narrow, path)
    target = _vit()
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(target, path)
    message = str(info.value)
    assert message.splitlines() == [f"{path}: checkpoint does not fit the architecture", message.splitlines()[1]]
    n, listed, _ = _key_line(message, "shape mismatches")
    own = target.state_dict()
    assert n == sum(narrow[k].shape != own[k].shape for k in own) > 20
    assert len(listed) == 20
    assert "blocks.0.attn.qkv.weight: checkpoint (72, 24) vs model (96, 32)" in listed


# ------------------------------------------------------------------------------ JAX / big_vision .npz


@pytest.mark.parametrize("layout", ["google", "big_vision"])
def test_npz_checkpoint_loads(tmp_path, layout):
    """Both JAX layouts timm reads (per-block Google/AugReg, stacked big_vision) load the same weights."""
    source = _vit(seed=1)
    path = tmp_path / "vit.npz"
    (save_google_npz if layout == "google" else save_big_vision_npz)(source, path)
    target = _vit(seed=2)
    load_backbone_weights(target, path)
    _assert_loaded(target, _state(source), atol=1e-6)


@pytest.mark.parametrize("layout", ["google", "big_vision"])
@pytest.mark.parametrize("depth,kind,first,last", [
    (2, "missing", 2, 3),
    (3, "missing", 3, 3),
    (5, "unexpected", 4, 4),
    (7, "unexpected", 4, 6),
])
def test_npz_of_another_depth_is_refused_before_loading(tmp_path, layout, depth, kind, first, last):
    """timm reads only the model's blocks from an .npz, so a deeper file would load silently and a shallower
    one fail half-way; both are refused up front, naming the block range that does not fit."""
    path = tmp_path / "vit.npz"
    (save_google_npz if layout == "google" else save_big_vision_npz)(_vit(seed=1, depth=depth), path)
    target = _vit(seed=2)
    before = _state(target)
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(target, path)
    assert str(info.value) == (
        f"{path}: .npz weights do not fit VisionTransformer: checkpoint has {depth} blocks, model {DEPTH}; "
        f"{kind} keys Transformer/encoderblock_{first}/... to encoderblock_{last}/..."
    )
    _assert_untouched(target, before)


def test_npz_of_another_width_names_the_model_class(tmp_path):
    path = save_google_npz(_vit(seed=1, embed_dim=24), tmp_path / "narrow.npz")
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(_vit(), path)
    assert str(info.value).startswith(f"{path}: .npz weights do not fit VisionTransformer: ")


def test_npz_that_is_not_a_vit_is_refused_as_not_fitting(tmp_path):
    """An .npz with no encoder blocks at all (here a BiT ResNet's names) is not a depth question: timm's
    reader decides, and the error says the file does not fit the model."""
    path = tmp_path / "bit.npz"
    np.savez(path, **{"conv_root/kernel": np.zeros((7, 7, 3, 8), np.float32),
                      "block1/unit01/conv1/kernel": np.zeros((1, 1, 8, 8), np.float32)})
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(_vit(), path)
    assert str(info.value).startswith(f"{path}: .npz weights do not fit VisionTransformer: ")


# ------------------------------------------------------------------------------ create_backbone / freeze


def test_create_backbone_explicit_checkpoint_overrides_the_config(tmp_path):
    """`checkpoint=` (e.g. the pipeline's resolved path) wins over `cfg.checkpoint`; either one is loaded;
    with neither, the model keeps its random init."""
    a, b = _state(_vit(seed=1)), _state(_vit(seed=2))
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    cfg = BackboneConfig(name="vit_tiny_patch16_224", overrides=TINY, checkpoint=str(tmp_path / "a.safetensors"))
    _assert_loaded(create_backbone(cfg), a)
    _assert_loaded(create_backbone(cfg, tmp_path / "b.safetensors"), b)
    _assert_loaded(create_backbone(backbone_cfg(), str(tmp_path / "b.safetensors")), b)
    torch.manual_seed(5)
    plain = create_backbone(backbone_cfg())
    torch.manual_seed(5)
    assert all(torch.equal(v, _state(_vit(seed=5))[k]) for k, v in plain.state_dict().items())
    assert not any(torch.equal(plain.pos_embed, s["pos_embed"]) for s in (a, b))


def test_create_backbone_is_headless_and_local_only():
    """No classifier (features only) and no download attempt (pretrained=False)."""
    vit = create_backbone(backbone_cfg())
    assert isinstance(vit.head, torch.nn.Identity) and vit.num_classes == 0
    assert not any(k.startswith("head.") for k in vit.state_dict())
    assert vit(torch.randn(2, 3, 16, 16)).shape == (2, 32)


@pytest.mark.parametrize("cfg,fragment", [
    (dict(name="no_such_vit"), "base.backbone: cannot build 'no_such_vit' with overrides"),
    (dict(name="resnet18", overrides={}), "base.backbone.name: 'resnet18' is a ResNet, not a VisionTransformer"),
    (dict(name="vit_tiny_patch16_224", overrides={**TINY, "global_pool": "map"}),
     "base.backbone.name: 'vit_tiny_patch16_224' uses attention pooling, which exits do not support"),
])
def test_create_backbone_config_errors_name_the_config_key(cfg, fragment):
    with pytest.raises(CheckpointError) as info:
        create_backbone(BackboneConfig(**{"overrides": TINY, **cfg}))
    assert str(info.value).startswith(fragment)


def test_freeze_stops_every_gradient():
    vit = _vit()
    freeze(vit)
    assert not any(p.requires_grad for p in vit.parameters())
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    vit(x).sum().backward()
    assert x.grad is not None and all(p.grad is None for p in vit.parameters())
