"""Benchmark (issue 5): Dyn-Adapter against its peers on the same data, backbone, trainer and training budget.

Methods (all on the frozen backbone of the pretrain stage, trained by the same `fit` for train.epochs epochs at
train.lr and batch train.batch_size, with the val-selected values of outputs/tune/best_params.yaml applied to
every method as the train stage does; epoch selection on val; accuracy on test):
  dyn_<petl>            Dyn-Adapter (exits, balanced heads, adaptive priority, forward + backward sparsity) with
                        Adapter, LoRA and Rep-Adapter; thresholds calibrated on val for each budget
  full_<petl>           the same PETL module at full depth, one head, no exits (full_adapter is "the plain PETL
                        baseline" every ratio below is relative to)
  dyt_r<r>              Dynamic Tuning (DyT): per-token MLP dispatcher, target activation rate r
  trunc_b<k>            static truncation: Adapter + one head after block k (each exit position but the last)
  linear_probe          a head on the frozen backbone
  full_finetune         every weight trains (lr = train.lr / 10, an unsearched convention for full fine-tuning)
  abl_*                 Dyn-Adapter (Adapter) without one component: balanced heads, adaptive prioritization,
                        forward sparsity, backward sparsity
Figures per method and task: test accuracy at the operating point(s) chosen on val, inference MACs per image
(dynamic: the mean of what ran), trainable parameters with and without heads, training step time and
training memory relative to full_adapter, and CPU throughput relative to full_adapter timed on the same test
batch in the same process. Suite means are unweighted over tasks.

Each (method, task) result is cached in <out>/runs/<method>/<task>.json as soon as it is measured, so an
interrupted run resumes where it stopped (--fresh starts over). At the end: <out>/peers.json (everything),
<out>/summary.csv, <out>/frontier.csv, <out>/tables.md (the tables of BENCHMARKS.md),
<out>/accuracy_vs_macs.png, and one MLflow parent run in experiment --experiment with a nested run per method.

Needs the prepare and pretrain stages' outputs (`make repro`, or `dvc repro pretrain`). Run time on the 2-core
CPU machine with the defaults: see BENCHMARKS.md §3.
    .venv/bin/python bench/peers.py [--tasks a,b] [--methods m1,m2] [--epochs N] [--fresh]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dynadapter.config import Params, load_params
from pipelines.common import write_csv
from pipelines.train import best_overrides

if TYPE_CHECKING:
    import torch

    from dynadapter.adapt import TaskData

# torch and the training code are imported where they are used, so the table functions (`markdown`,
# `frontier_table`, ...) load without them: bench/tables.py renders BENCHMARKS.md from the result files.

BUDGETS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
FRONTIER_BUDGETS = [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
DYT_RATES = [0.1, 0.3, 0.5, 0.7]
BASELINE = "full_adapter"


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # dyn | full | dyt | truncation | probe | finetune | ablation
    kind: str  # dyn (multi-exit, calibrated) | static (one head) | dyt
    overrides: tuple[str, ...] = ()  # params keys for this method
    rate: float | None = None  # DyT target activation rate
    note: str = ""


def all_methods(exits: list[int], ablation_petl: str = "adapter") -> list[Method]:
    """Every method; the ablations remove one component from Dyn-Adapter with `ablation_petl` (the Adapter for
    BENCHMARKS §3's first table; --ablation-petl rep_adapter for the default's)."""
    out = [Method(BASELINE, "full", "static", ("base.model.petl.method=adapter",))]
    for petl in ("adapter", "lora", "rep_adapter"):
        out.append(Method(f"dyn_{petl}", "dyn", "dyn", (f"base.model.petl.method={petl}",)))
        if petl != "adapter":
            out.append(Method(f"full_{petl}", "full", "static", (f"base.model.petl.method={petl}",)))
    out += [Method(f"dyt_r{r}", "dyt", "dyt", ("base.model.petl.method=adapter",), rate=r) for r in DYT_RATES]
    out += [Method(f"trunc_b{k}", "truncation", "static", ("base.model.petl.method=adapter", f"base.model.exits=[{k}]"))
            for k in exits[:-1]]
    out += [
        Method("linear_probe", "probe", "static", ("base.model.petl.method=linear_probe",)),
        Method("full_finetune", "finetune", "static", ("base.model.petl.method=full_finetune",),
               note="lr = train.lr / 10"),
    ]
    ablations = {  # Dyn-Adapter with ablation_petl (whatever params.yaml's PETL method) without one component
        "abl_no_balanced_heads": ("base.model.heads.balanced=false",),
        # balanced heads a quarter as wide (D/2, D/4, D/8 for 2D, D, D/2): fewer trainable parameters
        "abl_small_heads": ("base.model.heads.width=0.25",),
        "abl_no_priority": ("train.priority.pattern=flat", "train.priority.start=null", "train.priority.end=null"),
        "abl_no_forward_sparsity": ("train.sparsity.forward=false",),
        "abl_no_backward_sparsity": ("train.sparsity.backward=false",),
    }
    out += [Method(name, "ablation", "dyn", (f"base.model.petl.method={ablation_petl}", *o))
            for name, o in ablations.items()]
    return out


def method_configs(method: Method, params_path: str, common: list[str]):
    """(params, model config, train config) of a method: the shared settings plus the method's own."""
    from dynadapter.adapt import full_depth_baseline

    params = load_params(params_path, common + list(method.overrides))
    model_cfg, train_cfg = params.base.model, params.train
    if method.kind == "dyn":
        return params, model_cfg, train_cfg
    model_cfg, train_cfg = full_depth_baseline(model_cfg, train_cfg)  # one head: no priority, no distillation
    if method.family == "truncation":
        model_cfg = model_cfg.model_copy(update={"early_exit": True, "exits": params.base.model.exits})
    if method.family == "finetune":
        train_cfg = train_cfg.model_copy(update={"lr": train_cfg.lr / 10})
    if method.kind == "dyt":  # DyT's own recipe: its loss, no Dyn-Adapter sparsity
        sparsity = train_cfg.sparsity.model_copy(update={"forward": False, "backward": False})
        train_cfg = train_cfg.model_copy(update={"sparsity": sparsity})
    return params, model_cfg, train_cfg


