"""`dvc repro` for real, in a temporary git + DVC copy of the project with a tiny params.yaml (one task): the first
`dvc repro` is interrupted for real during the train stage (Ctrl-C to its process group, then SIGKILL), which
leaves the train stage's outputs absent or whole; the next `dvc repro` finishes the pipeline (prepare -> pretrain ->
tune -> train -> evaluate -> register between the two), resuming training from the last epoch checkpoint instead of
from zero; the metrics are visible to `dvc metrics show`, a third `dvc repro` does nothing, and
`dvc exp run -S key=value` / `dvc exp show` / `dvc metrics diff` and the README's queued budget sweep work.

One project for all of it: the interrupted run is also the suite's whole-pipeline `dvc repro` (each costs about a
minute and a half on the 2-core machine)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from dynadapter.adapt import load_trained
from dynadapter.train import load_checkpoint
from helpers import DVC, dvc, dvc_project, git, project_env
from test_pipelines import tiny_params

pytestmark = pytest.mark.slow

EPOCHS = 20  # ~0.1 s each at batch size 2: the kill lands long before the stage ends
VARIANTS = ("dyn", "baseline")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    params = tiny_params(Path("."))
    params["base"]["tasks"] = ["size"]
    params["train"].update(epochs=EPOCHS, batch_size=2)
    params["tune"].update(num_samples=1, epochs=1)
    return dvc_project(tmp_path_factory.mktemp("project"), params)


def _interrupt_during_training(project: Path, log: Path, checkpoint: Path) -> subprocess.Popen:
    """`dvc repro` in its own process group; once `checkpoint` exists, SIGINT to the group (Ctrl-C), a moment
    for it to act, then SIGKILL to whatever is left of the group."""
    with open(log, "w") as out:
        proc = subprocess.Popen([DVC, "repro"], cwd=project, env=project_env(project), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert proc.poll() is None, f"dvc repro ended before {checkpoint} was written:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {checkpoint} after 300 s:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.3)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the whole group had already stopped on Ctrl-C
    proc.wait(timeout=30)
    return proc


def _train_outputs(project: Path) -> list[Path]:
    outs = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["train"]["outs"]
    return [project / (out if isinstance(out, str) else next(iter(out))) for out in outs]


def _check_whole_or_absent(project: Path, tasks: list[str]) -> list[str]:
    """The train stage's declared outputs that exist, each checked to be what a finished stage writes."""
    backbone = project / "models/backbone/backbone.safetensors"
    present = []
    for out in _train_outputs(project):
        if not out.exists():
            continue
        present.append(str(out.relative_to(project)))
        files = [out] if out.is_file() else [p for p in out.rglob("*")]
        leftovers = [str(p) for p in files if ".tmp" in p.name or "partial" in p.name]
        assert not leftovers, f"temporary files inside the output {out}: {leftovers}"
        if out.name == "metrics.json":
            assert set(json.loads(out.read_text())["tasks"]) == set(tasks), out
        elif out.suffix == ".yaml":
            assert set(yaml.safe_load(out.read_text())) == {"base", "train"}, out
        else:  # models/tasks: every task and variant, each loadable on the backbone
            found = sorted(str(p.relative_to(out)) for p in out.glob("*/*") if p.is_dir())
            assert found == sorted(f"{t}/{v}" for t in tasks for v in VARIANTS), f"{out} is partial: {found}"
            for variant_dir in out.glob("*/*"):
                load_trained(variant_dir, backbone)
    return present


def test_interrupted_dvc_repro_leaves_whole_outputs_and_the_rerun_resumes_training(project, tmp_path):
    """The first repro of the project, cut in train; the second finishes it; the third is a no-op."""
    tasks = ["size"]
    ckpt_dir = project / "models/checkpoints/train"
    # the second model's first epoch checkpoint: by then the first model is trained and saved, so a stage
    # that writes its outputs in place has some of them on disk
    killed = _interrupt_during_training(project, tmp_path / "first.log", ckpt_dir / "size-baseline.pt")
    first = (tmp_path / "first.log").read_text()
    assert killed.returncode != 0, first[-3000:]
    assert "Running stage 'train'" in first and "train size/baseline: epoch 1/" in first, first[-3000:]
    for stage in ("prepare", "pretrain", "tune"):
        assert f"Running stage '{stage}'" in first, first[-3000:]

    present = _check_whole_or_absent(project, tasks)
    status = dvc(["status", "--json"], project)
    assert status.returncode == 0, status.stderr
    assert "train" in json.loads(status.stdout), status.stdout  # not up to date: its lock entry was never written
    finished = load_checkpoint(ckpt_dir / "size-dyn.pt")
    cut = load_checkpoint(ckpt_dir / "size-baseline.pt")  # loadable: written atomically, never half
    assert finished["epoch"] == EPOCHS
    done = int(cut["epoch"])
    assert 1 <= done < EPOCHS, done
    assert [h["epoch"] for h in cut["history"]] == list(range(1, done + 1))

    second = dvc(["repro"], project)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-4000:]
    for stage in ("prepare", "pretrain", "tune"):
        assert f"Running stage '{stage}'" not in second.stdout  # finished before the interruption
    for stage in ("train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in second.stdout
    # each model resumes from its checkpoint: the finished one trains no further, the cut one continues
    assert re.search(rf"resuming \S*size-dyn\.pt after epoch {EPOCHS}/{EPOCHS}\b", log), log[-4000:]
    assert re.search(rf"resuming \S*size-baseline\.pt after epoch {done}/{EPOCHS}\b", log), log[-4000:]
    assert "train size/dyn: epoch" not in log
    epochs_run = [int(e) for e in re.findall(rf"train size/baseline: epoch (\d+)/{EPOCHS}", log)]
    assert epochs_run == list(range(done + 1, EPOCHS + 1)), epochs_run
    history = load_checkpoint(ckpt_dir / "size-baseline.pt")["history"]
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))  # the cut run's epochs kept, once each

    assert sorted(_check_whole_or_absent(project, tasks)) == sorted(
        str(out.relative_to(project)) for out in _train_outputs(project))
    assert not list((project / "models").glob(".*partial*")), "a staging folder was left behind"
    metrics = json.loads((project / "outputs/evaluate/metrics.json").read_text())
    assert 0.0 <= metrics["dyn_test_accuracy"] <= 1.0
    shown = dvc(["metrics", "show", "--json"], project)
    assert shown.returncode == 0, shown.stderr
    assert "dyn_test_accuracy" in shown.stdout and "upstream_val_accuracy" in shown.stdout
    assert "best_val_curve_acc" in shown.stdout
    decisions = json.loads((project / "outputs/register/decisions.json").read_text())
    assert all(d["promoted"] for d in decisions.values())

    third = dvc(["repro"], project)
    assert third.returncode == 0, third.stderr
    assert "Running stage" not in third.stdout
    status = dvc(["status"], project)
    assert status.returncode == 0 and "up to date" in status.stdout.lower(), status.stdout
    print(f"interrupted after epoch {done} of size-baseline; outputs present after the kill: {present}")


