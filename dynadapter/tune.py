"""Ray Tune search over sparsity ratios and head-balancing weights; each trial trains with Ray Train workers
running DeepSpeed, and is scored by validation accuracy at the FLOPs budget after calibration on val.

Shape (Ray >= 2.4x, Train V2): a Tune *function* trainable per trial launches a `TorchTrainer` whose workers
report through `TuneReportCallback`; ASHA stops weak trials at epoch rungs. Test data is never loaded here.
Ray is imported lazily, so importing this module has no Ray side effects.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from dynadapter.config import DeepSpeedConfig, Params, RayConfig, TrainConfig, TuneConfig

METRIC = "val_budget_acc"  # mean over tune tasks of val accuracy at tune.budget, thresholds calibrated on val
STOPPED = "stopped"  # in a trial's last result: why it stopped without finishing (its loss went non-finite)
MODE = "max"
TRAINABLE_CPU = 0.01  # the trial's driver function only waits on its TorchTrainer (Ray rejects 0)


# ------------------------------------------------------------------------------------------ Ray session


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> dict[str, float]:
    """Join a Ray cluster or start a local one; returns the cluster's resources.

    Order: `address` (params `tune.ray.address`), then the RAY_ADDRESS environment variable, else a local Ray
    with this machine's CPUs (or `num_cpus`). A session already started is reused.

    The local Ray runs its dashboard (on 127.0.0.1, a free port) because Ray Train V2 needs the State API it
    serves: when Tune stops a trial (ASHA, or the last epoch reached), the trial's Train controller dies with
    it, and only Train's PlacementGroupCleaner, polling the State API, frees the workers' placement group.
    Without it every finished trial keeps its workers' CPUs and the next trial waits forever (measured).

    Every server of the local Ray (GCS, raylet, object manager, dashboard and its agent, runtime-env agent,
    metrics, workers) listens on loopback only (`_loopback_node`); Ray's token authentication, which Ray turns on
    by default for a new local instance, stays as Ray sets it (docs/security.md).
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("DS_BUILD_OPS", "0")  # DeepSpeed JIT-builds only the small ops it needs
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:
            ray.init(address=address)
        else:
            from dynadapter.train.deepspeed import free_port

            port = free_port()
            # The placement-group cleaner finds the State API by auto-detecting the cluster, which fails when
            # other Ray instances run on the machine ("Found multiple active Ray instances"): name ours. Set
            # before the start, so the raylet and every worker it spawns inherit it.
            os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
            # "local": a new instance; with address=None Ray would join any `ray start` head on this machine
            with _loopback_node():
                ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=True,
                         dashboard_host="127.0.0.1", dashboard_port=port)
    return dict(ray.cluster_resources())


@contextlib.contextmanager
def _loopback_node():
    """Make the local Ray's node IP 127.0.0.1, for the duration of its `ray.init`.

    Ray binds its servers by the node IP: a non-loopback node IP puts the GCS, raylet and worker gRPC servers on
    all interfaces and the dashboard agent and runtime-env agent on the machine's network address (measured,
    Ray 2.60). An explicit `_node_ip_address="127.0.0.1"` does not help, Ray resolves it to the machine's
    reachable address; it keeps loopback only while multi-node clusters are off, which is what its
    ENABLE_RAY_CLUSTER constant (env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, read at import) says. The started
    processes get the node IP on their command lines, so the switch is needed only in this process, and only
    while the instance starts: a later `ray.init(address=...)` to a real cluster must see the real address.
    """
    from ray._private import ray_constants

    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous


# ------------------------------------------------------------------------------------------ resources


@dataclass(frozen=True)
class TrialResources:
    """What one trial holds while it runs, and how many trials fit the cluster at once."""

    trainable_cpu: float
    worker_cpu: float
    worker_gpu: float
    num_workers: int
    max_concurrent: int

    @property
    def cpu_per_trial(self) -> float:
        return self.trainable_cpu + self.num_workers * self.worker_cpu


