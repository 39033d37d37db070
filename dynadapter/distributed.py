"""Ray Train runs outside Tune: one task's (or a trial's) training on `num_workers` data-parallel DeepSpeed
workers, the same worker loop a tune trial runs (`dynadapter.trial.train_worker`), its per-rank final state
read back. docs/distributed.md says what W workers compute and why it equals what 1 worker computes.

Ray is imported lazily; a Ray session must be running (`dynadapter.ray_session.init_ray`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dynadapter.config import RayConfig
from dynadapter.train.checkpoint import rank_file


def torch_trainer(worker, loop_config: dict, *, num_workers: int, worker_cpu: float, worker_gpu: float,
                  storage_path: str, name: str, max_failures: int = 0, checkpoints_to_keep: int = 2,
                  callbacks: list | None = None):
    """The `TorchTrainer` every Ray Train run of the project uses: `num_workers` ranks of `worker_cpu` CPUs
    (and `worker_gpu` GPUs: CUDA + NCCL when > 0), one intra-op thread per reserved CPU, per-epoch
    checkpoints under `storage_path/name`, resuming from the latest after a failure (or when a run of the
    same name and storage is started again)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    per_worker = {"CPU": worker_cpu} | ({"GPU": worker_gpu} if worker_gpu else {})
    return TorchTrainer(
        worker,
        train_loop_config={**loop_config, "threads": max(1, int(worker_cpu))},
        # use_gpu: Ray Train then builds an NCCL group and sets each worker's CUDA_VISIBLE_DEVICES, from which
        # `dynadapter.devices.worker_device` reads its own GPU
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=bool(worker_gpu),
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=checkpoints_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
    )


def how_many_fit(resources: Mapping[str, float], cpu: float, gpu: float = 0.0) -> int:
    """How many requests of `cpu` CPUs and `gpu` GPUs `resources` (e.g. `ray.cluster_resources()`) hold at once
    (0 when not even one fits)."""
    fits = math.floor(float(resources.get("CPU", 0)) / cpu + 1e-9)
    if gpu > 0:
        fits = min(fits, math.floor(float(resources.get("GPU", 0)) / gpu + 1e-9))
    return fits


def task_options(ray_cfg: RayConfig) -> dict[str, float]:
    """What each Ray task of a stage (e.g. one evaluation) asks Ray for: `ray_cfg`'s CPUs and GPUs per worker.
    Asking for the GPU is what lets the task use one (`dynadapter.devices.worker_device`)."""
    return {"num_cpus": ray_cfg.cpus_per_worker, "num_gpus": ray_cfg.gpus_per_worker}


def fit_trainer(worker, loop_config: dict, ray_cfg: RayConfig, *, storage_path: str, name: str,
                max_failures: int = 0, checkpoints_to_keep: int = 2):
    """Run a `torch_trainer` of `ray_cfg`'s workers to the end; its `ray.train.Result`, which must hold the
    run's last checkpoint (the worker's error is raised as it is)."""
    result = torch_trainer(worker, loop_config, num_workers=ray_cfg.num_workers, worker_cpu=ray_cfg.cpus_per_worker,
                           worker_gpu=ray_cfg.gpus_per_worker, storage_path=storage_path, name=name,
                           max_failures=max_failures, checkpoints_to_keep=checkpoints_to_keep).fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name!r} in {storage_path} reported no checkpoint")
    return result


def rank_states(result, ranks) -> list[Any]:
    """What `ranks` saved in the last checkpoint of a finished run (`fit_trainer`'s result)."""
    with result.checkpoint.as_directory() as d:
        return [torch.load(Path(d) / rank_file(r), map_location="cpu", weights_only=True) for r in ranks]


@dataclass
class DistributedRun:
    """A finished Ray Train run: every rank's final `TrialTrainer.state()` and the metrics reported per epoch."""

    states: list[dict[str, Any]]  # index = rank
    metrics: dict[str, Any] = field(default_factory=dict)  # the last epoch's report
    history: list[dict[str, Any]] = field(default_factory=list)  # every epoch's report, when Ray kept them
    path: str = ""

    def trainable_state(self, task: str, rank: int = 0) -> dict[str, torch.Tensor]:
        """The trained PETL + head weights (and buffers) of `task` on `rank`."""
        return self.states[rank]["tasks"][task]["model"]

    def mask_digests(self, task: str, rank: int = 0) -> list[str]:
        """One digest per optimizer step of the gradient masks `rank` drew (spec.record_masks)."""
        return self.states[rank]["tasks"][task]["mask_digests"]


def train_on_ray(spec, data: Mapping[str, Any], backbone_state: Mapping[str, torch.Tensor], ray_cfg: RayConfig, *,
                 storage_path: str | Path, name: str, max_failures: int = 0, checkpoints_to_keep: int = 2
                 ) -> DistributedRun:
    """Train `spec.tasks` (a `dynadapter.trial.TrialSpec`) for `spec.train['epochs']` epochs on
    `ray_cfg.num_workers` Ray Train workers, each with batch `spec.train['batch_size']`, through the DeepSpeed
    engine tune uses. `data`: {task: TuneTask-like (train, val, num_classes)}, shipped to the workers through
    the object store with the backbone weights. Rerunning the same `name` in the same `storage_path` resumes
    from the run's last epoch checkpoint (and returns at once if it had finished)."""
    import ray

    from dynadapter.ray_session import check_shared_storage, storage_uri
    from dynadapter.trial import train_worker

    storage = storage_uri(storage_path)
    check_shared_storage(storage, "storage_path")
    loop_config = {"spec": asdict(spec), "data": ray.put({t: data[t] for t in spec.tasks}),
                   "backbone": ray.put({k: v.contiguous() for k, v in backbone_state.items()})}
    result = fit_trainer(train_worker, loop_config, ray_cfg, storage_path=storage, name=name,
                         max_failures=max_failures, checkpoints_to_keep=checkpoints_to_keep)
    states = rank_states(result, range(ray_cfg.num_workers))
    try:
        df = result.metrics_dataframe
    except Exception:  # a run restored from storage may not have its progress file
        df = None
    history = df.to_dict("records") if df is not None else []
    return DistributedRun(states=states, metrics=dict(result.metrics or {}), history=history,
                          path=str(result.path))
