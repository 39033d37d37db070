"""DVC stage `train`: per task, the Dyn-Adapter model with the tuned parameters and its full-depth baseline."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import yaml

from dynadapter.config import ConfigError, Params
from pipelines.common import (epoch_printer, load_stage_params, save_stage_config, stage_parser, staged_output,
                              stage_tracking, tracked_task, write_text_atomic)

DESCRIPTION = """Train the final models, one pair per task in base.tasks:

  dyn       base.model (PETL method + early-exit heads) trained with the `train` section, overridden by
            the tuned values in --best (the tune stage's best_params.yaml) when that file exists;
  baseline  the same PETL module at full depth without exits (the paper's comparison), same training budget.

train.protocol=select (default): both train on train800 with model selection on val200 only.
train.protocol=standard (the VTAB-1k papers' protocol): that run only chooses the epoch count on val200; a fresh
model then trains that many epochs on train800val200 and is the saved model; the train800-only model is kept
beside it (<task>/<variant>/selection/) because the evaluate stage calibrates thresholds with it.
Test is not read here. On a CUDA GPU the models train through a DeepSpeed engine (NCCL, bf16 where the GPU
supports it), as tune trials do; on the CPU with plain AdamW. Each run checkpoints
after every epoch (<paths.models>/checkpoints/train/) and resumes after an interruption (Ctrl-C, a kill):
rerun the stage and it goes on from the last finished epoch. <paths.models>/tasks/ is put in place only
when every model is trained, so an interrupted stage leaves no partial output.
MLflow: one nested run per task and variant (per-epoch metrics, parameter counts, step time) under the
pipeline's parent run.
Outputs: <paths.models>/tasks/<task>/{dyn,baseline}/ (PETL + head weights and the config that rebuilds the
model on the backbone), <paths.outputs>/train/{metrics.json,train_config.yaml}."""

VARIANTS = ("dyn", "baseline")


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


def train_tasks(params: Params, tasks_dir: Path, parent=None, stdout=sys.stdout) -> dict:
    """Both variants of every task, trained (or resumed) and saved in tasks_dir/<task>/<variant>; the summary."""
    from dynadapter.adapt import (SELECTION_DIR, accelerator_strategy, load_task_for, retrain_on_trainval,
                                  save_trained, train_task)
    from dynadapter.tracking import log_task_result
    from dynadapter.train.pretrain import backbone_checkpoint

    base, cfg = params.base, params.train
    checkpoint = backbone_checkpoint(base.backbone, base.paths.models)
    models_dir = Path(base.paths.models)
    summary: dict = {"tasks": {}}
    strategy = accelerator_strategy()  # a GPU: DeepSpeed, NCCL, bf16 where supported; else AdamW on the CPU
    for task in base.tasks:
        data = load_task_for(base, task)
        summary["tasks"][task] = {}
        for variant in VARIANTS:
            model_cfg, train_cfg = variant_configs(params, variant)
            out = tasks_dir / task / variant
            save = dict(backbone_cfg=base.backbone, model_cfg=model_cfg, num_classes=data.num_classes)
            ckpt_dir = models_dir / "checkpoints" / "train"
            with tracked_task(parent, task, variant, {"model": model_cfg, "train": train_cfg},
                              stage="train") as mlrun:
                trained, model = train_task(
                    task, data, base.backbone, model_cfg, train_cfg, checkpoint, seed=base.seed,
                    checkpoint_path=ckpt_dir / f"{task}-{variant}.pt", strategy=strategy,
                    on_epoch_end=epoch_printer(f"train {task}/{variant}", cfg.epochs),
                )
                selected = trained
                if cfg.protocol == "standard":  # thresholds come from the train800-only model: keep it
                    save_trained(model, trained, out / SELECTION_DIR, **save)
                    trained, model = retrain_on_trainval(
                        task, data, base.backbone, model_cfg, train_cfg, checkpoint, selected, seed=base.seed,
                        checkpoint_path=ckpt_dir / f"{task}-{variant}-train800val200.pt", strategy=strategy,
                        on_epoch_end=epoch_printer(f"train {task}/{variant} on train800val200", selected.best_epoch),
                    )
                if mlrun is not None:
                    log_task_result(mlrun, trained)
            save_trained(model, trained, out, **save)
            best = selected.history[selected.best_epoch - 1]
            summary["tasks"][task][variant] = {
                "val_acc_mean": best["val_acc_mean"],
                "val_acc_last": best["val_acc_last"],
                "best_epoch": selected.best_epoch,
                "protocol": cfg.protocol,
                "trained_on": "train800val200" if cfg.protocol == "standard" else "train800",
                "trainable_params": trained.params["trainable"],
                "step_ms": round(1000 * trained.step_seconds, 2),
                "train_seconds": round(trained.train_seconds + (selected.train_seconds if selected is not trained
                                                                 else 0.0), 1),
            }
            print(f"train {task}/{variant}: val acc (last exit) {best['val_acc_last']:.4f}", file=stdout)
    return summary


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
