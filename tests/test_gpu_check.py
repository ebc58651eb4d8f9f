"""benchmarks/gpu_check.py --quick: the GPU check's steps at tiny sizes on the CPU, so CI proves it runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_quick_runs_every_step_and_writes_the_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--quick", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["quick"] and len(report["steps"]) == 4
    assert all(step["exit_code"] == 0 and step["peak_memory_gib"] > 0 for step in report["steps"].values())
    figures = report["bench_distill"]
    assert figures["input_speedup"] > 0 and figures["rows"]["input: decoded pipeline"] > 0
    stream = report["bench_stream_decode"]
    assert stream["ratio"] > 0 and all(rate > 0 for rate in stream["images_per_s"].values())
