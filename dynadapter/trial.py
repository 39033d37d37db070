"""One tune trial's training on one rank: its spec, the per-task runs (model, DeepSpeed strategy, masks,
shuffle stream) trained an epoch at a time and scored on val at the budget, and the Ray Train worker loop that
reports and checkpoints them every epoch. `dynadapter.tune` runs it inside Tune trials,
`dynadapter.distributed.train_on_ray` on its own."""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dynadapter.config import DeepSpeedConfig, TrainConfig
from dynadapter.devices import to_host, worker_device

METRIC = "val_budget_acc"  # mean over tune tasks of val accuracy at tune.budget, thresholds calibrated on val
CURVE_METRIC = "val_curve_acc"  # ... of the mean val accuracy over tune.curve_budgets, each calibrated on val
OBJECTIVES = {"budget": METRIC, "curve": CURVE_METRIC}  # tune.objective -> the metric the search maximises


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
    curve_budgets: list[float] = field(default_factory=lambda: [1.0])  # CURVE_METRIC's budgets
    record_masks: bool = False  # keep a digest of every step's gradient masks in the state (equivalence checks)
    gpus_key: str = "tune.ray.gpus_per_worker"  # the params key a GPU worker that asked for none is told to set


class TaskRun:
    """One task's model, DeepSpeed strategy, gradient masker and shuffle stream on one rank: trained an epoch
    at a time (so a trial can interleave its tasks and report after every epoch) and scored on val.

    The same pieces `fit` uses (`run_epoch`, `iterate_batches` sharded by rank, `GradientMasker`, the priority
    schedule); `state()` / `load()` round-trip everything, so a resumed trial continues exactly."""

    def __init__(self, task: str, data, spec: TrialSpec, backbone_state: Mapping[str, torch.Tensor], *,
                 rank: int = 0, world_size: int = 1):
        from dynadapter.adapt import normalizing_inputs
        from dynadapter.config import BackboneConfig, ModelConfig
        from dynadapter.inference import measure_stage_costs
        from dynadapter.models import build_model, create_backbone, merge_petl
        from dynadapter.train.deepspeed import DeepSpeedStrategy
        from dynadapter.train.loop import num_batches, priority_schedule, rank_dropout
        from dynadapter.train.sparsity import GradientMasker

        self.task, self.data, self.rank, self.world_size = task, data, rank, world_size
        self.cfg = TrainConfig.model_validate(spec.train)
        self.budget, self.curve_budgets = spec.budget, list(spec.curve_budgets)
        backbone_cfg = BackboneConfig.model_validate(spec.backbone)
        torch.manual_seed(spec.seed)  # same initial heads/PETL weights in every trial and on every rank
        backbone = create_backbone(backbone_cfg)
        backbone.load_state_dict(backbone_state)
        self.model = build_model(backbone_cfg, ModelConfig.model_validate(spec.model), data.num_classes,
                                 self.cfg.sparsity, backbone=backbone)
        # uint8 images (a TaskData with `norm`) are normalised per batch on the model's device; registered before
        # the DeepSpeed strategy's cast hook, so a bf16 engine gets normalised values to cast
        self._inputs = contextlib.ExitStack()
        self._inputs.enter_context(normalizing_inputs([self.model], getattr(data, "norm", None)))
        merged = copy.deepcopy(self.model).eval()
        merge_petl(merged)  # budgets count what inference runs: merged Rep-Adapter / LoRA cost nothing
        self.costs = measure_stage_costs(merged)
        del merged
        self.steps_per_epoch = num_batches(data.train, self.cfg.batch_size, world_size)
        self.strategy = DeepSpeedStrategy(self.model, self.cfg, self.steps_per_epoch,
                                          DeepSpeedConfig.model_validate(spec.deepspeed),
                                          device=worker_device(spec.gpus_key))  # Ray's assignment
        self.schedule = priority_schedule(self.model, self.cfg)
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
            epoch=self.epoch + 1, dropout=self.dropout, device=self.strategy.device,
        )
        self.epoch += 1
        return metrics

    @torch.no_grad()
    def score(self) -> dict[str, Any]:
        """Calibrate exit thresholds on val at the budget, and at each curve budget: the val accuracies they
        reach are the trial metrics (METRIC at tune.budget, CURVE_METRIC their mean over the curve)."""
        from dynadapter.inference import calibrate, collect_exit_logits, curve_accuracy

        x, y = self.data.val
        logits = to_host(collect_exit_logits(self.model, x))  # calibration runs on the CPU
        cal = calibrate(val_logits=logits, val_labels=y, costs=self.costs, budget_fraction=self.budget,
                        confidence=self.model.confidence)
        curve = curve_accuracy(val_logits=logits, val_labels=y, costs=self.costs, budgets=self.curve_budgets,
                               confidence=self.model.confidence)
        per_exit = [float((lg.argmax(-1) == y).float().mean()) for lg in logits]
        return {METRIC: cal.val_accuracy, CURVE_METRIC: curve, "val_budget_fraction": cal.fraction,
                "val_budget_feasible": cal.feasible, "val_acc_mean": sum(per_exit) / len(per_exit),
                "val_acc_last": per_exit[-1]}

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "model": self.strategy.weights(), "strategy": self.strategy.state_dict(),
                "shuffle": self.shuffle.get_state(),
                "masker": self.masker.state_dict() if self.masker is not None else None,
                "mask_digests": list(self.masker.digests or []) if self.masker is not None else []}

    def load(self, state: Mapping[str, Any]) -> None:
        from dynadapter.train.checkpoint import load_trainable_state

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
        self._inputs.close()


