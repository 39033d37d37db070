"""The mechanism behind bench/tables.py: generated blocks in the docs, the registry of tables, small formatters.

In BENCHMARKS.md and README.md each generated table sits between `<!-- table: <id> -->` and `<!-- /table -->`,
and TABLES[<id>] renders what lies between them from result files. The tables themselves are registered by
bench/tables_pipeline.py (the default pipeline and the backbone: §1, §2.1) and bench/tables_results.py (the
benchmark scripts' results: §2.2 on); bench/tables.py is the command.
"""

from __future__ import annotations
from __future__ import annotations

import importlib
import json
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
DOCS = (ROOT / "BENCHMARKS.md", ROOT / "README.md")
OPEN = re.compile(r"^<!-- table: (?P<id>\S+) -->$")
CLOSE = "<!-- /table -->"


# ------------------------------------------------------------------------------------------ the registry


@dataclass(frozen=True)
class Source:
    """A result file (relative to the repo root) and the command that wrote it (markdown)."""

    path: str
    command: str

    def markdown(self) -> str:
        return f"`{self.path}`, written by {self.command}"


@dataclass(frozen=True)
class Table:
    """One generated block: a function that renders it from its files, and those files."""

    render: Callable[[], str]
    sources: tuple[Source, ...]

    def __call__(self) -> str:
        """The block's body: the rendered markdown, a blank line, the line naming its files and commands."""
        return f"{self.render().strip()}\n\nSource: {'; '.join(s.markdown() for s in self.sources)}.\n"


TABLES: dict[str, Table] = {}


def table(block_id: str, *sources: Source):
    """Register the decorated function as the renderer of block `block_id`, read from `sources`."""
    def register(render: Callable[[], str]) -> Callable[[], str]:
        if block_id in TABLES:
            raise ValueError(f"table id {block_id!r} registered twice")
        TABLES[block_id] = Table(render, sources)
        return render
    return register


# ------------------------------------------------------------------------------------------ the docs


@dataclass(frozen=True)
class Block:
    """A generated block of a doc: its id and the line numbers (0-based) of its opening and closing lines."""

    id: str
    start: int
    end: int


def blocks(text: str) -> list[Block]:
    """The generated blocks of a doc, in order. A block left open, or opened inside another, is an error."""
    found, current = [], None
    for i, line in enumerate(text.splitlines()):
        opened = OPEN.match(line)
        if opened and current is not None:
            raise ValueError(f"line {i + 1}: block {opened['id']!r} opens inside block {current[0]!r}")
        if opened:
            current = (opened["id"], i)
        elif line == CLOSE:
            if current is None:
                raise ValueError(f"line {i + 1}: {CLOSE} closes no block")
            found.append(Block(current[0], current[1], i))
            current = None
    if current is not None:
        raise ValueError(f"block {current[0]!r} (line {current[1] + 1}) is never closed")
    return found


def body(text: str, block: Block) -> str:
    """What a doc holds between a block's opening and closing lines."""
    lines = text.splitlines(keepends=True)[block.start + 1: block.end]
    return "".join(lines)


def rewrite(text: str, bodies: Mapping[str, str]) -> str:
    """The doc with the body of every block whose id `bodies` has replaced by it (other blocks kept as they are).
    A body ends with a newline, so the closing line stays on its own."""
    lines = text.splitlines(keepends=True)
    for block in reversed(blocks(text)):  # from the end: earlier line numbers stay valid
        if block.id in bodies:
            lines[block.start + 1: block.end] = [bodies[block.id]]
    return "".join(lines)


def stale(text: str, bodies: Mapping[str, str]) -> list[str]:
    """The ids of the doc's blocks whose body differs from the one in `bodies`."""
    return [b.id for b in blocks(text) if b.id in bodies and body(text, b) != bodies[b.id]]


def unknown(text: str, registry: Mapping[str, object]) -> list[str]:
    """The ids of the doc's blocks that the registry does not know."""
    return [b.id for b in blocks(text) if b.id not in registry]


def render(registry: Mapping[str, Callable[[], str]]) -> tuple[dict[str, str], list[str]]:
    """Every table's body as rendered now, each ending with a newline; and a line for each table that could not
    be rendered (a result file missing or not of the expected form), which is left out of the bodies."""
    bodies, failed = {}, []
    for block_id, make in registry.items():
        try:
            text = make()
        except (OSError, KeyError, IndexError, TypeError, ValueError) as e:
            failed.append(f"table {block_id!r} cannot be rendered: {type(e).__name__}: {e}")
            continue
        bodies[block_id] = text if text.endswith("\n") else text + "\n"
    return bodies, failed


# ------------------------------------------------------------------------------------------ reading results


def read_json(path: str) -> dict:
    """A result file, by its path relative to the repo root."""
    return json.loads((ROOT / path).read_text())


def bench_module(name: str):
    """A bench script as a module (bench/ is not a package), for its table functions."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def tables_of(text: str) -> list[str]:
    """The markdown tables in `text`: each run of lines that start with `|`, in order."""
    runs, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            runs.append("\n".join(current))
            current = []
    return runs


def row(*cells) -> str:
    """One markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def header(*names: str) -> list[str]:
    """A markdown table's header and rule."""
    return [row(*names), "|" + "---|" * len(names)]


def per_seed(values: list, fmt: str) -> str:
    """Values of the seeds, formatted and joined by ' / ' (a missing one is left out)."""
    return " / ".join(fmt.format(v) for v in values if v is not None)


def seeds_and_mean(values: list[float], fmt: str = "{:.3f}") -> str:
    """'a / b (mean)' of a figure over the seeds."""
    return f"{per_seed(values, fmt)} ({fmt.format(sum(values) / len(values))})"


def pt(delta: float, digits: int = 1) -> str:
    """An accuracy difference in points, signed (a difference that rounds to zero is written unsigned)."""
    text = f"{100 * delta:+.{digits}f}"
    return text[1:] if float(text) == 0 else text


def mib(n_bytes: float) -> str:
    """Bytes as MiB with a thousands separator."""
    return f"{n_bytes / 2 ** 20:,.0f}"


def problems(docs: Mapping[str, str], bodies: Mapping[str, str], registry: Mapping[str, object]) -> list[str]:
    """What --check reports for these docs ({name: text}): stale blocks, unknown ids, ids no doc uses."""
    out = []
    for name, text in docs.items():
        out += [f"{name}: block {i!r} is stale (run .venv/bin/python bench/tables.py)" for i in stale(text, bodies)]
        out += [f"{name}: block {i!r} has no table of that id in bench/tables.py" for i in unknown(text, registry)]
    used = {b.id for text in docs.values() for b in blocks(text)}
    return out + [f"table {i!r} is used in no doc" for i in registry if i not in used]
