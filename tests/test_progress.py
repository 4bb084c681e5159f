"""Progress under memory pressure (issue 13): every request the engine admits finishes, under
every policy and device budget, and a request the plan resumes where it is never crashes the loop.

Progress is the scheduler's and the policies' business, so the sweep runs the real scheduler,
policies and tier manager with the data path left out (`ProbeEngine(with_model=False)`: each step's
tokens are the ones the probe model would sample), and checks the state machine's invariants after
every step. That KV content survives the same policies under the same pressure is
test_kv_integrity.py's job (the probe model, every read checked). The issue's sweep is SmolLM2's 30
layers and 120-400 device blocks of one layer; the sweep here has 6 layers and the same budgets per
layer (24, 40 and 80 blocks: the sweep's ends and middle), the same pressure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kv_probe import ProbeEngine, probe_spec
from orbitflow_ray.config import EngineConfig
from orbitflow_ray.kv.blocks import Tier
from orbitflow_ray.planner import available_policies
from orbitflow_ray.sched.states import check_invariants

SMOLLM2_LIKE = probe_spec(num_layers=6, num_kv_heads=3)
BLOCK_BYTES = SMOLLM2_LIKE.kv_bytes_per_token_per_layer(4) * 16
BUDGETS = tuple(b * 6 // 30 for b in (120, 200, 400))  # SmolLM2's, per layer: the sweep's ends and middle
PROMPT_TOKENS = 18  # the issue's "Write a long story about a lighthouse keeper named Ada, chapter i."
STEP_CAP = 4000  # 8 x 150 tokens need ~170 steps unpressured; a livelock fails here instead of hanging


@pytest.mark.slow
@pytest.mark.parametrize("policy", available_policies(builtin_only=True))
def test_every_admitted_request_finishes(policy):
    outcomes = []
    for blocks in BUDGETS:
        cfg = EngineConfig(model="probe", kv_policy=policy, device_kv_bytes=blocks * BLOCK_BYTES,
                           host_kv_bytes=64 << 20, block_size=16, solve_ahead=False)
        eng = ProbeEngine(cfg, SMOLLM2_LIKE, with_model=False)
        try:
            try:
                ids = [eng.add(PROMPT_TOKENS, 150) for _ in range(8)]
            except ValueError as e:  # refused on arrival: it can never fit this tier under this policy
                assert "bytes of device KV" in str(e)
                outcomes.append((blocks, "refused"))
                continue
            steps = 0
            while eng.scheduler.has_unfinished():
                eng.step()
                check_invariants(eng.scheduler)
                steps += 1
                assert steps < STEP_CAP, f"{policy} at {blocks} blocks: no progress after {steps} steps"
            assert all(len(eng.outputs[r]) == 150 for r in ids)
            eng.check_outputs()
            assert eng.kv.used_bytes(Tier.DEVICE) == eng.kv.used_bytes(Tier.HOST) == 0
            outcomes.append((blocks, steps, eng.scheduler.num_preemptions, eng.scheduler.num_pauses))
        finally:
            eng.close()
    print(policy, outcomes)
    assert any(len(o) == 4 for o in outcomes), "no budget admitted the requests"


@pytest.mark.slow
def test_issue_simulation_with_pauses_completes():
    """Issue 13 item 3's command: a paused request resumed at distance 0 (all host) crashed the
    scheduler with KeyError; now every request finishes and the pauses are reported. Default
    orbitflow admits no batch that outgrows the device here (lifetime admission), so nothing
    pauses; the window-horizon ablation admits them and pauses (50 pauses)."""
    cmd = [sys.executable, "-m", "orbitflow_ray.cli", "simulate", "--policy", "orbitflow-window-admit",
           "--workload", "fixed", "--input-tokens", "1000",
           "--output-tokens", "4000", "--num-requests", "24", "--rate", "4", "--slo-scale", "2.5",
           "--device-kv-bytes", "2GiB", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    m = json.loads(done.stdout)["runs"][0]["metrics"]
    assert m["num_finished"] == 24 and m["num_failed"] == 0
    assert m["total_pauses"] > 0 and m["output_tokens"] == 24 * 4000
