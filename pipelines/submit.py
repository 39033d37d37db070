"""Run pipeline stages on a Ray cluster as one `ray job submit` job, with the code shipped and the user's paths
resolved before submission."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from dynadapter.config import parse_params

STAGES = ("prepare", "pretrain", "tune", "train", "evaluate", "register")
PARAMS_ENV = "DYNADAPTER_SUBMITTED_PARAMS"  # the resolved params, carried to the job's driver in its env
ROOT = Path(__file__).resolve().parents[1]

DESCRIPTION = """Submit pipeline stages to a Ray cluster as one job (Ray's job API: `ray job submit`).

The job runs `python -m pipelines.<stage> --params <resolved params>` for each stage in order, on the head
node, and stops at the first that fails. Inside the job RAY_ADDRESS is set, so tune, train and evaluate fan out
over the cluster (train.ray / tune.ray: workers, CPUs and GPUs per worker).

What this command does before it submits:
  * resolves every user path of the params file against the directory you run it from (base.paths.*,
    base.backbone.checkpoint, prepare.vtab_root, train.storage, tune.storage, a sqlite MLflow URI): a job runs in
    Ray's unpacked copy of the project, where a relative path would point inside that copy (and gitignored
    folders such as models/ and data/ are never uploaded). These paths must name storage the head node (and,
    for train.storage / tune.storage, every node) can reach: a shared filesystem mounted at the same place,
    or a URI.
  * ships the project's code as the job's working dir (Ray's default excludes and the project's .gitignore
    keep .venv, data, models and outputs of runs out of the upload).
Nodes need the project's Python dependencies installed (`make install` on each, or a cluster image)."""


def resolve_paths(raw: dict, cwd: Path) -> dict:
    """`raw` params with the user paths made absolute against `cwd` (URIs and absolute paths kept)."""
    out = yaml.safe_load(yaml.safe_dump(raw))  # a deep copy of plain data

    def absolute(value):
        if not isinstance(value, str) or not value or "://" in value or os.path.isabs(value):
            return value
        return str((cwd / value).resolve())

    base = out.setdefault("base", {})
    paths = base.setdefault("paths", {})
    defaults = parse_params({}).base.paths.model_dump()
    for key, default in defaults.items():  # resolved even when the file leaves them at their defaults
        paths[key] = absolute(paths.get(key, default))
    backbone = base.get("backbone") or {}
    if backbone.get("checkpoint"):
        backbone["checkpoint"] = absolute(backbone["checkpoint"])
    for section, key in (("prepare", "vtab_root"), ("train", "storage"), ("tune", "storage")):
        if (out.get(section) or {}).get(key):
            out[section][key] = absolute(out[section][key])
    mlflow = base.setdefault("mlflow", {})
    uri = mlflow.get("tracking_uri", parse_params({}).base.mlflow.tracking_uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + absolute(uri[len("sqlite:///"):])
    mlflow["tracking_uri"] = uri
    parse_params(out)  # still valid (raises naming the key otherwise)
    return out


def run_stages(stages: list[str]) -> int:
    """Inside the job: each stage in order on the resolved params; the first failure's exit code."""
    text = os.environ.get(PARAMS_ENV)
    if not text:
        print(f"submit: {PARAMS_ENV} is not set: --run-stages is what the submitted job runs", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="dynadapter-job-") as tmp:
        params = Path(tmp) / "params.yaml"
        params.write_text(text)
        for stage in stages:
            print(f"submit: stage {stage}", flush=True)
            start = time.perf_counter()
            rc = subprocess.call([sys.executable, "-m", f"pipelines.{stage}", "--params", str(params)])
            if rc != 0:
                print(f"submit: stage {stage} failed (exit {rc}); later stages not run", flush=True)
                return rc
            print(f"submit: stage {stage} done in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


def submit(address: str, params_file: Path, stages: list[str], *, wait: bool = True, timeout: float = 0) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    raw = yaml.safe_load(params_file.read_text()) or {}
    resolved = resolve_paths(raw, Path.cwd())
    client = JobSubmissionClient(address)
    job_id = client.submit_job(
        entrypoint=f"python -m pipelines.submit --run-stages {' '.join(stages)}",
        runtime_env={"working_dir": str(ROOT), "env_vars": {PARAMS_ENV: yaml.safe_dump(resolved)}},
    )
    print(f"submit: job {job_id} ({' -> '.join(stages)}) on {address}; paths resolved from {Path.cwd()}", flush=True)
    if not wait:
        return 0
    start = time.monotonic()
    for line in _tail(client, job_id):
        print(line, end="", flush=True)
    while True:  # the log stream ends with the job; its status may lag a moment behind
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        if timeout and time.monotonic() - start > timeout:
            print(f"submit: job {job_id} still {status} after {timeout:.0f} s", file=sys.stderr)
            return 1
        time.sleep(1)
    print(f"submit: job {job_id} {status}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def _tail(client, job_id: str):
    import asyncio

    async def lines():
        async for chunk in client.tail_job_logs(job_id):
            yield chunk

    loop = asyncio.new_event_loop()
    try:
        agen = lines()
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.submit", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stages", nargs="*", default=["prepare", "pretrain", "tune", "train", "evaluate", "register"],
                        help=f"stages to run, in order (default: all of {', '.join(STAGES)})")
    parser.add_argument("--address", default=os.environ.get("RAY_JOB_ADDRESS") or os.environ.get("RAY_ADDRESS"),
                        help="the cluster's job API, e.g. http://head:8265 (default: $RAY_JOB_ADDRESS, $RAY_ADDRESS)")
    parser.add_argument("--params", default="params.yaml", type=Path, help="params file (default: params.yaml)")
    parser.add_argument("--no-wait", action="store_true", help="return once submitted (default: stream its log)")
    parser.add_argument("--timeout", type=float, default=0, help="seconds to wait for the job (0: no limit)")
    parser.add_argument("--run-stages", action="store_true", help=argparse.SUPPRESS)  # what the job itself runs
    args = parser.parse_args(argv)
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    if args.run_stages:
        return run_stages(args.stages)
    if not args.address:
        parser.error("no cluster: pass --address http://<head>:8265 (or set RAY_JOB_ADDRESS)")
    if not args.params.is_file():
        parser.error(f"--params {args.params}: no such file")
    return submit(args.address, args.params, args.stages, wait=not args.no_wait, timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
