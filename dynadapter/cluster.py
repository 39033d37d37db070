"""The train and evaluate stages on a Ray cluster: every task x variant trains as its own Ray Train run (the
DeepSpeed workers tune trials use), the runs concurrently as far as the cluster's resources allow, and
evaluation fans out one Ray task per model. Without a cluster address the stages do not come here (no Ray).

What a run computes is what the local stage computes: the workers call `train_task` (the same model, seed,
data order, masks and epoch selection as `fit` on one machine), with `rank` / `world_size` from Ray Train,
so W workers at batch b/W train the model 1 worker at batch b trains (docs/distributed.md). Each epoch every
rank hands its `fit` checkpoint to Ray Train (`rank<r>.pt` in the epoch's checkpoint): a failed worker is
restarted from the last epoch, and rerunning a finished run of the same name and storage returns at once.

Ray is imported lazily; `init_ray` (dynadapter.ray_session) joins the cluster.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from dynadapter.config import BackboneConfig, ModelConfig, RayConfig, TrainConfig, config_digest

DRIVER_CPU = 0.01  # a job's driver task only waits on its TorchTrainer (as tune's trial trainables do)


def cluster_address(address: str | None) -> str | None:
    """The Ray cluster the train and evaluate stages fan out over: `train.ray.address`, else RAY_ADDRESS, else
    None (run here, without Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or None


@dataclass(frozen=True)
class FitJob:
    """One Ray Train run of the train stage: a task's model (a variant) trained with `train`'s settings."""

    name: str  # <task>-<variant>[-train800val200]; the run's folder is `run_name`, keyed by what it computes
    task: str
    backbone: dict  # BackboneConfig dump
    model: dict  # ModelConfig dump
    train: dict  # TrainConfig dump (ray: resources, deepspeed: the engine)
    seed: int
    trainval: bool = False  # the standard protocol's final fit: train800 ∪ val200, last epoch kept
    donor: bool = False  # the standard protocol's threshold donor: train800 only, the final fit's schedule
    data: str = ""  # the task's prepared data (its manifest checksum)

    @property
    def digest(self) -> str:
        """What the run computes: model, training settings (not where it runs: train.ray, train.storage),
        seed, split and data. Two experiments or projects sharing train.storage get different folders."""
        train = {k: v for k, v in self.train.items() if k not in ("ray", "storage")}
        what = {"backbone": self.backbone, "model": self.model, "train": train, "seed": self.seed,
                "trainval": self.trainval, "data": self.data}
        return config_digest({**what, "donor": True} if self.donor else what)  # the older runs keep their names

    @property
    def run_name(self) -> str:
        return f"{self.name}-{self.digest}"

    def data_of(self, data):
        """The splits this run trains on (a TaskData with train and val): train800 ∪ val200 for the final fit,
        train800 without val for the donor, else train800 with val200 to select on."""
        from dynadapter.adapt import trainval_data

        if self.trainval:
            return trainval_data(data)
        return replace(data, val=None) if self.donor else data

    def after_selection(self, best_epoch: int) -> FitJob:
        """A follow-up run of the standard protocol, on the schedule of `best_epoch` epochs the selection run chose
        (`adapt.final_schedule`: the warm-up keeps its share)."""
        from dynadapter.adapt import final_schedule

        train = final_schedule(TrainConfig.model_validate(self.train), best_epoch).model_dump(mode="json")
        return replace(self, train=train)

    def check(self, checkpoint: Mapping[str, Any], where: str) -> None:
        """Raise CheckpointMismatchError unless `checkpoint` (a `fit` checkpoint) was written by this job."""
        from dynadapter.train import CheckpointMismatchError

        run = checkpoint.get("run", {}) if isinstance(checkpoint, Mapping) else {}
        own = TrainConfig.model_validate(self.train).model_dump(mode="json")
        diff = [k for k, mine in (("config", own), ("seed", self.seed)) if run.get(k) != mine]
        if diff:
            raise CheckpointMismatchError(
                f"{where}: the checkpoint there was written by another run ({', '.join(diff)} differ) than "
                f"{self.name}; delete that folder, or give this experiment its own train.storage")


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

    from dynadapter.adapt import train_task
    from dynadapter.train.checkpoint import rank_file
    from dynadapter.train import flatten_metrics
    from dynadapter.train.deepspeed import deepspeed_strategy

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    job = FitJob(**config["job"])
    data = ray.get(config["data"])
    data = job.data_of(data)
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
                         TrainConfig.model_validate(job.train).ray, storage_path=storage_path, name=job.run_name,
                         max_failures=max_failures)
    checkpoint = rank_states(result, [0])[0]
    job.check(checkpoint, str(result.path))  # whose weights these are, before the driver uses them
    return FitOutcome(job, checkpoint, time.perf_counter() - start)


