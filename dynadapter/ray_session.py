"""The project's Ray session: join a cluster (address, RAY_ADDRESS) or start a local, loopback-only Ray, and
the storage paths Ray Train and Tune write checkpoints to. Ray is imported lazily."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("dynadapter", "pipelines")  # the packages a worker imports (pipelines: functions its stages send)


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> dict[str, float]:
    """Join a Ray cluster or start a local one; returns the cluster's resources.

    Order: `address` (params `tune.ray.address`), then the RAY_ADDRESS environment variable, else a local Ray
    with this machine's CPUs (or `num_cpus`). A session already started is reused.

    The local Ray runs its dashboard (on 127.0.0.1, a free port) because Ray Train V2 needs the State API it
    serves: when Tune stops a trial (ASHA, or the last epoch reached), the trial's Train controller dies with
    it, and only Train's PlacementGroupCleaner, polling the State API, frees the workers' placement group.
    Without it every finished trial keeps its workers' CPUs and the next trial waits forever (measured).

    Every server of the local Ray (GCS, raylet, object manager, dashboard and its agent, runtime-env agent,
    metrics, workers) listens on loopback only (`_loopback_node`); Ray's token authentication, which Ray turns on
    by default for a new local instance, stays as Ray sets it (docs/security.md).
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("DS_BUILD_OPS", "0")  # DeepSpeed JIT-builds only the small ops it needs
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:
            # Workers on other nodes import the code this driver runs, not whatever copy their node has installed
            ray.init(address=address, runtime_env=code_runtime_env())
        else:
            from dynadapter.train.deepspeed import free_port

            port = free_port()
            # The placement-group cleaner finds the State API by auto-detecting the cluster, which fails when
            # other Ray instances run on the machine ("Found multiple active Ray instances"): name ours. Set
            # before the start, so the raylet and every worker it spawns inherit it.
            os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
            # "local": a new instance; with address=None Ray would join any `ray start` head on this machine
            with _loopback_node():
                ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=True,
                         dashboard_host="127.0.0.1", dashboard_port=port)
    return dict(ray.cluster_resources())


@contextlib.contextmanager
def _loopback_node():
    """Make the local Ray's node IP 127.0.0.1, for the duration of its `ray.init`.

    Ray binds its servers by the node IP: a non-loopback node IP puts the GCS, raylet and worker gRPC servers on
    all interfaces and the dashboard agent and runtime-env agent on the machine's network address (measured,
    Ray 2.60). An explicit `_node_ip_address="127.0.0.1"` does not help, Ray resolves it to the machine's
    reachable address; it keeps loopback only while multi-node clusters are off, which is what its
    ENABLE_RAY_CLUSTER constant (env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, read at import) says. The started
    processes get the node IP on their command lines, so the switch is needed only in this process, and only
    while the instance starts: a later `ray.init(address=...)` to a real cluster must see the real address.
    """
    from ray._private import ray_constants

    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous


def storage_uri(path: str | Path) -> str:
    """A storage path as Ray Train / Tune take it: a URI as it is, a local path made absolute."""
    path = str(path)
    return path if "://" in path else str(Path(path).resolve())


def storage_file(folder: str | Path, name: str):
    """(pyarrow filesystem, path) of file `name` in a storage folder (a local path or a URI)."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(storage_uri(folder))
    return fs, f"{path.rstrip('/')}/{name}"


def read_storage_json(fs, path: str) -> Any | None:
    """The JSON file at `path` on `fs` (from `storage_file`), None when there is none."""
    import pyarrow.fs

    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.readall().decode())


def write_storage_json(fs, path: str, value: Any) -> None:
    """Write `value` as JSON at `path` on `fs` atomically: to a temporary name, then moved over the old file."""
    with fs.open_output_stream(path + ".tmp") as f:
        f.write(json.dumps(value, sort_keys=True).encode())
    fs.move(path + ".tmp", path)


def code_runtime_env() -> dict | None:
    """The `runtime_env` that ships this project's code to every node of a cluster this driver joins: the
    `dynadapter` and `pipelines` packages as `py_modules` (not a working_dir: workers keep their own working
    directory, and data, models, outputs and .venv are never uploaded). None inside a `ray job submit` job, whose
    own runtime_env (its --working-dir) already carries the code to every worker it starts."""
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return None
    modules = [str(PROJECT_ROOT / name) for name in SHIPPED if (PROJECT_ROOT / name / "__init__.py").is_file()]
    return {"py_modules": modules, "excludes": ["__pycache__", "*.pyc"]}


class StorageNotSharedError(RuntimeError):
    """Checkpoint storage that some node of the cluster cannot see: its workers would write to their own disks
    and the driver would read its own."""


def check_shared_storage(storage: str | Path, key: str, *, before_probe=None) -> None:
    """On a cluster of more than one node, check that every node sees the storage folder `storage` (params `key`)
    before anything trains there: a marker file written here must be visible from a Ray task pinned to each
    node (the check Ray Train makes with its storage-validation marker, but before the run, not after its first
    checkpoint). A URI (s3://, gs://, ...) goes through pyarrow's filesystems and is not checked here; nor is a
    single node. `before_probe(marker)`: called between writing the marker and probing (tests)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    storage = storage_uri(storage)
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
    if "://" in storage or len(nodes) <= 1:
        return
    folder = Path(storage)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f".dynadapter-shared-{uuid.uuid4().hex}"
    marker.write_text("written by the driver: every node must see this file\n")
    try:
        if before_probe is not None:
            before_probe(marker)
        probe = ray.remote(num_cpus=0, max_retries=0)(os.path.exists)
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(str(marker))
                for node in nodes]
        blind = [node for node, seen in zip(nodes, ray.get(refs, timeout=120)) if not seen]
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise StorageNotSharedError(
            f"{key}: {storage} is a folder that {len(blind)} of the cluster's {len(nodes)} nodes do not see "
            f"(nodes {', '.join(n[:12] for n in blind)}): their workers would checkpoint to their own disks. Set "
            f"{key} to a filesystem mounted at the same path on every node, or to a URI (s3://..., gs://...)")