# ------------------------------------------------------------------------------------------ one measurement


@dataclass
class Context:
    """What every method of one task is measured against: the data and the full_adapter baseline model."""

    task: str
    data: TaskData
    baseline: torch.nn.Module | None = None
    baseline_macs: float | None = None
    baseline_step: float | None = None
    baseline_memory: int | None = None
    timing_batch: torch.Tensor = field(default=None)


def _loss_fn(objective):
    from dynadapter.train import multi_exit_loss

    if objective is not None:
        return lambda m, x, y: objective(m, x, y)[0]
    return lambda m, x, y: multi_exit_loss(m(x), y)[0]


def measure(method: Method, ctx: Context, params: Params, model_cfg, train_cfg, checkpoint, args) -> dict:
    from dynadapter.adapt import curve_at_budgets, evaluate_task, save_trained, train_task
    from dynadapter.baselines import DyTObjective, activation_rate, build_dyt, measure_dyt_costs, predict_dyt
    from dynadapter.inference import compare_throughput, full_depth_forward
    from dynadapter.models import count_parameters
    from dynadapter.train.memory import training_memory

    base, data = params.base, ctx.data
    objective = DyTObjective(method.rate) if method.kind == "dyt" else None
    trained, model = train_task(ctx.task, data, base.backbone, model_cfg, train_cfg, checkpoint, seed=base.seed,
                                progress=False, builder=build_dyt if method.kind == "dyt" else None,
                                objective=objective)
    x_mem, y_mem = data.train[0][: train_cfg.batch_size], data.train[1][: train_cfg.batch_size]
    memory = training_memory(model, _loss_fn(objective), x_mem, y_mem)
    counts = count_parameters(model)
    row: dict = {"method": method.name, "family": method.family, "task": ctx.task,
                 "params": {**counts, "trainable_without_heads": counts["trainable"] - counts["heads"]},
                 "step_seconds": trained.step_seconds, "train_seconds": trained.train_seconds,
                 "best_epoch": trained.best_epoch, "memory": memory, "lr": train_cfg.lr}
    model.eval()
    if method.kind == "dyt":
        costs = measure_dyt_costs(model)
        val_logits, val_processed = predict_dyt(model, data.val[0])
        test_logits, processed = predict_dyt(model, data.test[0])
        macs = float(costs.macs(processed).mean())
        row.update(val_accuracy=float((val_logits.argmax(-1) == data.val[1]).float().mean()),
                   val_macs=float(costs.macs(val_processed).mean()),
                   test_accuracy=float((test_logits.argmax(-1) == data.test[1]).float().mean()),
                   macs=macs, activation_rate=activation_rate(processed, costs), target_rate=method.rate,
                   points=[])
        run = lambda x: full_depth_forward(model, x)  # noqa: E731 - the dispatchers gather in eval mode
    else:
        ev = evaluate_task(model, data, budget=base.budget if method.kind == "dyn" else 1.0)
        row.update(val_accuracy=ev.calibration["val_accuracy"] if method.kind == "dyn" else None,
                   test_accuracy=ev.test["accuracy"], macs=ev.test["macs"], points=[],
                   full_depth_macs=ev.full_depth_macs)
        if method.kind == "dyn":  # val MACs: what the calibration spent on val (`macs` is test's)
            row.update(budget=base.budget, thresholds=list(ev.calibration["thresholds"]),
                       val_macs=ev.calibration["val_macs"],
                       exit_fraction=ev.test["exit_fraction"], test_exit_accuracy=ev.test_exit_accuracy)
            for b, p in curve_at_budgets(ev.curve, BUDGETS).items():
                row["points"].append({"budget": b, "val_accuracy": p["val_accuracy"],
                                      "test_accuracy": p["test_accuracy"], "macs": p["test_macs"]})
            th = list(ev.calibration["thresholds"])
            run = lambda x: model.forward_dynamic(x, th)  # noqa: E731
        else:
            run = lambda x: full_depth_forward(model, x)  # noqa: E731
            row["val_accuracy"] = trained.history[trained.best_epoch - 1].get("val_acc_last")
    if method.name == BASELINE:
        ctx.baseline, ctx.baseline_macs = model, row["macs"]
        save_trained(model, trained, args.out / "models" / ctx.task, backbone_cfg=base.backbone,
                     model_cfg=model_cfg, num_classes=data.num_classes)
        row["images_per_s"] = row["baseline_images_per_s"] = None
    else:
        ips = compare_throughput({"method": run, "baseline": lambda x: full_depth_forward(ctx.baseline, x)},
                                 ctx.timing_batch, repeats=args.repeats)
        row["images_per_s"], row["baseline_images_per_s"] = ips["method"], ips["baseline"]
    return row


