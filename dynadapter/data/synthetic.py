"""Embedded offline data: a seeded VTAB-1k-style downstream suite (the pretraining scenes are in upstream.py).

The structured tasks (count, position, orientation, size) are drawn here with `Scene`, the pretraining scenes'
kit, and each asks for a pretraining factor; the tasks the backbone never saw (digits, glyphs, textures) come
from another renderer, `dynadapter.data.unseen`. `task_groups` tells the two apart.

Every image comes from a numpy Generator seeded by (seed, task, split, chunk), drawn with PIL and PNG-encoded with
fixed settings, so the same seed gives byte-identical data. Each example carries a difficulty in [0, 1] that
drives contrast, noise, clutter, object scale and how close the label is to a class boundary: easy examples
can leave at an early exit, hard ones need depth.
"""

from __future__ import annotations

import colorsys
import io
import multiprocessing as mp
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from dynadapter.config import EmbeddedDataConfig
from dynadapter.data.store import SPLITS, DataError, write_task
from dynadapter.data.unseen import GLYPH_NAMES, TEXTURES, render_digit, render_glyph, render_texture

SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges at any image size
PNG_SETTINGS = {"format": "PNG", "compress_level": 6, "optimize": False}


@dataclass
class GeneratedTask:
    """One generated task in memory, ready for `write_task` (rows grouped by split: train, val, test)."""

    name: str
    images: list[bytes]
    labels: np.ndarray  # int64 [N]
    splits: list[str]
    num_classes: int
    class_names: list[str]
    difficulty: np.ndarray  # float32 [N], 0 = easiest

    def counts(self) -> dict[str, int]:
        return {s: self.splits.count(s) for s in SPLITS}

    def write(self, root: str | Path, source: str = "embedded", extra: dict | None = None) -> Path:
        return write_task(
            root,
            self.name,
            self.images,
            self.labels,
            self.splits,
            self.num_classes,
            source,
            class_names=self.class_names,
            difficulty=self.difficulty,
            extra=extra,
        )


# ------------------------------------------------------------------------------------------ drawing kit


def _poly(points: Sequence[tuple[float, float]]) -> np.ndarray:
    return np.asarray(points, dtype=np.float64)


def _ngon(n: int, start_deg: float = 90.0) -> np.ndarray:
    t = np.deg2rad(start_deg + np.arange(n) * 360.0 / n)
    return np.stack([np.cos(t), -np.sin(t)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    t = np.deg2rad(90.0 + np.arange(2 * points) * 180.0 / points)
    rad = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([rad * np.cos(t), -rad * np.sin(t)], axis=1)


def _semicircle() -> np.ndarray:
    t = np.deg2rad(np.linspace(-90, 90, 17))
    return np.stack([np.cos(t) - 0.42, np.sin(t)], axis=1)  # flat side left, centred on its area


# Unit shapes (radius ~1, y down). Arrow and L are asymmetric, so their rotation is fully observable.
SHAPES: dict[str, np.ndarray] = {
    "circle": _ngon(32),
    "square": _poly([(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]),
    "triangle": _ngon(3),
    "bar": _poly([(-1.0, -0.28), (1.0, -0.28), (1.0, 0.28), (-1.0, 0.28)]),
    "cross": _poly([(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
                    (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)]),
    "star": _star(),
    "arrow": _poly([(-1, -0.2), (0.15, -0.2), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.2), (-1, 0.2)]),
    "semicircle": _semicircle(),
    "lshape": _poly([(-0.7, -0.9), (-0.2, -0.9), (-0.2, 0.4), (0.8, 0.4), (0.8, 0.9), (-0.7, 0.9)]),
    "tshape": _poly([(-0.9, -0.9), (0.9, -0.9), (0.9, -0.4), (0.25, -0.4), (0.25, 0.9), (-0.25, 0.9),
                     (-0.25, -0.4), (-0.9, -0.4)]),
}


def lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def _luma(rgb: np.ndarray) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def _color(rng: np.random.Generator, luma: float, sat: tuple[float, float] = (0.35, 1.0)) -> np.ndarray:
    """A random hue with the requested luminance (approximately, after clipping)."""
    rgb = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), 1.0))
    return np.clip(rgb * (luma / max(_luma(rgb), 1e-3)), 0.0, 1.0)


