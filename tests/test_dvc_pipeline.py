"""`dvc repro` for real, in a temporary git + DVC copy of the project with a tiny params.yaml: every stage runs
(prepare -> pretrain -> tune -> train -> evaluate -> register), the metrics are visible to `dvc metrics show`,
a second `dvc repro` does nothing, and `dvc exp run -S key=value` / `dvc exp show` / `dvc metrics diff` work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_pipelines import tiny_params

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env(cwd: Path) -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "DVC_NO_ANALYTICS": "1",
            "OMP_NUM_THREADS": "1", "PYTHONPATH": str(cwd), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def _dvc(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, env=_env(cwd),
                          capture_output=True, text=True, timeout=600)


def _git(args: list[str], cwd: Path) -> None:
    out = subprocess.run(["git", *args], cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    for name in ("dynadapter", "pipelines"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, root / name)
    params = tiny_params(Path("."))  # relative paths, as in the real params.yaml
    params["base"]["paths"] = {"data": "data/prepared", "upstream": "data/upstream", "models": "models",
                               "outputs": "outputs"}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    _git(["init", "-q"], root)
    init = _dvc(["init", "-q"], root)
    assert init.returncode == 0, init.stderr
    _git(["add", "-A"], root)
    _git(["commit", "-qm", "project"], root)
    return root


def test_dvc_repro_runs_every_stage_then_is_a_noop(project):
    first = _dvc(["repro"], project)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in ("prepare", "pretrain", "tune", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first.stdout
    metrics = json.loads((project / "outputs/evaluate/metrics.json").read_text())
    assert 0.0 <= metrics["dyn_test_accuracy"] <= 1.0

    shown = _dvc(["metrics", "show", "--json"], project)
    assert shown.returncode == 0, shown.stderr
    assert "dyn_test_accuracy" in shown.stdout and "upstream_val_accuracy" in shown.stdout
    assert "best_val_budget_acc" in shown.stdout
    decisions = json.loads((project / "outputs/register/decisions.json").read_text())
    assert all(d["promoted"] for d in decisions.values())

    second = _dvc(["repro"], project)
    assert second.returncode == 0, second.stderr
    assert "Running stage" not in second.stdout
    status = _dvc(["status"], project)
    assert "up to date" in status.stdout.lower(), status.stdout


def test_dvc_exp_run_with_a_param_change_reruns_only_what_depends_on_it(project):
    _git(["add", "-A"], project)  # dvc.lock of the first repro
    _git(["commit", "-qm", "repro"], project)
    exp = _dvc(["exp", "run", "-S", "evaluate.throughput_repeats=2", "-n", "repeats2"], project)
    assert exp.returncode == 0, exp.stdout[-3000:] + exp.stderr[-3000:]
    assert "Running stage 'evaluate'" in exp.stdout and "Running stage 'register'" in exp.stdout
    for stage in ("prepare", "pretrain", "tune", "train"):
        assert f"Running stage '{stage}'" not in exp.stdout
    # the same models, logged again: the registry keeps the champion unless the new version is better
    decisions = json.loads((project / "outputs/register/decisions.json").read_text())
    assert all(d["version"] == "2" and d["created"] for d in decisions.values())
    shown = _dvc(["exp", "show", "--json"], project)
    assert shown.returncode == 0, shown.stderr
    assert "repeats2" in shown.stdout and "throughput_repeats" in shown.stdout
    assert "dyn_test_accuracy" in shown.stdout  # metrics are git-tracked (cache: false), so experiments keep them
    diff = _dvc(["params", "diff", "--json"], project)
    assert diff.returncode == 0 and "evaluate.throughput_repeats" in diff.stdout, diff.stdout + diff.stderr
    metrics = _dvc(["metrics", "diff", "--json"], project)
    assert metrics.returncode == 0, metrics.stderr
