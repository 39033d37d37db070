"""The DyT rival (dynadapter/baselines/dyt.py), training memory accounting, the shared throughput comparator and
the objective hook of the trainer: what bench/peers.py measures with."""

from __future__ import annotations

import time

import pytest
import torch

from dynadapter.baselines import (DispatchedMLP, DyTObjective, activation_rate, build_dyt, measure_dyt_costs,
                                  predict_dyt)
from dynadapter.baselines.dyt import dispatchers, forced
from dynadapter.config import ModelConfig, OptimConfig, PetlConfig
from dynadapter.inference import compare_throughput
from dynadapter.models import build_model
from dynadapter.train import fit, multi_exit_loss
from dynadapter.train.memory import training_memory
from helpers import TINY, backbone_cfg, images, one_thread, randomize_petl  # noqa: F401

D = TINY["embed_dim"]


def tiny_dyt(seed: int = 0, num_classes: int = 3):
    torch.manual_seed(seed)
    model = build_dyt(backbone_cfg(), ModelConfig(), num_classes)
    randomize_petl(model, seed)
    return model.eval()


@torch.no_grad()
def set_router_bias(model, value: float) -> None:
    for d in dispatchers(model):
        d.router.weight.zero_()
        d.router.bias.fill_(value)


def test_complete_dyt_is_the_full_depth_adapter_model():
    model = tiny_dyt()
    x = images(6)
    with forced(model, True):
        complete = model(x)[-1]
    for block in model.backbone.blocks:  # unwrap: the plain Adapter model with the same weights
        block.mlp = block.mlp.adapted
    assert torch.allclose(complete, model(x)[-1], atol=1e-5)
    assert len(model.exits) == 1 and model.exits == [TINY["depth"]]


def test_gathered_inference_equals_the_dense_masked_computation():
    torch.manual_seed(0)
    model = tiny_dyt()
    d = dispatchers(model)[1]
    torch.nn.init.normal_(d.router.weight, std=1.0)  # a mixed decision: some tokens on, some off
    h = torch.randn(4, 5, D)
    with torch.no_grad():
        keep = d.router(h).squeeze(-1) > 0
        keep[:, 0] = True  # the class token is always processed
        assert 0 < int(keep[:, 1:].sum()) < keep[:, 1:].numel()
        dense = d.adapted.base(h) * keep.unsqueeze(-1) + d.adapted.branch(h)
        assert torch.allclose(d(h), dense, atol=1e-6)


def test_skipped_tokens_skip_the_mlp_and_costs_follow_the_tokens_processed():
    model = tiny_dyt()
    costs = measure_dyt_costs(model)
    assert costs.per_token == 2 * D * 4 * D  # fc1 + fc2 of the MLP, per token: counted, not assumed
    assert costs.tokens == 4 and costs.depth == TINY["depth"]
    x = images(5)
    set_router_bias(model, -50.0)
    _, none = predict_dyt(model, x, batch_size=2)
    assert none.tolist() == [0] * 5 and activation_rate(none, costs) == 0.0
    assert torch.allclose(costs.macs(none), torch.full((5,), float(costs.fixed), dtype=torch.float64))
    set_router_bias(model, 50.0)
    logits, every = predict_dyt(model, x, batch_size=2)
    assert every.tolist() == [costs.tokens * costs.depth] * 5 and activation_rate(every, costs) == 1.0
    assert float(costs.macs(every)[0]) == costs.complete
    with forced(model, True):
        assert torch.allclose(logits, model(x)[-1], atol=1e-5)
    assert not any(d.record or d.counts for d in dispatchers(model))  # predict_dyt leaves no state behind


def test_objective_pulls_the_activation_rate_to_its_target_through_the_straight_through_mask():
    model = tiny_dyt(seed=1).train()
    x, y = images(32, seed=1), torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(1))
    loss, ces = DyTObjective(0.0)(model, x, y)
    loss.backward()
    assert len(ces) == 2 and all(torch.isfinite(c) for c in ces)
    assert all(d.router.weight.grad is not None and d.router.weight.grad.abs().sum() > 0 for d in dispatchers(model))

    costs = measure_dyt_costs(model)
    before = activation_rate(predict_dyt(model, x)[1], costs)
    fit(model, (x, y), None, OptimConfig(epochs=15, batch_size=16, lr=0.05, warmup_epochs=0),
        objective=DyTObjective(0.0), progress=False)
    after = activation_rate(predict_dyt(model, x)[1], costs)
    assert before > 0.3 and after < before / 2, (before, after)


