"""DVC stage `evaluate`: calibrate on val, measure on test, and write the metrics and plots DVC shows."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from pipelines.common import (load_stage_params, save_stage_config, stage_parser, stage_tracking, tracked_task,
                              write_csv, write_text_atomic)

DESCRIPTION = """Evaluate the trained models of every task in base.tasks at the FLOPs budget base.budget.

For the Dyn-Adapter model: merge PETL into the frozen weights, calibrate per-exit thresholds on val200 for the
budget (a fraction of full-depth MACs, certified on new data with probability evaluate.budget_confidence; or,
with evaluate.target=accuracy_drop, the cheapest thresholds whose accuracy drop against the last exit is at
most evaluate.max_drop with probability evaluate.drop_confidence; under train.protocol=standard the model trained on val200 too, so the
thresholds are calibrated on val200 with the threshold donor saved beside it, trained on train800 only on the
same schedule, and transferred), then apply
them once to test: accuracy, mean MACs actually executed,
exit histogram; the val-calibrated threshold sweep evaluated on test (accuracy vs budget) and its Pareto
frontier (non-dominated points); accuracy of each exit alone; measured throughput of compacted dynamic
inference against full depth on the same test batch, on the device the evaluation runs on (the CPU here, the
worker's GPU on a cluster that gives it one; evaluate.throughput_batch images, 0 = skip).
For the full-depth baseline: test accuracy and MACs.
On a Ray cluster (train.ray.address, or RAY_ADDRESS set) every task x variant is evaluated by its own Ray task
(train.ray.cpus_per_worker / gpus_per_worker), as many at a time as the cluster's resources fit; each task's
val and test travel once, as uint8 (normalised on the worker's device), and this process loads one task at a
time; the figures and MLflow records are the same, and the throughput is measured on whichever node ran the
task, beside whatever else ran there.
MLflow: a nested run per task and variant with these figures, the sweep, the Pareto table and plot; the
Dyn-Adapter run also logs the model (a pyfunc that runs compacted dynamic inference, with `budget` or
`thresholds` as parameters); the suite plots and metrics go on the pipeline's parent run.
Outputs in <paths.outputs>/evaluate/: metrics.json (DVC metrics), per_task.json, models.json (the logged
model of each task and its test figures, what `register` reads), and the plots budget_curve, pareto,
exit_hist as .csv + .png (rendered locally, viewable offline)."""

SUITE_BUDGETS = [round(0.05 * i, 2) for i in range(2, 21)]  # 0.10 ... 1.00


CURVE_KEYS = ("val_accuracy", "test_accuracy", "test_fraction", "val_fraction")


def task_curve(curve: list[dict], budgets: list[float] = SUITE_BUDGETS) -> dict[float, dict]:
    """One task's val-calibrated point at each budget it can meet on val (thresholds chosen on val)."""
    from dynadapter.adapt import curve_at_budgets

    return {b: {"budget": b, **{k: p[k] for k in CURVE_KEYS}} for b, p in curve_at_budgets(curve, budgets).items()}


def suite_curve(per_task: dict, budgets: list[float] = SUITE_BUDGETS) -> list[dict]:
    """Suite-mean val and test accuracy and MACs fractions at each budget every task can meet on val
    (thresholds calibrated on val per task and budget)."""
    at = {task: task_curve(res["dyn"]["curve"], budgets) for task, res in per_task.items()}
    n = len(per_task)
    rows = []
    for b in budgets:
        pts = [a[b] for a in at.values() if b in a]
        if len(pts) == n:
            rows.append({"budget": b, **{k: sum(p[k] for p in pts) / n for k in CURVE_KEYS}})
    return rows


def val_pareto(points: list[dict]) -> list[dict]:
    """The sweep points on the val accuracy-MACs frontier: what a user can choose without test labels."""
    from dynadapter.inference import pareto_front

    return pareto_front(points, cost=lambda p: p["val_fraction"], accuracy=lambda p: p["val_accuracy"])


def render_plots(out: Path, per_task: dict, curve: list[dict], baseline_acc: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # accuracy vs budget (suite mean) with the full-depth baseline
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["test_fraction"] for r in curve], [r["test_accuracy"] for r in curve], "o-", label="Dyn-Adapter (test)")
    ax.plot([r["test_fraction"] for r in curve], [r["val_accuracy"] for r in curve], "x--", alpha=0.6,
            label="Dyn-Adapter (val, calibration)")
    ax.axhline(baseline_acc, color="k", ls=":", label="full-depth PETL (test)")
    ax.set_xlabel("MACs / full-depth MACs (test, mean over samples)")
    ax.set_ylabel("accuracy (mean over tasks)")
    ax.set_title("Accuracy vs inference budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "budget_curve.png", dpi=120)
    plt.close(fig)

    # Pareto frontier per task, chosen on VAL (points no other sweep point beats on val accuracy at no more
    # val MACs), drawn at their test figures: a frontier picked on test would be an oracle no user can reach.
    fig, ax = plt.subplots(figsize=(6, 4))
    pareto_rows = []
    for task, res in per_task.items():
        pts = res["dyn"]["curve"]
        front = sorted(val_pareto(pts), key=lambda p: p["test_fraction"])
        line = ax.plot([p["test_fraction"] for p in front], [p["test_accuracy"] for p in front], "o-",
                       label=task)[0]
        ax.scatter([p["test_fraction"] for p in pts], [p["test_accuracy"] for p in pts], s=6, alpha=0.3,
                   color=line.get_color())
        pareto_rows += [{"task": task, "fraction": p["test_fraction"], "accuracy": p["test_accuracy"],
                         "macs": p["test_macs"], "val_fraction": p["val_fraction"],
                         "val_accuracy": p["val_accuracy"]} for p in front]
    ax.set_xlabel("MACs / full-depth MACs (test)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Pareto frontier chosen on val, at test figures")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)
    write_csv(out / "pareto.csv", pareto_rows)

    # exit histogram at the calibrated thresholds
    fig, ax = plt.subplots(figsize=(6, 4))
    tasks = list(per_task)
    num_exits = len(per_task[tasks[0]]["dyn"]["test"]["exit_fraction"])
    width = 0.8 / max(1, len(tasks))
    for i, task in enumerate(tasks):
        shares = per_task[task]["dyn"]["test"]["exit_fraction"]
        ax.bar([e + i * width for e in range(num_exits)], shares, width, label=task)
    ax.set_xticks([e + 0.4 - width / 2 for e in range(num_exits)])
    ax.set_xticklabels([f"exit {e} (block {b})" for e, b in enumerate(per_task[tasks[0]]["dyn"]["exits"])])
    ax.set_ylabel("share of test samples")
    ax.set_title("Where samples leave at the calibrated thresholds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "exit_hist.png", dpi=120)
    plt.close(fig)


CARD_BUDGETS = [round(0.1 * i, 1) for i in range(1, 11)]  # the budget curve on the registry's model card


def log_model(run, model, params, ev, task: str, exits: list[int]) -> dict:
    """Log the calibrated Dyn-Adapter model of `task` on its MLflow run; what `register` needs to promote it
    (val figures decide, test figures are recorded) and to describe it (the model card)."""
    from dynadapter.inference import StageCosts
    from dynadapter.tracking import log_dynamic_model

    base = params.base
    cal = ev.calibration
    info = log_dynamic_model(run, model, backbone_cfg=base.backbone, model_cfg=base.model,
                             costs=StageCosts.from_dict(ev.stage_macs), curve=ev.curve, budget=base.budget,
                             task=task, path_stats=ev.path_stats, certificate=certificate(cal))
    weights = Path(base.backbone.checkpoint).name if base.backbone.checkpoint else "embedded pretraining"
    card = {"task": task, "backbone": f"{base.backbone.name} ({weights})",
            "petl": base.model.petl.method, "exits": list(exits), "budget": base.budget,
            "val_accuracy": cal["val_accuracy"], "val_fraction": cal["fraction"],
            "test_accuracy": ev.test["accuracy"], "test_fraction": ev.test["fraction"],
            "certified": certificate(cal),
            "full_depth_mmacs": ev.full_depth_macs / 1e6, "curve": list(task_curve(ev.curve, CARD_BUDGETS).values())}
    return {"run_id": run.run_id, "model_uri": info.model_uri, "tracking_uri": run.tracking_uri,
            "val_accuracy": cal["val_accuracy"], "val_macs": cal["val_macs"],
            "test_accuracy": ev.test["accuracy"], "test_macs": ev.test["macs"], "budget": base.budget, "card": card}


def guarantee_kwargs(ev_cfg) -> dict:
    """evaluate_task's say on what the thresholds promise (evaluate.target and its confidence settings)."""
    return {"target": ev_cfg.target, "budget_confidence": ev_cfg.budget_confidence, "max_drop": ev_cfg.max_drop,
            "drop_confidence": ev_cfg.drop_confidence}


def certificate(cal: dict) -> dict:
    """What the chosen thresholds promise on new data, from a Calibration dict: the model card's and the served
    model's account of it."""
    return {k: cal.get(k) for k in ("target", "budget_fraction", "confidence_level", "bound", "max_drop")}


def evaluations(params, checkpoint) -> Iterator[tuple]:
    """(task, variant, model, trained, Evaluated) for every task and variant, in order: computed here one after
    another, or on a Ray cluster (train.ray.address or RAY_ADDRESS) one Ray task each, as many at a time as the
    cluster fits (`map_on_ray`). Either way the model comes back as `evaluate_task` leaves it: merged, holding
    its calibrated thresholds.

    Only val and test are loaded, one task at a time. On a cluster a task's val/test go into the object store
    as uint8 (normalised on the worker's device), shared by its variants, and are released here once put;
    this process holds the data and models of the evaluations in flight only, never all of them."""
    from collections import deque

    from dynadapter.adapt import (CALIBRATION_DIR, accelerator, evaluate_task, load_task_for, load_trained,
                                  merged_for_inference)
    from dynadapter.cluster import cluster_address, map_on_ray

    base, ev_cfg = params.base, params.evaluate
    address = cluster_address(params.train.ray.address)
    on_cluster = address is not None

    def models_of(task: str):
        for variant in ("dyn", "baseline"):
            saved = Path(base.paths.models) / "tasks" / task / variant
            model, trained, _ = load_trained(saved, checkpoint)
            # standard protocol: the model trained on val200 too; its thresholds come from the donor (train800 only,
            # the same schedule)
            donor = saved / CALIBRATION_DIR
            selection = load_trained(donor, checkpoint)[0] if donor.is_dir() else None
            kwargs = dict(budget=base.budget, repeats=ev_cfg.throughput_repeats,
                          throughput_batch=ev_cfg.throughput_batch if variant == "dyn" else 0,
                          calibration=ev_cfg.calibration, calibration_model=selection,
                          **guarantee_kwargs(ev_cfg))
            yield variant, model, trained, kwargs

    if not on_cluster:
        for task in base.tasks:
            data = load_task_for(base, task, splits=("val", "test"))
            for variant, model, trained, kwargs in models_of(task):
                yield task, variant, model, trained, evaluate_task(model, data, device=accelerator(), **kwargs)
        return

    import ray

    from dynadapter.ray_session import init_ray

    init_ray(address)
    items: deque = deque()  # (task, variant, model, trained) of the calls submitted, in order

    def calls():
        for task in base.tasks:
            data = ray.put(load_task_for(base, task, splits=("val", "test"), uint8=True))  # released once put
            for variant, model, trained, kwargs in models_of(task):
                items.append((task, variant, model, trained))
                yield (model, data), kwargs
            del data

    print(f"evaluate: {2 * len(base.tasks)} evaluations fan out over the Ray cluster at {address}", flush=True)
    for ev in map_on_ray(_evaluate_on_worker, calls(), params.train.ray):
        task, variant, model, trained = items.popleft()
        # the worker evaluated a copy: put this one in the state it left that copy in
        yield task, variant, merged_for_inference(model, ev.calibration["thresholds"]), trained, ev


def _evaluate_on_worker(model, data, **kwargs):
    """evaluate_task on a Ray worker, on the device Ray assigned it (its GPU when it asked for one; a worker that
    sees a GPU it did not ask for stops, naming train.ray.gpus_per_worker)."""
    from dynadapter.adapt import evaluate_task
    from dynadapter.devices import worker_device

    return evaluate_task(model, data, device=worker_device("train.ray.gpus_per_worker"), **kwargs)


def run(params, parent=None) -> tuple[dict, dict, dict]:
    from dynadapter.adapt import TaskResult
    from dynadapter.tracking import log_budget_curve, log_task_result
    from dynadapter.train.pretrain import backbone_checkpoint

    base = params.base
    checkpoint = backbone_checkpoint(base.backbone, base.paths.models)
    per_task: dict = {}
    models: dict = {}
    for task, variant, model, trained, ev in evaluations(params, checkpoint):
        with tracked_task(parent, task, variant, {"budget": base.budget}, stage="evaluate") as mlrun:
            if mlrun is not None:
                log_task_result(mlrun, TaskResult(trained, ev))
                if variant == "dyn":
                    log_budget_curve(mlrun, list(task_curve(ev.curve).values()))
                    models[task] = log_model(mlrun, model, params, ev, task, trained.exits)
        per_task.setdefault(task, {})[variant] = {"exits": trained.exits, "params": trained.params,
                                                  "step_seconds": trained.step_seconds,
                                                  **{k: v for k, v in ev.__dict__.items() if k != "path_stats"}}
        print(f"evaluate {task}/{variant}: test acc {ev.test['accuracy']:.4f} at "
              f"{ev.test['fraction']:.3f} of full-depth MACs")
    n = len(per_task)
    mean = lambda f: sum(f(r) for r in per_task.values()) / n  # noqa: E731
    speedups = [r["dyn"]["throughput"]["speedup"] for r in per_task.values() if r["dyn"]["throughput"]]
    metrics = {
        "budget": base.budget,
        # what the thresholds promise (evaluate.target); bound: the suite mean of the per-task certified bounds
        "certified": {**certificate(per_task[base.tasks[0]]["dyn"]["calibration"]),
                      "bound": (mean(lambda r: r["dyn"]["calibration"]["bound"]) if all(
                          r["dyn"]["calibration"].get("bound") is not None for r in per_task.values()) else None)},
        "dyn_test_accuracy": mean(lambda r: r["dyn"]["test"]["accuracy"]),
        "dyn_test_macs_fraction": mean(lambda r: r["dyn"]["test"]["fraction"]),
        "dyn_val_accuracy": mean(lambda r: r["dyn"]["calibration"]["val_accuracy"]),
        "baseline_test_accuracy": mean(lambda r: r["baseline"]["test"]["accuracy"]),
        "full_depth_mmacs": per_task[base.tasks[0]]["dyn"]["full_depth_macs"] / 1e6,
        "throughput_speedup": sum(speedups) / len(speedups) if speedups else None,
        "trainable_params_fraction": mean(
            lambda r: r["dyn"]["params"]["trainable"] / r["dyn"]["params"]["backbone"]),
        "tasks": {t: {"dyn_test_accuracy": r["dyn"]["test"]["accuracy"],
                      "dyn_test_macs_fraction": r["dyn"]["test"]["fraction"],
                      "baseline_test_accuracy": r["baseline"]["test"]["accuracy"],
                      "exit_accuracy": r["dyn"]["test_exit_accuracy"]} for t, r in per_task.items()},
    }
    groups = embedded_groups(params)
    if groups:
        metrics["groups"] = {g: {"tasks": names, **{k: sum(metrics["tasks"][t][k] for t in names) / len(names)
                                                    for k in GROUP_METRICS}}
                             for g, names in groups.items() if names}
    if params.evaluate.transfer_probe:
        metrics["transfer"] = transfer(base, checkpoint, groups)
    return metrics, per_task, models


GROUP_METRICS = ("dyn_test_accuracy", "dyn_test_macs_fraction", "baseline_test_accuracy")


def embedded_groups(params) -> dict[str, list[str]]:
    """The embedded suite on the embedded backbone: its tasks split by whether the backbone's pretraining saw their
    label (`shared`) or not (`unseen`), reported separately; {} for VTAB folders or a backbone of your own."""
    from dynadapter.data import task_groups

    if params.prepare.source != "embedded" or params.base.backbone.checkpoint is not None:
        return {}
    return task_groups(params.base.tasks)


def transfer(base, checkpoint, groups: dict[str, list[str]] | None = None) -> dict:
    """How the backbone transfers (dynadapter.transfer): probes train -> val, suite means, per task and per group."""
    import torch

    from dynadapter.models import create_backbone
    from dynadapter.transfer import transfer_report

    torch.manual_seed(base.seed)  # the random-init reference is seeded too
    random_init = create_backbone(base.backbone)
    report = transfer_report(create_backbone(base.backbone, checkpoint), random_init, _TrainVal(base), groups)
    print(f"evaluate: transfer probe (val) {report.probe_val:.4f} vs random init {report.random_init_probe_val:.4f} "
          f"and pixels {report.pixel_probe_val:.4f}")
    for g, r in report.group_summaries().items():
        print(f"evaluate: transfer probe on the {g} tasks {r['probe_val']:.4f}, margin {r['margin']:.4f}")
    return report.to_dict()


class _TrainVal:
    """{task: its train and val} for `transfer_report`, loaded one task at a time as it is iterated (the probes
    never read test, and need one task's images at a time)."""

    def __init__(self, base):
        self.base = base

    def items(self):
        from dynadapter.adapt import load_task_for

        for task in self.base.tasks:
            yield task, load_task_for(self.base, task, splits=("train", "val"))


def log_suite(parent, out: Path, metrics: dict, curve: list[dict]) -> None:
    """The suite figures on the pipeline's parent run: scalar metrics, the budget curve as stepped metrics
    (MLflow's charts draw and compare it), plots and the tables behind them."""
    from dynadapter.tracking import log_budget_curve, log_metrics

    log_metrics(parent, {k: v for k, v in metrics.items() if k != "tasks"}, prefix="evaluate_")
    log_budget_curve(parent, curve)
    for name in ("budget_curve", "pareto", "exit_hist"):
        for ext in (".png", ".csv"):
            parent.client.log_artifact(parent.run_id, str(out / f"{name}{ext}"), "evaluate")
    parent.client.log_artifact(parent.run_id, str(out / "metrics.json"), "evaluate")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("evaluate", DESCRIPTION)
    args = parser.parse_args(argv)
    params = load_stage_params(args)
    out = Path(params.base.paths.outputs) / "evaluate"
    start = time.perf_counter()
    with stage_tracking(params, "evaluate") as parent:
        metrics, per_task, models = run(params, parent)
        out.mkdir(parents=True, exist_ok=True)
        curve = suite_curve(per_task)
        write_csv(out / "budget_curve.csv", curve)
        write_csv(out / "exit_hist.csv", [
            {"task": t, "exit": e, "block": r["dyn"]["exits"][e], "fraction": f}
            for t, r in per_task.items() for e, f in enumerate(r["dyn"]["test"]["exit_fraction"])])
        render_plots(out, per_task, curve, metrics["baseline_test_accuracy"])
        save_stage_config(params, "evaluate", out)
        write_text_atomic(out / "per_task.json", json.dumps(per_task, indent=1) + "\n")
        write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        write_text_atomic(out / "models.json", json.dumps(models, indent=2) + "\n")
        log_suite(parent, out, metrics, curve)
    print(f"evaluate: mean test acc {metrics['dyn_test_accuracy']:.4f} (Dyn-Adapter at budget {params.base.budget}) "
          f"vs {metrics['baseline_test_accuracy']:.4f} (full depth); done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
