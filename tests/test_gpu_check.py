"""tools/gpu_check.sh without a GPU: the dry mode names every row as not run and why, and exits 2 (fast)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_check.sh"
ROWS = ["build", "cuda tests", "token_gate", "sparse U-Net", "train bf16", "query_cache"]


def _run(*args, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def _table(stdout: str) -> dict:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("== tools/gpu_check.sh summary"))
    assert lines[start + 1].split() == ["row", "status", "figure"]
    body = {}
    for line in lines[start + 2:]:
        name = next(r for r in ROWS if line.startswith(r))
        body[name] = line[len(name):].strip()
    return body


def test_cpu_dry_run_reports_every_row_not_run_and_exits_2():
    so_before = sorted(REPO.glob("scene3d/_C*.so"))
    proc = _run("--cpu-dry-run")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    table = _table(proc.stdout)
    assert list(table) == ROWS
    for row, rest in table.items():
        assert rest.startswith("not run") and "no CUDA device (--cpu-dry-run)" in rest, (row, rest)
    assert sorted(REPO.glob("scene3d/_C*.so")) == so_before  # built nothing, removed nothing


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a CUDA device the script runs the whole check")
def test_without_cuda_the_plain_run_says_so_per_row():
    proc = _run(PYTHON=sys.executable)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    table = _table(proc.stdout)
    assert all("torch.cuda.is_available() is False" in rest for rest in table.values()), table


def test_unknown_argument_is_a_usage_error():
    proc = _run("--gpu")
    assert proc.returncode == 64
    assert "unknown argument '--gpu'" in proc.stderr