def plan_resources(cluster: Mapping[str, float], ray_cfg: RayConfig, max_concurrent: int | None = None
                   ) -> TrialResources:
    """Budget: a trial = its Tune trainable (TRAINABLE_CPU) + num_workers × (cpus_per_worker, gpus_per_worker);
    Train V2's controller and placement-group cleaner actors take 0 CPU. Concurrency = the trials whose whole
    budget fits the cluster together (capped by `max_concurrent`), so no trial's trainable can hold CPUs its
    workers then wait for: that is the deadlock a 1-CPU trainable default causes on a small machine."""
    trial_cpu = TRAINABLE_CPU + ray_cfg.num_workers * ray_cfg.cpus_per_worker
    trial_gpu = ray_cfg.num_workers * ray_cfg.gpus_per_worker
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    fits = math.floor(cpus / trial_cpu + 1e-9)
    if trial_gpu > 0:
        fits = min(fits, math.floor(gpus / trial_gpu + 1e-9))
    if fits < 1:
        raise ValueError(
            f"tune.ray: one trial needs {trial_cpu:g} CPU and {trial_gpu:g} GPU (num_workers="
            f"{ray_cfg.num_workers}, cpus_per_worker={ray_cfg.cpus_per_worker}, gpus_per_worker="
            f"{ray_cfg.gpus_per_worker}, plus {TRAINABLE_CPU} for the trial itself), the cluster has {cpus:g} CPU "
            f"and {gpus:g} GPU"
        )
    if max_concurrent is not None:
        fits = min(fits, max_concurrent)
    return TrialResources(TRAINABLE_CPU, ray_cfg.cpus_per_worker, ray_cfg.gpus_per_worker, ray_cfg.num_workers,
                          fits)


# ------------------------------------------------------------------------------------------ search space


def _domain(r: list[float], log: bool = False):
    from ray import tune

    if r[0] == r[1]:
        return float(r[0])
    return tune.loguniform(r[0], r[1]) if log else tune.uniform(r[0], r[1])


def _per_exit(key: str, value, num_exits: int) -> list[list[float]]:
    if value and isinstance(value[0], list):
        if len(value) != num_exits:
            raise ValueError(f"tune.search_space.{key} has {len(value)} ranges but the model has {num_exits} exits")
        return value
    return [value] * num_exits


def search_space(cfg: TuneConfig, num_exits: int) -> dict[str, Any]:
    """Tune's param_space: flat keys (p_max, p_min, q, lr, priority_start_<i>, priority_end_<i>), one
    independent draw per exit weight; unsearched keys are absent."""
    ss = cfg.search_space
    space: dict[str, Any] = {}
    for key in ("p_max", "p_min", "q"):
        if getattr(ss, key) is not None:
            space[key] = _domain(getattr(ss, key))
    if ss.lr is not None:
        space["lr"] = _domain(ss.lr, log=True)
    for key in ("priority_start", "priority_end"):
        if getattr(ss, key) is not None:
            for i, r in enumerate(_per_exit(key, getattr(ss, key), num_exits)):
                space[f"{key}_{i}"] = _domain(r)
    if ss.priority_strength is not None:
        space["priority_strength"] = _domain(ss.priority_strength)
    if ss.priority_pattern:
        from ray import tune

        patterns = list(dict.fromkeys(ss.priority_pattern))
        space["priority_pattern"] = patterns[0] if len(patterns) == 1 else tune.choice(patterns)
    return space


def overrides_from(config: Mapping[str, Any], train: TrainConfig) -> dict[str, Any]:
    """A trial's sampled values as dotted `train.*` params overrides (what best_params.yaml holds).

    p_min is clipped to the trial's p_max (dropout must not rise with depth), so the overrides always
    validate."""
    out: dict[str, Any] = {}
    p_max = float(config.get("p_max", train.sparsity.p_max))
    if "p_max" in config:
        out["train.sparsity.p_max"] = p_max
    if "p_min" in config:
        out["train.sparsity.p_min"] = min(float(config["p_min"]), p_max)
    elif "p_max" in config and train.sparsity.p_min > p_max:
        out["train.sparsity.p_min"] = p_max
    if "q" in config:
        out["train.sparsity.q"] = float(config["q"])
    if "lr" in config:
        out["train.lr"] = float(config["lr"])
    for key, name in (("priority_start", "start"), ("priority_end", "end")):
        idx = sorted(int(k.rsplit("_", 1)[1]) for k in config if k.startswith(f"{key}_") and k[len(key) + 1:].isdigit())
        if idx:
            out[f"train.priority.{name}"] = [float(config[f"{key}_{i}"]) for i in idx]
    if "priority_strength" in config:
        out["train.priority.strength"] = float(config["priority_strength"])
    if "priority_pattern" in config:
        out["train.priority.pattern"] = str(config["priority_pattern"])
    return out


