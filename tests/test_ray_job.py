"""The README's cluster instructions, for real: a Ray head on 127.0.0.1 (its own processes, started from this
venv's `ray` CLI) and, from the project root, exactly

    ray job submit --address http://127.0.0.1:<dashboard port> --working-dir . -- python -m pipelines.prepare ...

The job must SUCCEED, write the outputs configured in a tiny params file (absolute paths, so the job writes
where the test reads, not into Ray's unpacked copy of the project), and the package Ray uploaded must hold the
code but none of .venv, data, models or .git (kept out by Ray's default excludes, .git and .venv, and
by the project's .gitignore files, which Ray honours).

The head is separate from the in-process Ray of conftest's `ray_session` (own temp dir, every port free-picked);
it is stopped by signalling the `ray start --block` process we started, then by PID for anything left that
runs under our temp dir. Never `ray stop`: it would kill every Ray on the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import uuid
from pathlib import Path

import pytest
import yaml

from ray_head import RAY, as_text, head_env, http_json
from ray_head import ray_head as start_head
from test_pipelines import tiny_params

ROOT = Path(__file__).resolve().parents[1]
JOB_TIMEOUT = 420
if not RAY.is_file():
    pytest.skip(f"no ray CLI next to {sys.executable}", allow_module_level=True)


@pytest.fixture
def ray_head(tmp_path):
    with start_head(tmp_path) as head:
        yield head


def test_ray_job_submit_runs_a_stage_from_the_project_root(ray_head, tmp_path):
    address, env = ray_head["address"], head_env(ray_head["token"])
    params = tiny_params(tmp_path)  # absolute paths under tmp_path
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    sid = f"prepare-{uuid.uuid4().hex[:8]}"

    start = time.monotonic()
    cmd = [str(RAY), "job", "submit", "--address", address, "--submission-id", sid, "--working-dir", ".",
           "--", "python", "-m", "pipelines.prepare", "--params", str(params_file)]
    try:
        submit = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired as err:
        submit = subprocess.CompletedProcess(cmd, "timeout", as_text(err.stdout), as_text(err.stderr))
    elapsed = time.monotonic() - start

    def logs() -> str:
        try:
            out = subprocess.run([str(RAY), "job", "logs", "--address", address, sid], env=env,
                                 capture_output=True, text=True, timeout=60)
            job_logs = out.stdout + out.stderr
        except subprocess.TimeoutExpired:
            job_logs = "(ray job logs timed out)"
        return (f"submit rc={submit.returncode} after {elapsed:.0f}s\n--- submit stdout\n{submit.stdout[-4000:]}"
                f"\n--- submit stderr\n{submit.stderr[-4000:]}\n--- ray job logs {sid}\n{job_logs[-6000:]}"
                f"\n--- head\n{ray_head['log'].read_text()[-3000:]}")

    try:
        info = http_json(f"{address}/api/jobs/{sid}", ray_head["token"])
    except (urllib.error.URLError, OSError, ValueError) as err:
        info = {"status": f"unknown ({err!r})"}
    assert info["status"] == "SUCCEEDED", f"job {info['status']}: {info.get('message')}\n{logs()}"
    assert submit.returncode == 0, logs()
    assert "prepare: done" in submit.stdout, logs()  # the stage's own log line, streamed back

    # the stage's outputs, at the absolute paths of the tiny params
    sizes, paths = params["prepare"]["embedded"], params["base"]["paths"]
    outputs = Path(paths["outputs"]) / "prepare"
    summary = json.loads((outputs / "summary.json").read_text())
    assert summary["source"] == "embedded" and set(summary["tasks"]) == set(params["base"]["tasks"])
    for task in params["base"]["tasks"]:
        manifest = json.loads((Path(paths["data"]) / task / "manifest.json").read_text())
        assert manifest["counts"] == {split: sizes[split] for split in ("train", "val", "test")}, manifest
        assert summary["tasks"][task]["counts"] == manifest["counts"]
        assert (Path(paths["data"]) / task / "data.parquet").stat().st_size > 0
    cfg = yaml.safe_load((outputs / "prepare_config.yaml").read_text())
    assert cfg["prepare"]["embedded"] == {**cfg["prepare"]["embedded"], **sizes}

    # what `--working-dir .` uploaded: the code, none of the venv, data, models, outputs or git history
    pkgs = [p for p in (ray_head["temp_dir"] / "session_latest/runtime_resources/working_dir_files").iterdir()
            if p.is_dir() and p.name.startswith("_ray_pkg_")]
    assert len(pkgs) == 1, pkgs
    pkg = pkgs[0]
    for needed in ("pipelines/prepare.py", "dynadapter/config.py", "params.yaml", "pyproject.toml"):
        assert (pkg / needed).is_file(), needed
    for kept_out in (".venv", "data", "models", ".git", "mlruns", "mlflow.db", ".dvc/cache"):  # outputs/: small, git-tracked
        assert not (pkg / kept_out).exists(), f"{kept_out} was uploaded with the working dir"
    size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
    assert size < 20 * 2**20, f"working dir upload is {size / 2**20:.1f} MiB"


def relative_params(root: Path) -> dict:
    """tiny_params with every user path relative to `root` (where the user runs the submit command)."""
    params = tiny_params(root)
    params["base"]["paths"] = {k: k for k in ("data", "models", "outputs")}
    params["base"]["mlflow"]["tracking_uri"] = "sqlite:///mlflow.db"
    params["base"]["tasks"] = ["size"]  # one task: the stages' fan-out is tests/test_cluster.py's business
    return params


def test_resolve_paths_makes_user_paths_absolute(tmp_path):
    from pipelines.submit import resolve_paths

    raw = relative_params(tmp_path)
    raw["base"]["backbone"]["checkpoint"] = "models/pretrained/ViT-B_16.npz"
    raw["train"]["storage"] = "s3://bucket/train"  # a URI stays as it is
    raw["tune"]["storage"] = "/shared/tune"  # so does an absolute path
    out = resolve_paths(raw, tmp_path)
    assert out["base"]["paths"] == {k: str(tmp_path / k) for k in ("data", "models", "outputs")}
    assert out["base"]["backbone"]["checkpoint"] == str(tmp_path / "models/pretrained/ViT-B_16.npz")
    assert out["base"]["mlflow"]["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert out["train"]["storage"] == "s3://bucket/train" and out["tune"]["storage"] == "/shared/tune"
    assert raw["base"]["paths"]["data"] == "data"  # the caller's dict is left alone
    # the preset's relative checkpoint, which pointed inside Ray's unpacked copy of the project
    preset = yaml.safe_load((ROOT / "presets" / "vtab1k_vitb16.yaml").read_text())
    resolved = resolve_paths(preset, tmp_path)
    assert resolved["base"]["backbone"]["checkpoint"] == str(tmp_path / "models/pretrained/ViT-B_16.npz")
    assert resolved["prepare"]["vtab_root"] == str(tmp_path / "data/vtab-1k")


@pytest.mark.slow
def test_the_whole_pipeline_runs_as_a_submitted_job(ray_head, tmp_path):
    """`python -m pipelines.submit` from a user's folder whose params name relative paths: one job runs prepare,
    pretrain, train, evaluate and register on the head; the outputs land in the user's folder (paths resolved
    before submission), train and evaluate fan out over the cluster (RAY_ADDRESS is set inside a job)."""
    address, env = ray_head["address"], head_env(ray_head["token"])
    user = tmp_path / "user"
    user.mkdir()
    (user / "params.yaml").write_text(yaml.safe_dump(relative_params(user)))
    stages = ["prepare", "pretrain", "train", "evaluate", "register"]
    cmd = [sys.executable, "-m", "pipelines.submit", "--address", address, "--params", "params.yaml",
           "--timeout", str(JOB_TIMEOUT), *stages]
    try:
        out = subprocess.run(cmd, cwd=user, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT + 60)
        text = out.stdout[-8000:] + "\n--- stderr\n" + out.stderr[-4000:]
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"submit timed out:\n{as_text(err.stdout)[-8000:]}\n{ray_head['log'].read_text()[-3000:]}")
    assert out.returncode == 0, text
    assert "SUCCEEDED" in out.stdout, text
    for stage in stages:
        assert f"submit: stage {stage} done" in out.stdout, text
    assert "Ray Train runs submitted to the cluster" in out.stdout, text  # train fanned out over the cluster
    assert "fan out over the Ray cluster" in out.stdout, text  # and so did evaluate
    metrics = json.loads((user / "outputs" / "evaluate" / "metrics.json").read_text())
    assert 0 <= metrics["dyn_test_accuracy"] <= 1
    assert (user / "mlflow.db").is_file() and (user / "models" / "tasks" / "size" / "dyn").is_dir()
    decisions = json.loads((user / "outputs" / "register" / "decisions.json").read_text())
    assert decisions["size"]["promoted"] is True, decisions  # the first version of the model: champion
