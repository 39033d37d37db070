"""Benchmark (issue 23): does a budget hold on images calibration never saw, and what does a guarantee cost?

For each suite task and seed, the Dyn-Adapter model is trained as the train stage trains it (params.yaml with
the tune stage's outputs/tune/best_params.yaml applied; seed 0 under `select` is the model `make repro` saved,
read from models/tasks), and its exit logits on val200 and test
are cached (bench/results/budget_adherence/cache/, gitignored). Under the `standard` protocol two more models are
trained per task and seed: the reported one (train800val200, `final_schedule`) and the threshold donor
(`retrain_for_calibration`: the same schedule on train800 only). Then, with no more training:

1. Budget adherence: for every budget 0.35 ... 1.00 (0.30 is below what any setting can spend: every image at
   the first exit costs 0.302), thresholds calibrated on val200 with `budget_confidence` null / 0.8 / 0.9 / 0.95,
   test MACs compared with the budget; on the original split and on --resplits random 200/1000 resplits of
   val+test (the model is the same; its epoch was selected on the original val200, a small optimism the resplits
   share). Reported: the share of (task, seed, split, budget) points whose test MACs exceed the budget, with its
   binomial standard error, and the suite test accuracy at budget 0.5.
2. Val evidence for the default: val200 split in random halves, calibrated on one, scored on the other.
3. Accuracy tolerance (`target: accuracy_drop`, confidence 0.9): eps 0.005 and 0.01; the share of (task, seed)
   pairs (and resplits) whose test drop against the last exit stays within eps, and the MACs spent.
4. Standard against select at budget 0.5: test accuracy and test MACs per task and seed, thresholds from the
   selection model (the old transfer) and from the donor, null and 0.9.

Writes bench/results/budget_adherence.json and prints the tables BENCHMARKS.md §7 records. About 15 minutes
on the 2-core machine the first time (the trainings), seconds when cached.
    .venv/bin/python bench/budget_adherence.py [--seeds 0,1] [--resplits 10] [--tasks a,b]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dynadapter.config import load_params
from pipelines.train import best_overrides

if TYPE_CHECKING:
    from dynadapter.adapt import TaskData

# torch and the model code are imported where they are used, so `markdown` loads without them (bench/tables.py)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "budget_adherence.json"
CACHE = ROOT / "bench" / "results" / "budget_adherence" / "cache"
BUDGETS = [round(0.05 * i, 2) for i in range(7, 21)]  # 0.35 ... 1.00
LEVELS = [None, 0.8, 0.9, 0.95]
DROPS = [0.005, 0.01, 0.02, 0.03, 0.05]
DROP_LEVEL = 0.9


# ------------------------------------------------------------------------------------------ the models


def _logits(model, data: TaskData) -> dict:
    import torch

    from dynadapter.adapt import merged_for_inference
    from dynadapter.inference import collect_exit_logits, measure_stage_costs

    merged_for_inference(model)
    costs = measure_stage_costs(model)
    with torch.no_grad():
        return {"val": collect_exit_logits(model, data.val[0]), "val_y": data.val[1],
                "test": collect_exit_logits(model, data.test[0]), "test_y": data.test[1],
                "costs": costs.to_dict()}


def cached_models(params, task: str, seed: int, protocols: list[str], log) -> dict[str, dict]:
    """{"select": logits, "standard_old": ..., "standard_donor": ...} for one task and seed, trained once."""
    import torch

    from dynadapter.adapt import load_task_for, load_trained, retrain_for_calibration, retrain_on_trainval, train_task
    from dynadapter.train.pretrain import backbone_checkpoint

    base, cfg = params.base, params.train
    out = {}
    todo = []
    for name in ["select"] + (["standard_old", "standard_donor", "standard_final"] if "standard" in protocols else []):
        path = CACHE / f"{task}-seed{seed}-{name}.pt"
        if path.is_file():
            out[name] = torch.load(path, weights_only=True)
        else:
            todo.append(name)
    if not todo:
        return out
    checkpoint = backbone_checkpoint(base.backbone, base.paths.models)
    data = load_task_for(base, task)
    saved = Path(base.paths.models) / "tasks" / task / "dyn"
    t0 = time.perf_counter()
    if seed == base.seed and cfg.protocol == "select" and (saved / "adapter.safetensors").is_file():
        model, selected, _ = load_trained(saved, checkpoint)  # the model make repro trained
    else:
        selected, model = train_task(task, data, base.backbone, base.model, cfg, checkpoint, seed=seed,
                                     progress=False)
    logits = {"select": _logits(model, data)}
    if "standard" in protocols:
        logits["standard_old"] = logits["select"]  # the old transfer: thresholds from the selection model
        _, final = retrain_on_trainval(task, data, base.backbone, base.model, cfg, checkpoint, selected, seed=seed,
                                       progress=False)
        logits["standard_final"] = _logits(final, data)
        _, donor = retrain_for_calibration(task, data, base.backbone, base.model, cfg, checkpoint, selected,
                                           seed=seed, progress=False)
        logits["standard_donor"] = _logits(donor, data)
    CACHE.mkdir(parents=True, exist_ok=True)
    for name, value in logits.items():
        torch.save(value, CACHE / f"{task}-seed{seed}-{name}.pt")
    log(f"{task} seed {seed}: trained and cached in {time.perf_counter() - t0:.0f}s (best epoch {selected.best_epoch})")
    return logits


# ------------------------------------------------------------------------------------------ the analysis


def _split(lg: dict, rng: np.random.Generator | None, n_val: int) -> tuple:
    """(val logits, val labels, test logits, test labels): the original split, or a random resplit of val+test."""
    import torch

    if rng is None:
        return lg["val"], lg["val_y"], lg["test"], lg["test_y"]
    x = torch.cat([lg["val"], lg["test"]], dim=1)
    y = torch.cat([lg["val_y"], lg["test_y"]])
    perm = torch.from_numpy(rng.permutation(y.numel()))
    v, t = perm[:n_val], perm[n_val:]
    return x[:, v], y[v], x[:, t], y[t]


def every_split(all_logits: dict, resplits: int, seed: int):
    """(task, seed, split number, costs, val logits, val labels, test logits, test labels) of each select
    model: split 0 the original, then `resplits` random resplits of val+test."""
    from dynadapter.inference.flops import StageCosts

    rng = np.random.default_rng(seed)
    for (task, s), lgs in all_logits.items():
        lg = lgs["select"]
        costs = StageCosts.from_dict(lg["costs"])
        for r in range(resplits + 1):
            yield (task, s, r, costs, *_split(lg, None if r == 0 else rng, lg["val_y"].numel()))


def adherence(all_logits: dict, resplits: int, seed: int = 0) -> dict:
    from dynadapter.inference.calibrate import calibrate, evaluate_thresholds

    rows = []
    for task, s, r, costs, val, val_y, test, test_y in every_split(all_logits, resplits, seed):
        for level in LEVELS:
            for b in BUDGETS:
                cal = calibrate(val_logits=val, val_labels=val_y, costs=costs, budget_fraction=b,
                                budget_confidence=level)
                if not cal.feasible:
                    rows.append({"task": task, "seed": s, "split": r, "level": level, "budget": b,
                                 "feasible": False})
                    continue
                ev = evaluate_thresholds(test, test_y, cal.thresholds, costs)
                rows.append({"task": task, "seed": s, "split": r, "level": level, "budget": b, "feasible": True,
                             "val_fraction": cal.fraction, "bound": cal.bound, "test_fraction": ev.fraction,
                             "test_accuracy": ev.accuracy, "over": ev.fraction > b + 1e-9})
    summary = {}
    for level in LEVELS:
        sel = [x for x in rows if x["level"] == level]
        ok = [x for x in sel if x["feasible"]]
        over = sum(x["over"] for x in ok)
        rate = over / len(ok)
        orig = [x for x in ok if x["split"] == 0]
        at_half = [x["test_accuracy"] for x in ok if x["budget"] == 0.5]
        at_half_orig = [x["test_accuracy"] for x in orig if x["budget"] == 0.5]
        summary[str(level)] = {
            "points": len(ok), "infeasible": len(sel) - len(ok), "over": over, "over_rate": rate,
            "over_rate_se": math.sqrt(rate * (1 - rate) / len(ok)),
            "over_original_split": f"{sum(x['over'] for x in orig)} of {len(orig)}",
            "max_excess": max(x["test_fraction"] - x["budget"] for x in ok),
            "test_accuracy_at_0.5": float(np.mean(at_half)),
            "test_accuracy_at_0.5_original_split": float(np.mean(at_half_orig)),
            "test_fraction_at_0.5": float(np.mean([x["test_fraction"] for x in ok if x["budget"] == 0.5])),
        }
    return {"summary": summary, "rows": rows}


def val_halves(all_logits: dict, repeats: int = 30, seed: int = 0) -> dict:
    """The default chosen on val alone: calibrate on one random half of val200, score the other half."""
    import torch

    from dynadapter.inference.calibrate import calibrate, evaluate_thresholds
    from dynadapter.inference.flops import StageCosts

    rng = np.random.default_rng(seed)
    out = {}
    for level in LEVELS:
        over, points, acc_half = 0, 0, []
        for (task, s), lgs in all_logits.items():
            lg = lgs["select"]
            costs = StageCosts.from_dict(lg["costs"])
            n = lg["val_y"].numel()
            for _ in range(repeats):
                perm = torch.from_numpy(rng.permutation(n))
                a, b_ = perm[: n // 2], perm[n // 2:]
                for budget in BUDGETS:
                    cal = calibrate(val_logits=lg["val"][:, a], val_labels=lg["val_y"][a], costs=costs,
                                    budget_fraction=budget, budget_confidence=level)
                    if not cal.feasible:
                        continue
                    ev = evaluate_thresholds(lg["val"][:, b_], lg["val_y"][b_], cal.thresholds, costs)
                    points += 1
                    over += ev.fraction > budget + 1e-9
                    if budget == 0.5:
                        acc_half.append(ev.accuracy)
        out[str(level)] = {"points": points, "over_rate": over / points, "held_out_val_accuracy_at_0.5":
                           float(np.mean(acc_half))}
    return out


def accuracy_drop(all_logits: dict, resplits: int, seed: int = 0) -> dict:
    from dynadapter.inference.calibrate import calibrate_drop, evaluate_thresholds

    out = {}
    rows = []
    for task, s, r, costs, val, val_y, test, test_y in every_split(all_logits, resplits, seed + 1):
        last = evaluate_thresholds(test, test_y, [2.0] * (costs.num_exits - 1) + [0.0], costs).accuracy
        for eps in DROPS:
            cal = calibrate_drop(val_logits=val, val_labels=val_y, costs=costs, max_drop=eps,
                                 confidence_level=DROP_LEVEL)
            ev = evaluate_thresholds(test, test_y, cal.thresholds, costs)
            rows.append({"task": task, "seed": s, "split": r, "eps": eps, "bound": cal.bound,
                         "test_drop": last - ev.accuracy, "test_fraction": ev.fraction,
                         "holds": last - ev.accuracy <= eps + 1e-12})
    for eps in DROPS:
        sel = [x for x in rows if x["eps"] == eps]
        orig = [x for x in sel if x["split"] == 0]
        out[str(eps)] = {"pairs": f"{sum(x['holds'] for x in orig)} of {len(orig)}",
                         "holds_rate_original": sum(x["holds"] for x in orig) / len(orig),
                         "holds_rate_all_splits": sum(x["holds"] for x in sel) / len(sel),
                         "test_fraction_mean": float(np.mean([x["test_fraction"] for x in sel])),
                         "test_drop_mean": float(np.mean([x["test_drop"] for x in sel])),
                         "per_task_original": {f"{x['task']}/seed{x['seed']}": {
                             "test_drop": x["test_drop"], "test_fraction": x["test_fraction"], "bound": x["bound"]}
                             for x in orig}}
    return out


def protocols(all_logits: dict, budget: float = 0.5) -> dict:
    from dynadapter.inference.calibrate import calibrate, evaluate_thresholds
    from dynadapter.inference.flops import StageCosts

    rows = []
    for (task, s), lgs in all_logits.items():
        if "standard_final" not in lgs:
            continue
        for level in (None, 0.9):
            for name, donor, reported in (("select", "select", "select"),
                                          ("standard, thresholds from the selection model", "standard_old",
                                           "standard_final"),
                                          ("standard, thresholds from the donor", "standard_donor",
                                           "standard_final")):
                d, rep = lgs[donor], lgs[reported]
                costs = StageCosts.from_dict(rep["costs"])
                cal = calibrate(val_logits=d["val"], val_labels=d["val_y"], costs=StageCosts.from_dict(d["costs"]),
                                budget_fraction=budget, budget_confidence=level)
                ev = evaluate_thresholds(rep["test"], rep["test_y"], cal.thresholds, costs)
                rows.append({"task": task, "seed": s, "level": level, "protocol": name,
                             "test_accuracy": ev.accuracy, "test_fraction": ev.fraction,
                             "over": ev.fraction > budget + 1e-9})
    summary = {}
    for row in rows:
        key = f"{row['protocol']} | confidence {row['level']}"
        summary.setdefault(key, []).append(row)
    return {"rows": rows, "summary": {k: {"test_accuracy": float(np.mean([r["test_accuracy"] for r in v])),
                                          "test_fraction": float(np.mean([r["test_fraction"] for r in v])),
                                          "over": f"{sum(r['over'] for r in v)} of {len(v)}"}
                                      for k, v in summary.items()}}


def markdown(result: dict) -> str:
    """BENCHMARKS.md §7's tables, from the result file alone (`--tables`)."""
    out = ["| `evaluate.budget_confidence` | over the budget (all splits) | original split | worst excess | "
           "test accuracy at 0.5 (all splits / original) | test MACs at 0.5 |", "|---|---|---|---|---|---|"]
    for level, v in result["adherence"]["summary"].items():
        out.append(f"| {'null' if level == 'None' else level} | {v['over']} of {v['points']} ({100 * v['over_rate']:.1f}"
                   f" ± {100 * v['over_rate_se']:.1f} %) | {v['over_original_split']} | {v['max_excess']:+.3f} | "
                   f"{v['test_accuracy_at_0.5']:.4f} / {v['test_accuracy_at_0.5_original_split']:.4f} | "
                   f"{v['test_fraction_at_0.5']:.3f} |")
    out += ["", "| confidence | held-out val: over the budget | held-out val accuracy at 0.5 |", "|---|---|---|"]
    out += [f"| {'null' if k == 'None' else k} | {100 * v['over_rate']:.1f} % of {v['points']} | "
            f"{v['held_out_val_accuracy_at_0.5']:.4f} |" for k, v in result["val_halves"].items()]
    out += ["", "| eps | holds: pairs (all splits) | test MACs fraction | mean test drop |", "|---|---|---|---|"]
    out += [f"| {eps} | {v['pairs']} ({100 * v['holds_rate_all_splits']:.1f} %) | {v['test_fraction_mean']:.3f} | "
            f"{v['test_drop_mean']:+.4f} |" for eps, v in result["accuracy_drop"].items()]
    names = ["select", "standard, thresholds from the selection model", "standard, thresholds from the donor"]
    rows = result["protocols"]["rows"]
    if rows:
        out += ["", "| task | seed | select | standard, old transfer | standard, donor | select, 0.9 | "
                "standard old, 0.9 | standard donor, 0.9 |", "|---|---|---|---|---|---|---|---|"]
        for task in result["tasks"]:
            for seed in result["seeds"]:
                cells = []
                for level in (None, 0.9):
                    for name in names:
                        x = next(r for r in rows if (r["task"], r["seed"], r["level"], r["protocol"]) ==
                                 (task, seed, level, name))
                        cells.append(f"{x['test_accuracy']:.3f} / {x['test_fraction']:.3f}{' ⚠' if x['over'] else ''}")
                out.append(f"| {task} | {seed} | " + " | ".join(cells) + " |")
        means = []
        for level in (None, 0.9):
            for name in names:
                v = result["protocols"]["summary"][f"{name} | confidence {level}"]
                means.append(f"{v['test_accuracy']:.3f} / {v['test_fraction']:.3f} ({v['over']} over)")
        out.append("| **mean** | | " + " | ".join(means) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--tasks", default=None, help="comma-separated (default: base.tasks)")
    ap.add_argument("--resplits", type=int, default=10)
    ap.add_argument("--no-standard", action="store_true", help="skip the standard-protocol trainings")
    ap.add_argument("--tables", action="store_true", help="print BENCHMARKS.md's tables from the result file")
    args = ap.parse_args(argv)
    if args.tables:
        print(markdown(json.loads(OUT.read_text())))
        return 0
    # the train stage's settings: params.yaml with the tune stage's winner applied, as `make repro` trains
    params = load_params(args.params)
    params = load_params(args.params, best_overrides(Path(params.base.paths.outputs) / "tune" / "best_params.yaml"))
    tasks = args.tasks.split(",") if args.tasks else params.base.tasks
    seeds = [int(s) for s in args.seeds.split(",")]
    protocols_wanted = ["select"] + ([] if args.no_standard else ["standard"])
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    import torch

    torch.manual_seed(0)
    all_logits = {(t, s): cached_models(params, t, s, protocols_wanted, log) for s in seeds for t in tasks}
    result = {
        "command": ".venv/bin/python bench/budget_adherence.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "tasks": tasks, "seeds": seeds, "resplits": args.resplits, "budgets": BUDGETS,
        "adherence": adherence(all_logits, args.resplits),
        "val_halves": val_halves(all_logits),
        "accuracy_drop": accuracy_drop(all_logits, args.resplits),
        "protocols": protocols(all_logits),
    }
    OUT.write_text(json.dumps(result, separators=(",", ":")) + "\n")  # every row: what each table is made of
    log("\nbudget adherence (test MACs over the budget; budgets 0.35-1.00):")
    for level, v in result["adherence"]["summary"].items():
        log(f"  confidence {level:>5}: {v['over']:>4} of {v['points']} over ({100 * v['over_rate']:.1f} "
            f"± {100 * v['over_rate_se']:.1f} %), original split {v['over_original_split']}, worst excess "
            f"{v['max_excess']:+.3f}; test acc at 0.5 {v['test_accuracy_at_0.5']:.4f} (original split "
            f"{v['test_accuracy_at_0.5_original_split']:.4f}), test MACs at 0.5 {v['test_fraction_at_0.5']:.3f}")
    log("val halves (choosing the default on val):")
    for level, v in result["val_halves"].items():
        log(f"  confidence {level:>5}: over {100 * v['over_rate']:.1f} % of {v['points']}, held-out val acc at 0.5 "
            f"{v['held_out_val_accuracy_at_0.5']:.4f}")
    log(f"accuracy_drop target (confidence {DROP_LEVEL}):")
    for eps, v in result["accuracy_drop"].items():
        log(f"  eps {eps}: holds for {v['pairs']} (task, seed) pairs, {100 * v['holds_rate_all_splits']:.1f} % of "
            f"all splits; test MACs {v['test_fraction_mean']:.3f}, test drop {v['test_drop_mean']:+.4f}")
    log("protocols at budget 0.5:")
    for key, v in result["protocols"]["summary"].items():
        log(f"  {key}: test acc {v['test_accuracy']:.4f}, test MACs {v['test_fraction']:.3f}, over {v['over']}")
    log(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
