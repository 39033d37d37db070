"""Adapt one task end to end: train on train, select and calibrate on val, report on test.

The one code path behind the benchmark, the train/evaluate stages and the tune trials, so every method is
measured the same way: same data, same trainer, same calibration, same MACs accounting.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dynadapter.atomic import replacing
from dynadapter.config import BackboneConfig, DeepSpeedConfig, ModelConfig, TrainConfig
from dynadapter.devices import to_host
from dynadapter.data import load_split_tensors, read_manifest
from dynadapter.inference import (
    calibrate,
    calibrate_drop,
    compare_modes,
    collect_exit_logits,
    dynamic_vs_full,
    evaluate_thresholds,
    measure_stage_costs,
    pareto_front,
    sweep,
    validation_path_stats,
)
from dynadapter.models import build_model, count_parameters, create_backbone, merge_petl, normalization
from dynadapter.models.dyn_vit import DynAdapterViT
from dynadapter.train import CheckpointMismatchError, fit, fit_resumable, load_trainable_state, trainable_state


@dataclass
class TaskData:
    """A task's splits as (images, labels) tensors; a split not loaded is None (a train worker never gets test,
    an evaluate worker never gets train).

    `norm` None: the images are float32, normalised. `norm` (mean, std): they are uint8 [N, 3, H, W], 4x
    smaller, the form in which they travel to Ray workers, and every consumer normalises per batch on the
    device the batch is used on (`normalizing_inputs`), with the same float ops as `dynadapter.data.normalize`:
    the values a model sees are exactly the float32 ones."""

    train: tuple[torch.Tensor, torch.Tensor] | None
    val: tuple[torch.Tensor, torch.Tensor] | None
    test: tuple[torch.Tensor, torch.Tensor] | None
    num_classes: int
    norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def only(self, *splits: str) -> TaskData:
        """The same data with every split not named dropped (None)."""
        return replace(self, **{s: None for s in ("train", "val", "test") if s not in splits})


SPLITS = ("train", "val", "test")


def load_task(data_root: str | Path, task: str, img_size: int, mean, std, *,
              splits: tuple[str, ...] = SPLITS, uint8: bool = False) -> TaskData:
    """`splits` of a prepared task (the others None): float32 normalised, or with `uint8` decoded only, with
    (mean, std) kept for per-batch normalisation where they are used (see TaskData)."""
    manifest = read_manifest(data_root, task)
    if uint8:
        from dynadapter.data import load_split_images

        loaded = {s: load_split_images(data_root, task, s, img_size) for s in splits}
        norm = (tuple(float(v) for v in mean), tuple(float(v) for v in std))
    else:
        loaded = {s: load_split_tensors(data_root, task, s, img_size, mean, std) for s in splits}
        norm = None
    return TaskData(loaded.get("train"), loaded.get("val"), loaded.get("test"), int(manifest["num_classes"]), norm)


@dataclass(frozen=True)
class TaskSource:
    """Where a task's prepared data is and how to load it (`load_task` arguments): what a Ray task that reads the
    Parquet itself receives instead of the images. `root` is absolute, so it means the same in any working dir."""

    root: str
    task: str
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def load(self, splits: tuple[str, ...] = SPLITS, *, uint8: bool = True) -> TaskData:
        return load_task(self.root, self.task, self.img_size, self.mean, self.std, splits=splits, uint8=uint8)


def to_model_input(x: torch.Tensor, device: torch.device | str | None,
                   norm: tuple[Sequence[float], Sequence[float]] | None) -> torch.Tensor:
    """A batch as a model takes it, on `device` (None: where it is): uint8 images moved there first, then
    normalised there (`norm`: mean, std); float images only moved."""
    if device is not None:
        x = x.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        if norm is None:
            raise ValueError("uint8 images need (mean, std) to be normalised (TaskData.norm)")
        from dynadapter.data import normalize

        x = normalize(x, *norm)
    return x


@contextlib.contextmanager
def normalizing_inputs(models: Sequence[torch.nn.Module | None], norm):
    """Inside the block, each model normalises a uint8 image batch it is called with on its own device (a
    forward pre-hook: the trainer, `evaluate` and calibration move batches and call `model(x)` as with float
    images). Registered before a DeepSpeed strategy's cast hook, so the cast to bf16 sees normalised fp32. No-op
    for `norm` None (float data)."""
    if norm is None:
        yield
        return
    from dynadapter.devices import module_device

    def hook(module, args):
        if args and torch.is_tensor(args[0]) and args[0].dtype == torch.uint8:
            return (to_model_input(args[0], module_device(module), norm), *args[1:])
        return None

    handles = [m.register_forward_pre_hook(hook) for m in models if m is not None]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class Trained:
    """What training one task produces, before calibration (the train stage's output)."""

    task: str
    method: str
    early_exit: bool
    exits: list[int]
    params: dict[str, int]
    best_epoch: int
    train_seconds: float
    step_seconds: float  # mean wall time of one training step
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Evaluated:
    """Calibration on val at the budget, test figures at those thresholds, and the val-calibrated curve."""

    stage_macs: dict[str, Any]
    full_depth_macs: int
    calibration: dict[str, Any]  # thresholds chosen on val at the budget
    test: dict[str, Any]  # accuracy, macs, fraction, exit shares at those thresholds
    test_exit_accuracy: list[float]  # accuracy of each exit alone on test (static truncation at that exit)
    curve: list[dict[str, Any]] = field(default_factory=list)  # val-calibrated points, with test figures
    throughput: dict[str, Any] | None = None
    mode_comparison: dict[str, Any] | None = None  # calibration modes scored on held-out val halves
    calibrated_on: str = "val200"  # whose val logits chose the thresholds (see evaluate_task)
    # val counts along the fixed threshold grid (guarantee.PathStats.to_dict): what the served model needs to
    # certify a budget or an accuracy drop per request; kept out of per_task.json (the bundle holds it)
    path_stats: dict[str, Any] | None = None


@dataclass
class TaskResult:
    trained: Trained
    evaluated: Evaluated

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self.trained), **asdict(self.evaluated)}


