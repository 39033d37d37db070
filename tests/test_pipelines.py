"""The DVC stage entry points on a tiny configuration: prepare -> pretrain -> tune -> train -> evaluate ->
register, in process (tune on the session's local Ray), tracked in a temporary MLflow sqlite store.

Asserts on what each stage writes (resolved config, metrics, plots, model files, MLflow runs, registry
decisions) and on their values, and that a params mistake stops a stage before any work with exit code 2
naming the key.
"""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
import yaml

from dynadapter.data.upstream import FACTORS
from pipelines import evaluate, prepare, pretrain, register, train, tune

TINY_BACKBONE = {"img_size": 16, "patch_size": 8, "embed_dim": 24, "depth": 4, "num_heads": 2}


def tiny_params(root) -> dict:
    return {
        "base": {
            "seed": 0,
            "paths": {k: str(root / k) for k in ("data", "models", "outputs")},
            "tasks": ["size", "digits"],
            "backbone": {"name": "vit_tiny_patch16_224", "checkpoint": None, "overrides": TINY_BACKBONE},
            "budget": 0.5,
            "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "tiny"},
        },
        "prepare": {"embedded": {"image_size": 16, "train": 48, "val": 24, "test": 40}},
        "pretrain": {"source": "train", "scenes": 96, "val_scenes": 32, "epochs": 1, "batch_size": 32},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.005},
        "evaluate": {"throughput_batch": 16, "throughput_repeats": 1},
        "tune": {"num_samples": 2, "epochs": 1, "tasks": ["size"],
                 "search_space": {"p_max": [0.0, 0.4], "p_min": None, "q": [0.0, 0.3],
                                  "priority_start": [0.5, 2.0], "priority_end": None, "lr": None},
                 "ray": {"cpus_per_worker": 1.0}},
        "register": {"alias": "champion", "model_prefix": "dynadapter"},
    }


def is_share(value: float, n: int) -> bool:
    """`value` is k / n for a whole k in [0, n]: an accuracy or share over n samples, not just any number in [0, 1]."""
    return 0 <= value <= 1 and abs(value * n - round(value * n)) < 1e-6


STAGES = (("prepare", prepare), ("pretrain", pretrain), ("tune", tune), ("train", train), ("evaluate", evaluate),
          ("register", register))


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("pipeline")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(root)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        codes = {}
        for name, stage in STAGES:
            codes[name] = stage.main(["--params", str(params)])
    finally:
        torch.set_num_threads(threads)
    return root, codes


def test_every_stage_succeeds_and_saves_its_resolved_config(pipeline_run):
    root, codes = pipeline_run
    assert codes == {name: 0 for name, _ in STAGES}
    for stage in codes:
        cfg = yaml.safe_load((root / "outputs" / stage / f"{stage}_config.yaml").read_text())
        assert set(cfg) == {"base", stage}
        assert cfg["base"]["backbone"]["overrides"] == TINY_BACKBONE


