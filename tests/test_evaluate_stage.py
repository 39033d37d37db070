"""Contracts of the evaluate and register stages that need no training: what decides (val, never test), the
Pareto table evaluate writes, the budget curve as stepped MLflow metrics, and the model card."""

from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("mlflow")

from pipelines import evaluate  # noqa: E402

# Three sweep points of one task: on val, B beats C (cheaper and more accurate), so the frontier a user can
# choose is A, B. On test, C happens to be the best: a frontier picked on test would be A, C.
A = {"val_fraction": 0.3, "val_accuracy": 0.60, "test_fraction": 0.31, "test_accuracy": 0.70, "budget": 0.3}
B = {"val_fraction": 0.4, "val_accuracy": 0.80, "test_fraction": 0.41, "test_accuracy": 0.65, "budget": 0.4}
C = {"val_fraction": 0.5, "val_accuracy": 0.50, "test_fraction": 0.52, "test_accuracy": 0.95, "budget": None}


def _per_task(curve):
    for i, p in enumerate(curve):
        p.setdefault("test_macs", 1000 * p["test_fraction"])
        p.setdefault("thresholds", [0.5 + 0.1 * i])
    dyn = {"curve": curve, "exits": [2, 4], "test": {"exit_fraction": [0.5, 0.5]}}
    return {"count": {"dyn": dyn}}


def test_pareto_table_is_chosen_on_val_not_on_test(tmp_path):
    per_task = _per_task([dict(A), dict(B), dict(C)])
    curve = evaluate.suite_curve(per_task)
    evaluate.render_plots(tmp_path, per_task, curve, baseline_acc=0.5)
    with open(tmp_path / "pareto.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["val_accuracy"]) for r in rows] == [0.60, 0.80]  # A, B: C is beaten on val
    assert [float(r["accuracy"]) for r in rows] == [0.70, 0.65]  # reported at their test figures
    assert (tmp_path / "pareto.png").stat().st_size > 0


def test_suite_curve_is_the_val_calibrated_point_per_budget():
    per_task = _per_task([dict(A), dict(B), dict(C)])
    rows = {r["budget"]: r for r in evaluate.suite_curve(per_task)}
    assert min(rows) == 0.3 and rows[0.35]["test_accuracy"] == A["test_accuracy"]  # A until B's budget
    assert rows[1.0]["test_fraction"] == B["test_fraction"] and rows[1.0]["val_fraction"] == B["val_fraction"]


@pytest.fixture
def client(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_budget_curve_is_logged_as_metrics_with_step_budget_percent(client):
    from dynadapter.tracking import RunRef, log_budget_curve

    exp = client.create_experiment("curve")
    run = RunRef(client.tracking_uri, client.create_run(exp).info.run_id, exp)
    rows = evaluate.suite_curve(_per_task([dict(A), dict(B), dict(C)]))
    assert log_budget_curve(run, rows) == 4 * len(rows)
    history = {m.step: m.value for m in client.get_metric_history(run.run_id, "budget_curve/test_accuracy")}
    assert history == {round(r["budget"] * 100): r["test_accuracy"] for r in rows}
    assert 30 in history and 100 in history
    macs = {m.step: m.value for m in client.get_metric_history(run.run_id, "budget_curve/macs_fraction")}
    assert macs[100] == B["test_fraction"]
    val = {m.step: m.value for m in client.get_metric_history(run.run_id, "budget_curve/val_accuracy")}
    assert val[35] == A["val_accuracy"]


def _models_json(tmp_path, val: float, test: float, budget: float = 0.5) -> dict:
    return {"size": {"run_id": None, "model_uri": None, "val_accuracy": val, "val_macs": 100.0,
                     "test_accuracy": test, "test_macs": 100.0, "budget": budget,
                     "card": {"task": "size", "backbone": "vit_tiny_patch16_224", "petl": "adapter",
                              "exits": [1, 2], "budget": budget, "val_accuracy": val, "test_accuracy": test,
                              "val_fraction": 0.5, "test_fraction": 0.5, "curve": []}}}


def test_register_moves_champion_on_val_accuracy_and_records_test(tmp_path, client):
    """Through the register stage itself: a second model, better on test but worse on val, stays out."""
    from dynadapter.config import parse_params
    from dynadapter.tracking import RunRef
    from pipelines import register

    params = parse_params({"base": {"tasks": ["size"], "paths": {"outputs": str(tmp_path)},
                                    "mlflow": {"tracking_uri": client.tracking_uri}}})
    exp = client.create_experiment("reg")
    parent = RunRef(client.tracking_uri, client.create_run(exp).info.run_id, exp)
    (tmp_path / "evaluate").mkdir()
    decisions = []
    for val, test in ((0.8, 0.6), (0.7, 0.9), (0.85, 0.5)):
        models = _models_json(tmp_path, val, test)
        run = client.create_run(exp)
        models["size"].update(run_id=run.info.run_id, model_uri=f"{run.info.artifact_uri}/model")
        (tmp_path / "evaluate" / "models.json").write_text(json.dumps(models))
        decisions.append(register.run(params, parent)["size"])
    assert [d["promoted"] for d in decisions] == [True, False, True]
    assert decisions[1]["test_accuracy"] == 0.9 and "val accuracy 0.7000 < 0.8000" in decisions[1]["reason"]
    card = client.get_model_version("dynadapter-size", decisions[2]["version"]).description
    assert "vit_tiny_patch16_224" in card and "85.0%" in card and "50.0%" in card


def test_register_refuses_models_evaluated_at_another_budget(tmp_path, client):
    from dynadapter.config import parse_params
    from pipelines import register

    params = parse_params({"base": {"tasks": ["size"], "budget": 0.4, "paths": {"outputs": str(tmp_path)}}})
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "models.json").write_text(json.dumps(_models_json(tmp_path, 0.8, 0.6, budget=0.5)))
    with pytest.raises(SystemExit, match="base.budget 0.4"):
        register.run(params, None)


def test_stage_tracking_resolves_a_relative_store_against_dvc_root(tmp_path, monkeypatch):
    """A queued `dvc exp run` runs stages in a temporary copy with $DVC_ROOT at the project: a relative
    tracking URI must land in the project's store, not in the copy DVC deletes afterwards."""
    from dynadapter.config import parse_params
    from pipelines.common import stage_tracking

    project, copy = tmp_path / "project", tmp_path / "exps" / "tmp1"
    project.mkdir()
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(project))
    monkeypatch.setenv("DYNADAPTER_PIPELINE_ID", "sweep-0.3")
    params = parse_params({"base": {"mlflow": {"tracking_uri": "sqlite:///mlflow.db", "experiment": "x"}}})
    with stage_tracking(params, "evaluate") as parent:
        assert parent.tracking_uri == f"sqlite:///{project.resolve() / 'mlflow.db'}"
    assert (project / "mlflow.db").is_file() and not (copy / "mlflow.db").exists()
