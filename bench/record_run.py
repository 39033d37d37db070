"""Run a command in a checkout and keep what it did as a result file: the figures BENCHMARKS.md §1 quotes.

Times the command (wall clock), and afterwards reads what the pipeline left in that checkout's `outputs/`
(the tune, train and evaluate metrics) and, for a pytest run, the summary line. Writes
bench/results/pipeline_runs/<name>.json (in this repo, whatever --cwd is), so a fresh clone's `make repro`,
a second seed or a `make test` has a file behind every figure quoted from it. The command's output streams
through as it runs.

    git clone . /tmp/fc
    .venv/bin/python bench/record_run.py --name fresh_clone_repro --cwd /tmp/fc -- make repro
    .venv/bin/python bench/record_run.py --name seed1 --cwd /tmp/fc -- \
        bash -c 'source .venv/bin/activate && dvc exp run -S base.seed=1'   # the stages run `python` from PATH
    .venv/bin/python bench/record_run.py --name fresh_clone_test --cwd /tmp/fc -- make test
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "pipeline_runs"
OUTPUTS = {"tune": "outputs/tune/metrics.json", "train": "outputs/train/metrics.json",
           "evaluate": "outputs/evaluate/metrics.json"}
PYTEST_SUMMARY = re.compile(r"=+ (.*\b(?:passed|failed|error)\b.*) in ([\d.]+)s")


def git_commit(cwd: Path) -> str | None:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True)
    return out.stdout.strip() or None


def run_streaming(command: list[str], cwd: Path) -> tuple[int, str, float]:
    """(exit code, the output's last 200 lines, wall seconds); the output is echoed as it comes."""
    start = time.perf_counter()
    tail: list[str] = []
    with subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            tail = (tail + [line])[-200:]
    return proc.returncode, "".join(tail), time.perf_counter() - start


def pytest_summary(text: str) -> dict | None:
    """pytest's closing line ('807 passed, 1 skipped in 1196.48s') as {'summary', 'seconds'}."""
    found = PYTEST_SUMMARY.findall(text)
    return {"summary": found[-1][0], "seconds": float(found[-1][1])} if found else None


def record(name: str, command: list[str], cwd: Path) -> dict:
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    commit = git_commit(cwd)
    code, tail, seconds = run_streaming(command, cwd)
    rec = {"name": name, "command": shlex.join(command), "commit": commit, "started": started,
           "exit_code": code, "wall_seconds": round(seconds, 1), "pytest": pytest_summary(tail),
           "outputs": {k: json.loads((cwd / p).read_text()) for k, p in OUTPUTS.items() if (cwd / p).is_file()}}
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="the result file's name: bench/results/pipeline_runs/<name>.json")
    ap.add_argument("--cwd", type=Path, default=Path("."), help="the checkout to run in (default: here)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to run after --")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.name):
        ap.error(f"--name {args.name!r}: letters, digits, '_', '.', '-' only")
    rec = record(args.name, command, args.cwd.resolve())
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{args.name}.json"
    path.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    print(f"record_run: {args.name}: exit {rec['exit_code']} in {rec['wall_seconds']:.0f} s -> {path}")
    return rec["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
