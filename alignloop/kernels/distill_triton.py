"""The row maths of the fused distillation loss as Triton kernels (GPU).

`alignloop.kernels.distill_loss` drives the chunks: cuBLAS projects each chunk of tokens to a
(c, V) fp32 tile of student logits (and one of a live teacher's), and these kernels reduce and
differentiate the tiles in one or two passes each, where the torch path (`DistillChunkOps`, the
spec) makes several passes and temporaries. The small per-token work of top-k targets (gathers
of k columns, the k + 1 bucket divergences) stays in torch. Layers (STYLE.md): the `@triton.jit`
kernels; the launchers in `TritonDistillOps`, which check the tiles and build the grids; the
autograd.Function and public function are distill_loss.py's with `backend="triton"`.

- `_lse_kernel`, one program per token: online log-sum-exp of tile * scale (-inf entries are
  absent: the masked tail of top-k targets);
- `_full_divergence_kernel`, one program per token: D(p, q) for a full-vocabulary teacher and
  <q, G> (what the gradient subtracts), from both tiles and their log-sum-exps;
- `_full_grad_kernel`, one program per (token, vocabulary block): grad += coef q (G - <q, G>)
  (forward KL: coef (q - p));
- `_softmax_add_kernel`, one program per (token, vocabulary block): grad += c1 exp(z - l1)
  [+ c2 exp(min(z - l2, 0))], the top-k tail gradient and the cross-entropy's softmax.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1 before the first import
of triton), right in fp32; the tiles are always fp32, only the matmuls see the model's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from alignloop.kernels.distill_reference import LOG_FLOOR

BLOCK_V = 1024  # vocabulary entries per block
_LOSS_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}


@triton.jit
def _lse_kernel(x_ptr, stride, out_ptr, scale, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        z = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * scale
        new_m = tl.maximum(m, tl.max(z, axis=0))
        safe = tl.where(new_m == float("-inf"), 0.0, new_m)  # a block of absent entries only
        s = s * tl.exp(m - safe) + tl.sum(tl.exp(z - safe), axis=0)
        m = new_m
    tl.store(out_ptr + row, m + tl.log(s))


@triton.jit
def _log_probs(s_ptr, u_ptr, offs, inside, lse_s, lse_u, scale, floor):
    """log q, log p of one block (the teacher's floored); 0 outside the vocabulary."""
    lq = tl.load(s_ptr + offs, mask=inside, other=0.0).to(tl.float32) * scale - lse_s
    lp = tl.load(u_ptr + offs, mask=inside, other=0.0).to(tl.float32) * scale - lse_u
    return tl.where(inside, lq, 0.0), tl.where(inside, tl.maximum(lp, floor), 0.0)


@triton.jit
def _log_mix(lp, lq, beta):
    """log(beta p + (1 - beta) q), as a log-add-exp."""
    a = lp + tl.log(beta)
    b = lq + tl.log(1.0 - beta)
    mx = tl.maximum(a, b)
    return mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))


