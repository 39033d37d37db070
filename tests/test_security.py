"""Who can reach what (docs/security.md), checked on our own defaults rather than promised:

- every server this project starts itself (the local Ray of `init_ray`, which `make repro`'s tune stage and the
  tests start; the single-machine Ray head of tests/test_ray_job.py; the README's `mlflow ui` command) listens on
  loopback only: each is started and the listening sockets of all its processes are read back;
- the registered model is code + safetensors + JSON: its artifact tree holds no pickle, and
  `mlflow.pyfunc.load_model` loads it (and it predicts) with every unpickling entry point refused.
"""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

import _pickle  # noqa: E402
import contextlib  # noqa: E402
import ipaddress  # noqa: E402
import pickle  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from dynadapter.tracking import CHAMPION  # noqa: E402
from helpers import one_thread  # noqa: E402, F401
from ray_head import pids_under  # noqa: E402
from test_ray_job import ray_head  # noqa: E402, F401
from test_tracking import client, evaluated, pixels, registered, tracking_uri  # noqa: E402, F401

psutil = pytest.importorskip("psutil")  # a Ray dependency

ROOT = Path(__file__).resolve().parents[1]
BINDIR = Path(sys.executable).parent
SERVER_START_TIMEOUT = 180


# ------------------------------------------------------------------------------------------ bound addresses


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if address.version == 6 and address.ipv4_mapped:  # ::ffff:127.0.0.1, a dual-stack socket's v4 address
        address = address.ipv4_mapped
    return address.is_loopback


def with_descendants(pids) -> set[int]:
    found = set()
    for pid in pids:
        try:
            found |= {pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))}
        except psutil.NoSuchProcess:
            continue
    return found


def servers(pids) -> list[tuple[int, str, str, str, int]]:
    """(pid, process name, protocol, ip, port) of every TCP socket listening, and every UDP socket bound
    without a peer, in these processes."""
    found = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            name = proc.name()
            for conn in proc.net_connections("inet"):
                tcp = conn.type == socket.SOCK_STREAM
                if (tcp and conn.status == psutil.CONN_LISTEN) or (not tcp and not conn.raddr):
                    found.append((pid, name, "tcp" if tcp else "udp", conn.laddr.ip, conn.laddr.port))
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def wait_for_servers(pids_now, ready, what: str, timeout: float = SERVER_START_TIMEOUT):
    """Poll `servers(pids_now())` until `ready(found)`; the servers of a component come up one by one."""
    deadline = time.monotonic() + timeout
    while True:
        found = servers(pids_now())
        if ready(found):
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not all servers up after {timeout:.0f}s; listening so far: {found}")
        time.sleep(1)


def assert_loopback_only(found, what: str) -> None:
    exposed = [s for s in found if not is_loopback(s[3])]
    assert not exposed, f"{what} listens beyond loopback (pid, process, proto, ip, port): {exposed}"


@pytest.mark.parametrize("ip,loopback", [
    ("127.0.0.1", True), ("::1", True), ("::ffff:127.0.0.1", True), ("127.0.1.1", True),
    ("0.0.0.0", False), ("::", False), ("192.0.2.2", False), ("::ffff:192.0.2.2", False), ("fd00::2", False),
])
def test_is_loopback(ip, loopback):
    assert is_loopback(ip) is loopback


