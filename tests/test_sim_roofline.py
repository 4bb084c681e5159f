"""Hardware specs, model configs and the roofline cost model of the simulator (fast, no torch)."""

import dataclasses

import pytest

from orbitflow_ray.model.presets import get_preset
from orbitflow_ray.sim.hardware import GpuSpec, available_gpus, available_models, load_gpu, load_model_spec
from orbitflow_ray.sim.roofline import Roofline

GPUS = ["a100-40gb", "a100-80gb", "h100-80gb-pcie", "h100-80gb-sxm", "h200", "l40s", "rtx-a6000", "cpu-2core"]
PRESET_MODELS = ["llama-3.1-8b", "llama-3-70b", "llama-3-8b-1048k", "qwen2.5-7b", "mistral-7b"]


def _rl(model="llama-3.1-8b", gpu="a100-80gb", tp=1) -> Roofline:
    return Roofline(load_model_spec(model), load_gpu(gpu), tp=tp)


def _decode_s(rl: Roofline, batch: int, context_each: int) -> float:
    return rl.step_compute_s(batch * context_each, batch, batch, batch)


# --- specs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GPUS)
def test_every_gpu_loads_with_sane_numbers(name):
    assert name in available_gpus()
    g = load_gpu(name)
    assert g.name == name and 1e11 <= g.peak_flops <= 2e15 and 1e10 <= g.hbm_bytes_per_s <= 1e13
    assert 16 << 30 <= g.hbm_bytes <= 256 << 30 and g.link_bytes_per_s < g.host_link_bytes_per_s


def test_datasheet_ordering():
    a40, a80, h100, h200 = (load_gpu(n) for n in ("a100-40gb", "a100-80gb", "h100-80gb-sxm", "h200"))
    assert a40.peak_flops == a80.peak_flops < h100.peak_flops == h200.peak_flops
    assert a40.hbm_bytes_per_s < a80.hbm_bytes_per_s < h100.hbm_bytes_per_s < h200.hbm_bytes_per_s
    assert a80.host_link_bytes_per_s * 2 == h100.host_link_bytes_per_s  # PCIe Gen4 vs Gen5
    assert load_gpu("h100-80gb-pcie").interconnect_bytes_per_s < h100.interconnect_bytes_per_s


def test_a_fitted_efficiency_above_one_raises_the_peak_and_predicts_the_same_steps():
    """calibrate's fit may find a machine faster than the base spec's peaks (efficiency > 1); the spec
    it writes moves the excess into peak_flops / hbm_bytes_per_s, so every rate the roofline reads
    (peak x efficiency) is the fitted one and the spec still validates."""
    from orbitflow_ray.sim.calibrate import _with_factors
    base = load_gpu("cpu-2core")
    factors = {"compute_efficiency": 1.63, "memory_efficiency": 0.9, "kv_read_efficiency": 2.0,
               "per_step_overhead_s": 1e-3, "per_layer_overhead_s": 5e-5, "per_seq_layer_overhead_s": 3e-5,
               "copy_compute_s_per_byte": 4e-10}
    gpu = _with_factors(base, factors)
    assert gpu.flops == pytest.approx(base.peak_flops * 1.63)
    assert gpu.memory_bytes_per_s == pytest.approx(base.hbm_bytes_per_s * 0.9)
    assert gpu.hbm_bytes_per_s * gpu.kv_read_efficiency == pytest.approx(base.hbm_bytes_per_s * 2.0)
    assert gpu.compute_efficiency == 1.0 and gpu.kv_read_efficiency == 1.0 and gpu.memory_efficiency == pytest.approx(0.45)
    within = _with_factors(base, {**factors, "compute_efficiency": 0.5, "kv_read_efficiency": 0.3})
    assert (within.peak_flops, within.hbm_bytes_per_s) == (base.peak_flops, base.hbm_bytes_per_s)
    spec = load_model_spec("smollm2-135m")
    stretched = Roofline(spec, base.replace(peak_flops=base.peak_flops * 1.63, hbm_bytes_per_s=base.hbm_bytes_per_s * 2,
                                            compute_efficiency=1.0, memory_efficiency=0.45, kv_read_efficiency=1.0,
                                            per_step_overhead_s=1e-3, per_layer_overhead_s=5e-5,
                                            per_seq_layer_overhead_s=3e-5, copy_compute_s_per_byte=4e-10), 1, 4)
    assert Roofline(spec, gpu, 1, 4).step_compute_s(4000, 8, 8, 8) == pytest.approx(stretched.step_compute_s(4000, 8, 8, 8))


