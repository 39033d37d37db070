"""What the stages ask of a cluster, decided before anything runs: GPU requests under the ViT-B/16 preset, one
NCCL rank per GPU, tune on an autoscaling cluster, run folders keyed by what they compute, resume keys that
ignore where a sweep runs, and checkpoint storage every node must see (two virtual nodes)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from dynadapter.config import RayConfig, TrainConfig, load_params

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "presets" / "vtab1k_vitb16.yaml"


def preset():
    return load_params(PRESET)


# ------------------------------------------------------------------------------------------ GPU requests


def test_the_preset_asks_ray_for_a_gpu_in_tune_train_and_evaluate():
    """Under the ViT-B/16 preset every Ray Train run (tune trials, train runs) and every evaluate task requests
    a GPU. On the old preset train.ray kept gpus_per_worker 0: train and evaluate ran outside Ray's accounting."""
    from dynadapter.distributed import task_options, torch_trainer
    from dynadapter.tune import plan_resources

    params = preset()
    trial = plan_resources({"CPU": 16.0, "GPU": 2.0}, params.tune.ray)
    assert trial.worker_gpu == 1.0 and trial.max_concurrent == 2  # one trial per GPU
    for ray_cfg in (params.tune.ray, params.train.ray):
        trainer = torch_trainer(lambda cfg: None, {}, num_workers=ray_cfg.num_workers,
                                worker_cpu=ray_cfg.cpus_per_worker, worker_gpu=ray_cfg.gpus_per_worker,
                                storage_path="/tmp", name="x")
        scaling = trainer.scaling_config
        assert scaling.use_gpu and scaling.resources_per_worker["GPU"] == 1.0
    assert task_options(params.train.ray)["num_gpus"] == 1.0  # evaluate's Ray tasks (dynadapter.cluster.map_on_ray)


def test_a_train_run_asks_for_the_gpus_of_train_ray(monkeypatch):
    """`fit_on_ray` (one train-stage run) hands train.ray's GPU request to Ray Train (spied at TorchTrainer)."""
    import ray.train.torch

    from dynadapter.cluster import fit_jobs, fit_on_ray

    seen = []

    class Stop(Exception):
        pass

    def spy(self, *args, scaling_config=None, **kwargs):
        seen.append(scaling_config)
        raise Stop

    monkeypatch.setattr(ray.train.torch.TorchTrainer, "__init__", spy)
    params = preset()
    job = fit_jobs("cifar", "dyn", params.base.backbone, params.base.model, params.train, seed=0,
                   standard=False)[0]
    with pytest.raises(Stop):
        fit_on_ray(job, None, None, storage_path="/tmp/x")
    assert seen[0].use_gpu and seen[0].resources_per_worker == {"CPU": 4.0, "GPU": 1.0}


@pytest.mark.parametrize("workers, gpus, ok", [
    (1, 0.5, True),  # trials or evaluations share a GPU: fine, one rank each
    (2, 1.0, True), (4, 2.0, True), (2, 0.0, True),
    (2, 0.5, False),  # two ranks of one NCCL group on one GPU: NCCL refuses
    (3, 1.5, False),
])
def test_several_workers_need_whole_gpus(workers, gpus, ok):
    if ok:
        RayConfig(num_workers=workers, gpus_per_worker=gpus)
    else:
        with pytest.raises(ValidationError, match="NCCL"):
            RayConfig(num_workers=workers, gpus_per_worker=gpus)


def test_tune_on_an_autoscaling_cluster_waits_for_gpu_nodes(capsys):
    """A cluster whose GPU nodes the autoscaler has not started yet: refused by default (with the key to set),
    planned for with tune.ray.autoscaling."""
    from dynadapter.tune import plan_resources

    cpu_only_now = {"CPU": 4.0}
    cfg = RayConfig(gpus_per_worker=1.0)
    with pytest.raises(ValueError, match="tune.ray.autoscaling"):
        plan_resources(cpu_only_now, cfg)
    planned = plan_resources(cpu_only_now, cfg.model_copy(update={"autoscaling": True}), max_concurrent=3)
    assert planned.max_concurrent == 3 and planned.worker_gpu == 1.0
    assert "waiting for the autoscaler" in capsys.readouterr().out
    assert plan_resources(cpu_only_now, cfg.model_copy(update={"autoscaling": True})).max_concurrent == 1


# ------------------------------------------------------------------------------------------ run identities


def test_train_runs_are_keyed_by_what_they_compute():
    """Two experiments sharing train.storage got one run folder (`<task>-<variant>`) on the old code."""
    from dynadapter.cluster import fit_jobs

    params = preset()

    def name(train=None, data="sha256:a", seed=0):
        return fit_jobs("cifar", "dyn", params.base.backbone, params.base.model, train or params.train, seed=seed,
                        standard=True, data=data)

    base = name()
    assert base[0].run_name.startswith("cifar-dyn-") and base[1].run_name.startswith("cifar-dyn-train800val200-")
    assert base[2].run_name.startswith("cifar-dyn-calibration-") and base[2].donor and not base[2].trainval
    assert len({j.run_name for j in base}) == 3 and len({j.digest for j in base}) == 3
    assert name(params.train.model_copy(update={"lr": 0.01}))[0].run_name != base[0].run_name
    assert name(data="sha256:b")[0].run_name != base[0].run_name
    assert name(seed=1)[0].run_name != base[0].run_name
    # where it runs is not what it computes: the same folder, so an interrupted run resumes
    moved = params.train.model_copy(update={"storage": "/elsewhere", "ray": RayConfig(cpus_per_worker=8)})
    assert name(moved)[0].run_name == base[0].run_name


