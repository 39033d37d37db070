"""`dvc repro` for real, in a temporary git + DVC copy of the project with a tiny params.yaml: every stage runs
(prepare -> pretrain -> tune -> train -> evaluate -> register), the metrics are visible to `dvc metrics show`,
a second `dvc repro` does nothing, and `dvc exp run -S key=value` / `dvc exp show` / `dvc metrics diff` work."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import DVC, dvc, dvc_project, git, project_env
from test_pipelines import tiny_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return dvc_project(tmp_path_factory.mktemp("project"), tiny_params(Path(".")))


def test_dvc_repro_runs_every_stage_then_is_a_noop(project):
    first = dvc(["repro"], project)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in ("prepare", "pretrain", "tune", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first.stdout
    metrics = json.loads((project / "outputs/evaluate/metrics.json").read_text())
    assert 0.0 <= metrics["dyn_test_accuracy"] <= 1.0

    shown = dvc(["metrics", "show", "--json"], project)
    assert shown.returncode == 0, shown.stderr
    assert "dyn_test_accuracy" in shown.stdout and "upstream_val_accuracy" in shown.stdout
    assert "best_val_curve_acc" in shown.stdout
    decisions = json.loads((project / "outputs/register/decisions.json").read_text())
    assert all(d["promoted"] for d in decisions.values())

    second = dvc(["repro"], project)
    assert second.returncode == 0, second.stderr
    assert "Running stage" not in second.stdout
    status = dvc(["status"], project)
    assert "up to date" in status.stdout.lower(), status.stdout


def test_dvc_exp_run_with_a_param_change_reruns_only_what_depends_on_it(project):
    git(["add", "-A"], project)  # dvc.lock of the first repro
    git(["commit", "-qm", "repro"], project)
    exp = dvc(["exp", "run", "-S", "evaluate.throughput_repeats=2", "-n", "repeats2"], project)
    assert exp.returncode == 0, exp.stdout[-3000:] + exp.stderr[-3000:]
    assert "Running stage 'evaluate'" in exp.stdout and "Running stage 'register'" in exp.stdout
    for stage in ("prepare", "pretrain", "tune", "train"):
        assert f"Running stage '{stage}'" not in exp.stdout
    # the same models, logged again: the registry keeps the champion unless the new version is better
    decisions = json.loads((project / "outputs/register/decisions.json").read_text())
    assert all(d["version"] == "2" and d["created"] for d in decisions.values())
    shown = dvc(["exp", "show", "--json"], project)
    assert shown.returncode == 0, shown.stderr
    assert "repeats2" in shown.stdout and "throughput_repeats" in shown.stdout
    assert "dyn_test_accuracy" in shown.stdout  # metrics are git-tracked (cache: false), so experiments keep them
    diff = dvc(["params", "diff", "--json"], project)
    assert diff.returncode == 0 and "evaluate.throughput_repeats" in diff.stdout, diff.stdout + diff.stderr
    metrics = dvc(["metrics", "diff", "--json"], project)
    assert metrics.returncode == 0, metrics.stderr


def test_budget_sweep_as_queued_experiments_retrains_nothing(project):
    """README's sweep: queue budgets with -S, run them all, read budget, accuracy, MACs fraction and speed-up
    side by side in `dvc exp show`; no experiment runs the train stage, and all register in the project's
    MLflow store (the queue runs in temporary copies)."""
    git(["add", "-A"], project)
    git(["commit", "-qm", "before the sweep"], project)
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    queued = dvc(["exp", "run", "--queue", "-S", "base.budget=0.3,0.7"], project)
    assert queued.returncode == 0, queued.stdout + queued.stderr
    ran = dvc(["exp", "run", "--run-all", "-j", "1"], project)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    shown = dvc(["exp", "show", "--json"], project)
    assert shown.returncode == 0, shown.stderr
    rows = [e for b in json.loads(shown.stdout) for e in (b.get("experiments") or [])]
    budgets = {}
    for exp in rows:
        data = exp["revs"][0]["data"]
        budget = data["params"]["params.yaml"]["data"]["base"]["budget"]
        metrics = data["metrics"]["outputs/evaluate/metrics.json"]["data"]
        assert {"dyn_test_accuracy", "dyn_test_macs_fraction", "throughput_speedup"} <= set(metrics)
        assert metrics["budget"] == budget
        trained = next(d["md5"] for d in lock["evaluate"]["deps"] if d["path"] == "models/tasks")
        assert data["deps"]["models/tasks"]["hash"] == trained  # the baseline's trained models, unchanged
        budgets[budget] = metrics["dyn_test_macs_fraction"]
    assert set(budgets) == {0.3, 0.7}
    names = [e.get("name") or e["revs"][0].get("name") for e in rows]
    assert all(names), names
    for name in names:
        logs = subprocess.run([DVC, "queue", "logs", name], cwd=project, env=project_env(project),
                              capture_output=True, text=True, timeout=120).stdout
        assert "Running stage 'train'" not in logs and "Running stage 'tune'" not in logs
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parents = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                                 filter_string="tags.`dynadapter.kind` = 'pipeline'")
    curves = [client.get_metric_history(r.info.run_id, "budget_curve/test_accuracy") for r in parents]
    assert sum(1 for c in curves if c) >= 3  # the first repro and both experiments, in the project's store
    assert all(m.step in range(10, 101) for c in curves for m in c)
    card = client.get_registered_model("dynadapter-size").description
    assert "vit_tiny_patch16_224" in card and "budget" in card.lower()
