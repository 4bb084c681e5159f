"""The Triton kernel behind `paged_decode_attention(impl="triton")` (imported only where Triton is).

Grid (sequence, KV head, split). A program reads its sequence's block-table row, takes its share
of the blocks (split-K: short batches still fill the GPU), and for each block loads K and V of its
KV head straight from the pool, `[bs, D]` each, scores all G query heads of that KV head against
them and folds them into a running max / sum / output (fp32). The splits' partials are merged by
`paged_decode` with the same rescaling. Under TRITON_INTERPRET=1 it runs on CPU tensors (tests).
"""

from __future__ import annotations

import triton
import triton.language as tl
import torch

_TARGET_PROGRAMS = 512  # enough (sequence, head, split) programs to keep every SM busy


@triton.jit
def _paged_decode_kernel(q_ptr, pool_ptr, table_ptr, rows_ptr, lens_ptr, m_ptr, l_ptr, o_ptr,
                         table_stride, splits, scale,
                         HKV: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr,
                         BD: tl.constexpr, BS: tl.constexpr, HAS_ROWS: tl.constexpr):
    r = tl.program_id(0)
    kh = tl.program_id(1)
    sp = tl.program_id(2)
    seq_len = tl.load(lens_ptr + r)
    if HAS_ROWS:
        row = tl.load(rows_ptr + r)
    else:
        row = r.to(tl.int64)
    nblocks = tl.cdiv(seq_len, BS)
    per = tl.cdiv(nblocks, splits)
    b0 = sp * per
    b1 = tl.minimum(b0 + per, nblocks)
    offs_g = tl.arange(0, BG)
    offs_d = tl.arange(0, BD)
    offs_t = tl.arange(0, BS)
    gmask = offs_g < G
    dmask = offs_d < D
    q_rows = r * (HKV * G) + kh * G + offs_g
    q = tl.load(q_ptr + q_rows[:, None] * D + offs_d[None, :], mask=gmask[:, None] & dmask[None, :],
                other=0.0).to(tl.float32)
    m = tl.full([BG], float("-inf"), tl.float32)
    lsum = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, BD], tl.float32)
    kv_off = offs_t[:, None] * D + offs_d[None, :]
    for b in range(b0, b1):
        blk = tl.load(table_ptr + row * table_stride + b).to(tl.int64)
        tmask = (b * BS + offs_t) < seq_len
        lmask = tmask[:, None] & dmask[None, :]
        k = tl.load(pool_ptr + ((blk * 2) * HKV + kh) * (BS * D) + kv_off, mask=lmask, other=0.0)
        s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2) * scale  # [BG, BS]
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        corr = tl.exp(m - m_new)
        lsum = lsum * corr + tl.sum(p, axis=1)
        v = tl.load(pool_ptr + ((blk * 2 + 1) * HKV + kh) * (BS * D) + kv_off, mask=lmask, other=0.0)
        acc = acc * corr[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        m = m_new
    part = (r * HKV + kh) * splits + sp
    tl.store(m_ptr + part * BG + offs_g, m)
    tl.store(l_ptr + part * BG + offs_g, lsum)
    tl.store(o_ptr + (part * BG + offs_g)[:, None] * BD + offs_d[None, :], acc)


def paged_decode(q: torch.Tensor, pool: torch.Tensor, table: torch.Tensor, lens: torch.Tensor,
                 scale: float, rows: torch.Tensor | None) -> torch.Tensor:
    """See `attention.paged_decode_attention`; pool and q must be contiguous."""
    r, h, d = q.shape
    _, _, hkv, bs, _ = pool.shape
    g = h // hkv
    if bs & (bs - 1):
        raise ValueError(f"the Triton decode kernel needs a power-of-two block size, got {bs}")
    q = q.contiguous()
    pool = pool if pool.is_contiguous() else pool.contiguous()
    table = table.to(torch.int64).contiguous()
    max_blocks = table.shape[1]
    splits = max(1, min(max_blocks, -(-_TARGET_PROGRAMS // (r * hkv))))
    bg, bd = triton.next_power_of_2(g), triton.next_power_of_2(d)
    m = torch.empty(r, hkv, splits, bg, device=q.device, dtype=torch.float32)
    lsum = torch.empty_like(m)
    o = torch.empty(r, hkv, splits, bg, bd, device=q.device, dtype=torch.float32)
    rows_arg = rows if rows is not None else lens  # an unused pointer when HAS_ROWS is False
    _paged_decode_kernel[(r, hkv, splits)](q, pool, table, rows_arg, lens, m, lsum, o, table.stride(0),
                                           splits, scale, HKV=hkv, G=g, BG=bg, D=d, BD=bd, BS=bs,
                                           HAS_ROWS=rows is not None)
    top = m.amax(2, keepdim=True)  # split 0 always holds the first block: finite
    w = torch.exp(m - top)  # an empty split has m = -inf: weight 0
    out = (w[..., None] * o).sum(2) / (w * lsum).sum(2)[..., None]  # [R, Hkv, BG, BD]
    return out[:, :, :g, :d].reshape(r, h, d).to(q.dtype)
