"""What `bench/gpu_check.sh` runs on a lent GPU, and its CPU dry run.

    PYTHONPATH=.:kernels .venv/bin/python -m pytest tests/test_gpu_check.py -q

The engine on the cuda backend (skipped without cupy + GPU): greedy output token-identical to
transformers on the same GPU, offloading policies and tier moves token-identical to no-offload, KV
bytes unchanged by moves between tiers. On every machine: the `random:<preset>` weights the
benchmarks use, the KV round trip on the cpu backend, and the whole script in --dry-run mode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orbitflow_kernels import make_transfer_engine
from orbitflow_ray import SamplingParams
from orbitflow_ray.kv.blocks import MoveOp, Tier
from orbitflow_ray.kv.store import KVStore
from orbitflow_ray.llm import LLM
from orbitflow_ray.model.loader import (build_hf_reference, expected_shapes, load_model, load_spec,
                                        load_tokenizer, tiled_random_weights)
from orbitflow_ray.model.presets import get_preset
from orbitflow_ray.planner.base import KVPolicy, PlacementPlan, register_policy

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[1, 5, 9, 200, 31], list(range(3, 140)), [7] * 40, list(range(100, 400))]


def _have_cuda() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


cuda = pytest.mark.skipif(not _have_cuda(), reason="needs cupy and a CUDA device")
BACKENDS = ["cpu", pytest.param("cuda", marks=cuda)]


@register_policy
class GpuCheckFlip(KVPolicy):
    """Test policy: each step moves every running request's layers to the next of three
    placements (odd layers on host, all on host, all on device)."""

    name = "gpu-check-flip"

    def __init__(self, num_layers, **options):
        super().__init__(num_layers)
        self.step = 0
        self.cycle = [[Tier.HOST if j % 2 else Tier.DEVICE for j in range(num_layers)],
                      [Tier.HOST] * num_layers, [Tier.DEVICE] * num_layers]

    def place_new(self, req, cap):
        return list(self.cycle[0])

    def replan(self, running, cap):
        self.step += 1
        return PlacementPlan({r.request_id: list(self.cycle[self.step % 3]) for r in running})


# ---- random:<preset> weights (CPU) -------------------------------------------------------------
def test_random_prefix_names_any_preset_with_tiled_weights():
    spec = load_spec("random:llama-3.1-8b")
    assert spec == get_preset("llama-3.1-8b") and load_tokenizer("random:llama-3.1-8b") is None
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        load_spec("random:nope")
    with pytest.raises(ValueError, match="random:llama-3.1-8b"):  # the config-only error says how
        load_model("llama-3.1-8b")
    m = load_model("random:tiny-qwen2", dtype=torch.bfloat16, seed=4)
    assert m.source == "random" and m.tokenizer is None and m.spec == get_preset("tiny-qwen2")
    assert {k: tuple(v.shape) for k, v in m.weights.items()} == expected_shapes(m.spec)
    made_on = "cuda" if torch.cuda.is_available() else "cpu"  # where the engine will compute
    assert all(v.dtype == torch.bfloat16 and v.device.type == made_on for v in m.weights.values())
    again = load_model("random:tiny-qwen2", dtype=torch.bfloat16, seed=4).weights
    assert all(torch.equal(again[k], v) for k, v in m.weights.items())
    other = load_model("random:tiny-qwen2", dtype=torch.bfloat16, seed=5).weights
    assert not torch.equal(other["layers.0.mlp.up_proj.weight"], m.weights["layers.0.mlp.up_proj.weight"])


def test_tiled_weights_repeat_one_normal_tile():
    spec = get_preset("tiny-llama")  # tied lm_head, 64 x 512 embedding
    w = tiled_random_weights(spec, seed=1, tile=1000)
    assert w["lm_head.weight"] is w["embed_tokens.weight"]
    assert torch.equal(w["norm.weight"], torch.ones(64))
    flat = w["layers.1.mlp.down_proj.weight"].reshape(-1)  # 8192 values: the tile 8 times and a bit
    assert torch.equal(flat[:1000], flat[1000:2000]) and torch.equal(flat[:192], flat[8000:])
    assert not torch.equal(flat[:1000], w["layers.1.mlp.up_proj.weight"].reshape(-1)[:1000])
    assert abs(float(flat[:1000].std()) - 0.02) < 0.003 and abs(float(flat[:1000].mean())) < 0.003


@cuda
def test_tiled_weights_are_the_same_on_the_gpu():
    spec = get_preset("tiny-qwen2")
    cpu, gpu = tiled_random_weights(spec, torch.bfloat16, 7), tiled_random_weights(spec, torch.bfloat16, 7, "cuda")
    assert all(gpu[k].is_cuda and torch.equal(gpu[k].cpu(), v) for k, v in cpu.items())


# ---- KV bytes through the tiers ----------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_round_trip_through_host_is_exact(backend, dtype):
    """Device blocks moved to host and back to other device blocks hold the very same bytes;
    the host copies read on the CPU (after synchronize) do too."""
    engine = make_transfer_engine(backend)
    try:
        store = KVStore(engine, 48, 32, 16, 2, 64, dtype, prefetch_depth=1)
        dev, host = store.pools[Tier.DEVICE], store.pools[Tier.HOST]
        dev[:12] = torch.randn(12, *store.row_shape).to(dtype).to(dev.device)
        want = dev[:12].to("cpu", copy=True)
        src, mid, back = tuple(range(12)), (5, 6, 7, 20, 21, 30, 31, 0, 1, 2, 3, 9), tuple(range(30, 42))
        store.apply_moves([MoveOp("r", 0, Tier.DEVICE, src[:6], Tier.HOST, mid[:6]),
                           MoveOp("r", 1, Tier.DEVICE, src[6:], Tier.HOST, mid[6:])])
        dev[:12] = float("nan")  # the freed blocks reused at once: moves out must not see this
        store.apply_moves([MoveOp("r", 0, Tier.HOST, mid[:6], Tier.DEVICE, back[:6]),
                           MoveOp("r", 1, Tier.HOST, mid[6:], Tier.DEVICE, back[6:])])
        store.wait_moves()
        engine.synchronize()
        assert torch.equal(dev[30:42].cpu(), want)
        assert torch.equal(host[list(mid)], want)
    finally:
        engine.close()


@cuda
def test_cuda_engine_times_its_copies():
    """busy_seconds (the cost model's link time) grows per direction by what the copies took."""
    from orbitflow_kernels import Direction, TransferJob

    with make_transfer_engine("cuda") as engine:
        rows = torch.arange(256)
        dev = engine.alloc_device((256, 2, 8, 16, 128), torch.bfloat16)  # 64 KiB rows: 16 MiB
        host = engine.alloc_host((256, 2, 8, 16, 128), torch.bfloat16)
        engine.submit(TransferJob(host, dev, rows, rows.flip(0), Direction.H2D))
        engine.synchronize()
        busy = engine.busy_seconds
        assert busy[Direction.D2H] == 0 and busy[Direction.D2D] == 0
        assert 16 * 2**20 / 2e12 < busy[Direction.H2D] < 1.0  # under 2 TB/s: no PCIe/C2C link is faster
        engine.submit(TransferJob(dev, host, rows, rows, Direction.D2H))
        engine.synchronize()
        assert engine.busy_seconds[Direction.D2H] > 0 and engine.busy_seconds[Direction.H2D] == busy[Direction.H2D]


# ---- the engine on CUDA ------------------------------------------------------------------------
def _generate(model: str, policy: str, prompts, max_tokens: int = 10, **kw) -> tuple[list, dict]:
    llm = LLM(model=model, kv_policy=policy, backend="cuda",
              **{"device_kv_bytes": 8 << 20, "host_kv_bytes": 8 << 20, **kw})
    try:
        outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        return [o.token_ids for o in outs], llm.kv_stats()
    finally:
        llm.engine.close()


@cuda
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2", "tiny-llama3"])
@pytest.mark.parametrize("policy", ["no-offload", "all-offload"])
def test_cuda_greedy_matches_hf_on_the_gpu(model, policy):
    loaded = load_model(model)
    hf = build_hf_reference(loaded).to("cuda")
    ids = PROMPTS[3]
    got, stats = _generate(model, policy, [ids], max_tokens=6)
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([ids], device="cuda"), max_new_tokens=6, do_sample=False,
                          min_new_tokens=6, attention_mask=torch.ones(1, len(ids), dtype=torch.long, device="cuda"))
    assert got[0] == ref[0, len(ids):].tolist()
    assert (stats["bytes_h2d"] > 0) == (policy == "all-offload")


