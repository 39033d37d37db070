"""Ray Tune search over sparsity ratios and head-balancing weights; each trial trains with Ray Train workers
running DeepSpeed, and is scored by validation accuracy at the FLOPs budget after calibration on val.

Shape (Ray >= 2.4x, Train V2): a Tune *function* trainable per trial launches a `TorchTrainer` whose workers
report through `TuneReportCallback`; ASHA stops weak trials at epoch rungs. Test data is never loaded here.
Ray is imported lazily, so importing this module has no Ray side effects.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from dynadapter.config import Params, RayConfig, TrainConfig, TuneConfig
from dynadapter.distributed import how_many_fit
from dynadapter.ray_session import (check_shared_storage, init_ray, read_storage_json, storage_file,
                                    storage_uri, write_storage_json)
from dynadapter.trial import CURVE_METRIC, METRIC, OBJECTIVES, TrialSpec, train_worker

# re-exported: the names users and tests import from here
__all__ = ["CURVE_METRIC", "METRIC", "OBJECTIVES", "TrialSpec", "init_ray", "objective_metric"]

STOPPED = "stopped"  # in a trial's last result: why it stopped without finishing (its loss went non-finite)
MODE = "max"
TRAINABLE_CPU = 0.01  # the trial's driver function only waits on its TorchTrainer (Ray rejects 0)


def objective_metric(cfg: TuneConfig) -> str:
    """The reported metric the search maximises (tune.objective): METRIC or CURVE_METRIC."""
    return OBJECTIVES[cfg.objective]


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
    fits = how_many_fit(cluster, trial_cpu, trial_gpu)
    if fits < 1 and ray_cfg.autoscaling:  # the nodes that fit a trial are still to come: trials wait for them
        fits = max_concurrent or 1
        print(f"tune: the cluster has {cpus:g} CPU and {gpus:g} GPU now; one trial needs {trial_cpu:g} CPU and "
              f"{trial_gpu:g} GPU: waiting for the autoscaler (tune.ray.autoscaling), {fits} trial(s) at once",
              flush=True)
    if fits < 1:
        raise ValueError(
            f"tune.ray: one trial needs {trial_cpu:g} CPU and {trial_gpu:g} GPU (num_workers="
            f"{ray_cfg.num_workers}, cpus_per_worker={ray_cfg.cpus_per_worker}, gpus_per_worker="
            f"{ray_cfg.gpus_per_worker}, plus {TRAINABLE_CPU} for the trial itself), the cluster has {cpus:g} CPU "
            f"and {gpus:g} GPU (on an autoscaling cluster, set tune.ray.autoscaling: true)"
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
        train_worker, {"spec": spec, "data": static["data"], "backbone": static["backbone"]},
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
        tune.report({**dict.fromkeys(OBJECTIVES.values(), float("nan")), STOPPED: reason})


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
    seconds: float = 0.0  # wall time the sweep took, summed over every run that worked on it (resumes included)

    def table(self):
        """`trials` as a pandas DataFrame (one row per trial)."""
        import pandas as pd

        return pd.DataFrame(self.trials)


@dataclass
class TuneTask:
    """A task's train and val splits (tuning never loads test)."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    num_classes: int


def load_tune_tasks(params: Params, tasks: list[str]):
    """{task: TaskData} with train + val of `tasks` from base.paths.data (never test), resized for base.backbone:
    uint8 images, normalised per batch on each worker's device (`dynadapter.adapt.TaskData`), so the object
    store carries a quarter of float32's bytes."""
    from dynadapter.adapt import load_task
    from dynadapter.models import create_backbone, normalization

    base = params.base
    mean, std = normalization(create_backbone(base.backbone))
    return {t: load_task(base.paths.data, t, base.backbone.img_size, mean, std, splits=("train", "val"), uint8=True)
            for t in tasks}


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

    from dynadapter.asha import ResumableASHA
    from dynadapter.models import create_backbone
    from dynadapter.models.factory import resolve_exits

    if not ray.is_initialized():
        raise RuntimeError("run_tune needs a Ray session: call dynadapter.tune.init_ray() first")
    cfg = params.tune
    metric = objective_metric(cfg)
    tasks = list(cfg.tasks or params.base.tasks)
    data = dict(data) if data is not None else load_tune_tasks(params, tasks)
    missing = [t for t in tasks if t not in data]
    if missing:
        raise ValueError(f"tune.tasks {missing}: no data given for them")
    with torch.random.fork_rng(devices=[]):  # without a checkpoint the backbone is drawn: the same one on resume
        torch.manual_seed(params.base.seed)
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
        curve_budgets=list(cfg.curve_budgets),
    )
    storage = storage_uri(storage_path)
    check_shared_storage(storage, "tune.storage")  # several nodes: each must see it, or trials lose checkpoints
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
                metric=metric, mode=MODE, num_samples=cfg.num_samples,
                reuse_actors=False,  # a stopped trial's actor must die, taking its Train controller with it
                search_alg=searcher(cfg, params.base.seed, resources.max_concurrent),
                # ASHA whose rungs come back with the sweep on Tuner.restore (Ray's start empty, and a
                # resumed trial's final score fell through to rung 1: issue 22.10, dynadapter/asha.py)
                scheduler=ResumableASHA(time_attr="epoch", max_t=cfg.epochs,
                                        grace_period=min(cfg.scheduler.grace_period, cfg.epochs),
                                        reduction_factor=cfg.scheduler.reduction_factor),
            ),
            run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=callbacks, verbose=verbose,
                                      failure_config=tune.FailureConfig(max_failures=cfg.max_failures)),
        )
    start = time.perf_counter()
    results = tuner.fit()
    outcome = _outcome(results, params.train, metric)
    outcome.seconds = add_sweep_seconds(experiment, time.perf_counter() - start)
    return outcome


