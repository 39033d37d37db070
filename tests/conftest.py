"""Shared pytest fixtures. Add yours below; keep the ones already here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before anything imports Ray or DeepSpeed: no telemetry, and DeepSpeed JIT-builds only the ops it needs.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_BUILD_OPS", "0")


@pytest.fixture(scope="session", autouse=True)
def no_mlruns_in_the_checkout():
    """A test that creates an MLflow experiment without an artifact location logs into ./mlruns of the cwd, the
    checkout: the session fails if one appeared (it held pickled test models once)."""
    mlruns = Path(__file__).resolve().parents[1] / "mlruns"
    existed = mlruns.exists()
    yield
    if not existed and mlruns.exists():
        pytest.fail(f"the tests wrote MLflow artifacts into {mlruns}: give the experiment an artifact_location")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting one takes seconds); shut down at the end."""
    ray = pytest.importorskip("ray")
    from dynadapter.tune import init_ray

    started_here = not ray.is_initialized()
    resources = init_ray(num_cpus=os.cpu_count() or 1)
    yield resources
    if started_here:
        ray.shutdown()


# Tests that start Ray in their own processes (a `dvc repro` whose tune stage starts a local Ray) run first,
# before the in-process session Ray exists: with two local Ray instances on one machine and no RAY_ADDRESS,
# Ray Train's placement-group cleaner (State API, address auto-detected) cannot tell them apart and fails,
# so a finished trial's workers are never freed (seen: the next trial waits forever).
FIRST = ("test_dvc_pipeline.py",)


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: 0 if item.path.name in FIRST else 1)  # stable: order otherwise kept