def apply_overrides_to(train: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """`train` with dotted `train.*` overrides applied, validated."""
    tree = train.model_dump(mode="json")
    for dotted, value in overrides.items():
        keys = dotted.split(".")
        if keys[0] != "train":
            raise ValueError(f"tune override {dotted!r} is not under train")
        node = tree
        for k in keys[1:-1]:
            node = node[k]
        node[keys[-1]] = value
    return TrainConfig.model_validate(tree)


# ------------------------------------------------------------------------------------------ one trial's training


@dataclass
class TrialSpec:
    """Everything a trial's workers need besides the data (plain, picklable)."""

    backbone: dict  # BackboneConfig dump
    model: dict  # ModelConfig dump
    train: dict  # TrainConfig dump, with the trial's overrides and epochs = tune.epochs
    deepspeed: dict  # DeepSpeedConfig dump
    budget: float
    seed: int
    tasks: list[str]
    record_masks: bool = False  # keep a digest of every step's gradient masks in the state (equivalence checks)


class TaskRun:
    """One task's model, DeepSpeed strategy, gradient masker and shuffle stream on one rank: trained an epoch
    at a time (so a trial can interleave its tasks and report after every epoch) and scored on val.

    The same pieces `fit` uses (`run_epoch`, `iterate_batches` sharded by rank, `GradientMasker`, the priority
    schedule); `state()` / `load()` round-trip everything, so a resumed trial continues exactly."""

    def __init__(self, task: str, data, spec: TrialSpec, backbone_state: Mapping[str, torch.Tensor], *,
                 rank: int = 0, world_size: int = 1):
        from dynadapter.config import BackboneConfig, ModelConfig
        from dynadapter.inference import measure_stage_costs
        from dynadapter.models import build_model, create_backbone, merge_petl
        from dynadapter.train.deepspeed import DeepSpeedStrategy
        from dynadapter.train.loop import _priority_schedule, num_batches, rank_dropout
        from dynadapter.train.sparsity import GradientMasker

        self.task, self.data, self.rank, self.world_size = task, data, rank, world_size
        self.cfg = TrainConfig.model_validate(spec.train)
        self.budget = spec.budget
        backbone_cfg = BackboneConfig.model_validate(spec.backbone)
        torch.manual_seed(spec.seed)  # same initial heads/PETL weights in every trial and on every rank
        backbone = create_backbone(backbone_cfg)
        backbone.load_state_dict(backbone_state)
        self.model = build_model(backbone_cfg, ModelConfig.model_validate(spec.model), data.num_classes,
                                 self.cfg.sparsity, backbone=backbone)
        merged = copy.deepcopy(self.model).eval()
        merge_petl(merged)  # budgets count what inference runs: merged Rep-Adapter / LoRA cost nothing
        self.costs = measure_stage_costs(merged)
        del merged
        self.steps_per_epoch = num_batches(data.train, self.cfg.batch_size, world_size)
        self.strategy = DeepSpeedStrategy(self.model, self.cfg, self.steps_per_epoch,
                                          DeepSpeedConfig.model_validate(spec.deepspeed))
        self.schedule = _priority_schedule(self.model, self.cfg)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        masker = GradientMasker.from_config(trainable, self.cfg.sparsity, seed=spec.seed + 1,
                                            record=spec.record_masks)
        self.masker = masker if masker.active else None
        self.dropout = rank_dropout(self.model, self.cfg, spec.seed, rank, world_size)  # as `fit` draws it
        self.shuffle = torch.Generator().manual_seed(spec.seed)
        self.epoch = 0

    def train_epoch(self) -> dict[str, Any]:
        from dynadapter.train.loop import iterate_batches, run_epoch

        batches = iterate_batches(self.data.train, self.cfg.batch_size, shuffle=True, generator=self.shuffle,
                                  rank=self.rank, world_size=self.world_size)
        metrics, _ = run_epoch(
            self.strategy.module, batches, self.strategy, self.schedule,
            global_step=self.epoch * self.steps_per_epoch, total_steps=self.cfg.epochs * self.steps_per_epoch,
            masker=self.masker, distill=self.cfg.distill, temperature=self.cfg.distill_temperature,
            epoch=self.epoch + 1, dropout=self.dropout,
        )
        self.epoch += 1
        return metrics

    @torch.no_grad()
    def score(self) -> dict[str, Any]:
        """Calibrate exit thresholds on val at the budget: the val accuracy they reach is the trial metric."""
        from dynadapter.inference import calibrate, collect_exit_logits

        x, y = self.data.val
        logits = collect_exit_logits(self.model, x)
        y = y.to(logits.device)
        cal = calibrate(val_logits=logits, val_labels=y, costs=self.costs, budget_fraction=self.budget,
                        confidence=self.model.confidence)
        per_exit = [float((lg.argmax(-1) == y).float().mean()) for lg in logits]
        return {METRIC: cal.val_accuracy, "val_budget_fraction": cal.fraction, "val_budget_feasible": cal.feasible,
                "val_acc_mean": sum(per_exit) / len(per_exit), "val_acc_last": per_exit[-1]}

    def state(self) -> dict[str, Any]:
        from dynadapter.train.loop import trainable_state

        return {"epoch": self.epoch, "model": trainable_state(self.model), "strategy": self.strategy.state_dict(),
                "shuffle": self.shuffle.get_state(),
                "masker": self.masker.state_dict() if self.masker is not None else None,
                "mask_digests": list(self.masker.digests or []) if self.masker is not None else []}

    def load(self, state: Mapping[str, Any]) -> None:
        from dynadapter.train.loop import load_trainable_state

        load_trainable_state(self.model, state["model"])  # weights first: ZeRO reloads its master copy after
        self.strategy.load_state_dict(state["strategy"])
        self.shuffle.set_state(state["shuffle"])
        if self.masker is not None and state["masker"] is not None:
            self.masker.load_state_dict(state["masker"])
            if self.masker.digests is not None:
                self.masker.digests[:] = state.get("mask_digests", [])
        self.epoch = int(state["epoch"])

    def close(self) -> None:
        if self.masker is not None:
            self.masker.remove()
        if self.dropout is not None:
            self.dropout.remove()
        self.strategy.close()


class TrialTrainer:
    """All tune tasks of one trial on one rank; `step()` trains every task one epoch and returns the metrics
    Tune sees (the mean over tasks of each score, plus per-task `val_budget_acc_<task>`)."""

    def __init__(self, spec: TrialSpec, data: Mapping[str, Any], backbone_state, *, rank: int = 0,
                 world_size: int = 1):
        self.spec = spec
        self.runs = [TaskRun(t, data[t], spec, backbone_state, rank=rank, world_size=world_size)
                     for t in spec.tasks]
        torch.manual_seed(spec.seed)  # dropout draws: one stream, tasks in a fixed order

    @property
    def epoch(self) -> int:
        return self.runs[0].epoch

    @property
    def epochs(self) -> int:
        return self.runs[0].cfg.epochs

    def step(self) -> dict[str, Any]:
        per_task = {}
        for run in self.runs:
            train = run.train_epoch()
            per_task[run.task] = {"train_loss": train["train_loss"], "step_seconds": train["seconds"] /
                                  max(1, train["steps"]), **run.score()}
        keys = ("train_loss", METRIC, "val_budget_fraction", "val_acc_mean", "val_acc_last", "step_seconds")
        metrics: dict[str, Any] = {"epoch": self.epoch}
        metrics.update({k: sum(float(m[k]) for m in per_task.values()) / len(per_task) for k in keys})
        metrics.update({f"{METRIC}_{t}": float(m[METRIC]) for t, m in per_task.items()})
        return metrics

    def state(self) -> dict[str, Any]:
        return {"tasks": {r.task: r.state() for r in self.runs}, "torch_rng": torch.get_rng_state()}

    def load(self, state: Mapping[str, Any]) -> None:
        for r in self.runs:
            r.load(state["tasks"][r.task])
        torch.set_rng_state(state["torch_rng"])

    def close(self) -> None:
        for r in self.runs:
            r.close()


def _train_worker(config: dict) -> None:
    """Ray Train `train_loop_per_worker`: train the trial's tasks epoch by epoch, report the val metrics and a
    checkpoint every epoch (each rank writes its own file into the epoch's checkpoint directory: under ZeRO
    1/2 optimizer state is per rank), resume from the run's latest checkpoint after a failure."""
    import ray
    import ray.train

    from dynadapter.distributed import rank_file

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    spec = TrialSpec(**config["spec"])
    trainer = TrialTrainer(spec, ray.get(config["data"]), ray.get(config["backbone"]), rank=rank, world_size=world)
    try:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                trainer.load(torch.load(Path(d) / rank_file(rank), map_location="cpu", weights_only=True))
        resumed_from = trainer.epoch
        while trainer.epoch < trainer.epochs:
            metrics = {**trainer.step(), "resumed_from": resumed_from}
            with tempfile.TemporaryDirectory() as d:
                torch.save(trainer.state(), Path(d) / rank_file(rank))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_dir_name=f"epoch_{trainer.epoch:04d}")
    finally:
        trainer.close()


