"""A VTAB-1k task folder written the way NOAH's data/vtab-source/get_vtab1k.py writes it.

That script loops over the splits train800, val200, test, train800val200 in this order; for each it writes
`<task>/<split>.txt` with one `images/<split>/<i:06d>.jpg <label>\\n` line per image, numbering from 000000
within the split, and saves each decoded image with `PIL.Image.fromarray(array).save(path)` (a JPEG at
PIL's default quality, chosen by the .jpg extension). train800val200 is train800 followed by val200 decoded
again and saved again: renumbered copies with the same bytes, never the train800/val200 files themselves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SPLIT_ORDER = ("train800", "val200", "test", "train800val200")


def write_get_vtab1k_task(root: Path, task: str, *, train: int = 8, val: int = 4, test: int = 4,
                          num_classes: int = 4, size: int = 16, seed: int = 0, channels: int = 3) -> Path:
    """`<root>/<task>/` in get_vtab1k.py's layout: four list files, four image folders, random images whose
    labels cycle through 0..num_classes-1 (so every class is in train800 when train >= num_classes).
    `channels=1` writes grayscale JPEGs (as some tfds decoders give)."""
    rng = np.random.default_rng(seed)
    shape = (size, size) if channels == 1 else (size, size, channels)

    def draw(n: int) -> list[tuple[np.ndarray, int]]:
        return [(rng.integers(0, 256, shape, dtype=np.uint8), i % num_classes) for i in range(n)]

    items = {"train800": draw(train), "val200": draw(val), "test": draw(test)}
    items["train800val200"] = items["train800"] + items["val200"]
    folder = root / task
    for split in SPLIT_ORDER:
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        with open(folder / f"{split}.txt", "w") as f:
            for i, (array, label) in enumerate(items[split]):
                image_path = f"images/{split}/{i:06d}.jpg"
                f.write(f"{image_path} {label}\n")
                Image.fromarray(array).save(folder / image_path)
    return folder
