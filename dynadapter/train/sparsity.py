"""Backward sparsity: each optimizer step, a fresh random Bernoulli mask zeroes a fraction q of the gradients;
and the random stream forward sparsity's dropout draws from while training (`BatchDropout`).

The rates of forward sparsity (dropout falling with depth) live in the model (`dynadapter.models.stage_dropout`).
Both streams are rank-aware, so W data-parallel workers train the model 1 worker trains (docs/distributed.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import nn

from dynadapter.config import SparsityConfig


class GradientMasker:
    """Zero a random fraction `q` of every trainable parameter's gradient entries, with a new mask per step.

    The mask is applied by a *tensor hook* on each parameter (`param.register_hook`). Autograd runs it on the
    parameter's incoming gradient before accumulation into `.grad`, hence before any post-accumulate-grad hook.
    DeepSpeed (ZeRO 0-3) consumes and reduces gradients in such post-accumulate hooks, so the same masker works
    unchanged under a DeepSpeed engine: ranks that share a seed draw the same mask, and every rank's gradient
    is masked before the all-reduce / reduce-scatter. Under ZeRO-3 the parameter's data is partitioned but the
    gradient autograd produces has the full shape (`param.ds_shape`), which is the shape the mask is drawn in.

    Usage: call `resample()` once per optimizer step (before the backward passes of that step; with gradient
    accumulation every micro-batch of the step then shares one mask), and `remove()` when done.

    rescale: multiply kept entries by 1/(1-q) so the masked gradient is unbiased. Off by default because
    (a) the paper describes *masked* updates, not reweighted ones, and (b) under Adam/AdamW it cancels in
    expectation: masking gives first moment ≈ (1-q)g and second ≈ (1-q)g², so the update m/√v ≈ √(1-q)·g/|g|
    either way; rescaling only matters for plain SGD. Note that under Adam a zeroed gradient entry still moves
    through its momentum, as in Child-Tuning; the mask thins the gradient signal, not the optimizer's state.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        q: float,
        generator: torch.Generator | None = None,
        *,
        seed: int = 0,
        rescale: bool = False,
        enabled: bool = True,
        record: bool = False,
    ):
        if not 0.0 <= q < 1.0:
            raise ValueError(f"train.sparsity.q must be in [0, 1), got {q}")
        self.params = [p for p in params if p.requires_grad]
        self.q = float(q)
        self.rescale = rescale
        if generator is None:
            # drawn on the CPU wherever the parameters are: the same masks on a GPU as on the CPU (PETL's few
            # parameters make the copy cheap), and on `meta`, the tests' fake accelerator, which has no generator
            generator = torch.Generator().manual_seed(seed)
        self.generator = generator
        self._masks: list[torch.Tensor | None] = [None] * len(self.params)
        self._handles: list = []
        self._enabled = False
        self.enabled = enabled
        # record: one digest of the step's masks per resample(), to check ranks drew the same (tests, audits)
        self.digests: list[str] | None = [] if record else None

    @classmethod
    def from_config(
        cls,
        params: Iterable[nn.Parameter],
        cfg: SparsityConfig,
        generator: torch.Generator | None = None,
        seed: int = 0,
        record: bool = False,
    ) -> GradientMasker:
        return cls(params, cfg.q, generator, seed=seed, enabled=cfg.backward, record=record)

    # ---- on / off
    @property
    def active(self) -> bool:
        """True when hooks are installed (enabled, q > 0 and something to mask)."""
        return bool(self._handles)

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        if self._enabled and self.q > 0:
            if not self._handles:
                self._handles = [p.register_hook(self._hook(i)) for i, p in enumerate(self.params)]
        else:
            self._uninstall()

    def remove(self) -> None:
        """Remove the hooks: gradients flow unmasked from now on (`enabled = True` installs them again)."""
        self._uninstall()
        self._enabled = False

    def _uninstall(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._masks = [None] * len(self.params)

    # ---- masks
    def resample(self) -> None:
        """Draw this step's masks (True = keep). A no-op when inactive, so it consumes no random numbers then."""
        if not self.active:
            return
        gen = self.generator
        for i, p in enumerate(self.params):
            shape = getattr(p, "ds_shape", p.shape)  # DeepSpeed ZeRO-3 partitions p.data; grads keep ds_shape
            keep = torch.rand(shape, generator=gen, device=gen.device) >= self.q
            self._masks[i] = keep.to(p.device, non_blocking=True)
        if self.digests is not None:
            self.digests.append(masks_digest(self._masks))

    @property
    def masks(self) -> list[torch.Tensor | None]:
        """The current keep-masks, one per parameter (None before the first `resample()` or when inactive)."""
        return list(self._masks)

    def _hook(self, i: int):
        scale = 1.0 / (1.0 - self.q)

        def hook(grad: torch.Tensor) -> torch.Tensor:
            mask = self._masks[i]
            if mask is None:  # resample() not called yet: draw lazily so a forgotten call still masks
                self.resample()
                mask = self._masks[i]
            out = grad.masked_fill(~mask, 0)
            return out.mul_(scale) if self.rescale else out

        return hook

    # ---- resume
    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def masks_digest(masks: Iterable[torch.Tensor | None]) -> str:
    """SHA-256 of a list of boolean masks (shapes and values): equal digests mean identical masks."""
    h = hashlib.sha256()
    for m in masks:
        if m is None:
            h.update(b"none")
            continue
        h.update(repr(tuple(m.shape)).encode())
        h.update(m.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ forward sparsity


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed for optimizer step `step` of a run seeded `seed` (a hash, so nearby seeds and steps give
    unrelated streams)."""
    digest = hashlib.sha256(f"dynadapter.dropout/{int(seed)}/{int(step)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class BatchDropout:
    """Draw every `nn.Dropout` mask of a model from a stream keyed by (seed, optimizer step) for the *global*
    batch, each data-parallel rank keeping its own rows; so W workers at batch b/W drop exactly what 1 worker
    at batch b drops, and a resumed run needs no saved random state for dropout.

    Why: `nn.Dropout` draws from the process's global generator. Ranks that share a seed would then drop the
    same pattern on *different* samples, and one worker would drop another pattern again: W workers could
    never equal 1. Here, at step k, the i-th dropout call of the forward draws a keep-mask of shape
    (B·W, ...) (B = this rank's rows) from a generator seeded by `step_seed(seed, k)`, and rank r keeps rows
    r, r+W, r+2W, ... : exactly the positions of its samples in the global batch as `iterate_batches` shards
    it (rank r holds every W-th index of the shuffled order), so the W shards' masks together are the
    1-worker mask. Same distribution as `nn.Dropout` (keep with prob 1-p, kept values scaled 1/(1-p)).

    Usage: `BatchDropout(model, seed, rank=r, world_size=W)`; `begin_step(global_step)` before each step's
    forward; `remove()` restores the modules' own forward. Dropout with p = 0 and eval mode draw nothing.
    """

    def __init__(self, model: nn.Module, seed: int, *, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.step = 0
        self._generators: dict[torch.device, torch.Generator] = {}
        self._modules = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
        for m in self._modules:
            m.forward = self._forward(m)  # instance attribute: shadows nn.Dropout.forward for this module only

    @property
    def active(self) -> bool:
        return bool(self._modules)

    def begin_step(self, step: int) -> None:
        """Key the stream on optimizer step `step` (0-based, counted over the whole run)."""
        self.step = int(step)
        for g in self._generators.values():
            g.manual_seed(step_seed(self.seed, self.step))

    def _generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device).manual_seed(step_seed(self.seed, self.step))
        return g

    def _forward(self, module: nn.Dropout):
        def forward(x: torch.Tensor) -> torch.Tensor:
            if not module.training or module.p == 0:
                return x
            # drawn where x is, except on `meta` (the tests' fake accelerator), which has no generator
            where = torch.device("cpu") if x.device.type == "meta" else x.device
            gen = self._generator(where)
            full = (x.shape[0] * self.world_size, *x.shape[1:])
            keep = torch.rand(full, generator=gen, device=where)[self.rank :: self.world_size] >= module.p
            return x * keep.to(device=x.device, dtype=x.dtype) * (1.0 / (1.0 - module.p))

        return forward

    def remove(self) -> None:
        for m in self._modules:
            m.__dict__.pop("forward", None)
        self._modules = []
