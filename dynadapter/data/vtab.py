"""VTAB-1k folder import (the NOAH layout every PETL repo uses) into the Parquet store.

`<root>/<task>/{train800,val200,train800val200,test}.txt`, one `images/<split>/000123.jpg <label>` per line,
paths relative to the task folder. Every line is checked; a bad line stops the import (on_bad_line='error')
or is dropped and reported (on_bad_line='skip'), always as `file:line: reason`.
"""

from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from dynadapter.data.store import DataError, write_task

# Standard VTAB-1k class counts (canonical names as in the NOAH / VPT folder releases).
VTAB_NUM_CLASSES: dict[str, int] = {
    "cifar": 100,
    "caltech101": 102,
    "dtd": 47,
    "oxford_flowers102": 102,
    "oxford_iiit_pet": 37,
    "svhn": 10,
    "sun397": 397,
    "patch_camelyon": 2,
    "eurosat": 10,
    "resisc45": 45,
    "diabetic_retinopathy": 5,
    "clevr_count": 8,
    "clevr_dist": 6,
    "dmlab": 6,
    "kitti": 4,
    "dsprites_loc": 16,
    "dsprites_ori": 16,
    "smallnorb_azi": 18,
    "smallnorb_ele": 9,
}

# Other folder spellings seen in the wild -> canonical name.
VTAB_ALIASES: dict[str, str] = {
    "cifar100": "cifar",
    "cifar-100": "cifar",
    "oxford_pet": "oxford_iiit_pet",
    "oxford_pets": "oxford_iiit_pet",
    "pets": "oxford_iiit_pet",
    "oxford_flowers": "oxford_flowers102",
    "flowers102": "oxford_flowers102",
    "pcam": "patch_camelyon",
    "retinopathy": "diabetic_retinopathy",
    "kitti_dist": "kitti",
    "dsprites_location": "dsprites_loc",
    "dsprites_orientation": "dsprites_ori",
    "smallnorb_azimuth": "smallnorb_azi",
    "smallnorb_elevation": "smallnorb_ele",
}

LIST_FILES = {"train": "train800.txt", "val": "val200.txt", "test": "test.txt"}
UNION_FILE = "train800val200.txt"  # = train800 ∪ val200; only checked, never stored twice
PASSTHROUGH_FORMATS = ("JPEG", "PNG")  # RGB files in these formats are stored as-is (no re-encode)
_INT = re.compile(r"^[+-]?\d+$")

OnBadLine = Literal["error", "skip"]


@dataclass(frozen=True)
class BadLine:
    """One rejected list line."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class VtabTask:
    """A VTAB-1k task read into memory (valid lines only), ready for `write_task`."""

    name: str
    folder: Path
    images: list[bytes]
    labels: np.ndarray
    splits: list[str]
    paths: list[str]
    num_classes: int
    skipped: list[BadLine] = field(default_factory=list)
    warnings: list[BadLine] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {s: self.splits.count(s) for s in LIST_FILES}


@dataclass
class ImportReport:
    """What an import wrote and what it dropped."""

    task: str
    folder: str
    num_classes: int
    counts: dict[str, int]
    skipped: list[BadLine]
    warnings: list[BadLine]

    def as_dict(self) -> dict:
        return {
            "folder": self.folder,
            "num_classes": self.num_classes,
            "counts": self.counts,
            "skipped": len(self.skipped),
            "skipped_lines": [str(b) for b in self.skipped],
            "warnings": [str(w) for w in self.warnings],
        }


def canonical_task_name(name: str) -> str:
    """VTAB canonical name for a task or folder spelling ('cifar100' -> 'cifar'); unknown names pass through."""
    return VTAB_ALIASES.get(name, name)


def find_task_folder(root: str | Path, task: str) -> Path:
    """The folder of `task` under root, trying every known spelling of it."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: VTAB-1k root folder not found (prepare.vtab_root)")
    canonical = canonical_task_name(task)
    candidates = [task, canonical] + [alias for alias, c in VTAB_ALIASES.items() if c == canonical]
    for name in dict.fromkeys(candidates):
        if (root / name).is_dir():
            return root / name
    raise DataError(f"{root}: no folder for task {task!r} (tried {', '.join(dict.fromkeys(candidates))})")


