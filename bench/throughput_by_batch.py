"""Benchmark (issue 25): compacted dynamic inference against full depth at every batch size, next to its limit.

For each task, the default run's Dyn-Adapter model (models/tasks/<task>/dyn, as `make repro` saved it) is
calibrated exactly as the evaluate stage calibrates it (budget 0.5, evaluate.* settings, the threshold donor
under the standard protocol). Then the first --images test images are streamed through it in batches of
1, 4, 16, 64 and 256, once compacted (`forward_dynamic`) and once at full depth (`full_depth_forward`), timed
interleaved in this one process (`compare_throughput`: dynamic, full, dynamic, full, ...; median of --repeats).

The limit at MACs fraction f is 1/f, with f the MACs fraction those same images cost (their exits, from the
stage cost table). Reported per batch size: images/s of both, their ratio, and the share of the limit
(ratio x f); the issue asks for >= 0.8 at batch 1-64 and >= 0.9 at 256.

With --profile, where the time goes at each batch size (embedding, stages, exit heads, the rest) for both paths.

With --geometry NAME (a timm ViT, e.g. vit_tiny_patch16_224), the same measurement at a real checkpoint's shape:
the first task's exits are replayed on a randomly initialised NAME built with the default model config (merged
Rep-Adapter, balanced heads). Its thresholds are set so that as many random images leave at each exit as the
default run's test images do (`replay_thresholds`), so f is the same and only the kernels differ. Timing only: its
predictions mean nothing. Writes bench/results/throughput_geometry_<NAME>.json.

    .venv/bin/python bench/throughput_by_batch.py [--tasks size] [--images 512] [--repeats 5] [--profile]
    .venv/bin/python bench/throughput_by_batch.py --geometry vit_tiny_patch16_224 --images 256 --repeats 3
    .venv/bin/python bench/throughput_by_batch.py --tables   # BENCHMARKS.md §8's tables from the result files

Writes bench/results/throughput_by_batch.json. About 2 minutes for the whole suite on the 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dynadapter.config import load_params

if TYPE_CHECKING:
    import torch

# torch and the model code are imported where they are used, so `markdown` loads without them (bench/tables.py)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "throughput_by_batch.json"
BATCHES = [1, 4, 16, 64, 256]
TARGET = {1: 0.8, 4: 0.8, 16: 0.8, 64: 0.8, 256: 0.9}


def geometry_out(name: str) -> Path:
    """The result file of a `--geometry name` run (name may be a glob pattern)."""
    return OUT.parent / f"throughput_geometry_{name}.json"


def calibrated_model(params, task: str):
    """The task's Dyn-Adapter model merged and holding the thresholds evaluate gives it at base.budget, with the
    task's test images (normalised float)."""
    from dynadapter.adapt import CALIBRATION_DIR, evaluate_task, load_task_for, load_trained, to_model_input
    from dynadapter.train.pretrain import backbone_checkpoint
    from pipelines.evaluate import guarantee_kwargs

    base = params.base
    checkpoint = backbone_checkpoint(base.backbone, base.paths.models)
    saved = Path(base.paths.models) / "tasks" / task / "dyn"
    model = load_trained(saved, checkpoint)[0]
    donor = load_trained(saved / CALIBRATION_DIR, checkpoint)[0] if (saved / CALIBRATION_DIR).is_dir() else None
    data = load_task_for(base, task, splits=("val", "test"))
    evaluate_task(model, data, budget=base.budget, calibration=params.evaluate.calibration, calibration_model=donor,
                  **guarantee_kwargs(params.evaluate))
    return model, to_model_input(data.test[0], None, data.norm)


def macs_fraction(model, exits: torch.Tensor) -> float:
    """What images leaving at `exits` cost under the model's thresholds, as a fraction of full-depth MACs."""
    import torch

    from dynadapter.inference import measure_stage_costs

    costs = measure_stage_costs(model)
    cum = torch.tensor(costs.cumulative(model.thresholds.tolist()), dtype=torch.float64)
    return float(cum[exits].mean() / costs.full_depth_baseline())


def streamed(fn, batch: int):
    """`fn` over the images in chunks of `batch`: one call of the timed function is the whole stream."""
    def run(x: torch.Tensor) -> None:
        for chunk in x.split(batch):
            fn(chunk)
    return run


