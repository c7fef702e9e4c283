"""The fused distillation loss (alignloop/kernels/distill_loss.py, distill_triton.py) against its
spec (alignloop/kernels/distill_reference.py): each divergence, live and top-k teachers, several
teachers, temperature and the CE term, forward and backward, on odd shapes.

Tolerances. fp64: the fused path and the reference do the same maths in a different order (a
log-sum-exp over V = 1003 terms per token, sums over ~80 tokens and chunks of 7), so they agree
to a few hundred fp64 ulps of the values involved (|loss| < 1e3, |logits| < 30): 1e-9
relative to the largest entry. fp32 (torch rows and Triton kernels): FlashAttention's rule, the
fused loss's error against the fp64 reference may be at most 2x the error of the fp32 reference
itself (PyTorch's own fp32 error) plus 4 fp32 ulps (4 x 1.2e-7) of the largest entry, for values
that both happen to get exactly right.
"""

import math

import pytest
import torch

from alignloop.kernels.distill_loss import (Teacher, TeacherHead, linear_distill_loss, teacher_top_k)
from alignloop.kernels.distill_reference import (IGNORE_INDEX, LOSSES, TopK, kd_per_token,
                                                 reference_distill_loss, top_k_targets)

B, T, H, Ht, V = 5, 23, 24, 40, 1003  # odd shapes: no multiple of a block anywhere
K = 17


def inputs(dtype=torch.float64, seed=0, ignored=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.4
    t_hidden = [torch.randn(B, T, Ht, generator=g, dtype=torch.float64) for _ in range(2)]
    t_weight = [torch.randn(V, Ht, generator=g, dtype=torch.float64) * 0.3 for _ in range(2)]
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < ignored] = IGNORE_INDEX
    labels[1, :6] = IGNORE_INDEX  # a prompt-like run
    labels[2, -1] = V - 1
    h, w = (t.to(dtype).requires_grad_() for t in (hidden, weight))
    heads = [TeacherHead(th.to(dtype), tw.to(dtype)) for th, tw in zip(t_hidden, t_weight)]
    return h, w, heads, labels


def teacher_logits(head: TeacherHead) -> torch.Tensor:
    return head.hidden @ head.weight.t()  # (B, T, V)


def cached(head: TeacherHead, labels: torch.Tensor, k: int = K) -> TopK:
    """Top-k rows of the scored positions, as the offline cache stores them."""
    keep = labels.reshape(-1) != IGNORE_INDEX
    return top_k_targets(teacher_logits(head).reshape(-1, V)[keep], k)


def grads(value, params):
    return torch.autograd.grad(value, params)


def compare(fused, ref, params, tol):
    assert torch.allclose(fused.kd, ref.kd.to(fused.kd.dtype), rtol=0, atol=tol * max(1, ref.kd.abs().max()))
    assert abs(fused.ce.item() - ref.ce.item()) <= tol * max(1, abs(ref.ce.item()))
    assert fused.count == ref.count
    for got, want in zip(grads(fused.loss, params), grads(ref.loss, params)):
        assert torch.allclose(got, want, rtol=0, atol=tol * max(1, want.abs().max()))


CASES = [(loss, mode) for loss in LOSSES for mode in ("full", "live_top_k", "cached_top_k")]