def test_dvc_exp_run_with_a_param_change_reruns_only_what_depends_on_it(project):
    git(["add", "-A"], project)  # dvc.lock of the first repro
    git(["commit", "-qm", "repro"], project)
    exp = dvc(["exp", "run", "-S", "evaluate.throughput_repeats=2", "-n", "repeats2"], project)
    assert exp.returncode == 0, exp.stdout[-3000:] + exp.stderr[-3000:]
    assert "Running stage 'evaluate'" in exp.stdout and "Running stage 'register'" in exp.stdout
    for stage in ("prepare", "pretrain", "tune", "train"):
        assert f"Running stage '{stage}'" not in exp.stdout
    # the same models, logged again: the registry keeps the champion unless the new version is better
    decisions = json.loads((project / "outputs/register/decisions.json").read_text())
    assert all(d["version"] == "2" and d["created"] for d in decisions.values())
    shown = dvc(["exp", "show", "--json"], project)
    assert shown.returncode == 0, shown.stderr
    assert "repeats2" in shown.stdout and "throughput_repeats" in shown.stdout
    assert "dyn_test_accuracy" in shown.stdout  # metrics are git-tracked (cache: false), so experiments keep them
    diff = dvc(["params", "diff", "--json"], project)
    assert diff.returncode == 0 and "evaluate.throughput_repeats" in diff.stdout, diff.stdout + diff.stderr
    metrics = dvc(["metrics", "diff", "--json"], project)
    assert metrics.returncode == 0, metrics.stderr


def test_budget_sweep_as_queued_experiments_retrains_nothing(project):
    """README's sweep: queue budgets with -S, run them all, read budget, accuracy, MACs fraction and speed-up
    side by side in `dvc exp show`; no experiment runs the train stage, and all register in the project's
    MLflow store (the queue runs in temporary copies)."""
    git(["add", "-A"], project)
    git(["commit", "-qm", "before the sweep"], project)
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    queued = dvc(["exp", "run", "--queue", "-S", "base.budget=0.3,0.7"], project)
    assert queued.returncode == 0, queued.stdout + queued.stderr
    ran = dvc(["exp", "run", "--run-all", "-j", "1"], project)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    shown = dvc(["exp", "show", "--json"], project)
    assert shown.returncode == 0, shown.stderr
    rows = [e for b in json.loads(shown.stdout) for e in (b.get("experiments") or [])]
    budgets = {}
    for exp in rows:
        data = exp["revs"][0]["data"]
        budget = data["params"]["params.yaml"]["data"]["base"]["budget"]
        metrics = data["metrics"]["outputs/evaluate/metrics.json"]["data"]
        assert {"dyn_test_accuracy", "dyn_test_macs_fraction", "throughput_speedup"} <= set(metrics)
        assert metrics["budget"] == budget
        trained = next(d["md5"] for d in lock["evaluate"]["deps"] if d["path"] == "models/tasks")
        assert data["deps"]["models/tasks"]["hash"] == trained  # the baseline's trained models, unchanged
        budgets[budget] = metrics["dyn_test_macs_fraction"]
    assert set(budgets) == {0.3, 0.7}
    names = [e.get("name") or e["revs"][0].get("name") for e in rows]
    assert all(names), names
    for name in names:
        logs = subprocess.run([DVC, "queue", "logs", name], cwd=project, env=project_env(project),
                              capture_output=True, text=True, timeout=120).stdout
        assert "Running stage 'train'" not in logs and "Running stage 'tune'" not in logs
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parents = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                                 filter_string="tags.`dynadapter.kind` = 'pipeline'")
    curves = [client.get_metric_history(r.info.run_id, "budget_curve/test_accuracy") for r in parents]
    assert sum(1 for c in curves if c) >= 3  # the first repro and both experiments, in the project's store
    assert all(m.step in range(10, 101) for c in curves for m in c)
    card = client.get_registered_model("dynadapter-size").description
    assert "vit_tiny_patch16_224" in card and "budget" in card.lower()
