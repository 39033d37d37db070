"""Writes that a kill cannot leave half done: write beside the target, then rename over it.

Every such write in the project goes through `replacing`, so the temporary files share one name,
`.<name>.tmp-<pid>` beside the target, and `stale_temporaries` finds what a killed writer left behind."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def temporary_for(path: str | Path) -> Path:
    """The temporary file this process writes `path` through."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write; renamed over `path` when the block ends without
    error, removed otherwise: a reader sees the old file or the new one, never a truncated one."""
    path = Path(path)
    tmp = temporary_for(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """`text` written to `path` through `replacing`: a reader (DVC, a later stage) sees the old file or the new
    one, never a truncated one, whenever the writer is killed."""
    with replacing(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def stale_temporaries(path: str | Path) -> list[Path]:
    """Temporary files of `path` that writers killed mid-write left behind (any process's)."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.tmp-*"))