DATA_DEPENDENT = ("dyn", "ablation", "dyt")  # families whose MACs depend on the images (exits, token routing)


def relative(row: dict, base_row: dict) -> dict:
    """The ratios the issue asks for, against full_adapter on the same task."""
    out = {"macs_fraction": row["macs"] / base_row["macs"],
           "step_time_ratio": row["step_seconds"] / base_row["step_seconds"],
           "memory_ratio": row["memory"]["total"] / base_row["memory"]["total"]}
    out["throughput_ratio"] = (row["images_per_s"] / row["baseline_images_per_s"]
                               if row.get("images_per_s") else 1.0)
    # the cost a budget is checked against when choosing an operating point: measured on val where it depends on
    # the data (DyT's token routing, Dyn-Adapter's exits), the static cost otherwise (one head at full depth)
    # (a run of a data-dependent family cached before val MACs were recorded has none: None, never test's figure)
    val_macs = row.get("val_macs", None if row["family"] in DATA_DEPENDENT else row["macs"])
    out["val_macs_fraction"] = None if val_macs is None else val_macs / base_row["macs"]
    for p in row["points"]:
        p["macs_fraction"] = p["macs"] / base_row["macs"]
    return out


# ------------------------------------------------------------------------------------------ suite figures


def suite_rows(results: dict[str, dict[str, dict]], tasks: list[str]) -> list[dict]:
    rows = []
    for name, per_task in results.items():
        if not all(t in per_task for t in tasks):
            continue
        rs = [per_task[t] for t in tasks]
        mean = lambda f: sum(f(r) for r in rs) / len(rs)  # noqa: E731
        rows.append({
            "method": name, "family": rs[0]["family"],
            "test_accuracy": mean(lambda r: r["test_accuracy"]),
            "val_accuracy": mean(lambda r: r["val_accuracy"] or 0.0),
            "macs_fraction": mean(lambda r: r["macs_fraction"]),
            "val_macs_fraction": (None if any(r.get("val_macs_fraction") is None for r in rs)
                                  else mean(lambda r: r["val_macs_fraction"])),
            "mmacs": mean(lambda r: r["macs"]) / 1e6,
            "trainable": mean(lambda r: r["params"]["trainable"]),
            "trainable_without_heads": mean(lambda r: r["params"]["trainable_without_heads"]),
            "trainable_pct_of_backbone": 100 * mean(lambda r: r["params"]["trainable"] / r["params"]["backbone"]),
            "trainable_without_heads_pct_of_backbone": 100 * mean(
                lambda r: r["params"]["trainable_without_heads"] / r["params"]["backbone"]),
            "step_time_ratio": mean(lambda r: r["step_time_ratio"]),
            "memory_ratio": mean(lambda r: r["memory_ratio"]),
            "throughput_ratio": mean(lambda r: r["throughput_ratio"]),
            **({"activation_rate": mean(lambda r: r["activation_rate"])} if "activation_rate" in rs[0] else {}),
        })
    return rows


