"""DVC stage `prepare`: write the downstream tasks and the upstream set as Parquet datasets."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from dynadapter.config import ConfigError, Params
from dynadapter.data.store import DataError, read_manifest
from dynadapter.data.synthetic import TASKS, UPSTREAM_TASK, generate_task, generate_upstream
from dynadapter.data.vtab import import_vtab
from pipelines.common import load_stage_params, save_stage_config, stage_parser

DESCRIPTION = """\
Prepare the data every later stage reads (Parquet + manifest.json per task).

  source=embedded  generate the seeded offline downstream suite (base.tasks, from: %s)
                   into base.paths.data, VTAB-1k split sizes from prepare.embedded.
  source=vtab      import the VTAB-1k folder prepare.vtab_root (NOAH layout: <task>/{train800,val200,
                   test}.txt) for the tasks in base.tasks into base.paths.data, checking every line;
                   prepare.on_bad_line=skip drops bad lines and reports them instead of stopping.
                   train800val200.txt (copies or the same files) is compared with train800 + val200 by
                   image content and label; a disagreement is a warning. Class count: the VTAB table,
                   else 0..K-1 each present in train800; prepare.num_classes.<task> overrides both.

Either way the procedural upstream set (for pretraining the embedded backbone) goes to
base.paths.upstream. Writes <base.paths.outputs>/prepare/{prepare_config.yaml,summary.json}.
Exit code 2 on a configuration or data error.""" % ", ".join(TASKS)


def _task_summary(root: Path, task: str) -> dict:
    m = read_manifest(root, task)
    size = (root / task / "data.parquet").stat().st_size
    return {"num_classes": m["num_classes"], "counts": m["counts"], "checksum": m["checksum"], "bytes": size}


def run(params: Params) -> dict:
    """Do the stage's work for validated params; returns the summary written to summary.json."""
    base, prep = params.base, params.prepare
    data_root, up_root = Path(base.paths.data), Path(base.paths.upstream)
    summary: dict = {"source": prep.source, "seed": base.seed, "tasks": {}, "skipped": {}, "warnings": {}}

    if prep.source == "embedded":
        unknown = [t for t in base.tasks if t not in TASKS]
        if unknown:
            raise ConfigError(f"base.tasks: no embedded task {unknown} (known: {sorted(TASKS)}); "
                              "use prepare.source=vtab for other tasks")
        for task in base.tasks:
            generate_task(task, prep.embedded, base.seed).write(data_root, source="embedded",
                                                                extra={"seed": base.seed})
            summary["tasks"][task] = _task_summary(data_root, task)
    else:
        reports = import_vtab(prep.vtab_root, base.tasks, data_root, prep.on_bad_line, num_classes=prep.num_classes)
        for r in reports:
            summary["tasks"][r.task] = {**_task_summary(data_root, r.task), "folder": r.folder,
                                        "train800val200": r.union}
            summary["skipped"][r.task] = [str(b) for b in r.skipped]
            summary["warnings"][r.task] = [str(w) for w in r.warnings]
            for b in r.skipped:
                print(f"skipped {b}", file=sys.stderr)
            for w in r.warnings:
                print(f"warning {w}", file=sys.stderr)
            if r.skipped:
                print(f"{r.task}: skipped {len(r.skipped)} bad line(s)", file=sys.stderr)

    generate_upstream(prep.embedded, base.seed).write(up_root, source="embedded", extra={"seed": base.seed})
    summary["upstream"] = _task_summary(up_root, UPSTREAM_TASK)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("prepare", DESCRIPTION)
    args = parser.parse_args(argv)
    params = load_stage_params(args)  # exits 2 on a config mistake
    out_dir = Path(params.base.paths.outputs) / "prepare"
    start = time.perf_counter()
    try:
        summary = run(params)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    save_stage_config(params, "prepare", out_dir)
    with open(out_dir / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    for task, info in summary["tasks"].items():
        print(f"{task}: {info['num_classes']} classes, {info['counts']}")
    print(f"upstream: {summary['upstream']['counts']}")
    print(f"prepare: done in {time.perf_counter() - start:.1f}s -> {params.base.paths.data}, {params.base.paths.upstream}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
