"""Triton kernels of paged attention: decode (split-K, GQA-aware) and prefill (causal, chunked).

Both read K/V straight from the pool ``[num_blocks, block_size, kv_heads,
head_dim]`` of one layer through the block table: token ``p`` of sequence
``b`` is at ``pool[table[b, p // PAGE], p % PAGE]``. Every block id loaded
from the table is bounds-checked in the kernel (masked loads; a bad id reads
nothing and its tokens are masked out), in addition to the host validation.

Decode (flash-decoding): one program per (sequence, KV head, split) serves
all ``GROUP`` query heads of that KV head, so each K/V block is read once per
group; a split covers ``split_len`` tokens; partial (acc, max, sum) go to a
float32 buffer that ``decode_reduce_kernel`` merges (or, with one split, the
kernel normalises and writes the output itself). A window or an attention
chunk (``CHUNK``: chunked-local attention) moves the first visible token, so
splits before it read nothing. A sink (``SINKS``) is a key with a logit and
no value, joined exactly once: as the initial (max, sum) = (sink, 1) of the
online softmax, in the decode kernel when there is one split, else in the
reduction (never once per split).

Prefill: one program per (query tile of ``BLOCK_M`` rows of one sequence,
query head); the tile's queries sit at positions ``seq_len - n + row`` and
scan only the key range their causal/window/chunk masks can see (a tile that
straddles a chunk boundary masks each row to its own chunk). Sinks start
each row's online softmax as in decode.

Conventions (``pagedkv_core.contract.attention``): scores ``scale * q.k``, then
``soft_cap * tanh(s / soft_cap)``, then masks; softmax in float32.
``UPCAST`` makes both dot operands float32 (quantized pools, float32 pools,
and bfloat16 under the interpreter, whose bfloat16 dot is not exact).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["paged_decode_kernel", "decode_reduce_kernel", "paged_prefill_kernel"]


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))  # never overflows
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _load_tokens(pool_ptr, scale_ptr, table_row_ptr, tok, end, kvh, num_blocks, d, dmask,
                 s_kb, s_kt, s_kh, s_sb, PAGE: tl.constexpr, QUANT: tl.constexpr, UPCAST: tl.constexpr):
    """Tokens ``tok`` (``[BLOCK_N]``) of one KV head -> (values ``[BLOCK_N, D_PAD]``, per-token scale, valid)."""
    in_range = tok < end
    page = tl.load(table_row_ptr + tok // PAGE, mask=in_range, other=-1)
    ok = in_range & (page >= 0) & (page < num_blocks)
    page64 = tl.where(ok, page, 0).to(tl.int64)
    offs = page64 * s_kb + (tok % PAGE).to(tl.int64) * s_kt + kvh * s_kh
    x = tl.load(pool_ptr + offs[:, None] + d[None, :], mask=ok[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    if QUANT:
        sc = tl.load(scale_ptr + page64 * s_sb + kvh, mask=ok, other=0.0)
    else:
        sc = tl.zeros_like(tok).to(tl.float32) + 1.0
    return x, sc, ok


@triton.jit
def paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, table_ptr, lens_ptr, out_ptr, part_o_ptr, part_ml_ptr, sinks_ptr,
    scale, soft_cap, window, chunk, num_blocks, split_len,
    s_qb, s_qh, s_kb, s_kt, s_kh, s_sb, s_tb, s_ob, s_oh,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr, SOFT_CAP: tl.constexpr,
    WINDOW: tl.constexpr, CHUNK: tl.constexpr, SINKS: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, DIRECT: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_kv = tl.num_programs(1)
    num_splits = tl.num_programs(2)
    seq_len = tl.load(lens_ptr + b)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    if WINDOW:
        start = tl.maximum(start, seq_len - window)
    if CHUNK:
        start = tl.maximum(start, (seq_len - 1) // chunk * chunk)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + b.to(tl.int64) * s_qb + heads[:, None] * s_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    if SINKS and DIRECT:  # one split: the sink joins here; else once, in decode_reduce_kernel
        m_i = tl.load(sinks_ptr + heads, mask=gmask, other=0.0)
        l_i = l_i + 1.0
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    table_row = table_ptr + b.to(tl.int64) * s_tb
    for tok0 in range(start, end, BLOCK_N):
        tok = tok0 + tl.arange(0, BLOCK_N)
        k, k_sc, ok = _load_tokens(k_ptr, ks_ptr, table_row, tok, end, kvh, num_blocks, d, dmask,
                                   s_kb, s_kt, s_kh, s_sb, PAGE, QUANT, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = s * (k_sc * scale)[None, :]
        if SOFT_CAP:
            s = soft_cap * _tanh(s / soft_cap)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v, v_sc, _ = _load_tokens(v_ptr, vs_ptr, table_row, tok, end, kvh, num_blocks, d, dmask,
                                  s_kb, s_kt, s_kh, s_sb, PAGE, QUANT, UPCAST)
        if QUANT:
            p = p * v_sc[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    if DIRECT:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b.to(tl.int64) * s_ob + heads[:, None] * s_oh + d[None, :], out,
                 mask=gmask[:, None] & dmask[None, :])
    else:
        row = ((b * num_kv + kvh) * num_splits + split).to(tl.int64) * G_PAD + g
        tl.store(part_o_ptr + row[:, None] * D_PAD + d[None, :], acc)
        tl.store(part_ml_ptr + row * 2, m_i)
        tl.store(part_ml_ptr + row * 2 + 1, l_i)


@triton.jit
def decode_reduce_kernel(
    part_o_ptr, part_ml_ptr, out_ptr, sinks_ptr, num_splits, s_ob, s_oh,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    SINKS: tl.constexpr,
):
    """Merge the splits of one (sequence, KV head): rescale each partial to the common max.

    With ``SINKS`` the merge starts from each head's sink (max ``sink``, sum
    1, no value), which is how the sink joins a split context exactly once.
    """
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    num_kv = tl.num_programs(1)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    total = tl.zeros([G_PAD], tl.float32)
    if SINKS:
        m = tl.load(sinks_ptr + kvh * GROUP + g, mask=g < GROUP, other=0.0)
        total = total + 1.0
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for split in range(0, num_splits):
        row = ((b * num_kv + kvh) * num_splits + split).to(tl.int64) * G_PAD + g
        m_s = tl.load(part_ml_ptr + row * 2)
        l_s = tl.load(part_ml_ptr + row * 2 + 1)
        o_s = tl.load(part_o_ptr + row[:, None] * D_PAD + d[None, :])
        m_new = tl.maximum(m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp(m - m_safe)
        c = tl.exp(m_s - m_safe)
        total = total * a + l_s * c
        acc = acc * a[:, None] + o_s * c[:, None]
        m = m_new
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    heads = kvh * GROUP + g
    tl.store(out_ptr + b.to(tl.int64) * s_ob + heads[:, None] * s_oh + d[None, :], out,
             mask=(g < GROUP)[:, None] & (d < HEAD_DIM)[None, :])


@triton.jit
def paged_prefill_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, table_ptr, lens_ptr, qsl_ptr, tile_seq_ptr, tile_row_ptr, out_ptr,
    sinks_ptr, scale, soft_cap, window, chunk, num_blocks,
    s_qt, s_qh, s_kb, s_kt, s_kh, s_sb, s_tb, s_ot, s_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr, SOFT_CAP: tl.constexpr,
    WINDOW: tl.constexpr, CHUNK: tl.constexpr, SINKS: tl.constexpr, CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    b = tl.load(tile_seq_ptr + tile)
    r0 = tl.load(tile_row_ptr + tile)
    q0 = tl.load(qsl_ptr + b)
    n = tl.load(qsl_ptr + b + 1) - q0
    seq_len = tl.load(lens_ptr + b)
    rows = r0 + tl.arange(0, BLOCK_M)
    rmask = rows < n
    t = seq_len - n + rows  # the queries' positions
    d = tl.arange(0, D_PAD)
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + (q0 + rows).to(tl.int64)[:, None] * s_qt + h * s_qh + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    lo = 0
    hi = seq_len
    t_first = seq_len - n + r0
    t_last = seq_len - n + tl.minimum(r0 + BLOCK_M, n) - 1
    if CAUSAL or WINDOW:  # a window implies p <= t as well
        hi = t_last + 1
    if WINDOW:
        lo = tl.maximum(t_first - window + 1, 0)
    if CHUNK:  # the tile's rows see from the first row's chunk to the last row's (each row masked to its own)
        lo = tl.maximum(lo, t_first // chunk * chunk)
        hi = tl.minimum(hi, (t_last // chunk + 1) * chunk)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if SINKS:
        m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(sinks_ptr + h)
        l_i = l_i + 1.0
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    table_row = table_ptr + b.to(tl.int64) * s_tb
    for tok0 in range(lo, hi, BLOCK_N):
        tok = tok0 + tl.arange(0, BLOCK_N)
        k, k_sc, ok = _load_tokens(k_ptr, ks_ptr, table_row, tok, hi, kvh, num_blocks, d, dmask,
                                   s_kb, s_kt, s_kh, s_sb, PAGE, QUANT, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = s * (k_sc * scale)[None, :]
        if SOFT_CAP:
            s = soft_cap * _tanh(s / soft_cap)
        visible = ok[None, :] & rmask[:, None]
        if CAUSAL or WINDOW:
            visible = visible & (tok[None, :] <= t[:, None])
        if WINDOW:
            visible = visible & (tok[None, :] > t[:, None] - window)
        if CHUNK:
            visible = visible & (tok[None, :] // chunk == t[:, None] // chunk)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v, v_sc, _ = _load_tokens(v_ptr, vs_ptr, table_row, tok, hi, kvh, num_blocks, d, dmask,
                                  s_kb, s_kt, s_kh, s_sb, PAGE, QUANT, UPCAST)
        if QUANT:
            p = p * v_sc[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (q0 + rows).to(tl.int64)[:, None] * s_ot + h * s_oh + d[None, :], out,
             mask=rmask[:, None] & dmask[None, :])