def test_replace_returns_a_validated_calibrated_copy():
    g = load_gpu("a100-80gb")
    c = g.replace(memory_efficiency=0.9, per_layer_overhead_s=0.0)
    assert c.memory_efficiency == 0.9 and g.memory_efficiency != 0.9 and c.peak_flops == g.peak_flops
    with pytest.raises(ValueError, match="memory_efficiency must be in \\(0, 1\\]"):
        g.replace(memory_efficiency=1.2)


@pytest.mark.parametrize("field, value, message", [
    ("peak_flops", 0.0, "peak_flops must be a positive number"),
    ("hbm_bytes", -1, "hbm_bytes must be a positive number"),
    ("host_link_bytes_per_s", "fast", "host_link_bytes_per_s must be a positive number"),
    ("compute_efficiency", 0.0, "compute_efficiency must be in"),
    ("host_link_efficiency", 1.5, "host_link_efficiency must be in"),
    ("per_step_overhead_s", -1e-3, "per_step_overhead_s must be >= 0"),
])
def test_invalid_gpu_specs_raise_clear_errors(field, value, message):
    fields = {f.name: getattr(load_gpu("l40s"), f.name) for f in dataclasses.fields(GpuSpec)}
    with pytest.raises(ValueError, match=message):
        GpuSpec(**{**fields, field: value})


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="unknown GPU 'b200'.*a100-80gb"):
        load_gpu("b200")
    with pytest.raises(ValueError, match="unknown model 'gpt-5'.*llama-3.1-8b"):
        load_model_spec("gpt-5")


@pytest.mark.parametrize("name", PRESET_MODELS)
def test_model_configs_match_the_python_presets(name):
    spec, preset = load_model_spec(name), get_preset(name)
    for f in dataclasses.fields(preset):
        assert getattr(spec, f.name) == getattr(preset, f.name), f.name  # includes rope_scaling


def test_qwen25_14b_architecture():
    s = load_model_spec("qwen2.5-14b")
    assert (s.hidden_size, s.intermediate_size, s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim) == \
        (5120, 13824, 48, 40, 8, 128)
    assert s.vocab_size == 152064 and s.rope_theta == 1e6 and s.max_position_embeddings == 32768
    assert s.attention_bias and not s.tie_word_embeddings
    assert set(available_models()) == set(PRESET_MODELS) | {"qwen2.5-14b"}


# --- roofline ------------------------------------------------------------------------------------


def test_llama8b_decode_on_a100_is_weight_bandwidth_bound():
    rl = _rl()
    assert 15.5e9 < rl.weight_bytes_per_gpu < 16.5e9  # 8.03B bf16 parameters
    step = _decode_s(rl, 1, 1000)
    assert 7e-3 < step < 15e-3
    g = rl.gpu
    assert step > rl.weight_bytes_per_gpu / (g.hbm_bytes_per_s * g.memory_efficiency) * 0.9
    assert _decode_s(rl, 1, 1000) < _decode_s(_rl(gpu="h100-80gb-sxm"), 1, 1000) * 2  # ~1.6x bandwidth
    assert _decode_s(_rl(gpu="h200"), 1, 1000) < _decode_s(rl, 1, 1000)


def test_kv_bytes_per_token_per_layer():
    assert _rl().kv_bytes_per_token_per_layer == 4096  # 2 * 8 kv heads * 128 * bf16
    assert _rl("qwen2.5-7b").kv_bytes_per_token_per_layer == 2048


def test_tp4_divides_kv_and_weights_and_adds_allreduces():
    rl1, rl4 = _rl("llama-3-70b", "h100-80gb-sxm"), _rl("llama-3-70b", "h100-80gb-sxm", tp=4)
    assert rl4.kv_bytes_per_token_per_layer * 4 == rl1.kv_bytes_per_token_per_layer
    m = rl1.model  # the embedding and LM head (untied here) stay whole on every GPU, as in the engine
    replicated = 2 * m.vocab_size * m.hidden_size * 2
    assert rl4.weight_bytes_per_gpu == pytest.approx(replicated + (rl1.weight_bytes_per_gpu - replicated) / 4,
                                                     rel=1e-3)
    assert rl1.device_kv_capacity_bytes() == 0  # 141 GB of weights do not fit one H100
    assert rl4.device_kv_capacity_bytes() > 30e9
    assert rl1.allreduce_s(16) == 0 and rl4.allreduce_s(16) > 0
    free_link = rl4.gpu.replace(interconnect_bytes_per_s=1e30, interconnect_latency_s=0.0)
    rl4_free = Roofline(rl4.model, free_link, tp=4)
    assert rl4.layer_time_s(16_000, 16, 16) == pytest.approx(
        rl4_free.layer_time_s(16_000, 16, 16) + 2 * rl4.allreduce_s(16))
    assert rl4.layer_time_s(16_000, 16, 16) < rl1.layer_time_s(16_000, 16, 16)
    with pytest.raises(ValueError, match="tp=3 must divide"):
        _rl("llama-3-70b", "h100-80gb-sxm", tp=3)