ORBITFLOW_UNDER_PRESSURE = {"device_kv_bytes": 300 << 10, "plan_windows": (4,)}


@cuda
@pytest.mark.parametrize("dtype,policy,kw", [
    *[(d, p, kw) for d in ("float32", "bfloat16") for p, kw in
      [("static-uniform", {}), ("all-offload", {"prefill_chunk_size": 64}), ("gpu-check-flip", {})]],
    # Pauses change the batch, hence matmul shapes: float32 only, where a changed cuBLAS
    # reduction order cannot flip a greedy token the way a bf16 rounding step can.
    ("float32", "orbitflow", ORBITFLOW_UNDER_PRESSURE)])
def test_cuda_offloading_and_moves_match_no_offload(dtype, policy, kw):
    chunk = {k: v for k, v in kw.items() if k == "prefill_chunk_size"}  # same prefill shapes
    base, _ = _generate("tiny-llama", "no-offload", PROMPTS, dtype=dtype, **chunk)
    got, stats = _generate("tiny-llama", policy, PROMPTS, dtype=dtype, **kw)
    assert got == base
    assert stats["bytes_h2d"] > 0 and stats["bytes_d2h"] > 0
    assert stats["device_kv_bytes_used"] == stats["host_kv_bytes_used"] == 0


# ---- the script itself -------------------------------------------------------------------------
@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """The whole script on the CPU backend with tiny sizes: every stage passes and lands in the JSON."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    run = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.log"]
    assert result["dry_run"] is True
    stages = result["stages"]
    assert set(stages) == {"env", "tests", "kv-integrity", "transfer", "host-overhead", "decode-no-offload",
                           "decode-static-uniform", "decode-no-offload-per-seq"}  # planner stages: GPU runs only
    assert all(s["rc"] == 0 for s in stages.values()), stages
    assert result["tests"]["failed"] == 0 and result["tests"]["passed"] > 0
    for direction in ("h2d", "d2h"):
        for name in ("engine_contiguous", "engine_blocks", "torch_same_buffers"):
            assert result["transfer"]["copy"][name][direction]["gb_per_s"] > 0
        assert result["transfer"]["copy"]["engine_contiguous"][direction]["checked_rows"] > 0
    for policy in ("no-offload", "static-uniform"):
        dec = result["decode"][policy]
        assert dec["decode_steps_full"] == dec["steps"] > 0
        assert 0 < dec["host_overhead_ms"]["median"] < dec["step_ms"]["median"]
        assert dec["tokens_per_s"] > 0
    assert result["decode"]["static-uniform"]["h2d_bytes_per_step"] > 0
    assert result["decode"]["no-offload"]["h2d_bytes_per_step"] == 0
    assert "summary" in run.stdout and "decode" in run.stdout.split("summary")[-1]