SECONDS_FILE = "dynadapter_seconds.json"


def add_sweep_seconds(experiment: str, seconds: float) -> float:
    """Adds `seconds` to the wall time recorded in the experiment folder (a local path or a URI) and returns the
    total: a sweep resumed from its finished state reports the time it took, not the second the resume took."""
    fs, path = storage_file(experiment, SECONDS_FILE)
    total = seconds + float((read_storage_json(fs, path) or {"seconds": 0.0})["seconds"])
    write_storage_json(fs, path, {"seconds": total})
    return total


def searcher(cfg: TuneConfig, seed: int, max_concurrent: int):
    """tune.searcher as a Ray Tune search algorithm, seeded by base.seed, at most `max_concurrent` trials at
    once: random draws (BasicVariantGenerator), or Optuna's TPE (multivariate, its first
    tune.startup_trials at random). Tune saves either with the experiment, so a resumed sweep goes on
    drawing where it stopped."""
    if cfg.searcher == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.startup_trials, multivariate=True)
    return ConcurrencyLimiter(OptunaSearch(sampler=sampler), max_concurrent=max_concurrent)


HISTORY_KEYS = ("epoch", *OBJECTIVES.values(), "val_budget_fraction", "val_acc_mean", "val_acc_last", "train_loss",
                "step_seconds")


def _history(df) -> list[dict[str, float]]:
    """A trial's reported metrics, one row per report (epoch), numeric columns only."""
    if df is None or "epoch" not in getattr(df, "columns", []):
        return []
    df = df[df["epoch"].notna()]  # a stopped trial's last result is only its reason
    cols = [c for c in df.columns if c in HISTORY_KEYS or c.startswith(f"{METRIC}_")]
    return [{k: float(v) for k, v in row.items() if v == v} for row in df[cols].to_dict("records")]


def _reports(df, saved: list[dict[str, Any]]):
    """A trial's per-epoch results: Tune's (`df`) joined with those the scheduler saved (`saved`), one row per
    epoch. After an interrupted sweep is restored, Tune's record of a trial that restarted holds only the epochs
    reported since the restart; the scheduler's file (dynadapter/asha.py) holds the ones before."""
    import pandas as pd

    if not saved:
        return df
    parts = [pd.DataFrame(saved)] + ([df] if df is not None and len(df) else [])
    joined = pd.concat(parts, ignore_index=True, sort=False)
    tail = joined[joined["epoch"].isna()] if "epoch" in joined.columns else joined.iloc[0:0]
    per_epoch = joined[joined["epoch"].notna()].groupby("epoch", sort=True).last().reset_index()
    return pd.concat([per_epoch, tail], ignore_index=True, sort=False)  # a stopped trial's reason stays last


def _outcome(results, train: TrainConfig, metric: str = METRIC) -> TuneOutcome:
    from dynadapter.asha import saved_results

    saved = saved_results(str(results.experiment_path))
    rows = []
    histories = {}
    for r in results:
        last = r.metrics or {}
        df = _reports(r.metrics_dataframe, saved.get(str(last.get("trial_id")), []))
        has = df is not None and metric in getattr(df, "columns", [])
        config = {k: v for k, v in (r.config or {}).items()}
        stopped = last.get(STOPPED) if isinstance(last.get(STOPPED), str) else None
        if stopped and has and df[metric].notna().any():  # figures of its last epoch, before it stopped
            last = {**df[df[metric].notna()].iloc[-1].to_dict(), "trial_id": last.get("trial_id")}
        elif has and "epoch" in df.columns and df["epoch"].notna().any():
            latest = df[df["epoch"].notna()].iloc[-1]  # Tune's last result may be older than the saved ones
            if float(latest["epoch"]) > float(last.get("epoch", 0) or 0):
                last = {**last, **latest.dropna().to_dict()}
        rows.append({
            "trial_id": last.get("trial_id"),
            **{key: float(df[key].max()) if has and key in df.columns else float("nan")
               for key in OBJECTIVES.values()},  # both, whichever the search maximised
            f"{metric}_last": float(last[metric]) if metric in last else float("nan"),
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
    scored = [row for row in rows if row["error"] is None and not math.isnan(row[metric])]
    if not scored:
        errors = "; ".join(str(row["error"]) for row in rows)
        raise RuntimeError(f"no tune trial finished with a {metric}: {errors}")
    best_row = max(scored, key=lambda row: row[metric])  # the first on ties
    best = next(r for r in results if r.path == best_row["path"])
    return TuneOutcome(
        metric=metric,
        best_metric=best_row[metric],
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