TRAIN_SPLITS = ("train", "val")  # all a Ray Train worker reads: test never travels to the train stage


def worker_data(data):
    """What a task's Ray Train workers receive: its train and val splits only (test dropped), from its TaskData
    or read from its Parquet (a TaskSource: uint8 images, normalised per batch on the worker's device)."""
    from dynadapter.adapt import TaskSource

    if isinstance(data, TaskSource):
        return data.load(TRAIN_SPLITS, uint8=True)
    return data.only(*TRAIN_SPLITS)


def _run_jobs(jobs: list[FitJob], refs: dict, storage_path: str, max_failures: int) -> list[FitOutcome]:
    """One task x variant on the cluster: its run, and under the standard protocol the train800val200 run and the
    threshold donor, for the epoch count the first one chose on val (`final_schedule`). `refs`: the data's and backbone's object refs (in a dict, so
    Ray hands them on as refs instead of resolving them here); the data may instead be a TaskSource, read here
    (this task runs on the driver's node, beside the prepared data) and put into the object store from here,
    so the driver never holds it."""
    import ray

    data_ref, backbone_ref = refs["data"], refs["backbone"]
    if not isinstance(data_ref, ray.ObjectRef):
        data_ref = ray.put(worker_data(data_ref))
    first = fit_on_ray(jobs[0], data_ref, backbone_ref, storage_path=storage_path, max_failures=max_failures)
    outcomes = [first]
    for job in jobs[1:]:
        outcomes.append(fit_on_ray(job.after_selection(first.best_epoch), data_ref, backbone_ref,
                                   storage_path=storage_path, max_failures=max_failures))
    return outcomes


def driver_node_id() -> str | None:
    """The Ray node this process (the driver) runs on, if it is an alive node of the cluster: None when the driver
    is outside it (Ray Client, ray://), where no task can read this machine's files."""
    import ray

    try:
        from ray.util.client import ray as client

        if client.is_connected():
            return None
    except ImportError:  # pragma: no cover - Ray without its client
        pass
    node = ray.get_runtime_context().get_node_id()
    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    return node if node in alive else None


def train_jobs_on_ray(jobs: Sequence[list[FitJob]], data: Mapping[str, Any] | Callable[[str], Any],
                      backbone_state: Mapping[str, torch.Tensor], *, storage_path: str | Path, max_failures: int = 1,
                      read_on_cluster: bool | None = None, max_in_flight: int | None = None, stdout=sys.stdout
                      ) -> Iterator[list[FitOutcome]]:
    """Run every chain of jobs (each a Ray task that waits on its runs), at most `max_in_flight` at a time (None:
    as many runs as the cluster's resources hold at once, `fitting_tasks` of a run's request), and yield their
    outcomes in the order of `jobs`. A chain waiting for resources costs nothing on the cluster: submitted
    all at once, every queued run held a Train controller and its chain's task (about 0.85 GB together,
    measured) until it could start.

    `data`: {task: TaskData or TaskSource}, or a function task -> either, called as the task's first chain
    starts. Workers get train and val only (`worker_data`), never test.
    - A TaskData is cut to train/val and put into the object store from here (put, then released: the driver
      holds at most one task's data).
    - A TaskSource is, with `read_on_cluster` (None: whenever this driver is a node of the cluster), read by
      the chain's own Ray task, pinned to the driver's node (where the prepared data is), which puts it into
      the object store: the driver holds none. Otherwise (a Ray Client driver) it is read here, one task at a
      time, as a TaskData is."""
    import ray

    from dynadapter.adapt import TaskSource
    from dynadapter.ray_session import storage_uri

    jobs = list(jobs)
    storage = storage_uri(storage_path)
    backbone_ref = ray.put({k: v.contiguous() for k, v in backbone_state.items()})
    load = data if callable(data) else data.__getitem__
    node = driver_node_id() if read_on_cluster is not False else None
    if read_on_cluster and node is None:
        raise RuntimeError("read_on_cluster: this driver is not a node of the Ray cluster; no task can read its files")
    if max_in_flight is None:
        run = TrainConfig.model_validate(jobs[0][0].train).ray if jobs else RayConfig()
        max_in_flight = fitting_tasks(run, workers=run.num_workers)
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
    remote = ray.remote(num_cpus=DRIVER_CPU, max_retries=0)(_run_jobs)
    loaded: tuple = (None, None)
    pending: dict = {}  # ref -> index in jobs
    done: dict[int, list[FitOutcome]] = {}

    def submit(i: int) -> None:
        nonlocal loaded
        chain = jobs[i]
        task = chain[0].task
        if loaded[0] != task:  # a task's chains (its variants) share one load and one object
            loaded = (None, None)  # the previous task's object: released here before the next one is loaded
            d = load(task)
            loaded = (task, d if isinstance(d, TaskSource) and node is not None else ray.put(worker_data(d)))
            del d
        options = {}
        if isinstance(loaded[1], TaskSource):
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
        ref = remote.options(**options).remote(chain, {"data": loaded[1], "backbone": backbone_ref}, storage,
                                               max_failures)
        pending[ref] = i

    print(f"train: {len(jobs)} Ray Train runs submitted to the cluster, at most {max_in_flight} at a time",
          file=stdout, flush=True)
    submitted = 0
    for i in range(len(jobs)):
        while submitted < len(jobs) and len(pending) < max_in_flight:
            submit(submitted)
            submitted += 1
        while i not in done:  # collect whatever finishes first, refilling its slot; hand on in order
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                done[pending.pop(ref)] = ray.get(ref)
            while submitted < len(jobs) and len(pending) < max_in_flight:
                submit(submitted)
                submitted += 1
        yield done.pop(i)


