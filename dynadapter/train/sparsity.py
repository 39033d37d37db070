"""Backward sparsity: each optimizer step, a fresh random Bernoulli mask zeroes a fraction q of the gradients.

Forward sparsity (dropout falling with depth) lives in the model (`dynadapter.models.stage_dropout`).
"""

from __future__ import annotations

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
    ):
        if not 0.0 <= q < 1.0:
            raise ValueError(f"train.sparsity.q must be in [0, 1), got {q}")
        self.params = [p for p in params if p.requires_grad]
        self.q = float(q)
        self.rescale = rescale
        if generator is None:
            device = self.params[0].device if self.params else torch.device("cpu")
            generator = torch.Generator(device=device).manual_seed(seed)
        self.generator = generator
        self._masks: list[torch.Tensor | None] = [None] * len(self.params)
        self._handles: list = []
        self._enabled = False
        self.enabled = enabled

    @classmethod
    def from_config(
        cls,
        params: Iterable[nn.Parameter],
        cfg: SparsityConfig,
        generator: torch.Generator | None = None,
        seed: int = 0,
    ) -> GradientMasker:
        return cls(params, cfg.q, generator, seed=seed, enabled=cfg.backward)

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
