"""The embedded default backbone: the conv-stem ViT, its multi-factor pretraining scenes, and the shipped weights
(checked against their recorded checksum, refused when altered or built for another architecture)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import timm
import torch

from dynadapter.config import BackboneConfig, load_params
from dynadapter.data.upstream import FACTORS, IGNORE, generate_scenes, render_scene
from dynadapter.inference import measure_stage_costs
from dynadapter.models import build_model, create_backbone
from dynadapter.models.convstem import ConvStem
from dynadapter.data.store import file_sha256 as sha256
from dynadapter.train.pretrain import SHIPPED_DIR, SHIPPED_FILE, SHIPPED_INFO, ShippedWeightsError, verify_shipped
from helpers import ROOT as REPO_ROOT, one_thread  # noqa: F401

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}


def test_convstem_vit_is_a_timm_vit_with_a_frozen_safe_stem():
    vit = create_backbone(BackboneConfig(name="vit_convstem", overrides=SMALL))
    assert isinstance(vit, timm.models.vision_transformer.VisionTransformer)
    assert isinstance(vit.patch_embed.proj, ConvStem) and vit.patch_embed.proj.in_channels == 3
    assert vit.patch_embed.num_patches == 16  # 3 stride-2 convs: 32 px -> 4 x 4 tokens
    # no BatchNorm: a frozen backbone in train mode (while adapters train) must not change its statistics
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in vit.modules())
    x = torch.randn(2, 3, 32, 32)
    assert vit(x).shape == (2, 32)
    with pytest.raises(ValueError, match="power-of-two"):
        timm.create_model("vit_convstem", **{**SMALL, "patch_size": 6})


def test_convstem_costs_include_the_stem():
    from dynadapter.config import ModelConfig

    model = build_model(BackboneConfig(name="vit_convstem", overrides=SMALL), ModelConfig(), num_classes=5)
    costs = measure_stage_costs(model)
    # stem convs: 3->8 (3x3, 16x16 out), 8->16 (8x8), 16->32 (4x4), then a 1x1 32->32 on 4x4
    stem = 16 * 16 * 8 * 27 + 8 * 8 * 16 * 72 + 4 * 4 * 32 * 144 + 4 * 4 * 32 * 32
    assert costs.embed == stem


def test_scenes_are_seeded_and_labelled_in_range():
    a_img, a_lab = generate_scenes(40, 32, seed=3, workers=1)
    b_img, b_lab = generate_scenes(40, 32, seed=3, workers=2)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)  # whatever the worker count
    c_img, _ = generate_scenes(40, 32, seed=4, workers=1)
    assert not np.array_equal(a_img, c_img)
    _, labels = generate_scenes(600, 32, seed=0, workers=1)
    for i, (name, k) in enumerate(FACTORS.items()):
        col = labels[:, i]
        valid = col[col != IGNORE]
        assert valid.min() >= 0 and valid.max() < k, name
        assert len(np.unique(valid)) == k, f"{name}: every class appears"
    assert (labels[:, list(FACTORS).index("angle")] == IGNORE).any()  # circles have no rotation


def test_scene_count_label_matches_the_objects_drawn():
    """The count factor is the number of objects (1..6): a scene with more objects covers more pixels."""
    rng = np.random.default_rng(0)
    busy = {k: [] for k in range(6)}
    for _ in range(300):
        img, lab = render_scene(rng, 32)
        deviation = np.abs(img.astype(float) - np.median(img.reshape(-1, 3), axis=0)).sum(-1)
        busy[int(lab[-1])].append((deviation > 60).mean())
    means = [np.mean(busy[k]) for k in range(6)]
    assert means[5] > means[0]


def test_shipped_weights_match_their_recorded_checksum_and_the_default_backbone():
    """The committed weights file is the one its record describes, built for params.yaml's backbone."""
    params = load_params(REPO_ROOT / "params.yaml")
    weights, info = verify_shipped(params.base.backbone)
    assert sha256(weights) == info["sha256"] and weights.stat().st_size == info["bytes"] <= 20 * 2**20
    assert info["command"].startswith("python -m pipelines.pretrain --ship")
    assert (SHIPPED_DIR / "embedded_backbone.log").is_file()
    vit = create_backbone(params.base.backbone, weights)  # loads strictly through the user checkpoint path
    assert sum(p.numel() for p in vit.parameters()) > 100_000


def test_altered_or_foreign_shipped_weights_are_refused(tmp_path):
    params = load_params(REPO_ROOT / "params.yaml")
    shutil.copy(SHIPPED_DIR / SHIPPED_FILE, tmp_path / SHIPPED_FILE)
    shutil.copy(SHIPPED_DIR / SHIPPED_INFO, tmp_path / SHIPPED_INFO)
    verify_shipped(params.base.backbone, tmp_path)
    other = params.base.backbone.model_copy(update={"overrides": {**params.base.backbone.overrides, "depth": 6}})
    with pytest.raises(ShippedWeightsError, match="pretrain.source: train"):
        verify_shipped(other, tmp_path)
    data = bytearray((tmp_path / SHIPPED_FILE).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / SHIPPED_FILE).write_bytes(bytes(data))
    with pytest.raises(ShippedWeightsError, match="does not match the recorded"):
        verify_shipped(params.base.backbone, tmp_path)
    (tmp_path / SHIPPED_INFO).unlink()
    with pytest.raises(ShippedWeightsError, match="make backbone"):
        verify_shipped(params.base.backbone, tmp_path)


def test_pretrain_stage_uses_the_shipped_weights_without_training(tmp_path, capsys):
    from pipelines import pretrain

    args = ["--params", str(REPO_ROOT / "params.yaml"), "--set", f"base.paths.models={tmp_path}/models",
            "--set", f"base.paths.outputs={tmp_path}/outputs"]
    assert pretrain.main(args) == 0
    copied = tmp_path / "models/backbone/backbone.safetensors"
    assert sha256(copied) == json.loads((SHIPPED_DIR / SHIPPED_INFO).read_text())["sha256"]
    metrics = json.loads((tmp_path / "outputs/pretrain/metrics.json").read_text())
    assert metrics["source"] == "shipped" and set(metrics["upstream_val_factor_accuracy"]) == set(FACTORS)
    assert "verified" in capsys.readouterr().out
    bad = args + ["--set", "base.backbone.overrides.depth=6"]
    assert pretrain.main(bad) == 2
    assert "pretrain.source: train" in capsys.readouterr().err
