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
import shutil
import subprocess
import sys
import time
import urllib.error
import uuid
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from ray_head import RAY, as_text, head_env, http_json
from ray_head import ray_head as start_head
from test_pipelines import tiny_params

ROOT = Path(__file__).resolve().parents[1]
JOB_TIMEOUT = 420
STAGE_TIMEOUT = 600
WEIGHT_TOL = 1e-4  # DeepSpeed's engine vs plain AdamW, float32: the same update up to summation order
if not RAY.is_file():
    pytest.skip(f"no ray CLI next to {sys.executable}", allow_module_level=True)


def _uploaded(head) -> list[Path]:
    """The working-dir packages the head has unpacked so far."""
    root = head["temp_dir"] / "session_latest/runtime_resources/working_dir_files"
    return [p for p in root.iterdir() if p.is_dir() and p.name.startswith("_ray_pkg_")] if root.is_dir() else []


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """One head for the module's jobs (starting and stopping one costs about 10 s)."""
    with start_head(tmp_path_factory.mktemp("head")) as head:
        yield head


def test_ray_job_submit_runs_a_stage_from_the_project_root(ray_head, tmp_path):
    address, env = ray_head["address"], head_env(ray_head["token"])
    params = tiny_params(tmp_path)  # absolute paths under tmp_path
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    sid = f"prepare-{uuid.uuid4().hex[:8]}"
    uploaded_before = _uploaded(ray_head)

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
    pkgs = [p for p in _uploaded(ray_head) if p not in uploaded_before]  # the head serves the module's jobs
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
    params["base"]["tasks"] = ["size"]  # one task, two variants: two Ray Train runs and two evaluations fan out
    params["train"]["epochs"] = 3
    params["train"]["ray"] = {"num_workers": 1, "cpus_per_worker": 1.0}
    params["train"]["deepspeed"] = {"zero_stage": 0, "precision": "fp32"}
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
def test_the_whole_pipeline_runs_as_a_submitted_job_and_matches_the_local_run(ray_head, tmp_path):
    """`python -m pipelines.submit` from a user's folder whose params name relative paths: one job runs prepare,
    pretrain, train, evaluate and register on the head; the outputs land in the user's folder (paths resolved
    before submission), train and evaluate fan out over the cluster (RAY_ADDRESS is set inside a job: each
    task x variant trains as its own Ray Train run, DeepSpeed worker, ZeRO 0, fp32 on the CPU, and evaluation
    fans out one Ray task per model). Then `python -m pipelines.train` / `pipelines.evaluate` run here without
    Ray (plain AdamW) on the job's prepared data and backbone: the outputs must equal the cluster's within float
    tolerance, so where train and evaluate run does not change what they compute."""
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
    assert "2 Ray Train runs submitted to the cluster" in out.stdout, text  # train fanned out over the cluster
    assert "2 evaluations fan out over the Ray cluster" in out.stdout, text  # and so did evaluate
    metrics = json.loads((user / "outputs" / "evaluate" / "metrics.json").read_text())
    assert 0 <= metrics["dyn_test_accuracy"] <= 1
    assert (user / "mlflow.db").is_file() and (user / "models" / "tasks" / "size" / "dyn").is_dir()
    decisions = json.loads((user / "outputs" / "register" / "decisions.json").read_text())
    assert decisions["size"]["promoted"] is True, decisions  # the first version of the model: champion
    _matches_the_local_run(user, tmp_path / "here")


def _matches_the_local_run(cluster: Path, here: Path) -> None:
    """Train and evaluate in `here`, without Ray, on `cluster`'s prepared data and frozen backbone, with
    `cluster`'s params; the models, their training records and their evaluation must be `cluster`'s."""
    params = yaml.safe_load((cluster / "params.yaml").read_text())
    params["base"]["paths"] = {k: str(here / k) for k in ("models", "outputs")} | {"data": str(cluster / "data")}
    params["base"]["mlflow"]["tracking_uri"] = f"sqlite:///{here / 'mlflow.db'}"
    here.mkdir()
    (here / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(cluster / "models" / "backbone", here / "models" / "backbone")  # the same frozen backbone
    local_env = {k: v for k, v in head_env("").items() if not k.startswith("RAY_")}  # no cluster in sight
    for stage in ("train", "evaluate"):
        out = subprocess.run([sys.executable, "-m", f"pipelines.{stage}", "--params", str(here / "params.yaml")],
                             cwd=ROOT, env=local_env, capture_output=True, text=True, timeout=STAGE_TIMEOUT)
        assert out.returncode == 0, f"{stage} exited {out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-6000:]}"
        assert "Ray cluster" not in out.stdout  # without an address: here, without Ray

    # Ray Train kept each run's epoch checkpoints under train.storage's default, one folder per run, named
    # after what it computes (<task>-<variant>-<digest>, dynadapter.cluster.FitJob)
    runs = sorted(p.name for p in (cluster / "models/checkpoints/train-ray").iterdir() if p.is_dir())
    assert [r.rsplit("-", 1)[0] for r in runs] == ["size-baseline", "size-dyn"], runs
    assert all(len(r.rsplit("-", 1)[1]) == 12 for r in runs), runs

    # the same models: every task x variant, within float tolerance of the local weights
    for variant in ("dyn", "baseline"):
        a = load_file(str(here / "models/tasks/size" / variant / "adapter.safetensors"))
        b = load_file(str(cluster / "models/tasks/size" / variant / "adapter.safetensors"))
        assert a.keys() == b.keys() and any(k.startswith("heads.") for k in a)
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        print(f"size/{variant}: max |w(cluster) - w(here)| = {diff:.2e}")
        assert diff < WEIGHT_TOL, (variant, diff)

    m_here = json.loads((here / "outputs/train/metrics.json").read_text())
    m_cluster = json.loads((cluster / "outputs/train/metrics.json").read_text())
    assert (m_here["ran_on"], m_cluster["ran_on"]) == ("local", "ray")
    for task, variants in m_here["tasks"].items():
        for variant, row in variants.items():
            other = m_cluster["tasks"][task][variant]
            assert other["best_epoch"] == row["best_epoch"]
            assert other["val_acc_last"] == pytest.approx(row["val_acc_last"], abs=1e-9)
            assert other["trainable_params"] == row["trainable_params"]

    # the same evaluation: thresholds, test accuracy and MACs (24 val / 40 test images)
    e_here = json.loads((here / "outputs/evaluate/metrics.json").read_text())
    e_cluster = json.loads((cluster / "outputs/evaluate/metrics.json").read_text())
    for key in ("dyn_test_accuracy", "dyn_test_macs_fraction", "baseline_test_accuracy", "dyn_val_accuracy"):
        assert e_cluster[key] == pytest.approx(e_here[key], abs=1e-9), key
    p_here = json.loads((here / "outputs/evaluate/per_task.json").read_text())
    p_cluster = json.loads((cluster / "outputs/evaluate/per_task.json").read_text())
    for task in p_here:
        a, b = p_here[task]["dyn"], p_cluster[task]["dyn"]
        assert b["calibration"]["thresholds"] == pytest.approx(a["calibration"]["thresholds"], abs=1e-4)
        assert b["test"]["exit_fraction"] == a["test"]["exit_fraction"]
    # the driver logged what the workers computed: a model per task, served from the cluster run's records
    models = json.loads((cluster / "outputs/evaluate/models.json").read_text())
    assert set(models) == {"size"}
    assert all(models[t]["test_accuracy"] == p_cluster[t]["dyn"]["test"]["accuracy"] for t in models)