@triton.jit
def _full_divergence_kernel(s_ptr, u_ptr, stride_s, stride_u, lse_s_ptr, lse_u_ptr, d_ptr, c_ptr,
                            scale, beta, floor, V, LOSS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lse_s = tl.load(lse_s_ptr + row)
    lse_u = tl.load(lse_u_ptr + row)
    d = tl.full((), 0.0, tl.float32)
    c = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < V
        lq, lp = _log_probs(s_ptr + row * stride_s, u_ptr + row * stride_u, offs, inside,
                            lse_s, lse_u, scale, floor)
        q = tl.where(inside, tl.exp(lq), 0.0)
        p = tl.where(inside, tl.exp(lp), 0.0)
        if LOSS == 0:
            d += tl.sum(p * (lp - lq), axis=0)
        elif LOSS == 1:
            d += tl.sum(q * (lq - lp), axis=0)
        else:
            lm = _log_mix(lp, lq, beta)
            d += tl.sum(beta * p * (lp - lm) + (1.0 - beta) * q * (lq - lm), axis=0)
            c += tl.sum(q * (1.0 - beta) * (lq - lm), axis=0)
    if LOSS == 1:
        c = d  # reverse KL: <q, G> is D itself
    tl.store(d_ptr + row, d)
    tl.store(c_ptr + row, c)


@triton.jit
def _full_grad_kernel(s_ptr, u_ptr, g_ptr, stride_s, stride_u, stride_g, lse_s_ptr, lse_u_ptr,
                      c_ptr, coef, scale, beta, floor, V, LOSS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < V
    lq, lp = _log_probs(s_ptr + row * stride_s, u_ptr + row * stride_u, offs, inside,
                        tl.load(lse_s_ptr + row), tl.load(lse_u_ptr + row), scale, floor)
    q = tl.exp(lq)
    if LOSS == 0:
        dz = q - tl.exp(lp)
    elif LOSS == 1:
        dz = q * (lq - lp - tl.load(c_ptr + row))
    else:
        dz = q * ((1.0 - beta) * (lq - _log_mix(lp, lq, beta)) - tl.load(c_ptr + row))
    ptrs = g_ptr + row * stride_g + offs
    tl.store(ptrs, tl.load(ptrs, mask=inside, other=0.0) + coef * dz, mask=inside)


@triton.jit
def _softmax_add_kernel(s_ptr, g_ptr, stride_s, stride_g, scale, l1_ptr, c1_ptr, l2_ptr, c2_ptr, V,
                        TWO: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < V
    z = tl.load(s_ptr + row * stride_s + offs, mask=inside, other=0.0).to(tl.float32) * scale
    add = tl.load(c1_ptr + row) * tl.exp(z - tl.load(l1_ptr + row))
    if TWO:
        add += tl.load(c2_ptr + row) * tl.exp(tl.minimum(z - tl.load(l2_ptr + row), 0.0))
    ptrs = g_ptr + row * stride_g + offs
    tl.store(ptrs, tl.load(ptrs, mask=inside, other=0.0) + add, mask=inside)


def _check(*tiles: torch.Tensor) -> None:
    for tile in tiles:
        assert tile.dim() == 2 and tile.dtype == torch.float32 and tile.stride(1) == 1, \
            f"tiles must be (c, V) fp32, contiguous along V; got {tuple(tile.shape)} {tile.dtype}"
    assert all(t.shape == tiles[0].shape for t in tiles), "tiles of different shapes"


def _block(V: int) -> int:
    return min(BLOCK_V, triton.next_power_of_2(V))


def _row(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float32).contiguous()


class TritonDistillOps:
    """`distill_loss.DistillChunkOps` with the tile passes as Triton kernels (fp32 tiles)."""

    @staticmethod
    def lse(tile: torch.Tensor, scale: float) -> torch.Tensor:
        _check(tile)
        c, V = tile.shape
        out = torch.empty(c, dtype=torch.float32, device=tile.device)
        if c:
            _lse_kernel[(c,)](tile, tile.stride(0), out, float(scale), V, BLOCK=_block(V))
        return out

    @staticmethod
    def full_teacher_(grad, s, u, lse_s, lse_u, scale: float, coef: float, loss: str, beta: float):
        _check(s, u, *([grad] if grad is not None else []))
        c, V = s.shape
        d = torch.empty(c, dtype=torch.float32, device=s.device)
        inner = torch.empty_like(d)
        lse_s, lse_u, code = _row(lse_s), _row(lse_u), _LOSS_CODES[loss]
        if c:
            _full_divergence_kernel[(c,)](s, u, s.stride(0), u.stride(0), lse_s, lse_u, d, inner,
                                          float(scale), float(beta), LOG_FLOOR, V, LOSS=code,
                                          BLOCK=_block(V))
        if grad is not None and c:
            grid = (c, triton.cdiv(V, _block(V)))
            _full_grad_kernel[grid](s, u, grad, s.stride(0), u.stride(0), grad.stride(0), lse_s,
                                    lse_u, inner, float(coef), float(scale), float(beta), LOG_FLOOR,
                                    V, LOSS=code, BLOCK=_block(V))
        return d

    @staticmethod
    def add_softmax_(grad, s, scale: float, lse1, coef1, lse2=None, coef2=None) -> None:
        _check(s, grad)
        c, V = s.shape
        two = lse2 is not None
        l1, c1 = _row(lse1), _row(coef1)
        l2, c2 = (_row(lse2), _row(coef2)) if two else (l1, c1)
        if c:
            _softmax_add_kernel[(c, triton.cdiv(V, _block(V)))](
                s, grad, s.stride(0), grad.stride(0), float(scale), l1, c1, l2, c2, V,
                TWO=two, BLOCK=_block(V))