class TrialTrainer:
    """All tune tasks of one trial on one rank; `step()` trains every task one epoch and returns the metrics
    Tune sees (the mean over tasks of each score, plus per-task `val_budget_acc_<task>`)."""

    def __init__(self, spec: TrialSpec, data: Mapping[str, Any], backbone_state, *, rank: int = 0,
                 world_size: int = 1):
        self.spec = spec
        self.runs = [TaskRun(t, data[t], spec, backbone_state, rank=rank, world_size=world_size)
                     for t in spec.tasks]
        torch.manual_seed(spec.seed)  # dropout draws: one stream, tasks in a fixed order
        self.metrics: dict[str, Any] | None = None  # the last epoch's, kept in the checkpoint

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
        keys = ("train_loss", METRIC, CURVE_METRIC, "val_budget_fraction", "val_acc_mean", "val_acc_last",
                "step_seconds")
        metrics: dict[str, Any] = {"epoch": self.epoch}
        metrics.update({k: sum(float(m[k]) for m in per_task.values()) / len(per_task) for k in keys})
        metrics.update({f"{METRIC}_{t}": float(m[METRIC]) for t, m in per_task.items()})
        self.metrics = metrics
        return metrics

    def state(self) -> dict[str, Any]:
        return {"tasks": {r.task: r.state() for r in self.runs}, "torch_rng": torch.get_rng_state(),
                "metrics": self.metrics}

    def load(self, state: Mapping[str, Any]) -> None:
        for r in self.runs:
            r.load(state["tasks"][r.task])
        torch.set_rng_state(state["torch_rng"])
        self.metrics = state.get("metrics")

    def close(self) -> None:
        for r in self.runs:
            r.close()


def train_worker(config: dict) -> None:
    """Ray Train `train_loop_per_worker`: train the trial's tasks epoch by epoch, report the val metrics and a
    checkpoint every epoch (each rank writes its own file into the epoch's checkpoint directory: under ZeRO
    1/2 optimizer state is per rank), resume from the run's latest checkpoint after a failure."""
    import ray
    import ray.train

    from dynadapter.train.checkpoint import rank_file

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
        if checkpoint is not None and trainer.metrics is not None:
            # The restored epoch's result again: a tune driver killed after Ray Train registered this checkpoint
            # but before the scheduler saw its result would otherwise never see it (ASHA records a rung once,
            # so a result it did see counts once).
            ray.train.report({**trainer.metrics, "resumed_from": resumed_from})
        while trainer.epoch < trainer.epochs:
            metrics = {**trainer.step(), "resumed_from": resumed_from}
            with tempfile.TemporaryDirectory() as d:
                torch.save(trainer.state(), Path(d) / rank_file(rank))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_dir_name=f"epoch_{trainer.epoch:04d}")
    finally:
        trainer.close()
