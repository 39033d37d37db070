"""A stage killed with SIGKILL cannot end its MLflow runs: they stay RUNNING. The next stage that starts in the
same experiment ends them KILLED (their owning process is gone), and leaves runs of live processes alone."""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

from mlflow import MlflowClient  # noqa: E402

from dynadapter.tracking import close_orphaned_runs, pipeline_run, task_run  # noqa: E402

# A stage in its own process: the parent run and one task run open, then SIGKILL (no finally, no atexit).
KILLED_STAGE = textwrap.dedent("""
    import os, signal, sys
    from dynadapter.tracking import pipeline_run, task_run

    uri = sys.argv[1]
    with pipeline_run(uri, "exp", "pipe1", stage="train") as parent:
        with task_run(parent, "size", stage="train") as run:
            print(parent.run_id, run.run_id, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
""")


def test_runs_of_a_killed_stage_are_ended_killed_by_the_next_stage(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, "-c", KILLED_STAGE, uri], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    parent_id, task_id = proc.stdout.split()
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(task_id).info.status == "RUNNING"  # what SIGKILL leaves behind
    assert client.get_run(parent_id).data.tags["dynadapter.stage_status.train"] == "RUNNING"

    with pipeline_run(uri, "exp", "pipe1", stage="evaluate") as parent:  # the next stage of the same pipeline
        assert parent.run_id == parent_id
        task = client.get_run(task_id)
        assert task.info.status == "KILLED"
        assert task.data.tags["dynadapter.ended_by"].startswith("its process ")
        assert client.get_run(parent_id).data.tags["dynadapter.stage_status.train"] == "KILLED"
        with task_run(parent, "size", stage="evaluate") as live:  # owned by this (live) process
            assert close_orphaned_runs(client, parent.experiment_id) == []
            assert client.get_run(live.run_id).info.status == "RUNNING"
            assert client.get_run(parent_id).info.status == "RUNNING"
    parent_run = client.get_run(parent_id)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.tags["dynadapter.stage_status.evaluate"] == "FINISHED"
    assert client.get_run(live.run_id).info.status == "FINISHED"
