"""DVC stage `train`: per task, the Dyn-Adapter model with the tuned parameters and its full-depth baseline."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from dynadapter.config import ConfigError, ModelConfig, Params
from pipelines.common import (epoch_printer, load_stage_params, save_stage_config, stage_parser, staged_output,
                              stage_tracking, tracked_task, write_text_atomic)

DESCRIPTION = """Train the final models, one pair per task in base.tasks:

  dyn       base.model (PETL method + early-exit heads) trained with the `train` section, overridden by
            the tuned values in --best (the tune stage's best_params.yaml) when that file exists;
  baseline  the same PETL module at full depth without exits (the paper's comparison), same training budget.

train.protocol=select (default): both train on train800 with model selection on val200 only.
train.protocol=standard (the VTAB-1k papers' protocol): that run only chooses the epoch count on val200; a fresh
model then trains that many epochs on train800val200 and is the saved model; a threshold donor trained the same
way on train800 only is kept beside it (<task>/<variant>/calibration/): the evaluate stage calibrates the
thresholds with it on val200, which it never saw. Both runs keep the warm-up's share of the schedule.
Test is not read here. On a CUDA GPU the models train through a DeepSpeed engine (train.deepspeed: NCCL, bf16
where the GPU supports it), as tune trials do; on the CPU with plain AdamW. Each run checkpoints after every
epoch (<paths.models>/checkpoints/train/) and resumes after an interruption (Ctrl-C, a kill): rerun the stage
and it goes on from the last finished epoch.
On a Ray cluster (train.ray.address, or RAY_ADDRESS set): every task x variant is one Ray Train run of
train.ray.num_workers DeepSpeed workers (cpus_per_worker / gpus_per_worker each), all submitted at once and
run as far as the cluster's resources allow; their epoch checkpoints go to train.storage (shared storage on
a multi-node cluster) and a rerun resumes them. The workers receive their task's train and val only, as uint8
images normalised on their device, read from base.paths.data by a Ray task on this machine's node (this
process holds no task's images). The models come back to this machine and are saved here.
<paths.models>/tasks/ is put in place only when every model is trained, so an interrupted stage leaves no
partial output.
MLflow: one nested run per task and variant (per-epoch metrics, parameter counts, step time) under the
pipeline's parent run.
Outputs: <paths.models>/tasks/<task>/{dyn,baseline}/ (PETL + head weights and the config that rebuilds the
model on the backbone), <paths.outputs>/train/{metrics.json,train_config.yaml}."""

VARIANTS = ("dyn", "baseline")

if TYPE_CHECKING:  # the stage imports torch only once it runs (a fast --help and params check)
    import torch

    from dynadapter.adapt import Trained


def best_overrides(path: str | Path | None) -> list[str]:
    """`key.path=value` overrides from a best_params.yaml (a mapping of dotted keys to values); none if absent."""
    if path is None or not Path(path).is_file():
        return []
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of dotted params keys to values")
    return [f"{k}={json.dumps(v)}" for k, v in data.items()]


def variant_configs(params: Params, variant: str):
    """(model, train) configs of a variant: the configured Dyn-Adapter, or its full-depth PETL baseline."""
    if variant == "dyn":
        return params.base.model, params.train
    from dynadapter.adapt import full_depth_baseline

    return full_depth_baseline(params.base.model, params.train)


def run(params: Params, parent=None, stdout=sys.stdout) -> dict:
    """Train every task's models into <paths.models>/tasks, which appears whole or not at all."""
    with staged_output(Path(params.base.paths.models) / "tasks") as tasks_dir:
        return train_tasks(params, tasks_dir, parent, stdout)


@dataclass
class VariantResult:
    """One task x variant, trained: the saved model, the train800-only run that selected its epoch (the same one
    under the `select` protocol), and under `standard` the threshold donor evaluate calibrates with
    (`retrain_for_calibration`: train800 only, on the reported model's schedule)."""

    task: str
    variant: str
    num_classes: int
    model_cfg: ModelConfig
    trained: Trained
    model: torch.nn.Module
    selected: Trained
    calibration_model: torch.nn.Module | None = None  # standard protocol only
    calibration: Trained | None = None


def train_tasks(params: Params, tasks_dir: Path, parent=None, stdout=sys.stdout) -> dict:
    """Both variants of every task, trained (or resumed) and saved in tasks_dir/<task>/<variant>; the summary.
    On a Ray cluster (train.ray.address or RAY_ADDRESS) the runs fan out over it; else they run here."""
    from dynadapter.adapt import CALIBRATION_DIR, save_trained
    from dynadapter.cluster import cluster_address
    from dynadapter.tracking import log_task_result

    base, cfg = params.base, params.train
    address = cluster_address(cfg.ray.address)
    results = _train_on_cluster(params, address, stdout) if address else _train_here(params, stdout)
    summary: dict = {"tasks": {}, "ran_on": "ray" if address else "local"}
    for r in results:
        save = dict(backbone_cfg=base.backbone, model_cfg=r.model_cfg, num_classes=r.num_classes)
        out = tasks_dir / r.task / r.variant
        with tracked_task(parent, r.task, r.variant, {"model": r.model_cfg, "train": variant_configs(params, r.variant)[1]},
                          stage="train") as mlrun:
            if mlrun is not None:
                log_task_result(mlrun, r.trained)
        if r.calibration_model is not None:  # thresholds come from the donor: keep it
            save_trained(r.calibration_model, r.calibration, out / CALIBRATION_DIR, **save)
        save_trained(r.model, r.trained, out, **save)
        best = r.selected.history[r.selected.best_epoch - 1]
        extra = r.selected.train_seconds if r.selected is not r.trained else 0.0
        extra += r.calibration.train_seconds if r.calibration is not None else 0.0
        summary["tasks"].setdefault(r.task, {})[r.variant] = {
            "val_acc_mean": best["val_acc_mean"],
            "val_acc_last": best["val_acc_last"],
            "best_epoch": r.selected.best_epoch,
            "protocol": cfg.protocol,
            "trained_on": "train800val200" if cfg.protocol == "standard" else "train800",
            "trainable_params": r.trained.params["trainable"],
            "step_ms": round(1000 * r.trained.step_seconds, 2),
            "train_seconds": round(r.trained.train_seconds + extra, 1),
        }
        print(f"train {r.task}/{r.variant}: val acc (last exit) {best['val_acc_last']:.4f}", file=stdout)
    return summary


def _train_here(params: Params, stdout) -> Iterator[VariantResult]:
    """Every task x variant on this machine, one after another (a CUDA GPU: DeepSpeed; else AdamW)."""
    from dynadapter.adapt import (accelerator_strategy, load_task_for, retrain_for_calibration, retrain_on_trainval,
                                  train_task)
    from dynadapter.train.pretrain import backbone_checkpoint

    base, cfg = params.base, params.train
    checkpoint = backbone_checkpoint(base.backbone, base.paths.models)
    ckpt_dir = Path(base.paths.models) / "checkpoints" / "train"
    strategy = accelerator_strategy(cfg.deepspeed)  # a GPU: DeepSpeed, NCCL, bf16 where supported; else AdamW
    for task in base.tasks:
        data = load_task_for(base, task)
        for variant in VARIANTS:
            model_cfg, train_cfg = variant_configs(params, variant)
            trained, model = train_task(
                task, data, base.backbone, model_cfg, train_cfg, checkpoint, seed=base.seed,
                checkpoint_path=ckpt_dir / f"{task}-{variant}.pt", strategy=strategy,
                on_epoch_end=epoch_printer(f"train {task}/{variant}", cfg.epochs),
            )
            selected, donor, donor_model = trained, None, None
            if cfg.protocol == "standard":
                common = dict(seed=base.seed, strategy=strategy)
                trained, model = retrain_on_trainval(
                    task, data, base.backbone, model_cfg, train_cfg, checkpoint, selected, **common,
                    checkpoint_path=ckpt_dir / f"{task}-{variant}-train800val200.pt",
                    on_epoch_end=epoch_printer(f"train {task}/{variant} on train800val200", selected.best_epoch),
                )
                donor, donor_model = retrain_for_calibration(
                    task, data, base.backbone, model_cfg, train_cfg, checkpoint, selected, **common,
                    checkpoint_path=ckpt_dir / f"{task}-{variant}-calibration.pt",
                    on_epoch_end=epoch_printer(f"train {task}/{variant} threshold donor", selected.best_epoch),
                )
            yield VariantResult(task, variant, data.num_classes, model_cfg, trained, model, selected, donor_model,
                                donor)


def _train_on_cluster(params: Params, address: str, stdout) -> Iterator[VariantResult]:
    """Every task x variant as its own Ray Train run (train.ray workers, train.deepspeed engine), all submitted
    at once; each result rebuilt here on the backbone with the weights rank 0 selected."""
    from dynadapter.adapt import build_for_training, task_sources, trained_record
    from dynadapter.cluster import fit_jobs, train_jobs_on_ray
    from dynadapter.data import read_manifest
    from dynadapter.models import create_backbone
    from dynadapter.train import load_trainable_state
    from dynadapter.train.pretrain import backbone_checkpoint
    from dynadapter.ray_session import check_shared_storage, init_ray

    base, cfg = params.base, params.train
    resources = init_ray(address)
    print(f"train: on the Ray cluster at {address} ({resources.get('CPU', 0):g} CPUs, "
          f"{resources.get('GPU', 0):g} GPUs); {cfg.ray.num_workers} worker(s) per run", file=stdout, flush=True)
    checkpoint = backbone_checkpoint(base.backbone, base.paths.models)
    # where each task's prepared data is: a task's runs read its train/val (uint8, never test) themselves, on
    # this machine's node, so this process never holds any task's images (dynadapter.cluster.train_jobs_on_ray)
    sources = task_sources(base)
    manifests = {task: read_manifest(base.paths.data, task) for task in base.tasks}  # read once per task
    num_classes = {task: int(m["num_classes"]) for task, m in manifests.items()}
    keys = [(task, variant) for task in base.tasks for variant in VARIANTS]
    chains = [fit_jobs(task, variant, base.backbone, *variant_configs(params, variant), seed=base.seed,
                       standard=cfg.protocol == "standard", data=manifests[task]["checksum"])
              for task, variant in keys]
    storage = cfg.storage or str(Path(base.paths.models) / "checkpoints" / "train-ray")
    check_shared_storage(storage, "train.storage")  # several nodes: each must see it, or runs lose checkpoints
    backbone_state = create_backbone(base.backbone, checkpoint).state_dict()
    for (task, variant), outcomes in zip(keys, train_jobs_on_ray(chains, sources, backbone_state,
                                                                 storage_path=storage, stdout=stdout)):
        model_cfg, train_cfg = variant_configs(params, variant)
        received = []
        for outcome in outcomes:
            model = build_for_training(num_classes[task], base.backbone, model_cfg, train_cfg, checkpoint,
                                       seed=base.seed)
            load_trainable_state(model, outcome.best_state())
            received.append((trained_record(task, model_cfg, model, outcome.history, outcome.best_epoch,
                                            outcome.seconds), model.eval()))
        (selected, _), (trained, model) = received[0], received[min(1, len(received) - 1)]
        donor, donor_model = received[2] if len(received) > 2 else (None, None)
        yield VariantResult(task, variant, num_classes[task], model_cfg, trained, model, selected, donor_model, donor)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("train", DESCRIPTION)
    parser.add_argument("--best", default=None,
                        help="tuned overrides from the tune stage (default: <paths.outputs>/tune/best_params.yaml; "
                             "ignored if absent); --set values win over them")
    args = parser.parse_args(argv)
    params = load_stage_params(args)
    best = args.best or Path(params.base.paths.outputs) / "tune" / "best_params.yaml"
    try:
        tuned = best_overrides(best)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if tuned:
        args.overrides = tuned + list(args.overrides)
        params = load_stage_params(args)
        print(f"train: tuned values from {best}: {', '.join(tuned)}")
    out_dir = Path(params.base.paths.outputs) / "train"
    start = time.perf_counter()
    with stage_tracking(params, "train") as parent:
        summary = run(params, parent)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_stage_config(params, "train", out_dir)
    write_text_atomic(out_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
    print(f"train: done in {summary['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
