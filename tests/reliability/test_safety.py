"""Safety of the source tree: nothing unpickles untrusted bytes. Every `torch.load` passes
`weights_only=True` (tensors and primitives only: a checkpoint cannot run code), and there is no
`pickle.load(s)`, `torch.load(..., weights_only=False)`, `np.load(..., allow_pickle=True)` or other loader
that executes pickled objects, in dynadapter/, pipelines/ or bench/ (tests may, to build bad files)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("dynadapter", "pipelines", "bench")

# module -> functions that unpickle whatever they are given
UNSAFE = {
    "pickle": {"load", "loads", "Unpickler"},
    "_pickle": {"load", "loads", "Unpickler"},
    "cPickle": {"load", "loads"},
    "dill": {"load", "loads"},
    "cloudpickle": {"load", "loads"},
    "joblib": {"load"},
    "shelve": {"open"},
    "marshal": {"load", "loads"},
    "pandas": {"read_pickle"},
    "mlflow.pytorch": {"load_model"},  # pickles the whole module
    "yaml": {"unsafe_load", "full_load", "load_all", "unsafe_load_all"},
}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted origin, from the file's imports (`import torch as th`, `from pickle import loads`)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
        if kw.arg is None:  # **kwargs: cannot tell
            return kw.value
    return None


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """`file:line: call` for every call in `source` that may unpickle untrusted data."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        if name is None:
            continue
        module, _, func = name.rpartition(".")
        where = f"{filename}:{node.lineno}: {ast.unparse(node)[:120]}"
        if name == "torch.load":
            flag = _keyword(node, "weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append(where)
        elif name in ("numpy.load", "np.load"):
            flag = _keyword(node, "allow_pickle")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                found.append(where)
        elif name == "yaml.load":
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if not (loader is not None and "Safe" in ast.unparse(loader)):
                found.append(where)
        elif func in UNSAFE.get(module, ()):
            found.append(where)
    return found


def test_the_check_catches_every_unsafe_form():
    bad = """
import torch, torch as th, pickle, yaml, numpy as np
from pickle import loads as unpickle
from torch import load
torch.load(p)
torch.load(p, map_location="cpu", weights_only=False)
th.load(p)
load(p, weights_only=True if x else False)
torch.load(p, **kw)
pickle.load(f)
unpickle(b)
np.load(p, allow_pickle=True)
yaml.load(text)
yaml.load(text, Loader=yaml.Loader)
"""
    good = """
import torch, yaml, numpy as np
from safetensors.torch import load_file
torch.load(p, map_location="cpu", weights_only=True)
torch.load(
    p,
    weights_only=True,
)
np.load(p)
yaml.safe_load(text)
yaml.load(text, Loader=yaml.SafeLoader)
load_file(p)
"""
    assert sorted(int(hit.split(":")[1]) for hit in unsafe_loads(bad)) == list(range(5, 15)), unsafe_loads(bad)
    assert unsafe_loads(good) == []


def test_no_unsafe_deserialisation_in_the_source_tree():
    files = [p for d in SCANNED for p in sorted((REPO / d).rglob("*.py")) if ".venv" not in p.parts]
    assert len(files) > 20 and {p.relative_to(REPO).parts[0] for p in files} == set(SCANNED)
    found = [hit for p in files for hit in unsafe_loads(p.read_text(), str(p.relative_to(REPO)))]
    assert not found, "unsafe deserialisation:\n" + "\n".join(found)
    # and the project does load checkpoints with torch.load: the check above is not vacuous
    assert sum(p.read_text().count("weights_only=True") for p in files) >= 3


@pytest.mark.parametrize("text", ["torch.load(", "pickle.load"])
def test_plain_grep_agrees(text):
    """A line-based grep as a second net (catches what the AST might not parse, e.g. a new file with a syntax
    error): each code line with `torch.load(` carries weights_only=True, and no code line calls pickle.load."""
    for d in SCANNED:
        for p in (REPO / d).rglob("*.py"):
            for i, line in enumerate(p.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if text not in code or code.lstrip().startswith(('"""', "'")) or "`" in code:
                    continue  # comments and docstring prose (`torch.load(weights_only=True)`)
                if text == "pickle.load":
                    pytest.fail(f"{p.relative_to(REPO)}:{i}: {line.strip()}")
                assert "weights_only=True" in code, f"{p.relative_to(REPO)}:{i}: {line.strip()}"