def test_prepare_and_pretrain_outputs(pipeline_run):
    root, _ = pipeline_run
    summary = json.loads((root / "outputs/prepare/summary.json").read_text())
    assert summary["tasks"]["size"]["counts"] == {"train": 48, "val": 24, "test": 40}
    assert "upstream" not in summary  # the pretraining scenes are the pretrain stage's own business
    assert (root / "models/backbone/backbone.safetensors").is_file()
    metrics = json.loads((root / "outputs/pretrain/metrics.json").read_text())
    factors = metrics["upstream_val_factor_accuracy"]
    assert metrics["source"] == "train" and set(factors) == set(FACTORS)
    assert metrics["upstream_val_accuracy"] == pytest.approx(sum(factors.values()) / len(factors), abs=1e-3)


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
    per_task = json.loads((out / "per_task.json").read_text())
    assert set(per_task) == {"size", "digits"}
    first_exit = []
    for task, res in per_task.items():
        dyn, test = res["dyn"], res["dyn"]["test"]
        cum, base = dyn["stage_macs"]["cumulative_macs"], dyn["full_depth_macs"]
        assert base == dyn["stage_macs"]["full_depth_baseline_macs"] == res["baseline"]["full_depth_macs"]
        shares = test["exit_fraction"]
        assert len(shares) == 4 and abs(sum(shares) - 1) < 1e-6
        assert all(is_share(f, 40) for f in shares)  # whole test samples (40) per exit
        # the MACs executed are those of the exit histogram, between leaving at exit 0 and running every exit
        assert test["macs"] == pytest.approx(sum(f * c for f, c in zip(shares, cum)))
        assert test["fraction"] == pytest.approx(test["macs"] / base)
        assert cum[0] / base <= test["fraction"] <= cum[-1] / base
        assert dyn["calibration"]["fraction"] <= 0.5 + 1e-9  # calibrated on val for the budget
        first_exit.append(cum[0] / base)
        for variant in ("dyn", "baseline"):
            assert is_share(res[variant]["test"]["accuracy"], 40)
        assert res["baseline"]["test"]["fraction"] == pytest.approx(1.0)
        assert res["baseline"]["test"]["exit_fraction"] == [1.0]
        # the measured speed-up cannot beat what the MACs of the timed batch allow by much (timing noise)
        tp = dyn["throughput"]
        assert tp["batch_size"] == 16 and len(tp["exit_fraction"]) == 4
        limit = base / sum(f * c for f, c in zip(tp["exit_fraction"], cum))
        assert 0.1 < tp["speedup"] < 1.5 * limit, (tp, limit)
    assert min(first_exit) <= m["dyn_test_macs_fraction"] <= 1.0
    assert m["dyn_test_macs_fraction"] <= 0.75  # thresholds calibrated on val for 0.5 (test may drift a little)
    assert m["dyn_test_macs_fraction"] == pytest.approx(sum(r["dyn"]["test"]["fraction"] for r in per_task.values()) / 2)
    assert m["dyn_test_accuracy"] == pytest.approx(sum(r["dyn"]["test"]["accuracy"] for r in per_task.values()) / 2)
    assert m["throughput_speedup"] == pytest.approx(sum(r["dyn"]["throughput"]["speedup"] for r in per_task.values()) / 2)
    # the embedded backbone: size shares a pretraining factor, digits does not; each group is reported apart
    tasks = m["tasks"]
    assert {g: r["tasks"] for g, r in m["groups"].items()} == {"shared": ["size"], "unseen": ["digits"]}
    for group, task in (("shared", "size"), ("unseen", "digits")):
        for key in ("dyn_test_accuracy", "dyn_test_macs_fraction", "baseline_test_accuracy"):
            assert m["groups"][group][key] == tasks[task][key]
        probes = m["transfer"]["tasks"][task]
        assert m["transfer"]["groups"][group]["probe_val"] == probes["probe_val"]
        assert m["transfer"]["groups"][group]["margin"] == pytest.approx(
            probes["probe_val"] - max(probes["random_init_probe_val"], probes["pixel_probe_val"]))
    for name in ("budget_curve", "pareto", "exit_hist"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f"{name}.csv").read_text().count("\n") >= 2


@pytest.mark.parametrize("stage", [stage for _, stage in STAGES])
@pytest.mark.parametrize("override, key", [("base.budget=1.5", "base.budget"), ("base.sed=1", "base.sed")])
def test_params_mistake_stops_stage_naming_the_key(tmp_path, capsys, stage, override, key):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(tmp_path)))
    with pytest.raises(SystemExit) as exit_info:
        stage.main(["--params", str(params), "--set", override])
    assert exit_info.value.code == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()  # stopped before any work


