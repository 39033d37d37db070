"""Every generated table of BENCHMARKS.md and README.md, rendered from the result files in the repo (issue 24).

In those docs each such table sits between two lines,

    <!-- table: <id> -->
    the table (or a few lines), then one line naming the files it is read from and the commands that wrote them
    <!-- /table -->

and TABLES[<id>] renders what lies between them. This script only reads result files (bench/results/...,
outputs/evaluate/*.json, weights/embedded_backbone.json): it trains, times and runs nothing, and imports no
torch. The tables are registered in bench/tables_pipeline.py (§1 the default pipeline and its recorded runs,
§2.1 the backbone) and bench/tables_results.py (§2.2 on: the benchmark scripts' results); the mechanism is
bench/doctables.py.

    .venv/bin/python bench/tables.py            # rewrite every block of BENCHMARKS.md and README.md in place
    .venv/bin/python bench/tables.py --check    # rewrite nothing; exit 1 naming each stale block, each block
                                                # whose id is unknown and each id no doc uses
    .venv/bin/python bench/tables.py --list     # every id and the files it reads

To add a table: write a function that returns its markdown from the files, register it with
`@table("<id>", Source(path, command), ...)`, put an empty block with that id in the doc and run the script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package

import tables_pipeline  # noqa: E402,F401  (registers §1, §2.1)
import tables_results  # noqa: E402,F401  (registers §2.2 on)
from doctables import (  # noqa: E402,F401  (re-exported for tests)
    DOCS,
    TABLES,
    blocks,
    problems,
    render,
    rewrite,
    stale,
    unknown,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 naming each stale block, each "
                    "block whose id is unknown and each id no doc uses")
    ap.add_argument("--list", action="store_true", help="print every table id and the files it reads")
    args = ap.parse_args(argv)
    if args.list:
        for block_id, t in TABLES.items():
            print(f"{block_id}: {', '.join(s.path for s in t.sources)}")
        return 0
    bodies, found = render(TABLES)
    docs = {path: path.read_text() for path in DOCS}
    if not args.check:
        for path, text in docs.items():
            new = rewrite(text, bodies)
            if new != text:
                print(f"{path.name}: rewrote {', '.join(stale(text, bodies))}")
                path.write_text(new)
                docs[path] = new
    found += problems({p.name: text for p, text in docs.items()}, bodies, TABLES)
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