def test_objective_rejects_a_rate_outside_0_1_and_a_model_without_dispatchers():
    with pytest.raises(ValueError, match="rate r"):
        DyTObjective(1.5)
    plain = build_model(backbone_cfg(), ModelConfig(early_exit=False), 3).train()
    with pytest.raises(ValueError, match="build_dyt"):
        DyTObjective(0.5)(plain, images(2), torch.tensor([0, 1]))
    assert not any(isinstance(m, DispatchedMLP) for m in plain.modules())


def test_training_memory_orders_the_methods_and_leaves_the_model_untouched():
    x, y = images(16), torch.randint(0, 3, (16,))
    loss = lambda m, xb, yb: multi_exit_loss(m(xb), yb)[0]  # noqa: E731
    mem = {}
    for method in ("linear_probe", "adapter", "full_finetune"):
        torch.manual_seed(0)
        model = build_model(backbone_cfg(), ModelConfig(petl=PetlConfig(method=method), early_exit=False), 3)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        mem[method] = training_memory(model, loss, x, y)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert all(p.grad is None for p in model.parameters())
        m = mem[method]
        assert m["source"] == "cpu_account"
        assert m["total"] == m["params"] + 3 * m["trainable"] + m["activations"]
    # a frozen backbone with nothing to train inside it saves no activations for backward
    assert mem["linear_probe"]["activations"] < mem["adapter"]["activations"] / 10
    assert mem["adapter"]["activations"] <= mem["full_finetune"]["activations"]
    assert mem["adapter"]["total"] < mem["full_finetune"]["total"]


def test_compare_throughput_times_each_function_on_the_same_batch():
    calls = []

    def slow(x):
        calls.append(("slow", x.shape[0]))
        time.sleep(0.02)

    def fast(x):
        calls.append(("fast", x.shape[0]))

    ips = compare_throughput({"slow": slow, "fast": fast}, torch.zeros(8, 3), repeats=3, warmup=1)
    assert set(ips) == {"slow", "fast"} and ips["fast"] > 5 * ips["slow"]
    assert ips["slow"] < 8 / 0.02 * 1.01
    assert [c[0] for c in calls] == ["slow", "fast"] * 4 and all(c[1] == 8 for c in calls)  # interleaved
    with pytest.raises(ValueError, match="repeats"):
        compare_throughput({"fast": fast}, torch.zeros(1), repeats=0)


# ------------------------------------------------------------------------------------------ bench/peers.py


def _load_peers():
    from helpers import load_bench

    return load_bench("peers")


def test_each_ablation_removes_its_component_from_the_tuned_configuration(tmp_path):
    """An ablation must differ from dyn_adapter by its component whatever the tuned values say: with a tuned
    priority pattern in best_params, abl_no_priority used to keep it (it only cleared start/end lists) and
    measured dyn_adapter again (identical figures on the 2026-11-30 bench)."""
    from dynadapter.train.loop import priority_schedule

    from helpers import tiny_model

    peers = _load_peers()
    best = ["train.priority.pattern=deep_first", "train.priority.strength=0.6", "train.sparsity.p_max=0.3",
            "train.sparsity.q=0.2"]
    methods = {m.name: m for m in peers.all_methods([3, 6, 9, 12])}
    cfg = {name: peers.method_configs(methods[name], "params.yaml", best)
           for name in ("dyn_adapter", "abl_no_priority", "abl_no_forward_sparsity", "abl_no_backward_sparsity",
                        "abl_no_balanced_heads")}
    model = tiny_model(num_classes=3, depth=4)
    assert priority_schedule(model, cfg["dyn_adapter"][2]) is not None
    assert priority_schedule(model, cfg["abl_no_priority"][2]) is None  # flat weights: no schedule
    assert cfg["abl_no_priority"][2].sparsity == cfg["dyn_adapter"][2].sparsity
    assert not cfg["abl_no_forward_sparsity"][2].sparsity.forward and cfg["dyn_adapter"][2].sparsity.forward
    assert not cfg["abl_no_backward_sparsity"][2].sparsity.backward and cfg["dyn_adapter"][2].sparsity.backward
    assert not cfg["abl_no_balanced_heads"][1].heads.balanced and cfg["dyn_adapter"][1].heads.balanced
    for name in ("abl_no_forward_sparsity", "abl_no_backward_sparsity", "abl_no_balanced_heads"):
        assert cfg[name][2].priority == cfg["dyn_adapter"][2].priority  # the tuned pattern stays
    small = peers.method_configs(methods["abl_small_heads"], "params.yaml", best)
    assert small[1].heads.width == 0.25 and small[1].heads.balanced and small[2] == cfg["dyn_adapter"][2]
    # --ablation-petl: the same ablations of the default PETL module
    rep = {m.name: m for m in peers.all_methods([3, 6, 9, 12], "rep_adapter")}
    for name in ("abl_no_priority", "abl_small_heads", "abl_no_balanced_heads"):
        assert peers.method_configs(rep[name], "params.yaml", best)[1].petl.method == "rep_adapter"
        assert cfg[name if name != "abl_small_heads" else "dyn_adapter"][1].petl.method == "adapter"


