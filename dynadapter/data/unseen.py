"""Suite tasks the embedded backbone has no head start on: another image process, labels no pretraining factor names.

The pretraining scenes (`dynadapter.data.upstream`) and four of the suite's older tasks share one renderer
(`synthetic.Scene`: filled or outlined polygons, a gradient background, Gaussian noise) and four of their labels
are pretraining factors. The tasks here share neither, and no code with that renderer:

* **digits** (SVHN/MNIST-like): scikit-learn's 1,797 bundled 8x8 scans of handwritten digits, upscaled,
  tilted and placed, in ink on the same paper. Real handwriting; the label is which digit.
* **glyphs** (Omniglot-like, VTAB's digits-like glyph sets): ten invented symbols written as pen strokes. Each
  example is a new hand: every control point jitters, the symbol is sheared, turned and scaled, and the stroke
  width varies, drawn with ink on a paper texture. The label is which symbol, a variable no factor names (the
  pretraining shapes are ten filled or outlined polygons, never strokes).
* **textures** (DTD-like): eight periodic surface patterns (stripes, checks, dots, grid, zigzag, rings, bricks,
  rhombic lattice) filling the frame at a random scale, phase and angle, in two random colours; hard examples are
  coarser to read, lower in contrast, warped and noisy. No pretraining scene has a repeated pattern.

Both take the suite's renderer signature `(rng, label, difficulty, size) -> uint8 [S, S, 3]` and difficulty
drives contrast, distortion and noise, so easy examples can leave at an early exit and hard ones need depth.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SS = 4  # drawn at 4x and box-filtered down

# ------------------------------------------------------------------------------------------ canvas


def _mix(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def _paper(rng: np.random.Generator, s: int, d: float) -> tuple[np.ndarray, np.ndarray]:
    """A paper-like background: a smooth random field (a bilinearly upsampled 4x4 grid) plus fibre streaks.

    Returns (float RGB [s, s, 3] in [0, 1], its mean colour)."""
    tone = rng.uniform(0.2, 0.9)
    tint = rng.uniform(-0.08, 0.08, size=3)
    base = np.clip(tone + tint, 0.0, 1.0)
    coarse = rng.normal(0.0, _mix(0.03, 0.09, d), size=(4, 4)).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse, mode="F").resize((s, s), Image.Resampling.BILINEAR))
    streak_angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    fibre = 0.02 * np.sin((xx * np.cos(streak_angle) + yy * np.sin(streak_angle)) * rng.uniform(1.5, 3.0))
    img = base[None, None, :] + (field + fibre)[:, :, None]
    return img.astype(np.float32), base


def _ink(rng: np.random.Generator, paper: np.ndarray, contrast: float) -> np.ndarray:
    """An ink colour `contrast` away from the paper's brightness (darker where it fits, else lighter)."""
    lum = float(paper.mean())
    target = lum - contrast if lum - contrast >= 0.02 else lum + contrast
    hue = rng.uniform(-0.12, 0.12, size=3)
    return np.clip(target + hue, 0.0, 1.0)


def _compose(img: np.ndarray, cover: np.ndarray, color: np.ndarray) -> np.ndarray:
    return img + cover[:, :, None] * (color[None, None, :] - img)


