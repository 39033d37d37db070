"""Parquet store for prepared datasets: one folder per task with `data.parquet` + `manifest.json`.

Writes are atomic (temp folder beside the target, then rename); reads validate manifest, schema, checksum and
labels so a stale or hand-edited dataset fails loudly instead of training on garbage.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dynadapter.data.vtab_tasks import canonical_task_name  # 'cifar100' is stored as 'cifar'

FORMAT_VERSION = 1
DATA_FILE = "data.parquet"
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "val", "test")

# Required columns, in order, with exact types.
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("split", pa.string())])
# Optional columns a writer may add; readers never need them.
OPTIONAL_COLUMNS = {"difficulty": pa.float32(), "path": pa.string()}

# VTAB list-file names and the union split map onto the stored splits; the union is never stored twice.
SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "train800": ("train",),
    "val": ("val",),
    "val200": ("val",),
    "test": ("test",),
    "trainval": ("train", "val"),
    "train800val200": ("train", "val"),
}

_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class DataError(ValueError):
    """Bad input data or a damaged prepared dataset; the message names the file (and line) at fault."""


def resolve_split(name: str) -> tuple[str, ...]:
    """Stored splits behind a split name: 'train800'/'train', 'val200'/'val', 'test', 'trainval' = train ∪ val."""
    try:
        return SPLIT_ALIASES[name]
    except KeyError:
        raise DataError(f"unknown split {name!r}; expected one of {sorted(SPLIT_ALIASES)}") from None


def split_union(*names: str) -> tuple[str, ...]:
    """Union of split names in stored order, e.g. split_union('train', 'val') == ('train', 'val')."""
    wanted = {s for n in names for s in resolve_split(n)}
    return tuple(s for s in SPLITS if s in wanted)


def _check_task_name(task: str) -> None:
    if not isinstance(task, str) or not _TASK_NAME.match(task):
        raise DataError(f"invalid task name {task!r}: use letters, digits, '_', '-', '.' (not starting with '.')")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def image_size_of(images: Sequence[bytes]) -> int | list[int] | None:
    """Common size from image headers: side if all square and equal, [w, h] if equal but not square, else None."""
    from PIL import Image

    sizes = set()
    for data in images:
        with Image.open(io.BytesIO(data)) as im:  # header only, no decode
            sizes.add(im.size)
        if len(sizes) > 1:
            return None
    if len(sizes) != 1:
        return None
    w, h = sizes.pop()
    return w if w == h else [w, h]


@dataclass
class TaskData:
    """A stored task (or a split selection of it), held in memory as encoded image bytes."""

    task: str
    num_classes: int
    images: list[bytes]
    labels: np.ndarray  # int64 [N]
    splits: np.ndarray  # str [N]
    manifest: dict[str, Any]
    difficulty: np.ndarray | None = None  # float32 [N] when the writer recorded it
    paths: list[str] | None = None
    class_names: list[str] | None = field(default=None)

    def __len__(self) -> int:
        return len(self.images)

    def select(self, split: str) -> TaskData:
        """Rows of a split name ('train', 'val', 'test', 'trainval', or the VTAB list names)."""
        mask = np.isin(self.splits, list(resolve_split(split)))
        idx = np.flatnonzero(mask)
        return TaskData(
            task=self.task,
            num_classes=self.num_classes,
            images=[self.images[i] for i in idx],
            labels=self.labels[idx],
            splits=self.splits[idx],
            manifest=self.manifest,
            difficulty=None if self.difficulty is None else self.difficulty[idx],
            paths=None if self.paths is None else [self.paths[i] for i in idx],
            class_names=self.class_names,
        )


def _build_table(
    images: Sequence[bytes],
    labels: Sequence[int] | np.ndarray,
    splits: Sequence[str] | np.ndarray,
    num_classes: int,
    difficulty: Sequence[float] | np.ndarray | None,
    paths: Sequence[str] | None,
) -> pa.Table:
    n = len(images)
    labels = np.asarray(labels, dtype=np.int64)
    splits = [str(s) for s in splits]
    if labels.shape != (n,) or len(splits) != n:
        raise DataError(f"images ({n}), labels ({labels.size}) and splits ({len(splits)}) differ in length")
    if n == 0:
        raise DataError("no images to write")
    if num_classes < 1:
        raise DataError(f"num_classes must be >= 1, got {num_classes}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(f"label {labels[bad[0]]} at row {bad[0]} outside [0, {num_classes})")
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise DataError(f"unknown split value(s) {unknown}; stored splits are {list(SPLITS)}")
    columns = {
        "image": pa.array(list(images), type=pa.binary()),
        "label": pa.array(labels, type=pa.int64()),
        "split": pa.array(splits, type=pa.string()),
    }
    fields = list(SCHEMA)
    if difficulty is not None:
        d = np.asarray(difficulty, dtype=np.float32)
        if d.shape != (n,):
            raise DataError(f"difficulty has {d.size} values for {n} images")
        columns["difficulty"] = pa.array(d, type=pa.float32())
        fields.append(pa.field("difficulty", OPTIONAL_COLUMNS["difficulty"]))
    if paths is not None:
        if len(paths) != n:
            raise DataError(f"paths has {len(paths)} values for {n} images")
        columns["path"] = pa.array([str(p) for p in paths], type=pa.string())
        fields.append(pa.field("path", OPTIONAL_COLUMNS["path"]))
    return pa.table(columns, schema=pa.schema(fields))


def write_task(
    root: str | Path,
    task: str,
    images: Sequence[bytes],
    labels: Sequence[int] | np.ndarray,
    splits: Sequence[str] | np.ndarray,
    num_classes: int,
    source: str,
    *,
    class_names: Sequence[str] | None = None,
    difficulty: Sequence[float] | np.ndarray | None = None,
    paths: Sequence[str] | None = None,
    image_size: int | list[int] | None | str = "auto",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `<root>/<task>/{data.parquet,manifest.json}` atomically; returns the task folder.

    Everything is written into a temp folder beside the target and renamed into place, so a failure leaves
    either the previous version or nothing, never a half-written dataset. `image_size='auto'` reads it from
    the image headers. `extra` goes into the manifest verbatim (JSON-serialisable).
    """
    _check_task_name(task)
    root = Path(root)
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if len(class_names) != num_classes:
            raise DataError(f"{task}: {len(class_names)} class names for {num_classes} classes")
    table = _build_table(images, labels, splits, num_classes, difficulty, paths)
    if image_size == "auto":
        image_size = image_size_of(images)
    split_col = np.asarray(table.column("split").to_numpy(zero_copy_only=False))
    counts = {s: int((split_col == s).sum()) for s in SPLITS}

    root.mkdir(parents=True, exist_ok=True)
    target = root / task
    tmp = Path(tempfile.mkdtemp(prefix=f".{task}.tmp-", dir=root))
    try:
        data_path = tmp / DATA_FILE
        # Fixed writer settings: the same rows give a byte-identical file (checksums, DVC hashes).
        pq.write_table(table, data_path, compression="zstd", compression_level=3, row_group_size=4096)
        manifest = {
            "format_version": FORMAT_VERSION,
            "task": task,
            "num_classes": int(num_classes),
            "counts": counts,
            "source": source,
            "checksum": "sha256:" + file_sha256(data_path),
            "image_size": image_size,
            "class_names": class_names,
            "columns": table.schema.names,
        }
        if extra:
            manifest["extra"] = extra
        with open(tmp / MANIFEST_FILE, "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def swap_into_place(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`; an existing target is moved aside first and removed only after success."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()  # only the unique name is needed; rename needs the destination absent
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)  # put the previous version back
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(root: str | Path, task: str) -> dict[str, Any]:
    path = Path(root) / task / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"{path}: manifest not found (is '{task}' a prepared task under {root}?)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable manifest: {err}") from None
    for key in ("task", "num_classes", "counts", "source", "checksum"):
        if key not in manifest:
            raise DataError(f"{path}: manifest lacks '{key}'")
    if manifest["task"] != task:
        raise DataError(f"{path}: manifest is for task {manifest['task']!r}, not {task!r}")
    return manifest


