"""The train and evaluate stages on a Ray cluster (issue 13.2), for real: a Ray head of our own on 127.0.0.1
(tests/ray_head.py) and the stages run as a user runs them, `python -m pipelines.train` / `pipelines.evaluate`
with RAY_ADDRESS naming the head. Each task x variant trains as its own Ray Train run (DeepSpeed worker,
ZeRO 0, fp32 on the CPU) and evaluation fans out one Ray task per model; the outputs must equal the local
run's (the same stages without RAY_ADDRESS: plain AdamW, no Ray) within float tolerance.

The head is stopped by PID (tests/ray_head.py). This module runs before the in-process `ray_session` exists
(conftest FIRST): two Ray instances on one machine confuse Ray Train's placement-group cleaner.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from ray_head import RAY, head_env, ray_head
from test_pipelines import tiny_params

ROOT = Path(__file__).resolve().parents[1]
STAGE_TIMEOUT = 600
WEIGHT_TOL = 1e-4  # DeepSpeed's engine vs plain AdamW, float32: the same update up to summation order

if not RAY.is_file():
    pytest.skip(f"no ray CLI next to {sys.executable}", allow_module_level=True)


def _stage(name: str, params: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", f"pipelines.{name}", "--params", str(params)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=STAGE_TIMEOUT)
    assert out.returncode == 0, f"{name} exited {out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-6000:]}"
    return out


def _params(root: Path, shared: Path) -> Path:
    params = tiny_params(root)
    params["base"]["paths"]["data"] = str(shared / "data")  # one prepared dataset for both runs
    params["train"]["epochs"] = 3
    params["train"]["ray"] = {"num_workers": 1, "cpus_per_worker": 1.0}
    params["train"]["deepspeed"] = {"zero_stage": 0, "precision": "fp32"}
    path = root / "params.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.slow
def test_train_and_evaluate_fan_out_over_a_ray_cluster_and_match_the_local_run(tmp_path):
    shared, here, cluster = tmp_path / "shared", tmp_path / "here", tmp_path / "cluster"
    local_params, cluster_params = _params(here, shared), _params(cluster, shared)
    local_env = {k: v for k, v in head_env("").items() if not k.startswith("RAY_")}  # no cluster in sight
    for stage in ("prepare", "pretrain"):
        _stage(stage, local_params, local_env)
    shutil.copytree(here / "models" / "backbone", cluster / "models" / "backbone")  # the same frozen backbone

    for stage in ("train", "evaluate"):
        out = _stage(stage, local_params, local_env)
        assert "Ray cluster" not in out.stdout  # without an address: here, without Ray

    with ray_head(tmp_path, num_cpus=2) as head:
        env = {**head_env(head["token"]), "RAY_ADDRESS": head["gcs"]}
        trained = _stage("train", cluster_params, env)
        evaluated = _stage("evaluate", cluster_params, env)
        # Ray Train kept each run's epoch checkpoints under train.storage's default
        runs = sorted(p.name for p in (cluster / "models/checkpoints/train-ray").iterdir() if p.is_dir())
    # one folder per run, named after what it computes (<task>-<variant>-<digest>, dynadapter.cluster.FitJob)
    assert [r.rsplit("-", 1)[0] for r in runs] == ["digits-baseline", "digits-dyn", "size-baseline", "size-dyn"], runs
    assert all(len(r.rsplit("-", 1)[1]) == 12 for r in runs), runs
    assert "4 Ray Train runs submitted" in trained.stdout, trained.stdout[-3000:]
    assert "4 evaluations fan out over the Ray cluster" in evaluated.stdout, evaluated.stdout[-3000:]

    # the same models: every task x variant, within float tolerance of the local weights
    for task in ("size", "digits"):
        for variant in ("dyn", "baseline"):
            a = load_file(str(here / "models/tasks" / task / variant / "adapter.safetensors"))
            b = load_file(str(cluster / "models/tasks" / task / variant / "adapter.safetensors"))
            assert a.keys() == b.keys() and any(k.startswith("heads.") for k in a)
            diff = max(float((a[k] - b[k]).abs().max()) for k in a)
            print(f"{task}/{variant}: max |w(cluster) - w(here)| = {diff:.2e}")
            assert diff < WEIGHT_TOL, (task, variant, diff)

    m_here = json.loads((here / "outputs/train/metrics.json").read_text())
    m_cluster = json.loads((cluster / "outputs/train/metrics.json").read_text())
    assert (m_here["ran_on"], m_cluster["ran_on"]) == ("local", "ray")
    for task, variants in m_here["tasks"].items():
        for variant, row in variants.items():
            other = m_cluster["tasks"][task][variant]
            assert other["best_epoch"] == row["best_epoch"]
            assert other["val_acc_last"] == pytest.approx(row["val_acc_last"], abs=1e-9)
            assert other["trainable_params"] == row["trainable_params"]

    # the same evaluation: thresholds, test accuracy and MACs per task (24 val / 40 test images)
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
    assert set(models) == {"size", "digits"}
    assert all(models[t]["test_accuracy"] == p_cluster[t]["dyn"]["test"]["accuracy"] for t in models)
