"""Flash attention in Triton, forward and backward, for causal, packed and key-masked attention.

Four layers (STYLE.md, after FlashAttention's Triton port): the `@triton.jit` kernels; launchers
that check shapes, dtypes and strides and build the grid; an `autograd.Function`; and the public
`flash_attention` (what to mask, in the caller's terms). The spec is
`alignloop/kernels/attention_reference.py`; docs/kernels.md has the tolerances and limits.

The algorithm is FlashAttention-2 (Dao, 2023): each program owns a block of query rows, streams
key/value blocks through an online softmax and keeps only the log-sum-exp per row for the
backward, which recomputes the probabilities block by block. Every variant is one mask
representation, per query row `i` an allowed key range `[lo[b, i], hi[b, i])`, optionally
intersected with a dense boolean mask `(B, Lq, Lk)` for masks that are not one range per row:

- causal (bottom-right aligned): `lo = 0`, `hi = i + 1 + Lk - Lq`
- packed documents (position ids restarting at 0): `lo` = first token of row i's document
- key padding / cross-attention key masks: the row's first and last allowed key (+ dense mask
  when the allowed keys have holes)
- a fully masked row: `lo >= hi` -> output 0, log-sum-exp 0, no gradient.

The ranges also bound the loops: a query block only visits the key blocks its rows can see
(causal: half the blocks; packed: only its own document), and in the backward each key block
only visits the query blocks that can see it. Grouped-query attention maps query head h to key
head h // (Hq // Hkv); dK and dV of a key head sum over its query heads inside one program, so
no atomics are needed.

Without a GPU the kernels run only in Triton's interpreter (TRITON_INTERPRET=1 before this module
is imported), which computes fp32 and fp16 correctly and bf16 wrongly (triton-lang/triton#11584):
CPU tests use fp32 and fp16.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton import knobs

from alignloop.kernels.ranges import row_ranges

# Whether the kernels were compiled for Triton's interpreter (decided when this module is imported).
INTERPRETED = bool(knobs.runtime.interpret)
LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _allowed(rows, cols, lo, hi, row_ok, col_ok, MASK, b, stride_mb, stride_mm, stride_mn,
             HAS_MASK: tl.constexpr):
    """(BM, BN) booleans: key `cols[j]` is visible from query `rows[i]`."""
    ok = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
    if HAS_MASK:
        m = tl.load(MASK + b * stride_mb + rows[:, None].to(tl.int64) * stride_mm + cols[None, :] * stride_mn,
                    mask=row_ok[:, None] & col_ok[None, :], other=0)
        ok = ok & (m != 0)
    return ok


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, LO, HI, MASK, scale_log2,
                stride_qb, stride_qh, stride_qm, stride_qd,
                stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd,
                stride_ob, stride_oh, stride_om, stride_od,
                stride_mb, stride_mm, stride_mn,
                n_heads, q_len, k_len, head_dim,
                GROUP: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)  # batch offsets can pass 2**31 elements
    h = pid_bh % n_heads
    hk = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < q_len
    dim_ok = dims < head_dim
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # (BM, D)
    lo = tl.load(LO + b * q_len + rows, mask=row_ok, other=k_len)
    hi = tl.load(HI + b * q_len + rows, mask=row_ok, other=0)
    k_begin = (tl.min(lo, axis=0) // BLOCK_N) * BLOCK_N
    k_end = tl.max(hi, axis=0)
    k_ptrs = K + b * stride_kb + hk * stride_kh
    v_ptrs = V + b * stride_vb + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, in log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(k_begin, k_end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < k_len
        kv_mask = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptrs + cols[:, None] * stride_kn + dims[None, :] * stride_kd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # (BM, BN)
        ok = _allowed(rows, cols, lo, hi, row_ok, col_ok, MASK, b, stride_mb, stride_mm, stride_mn, HAS_MASK)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no key yet keeps m = -inf; subtracting 0 instead avoids inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptrs + cols[:, None] * stride_vn + dims[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]  # a row without keys has acc = 0: output 0
    lse = tl.where(seen, m_i + tl.log2(l_safe), 0.0)
    tl.store(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + dims[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(LSE + pid_bh * q_len + rows, lse, mask=row_ok)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, LO, HI, MASK, QB_LO, QB_HI, DK, DV,
                     scale, scale_log2,
                     stride_qb, stride_qh, stride_qm, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_ob, stride_oh, stride_om, stride_od,
                     stride_mb, stride_mm, stride_mn,
                     n_heads, n_kv_heads, q_len, k_len, head_dim, n_kblocks,
                     GROUP: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One key block of one key head; loops over its query heads and the query blocks that see it.

    dK and dV have the strides of K and V; DO has the strides of O."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_kv_heads).to(tl.int64)
    hk = pid_bh % n_kv_heads
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < k_len
    dim_ok = dims < head_dim
    kv_mask = col_ok[:, None] & dim_ok[None, :]
    k = tl.load(K + b * stride_kb + hk * stride_kh + cols[:, None] * stride_kn + dims[None, :] * stride_kd,
                mask=kv_mask, other=0.0)  # (BN, D)
    v = tl.load(V + b * stride_vb + hk * stride_vh + cols[:, None] * stride_vn + dims[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    q_begin = tl.load(QB_LO + b * n_kblocks + pid_n)
    q_end = tl.load(QB_HI + b * n_kblocks + pid_n)
    for g in range(GROUP):
        h = hk * GROUP + g
        row_base = (b * n_heads + h) * q_len
        for start_m in range(q_begin, q_end, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            row_ok = rows < q_len
            qd_mask = row_ok[:, None] & dim_ok[None, :]
            q_ptrs = Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :] * stride_qd
            do_ptrs = DO + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + dims[None, :] * stride_od
            q = tl.load(q_ptrs, mask=qd_mask, other=0.0)  # (BM, D)
            do = tl.load(do_ptrs, mask=qd_mask, other=0.0)
            lse = tl.load(LSE + row_base + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
            lo = tl.load(LO + b * q_len + rows, mask=row_ok, other=k_len)
            hi = tl.load(HI + b * q_len + rows, mask=row_ok, other=0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # (BM, BN)
            ok = _allowed(rows, cols, lo, hi, row_ok, col_ok, MASK, b, stride_mb, stride_mm, stride_mn,
                          HAS_MASK)
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BM, BN)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    dk = dk * scale
    tl.store(DK + b * stride_kb + hk * stride_kh + cols[:, None] * stride_kn + dims[None, :] * stride_kd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_vb + hk * stride_vh + cols[:, None] * stride_vn + dims[None, :] * stride_vd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, LO, HI, MASK, DQ,
                   scale, scale_log2,
                   stride_qb, stride_qh, stride_qm, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_ob, stride_oh, stride_om, stride_od,
                   stride_mb, stride_mm, stride_mn,
                   n_heads, q_len, k_len, head_dim,
                   GROUP: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One query block of one query head; the same key blocks as the forward. DQ has Q's strides."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)  # batch offsets can pass 2**31 elements
    h = pid_bh % n_heads
    hk = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < q_len
    dim_ok = dims < head_dim
    qd_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
                mask=qd_mask, other=0.0)
    do = tl.load(DO + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + dims[None, :] * stride_od,
                 mask=qd_mask, other=0.0)
    lse = tl.load(LSE + pid_bh * q_len + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh * q_len + rows, mask=row_ok, other=0.0)
    lo = tl.load(LO + b * q_len + rows, mask=row_ok, other=k_len)
    hi = tl.load(HI + b * q_len + rows, mask=row_ok, other=0)
    k_begin = (tl.min(lo, axis=0) // BLOCK_N) * BLOCK_N
    k_end = tl.max(hi, axis=0)
    k_ptrs = K + b * stride_kb + hk * stride_kh
    v_ptrs = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(k_begin, k_end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < k_len
        kv_mask = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptrs + cols[:, None] * stride_kn + dims[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs + cols[:, None] * stride_vn + dims[None, :] * stride_vd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        ok = _allowed(rows, cols, lo, hi, row_ok, col_ok, MASK, b, stride_mb, stride_mm, stride_mn, HAS_MASK)
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq = dq * scale
    tl.store(DQ + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
             dq.to(DQ.dtype.element_ty), mask=qd_mask)


# ---------------------------------------------------------------------------------------------
# Launchers


@dataclass(frozen=True)
class Blocks:
    """Tile sizes. The interpreter runs every program in Python, so it gets the smallest tiles."""

    m: int  # forward: query rows per program
    n: int  # forward: keys per loop step
    bwd_m: int  # backward: query rows per dQ program and per dK/dV loop step
    bwd_n: int  # backward: keys per dK/dV program and per dQ loop step
    warps: int
    stages: int
    bwd_warps: int | None = None  # the backward's, when they differ from the forward's
    bwd_stages: int | None = None


# Hopper (compute capability 9.x), from the tile sweep of benchmarks/gpu/suite.py on an H200
# (8K causal bf16, 32 query / 8 key-value heads; docs/benchmarks.md, "GPU suite"). The forward
# and the backward were timed separately; for head_dim 128 the backward at 4 warps ran in half
# the time of the untuned 8 warps.
HOPPER_BLOCKS = {
    64: Blocks(128, 64, 64, 64, 8, 3, bwd_warps=4, bwd_stages=3),
    128: Blocks(64, 64, 64, 64, 4, 3, bwd_warps=4, bwd_stages=2),
}


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def default_blocks(head_dim: int, device: torch.device | None = None) -> Blocks:
    """Tile sizes for this head dim on this device.

    Hopper GPUs get the measured `HOPPER_BLOCKS` (head dims up to 64 and up to 128); any other
    GPU, and head dims above 128, get untuned starting points. The backward keeps two (or, for
    dQ, one) fp32 accumulators of tile x head_dim plus the recomputed (tile x tile)
    probabilities in registers, so it gets smaller tiles than the forward."""
    if INTERPRETED:
        return Blocks(16, 16, 16, 16, 1, 1)
    if device is not None and device.type == "cuda" and head_dim <= 128:
        if _capability(device.index if device.index is not None else torch.cuda.current_device())[0] == 9:
            return HOPPER_BLOCKS[64 if head_dim <= 64 else 128]
    if head_dim <= 64:
        return Blocks(128, 64, 64, 64, 4, 3)
    return Blocks(128, 64, 64, 64, 8, 2)


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
           mask: torch.Tensor | None) -> None:
    assert q.dim() == 4 and k.dim() == 4 and v.shape == k.shape, \
        f"q (B, Hq, Lq, D), k and v (B, Hkv, Lk, D) expected, got {tuple(q.shape)}, {tuple(k.shape)}, " \
        f"{tuple(v.shape)}"
    B, Hq, Lq, D = q.shape
    assert k.shape[0] == B and k.shape[3] == D, f"k {tuple(k.shape)} does not match q {tuple(q.shape)}"
    assert Hq % k.shape[1] == 0, f"query heads {Hq} are not a multiple of key/value heads {k.shape[1]}"
    assert q.dtype == k.dtype == v.dtype and q.dtype in SUPPORTED_DTYPES, \
        f"q, k, v must share one dtype of {SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}"
    assert D <= MAX_HEAD_DIM, f"head_dim {D} > {MAX_HEAD_DIM}"
    assert q.device == k.device == v.device == lo.device == hi.device, "all tensors on one device"
    assert lo.shape == hi.shape == (B, Lq) and lo.dtype == hi.dtype == torch.int32, \
        "lo / hi: (B, Lq) int32"
    assert lo.is_contiguous() and hi.is_contiguous(), "lo / hi must be contiguous"
    if mask is not None:
        assert mask.shape == (B, Lq, k.shape[2]) and mask.dtype == torch.uint8, "mask: (B, Lq, Lk) uint8"
        assert mask.stride(2) == 1, "mask rows must be contiguous"


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (tf32 would cost ~1e-3 relative error); 16-bit inputs
    # multiply natively with fp32 accumulation either way.
    return "ieee" if dtype == torch.float32 else "tf32"


def _mask_args(mask: torch.Tensor | None, like: torch.Tensor):
    if mask is None:
        return like, (0, 0, 0)  # never read: HAS_MASK is False
    return mask, tuple(mask.stride())


def _forward(q, k, v, lo, hi, mask, scale: float, blocks: Blocks):
    """out (B, Lq, Hq, D) in q's dtype (transformers' layout) and lse (B, Hq, Lq) fp32, in log2 units."""
    _check(q, k, v, lo, hi, mask)
    B, Hq, Lq, D = q.shape
    out = torch.empty((B, Lq, Hq, D), dtype=q.dtype, device=q.device)
    o = out.transpose(1, 2)  # (B, Hq, Lq, D) view
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    m_ptr, m_strides = _mask_args(mask, lo)
    grid = (triton.cdiv(Lq, blocks.m), B * Hq)
    _fwd_kernel[grid](
        q, k, v, o, lse, lo, hi, m_ptr, scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *m_strides,
        Hq, Lq, k.shape[2], D,
        GROUP=Hq // k.shape[1], HAS_MASK=mask is not None, PRECISION=_precision(q.dtype),
        BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_D=_block_d(D),
        num_warps=blocks.warps, num_stages=blocks.stages,
    )
    return out, lse


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def query_block_ranges(lo: torch.Tensor, hi: torch.Tensor, k_len: int, block_m: int, block_n: int):
    """For each key block, the query rows `[start, end)` (multiples of block_m) that may see it.

    lo, hi: (B, Lq). Returns two (B, ceil(Lk / block_n)) int32 tensors. A key block no row sees
    gets an empty range. Computed over blocks, so it costs (Lq / block_m) x (Lk / block_n) per row
    of the batch, not Lq x Lk."""
    B, Lq = lo.shape
    n_qb, n_kb = triton.cdiv(Lq, block_m), triton.cdiv(k_len, block_n)
    pad = n_qb * block_m - Lq
    lo_b = torch.nn.functional.pad(lo, (0, pad), value=k_len).view(B, n_qb, block_m).amin(-1)  # (B, n_qb)
    hi_b = torch.nn.functional.pad(hi, (0, pad), value=0).view(B, n_qb, block_m).amax(-1)
    k_start = torch.arange(n_kb, device=lo.device) * block_n  # (n_kb,)
    sees = (lo_b[:, :, None] < k_start + block_n) & (hi_b[:, :, None] > k_start) \
        & (hi_b > lo_b)[:, :, None]  # (B, n_qb, n_kb)
    anyone = sees.any(1)
    first = sees.to(torch.int8).argmax(1)
    last = n_qb - 1 - sees.flip(1).to(torch.int8).argmax(1)
    start = torch.where(anyone, first * block_m, 0).to(torch.int32).contiguous()
    end = torch.where(anyone, (last + 1) * block_m, 0).to(torch.int32).contiguous()
    return start, end


def _backward(do, q, k, v, out, lse, lo, hi, mask, scale: float, blocks: Blocks):
    """dq, dk, dv with the strides of q, k, v. do: (B, Lq, Hq, D) like out."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    # delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij: the softmax backward's row term.
    delta = (do.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # (B, Hq, Lq)
    do_t = do.transpose(1, 2)  # (B, Hq, Lq, D) view, strides of the incoming gradient
    # Gradients in the inputs' own layouts (the kernels address them with the inputs' strides).
    dq, dk, dv = (torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device) for t in (q, k, v))
    m_ptr, m_strides = _mask_args(mask, lo)
    group = Hq // Hkv
    common = dict(GROUP=group, HAS_MASK=mask is not None, PRECISION=_precision(q.dtype),
                  BLOCK_D=_block_d(D), num_warps=blocks.bwd_warps or blocks.warps,
                  num_stages=blocks.bwd_stages or blocks.stages)
    q_start, q_end = query_block_ranges(lo, hi, Lk, blocks.bwd_m, blocks.bwd_n)
    n_kb = q_start.shape[1]
    _bwd_dkdv_kernel[(n_kb, B * Hkv)](
        q, k, v, do_t, lse, delta, lo, hi, m_ptr, q_start, q_end, dk, dv, scale, scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *do_t.stride(), *m_strides,
        Hq, Hkv, Lq, Lk, D, n_kb, BLOCK_M=blocks.bwd_m, BLOCK_N=blocks.bwd_n, **common,
    )
    _bwd_dq_kernel[(triton.cdiv(Lq, blocks.bwd_m), B * Hq)](
        q, k, v, do_t, lse, delta, lo, hi, m_ptr, dq, scale, scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *do_t.stride(), *m_strides,
        Hq, Lq, Lk, D, BLOCK_M=blocks.bwd_m, BLOCK_N=blocks.bwd_n, **common,
    )
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Autograd