class Scene:
    """A float RGB canvas in [0, 1] with a background whose look depends on difficulty `d`."""

    def __init__(self, rng: np.random.Generator, size: int, d: float) -> None:
        self.rng, self.size, self.d = rng, size, d
        self.bg_luma = rng.uniform(0.15, 0.85)
        self.contrast = lerp(0.55, 0.14, d) * rng.uniform(0.85, 1.15)
        bg = _color(rng, self.bg_luma, sat=(0.0, 0.5))
        ramp = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
        theta = rng.uniform(0, 2 * np.pi)
        amp = rng.uniform(0.0, 0.08 + 0.15 * d)
        grad = amp * (ramp[None, :] * np.cos(theta) + ramp[:, None] * np.sin(theta))
        self.img = (bg[None, None, :] + grad[:, :, None]).astype(np.float32)

    def object_color(self, contrast: float | None = None) -> np.ndarray:
        """A colour whose luminance differs from the background's by the scene contrast."""
        c = self.contrast if contrast is None else contrast
        options = [v for v in (self.bg_luma + c, self.bg_luma - c) if 0.03 <= v <= 0.97]
        luma = options[int(self.rng.integers(len(options)))] if options else (0.97 if self.bg_luma < 0.5 else 0.03)
        return _color(self.rng, luma)

    def mask(self, kind: str, cx: float, cy: float, r: float, angle_deg: float = 0.0,
             outline: float = 0.0) -> tuple[np.ndarray, tuple[slice, slice]] | None:
        """Anti-aliased coverage of a shape centred at (cx, cy) px, radius r px, rotated by `angle_deg`
        clockwise on screen (image y points down).

        Drawn only inside the shape's bounding box (small shapes stay cheap); returns (coverage, window) or
        None when the shape lies outside the image.
        """
        ss, s = SUPERSAMPLE, self.size
        a = np.deg2rad(angle_deg)
        # (1, 0) -> (cos a, sin a): clockwise on screen, since y points down
        rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
        pts = (SHAPES[kind] @ rot) * r + (cx, cy)
        pad = outline / 2 + 1
        x0, y0 = (max(0, int(np.floor(v - pad))) for v in pts.min(axis=0))
        x1, y1 = (min(s, int(np.ceil(v + pad))) for v in pts.max(axis=0))
        if x1 <= x0 or y1 <= y0:
            return None
        canvas = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
        xy = [tuple(p) for p in ((pts - (x0, y0)) * ss).tolist()]
        draw = ImageDraw.Draw(canvas)
        if outline > 0:
            draw.polygon(xy, outline=255, width=max(1, int(round(outline * ss))))
        else:
            draw.polygon(xy, fill=255)
        small = canvas.reduce(ss)
        cover = np.frombuffer(small.tobytes(), np.uint8).reshape(small.height, small.width) * np.float32(1 / 255)
        return cover, (slice(y0, y1), slice(x0, x1))

    def paint(self, cover: np.ndarray, color: np.ndarray, window: tuple[slice, slice] | None = None) -> None:
        region = self.img if window is None else self.img[window]
        region += cover[:, :, None] * (color.astype(np.float32)[None, None, :] - region)

    def shape(self, kind: str, cx: float, cy: float, r: float, angle: float = 0.0, outline: float = 0.0,
              color: np.ndarray | None = None) -> None:
        color = self.object_color() if color is None else color  # drawn even when off-image: fixed rng use
        m = self.mask(kind, cx, cy, r, angle, outline)
        if m is not None:
            self.paint(m[0], color, m[1])

    def specks(self, n: int, max_r: float) -> None:
        """Tiny clutter dots / short strokes that are not part of the label."""
        s = self.size
        for _ in range(n):
            r = self.rng.uniform(0.35, max(0.4, max_r))
            kind = "circle" if self.rng.random() < 0.5 else "bar"
            self.shape(kind, self.rng.uniform(0, s), self.rng.uniform(0, s), r, self.rng.uniform(0, 360),
                       color=self.object_color(self.contrast * self.rng.uniform(0.5, 1.2)))

    def finish(self, noise: float | None = None) -> np.ndarray:
        sigma = lerp(0.01, 0.10, self.d) if noise is None else noise
        img = self.img + self.rng.normal(0.0, sigma, self.img.shape).astype(np.float32)
        return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def place(rng: np.random.Generator, n: int, r: float, size: int, min_dist: float,
           fixed: Sequence[tuple[float, float]] = ()) -> list[tuple[float, float]]:
    """n centres inside the image, at least min_dist from each other and from `fixed` (shrinks if crowded)."""
    for _ in range(20):
        out: list[tuple[float, float]] = []
        for _ in range(n):
            for _ in range(100):
                p = (rng.uniform(r, size - r), rng.uniform(r, size - r))
                if all((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 >= min_dist**2 for q in [*fixed, *out]):
                    out.append(p)
                    break
            else:
                break
        if len(out) == n:
            return out
        min_dist *= 0.9
    return out + [(rng.uniform(r, size - r), rng.uniform(r, size - r)) for _ in range(n - len(out))]


def encode_png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, mode="RGB").save(buf, **PNG_SETTINGS)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ renderers
# Each renderer: (rng, label, difficulty, image_size) -> uint8 [S, S, 3]. Geometry is relative to S.

