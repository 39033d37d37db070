"""Peak training memory of one step: measured on CUDA, accounted from what autograd keeps on the CPU.

On CUDA, `torch.cuda.max_memory_allocated` around one forward + backward is the measurement. The CPU allocator
reports no peak, so there the figure is an account of the same quantities: every parameter (frozen ones
included), a gradient and AdamW's two moments per trainable parameter, and the activations autograd saves
for backward in one training forward (each storage counted once, measured with saved-tensor hooks). It is
what differs between methods on the same backbone and batch (a frozen block whose input needs no gradient
saves nothing); allocator slack and temporaries are left out, so it is a lower bound of the process's peak.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def training_memory(model: nn.Module, loss_fn: Loss, x: torch.Tensor, y: torch.Tensor) -> dict[str, int | str]:
    """Bytes one training step of `model` on the batch (x, y) needs, by kind; `loss_fn(model, x, y)` -> loss.

    The model's weights and gradients are left as they were (no optimizer step; gradients are cleared)."""
    params = sum(_bytes(p) for p in model.parameters())
    trainable = sum(_bytes(p) for p in model.parameters() if p.requires_grad)
    was = model.training
    model.train()
    try:
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
            torch.cuda.reset_peak_memory_stats(x.device)
            before = torch.cuda.memory_allocated(x.device)
            loss_fn(model, x, y).backward()
            torch.cuda.synchronize(x.device)
            peak = torch.cuda.max_memory_allocated(x.device) - before
            return {"source": "cuda_peak", "params": params, "trainable": trainable,
                    "step_peak": int(peak), "total": int(params + 2 * trainable + peak)}
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        weights |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:  # weights are counted once, above
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(model, x, y)
        del loss
        saved = sum(seen.values())
    finally:
        for p in model.parameters():
            p.grad = None
        model.train(was)
    return {"source": "cpu_account", "params": params, "trainable": trainable, "activations": saved,
            "total": int(params + 3 * trainable + saved)}
