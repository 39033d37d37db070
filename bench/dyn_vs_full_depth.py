"""Benchmark (issue 3): Dyn-Adapter against the same PETL module at full depth, on the prepared suite.

Same backbone, same module, same trainer and training budget; thresholds calibrated on val only; accuracy on
test. Prints the figures BENCHMARKS.md records and writes them to bench/results/dyn_vs_full_depth.json:

1. suite-mean test accuracy of Dyn-Adapter at each val-calibrated budget against the full-depth baseline,
   and the lowest budget at which Dyn-Adapter is still at least as accurate (reported, never used to select);
2. measured CPU throughput of compacted dynamic inference at the --budget operating point against full depth,
   same test batch (--batch images), same process, interleaved repeats;
3. trainable parameters (PETL + heads) as a fraction of the backbone, and the training step time against the
   static full-depth baseline.

Needs the prepare and pretrain stages' outputs (`make repro`, or `dvc repro pretrain`). Run time on the 2-core
CPU machine with the defaults: about 6 minutes.
    .venv/bin/python bench/dyn_vs_full_depth.py [--method adapter] [--epochs N] [--tasks a,b]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dynadapter.adapt import adapt_task, curve_at_budgets, full_depth_baseline, load_task_for
from dynadapter.config import load_params
from dynadapter.train.pretrain import backbone_checkpoint

BUDGETS = [0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--method", default=None, help="PETL method (default: base.model.petl.method)")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default: train.epochs)")
    ap.add_argument("--tasks", default=None, help="comma-separated tasks (default: base.tasks)")
    ap.add_argument("--budget", type=float, default=0.5, help="operating point for the throughput figure")
    ap.add_argument("--batch", type=int, default=256, help="test images per timed batch")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="bench/results/dyn_vs_full_depth.json")
    args = ap.parse_args(argv)

    overrides = list(args.overrides)
    if args.method:
        overrides.append(f"base.model.petl.method={args.method}")
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    if args.tasks:
        overrides.append(f"base.tasks=[{args.tasks}]")
    overrides.append(f"base.budget={args.budget}")
    params = load_params(args.params, overrides)
    base = params.base
    checkpoint = backbone_checkpoint(base.backbone, base.paths.models)
    started = time.perf_counter()
    rows = {}
    for task in base.tasks:
        data = load_task_for(base, task)
        dyn, dyn_model = adapt_task(task, data, base.backbone, base.model, params.train, checkpoint,
                                    budget=args.budget, seed=base.seed, throughput_batch=args.batch, repeats=args.repeats,
                                    progress=False)
        static_cfg, static_train = full_depth_baseline(base.model, params.train)
        full, _ = adapt_task(task, data, base.backbone, static_cfg, static_train, checkpoint, budget=1.0,
                             seed=base.seed, progress=False)
        d, f = dyn.to_dict(), full.to_dict()
        by_budget = curve_at_budgets(d["curve"], BUDGETS)
        rows[task] = {
            "dyn_test_acc": d["test"]["accuracy"],
            "dyn_fraction": d["test"]["fraction"],
            "full_test_acc": f["test"]["accuracy"],
            "exit_accuracy": d["test_exit_accuracy"],
            "exit_fraction": d["test"]["exit_fraction"],
            "curve": {b: (by_budget[b]["test_accuracy"], by_budget[b]["test_fraction"])
                      for b in BUDGETS if b in by_budget},
            "speedup": d["throughput"]["speedup"],
            "dyn_images_per_s": d["throughput"]["dynamic_images_per_s"],
            "full_images_per_s": d["throughput"]["full_images_per_s"],
            "throughput_exit_fraction": d["throughput"]["exit_fraction"],
            "params": d["params"],
            "full_params": f["params"],
            "step_ms": 1000 * d["step_seconds"],
            "full_step_ms": 1000 * f["step_seconds"],
            "full_depth_macs": d["full_depth_macs"],
        }
        r = rows[task]
        print(f"{task}: dyn {r['dyn_test_acc']:.4f} at {r['dyn_fraction']:.3f} | full depth {r['full_test_acc']:.4f} | "
              f"speedup {r['speedup']:.2f}x | step {r['step_ms']:.1f} vs {r['full_step_ms']:.1f} ms", flush=True)

    n = len(rows)
    mean = lambda key: sum(r[key] for r in rows.values()) / n  # noqa: E731
    curve = []
    for b in BUDGETS:
        if all(b in r["curve"] for r in rows.values()):
            curve.append({"budget": b, "test_acc": sum(r["curve"][b][0] for r in rows.values()) / n,
                          "fraction": sum(r["curve"][b][1] for r in rows.values()) / n})
    full_mean = mean("full_test_acc")
    holding = [c["budget"] for c in curve if c["test_acc"] >= full_mean]
    summary = {
        "method": base.model.petl.method,
        "epochs": params.train.epochs,
        "tasks": list(rows),
        "budget": args.budget,
        "dyn_test_acc_mean": mean("dyn_test_acc"),
        "dyn_fraction_mean": mean("dyn_fraction"),
        "full_test_acc_mean": full_mean,
        "lowest_budget_dyn_ge_full": min(holding) if holding else None,
        "curve": curve,
        "speedup_mean": mean("speedup"),
        "trainable_fraction_of_backbone": mean_frac(rows, "trainable"),
        "petl_fraction_of_backbone": mean_frac(rows, "petl"),
        "step_time_ratio_dyn_over_full": mean("step_ms") / mean("full_step_ms"),
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 1),
        "per_task": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")

    print(f"\nsuite mean over {n} tasks (unweighted), method {summary['method']}, {summary['epochs']} epochs")
    print(f"  full-depth PETL          test acc {full_mean:.4f}")
    print(f"  Dyn-Adapter @ {args.budget:.2f}      test acc {summary['dyn_test_acc_mean']:.4f} "
          f"at {summary['dyn_fraction_mean']:.3f} of full-depth MACs")
    print("  budget  test_acc  MACs fraction")
    for c in curve:
        print(f"  {c['budget']:.2f}    {c['test_acc']:.4f}    {c['fraction']:.3f}")
    print(f"  lowest budget with Dyn-Adapter >= full depth: {summary['lowest_budget_dyn_ge_full']}")
    print(f"  throughput (batch {args.batch}) dynamic / full depth: {summary['speedup_mean']:.2f}x")
    print(f"  trainable (PETL + heads) / backbone: {summary['trainable_fraction_of_backbone']:.4f} "
          f"(PETL only {summary['petl_fraction_of_backbone']:.4f})")
    print(f"  training step time Dyn-Adapter / full-depth PETL: {summary['step_time_ratio_dyn_over_full']:.3f}")
    print(f"  wall time {summary['seconds']} s -> {args.out}")
    return 0


def mean_frac(rows: dict, key: str) -> float:
    return sum(r["params"][key] / r["params"]["backbone"] for r in rows.values()) / len(rows)


if __name__ == "__main__":
    sys.exit(main())
