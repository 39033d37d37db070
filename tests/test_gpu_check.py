"""bench/gpu_check.sh without a GPU: the CPU dry run prints one PASS line per check and exits 0; on a machine
without CUDA the real run says so and exits with its own code (3)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
CHECKS = ["deepspeed-zero0", "deepspeed-zero2", "vit-b16-step", "dynamic-vs-full"]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_CHECK_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_cpu_dry_run_passes_every_check_one_line_each():
    out = run("--cpu-dry-run")
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert [ln.split()[1] for ln in lines] == CHECKS, out.stdout
    assert all(ln.startswith("PASS") for ln in lines), out.stdout
    assert "all checks passed" in out.stdout


def test_without_cuda_it_says_so_and_exits_3(tmp_path):
    if Path("/dev/nvidia0").exists():
        pytest.skip("this machine has a GPU")
    # a PATH without nvidia-smi, but with bash and the coreutils the script needs
    out = run(env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 3, out.stdout + out.stderr
    assert "no CUDA device" in out.stdout


def test_unknown_argument_is_refused():
    out = run("--bogus")
    assert out.returncode == 2 and "unknown argument" in out.stderr