COUNT_MAX = 6
POSITION_GRID = 3
ORIENTATION_BINS = 8
SIZE_BINS = 5
SIZE_RANGE = (0.08, 0.44)  # object radius as a fraction of the image side
DISTRACTOR_SHAPES = ("circle", "square", "triangle", "bar", "semicircle")


def render_count(rng: np.random.Generator, label: int, d: float, s: int) -> np.ndarray:
    """label + 1 objects (CLEVR-count-like); hard: small, low contrast, crowded, with uncounted specks."""
    sc = Scene(rng, s, d)
    n = label + 1
    r = s * lerp(0.13, 0.085, d) * rng.uniform(0.9, 1.1)
    for cx, cy in place(rng, n, r, s, min_dist=lerp(2.6, 2.0, d) * r):
        sc.shape(str(rng.choice(DISTRACTOR_SHAPES[:3])), cx, cy, r * rng.uniform(0.85, 1.15), rng.uniform(0, 360))
    sc.specks(int(round(d * 6)), max_r=0.3 * r)
    return sc.finish()


def render_position(rng: np.random.Generator, label: int, d: float, s: int) -> np.ndarray:
    """Cell (row, col) of a 3x3 grid holding the one cross among distractors (dSprites-location-like)."""
    sc = Scene(rng, s, d)
    row, col = divmod(label, POSITION_GRID)
    cell = s / POSITION_GRID
    r = s * lerp(0.16, 0.12, d)
    spread = lerp(0.15, 0.5, d) * cell  # hard: anywhere in the cell, up to its border
    cx = np.clip((col + 0.5) * cell + rng.uniform(-1, 1) * spread, col * cell + 0.5, (col + 1) * cell - 0.5)
    cy = np.clip((row + 0.5) * cell + rng.uniform(-1, 1) * spread, row * cell + 0.5, (row + 1) * cell - 0.5)
    n_distractors = int(d * 4 + rng.random() * 0.5)
    for px, py in place(rng, n_distractors, r, s, min_dist=2.2 * r, fixed=[(cx, cy)]):
        sc.shape(str(rng.choice(DISTRACTOR_SHAPES)), px, py, r * rng.uniform(0.8, 1.1), rng.uniform(0, 360))
    sc.shape("cross", cx, cy, r, rng.uniform(-15, 15))
    sc.specks(int(round(d * 3)), max_r=0.25 * r)
    return sc.finish()


def render_orientation(rng: np.random.Generator, label: int, d: float, s: int) -> np.ndarray:
    """Direction bin (45° each, clockwise on screen from 'right') of an arrow (dSprites-orientation-like, no
    180° symmetry)."""
    sc = Scene(rng, s, d)
    width = 360.0 / ORIENTATION_BINS
    angle = label * width + rng.uniform(-0.5, 0.5) * lerp(0.2, 0.96, d) * width
    r = s * lerp(0.38, 0.22, d) * rng.uniform(0.9, 1.1)
    cx, cy = rng.uniform(r * 0.8, s - r * 0.8, size=2)
    n_distractors = int(d * 3 + rng.random() * 0.5)
    for px, py in place(rng, n_distractors, 0.25 * r, s, min_dist=1.3 * r, fixed=[(cx, cy)]):
        sc.shape(str(rng.choice(DISTRACTOR_SHAPES[:3])), px, py, 0.3 * r, rng.uniform(0, 360))
    sc.shape("arrow", cx, cy, r, angle)
    sc.specks(int(round(d * 4)), max_r=0.1 * r)
    return sc.finish()


def render_size(rng: np.random.Generator, label: int, d: float, s: int) -> np.ndarray:
    """Radius bin of the one object (smallNORB/KITTI-distance-like); hard: radius near a bin border."""
    sc = Scene(rng, s, d)
    lo, hi = SIZE_RANGE
    width = (hi - lo) / SIZE_BINS
    frac = lo + (label + 0.5 + rng.uniform(-0.5, 0.5) * lerp(0.3, 0.96, d)) * width
    r = s * frac
    cx, cy = (rng.uniform(min(r, s / 2), max(s - r, s / 2)) for _ in range(2))
    sc.specks(int(round(d * 6)), max_r=0.05 * s)
    sc.shape(str(rng.choice(["circle", "square", "triangle"])), cx, cy, r, rng.uniform(0, 360))
    return sc.finish()