# --------------------------------------------------------------------------------------------- images


def to_rgb(im: Image.Image) -> Image.Image:
    """Any common mode -> RGB. 16-bit images are scaled to 8 bits; alpha is dropped; float images rejected."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im).astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(f"mode {mode} values outside the 16-bit range")
        # 'I;16' is 16-bit by definition; plain 'I' is treated as 16-bit only if it uses more than 8 bits
        if mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = (arr * 255 + 32767) // 65535
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        raise ValueError("floating-point (mode F) images are not supported")
    return im.convert("RGB")  # 1, L, LA, P, PA, RGBA, RGBX, CMYK, YCbCr; raises for unsupported modes


def load_image(path: Path) -> bytes:
    """Verified image bytes to store: RGB JPEG/PNG as-is, anything else converted to RGB and re-encoded as PNG."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        im.verify()  # structural check; the image must be reopened after verify
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # full decode: catches truncated / corrupt pixel data
        if im.mode == "RGB" and im.format in PASSTHROUGH_FORMATS:
            return data
        rgb = to_rgb(im)
        buf = io.BytesIO()
        rgb.save(buf, format="PNG", compress_level=6)
        return buf.getvalue()


def _check_image(path: Path) -> tuple[bytes | None, str | None]:
    if not path.is_file():
        return None, f"image not found: {path}"
    try:
        return load_image(path), None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return None, f"unreadable or unconvertible image {path.name} ({type(err).__name__}: {err})"


# ------------------------------------------------------------------------------------------ list files


@dataclass
class _Entry:
    split: str
    file: str
    line: int
    path: str
    label: int


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, text) for non-blank lines; CRLF and a UTF-8 BOM are accepted."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not a UTF-8 text file ({err})") from None
    return [(i, ln.strip()) for i, ln in enumerate(text.splitlines(), start=1) if ln.strip()]


