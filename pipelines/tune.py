"""DVC stage `tune`: Ray Tune (ASHA) over sparsity ratios and head-balancing weights, scored on val."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dynadapter.config import Params, config_digest, section_dict
from pipelines.common import (load_stage_params, save_stage_config, stage_parser, stage_tracking, write_csv,
                              write_text_atomic)

DESCRIPTION = """Search the Dyn-Adapter training settings in tune.search_space with Ray Tune.

Each trial trains base.model on the tune tasks (tune.tasks, default base.tasks) for tune.epochs with the
`train` section plus the trial's sampled values (sparsity ratios p_max, p_min, q; per-exit loss weights at
the start and end of training; optionally lr). A trial is a Ray Train TorchTrainer whose workers train through
a DeepSpeed engine (tune.deepspeed: ZeRO stage and precision; NCCL + bf16 on CUDA, gloo + fp32 on CPU).
Two metrics are reported every epoch, both means over the tune tasks, after calibrating the exit thresholds on
val (test is never read): val_curve_acc, the mean val accuracy over tune.curve_budgets (one trained model serves
every budget), and val_budget_acc, the val accuracy at tune.budget (its own key, so that changing the inference
budget base.budget never retunes). tune.objective says which one the search maximises. tune.searcher draws the
trials: random, or Optuna's TPE (model-based). ASHA stops weak trials early.

Ray: tune.ray.address, else $RAY_ADDRESS, else a local Ray on this machine's CPUs. Trial checkpoints live in
tune.storage (default <paths.models>/checkpoints/tune): an interrupted stage, rerun with the same params,
resumes its sweep where it stopped (finished trials are not rerun, a cut trial continues from its last epoch).
MLflow: one nested run per trial (per-epoch metrics, sampled values) under the pipeline's parent run.
Outputs in <paths.outputs>/tune/: best_params.yaml (dotted train.* keys the train stage applies), trials.csv
(every trial), metrics.json, tune_config.yaml."""

SECTIONS = ["base", "train", "tune"]
TRIAL_TAG = "dynadapter.trial_id"  # on each trial's nested MLflow run


# Where and how the sweep runs, not what it computes: moving storage, joining another cluster or giving trials
# other resources must still resume an interrupted sweep (its trials compute the same things either way).
PLACEMENT_KEYS = {"base": ("paths", "mlflow"), "train": ("ray", "storage", "deepspeed"),
                  "tune": ("storage", "ray", "max_concurrent", "max_failures", "checkpoints_to_keep")}


def experiment_name(params: Params) -> str:
    """Same settings, same name: a rerun after an interruption resumes the sweep; changed settings start a new
    one. Keys that only say where and on what the sweep runs (PLACEMENT_KEYS) are left out."""
    tree = section_dict(params, *SECTIONS)
    for section, keys in PLACEMENT_KEYS.items():
        for key in keys:
            tree[section].pop(key, None)
    return "tune-" + config_digest(tree, 10)


def log_trials(parent, outcome, tasks: list[str]) -> None:
    """One nested MLflow run per trial: its sampled values, per-epoch metrics and final figures.

    A rerun of the stage (after an interruption, its resumed sweep reports the same trials, each with its
    whole history) replaces a trial's earlier run instead of adding a second one; the earlier run is deleted
    only once the new one is logged, so an interruption here never loses a trial's record."""
    from dynadapter.tracking import find_task_runs, log_history, log_metrics, task_run
    from dynadapter.tune import OBJECTIVES

    earlier: dict[str, list[str]] = {}
    for run in find_task_runs(parent, stage="tune", status=None):
        earlier.setdefault(run.data.tags.get(TRIAL_TAG, ""), []).append(run.info.run_id)
    for row in outcome.trials:
        trial = str(row["trial_id"])
        overrides = {k: v for k, v in row.items() if k.startswith("train.")}
        tags = {TRIAL_TAG: trial, "dynadapter.best": str(trial == outcome.best_trial).lower()}
        if row.get("error"):
            tags["dynadapter.error"] = str(row["error"])[:5000]
        with task_run(parent, ",".join(tasks), stage="tune", params=overrides, tags=tags,
                      run_name=f"tune-{trial}") as run:
            log_history(run, outcome.histories.get(trial, []))
            # both objectives' metrics, whichever the search maximised
            log_metrics(run, {k: row[k] for k in (*OBJECTIVES.values(), "epochs", "resumed_from") if k in row})
        for run_id in earlier.get(trial, []):
            parent.client.delete_run(run_id)


def project_relative(path: str, root: Path) -> str:
    """`path` relative to the project root `root` when it lies inside it, so trials.csv names no folder of the
    machine it ran on; a URI (s3://...) or a folder outside the project (shared cluster storage) is kept."""
    if not path or "://" in path:
        return path
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path


def trials_rows(trials: list[dict], root: Path) -> list[dict]:
    """The rows of trials.csv: the trials' results, their checkpoint folders relative to the project."""
    return [{**row, "path": project_relative(str(row.get("path") or ""), root)} for row in trials]


def run(params: Params, parent=None) -> dict:
    import ray

    from dynadapter.train.pretrain import backbone_checkpoint
    from dynadapter.ray_session import init_ray
    from dynadapter.tune import run_tune, write_best_params

    base, cfg = params.base, params.tune
    out = Path(base.paths.outputs) / "tune"
    out.mkdir(parents=True, exist_ok=True)
    started_here = not ray.is_initialized()
    resources = init_ray(cfg.ray.address)
    print(f"tune: Ray with {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs", flush=True)
    storage = cfg.storage or str(Path(base.paths.models) / "checkpoints" / "tune")
    tasks = list(cfg.tasks or base.tasks)
    try:
        outcome = run_tune(params, backbone_checkpoint(base.backbone, base.paths.models), storage_path=storage,
                           name=experiment_name(params), resume=True)
        seconds = outcome.seconds  # the sweep's own wall time, also when this run resumed it
    finally:
        if started_here:
            ray.shutdown()
    write_best_params(outcome, out / "best_params.yaml")
    write_csv(out / "trials.csv", trials_rows(outcome.trials, Path.cwd()))
    if parent is not None:
        log_trials(parent, outcome, tasks)
    errored = sum(1 for r in outcome.trials if r.get("error"))
    metrics = {
        "best_" + outcome.metric: outcome.best_metric,
        "objective": cfg.objective,
        "searcher": cfg.searcher,
        "best_trial": outcome.best_trial,
        "trials": len(outcome.trials),
        "trials_errored": errored,
        "seconds": round(seconds, 1),
    }
    print(f"tune: best {outcome.metric} {outcome.best_metric:.4f} (trial {outcome.best_trial}) over "
          f"{len(outcome.trials)} trials ({errored} errored) in {seconds:.0f} s: {outcome.best_overrides}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = stage_parser("tune", DESCRIPTION).parse_args(argv)
    params = load_stage_params(args)
    out = Path(params.base.paths.outputs) / "tune"
    with stage_tracking(params, "tune") as parent:  # train.* go on the parent from the train stage (tuned)
        metrics = run(params, parent)
    save_stage_config(params, "tune", out)
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