# ------------------------------------------------------------------------------------------ task specs

CHUNK = 500  # images per seeded work unit; fixed, so the output never depends on the number of workers
Render = Callable[[np.random.Generator, int, float, int], np.ndarray]


def _rng(seed: int, task: str, split: str, chunk: int = -1) -> np.random.Generator:
    # Keyed by name, not position: adding a task or resizing train never changes another task or split.
    return np.random.default_rng([int(seed), zlib.crc32(task.encode()), SPLITS.index(split), chunk + 1])


def _balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    return rng.permutation(np.resize(np.arange(num_classes, dtype=np.int64), n))


def _render_chunk(render: Render, seed: int, task: str, split: str, chunk: int, items: np.ndarray,
                  image_size: int) -> tuple[list[bytes], np.ndarray]:
    rng = _rng(seed, task, split, chunk)
    diffs = rng.random(len(items)).astype(np.float32)
    images = [encode_png(render(rng, int(it), float(d), image_size)) for it, d in zip(items.tolist(), diffs.tolist())]
    return images, diffs


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _render_jobs(render: Render, seed: int, task: str, image_size: int, jobs: list[tuple[str, int, np.ndarray]],
                 workers: int | None, progress: bool) -> tuple[list[bytes], np.ndarray]:
    """Render (split, chunk, items) jobs, in parallel when it pays; results in job order either way."""
    total = sum(len(items) for _, _, items in jobs)
    workers = min(default_workers() if workers is None else max(1, workers), len(jobs))
    images: list[bytes] = []
    diffs: list[np.ndarray] = []
    with tqdm(total=total, desc=f"generate {task}", unit="img", disable=not progress, leave=False) as bar:
        # fork: children inherit the loaded modules (and the digits cache) instead of re-importing them
        if workers > 1 and total >= 2 * CHUNK and "fork" in mp.get_all_start_methods():
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
                futures = [pool.submit(_render_chunk, render, seed, task, sp, k, items, image_size)
                           for sp, k, items in jobs]
                for fut in futures:
                    imgs, d = fut.result()
                    images += imgs
                    diffs.append(d)
                    bar.update(len(imgs))
        else:
            for sp, k, items in jobs:
                imgs, d = _render_chunk(render, seed, task, sp, k, items, image_size)
                images += imgs
                diffs.append(d)
                bar.update(len(imgs))
    return images, np.concatenate(diffs) if diffs else np.zeros(0, np.float32)


def _chunked(split: str, items: np.ndarray) -> list[tuple[str, int, np.ndarray]]:
    return [(split, k, items[lo:lo + CHUNK]) for k, lo in enumerate(range(0, len(items), CHUNK))]


@dataclass(frozen=True)
class ProceduralTask:
    """A task drawn image by image: balanced labels per split, difficulty ~ U(0, 1) per example."""

    class_names: tuple[str, ...]
    render: Render
    description: str
    pretraining_factor: str | None = None  # the embedded backbone's pretraining factor that predicts the label

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def generate(self, name: str, sizes: dict[str, int], seed: int, image_size: int, progress: bool = True,
                 workers: int | None = None) -> GeneratedTask:
        jobs, labels, splits = [], [], []
        for split in SPLITS:
            n = sizes.get(split, 0)
            if n > 0:
                y = _balanced_labels(_rng(seed, name, split), n, self.num_classes)
                jobs += _chunked(split, y)
                labels.append(y)
                splits += [split] * n
        images, diffs = _render_jobs(self.render, seed, name, image_size, jobs, workers, progress)
        return GeneratedTask(name, images, np.concatenate(labels), splits, self.num_classes,
                             list(self.class_names), diffs)


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def _render_digit(rng: np.random.Generator, index: int, d: float, s: int) -> np.ndarray:
    return render_digit(rng, _digits()[0][index], d, s)