def _parse_line(text: str) -> tuple[str, int] | str:
    """(path, label) or the reason the line is bad."""
    fields = text.split()
    if len(fields) != 2:
        return f"expected '<image path> <label>' (2 fields), got {len(fields)}: {text!r}"
    rel, label_text = fields
    if not _INT.match(label_text):
        return f"label {label_text!r} is not an integer"
    label = int(label_text)
    if label < 0:
        return f"negative label {label}"
    p = PurePosixPath(rel.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts:
        return f"image path {rel!r} leaves the task folder"
    return p.as_posix(), label


class _Collector:
    """Applies the on_bad_line policy: raise at once, or record and go on."""

    def __init__(self, on_bad_line: OnBadLine) -> None:
        if on_bad_line not in ("error", "skip"):
            raise ValueError(f"on_bad_line must be 'error' or 'skip', got {on_bad_line!r}")
        self.on_bad_line = on_bad_line
        self.bad: list[BadLine] = []

    def __call__(self, file: str, line: int, reason: str) -> None:
        bad = BadLine(file, line, reason)
        if self.on_bad_line == "error":
            raise DataError(f"{bad} (set prepare.on_bad_line=skip to drop bad lines)")
        self.bad.append(bad)


def read_vtab_task(
    root: str | Path,
    task: str,
    on_bad_line: OnBadLine = "error",
    progress: bool = True,
    workers: int = 8,
) -> VtabTask:
    """Read and check one VTAB-1k task folder. Raises DataError at the first bad line unless on_bad_line='skip'."""
    folder = find_task_folder(root, task)
    name = canonical_task_name(task)
    known_classes = VTAB_NUM_CLASSES.get(name)
    bad = _Collector(on_bad_line)

    entries: list[_Entry] = []
    seen: dict[str, tuple[str, int]] = {}
    for split, fname in LIST_FILES.items():
        list_path = folder / fname
        if not list_path.is_file():
            raise DataError(f"{list_path}: list file not found")
        lines = _read_lines(list_path)
        if not lines:
            raise DataError(f"{list_path}:1: empty list file (no '<image path> <label>' lines)")
        for lineno, text in lines:
            parsed = _parse_line(text)
            if isinstance(parsed, str):
                bad(str(list_path), lineno, parsed)
                continue
            rel, label = parsed
            if rel in seen:
                first_file, first_line = seen[rel]
                where = f"line {first_line}" if first_file == str(list_path) else f"{first_file}:{first_line}"
                bad(str(list_path), lineno, f"duplicate path {rel} (first listed at {where})")
                continue
            if known_classes is not None and label >= known_classes:
                bad(str(list_path), lineno, f"label {label} beyond the {known_classes} classes of {name}")
                continue
            seen[rel] = (str(list_path), lineno)
            entries.append(_Entry(split, str(list_path), lineno, rel, label))

    # Decoding dominates; PIL releases the GIL, so threads overlap it. Results stay in list order.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = pool.map(lambda e: _check_image(folder / e.path), entries)
        checked = list(tqdm(results, total=len(entries), desc=f"import {name}", unit="img",
                            disable=not progress, leave=False))
    kept: list[tuple[_Entry, bytes]] = []
    for entry, (data, reason) in zip(entries, checked):
        if reason is not None:
            bad(entry.file, entry.line, reason)
        else:
            kept.append((entry, data))

    for split, fname in LIST_FILES.items():
        if not any(e.split == split for e, _ in kept):
            raise DataError(f"{folder / fname}: no valid lines left after skipping {len(bad.bad)} bad line(s)")
    num_classes = known_classes if known_classes is not None else max(e.label for e, _ in kept) + 1
    warnings = _check_union(folder, entries, on_bad_line)
    return VtabTask(
        name=name,
        folder=folder,
        images=[d for _, d in kept],
        labels=np.array([e.label for e, _ in kept], dtype=np.int64),
        splits=[e.split for e, _ in kept],
        paths=[e.path for e, _ in kept],
        num_classes=num_classes,
        skipped=bad.bad,
        warnings=warnings,
    )


def _check_union(folder: Path, entries: Sequence[_Entry], on_bad_line: OnBadLine) -> list[BadLine]:
    """train800val200.txt, when present, must list exactly train800 ∪ val200 (same paths and labels)."""
    path = folder / UNION_FILE
    if not path.is_file():
        return []
    issues = _Collector(on_bad_line)
    expected = {(e.path, e.label): e for e in entries if e.split in ("train", "val")}
    listed: set[tuple[str, int]] = set()
    for lineno, text in _read_lines(path):
        parsed = _parse_line(text)
        if isinstance(parsed, str):
            issues(str(path), lineno, parsed)
        elif parsed not in expected:
            issues(str(path), lineno, f"{parsed[0]} {parsed[1]} is not in {LIST_FILES['train']} or {LIST_FILES['val']}")
        else:
            listed.add(parsed)
    for key, e in expected.items():
        if key not in listed:
            issues(e.file, e.line, f"{e.path} {e.label} is missing from {UNION_FILE}")
    return issues.bad


def import_vtab(
    root: str | Path,
    tasks: Sequence[str],
    out_root: str | Path,
    on_bad_line: OnBadLine = "error",
    progress: bool = True,
) -> list[ImportReport]:
    """Import each task into `<out_root>/<canonical name>/` (Parquet + manifest); one report per task."""
    reports = []
    for task in tasks:
        t = read_vtab_task(root, task, on_bad_line, progress)
        write_task(
            out_root,
            t.name,
            t.images,
            t.labels,
            t.splits,
            t.num_classes,
            source="vtab",
            paths=t.paths,
            extra={"vtab_folder": str(t.folder), "skipped": [str(b) for b in t.skipped]},
        )
        reports.append(ImportReport(t.name, str(t.folder), t.num_classes, t.counts(), t.skipped, t.warnings))
    return reports