def _stride_ok(t: torch.Tensor) -> torch.Tensor:
    # The kernels take any strides and write the gradients with the same strides, which must
    # then not overlap: a view that is not a permutation of a dense tensor (e.g. an expanded
    # one) is copied first.
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size > 1 and stride != expected:
            return t.contiguous()
        expected *= size
    return t


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lo, hi, mask, scale, blocks):
        q, k, v = _stride_ok(q), _stride_ok(k), _stride_ok(v)
        out, lse = _forward(q, k, v, lo, hi, mask, scale, blocks)
        ctx.save_for_backward(q, k, v, out, lse, lo, hi, mask)
        ctx.scale, ctx.blocks = scale, blocks
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, lo, hi, mask = ctx.saved_tensors
        dq, dk, dv = _backward(dout, q, k, v, out, lse, lo, hi, mask, ctx.scale, ctx.blocks)
        return dq, dk, dv, None, None, None, None, None


def flash_attention_ranges(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor,
                           hi: torch.Tensor, mask: torch.Tensor | None = None,
                           scale: float | None = None, blocks: Blocks | None = None) -> torch.Tensor:
    """Attention where query row i of batch b sees keys `lo[b, i] <= j < hi[b, i]` (and `mask[b, i, j]`).

    q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D), Hq a multiple of Hkv; lo, hi: (B, Lq) int32;
    mask: optional (B, Lq, Lk) bool/uint8 (batch stride 0 allowed). Returns (B, Lq, Hq, D).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if mask is not None:
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    blocks = blocks or default_blocks(q.shape[-1], q.device)
    return _FlashAttention.apply(q, k, v, lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous(),
                                 mask, scale, blocks)


# ---------------------------------------------------------------------------------------------
# Public function


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    position_ids: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                    scale: float | None = None, blocks: Blocks | None = None) -> torch.Tensor:
    """Scaled dot-product attention, fused. Same arguments as `attention_reference`.

    q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D). `causal`: bottom-right aligned (query i sees keys
    up to i + Lk - Lq). `position_ids` (B, L), self-attention only: packed documents, a new one
    wherever the position does not follow the previous one (restarts at 0). `key_mask`: (B, Lk)
    or (B, Lq, Lk) booleans, True = may attend. Rows that may see no key give zeros.
    Returns (B, Lq, Hq, D), the layout transformers' attention functions return.
    """
    lo, hi, dense = row_ranges(q.shape[0], q.shape[2], k.shape[2], causal=causal,
                               position_ids=position_ids, key_mask=key_mask, device=q.device)
    return flash_attention_ranges(q, k, v, lo, hi, dense, scale, blocks)


def kernel_runs_on(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of this device (a CUDA GPU, or the interpreter)."""
    return device.type == "cuda" or INTERPRETED

