"""The training loop: prioritized multi-exit loss, gradient masking, model selection on validation only, and
exactly-resumable runs (the optimizer and LR schedule are in `optim`, the checkpoint files in `checkpoint`).

It is built from parts the distributed (Ray Train + DeepSpeed) trainer reuses: `train_step` and `run_epoch`
never touch an optimizer, they call a `Strategy` (`backward(loss)`, `step()`); `AdamWStrategy` is the plain
PyTorch one, a DeepSpeed strategy wraps an engine instead (see `Strategy`).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dynadapter.atomic import stale_temporaries
from dynadapter.config import OptimConfig, TrainConfig
from dynadapter.devices import module_device, to_host
from dynadapter.train.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointMismatchError,
    frozen_fingerprint,
    load_checkpoint,
    load_trainable_state,
    save_checkpoint,
)
from dynadapter.train.losses import PrioritySchedule, as_logits_list, multi_exit_loss
from dynadapter.train.optim import AdamWStrategy, Strategy, StrategyFactory
from dynadapter.train.sparsity import BatchDropout, GradientMasker

DataLike = Union[Dataset, tuple[torch.Tensor, torch.Tensor]]
Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss (or weights); the last checkpoint on disk is the last good one."""


# ------------------------------------------------------------------------------------------ data


def _check_data(data: DataLike, name: str) -> DataLike:
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ValueError(f"{name}: expected (X, y) tensors or a torch Dataset, got a sequence of {len(data)}")
        x, y = data
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"{name}: X and y must be tensors, got {type(x).__name__}, {type(y).__name__}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{name}: X has {x.shape[0]} samples but y has {y.shape[0]}")
        if y.dtype != torch.int64:
            raise TypeError(f"{name}: labels y must be int64 class indices, got {y.dtype}")
        return (x, y)
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise TypeError(f"{name}: expected (X, y) tensors or a sized torch Dataset, got {type(data).__name__}")
    return data


