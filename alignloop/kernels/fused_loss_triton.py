"""The per-chunk maths of the fused linear + cross-entropy as Triton kernels (GPU).

`alignloop.kernels.fused_loss` drives the chunks: the (chunk, vocab) logits tile comes from a
cuBLAS matmul, and these kernels reduce it. Layers (STYLE.md): the `@triton.jit` kernels; the
launchers in `TritonChunkOps`, which check dtypes and contiguity and build the grids; the
autograd.Function and public functions are the ones in `fused_loss.py` with `backend="triton"`.
The spec is `ChunkOps` there (and `reference_log_probs`).

- `_row_stats_kernel`, one program per token: a single pass over the vocabulary in blocks with
  an online log-sum-exp (running max `m`, running sum of exp(z - m) rescaled when `m` grows), the
  target's logit and, when asked, the entropy (lse - sum p z), the mean logit and whether the
  target is the first maximum.
- `_grad_kernel`, one program per (token, vocabulary block): overwrites the tile with
  grad * (onehot(target) - softmax), the gradient of grad * log p(target) with respect to the
  logits; the matmuls for the hidden-state and weight gradients follow in torch.

Without a GPU the kernels run only in Triton's interpreter (TRITON_INTERPRET=1 before this module
is imported), which is right in fp32 and fp16 and wrong in bf16 (triton-lang/triton#11584); the
tile these kernels read is always fp32, so only the matmul sees the model's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 1024  # vocabulary entries per block; 128,256 / 1024 = 126 blocks per row


@triton.jit
def _row_stats_kernel(logits_ptr, stride, targets_ptr, lse_ptr, target_ptr, entropy_ptr,
                      mean_ptr, top1_ptr, V, STATS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    m = tl.full((), float("-inf"), tl.float32)  # running max
    s = tl.full((), 0.0, tl.float32)  # running sum of exp(z - m)
    xs = tl.full((), 0.0, tl.float32)  # running sum of exp(z - m) * z (entropy)
    zs = tl.full((), 0.0, tl.float32)  # sum of z (mean logit)
    best = tl.full((), float("-inf"), tl.float32)
    best_at = tl.full((), 0, tl.int64)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < V
        z = tl.load(base + offs, mask=inside, other=float("-inf")).to(tl.float32)  # (BLOCK,)
        block_max = tl.max(z, axis=0)
        new_m = tl.maximum(m, block_max)
        rescale = tl.exp(m - new_m)
        e = tl.exp(z - new_m)  # 0 outside the vocabulary
        s = s * rescale + tl.sum(e, axis=0)
        if STATS:
            zin = tl.where(inside, z, 0.0)
            xs = xs * rescale + tl.sum(e * zin, axis=0)
            zs += tl.sum(zin, axis=0)
            # strictly greater: the first maximum wins, as torch.argmax
            at = start + tl.argmax(z, axis=0).to(tl.int64)
            best_at = tl.where(block_max > best, at, best_at)
            best = tl.maximum(best, block_max)
        m = new_m
    lse = m + tl.log(s)
    target = tl.load(targets_ptr + row)
    tl.store(lse_ptr + row, lse)
    tl.store(target_ptr + row, tl.load(base + target).to(tl.float32))
    if STATS:
        tl.store(entropy_ptr + row, lse - xs / s)
        tl.store(mean_ptr + row, zs / V)
        tl.store(top1_ptr + row, (best_at == target).to(tl.int8))


@triton.jit
def _grad_kernel(logits_ptr, stride, targets_ptr, lse_ptr, grad_ptr, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < V
    ptrs = logits_ptr + row * stride + offs
    z = tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)
    p = tl.exp(z - tl.load(lse_ptr + row))
    onehot = (offs == tl.load(targets_ptr + row)).to(tl.float32)
    tl.store(ptrs, tl.load(grad_ptr + row) * (onehot - p), mask=inside)


def _check(logits: torch.Tensor, targets: torch.Tensor) -> None:
    assert logits.dim() == 2 and logits.dtype == torch.float32, \
        f"the logits tile must be (c, V) fp32, got {tuple(logits.shape)} {logits.dtype}"
    assert logits.stride(1) == 1, "the logits tile must be contiguous along the vocabulary"
    assert targets.shape == logits.shape[:1] and targets.dtype == torch.int64 and targets.is_contiguous()


class TritonChunkOps:
    """`fused_loss.ChunkOps` with the tile reductions as Triton kernels (fp32 tiles only)."""

    @staticmethod
    def forward(logits: torch.Tensor, scratch: torch.Tensor, targets: torch.Tensor, stats: bool,
                want_grad: bool):
        """As `ChunkOps.forward`; `scratch` is not needed (the gradient overwrites `logits`)."""
        _check(logits, targets)
        c, V = logits.shape
        lse = torch.empty(c, dtype=torch.float32, device=logits.device)
        target = torch.empty_like(lse)
        entropy = torch.empty_like(lse) if stats else lse  # unused slots when not asked for
        mean = torch.empty_like(lse) if stats else lse
        top1 = torch.empty(c, dtype=torch.int8, device=logits.device) if stats else lse
        if c:
            _row_stats_kernel[(c,)](logits, logits.stride(0), targets, lse, target, entropy, mean,
                                    top1, V, STATS=stats, BLOCK=min(BLOCK_V, triton.next_power_of_2(V)))
        grad = None
        if want_grad:
            ones = torch.ones(c, dtype=torch.float32, device=logits.device)
            grad = TritonChunkOps.backward_(logits, targets, lse, ones)  # onehot - softmax
        if not stats:
            return lse, target, None, None, None, grad
        return lse, target, entropy, mean, top1.bool(), grad

    @staticmethod
    def backward_(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                  grad: torch.Tensor) -> torch.Tensor:
        _check(logits, targets)
        c, V = logits.shape
        block = min(BLOCK_V, triton.next_power_of_2(V))
        if c:
            _grad_kernel[(c, triton.cdiv(V, block))](logits, logits.stride(0), targets,
                                                     lse.contiguous(), grad.contiguous(), V, BLOCK=block)
        return logits
