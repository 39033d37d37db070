"""DeepSpeed as a training `Strategy`: the same loop, optimizer and LR schedule as `AdamWStrategy`, run by a
DeepSpeed engine (ZeRO 0-2, fp32 or bf16) so data-parallel workers (Ray Train) share one code path.

Placement is automatic and comes from Ray's assignment (`dynadapter.devices.worker_device`): CUDA → NCCL (+ bf16
where the GPU supports it), CPU → gloo + fp32. Under bf16 the whole model (the frozen backbone too) runs in bf16,
the optimizer keeps fp32 master weights of what trains, gradients are averaged in fp32, and the weights saved
are the fp32 master copy (docs/distributed.md, "Precision"). `deepspeed` is
imported lazily, so importing this module stays cheap and side-effect free.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dynadapter.config import DeepSpeedConfig, OptimConfig
from dynadapter.devices import is_accelerator, to_host, worker_device
from dynadapter.train.checkpoint import trainable_state
from dynadapter.train.optim import Strategy, StrategyFactory, build_optimizer, build_scheduler

_PRIMITIVES = (bool, int, float, str, type(None))
LIVE = "<live>"  # placeholder for optimizer structure that is rebuilt, not restored (see DeepSpeedStrategy)


@dataclass(frozen=True)
class Placement:
    """Where and how a worker trains: the device type, the torch.distributed backend and the precision."""

    device: str  # "cuda" | "cpu" | "meta" (the CPU tests' stand-in for an accelerator)
    backend: str  # "nccl" | "gloo"
    precision: str  # "bf16" | "fp32"


def resolve_placement(precision: str = "auto", *, cuda: bool | None = None, device: torch.device | str | None = None,
                      bf16_supported: bool | None = None) -> Placement:
    """CUDA → NCCL, CPU → gloo; precision auto → bf16 only on a CUDA device that supports it (fp32 on CPU,
    where bf16 is allowed on request but rarely faster). `device` (what `dynadapter.devices.worker_device`
    chose) or `cuda` say where; both default to what this process sees. `meta` (the fake accelerator of the
    CPU tests) collectives go through gloo in fp32. Pass `cuda` / `bf16_supported` to plan for another machine
    (and to test the choice without a GPU)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"deepspeed.precision must be auto, fp32 or bf16, got {precision!r}")
    kind = torch.device(device).type if device is not None else None
    if kind == "meta":
        return Placement("meta", "gloo", "fp32" if precision == "auto" else precision)
    cuda = (kind == "cuda" if kind is not None else torch.cuda.is_available()) if cuda is None else cuda
    if bf16_supported is None:
        bf16_supported = bool(cuda and torch.cuda.is_bf16_supported())
    if precision == "bf16" and cuda and not bf16_supported:
        raise ValueError("deepspeed.precision: bf16 was asked for but this GPU does not support it; use fp32")
    if precision == "auto":
        precision = "bf16" if cuda and bf16_supported else "fp32"
    return Placement("cuda" if cuda else "cpu", "nccl" if cuda else "gloo", precision)


