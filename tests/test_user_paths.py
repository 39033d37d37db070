"""Small things a user trips on: trials.csv names no folder of the machine the tune stage ran on; the MLflow
experiment opens on its training runs, not on MLflow 3's GenAI view; the store/vtab imports run one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipelines.tune import project_relative, trials_rows

REPO = Path(__file__).resolve().parents[1]


def test_trials_csv_paths_are_relative_to_the_project(tmp_path):
    trial = tmp_path / "models/checkpoints/tune/exp/trial_0"
    rows = [{"trial_id": "a", "path": str(trial)}, {"trial_id": "b", "path": "s3://bucket/exp/trial_1"},
            {"trial_id": "c", "path": "/shared/ray/exp/trial_2"}]
    out = trials_rows(rows, tmp_path)
    assert [r["path"] for r in out] == ["models/checkpoints/tune/exp/trial_0", "s3://bucket/exp/trial_1",
                                        "/shared/ray/exp/trial_2"]  # inside the project / a URI / shared storage
    assert rows[0]["path"] == str(trial)  # the outcome itself is left as Ray gave it
    assert project_relative("", tmp_path) == ""


def test_experiment_is_tagged_for_the_training_runs_view(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from dynadapter.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, get_or_create_experiment

    assert (EXPERIMENT_KIND_TAG, EXPERIMENT_KIND) == ("mlflow.experimentKind", "custom_model_development")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp_id = get_or_create_experiment(client, "fresh")
    assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    old = client.create_experiment("older")  # made before the tag existed: tagged when next used
    assert get_or_create_experiment(client, "older") == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    mine = client.create_experiment("mine", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    get_or_create_experiment(client, "mine")  # a kind the user chose is kept
    assert client.get_experiment(mine).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_store_and_vtab_import_one_way():
    store = _imports(REPO / "dynadapter/data/store.py")
    assert "dynadapter.data.vtab" not in store and "dynadapter.data.vtab_tasks" in store
    assert "dynadapter.data.store" in _imports(REPO / "dynadapter/data/vtab.py")
    assert not {m for m in _imports(REPO / "dynadapter/data/vtab_tasks.py") if m.startswith("dynadapter")}
