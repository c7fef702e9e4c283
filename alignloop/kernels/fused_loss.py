"""Fused linear + cross-entropy: next-token log-probs and losses without the (tokens, vocab) logits.

A language model's last step, `logits = hidden @ weight.T`, costs tokens x vocab floats: 4 GB
for 8K tokens of Llama 3's 128,256-token vocabulary in fp32, and autograd keeps that tensor (and
its softmax) for the backward. Here the tokens are cut into chunks whose logits fit a memory
budget; each chunk's logits exist only while that chunk is reduced to one log-sum-exp and one
target logit per token. The backward recomputes each chunk's logits, turns them into the
gradient of the loss with respect to the logits in place, and accumulates the gradients of the
hidden states, the weight (in fp32) and the bias. Memory: O(chunk x vocab) instead of
O(tokens x vocab); cost: one extra (chunk x hidden x vocab) matmul per chunk in the backward.
With a frozen head (LoRA) the hidden-state gradient is formed in the forward instead, and the
backward is a product per token (`_LinearLogProbs`): no extra matmul at all.

Only positions whose label is not `ignore_index` are projected at all (in SFT the prompt and the
chat formatting never reach the LM head).

Layers (STYLE.md): `ChunkOps` is the per-chunk maths (plain PyTorch here, Triton in
`fused_loss_triton.py`); `_LinearLogProbs` the autograd.Function that drives the chunks; the
public `linear_log_probs` (per-token log-probs, e.g. for DPO) and `linear_cross_entropy` (mean,
or sum + count for gradient accumulation). The naive reference is `reference_log_probs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
# Default memory for one chunk's logits and their temporaries: small on a CPU shared with the
# rest of the step, larger on a GPU where bigger matmuls run faster.
CPU_BUDGET_BYTES = 256 * 2**20
GPU_BUDGET_BYTES = 1024 * 2**20
# fp32 rows of `vocab` floats alive per token of a chunk: the logits and one scratch row, both
# allocated once per call and reused by every chunk (a fresh 100 MB tensor per chunk costs
# page faults that, on a CPU, took as long as the matmul).
_ROWS_PER_TOKEN = 2


@dataclass
class LogProbs:
    """Per-token outputs, all of the labels' shape and zero where the label is ignored.

    log_probs: log p(label) under softmax(hidden @ weight.T + bias), differentiable.
    entropy, mean_logit, is_top1: logging statistics without gradient, None unless asked for.
    """

    log_probs: torch.Tensor
    entropy: torch.Tensor | None = None
    mean_logit: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None


def reference_log_probs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        bias: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The spec: full logits, log_softmax in fp32. hidden (..., H), weight (V, H), labels (...)."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (..., V)
    logp = torch.log_softmax(logits, dim=-1)
    keep = labels != ignore_index
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (...)
    return torch.where(keep, picked, torch.zeros_like(picked))


def chunk_tokens(vocab: int, tokens: int, budget_bytes: int | None = None,
                 device: torch.device | str = "cpu", rows_per_token: int = _ROWS_PER_TOKEN) -> int:
    """Tokens per chunk so that the chunk's `rows_per_token` fp32 tiles of `vocab` floats (here
    the logits and scratch) fit `budget_bytes`."""
    if budget_bytes is None:
        budget_bytes = GPU_BUDGET_BYTES if torch.device(device).type == "cuda" else CPU_BUDGET_BYTES
    return max(1, min(tokens, budget_bytes // (vocab * 4 * rows_per_token)))


class ChunkOps:
    """The per-chunk maths in plain PyTorch, in place on preallocated (c, V) fp32 tiles."""

    @staticmethod
    def forward(logits: torch.Tensor, scratch: torch.Tensor, targets: torch.Tensor, stats: bool,
                want_grad: bool):
        """Reduces a chunk's `logits` (overwriting them and `scratch`).

        Returns lse (c,), target logit (c,), entropy, mean logit, is_top1 (or Nones without
        `stats`) and, with `want_grad`, d log p(target) / d logits = onehot - softmax (c, V).
        """
        target = logits.gather(1, targets[:, None]).squeeze(1)  # (c,)
        entropy = mean = top1 = grad = None
        if stats:
            m, first_max = logits.max(-1)  # (c,), (c,)
            top1, mean = first_max == targets, logits.mean(-1)
        else:
            m = logits.amax(-1)
        z = logits.sub_(m[:, None])  # z - m
        e = torch.exp(z, out=scratch)  # (c, V)
        s = e.sum(-1)
        lse = m + s.log()
        if stats:
            # entropy = lse - sum p z = log s - sum e (z - m) / s
            entropy = s.log() - z.mul_(e).sum(-1) / s
        if want_grad:
            grad = e.mul_((-1 / s)[:, None])  # -softmax
            grad[torch.arange(grad.size(0), device=grad.device), targets] += 1
        return lse, target, entropy, mean, top1, grad

    @staticmethod
    def backward_(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                  grad: torch.Tensor) -> torch.Tensor:
        """Overwrites `logits` with d(sum grad * log p(target)) / d logits = grad * (onehot - p)."""
        p = logits.sub_(lse[:, None]).exp_()  # (c, V) softmax, in place
        p.mul_(-grad[:, None])
        rows = torch.arange(p.size(0), device=p.device)
        p[rows, targets] += grad
        return p


class _LinearLogProbs(torch.autograd.Function):
    """log p(targets) of `hidden @ weight.T + bias` over chunks of `chunk` tokens.

    hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) all valid (no ignore_index).
    Returns log_probs (N,) fp32 and, with `stats`, entropy, mean logit (N,) fp32 and is_top1
    (N,) bool, which carry no gradient.

    Two ways to the gradient. When only the hidden states need one (LoRA: the head is frozen),
    the forward already holds each chunk's softmax, and d log p_t / d h_t = (onehot_t - p_t) W
    depends on token t alone: it is kept per token, (N, H) like the hidden states, and the
    backward scales it by each token's upstream gradient (any upstream, DPO's included). No
    logits are recomputed: two (c x H x V) matmuls per chunk in all, as for the plain loss.
    When the weight (or bias) needs a gradient, that gradient depends on the upstream gradient
    of every token, so the backward recomputes each chunk's logits instead.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, ops, stats: bool, compute_dtype):
        ctx.set_materialize_grads(False)
        n = hidden.size(0)
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        acc = _acc_dtype(compute_dtype)
        lse = hidden.new_empty(n, dtype=acc)
        logp = torch.empty_like(lse)
        extra = ([torch.empty_like(lse), torch.empty_like(lse),
                  torch.empty(n, dtype=torch.bool, device=hidden.device)] if stats else None)
        eager = ctx.needs_input_grad[0] and not any(ctx.needs_input_grad[1:3])
        grad_unit = torch.empty_like(hidden) if eager else None  # (N, H): (onehot - p) W per token
        tile = torch.empty((min(chunk, n), w.size(0)), dtype=acc, device=hidden.device)
        scratch = torch.empty_like(tile)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            logits = _project(hidden[s:e].to(compute_dtype), w, b, tile[:e - s])  # (c, V)
            out = ops.forward(logits, scratch[:e - s], targets[s:e], stats, eager)
            lse[s:e] = out[0]
            logp[s:e] = out[1] - out[0]
            if stats:
                for buf, value in zip(extra, out[2:5]):
                    buf[s:e] = value
            if eager:
                grad_unit[s:e] = (out[5].to(compute_dtype) @ w).to(hidden.dtype)  # (c, H)
            del logits, out
        if eager:
            ctx.save_for_backward(grad_unit)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.eager, ctx.chunk, ctx.ops, ctx.compute_dtype = eager, chunk, ops, compute_dtype
        if stats:
            ctx.mark_non_differentiable(*extra)
            return (logp, *extra)
        return logp, None, None, None

    @staticmethod
    def backward(ctx, grad_logp, *_):
        needs_h, needs_w, needs_b = ctx.needs_input_grad[:3]
        if grad_logp is None or not (needs_h or needs_w or needs_b):
            return (None,) * 8
        if ctx.eager:
            (grad_unit,) = ctx.saved_tensors
            grad_h = grad_logp.to(grad_unit.dtype)[:, None] * grad_unit  # (N, H)
            return grad_h, None, None, None, None, None, None, None
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dtype, n = ctx.compute_dtype, hidden.size(0)
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        grad_h = torch.empty_like(hidden) if needs_h else None
        # fp32 accumulation over chunks: summing per-chunk products rounded to bf16 drifts
        acc = _acc_dtype(dtype)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs_w else None
        grad_b = torch.zeros(weight.size(0), dtype=acc, device=weight.device) if needs_b else None
        grad_logp = grad_logp.to(acc)
        tile = torch.empty((min(ctx.chunk, n), w.size(0)), dtype=acc, device=hidden.device)
        for s in range(0, n, ctx.chunk):
            e = min(s + ctx.chunk, n)
            h = hidden[s:e].to(dtype)  # (c, H)
            logits = _project(h, w, b, tile[:e - s])
            dlogits = ctx.ops.backward_(logits, targets[s:e], lse[s:e], grad_logp[s:e])
            if needs_h:
                grad_h[s:e] = (dlogits.to(dtype) @ w).to(hidden.dtype)  # (c, H)
            if needs_w:
                _accumulate_weight_grad(grad_w, dlogits, h)  # (V, c) @ (c, H)
            if needs_b:
                grad_b += dlogits.sum(0)
            del dlogits
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _acc_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """Softmax and accumulation dtype: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def _fp32_products(a: torch.Tensor) -> bool:
    """Whether 16-bit products can be written straight to fp32 (`out_dtype`: CUDA only)."""
    return a.device.type == "cuda" and a.dtype in (torch.float16, torch.bfloat16)


def _project(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """(c, H) x (V, H) -> `out` (c, V), the fp32 logits (matmul in the compute dtype)."""
    if h.dtype == out.dtype:
        torch.matmul(h, w.t(), out=out)
    elif _fp32_products(h):  # no 16-bit (c, V) intermediate and no copy
        torch.mm(h, w.t(), out_dtype=out.dtype, out=out)
    else:
        out.copy_(h @ w.t())
    if b is not None:
        out += b
    return out


def _accumulate_weight_grad(grad_w: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w (V, H, fp32) += dlogits.T (V, c) @ h (c, H), summed in fp32 across chunks.

    With 16-bit inputs on a GPU the product runs on the tensor cores from 16-bit operands with an
    fp32 result, as autograd's own backward of a 16-bit matmul would (the logits gradient
    rounded to the compute dtype); an fp32 product there ran 4x slower than the whole naive loss
    on an H200 (docs/benchmarks.md, GPU suite). Elsewhere it stays in fp32."""
    if _fp32_products(h):
        torch.addmm(grad_w, dlogits.t().to(h.dtype), h, out_dtype=grad_w.dtype, out=grad_w)
    else:
        grad_w.addmm_(dlogits.t(), h.to(grad_w.dtype))


