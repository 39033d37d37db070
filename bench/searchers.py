"""Benchmark (issue 25): random search against Optuna's TPE, both under ASHA, at the same trial budget.

For each searcher and seed, the tune stage's sweep as `make repro` runs it (params.yaml: same search space,
tasks, epochs, ASHA rungs, objective), with --samples trials and base.seed = the seed (the searcher's seed and
every trial's initial weights). Each sweep is a real Ray Tune run (`dynadapter.tune.run_tune`); its trials and
checkpoints go to bench/results/searchers/runs/ (gitignored), so a rerun resumes or reuses finished sweeps.

Arms: `random` and `tpe` over params.yaml's search space; `tpe_free`, TPE over the paper's parametrisation of
the head-balancing weights (a free start and end loss weight per exit) instead of the pattern and its strength.

Reported, on val only (the objective the sweep maximises, tune.objective, and the other metric):
- the best objective after k trials, k = 1 ... --samples, trials in the order the searcher drew them;
- per sweep: the best objective, its trial's settings, the epochs all trials trained (what ASHA saved) and the
  wall time.

    .venv/bin/python bench/searchers.py [--seeds 0,1] [--samples 10] [--searchers random,tpe,tpe_free]
    .venv/bin/python bench/searchers.py --tables   # BENCHMARKS.md's tables from the result file

Writes bench/results/searchers.json. About 8 minutes per sweep of 10 trials on the 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "searchers.json"
RUNS = ROOT / "bench" / "results" / "searchers" / "runs"
# the arms compared: a searcher, and for tpe_free the paper's parametrisation of the head-balancing weights
# (a free start and end loss weight per exit, 8 dimensions) in place of the 1-D pattern-plus-strength family
ARMS = {
    "random": ["tune.searcher=random"],
    "tpe": ["tune.searcher=tpe"],
    "tpe_free": ["tune.searcher=tpe", "tune.search_space.priority_start=[0.0,2.0]",
                 "tune.search_space.priority_end=[0.0,2.0]", "tune.search_space.priority_pattern=null",
                 "tune.search_space.priority_strength=null"],
}
SETTINGS = ("train.sparsity.p_max", "train.sparsity.p_min", "train.sparsity.q", "train.priority.pattern",
            "train.priority.strength", "train.lr")


def sweep(params_path: str, arm: str, seed: int, samples: int) -> dict:
    from dynadapter.config import load_params
    from dynadapter.ray_session import init_ray
    from dynadapter.train.pretrain import backbone_checkpoint
    from dynadapter.trial import CURVE_METRIC, METRIC
    from dynadapter.tune import objective_metric, run_tune

    params = load_params(params_path, [f"base.seed={seed}", *ARMS[arm], f"tune.num_samples={samples}"])
    metric = objective_metric(params.tune)
    init_ray(params.tune.ray.address)
    start = time.perf_counter()
    outcome = run_tune(params, backbone_checkpoint(params.base.backbone, params.base.paths.models),
                       storage_path=RUNS, name=f"{arm}-seed{seed}-n{samples}", resume=True, verbose=0)
    seconds = time.perf_counter() - start
    trials = sorted(outcome.trials, key=lambda r: str(r["trial_id"]))  # Tune's ids count up in draw order
    best, best_so_far = float("-inf"), []
    for row in trials:
        if row["error"] is None and row[metric] == row[metric]:
            best = max(best, row[metric])
        best_so_far.append(best)
    return {
        "searcher": arm, "seed": seed, "samples": samples, "objective": params.tune.objective,
        "metric": metric, "seconds": seconds, "best": outcome.best_metric, "best_trial": outcome.best_trial,
        "best_settings": outcome.best_overrides,
        "best_so_far": best_so_far,
        "epochs_trained": sum(int(r["epochs"]) for r in trials),
        "trials": [{"trial_id": r["trial_id"], metric: r[metric], METRIC: r.get(METRIC),
                    CURVE_METRIC: r.get(CURVE_METRIC), "epochs": r["epochs"],
                    **{k: v for k, v in r.items() if k.startswith("train.")}} for r in trials],
    }


def _ranks(values: list[float]) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks


def evidence(sweeps: list[dict], metric: str) -> list[str]:
    """Does any searched setting move the objective? Over every trial that trained all epochs (ASHA's
    survivors, comparable with each other), per seed: the objective's spread and the rank correlation
    (Spearman) of each numeric setting with it."""
    lines = ["Trials that trained every epoch, per seed (all arms pooled): the objective's spread and each "
             "setting's rank correlation with it", "",
             "| seed | trials | objective min / median / max | " + " | ".join(k.split(".", 1)[1] for k in SETTINGS
                                                                    if k != "train.priority.pattern") + " |",
             "|---|---|---|" + "---|" * (len(SETTINGS) - 1)]
    for seed in sorted({s["seed"] for s in sweeps}):
        full = max(t["epochs"] for s in sweeps if s["seed"] == seed for t in s["trials"])
        rows = [t for s in sweeps if s["seed"] == seed for t in s["trials"]
                if t["epochs"] == full and t[metric] == t[metric]]
        cells = []
        for key in SETTINGS:
            if key == "train.priority.pattern":
                continue
            have = [t for t in rows if isinstance(t.get(key), (int, float))]
            if len(have) < 4:
                cells.append("–")
                continue
            yk = _ranks([t[metric] for t in have])
            cells.append(f"{np.corrcoef(_ranks([t[key] for t in have]), yk)[0, 1]:+.2f} (n={len(have)})")
        values = sorted(t[metric] for t in rows)
        lines.append(f"| {seed} | {len(rows)} | {values[0]:.4f} / {statistics.median(values):.4f} / {values[-1]:.4f} | "
                     + " | ".join(cells) + " |")
    return lines


def markdown(result: dict) -> str:
    sweeps = result["sweeps"]
    searchers = list(dict.fromkeys(s["searcher"] for s in sweeps))
    seeds = sorted({s["seed"] for s in sweeps})
    metric = sweeps[0]["metric"]
    commands = "; ".join(f"`{c}`" for c in result.get("commands", [result.get("command")]))
    lines = [f"{commands}: objective `{metric}` (val), {sweeps[0]['samples']} trials per sweep", "",
             "| searcher | " + " | ".join(f"best, seed {s}" for s in seeds) + " | mean | epochs trained | "
             "minutes per sweep |", "|---|" + "---|" * (len(seeds) + 3)]
    for name in searchers:
        mine = {s["seed"]: s for s in sweeps if s["searcher"] == name}
        lines.append(f"| {name} | " + " | ".join(f"{mine[s]['best']:.4f}" for s in seeds) +
                     f" | {statistics.mean(m['best'] for m in mine.values()):.4f} | "
                     f"{statistics.mean(m['epochs_trained'] for m in mine.values()):.1f} | "
                     f"{statistics.mean(m['seconds'] for m in mine.values()) / 60:.1f} |")
    n = sweeps[0]["samples"]
    lines += ["", "Best objective after k trials (mean over seeds):", "",
              "| searcher | " + " | ".join(f"k={k}" for k in range(1, n + 1)) + " |", "|---|" + "---|" * n]
    for name in searchers:
        mine = [s["best_so_far"] for s in sweeps if s["searcher"] == name]
        lines.append(f"| {name} | " + " | ".join(f"{statistics.mean(c[k] for c in mine):.4f}"
                                                 for k in range(n)) + " |")
    lines += ["", *evidence(sweeps, metric)]
    lines += ["", "Winning settings:", "", "| searcher | seed | " + " | ".join(k.split(".", 1)[1] for k in SETTINGS)
              + " |", "|---|---|" + "---|" * len(SETTINGS)]
    for s in sweeps:
        cells = [s["best_settings"].get(k) for k in SETTINGS]
        free = [s["best_settings"].get(f"train.priority.{k}") for k in ("start", "end")]
        if free[0] is not None:  # tpe_free: the per-exit weights in the pattern column
            cells[3] = "start " + "/".join(f"{w:.2f}" for w in free[0]) + ", end " + "/".join(f"{w:.2f}" for w in free[1])
        lines.append(f"| {s['searcher']} | {s['seed']} | " + " | ".join(
            "–" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v)) for v in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--samples", type=int, default=10, help="trials per sweep")
    ap.add_argument("--searchers", default="random,tpe", help=f"comma-separated arms of {sorted(ARMS)}")
    ap.add_argument("--tables", action="store_true", help="print BENCHMARKS.md's tables from the result file")
    args = ap.parse_args(argv)
    if args.tables:
        print(markdown(json.loads(OUT.read_text())))
        return 0
    import ray

    command = ".venv/bin/python bench/searchers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    # earlier invocations' sweeps stay (another arm or seed); a sweep run again replaces its earlier record
    result = json.loads(OUT.read_text()) if OUT.is_file() else {"sweeps": []}
    previous = [result.pop("command")] if "command" in result else []
    result["commands"] = list(dict.fromkeys([*result.get("commands", []), *previous, command]))
    try:
        for seed in (int(s) for s in args.seeds.split(",")):
            for name in args.searchers.split(","):
                s = sweep(args.params, name, seed, args.samples)
                result["sweeps"] = [o for o in result["sweeps"] if (o["searcher"], o["seed"], o["samples"])
                                    != (name, seed, args.samples)] + [s]
                print(f"{name} seed {seed}: best {s['metric']} {s['best']:.4f} after {s['samples']} trials, "
                      f"{s['seconds'] / 60:.1f} min; best so far {[round(b, 4) for b in s['best_so_far']]}",
                      flush=True)
                OUT.write_text(json.dumps(result, indent=1) + "\n")  # what is done so far survives a stop
    finally:
        ray.shutdown()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