def test_tune_writes_best_params_that_train_applies(pipeline_run):
    root, _ = pipeline_run
    out = root / "outputs/tune"
    best = yaml.safe_load((out / "best_params.yaml").read_text())
    assert set(best) == {"train.sparsity.p_max", "train.sparsity.q", "train.priority.start",
                         "train.priority.strength", "train.priority.pattern"}
    assert best["train.priority.pattern"] in ("shallow_first", "deep_first")
    assert 0.0 <= best["train.priority.strength"] <= 0.8
    assert 0.0 <= best["train.sparsity.p_max"] <= 0.4 and 0.0 <= best["train.sparsity.q"] <= 0.3
    assert len(best["train.priority.start"]) == 4  # one weight per exit
    trials = (out / "trials.csv").read_text().strip().splitlines()
    assert len(trials) == 1 + 2  # header + num_samples
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trials"] == 2
    rows = list(csv.DictReader(io.StringIO((out / "trials.csv").read_text())))
    scored = [float(r["val_curve_acc"]) for r in rows if not r.get("error")]  # trials that ended without error
    assert metrics["objective"] == "curve" and metrics["best_val_curve_acc"] == pytest.approx(max(scored))
    # the mean over the 7 curve budgets of val accuracies of the one tune task (24 val images)
    assert is_share(metrics["best_val_curve_acc"], 7 * 24)
    assert all(is_share(float(r["val_budget_acc"]), 24) for r in rows if not r.get("error"))
    # the train stage ran with the tuned values
    resolved = yaml.safe_load((root / "outputs/train/train_config.yaml").read_text())["train"]
    assert resolved["sparsity"]["p_max"] == pytest.approx(best["train.sparsity.p_max"])
    assert resolved["priority"]["start"] == pytest.approx(best["train.priority.start"])


def _runs(root):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def test_mlflow_has_one_parent_with_nested_runs_per_trial_and_task(pipeline_run):
    root, _ = pipeline_run
    client, runs = _runs(root)
    parents = [r for r in runs if r.data.tags.get("dynadapter.kind") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    for stage, _ in STAGES[2:]:
        assert parent.data.tags[f"dynadapter.stage_status.{stage}"] == "FINISHED"
    assert parent.data.params["base.budget"] == "0.5"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    by_stage = {}
    for r in children:
        by_stage.setdefault(r.data.tags["dynadapter.stage"], []).append(r)
    assert len(by_stage["tune"]) == 2  # one per trial, recorded once
    assert len(by_stage["train"]) == 4 and len(by_stage["evaluate"]) == 4  # 2 tasks x (dyn, baseline)
    trial = by_stage["tune"][0]
    assert {"val_budget_acc", "val_curve_acc"} <= set(trial.data.metrics) and "train.sparsity.p_max" in trial.data.params
    dyn_eval = next(r for r in by_stage["evaluate"] if r.data.tags["dynadapter.variant"] == "dyn")
    per_task = json.loads((root / "outputs/evaluate/per_task.json").read_text())
    task = dyn_eval.data.tags["dynadapter.task"]
    assert dyn_eval.data.metrics["test_accuracy"] == pytest.approx(per_task[task]["dyn"]["test"]["accuracy"])
    assert "test_acc_exit_3" in dyn_eval.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "evaluate")}
    assert {"evaluate/pareto.png", "evaluate/pareto.csv", "evaluate/budget_curve.png"} <= artifacts


def test_register_promotes_first_versions_and_champion_serves_dynamic_inference(pipeline_run):
    import mlflow
    import numpy as np

    root, _ = pipeline_run
    decisions = json.loads((root / "outputs/register/decisions.json").read_text())
    models = json.loads((root / "outputs/evaluate/models.json").read_text())
    for task in ("size", "digits"):
        d = decisions[task]
        assert d["promoted"] and d["version"] == "1" and d["champion"] == "1" and "no champion" in d["reason"]
        assert d["test_accuracy"] == models[task]["test_accuracy"]
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/dynadapter-size@champion")
    x = np.random.default_rng(0).random((5, 3, 16, 16), dtype=np.float32)
    full = model.predict(x, params={"thresholds": [2.0, 2.0, 2.0, 2.0]})  # nobody leaves early
    assert list(full["exit_index"]) == [3] * 5
    cheap = model.predict(x, params={"thresholds": [0.0, 0.0, 0.0, 0.0]})  # everyone leaves at exit 0
    assert list(cheap["exit_index"]) == [0] * 5 and cheap["macs"].max() < full["macs"].min()