def suite_curve(per_task: dict[str, dict], tasks: list[str]) -> list[dict]:
    """Suite-mean (test accuracy, MACs fraction) of a dyn method at each budget every task meets on val."""
    out = []
    for b in BUDGETS:
        pts = [next((p for p in per_task[t]["points"] if p["budget"] == b), None) for t in tasks]
        if all(pts):
            out.append({"budget": b, "test_accuracy": sum(p["test_accuracy"] for p in pts) / len(pts),
                        "val_accuracy": sum(p["val_accuracy"] for p in pts) / len(pts),
                        "macs_fraction": sum(p["macs_fraction"] for p in pts) / len(pts)})
    return out


Point = tuple[float, float, float]  # (cost checked against a budget, val accuracy, test accuracy)


def family_points(summary: list[dict], curves: dict[str, list[dict]], dyn: str = "dyn_adapter"
                  ) -> dict[str, list[Point]]:
    """Operating points of the three dynamic/static-depth families the target compares.

    Dyn-Adapter's points (method `dyn`: the project's default PETL module) are its val-calibrated budgets
    (cost = the budget itself); a rival's are its models (cost = MACs fraction measured on val, val
    accuracy, test accuracy)."""
    by = {r["method"]: r for r in summary}
    rival = lambda r: (r["val_macs_fraction"], r["val_accuracy"], r["test_accuracy"])  # noqa: E731
    pts = {
        "Dyn-Adapter": [(c["budget"], c["val_accuracy"], c["test_accuracy"]) for c in curves.get(dyn, [])],
        "DyT": [rival(r) for r in summary if r["family"] == "dyt"],
        "static truncation": [rival(r) for r in summary if r["family"] == "truncation"],
    }
    if BASELINE in by:  # truncation after the last block is the full-depth model itself
        pts["static truncation"].append((1.0, by[BASELINE]["val_accuracy"], by[BASELINE]["test_accuracy"]))
    return pts


