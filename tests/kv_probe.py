"""A probe engine for KV content tests: the real Scheduler, tier manager, KVStore, ModelRunner and
CPU transfer engine, with a model whose K/V name their own (layer, position, token, head).

Each request's prompt is the run `base, base + 1, ...` and the probe model's next token is always
the last token + 1, so the token at position p of a request is `base + p`. A K/V entry of layer l,
position p, head h holds `[l, p, base + p, h]` (V negated): every value read back identifies where
it should have come from. `ProbeStore.read` checks each sequence's K/V on the path attention uses,
every layer of every step; `check_resident` checks every live request's blocks in both tiers
between steps, paused and swapped ones included.
"""

from __future__ import annotations

import ctypes

import torch

from orbitflow_kernels import gather_kv, make_transfer_engine
from orbitflow_ray.config import EngineConfig
from orbitflow_ray.costmodel import OnlineCostModel
from orbitflow_ray.costmodel.prior import engine_prior
from orbitflow_ray.kv.blocks import Tier
from orbitflow_ray.kv.store import KVStore
from orbitflow_ray.kv.tier_manager import KVTierManager
from orbitflow_ray.model.runner import ModelRunner
from orbitflow_ray.model.spec import ModelSpec
from orbitflow_ray.planner import policy_from_config
from orbitflow_ray.request import Request
from orbitflow_ray.sampling_params import SamplingParams
from orbitflow_ray.sched.feedback import feed_back
from orbitflow_ray.sched.scheduler import Scheduler

SPACING = 1 << 12  # token ids of request i are i * SPACING + position


def probe_spec(num_layers: int = 4, num_kv_heads: int = 2, max_len: int = SPACING - 1) -> ModelSpec:
    return ModelSpec(name="probe", vocab_size=SPACING * 64, hidden_size=8, intermediate_size=8,
                     num_layers=num_layers, num_heads=num_kv_heads, num_kv_heads=num_kv_heads, head_dim=4,
                     rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=max_len,
                     tie_word_embeddings=True)


def expected_kv(layer: int, base: int, num_tokens: int, num_kv_heads: int, device="cpu") -> torch.Tensor:
    """[2, Hkv, num_tokens, 4]: the K and V a request whose position 0 holds `base` must have."""
    pos = torch.arange(num_tokens, dtype=torch.float32, device=device)
    k = torch.stack([torch.full_like(pos, layer), pos, pos + base, torch.zeros_like(pos)], -1)
    k = k.unsqueeze(0).repeat(num_kv_heads, 1, 1)
    k[..., 3] = torch.arange(num_kv_heads, dtype=torch.float32, device=device)[:, None]
    return torch.stack([k, -k])


class ProbeModel:
    """Stands in for LlamaModel: the same forward/logits hooks, K/V that identify themselves."""

    def __init__(self, spec: ModelSpec, device: torch.device) -> None:
        self.spec = spec
        self.device = device

    def forward(self, input_ids, positions, attend, before_layer=None) -> torch.Tensor:
        s = self.spec
        n = input_ids.shape[0]
        heads = torch.arange(s.num_kv_heads, dtype=torch.float32, device=self.device)
        for layer in range(s.num_layers):
            if before_layer is not None:
                before_layer(layer)
            k = torch.empty(n, s.num_kv_heads, 4, device=self.device)
            k[..., 0] = layer
            k[..., 1] = positions.float()[:, None]
            k[..., 2] = input_ids.float()[:, None]
            k[..., 3] = heads
            attend(layer, torch.zeros(n, s.num_heads, 4, device=self.device), k, -k)
        return input_ids.float()[:, None]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = torch.full((hidden.shape[0], self.spec.vocab_size), -1e9, device=self.device)
        out[torch.arange(hidden.shape[0], device=self.device), hidden[:, 0].long() + 1] = 0.0
        return out


