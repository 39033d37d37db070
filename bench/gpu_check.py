"""The CUDA path in one go (bench/gpu_check.sh runs it): one line per check, `PASS`/`FAIL`/`SKIP` with its
figures and the peak GPU memory it took, exit 1 if any check failed.

Checks (on GPU 0, or GPUs 0 and 1 for the 2-worker check; the sizes of the paper's setting):
  deepspeed-zero0, deepspeed-zero2  a DeepSpeed engine (bf16 where the GPU has it, NCCL) trains a small
                                    multi-exit ViT a few steps on one rank: finite, falling loss, fp32 logits
  two-workers-bf16                  2 ranks (NCCL, one GPU each) at batch b/2 train the weights 1 rank trains
                                    at batch b, both under the bf16 engine; needs 2 GPUs (SKIP, with the
                                    reason, on fewer)
  zero2-kill-resume                 `fit` under ZeRO-2 with a checkpoint, its process killed (os._exit) after
                                    epoch 1, resumed in a new process: resumed_from == 1 and the weights of the
                                    uninterrupted run
  vit-b16-step                      one Dyn-Adapter training step of ViT-B/16 (random weights), batch 64 at
                                    224 px, bf16 autocast: step time and peak GPU memory
  tune-trial-b16                    one tune trial as the preset (presets/vtab1k_vitb16.yaml) runs it: ViT-B/16
                                    at 224 px, random weights, 2 tasks of random images, 1 epoch, through
                                    dynadapter.trial's TrialTrainer (the DeepSpeed engine a Ray Train worker of
                                    a trial runs) and scored on val at the budget
  train-eval-ray                    the train and evaluate stages' cluster path (pipelines.train.train_tasks,
                                    pipelines.evaluate.evaluations) on a local Ray with one GPU per worker:
                                    one embedded task (shipped backbone), 1 epoch, both variants
  dynamic-vs-full                   compacted dynamic inference against full depth at batch 1, 64 and 256
                                    (thresholds set so half the batch leaves at each early exit): images/s of
                                    each, their ratio, and the fraction of full-depth MACs executed

`--cpu-dry-run` runs the same code on the CPU with tiny shapes (gloo, fp32; Ray with no GPUs), so CI checks the
script without a GPU; the 2-worker check prints SKIP there too. Peak memory is torch.cuda.max_memory_allocated
of the process that did the work (the check's own processes for the spawned ones; not measured in Ray workers).
Exit codes: 0 all passed (or skipped), 1 a check failed, 3 no CUDA device (and no --cpu-dry-run).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

NO_CUDA = 3
ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "presets" / "vtab1k_vitb16.yaml"
SHIPPED_BACKBONE = ROOT / "weights" / "embedded_backbone.safetensors"


class Skip(Exception):
    """A check that cannot run on this machine: SKIP with the reason, not FAIL."""


@dataclass(frozen=True)
class Shapes:
    """What the checks run at: the paper's setting on a GPU, tiny shapes for the CPU dry run."""

    backbone: dict  # timm overrides of vit_base_patch16_224
    train_batch: int
    infer_batches: tuple[int, ...]
    ds_batch: int
    ds_backbone: dict
    tune_images: tuple[int, int]  # (train, val) images per task of the tune trial
    embedded: dict  # prepare.embedded sizes of the train-eval-ray check


GPU = Shapes(backbone={}, train_batch=64, infer_batches=(1, 64, 256), ds_batch=32,
             ds_backbone=dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2),
             tune_images=(256, 128), embedded=dict(train=256, val=128, test=256))
CPU = Shapes(backbone=dict(img_size=32, patch_size=16, embed_dim=48, depth=4, num_heads=2), train_batch=4,
             infer_batches=(1, 4, 16), ds_batch=8,
             ds_backbone=dict(img_size=16, patch_size=8, embed_dim=24, depth=4, num_heads=2),
             tune_images=(16, 8), embedded=dict(train=32, val=16, test=32))


