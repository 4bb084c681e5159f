"""The engine's cost-model prior (`costmodel/prior.py`): the calibrated roofline of its device."""

import pytest

from orbitflow_ray.costmodel import default_prior
from orbitflow_ray.costmodel.prior import engine_prior, gpu_spec_for
from orbitflow_ray.model.loader import load_spec
from orbitflow_ray.sim.hardware import load_gpu
from orbitflow_ray.sim.roofline import Roofline


def test_the_cpu_backend_starts_from_the_calibrated_cpu_roofline_with_the_configured_link():
    spec = load_spec("smollm2-135m")
    prior = engine_prior(spec, "cpu", 2e9, 4)
    gpu = load_gpu("cpu-2core")
    tangent = Roofline(spec, gpu, 1, 4).cost_model(1, 1024)
    assert (prior.compute_a_s, prior.compute_b_s_per_token, prior.compute_p_s_per_token, prior.step_tail_s) == (
        tangent.compute_a_s, tangent.compute_b_s_per_token, tangent.compute_p_s_per_token, tangent.step_tail_s)
    assert prior.link_bytes_per_s == 2e9
    assert prior.copy_compute_s_per_byte == gpu.copy_compute_s_per_byte > 0  # copies cost compute on the CPU
    assert engine_prior(spec, "cpu", None, 4).link_bytes_per_s == gpu.link_bytes_per_s
    # The decode step it prices is the roofline's at the anchor (one request of 1024 tokens), head included.
    roofline = Roofline(spec, gpu, 1, 4)
    assert prior.compute_step_s(1024, 1) == pytest.approx(
        spec.num_layers * roofline.layer_time_s(1024, 1, 1) + roofline.head_time_s(1, 1), rel=1e-9)


def test_cuda_devices_map_to_their_specs_and_unknown_ones_to_the_generic_prior():
    assert gpu_spec_for("NVIDIA H100 80GB HBM3") == "h100-80gb-sxm"
    assert gpu_spec_for("NVIDIA H100 PCIe") == "h100-80gb-pcie"
    assert gpu_spec_for("NVIDIA H200") == "h200"
    assert gpu_spec_for("NVIDIA A100-SXM4-40GB") == "a100-40gb"
    assert gpu_spec_for("NVIDIA A100-SXM4-80GB") == "a100-80gb"
    assert gpu_spec_for("Tesla T4") is None
    spec = load_spec("smollm2-135m")
    on_h100 = engine_prior(spec, "cuda", None, 2, device_name="NVIDIA H100 80GB HBM3")
    assert on_h100.copy_compute_s_per_byte == 0.0  # DMA engines copy
    assert on_h100.link_bytes_per_s == load_gpu("h100-80gb-sxm").link_bytes_per_s
    assert engine_prior(spec, "cuda", None, 2, device_name="Tesla T4") == default_prior(spec.num_layers, None, "cuda")
    with pytest.raises(ValueError, match="backend"):
        engine_prior(spec, "tpu", None, 2)
