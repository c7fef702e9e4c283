"""The fused linear + cross-entropy (alignloop/kernels/fused_loss.py, fused_loss_triton.py) against
the naive full-logits loss: values and gradients, odd shapes, ignored tokens, chunking, the
statistics TRL logs, and what autograd keeps.

Tolerances. fp64: gradcheck (finite differences). fp32: the fused path and the reference do the
same fp32 maths in a different order (a log-sum-exp over 301 terms per token, chunked sums of
at most 37 tokens per weight-gradient entry), so they agree to a few fp32 ulps of the values
involved (|logits| < 30): 2e-5 absolute. fp16 (Triton): FlashAttention's rule, the kernel's error
against an fp64 reference is at most 2x the error of the torch path in the same precision (plus
1e-6 for values that both get exactly right).
"""


import torch

import pytest  # noqa: E402

from alignloop.kernels.fused_loss import (IGNORE_INDEX, chunk_tokens,  # noqa: E402
                                          linear_cross_entropy, linear_log_probs,
                                          reference_log_probs)

B, T, H, V = 3, 37, 24, 301  # odd shapes: no multiple of a block size anywhere


def inputs(dtype=torch.float32, bias=True, seed=0, ignored=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < ignored] = IGNORE_INDEX
    labels[1, :5] = IGNORE_INDEX  # a prompt-like run of ignored tokens
    labels[2, -1] = V - 1  # the last vocabulary entry as a target
    tensors = [t.to(dtype).requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    return (*tensors, labels)


def grads(value, params):
    return torch.autograd.grad(value, [p for p in params if p is not None])


@pytest.mark.parametrize("chunk", [1, 7, None, 1000])
def test_log_probs_and_gradients_equal_the_naive_loss(chunk):
    h, w, b, labels = inputs()
    weights = torch.randn(B, T, dtype=torch.float64).float()  # an arbitrary upstream gradient
    fused = linear_log_probs(h, w, labels, b, chunk=chunk).log_probs
    naive = reference_log_probs(h, w, labels, b)
    assert fused.shape == labels.shape
    assert torch.allclose(fused, naive, atol=2e-5, rtol=0)
    assert (fused[labels == IGNORE_INDEX] == 0).all()
    for got, want in zip(grads((fused * weights).sum(), (h, w, b)), grads((naive * weights).sum(), (h, w, b))):
        assert torch.allclose(got, want, atol=2e-5, rtol=0)


def test_gradcheck_in_fp64():
    h, w, b, labels = inputs(torch.float64, seed=1)
    h, w, b = h[:, :9].detach().requires_grad_(), w, b  # fewer finite differences
    labels = labels[:, :9]
    assert torch.autograd.gradcheck(lambda h, w, b: linear_log_probs(h, w, labels, b, chunk=4).log_probs,
                                    (h, w, b))


def test_mean_and_sum_reductions_and_gradient_accumulation():
    """mean = torch's cross_entropy over the label tokens; sum/count over two micro-batches equals
    the mean over the whole batch (what gradient accumulation must reproduce)."""
    h, w, b, labels = inputs()
    mean = linear_cross_entropy(h, w, labels, b)
    want = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w, b).reshape(-1, V),
                                             labels.reshape(-1), ignore_index=IGNORE_INDEX)
    assert torch.allclose(mean, want, atol=2e-5)
    g_mean = grads(mean, (h, w, b))

    (s1, n1), (s2, n2) = (linear_cross_entropy(h[i], w, labels[i], b, reduction="sum")
                          for i in (slice(0, 1), slice(1, 3)))
    assert n1 + n2 == (labels != IGNORE_INDEX).sum()
    for got, want in zip(grads((s1 + s2) / (n1 + n2), (h, w, b)), g_mean):
        assert torch.allclose(got, want, atol=2e-5)


def test_no_label_token_gives_zero_loss_and_zero_gradients():
    h, w, b, labels = inputs()
    labels = torch.full_like(labels, IGNORE_INDEX)
    loss = linear_cross_entropy(h, w, labels, b)
    assert loss.item() == 0.0
    assert all((g == 0).all() for g in grads(loss, (h, w, b)))


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_frozen_head_gradient_formed_in_the_forward_serves_any_upstream(chunk):
    """LoRA: the LM head is frozen, only the hidden states need a gradient, and the forward forms
    it per token. Any per-token upstream gradient (here random, as DPO's differ per sequence)
    must give the naive loss's hidden-state gradient; two backward passes through one graph
    give the same answer (nothing is consumed)."""
    h, w, _, labels = inputs(bias=False)
    w = w.detach()
    upstream = torch.randn(B, T, generator=torch.Generator().manual_seed(5))
    fused = linear_log_probs(h, w, labels, chunk=chunk).log_probs
    (g,) = torch.autograd.grad((fused * upstream).sum(), [h], retain_graph=True)
    (again,) = torch.autograd.grad((fused * upstream).sum(), [h])
    want = torch.autograd.grad((reference_log_probs(h, w, labels) * upstream).sum(), [h])[0]
    assert torch.allclose(g, want, atol=2e-5, rtol=0) and torch.equal(g, again)