def by_batch(model, x: torch.Tensor, exits: torch.Tensor, repeats: int) -> list[dict]:
    from dynadapter.inference import compare_throughput, full_depth_forward

    rows = []
    f = macs_fraction(model, exits)
    for batch in BATCHES:
        ips = compare_throughput({"dynamic": streamed(model.forward_dynamic, batch),
                                  "full": streamed(lambda c: full_depth_forward(model, c), batch)},
                                 x, repeats=repeats, warmup=1)
        ratio = ips["dynamic"] / ips["full"]
        rows.append({"batch": batch, "dynamic_images_per_s": ips["dynamic"], "full_images_per_s": ips["full"],
                     "ratio": ratio, "macs_fraction": f, "limit": 1 / f, "share_of_limit": ratio * f})
    return rows


def profile(model, x: torch.Tensor) -> list[dict]:
    """Seconds per image spent in the embedding, the stages, the exit heads and elsewhere (the rest: confidence,
    compaction, Python), for both paths, from torch.profiler's record_function ranges."""
    import torch
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    from dynadapter.inference import full_depth_forward

    parts = {"embed": model.embed, "run_stage": model.run_stage, "exit_logits": model.exit_logits}
    for name, fn in parts.items():
        setattr(model, name, (lambda f, n: lambda *a: _ranged(record_function, n, f, *a))(fn, name))
    out = []
    try:
        for batch in BATCHES:
            row = {"batch": batch}
            for path, fn in (("dynamic", model.forward_dynamic), ("full", lambda c: full_depth_forward(model, c))):
                run = streamed(fn, batch)
                with torch.no_grad():
                    run(x)
                    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                        with record_function("total"):
                            run(x)
                spent = {e.key: e.cpu_time_total / 1e6 / x.shape[0] for e in prof.key_averages()
                         if e.key in ("total", *parts)}
                spent["rest"] = spent["total"] - sum(spent.get(k, 0.0) for k in parts)
                row[path] = {k: spent.get(k, 0.0) for k in ("total", *parts, "rest")}
            out.append(row)
    finally:
        for name in parts:
            delattr(model, name)  # back to the class's methods
    return out


def geometry_model(params, name: str, num_classes: int):
    """A randomly initialised timm `name` (no download) with the default run's model config, merged for inference."""
    import torch

    from dynadapter.config import BackboneConfig
    from dynadapter.models import build_model, merge_petl

    torch.manual_seed(params.base.seed)
    model = build_model(BackboneConfig(name=name, overrides={}), params.base.model, num_classes).eval()
    merge_petl(model)
    return model


def replay_thresholds(model, x: torch.Tensor, target: torch.Tensor) -> list[float]:
    """Thresholds under which as many of the images `x` leave at each exit as `target` (one exit index per image)
    holds: at exit s, the images still in flight with the k_s highest confidences leave (k_s = target's count)."""
    import torch

    from dynadapter.models.dyn_vit import MAX_CONFIDENCE, confidence_score

    counts = torch.bincount(target, minlength=len(model.exits)).tolist()
    with torch.inference_mode():
        scores = [confidence_score(logits, model.confidence) for logits in model(x)]
    alive = torch.ones(x.shape[0], dtype=torch.bool)
    thresholds = []
    for s, k in enumerate(counts[:-1]):
        if k == 0:
            thresholds.append(MAX_CONFIDENCE + 1.0)  # nobody leaves: the head is skipped, as evaluate's would be
            continue
        th = float(scores[s][alive].sort(descending=True).values[k - 1])
        thresholds.append(th)
        alive &= scores[s] < th
    return thresholds + [0.0]


def replayed_geometry(params, name: str, task: str, images: int, repeats: int) -> dict:
    """`by_batch` on a random-init `name` whose exits replay `task`'s default-run exits on `images` inputs."""
    import torch

    from dynadapter.inference import exit_shares, run_dynamic

    trained, x = calibrated_model(params, task)
    target = run_dynamic(trained, x[:images])[1]
    model = geometry_model(params, name, trained.num_classes)
    size = model.backbone.patch_embed.img_size
    gen = torch.Generator().manual_seed(params.base.seed)
    inputs = torch.randn(target.numel(), 3, *size, generator=gen)
    model.set_thresholds(replay_thresholds(model, inputs, target))
    exits = run_dynamic(model, inputs)[1]
    return {"geometry": name, "task": task, "embed_dim": model.backbone.embed_dim, "tokens": int(
                model.backbone.patch_embed.num_patches + model.backbone.num_prefix_tokens),
            "exit_shares_replayed": exit_shares(target, len(model.exits)),
            "exit_shares": exit_shares(exits, len(model.exits)),
            "rows": by_batch(model, inputs, exits, repeats)}


