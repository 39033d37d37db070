"""DVC stage `evaluate`: calibrate on val, measure on test, and write the metrics and plots DVC shows."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

from pipelines.common import load_stage_params, save_stage_config, stage_parser

DESCRIPTION = """Evaluate the trained models of every task in base.tasks at the FLOPs budget base.budget.

For the Dyn-Adapter model: merge PETL into the frozen weights, calibrate per-exit thresholds on val200 for the
budget (a fraction of full-depth MACs), then apply them once to test: accuracy, mean MACs actually executed,
exit histogram; the val-calibrated threshold sweep evaluated on test (accuracy vs budget) and its Pareto
frontier (non-dominated points); accuracy of each exit alone; measured CPU throughput of compacted dynamic
inference against full depth on the same test batch (evaluate.throughput_batch images, 0 = skip).
For the full-depth baseline: test accuracy and MACs.
Outputs in <paths.outputs>/evaluate/: metrics.json (DVC metrics), per_task.json, and the plots
budget_curve, pareto, exit_hist as .csv + .png (rendered locally, viewable offline)."""

def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["empty"])
        w.writeheader()
        w.writerows(rows)


def suite_curve(per_task: dict) -> list[dict]:
    """Suite-mean test accuracy and MACs fraction per budget, over the budgets every task reached on val."""
    by_budget: dict[float, list[dict]] = {}
    for task, res in per_task.items():
        for p in res["dyn"]["curve"]:
            if p["budget"] is not None:
                by_budget.setdefault(p["budget"], []).append(p)
    n = len(per_task)
    rows = []
    for b in sorted(by_budget):
        pts = by_budget[b]
        if len(pts) == n:
            rows.append({
                "budget": b,
                "val_accuracy": sum(p["val_accuracy"] for p in pts) / n,
                "test_accuracy": sum(p["test_accuracy"] for p in pts) / n,
                "test_fraction": sum(p["test_fraction"] for p in pts) / n,
            })
    return rows


def render_plots(out: Path, per_task: dict, curve: list[dict], baseline_acc: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dynadapter.inference import pareto_front

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

    # Pareto frontier per task: all sweep points and the val-non-dominated ones, at their test figures
    fig, ax = plt.subplots(figsize=(6, 4))
    pareto_rows = []
    for task, res in per_task.items():
        pts = res["dyn"]["curve"]
        front = pareto_front(pts, cost=lambda p: p["test_fraction"], accuracy=lambda p: p["test_accuracy"])
        line = ax.plot([p["test_fraction"] for p in front], [p["test_accuracy"] for p in front], "o-",
                       label=task)[0]
        ax.scatter([p["test_fraction"] for p in pts], [p["test_accuracy"] for p in pts], s=6, alpha=0.3,
                   color=line.get_color())
        pareto_rows += [{"task": task, "fraction": p["test_fraction"], "accuracy": p["test_accuracy"],
                         "macs": p["test_macs"]} for p in front]
    ax.set_xlabel("MACs / full-depth MACs")
    ax.set_ylabel("test accuracy")
    ax.set_title("Pareto frontier (test) of the threshold sweep")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)
    _write_csv(out / "pareto.csv", pareto_rows)

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


def run(params) -> tuple[dict, dict]:
    from dynadapter.adapt import evaluate_task, load_task_for, load_trained
    from dynadapter.train.pretrain import backbone_checkpoint

    base = params.base
    checkpoint = backbone_checkpoint(base.backbone, base.paths.models)
    per_task: dict = {}
    for task in base.tasks:
        data = load_task_for(base, task)
        per_task[task] = {}
        for variant in ("dyn", "baseline"):
            model, trained, _ = load_trained(Path(base.paths.models) / "tasks" / task / variant, checkpoint)
            ev = evaluate_task(model, data, budget=base.budget, repeats=params.evaluate.throughput_repeats,
                               throughput_batch=params.evaluate.throughput_batch if variant == "dyn" else 0)
            per_task[task][variant] = {"exits": trained.exits, "params": trained.params,
                                       "step_seconds": trained.step_seconds, **ev.__dict__}
            print(f"evaluate {task}/{variant}: test acc {ev.test['accuracy']:.4f} at "
                  f"{ev.test['fraction']:.3f} of full-depth MACs")
    n = len(per_task)
    mean = lambda f: sum(f(r) for r in per_task.values()) / n  # noqa: E731
    speedups = [r["dyn"]["throughput"]["speedup"] for r in per_task.values() if r["dyn"]["throughput"]]
    metrics = {
        "budget": base.budget,
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
    return metrics, per_task


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("evaluate", DESCRIPTION)
    args = parser.parse_args(argv)
    params = load_stage_params(args)
    out = Path(params.base.paths.outputs) / "evaluate"
    start = time.perf_counter()
    metrics, per_task = run(params)
    out.mkdir(parents=True, exist_ok=True)
    curve = suite_curve(per_task)
    _write_csv(out / "budget_curve.csv", curve)
    _write_csv(out / "exit_hist.csv", [
        {"task": t, "exit": e, "block": r["dyn"]["exits"][e], "fraction": f}
        for t, r in per_task.items() for e, f in enumerate(r["dyn"]["test"]["exit_fraction"])])
    render_plots(out, per_task, curve, metrics["baseline_test_accuracy"])
    save_stage_config(params, "evaluate", out)
    (out / "per_task.json").write_text(json.dumps(per_task, indent=1) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"evaluate: mean test acc {metrics['dyn_test_accuracy']:.4f} (Dyn-Adapter at budget {params.base.budget}) "
          f"vs {metrics['baseline_test_accuracy']:.4f} (full depth); done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
