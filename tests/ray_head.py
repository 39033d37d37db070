"""A Ray head of our own on 127.0.0.1 for tests (tests/test_ray_job.py): its own
processes, started from this venv's `ray` CLI, with token authentication and every port free-picked.

It is separate from the in-process Ray of conftest's `ray_session` (own temp dir); it is stopped by signalling
the `ray start --block` process we started, then by PID for anything left that runs under our temp dir. Never
`ray stop`: it would kill every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")  # a Ray dependency

BINDIR = Path(sys.executable).parent  # .venv/bin: `ray` here, and `python` for the job's entrypoint
RAY = BINDIR / "ray"
HEAD_START_TIMEOUT = 180


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def head_env(token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_ADDRESS from outside
    env.update({
        # Ray's token authentication, pinned on with our own token: without RAY_AUTH_MODE, `ray start` turns it
        # on only when ~/.ray/auth_token exists. Head, CLI and job all need the same token.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        # a single-machine head on loopback: `ray start` turns --node-ip-address=127.0.0.1 into the machine's
        # network address (and binds the GCS, raylet and workers on all interfaces) unless multi-node clusters
        # are off, as they are by default on macOS/Windows (tests/test_security.py checks every bound address)
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # the head (and so its workers and the job's `python`) runs this venv, as after `source .venv/bin/activate`
        "PATH": str(BINDIR) + os.pathsep + os.environ.get("PATH", ""),
        "VIRTUAL_ENV": str(BINDIR.parent),
        "RAY_USAGE_STATS_ENABLED": "0",
        "DS_BUILD_OPS": "0",
        "OMP_NUM_THREADS": "1",
    })
    env.pop("PYTHONPATH", None)  # the job imports pipelines/ and dynadapter/ from its working dir (cwd first)
    return env


def as_text(out) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def http_json(url: str, token: str, timeout: float = 10.0):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 (local head)
        return json.loads(resp.read().decode())


def pids_under(temp_dir: str) -> list[int]:
    """Processes of our head: their command lines name our unique temp dir."""
    temp_dir = temp_dir.rstrip("/") + "/"
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part or part.endswith(temp_dir[:-1]) for part in (proc.info["cmdline"] or [])):
                pids.append(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return [p for p in pids if p != os.getpid()]


def stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)  # `ray start --block` then shuts its node's processes down
        try:
            head.wait(timeout=10)  # it waits for a job's driver far longer: killed below, with the rest
        except subprocess.TimeoutExpired:
            try:
                os.killpg(head.pid, signal.SIGKILL)  # its own session (start_new_session=True)
            except ProcessLookupError:
                pass
            head.wait(timeout=30)
    deadline = time.monotonic() + 10  # the head is down: what is left (a job's driver) is an orphan to kill
    while pids_under(temp_dir) and time.monotonic() < deadline:
        time.sleep(1)
    for pid in pids_under(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextlib.contextmanager
def ray_head(tmp_path: Path, num_cpus: int = 1):
    """A Ray head on 127.0.0.1 in its own processes; yields its dashboard (job submission) address, its GCS
    address (what RAY_ADDRESS names), token, temp dir and log."""
    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's unix sockets live under it
    token = secrets.token_hex(32)
    gcs, dash, client, agent, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = free_ports(9)
    address = f"http://127.0.0.1:{dash}"
    head_log = tmp_path / "ray_head.log"
    cmd = [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
           f"--metrics-export-port={metrics}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={temp_dir}",
           "--disable-usage-stats"]
    with open(head_log, "w") as log:
        # Ray Train's placement-group cleaner, an actor on this head, finds the State API by auto-detecting the
        # cluster, which fails (GCS timeout) when other Ray instances run on the machine: name ours
        env = {**head_env(token), "RAY_API_SERVER_ADDRESS": address}
        head = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start exited {head.returncode}:\n{head_log.read_text()[-5000:]}")
            try:
                http_json(f"{address}/api/jobs/", token, timeout=5)  # the job API answers: ready to submit
                break
            except urllib.error.HTTPError as err:
                if err.code in (401, 403):
                    pytest.fail(f"Ray head refused our token ({err.code}):\n{head_log.read_text()[-5000:]}")
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Ray head not ready after {HEAD_START_TIMEOUT}s:\n{head_log.read_text()[-5000:]}")
            time.sleep(1)
        yield {"address": address, "gcs": f"127.0.0.1:{gcs}", "token": token, "temp_dir": Path(temp_dir), "log": head_log}
    finally:
        stop_head(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
