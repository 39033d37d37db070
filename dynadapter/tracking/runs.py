"""Run lifecycle: the pipeline's parent run (one per `pipeline_id`), nested task runs, their RUNNING /
FINISHED / FAILED / KILLED states, and runs orphaned by a killed process."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from dynadapter.tracking.connection import RunRef, tracking_client, sqlite_path
from dynadapter.tracking.log import config_tree, plain_value, log_config, log_params
from dynadapter.tracking.tags import (PARENT_TAG, PIPELINE_ID_ENV, TAG_KIND, TAG_MODEL_URI, TAG_OWNER_HOST,
                                      TAG_OWNER_PID, TAG_PIPELINE_ID, TAG_STAGE, TAG_TASK)


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
        base = plain_value(params.base)
    else:
        base = plain_value(params.get("base")) if isinstance(params, Mapping) else None
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
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:  # created by a concurrent stage / worker in between
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts next to a local sqlite db, one folder per experiment (MLflow's default is relative to the
    cwd of whichever process happens to create the experiment)."""
    path = sqlite_path(tracking_uri)
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
    client = tracking_client(tracking_uri)
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
        tree = config_tree(config, sections)
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
            log_params(ref, config_tree(params, None))
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