def iterate_batches(
    data: DataLike,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches in a seeded order. Tensor data is indexed directly; a Dataset goes through a DataLoader
    with the same index order, so both kinds draw the same random numbers.

    With world_size > 1 each rank gets every world_size-th index of the permutation, the tail cut so all ranks
    run the same number of steps (as DistributedSampler(drop_last=True)); all ranks must share the seed.
    """
    n = len(data[0]) if isinstance(data, tuple) else len(data)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if world_size > 1:
        order = order[: n - n % world_size][rank::world_size]
    if isinstance(data, tuple):
        x, y = data
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            yield x[idx], y[idx]
    else:
        # A DataLoader without its own generator draws its workers' base seed from the global RNG, which would
        # shift dropout's random stream: give it one, seeded from ours only when workers will use it.
        loader_gen = torch.Generator()
        if num_workers > 0:
            src = generator if generator is not None else torch.Generator().manual_seed(0)
            loader_gen.manual_seed(int(torch.randint(2**62, (1,), generator=src)))
        yield from DataLoader(
            data, batch_size=batch_size, sampler=order.tolist(), num_workers=num_workers, generator=loader_gen
        )


def num_batches(data: DataLike, batch_size: int, world_size: int = 1) -> int:
    """Batches per epoch that `iterate_batches` yields on each rank."""
    n = len(data[0]) if isinstance(data, tuple) else len(data)
    return math.ceil((n // world_size) / batch_size)


# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    X: torch.Tensor | Dataset,
    y: torch.Tensor | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
) -> list[float]:
    """Per-exit accuracy of `model` (every exit run on every sample) on (X, y), or on a Dataset X."""
    data = _check_data((X, y) if y is not None else X, "evaluate")
    device = module_device(model)
    was_training = model.training
    model.eval()
    correct: torch.Tensor | None = None
    n = 0
    try:
        for xb, yb in iterate_batches(data, batch_size, num_workers=num_workers):
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            logits = as_logits_list(model(xb))
            hits = torch.stack([(z.argmax(dim=-1) == yb).sum() for z in logits])
            correct = hits if correct is None else correct + hits
            n += yb.shape[0]
    finally:
        model.train(was_training)
    if correct is None:
        raise ValueError("evaluate: empty data")
    return [float(c) / n for c in to_host(correct)]


# ------------------------------------------------------------------------------------------ one step, one epoch


@dataclass
class StepOutput:
    loss: torch.Tensor  # detached scalar
    per_exit_ce: list[torch.Tensor]  # detached scalars
    batch_size: int


def train_step(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    strategy: Strategy,
    *,
    weights: Sequence[float] | None = None,
    masker: GradientMasker | None = None,
    distill: float = 0.0,
    temperature: float = 2.0,
    device: torch.device | str | None = None,
    epoch: int = 0,
    step: int = 0,
    objective: Objective | None = None,
) -> StepOutput:
    """One optimizer step: draw the gradient masks, forward all exits, weighted loss, backward, update.

    `objective(model, x, y)` -> (loss, per-output CEs) replaces the weighted multi-exit loss (a method with a
    training objective of its own, e.g. the DyT baseline); weights and distillation are then not used.
    A non-finite loss raises `NonFiniteLossError` *before* backward, so the weights are left untouched.
    `epoch` / `step` only label that error.
    """
    x, y = batch
    if device is not None:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if masker is not None and strategy.starts_step:
        masker.resample()
    if objective is not None:
        loss, ces = objective(model, x, y)
    else:
        loss, ces = multi_exit_loss(model(x), y, weights, distill, temperature)
    if not _finite(loss):
        raise NonFiniteLossError(f"non-finite training loss ({float(loss.detach())}) at epoch {epoch}, step {step}")
    strategy.backward(loss)
    strategy.step()
    return StepOutput(loss.detach(), ces, int(y.shape[0]))


def run_epoch(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    strategy: Strategy,
    schedule: PrioritySchedule | None,
    *,
    global_step: int,
    total_steps: int,
    masker: GradientMasker | None = None,
    distill: float = 0.0,
    temperature: float = 2.0,
    device: torch.device | str | None = None,
    epoch: int = 0,
    progress: tqdm | None = None,
    objective: Objective | None = None,
    dropout: BatchDropout | None = None,
) -> tuple[dict[str, Any], int]:
    """Train over `batches`; returns (train metrics, global step after the epoch).

    dropout: the model's dropout stream, keyed on the global step before each step (see `BatchDropout`).

    The priority weights follow training progress per step, t = global_step / (total_steps - 1), so the first
    step uses `start` and the last one `end`; schedule None weighs every output 1. Metrics: train_loss (the
    full objective, sample-weighted), train_ce (per exit), lr and priority (those of the epoch's last step),
    steps, and seconds (the epoch's training wall time: the only entry that differs between identical runs).
    """
    model.train()
    loss_sum: torch.Tensor | None = None
    ce_sum: torch.Tensor | None = None
    n = 0
    lr, weights = float("nan"), None
    started = time.perf_counter()
    steps = 0
    for i, batch in enumerate(batches):
        t = global_step / max(1, total_steps - 1)
        weights, lr = (schedule.weights(t) if schedule is not None else None), strategy.lr
        if dropout is not None:
            dropout.begin_step(global_step)
        out = train_step(
            model, batch, strategy, weights=weights, masker=masker, distill=distill, temperature=temperature,
            device=device, epoch=epoch, step=i + 1, objective=objective,
        )
        ces = torch.stack(out.per_exit_ce) * out.batch_size
        loss_sum = out.loss * out.batch_size if loss_sum is None else loss_sum + out.loss * out.batch_size
        ce_sum = ces if ce_sum is None else ce_sum + ces
        n += out.batch_size
        steps += 1
        global_step += 1
        if progress is not None and not progress.disable and not out.loss.is_meta:
            progress.update(1)
            progress.set_postfix(loss=f"{out.loss.item():.4f}", lr=f"{lr:.2e}", refresh=False)
    if n == 0:
        raise ValueError("run_epoch: no training batches")
    metrics = {
        "train_loss": float(to_host(loss_sum)) / n,
        "train_ce": [float(c) / n for c in to_host(ce_sum)],
        "lr": lr,
        "priority": list(weights) if weights is not None else [1.0] * len(ce_sum),
        "steps": steps,
        "seconds": time.perf_counter() - started,
    }
    return metrics, global_step


# ------------------------------------------------------------------------------------------ state and checkpoints

def _all_finite(model: nn.Module) -> bool:
    return all(_finite(p) for p in model.parameters() if p.requires_grad)


def _finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in `t` (a meta tensor, the tests' fake accelerator, holds no values to check)."""
    return t.is_meta or bool(torch.isfinite(t).all())



def _rng_state(shuffle: torch.Generator, masker: GradientMasker | None) -> dict:
    state = {"torch": torch.get_rng_state(), "shuffle": shuffle.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if masker is not None:
        state["masker"] = masker.state_dict()
    return state


def _set_rng_state(state: dict, shuffle: torch.Generator, masker: GradientMasker | None) -> None:
    torch.set_rng_state(state["torch"])
    shuffle.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if masker is not None and "masker" in state:
        masker.load_state_dict(state["masker"])



# ------------------------------------------------------------------------------------------ fit


@dataclass
class FitResult:
    history: list[dict[str, Any]]  # one metrics dict per epoch (all epochs, including those before a resume)
    best_epoch: int  # 1-based epoch whose weights the model holds now
    best_metric: float | None  # its selection metric (None without validation data)
    metric: str  # name of the selection metric
    resumed_from: int | None = None  # epochs already done in the checkpoint resumed from
    stopped_early: bool = False  # on_epoch_end asked to stop
    checkpoint_path: str | None = None


Selector = Union[str, Callable[[dict[str, Any]], float]]


def _selector(select: Selector) -> tuple[str, Callable[[dict[str, Any]], float]]:
    if callable(select):
        return getattr(select, "__name__", "custom"), lambda m: float(select(m))
    if not select.startswith("val_"):
        raise ValueError(f"select must name a validation metric (val_...), got {select!r}: never select on train/test")

    def score(metrics: dict[str, Any]) -> float:
        if not isinstance(metrics.get(select), (int, float)):
            scalars = sorted(k for k, v in metrics.items() if k.startswith("val_") and isinstance(v, (int, float)))
            raise ValueError(f"select={select!r} is not a scalar validation metric; available: {scalars}")
        return float(metrics[select])

    return select, score


def flatten_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Per-epoch metrics as flat scalars (train_ce_0, val_acc_2, priority_1, ...), e.g. for MLflow."""
    flat = {}
    for k, v in metrics.items():
        if isinstance(v, (list, tuple)):
            flat.update({f"{k}_{i}": float(x) for i, x in enumerate(v)})
        elif isinstance(v, (int, float)):
            flat[k] = float(v)
    return flat


def _load_for_resume(path: Path, run_id: dict, fingerprint: float) -> dict:
    ckpt = load_checkpoint(path)
    diff = sorted(k for k in run_id if ckpt["run"].get(k) != run_id[k])
    if diff:
        raise CheckpointMismatchError(
            f"{path}: written by a different run ({', '.join(diff)} differ); "
            "delete it to start over, or pass the original settings"
        )
    if not math.isclose(ckpt["frozen_fingerprint"], fingerprint, rel_tol=1e-6, abs_tol=1e-6):
        raise CheckpointMismatchError(f"{path}: the frozen backbone weights differ from the checkpoint's")
    return ckpt


def priority_schedule(model: nn.Module, cfg: OptimConfig) -> PrioritySchedule | None:
    """The configured schedule, checked against the model's exits; None (all weights 1) when there is none:
    a plain OptimConfig, a flat pattern without explicit weights, or a single-exit model without them."""
    prio = getattr(cfg, "priority", None)
    if prio is None:
        return None
    given = prio.start or prio.end
    num_exits = len(model.exits) if hasattr(model, "exits") else len(given or [None])
    if not given and (prio.pattern == "flat" or num_exits == 1):
        return None
    return PrioritySchedule.from_config(prio, num_exits)


def rank_dropout(model: nn.Module, cfg: OptimConfig, seed: int, rank: int = 0, world_size: int = 1
                 ) -> BatchDropout | None:
    """The rank-aware dropout stream `train.sparsity.dropout_stream: batch` asks for (None when the model has
    no dropout to draw, or for `global` and configs without sparsity: torch's global generator then)."""
    sparsity = getattr(cfg, "sparsity", None)
    if sparsity is None or sparsity.dropout_stream != "batch":
        return None
    dropout = BatchDropout(model, seed, rank=rank, world_size=world_size)
    return dropout if dropout.active else None


def fit(
    model: nn.Module,
    train: DataLike,
    val: DataLike | None = None,
    cfg: OptimConfig | None = None,
    *,
    seed: int = 0,
    checkpoint_path: str | Path | None = None,
    select: Selector = "val_acc_mean",
    on_epoch_end: Callable[[int, dict[str, Any]], bool | None] | None = None,
    progress: bool | None = None,
    strategy: StrategyFactory | None = None,
    eval_batch_size: int | None = None,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    objective: Objective | None = None,
) -> FitResult:
    """Train `model` (forward returns a tensor or a list of per-exit logits) and leave it holding the best
    weights by `select` on `val`.

    cfg: a TrainConfig (priority schedule, backward gradient masking, distillation) or a plain OptimConfig /
      PretrainConfig (plain CE on every output, no masking). Default: TrainConfig().
    select: a val metric name or a function of the epoch's metrics (higher is better; ties keep the earlier
      epoch). Default val_acc_mean, the mean of the per-exit val accuracies: dynamic inference uses every exit
      and calibrates thresholds afterwards, so the selected weights must be good at all exits, not only the
      last (for a single exit this is simply its accuracy). Without `val`, the last epoch is kept.
    checkpoint_path: written atomically after every epoch; if it exists, training resumes from it (a line on
      stderr names the file and the epoch) and continues exactly (same weights and history as an uninterrupted
      run). A finished run returns at once.
    on_epoch_end(epoch, metrics): called after the epoch's checkpoint is written (1-based epoch); return True
      to stop early (recorded in the checkpoint, so a resume does not continue).
    strategy: factory (model, cfg, steps_per_epoch) -> Strategy; default AdamWStrategy.
    progress: tqdm bar per epoch; None shows it only on a TTY.
    rank / world_size: data-parallel training (e.g. a DeepSpeed strategy under Ray Train): each rank trains on
      its share of every epoch's shuffled order (all ranks share `seed`); give each rank its own
      checkpoint_path, as optimizer state may be per rank. With `cfg.batch_size` = b/W per rank, a train set
      whose size W divides, and dropout_stream `batch`, W ranks train the weights 1 rank at batch b trains
      (up to float summation order; docs/distributed.md).
    objective: (model, x, y) -> (loss, per-output CEs), a training objective replacing the weighted multi-exit
      loss (see `train_step`).
    Raises NonFiniteLossError on a NaN/Inf loss or weights; no checkpoint with non-finite values is written.
    """
    cfg = cfg if cfg is not None else TrainConfig()
    train = _check_data(train, "train")
    val = _check_data(val, "val") if val is not None else None
    metric_name, score = _selector(select)
    progress = sys.stderr.isatty() if progress is None else progress
    eval_bs = eval_batch_size or max(cfg.batch_size, 256)
    steps_per_epoch = num_batches(train, cfg.batch_size, world_size)
    total_steps = cfg.epochs * steps_per_epoch
    schedule = priority_schedule(model, cfg)
    distill, temperature = (cfg.distill, cfg.distill_temperature) if isinstance(cfg, TrainConfig) else (0.0, 2.0)
    fingerprint = frozen_fingerprint(model)  # before the strategy may cast the model (bf16) or move it
    strat = (strategy or AdamWStrategy)(model, cfg, steps_per_epoch)
    device = strat.device  # where the strategy put the model: every batch, labels included, goes there
    shuffle = torch.Generator().manual_seed(seed)
    run_id = {
        "config": cfg.model_dump(mode="json"),
        "config_type": type(cfg).__name__,
        "seed": seed,
        "num_train": len(train[0]) if isinstance(train, tuple) else len(train),
        "steps_per_epoch": steps_per_epoch,
        "select": metric_name,
    }
    if world_size > 1:  # only then, so checkpoints written before this key existed still resume
        run_id["world_size"] = world_size
    ckpt_path = Path(checkpoint_path) if checkpoint_path is not None else None
    history: list[dict[str, Any]] = []
    best_epoch, best_metric, best_state = 0, None, None
    start_epoch, resumed_from, stopped = 0, None, False

    masker = None
    if isinstance(cfg, TrainConfig):
        trainable = [p for p in model.parameters() if p.requires_grad]
        masker = GradientMasker.from_config(trainable, cfg.sparsity, seed=seed + 1)
        masker = masker if masker.active else None
    dropout = rank_dropout(model, cfg, seed, rank, world_size)

    def checkpoint(epoch: int, stopped_early: bool) -> None:
        if ckpt_path is None:
            return
        save_checkpoint(
            {
                "format": CHECKPOINT_FORMAT,
                "run": run_id,
                "epoch": epoch,
                "global_step": epoch * steps_per_epoch,
                "stopped_early": stopped_early,
                "model": strat.weights(),
                "strategy": strat.state_dict(),
                "rng": _rng_state(shuffle, masker),
                "best": {"epoch": best_epoch, "metric": best_metric, "state": best_state},
                "history": history,
                "frozen_fingerprint": fingerprint,
            },
            ckpt_path,
        )

    was_training = model.training
    try:  # from here on the masker's hooks are installed: always remove them
        if ckpt_path is not None and ckpt_path.exists():
            ckpt = _load_for_resume(ckpt_path, run_id, fingerprint)
            load_trainable_state(model, ckpt["model"], source=ckpt_path)
            strat.load_state_dict(ckpt["strategy"])
            _set_rng_state(ckpt["rng"], shuffle, masker)
            history = list(ckpt["history"])
            best_epoch, best_metric, best_state = (ckpt["best"][k] for k in ("epoch", "metric", "state"))
            start_epoch = resumed_from = int(ckpt["epoch"])
            stopped = bool(ckpt["stopped_early"])
            print(f"resuming {ckpt_path} after epoch {start_epoch}/{cfg.epochs}", file=sys.stderr, flush=True)
        else:
            torch.manual_seed(seed)  # dropout and anything else on the global generators

        for epoch in range(start_epoch, start_epoch if stopped else cfg.epochs):
            e1 = epoch + 1
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {e1}/{cfg.epochs}", leave=False, disable=not progress)
            try:
                metrics, _ = run_epoch(
                    strat.module,
                    iterate_batches(train, cfg.batch_size, shuffle=True, generator=shuffle, num_workers=num_workers,
                                    rank=rank, world_size=world_size),
                    strat,
                    schedule,
                    global_step=epoch * steps_per_epoch,
                    total_steps=total_steps,
                    masker=masker,
                    distill=distill,
                    temperature=temperature,
                    device=device,
                    epoch=e1,
                    progress=bar,
                    objective=objective,
                    dropout=dropout,
                )
            finally:
                bar.close()
            if not _all_finite(model):
                raise NonFiniteLossError(f"non-finite trainable weights after epoch {e1}; last checkpoint kept")
            metrics = {"epoch": e1, **metrics}
            if val is not None:
                val_args = val if isinstance(val, tuple) else (val,)
                accs = evaluate(model, *val_args, batch_size=eval_bs, num_workers=num_workers)
                metrics.update(val_acc=accs, val_acc_mean=sum(accs) / len(accs), val_acc_last=accs[-1])
                value = score(metrics)
                if best_metric is None or value > best_metric:  # ties keep the earlier epoch
                    best_epoch, best_metric, best_state = e1, value, strat.weights()
            else:
                best_epoch, best_state = e1, strat.weights()
            history.append(metrics)
            checkpoint(e1, False)
            if on_epoch_end is not None and on_epoch_end(e1, metrics) is True:
                stopped = True
                checkpoint(e1, True)
                break
    finally:
        if masker is not None:
            masker.remove()
        if dropout is not None:
            dropout.remove()
        model.train(was_training)

    if best_state is not None:
        load_trainable_state(model, best_state)
    return FitResult(
        history=history,
        best_epoch=best_epoch,
        best_metric=best_metric,
        metric=metric_name,
        resumed_from=resumed_from,
        stopped_early=stopped,
        checkpoint_path=str(ckpt_path) if ckpt_path is not None else None,
    )


def fit_resumable(model: nn.Module, train: DataLike, val: DataLike | None, cfg: OptimConfig | None, *,
                  checkpoint_path: str | Path, **kwargs: Any) -> FitResult:
    """`fit` resuming from `checkpoint_path` when it belongs to this run; a checkpoint left by a different
    configuration (params changed since the interrupted run) is deleted, with a message, and training starts
    over. A temporary file a kill left mid-write beside the checkpoint is removed first. The checkpoint is kept
    after success, so a rerun of a finished run returns at once."""
    path = Path(checkpoint_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporaries(path):  # a save_checkpoint cut short by a kill
        stale.unlink(missing_ok=True)
    try:
        return fit(model, train, val, cfg, checkpoint_path=path, **kwargs)
    except CheckpointMismatchError as err:
        print(f"note: {err}; starting over", file=sys.stderr)
        path.unlink()
        return fit(model, train, val, cfg, checkpoint_path=path, **kwargs)
