"""The embedded backbone's pretraining data: procedural scenes labelled with many visual factors at once.

A stand-in for ImageNet-21k. A single shape label teaches a backbone to ignore where an object is, how big,
how turned and how many there are, which is what structured downstream tasks ask; so every scene carries
eight labels (the main object's shape, fill, hue, horizontal and vertical position, scale and rotation, and
the number of objects), and the backbone is trained on all of them at once (one classifier, one
cross-entropy per factor). The scenes mix all ten shapes, solid and outlined, with clutter, noise and
background gradients.

What this means for the downstream suite: the renderer shares its drawing kit (`Scene`, the shapes, the
placement code, 32 px) with the structured tasks of `dynadapter.data.synthetic`, and each of them asks for a
variable the backbone was trained to predict here: `count` is the factor count (the same 1-6), `position` is x
and y (4x4 bins give the 3x3 cell almost always), `orientation` is angle (the same arrow and rotation
convention), `size` is scale (the same radius ratio). On those tasks (the `shared` group) the `transfer` probe
re-reads features trained for the same variable, so its margin over a random-init backbone is largely by
construction. Half of the default suite is the `unseen` group: `digits`, `glyphs` and `textures`, drawn by
`dynadapter.data.unseen` (another renderer, no code shared with this one) with labels no factor names; their
probe margin is the transfer figure (`evaluate` reports the groups apart; BENCHMARKS.md §2.1).
"""

from __future__ import annotations

import colorsys
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from dynadapter.data.synthetic import SHAPES, Scene, lerp, place, default_workers

SHAPE_NAMES = tuple(SHAPES)
# Rotational symmetry order of each shape (0: a circle, whose rotation is unobservable).
SYMMETRY = {"circle": 0, "square": 4, "triangle": 3, "bar": 2, "cross": 4, "star": 5, "arrow": 1,
            "semicircle": 1, "lshape": 1, "tshape": 1}
FACTORS: dict[str, int] = {"shape": len(SHAPE_NAMES), "fill": 2, "hue": 6, "x": 4, "y": 4, "scale": 4,
                           "angle": 8, "count": 6}
"""Factor name -> number of classes; the classifier has sum(FACTORS.values()) outputs, one slice per factor."""
IGNORE = -1  # label of a factor that the scene does not define (the rotation of a circle)
RADIUS = (0.12, 0.36)  # main object's radius as a fraction of the image side
CHUNK = 1000


def factor_slices() -> dict[str, slice]:
    """Each factor's slice of the classifier's outputs."""
    out, start = {}, 0
    for name, k in FACTORS.items():
        out[name] = slice(start, start + k)
        start += k
    return out


def _bin(value: float, low: float, high: float, bins: int) -> int:
    return int(np.clip((value - low) / (high - low) * bins, 0, bins - 1))


def render_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: uint8 [size, size, 3] and its factor labels, int64 [len(FACTORS)] in FACTORS' order."""
    d = float(rng.random())
    sc = Scene(rng, size, d)
    count = int(rng.integers(1, FACTORS["count"] + 1))
    kind = SHAPE_NAMES[int(rng.integers(len(SHAPE_NAMES)))]
    solid = bool(rng.integers(2))
    r = size * rng.uniform(*RADIUS)
    angle = float(rng.uniform(0, 360))
    centres = place(rng, count, r, size, min_dist=lerp(2.2, 1.6, d) * r)
    for cx, cy in centres[1:]:  # the other objects are smaller than the main one, so "main" is well defined
        other = SHAPE_NAMES[int(rng.integers(len(SHAPE_NAMES)))]
        r_o = r * rng.uniform(0.35, 0.65)
        sc.shape(other, cx, cy, r_o, rng.uniform(0, 360), outline=0.0 if rng.random() < 0.5 else max(1.0, 0.25 * r_o))
    color = sc.object_color()
    cx, cy = centres[0]
    sc.shape(kind, cx, cy, r, angle, outline=0.0 if solid else max(1.0, 0.2 * r), color=color)
    sc.specks(int(round(d * 3)), max_r=0.04 * size)
    img = sc.finish()
    hue = colorsys.rgb_to_hsv(*np.clip(color, 1e-6, 1.0))[0]
    order = SYMMETRY[kind]
    angle_bin = IGNORE if order == 0 else _bin(angle % (360.0 / order), 0.0, 360.0 / order, FACTORS["angle"])
    labels = [SHAPE_NAMES.index(kind), int(solid), int(hue * FACTORS["hue"]) % FACTORS["hue"],
              _bin(cx, r, size - r, FACTORS["x"]), _bin(cy, r, size - r, FACTORS["y"]),
              _bin(r / size, *RADIUS, FACTORS["scale"]), angle_bin, count - 1]
    return img, np.asarray(labels, dtype=np.int64)


def _render_chunk(seed: int, chunk: int, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([int(seed), 0x5CE4E, chunk])
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = np.empty((n, len(FACTORS)), dtype=np.int64)
    for i in range(n):
        images[i], labels[i] = render_scene(rng, size)
    return images, labels


def generate_scenes(n: int, size: int, seed: int, offset: int = 0, workers: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """`n` scenes (uint8 [n, S, S, 3], labels int64 [n, F]); chunk k of 1,000 is seeded by (seed, offset + k),
    so the same arguments give the same scenes whatever the number of workers."""
    chunks = [(seed, offset + k, min(CHUNK, n - lo), size) for k, lo in enumerate(range(0, n, CHUNK))]
    workers = min(default_workers() if workers is None else max(1, workers), len(chunks))
    if workers > 1 and "fork" in mp.get_all_start_methods():
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            parts = list(pool.map(_render_chunk, *zip(*chunks)))
    else:
        parts = [_render_chunk(*c) for c in chunks]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