class ProbeStore(KVStore):
    """The real store; every read is compared with what the request's KV must be: the gathers of
    prefill chunks (`read`) and the paged tables batched decode attention reads (`decode_groups`)."""

    reads = 0

    def read(self, layer, i, k, v):
        keys, values = super().read(layer, i, k, v)
        self._check(layer, i, keys, values)
        return keys, values

    def decode_groups(self, layer):
        groups = super().decode_groups(layer)
        for g in groups:
            for j, i in enumerate(g.seqs.tolist()):
                row = int(g.rows[j]) if g.rows is not None else j
                n = int(g.seq_lens[j])
                kv = gather_kv(g.pool, g.table[row, :-(-n // self.block_size)], n)
                self._check(layer, i, kv[0:1], kv[1:2])
        return groups

    def _check(self, layer, i, keys, values):
        seq = self._seqs[i]
        n = seq.start_pos + len(seq.token_ids)
        want = expected_kv(layer, seq.token_ids[0] - seq.start_pos, n, keys.shape[1], keys.device)
        got = torch.stack([keys[0], values[0]])
        if not torch.equal(got, want):
            bad = (got != want).any(-1).nonzero()[0].tolist()
            raise AssertionError(f"{seq.request_id} layer {layer}: KV read back at (k/v, head, position) "
                                 f"{bad} is {got[tuple(bad)].tolist()}, expected {want[tuple(bad)].tolist()}")
        self.reads += 1


class ProbeEngine:
    """Scheduler + tier manager + store + runner + the config's transfer engine (CPU or CUDA),
    stepped on a virtual clock (so every policy decides deterministically), as `LLMEngine.step`
    runs them. `with_model=False` drops the data path (store, runner, transfer engine): each plan's
    tokens are sampled as the probe model would sample them, for tests of scheduling alone."""

    def __init__(self, config: EngineConfig, spec: ModelSpec | None = None, with_model: bool = True) -> None:
        self.spec = spec = spec or probe_spec()
        self.config = config
        self.clock = 0.0
        block_bytes = spec.kv_bytes_per_token_per_layer(4) * config.block_size
        dev, host = config.device_kv_bytes // block_bytes, config.host_kv_bytes // block_bytes
        self.cost = OnlineCostModel(engine_prior(spec, config.backend, config.link_bandwidth_bytes_per_s, 4))
        self.policy = policy_from_config(config, spec.num_layers, self.cost)
        self.kv = KVTierManager(spec.num_layers, config.block_size, block_bytes, dev, host)
        self.scheduler = Scheduler(config, self.kv, self.policy, frozenset(), spec.max_position_embeddings,
                                   clock=lambda: self.clock)
        self.transfer = self.store = self.runner = None
        if with_model:
            self.transfer = make_transfer_engine(config.backend, config.link_bandwidth_bytes_per_s)
            self.store = ProbeStore(self.transfer, dev, host, config.block_size, spec.num_kv_heads, 4,
                                    torch.float32, config.prefetch_depth)
            self.runner = ModelRunner(ProbeModel(spec, self.transfer.device), self.store)
        self.bases: dict[str, int] = {}
        self.prompt_lens: dict[str, int] = {}
        self.outputs: dict[str, list[int]] = {}
        self._n = 0

    def add(self, prompt_len: int, max_tokens: int) -> str:
        rid = f"r{self._n}"
        base = (self._n + 1) * SPACING
        self._n += 1
        req = Request(rid, list(range(base, base + prompt_len)), SamplingParams(max_tokens=max_tokens,
                                                                                ignore_eos=True))
        req.arrival_time = self.clock
        self.scheduler.check_fits(req)
        self.scheduler.add_request(req)
        self.bases[rid] = base
        self.prompt_lens[rid] = prompt_len
        self.outputs[rid] = req.output_token_ids
        return rid

    def step(self) -> None:
        out = self.scheduler.schedule()
        sampled = self.runner.execute(out).sampled if self.runner is not None else self._next_tokens(out)
        wall = 0.01 + 1e-5 * sum(s.start_pos + len(s.token_ids) for s in out.seqs)
        self.clock += wall
        feed_back(out, wall, self.clock, self.cost, self.policy)
        self.scheduler.update_from_output(out, sampled, self.clock)

    def _next_tokens(self, out) -> dict[str, int]:
        """What the probe model samples for `out`: each sampling sequence's last token id + 1."""
        return {s.request_id: s.token_ids[-1] + 1 for s in out.seqs if s.sample}

    def check_resident(self) -> None:
        """Every live request's KV, read straight from the pools of both tiers, is what it must be."""
        self.transfer.synchronize()
        bs = self.config.block_size
        for rid, req in self.scheduler.requests.items():
            if not self.kv.has(rid) or req.num_computed_tokens == 0:
                continue
            n = req.num_computed_tokens
            for layer, lk in enumerate(self.kv.table(rid)):
                pool = self.store.pools[Tier(lk.tier)]
                blocks = torch.as_tensor(lk.blocks[:-(-n // bs)], dtype=torch.int64, device=pool.device)
                rows = pool.index_select(0, blocks).cpu()  # [nb, 2, Hkv, bs, 4]
                got = rows.permute(1, 2, 0, 3, 4).reshape(2, rows.shape[2], -1, 4)[:, :, :n]
                want = expected_kv(layer, self.bases[rid], n, self.spec.num_kv_heads)
                if not torch.equal(got, want):
                    bad = (got != want).any(-1).nonzero()[0].tolist()
                    raise AssertionError(f"{rid} ({req.status.value}) layer {layer} on {Tier(lk.tier).name}: "
                                         f"resident KV at {bad} is {got[tuple(bad)].tolist()}, "
                                         f"expected {want[tuple(bad)].tolist()}")

    def check_outputs(self) -> None:
        """Each output continues its request's run: token i of the output is base + prompt + i."""
        for rid, out in self.outputs.items():
            first = self.bases[rid] + self.prompt_lens[rid]
            assert out == list(range(first, first + len(out))), f"{rid}: output {out} does not continue its prompt"

    def close(self) -> None:
        if self.transfer is not None:
            self.transfer.close()
        close = getattr(self.policy, "close", None)
        if close is not None:
            close()


def resident_pages(t: torch.Tensor) -> tuple[int, int]:
    """(pages wholly inside t's memory that are in RAM now, those pages), from mincore(2): which
    pages have been written. A page t shares with the allocator's header is left out."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    page = 4096
    start = -(-t.data_ptr() // page) * page
    pages = (t.data_ptr() + t.numel() * t.element_size() - start) // page
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(start, pages * page, vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec), pages