def test_val_macs_are_never_test_macs_for_a_data_dependent_method(tmp_path):
    """Issue 24: summary.csv's val_macs_fraction held test MACs for every Dyn-Adapter row cached before val MACs
    were recorded. Now a data-dependent row without them has none (and so does its suite mean); a static row's
    val cost is its test cost by construction; `--resummarize` rewrites a finished run's files that way."""
    import json

    peers = _load_peers()
    base = {"macs": 10.0, "step_seconds": 1.0, "memory": {"total": 1.0}, "points": []}

    def row(family, macs, **extra):
        return {"family": family, "macs": macs, "step_seconds": 1.0, "memory": {"total": 1.0}, "points": [], **extra}

    assert peers.relative(row("dyn", 5.0), base)["val_macs_fraction"] is None
    assert peers.relative(row("dyn", 5.0, val_macs=4.0), base)["val_macs_fraction"] == 0.4
    assert peers.relative(row("truncation", 3.0), base)["val_macs_fraction"] == 0.3
    # a finished run, resummarized: the old fallback's figure (the test MACs, 0.5) is gone, nothing else moves
    per_task = {"full_adapter": {"t": {**row("full", 10.0), "method": "full_adapter", "val_macs_fraction": 1.0}},
                "dyn_adapter": {"t": {**row("dyn", 5.0), "method": "dyn_adapter", "val_macs_fraction": 0.5}}}
    for r in per_task.values():
        r["t"].update(test_accuracy=0.8, val_accuracy=0.8, params={"trainable": 1, "trainable_without_heads": 1,
                                                                   "backbone": 100})
    (tmp_path / "peers.json").write_text(json.dumps({
        "setup": {"tasks": ["t"], "frontier_method": "dyn_adapter"}, "curves": {"dyn_adapter": []},
        "summary": [], "frontier": [], "target_50": None, "per_task": per_task}))
    report = peers.resummarize(tmp_path)
    by = {r["method"]: r for r in report["summary"]}
    assert by["dyn_adapter"]["val_macs_fraction"] is None and by["dyn_adapter"]["macs_fraction"] == 0.5
    assert by["full_adapter"]["val_macs_fraction"] == 1.0
    assert "dyn_adapter,dyn,0.8,0.8,0.5,," in (tmp_path / "summary.csv").read_text()


def test_frontier_picks_each_familys_operating_point_on_val_not_test():
    """Audit #14.4: the frontier used the best TEST accuracy within each budget (for DyT the best of four
    models by test). Each family's point is now chosen on val; test is only read off the chosen point."""
    peers = _load_peers()
    points = {"Dyn-Adapter": [(0.35, 0.52, 0.50), (0.6, 0.61, 0.60)],
              "DyT": [(0.45, 0.56, 0.55), (0.55, 0.50, 0.66), (0.9, 0.71, 0.70)],  # 0.55: lucky on test only
              "static truncation": [(0.5, 0.41, 0.40), (1.0, 0.64, 0.65)]}
    rows = {r["budget"]: r for r in peers.frontier_table(points)}
    assert rows[0.4] == {"budget": 0.4, "Dyn-Adapter": 0.50, "DyT": None, "static truncation": None,
                         "dyn_minus_best_rival": None}
    assert rows[0.5]["DyT"] == 0.55 and rows[0.5]["dyn_minus_best_rival"] == pytest.approx(-0.05)
    assert rows[0.6]["DyT"] == 0.55  # the val-better model, although the other one scores 0.66 on test
    assert rows[0.7]["Dyn-Adapter"] == 0.60 and rows[0.7]["dyn_minus_best_rival"] == pytest.approx(0.05)
    assert rows[1.0]["DyT"] == 0.70 and rows[1.0]["dyn_minus_best_rival"] == pytest.approx(-0.10)


