"""`dvc repro` interrupted for real during the train stage (Ctrl-C to its process group, then SIGKILL), in a
temporary git + DVC copy of the project: the train stage's outputs are absent or whole, and the next
`dvc repro` finishes the pipeline, resuming training from the last epoch checkpoint instead of from zero."""

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
from helpers import DVC, dvc, dvc_project, project_env
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
    tasks = ["size"]
    ckpt_dir = project / "models/checkpoints/train"
    # the second model's first epoch checkpoint: by then the first model is trained and saved, so a stage
    # that writes its outputs in place has some of them on disk
    killed = _interrupt_during_training(project, tmp_path / "first.log", ckpt_dir / "size-baseline.pt")
    first = (tmp_path / "first.log").read_text()
    assert killed.returncode != 0, first[-3000:]
    assert "Running stage 'train'" in first and "train size/baseline: epoch 1/" in first, first[-3000:]

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
    status = dvc(["status"], project)
    assert status.returncode == 0 and "up to date" in status.stdout.lower(), status.stdout
    print(f"interrupted after epoch {done} of size-baseline; outputs present after the kill: {present}")


def test_small_outputs_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """metrics.json, resolved configs and the other small stage outputs go through write_text_atomic: a write
    that fails half way (here: the rename) leaves the previous file as it was and no temporary file."""
    from dynadapter import atomic
    from dynadapter.config import Params, save_resolved

    target = tmp_path / "metrics.json"
    atomic.write_text_atomic(target, '{"a": 1}\n')
    assert target.read_text() == '{"a": 1}\n'

    def killed(src, dst):
        raise KeyboardInterrupt  # what Ctrl-C between the write and the rename looks like

    monkeypatch.setattr(atomic.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_text_atomic(target, '{"a": 2, "b": "a much longer text that was never finished"}\n')
    with pytest.raises(KeyboardInterrupt):
        save_resolved(Params(), ["base"], tmp_path / "train_config.yaml")
    assert target.read_text() == '{"a": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
