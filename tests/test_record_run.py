"""bench/record_run.py: the file behind a timed pipeline or test run quoted in BENCHMARKS.md §1."""

from __future__ import annotations

import json
import sys

from helpers import load_bench


def load():
    return load_bench("record_run")


def test_pytest_summary_reads_the_closing_line():
    rr = load()
    text = "...\n==== 807 passed, 1 skipped, 3 warnings in 1196.48s (0:19:56) ====\n"
    assert rr.pytest_summary(text) == {"summary": "807 passed, 1 skipped, 3 warnings", "seconds": 1196.48}
    assert rr.pytest_summary("no tests ran") is None


def test_record_keeps_exit_code_time_and_the_checkouts_metrics(tmp_path):
    rr = load()
    (tmp_path / "outputs/evaluate").mkdir(parents=True)
    (tmp_path / "outputs/evaluate/metrics.json").write_text(json.dumps({"dyn_test_accuracy": 0.8}))
    rec = rr.record("x", [sys.executable, "-c", "import time; time.sleep(0.2); print('hi'); raise SystemExit(3)"],
                    tmp_path)
    assert rec["exit_code"] == 3 and rec["wall_seconds"] >= 0.2
    assert rec["outputs"] == {"evaluate": {"dyn_test_accuracy": 0.8}}
    assert rec["commit"] is None and rec["pytest"] is None  # not a git checkout, not pytest
