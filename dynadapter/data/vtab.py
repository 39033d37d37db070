"""VTAB-1k folder import (the NOAH layout every PETL repo uses) into the Parquet store.

`<root>/<task>/{train800,val200,train800val200,test}.txt`, one `images/<split>/000123.jpg <label>` per line,
paths relative to the task folder. Every line of train800, val200 and test is checked; a bad line stops the
import (on_bad_line='error') or is dropped and reported (on_bad_line='skip'), always as `file:line: reason`.
train800val200 is only compared with train800 ∪ val200 (by path, or by image content for the renumbered
copies NOAH's get_vtab1k.py writes); a disagreement there is a warning, never a stop.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from dynadapter.data.store import DataError, write_task
from dynadapter.data.vtab_tasks import (  # noqa: F401 - re-exported: the names lived here first
    VTAB_ALIASES,
    VTAB_NUM_CLASSES,
    canonical_task_name,
    task_spellings,
)

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
    union: dict[str, Any] = field(default_factory=dict)  # how train800val200.txt matched (UnionCheck.summary)

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
    union: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "folder": self.folder,
            "num_classes": self.num_classes,
            "counts": self.counts,
            "skipped": len(self.skipped),
            "skipped_lines": [str(b) for b in self.skipped],
            "warnings": [str(w) for w in self.warnings],
            "train800val200": self.union,
        }


def find_task_folder(root: str | Path, task: str) -> Path:
    """The folder of `task` under root, trying every known spelling of it."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: VTAB-1k root folder not found (prepare.vtab_root)")
    candidates = task_spellings(task)
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    raise DataError(f"{root}: no folder for task {task!r} (tried {', '.join(candidates)})")


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


