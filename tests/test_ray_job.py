"""The README's cluster instructions, for real: a Ray head on 127.0.0.1 (its own processes, started from this
venv's `ray` CLI) and, from the project root, exactly

    ray job submit --address http://127.0.0.1:<dashboard port> --working-dir . -- python -m pipelines.prepare ...

The job must SUCCEED, write the outputs configured in a tiny params file (absolute paths, so the job writes
where the test reads, not into Ray's unpacked copy of the project), and the package Ray uploaded must hold the
code but none of .venv, data, models or .git (kept out by Ray's default excludes, .git and .venv, and
by the project's .gitignore files, which Ray honours).

The head is separate from the in-process Ray of conftest's `ray_session` (own temp dir, every port free-picked);
it is stopped by signalling the `ray start --block` process we started, then by PID for anything left that
runs under our temp dir. Never `ray stop`: it would kill every Ray on the machine.
"""

from __future__ import annotations

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
import uuid
from pathlib import Path

import pytest
import yaml

from test_pipelines import tiny_params

psutil = pytest.importorskip("psutil")  # a Ray dependency

ROOT = Path(__file__).resolve().parents[1]
BINDIR = Path(sys.executable).parent  # .venv/bin: `ray` here, and `python` for the job's entrypoint
RAY = BINDIR / "ray"
HEAD_START_TIMEOUT = 180
JOB_TIMEOUT = 420
if not RAY.is_file():
    pytest.skip(f"no ray CLI next to {sys.executable}", allow_module_level=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(_free_port())
    return sorted(ports)


def _env(token: str) -> dict[str, str]:
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


def _text(out) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def _http_json(url: str, token: str, timeout: float = 10.0):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 (local head)
        return json.loads(resp.read().decode())


def _pids_under(temp_dir: str) -> list[int]:
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


def _stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)  # `ray start --block` then shuts its node's processes down
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(head.pid, signal.SIGKILL)  # its own session (start_new_session=True)
            except ProcessLookupError:
                pass
            head.wait(timeout=30)
    deadline = time.monotonic() + 30
    while _pids_under(temp_dir) and time.monotonic() < deadline:
        time.sleep(1)
    for pid in _pids_under(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1 in its own processes; yields its dashboard (job submission) address."""
    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's unix sockets live under it
    token = secrets.token_hex(32)
    gcs, dash, client, agent, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = _free_ports(9)
    address = f"http://127.0.0.1:{dash}"
    head_log = tmp_path / "ray_head.log"
    cmd = [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
           f"--metrics-export-port={metrics}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", "--num-cpus=1", "--num-gpus=0", f"--temp-dir={temp_dir}",
           "--disable-usage-stats"]
    with open(head_log, "w") as log:
        head = subprocess.Popen(cmd, cwd=tmp_path, env=_env(token), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start exited {head.returncode}:\n{head_log.read_text()[-5000:]}")
            try:
                _http_json(f"{address}/api/jobs/", token, timeout=5)  # the job API answers: ready to submit
                break
            except urllib.error.HTTPError as err:
                if err.code in (401, 403):
                    pytest.fail(f"Ray head refused our token ({err.code}):\n{head_log.read_text()[-5000:]}")
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Ray head not ready after {HEAD_START_TIMEOUT}s:\n{head_log.read_text()[-5000:]}")
            time.sleep(1)
        yield {"address": address, "token": token, "temp_dir": Path(temp_dir), "log": head_log}
    finally:
        _stop_head(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_a_stage_from_the_project_root(ray_head, tmp_path):
    address, env = ray_head["address"], _env(ray_head["token"])
    params = tiny_params(tmp_path)  # absolute paths under tmp_path
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    sid = f"prepare-{uuid.uuid4().hex[:8]}"

    start = time.monotonic()
    cmd = [str(RAY), "job", "submit", "--address", address, "--submission-id", sid, "--working-dir", ".",
           "--", "python", "-m", "pipelines.prepare", "--params", str(params_file)]
    try:
        submit = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired as err:
        submit = subprocess.CompletedProcess(cmd, "timeout", _text(err.stdout), _text(err.stderr))
    elapsed = time.monotonic() - start

    def logs() -> str:
        try:
            out = subprocess.run([str(RAY), "job", "logs", "--address", address, sid], env=env,
                                 capture_output=True, text=True, timeout=60)
            job_logs = out.stdout + out.stderr
        except subprocess.TimeoutExpired:
            job_logs = "(ray job logs timed out)"
        return (f"submit rc={submit.returncode} after {elapsed:.0f}s\n--- submit stdout\n{submit.stdout[-4000:]}"
                f"\n--- submit stderr\n{submit.stderr[-4000:]}\n--- ray job logs {sid}\n{job_logs[-6000:]}"
                f"\n--- head\n{ray_head['log'].read_text()[-3000:]}")

    try:
        info = _http_json(f"{address}/api/jobs/{sid}", ray_head["token"])
    except (urllib.error.URLError, OSError, ValueError) as err:
        info = {"status": f"unknown ({err!r})"}
    assert info["status"] == "SUCCEEDED", f"job {info['status']}: {info.get('message')}\n{logs()}"
    assert submit.returncode == 0, logs()
    assert "prepare: done" in submit.stdout, logs()  # the stage's own log line, streamed back

    # the stage's outputs, at the absolute paths of the tiny params
    sizes, paths = params["prepare"]["embedded"], params["base"]["paths"]
    outputs = Path(paths["outputs"]) / "prepare"
    summary = json.loads((outputs / "summary.json").read_text())
    assert summary["source"] == "embedded" and set(summary["tasks"]) == set(params["base"]["tasks"])
    for task in params["base"]["tasks"]:
        manifest = json.loads((Path(paths["data"]) / task / "manifest.json").read_text())
        assert manifest["counts"] == {split: sizes[split] for split in ("train", "val", "test")}, manifest
        assert summary["tasks"][task]["counts"] == manifest["counts"]
        assert (Path(paths["data"]) / task / "data.parquet").stat().st_size > 0
    cfg = yaml.safe_load((outputs / "prepare_config.yaml").read_text())
    assert cfg["prepare"]["embedded"] == {**cfg["prepare"]["embedded"], **sizes}

    # what `--working-dir .` uploaded: the code, none of the venv, data, models, outputs or git history
    pkgs = [p for p in (ray_head["temp_dir"] / "session_latest/runtime_resources/working_dir_files").iterdir()
            if p.is_dir() and p.name.startswith("_ray_pkg_")]
    assert len(pkgs) == 1, pkgs
    pkg = pkgs[0]
    for needed in ("pipelines/prepare.py", "dynadapter/config.py", "params.yaml", "pyproject.toml"):
        assert (pkg / needed).is_file(), needed
    for kept_out in (".venv", "data", "models", ".git", "mlruns", "mlflow.db", ".dvc/cache"):  # outputs/: small, git-tracked
        assert not (pkg / kept_out).exists(), f"{kept_out} was uploaded with the working dir"
    size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
    assert size < 20 * 2**20, f"working dir upload is {size / 2**20:.1f} MiB"
