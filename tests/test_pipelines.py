"""The DVC stage entry points on a tiny configuration: prepare -> pretrain -> train -> evaluate, in process.

Asserts on what each stage writes (resolved config, metrics, plots, model files) and on their values, and
that a params mistake stops a stage before any work with exit code 2 naming the key.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from pipelines import evaluate, prepare, pretrain, train

TINY_BACKBONE = {"img_size": 16, "patch_size": 8, "embed_dim": 24, "depth": 4, "num_heads": 2}


def tiny_params(root) -> dict:
    return {
        "base": {
            "seed": 0,
            "paths": {k: str(root / k) for k in ("data", "upstream", "models", "outputs")},
            "tasks": ["size", "digits"],
            "backbone": {"name": "vit_tiny_patch16_224", "checkpoint": None, "overrides": TINY_BACKBONE},
            "budget": 0.5,
        },
        "prepare": {"embedded": {"image_size": 16, "train": 48, "val": 24, "test": 40,
                                 "upstream_train": 96, "upstream_val": 32}},
        "pretrain": {"epochs": 1, "batch_size": 32},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.005},
        "evaluate": {"throughput_batch": 16, "throughput_repeats": 1},
    }


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(root)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        codes = {}
        for name, stage in (("prepare", prepare), ("pretrain", pretrain), ("train", train), ("evaluate", evaluate)):
            argv = ["--params", str(params)] + (["--best", str(root / "none.yaml")] if name == "train" else [])
            codes[name] = stage.main(argv)
    finally:
        torch.set_num_threads(threads)
    return root, codes


def test_every_stage_succeeds_and_saves_its_resolved_config(pipeline_run):
    root, codes = pipeline_run
    assert codes == {"prepare": 0, "pretrain": 0, "train": 0, "evaluate": 0}
    for stage in codes:
        cfg = yaml.safe_load((root / "outputs" / stage / f"{stage}_config.yaml").read_text())
        assert set(cfg) == {"base", stage}
        assert cfg["base"]["backbone"]["overrides"] == TINY_BACKBONE


def test_prepare_and_pretrain_outputs(pipeline_run):
    root, _ = pipeline_run
    summary = json.loads((root / "outputs/prepare/summary.json").read_text())
    assert summary["tasks"]["size"]["counts"] == {"train": 48, "val": 24, "test": 40}
    assert summary["upstream"]["counts"]["train"] == 96
    assert (root / "models/backbone/backbone.safetensors").is_file()
    metrics = json.loads((root / "outputs/pretrain/metrics.json").read_text())
    assert 0.0 <= metrics["upstream_val_accuracy"] <= 1.0


def test_train_writes_both_variants_per_task(pipeline_run):
    root, _ = pipeline_run
    metrics = json.loads((root / "outputs/train/metrics.json").read_text())
    for task in ("size", "digits"):
        dyn, base = metrics["tasks"][task]["dyn"], metrics["tasks"][task]["baseline"]
        assert dyn["trainable_params"] > base["trainable_params"]  # 4 exit heads vs 1
        for variant in ("dyn", "baseline"):
            assert (root / "models/tasks" / task / variant / "adapter.safetensors").is_file()
    # resumable: the per-epoch checkpoints outlive the DVC outputs
    assert len(list((root / "models/checkpoints/train").glob("*.pt"))) == 4


def test_evaluate_metrics_and_plots(pipeline_run):
    root, _ = pipeline_run
    out = root / "outputs/evaluate"
    m = json.loads((out / "metrics.json").read_text())
    assert m["budget"] == 0.5
    assert 0.0 <= m["dyn_test_accuracy"] <= 1.0 and 0.0 <= m["baseline_test_accuracy"] <= 1.0
    assert m["dyn_test_macs_fraction"] <= 0.75  # thresholds calibrated on val for 0.5 (test may drift a little)
    assert m["throughput_speedup"] > 0
    per_task = json.loads((out / "per_task.json").read_text())
    for task, res in per_task.items():
        shares = res["dyn"]["test"]["exit_fraction"]
        assert len(shares) == 4 and abs(sum(shares) - 1) < 1e-6
        assert res["baseline"]["test"]["fraction"] == pytest.approx(1.0)
    for name in ("budget_curve", "pareto", "exit_hist"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f"{name}.csv").read_text().count("\n") >= 2


@pytest.mark.parametrize("stage", [prepare, pretrain, train, evaluate])
@pytest.mark.parametrize("override, key", [("base.budget=1.5", "base.budget"), ("base.sed=1", "base.sed")])
def test_params_mistake_stops_stage_naming_the_key(tmp_path, capsys, stage, override, key):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(tmp_path)))
    with pytest.raises(SystemExit) as exit_info:
        stage.main(["--params", str(params), "--set", override])
    assert exit_info.value.code == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()  # stopped before any work