def load_image(path: Path) -> tuple[bytes, str]:
    """(bytes to store, sha256 of the file): RGB JPEG/PNG as-is, anything else converted to RGB and re-encoded
    as PNG. The file's digest is what the train800val200 check matches copies by."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        im.verify()  # structural check; the image must be reopened after verify
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # full decode: catches truncated / corrupt pixel data
        if im.mode == "RGB" and im.format in PASSTHROUGH_FORMATS:
            return data, hashlib.sha256(data).hexdigest()
        rgb = to_rgb(im)
        buf = io.BytesIO()
        rgb.save(buf, format="PNG", compress_level=6)
        return buf.getvalue(), hashlib.sha256(data).hexdigest()


def pixel_digest(data: bytes) -> str:
    """Digest of the decoded RGB pixels and size: equal for the same picture stored in other bytes (metadata,
    another lossless format)."""
    with Image.open(io.BytesIO(data)) as im:
        rgb = to_rgb(im)
        return hashlib.sha256(repr(rgb.size).encode() + rgb.tobytes()).hexdigest()


_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _check_image(path: Path) -> tuple[bytes | None, str | None, str | None]:
    """(stored bytes, file digest, None) or (None, None, reason)."""
    if not path.is_file():
        return None, None, f"image not found: {path}"
    try:
        return (*load_image(path), None)
    except _IMAGE_ERRORS as err:
        return None, None, f"unreadable or unconvertible image {path.name} ({type(err).__name__}: {err})"


# ------------------------------------------------------------------------------------------ list files


@dataclass
class _Entry:
    split: str
    file: str
    line: int
    path: str
    label: int


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, text) for non-blank lines; CRLF, CR, a UTF-8 BOM and blank lines are accepted."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not a UTF-8 text file ({err})") from None
    return [(i, ln.strip()) for i, ln in enumerate(text.splitlines(), start=1) if ln.strip()]


def _parse_line(text: str) -> tuple[str, int] | str:
    """(path, label) or the reason the line is bad. The label is the last field; a path may hold spaces
    (`images/my cat.jpg 3`), and runs of spaces or tabs between fields are one separator."""
    fields = text.split()
    if len(fields) < 2:
        return f"expected '<image path> <label>' (2 fields), got {len(fields)}: {text!r}"
    label_text = fields[-1]
    if not _INT.match(label_text):
        if len(fields) > 2:
            return f"expected '<image path> <label>' (2 fields), got {len(fields)}: {text!r}"
        return f"label {label_text!r} is not an integer"
    rel = text.rsplit(None, 1)[0].strip()
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


def class_count_override(num_classes: Mapping[str, int] | None, task: str) -> int | None:
    """prepare.num_classes for `task`, found under any of its spellings; None when not given."""
    for name in task_spellings(task):
        if num_classes and name in num_classes:
            return int(num_classes[name])
    return None


def _label_rule(name: str, entries: Sequence[_Entry], override: int | None) -> tuple[int, Callable[[int], str]]:
    """(class count K, reason for a label >= K). Known VTAB task: K from the standard table; another task: the
    labels must be 0..K-1 with every class in train800, so K is the first class id train800 lacks. A count
    in prepare.num_classes wins over both."""
    if override is not None:
        return override, lambda label: f"label {label} beyond prepare.num_classes[{name}] = {override}"
    if name in VTAB_NUM_CLASSES:
        k = VTAB_NUM_CLASSES[name]
        return k, lambda label: f"label {label} beyond the {k} classes of {name}"
    train_labels = {e.label for e in entries if e.split == "train"}
    k = 0
    while k in train_labels:
        k += 1
    train_file = LIST_FILES["train"]

    ids = f"0..{k - 1}" if k else "(none)"

    def reason(label: int) -> str:
        return (f"label {label} breaks the class ids {ids} of task {name} (unknown to VTAB, so its classes are "
                f"0..K-1, each with an image in {train_file}; {train_file} has no class {k}); set "
                f"prepare.num_classes.{name} if the count is right")

    return k, reason


def read_vtab_task(
    root: str | Path,
    task: str,
    on_bad_line: OnBadLine = "error",
    progress: bool = True,
    workers: int = 8,
    num_classes: Mapping[str, int] | None = None,
) -> VtabTask:
    """Read and check one VTAB-1k task folder. Raises DataError at the first bad line unless on_bad_line='skip'.

    `num_classes` maps task names (any spelling) to class counts that override the inferred one."""
    folder = find_task_folder(root, task)
    name = canonical_task_name(task)
    bad = _Collector(on_bad_line)

    parsed: list[_Entry] = []
    seen: dict[str, tuple[str, int]] = {}
    for split, fname in LIST_FILES.items():
        list_path = folder / fname
        if not list_path.is_file():
            raise DataError(f"{list_path}: list file not found")
        lines = _read_lines(list_path)
        if not lines:
            raise DataError(f"{list_path}:1: empty list file (no '<image path> <label>' lines)")
        for lineno, text in lines:
            result = _parse_line(text)
            if isinstance(result, str):
                bad(str(list_path), lineno, result)
                continue
            rel, label = result
            if rel in seen:
                first_file, first_line = seen[rel]
                where = f"line {first_line}" if first_file == str(list_path) else f"{first_file}:{first_line}"
                bad(str(list_path), lineno, f"duplicate path {rel} (first listed at {where})")
                continue
            seen[rel] = (str(list_path), lineno)
            parsed.append(_Entry(split, str(list_path), lineno, rel, label))

    k, beyond = _label_rule(name, parsed, class_count_override(num_classes, task))
    entries: list[_Entry] = []
    for e in parsed:
        if e.label >= k:
            bad(e.file, e.line, beyond(e.label))
        else:
            entries.append(e)

    # Decoding dominates; PIL releases the GIL, so threads overlap it. Results stay in list order.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = pool.map(lambda e: _check_image(folder / e.path), entries)
        checked = list(tqdm(results, total=len(entries), desc=f"import {name}", unit="img",
                            disable=not progress, leave=False))
    kept: list[tuple[_Entry, bytes, str]] = []
    for entry, (data, digest, reason) in zip(entries, checked):
        if reason is not None:
            bad(entry.file, entry.line, reason)
        else:
            kept.append((entry, data, digest))

    for split, fname in LIST_FILES.items():
        if not any(e.split == split for e, _, _ in kept):
            raise DataError(f"{folder / fname}: no valid lines left after skipping {len(bad.bad)} bad line(s)")
    union = check_union(folder, [(e, d, h) for e, d, h in kept if e.split in ("train", "val")])
    return VtabTask(
        name=name,
        folder=folder,
        images=[d for _, d, _ in kept],
        labels=np.array([e.label for e, _, _ in kept], dtype=np.int64),
        splits=[e.split for e, _, _ in kept],
        paths=[e.path for e, _, _ in kept],
        num_classes=k,
        skipped=bad.bad,
        warnings=union.warnings,
        union=union.summary(),
    )


# ------------------------------------------------------------------------------------ train800val200


@dataclass
class UnionCheck:
    """How train800val200.txt compares with train800 ∪ val200: per-line warnings and how lines were matched."""

    warnings: list[BadLine] = field(default_factory=list)
    lines: int = 0
    by_path: int = 0  # names a train800/val200 file with its label (the layout that reuses the files)
    by_bytes: int = 0  # a copy with the same file bytes and label (NOAH's get_vtab1k.py layout)
    by_pixels: int = 0  # a copy with the same decoded pixels and label
    unmatched: int = 0  # no same-content image: checked by count and label multiset only
    present: bool = True

    def summary(self) -> dict[str, Any]:
        if not self.present:
            return {"present": False}
        return {"present": True, "lines": self.lines, "matched_by_path": self.by_path,
                "matched_by_bytes": self.by_bytes, "matched_by_pixels": self.by_pixels,
                "unmatched": self.unmatched, "warnings": len(self.warnings)}


def check_union(folder: Path, trainval: Sequence[tuple[_Entry, bytes, str]]) -> UnionCheck:
    """Compare train800val200.txt (when present) with the kept train800 + val200 lines; never raises.

    NOAH's get_vtab1k.py writes the union as renumbered copies (`images/train800val200/000000.jpg`), so a line
    is matched by its path when it names a train800/val200 file, else by the content of the image it names
    (file bytes, then decoded pixels) and its label. Each image matches at most one line. A real
    disagreement is a warning naming file:line: an image whose label differs from the same image's in
    train800/val200, a line whose image is missing or unreadable, a line whose content matches nothing (when
    other lines did match, so matching works for this folder), another line count; and when no line matched
    by content (copies re-encoded), labels whose counts differ. The union is never stored:
    the stored train and val splits are the two list files themselves."""
    path = folder / UNION_FILE
    if not path.is_file():
        return UnionCheck(present=False)
    out = UnionCheck()
    file = str(path)

    def warn(line: int, reason: str) -> None:
        out.warnings.append(BadLine(file, line, reason))

    lines = _read_lines(path)
    out.lines = len(lines)
    listed: list[tuple[int, tuple[str, int]]] = []
    for lineno, text in lines:
        parsed = _parse_line(text)
        if isinstance(parsed, str):
            warn(lineno, parsed)
        else:
            listed.append((lineno, parsed))
    free: dict[int, tuple[_Entry, bytes, str]] = dict(enumerate(trainval))
    index_of_path = {e.path: i for i, (e, _, _) in enumerate(trainval)}

    pending: list[tuple[int, str, int]] = []
    for lineno, (rel, label) in listed:
        i = index_of_path.get(rel)
        if i is None:
            pending.append((lineno, rel, label))
        elif (e := trainval[i][0]).label != label:
            warn(lineno, f"{rel} labelled {label} here but {e.label} at {e.file}:{e.line}")
            free.pop(i, None)
        elif free.pop(i, None) is not None:
            out.by_path += 1
        else:
            warn(lineno, f"{rel} listed twice")

    unmatched = _match_copies(folder, pending, free, out, warn)
    out.unmatched = len(unmatched)
    listed_count = _listed_count(folder)
    if len(listed) != listed_count:
        warn(lines[-1][0] if lines else 1, f"lists {len(listed)} images; {LIST_FILES['train']} + "
                                           f"{LIST_FILES['val']} list {listed_count}")
    if not unmatched:
        return out
    if out.by_path or out.by_bytes or out.by_pixels:  # content matching works here: a miss is a real one
        for lineno, rel, label in unmatched:
            warn(lineno, f"{rel} {label}: no image with this content and label in "
                         f"{LIST_FILES['train']} or {LIST_FILES['val']}")
        return out
    # Nothing matched by content (copies re-encoded?): what is left can only be compared by its labels.
    have = Counter(label for _, _, label in unmatched)
    want = Counter(e.label for e, _, _ in free.values())
    if have != want:
        first = next((lineno for lineno, _, label in unmatched if have[label] > want[label]), unmatched[-1][0])
        diff = [(c, have[c], want[c]) for c in sorted(set(have) | set(want)) if have[c] != want[c]]
        shown = ", ".join(f"class {c}: {h} here, {w} there" for c, h, w in diff[:5])
        warn(first, f"label counts differ from {LIST_FILES['train']} + {LIST_FILES['val']} ({shown}"
                    f"{', ...' if len(diff) > 5 else ''}); no line matched an image by content")
    return out


def _listed_count(folder: Path) -> int:
    """Non-blank lines of train800.txt + val200.txt as written (dropped bad lines included)."""
    return sum(len(_read_lines(folder / LIST_FILES[s])) for s in ("train", "val"))


def _match_copies(folder: Path, pending: list[tuple[int, str, int]], free: dict[int, tuple[_Entry, bytes, str]],
                  out: UnionCheck, warn: Callable[[int, str], None]) -> list[tuple[int, str, int]]:
    """Match union lines naming copies to free train800/val200 images by file bytes, then by decoded pixels;
    the lines left unmatched."""
    if not pending:
        return []
    by_digest: dict[str, list[int]] = defaultdict(list)
    for i, (_, _, digest) in free.items():
        by_digest[digest].append(i)
    raw: dict[int, bytes] = {}
    left = []
    for lineno, rel, label in pending:
        target = folder / rel
        try:
            data = target.read_bytes()
        except OSError:
            warn(lineno, f"image not found: {target}")
            continue
        i = _take(by_digest.get(hashlib.sha256(data).hexdigest(), []), free, label)
        if isinstance(i, int):
            out.by_bytes += 1
            continue
        if i is not None:  # same bytes, other label
            warn(lineno, f"{rel} labelled {label} here but {i.label} at {i.file}:{i.line} (same image)")
            continue
        raw[lineno] = data
        left.append((lineno, rel, label))
    if not left or not free:
        return left

    by_pixels: dict[str, list[int]] = defaultdict(list)
    for i, (_, data, _) in free.items():
        by_pixels[pixel_digest(data)].append(i)
    unmatched = []
    for lineno, rel, label in left:
        try:
            digest = pixel_digest(raw[lineno])
        except _IMAGE_ERRORS as err:
            warn(lineno, f"unreadable image {rel} ({type(err).__name__}: {err})")
            continue
        i = _take(by_pixels.get(digest, []), free, label)
        if isinstance(i, int):
            out.by_pixels += 1
        elif i is not None:
            warn(lineno, f"{rel} labelled {label} here but {i.label} at {i.file}:{i.line} (same pixels)")
        else:
            unmatched.append((lineno, rel, label))
    return unmatched


def _take(candidates: list[int], free: dict[int, tuple[_Entry, bytes, str]], label: int) -> int | _Entry | None:
    """Claim a free candidate with `label` (its index); else the entry of a free candidate with another label;
    else None."""
    other = None
    for i in candidates:
        if i not in free:
            continue
        if free[i][0].label == label:
            free.pop(i)
            return i
        other = other or free[i][0]
    return other


def import_vtab(
    root: str | Path,
    tasks: Sequence[str],
    out_root: str | Path,
    on_bad_line: OnBadLine = "error",
    progress: bool = True,
    num_classes: Mapping[str, int] | None = None,
) -> list[ImportReport]:
    """Import each task into `<out_root>/<canonical name>/` (Parquet + manifest); one report per task."""
    reports = []
    for task in tasks:
        t = read_vtab_task(root, task, on_bad_line, progress, num_classes=num_classes)
        write_task(
            out_root,
            t.name,
            t.images,
            t.labels,
            t.splits,
            t.num_classes,
            source="vtab",
            paths=t.paths,
            extra={"vtab_folder": str(t.folder), "skipped": [str(b) for b in t.skipped],
                   "train800val200": t.union},
        )
        reports.append(ImportReport(t.name, str(t.folder), t.num_classes, t.counts(), t.skipped, t.warnings,
                                    t.union))
    return reports
