"""Benchmark (issue 22.3): peak memory of the cluster data path, 1 task against 8 tasks of the same size.

Generates a VTAB-1k-shaped folder (`<task>/{train800,val200,train800val200,test}.txt` + `images/<split>/*.jpg`,
the layout NOAH's get_vtab1k.py writes) with 1 task and with 8 tasks, each task the same size, then runs
`prepare` (here) and `train` + `evaluate` as a user runs them on a cluster: `python -m pipelines.<stage>` with
RAY_ADDRESS naming a Ray head of our own on 127.0.0.1 (tests/ray_head.py). It records

- the driver's peak RSS in each stage: the stage process's own high-water mark (`wait4` rusage ru_maxrss);
- one worker's peak RSS: the largest high-water mark (/proc/<pid>/status VmHWM, polled every 0.2 s) among the
  head's Ray Train workers (train) and evaluate tasks (evaluate), and of the Ray tasks that read a task's
  train/val for its runs (train, `_run_jobs`).

RSS counts the pages of Ray's shared-memory object store a process has touched (what it put or read). The
acceptance (issue 22): the driver's peak with 8 tasks is at most 1.5x its peak with 1 task.

    .venv/bin/python bench/memory.py [--size 64] [--train 200 --val 100 --test 1000] [--out DIR]

Run time on the shared 2-core CPU machine with the defaults: about 17 minutes (mostly the 16 Ray Train runs of
the 8-task case, two at a time). Figures in BENCHMARKS.md section 5.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/ray_head.py: a loopback head of our own, stopped by PID

TASKS = ["svhn", "eurosat", "patch_camelyon", "diabetic_retinopathy", "clevr_count", "clevr_dist", "dmlab", "kitti"]
NUM_CLASSES = {"svhn": 10, "eurosat": 10, "patch_camelyon": 2, "diabetic_retinopathy": 5, "clevr_count": 8,
               "clevr_dist": 6, "dmlab": 6, "kitti": 4}
BACKBONE = {"img_size": 64, "patch_size": 16, "embed_dim": 32, "depth": 4, "num_heads": 2}
STAGE_TIMEOUT = 1800


def write_vtab_task(root: Path, task: str, *, train: int, val: int, test: int, size: int, seed: int) -> None:
    """`root/task` in get_vtab1k.py's layout: list files numbering each split from 000000, JPEGs, and
    train800val200 as renumbered copies of train800 then val200."""
    rng = np.random.default_rng(seed)
    classes = NUM_CLASSES[task]

    def draw(n: int) -> list[tuple[np.ndarray, int]]:
        # smooth random images (noise JPEGs are unrealistically large): a coarse grid upsampled
        out = []
        for i in range(n):
            coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            out.append((np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)),
                        i % classes))
        return out

    items = {"train800": draw(train), "val200": draw(val), "test": draw(test)}
    items["train800val200"] = items["train800"] + items["val200"]
    folder = root / task
    for split, rows in items.items():
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        with open(folder / f"{split}.txt", "w") as f:
            for i, (array, label) in enumerate(rows):
                rel = f"images/{split}/{i:06d}.jpg"
                f.write(f"{rel} {label}\n")
                Image.fromarray(array).save(folder / rel)


def backbone_file(path: Path) -> Path:
    """A random-init backbone checkpoint (the memory path does not care what the weights learned)."""
    if not path.is_file():
        import torch
        from safetensors.torch import save_file

        from dynadapter.config import BackboneConfig
        from dynadapter.models import create_backbone

        torch.manual_seed(0)
        vit = create_backbone(BackboneConfig(name="vit_tiny_patch16_224", overrides=BACKBONE))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path


def params(root: Path, tasks: list[str], vtab: Path, checkpoint: Path, args) -> Path:
    raw = {
        "base": {"seed": 0, "paths": {k: str(root / k) for k in ("data", "models", "outputs")}, "tasks": tasks,
                 "backbone": {"name": "vit_tiny_patch16_224", "checkpoint": str(checkpoint), "overrides": BACKBONE},
                 "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "memory"}},
        "prepare": {"source": "vtab", "vtab_root": str(vtab)},
        "train": {"epochs": args.epochs, "batch_size": 32, "lr": 0.005,
                  "ray": {"num_workers": 1, "cpus_per_worker": 1.0},
                  "deepspeed": {"zero_stage": 0, "precision": "fp32"}},
        "evaluate": {"throughput_batch": 64, "throughput_repeats": 1},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class WorkerPeaks:
    """Polls the head's worker processes (descendants of its raylet) for their VmHWM, by Ray task name."""

    KINDS = {"RayTrainWorker": "train_worker", "_call": "evaluate_worker", "_run_jobs": "run_task"}

    def __init__(self, temp_dir: Path):
        import psutil

        self.psutil, self.temp_dir = psutil, str(temp_dir)
        self.peaks: dict[str, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _raylets(self):
        for p in self.psutil.process_iter(["name", "cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "raylet" in (p.info["name"] or "") and self.temp_dir in cmd:
                yield p

    def _poll(self) -> None:
        while not self.stop.is_set():
            for raylet in self._raylets():
                try:
                    children = raylet.children(recursive=True)
                except self.psutil.Error:
                    continue
                for child in children:
                    try:
                        title = " ".join(child.cmdline())
                        kind = next((k for name, k in self.KINDS.items() if f"ray::{name}" in title), None)
                        if kind is None:
                            continue
                        hwm = _vm_hwm(child.pid)
                    except (self.psutil.Error, OSError):
                        continue
                    self.peaks[kind] = max(self.peaks.get(kind, 0), hwm)
            self.stop.wait(0.2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def _vm_hwm(pid: int) -> int:
    """Peak resident set size of a live process, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_stage(stage: str, params_path: Path, env: dict, log: Path) -> tuple[float, int]:
    """`python -m pipelines.<stage>`: (seconds, the process's peak RSS in bytes)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", f"pipelines.{stage}", "--params", str(params_path)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{stage} exited {proc.returncode}; see {log}:\n{log.read_text()[-4000:]}")
    return seconds, usage.ru_maxrss * 1024


def scenario(n: int, work: Path, checkpoint: Path, args) -> dict:
    from ray_head import head_env, ray_head

    root = work / f"tasks{n}"
    vtab = root / "vtab-1k"
    tasks = TASKS[:n]
    for k, task in enumerate(tasks):
        write_vtab_task(vtab, task, train=args.train, val=args.val, test=args.test, size=args.size, seed=k)
    path = params(root, tasks, vtab, checkpoint, args)
    plain = {k: v for k, v in head_env("").items() if not k.startswith("RAY_")}
    result: dict = {"tasks": n}
    result["prepare_s"], result["prepare_driver_rss"] = run_stage("prepare", path, plain, root / "prepare.log")
    with ray_head(root, num_cpus=2) as head:
        env = {**head_env(head["token"]), "RAY_ADDRESS": head["gcs"]}
        for stage in ("train", "evaluate"):
            with WorkerPeaks(head["temp_dir"]) as peaks:
                seconds, driver = run_stage(stage, path, env, root / f"{stage}.log")
            result[f"{stage}_s"], result[f"{stage}_driver_rss"] = seconds, driver
            result[f"{stage}_workers_rss"] = dict(peaks.peaks)
            print(f"  {n} task(s) {stage}: {seconds:.0f} s, driver peak {driver / 2**20:.0f} MiB, workers "
                  f"{ {k: round(v / 2**20) for k, v in peaks.peaks.items()} } MiB", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (the backbone's input size)")
    ap.add_argument("--train", type=int, default=200, help="train800 images per task")
    ap.add_argument("--val", type=int, default=100, help="val200 images per task")
    ap.add_argument("--test", type=int, default=1000, help="test images per task")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--tasks", default="1,8", help="task counts to compare (first: the reference)")
    ap.add_argument("--work", default="/tmp/dynadapter-bench-memory", help="scratch folder (data, models, logs)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/memory.json"))
    args = ap.parse_args(argv)
    BACKBONE["img_size"] = args.size
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = backbone_file(work / f"backbone{args.size}.safetensors")
    counts = [int(c) for c in args.tasks.split(",")]
    results = []
    for n in counts:
        print(f"{n} task(s): {args.train}/{args.val}/{args.test} train/val/test images of {args.size} px each",
              flush=True)
        results.append(scenario(n, work, checkpoint, args))

    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    print("\n| tasks | stage | driver peak RSS (MiB) | one worker peak RSS (MiB) | data-reading task (MiB) | wall (s) |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in results:
        for stage, worker in (("train", "train_worker"), ("evaluate", "evaluate_worker")):
            w = r[f"{stage}_workers_rss"]
            run_task = mib(w["run_task"]) if stage == "train" and "run_task" in w else "-"
            print(f"| {r['tasks']} | {stage} | {mib(r[f'{stage}_driver_rss'])} | {mib(w.get(worker, 0))} | "
                  f"{run_task} | {r[f'{stage}_s']:.0f} |")
    ref, big = results[0], results[-1]
    ratios = {s: big[f"{s}_driver_rss"] / ref[f"{s}_driver_rss"] for s in ("train", "evaluate")}
    ok = all(r <= 1.5 for r in ratios.values())
    print(f"\ndriver peak, {big['tasks']} tasks / {ref['tasks']} task: train {ratios['train']:.2f}x, evaluate "
          f"{ratios['evaluate']:.2f}x (acceptance: <= 1.5x): {'PASS' if ok else 'FAIL'}")
    # what the old path would have held: every task's splits as float32 on the driver
    per_task_float = (args.train + args.val + args.test) * 3 * args.size ** 2 * 4
    print(f"(for scale: one task's train+val+test as float32 = {mib(per_task_float)} MiB)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results, "driver_ratio": ratios, "pass": ok},
                              indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
