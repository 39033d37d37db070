"""MLflow helpers: one parent run per pipeline run with nested runs per task, the logged dynamic model, and
registry promotion that moves the `champion` alias only to a model that is at least as good.

Everything goes through an explicit `MlflowClient` for the run's tracking URI (no fluent active run), so the
same helpers work in a DVC stage, a Ray worker and a test, side by side; only the two MLflow calls that read
the global tracking URI (model logging, registering a `models:/` source) get it pointed at the run's store.
Run handles (`RunRef`) are plain picklable data: a Tune trial or Train worker can receive its parent's handle
and open nested runs under it.

Parent runs: each stage process calls `pipeline_run(..., pipeline_id=...)`; the parent run is the run of the
experiment tagged `dynadapter.pipeline_id = <id>` (created by the first stage, resumed by the next ones). The
id comes from `pipeline_id_for`: $DYNADAPTER_PIPELINE_ID when set (a CI / Ray job id), otherwise a hash of the
git commit and the resolved `base` section, so the stages of one `dvc repro` on one commit share a parent.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import re
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

TAG_PIPELINE_ID = "dynadapter.pipeline_id"
TAG_KIND = "dynadapter.kind"  # "pipeline" (parent) | "task" (nested)
TAG_STAGE = "dynadapter.stage"
TAG_TASK = "dynadapter.task"
TAG_MODEL_URI = "dynadapter.model_uri"  # on a run: its logged dynamic model; on a version: what it registers
TAG_OWNER_HOST = "dynadapter.owner_host"  # the machine and process that hold a run RUNNING
TAG_OWNER_PID = "dynadapter.owner_pid"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag: the UI shows task runs under the parent
PIPELINE_ID_ENV = "DYNADAPTER_PIPELINE_ID"
CHAMPION = "champion"

# version tags written by `promote`; DECISION is written last and marks the decision complete
V_ACCURACY = "dynadapter.test_accuracy"
V_MACS = "dynadapter.macs"
V_BUDGET = "dynadapter.budget"
V_DECISION = "dynadapter.decision"  # "promoted" | "kept"
V_REASON = "dynadapter.reason"
V_PREVIOUS = "dynadapter.previous_champion"
V_PREVIOUS_ACCURACY = "dynadapter.previous_champion_test_accuracy"
V_PREVIOUS_MACS = "dynadapter.previous_champion_macs"

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
BATCH_LIMIT = 1000  # MLflow's limit on metrics per log_batch call


class TrackingUnavailableError(RuntimeError):
    """The tracking backend cannot be reached or created; raised before any training starts."""


# ------------------------------------------------------------------------------------------ tracking URI


def _sqlite_path(uri: str) -> str | None:
    return uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None


def resolve_tracking_uri(uri: str, project_root: str | Path = ".") -> str:
    """Local stores made absolute against the project root, so every process (a DVC stage started in any cwd,
    a Ray worker in its own session dir) writes the same database. Server URIs pass through unchanged."""
    root = Path(project_root).resolve()
    path = _sqlite_path(uri)
    if path is not None:
        if path in ("", ":memory:") or Path(path).is_absolute():
            return uri
        return f"sqlite:///{(root / path).resolve()}"
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        p = Path(parsed.path)
        return (p if p.is_absolute() else (root / (parsed.netloc + parsed.path)).resolve()).as_uri()
    if parsed.scheme == "" and uri:  # a plain directory: MLflow's file store
        return str((root / uri).resolve())
    return uri


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the URI, when the tracking backend is unusable: an unreachable server (one request,
    no retries, `timeout` seconds) or a sqlite database that cannot be created or is not MLflow's.

    Call it before training: MLflow's own defaults retry for minutes, after the work is done.
    """
    from mlflow import MlflowClient

    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(max(1, math.ceil(timeout)))):
                MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as err:  # connection refused, timeout, 5xx, not an MLflow server
            raise TrackingUnavailableError(
                f"MLflow tracking server {uri} is unreachable: {type(err).__name__}: {_first_line(err)}. "
                "Start it (mlflow server --host 127.0.0.1 --port <port>) or set base.mlflow.tracking_uri "
                "to a reachable server or a sqlite:/// file") from None
        return
    path = _sqlite_path(uri)
    if path is not None and path not in ("", ":memory:"):
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingUnavailableError(f"MLflow tracking store {uri}: cannot create its folder: {err}") from None
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # creates / migrates the schema
    except Exception as err:
        raise TrackingUnavailableError(
            f"MLflow tracking store {uri} is unusable: {type(err).__name__}: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""


# ------------------------------------------------------------------------------------------- runs


@lru_cache(maxsize=8)
def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@dataclass(frozen=True)
class RunRef:
    """A run by id, with the tracking URI it lives in: picklable, so Ray workers can log to it."""

    tracking_uri: str
    run_id: str
    experiment_id: str

    @property
    def client(self):
        return _client(self.tracking_uri)


def _git_commit(project_root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "nogit"
    except (OSError, subprocess.SubprocessError):
        return "nogit"


def pipeline_id_for(params: Any = None, project_root: str | Path = ".") -> str:
    """$DYNADAPTER_PIPELINE_ID, or sha256(git HEAD + resolved `base` section)[:12].

    The base section (data, backbone, model, budget) is what every stage shares; stage sections are left out
    so a stage re-run after an edit of its own section still joins the pipeline run it belongs to.
    """
    if os.environ.get(PIPELINE_ID_ENV):
        return os.environ[PIPELINE_ID_ENV]
    if params is not None and hasattr(params, "base"):
        base = _plain(params.base)
    else:
        base = _plain(params.get("base")) if isinstance(params, Mapping) else None
    text = json.dumps({"git": _git_commit(Path(project_root)), "base": base}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# MLflow 3's UI opens an experiment on its GenAI (traces) view unless this tag says otherwise; the values are
# the UI's ExperimentKind enum (mlflow/server/js: "custom_model_development" = the training-runs view).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def get_or_create_experiment(client, name: str, artifact_location: str | None = None) -> str:
    """The experiment's id, created if needed, tagged so the UI opens on training runs (a kind a user set on
    an existing experiment is left alone)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # created by a concurrent stage / worker in between
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in exp.tags:  # made by an older version of this code
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def _artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts next to a local sqlite db, one folder per experiment (MLflow's default is relative to the
    cwd of whichever process happens to create the experiment)."""
    path = _sqlite_path(tracking_uri)
    if path is None or path in ("", ":memory:"):
        return None
    folder = re.sub(r"[^\w.\-]", "_", experiment)
    return (Path(path).parent / "mlartifacts" / folder).resolve().as_uri()


def _find_parent(client, experiment_id: str, pipeline_id: str) -> list:
    return list(client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_PIPELINE_ID}` = '{pipeline_id}' and tags.`{TAG_KIND}` = 'pipeline'",
        order_by=["attributes.start_time ASC"],
        max_results=10,
    ))


def get_or_create_parent(tracking_uri: str, experiment: str, pipeline_id: str) -> RunRef:
    """The experiment's parent run tagged with `pipeline_id`, created if absent.

    Two stages racing to create it converge: after creating, the oldest run with the tag wins and a later
    duplicate is deleted.
    """
    if not re.fullmatch(r"[\w.\-]+", pipeline_id):
        raise ValueError(f"pipeline_id must be letters, digits, '_', '-' or '.', got {pipeline_id!r}")
    client = _client(tracking_uri)
    exp_id = get_or_create_experiment(client, experiment, _artifact_location(tracking_uri, experiment))
    found = _find_parent(client, exp_id, pipeline_id)
    if found:
        return RunRef(tracking_uri, found[0].info.run_id, exp_id)
    run = client.create_run(exp_id, run_name=f"pipeline-{pipeline_id}",
                            tags={TAG_PIPELINE_ID: pipeline_id, TAG_KIND: "pipeline"})
    oldest = _find_parent(client, exp_id, pipeline_id)[0].info.run_id
    if oldest != run.info.run_id:
        client.delete_run(run.info.run_id)
    return RunRef(tracking_uri, oldest, exp_id)


def _owner() -> dict[str, str]:
    return {TAG_OWNER_HOST: socket.gethostname(), TAG_OWNER_PID: str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def close_orphaned_runs(client, experiment_id: str) -> list[str]:
    """Runs of this experiment left RUNNING by a process of this machine that no longer exists (a stage killed
    with SIGKILL never ends its runs): ended KILLED, with the reason in a tag, and a stage status the parent
    still shows as RUNNING becomes KILLED. Runs owned by live processes or by other machines are left alone.
    Returns the ids of the runs it ended."""
    host = socket.gethostname()
    ended = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        pid = tags.get(TAG_OWNER_PID, "")
        if tags.get(TAG_OWNER_HOST) != host or not pid.isdigit() or _alive(int(pid)):
            continue
        for key, value in tags.items():
            if key.startswith("dynadapter.stage_status.") and value == "RUNNING":
                client.set_tag(run.info.run_id, key, "KILLED")
        client.set_tag(run.info.run_id, "dynadapter.ended_by", f"its process {pid} on {host} was gone")
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
    return ended


@contextlib.contextmanager
def _lifecycle(run: RunRef, status_tag: str | None = None) -> Iterator[RunRef]:
    """RUNNING while the block runs (tagged with the owning host and process); FINISHED, FAILED, or KILLED
    (Ctrl-C) after it. A SIGKILL leaves it RUNNING: `close_orphaned_runs` ends it on the next stage start."""
    client = run.client
    for key, value in _owner().items():
        client.set_tag(run.run_id, key, value)
    client.update_run(run.run_id, status="RUNNING")
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if status_tag:
            client.set_tag(run.run_id, status_tag, status)
        client.set_terminated(run.run_id, status)


@contextlib.contextmanager
def pipeline_run(
    tracking_uri: str,
    experiment: str,
    pipeline_id: str,
    *,
    stage: str,
    config: Any = None,
    sections: Sequence[str] | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[RunRef]:
    """Attach this stage to the pipeline's parent run (creating it if this is the first stage).

    `config` (a `Params` or a plain mapping) is logged as `config/<stage>.yaml` (replaced on a re-run) and
    as flattened params (`base.seed`, `train.lr`, ...; `sections` limits which). A param already on the
    parent with another value is kept and warned about: MLflow params are immutable. The parent ends
    FINISHED / FAILED with the stage, and `dynadapter.stage_status.<stage>` records each stage's outcome.
    """
    parent = get_or_create_parent(tracking_uri, experiment, pipeline_id)
    client = parent.client
    close_orphaned_runs(client, parent.experiment_id)
    client.set_tag(parent.run_id, f"dynadapter.stage_status.{stage}", "RUNNING")
    for k, v in (tags or {}).items():
        client.set_tag(parent.run_id, k, v)
    if config is not None:
        tree = _config_tree(config, sections)
        log_params(parent, tree, strict=False)
        log_config(parent, tree, f"config/{stage}.yaml")
    with _lifecycle(parent, f"dynadapter.stage_status.{stage}"):
        yield parent


@contextlib.contextmanager
def task_run(
    parent: RunRef,
    task: str,
    *,
    stage: str,
    params: Any = None,
    tags: Mapping[str, str] | None = None,
    run_name: str | None = None,
) -> Iterator[RunRef]:
    """A fresh nested run for one task of one stage (each attempt is its own run; a failed one ends FAILED).

    `params`: a mapping (nested allowed) or `Params`, logged flattened.
    """
    client = parent.client
    pipeline_id = client.get_run(parent.run_id).data.tags.get(TAG_PIPELINE_ID, "")
    run = client.create_run(
        parent.experiment_id,
        run_name=run_name or f"{stage}-{task}",
        tags={PARENT_TAG: parent.run_id, TAG_KIND: "task", TAG_STAGE: stage, TAG_TASK: task,
              TAG_PIPELINE_ID: pipeline_id, **(tags or {})},
    )
    ref = RunRef(parent.tracking_uri, run.info.run_id, parent.experiment_id)
    with _lifecycle(ref):
        if params is not None:
            log_params(ref, _config_tree(params, None))
        yield ref


def find_task_runs(parent: RunRef, *, stage: str | None = None, task: str | None = None,
                   status: str | None = "FINISHED") -> list:
    """Nested runs of `parent`, newest first (e.g. register.py finding evaluate's run of a task)."""
    filters = [f"tags.`{PARENT_TAG}` = '{parent.run_id}'"]
    if stage is not None:
        filters.append(f"tags.`{TAG_STAGE}` = '{stage}'")
    if task is not None:
        filters.append(f"tags.`{TAG_TASK}` = '{task}'")
    if status is not None:
        filters.append(f"attributes.status = '{status}'")
    return list(parent.client.search_runs([parent.experiment_id], filter_string=" and ".join(filters),
                                          order_by=["attributes.start_time DESC"]))


def model_uri_of(run) -> str:
    """The dynamic model a run logged with `log_dynamic_model` (a `Run` or a `RunRef`)."""
    if isinstance(run, RunRef):
        run = run.client.get_run(run.run_id)
    uri = run.data.tags.get(TAG_MODEL_URI)
    if not uri:
        raise ValueError(f"run {run.info.run_id} has no logged dynamic model (no {TAG_MODEL_URI} tag)")
    return uri


# ------------------------------------------------------------------------------------- params & metrics


def _plain(obj: Any) -> Any:
    """Pydantic models and dataclasses as plain JSON-like data."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    return obj


def _config_tree(config: Any, sections: Sequence[str] | None) -> dict[str, Any]:
    tree = _plain(config)
    if not isinstance(tree, Mapping):
        raise TypeError(f"config must be a Params, a dataclass or a mapping, got {type(config).__name__}")
    return {k: v for k, v in tree.items() if sections is None or k in sections}


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"base.backbone.name": "vit_tiny...", "train.priority.start": "[1.0, 0.5]"}."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        value = _plain(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple, Mapping)) else str(value)
            flat[name] = text[:MAX_PARAM_LENGTH]
    return flat


def log_params(run: RunRef, params: Mapping[str, Any], *, prefix: str = "", strict: bool = True) -> dict[str, str]:
    """Log flattened params, skipping those already logged with the same value (so re-runs are no-ops).

    A key already logged with another value raises (strict) or is warned about and kept: MLflow params
    cannot change. Returns what was newly logged.
    """
    from mlflow.entities import Param

    flat = flatten_params(params, prefix)
    existing = run.client.get_run(run.run_id).data.params
    conflicts = sorted(k for k, v in flat.items() if k in existing and existing[k] != v)
    if conflicts:
        detail = ", ".join(f"{k}: logged {existing[k]!r}, now {flat[k]!r}" for k in conflicts[:10])
        if strict:
            raise ValueError(f"run {run.run_id}: params cannot change in MLflow ({detail})")
        warnings.warn(f"run {run.run_id}: keeping the params first logged ({detail})", stacklevel=2)
    new = {k: v for k, v in flat.items() if k not in existing}
    items = [Param(k, v) for k, v in new.items()]
    for i in range(0, len(items), 100):  # MLflow's limit on params per batch
        run.client.log_batch(run.run_id, params=items[i : i + 100])
    return new


def _numeric(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return float(value.item())
    return None


def flatten_numbers(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested numbers -> {"test_accuracy": 0.9, "test_exit_fraction_0": 0.4}; non-numbers are skipped."""
    flat: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_numbers(value, f"{name}_"))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                if (x := _numeric(v)) is not None:
                    flat[f"{name}_{i}"] = x
        elif (x := _numeric(value)) is not None:
            flat[name] = x
    return flat


def _log_metric_batch(run: RunRef, metrics: Iterable[tuple[str, float, int]]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, v, now, step) for k, v, step in metrics]
    for i in range(0, len(items), BATCH_LIMIT):
        run.client.log_batch(run.run_id, metrics=items[i : i + BATCH_LIMIT])


def log_metrics(run: RunRef, metrics: Mapping[str, Any], *, step: int = 0, prefix: str = "") -> dict[str, float]:
    """Numbers of a (nested) mapping as metrics at `step`; lists become `<key>_<i>`."""
    flat = flatten_numbers(metrics, prefix)
    _log_metric_batch(run, ((k, v, step) for k, v in flat.items()))
    return flat


def log_history(run: RunRef, history: Sequence[Mapping[str, Any]], *, prefix: str = "") -> int:
    """Per-epoch training metrics (train.fit's history) with step = epoch, so MLflow draws curves."""
    from dynadapter.train import flatten_metrics

    rows = []
    for i, entry in enumerate(history):
        step = int(entry.get("epoch", i + 1))
        flat = flatten_metrics({k: v for k, v in entry.items() if k != "epoch"})
        rows += [(f"{prefix}{k}", v, step) for k, v in flat.items()]
    _log_metric_batch(run, rows)
    return len(rows)


def log_exit_accuracies(run: RunRef, accuracies: Sequence[float], *, split: str = "test") -> None:
    """Accuracy of each exit alone (static truncation there): `<split>_acc_exit_<i>`."""
    log_metrics(run, {f"{split}_acc_exit_{i}": float(a) for i, a in enumerate(accuracies)})


def log_macs(run: RunRef, costs: Any) -> None:
    """Per-image MACs per piece (embed, stage_i, head_i, cumulative_i, full, full-depth baseline) as metrics,
    and the stage costs as `stage_costs.json`."""
    d = costs.to_dict() if hasattr(costs, "to_dict") else dict(costs)
    log_metrics(run, {k: v for k, v in d.items() if k != "exits"}, prefix="macs_")
    run.client.log_dict(run.run_id, d, "stage_costs.json")


def log_config(run: RunRef, config: Any, artifact_file: str = "config/resolved.yaml") -> None:
    """The resolved config as YAML (artifacts can be replaced, unlike params)."""
    tree = _config_tree(config, None)
    run.client.log_text(run.run_id, yaml.safe_dump(tree, sort_keys=False), artifact_file)


def log_table(run: RunRef, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
    """Rows of dicts as a CSV artifact (lists as JSON), e.g. the Pareto frontier."""
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields or ["empty"])
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, tuple, Mapping)) else v for k, v in row.items()})
    run.client.log_text(run.run_id, buf.getvalue(), artifact_file)


def log_figure(run: RunRef, figure: Any, artifact_file: str) -> None:
    """A matplotlib figure, or an existing PNG file, as an image artifact at `artifact_file`."""
    if not isinstance(figure, (str, Path)):
        run.client.log_figure(run.run_id, figure, artifact_file)
        return
    target = Path(artifact_file)
    with tempfile.TemporaryDirectory() as tmp:  # log_artifact keeps the local file name: copy to the target's
        local = Path(tmp) / target.name
        local.write_bytes(Path(figure).read_bytes())
        run.client.log_artifact(run.run_id, str(local), str(target.parent) if str(target.parent) != "." else None)


def pareto_figure(curve: Sequence[Mapping[str, Any]], title: str = ""):
    """Test accuracy vs MACs fraction of the val-calibrated sweep, the val-Pareto points highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter([p["test_fraction"] for p in curve], [p["test_accuracy"] for p in curve], s=8, alpha=0.4,
               label="sweep (test)")
    front = sorted((p for p in curve if p.get("val_pareto")), key=lambda p: p["test_fraction"])
    ax.plot([p["test_fraction"] for p in front], [p["test_accuracy"] for p in front], "o-",
            label="val Pareto points (test)")
    ax.set_xlabel("MACs / full-depth MACs")
    ax.set_ylabel("test accuracy")
    ax.set_title(title or "accuracy vs inference cost")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def log_task_result(run: RunRef, result: Any, *, plots: bool = True) -> dict[str, float]:
    """Everything a trained + evaluated task produces (`TaskResult` or its `to_dict()`, or a `Trained` /
    `Evaluated` alone): per-epoch history, parameter counts, per-exit and dynamic accuracies, MACs,
    calibration, throughput as metrics; result.json, curve.csv, pareto.csv and pareto.png as artifacts.
    Returns the scalar metrics logged."""
    d = result.to_dict() if hasattr(result, "to_dict") else _plain(result)
    client = run.client
    if d.get("method") is not None:  # the task is already the run's dynadapter.task tag
        client.set_tag(run.run_id, "dynadapter.method", str(d["method"]))
    if d.get("history"):
        log_history(run, d["history"])
    scalars: dict[str, Any] = {}
    if "params" in d:
        scalars["params"] = d["params"]
    for key in ("best_epoch", "train_seconds", "step_seconds", "full_depth_macs"):
        if d.get(key) is not None:
            scalars[key] = d[key]
    if d.get("calibration"):
        cal = d["calibration"]
        scalars.update(val_accuracy=cal["val_accuracy"], val_macs=cal["val_macs"], val_fraction=cal["fraction"],
                       budget=cal["budget_fraction"], budget_feasible=cal["feasible"],
                       threshold=cal["thresholds"])
    if d.get("test"):
        t = d["test"]
        scalars.update(test_accuracy=t["accuracy"], test_macs=t["macs"], test_fraction=t["fraction"],
                       test_exit_fraction=t["exit_fraction"])
    if d.get("throughput"):
        scalars["throughput"] = d["throughput"]
    logged = log_metrics(run, scalars)
    if d.get("test_exit_accuracy"):
        log_exit_accuracies(run, d["test_exit_accuracy"])
    if d.get("stage_macs"):
        log_macs(run, d["stage_macs"])
    client.log_dict(run.run_id, {k: v for k, v in d.items() if k != "history"}, "result.json")
    curve = d.get("curve") or []
    if curve:
        log_table(run, curve, "curve.csv")
        log_table(run, [p for p in curve if p.get("val_pareto")], "pareto.csv")
        if plots:
            import matplotlib.pyplot as plt

            fig = pareto_figure(curve, f"{d.get('task', '')} {d.get('method', '')}".strip())
            try:
                log_figure(run, fig, "pareto.png")
            finally:
                plt.close(fig)
    return logged


# --------------------------------------------------------------------------------------- the model


def _pip_requirements() -> list[str]:
    """Pinned to what runs here (local version labels like +cpu dropped: PyPI cannot resolve them); given
    explicitly because MLflow's inference of them loads the model in a subprocess, slowly."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("mlflow", "torch", "torchvision", "timm", "safetensors", "numpy", "pydantic", "pyyaml"):
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return reqs


def dynamic_model_signature(input_shape: Sequence[int]):
    """Input: float32 images [-1, C, H, W] in [0, 1]; output: prediction, exit_index, confidence, macs per
    image; params: `budget` (a MACs fraction, picks val-calibrated thresholds) or `thresholds` (one per exit;
    empty = not given)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *map(int, input_shape)))])
    outputs = Schema([
        TensorSpec(np.dtype(np.int64), (-1,), "prediction"),
        TensorSpec(np.dtype(np.int64), (-1,), "exit_index"),
        TensorSpec(np.dtype(np.float32), (-1,), "confidence"),
        TensorSpec(np.dtype(np.int64), (-1,), "macs"),
    ])
    params = ParamSchema([
        ParamSpec("budget", "float", None),  # None: the thresholds calibrated at the model's own budget
        ParamSpec("thresholds", "float", [], shape=(-1,)),
    ])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


@contextlib.contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """Model.log talks to MLflow's global client: point it at the run's store for the call only."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def log_dynamic_model(
    run: RunRef,
    model,
    *,
    backbone_cfg,
    model_cfg,
    costs,
    curve: Iterable[Any],
    budget: float,
    name: str = "model",
    task: str | None = None,
    input_example: Any = None,
    ship_code: bool = True,
):
    """Log `model` (merged, with its val-calibrated thresholds set, as `evaluate_task` leaves it) as an
    MLflow pyfunc of `dynadapter.serving.DynAdapterPyfunc` under `run`. Returns MLflow's `ModelInfo`; its
    `model_uri` is also tagged on the run (`model_uri_of`).

    `curve`: the validation sweep (`sweep`'s points or `Evaluated.curve`); only val-calibrated points and
    val figures are stored. `input_example`: the serving payload example (default: one grey image); MLflow
    checks that the logged model predicts on it. `ship_code`: copy the `dynadapter` package into the model,
    so that a serving environment (`mlflow models serve`) needs only the pinned pip requirements.
    """
    import mlflow
    import numpy as np
    from mlflow.models import Model

    import dynadapter
    from dynadapter.serving import ARTIFACT_KEY, save_bundle

    with tempfile.TemporaryDirectory() as tmp:
        bundle = save_bundle(model, Path(tmp) / ARTIFACT_KEY, backbone_cfg=backbone_cfg, model_cfg=model_cfg,
                             costs=costs, curve=curve, budget=budget, task=task)
        config = json.loads((bundle / "config.json").read_text())
        # created here, not by Model.log: it would file the model under the fluent API's active experiment
        logged = run.client.create_logged_model(run.experiment_id, name=name, source_run_id=run.run_id,
                                                tags={TAG_TASK: task} if task else None)
        with _global_tracking_uri(run.tracking_uri):
            info = Model.log(
                artifact_path=None,
                name=name,
                flavor=mlflow.pyfunc,
                run_id=run.run_id,
                python_model=str(Path(dynadapter.__file__).parent / "serving_model.py"),  # code, not a pickle
                artifacts={ARTIFACT_KEY: str(bundle)},
                signature=dynamic_model_signature(config["input_shape"]),
                input_example=input_example if input_example is not None else np.full(
                    (1, *config["input_shape"]), 0.5, dtype=np.float32),
                pip_requirements=_pip_requirements(),
                code_paths=[str(Path(dynadapter.__file__).parent)] if ship_code else None,
                model_id=logged.model_id,
            )
    run.client.set_tag(run.run_id, TAG_MODEL_URI, info.model_uri)
    return info


# ------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class Promotion:
    """What `promote` decided for one registered version, and the figures it compared."""

    model_name: str
    version: str
    promoted: bool
    reason: str
    champion: str | None  # the version holding the alias after the decision
    previous_champion: str | None
    created: bool  # this call registered the version (False: found from an earlier call)


def _version_for(client, model_name: str, run_id: str, model_uri: str):
    versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    matching = [v for v in versions if v.tags.get(TAG_MODEL_URI) == model_uri or v.source == model_uri]
    return min(matching, key=lambda v: int(v.version)) if matching else None


def _champion(client, model_name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def _figures(version) -> tuple[float, float] | None:
    try:
        return float(version.tags[V_ACCURACY]), float(version.tags[V_MACS])
    except (KeyError, ValueError):
        return None


def _decide(version, champion, accuracy: float, macs: float, alias: str) -> tuple[bool, str]:
    """Promote when strictly more accurate, or equally accurate with fewer MACs; never on unknown figures."""
    if champion is None:
        return True, f"no {alias} yet"
    if str(champion.version) == str(version.version):
        return True, f"already the {alias}"  # an earlier call moved the alias, then was interrupted
    theirs = _figures(champion)
    if theirs is None:
        return False, f"{alias} v{champion.version} has no recorded figures; move the alias by hand"
    their_acc, their_macs = theirs
    of = f"v{champion.version}"
    same_acc = math.isclose(accuracy, their_acc, rel_tol=0.0, abs_tol=1e-9)
    if accuracy > their_acc and not same_acc:
        return True, f"test accuracy {accuracy:.4f} > {their_acc:.4f} of {of}"
    if same_acc and macs < their_macs:
        return True, f"same test accuracy {accuracy:.4f}, fewer MACs {macs:.4g} < {their_macs:.4g} of {of}"
    if same_acc:
        return False, f"same test accuracy {accuracy:.4f}, MACs {macs:.4g} not below {their_macs:.4g} of {of}"
    return False, f"test accuracy {accuracy:.4f} < {their_acc:.4f} of {of}"


def _recorded(model_name: str, version, alias: str, champion) -> Promotion:
    return Promotion(model_name, str(version.version), version.tags[V_DECISION] == "promoted",
                     version.tags.get(V_REASON, ""), str(champion.version) if champion else None,
                     version.tags.get(V_PREVIOUS) or None, created=False)


def promote(
    client,
    model_name: str,
    model_uri: str,
    *,
    run_id: str,
    test_accuracy: float,
    macs: float,
    budget: float | None = None,
    alias: str = CHAMPION,
) -> Promotion:
    """Register `model_uri` (logged by `run_id`) as a version of `model_name` and move `alias` to it only if
    it beats the current holder: higher test accuracy at the budget, or the same with fewer MACs (per image),
    or there is no holder yet. The figures, the decision, its reason and the previous holder's figures are
    recorded as version tags and in the description.

    Idempotent and resumable: the version of this run + model is found again instead of registered twice;
    a version whose decision is recorded is left as it is; one registered (or promoted) by an interrupted
    call gets its decision finished. The decision tag is written last, after the alias moved.
    """
    from mlflow.exceptions import MlflowException

    if "'" in model_name:
        raise ValueError(f"model name must not contain quotes: {model_name!r}")
    try:
        client.create_registered_model(model_name)
    except MlflowException as err:
        if "ALREADY_EXISTS" not in str(err.error_code):
            raise
    version = _version_for(client, model_name, run_id, model_uri)
    created = version is None
    figures = {V_ACCURACY: repr(float(test_accuracy)), V_MACS: repr(float(macs))}
    if budget is not None:
        figures[V_BUDGET] = repr(float(budget))
    if created:
        model_id = model_uri[len("models:/"):] if model_uri.startswith("models:/m-") else None
        with _global_tracking_uri(client.tracking_uri):  # MLflow resolves models:/ sources with the global client
            version = client.create_model_version(model_name, model_uri, run_id=run_id, model_id=model_id,
                                                  tags={TAG_MODEL_URI: model_uri, **figures})
    champion = _champion(client, model_name, alias)
    if V_DECISION in version.tags:
        return _recorded(model_name, version, alias, champion)

    for k, v in figures.items():  # an interrupted call may have stopped before they were written
        if version.tags.get(k) != v:
            client.set_model_version_tag(model_name, version.version, k, v)
    promoted, reason = _decide(version, champion, float(test_accuracy), float(macs), alias)
    resumed = champion is not None and str(champion.version) == str(version.version)
    if resumed and version.tags.get(V_REASON):
        reason = version.tags[V_REASON]  # the comparison made before the interruption
    previous = None if resumed else champion
    # Reason and the previous holder first, then the alias, then the decision tag that marks completion:
    # a rerun after any interruption finds what it needs to finish the same decision.
    notes = {V_REASON: reason}
    if previous is not None:
        notes[V_PREVIOUS] = str(previous.version)
        notes.update({tag: previous.tags[key] for key, tag in ((V_ACCURACY, V_PREVIOUS_ACCURACY),
                                                                (V_MACS, V_PREVIOUS_MACS)) if key in previous.tags})
    for k, v in notes.items():
        client.set_model_version_tag(model_name, version.version, k, v)
    if promoted and not resumed:
        client.set_registered_model_alias(model_name, alias, version.version)
    verdict = f"promoted to @{alias}" if promoted else f"kept out of @{alias}"
    client.update_model_version(
        model_name, version.version,
        description=f"{verdict}: {reason}. Test accuracy {float(test_accuracy):.4f} at "
                    f"{float(macs):.4g} MACs/image" + (f" (budget {budget})" if budget is not None else "") + ".")
    client.set_model_version_tag(model_name, version.version, V_DECISION, "promoted" if promoted else "kept")
    holder = version.version if promoted else (champion.version if champion else None)
    before = previous.version if previous is not None else version.tags.get(V_PREVIOUS)
    return Promotion(model_name, str(version.version), promoted, reason, str(holder) if holder else None,
                     str(before) if before else None, created)


def model_name_for(task: str, prefix: str = "dynadapter") -> str:
    """One registered model per downstream task: a champion is only comparable on its own task."""
    return f"{prefix}-{task}"
