"""Fused, chunked distillation loss: KD against teachers (+ alpha x CE) without the full logits.

The loss of alignloop/kernels/distill_reference.py (its docstring has the formulas), computed from
the student's last hidden states and LM-head weight, chunk by chunk, as fused_loss.py does for
cross-entropy: each chunk of scored tokens is projected to (c, V) fp32 logits, reduced to its
loss terms, and turned into the gradient with respect to those logits in place; the gradients of
the hidden states and of the weight are accumulated right there, in the forward. The loss is a
scalar (a sum over tokens), so the backward only scales them by the upstream gradient: no logits
are recomputed. Memory: a few (c, V) fp32 tiles plus an fp32 (V, H) weight gradient, never
(tokens, V); FLOPs: three (c x H x V) matmuls per chunk, as an ordinary forward + backward.

Teachers come as either
  - `TeacherHead(hidden, weight)`: a live teacher's last hidden states and its LM-head weight;
    its logits are projected chunk by chunk too (full vocabulary, or its top k with `top_k`);
  - `TopK(log_probs, indices, tail)`: top-k targets, e.g. read from the offline cache
    (alignloop/distill/cache.py), one row per scored token.
Gradient of D with respect to the student's logits s (z = s / T, q = softmax(z), buckets b with
student mass Q_b and teacher mass P_b; a full-vocabulary teacher has one bucket per token):
  dD/ds_i = (1 / T) q_i (G_b(i) - sum_b Q_b G_b),  G_b = dD/dQ_b:
  forward KL  -P_b / Q_b      -> q_i - P_b q_i / Q_b
  reverse KL  log Q_b - log P_b (+1, which cancels)
  JSD         (1 - beta)(log Q_b - log M_b)
so with T^2 scaling each teacher adds w T q_i (G_b(i) - <Q, G>) to the logits' gradient.

Layers (STYLE.md): `DistillChunkOps` is the per-chunk row maths over (c, V) tiles in plain
PyTorch (Triton in distill_triton.py, `backend="triton"`); `_chunk_terms` drives one chunk;
`_LinearDistill` is the autograd.Function over the chunks; `linear_distill_loss` the public call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from alignloop.kernels.distill_reference import (IGNORE_INDEX, LOG_FLOOR, LOSSES, Terms, TopK,
                                                 divergence, teacher_buckets)
from alignloop.kernels.fused_loss import chunk_tokens
# fused_loss's projection and fp32 weight-gradient helpers: the same matmuls, kept in one place
from alignloop.kernels.fused_loss import _accumulate_weight_grad, _acc_dtype, _project

# (c, V) fp32 tiles alive per token of a chunk: the student logits, their gradient, one teacher's
# logits and up to three temporaries of the torch row maths (the Triton kernels need none).
ROWS_PER_TOKEN = 6


@dataclass
class TeacherHead:
    """A live teacher: its last hidden states (..., Ht), at the same positions as the student's,
    and its LM-head weight (V, Ht). Neither gets a gradient."""

    hidden: torch.Tensor
    weight: torch.Tensor


@dataclass
class Teacher:
    """One teacher's targets and its weight w_j in the loss (sum_j w_j T^2 D_j)."""

    targets: TeacherHead | TopK
    weight: float = 1.0


