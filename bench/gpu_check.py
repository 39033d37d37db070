"""The CUDA path in one go (bench/gpu_check.sh runs it): one line per check, `PASS`/`FAIL`, exit 1 if any failed.

Checks (on GPU 0, the sizes of the paper's setting):
  deepspeed-zero0, deepspeed-zero2  a DeepSpeed engine (bf16 where the GPU has it, NCCL) trains a small
                                    multi-exit ViT a few steps on one rank: finite, falling loss, fp32 logits
  vit-b16-step                      one Dyn-Adapter training step of ViT-B/16 (random weights), batch 64 at
                                    224 px, bf16 autocast: step time and peak GPU memory
  dynamic-vs-full                   compacted dynamic inference against full depth at batch 256 (thresholds
                                    set so half the batch leaves at each early exit): throughput ratio and
                                    the fraction of full-depth MACs executed

`--cpu-dry-run` runs the same code on the CPU with tiny shapes (gloo, fp32), so CI checks the script without
a GPU. Exit codes: 0 all passed, 1 a check failed, 3 no CUDA device (and no --cpu-dry-run).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

NO_CUDA = 3


@dataclass(frozen=True)
class Shapes:
    """What the checks run at: the paper's setting on a GPU, tiny shapes for the CPU dry run."""

    backbone: dict  # timm overrides of vit_base_patch16_224
    train_batch: int
    infer_batch: int
    ds_batch: int
    ds_backbone: dict


GPU = Shapes(backbone={}, train_batch=64, infer_batch=256, ds_batch=32,
             ds_backbone=dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2))
CPU = Shapes(backbone=dict(img_size=32, patch_size=16, embed_dim=48, depth=4, num_heads=2), train_batch=4,
             infer_batch=16, ds_batch=8, ds_backbone=dict(img_size=16, patch_size=8, embed_dim=24, depth=4,
                                                          num_heads=2))


def _model(overrides: dict, num_classes: int = 10):
    from dynadapter.config import BackboneConfig, ModelConfig
    from dynadapter.models import build_model

    torch.manual_seed(0)
    return build_model(BackboneConfig(name="vit_base_patch16_224", overrides=overrides), ModelConfig(),
                       num_classes)


