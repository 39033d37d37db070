"""`python -m pipelines.serve` (`make serve`): serve a task's registered champion over REST with MLflow's scoring
server. Not a DVC stage: it reads the registry the `register` stage wrote and runs until stopped."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipelines.common import load_stage_params, stage_parser

DESCRIPTION = """Serve the registered model <register.model_prefix>-<task>@<register.alias> (the champion the
register stage promoted) over REST: `mlflow models serve --env-manager local` in this environment, bound to
--host/--port, until Ctrl-C. Run `make repro` first: it trains, evaluates and registers the champions.

Request (POST http://HOST:PORT/invocations, Content-Type: application/json): float32 images [N, C, H, W] with
values in [0, 1] as nested lists under "inputs", and optionally "params":
  {"inputs": [...], "params": {"budget": 0.5}}          thresholds calibrated on val at that MACs budget
  {"inputs": [...], "params": {"thresholds": [0.9, 0.8, 0.7, 0.0]}}  explicit per-exit thresholds
  {"inputs": [...]}                                      the thresholds calibrated at base.budget
Response: {"predictions": {"prediction": [...], "exit_index": [...], "confidence": [...], "macs": [...]}}.
A bad budget, bad thresholds or a wrongly shaped input: HTTP 400, the reason in the JSON's "message".
GET /ping answers 200 once the model is loaded."""

DEFAULT_PORT = 5001  # not 5000: the README's MLflow UI


def serve_command(uri: str, host: str, port: int, workers: int) -> list[str]:
    """The venv's own `mlflow` (this interpreter's), in this environment (no conda/virtualenv rebuild)."""
    mlflow = Path(sys.executable).parent / "mlflow"
    return [str(mlflow), "models", "serve", "-m", uri, "--env-manager", "local", "--host", host,
            "--port", str(port), "--workers", str(workers)]


def serve_env(tracking_uri: str) -> dict[str, str]:
    """MLflow starts uvicorn through the shell, by name: the venv's bin/ must be on PATH (else "exec: uvicorn: not
    found" when the venv is not activated)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("serve", DESCRIPTION)
    parser.epilog = ("Configuration: base.mlflow (the tracking store), base.tasks and the register section of "
                     "params.yaml; override with --set, e.g. --set register.alias=challenger.")
    parser.add_argument("--task", default=None, help="which task's champion (default: the first of base.tasks)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 for "
                        "other machines)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--workers", type=int, default=1, help="server worker processes (default 1)")
    args = parser.parse_args(argv)
    params = load_stage_params(args)
    task = args.task or params.base.tasks[0]
    if task not in params.base.tasks:
        parser.error(f"--task {task!r} is not one of base.tasks {params.base.tasks}")

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from dynadapter.tracking import (TrackingUnavailableError, check_tracking_server, model_name_for,
                                     resolve_tracking_uri)

    tracking_uri = resolve_tracking_uri(params.base.mlflow.tracking_uri, Path.cwd())
    name = model_name_for(task, params.register.model_prefix)
    try:
        check_tracking_server(tracking_uri)
        version = MlflowClient(tracking_uri).get_model_version_by_alias(name, params.register.alias)
    except TrackingUnavailableError as err:
        print(f"error: base.mlflow.tracking_uri: {err}", file=sys.stderr)
        return 3
    except MlflowException as err:
        print(f"error: no model {name}@{params.register.alias} in {tracking_uri} ({err.message}); run `make repro` "
              "first: its register stage registers each task's champion", file=sys.stderr)
        return 4
    uri = f"models:/{name}@{params.register.alias}"
    print(f"serving {uri} (version {version.version}) at http://{args.host}:{args.port}/invocations "
          f"(tracking store {tracking_uri}); Ctrl-C stops it", flush=True)
    cmd = serve_command(uri, args.host, args.port, args.workers)
    os.execve(cmd[0], cmd, serve_env(tracking_uri))  # the server replaces this process: one PID to stop
    return 0  # not reached


# ------------------------------------------------------------------- a server in a child process (tests, bench)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(argv: Sequence[str], *, port: int | None = None, timeout: float = 180.0,
                   log: str | Path | None = None) -> Iterator[str]:
    """`python -m pipelines.serve ARGV` on 127.0.0.1 in its own process group; yields its base URL once /ping
    answers 200, and stops the whole group (the server and the uvicorn it starts) by its PID on exit. A server
    that exits or does not come up within `timeout` seconds raises, with the end of its log."""
    port = port or free_port()
    root = Path(__file__).resolve().parents[1]
    log_path = Path(log) if log else Path(os.environ.get("TMPDIR", "/tmp")) / f"dynadapter-serve-{port}.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.serve", *argv, "--host", "127.0.0.1",
                                 "--port", str(port)], cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {proc.returncode}: "
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer /ping within {timeout:.0f}s: "
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def invoke(url: str, images: Any, params: dict[str, Any] | None = None, timeout: float = 120.0) -> tuple[int, dict]:
    """POST images (array-like [N, C, H, W]) to `url`/invocations as the README shows; (HTTP status, JSON body)."""
    import numpy as np

    body = {"inputs": np.asarray(images, dtype=np.float32).tolist()}
    if params:
        body["params"] = params
    req = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


if __name__ == "__main__":
    raise SystemExit(main())