def linear_log_probs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                     bias: torch.Tensor | None = None, *, ignore_index: int = IGNORE_INDEX,
                     stats: bool = False, budget_bytes: int | None = None,
                     chunk: int | None = None, backend: str = "torch") -> LogProbs:
    """Per-token log p(label) of `hidden @ weight.T + bias` without the full logits.

    hidden (..., H); weight (V, H); bias (V,) or None; labels (...) with `ignore_index` where no
    token is scored (log-prob 0, no gradient). The caller shifts for next-token prediction.
    `chunk` (tokens per chunk) defaults to what `budget_bytes` allows (`chunk_tokens`).
    `backend`: "torch", or "triton" (the per-chunk maths as Triton kernels; GPU, or the Triton
    interpreter). Under autocast the matmuls run in the autocast dtype, the softmax in fp32.
    """
    ops = _backend(backend)
    shape, H = labels.shape, hidden.size(-1)
    flat_labels = labels.reshape(-1)
    keep = flat_labels != ignore_index  # (N,)
    h = hidden.reshape(-1, H)[keep]  # (n, H): only scored positions reach the head
    targets = flat_labels[keep]
    device = hidden.device
    compute_dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                     else hidden.dtype)
    if chunk is None:
        chunk = chunk_tokens(weight.size(0), max(1, h.size(0)), budget_bytes, device)
    with torch.autocast(device.type, enabled=False):
        out = _LinearLogProbs.apply(h, weight, bias, targets, chunk, ops, stats, compute_dtype)

    def scatter(values, dtype=None):
        if values is None:
            return None
        dtype = dtype or values.dtype
        # masked_scatter keeps an all-ignored batch connected to the graph (a zero gradient)
        return torch.zeros(shape, dtype=dtype, device=device).masked_scatter(keep.view(shape), values)

    return LogProbs(scatter(out[0]), scatter(out[1]), scatter(out[2]), scatter(out[3], torch.bool))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: torch.Tensor | None = None, *, reduction: str = "mean",
                         ignore_index: int = IGNORE_INDEX, **kwargs):
    """Cross-entropy of `hidden @ weight.T + bias` against `labels`, ignored labels left out.

    reduction "mean": the mean over label tokens (0 when there are none). "sum": (summed loss,
    number of label tokens), so that gradient accumulation can divide by the count over all
    micro-batches. Other keyword arguments as in `linear_log_probs`.
    """
    logp = linear_log_probs(hidden, weight, labels, bias, ignore_index=ignore_index, **kwargs).log_probs
    total = -logp.sum()
    count = (labels != ignore_index).sum()
    if reduction == "sum":
        return total, count
    if reduction == "mean":
        return total / count.clamp(min=1)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _backend(name: str):
    if name == "torch":
        return ChunkOps
    if name == "triton":
        from alignloop.kernels.fused_loss_triton import TritonChunkOps

        return TritonChunkOps
    raise ValueError(f"backend must be 'torch' or 'triton', got {name!r}")