class DigitsTask:
    """scikit-learn's bundled 8x8 digits (1,797 real images), upscaled and recoloured per example.

    Splits: train, val from the config, test = the rest capped at the configured test size; class-balanced.
    """

    class_names = tuple(str(i) for i in range(10))
    num_classes = 10
    pretraining_factor = None
    description = "handwritten digit 0-9 (sklearn load_digits) in ink on paper: colour, contrast, scale, tilt, noise"

    def generate(self, name: str, sizes: dict[str, int], seed: int, image_size: int, progress: bool = True,
                 workers: int | None = None) -> GeneratedTask:
        _, y = _digits()
        n_train, n_val = sizes.get("train", 0), sizes.get("val", 0)
        if n_train + n_val >= len(y):
            raise DataError(
                f"digits has {len(y)} images; prepare.embedded.train + prepare.embedded.val = {n_train + n_val} "
                "leaves none for test"
            )
        rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
        # Class-interleaved order: every prefix is balanced, so even tiny splits cover all classes.
        per_class = [rng.permutation(np.flatnonzero(y == c)) for c in range(self.num_classes)]
        longest = max(len(g) for g in per_class)
        order = np.array([int(g[k]) for k in range(longest) for g in per_class if k < len(g)], dtype=np.int64)
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val),
                  "test": (n_train + n_val, min(len(y), n_train + n_val + sizes.get("test", 0)))}
        jobs, splits = [], []
        for split in SPLITS:
            lo, hi = bounds[split]
            if hi > lo:
                jobs += _chunked(split, rng.permutation(order[lo:hi]))
                splits += [split] * (hi - lo)
        labels = np.concatenate([y[items] for _, _, items in jobs])
        images, diffs = _render_jobs(_render_digit, seed, name, image_size, jobs, workers, progress)
        return GeneratedTask(name, images, labels, splits, self.num_classes, list(self.class_names), diffs)


TASKS: dict[str, ProceduralTask | DigitsTask] = {
    # drawn with the pretraining scenes' kit (Scene), and each label is a pretraining factor (upstream.FACTORS)
    "count": ProceduralTask(tuple(str(n) for n in range(1, COUNT_MAX + 1)), render_count,
                            "number of objects (1-6), like CLEVR count", pretraining_factor="count"),
    "position": ProceduralTask(
        tuple(f"{r}-{c}" for r in ("top", "middle", "bottom") for c in ("left", "center", "right")),
        render_position, "3x3 grid cell of the cross among distractors, like dSprites location",
        pretraining_factor="x, y"),
    "orientation": ProceduralTask(tuple(f"{k * 360 // ORIENTATION_BINS}deg" for k in range(ORIENTATION_BINS)),
                                  render_orientation, "arrow direction in 45-degree bins, like dSprites orientation",
                                  pretraining_factor="angle"),
    "size": ProceduralTask(("xs", "s", "m", "l", "xl"), render_size,
                           "object radius bin, like smallNORB / KITTI distance", pretraining_factor="scale"),
    # another image process (dynadapter.data.unseen: ink on paper), labels no pretraining factor names
    "digits": DigitsTask(),
    "glyphs": ProceduralTask(GLYPH_NAMES, render_glyph,
                             "which of ten invented pen-stroke symbols, in a new hand each time, like Omniglot"),
    "textures": ProceduralTask(TEXTURES, render_texture, "which of eight periodic surface patterns, like DTD"),
}
"""Downstream suite: task name -> generator. Adding a task is one entry here."""

GROUPS = ("shared", "unseen")


def task_groups(tasks: Sequence[str]) -> dict[str, list[str]]:
    """Embedded tasks by what the embedded backbone saw: `shared` (the label is a pretraining factor, drawn with
    the pretraining kit) and `unseen` (neither). Unknown tasks raise DataError."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise DataError(f"unknown embedded task(s) {unknown}; known: {sorted(TASKS)}")
    return {g: [t for t in tasks if (TASKS[t].pretraining_factor is None) == (g == "unseen")] for g in GROUPS}


def generate_task(name: str, cfg: EmbeddedDataConfig, seed: int, progress: bool = True,
                  workers: int | None = None) -> GeneratedTask:
    """One downstream task from TASKS, split sizes from cfg."""
    if name not in TASKS:
        raise DataError(f"unknown embedded task {name!r}; known: {sorted(TASKS)}")
    sizes = {"train": cfg.train, "val": cfg.val, "test": cfg.test}
    return TASKS[name].generate(name, sizes, seed, cfg.image_size, progress, workers)


def generate_suite(cfg: EmbeddedDataConfig, seed: int, tasks: Sequence[str] | None = None, progress: bool = True,
                   workers: int | None = None) -> dict[str, GeneratedTask]:
    """The downstream suite (all of TASKS by default) as {task: GeneratedTask}, VTAB-1k split sizes from cfg."""
    names = list(TASKS) if tasks is None else list(tasks)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise DataError(f"unknown embedded task(s) {unknown}; known: {sorted(TASKS)}")
    return {name: generate_task(name, cfg, seed, progress, workers) for name in names}