def frontier_table(points: dict[str, list[Point]]) -> list[dict]:
    """Each family's test accuracy at each budget, at the operating point chosen on VAL: Dyn-Adapter's
    thresholds calibrated for the largest budget within it; for a rival, of its models that fit the budget,
    the one with the best val accuracy (ties: the cheaper). None: no point that cheap. Test never chooses."""
    rows = []
    for b in FRONTIER_BUDGETS:
        row = {"budget": b}
        for fam, pts in points.items():
            within = [p for p in pts if p[0] <= b + 1e-9]
            if fam == "Dyn-Adapter":
                chosen = max(within, key=lambda p: p[0]) if within else None
            else:
                chosen = max(within, key=lambda p: (p[1], -p[0])) if within else None
            row[fam] = chosen[2] if chosen else None
        rivals = [row[f] for f in points if f != "Dyn-Adapter" and row[f] is not None]
        mine = row["Dyn-Adapter"]
        row["dyn_minus_best_rival"] = (mine - max(rivals)) if mine is not None and rivals else None
        rows.append(row)
    return rows


def plot(summary: list[dict], curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"dyn_adapter": "C0", "dyn_lora": "C1", "dyn_rep_adapter": "C2"}
    for name, curve in curves.items():
        if curve:
            ax.plot([c["macs_fraction"] for c in curve], [c["test_accuracy"] for c in curve], "o-",
                    color=styles.get(name, "C7"), label=f"{name} (val-calibrated budgets)", lw=1.5, ms=4)
    by_family: dict[str, list[dict]] = {}
    for r in summary:
        by_family.setdefault(r["family"], []).append(r)
    for fam, marker, color in (("dyt", "s--", "C3"), ("truncation", "^--", "C4")):
        rs = sorted(by_family.get(fam, []), key=lambda r: r["macs_fraction"])
        if rs:
            ax.plot([r["macs_fraction"] for r in rs], [r["test_accuracy"] for r in rs], marker, color=color,
                    label={"dyt": "DyT (r swept)", "truncation": "static truncation (block k)"}[fam], ms=6)
    for r in summary:
        if r["family"] in ("full", "probe", "finetune", "ablation"):
            mk = {"full": "*", "probe": "x", "finetune": "P", "ablation": "d"}[r["family"]]
            ax.plot(r["macs_fraction"], r["test_accuracy"], mk, ms=9 if mk == "*" else 7, label=r["method"])
    ax.set_xlabel("inference MACs per image, fraction of full-depth Adapter (suite mean)")
    ax.set_ylabel("test accuracy (suite mean)")
    ax.set_title("Accuracy vs inference cost, same backbone, data and training budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_to_mlflow(params: Params, experiment: str, results: dict, summary: list[dict], curves: dict,
                  frontier: list[dict], out: Path, setup: dict) -> str:
    from dynadapter.tracking import log_figure, log_metrics, log_table, pipeline_run, resolve_tracking_uri, task_run

    uri = resolve_tracking_uri(params.base.mlflow.tracking_uri, Path.cwd())
    run_id = time.strftime("peers-%Y%m%d-%H%M%S")
    with pipeline_run(uri, experiment, run_id, stage="peers", config=setup) as parent:
        for row in summary:
            with task_run(parent, "suite", stage="peers", params={"method": row["method"], "family": row["family"]},
                          run_name=row["method"]) as run:
                log_metrics(run, {k: v for k, v in row.items() if isinstance(v, (int, float))}, prefix="suite_")
                for task, r in results[row["method"]].items():
                    log_metrics(run, {"test_accuracy": r["test_accuracy"], "macs": r["macs"],
                                      "macs_fraction": r["macs_fraction"],
                                      "throughput_ratio": r["throughput_ratio"]}, prefix=f"{task}_")
                for i, c in enumerate(curves.get(row["method"], [])):
                    log_metrics(run, {"curve_test_accuracy": c["test_accuracy"],
                                      "curve_macs_fraction": c["macs_fraction"]}, step=i)
        log_table(parent, summary, "peers/summary.csv")
        log_table(parent, frontier, "peers/frontier.csv")
        log_figure(parent, out / "accuracy_vs_macs.png", "peers/accuracy_vs_macs.png")
        return parent.run_id