class DistillChunkOps:
    """Row maths over (c, V) fp32 tiles, plain PyTorch. `scale` is 1 / T."""

    @staticmethod
    def lse(tile: torch.Tensor, scale: float) -> torch.Tensor:
        """logsumexp(tile * scale) per row (c,); entries of -inf count as absent."""
        z = tile * scale  # (c, V)
        m = z.amax(-1, keepdim=True)
        return (m + (z - m).exp().sum(-1, keepdim=True).log()).squeeze(-1)

    @staticmethod
    def full_teacher_(grad: torch.Tensor | None, s: torch.Tensor, u: torch.Tensor, lse_s: torch.Tensor,
                      lse_u: torch.Tensor, scale: float, coef: float, loss: str, beta: float) -> torch.Tensor:
        """D(p, q) per row (c,) for a full-vocabulary teacher (logits `u`); adds
        coef * dD/dz to `grad` (c, V) unless it is None."""
        logq = s * scale - lse_s[:, None]  # (c, V)
        logp = (u * scale - lse_u[:, None]).clamp_(min=LOG_FLOOR)  # (c, V)
        d = divergence(logp, logq, loss, beta)  # (c,)
        if grad is None:
            return d
        q = logq.exp()
        if loss == "forward_kl":
            grad.add_(q.sub_(logp.exp_()), alpha=coef)  # q - p
            return d
        if loss == "reverse_kl":
            g = logq.sub_(logp)  # r = log q - log p; dD/dz = q (r - D)
        else:
            logm = torch.logaddexp(logp + math.log(beta), logq + math.log(1 - beta))
            g = logq.sub_(logm).mul_(1 - beta)  # G = (1 - beta)(log q - log m)
        c = d if loss == "reverse_kl" else (q * g).sum(-1)
        grad.add_(q.mul_(g.sub_(c[:, None])), alpha=coef)
        return d

    @staticmethod
    def add_softmax_(grad: torch.Tensor, s: torch.Tensor, scale: float, lse1: torch.Tensor,
                     coef1: torch.Tensor, lse2: torch.Tensor | None = None,
                     coef2: torch.Tensor | None = None) -> None:
        """grad += coef1 exp(z - lse1) [+ coef2 exp(min(z - lse2, 0))], z = s scale, coefficients
        per row. The second term is the top-k tail's, where z <= lse2 on every tail token; the
        clamp keeps the k tokens, which the caller overwrites, finite."""
        z = s * scale  # (c, V)
        grad.add_((z - lse1[:, None]).exp_().mul_(coef1[:, None]))
        if lse2 is not None:
            grad.add_((z - lse2[:, None]).clamp_(max=0).exp_().mul_(coef2[:, None]))


def masked_lse(ops, tile: torch.Tensor, indices: torch.Tensor, scale: float) -> torch.Tensor:
    """logsumexp of tile * scale over every column but `indices` (c, k), per row. The tile is
    left as it was (the k columns are set to -inf for the reduction and written back)."""
    kept = tile.gather(1, indices)  # (c, k)
    tile.scatter_(1, indices, float("-inf"))
    out = ops.lse(tile, scale)
    tile.scatter_(1, indices, kept)
    return out


def tile_top_k(ops, u: torch.Tensor, k: int) -> TopK:
    """TopK of a teacher's logits tile (c, V) at temperature 1 (reference: top_k_targets)."""
    lse = ops.lse(u, 1.0)  # (c,)
    values, indices = u.topk(k, dim=-1)  # (c, k)
    tail = masked_lse(ops, u, indices, 1.0) - lse
    return TopK(values - lse[:, None], indices, tail)


def teacher_top_k(hidden: torch.Tensor, weight: torch.Tensor, k: int, *, chunk: int | None = None,
                  budget_bytes: int | None = None, backend: str = "torch") -> TopK:
    """TopK targets of a teacher from its hidden states (n, Ht) and LM head (V, Ht), chunk by
    chunk (what the offline cache stores); never more than one chunk of logits."""
    ops, n = _backend(backend), hidden.size(0)
    chunk = chunk or chunk_tokens(weight.size(0), max(1, n), budget_bytes, hidden.device, ROWS_PER_TOKEN)
    tile = torch.empty((min(chunk, n), weight.size(0)), dtype=_acc_dtype(hidden.dtype), device=hidden.device)
    parts = []
    with torch.no_grad():
        for s in range(0, n, chunk):
            u = _project(hidden[s:s + chunk], weight.to(hidden.dtype), None, tile[:min(chunk, n - s)])
            parts.append(tile_top_k(ops, u, k))
    if not parts:
        return TopK(torch.empty(0, k), torch.empty(0, k, dtype=torch.long), torch.empty(0))
    return TopK(*(torch.cat([getattr(p, f) for p in parts]) for f in ("log_probs", "indices", "tail")))


def bucket_gradient(logp: torch.Tensor, logq: torch.Tensor, loss: str, beta: float):
    """For top-k buckets (c, k + 1; the tail last): (D (c,), a (c,), b (c,) or None, kept (c, k))
    such that dD/dz_i = a q_i [+ b q_i / Q_tail] for a tail token i and = kept for the k tokens.
    Forward KL's b = -P_tail keeps q_i / Q_tail = exp(z_i - lse_tail) <= 1 apart, so that a tail
    the student nearly empties does not overflow P_tail / Q_tail."""
    d = divergence(logp, logq, loss, beta)
    p, q = logp.exp(), logq.exp()
    if loss == "forward_kl":  # q_i (1 - P_tail / Q_tail); q_i - P_i on the k tokens
        return d, torch.ones_like(d), -p[:, -1], q[:, :-1] - p[:, :-1]
    if loss == "reverse_kl":
        g = logq - logp
    else:
        logm = torch.logaddexp(logp + math.log(beta), logq + math.log(1 - beta))
        g = (1 - beta) * (logq - logm)
    a = g - (q * g).sum(-1, keepdim=True)  # (c, k + 1): G_b - <Q, G>
    return d, a[:, -1], None, q[:, :-1] * a[:, :-1]


