"""DeepSpeed as a training `Strategy`: the same loop, optimizer and LR schedule as `AdamWStrategy`, run by a
DeepSpeed engine (ZeRO 0-2, fp32 or bf16) so data-parallel workers (Ray Train) share one code path.

Placement is automatic: CUDA → NCCL (+ bf16 where the GPU supports it), CPU → gloo + fp32. `deepspeed` is
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
from dynadapter.train.loop import Strategy, StrategyFactory, build_optimizer, build_scheduler

_PRIMITIVES = (bool, int, float, str, type(None))
LIVE = "<live>"  # placeholder for optimizer structure that is rebuilt, not restored (see DeepSpeedStrategy)


@dataclass(frozen=True)
class Placement:
    """Where and how a worker trains: the device type, the torch.distributed backend and the precision."""

    device: str  # "cuda" | "cpu"
    backend: str  # "nccl" | "gloo"
    precision: str  # "bf16" | "fp32"


def resolve_placement(precision: str = "auto", *, cuda: bool | None = None,
                      bf16_supported: bool | None = None) -> Placement:
    """CUDA → NCCL, CPU → gloo; precision auto → bf16 only on a CUDA device that supports it (fp32 on CPU,
    where bf16 is allowed on request but rarely faster). `cuda` / `bf16_supported` default to what this
    process sees; pass them to plan for another machine (and to test the choice without a GPU)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"deepspeed.precision must be auto, fp32 or bf16, got {precision!r}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
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
        return obj.detach().to("cpu", copy=True)
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
                 ds: DeepSpeedConfig | None = None, *, placement: Placement | None = None):
        import deepspeed

        ds = ds if ds is not None else DeepSpeedConfig()
        self.placement = placement if placement is not None else resolve_placement(ds.precision)
        ensure_process_group(self.placement.backend)
        if self.placement.device == "cuda":
            # the device DeepSpeed's engine picks too (Ray Train shows each worker all of its node's GPUs)
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
            model.to(device)
        optimizer = build_optimizer(model, cfg)  # trainable parameters only, decay / no-decay groups
        scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
        self.config = ds_config(cfg.batch_size, ds, placement=self.placement)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config,
            dist_init_required=False,
        )
        self.module = self.engine
        p = next(model.parameters())
        self._hooks = [model.register_forward_pre_hook(_cast_to_model(p.dtype, p.device)),
                       model.register_forward_hook(_outputs_to_fp32)]

    # ---- the Strategy interface
    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

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


def deepspeed_strategy(ds: DeepSpeedConfig | None = None, *, placement: Placement | None = None) -> StrategyFactory:
    """A `fit(strategy=...)` factory: (model, cfg, steps_per_epoch) -> DeepSpeedStrategy."""
    return functools.partial(DeepSpeedStrategy, ds=ds, placement=placement)