def test_standard_runs_on_the_cluster_train_on_their_splits_and_the_final_schedule():
    """The train800val200 run and the threshold donor follow the selection run's epoch count with the warm-up
    scaled (adapt.final_schedule), each on its own splits: what `_run_jobs` hands each Ray Train run."""
    import torch

    from dynadapter.adapt import TaskData
    from dynadapter.cluster import fit_jobs

    params = preset()  # ViT-B/16: 10 warm-up epochs of 100
    select, final, donor = fit_jobs("cifar", "dyn", params.base.backbone, params.base.model, params.train, seed=0,
                                    standard=True)
    data = TaskData((torch.zeros(8, 3, 2, 2), torch.zeros(8)), (torch.ones(2, 3, 2, 2), torch.ones(2)), None, 2)
    assert select.data_of(data) is data
    assert final.data_of(data).train[0].shape[0] == 10 and final.data_of(data).val is None
    assert donor.data_of(data).train[0].shape[0] == 8 and donor.data_of(data).val is None
    for job in (final, donor):
        follow = job.after_selection(8)
        assert (follow.train["epochs"], follow.train["warmup_epochs"]) == (8, pytest.approx(0.8))
        assert follow.donor == job.donor and follow.trainval == job.trainval


def test_the_driver_refuses_a_checkpoint_of_another_run():
    from dynadapter.cluster import fit_jobs
    from dynadapter.train import CheckpointMismatchError

    params = preset()
    job = fit_jobs("cifar", "dyn", params.base.backbone, params.base.model, params.train, seed=0,
                   standard=False)[0]
    own = {"run": {"config": TrainConfig.model_validate(job.train).model_dump(mode="json"), "seed": 0}}
    job.check(own, "here")
    other = {"run": {**own["run"], "config": {**own["run"]["config"], "lr": 0.5}}}
    with pytest.raises(CheckpointMismatchError, match="config differ"):
        job.check(other, "here")
    with pytest.raises(CheckpointMismatchError, match="seed differ"):
        job.check({"run": {**own["run"], "seed": 3}}, "here")


def test_moving_tune_storage_or_resources_keeps_the_sweep_name(tmp_path):
    """Resuming an interrupted sweep looks it up by name: the old name hashed tune.storage and resources."""
    from pipelines.tune import experiment_name

    params = preset()
    same = params.model_copy(deep=True)
    same.tune.storage = str(tmp_path / "moved")
    same.tune.ray = RayConfig(num_workers=1, cpus_per_worker=8.0, gpus_per_worker=1.0)
    same.tune.max_concurrent = 3
    same.train.storage = str(tmp_path / "train")
    assert experiment_name(same) == experiment_name(params)
    other = params.model_copy(deep=True)
    other.tune.epochs = params.tune.epochs + 1
    assert experiment_name(other) != experiment_name(params)


# ------------------------------------------------------------------------------------------ two virtual nodes

TWO_NODES = textwrap.dedent("""
    import os, sys, tempfile
    import ray
    from ray.cluster_utils import Cluster
    from ray._private import ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = False  # loopback only (dynadapter.ray_session._loopback_node)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address)
    from dynadapter.ray_session import StorageNotSharedError, check_shared_storage
    storage = tempfile.mkdtemp()
    check_shared_storage(storage, "train.storage")  # virtual nodes share this filesystem: passes
    print("shared ok", flush=True)
    try:  # a node that cannot see the marker, as Ray's own storage test simulates: the marker gone
        check_shared_storage(storage, "train.storage", before_probe=lambda marker: marker.unlink())
        print("not refused")
    except StorageNotSharedError as err:
        print("refused:", err)
    assert not [p for p in os.listdir(storage) if p.startswith(".dynadapter-shared")]  # no marker left
    check_shared_storage("s3://bucket/x", "tune.storage")  # a URI: pyarrow's business, not checked
    # a Ray task that asked for the GPU gets it (CUDA_VISIBLE_DEVICES set by Ray: its cuda:0)
    from dynadapter.devices import worker_device
    print("gpu task:", ray.get(ray.remote(num_gpus=1, num_cpus=0)(lambda: str(worker_device())).remote()))
    ray.shutdown()
    cluster.shutdown()
""")


@pytest.mark.slow
def test_storage_every_node_must_see_on_two_virtual_nodes():
    with tempfile.TemporaryDirectory(prefix="r", dir="/tmp") as short:  # Ray's unix sockets live under it
        env = {**os.environ, "RAY_TMPDIR": short}
        env.pop("RAY_ADDRESS", None)
        out = subprocess.run([sys.executable, "-c", TWO_NODES], capture_output=True, text=True, timeout=300,
                             env=env, cwd=ROOT)
    text = out.stdout + out.stderr[-3000:]
    assert out.returncode == 0, text
    assert "shared ok" in out.stdout, text
    refused = [line for line in out.stdout.splitlines() if line.startswith("refused:")]
    assert refused and "train.storage" in refused[0] and "2 nodes" in refused[0], text
    assert "gpu task: cuda:0" in out.stdout, text


def test_code_is_shipped_to_the_cluster_unless_a_job_ships_it(monkeypatch):
    from dynadapter.ray_session import PROJECT_ROOT, code_runtime_env

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    env = code_runtime_env()
    assert env["py_modules"] == [str(PROJECT_ROOT / "dynadapter"), str(PROJECT_ROOT / "pipelines")]
    assert all((Path(m) / "__init__.py").is_file() for m in env["py_modules"])
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"working_dir": "."}}')
    assert code_runtime_env() is None