@dataclass
class _Spec:
    teachers: list[Teacher]  # targets already restricted to the scored tokens
    loss: str
    beta: float
    temperature: float
    alpha: float
    top_k: int | None
    chunk: int
    ops: type
    compute_dtype: torch.dtype


def _chunk_terms(spec: _Spec, s: torch.Tensor, grad: torch.Tensor | None, targets: torch.Tensor,
                 rows: slice, u_tile: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: (T^2 D summed per teacher (teachers,), CE summed); with `grad`, adds
    d(sum_j w_j T^2 D_j + alpha CE)/ds to it (c, V). `s` (c, V) is left as it was."""
    ops, T, scale = spec.ops, spec.temperature, 1.0 / spec.temperature
    lse_s = ops.lse(s, scale)  # (c,)
    kd = []
    for teacher in spec.teachers:
        coef, target = teacher.weight * T, teacher.targets
        if isinstance(target, TeacherHead):
            # in the teacher's own dtype: its (V, Ht) weight is never copied
            th = target.hidden[rows].to(target.weight.dtype)  # (c, Ht)
            u = _project(th, target.weight, None, u_tile[:s.size(0)])  # (c, V)
            if spec.top_k is None:
                lse_u = ops.lse(u, scale)
                kd.append(ops.full_teacher_(grad, s, u, lse_u=lse_u, lse_s=lse_s, scale=scale,
                                            coef=coef, loss=spec.loss, beta=spec.beta).sum())
                continue
            target = tile_top_k(ops, u, spec.top_k)
        else:
            target = target[rows]
        idx = target.indices.long()  # (c, k)
        logp = teacher_buckets(target, T)  # (c, k + 1)
        lse_tail = masked_lse(ops, s, idx, scale)  # (c,)
        logq = torch.cat([s.gather(1, idx) * scale - lse_s[:, None], (lse_tail - lse_s)[:, None]], 1)
        d, a, b, kept = bucket_gradient(logp, logq, spec.loss, spec.beta)
        kd.append(d.sum())
        if grad is not None:
            # every token gets the tail's formula, then the k tokens are overwritten with theirs
            before = grad.gather(1, idx)
            tail = (lse_tail, coef * b) if b is not None else (None, None)
            ops.add_softmax_(grad, s, scale, lse_s, coef * a, *tail)
            grad.scatter_(1, idx, before + coef * kept)
    # CE at temperature 1, always reported (a gather, plus one pass when T != 1)
    lse1 = lse_s if T == 1 else ops.lse(s, 1.0)
    ce = (lse1 - s.gather(1, targets[:, None]).squeeze(1)).sum()
    if spec.alpha and grad is not None:  # alpha (softmax(s) - onehot)
        ops.add_softmax_(grad, s, 1.0, lse1, torch.full_like(lse1, spec.alpha))
        grad[torch.arange(s.size(0), device=s.device), targets] -= spec.alpha
    return T * T * torch.stack(kd), ce


class _LinearDistill(torch.autograd.Function):
    """sum over tokens of the loss, from hidden (n, H) and weight (V, H), over chunks.

    Returns (loss (), terms (teachers + 1,) = [T^2 D_j summed..., CE summed], no gradient).
    The hidden-state and weight gradients are formed in the forward (when asked for) and scaled
    by the upstream gradient in the backward, in place: a second (V, H) weight gradient would
    double the memory the fusion saves, so the graph can be backpropagated once (as Liger's
    fused linear cross-entropy does)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, spec: _Spec, want_grad: bool):
        ctx.set_materialize_grads(False)
        n, V = hidden.size(0), weight.size(0)
        dtype, acc = spec.compute_dtype, _acc_dtype(spec.compute_dtype)
        needs_h, needs_w = want_grad and ctx.needs_input_grad[0], want_grad and ctx.needs_input_grad[1]
        w = weight.to(dtype)
        grad_h = torch.empty_like(hidden) if needs_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs_w else None
        c = min(spec.chunk, n)
        tile = torch.empty((c, V), dtype=acc, device=hidden.device)
        grad_tile = torch.empty_like(tile) if needs_h or needs_w else None
        heads = any(isinstance(t.targets, TeacherHead) for t in spec.teachers)
        u_tile = torch.empty_like(tile) if heads else None
        kd = torch.zeros(len(spec.teachers), dtype=acc, device=hidden.device)
        ce = torch.zeros((), dtype=acc, device=hidden.device)
        for s in range(0, n, spec.chunk):
            e = min(s + spec.chunk, n)
            h = hidden[s:e].to(dtype)  # (c, H)
            logits = _project(h, w, None, tile[:e - s])  # (c, V)
            g = grad_tile[:e - s].zero_() if grad_tile is not None else None
            chunk_kd, chunk_ce = _chunk_terms(spec, logits, g, targets[s:e], slice(s, e), u_tile)
            kd += chunk_kd
            ce += chunk_ce
            if needs_h:
                grad_h[s:e] = (g.to(dtype) @ w).to(hidden.dtype)  # (c, H)
            if needs_w:
                _accumulate_weight_grad(grad_w, g, h)  # (V, c) @ (c, H)
        weights = torch.tensor([t.weight for t in spec.teachers], dtype=acc, device=kd.device)
        loss = (weights * kd).sum() + spec.alpha * ce
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        terms = torch.cat([kd, ce[None]])
        ctx.mark_non_differentiable(terms)
        return loss, terms

    @staticmethod
    def backward(ctx, grad_loss, _):
        grad_h, grad_w = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None, None
        for grad in (grad_h, grad_w):
            if grad is not None and not bool(grad_loss == 1):
                grad.mul_(grad_loss.to(grad.dtype))
        return grad_h, grad_w, None, None, None