RAY_COMPONENTS = {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"}


def _ray_up(dashboard_port: int):
    def ready(found) -> bool:
        names = {s[1] for s in found}
        return RAY_COMPONENTS <= names and any(s[4] == dashboard_port for s in found) \
            and any(n.startswith("ray::") and n not in RAY_COMPONENTS for n in names)  # a worker
    return ready


def test_local_ray_of_init_ray_listens_on_loopback_only(ray_session):
    """`init_ray` with no address (the tune stage of `dvc repro` / `make repro`, and conftest's `ray_session`):
    the GCS, raylet, object manager, dashboard, its agent, the runtime-env agent, metrics exporters, the driver's
    and the workers' gRPC servers. Before `_loopback_node`, Ray bound them by the machine's network address: the
    GCS, raylet and workers on all interfaces (::)."""
    import ray
    from urllib.parse import urlparse

    @ray.remote(num_cpus=0)
    def pid() -> int:
        return os.getpid()

    assert ray.get(pid.remote()) != os.getpid()  # at least one worker process exists
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    dashboard_port = urlparse(f"http://{ray._private.worker.get_dashboard_url()}").port
    found = wait_for_servers(lambda: with_descendants([os.getpid()]), _ray_up(dashboard_port), "local Ray")
    assert_loopback_only(found, "init_ray's local Ray")


def test_init_ray_leaves_the_cluster_switch_as_it_found_it(ray_session):
    """`_loopback_node` applies to the local instance only: a later `ray.init(address=...)` in this process must
    resolve the machine's real address again."""
    from ray._private import ray_constants

    assert ray_constants.ENABLE_RAY_CLUSTER is True


@pytest.mark.slow
def test_single_machine_ray_head_of_the_tests_listens_on_loopback_only(ray_head):
    """tests/test_ray_job.py's `ray start --head` (with token authentication) and its processes."""
    temp_dir = str(ray_head["temp_dir"])
    dashboard_port = int(ray_head["address"].rsplit(":", 1)[1])

    def ready(found) -> bool:  # no worker needed: the head starts none until a job runs
        names = {s[1] for s in found}
        return RAY_COMPONENTS <= names and any(s[4] == dashboard_port for s in found)

    found = wait_for_servers(lambda: with_descendants(pids_under(temp_dir)), ready, "Ray head")
    assert_loopback_only(found, "the tests' Ray head")


STANDALONE_GROUP = """
import json, os, socket, sys
import psutil
import torch
import torch.distributed as dist
from dynadapter.train.deepspeed import ensure_process_group
ensure_process_group("gloo")
t = torch.ones(2)
dist.all_reduce(t)  # the group works
conns = psutil.Process().net_connections("inet")
print(json.dumps([[c.laddr.ip, c.laddr.port] for c in conns
                  if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr)]))
dist.destroy_process_group()
"""


@pytest.mark.slow  # imports DeepSpeed in a fresh process
def test_standalone_deepspeed_process_group_opens_no_port_beyond_loopback():
    """`fit(strategy=deepspeed_strategy(...))` outside Ray Train starts a one-rank torch.distributed group. Before,
    it met through env:// on MASTER_ADDR=127.0.0.1, and torch's TCPStore listened on all interfaces (::) anyway;
    now the store is in memory. (gloo's own listener follows the address the host name resolves to.)"""
    import json

    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                              "LOCAL_RANK")}
    env |= {"PYTHONPATH": str(ROOT), "DS_BUILD_OPS": "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", STANDALONE_GROUP], capture_output=True, text=True, timeout=600,
                         env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    bound = json.loads(out.stdout.strip().splitlines()[-1])
    exposed = [b for b in bound if not is_loopback(b[0])]
    assert not exposed, f"the stand-alone process group listens beyond loopback: {exposed}"


def readme_command(prefix: str) -> list[str]:
    """The README's shell line that starts with `prefix`, split as the shell would (comment dropped)."""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.strip().startswith(prefix):
            return shlex.split(line.strip(), comments=True)
    raise AssertionError(f"README.md has no line starting with {prefix!r}")


def _option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


@pytest.mark.slow
def test_readme_mlflow_ui_command_listens_on_loopback_only(tmp_path):
    """The README's `mlflow ui ...` line, run as written (its own database and a free port substituted)."""
    from dynadapter.train.deepspeed import free_port

    cmd = readme_command(".venv/bin/mlflow ui")
    assert _option(cmd, "--host") == "127.0.0.1"
    port = free_port()
    cmd[0] = str(BINDIR / "mlflow")
    cmd[cmd.index("--port") + 1] = str(port)
    cmd[cmd.index("--backend-store-uri") + 1] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = tmp_path / "mlflow.log"
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        def ready(found) -> bool:
            if server.poll() is not None:
                pytest.fail(f"mlflow ui exited {server.returncode}:\n{log.read_text()[-3000:]}")
            return any(s[4] == port for s in found)

        wait_for_servers(lambda: with_descendants([server.pid]), ready, "mlflow ui")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:  # noqa: S310
            assert resp.status == 200
        assert_loopback_only(servers(with_descendants([server.pid])), "the README's mlflow ui")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)  # its own session: the server and its uvicorn workers
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


# --------------------------------------------------------------------------------------- the logged model

PICKLE_SUFFIXES = {".pkl", ".pickle", ".joblib", ".pt", ".pth", ".ckpt", ".bin", ".dill"}


