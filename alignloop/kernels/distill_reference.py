"""The spec of the distillation losses: full logits, plain PyTorch, one line per formula.

Notation, per scored token (a position whose next-token label is not ignored):
  s (V,) the student's logits, u (V,) a teacher's, T the temperature;
  q = softmax(s / T) the student's distribution, p = softmax(u / T) the teacher's.

Divergences D(p, q) (GKD: Agarwal et al., 2024, arXiv 2306.13649, section 3):
  forward_kl   KL(p || q) = sum_i p_i (log p_i - log q_i)      (Hinton et al., 2015; Minitron)
  reverse_kl   KL(q || p) = sum_i q_i (log q_i - log p_i)      (mode seeking, MiniLLM)
  jsd          m = beta p + (1 - beta) q,
               JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m),   0 < beta < 1

Top-k targets (an offline cache, or a live teacher restricted to them): the teacher keeps its k
most likely tokens K at temperature 1, log p1_i for i in K, and its tail mass
t = log(1 - sum_{i in K} p1_i). The distributions compared are then over k + 1 buckets, the k
tokens and "every other token":
  teacher  P = softmax([log p1_K, t] / T)  (the tail tempered as one bucket: at T = 1 this is
           exactly the teacher's kept mass; at T != 1 the spread inside the tail is not stored)
  student  Q = [q_K, 1 - sum_{i in K} q_i]  (q = softmax(s / T): its own mass outside K)
and D is the same divergence over the buckets.

The loss of one token, with teachers j of weights w_j (the stage normalises them to sum 1):
  L = sum_j w_j T^2 D(p_j, q) + alpha CE(s, label),   CE at temperature 1
(the T^2 keeps the gradient's scale independent of T; Hinton et al., 2015). The fused, chunked
version of all of this is alignloop/kernels/distill_loss.py; this file is its test oracle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
LOSSES = ("forward_kl", "reverse_kl", "jsd")
# Teacher log-probs are floored here: a token the teacher gives probability 0 (an underflow, or
# the empty tail when k covers the vocabulary) would make reverse KL infinite. exp(-100) ~ 4e-44.
LOG_FLOOR = -100.0


@dataclass
class TopK:
    """A teacher's next-token distribution as its top k tokens and one tail bucket, per token.

    log_probs (n, k) fp32: log p_i at temperature 1, largest first; indices (n, k) int64;
    tail (n,) fp32: log of the mass of every other token, log(1 - sum_i p_i).
    """

    log_probs: torch.Tensor
    indices: torch.Tensor
    tail: torch.Tensor

    def __getitem__(self, rows) -> "TopK":
        return TopK(self.log_probs[rows], self.indices[rows], self.tail[rows])


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def top_k_targets(teacher_logits: torch.Tensor, k: int) -> TopK:
    """TopK of teacher logits (n, V): what the cache stores and the live top-k path computes."""
    logp = torch.log_softmax(_at_least_fp32(teacher_logits), dim=-1)  # (n, V)
    values, indices = logp.topk(k, dim=-1)  # (n, k)
    tail = logp.scatter(-1, indices, float("-inf")).logsumexp(-1)  # (n,)
    return TopK(values, indices, tail)


def teacher_buckets(top: TopK, temperature: float) -> torch.Tensor:
    """log P (n, k + 1): the k tokens and the tail, tempered as k + 1 buckets, floored."""
    buckets = torch.cat([top.log_probs, top.tail[:, None]], dim=-1)  # (n, k + 1)
    return torch.log_softmax(buckets / temperature, dim=-1).clamp(min=LOG_FLOOR)


def student_buckets(logq: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """log Q (n, k + 1) from the student's log-probs (n, V): its k tokens and its tail."""
    kept = logq.gather(-1, indices)  # (n, k)
    tail = logq.scatter(-1, indices, float("-inf")).logsumexp(-1)  # (n,)
    return torch.cat([kept, tail[:, None]], dim=-1)


def divergence(logp: torch.Tensor, logq: torch.Tensor, loss: str, beta: float = 0.5) -> torch.Tensor:
    """D(p, q) per row of log-probs (n, B) -> (n,); p is the teacher's (no gradient needed)."""
    p, q = logp.exp(), logq.exp()
    if loss == "forward_kl":
        return (p * (logp - logq)).sum(-1)
    if loss == "reverse_kl":
        return (q * (logq - logp)).sum(-1)
    if loss == "jsd":
        logm = torch.logaddexp(logp + math.log(beta), logq + math.log(1 - beta))  # (n, B)
        return beta * (p * (logp - logm)).sum(-1) + (1 - beta) * (q * (logq - logm)).sum(-1)
    raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")


def kd_per_token(student_logits: torch.Tensor, teacher: torch.Tensor | TopK, *, loss: str,
                 beta: float = 0.5, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """T^2 D(p, q) per token (n,). `teacher`: logits (n, V), or TopK (n rows); with `top_k`,
    teacher logits are first restricted to their top k (as the live top-k path does)."""
    if isinstance(teacher, torch.Tensor) and top_k is not None:
        teacher = top_k_targets(teacher, top_k)
    logq = torch.log_softmax(_at_least_fp32(student_logits) / temperature, dim=-1)  # (n, V)
    if isinstance(teacher, TopK):
        logp, logq = teacher_buckets(teacher, temperature), student_buckets(logq, teacher.indices)
    else:
        logp = torch.log_softmax(_at_least_fp32(teacher) / temperature, dim=-1).clamp(min=LOG_FLOOR)
    return temperature ** 2 * divergence(logp, logq, loss, beta)


@dataclass
class Terms:
    """Sums over the scored tokens: `loss` (differentiable) = sum_j w_j kd[j] + alpha ce."""

    loss: torch.Tensor
    kd: torch.Tensor  # (teachers,) T^2 D summed, unweighted
    ce: torch.Tensor
    count: torch.Tensor


def reference_distill_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           teachers: list[tuple[torch.Tensor | TopK, float]], *, loss: str = "forward_kl",
                           beta: float = 0.5, temperature: float = 1.0, alpha: float = 0.0,
                           top_k: int | None = None, ignore_index: int = IGNORE_INDEX) -> Terms:
    """The whole loss from full logits. hidden (..., H), weight (V, H), labels (...) already
    shifted (the token each position predicts). Each teacher is (targets, weight): its logits
    (..., V), or a TopK with one row per scored position in row-major order."""
    keep = labels.reshape(-1) != ignore_index  # (N,)
    logits = _at_least_fp32(hidden.reshape(-1, hidden.size(-1))[keep] @ weight.t())  # (n, V)
    targets = labels.reshape(-1)[keep]  # (n,)
    kd = []
    for target, _ in teachers:
        if isinstance(target, torch.Tensor):
            target = target.reshape(-1, target.size(-1))[keep]  # (n, V)
        kd.append(kd_per_token(logits, target, loss=loss, beta=beta, temperature=temperature,
                               top_k=top_k))
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")  # (n,)
    total = sum(w * k.sum() for (_, w), k in zip(teachers, kd)) + alpha * ce.sum()
    return Terms(total, torch.stack([k.sum() for k in kd]).detach(), ce.sum().detach(), keep.sum())
