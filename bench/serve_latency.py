"""Benchmark (issue 26): the registered champion served over REST, end to end over HTTP on this machine.

Starts `python -m pipelines.serve` (what `make serve` runs: MLflow's scoring server, one worker, 127.0.0.1) on
the champion of --task, waits for /ping, then times POST /invocations with 1 and with 64 test images at
--budget (JSON encode + HTTP + schema check + compacted dynamic inference + JSON decode: what a client sees),
--repeats times each after one warm-up request, interleaved. Also reports, over the task's whole test split (256
images per request), the MACs the served model spent against the budget and its accuracy, and the same at 1.0. The server is stopped by
its PID. Also times, in this process, the champion's `pyfunc.predict` and `json.dumps` of the request for 1 and 64
images (where the time goes). Writes bench/results/serve_latency.json.

Needs `make repro` first (the register stage registers the champions in base.mlflow.tracking_uri).
    .venv/bin/python bench/serve_latency.py [--task digits] [--budget 0.5] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from dynadapter.adapt import load_task_for
from dynadapter.config import load_params
from pipelines.serve import invoke, running_server

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "serve_latency.json"


def in_process_ms(args, x: np.ndarray, repeats: int = 20) -> dict[str, dict[str, float]]:
    """Median ms of `pyfunc.predict` on the champion loaded here, and of `json.dumps` of the request body, for 1 and
    64 images: how much of the HTTP latency is the model."""
    import mlflow

    from dynadapter.tracking import model_name_for, resolve_tracking_uri

    params = load_params(args.params)
    mlflow.set_tracking_uri(resolve_tracking_uri(params.base.mlflow.tracking_uri, ROOT))
    model = mlflow.pyfunc.load_model(
        f"models:/{model_name_for(args.task, params.register.model_prefix)}@{params.register.alias}")
    out = {}
    for n in (1, 64):
        calls = {"pyfunc_predict": lambda: model.predict(x[:n], params={"budget": args.budget}),
                 "json_dumps_request": lambda: json.dumps({"inputs": x[:n].tolist(),
                                                           "params": {"budget": args.budget}})}
        out[str(n)] = {}
        for name, call in calls.items():
            call()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            out[str(n)][name] = 1e3 * statistics.median(times)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--task", default="digits")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)

    params = load_params(args.params)
    test = load_task_for(params.base, args.task, splits=("test",), uint8=True).test
    x_all = (test[0].float() / 255).numpy()
    y_all = test[1].numpy()
    x = x_all[:64]
    sizes = (1, 64)
    timings: dict[int, list[float]] = {n: [] for n in sizes}
    with running_server(["--params", args.params, "--task", args.task]) as url:
        _, full = invoke(url, x, {"thresholds": [2.0] * 3 + [0.0]})  # everyone to the last exit: the baseline
        baseline = full["predictions"]["macs"][0]
        quality = {}
        for budget in (args.budget, 1.0):  # the whole test split, 256 images per request
            macs, right = [], []
            for i in range(0, len(x_all), 256):
                status, body = invoke(url, x_all[i : i + 256], {"budget": budget})
                if status != 200:
                    print(f"error: budget {budget}: HTTP {status}: {body.get('message', body)}", file=sys.stderr)
                    return 1
                macs += body["predictions"]["macs"]
                right += list(np.asarray(body["predictions"]["prediction"]) == y_all[i : i + 256])
            quality[str(budget)] = {"macs_fraction": float(np.mean(macs)) / baseline,
                                    "accuracy": float(np.mean(right)), "images": len(right)}
        for n in sizes:
            invoke(url, x[:n], {"budget": args.budget})  # warm-up
        for _ in range(args.repeats):
            for n in sizes:
                t0 = time.perf_counter()
                status, _ = invoke(url, x[:n], {"budget": args.budget})
                timings[n].append(time.perf_counter() - t0)
                assert status == 200
    # where the time goes, in this process: the model alone (the pyfunc the server loads) and the client's JSON
    in_process = in_process_ms(args, x)
    result = {
        "task": args.task, "budget": args.budget, "repeats": args.repeats, "full_depth_macs": baseline,
        "latency_ms": {str(n): {"median": 1e3 * statistics.median(t), "p90": 1e3 * float(np.quantile(t, 0.9)),
                                "min": 1e3 * min(t)} for n, t in timings.items()},
        "images_per_second_64": 64 / statistics.median(timings[64]),
        "in_process_median_ms": in_process,
        "on_the_test_split": quality,
        "command": ".venv/bin/python bench/serve_latency.py " + " ".join(argv or sys.argv[1:]),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    for n in sizes:
        lat = result["latency_ms"][str(n)]
        print(f"{n:>3} image(s): median {lat['median']:.1f} ms, p90 {lat['p90']:.1f} ms, min {lat['min']:.1f} ms")
    for n, v in in_process.items():
        print(f"{n:>3} image(s) in process: pyfunc.predict {v['pyfunc_predict']:.1f} ms, json.dumps of the request "
              f"{v['json_dumps_request']:.1f} ms")
    for budget, q in quality.items():
        print(f"budget {budget}: {q['macs_fraction']:.3f} of full-depth MACs, accuracy {q['accuracy']:.4f} "
              f"({q['images']} test images)")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