def test_statistics_equal_their_definitions():
    h, w, b, labels = inputs()
    out = linear_log_probs(h, w, labels, b, stats=True, chunk=5)
    logits = torch.nn.functional.linear(h, w, b).detach()
    p = logits.softmax(-1)
    keep = labels != IGNORE_INDEX
    entropy = -(p * p.log()).sum(-1)
    assert torch.allclose(out.entropy[keep], entropy[keep], atol=2e-5)
    assert torch.allclose(out.mean_logit[keep], logits.mean(-1)[keep], atol=2e-5)
    assert torch.equal(out.is_top1[keep], (logits.argmax(-1) == labels)[keep])
    assert not out.is_top1[~keep].any() and (out.entropy[~keep] == 0).all()


def test_autograd_keeps_no_tensor_of_the_logits_size():
    """What the naive loss keeps for its backward includes (tokens x vocab) tensors; the fused
    one keeps only inputs-sized tensors (hidden states, weight, labels, one value per token)."""
    h, w, b, labels = inputs(ignored=0.0)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        linear_cross_entropy(h, w, labels, b, chunk=8)
    assert max(sizes) <= max(h.numel(), w.numel()) < B * T * V
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reference_log_probs(h, w, labels, b).sum()
    assert max(sizes) >= B * T * V


def test_chunk_size_follows_the_memory_budget():
    """Per token a chunk holds 2 fp32 rows of the vocabulary (the logits and one scratch row)."""
    assert chunk_tokens(128256, 10**6, budget_bytes=256 * 2**20) == 256 * 2**20 // (128256 * 8)
    assert chunk_tokens(128256, 10, budget_bytes=2**30) == 10  # never more than the tokens
    assert chunk_tokens(128256, 10, budget_bytes=1) == 1  # never less than one


def test_bf16_inputs_compute_the_softmax_in_fp32():
    """bf16 hidden states and weight: the matmul rounds to bf16, the rest is fp32; the error
    against the fp64 reference is that of the bf16 matmul (|logit| ~ 10, bf16 eps 2^-8 -> 0.05)."""
    h, w, b, labels = inputs(bias=False)
    h16, w16 = h.detach().bfloat16(), w.detach().bfloat16()
    out = linear_log_probs(h16, w16, labels).log_probs
    exact = reference_log_probs(h16.double(), w16.double(), labels)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), exact, atol=0.1, rtol=0)


# ---- Triton kernels (GPU, or the interpreter on CPU) ------------------------------------------

def _triton():
    import triton  # noqa: F401  (a dev dependency: the tests must fail, not skip, without it)
    from alignloop.kernels import fused_loss_triton

    return fused_loss_triton


@pytest.mark.parametrize("frozen_head", [False, True], ids=["full", "frozen-head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernels_equal_the_reference(dtype, frozen_head):
    _triton()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    h, w, b, labels = inputs(dtype)
    h, w, b = (t.detach().to(device).requires_grad_(not frozen_head or t is h) for t in (h, w, b))
    labels = labels.to(device)
    upstream = torch.randn(B, T, generator=torch.Generator().manual_seed(3)).to(device)
    exact_in = [t.detach().double().requires_grad_() for t in (h, w, b)]
    exact = reference_log_probs(*exact_in[:2], labels, exact_in[2])
    exact_grads = grads((exact * upstream).sum(), exact_in)
    results = {}
    for backend in ("torch", "triton"):
        out = linear_log_probs(h, w, labels, b, chunk=8, stats=True, backend=backend)
        results[backend] = (out, grads((out.log_probs * upstream).sum(), [t for t in (h, w, b) if t.requires_grad]))
    (tri, tri_grads), (ref, ref_grads) = results["triton"], results["torch"]
    assert torch.equal(tri.is_top1, ref.is_top1)
    assert torch.allclose(tri.entropy, ref.entropy, atol=1e-4)
    assert torch.allclose(tri.mean_logit, ref.mean_logit, atol=1e-5)
    pairs = [(tri.log_probs, ref.log_probs, exact)] + list(zip(tri_grads, ref_grads, exact_grads))
    for got, torch_path, want in pairs:
        err_kernel = (got.double() - want).abs().max().item()
        err_torch = (torch_path.double() - want).abs().max().item()
        assert err_kernel <= 2 * err_torch + 1e-5, (err_kernel, err_torch)
