"""`dvc repro` for real, in a temporary git + DVC copy of the project with a tiny params.yaml: every stage runs
(prepare -> pretrain -> tune -> train -> evaluate -> register), the metrics are visible to `dvc metrics show`,
a second `dvc repro` does nothing, and `dvc exp run -S key=value` / `dvc exp show` / `dvc metrics diff` work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import dvc, dvc_project, git
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
    assert "best_val_budget_acc" in shown.stdout
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