def _images(n: int, size: int, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def _b16(shapes: Shapes, device: str, batch: int, train: bool):
    """The ViT-B/16 Dyn-Adapter (random weights) on `device`, a random batch for it, and its image size."""
    model = _model(shapes.backbone).to(device).train(train)
    size = shapes.backbone.get("img_size", 224)
    return model, *_images(batch, size, device), size


def check_deepspeed(shapes: Shapes, device: str, zero_stage: int) -> str:
    from dynadapter.config import DeepSpeedConfig, TrainConfig
    from dynadapter.train import fit
    from dynadapter.train.deepspeed import deepspeed_strategy, resolve_placement

    placement = resolve_placement("auto", cuda=device == "cuda")
    model = _model(shapes.ds_backbone)
    size = shapes.ds_backbone["img_size"]
    x, y = _images(4 * shapes.ds_batch, size, "cpu")
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long()  # learnable: the sign of one channel's mean
    cfg = TrainConfig(epochs=3, batch_size=shapes.ds_batch, lr=1e-2, warmup_epochs=0.5)
    strategy = deepspeed_strategy(DeepSpeedConfig(zero_stage=zero_stage), placement=placement)
    result = fit(model, (x, y), None, cfg, strategy=strategy, progress=False)
    losses = [h["train_loss"] for h in result.history]
    logits = model(x[:2].to(next(model.parameters()).device))
    if not all(torch.isfinite(torch.tensor(losses))) or losses[-1] >= losses[0]:
        raise AssertionError(f"loss did not fall: {losses}")
    if logits[-1].dtype != torch.float32:
        raise AssertionError(f"logits are {logits[-1].dtype}, not fp32")
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
    return (f"{placement.precision} {backend} 1 rank, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
            f"weights on {next(model.parameters()).device}")


def check_vit_step(shapes: Shapes, device: str) -> str:
    from dynadapter.train.losses import multi_exit_loss

    model, x, y, size = _b16(shapes, device, shapes.train_batch, train=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    amp = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step() -> float:
        with amp:
            loss, _ = multi_exit_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step()  # warm-up: kernels, allocator
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    if not torch.isfinite(torch.tensor(loss)):
        raise AssertionError(f"non-finite loss {loss}")
    depth = len(model.backbone.blocks)
    return (f"depth {depth}, {size} px, batch {shapes.train_batch}: {seconds * 1e3:.0f} ms/step, "
            f"{shapes.train_batch / seconds:.0f} img/s, peak memory {peak:.2f} GiB, loss {loss:.3f}")


def check_dynamic(shapes: Shapes, device: str) -> str:
    from dynadapter.inference import dynamic_macs, measure_stage_costs
    from dynadapter.inference.runtime import dynamic_vs_full
    from dynadapter.models.dyn_vit import confidence_score

    model, x, _, _ = _b16(shapes, device, shapes.infer_batch, train=False)
    with torch.no_grad():
        logits = model(x)
    # random weights: no exit is confident, so set each early threshold at its exit's median confidence
    # among the samples still in flight, about half leave at each early exit
    alive = torch.ones(x.shape[0], dtype=torch.bool, device=device)
    th = []
    for lg in logits[:-1]:
        conf = confidence_score(lg.float(), model.confidence)
        t = float(conf[alive].median()) if alive.any() else 2.0
        th.append(t)
        alive &= conf < t
    th.append(2.0)
    cmp = dynamic_vs_full(model, x, th, repeats=5, warmup=2)
    costs = measure_stage_costs(model)
    with torch.no_grad():
        exits = model.forward_dynamic(x, th).exit_index
    fraction = dynamic_macs(costs, exits.cpu()) / costs.cumulative()[-1]
    if not 0 < fraction < 1:
        raise AssertionError(f"MACs fraction {fraction} outside (0, 1): no sample left early")
    return (f"batch {shapes.infer_batch}: {cmp.speedup:.2f}x throughput ({cmp.dynamic_images_per_s:.0f} vs "
            f"{cmp.full_images_per_s:.0f} img/s), {fraction:.3f} of full-depth MACs "
            f"(exit shares {', '.join(f'{s:.2f}' for s in cmp.exit_fraction)})")


def run(checks: list[tuple[str, Callable[[], str]]]) -> int:
    failed = 0
    for name, fn in checks:
        start = time.perf_counter()
        try:
            line = fn()
            status = "PASS"
        except Exception as err:  # one line per check, whatever happens; details on stderr
            traceback.print_exc(file=sys.stderr)
            line, status = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err) else ''}", "FAIL"
            failed += 1
        print(f"{status} {name:<16} {line} [{time.perf_counter() - start:.1f} s]", flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-dry-run", action="store_true", help="the same checks on the CPU, tiny shapes")
    ap.add_argument("--only", default=None, help="comma-separated check names (default: all)")
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_BUILD_OPS", "0")
    if args.cpu_dry_run:
        device, shapes = "cpu", CPU
    elif torch.cuda.is_available():
        device, shapes = "cuda", GPU
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}", flush=True)
    else:
        print("no CUDA device visible to torch (torch.cuda.is_available() is False): nothing checked; "
              "--cpu-dry-run runs the checks on the CPU", flush=True)
        return NO_CUDA
    checks = [
        ("deepspeed-zero0", lambda: check_deepspeed(shapes, device, 0)),
        ("deepspeed-zero2", lambda: check_deepspeed(shapes, device, 2)),
        ("vit-b16-step", lambda: check_vit_step(shapes, device)),
        ("dynamic-vs-full", lambda: check_dynamic(shapes, device)),
    ]
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {n for n, _ in checks}
        if unknown:
            ap.error(f"unknown checks {sorted(unknown)}")
        checks = [c for c in checks if c[0] in wanted]
    return run(checks)


if __name__ == "__main__":
    sys.exit(main())