def _call(fn: Callable, threads: int, kwargs: dict, *args):
    # args travel as the task's own arguments, so Ray resolves object refs among them (e.g. a task's data put
    # once for all its evaluations); refs nested in a tuple would arrive unresolved
    torch.set_num_threads(threads)
    return fn(*args, **kwargs)


def fitting_tasks(ray_cfg: RayConfig, *, workers: int = 1) -> int:
    """How many requests of `workers` x ray_cfg's per-worker CPUs and GPUs (one Ray task, or one Ray Train run)
    the cluster's resources hold at once (at least 1)."""
    import ray

    from dynadapter.distributed import how_many_fit

    return max(1, how_many_fit(ray.cluster_resources(), workers * ray_cfg.cpus_per_worker,
                               workers * ray_cfg.gpus_per_worker))


def map_on_ray(fn: Callable, calls: Iterable[tuple[tuple, dict]], ray_cfg: RayConfig, *,
               max_in_flight: int | None = None) -> Iterator[Any]:
    """`fn(*args, **kwargs)` for every (args, kwargs) in `calls`, each a Ray task holding cpus_per_worker CPUs
    and gpus_per_worker GPUs; results yielded in the order of `calls`.

    `calls` is drawn lazily and at most `max_in_flight` tasks (None: as many as the cluster holds at once,
    `fitting_tasks`) are submitted and not yet handed back: a generator that loads each call's data (and
    releases it once submitted) keeps the driver's memory at that many calls, whatever their number. A freed
    slot is refilled before the result is handed on, so the cluster keeps working while the caller uses it."""
    import ray

    threads = max(1, int(ray_cfg.cpus_per_worker))
    from dynadapter.distributed import task_options

    remote = ray.remote(_call).options(**task_options(ray_cfg), max_retries=1)
    limit = max_in_flight if max_in_flight is not None else fitting_tasks(ray_cfg)
    if limit < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {limit}")
    pending: deque = deque()
    todo = iter(calls)

    def submit() -> bool:
        call = next(todo, None)
        if call is None:
            return False
        args, kwargs = call
        pending.append(remote.remote(fn, threads, kwargs, *args))
        return True

    while len(pending) < limit and submit():
        pass
    while pending:
        result = ray.get(pending.popleft())
        submit()
        yield result


def fit_jobs(task: str, variant: str, backbone_cfg: BackboneConfig, model_cfg: ModelConfig, train_cfg: TrainConfig,
             *, seed: int, standard: bool, data: str = "") -> list[FitJob]:
    """The runs one task x variant takes: one, or three under the standard protocol (the selection run, the
    train800val200 run, the threshold donor). `data`: the task's prepared data (manifest checksum), part of each
    run's folder name."""
    job = FitJob(name=f"{task}-{variant}", task=task, backbone=backbone_cfg.model_dump(mode="json"),
                 model=model_cfg.model_dump(mode="json"), train=train_cfg.model_dump(mode="json"), seed=seed,
                 data=data)
    if not standard:
        return [job]
    return [job, replace(job, name=f"{job.name}-train800val200", trainval=True),
            replace(job, name=f"{job.name}-calibration", donor=True)]