def _finish(rng: np.random.Generator, img: np.ndarray, sigma: float) -> np.ndarray:
    img = img + rng.normal(0.0, sigma, img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ------------------------------------------------------------------------------------------ digits


def render_digit(rng: np.random.Generator, digit: np.ndarray, d: float, s: int) -> np.ndarray:
    """An 8x8 load_digits scan (values 0-16) upscaled, tilted and placed; hard: smaller, more tilted, fainter.

    An 8x8 scan carries little detail: it keeps at least 70% of the side, a contrast of 0.3 and mild noise,
    so that the hardest digits stay legible."""
    img, paper = _paper(rng, s, d)
    side = max(8, min(s, int(round(s * _mix(0.95, 0.7, d) * rng.uniform(0.95, 1.05)))))
    glyph = Image.fromarray((np.clip(digit / 16.0, 0, 1) * 255).astype(np.uint8), mode="L")
    glyph = glyph.resize((side, side), Image.Resampling.BICUBIC)
    glyph = glyph.rotate(rng.uniform(-1, 1) * _mix(3, 15, d), resample=Image.Resampling.BILINEAR)
    canvas = Image.new("L", (s, s), 0)
    canvas.paste(glyph, (int(rng.integers(0, s - side + 1)), int(rng.integers(0, s - side + 1))))
    contrast = max(0.3, _mix(0.6, 0.22, d) * rng.uniform(0.9, 1.1))
    img = _compose(img, np.asarray(canvas, dtype=np.float32) / 255.0, _ink(rng, paper, contrast))
    return _finish(rng, img, _mix(0.01, 0.06, d))


# ------------------------------------------------------------------------------------------ glyphs

# Ten invented symbols as pen strokes on [-1, 1]^2 (y down). Each stroke is a polyline of control points; curves
# are sampled arcs. They differ in topology (open/closed, crossings, stroke count), not only in outline.


def _arc(cx: float, cy: float, r: float, a0: float, a1: float, n: int = 9) -> list[tuple[float, float]]:
    t = np.deg2rad(np.linspace(a0, a1, n))
    return [(cx + r * float(np.cos(v)), cy + r * float(np.sin(v))) for v in t]


GLYPHS: dict[str, list[list[tuple[float, float]]]] = {
    "hook": [[(-0.6, -0.8), (-0.6, 0.4)] + _arc(-0.1, 0.4, 0.5, 180, 0)[1:] + [(0.4, -0.2)]],
    "fork": [[(0.0, 0.9), (0.0, 0.0)], [(0.0, 0.0), (-0.7, -0.8)], [(0.0, 0.0), (0.7, -0.8)]],
    "ladder": [[(-0.5, -0.9), (-0.5, 0.9)], [(0.5, -0.9), (0.5, 0.9)], [(-0.5, -0.3), (0.5, -0.3)],
               [(-0.5, 0.3), (0.5, 0.3)]],
    "loop": [_arc(0.0, -0.25, 0.55, 0, 360, 17), [(0.0, 0.3), (0.0, 0.9)]],
    "zigzag": [[(-0.8, -0.7), (-0.3, 0.6), (0.1, -0.6), (0.5, 0.6), (0.8, -0.7)]],
    "spiral": [[(0.0 + 0.1 * t * np.cos(t), 0.0 + 0.1 * t * np.sin(t)) for t in np.linspace(0.5, 8.5, 25)]],
    "gate": [[(-0.7, 0.9), (-0.7, -0.6), (0.7, -0.6), (0.7, 0.9)], [(-0.3, -0.6), (-0.3, -0.95)],
             [(0.3, -0.6), (0.3, -0.95)]],
    "wave": [[(x, 0.45 * float(np.sin(x * 2.6 * np.pi))) for x in np.linspace(-0.9, 0.9, 19)],
             [(-0.2, -0.85), (0.2, -0.85)]],
    "eye": [_arc(0.0, 0.55, 0.9, 215, 325, 9) + _arc(0.0, -0.55, 0.9, 35, 145, 9), _arc(0.0, 0.0, 0.15, 0, 360, 9)],
    "arrowhead": [[(-0.8, 0.6), (0.0, -0.7), (0.8, 0.6)], [(-0.4, 0.05), (0.4, 0.05)], [(0.0, -0.7), (0.0, 0.9)]],
}
GLYPH_NAMES = tuple(GLYPHS)


def render_glyph(rng: np.random.Generator, label: int, d: float, s: int) -> np.ndarray:
    """Symbol `label` of GLYPHS in a new hand; hard: shakier, more slanted and turned, thinner, fainter, noisier."""
    img, paper = _paper(rng, s, d)
    jitter = _mix(0.04, 0.2, d)
    angle = np.deg2rad(rng.uniform(-1, 1) * _mix(8, 40, d))
    shear = rng.uniform(-1, 1) * _mix(0.1, 0.35, d)
    scale = s * 0.5 * _mix(0.8, 0.62, d) * rng.uniform(0.92, 1.08) * np.array([rng.uniform(0.85, 1.15), 1.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    affine = rot @ np.array([[1.0, shear], [0.0, 1.0]])
    margin = 0.5 * s - scale.max() * 0.95
    centre = s / 2 + rng.uniform(-1, 1, size=2) * max(0.0, margin)
    width = max(1, int(round(SS * s * _mix(0.075, 0.05, d) * rng.uniform(0.85, 1.15))))
    canvas = Image.new("L", (s * SS, s * SS), 0)
    draw = ImageDraw.Draw(canvas)
    for stroke in GLYPHS[GLYPH_NAMES[label]]:
        pts = np.asarray(stroke, dtype=np.float64) + rng.normal(0.0, jitter, size=(len(stroke), 2))
        xy = (pts @ affine.T) * scale + centre
        draw.line([tuple(p) for p in (xy * SS).tolist()], fill=255, width=width, joint="curve")
    small = canvas.reduce(SS)
    cover = np.asarray(small, dtype=np.float32) / 255.0
    contrast = _mix(0.6, 0.22, d) * rng.uniform(0.9, 1.1)
    img = _compose(img, cover, _ink(rng, paper, contrast))
    return _finish(rng, img, _mix(0.01, 0.07, d))


# ------------------------------------------------------------------------------------------ textures

TEXTURES = ("stripes", "checks", "dots", "grid", "zigzag", "rings", "bricks", "lattice")


def _pattern(kind: str, u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Coverage in [0, 1] of texture `kind` at pattern coordinates (u, v) in periods; r = radius from a centre."""
    def band(t: np.ndarray, duty: float = 0.5) -> np.ndarray:  # soft-edged square wave of period 1, `duty` on
        return np.clip((duty / 2 - np.abs((t % 1.0) - 0.5)) * 12.0 + 0.5, 0.0, 1.0)

    if kind == "stripes":
        return band(u)
    if kind == "checks":
        return np.abs(band(u) - band(v))
    if kind == "dots":
        du, dv = (u % 1.0) - 0.5, (v % 1.0) - 0.5
        return np.clip((0.3 - np.sqrt(du**2 + dv**2)) * 8.0, 0.0, 1.0)
    if kind == "grid":
        return np.maximum(band(u, 0.22), band(v, 0.22))
    if kind == "zigzag":
        return band(u + 0.5 * np.abs((v % 1.0) - 0.5) * 2.0, 0.4)
    if kind == "rings":
        return band(r, 0.45)
    if kind == "bricks":  # mortar: every row line, and joints offset by half a brick on alternate rows
        return np.maximum(band(v, 0.2), band((u + np.floor(v)) / 2, 0.1))
    if kind == "lattice":  # two line families at 60 degrees: rhombi, never the square grid
        return np.maximum(band(u, 0.22), band(0.5 * u + 0.866 * v, 0.22))
    raise ValueError(kind)


def render_texture(rng: np.random.Generator, label: int, d: float, s: int) -> np.ndarray:
    """Texture `label` of TEXTURES; hard: larger or smaller scale, warped, lower contrast, noisier."""
    img, paper = _paper(rng, s, d)
    period = s * rng.uniform(0.16, 0.3) * (rng.uniform(0.75, 1.35) if d > 0.5 else 1.0)
    theta = rng.uniform(0, np.pi)
    yy, xx = (np.mgrid[0:s * SS, 0:s * SS].astype(np.float32) + 0.5) / SS
    warp = _mix(0.0, 0.18, d) * period
    wx, wy = rng.uniform(0.5, 1.5, size=2) * 2 * np.pi / s
    xx = xx + warp * np.sin(yy * wx + rng.uniform(0, 2 * np.pi))
    yy = yy + warp * np.sin(xx * wy + rng.uniform(0, 2 * np.pi))
    u = (xx * np.cos(theta) + yy * np.sin(theta)) / period + rng.uniform(0, 1)
    v = (-xx * np.sin(theta) + yy * np.cos(theta)) / period + rng.uniform(0, 1)
    cx, cy = rng.uniform(0.2, 0.8, size=2) * s
    r = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / period
    cover = _pattern(TEXTURES[label], u, v, r).astype(np.float32)
    cover = np.asarray(Image.fromarray(cover, mode="F").reduce(SS), dtype=np.float32)
    contrast = _mix(0.55, 0.16, d) * rng.uniform(0.9, 1.1)
    img = _compose(img, cover, _ink(rng, paper, contrast))
    return _finish(rng, img, _mix(0.01, 0.08, d))