STAGE_IMAGES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def _timed(fn, arg, repeats: int, calls: int) -> float:
    fn(arg)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn(arg)
        runs.append((time.perf_counter() - start) / calls)
    return statistics.median(runs)


def stage_seconds(model, x: torch.Tensor, repeats: int = 5, calls: int = 20) -> list[dict]:
    """The embedding and one stage (the second: what survivors of the first exit run; every stage is 3 equal
    blocks) timed on n images in flight: what a compacted stage costs when few images go on (median of
    `repeats` runs of `calls` calls)."""
    import torch

    with torch.inference_mode():
        tokens = model.embed(x[: max(STAGE_IMAGES)])
        return [{"images": n, "seconds": _timed(lambda t: model.run_stage(t, 1), tokens[:n].contiguous(), repeats, calls),
                 "embed_seconds": _timed(model.embed, x[:n].contiguous(), repeats, calls)} for n in STAGE_IMAGES]


def _at(rows: list[dict], key: str, n: int) -> float:
    """`key` at n images, linear between the measured sizes."""
    sizes = [r["images"] for r in rows]
    hi = next(i for i, size in enumerate(sizes) if size >= n)
    if sizes[hi] == n or hi == 0:
        return rows[hi][key] * n / sizes[hi]
    lo = hi - 1
    w = (n - sizes[lo]) / (sizes[hi] - sizes[lo])
    return rows[lo][key] * (1 - w) + rows[hi][key] * w


def stage_bound(model, exits: torch.Tensor, rows: list[dict]) -> list[dict]:
    """What any compaction could reach with these kernels: per call of B images, the embedding at B and each
    stage at the number of images still in flight there (its measured time, `stage_seconds`), and nothing
    else (no exit head, confidence or gather); full depth: the embedding and every stage at B. The ratio of the
    two is the batch size's real limit, below 1/f wherever a stage costs more per image for fewer images."""
    stages = len(model.exits)
    out = []
    for batch in BATCHES:
        dyn = full = 0.0
        for chunk in exits.split(batch):
            b = chunk.numel()
            embed = _at(rows, "embed_seconds", b)
            full += embed + stages * _at(rows, "seconds", b)
            dyn += embed + sum(_at(rows, "seconds", n) for n in ((chunk >= s).sum().item() for s in range(stages)) if n)
        out.append({"batch": batch, "ratio_bound": full / dyn})
    return out


def _ranged(record_function, name, fn, *args):
    with record_function(name):
        return fn(*args)


def markdown(result: dict) -> str:
    lines = [f"`{result['command']}` ({result['threads']} threads, {result['images']} test images per task, "
             f"median of {result['repeats']} interleaved repeats)", "",
             "| batch | dynamic img/s | full depth img/s | ratio | limit 1/f | share of the limit | target | "
             "tasks at target |", "|---|---|---|---|---|---|---|---|"]
    tasks = result["tasks"]
    for i, batch in enumerate(BATCHES):
        rows = [result["per_task"][t][i] for t in tasks]
        mean = lambda k: statistics.mean(r[k] for r in rows)  # noqa: E731
        hit = sum(r["share_of_limit"] >= TARGET[batch] for r in rows)
        lines.append(f"| {batch} | {mean('dynamic_images_per_s'):.0f} | {mean('full_images_per_s'):.0f} | "
                     f"{mean('ratio'):.2f}× | {mean('limit'):.2f}× | {mean('share_of_limit'):.2f} | "
                     f"{TARGET[batch]:.1f} | {hit} of {len(rows)} |")
    if result.get("profile"):
        lines += ["", f"Where the time goes ({result['profile_task']}, µs per image):", "",
                  "| batch | path | total | embed | stages | exit heads | rest |", "|---|---|---|---|---|---|---|"]
        for row in result["profile"]:
            for path in ("dynamic", "full"):
                p = row[path]
                lines.append(f"| {row['batch']} | {path} | {1e6 * p['total']:.0f} | {1e6 * p['embed']:.0f} | "
                             f"{1e6 * p['run_stage']:.0f} | {1e6 * p['exit_logits']:.0f} | {1e6 * p['rest']:.0f} |")
    if result.get("stage_seconds"):
        rows = result["stage_seconds"]
        lines += ["", "One stage (3 blocks) by images in flight: µs per call, and per image", "",
                  "| images | " + " | ".join(str(r["images"]) for r in rows) + " |",
                  "|---|" + "---|" * len(rows),
                  "| µs per call | " + " | ".join(f"{1e6 * r['seconds']:.0f}" for r in rows) + " |",
                  "| µs per image | " + " | ".join(f"{1e6 * r['seconds'] / r['images']:.0f}" for r in rows) + " |",
                  "| embedding, µs per image | " + " | ".join(f"{1e6 * r['embed_seconds'] / r['images']:.0f}"
                                                          for r in rows) + " |"]
    if result.get("stage_bound"):
        task = result["profile_task"]
        lines += ["", f"The limit these kernels allow ({task}): embedding + each stage at the images still in flight, "
                  "at their measured times, nothing else", "",
                  "| batch | measured ratio | bound | limit 1/f | measured share | bound's share |", "|---|---|---|---|---|---|"]
        for row, measured in zip(result["stage_bound"], result["per_task"][task]):
            lines.append(f"| {row['batch']} | {measured['ratio']:.2f}× | {row['ratio_bound']:.2f}× | "
                         f"{measured['limit']:.2f}× | {measured['share_of_limit']:.2f} | {row['share_bound']:.2f} |")
    return "\n".join(lines)


