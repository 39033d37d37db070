"""BENCHMARKS.md and README.md against the result files (issue 24, "every figure has a file").

bench/tables.py renders every generated table of the docs from the result files in the repo. These tests check
that the docs hold what the files give, that every table of BENCHMARKS.md is generated, and
that a stale block is found and rewritten. They read files only: no training, no torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tables():
    """bench/tables.py as a module (bench/ is not a package)."""
    from helpers import load_bench

    return load_bench("tables")


def test_the_docs_equal_what_the_result_files_generate(tables, capsys):
    """`bench/tables.py --check` passes: no stale block, no unknown id, no id left unused, no file missing."""
    code = tables.main(["--check"])
    assert code == 0, "run .venv/bin/python bench/tables.py:\n" + capsys.readouterr().err


def test_every_table_row_is_generated(tables):
    """Every markdown table row of BENCHMARKS.md (a line starting with `|`) lies in a generated block."""
    text = (ROOT / "BENCHMARKS.md").read_text()
    lines = text.splitlines()
    inside = {i for b in tables.blocks(text) for i in range(b.start + 1, b.end)}
    loose = [f"BENCHMARKS.md:{i + 1}: {line[:80]}" for i, line in enumerate(lines)
             if line.startswith("|") and i not in inside]
    assert not loose, ("table rows outside a generated block (wrap the table in <!-- table: <id> --> ... "
                       "<!-- /table --> and register <id> in bench/tables.py):\n" + "\n".join(loose))


DOC = """# A doc

<!-- table: fake -->
| old | figure |
<!-- /table -->

prose | not a table

<!-- table: other -->
kept as it is
<!-- /table -->
"""


def test_a_stale_block_is_found_and_rewritten(tables):
    bodies = {"fake": "| new | figure |\n|---|---|\n\nSource: `x.json`, written by `make x`.\n"}
    assert tables.stale(DOC, bodies) == ["fake"]
    assert tables.unknown(DOC, bodies) == ["other"]
    new = tables.rewrite(DOC, bodies)
    assert new == DOC.replace("| old | figure |\n", bodies["fake"])
    assert tables.stale(new, bodies) == [] and tables.rewrite(new, bodies) == new  # rewriting again changes nothing
    problems = tables.problems({"doc.md": DOC}, bodies, {"fake": None, "unused": None})
    assert problems == ["doc.md: block 'fake' is stale (run .venv/bin/python bench/tables.py)",
                        "doc.md: block 'other' has no table of that id in bench/tables.py",
                        "table 'unused' is used in no doc"]


def test_check_names_a_stale_block_of_a_doc_copy_and_the_script_rewrites_it(tables, tmp_path, monkeypatch, capsys):
    """The command line on a temp doc with a fake table: --check fails naming the block and writes nothing;
    the plain run rewrites the block, after which --check passes."""
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(DOC.replace("<!-- table: other -->\nkept as it is\n<!-- /table -->\n", ""))
    monkeypatch.setattr(tables, "DOCS", (doc,))
    monkeypatch.setattr(tables, "TABLES", {"fake": lambda: "| new | figure |"})
    before = doc.read_text()
    assert tables.main(["--check"]) == 1
    assert "block 'fake' is stale" in capsys.readouterr().err and doc.read_text() == before
    assert tables.main([]) == 0
    assert doc.read_text() == before.replace("| old | figure |\n", "| new | figure |\n")
    assert tables.main(["--check"]) == 0


def test_a_table_that_cannot_be_rendered_is_reported_not_written(tables):
    def missing() -> str:
        return (ROOT / "bench" / "results" / "no_such_file.json").read_text()

    bodies, failed = tables.render({"ok": lambda: "| a |", "missing": missing})
    assert bodies == {"ok": "| a |\n"}  # a newline is added: the closing line stays on its own
    assert len(failed) == 1 and failed[0].startswith("table 'missing' cannot be rendered: FileNotFoundError")


@pytest.mark.parametrize("text, error", [
    ("<!-- table: a -->\n| x |\n", "never closed"),
    ("<!-- table: a -->\n<!-- table: b -->\n<!-- /table -->\n", "opens inside block 'a'"),
    ("| x |\n<!-- /table -->\n", "closes no block"),
])
def test_a_malformed_block_is_an_error(tables, text, error):
    with pytest.raises(ValueError, match=error):
        tables.blocks(text)


def test_tables_are_read_from_their_files_without_torch():
    """Rendering imports the bench scripts' table functions, not torch (the scripts import it where they use it);
    in a fresh interpreter, since other tests of the session import torch."""
    import subprocess

    code = ("import sys; sys.path.insert(0, 'bench'); import tables; tables.render(tables.TABLES); "
            "assert 'torch' not in sys.modules, 'rendering imported torch'")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_run_times_round_to_whole_seconds_without_a_sixtieth(tables):
    """pipeline.runs printed a 1319.8 s pytest run as 21:60."""
    import tables_pipeline  # on sys.path once bench/tables.py is loaded

    assert [tables_pipeline.minutes(s) for s in (1319.81, 556.4, 59.4, 60.0)] == ["22:00", "9:16", "0:59", "1:00"]