def _exit_accuracy(exit_logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    return [float((lg.argmax(-1) == labels).float().mean()) for lg in exit_logits]


def full_depth_baseline(model_cfg: ModelConfig, train_cfg: TrainConfig) -> tuple[ModelConfig, TrainConfig]:
    """The paper's comparison for `model_cfg`: the same PETL module at full depth with one head, trained with
    the same budget (epochs, lr, batch, sparsity); with one head there are no per-exit loss weights and no
    self-distillation."""
    priority = train_cfg.priority.model_copy(update={"start": None, "end": None, "pattern": "flat"})
    return (model_cfg.model_copy(update={"early_exit": False, "exits": None}),
            train_cfg.model_copy(update={"priority": priority, "distill": 0.0}))


def train_task(
    task: str,
    data: TaskData,
    backbone_cfg: BackboneConfig,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    checkpoint: str | Path | Mapping[str, torch.Tensor] | None,
    *,
    seed: int = 0,
    checkpoint_path: str | Path | None = None,
    progress: bool | None = None,
    on_epoch_end=None,
    strategy=None,
    builder=None,
    objective=None,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[Trained, DynAdapterViT]:
    """Build the model on the frozen backbone and train it (selection on val); resumes from checkpoint_path.

    `checkpoint`: the backbone's weights, a file or a state dict already read (a Ray worker gets them from the
    object store). `builder(backbone_cfg, model_cfg, num_classes, sparsity, backbone=...)` replaces
    `build_model` and `objective` the multi-exit loss (see `fit`): how a rival method (bench/peers.py) trains on
    the same path. rank / world_size: this process's share of data-parallel training (see `fit`)."""
    model = build_for_training(data, backbone_cfg, model_cfg, train_cfg, checkpoint, seed=seed, builder=builder)
    start = time.perf_counter()
    kwargs = dict(seed=seed, progress=progress, on_epoch_end=on_epoch_end, strategy=strategy, objective=objective,
                  rank=rank, world_size=world_size)
    with normalizing_inputs([model], data.norm):  # uint8 data (a Ray worker's): normalised per batch on device
        if checkpoint_path is not None:
            result = fit_resumable(model, data.train, data.val, train_cfg, checkpoint_path=checkpoint_path, **kwargs)
        else:
            result = fit(model, data.train, data.val, train_cfg, **kwargs)
    # a run resumed from a checkpoint counts the epochs it restored at the time they took then (their `seconds`),
    # not the moment it took to read them back
    restored = sum(h.get("seconds", 0.0) for h in result.history[: result.resumed_from or 0])
    return trained_record(task, model_cfg, model, result.history, result.best_epoch,
                          time.perf_counter() - start + restored), model


def build_for_training(data: TaskData | int, backbone_cfg: BackboneConfig, model_cfg: ModelConfig,
                       train_cfg: TrainConfig, checkpoint: str | Path | Mapping[str, torch.Tensor] | None, *,
                       seed: int = 0, builder=None) -> DynAdapterViT:
    """The model `train_task` trains, before training: the same seed, so the same initial PETL and head weights
    wherever it is built (here, on a Ray worker, or to receive weights trained elsewhere). `data`: the task's
    data, or only its number of classes (all that is read here)."""
    num_classes = data if isinstance(data, int) else data.num_classes
    torch.manual_seed(seed)
    if isinstance(checkpoint, Mapping):
        backbone = create_backbone(backbone_cfg.model_copy(update={"checkpoint": None}))
        backbone.load_state_dict(checkpoint)
    else:
        backbone = create_backbone(backbone_cfg, checkpoint)
    return (builder or build_model)(backbone_cfg, model_cfg, num_classes, train_cfg.sparsity,
                                    backbone=backbone)


def trained_record(task: str, model_cfg: ModelConfig, model: DynAdapterViT, history: list[dict[str, Any]],
                   best_epoch: int, train_seconds: float) -> Trained:
    """The `Trained` record of a finished fit (its per-epoch history and selected epoch)."""
    steps = max(1, sum(h.get("steps", 0) for h in history))
    step_seconds = sum(h.get("seconds", 0.0) for h in history) / steps
    return Trained(task=task, method=model_cfg.petl.method, early_exit=model_cfg.early_exit,
                   exits=list(model.exits), params=count_parameters(model), best_epoch=best_epoch,
                   train_seconds=train_seconds, step_seconds=step_seconds, history=history)


CALIBRATION_DIR = "calibration"  # beside a `standard`-protocol model: the donor its thresholds come from


def trainval_data(data: TaskData) -> TaskData:
    """train800 ∪ val200 as the training set and no validation split: the standard protocol's final fit."""
    x = torch.cat([data.train[0], data.val[0]])
    y = torch.cat([data.train[1], data.val[1]])
    return TaskData((x, y), None, data.test, data.num_classes, data.norm)


def final_schedule(train_cfg: TrainConfig, best_epoch: int) -> TrainConfig:
    """The standard protocol's final run: `best_epoch` epochs (what the selection run chose on val200), the full
    warm-up + cosine over them, the warm-up scaled by the same factor as the run (warmup_epochs x best_epoch /
    epochs). Unscaled, a selected epoch at or below the warm-up (ViT-B/16 preset: 10 warm-up epochs) would make
    the whole final run warm-up."""
    return train_cfg.model_copy(update={"epochs": best_epoch,
                                        "warmup_epochs": train_cfg.warmup_epochs * best_epoch / train_cfg.epochs})


def retrain_on_trainval(task: str, data: TaskData, backbone_cfg: BackboneConfig, model_cfg: ModelConfig,
                        train_cfg: TrainConfig, checkpoint: str | Path | None, selected: Trained,
                        **train_kwargs) -> tuple[Trained, DynAdapterViT]:
    """The model the standard VTAB-1k protocol (NOAH, DyT, the paper) reports: a fresh model trained on
    train800val200 for the epoch count the train800-only run `selected` chose on val200, with the same
    settings and seed, its last epoch kept (nothing is left to select on), on `final_schedule`."""
    cfg = final_schedule(train_cfg, selected.best_epoch)
    return train_task(task, trainval_data(data), backbone_cfg, model_cfg, cfg, checkpoint, **train_kwargs)


def retrain_for_calibration(task: str, data: TaskData, backbone_cfg: BackboneConfig, model_cfg: ModelConfig,
                            train_cfg: TrainConfig, checkpoint: str | Path | None, selected: Trained,
                            **train_kwargs) -> tuple[Trained, DynAdapterViT]:
    """The standard protocol's threshold donor: trained as `retrain_on_trainval` trains the reported model (same
    `final_schedule`, settings and seed, last epoch kept) but on train800 only, so val200 is new to it and its
    val confidences are those of the reported model's kind of run on unseen images. The train800-only model of
    the selection run is no such donor: it was stopped mid-schedule at the epoch val200 liked best."""
    cfg = final_schedule(train_cfg, selected.best_epoch)
    train_only = TaskData(data.train, None, data.test, data.num_classes, data.norm)
    return train_task(task, train_only, backbone_cfg, model_cfg, cfg, checkpoint, **train_kwargs)


def accelerator_strategy(ds: DeepSpeedConfig | None = None):
    """How a stage trains on this machine: on a CUDA GPU, a DeepSpeed engine configured by `ds` (a one-rank
    NCCL group; bf16 where the GPU supports it under precision `auto`), the path tune trials take; else None
    (plain AdamW on the CPU)."""
    if not torch.cuda.is_available():
        return None
    from dynadapter.train.deepspeed import deepspeed_strategy

    return deepspeed_strategy(ds)


def accelerator() -> torch.device | None:
    """The CUDA device when there is one (the evaluate stage runs its forward passes there), else None."""
    return torch.device("cuda") if torch.cuda.is_available() else None


@contextlib.contextmanager
def placed_on(models: list[torch.nn.Module], device: torch.device | str | None):
    """`models` on `device` inside the block and on the CPU again after it (no-op for None / CPU).

    The CPU tensors are kept and put back, not copied back from the device: nothing changes them inside the
    block, it saves the device-to-host copy, and it also works for `meta` (the tests' fake accelerator), which
    holds no values to copy back."""
    if device is None or torch.device(device).type == "cpu":
        yield
        return
    modules = [mod for m in models for mod in m.modules()]
    params = [(mod, name, p.data, p.requires_grad) for mod in modules for name, p in mod._parameters.items()
              if p is not None]
    buffers = [(mod, name, b) for mod in modules for name, b in mod._buffers.items() if b is not None]
    for m in models:
        m.to(device)
    try:
        yield
    finally:
        for mod, name, data, requires_grad in params:  # new Parameters: `.data =` refuses a meta -> CPU change
            mod._parameters[name] = torch.nn.Parameter(data, requires_grad=requires_grad)
        for mod, name, b in buffers:
            mod._buffers[name] = b


def merged_for_inference(model: DynAdapterViT, thresholds: list[float] | None = None) -> DynAdapterViT:
    """`model` in eval mode with its PETL folded into the frozen weights (Rep-Adapter / LoRA then cost nothing
    at inference) and, if given, its exit thresholds set: the state `evaluate_task` leaves a model in."""
    model.eval()
    merge_petl(model)
    if thresholds is not None:
        model.set_thresholds(thresholds)
    return model


def evaluate_task(model: DynAdapterViT, data: TaskData, *, budget: float = 0.5,
                  throughput_batch: int = 0, repeats: int = 5, calibration: str = "path",
                  calibration_model: DynAdapterViT | None = None,
                  device: torch.device | str | None = None, budget_confidence: float | None = None,
                  target: str = "budget", max_drop: float = 0.02, drop_confidence: float = 0.9) -> Evaluated:
    """Merge PETL, calibrate thresholds on val for `budget` (`calibration`: path | search, see
    `dynadapter.inference.calibrate`; `budget_confidence`: certified at that probability, see
    `dynadapter.inference.guarantee`) or, with `target` "accuracy_drop", for an accuracy drop against the last
    exit of at most `max_drop` certified at `drop_confidence`, then evaluate once on test (and the
    val-calibrated threshold sweep, at `budget_confidence`, on test). Both calibration modes are also scored on held-out val halves (`mode_comparison`), so whether
    `search` beats the default can be judged without test. `throughput_batch` > 0 also times compacted
    dynamic inference against full depth on that many test images, on `device`. Leaves the model merged, in
    eval mode, holding the calibrated thresholds. Reads only `data.val` and `data.test`; uint8 images
    (TaskData.norm) are normalised batch by batch on `device`.

    calibration_model: a model of the same architecture whose val logits choose the thresholds (and the sweep)
    instead of `model`'s own: under the standard protocol `model` has trained on val200, so its val
    confidences are optimistic; the threshold donor (`retrain_for_calibration`) has not seen val200 and was
    trained on the same schedule, so its val confidences behave like the reported model's on new images.
    device: where the val/test forward passes and the throughput timing run (e.g. a GPU); MACs are measured,
    and the model is left, on the CPU."""
    merged_for_inference(model)
    costs = measure_stage_costs(model)
    if calibration_model is not None:
        merged_for_inference(calibration_model)
    val_y, test_y = data.val[1], data.test[1]
    models = [m for m in (model, calibration_model) if m is not None]
    with placed_on(models, device), normalizing_inputs(models, data.norm):
        val_logits = to_host(collect_exit_logits(calibration_model or model, data.val[0]))
        test_logits = to_host(collect_exit_logits(model, data.test[0]))

        if target == "accuracy_drop":
            cal = calibrate_drop(val_logits=val_logits, val_labels=val_y, costs=costs, max_drop=max_drop,
                                 confidence_level=drop_confidence, confidence=model.confidence)
        else:
            cal = calibrate(val_logits=val_logits, val_labels=val_y, costs=costs, budget_fraction=budget,
                            confidence=model.confidence, mode=calibration, budget_confidence=budget_confidence)
        model.set_thresholds(cal.thresholds)
        ev = evaluate_thresholds(test_logits, test_y, cal.thresholds, costs, model.confidence)

        curve, modes, stats = [], None, None
        if len(model.exits) > 1:
            stats = validation_path_stats(val_logits=val_logits, val_labels=val_y, costs=costs,
                                          confidence=model.confidence).to_dict()
            points = sweep(val_logits=val_logits, val_labels=val_y, costs=costs, confidence=model.confidence,
                           mode=calibration, budget_confidence=budget_confidence)
            modes = compare_modes(val_logits=val_logits, val_labels=val_y, costs=costs, budget_fraction=budget,
                                  confidence=model.confidence)
            front = {id(p) for p in pareto_front(points)}
            for p in points:
                t = evaluate_thresholds(test_logits, test_y, p.thresholds, costs, model.confidence)
                curve.append({
                    "thresholds": p.thresholds, "val_accuracy": p.accuracy, "val_fraction": p.fraction,
                    "budget": p.budget_fraction, "test_accuracy": t.accuracy, "test_macs": t.macs,
                    "test_fraction": t.fraction, "val_pareto": id(p) in front,
                })

        throughput = None
        if throughput_batch > 0:
            # timed where the model is (inside the block: on `device`), the batch moved and normalised there
            # first, so neither the copy nor the normalisation is timed
            x = to_model_input(data.test[0][:throughput_batch], device, data.norm)
            throughput = asdict(dynamic_vs_full(model, x, cal.thresholds, repeats=repeats))

    return Evaluated(
        stage_macs=costs.to_dict(),
        full_depth_macs=costs.full_depth_baseline(),
        calibration=asdict(cal),
        test=asdict(ev),
        test_exit_accuracy=_exit_accuracy(test_logits, test_y),
        curve=curve,
        throughput=throughput,
        mode_comparison=modes,
        calibrated_on="val200, threshold donor (train800 only)" if calibration_model is not None else "val200",
        path_stats=stats,
    )


def curve_at_budgets(curve: list[dict[str, Any]], budgets: list[float]) -> dict[float, dict[str, Any]]:
    """The val-calibrated point of `curve` (Evaluated.curve) for each budget in `budgets`.

    `sweep` keeps one point per distinct threshold set, labelled with the lowest budget that chose it, so a
    budget whose thresholds equal a lower budget's has no label of its own: its point is the one of the
    largest labelled budget at or below it. Budgets below every feasible one are left out."""
    labelled = sorted((p for p in curve if p.get("budget") is not None), key=lambda p: p["budget"])
    out = {}
    for b in budgets:
        below = [p for p in labelled if p["budget"] <= b + 1e-9]
        if below:
            out[b] = below[-1]
    return out


def adapt_task(
    task: str,
    data: TaskData,
    backbone_cfg: BackboneConfig,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    checkpoint: str | Path | None,
    *,
    budget: float = 0.5,
    seed: int = 0,
    throughput_batch: int = 0,
    repeats: int = 5,
    **train_kwargs,
) -> tuple[TaskResult, DynAdapterViT]:
    """train_task then evaluate_task: the whole measurement of one method on one task."""
    trained, model = train_task(task, data, backbone_cfg, model_cfg, train_cfg, checkpoint, seed=seed,
                                **train_kwargs)
    evaluated = evaluate_task(model, data, budget=budget, throughput_batch=throughput_batch, repeats=repeats)
    return TaskResult(trained, evaluated), model


# ------------------------------------------------------------------------------ trained adapters on disk

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_INFO = "adapter.json"


def save_trained(model: DynAdapterViT, trained: Trained, out_dir: str | Path, *, backbone_cfg: BackboneConfig,
                 model_cfg: ModelConfig, num_classes: int) -> Path:
    """Write the trained parameters (PETL + heads: small) and what rebuilds the model around them.

    The frozen backbone is not copied: it is the backbone checkpoint the model was built on."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in trainable_state(model).items()}
    with replacing(out / ADAPTER_FILE) as tmp:
        save_file(state, str(tmp))
    info = {
        "backbone": backbone_cfg.model_dump(mode="json"),
        "model": model_cfg.model_dump(mode="json"),
        "num_classes": num_classes,
        "trained": asdict(trained),
    }
    (out / ADAPTER_INFO).write_text(json.dumps(info, indent=2))
    return out


def load_trained(out_dir: str | Path, checkpoint: str | Path | None) -> tuple[DynAdapterViT, Trained, ModelConfig]:
    """Rebuild a model saved by `save_trained` on the backbone `checkpoint` (unmerged, eval mode).

    A missing, truncated or corrupt file, or weights that do not fit the architecture the JSON describes
    (another model, PETL method or number of classes), raise CheckpointMismatchError naming the file (and
    the keys and shapes)."""
    out = Path(out_dir)
    info_path, weights_path = out / ADAPTER_INFO, out / ADAPTER_FILE
    try:
        info = json.loads(info_path.read_text())
        backbone_cfg = BackboneConfig.model_validate(info["backbone"])
        model_cfg = ModelConfig.model_validate(info["model"])
        num_classes = int(info["num_classes"])
        trained = Trained(**info["trained"])
    except Exception as err:  # OSError, JSONDecodeError, KeyError, ValidationError, TypeError
        detail = " ".join(str(err).split())[:400]  # pydantic names the field on its second line
        raise CheckpointMismatchError(f"{info_path}: unreadable trained-model description "
                                      f"({type(err).__name__}: {detail})") from err
    model = build_model(backbone_cfg, model_cfg, num_classes, None, checkpoint)
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # FileNotFoundError, SafetensorError (truncated / not safetensors)
        raise CheckpointMismatchError(
            f"{weights_path}: unreadable trained weights ({type(err).__name__}: {err})") from err
    load_trainable_state(model, state, source=weights_path)
    model.eval()
    return model, trained, model_cfg


def task_sources(base, tasks: Sequence[str] | None = None) -> dict[str, TaskSource]:
    """{task: where it is in base.paths.data (made absolute) and how base.backbone wants it resized and
    normalised} for `tasks` (default base.tasks)."""
    mean, std = normalization(create_backbone(base.backbone))  # built once, for its pretrained_cfg
    return {task: _source(base, task, mean, std) for task in (base.tasks if tasks is None else tasks)}


def task_source(base, task: str) -> TaskSource:
    """Where `task` is in base.paths.data (made absolute) and how base.backbone wants it resized and normalised."""
    return task_sources(base, [task])[task]


def _source(base, task: str, mean, std) -> TaskSource:
    return TaskSource(str(Path(base.paths.data).resolve()), task, base.backbone.img_size,
                      tuple(float(v) for v in mean), tuple(float(v) for v in std))


def load_task_for(base, task: str, *, splits: tuple[str, ...] = SPLITS, uint8: bool = False) -> TaskData:
    """A task from base.paths.data, resized and normalised as base.backbone expects (`splits` only; `uint8`:
    decoded, normalised later per batch, see TaskData)."""
    return task_source(base, task).load(splits, uint8=uint8)
