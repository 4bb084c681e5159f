"""A tensor-parallel shard's weights, no Ray: read sliced from a safetensors directory they equal
the full load sliced by `shard_weights`, and the split tensors cost each shard ~1/N of their bytes
(counted at the safetensors reader, not timed); a shard's weight bytes are what the simulator's
roofline charges one GPU."""

from collections import Counter

import pytest
import safetensors
import safetensors.torch
import torch

from orbitflow_ray.config import EngineConfig
from orbitflow_ray.executor import ShardWorker
from orbitflow_ray.model import loader, tp_loader
from orbitflow_ray.model.loader import load_model, load_spec
from orbitflow_ray.model.tp import TPShard, kv_heads_per_shard, shard_weights
from orbitflow_ray.sim.hardware import load_gpu
from orbitflow_ray.sim.roofline import Roofline


class _CountingReader:
    """safetensors.safe_open that adds the bytes of every tensor (or part) it hands out to `read`
    (keyed by our names: no `model.` prefix)."""

    def __init__(self, read: Counter, path: str, framework: str) -> None:
        self.read, self.inner = read, safetensors.safe_open(path, framework=framework)

    def __enter__(self):
        self.f = self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def keys(self):
        return self.f.keys()

    def get_tensor(self, key):
        t = self.f.get_tensor(key)
        self.read[key.removeprefix("model.")] += t.numel() * t.element_size()
        return t

    def get_slice(self, key):
        reader, part = self, self.f.get_slice(key)

        class _Slice:
            def get_shape(self):
                return part.get_shape()

            def __getitem__(self, index):
                t = part[index]
                reader.read[key.removeprefix("model.")] += t.numel() * t.element_size()
                return t
        return _Slice()


@pytest.mark.parametrize("model,size", [("tiny-llama", 2), ("tiny-llama", 4), ("tiny-qwen2", 2)])
def test_sliced_safetensors_load_is_the_full_load_sliced(tmp_path, monkeypatch, model, size):
    """tiny-llama at 4 shards has 2 KV heads: each KV head is read by the 2 shards that use it."""
    loader.build_hf_reference(load_model(model, seed=3)).save_pretrained(tmp_path)
    full = load_model(str(tmp_path)).weights
    spec = load_spec(str(tmp_path))
    checkpoint = {k.removeprefix("model."): v.numel() * v.element_size()
                  for f in tmp_path.glob("*.safetensors")
                  for k, v in safetensors.torch.load_file(str(f)).items()}
    read = Counter()
    monkeypatch.setattr(tp_loader, "safe_open", lambda path, framework: _CountingReader(read, path, framework))
    kv_share = kv_heads_per_shard(spec, size) / spec.num_kv_heads
    for rank in range(size):
        shard = TPShard(spec, size, rank)
        read.clear()
        got = tp_loader.load_shard_weights(str(tmp_path), shard)
        want = shard_weights(full, shard)
        assert got.keys() == want.keys()
        for name, w in want.items():
            assert got[name].dtype == w.dtype and torch.equal(got[name], w), name
        assert (got["lm_head.weight"] is got["embed_tokens.weight"]) == spec.tie_word_embeddings
        split = [k for k in checkpoint if shard.weight_slice(k) is not None]
        for name in checkpoint:  # split tensors: the shard's share; the rest: read whole, once
            share = kv_share if name.split(".")[-2] in ("k_proj", "v_proj") else 1 / size
            assert read[name] == (checkpoint[name] * share if name in split else checkpoint[name]), name
        split_read, split_total = sum(read[k] for k in split), sum(checkpoint[k] for k in split)
        print(f"{model} TP{size} rank {rank}: read {split_read / split_total:.3f} of the split tensors' "
              f"bytes, {sum(read.values()) / sum(checkpoint.values()):.3f} of the checkpoint")
        if size <= spec.num_kv_heads:
            assert split_read * size == split_total
        else:  # KV heads replicated: only k and v are read by more than one shard
            assert split_total / size < split_read < split_total / size * 1.25


def test_other_sources_load_whole_then_slice():
    """Presets (and the GGUF, and .bin directories) go through load_model then shard_weights."""
    spec = load_spec("tiny-llama")
    shard = TPShard(spec, 2, 1)
    got = tp_loader.load_shard_weights("tiny-llama", shard, seed=5)
    want = shard_weights(load_model("tiny-llama", seed=5).weights, shard)
    assert got.keys() == want.keys() and all(torch.equal(got[k], w) for k, w in want.items())


def test_a_checkpoint_of_another_shape_is_refused_by_name(tmp_path):
    loader.build_hf_reference(load_model("tiny-llama")).save_pretrained(tmp_path)
    wrong = TPShard(load_spec("tiny-qwen2"), 2, 0)  # biases and an untied LM head the checkpoint lacks
    with pytest.raises(ValueError, match="missing .*q_proj.bias"):
        tp_loader.read_safetensors_shard(tmp_path, wrong, torch.float32)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
def test_roofline_weight_bytes_per_gpu_are_a_shards_weight_tensors(model):
    """The simulator charges each GPU what a ShardWorker holds: 1/2 of the layers' linears, whole
    norms, embedding and LM head (replicated; rank 0 computes the logits)."""
    spec = load_spec(model)
    roofline = Roofline(spec, load_gpu("cpu-2core"), tp=2, dtype_bytes=4)
    config = EngineConfig(model=model, tensor_parallel_size=2)
    for rank in range(2):  # built in-process: construction runs no collective
        worker = ShardWorker(config, rank, device_blocks=4, host_blocks=4, all_reduce=lambda t: None)
        assert worker.describe()["weight_bytes"] == roofline.weight_bytes_per_gpu
        worker.close()
    whole = sum(t.numel() * t.element_size() for k, t in load_model(model).weights.items()
                if not (k == "lm_head.weight" and spec.tie_word_embeddings))
    assert roofline.weight_bytes_per_gpu < whole == Roofline(spec, load_gpu("cpu-2core"), dtype_bytes=4).weight_bytes_per_gpu
