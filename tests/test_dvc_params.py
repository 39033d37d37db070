"""Each DVC stage depends on exactly the params keys it reads: in a real git + DVC copy of the project (its
dvc.yaml, a tiny params.yaml), with every stage recorded as done (`dvc commit` of stand-in outputs: the contract
under test is dvc.yaml's, not the stages' work), change one key and ask `dvc status` which stages it touches.
What would rerun is those stages plus everything downstream of them in the DAG. The real `dvc repro` of a
budget change (no stage that trains runs) is in tests/test_dvc_pipeline.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers import dvc, dvc_project, git
from test_pipelines import tiny_params

ALL = {"prepare", "pretrain", "tune", "train", "evaluate", "register"}
TRAINING = {"pretrain", "tune", "train"}

# (key, new value, stages `dvc status` lists, stages that would rerun)
CASES = [
    ("base.budget", 0.3, {"evaluate", "register"}, {"evaluate", "register"}),
    ("base.mlflow.tracking_uri", "sqlite:///team.db", {"evaluate", "register"}, {"evaluate", "register"}),
    ("base.mlflow.experiment", "team", {"evaluate", "register"}, {"evaluate", "register"}),
    ("evaluate.throughput_repeats", 3, {"evaluate"}, {"evaluate", "register"}),
    ("register.alias", "prod", {"register"}, {"register"}),
    ("tune.budget", 0.3, {"tune"}, {"tune", "train", "evaluate", "register"}),
    ("base.seed", 1, {"prepare", "pretrain", "tune", "train", "evaluate"}, ALL),
    ("base.model.petl.method", "lora", {"tune", "train", "evaluate"}, {"tune", "train", "evaluate", "register"}),
    ("base.model.exits", [2, 4], {"tune", "train", "evaluate"}, {"tune", "train", "evaluate", "register"}),
    ("train.lr", 0.001, {"tune", "train"}, {"tune", "train", "evaluate", "register"}),
]


def _stages(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.yaml").read_text())["stages"]


def _out_path(out) -> str:
    return next(iter(out)) if isinstance(out, dict) else out


def downstream(root: Path, stages: set[str]) -> set[str]:
    """`stages` and every stage that depends, directly or not, on one of their outputs."""
    spec = _stages(root)
    outs = {name: {_out_path(o) for o in s.get("outs", [])} for name, s in spec.items()}
    found = set(stages)
    while True:
        more = {name for name, s in spec.items() if name not in found
                and any(d in outs[f] for f in found for d in s.get("deps", []))}
        if not more:
            return found
        found |= more


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The project with every stage's outputs present and committed to dvc.lock, so `dvc status` is clean."""
    root = dvc_project(tmp_path_factory.mktemp("params"), tiny_params(Path(".")))
    for stage in _stages(root).values():
        for out in stage.get("outs", []):
            path = root / _out_path(out)
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}\n")
            else:
                path.mkdir(parents=True, exist_ok=True)
                (path / "stand_in.txt").write_text(path.name)
    done = dvc(["commit", "-f", "-q"], root)
    assert done.returncode == 0, done.stdout + done.stderr
    git(["add", "-A"], root)
    git(["commit", "-qm", "all stages recorded"], root)
    status = dvc(["status", "--json"], root)
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout + status.stderr
    return root


def _set(tree: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[last] = value


@pytest.mark.parametrize("key,value,listed,rerun", CASES, ids=[c[0] for c in CASES])
def test_a_params_key_touches_only_the_stages_that_read_it(recorded, key, value, listed, rerun):
    params = yaml.safe_load((recorded / "params.yaml").read_text())
    _set(params, key, value)
    (recorded / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        status = dvc(["status", "--json"], recorded)
        assert status.returncode == 0, status.stderr
        changed = {name.split(":")[-1] for name in json.loads(status.stdout)}
    finally:
        git(["checkout", "params.yaml"], recorded)
    assert changed == listed
    assert downstream(recorded, changed) == rerun
    if key.startswith(("base.budget", "base.mlflow", "evaluate.", "register.")):
        assert not rerun & TRAINING  # one trained model serves every budget and every tracking server