def geometry_markdown(result: dict) -> str:
    """The by-batch table of a `--geometry` run."""
    shares = ", ".join(f"{100 * v:.1f} %" for v in result["exit_shares"])
    lines = [f"`{result['command']}` ({result['threads']} threads; {result['geometry']}, width "
             f"{result['embed_dim']}, {result['tokens']} tokens, random init; {result['images']} images leaving at "
             f"the exits as {result['task']}'s test images do: {shares}; median of {result['repeats']} interleaved "
             "repeats)", "",
             "| batch | dynamic img/s | full depth img/s | ratio | limit 1/f | share of the limit | target |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['batch']} | {r['dynamic_images_per_s']:.1f} | {r['full_images_per_s']:.1f} | "
                     f"{r['ratio']:.2f}× | {r['limit']:.2f}× | {r['share_of_limit']:.2f} | {TARGET[r['batch']]:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--tasks", default=None, help="comma-separated (default: base.tasks)")
    ap.add_argument("--images", type=int, default=512, help="test images streamed per task and batch size")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--profile", action="store_true", help="also break the time down (first task)")
    ap.add_argument("--geometry", default=None, metavar="TIMM_NAME",
                    help="replay the first task's exits on a random-init timm ViT of this name (timing only)")
    ap.add_argument("--tables", action="store_true", help="print BENCHMARKS.md's table from the result file")
    args = ap.parse_args(argv)
    if args.tables:
        print(markdown(json.loads(OUT.read_text())))
        for path in sorted(OUT.parent.glob(geometry_out("*").name)):
            print("\n" + geometry_markdown(json.loads(path.read_text())))
        return 0
    import torch

    from dynadapter.inference import run_dynamic

    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params(args.params)
    tasks = args.tasks.split(",") if args.tasks else params.base.tasks
    command = ".venv/bin/python bench/throughput_by_batch.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.geometry:
        start = time.perf_counter()
        result = {"command": command, "threads": torch.get_num_threads(), "images": args.images,
                  "repeats": args.repeats,
                  **replayed_geometry(params, args.geometry, tasks[0], args.images, args.repeats)}
        result["seconds"] = time.perf_counter() - start
        out = geometry_out(args.geometry)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(geometry_markdown(result))
        return 0
    result = {"command": command, "threads": torch.get_num_threads(), "images": args.images,
              "repeats": args.repeats, "tasks": tasks, "per_task": {}}
    start = time.perf_counter()
    for task in tasks:
        model, x = calibrated_model(params, task)
        x = x[: args.images]
        exits = run_dynamic(model, x)[1]  # each image's exit (per image: the same at any batch size)
        result["per_task"][task] = by_batch(model, x, exits, args.repeats)
        print(f"{task}: " + ", ".join(f"b{r['batch']} {r['share_of_limit']:.2f}" for r in result["per_task"][task])
              + f" of the limit ({time.perf_counter() - start:.0f} s)", flush=True)
        if args.profile and task == tasks[0]:
            result["profile_task"], result["profile"] = task, profile(model, x)
            result["stage_seconds"] = stage_seconds(model, x)
            result["stage_bound"] = stage_bound(model, exits, result["stage_seconds"])
            f = result["per_task"][task][0]["macs_fraction"]
            for row in result["stage_bound"]:
                row["share_bound"] = row["ratio_bound"] * f
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