def ds_config(batch_size: int, cfg: DeepSpeedConfig | None = None, *, placement: Placement | None = None,
              gradient_accumulation_steps: int = 1) -> dict[str, Any]:
    """The DeepSpeed config dict for one worker with micro-batch `batch_size` (`train.batch_size` is per
    worker). No optimizer/scheduler entries: the engine is handed ours, so every strategy shares one AdamW +
    warm-up/cosine. No gradient clipping, as in `AdamWStrategy`."""
    cfg = cfg if cfg is not None else DeepSpeedConfig()
    placement = placement if placement is not None else resolve_placement(cfg.precision)
    return {
        "train_micro_batch_size_per_gpu": int(batch_size),
        "gradient_accumulation_steps": int(gradient_accumulation_steps),
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": int(cfg.zero_stage)},
        "bf16": {"enabled": placement.precision == "bf16"},
        # Under bf16 the ranks' gradients are averaged in fp32: PETL trains ~1% of the weights, so this costs
        # little traffic, and bf16 sums of many small gradients lose what the fp32 master weights would keep.
        "communication_data_type": "fp32",
        "fp16": {"enabled": False},
        # ZeRO wraps our torch AdamW; DeepSpeed only vouches for its own optimizers unless told otherwise.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a local rendezvous or service)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_group(backend: str) -> None:
    """DeepSpeed needs torch.distributed. Under Ray Train (or torchrun) it is already initialised; in a plain
    process, start a one-rank group so `fit(strategy=...)` also works stand-alone.

    The one-rank group meets through an in-memory store: the env:// rendezvous would start torch's TCPStore,
    which listens on all interfaces whatever MASTER_ADDR says, with no authentication (measured, torch 2.14).
    """
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # A group destroyed behind DeepSpeed's back (Ray Train's local mode destroys its own at the end of a run)
        # leaves DeepSpeed's group caches pointing at it: the next engine would broadcast over a dead group.
        from deepspeed.utils import groups

        release = getattr(groups, "_release_process_group_references", None)
        if release is not None:
            release(None)
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def _cast_to_model(dtype: torch.dtype, device: torch.device):
    """Forward pre-hook: float inputs follow the model's dtype and device, so the caller (trainer, evaluate,
    calibration) keeps passing fp32 CPU tensors whatever the engine did to the model."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        return tuple(a.to(device=device, dtype=dtype) if torch.is_tensor(a) and a.is_floating_point()
                     else a.to(device) if torch.is_tensor(a) else a for a in args)

    return hook


def _outputs_to_fp32(module: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook: logits back to fp32, so the loss and softmax confidences are computed in full precision."""
    if torch.is_tensor(output):
        return output.float()
    if isinstance(output, (list, tuple)):
        return type(output)(o.float() if torch.is_tensor(o) else o for o in output)
    return output


def _safe(obj: Any) -> Any:
    """The optimizer state with everything `torch.load(weights_only=True)` refuses (DeepSpeed's loss-scaler
    object, enums, fragment maps: structure rebuilt from the model, not learned) replaced by LIVE."""
    if torch.is_tensor(obj):
        return to_host(obj)
    if isinstance(obj, dict):
        return {k: _safe(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_safe(v) for v in obj)
    return obj if type(obj) in _PRIMITIVES else LIVE


def _fill_live(saved: Any, live: Any) -> Any:
    """Put the live optimizer's own values back where `_safe` left LIVE."""
    if isinstance(saved, str) and saved == LIVE:
        return live
    if isinstance(saved, dict) and isinstance(live, Mapping):
        return {k: _fill_live(v, live.get(k)) for k, v in saved.items()}
    if isinstance(saved, (list, tuple)) and isinstance(live, (list, tuple)) and len(saved) == len(live):
        return type(saved)(_fill_live(s, v) for s, v in zip(saved, live))
    return saved


class DeepSpeedStrategy(Strategy):
    """A DeepSpeed engine over the trainable parameters only, with our AdamW and per-step warm-up + cosine.

    `module` is the engine (its forward is the model's), `backward` / `step` are the engine's (step also
    zeroes gradients and advances the schedule). The frozen backbone is handed to the engine but not to the
    optimizer, so ZeRO partitions and all-reduces only what trains. Under bf16 the engine casts the whole
    model to bf16 and keeps fp32 master weights in the optimizer; forward hooks cast inputs in and logits
    back to fp32, so `evaluate` and calibration keep working on the raw model.

    Checkpoints: `state_dict()` holds the optimizer (per rank under ZeRO 1/2: each rank saves its own) and
    scheduler as tensors and primitives only; `load_state_dict` expects the model's trainable weights loaded
    first, as `fit` does. Use as `fit(..., strategy=deepspeed_strategy(cfg))`.
    """

    def __init__(self, model: nn.Module, cfg: OptimConfig, steps_per_epoch: int,
                 ds: DeepSpeedConfig | None = None, *, placement: Placement | None = None,
                 device: torch.device | str | None = None):
        import argparse

        import deepspeed

        ds = ds if ds is not None else DeepSpeedConfig()
        # Ray's assignment, never cuda:LOCAL_RANK: a Ray Train worker sees every GPU its node gives the run, and
        # with gpus_per_worker != 1 its own is not the LOCAL_RANK-th (dynadapter.devices)
        self.device = torch.device(device) if device is not None else worker_device("train.ray.gpus_per_worker")
        self.placement = placement if placement is not None else resolve_placement(ds.precision, device=self.device)
        ensure_process_group(self.placement.backend)
        args = None
        if is_accelerator(self.device):
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            # DeepSpeed moves the model to its accelerator's device `device_rank` (default LOCAL_RANK): name ours
            args = argparse.Namespace(device_rank=self.device.index or 0)
        model.to(self.device)
        self.accumulation = int(ds.gradient_accumulation_steps)
        if steps_per_epoch % self.accumulation:
            raise ValueError(
                f"deepspeed.gradient_accumulation_steps={self.accumulation} must divide the {steps_per_epoch} "
                "micro-batches of an epoch (train set / train.batch_size per worker), so that every epoch ends on an "
                "optimizer step and its checkpoint holds no half-accumulated gradients; change one of them")
        optimizer = build_optimizer(model, cfg)  # trainable parameters only, decay / no-decay groups
        # DeepSpeed steps the schedule once per optimizer step, i.e. every `accumulation` micro-batches
        scheduler = build_scheduler(optimizer, cfg, steps_per_epoch // self.accumulation)
        self.config = ds_config(cfg.batch_size, ds, placement=self.placement,
                                gradient_accumulation_steps=self.accumulation)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            args=args, model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config,
            dist_init_required=False,
        )
        self.module = self.engine
        self.model = model
        p = next(model.parameters())
        self._hooks = [model.register_forward_pre_hook(_cast_to_model(p.dtype, p.device)),
                       model.register_forward_hook(_outputs_to_fp32)]

    # ---- the Strategy interface
    @property
    def starts_step(self) -> bool:
        """The next micro-batch opens an optimizer step (its gradient masks are drawn then)."""
        return self.engine.micro_steps % self.accumulation == 0

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales the loss by 1/accumulation: the step sees the mean gradient

    def step(self) -> None:
        self.engine.step()

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def weights(self) -> dict[str, torch.Tensor]:
        """The trainable state with each trained parameter taken from the optimizer's fp32 master copy: under
        bf16 the model holds bf16-rounded values, and those are not what was learned. Under ZeRO 1/2 the master
        copy is partitioned, so every rank must call this (as `fit` does, every epoch)."""
        from deepspeed.utils import safe_get_full_fp32_param

        state = trainable_state(self.model)
        # ZeRO 0 under bf16 runs DeepSpeed's unfused mixed-precision optimizer: its master copies sit in
        # fp32_groups, index for index with the model's fp16_groups (safe_get_full_fp32_param covers ZeRO 1-3)
        opt = self.optimizer
        unfused = {id(low): high for lows, highs in zip(getattr(opt, "fp16_groups", None) or [],
                                                        getattr(opt, "fp32_groups", None) or [])
                   if isinstance(lows, list) and isinstance(highs, list) and len(lows) == len(highs)
                   for low, high in zip(lows, highs)}
        for name, param in self.model.named_parameters():
            if param.requires_grad and name in state:
                master = safe_get_full_fp32_param(param)
                master = master if master is not None else unfused.get(id(param))
                if master is not None:
                    state[name] = to_host(master.float())
                else:
                    state[name] = state[name].float()
        return state

    def state_dict(self) -> dict:
        return {"optimizer": _safe(self.optimizer.state_dict()), "scheduler": _safe(self.scheduler.state_dict()),
                "zero_stage": int(self.engine.zero_optimization_stage()), "precision": self.placement.precision}

    def load_state_dict(self, state: dict) -> None:
        for key, now in (("zero_stage", int(self.engine.zero_optimization_stage())),
                         ("precision", self.placement.precision)):
            if state.get(key) != now:
                raise ValueError(f"checkpoint was written with deepspeed {key}={state.get(key)!r}, now {now!r}")
        opt = _fill_live(state["optimizer"], self.optimizer.state_dict())
        if self.engine.zero_optimization_stage() > 0:
            # ZeRO restores this rank's fp32 master partition and copies it into the (bf16 or fp32) model. It reads
            # its own entry, list[dp_rank], of a list of every rank's state; each rank checkpoints only its own
            # (non-elastic) partition, so that entry must sit at this rank's index ([opt] alone broke rank 1).
            ranks = max(1, int(getattr(self.engine, "dp_world_size", 1)))
            self.optimizer.load_state_dict([opt] * ranks, load_optimizer_states=True, load_from_fp32_weights=True)
        else:
            self.optimizer.load_state_dict(opt)
        self.scheduler.load_state_dict(state["scheduler"])

    def close(self) -> None:
        """Remove the cast hooks (the model stays in the engine's dtype and device)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def deepspeed_strategy(ds: DeepSpeedConfig | None = None, *, placement: Placement | None = None,
                       device: torch.device | str | None = None) -> StrategyFactory:
    """A `fit(strategy=...)` factory: (model, cfg, steps_per_epoch) -> DeepSpeedStrategy (on `device`, default
    `dynadapter.devices.worker_device()`)."""
    return functools.partial(DeepSpeedStrategy, ds=ds, placement=placement, device=device)
