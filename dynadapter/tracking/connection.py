"""Reaching the tracking store: URIs resolved against the project, a fail-fast check before any work, one
client per URI, and `RunRef`, the picklable handle every other helper takes."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse


class TrackingUnavailableError(RuntimeError):
    """The tracking backend cannot be reached or created; raised before any training starts."""


# ------------------------------------------------------------------------------------------ tracking URI


def sqlite_path(uri: str) -> str | None:
    return uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None


def resolve_tracking_uri(uri: str, project_root: str | Path = ".") -> str:
    """Local stores made absolute against the project root, so every process (a DVC stage started in any cwd,
    a Ray worker in its own session dir) writes the same database. Server URIs pass through unchanged."""
    root = Path(project_root).resolve()
    path = sqlite_path(uri)
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
    path = sqlite_path(uri)
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
def tracking_client(tracking_uri: str):
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
        return tracking_client(self.tracking_uri)


@contextlib.contextmanager
def global_tracking_uri(uri: str) -> Iterator[None]:
    """Model.log talks to MLflow's global client: point it at the run's store for the call only."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