def test_register_twice_changes_nothing(pipeline_run):
    from mlflow import MlflowClient

    root, _ = pipeline_run
    before = json.loads((root / "outputs/register/decisions.json").read_text())
    assert register.main(["--params", str(root / "params.yaml")]) == 0
    after = json.loads((root / "outputs/register/decisions.json").read_text())
    assert [after[t]["version"] for t in after] == [before[t]["version"] for t in before]
    assert not any(d["created"] for d in after.values())
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    assert len(client.search_model_versions("name = 'dynadapter-size'")) == 1


def test_unreachable_tracking_server_stops_stage_before_work(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(tmp_path)))
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--params", str(params), "--set", f"base.mlflow.tracking_uri={uri}"])
    assert exit_info.value.code == 3
    assert uri in capsys.readouterr().err
    assert not (tmp_path / "models").exists()


@pytest.mark.slow
def test_champion_served_over_rest(pipeline_run):
    """`python -m pipelines.serve` (what `make serve` runs) starts MLflow's real scoring server on the champion
    the register stage promoted; requests as the README shows them, over HTTP; the server stopped by its PID."""
    import numpy as np

    from dynadapter.adapt import curve_at_budgets, load_task_for
    from dynadapter.config import load_params
    from pipelines.serve import invoke, running_server

    root, _ = pipeline_run
    params = load_params(root / "params.yaml")
    val = load_task_for(params.base, "size", splits=("val",), uint8=True).val  # what the thresholds were fitted on
    x = (val[0].float() / 255).numpy()
    per_task = json.loads((root / "outputs/evaluate/per_task.json").read_text())
    calibrated = curve_at_budgets(per_task["size"]["dyn"]["curve"], [0.5])[0.5]

    with running_server(["--params", str(root / "params.yaml"), "--task", "size"],
                        log=root / "serve.log") as url:
        status, full = invoke(url, x, {"thresholds": [2.0, 2.0, 2.0, 0.0]})  # nobody leaves early
        assert status == 200 and set(full["predictions"]["exit_index"]) == {3}
        baseline = full["predictions"]["macs"][0]
        assert baseline == per_task["size"]["dyn"]["full_depth_macs"]

        status, half = invoke(url, x, {"budget": 0.5})
        assert status == 200
        out = half["predictions"]
        assert set(out) == {"prediction", "exit_index", "confidence", "macs"} and len(out["macs"]) == len(x)
        spent = float(np.mean(out["macs"])) / baseline
        assert spent <= 0.5 and spent == pytest.approx(calibrated["val_fraction"], abs=1e-9)
        assert len(set(out["exit_index"])) > 1  # early exits really taken

        status, all_in = invoke(url, x, {"budget": 1.0})
        assert status == 200 and set(all_in["predictions"]["exit_index"]) == {3}
        assert all_in["predictions"]["macs"] == full["predictions"]["macs"]
        assert all_in["predictions"]["prediction"] == full["predictions"]["prediction"]

        for bad, reason in ((-1.0, "budget must be a finite fraction of full-depth MACs > 0, got -1.0"),
                            (0.01, "budget 0.01 is below what this model can spend")):
            status, err = invoke(url, x[:2], {"budget": bad})
            assert status == 400 and err["error_code"] == "INVALID_PARAMETER_VALUE"
            assert reason in err["message"]
        status, err = invoke(url, x[:2], {"thresholds": [0.5, 0.5]})
        assert status == 400 and "need 4 values (one per exit), got 2" in err["message"]

        status, err = invoke(url, x[:2, :, :8], None)  # wrong spatial size
        assert status == 400 and "does not match expected shape (-1, 3, 16, 16)" in err["message"]
