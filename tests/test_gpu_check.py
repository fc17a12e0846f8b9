"""benchmarks/gpu_check.sh dry-runs on the CPU: every path the first GPU run takes works (issue 36, item 6)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--json", str(out)],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "[FAIL]" not in proc.stdout
    for family in ("fedavg", "heterofl", "depthfl", "fiarse", "feddf", "fedgen", "dkd"):
        assert f"simulator {family}:" in proc.stdout
    for what in ("workers (CPU) bf16", "batched bf16", "2NN client updates/s", "HeteroFL a-b-c-d-e",
                 "PreResNet-18 HeteroFL round", "demo digits_fedavg-bf16", "resumed on the CPU"):
        assert what in proc.stdout, what
    assert out.is_file()