def holds_pickle(path: Path) -> bool:
    """A pickle by name, by content (protocol 2+ header), inside a zip (torch.save), or an object-dtype .npy."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    head = path.read_bytes()[:8]
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return any(holds_pickle_name(n) for n in archive.namelist())
    if head.startswith(b"\x93NUMPY"):
        try:
            np.load(path, allow_pickle=False, mmap_mode="r")
        except ValueError:  # "Object arrays cannot be loaded when allow_pickle=False"
            return True
    return False


def holds_pickle_name(name: str) -> bool:
    return Path(name).suffix.lower() in PICKLE_SUFFIXES


@pytest.mark.parametrize("write,expected", [
    (lambda p: p.with_suffix(".bin").write_bytes(pickle.dumps({"a": 1})), True),
    (lambda p: p.write_bytes(pickle.dumps({"a": 1}, protocol=2)), True),
    (lambda p: p.write_bytes(pickle.dumps([1, 2], protocol=5)), True),
    (lambda p: torch.save({"w": torch.zeros(2)}, p), True),  # a zip holding data.pkl
    (lambda p: np.save(p.with_suffix(".npy"), np.array([{"a": 1}], dtype=object), allow_pickle=True), True),
    (lambda p: np.save(p.with_suffix(".npy"), np.zeros(3)), False),
    (lambda p: p.write_text('{"format": 1}'), False),
    (lambda p: p.write_bytes(b"\x80abc"), False),
], ids=["bin", "p2", "p5", "torch", "npy-object", "npy", "json", "0x80-not-pickle"])
def test_pickle_detector(tmp_path, write, expected):
    write(tmp_path / "f")
    (file,) = [f for f in tmp_path.iterdir() if f.is_file()]
    assert holds_pickle(file) is expected


def test_logged_model_artifacts_hold_no_pickle(registered, tmp_path):
    """The model as `log_dynamic_model` logs it, downloaded from the registry: code, safetensors, JSON/YAML."""
    info, _ = registered
    local = Path(mlflow.artifacts.download_artifacts(f"models:/tiny-count@{CHAMPION}", dst_path=str(tmp_path)))
    files = sorted(f for f in local.rglob("*") if f.is_file())
    names = {f.relative_to(local).as_posix() for f in files}
    assert {"MLmodel", "serving_model.py", "artifacts/dynadapter_model/weights.safetensors",
            "artifacts/dynadapter_model/config.json"} <= names, names
    assert any(n.startswith("code/dynadapter/") for n in names), names  # ship_code: the package travels with it
    pickled = [f.relative_to(local).as_posix() for f in files if holds_pickle(f)]
    assert not pickled, f"pickle in the logged model: {pickled}"
    assert "python_model.pkl" not in names
    flavor = mlflow.models.Model.load(str(local)).flavors["python_function"]
    assert "model_code_path" in flavor and "python_model" not in flavor, flavor  # models-from-code, no cloudpickle


_GUARD = {"on": False, "seen": []}


def _audit(event: str, args) -> None:
    # Unpickler.find_class raises this audit event for every global a pickle names (C and Python unpicklers
    # alike, however the loader was imported): any pickle that can run code goes through it.
    if event == "pickle.find_class" and _GUARD["on"]:
        _GUARD["seen"].append(args)
        raise AssertionError(f"unpickling {args} while the guard is on")


sys.addaudithook(_audit)  # cannot be removed; inert while the guard is off


class _RefusedUnpickler(pickle.Unpickler):
    def __init__(self, *args, **kwargs):
        _GUARD["seen"].append("Unpickler")
        raise AssertionError("pickle.Unpickler used while the guard is on")


@contextlib.contextmanager
def no_unpickling(monkeypatch):
    """Every unpickling entry point refuses (pickle, _pickle, cloudpickle, torch.load), and the audit hook
    refuses any global a pickle names; yields the list of refused attempts (some callers swallow errors)."""
    import cloudpickle

    def refuse(name: str):
        def refused(*args, **kwargs):
            _GUARD["seen"].append(name)
            raise AssertionError(f"{name} called while the guard is on")
        return refused

    with monkeypatch.context() as m:
        for module in (pickle, _pickle, cloudpickle):
            for attr in ("load", "loads"):
                m.setattr(module, attr, refuse(f"{module.__name__}.{attr}"))
        for module in (pickle, _pickle):
            m.setattr(module, "Unpickler", _RefusedUnpickler)
        m.setattr(torch, "load", refuse("torch.load"))
        _GUARD["seen"] = []
        _GUARD["on"] = True
        try:
            yield _GUARD["seen"]
        finally:
            _GUARD["on"] = False


def test_pyfunc_loads_and_predicts_without_unpickling(registered, monkeypatch):
    """With MLflow's own switch off (MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false) and every unpickler refused."""
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with no_unpickling(monkeypatch) as seen:
        loaded = mlflow.pyfunc.load_model(f"models:/tiny-count@{CHAMPION}")
        out = loaded.predict(pixels(4, seed=0))
    assert not seen, seen
    assert out["prediction"].shape == (4,)


class _PickledModel(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


def test_the_guard_catches_a_pickled_pyfunc_and_mlflow_can_refuse_it(tmp_path, monkeypatch):
    """The other side: a pyfunc saved the classic way (cloudpickle) is unpickled on load, and the guard says so;
    with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false MLflow refuses it before unpickling anything."""
    path = tmp_path / "pickled"
    mlflow.pyfunc.save_model(str(path), python_model=_PickledModel(), pip_requirements=["mlflow"])
    assert any(holds_pickle(f) for f in path.rglob("*") if f.is_file())
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    with no_unpickling(monkeypatch) as seen, pytest.raises(AssertionError, match="guard is on"):
        mlflow.pyfunc.load_model(str(path))
    assert seen
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with no_unpickling(monkeypatch) as seen, pytest.raises(MlflowException, match="pickle is disallowed"):
        mlflow.pyfunc.load_model(str(path))
    assert not seen