def markdown(summary: list[dict], curves: dict[str, list[dict]], frontier: list[dict],
             results: dict[str, dict[str, dict]], tasks: list[str]) -> str:
    """The tables BENCHMARKS.md records, from the same numbers as peers.json."""
    f = lambda v, d=4: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = ["| method | test acc | MACs (× full) | MMACs | trainable % (w/o heads) | step time | train memory "
             "| CPU throughput |", "|---|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['method']} | {f(r['test_accuracy'])} | {f(r['macs_fraction'], 3)} | {f(r['mmacs'], 2)} | "
                     f"{f(r['trainable_pct_of_backbone'], 2)} ({f(r['trainable_without_heads_pct_of_backbone'], 2)}) | {f(r['step_time_ratio'], 2)}× | "
                     f"{f(r['memory_ratio'], 2)}× | {f(r['throughput_ratio'], 2)}× |")
    lines += ["", "| method | budget | test acc | MACs (× full) | val acc |", "|---|---|---|---|---|"]
    for name, curve in curves.items():
        lines += [f"| {name} | {c['budget']:.1f} | {f(c['test_accuracy'])} | {f(c['macs_fraction'], 3)} | "
                  f"{f(c['val_accuracy'])} |" for c in curve]
    fams = [k for k in frontier[0] if k not in ("budget", "dyn_minus_best_rival")] if frontier else []
    lines += ["", "| MACs budget | " + " | ".join(fams) + " | Dyn-Adapter − best rival |",
              "|---" * (len(fams) + 2) + "|"]
    lines += [f"| ≤ {r['budget']:.1f} | " + " | ".join(f(r[k]) for k in fams) + f" | {f(r['dyn_minus_best_rival'])} |"
              for r in frontier]
    lines += ["", "| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for r in summary:
        per = results[r["method"]]
        lines.append(f"| {r['method']} | " + " | ".join(
            f"{per[t]['test_accuracy']:.3f} @ {per[t]['macs_fraction']:.2f}" for t in tasks) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ the report


def aggregate(results: dict[str, dict[str, dict]], tasks: list[str], dyn_methods: list[str], dyn: str,
              budget: float) -> dict:
    """Suite rows, the dyn methods' budget curves, the frontier and the budget target, from per-task results
    whose rows already carry their `relative` figures."""
    summary = suite_rows(results, tasks)
    curves = {name: suite_curve(results[name], tasks) for name in dyn_methods}
    dyn = dyn if dyn in curves else "dyn_adapter"
    frontier = frontier_table(family_points(summary, curves, dyn))
    by = {r["method"]: r for r in summary}
    target_50 = None
    if dyn in curves and BASELINE in by:
        at = next((c for c in curves[dyn] if c["budget"] == budget), None)
        same = by.get(dyn.replace("dyn_", "full_", 1), by[BASELINE])  # its own PETL module at full depth
        target_50 = {"budget": budget, "method": dyn, dyn: at, "full_adapter": by[BASELINE]["test_accuracy"],
                     "full_same_petl": same["test_accuracy"],
                     "gap": (at["test_accuracy"] - by[BASELINE]["test_accuracy"]) if at else None,
                     "gap_same_petl": (at["test_accuracy"] - same["test_accuracy"]) if at else None}
    return {"summary": summary, "curves": curves, "frontier": frontier, "target_50": target_50,
            "frontier_method": dyn}


def write_outputs(out: Path, report: dict) -> None:
    """peers.json, summary.csv, frontier.csv, tables.md and the plot of a report."""
    tasks, results = report["setup"]["tasks"], report["per_task"]
    out.mkdir(parents=True, exist_ok=True)
    plot(report["summary"], report["curves"], out / "accuracy_vs_macs.png")
    write_csv(out / "summary.csv", report["summary"])
    write_csv(out / "frontier.csv", report["frontier"])
    (out / "tables.md").write_text(markdown(report["summary"], report["curves"], report["frontier"], results, tasks))
    (out / "peers.json").write_text(json.dumps(report, indent=1) + "\n")


def resummarize(out: Path) -> dict:
    """Recompute a finished run's suite figures from its peers.json with this code (`--resummarize`): no data,
    no training, no timing; the per-task results stay as measured."""
    report = json.loads((out / "peers.json").read_text())
    results, setup = report["per_task"], report["setup"]
    for per_task in results.values():
        for task, row in per_task.items():
            row.update(relative(row, results[BASELINE][task]))
    budget = (report.get("target_50") or {}).get("budget", 0.5)
    agg = aggregate(results, setup["tasks"], list(report["curves"]), setup["frontier_method"], budget)
    setup["frontier_method"] = agg.pop("frontier_method")
    report.update(agg)
    write_outputs(out, report)
    return report


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="params override for every method (repeatable)")
    ap.add_argument("--best", default="outputs/tune/best_params.yaml",
                    help="tune stage's val-selected values, applied to every method ('none': params.yaml only)")
    ap.add_argument("--tasks", default=None, help="comma-separated tasks (default: base.tasks)")
    ap.add_argument("--methods", default=None, help="comma-separated method names (default: all; full_adapter "
                    "always runs first: every ratio is relative to it)")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs for every method (default: train.epochs)")
    ap.add_argument("--batch", type=int, default=256, help="test images per timed batch")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/peers"))
    ap.add_argument("--experiment", default="dynadapter-peers", help="MLflow experiment ('' = do not log)")
    ap.add_argument("--fresh", action="store_true", help="ignore cached results in --out/runs")
    ap.add_argument("--ablation-petl", default="adapter",
                    help="the PETL module of the abl_* methods (adapter: BENCHMARKS §3's first table)")
    ap.add_argument("--dyn-method", default=None,
                    help="the Dyn-Adapter of the frontier and the budget target (default: dyn_<base.model.petl.method>)")
    ap.add_argument("--resummarize", action="store_true",
                    help="recompute --out's suite figures from its peers.json with this code, then stop")
    args = ap.parse_args(argv)
    if args.resummarize:
        resummarize(args.out)
        print(f"resummarized {args.out}")
        return 0

    common = list(args.overrides)
    if args.best.lower() != "none":
        if not Path(args.best).is_file():
            print(f"note: no tune results at {args.best}: every method uses params.yaml's train section "
                  "(`dvc repro tune` writes them; --best none silences this)", flush=True)
        common = best_overrides(args.best) + common
    if args.epochs:
        common.append(f"train.epochs={args.epochs}")
    if args.tasks:
        common.append(f"base.tasks=[{args.tasks}]")
    params = load_params(args.params, common)
    base = params.base
    import torch

    from dynadapter.adapt import load_task_for, load_trained
    from dynadapter.models import create_backbone, resolve_exits
    from dynadapter.train.pretrain import backbone_checkpoint

    exits = resolve_exits(base.model, len(create_backbone(base.backbone).blocks))
    methods = all_methods(exits, args.ablation_petl)
    if args.methods:
        wanted = set(args.methods.split(",")) | {BASELINE}
        unknown = wanted - {m.name for m in methods}
        if unknown:
            ap.error(f"unknown methods {sorted(unknown)}; known: {[m.name for m in methods]}")
        methods = [m for m in methods if m.name in wanted]
    checkpoint = backbone_checkpoint(base.backbone, base.paths.models)
    started = time.perf_counter()
    results: dict[str, dict[str, dict]] = {m.name: {} for m in methods}
    todo = len(methods) * len(base.tasks)
    done = 0
    for task in base.tasks:
        ctx = Context(task, load_task_for(base, task))
        ctx.timing_batch = ctx.data.test[0][: args.batch]
        for method in methods:
            cache = args.out / "runs" / method.name / f"{task}.json"
            done += 1
            if cache.exists() and not args.fresh:
                row = json.loads(cache.read_text())
                if method.name == BASELINE:
                    ctx.baseline, _, _ = load_trained(args.out / "models" / task, checkpoint)
                print(f"[{done}/{todo}] {task} {method.name}: cached", flush=True)
            else:
                t0 = time.perf_counter()
                m_params, model_cfg, train_cfg = method_configs(method, args.params, common)
                row = measure(method, ctx, m_params, model_cfg, train_cfg, checkpoint, args)
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(".tmp")
                tmp.write_text(json.dumps(row, indent=1))
                tmp.replace(cache)
                elapsed = time.perf_counter() - started
                print(f"[{done}/{todo}] {task} {method.name}: test {row['test_accuracy']:.4f} at "
                      f"{row['macs'] / 1e6:.2f} MMACs ({time.perf_counter() - t0:.0f}s; "
                      f"elapsed {elapsed / 60:.1f} min)", flush=True)
            results[method.name][task] = row
        base_row = results[BASELINE][task]
        for method in methods:
            results[method.name][task].update(relative(results[method.name][task], base_row))

    tasks = list(base.tasks)
    dyn = args.dyn_method or f"dyn_{params.base.model.petl.method}"
    report = aggregate(results, tasks, [m.name for m in methods if m.kind == "dyn"], dyn, base.budget)
    summary, curves, frontier, target_50 = (report[k] for k in ("summary", "curves", "frontier", "target_50"))
    setup = {"tasks": tasks, "frontier_method": report.pop("frontier_method"), "epochs": params.train.epochs,
             "lr": params.train.lr, "best_params": args.best, "overrides": common, "dyt_rates": DYT_RATES,
             "budgets": BUDGETS, "torch_threads": torch.get_num_threads(), "timing_batch": args.batch}
    report = {"setup": setup, **report, "seconds": round(time.perf_counter() - started, 1), "per_task": results}
    write_outputs(args.out, report)
    if args.experiment:
        report["mlflow_run"] = log_to_mlflow(params, args.experiment, results, summary, curves, frontier,
                                             args.out, setup)
        (args.out / "peers.json").write_text(json.dumps(report, indent=1) + "\n")

    print(f"\nsuite mean over {len(tasks)} tasks (unweighted); ratios vs {BASELINE} on the same task")
    print(f"{'method':26s} {'test_acc':>8s} {'MACs':>6s} {'MMACs':>6s} {'train%':>7s} {'step':>5s} {'mem':>5s} {'thru':>5s}")
    for r in summary:
        print(f"{r['method']:26s} {r['test_accuracy']:8.4f} {r['macs_fraction']:6.3f} {r['mmacs']:6.2f} "
              f"{r['trainable_pct_of_backbone']:6.2f}% {r['step_time_ratio']:5.2f} {r['memory_ratio']:5.2f} "
              f"{r['throughput_ratio']:5.2f}")
    for name, curve in curves.items():
        print(f"{name} curve: " + ", ".join(f"{c['budget']:.1f}->{c['test_accuracy']:.4f}@{c['macs_fraction']:.3f}"
                                            for c in curve))
    print("frontier (best suite-mean test accuracy within each MACs budget):")
    for row in frontier:
        print("  " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if target_50:
        print(f"target at {base.budget}: {target_50}")
    print(f"wall time {report['seconds']} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