def _run_trial(config: dict, *, static: dict) -> None:
    """Tune function trainable: one TorchTrainer (the trial's workers) with this trial's overrides. Its run
    name is the trial id, so a retried trial's TorchTrainer finds the run's checkpoints and resumes."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from dynadapter.distributed import torch_trainer

    spec = dict(static["spec"])
    train = TrainConfig.model_validate(spec["train"])
    spec["train"] = apply_overrides_to(train, overrides_from(config, train)).model_dump(mode="json")
    res: dict = static["resources"]
    trainer = torch_trainer(
        _train_worker, {"spec": spec, "data": static["data"], "backbone": static["backbone"]},
        num_workers=res["num_workers"], worker_cpu=res["worker_cpu"], worker_gpu=res["worker_gpu"],
        storage_path=static["train_storage"], name=tune.get_context().get_trial_id(),
        max_failures=static["max_failures"], checkpoints_to_keep=static["checkpoints_to_keep"],
        callbacks=[TuneReportCallback()],
    )
    try:
        trainer.fit()
    except Exception as err:
        reason = _nonfinite_reason(err)
        if reason is None:
            raise
        # A diverging loss is deterministic: Tune's retry would diverge again, as Ray Train's one did. End
        # the trial with the reason as its last result; its checkpoints, written before the bad step, stay.
        tune.report({METRIC: float("nan"), STOPPED: reason})


def _nonfinite_reason(err: BaseException) -> str | None:
    """The NonFiniteLossError message behind a failed TorchTrainer run, or None if it failed otherwise."""
    import re

    from dynadapter.train.loop import NonFiniteLossError

    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        text = str(e).strip()
        found = re.findall(r"NonFiniteLossError: ([^\n]+)", text)  # a worker's traceback ends with it
        if found:
            return found[-1].strip()
        if isinstance(e, NonFiniteLossError) and text:
            return text.splitlines()[-1]
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__,
                 *(getattr(e, "worker_failures", None) or {}).values()]
    return None


# ------------------------------------------------------------------------------------------ the driver


@dataclass
class TuneOutcome:
    """The search's result: the best trial's settings as params overrides, its metric, and every trial."""

    metric: str
    best_metric: float
    best_overrides: dict[str, Any]  # dotted train.* keys -> values (best_params.yaml)
    best_config: dict[str, Any]  # the raw sampled values of the best trial
    best_trial: str
    trials: list[dict[str, Any]] = field(default_factory=list)  # one row per trial
    path: str = ""  # the experiment folder (Tuner.restore / ResultGrid)
    histories: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # trial id -> per-epoch metrics

    def table(self):
        """`trials` as a pandas DataFrame (one row per trial)."""
        import pandas as pd

        return pd.DataFrame(self.trials)


def _local_path(path: str | Path) -> str:
    path = str(path)
    return path if "://" in path else str(Path(path).resolve())


@dataclass
class TuneTask:
    """A task's train and val splits (tuning never loads test)."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    num_classes: int


