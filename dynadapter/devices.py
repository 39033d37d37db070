"""Which device this process computes on: the accelerator Ray assigned it (a Ray Train worker, or a Ray task),
else this machine's CUDA GPU, else the CPU. Nothing here picks `cuda:LOCAL_RANK` by itself: on a Ray node a
worker may see GPUs that belong to other workers, and only Ray's assignment says which one is its own.

`meta` is accepted wherever a device is: it is the fake accelerator the CPU-only tests run the GPU path on
(docs/distributed.md, "Testing the GPU path without a GPU").
"""

from __future__ import annotations

import os

import torch


class GpuNotRequestedError(RuntimeError):
    """This Ray worker sees a CUDA GPU but asked Ray for none: it would compute outside Ray's accounting, on a
    GPU another worker may hold."""


def _in_ray_train_worker() -> bool:
    try:
        import ray.train

        ray.train.get_context()
    except Exception:  # ImportError, or RuntimeError outside a Ray Train worker
        return False
    return True


def _in_ray_worker() -> bool:
    """A Ray task or actor (not the driver)."""
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def _not_requested(key: str) -> GpuNotRequestedError:
    return GpuNotRequestedError(
        f"this Ray worker sees a CUDA GPU but requested none from Ray: set {key} > 0 (e.g. 1) to train or "
        f"evaluate on GPUs, or hide them from the worker (CUDA_VISIBLE_DEVICES='') to run on CPUs")


def visible_index(gpu_id: str | int) -> int:
    """The torch index of the physical GPU `gpu_id` in this process's CUDA_VISIBLE_DEVICES (Ray restricts it to
    the GPUs it assigned, so its first GPU is usually cuda:0)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not visible:  # unrestricted (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES): torch numbers GPUs by their id
        return int(gpu_id)
    return visible.index(str(gpu_id)) if str(gpu_id) in visible else 0


def worker_device(gpus_key: str = "train.ray.gpus_per_worker") -> torch.device:
    """The device to compute on in this process.

    - In a Ray Train worker: `ray.train.torch.get_device()`, Ray's assignment (the first of its GPUs when it
      holds several); the CPU when it requested no GPU.
    - In a Ray task or actor: its first assigned GPU (`ray.get_gpu_ids()`), else the CPU.
    - Outside Ray: the current CUDA device if there is one, else the CPU.

    A Ray worker that requested no GPU but sees one raises GpuNotRequestedError naming `gpus_key` (the
    params key that asks for GPUs), instead of silently training on the CPU next to an idle GPU."""
    if _in_ray_train_worker():
        from ray.train.torch import get_device

        device = get_device()
        if device.type == "cpu" and torch.cuda.is_available():
            raise _not_requested(gpus_key)
        return device
    if _in_ray_worker():
        import ray

        gpu_ids = ray.get_gpu_ids()
        if gpu_ids:
            return torch.device("cuda", visible_index(gpu_ids[0]))
        if torch.cuda.is_available():
            raise _not_requested(gpus_key)
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_accelerator(device: torch.device | str | None) -> bool:
    """A device other than the CPU (CUDA, or `meta` standing in for it in tests)."""
    return device is not None and torch.device(device).type != "cpu"


def module_device(module: torch.nn.Module) -> torch.device:
    """Where `module`'s first parameter (or buffer) lives; the CPU for a module without either."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy of `t`. A `meta` tensor holds no values: it becomes NaNs (zeros for integers) of its
    shape and dtype, so metrics and checkpoints still run when the tests fake an accelerator with meta."""
    t = t.detach()
    if t.is_meta:
        return torch.full(t.shape, float("nan") if t.is_floating_point() else 0, dtype=t.dtype)
    return t.to("cpu", copy=True)