@pytest.mark.parametrize("loss, mode", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("temperature, alpha", [(1.0, 0.0), (2.0, 0.5)])
def test_fused_equals_the_reference_in_fp64(loss, mode, temperature, alpha):
    h, w, heads, labels = inputs()
    top_k = K if mode == "live_top_k" else None
    fused_teachers = [Teacher(heads[0] if mode != "cached_top_k" else cached(heads[0], labels), 0.7),
                      Teacher(heads[1] if mode != "cached_top_k" else cached(heads[1], labels), 0.3)]
    ref_teachers = [(teacher_logits(heads[0]) if mode != "cached_top_k" else cached(heads[0], labels), 0.7),
                    (teacher_logits(heads[1]) if mode != "cached_top_k" else cached(heads[1], labels), 0.3)]
    kwargs = dict(loss=loss, beta=0.3, temperature=temperature, alpha=alpha, top_k=top_k)
    fused = linear_distill_loss(h, w, labels, fused_teachers, chunk=7, **kwargs)
    ref = reference_distill_loss(h, w, labels, ref_teachers, **kwargs)
    assert abs(fused.loss.item() - ref.loss.item()) <= 1e-9 * max(1, abs(ref.loss.item()))
    compare(fused, ref, (h, w), 1e-9)


@pytest.mark.parametrize("chunk", [1, None])
def test_chunking_does_not_change_the_loss(chunk):
    h, w, heads, labels = inputs()
    want = linear_distill_loss(h, w, labels, [Teacher(heads[0])], loss="jsd", chunk=7)
    got = linear_distill_loss(h, w, labels, [Teacher(heads[0])], loss="jsd", chunk=chunk)
    compare(got, want, (h, w), 1e-10)


def test_top_k_covering_all_but_one_token_is_the_full_divergence():
    """With k = V - 1 the tail bucket is one token, so the k + 1 buckets are the whole
    distribution: the top-k loss equals the full one at any temperature."""
    h, w, heads, labels = inputs()
    logits = teacher_logits(heads[0])
    for loss in LOSSES:
        full = reference_distill_loss(h, w, labels, [(logits, 1.0)], loss=loss, temperature=1.5)
        top = reference_distill_loss(h, w, labels, [(logits, 1.0)], loss=loss, temperature=1.5, top_k=V - 1)
        assert torch.allclose(top.kd, full.kd, rtol=1e-10)


def test_top_k_definition_by_hand():
    """One token, V = 4, k = 2, T = 1: teacher p = (0.5, 0.3, 0.15, 0.05) keeps tokens 0 and 1
    and a tail of 0.2; the student q = (0.25, 0.25, 0.25, 0.25) has buckets (0.25, 0.25, 0.5).
    Forward KL = 0.5 ln 2 + 0.3 ln 1.2 + 0.2 ln 0.4 = 0.21801."""
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    top = top_k_targets(p.log(), 2)
    assert top.indices.tolist() == [[0, 1]] and abs(top.tail.exp().item() - 0.2) < 1e-12
    kd = kd_per_token(torch.zeros(1, 4, dtype=torch.float64), top, loss="forward_kl")
    want = 0.5 * math.log(2.0) + 0.3 * math.log(1.2) + 0.2 * math.log(0.4)
    assert abs(kd.item() - want) < 1e-12


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss", LOSSES)
def test_a_tail_the_student_nearly_empties_stays_finite(loss, backend):
    """fp32, V = 13, k = 3: the teacher keeps 0.2 on each of 3 tokens and 0.4 in its tail; the
    student puts logit 100 on those 3 and 0 on the other 10, so Q_tail = 10 e^-100 ~ 4e-43 (an
    fp32 subnormal) and P_tail / Q_tail overflows fp32. The fused loss never forms that ratio:
    loss and gradients are finite and equal the fp64 reference. Tolerance: the logits (100) are
    rounded in fp32 to 100 x 6e-8 = 6e-6, so the loss (~40) and the logits' gradient are right to
    ~1e-5 relative; 1e-4 absolute on the loss, 1e-5 x the largest entry on dh and dW (dW holds
    the logits' gradient times the hidden states, up to 60)."""
    V = 13
    hidden = torch.zeros(1, 2, V, dtype=torch.float64)
    hidden[..., :3] = 100.0
    weight = torch.eye(V, dtype=torch.float64)  # logits = hidden
    top = TopK(torch.full((2, 3), math.log(0.2)), torch.tensor([[0, 1, 2], [2, 0, 1]]),
               torch.full((2,), math.log(0.4)))
    labels = torch.tensor([[5, 1]])
    exact_in = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    fused_in = [hidden.float().requires_grad_(), weight.float().requires_grad_()]
    exact = reference_distill_loss(*exact_in, labels, [(top, 1.0)], loss=loss, alpha=0.5)
    fused = linear_distill_loss(*fused_in, labels, [Teacher(top)], loss=loss, alpha=0.5, backend=backend)
    assert torch.isfinite(fused.loss) and abs(fused.loss.item() - exact.loss.item()) < 1e-4
    for got, want in zip(grads(fused.loss, fused_in), grads(exact.loss, exact_in)):
        assert torch.isfinite(got).all()
        assert torch.allclose(got.double(), want, rtol=0, atol=1e-5 * max(1, want.abs().max()))


def test_teachers_combine_as_a_weighted_sum_and_accumulation_is_exact():
    """loss = sum_j w_j KD_j + alpha CE; two micro-batches' sums divided by the total count equal
    the whole batch's mean (what gradient accumulation must reproduce)."""
    h, w, heads, labels = inputs()
    both = linear_distill_loss(h, w, labels, [Teacher(heads[0], 0.25), Teacher(heads[1], 0.75)], alpha=0.2)
    one = [linear_distill_loss(h, w, labels, [Teacher(head)]) for head in heads]
    assert torch.allclose(both.kd, torch.stack([o.kd[0] for o in one]))
    assert torch.allclose(both.loss, 0.25 * one[0].loss + 0.75 * one[1].loss + 0.2 * both.ce)
    parts = [linear_distill_loss(h[rows], w, labels[rows], [Teacher(TeacherHead(heads[0].hidden[rows],
                                                                               heads[0].weight))])
             for rows in (slice(0, 2), slice(2, 5))]
    whole = linear_distill_loss(h, w, labels, [Teacher(heads[0])])
    assert parts[0].count + parts[1].count == whole.count
    for got, want in zip(grads((parts[0].loss + parts[1].loss) / whole.count, (h, w)),
                         grads(whole.loss / whole.count, (h, w))):
        assert torch.allclose(got, want, rtol=0, atol=1e-12)


def test_cache_rows_and_live_top_k_give_the_same_loss():
    """The offline cache stores `teacher_top_k` (chunked, from the teacher's hidden states and
    head); training from it equals training against the live teacher restricted to its top k."""
    h, w, heads, labels = inputs()
    keep = labels.reshape(-1) != IGNORE_INDEX
    rows = teacher_top_k(heads[0].hidden.reshape(-1, Ht)[keep], heads[0].weight, K, chunk=5)
    assert torch.equal(rows.indices, cached(heads[0], labels).indices)
    from_cache = linear_distill_loss(h, w, labels, [Teacher(rows)], loss="reverse_kl", temperature=2.0)
    live = linear_distill_loss(h, w, labels, [Teacher(heads[0])], loss="reverse_kl", temperature=2.0, top_k=K)
    compare(from_cache, live, (h, w), 1e-10)


def test_no_scored_token_gives_zero_loss_and_zero_gradients():
    h, w, heads, labels = inputs()
    out = linear_distill_loss(h, w, torch.full_like(labels, IGNORE_INDEX), [Teacher(heads[0])], alpha=1.0)
    assert out.loss.item() == 0 and out.count == 0
    assert all((g == 0).all() for g in grads(out.loss, (h, w)))


def test_autograd_keeps_no_tensor_of_the_logits_size():
    h, w, heads, labels = inputs(torch.float32, ignored=0.0)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        linear_distill_loss(h, w, labels, [Teacher(heads[0])], loss="jsd", alpha=0.5, chunk=8)
    assert max(sizes) <= max(h.numel(), w.numel()) < B * T * V


def test_frozen_head_and_no_grad():
    """LoRA keeps the LM head frozen: only the hidden states get a gradient. Under no_grad
    (evaluation) no gradient is formed at all."""
    h, w, heads, labels = inputs()
    w = w.detach()
    out = linear_distill_loss(h, w, labels, [Teacher(heads[0])], alpha=0.3)
    ref = reference_distill_loss(h, w, labels, [(teacher_logits(heads[0]), 1.0)], alpha=0.3)
    assert torch.allclose(grads(out.loss, [h])[0], grads(ref.loss, [h])[0], atol=1e-10)
    with torch.no_grad():
        again = linear_distill_loss(h, w, labels, [Teacher(heads[0])], alpha=0.3)
    assert torch.allclose(again.loss, ref.loss.detach()) and not again.loss.requires_grad


# ---- fp32: torch rows and Triton kernels (GPU, or the interpreter on CPU) ---------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss, mode", CASES, ids=lambda v: str(v))
def test_fp32_error_is_at_most_twice_pytorchs(backend, loss, mode):
    if backend == "triton":
        import triton  # noqa: F401  (a dev dependency: fail, not skip, without it)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    h64, w64, heads64, labels = inputs(seed=1)
    labels = labels.to(device)

    def teachers(heads, as_reference):
        if mode == "cached_top_k":
            return [(cached(heads[0], labels), 1.0)] if as_reference else [Teacher(cached(heads[0], labels))]
        return [(teacher_logits(heads[0]), 1.0)] if as_reference else [Teacher(heads[0])]

    def leaves(dtype):
        return [t.detach().to(device, dtype).requires_grad_() for t in (h64, w64)]

    heads32 = [TeacherHead(t.hidden.to(device, torch.float32), t.weight.to(device, torch.float32))
               for t in heads64]
    heads64 = [TeacherHead(t.hidden.to(device), t.weight.to(device)) for t in heads64]
    kwargs = dict(loss=loss, beta=0.6, temperature=1.7, alpha=0.4, top_k=K if mode == "live_top_k" else None)
    exact_in, ref_in, fused_in = leaves(torch.float64), leaves(torch.float32), leaves(torch.float32)
    exact = reference_distill_loss(*exact_in, labels, teachers(heads64, True), **kwargs)
    ref = reference_distill_loss(*ref_in, labels, teachers(heads32, True), **kwargs)
    fused = linear_distill_loss(*fused_in, labels, teachers(heads32, False), chunk=8, backend=backend,
                                **kwargs)
    pairs = [(fused.loss, ref.loss, exact.loss), (fused.kd, ref.kd, exact.kd)]
    pairs += list(zip(grads(fused.loss, fused_in), grads(ref.loss, ref_in), grads(exact.loss, exact_in)))
    for got, torch_path, want in pairs:
        err_kernel = (got.double() - want).abs().max().item()
        err_torch = (torch_path.double() - want).abs().max().item()
        floor = 4 * 1.2e-7 * max(1.0, want.abs().max().item())
        assert err_kernel <= 2 * err_torch + floor, (err_kernel, err_torch, floor)