def load_tune_tasks(params: Params, tasks: list[str]) -> dict[str, TuneTask]:
    """train + val of `tasks` from base.paths.data, resized and normalised as base.backbone expects."""
    from dynadapter.data import load_split_tensors, read_manifest
    from dynadapter.models import create_backbone, normalization

    base = params.base
    mean, std = normalization(create_backbone(base.backbone))
    out = {}
    for t in tasks:
        manifest = read_manifest(base.paths.data, t)
        train, val = (load_split_tensors(base.paths.data, t, s, base.backbone.img_size, mean, std)
                      for s in ("train", "val"))
        out[t] = TuneTask(train, val, int(manifest["num_classes"]))
    return out


def run_tune(
    params: Params,
    checkpoint: str | Path | None = None,
    *,
    storage_path: str | Path,
    name: str = "tune",
    data: Mapping[str, Any] | None = None,
    resume: bool = False,
    callbacks: list | None = None,
    verbose: int = 1,
) -> TuneOutcome:
    """Search `params.tune.search_space` with ASHA; returns the best trial's train overrides.

    checkpoint: the backbone weights (e.g. `backbone_checkpoint(...)`); None: `base.backbone.checkpoint`.
    data: {task: TuneTask or adapt.TaskData} to tune on (only train, val and num_classes are read); None:
      load train + val of `tune.tasks` (default `base.tasks`) from `base.paths.data`. The driver loads the
      data and the backbone once and hands them to the workers through Ray's object store, so workers need
      no shared filesystem for them.
    storage_path: where Tune and the trials' Ray Train runs keep results and checkpoints (local folder or a
      URI every node can reach); `resume` continues an interrupted experiment of the same `name` there.
    callbacks: Tune callbacks (e.g. `ray.air.integrations.mlflow.MLflowLoggerCallback`).
    Every trial uses `base.seed` (same initial weights and data order), so trials differ only in their
    sampled settings. Ray must be initialised (`init_ray`).
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from dynadapter.models import create_backbone
    from dynadapter.models.factory import resolve_exits

    if not ray.is_initialized():
        raise RuntimeError("run_tune needs a Ray session: call dynadapter.tune.init_ray() first")
    cfg = params.tune
    tasks = list(cfg.tasks or params.base.tasks)
    data = dict(data) if data is not None else load_tune_tasks(params, tasks)
    missing = [t for t in tasks if t not in data]
    if missing:
        raise ValueError(f"tune.tasks {missing}: no data given for them")
    backbone = create_backbone(params.base.backbone, checkpoint)
    num_exits = len(resolve_exits(params.base.model, len(backbone.blocks)))
    space = search_space(cfg, num_exits)
    resources = plan_resources(ray.cluster_resources(), cfg.ray, cfg.max_concurrent)

    spec = TrialSpec(  # workers get the backbone weights from the object store, not from a file
        backbone=params.base.backbone.model_copy(update={"checkpoint": None}).model_dump(mode="json"),
        model=params.base.model.model_dump(mode="json"),
        train=params.train.model_copy(update={"epochs": cfg.epochs}).model_dump(mode="json"),
        deepspeed=cfg.deepspeed.model_dump(mode="json"),
        budget=cfg.budget,
        seed=params.base.seed,
        tasks=tasks,
    )
    storage = _local_path(storage_path)
    static = {
        "spec": asdict(spec),
        "data": ray.put({t: data[t] for t in tasks}),
        "backbone": ray.put({k: v.contiguous() for k, v in backbone.state_dict().items()}),
        "resources": {"worker_cpu": resources.worker_cpu, "worker_gpu": resources.worker_gpu,
                      "num_workers": resources.num_workers},
        "train_storage": f"{storage.rstrip('/')}/{name}/train_runs",
        "checkpoints_to_keep": cfg.checkpoints_to_keep,
        "max_failures": cfg.max_failures,
    }
    trainable = tune.with_resources(tune.with_parameters(_run_trial, static=static), {"CPU": TRAINABLE_CPU})
    experiment = f"{storage.rstrip('/')}/{name}"
    if resume and tune.Tuner.can_restore(experiment):
        tuner = tune.Tuner.restore(experiment, trainable, resume_errored=True, param_space=space)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=METRIC, mode=MODE, num_samples=cfg.num_samples,
                reuse_actors=False,  # a stopped trial's actor must die, taking its Train controller with it
                search_alg=BasicVariantGenerator(random_state=params.base.seed,
                                                 max_concurrent=resources.max_concurrent),
                scheduler=ASHAScheduler(time_attr="epoch", max_t=cfg.epochs,
                                        grace_period=min(cfg.scheduler.grace_period, cfg.epochs),
                                        reduction_factor=cfg.scheduler.reduction_factor),
            ),
            run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=callbacks, verbose=verbose,
                                      failure_config=tune.FailureConfig(max_failures=cfg.max_failures)),
        )
    results = tuner.fit()
    return _outcome(results, params.train)


HISTORY_KEYS = ("epoch", METRIC, "val_budget_fraction", "val_acc_mean", "val_acc_last", "train_loss", "step_seconds")


def _history(df) -> list[dict[str, float]]:
    """A trial's reported metrics, one row per report (epoch), numeric columns only."""
    if df is None or "epoch" not in getattr(df, "columns", []):
        return []
    df = df[df["epoch"].notna()]  # a stopped trial's last result is only its reason
    cols = [c for c in df.columns if c in HISTORY_KEYS or c.startswith(f"{METRIC}_")]
    return [{k: float(v) for k, v in row.items() if v == v} for row in df[cols].to_dict("records")]


