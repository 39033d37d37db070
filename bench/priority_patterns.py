"""Which prioritization pattern does VAL prefer? The evidence behind `train.priority`'s default.

For each pattern (flat, shallow_first, deep_first; `--strength`), train Dyn-Adapter on every task with the
`train` section of params.yaml (tune's values are not used, so the comparison is the default's), calibrate
thresholds on val at base.budget, and report the suite-mean VAL accuracy at that budget and of the last exit.
Test is never read. About 4 minutes per pattern on the 2-core CPU machine (5 tasks, 20 epochs).

    .venv/bin/python bench/priority_patterns.py [--strength 0.5] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dynadapter.adapt import load_task_for, train_task
from dynadapter.config import load_params
from dynadapter.inference import calibrate, collect_exit_logits, measure_stage_costs
from dynadapter.train.pretrain import backbone_checkpoint

PATTERNS = ("shallow_first", "deep_first", "flat")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated subset of " + ", ".join(PATTERNS))
    ap.add_argument("--out", default="bench/results/priority_patterns.json")
    args = ap.parse_args(argv)
    results: dict[str, dict] = {}
    for pattern in args.patterns.split(","):
        params = load_params(args.params, args.overrides + [f"train.priority.pattern={pattern}",
                                                              f"train.priority.strength={args.strength}"])
        base = params.base
        checkpoint = backbone_checkpoint(base.backbone, base.paths.models)
        started, per_task = time.perf_counter(), {}
        for task in base.tasks:
            data = load_task_for(base, task)
            _, model = train_task(task, data, base.backbone, base.model, params.train, checkpoint, seed=base.seed,
                                  progress=False)
            model.eval()
            logits = collect_exit_logits(model, data.val[0])
            cal = calibrate(val_logits=logits, val_labels=data.val[1], costs=measure_stage_costs(model),
                            budget_fraction=base.budget)
            last = float((logits[-1].argmax(-1) == data.val[1]).float().mean())
            per_task[task] = {"val_at_budget": cal.val_accuracy, "val_fraction": cal.fraction, "val_last_exit": last}
        mean = {k: sum(t[k] for t in per_task.values()) / len(per_task) for k in next(iter(per_task.values()))}
        results[pattern] = {"suite": mean, "tasks": per_task, "seconds": round(time.perf_counter() - started)}
        print(f"{pattern}: val acc at budget {base.budget} {mean['val_at_budget']:.4f} (MACs {mean['val_fraction']:.3f}),"
              f" last exit {mean['val_last_exit']:.4f}  [{results[pattern]['seconds']} s]", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"strength": args.strength, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
