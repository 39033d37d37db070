"""Optimizer building for the trainers: AdamW over the trainable parameters (decay / no-decay groups), the
per-step warm-up + cosine LR schedule, and the `Strategy` interface the loops call (`AdamWStrategy` is plain
PyTorch; `dynadapter.train.deepspeed.DeepSpeedStrategy` wraps a DeepSpeed engine)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from dynadapter.config import OptimConfig
from dynadapter.devices import module_device
from dynadapter.train.checkpoint import trainable_state

# ------------------------------------------------------------------------------------------ LR schedule


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR factor of the 0-based optimizer step `step`: linear warm-up, then cosine decay to 0.

    Warm-up: (step+1)/(W+1), rising to just below the peak; step W is the peak (1.0); then
    0.5·(1+cos(π·(step-W)/(T-W))), which would reach 0 at step T, one past the last step, so no step is
    wasted at lr 0 and no step repeats the peak.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_for(cfg: OptimConfig, steps_per_epoch: int) -> int:
    """Warm-up length in steps (`warmup_epochs` may be fractional), never beyond the run."""
    return min(round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only, split into decayed (matrices) and not decayed (biases, norm weights, and what
    timm modules list in `no_weight_decay()`: pos_embed, cls_token, ...)."""
    skip: set[str] = set()
    for prefix, mod in model.named_modules():
        if hasattr(mod, "no_weight_decay") and callable(mod.no_weight_decay):
            skip |= {f"{prefix}.{n}" if prefix else n for n in mod.no_weight_decay()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters (requires_grad=True): nothing to train")
    return torch.optim.AdamW(groups, lr=cfg.lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step warm-up + cosine; also what a DeepSpeed engine is given as its `lr_scheduler`."""
    warmup, total = warmup_steps_for(cfg, steps_per_epoch), cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        return warmup_cosine(step, warmup, total)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------------------ strategies


class Strategy:
    """How a step's gradients are computed and applied: the loops call only these members.

    `module` is what the loop runs forward on, `backward(loss)` computes gradients, `step()` applies the
    update, zeroes gradients and advances the LR schedule, `lr` is the LR of the next step, and
    `state_dict()` / `load_state_dict()` round-trip the optimizer + schedule (plain tensors/containers only,
    so checkpoints load with weights_only=True).

    A DeepSpeed strategy is `module = engine`, `backward = engine.backward`, `step = engine.step` (which
    steps optimizer and scheduler and zeroes grads), the engine built by
    `deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg),
    lr_scheduler=build_scheduler(...), config=...)`; its state is per rank under ZeRO, so it overrides
    `state_dict` accordingly (or saves through `engine.save_checkpoint`).
    """

    module: nn.Module
    device: torch.device  # where the model is once the strategy is built: the loops move every batch there

    @property
    def starts_step(self) -> bool:
        """The next micro-batch opens an optimizer step (always, without gradient accumulation): the loops draw
        the step's gradient masks then, so every micro-batch of one step is masked alike."""
        return True

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    @property
    def lr(self) -> float:
        raise NotImplementedError

    def weights(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of the model: its trainable state, as the optimizer holds it (CPU tensors)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class AdamWStrategy(Strategy):
    """Plain PyTorch: AdamW over the trainable parameters, per-step warm-up + cosine LR."""

    def __init__(self, model: nn.Module, cfg: OptimConfig, steps_per_epoch: int):
        self.module = model
        self.device = module_device(model)
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, steps_per_epoch)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def weights(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.module)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


StrategyFactory = Callable[[nn.Module, OptimConfig, int], Strategy]
