"""bench/offload_step.py as a user runs it (a subprocess): the offloaded run really offloads and
copies, the on-device run does not, and the summary's ratios are the runs' own figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_offload_step_bench_offloads_one_run_and_not_the_other(tmp_path):
    out = tmp_path / "offload_step.json"
    run = subprocess.run([sys.executable, "bench/offload_step.py", "--prompt-lens", "64,64", "--device-kv-bytes",
                          "6000000", "--steps", "3", "--rounds", "1", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(out.read_text())
    off, dev = summary["runs"]
    assert (off["policy"], dev["policy"]) == ("orbitflow", "no-offload")
    assert all(n > 0 for n in off["host_layers"].values()) and off["h2d_mb_per_step"] > 0
    assert all(n == 0 for n in dev["host_layers"].values()) and dev["h2d_mb_per_step"] == 0
    assert summary["offloaded_over_on_device"] == off["step_ms"] / dev["step_ms"]
    assert summary["predicted_over_measured"] == off["predicted_step_ms"] / off["step_ms"]
    assert "offloaded" in run.stdout and "plan predicted" in run.stdout
