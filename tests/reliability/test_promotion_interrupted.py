"""A registry promotion whose process is killed (SIGKILL, no cleanup) between registering the new version and
moving the champion alias: the registry stays consistent, and rerunning the promotion finishes it."""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from dynadapter.tracking import CHAMPION, TAG_MODEL_URI, V_ACCURACY, V_DECISION, promote  # noqa: E402

# The promotion, in its own process, dies at the first alias move: after `create_model_version` returned.
KILLED_PROMOTION = textwrap.dedent("""
    import os, signal, sys
    from mlflow import MlflowClient
    from dynadapter.tracking import promote

    def die(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    MlflowClient.set_registered_model_alias = die
    uri, name, run_id, model_uri = sys.argv[1:]
    promote(MlflowClient(tracking_uri=uri, registry_uri=uri), name, model_uri, run_id=run_id,
            val_accuracy=0.9, val_macs=100.0, budget=0.5)
    print("not killed")
""")


def test_promotion_killed_before_the_alias_moves_is_finished_by_a_rerun(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("promote", artifact_location=(tmp_path / "art").as_uri())
    name = "dynadapter-count"

    def logged_model() -> tuple[str, str]:
        run = client.create_run(exp)
        return run.info.run_id, f"{run.info.artifact_uri}/model"

    old_run, old_uri = logged_model()
    assert promote(client, name, old_uri, run_id=old_run, val_accuracy=0.5, val_macs=100.0).promoted  # v1

    new_run, new_uri = logged_model()
    proc = subprocess.run([sys.executable, "-c", KILLED_PROMOTION, uri, name, new_run, new_uri],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "not killed" not in proc.stdout

    # consistent: the champion is still v1 with its decision; v2 exists with its figures and no decision yet
    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{name}'")}
    assert sorted(versions) == ["1", "2"]
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    assert client.get_model_version(name, "1").tags[V_DECISION] == "promoted"
    pending = client.get_model_version(name, "2").tags
    assert pending[TAG_MODEL_URI] == new_uri and pending[V_ACCURACY] == "0.9" and V_DECISION not in pending

    # the rerun finds v2 (no third version), compares it with v1, moves the alias, records the decision
    done = promote(client, name, new_uri, run_id=new_run, val_accuracy=0.9, val_macs=100.0, budget=0.5)
    assert (done.version, done.created, done.promoted, done.champion) == ("2", False, True, "2")
    assert "0.5" in done.reason and done.previous_champion == "1"
    assert len(client.search_model_versions(f"name = '{name}'")) == 2
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "2"
    tags = client.get_model_version(name, "2").tags
    assert tags[V_DECISION] == "promoted" and tags["dynadapter.previous_champion"] == "1"

    # and a third run changes nothing
    again = promote(client, name, new_uri, run_id=new_run, val_accuracy=0.9, val_macs=100.0, budget=0.5)
    assert (again.version, again.created, again.promoted) == ("2", False, True)
    assert client.get_model_version(name, "2").tags == tags
