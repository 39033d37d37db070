"""The embedded downstream suite: which tasks the backbone had a head start on, and the tasks that share nothing with
its pretraining (another renderer, labels no pretraining factor names)."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dynadapter.config import EmbeddedDataConfig, load_params
from dynadapter.data import DataError, task_groups
from dynadapter.data.synthetic import TASKS, generate_task
from dynadapter.data.unseen import GLYPH_NAMES, TEXTURES, render_glyph, render_texture
from dynadapter.data.upstream import FACTORS

ROOT = Path(__file__).resolve().parents[1]
TINY = EmbeddedDataConfig(image_size=32, train=24, val=16, test=16)


def test_default_suite_has_at_least_half_its_tasks_unseen():
    groups = task_groups(load_params(ROOT / "params.yaml").base.tasks)
    assert groups == {"shared": ["count", "position", "orientation"], "unseen": ["digits", "glyphs", "textures"]}


def test_groups_follow_the_pretraining_factors_and_reject_unknown_tasks():
    groups = task_groups(list(TASKS))
    assert groups["shared"] == ["count", "position", "orientation", "size"]
    for task in groups["shared"]:  # each names factors the pretraining really has
        assert all(f.strip() in FACTORS for f in TASKS[task].pretraining_factor.split(","))
    with pytest.raises(DataError, match="unknown embedded task"):
        task_groups(["count", "clevr_count"])


def test_unseen_renderer_shares_no_code_with_the_pretraining_kit():
    """dynadapter.data.unseen imports nothing from the package: no Scene, shapes or placement of the pretraining."""
    tree = ast.parse((ROOT / "dynadapter/data/unseen.py").read_text())
    imported = {n.module if isinstance(n, ast.ImportFrom) else a.name
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [None])}
    assert imported <= {"__future__", "numpy", "PIL"}, imported


@pytest.mark.parametrize("task", ["digits", "glyphs", "textures"])
def test_unseen_tasks_are_balanced_deterministic_and_32px(task):
    a = generate_task(task, TINY, seed=3, progress=False, workers=1)
    b = generate_task(task, TINY, seed=3, progress=False, workers=1)
    c = generate_task(task, TINY, seed=4, progress=False, workers=1)
    assert a.images == b.images and (a.labels == b.labels).all()
    assert a.images != c.images
    assert a.counts() == {"train": 24, "val": 16, "test": 16}
    train = a.labels[np.asarray(a.splits) == "train"]
    counts = np.bincount(train, minlength=a.num_classes)
    assert counts.max() - counts.min() <= 1  # every class present, balanced
    img = Image.open(io.BytesIO(a.images[0]))
    assert img.size == (32, 32) and img.mode == "RGB"


@pytest.mark.parametrize(("render", "names"), [(render_glyph, GLYPH_NAMES), (render_texture, TEXTURES)])
def test_classes_differ_more_than_examples_of_one_class(render, names):
    """The label is in the image: at difficulty 0, two draws of one class are closer than draws of two classes, on
    average, in a view blind to where the pattern lies and how it is turned (the amplitude spectrum's radial
    profile). Were the label ignored, the two distances would be equal."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]
    radius = np.hypot(np.minimum(yy, 32 - yy), np.minimum(xx, 32 - xx)).astype(int).ravel()

    def view(label):
        img = render(rng, label, 0.0, 32).astype(np.float32).mean(2)
        amp = np.abs(np.fft.fft2(img - img.mean())).ravel()
        profile = np.bincount(radius, amp)[:17] / np.bincount(radius)[:17]
        return profile / (np.linalg.norm(profile) + 1e-6)

    draws = {k: [view(k) for _ in range(6)] for k in range(len(names))}
    within = np.mean([np.linalg.norm(a - b) for v in draws.values() for i, a in enumerate(v) for b in v[i + 1:]])
    between = np.mean([np.linalg.norm(a - b) for k, v in draws.items() for j, w in draws.items() if j > k
                       for a in v for b in w])
    assert between > 1.05 * within, (between, within)


def test_transfer_report_gives_each_group_its_means_and_margin():
    from dynadapter.transfer import TransferReport

    tasks = {"a": {"probe_val": 0.9, "random_init_probe_val": 0.2, "pixel_probe_val": 0.3},
             "b": {"probe_val": 0.5, "random_init_probe_val": 0.4, "pixel_probe_val": 0.1},
             "c": {"probe_val": 0.7, "random_init_probe_val": 0.6, "pixel_probe_val": 0.2}}
    report = TransferReport(0.7, 0.4, 0.2, tasks, {"shared": ["a"], "unseen": ["b", "c"], "empty": []})
    out = report.to_dict()["groups"]
    assert set(out) == {"shared", "unseen"}  # a group without tasks is left out
    assert out["shared"].pop("tasks") == ["a"]
    assert out["shared"] == pytest.approx({"probe_val": 0.9, "random_init_probe_val": 0.2, "pixel_probe_val": 0.3,
                                           "margin": 0.6})
    # means first, then the margin over the better reference mean (0.5 vs 0.15): not the mean of task margins
    assert out["unseen"]["probe_val"] == pytest.approx(0.6) and out["unseen"]["margin"] == pytest.approx(0.1)
    assert "groups" not in TransferReport(0.7, 0.4, 0.2, tasks).to_dict()