def linear_distill_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        teachers: list[Teacher], *, loss: str = "forward_kl", beta: float = 0.5,
                        temperature: float = 1.0, alpha: float = 0.0, top_k: int | None = None,
                        ignore_index: int = IGNORE_INDEX, budget_bytes: int | None = None,
                        chunk: int | None = None, backend: str = "torch") -> Terms:
    """The distillation loss summed over the scored tokens, as `Terms` (loss, kd, ce, count).

    hidden (..., H) the student's last hidden states; weight (V, H) its LM head (no bias);
    labels (...) already shifted, `ignore_index` where nothing is scored. Teachers: TeacherHead
    (hidden (..., Ht) aligned with `hidden`) or TopK (one row per scored token, row-major).
    `top_k`: restrict live teachers to their top k + tail (as the cache does). `backend`:
    "torch" or "triton" (GPU, or the Triton interpreter). Divide `loss` by `count` (or by the
    tokens of the whole accumulated batch) for a mean.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if not teachers:
        raise ValueError("distillation needs at least one teacher")
    V, H = weight.shape
    if top_k is not None and not 0 < top_k < V:
        raise ValueError(f"top_k must be between 1 and the vocabulary size - 1 ({V - 1}), got {top_k}")
    keep = labels.reshape(-1) != ignore_index  # (N,)
    h = hidden.reshape(-1, H)[keep]  # (n, H): only scored positions reach the heads
    n = h.size(0)
    picked = []
    for t in teachers:
        target = t.targets
        if isinstance(target, TeacherHead):
            if target.weight.size(0) != V:
                raise ValueError(f"a teacher's LM head has {target.weight.size(0)} rows, the "
                                 f"student's {V}: the vocabularies differ")
            target = TeacherHead(target.hidden.reshape(-1, target.hidden.size(-1))[keep].detach(),
                                 target.weight.detach())
        elif target.indices.size(0) != n:
            raise ValueError(f"top-k targets have {target.indices.size(0)} rows for {n} scored tokens")
        picked.append(Teacher(target, float(t.weight)))
    device = hidden.device
    dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
             else hidden.dtype)
    spec = _Spec(picked, loss, beta, float(temperature), float(alpha), top_k,
                 chunk or chunk_tokens(V, max(1, n), budget_bytes, device, ROWS_PER_TOKEN),
                 _backend(backend), dtype)
    count = keep.sum()
    if n == 0:  # no scored token: zero, still connected to the graph
        zero = hidden.sum() * 0 + weight.sum() * 0
        return Terms(zero, torch.zeros(len(teachers), device=device), torch.zeros((), device=device), count)
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device.type, enabled=False):
        total, terms = _LinearDistill.apply(h, weight, labels.reshape(-1)[keep], spec, want_grad)
    return Terms(total, terms[:-1], terms[-1], count)


def _backend(name: str):
    if name == "torch":
        return DistillChunkOps
    if name == "triton":
        from alignloop.kernels.distill_triton import TritonDistillOps

        return TritonDistillOps
    raise ValueError(f"backend must be 'torch' or 'triton', got {name!r}")