def check_schema(schema: pa.Schema, path: str | Path) -> None:
    """Exact required columns (name, type, order) plus only known optional columns."""
    names = schema.names
    for i, want in enumerate(SCHEMA):
        if i >= len(names) or names[i] != want.name:
            got = names[i] if i < len(names) else "<missing>"
            raise DataError(f"{path}: schema mismatch: column {i} should be '{want.name}' ({want.type}), got '{got}'")
        if not schema.field(i).type.equals(want.type):
            raise DataError(
                f"{path}: schema mismatch: field '{want.name}' should be {want.type}, got {schema.field(i).type}"
            )
    for f in list(schema)[len(SCHEMA):]:
        if f.name not in OPTIONAL_COLUMNS:
            raise DataError(f"{path}: schema mismatch: unexpected field '{f.name}' ({f.type})")
        if not f.type.equals(OPTIONAL_COLUMNS[f.name]):
            raise DataError(
                f"{path}: schema mismatch: field '{f.name}' should be {OPTIONAL_COLUMNS[f.name]}, got {f.type}"
            )


def read_task(root: str | Path, task: str, split: str | None = None, verify: bool = True) -> TaskData:
    """Load a stored task (optionally one split name, e.g. 'trainval'), validating it first.

    Checks: manifest present and for this task, checksum of data.parquet, exact schema, split values, labels in
    [0, num_classes), counts equal to the manifest's. `verify=False` skips only the checksum.
    """
    _check_task_name(task)
    if not (Path(root) / task).is_dir():
        task = canonical_task_name(task)
    manifest = read_manifest(root, task)
    path = Path(root) / task / DATA_FILE
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    if verify:
        digest = "sha256:" + file_sha256(path)
        if digest != manifest["checksum"]:
            raise DataError(
                f"{path}: checksum mismatch (manifest {manifest['checksum']}, file {digest}); "
                "the file changed after it was written — re-run the prepare stage"
            )
    try:
        schema = pq.read_schema(path)
        check_schema(schema, path)
        # everything but the encoded images first (small): the checks below need every row's label and split
        table = pq.read_table(path, columns=[n for n in schema.names if n != "image"])
    except DataError:
        raise
    except Exception as err:  # truncated / not parquet
        raise DataError(f"{path}: unreadable parquet file: {err}") from None

    num_classes = int(manifest["num_classes"])
    labels = table.column("label").to_numpy().astype(np.int64, copy=False)
    splits = np.asarray(table.column("split").to_numpy(zero_copy_only=False)).astype(str)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(f"{path}: row {bad[0]}: label {labels[bad[0]]} outside [0, {num_classes})")
    unknown = sorted(set(splits.tolist()) - set(SPLITS))
    if unknown:
        raise DataError(f"{path}: unknown split value(s) {unknown}; expected {list(SPLITS)}")
    counts = {s: int((splits == s).sum()) for s in SPLITS}
    want = {s: int(manifest["counts"].get(s, 0)) for s in SPLITS}
    if counts != want:
        raise DataError(f"{path}: split counts {counts} differ from the manifest's {want}")

    if split is not None:  # only the wanted rows' images are read (a VTAB-1k test split dwarfs train + val)
        wanted = list(resolve_split(split))
        try:
            table = pq.read_table(path, filters=[("split", "in", wanted)])
        except Exception as err:
            raise DataError(f"{path}: unreadable parquet file: {err}") from None
        labels = table.column("label").to_numpy().astype(np.int64, copy=True)  # writable, as a selection was
        splits = np.asarray(table.column("split").to_numpy(zero_copy_only=False)).astype(str)
    else:
        try:
            table = pq.read_table(path)
        except Exception as err:
            raise DataError(f"{path}: unreadable parquet file: {err}") from None
    names = table.schema.names
    data = TaskData(
        task=task,
        num_classes=num_classes,
        images=table.column("image").to_pylist(),
        labels=labels,
        splits=splits,
        manifest=manifest,
        difficulty=table.column("difficulty").to_numpy().astype(np.float32) if "difficulty" in names else None,
        paths=table.column("path").to_pylist() if "path" in names else None,
        class_names=manifest.get("class_names"),
    )
    return data


def list_tasks(root: str | Path) -> list[str]:
    """Prepared tasks under `root` (folders with a manifest), sorted; temp folders are ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_FILE).is_file()
    )