def test_decode_layer_time_is_linear_in_context():
    rl = _rl()
    t = [rl.layer_time_s(c, 8, 8) for c in (0, 10_000, 20_000, 40_000)]
    assert t[0] < t[1] < t[2] < t[3]
    assert t[2] - t[1] == pytest.approx(t[1] - t[0], rel=1e-9)
    assert t[3] - t[2] == pytest.approx(2 * (t[1] - t[0]), rel=1e-9)
    # KV-bytes bound: the slope is the KV of one token over the achieved bandwidth
    slope = (t[1] - t[0]) / 10_000
    assert slope == pytest.approx(4096 / (rl.gpu.hbm_bytes_per_s * rl.gpu.memory_efficiency), rel=1e-9)


def test_prefill_is_compute_bound():
    rl = _rl()
    chunk = rl.layer_time_s(0, 8192, 1)
    assert chunk > 20 * rl.layer_time_s(0, 1, 1)
    assert 0.3 < rl.step_compute_s(0, 8192, 1, 1) < 1.2  # ~2 * 8B * 8192 FLOPs at ~220 TFLOP/s


def test_head_time_counts_only_sampled_rows_and_the_step_overhead():
    rl = _rl()
    assert rl.head_time_s(0, 512) < rl.head_time_s(1, 512)
    assert rl.head_time_s(0, 1) == pytest.approx(rl.gpu.per_step_overhead_s, rel=0.01)
    assert rl.step_compute_s(8000, 8, 8, 8) == pytest.approx(
        32 * rl.layer_time_s(8000, 8, 8) + rl.head_time_s(8, 8))
    with pytest.raises(ValueError):
        rl.head_time_s(9, 8)
    with pytest.raises(ValueError):
        rl.layer_time_s(100, 0, 1)


def test_device_kv_capacity_and_transfer():
    rl = _rl()
    cap = rl.device_kv_capacity_bytes()
    assert cap == int(rl.gpu.hbm_bytes * 0.9 - rl.weight_bytes_per_gpu - (2 << 30))
    assert rl.device_kv_capacity_bytes(memory_fraction=0.5) < cap
    with pytest.raises(ValueError):
        rl.device_kv_capacity_bytes(memory_fraction=0.0)
    assert rl.transfer_s(25_600_000_000) == pytest.approx(1.0)  # 32 GB/s PCIe Gen4 x 0.8


@pytest.mark.parametrize("model, gpu, batch, context", [
    ("llama-3.1-8b", "a100-80gb", 16, 4000), ("llama-3.1-8b", "rtx-a6000", 4, 30_000),
    ("qwen2.5-14b", "l40s", 1, 500), ("llama-3-8b-1048k", "h200", 2, 200_000),
])
def test_cost_model_matches_roofline_at_anchor_and_nearby(model, gpu, batch, context):
    rl = _rl(model, gpu)
    cm = rl.cost_model(batch, context)
    assert cm.num_layers == rl.model.num_layers and cm.link_bytes_per_s == rl.gpu.link_bytes_per_s
    # The linear model spreads the head (LM head, step overhead) over the layers: it predicts the
    # whole decode step, L * layer_s == step_compute_s, exactly at the anchor.
    head = rl.head_time_s(batch, batch) / rl.model.num_layers
    anchor = rl.layer_time_s(batch * context, batch, batch) + head
    assert cm.layer_s(batch * context, batch) == pytest.approx(anchor, rel=1e-9)
    assert cm.compute_step_s(batch * context, batch) == pytest.approx(
        rl.step_compute_s(batch * context, batch, batch, batch), rel=1e-9)
    for b, c in [(batch + 1, context), (max(1, batch - 1), context), (batch, int(context * 1.2)),
                 (batch, int(context * 0.8)), (batch + 2, int(context * 1.1))]:
        assert cm.layer_s(b * c, b) == pytest.approx(rl.layer_time_s(b * c, b, b) + head, rel=0.03)
    a_dec, b_dec = cm.decode_layer_coeffs(batch)
    assert a_dec + b_dec * batch * context == pytest.approx(anchor, rel=1e-9)