def _model(overrides: dict, num_classes: int = 10, sparsity=None):
    from dynadapter.config import BackboneConfig, ModelConfig
    from dynadapter.models import build_model

    torch.manual_seed(0)
    return build_model(BackboneConfig(name="vit_base_patch16_224", overrides=overrides), ModelConfig(),
                       num_classes, sparsity)


def _images(n: int, size: int, device, seed: int = 0, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, size, size, generator=g).to(device),
            torch.randint(0, classes, (n,), generator=g).to(device))


def _learnable(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose label (3 classes) shows in the first channel's mean: a loss that can fall in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 3, size, size, generator=g) * 0.5
    x[:, 0] += (y.float() - 1.0)[:, None, None]
    return x, y


def _b16(shapes: Shapes, device: str, batch: int, train: bool):
    """The ViT-B/16 Dyn-Adapter (random weights) on `device`, a random batch for it, and its image size."""
    model = _model(shapes.backbone).to(device).train(train)
    size = shapes.backbone.get("img_size", 224)
    return model, *_images(batch, size, device), size


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        raise AssertionError(f"different trainable parameters: {sorted(set(a) ^ set(b))[:5]}")
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# ------------------------------------------------------------------------------------------ one-rank DeepSpeed


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


# ------------------------------------------------------------------------------------------ ranks in processes


@dataclass(frozen=True)
class RankJob:
    """One `fit` under a DeepSpeed strategy, run by every rank of a fresh process group (`_rank_main`)."""

    device: str  # cuda | cpu
    precision: str  # fp32 | bf16
    zero_stage: int
    batch: int  # per rank
    epochs: int
    backbone: dict
    images: int  # training set size; the val set is half of it
    out: str  # folder for the per-rank results (and checkpoints)
    tag: str  # result file prefix
    checkpoint: bool = False  # fit's checkpoint_path = <out>/ckpt-rank<r>.pt (one per rank, whatever the tag)
    kill_after: int = 0  # os._exit(9) in on_epoch_end of this epoch (after its checkpoint is written); 0: no kill


def _rank_main(rank: int, world: int, store: str, jobs: list[RankJob]) -> None:
    """One rank: join a FileStore-rendezvous group (NCCL on cuda:<rank>, gloo on the CPU) and run each job's
    `fit` with the DeepSpeed strategy in turn, saving its trainable weights, loss history, resume epoch and peak
    GPU memory."""
    import torch.distributed as dist

    from dynadapter.config import DeepSpeedConfig, SparsityConfig, TrainConfig
    from dynadapter.train import fit, trainable_state
    from dynadapter.train.deepspeed import deepspeed_strategy, resolve_placement

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    cuda = jobs[0].device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    backend = resolve_placement(jobs[0].precision, cuda=cuda).backend
    dist.init_process_group(backend, store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        for job in jobs:
            placement = resolve_placement(job.precision, cuda=cuda)
            cfg = TrainConfig(epochs=job.epochs, batch_size=job.batch, lr=1e-2, warmup_epochs=0.5,
                              sparsity=SparsityConfig(p_max=0.3, p_min=0.1, q=0.3))
            model = _model(job.backbone, num_classes=3, sparsity=cfg.sparsity)
            size = job.backbone["img_size"]

            def on_epoch_end(epoch: int, metrics: dict, job: RankJob = job) -> None:
                if job.kill_after and epoch == job.kill_after:
                    os._exit(9)  # no cleanup, as a killed worker: only the epoch checkpoint fit wrote survives

            ckpt = Path(job.out) / f"ckpt-rank{rank}.pt" if job.checkpoint else None
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            result = fit(model, _learnable(job.images, size, 0), _learnable(job.images // 2, size, 1), cfg, seed=0,
                         checkpoint_path=ckpt, strategy=deepspeed_strategy(DeepSpeedConfig(
                             zero_stage=job.zero_stage, precision=job.precision), placement=placement),
                         rank=rank, world_size=world, on_epoch_end=on_epoch_end, progress=False)
            torch.save({"state": trainable_state(model), "resumed_from": result.resumed_from,
                        "losses": [float(h["train_loss"]) for h in result.history],
                        "weights_dtype": str(next(p for p in model.parameters() if p.requires_grad).dtype),
                        "peak": torch.cuda.max_memory_allocated() if cuda else float("nan")},
                       Path(job.out) / f"{job.tag}-rank{rank}.pt")
            del model, result
    finally:
        dist.destroy_process_group()


def _spawn(jobs: RankJob | list[RankJob], world: int, *, may_die: bool = False) -> list[dict] | None:
    """Run `jobs` in turn on `world` fresh processes; the last job's saved results (None when the processes died,
    and `may_die`: the results of the jobs before stay on disk)."""
    import torch.multiprocessing as mp

    jobs = [jobs] if isinstance(jobs, RankJob) else jobs
    store = tempfile.mktemp(prefix="store-", dir=jobs[0].out)
    try:
        mp.spawn(_rank_main, args=(world, store, jobs), nprocs=world)
    except mp.ProcessExitedException as err:
        if not may_die:
            raise
        if err.exit_code != 9:
            raise AssertionError(f"rank {err.error_index} exited with {err.exit_code}, not the kill's 9") from err
        return None
    return _results(jobs[-1], world)


def _results(job: RankJob, world: int) -> list[dict]:
    return [torch.load(Path(job.out) / f"{job.tag}-rank{r}.pt", map_location="cpu", weights_only=True)
            for r in range(world)]


def _base_state(job: RankJob) -> dict[str, torch.Tensor]:
    from dynadapter.config import SparsityConfig
    from dynadapter.train import trainable_state

    return trainable_state(_model(job.backbone, num_classes=3, sparsity=SparsityConfig(p_max=0.3, p_min=0.1, q=0.3)))


def _norm_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5


def check_two_workers(shapes: Shapes, device: str, *, precision: str = "bf16", allow_cpu: bool = False) -> str:
    """2 ranks at batch b/2 against 1 rank at batch b (ZeRO-2, the same precision, 2 epochs): the ranks hold one
    model, and its distance to the 1-rank model is small next to how far training moved the weights. bf16 rounds
    differently at the two batch shapes, so not bit-equal: ||w2 - w1|| at most 5% of ||w1 - w0|| (measured on 2
    gloo ranks with DeepSpeed's CPU bf16: 1.5%; bf16 against fp32 on 1 rank: 5.8%); fp32: max |w2 - w1| <= 1e-5."""
    ngpu = torch.cuda.device_count() if device == "cuda" else 0
    if device == "cuda" and ngpu < 2:
        raise Skip(f"needs 2 GPUs, {ngpu} visible (CUDA_VISIBLE_DEVICES="
                   f"{os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')})")
    if device == "cpu" and not allow_cpu:
        raise Skip("needs 2 GPUs; --cpu-dry-run has none (tests/test_gpu_check.py runs it on 2 gloo ranks)")
    with tempfile.TemporaryDirectory(prefix="gpu_check-2w-") as out:
        job = RankJob(device=device, precision=precision, zero_stage=2, batch=shapes.ds_batch, epochs=2,
                      backbone=shapes.ds_backbone, images=4 * shapes.ds_batch, out=out, tag="one")
        one = _spawn(job, 1)[0]
        two = _spawn(replace(job, batch=shapes.ds_batch // 2, tag="two"), 2)
    ranks = _max_abs_diff(two[0]["state"], two[1]["state"])
    if ranks != 0.0:
        raise AssertionError(f"the 2 ranks hold different weights: max |w0 - w1| = {ranks:.2e}")
    moved = _norm_diff(one["state"], _base_state(job))
    rel = _norm_diff(one["state"], two[0]["state"]) / moved
    diff = _max_abs_diff(one["state"], two[0]["state"])
    if precision == "bf16" and not rel <= 0.05:
        raise AssertionError(f"||w(2 workers) - w(1 worker)|| = {rel:.1%} of the update ||w(1 worker) - w0|| "
                             f"({moved:.2e}), more than 5%")
    if precision != "bf16" and not diff <= 1e-5:
        raise AssertionError(f"max |w(2 workers) - w(1 worker)| = {diff:.2e} > 1e-5")
    loss2 = sum(t["losses"][-1] for t in two) / 2  # each rank's loss is over its own half of the batches
    peaks = "" if device != "cuda" else (f", peak {_gib(one['peak'])} (1 rank), "
                                         f"{_gib(max(t['peak'] for t in two))} (2 ranks)")
    return (f"{precision} {'nccl' if device == 'cuda' else 'gloo'} ZeRO-2, 2 ranks x batch {job.batch // 2} vs 1 x "
            f"{job.batch}, 2 epochs: ||w2 - w1|| = {rel:.2%} of the update (max |dw| {diff:.1e}), ranks "
            f"identical, weights {two[0]['weights_dtype']}, last-epoch loss {one['losses'][-1]:.4f} vs "
            f"{loss2:.4f}{peaks}")


def check_zero2_resume(shapes: Shapes, device: str) -> str:
    """ZeRO-2 `fit` with a checkpoint: uninterrupted, then killed after epoch 1 and resumed in a new process."""
    precision = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    with tempfile.TemporaryDirectory(prefix="gpu_check-resume-") as out:
        job = RankJob(device=device, precision=precision, zero_stage=2, batch=shapes.ds_batch, epochs=3,
                      backbone=shapes.ds_backbone, images=4 * shapes.ds_batch, out=out, tag="full")
        # one process: the uninterrupted run, then the checkpointed one, killed after epoch 1; a fresh one resumes
        killed = _spawn([job, replace(job, tag="killed", checkpoint=True, kill_after=1)], 1, may_die=True)
        if killed is not None:
            raise AssertionError("the run was not killed after epoch 1")
        full = _results(job, 1)[0]
        if not (Path(out) / "ckpt-rank0.pt").is_file():
            raise AssertionError("no checkpoint left by the killed run")
        resumed = _spawn(replace(job, tag="resumed", checkpoint=True), 1)[0]
    if resumed["resumed_from"] != 1:
        raise AssertionError(f"resumed_from = {resumed['resumed_from']}, not 1: the run did not resume its checkpoint")
    diff = _max_abs_diff(full["state"], resumed["state"])
    rel = _norm_diff(full["state"], resumed["state"]) / _norm_diff(full["state"], _base_state(job))
    if device == "cpu" and not diff <= 1e-6:
        raise AssertionError(f"max |w(resumed) - w(uninterrupted)| = {diff:.2e} > 1e-6")
    if device == "cuda" and not rel <= 0.01:
        # CUDA's attention backward may not be bit-reproducible, so not 0 there; a resume that lost the optimizer
        # state (fresh Adam moments) lands tens of percent of the update away
        raise AssertionError(f"||w(resumed) - w(uninterrupted)|| = {rel:.2%} of the update, more than 1%")
    peak = f", peak {_gib(max(full['peak'], resumed['peak']))}" if device == "cuda" else ""
    return (f"{precision} 1 rank, killed after epoch 1 of 3 and resumed from it: max |w - w(uninterrupted)| "
            f"{diff:.1e} ({rel:.2%} of the update), loss {resumed['losses'][-1]:.4f}, weights "
            f"{resumed['weights_dtype']}{peak}")


# ------------------------------------------------------------------------------------------ ViT-B/16


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
    start = time.perf_counter()
    loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if not torch.isfinite(torch.tensor(loss)):
        raise AssertionError(f"non-finite loss {loss}")
    depth = len(model.backbone.blocks)
    return (f"depth {depth}, {size} px, batch {shapes.train_batch}: {seconds * 1e3:.0f} ms/step, "
            f"{shapes.train_batch / seconds:.0f} img/s, loss {loss:.3f}")


def check_tune_trial(shapes: Shapes, device: str) -> str:
    """One trial of the preset's sweep on its first two tune tasks: the preset's model, train and tune.deepspeed
    settings (the search space's midpoints as the trial's draw), tune.epochs cut to 1."""
    from dynadapter.config import load_params
    from dynadapter.data.vtab_tasks import VTAB_NUM_CLASSES
    from dynadapter.models import create_backbone
    from dynadapter.trial import TrialSpec, TrialTrainer
    from dynadapter.tune import apply_overrides_to, overrides_from

    overrides = [f"base.backbone.overrides={shapes.backbone!r}"] if shapes.backbone else []
    params = load_params(PRESET, overrides)
    cfg, base = params.tune, params.base
    tasks = list(cfg.tasks or base.tasks)[:2]
    ss = cfg.search_space
    draw = {k: sum(getattr(ss, k)) / 2 for k in ("p_max", "p_min", "q", "priority_strength") if getattr(ss, k)}
    if ss.lr:
        draw["lr"] = (ss.lr[0] * ss.lr[1]) ** 0.5
    if ss.priority_pattern:
        draw["priority_pattern"] = ss.priority_pattern[0]
    train = apply_overrides_to(params.train.model_copy(update={"epochs": 1}),
                               overrides_from(draw, params.train))
    backbone_cfg = base.backbone.model_copy(update={"checkpoint": None})
    spec = TrialSpec(backbone=backbone_cfg.model_dump(mode="json"), model=base.model.model_dump(mode="json"),
                     train=train.model_dump(mode="json"), deepspeed=cfg.deepspeed.model_dump(mode="json"),
                     budget=cfg.budget, seed=base.seed, tasks=tasks)
    torch.manual_seed(0)
    backbone_state = create_backbone(backbone_cfg).state_dict()  # random weights, as the workers get them
    size = backbone_cfg.img_size
    n_train, n_val = shapes.tune_images
    data = {}
    for i, t in enumerate(tasks):
        k = VTAB_NUM_CLASSES[t]
        # float32 CPU tensors, as load_tune_tasks hands a trial its tasks (random: the check is that it runs)
        data[t] = _TuneData(_images(n_train, size, "cpu", seed=2 * i, classes=k),
                            _images(n_val, size, "cpu", seed=2 * i + 1, classes=k), k)
    trainer = TrialTrainer(spec, data, backbone_state)
    try:
        start = time.perf_counter()
        metrics = trainer.step()
        seconds = time.perf_counter() - start
        devices = {str(next(r.model.parameters()).device) for r in trainer.runs}
        precision = {r.strategy.placement.precision for r in trainer.runs}
    finally:
        trainer.close()
    from dynadapter.trial import METRIC

    if not 0.0 <= metrics[METRIC] <= 1.0 or not torch.isfinite(torch.tensor(metrics["train_loss"])):
        raise AssertionError(f"bad trial metrics {metrics}")
    if device == "cuda" and devices != {"cuda:0"}:
        raise AssertionError(f"trial models on {sorted(devices)}, not cuda:0")
    return (f"{backbone_cfg.name} {size} px, {len(tasks)} tasks ({', '.join(tasks)}) x {n_train}+{n_val} images, "
            f"batch {train.batch_size}, 1 epoch: {METRIC} {metrics[METRIC]:.3f}, loss {metrics['train_loss']:.3f}, "
            f"{metrics['step_seconds'] * 1e3:.0f} ms/step, {len(tasks) * n_train / seconds:.0f} train img/s incl. "
            f"val scoring, {'/'.join(sorted(precision))} on {'/'.join(sorted(devices))}")


@dataclass
class _TuneData:
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    num_classes: int


# ------------------------------------------------------------------------------------------ stages on Ray


def check_train_eval_ray(shapes: Shapes, device: str) -> str:
    """prepare (here) -> train (Ray Train runs) -> evaluate (Ray tasks) on a local Ray of this process, one GPU
    per worker on a GPU machine: the cluster path of the two stages, on the embedded suite's `size` task."""
    import ray

    from dynadapter.config import load_params
    from dynadapter.ray_session import init_ray
    from pipelines import evaluate as evaluate_stage
    from pipelines import prepare as prepare_stage
    from pipelines import train as train_stage

    if ray.is_initialized():
        raise AssertionError("a Ray session is already running in this process")
    gpus = 1.0 if device == "cuda" else 0.0
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="gpu_check-ray-") as work:
        e = shapes.embedded
        overrides = [
            f"base.paths.data={work}/data", f"base.paths.models={work}/models", f"base.paths.outputs={work}/outputs",
            "base.tasks=[size]", f"base.backbone.checkpoint={SHIPPED_BACKBONE}",
            f"prepare.embedded.train={e['train']}", f"prepare.embedded.val={e['val']}",
            f"prepare.embedded.test={e['test']}",
            "train.epochs=1", "train.protocol=select", f"train.storage={work}/ray-storage",
            "train.ray.num_workers=1", "train.ray.cpus_per_worker=1.0", f"train.ray.gpus_per_worker={gpus}",
            f"evaluate.throughput_batch={min(e['test'], 256)}", "evaluate.throughput_repeats=2",
        ]
        start = time.perf_counter()
        init_ray(None, num_cpus=max(2, os.cpu_count() or 2))
        try:
            os.chdir(work)
            address = ray.get_runtime_context().gcs_address
            params = load_params(ROOT / "params.yaml", overrides + [f"train.ray.address={address}"])
            resources = ray.cluster_resources()
            if gpus and resources.get("GPU", 0) < gpus:
                raise AssertionError(f"the local Ray sees {resources.get('GPU', 0):g} GPUs")
            prepare_stage.run(params)
            models = Path(params.base.paths.models)
            summary = train_stage.train_tasks(params, models / "tasks", stdout=sys.stderr)
            results = {variant: ev for _, variant, _, _, ev in evaluate_stage.evaluations(params, SHIPPED_BACKBONE)}
        finally:
            os.chdir(cwd)
            ray.shutdown()
    if summary.get("ran_on") != "ray":
        raise AssertionError(f"train ran on {summary.get('ran_on')!r}, not on Ray")
    if set(results) != {"dyn", "baseline"}:
        raise AssertionError(f"evaluated {sorted(results)}")
    dyn, base = results["dyn"], results["baseline"]
    tp = dyn.throughput or {}
    speed = f", dynamic/full {tp['speedup']:.2f}x" if "speedup" in tp else ""
    trained = summary["tasks"]["size"]
    return (f"{'1 GPU' if gpus else 'no GPU'} per worker, task size ({e['train']}/{e['val']}/{e['test']} images), "
            f"1 epoch: val acc {trained['dyn']['val_acc_last']:.3f} (dyn) {trained['baseline']['val_acc_last']:.3f} "
            f"(baseline); test acc {dyn.test['accuracy']:.3f} at {dyn.test['fraction']:.3f} of the MACs, baseline "
            f"{base.test['accuracy']:.3f}{speed}; {time.perf_counter() - start:.0f} s incl. Ray start"
            + ("; the workers' GPU memory is not measured" if gpus else ""))


# ------------------------------------------------------------------------------------------ dynamic inference


def check_dynamic(shapes: Shapes, device: str) -> str:
    from dynadapter.inference import dynamic_macs, exit_shares, measure_stage_costs
    from dynadapter.inference.runtime import dynamic_vs_full
    from dynadapter.models.dyn_vit import confidence_score

    largest = max(shapes.infer_batches)
    model, x, _, _ = _b16(shapes, device, largest, train=False)
    with torch.no_grad():
        logits = model(x)
    # random weights: no exit is confident, so set each early threshold at its exit's median confidence
    # among the samples still in flight (on the largest batch), about half leave at each early exit
    alive = torch.ones(x.shape[0], dtype=torch.bool, device=device)
    th = []
    for lg in logits[:-1]:
        conf = confidence_score(lg.float(), model.confidence)
        t = float(conf[alive].median()) if alive.any() else 2.0
        th.append(t)
        alive &= conf < t
    th.append(2.0)
    costs = measure_stage_costs(model)
    with torch.no_grad():
        exits = model.forward_dynamic(x, th).exit_index
    fraction = dynamic_macs(costs, exits.cpu()) / costs.cumulative()[-1]
    if not 0 < fraction < 1:
        raise AssertionError(f"MACs fraction {fraction} outside (0, 1): no sample left early")
    parts = []
    for batch in shapes.infer_batches:
        # the first `batch` images of the largest batch; batch 1 is timed over more repeats (a call is short)
        cmp = dynamic_vs_full(model, x[:batch], th, repeats=5 if batch > 1 else 20, warmup=2)
        if not (cmp.dynamic_images_per_s > 0 and cmp.full_images_per_s > 0):
            raise AssertionError(f"batch {batch}: no throughput measured ({cmp})")
        parts.append(f"batch {batch}: {cmp.speedup:.2f}x ({cmp.dynamic_images_per_s:.0f} vs "
                     f"{cmp.full_images_per_s:.0f} img/s)")
    shares = exit_shares(exits, len(th))
    return (f"dynamic vs full depth, {'; '.join(parts)}; {fraction:.3f} of full-depth MACs at batch {largest} "
            f"(exit shares {', '.join(f'{s:.2f}' for s in shares)})")


# ------------------------------------------------------------------------------------------ driver


def run(checks: list[tuple[str, Callable[[], str]]], device: str = "cpu") -> int:
    """Each check in turn: one line `STATUS name figures [peak GPU memory, seconds]`; 1 if any failed."""
    counts = dict.fromkeys(("PASS", "SKIP", "FAIL"), 0)
    for name, fn in checks:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            line = fn()
            status = "PASS"
        except Skip as skip:
            line, status = str(skip), "SKIP"
        except Exception as err:  # one line per check, whatever happens; details on stderr
            traceback.print_exc(file=sys.stderr)
            line, status = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err) else ''}", "FAIL"
        peak = f"peak GPU memory {_gib(torch.cuda.max_memory_allocated())} in this process, " if device == "cuda" \
            else ""
        print(f"{status} {name:<17} {line} [{peak}{time.perf_counter() - start:.1f} s]", flush=True)
        counts[status] += 1
    print(f"gpu_check.py: {counts['PASS']} passed, {counts['SKIP']} skipped, {counts['FAIL']} failed", flush=True)
    return 1 if counts["FAIL"] else 0


CHECKS = ["deepspeed-zero0", "deepspeed-zero2", "two-workers-bf16", "zero2-kill-resume", "vit-b16-step",
          "tune-trial-b16", "train-eval-ray", "dynamic-vs-full"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-dry-run", action="store_true", help="the same checks on the CPU, tiny shapes")
    ap.add_argument("--only", default=None, help=f"comma-separated check names (default: all: {', '.join(CHECKS)})")
    args = ap.parse_args(argv)
    if args.only:
        unknown = set(args.only.split(",")) - set(CHECKS)
        if unknown:
            ap.error(f"unknown checks {sorted(unknown)}")
    os.environ.setdefault("DS_BUILD_OPS", "0")
    if args.cpu_dry_run:
        device, shapes = "cpu", CPU
    elif torch.cuda.is_available():
        device, shapes = "cuda", GPU
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"device: {torch.cuda.device_count()} GPU(s): {names}; torch {torch.__version__}, CUDA "
              f"{torch.version.cuda}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}",
              flush=True)
    else:
        print("no CUDA device visible to torch (torch.cuda.is_available() is False): nothing checked; "
              "--cpu-dry-run runs the checks on the CPU", flush=True)
        return NO_CUDA
    fns = {
        "deepspeed-zero0": lambda: check_deepspeed(shapes, device, 0),
        "deepspeed-zero2": lambda: check_deepspeed(shapes, device, 2),
        "two-workers-bf16": lambda: check_two_workers(shapes, device),
        "zero2-kill-resume": lambda: check_zero2_resume(shapes, device),
        "vit-b16-step": lambda: check_vit_step(shapes, device),
        "tune-trial-b16": lambda: check_tune_trial(shapes, device),
        "train-eval-ray": lambda: check_train_eval_ray(shapes, device),
        "dynamic-vs-full": lambda: check_dynamic(shapes, device),
    }
    wanted = args.only.split(",") if args.only else CHECKS
    return run([(n, fns[n]) for n in CHECKS if n in wanted], device)


if __name__ == "__main__":
    sys.exit(main())