def _outcome(results, train: TrainConfig) -> TuneOutcome:
    rows = []
    histories = {}
    for r in results:
        df = r.metrics_dataframe
        has = df is not None and METRIC in getattr(df, "columns", [])
        config = {k: v for k, v in (r.config or {}).items()}
        last = r.metrics or {}
        stopped = last.get(STOPPED) if isinstance(last.get(STOPPED), str) else None
        if stopped and has and df[METRIC].notna().any():  # figures of its last epoch, before it stopped
            last = df[df[METRIC].notna()].iloc[-1].to_dict()
        rows.append({
            "trial_id": last.get("trial_id"),
            METRIC: float(df[METRIC].max()) if has else float("nan"),
            f"{METRIC}_last": float(last[METRIC]) if METRIC in last else float("nan"),
            "epochs": int(last.get("epoch", 0)),
            "resumed_from": int(last.get("resumed_from", 0)),
            "val_acc_mean": float(last["val_acc_mean"]) if "val_acc_mean" in last else float("nan"),
            "val_budget_fraction": float(last["val_budget_fraction"]) if "val_budget_fraction" in last
            else float("nan"),
            **overrides_from(config, train),
            "error": repr(r.error) if r.error else stopped,
            "path": r.path,
        })
        histories[str(last.get("trial_id"))] = _history(df)
    # Only trials that ended without error compete: a trial that diverged or crashed for good may have
    # scored well before it did, but its settings do not train.
    scored = [row for row in rows if row["error"] is None and not math.isnan(row[METRIC])]
    if not scored:
        errors = "; ".join(str(row["error"]) for row in rows)
        raise RuntimeError(f"no tune trial finished with a {METRIC}: {errors}")
    best_row = max(scored, key=lambda row: row[METRIC])  # the first on ties
    best = next(r for r in results if r.path == best_row["path"])
    return TuneOutcome(
        metric=METRIC,
        best_metric=best_row[METRIC],
        best_overrides=overrides_from(best.config, train),
        best_config=dict(best.config),
        best_trial=str(best_row["trial_id"]),
        trials=rows,
        path=str(results.experiment_path),
        histories=histories,
    )


def write_best_params(outcome: TuneOutcome, path: str | Path) -> Path:
    """best_params.yaml: the best trial's `train.*` overrides as dotted keys (what `pipelines/train.py --best`
    applies on top of params.yaml), headed by a comment with the metric."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = (f"# tune: best {outcome.metric} = {outcome.best_metric:.4f} (trial {outcome.best_trial}); "
            "validation only, thresholds calibrated on val\n")
    path.write_text(head + yaml.safe_dump(outcome.best_overrides, sort_keys=True))
    return path