@pytest.mark.slow
def test_peers_benchmark_end_to_end_with_cache_and_mlflow(tmp_path, capsys):
    import json

    import yaml
    from mlflow import MlflowClient

    from pipelines import prepare, pretrain
    from test_pipelines import tiny_params

    raw = tiny_params(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    assert prepare.main(["--params", str(params)]) == 0 and pretrain.main(["--params", str(params)]) == 0
    peers, out = _load_peers(), tmp_path / "peers"
    argv = ["--params", str(params), "--best", "none", "--methods", "dyn_adapter,dyt_r0.5,trunc_b2,linear_probe",
            "--epochs", "1", "--batch", "8", "--repeats", "1", "--out", str(out), "--experiment", "peers-test"]
    assert peers.main(argv) == 0
    report = json.loads((out / "peers.json").read_text())
    rows = {r["method"]: r for r in report["summary"]}
    assert set(rows) == {"full_adapter", "dyn_adapter", "dyt_r0.5", "trunc_b2", "linear_probe"}
    base = rows["full_adapter"]
    assert base["macs_fraction"] == 1.0 and base["step_time_ratio"] == 1.0 and base["throughput_ratio"] == 1.0
    assert 0.4 < rows["trunc_b2"]["macs_fraction"] < 0.6  # 2 of 4 blocks
    assert rows["trunc_b2"]["memory_ratio"] < 1.0 and rows["linear_probe"]["memory_ratio"] < 0.5
    assert rows["linear_probe"]["trainable_pct_of_backbone"] < base["trainable_pct_of_backbone"]
    assert rows["dyn_adapter"]["macs_fraction"] <= 0.5 + 0.25  # calibrated for 0.5 on val, measured on test
    for task, r in report["per_task"]["dyn_adapter"].items():  # val MACs are val's: the calibration's, <= 0.5
        assert r["val_macs_fraction"] == pytest.approx(r["val_macs"] / report["per_task"]["full_adapter"][task]["macs"])
        assert r["val_macs_fraction"] <= 0.5 + 1e-9 and r["val_macs"] != r["macs"]
    assert rows["dyt_r0.5"]["memory_ratio"] > 1.0  # DyT trains the complete and the dynamic model
    for r in rows.values():
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["throughput_ratio"] > 0
    per_task = report["per_task"]["dyt_r0.5"]
    assert set(per_task) == {"size", "digits"}
    assert all(0.0 <= t["activation_rate"] <= 1.0 and t["target_rate"] == 0.5 for t in per_task.values())
    assert [r["budget"] for r in report["frontier"]] == peers.FRONTIER_BUDGETS
    assert (out / "accuracy_vs_macs.png").stat().st_size > 10_000
    assert (out / "summary.csv").read_text().startswith("method,")
    tables = (out / "tables.md").read_text()
    assert "| dyt_r0.5 |" in tables and "| ≤ 0.5 |" in tables and "Dyn-Adapter − best rival" in tables

    client = MlflowClient(tracking_uri=raw["base"]["mlflow"]["tracking_uri"])
    exp = client.get_experiment_by_name("peers-test")
    runs = client.search_runs([exp.experiment_id])
    nested = [r for r in runs if r.info.run_id != report["mlflow_run"]]
    assert sorted(r.info.run_name for r in nested) == sorted(rows)
    dyt_run = next(r for r in nested if r.info.run_name == "dyt_r0.5")
    assert dyt_run.data.metrics["suite_test_accuracy"] == pytest.approx(rows["dyt_r0.5"]["test_accuracy"])

    capsys.readouterr()
    assert peers.main(argv) == 0  # a rerun measures nothing again: every (method, task) comes from the cache
    printed = capsys.readouterr().out
    assert printed.count(": cached") == 10 and "MMACs (" not in printed
    again = json.loads((out / "peers.json").read_text())
    assert again["summary"] == report["summary"]
