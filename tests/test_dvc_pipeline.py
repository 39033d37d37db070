"""`dvc repro` for real, in a temporary copy of the project with a tiny params.yaml: every stage runs, the
metrics are visible to `dvc metrics show`, and a second `dvc repro` does nothing."""

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


def _dvc(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "DVC_NO_ANALYTICS": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(cwd)}
    return subprocess.run([str(Path(bindir) / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    for name in ("dynadapter", "pipelines"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    params = tiny_params(Path("."))  # relative paths, as in the real params.yaml
    params["base"]["paths"] = {"data": "data/prepared", "upstream": "data/upstream", "models": "models",
                               "outputs": "outputs"}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    init = _dvc(["init", "--no-scm", "-q"], root)
    assert init.returncode == 0, init.stderr
    return root


def test_dvc_repro_runs_every_stage_then_is_a_noop(project):
    first = _dvc(["repro"], project)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in ("prepare", "pretrain", "train", "evaluate"):
        assert f"Running stage '{stage}'" in first.stdout
    metrics = json.loads((project / "outputs/evaluate/metrics.json").read_text())
    assert 0.0 <= metrics["dyn_test_accuracy"] <= 1.0

    shown = _dvc(["metrics", "show", "--json"], project)
    assert shown.returncode == 0, shown.stderr
    assert "dyn_test_accuracy" in shown.stdout and "upstream_val_accuracy" in shown.stdout

    second = _dvc(["repro"], project)
    assert second.returncode == 0, second.stderr
    assert "Running stage" not in second.stdout
    status = _dvc(["status"], project)
    assert "up to date" in status.stdout.lower(), status.stdout
