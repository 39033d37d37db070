"""The train and evaluate stages on a Ray cluster: every task x variant trains as its own Ray Train run (the
DeepSpeed workers tune trials use), the runs concurrently as far as the cluster's resources allow, and
evaluation fans out one Ray task per model. Without a cluster address the stages do not come here (no Ray).

What a run computes is what the local stage computes: the workers call `train_task` (the same model, seed,
data order, masks and epoch selection as `fit` on one machine), with `rank` / `world_size` from Ray Train,
so W workers at batch b/W train the model 1 worker at batch b trains (docs/distributed.md). Each epoch every
rank hands its `fit` checkpoint to Ray Train (`rank<r>.pt` in the epoch's checkpoint): a failed worker is
restarted from the last epoch, and rerunning a finished run of the same name and storage returns at once.

Ray is imported lazily; `init_ray` (dynadapter.tune) joins the cluster.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from dynadapter.config import BackboneConfig, ModelConfig, RayConfig, TrainConfig

DRIVER_CPU = 0.01  # a job's driver task only waits on its TorchTrainer (as tune's trial trainables do)


def cluster_address(address: str | None) -> str | None:
    """The Ray cluster the train and evaluate stages fan out over: `train.ray.address`, else RAY_ADDRESS, else
    None (run here, without Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or None


@dataclass(frozen=True)
class FitJob:
    """One Ray Train run of the train stage: a task's model (a variant) trained with `train`'s settings."""

    name: str  # run name under the storage folder: <task>-<variant>[-train800val200]
    task: str
    backbone: dict  # BackboneConfig dump
    model: dict  # ModelConfig dump
    train: dict  # TrainConfig dump (ray: resources, deepspeed: the engine)
    seed: int
    trainval: bool = False  # the standard protocol's final fit: train800 ∪ val200, last epoch kept


@dataclass
class FitOutcome:
    """What a finished run returns to the driver: rank 0's `fit` checkpoint (history, selected epoch and its
    weights) and the run's wall time."""

    job: FitJob
    checkpoint: dict[str, Any]
    seconds: float

    @property
    def best_epoch(self) -> int:
        return int(self.checkpoint["best"]["epoch"])

    def best_state(self) -> dict[str, torch.Tensor]:
        return self.checkpoint["best"]["state"]

    @property
    def history(self) -> list[dict[str, Any]]:
        return list(self.checkpoint["history"])


def fit_worker(config: dict) -> None:
    """Ray Train `train_loop_per_worker`: `train_task` on this rank's shard, resuming from the run's latest
    epoch checkpoint; every epoch each rank reports its `fit` checkpoint file."""
    import ray
    import ray.train

    from dynadapter.adapt import train_task, trainval_data
    from dynadapter.distributed import rank_file
    from dynadapter.train import flatten_metrics
    from dynadapter.train.deepspeed import deepspeed_strategy

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    job = FitJob(**config["job"])
    data = ray.get(config["data"])
    data = trainval_data(data) if job.trainval else data
    train_cfg = TrainConfig.model_validate(job.train)
    work = Path(tempfile.mkdtemp(prefix="dynadapter-fit-"))
    local = work / rank_file(rank)
    try:
        restored = ray.train.get_checkpoint()
        if restored is not None:
            with restored.as_directory() as d:
                shutil.copy(Path(d) / rank_file(rank), local)

        def report(epoch: int, metrics: dict) -> None:
            with tempfile.TemporaryDirectory() as d:
                shutil.copy(local, Path(d) / rank_file(rank))
                ray.train.report(flatten_metrics(metrics), checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_dir_name=f"epoch_{epoch:04d}")
            if rank == 0:
                val = f", val acc (last exit) {metrics['val_acc_last']:.4f}" if "val_acc_last" in metrics else ""
                print(f"train {job.name}: epoch {epoch}/{train_cfg.epochs}{val}", flush=True)

        train_task(job.task, data, BackboneConfig.model_validate(job.backbone),
                   ModelConfig.model_validate(job.model), train_cfg, ray.get(config["backbone"]), seed=job.seed,
                   checkpoint_path=local, progress=False, on_epoch_end=report,
                   strategy=deepspeed_strategy(train_cfg.deepspeed), rank=rank, world_size=world)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fit_on_ray(job: FitJob, data_ref, backbone_ref, *, storage_path: str, max_failures: int = 1) -> FitOutcome:
    """Run `job` as one Ray Train run (train.ray: workers and their resources) and return rank 0's result."""
    from dynadapter.distributed import fit_trainer, rank_states

    start = time.perf_counter()
    result = fit_trainer(fit_worker, {"job": asdict(job), "data": data_ref, "backbone": backbone_ref},
                         TrainConfig.model_validate(job.train).ray, storage_path=storage_path, name=job.name,
                         max_failures=max_failures)
    return FitOutcome(job, rank_states(result, [0])[0], time.perf_counter() - start)


def _run_jobs(jobs: list[FitJob], refs: dict, storage_path: str, max_failures: int) -> list[FitOutcome]:
    """One task x variant on the cluster: its run, and under the standard protocol the train800val200 run for
    the epoch count the first one chose on val. `refs`: the data's and backbone's object refs (in a dict, so
    Ray hands them on as refs instead of resolving them here)."""
    data_ref, backbone_ref = refs["data"], refs["backbone"]
    first = fit_on_ray(jobs[0], data_ref, backbone_ref, storage_path=storage_path, max_failures=max_failures)
    outcomes = [first]
    for job in jobs[1:]:
        train = {**job.train, "epochs": first.best_epoch}
        outcomes.append(fit_on_ray(replace(job, train=train), data_ref, backbone_ref, storage_path=storage_path,
                                   max_failures=max_failures))
    return outcomes


def train_jobs_on_ray(jobs: Sequence[list[FitJob]], data: Mapping[str, Any], backbone_state: Mapping[str, torch.Tensor],
                      *, storage_path: str | Path, max_failures: int = 1, stdout=sys.stdout
                      ) -> Iterator[list[FitOutcome]]:
    """Start every chain of jobs at once (each a Ray task that waits on its runs; Ray queues the workers the
    cluster cannot place yet) and yield their outcomes in the order of `jobs`. `data`: {task: TaskData}."""
    import ray

    from dynadapter.tune import _local_path

    storage = _local_path(storage_path)
    backbone_ref = ray.put({k: v.contiguous() for k, v in backbone_state.items()})
    data_refs = {task: ray.put(d) for task, d in data.items()}
    remote = ray.remote(num_cpus=DRIVER_CPU, max_retries=0)(_run_jobs)
    refs = [remote.remote(chain, {"data": data_refs[chain[0].task], "backbone": backbone_ref}, storage, max_failures)
            for chain in jobs]
    print(f"train: {len(refs)} Ray Train runs submitted to the cluster", file=stdout, flush=True)
    for ref in refs:
        yield ray.get(ref)


def _call(fn: Callable, threads: int, args: tuple, kwargs: dict):
    torch.set_num_threads(threads)
    return fn(*args, **kwargs)


def map_on_ray(fn: Callable, calls: Sequence[tuple[tuple, dict]], ray_cfg: RayConfig) -> Iterator[Any]:
    """`fn(*args, **kwargs)` for every (args, kwargs) in `calls`, each a Ray task holding cpus_per_worker CPUs
    and gpus_per_worker GPUs, all submitted at once; results yielded in the order of `calls`."""
    import ray

    threads = max(1, int(ray_cfg.cpus_per_worker))
    remote = ray.remote(_call).options(num_cpus=ray_cfg.cpus_per_worker, num_gpus=ray_cfg.gpus_per_worker,
                                       max_retries=1)
    refs = [remote.remote(fn, threads, args, kwargs) for args, kwargs in calls]
    for ref in refs:
        yield ray.get(ref)


def fit_jobs(task: str, variant: str, backbone_cfg: BackboneConfig, model_cfg: ModelConfig, train_cfg: TrainConfig,
             *, seed: int, standard: bool) -> list[FitJob]:
    """The runs one task x variant takes: one, or two under the standard protocol."""
    job = FitJob(name=f"{task}-{variant}", task=task, backbone=backbone_cfg.model_dump(mode="json"),
                 model=model_cfg.model_dump(mode="json"), train=train_cfg.model_dump(mode="json"), seed=seed)
    return [job, replace(job, name=f"{job.name}-train800val200", trainval=True)] if standard else [job]
