"""The Triton flash attention (alignloop/kernels/flash_attention.py) against its PyTorch reference.

Without a GPU the kernels run in Triton's interpreter, which must be switched on before the
kernel module is imported (stack-notes); it computes fp32 and fp16 correctly, bf16 not, so these
tests use fp32 and fp16 on small odd shapes with the interpreter's 16 x 16 tiles (several key and
query blocks per head, partial blocks at the ends).

Tolerances (docs/kernels.md):
- fp32: max |kernel - reference| <= 1e-5 * max(1, max |reference|), outputs and each gradient
  (measured: about 1e-6; the kernel multiplies in true fp32 and accumulates in fp32).
- fp16: FlashAttention's rule: the kernel's max error against the fp32 reference is at most twice
  PyTorch's own error computing the same thing in fp16 (`attention_reference(upcast=False)`),
  plus 1e-5 for outputs PyTorch gets exactly (measured ratios 0.4 to 1.5).
"""

from __future__ import annotations

import logging

import torch

import pytest  # noqa: E402

from alignloop.kernels import ATTENTION, flash_attention as fa  # noqa: E402
from alignloop.kernels import register  # noqa: E402
from alignloop.kernels import transformers_attention as hf  # noqa: E402
from alignloop.kernels.attention_reference import attention_mask_reference, attention_reference  # noqa: E402
from alignloop.kernels.ranges import row_ranges  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_kernels_can_run_here():
    assert fa.kernel_runs_on(torch.device(DEVICE)), (
        "the Triton kernels were imported without TRITON_INTERPRET=1 on a machine without a GPU; "
        "some module imported alignloop.kernels.flash_attention before this test module set it")


# ---------------------------------------------------------------------------------------------
# Kernel vs reference


def _inputs(B, Hq, Hkv, Lq, Lk, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=gen).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(B, Hkv, Lk, D, generator=gen).to(DEVICE, dtype).requires_grad_()
    v = torch.randn(B, Hkv, Lk, D, generator=gen).to(DEVICE, dtype).requires_grad_()
    dout = torch.randn(B, Lq, Hq, D, generator=gen).to(DEVICE, dtype)
    return q, k, v, dout


def _reference(q, k, v, dout, dtype, upcast, **mask):
    xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = attention_reference(*xs, upcast=upcast, **mask)
    return [out, *torch.autograd.grad(out, xs, dout.to(dtype))]


def _check_against_reference(q, k, v, dout, blocks=None, **mask):
    """Runs the kernel, checks output, dq, dk, dv; returns them (kernel results) for more checks."""
    out = fa.flash_attention(q, k, v, blocks=blocks, **mask)
    ours = [out, *torch.autograd.grad(out, (q, k, v), dout)]
    exact = _reference(q, k, v, dout, torch.float32, True, **mask)
    names = ("out", "dq", "dk", "dv")
    if q.dtype == torch.float32:
        for name, a, b in zip(names, ours, exact):
            err, bound = (a - b).abs().max().item(), 1e-5 * max(1.0, b.abs().max().item())
            assert err <= bound, f"{name}: max error {err:.2e} > {bound:.2e}"
    else:
        torch_low = _reference(q, k, v, dout, q.dtype, False, **mask)
        for name, a, t, b in zip(names, ours, torch_low, exact):
            err = (a.float() - b).abs().max().item()
            torch_err = (t.float() - b).abs().max().item()
            assert err <= 2 * torch_err + 1e-5, f"{name}: error {err:.2e} > 2 x torch's {torch_err:.2e}"
    assert all(torch.isfinite(t).all() for t in ours)
    return ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,Hq,Hkv,L,D", [
    (2, 4, 2, 37, 16),   # GQA 2:1, three and a bit 16-row blocks
    (1, 3, 1, 29, 24),   # all query heads on one key head, head_dim not a power of 2
    (1, 2, 2, 20, 64),   # Llama head dims
    (1, 2, 1, 17, 128),
])
def test_causal_self_attention(B, Hq, Hkv, L, D, dtype):
    _check_against_reference(*_inputs(B, Hq, Hkv, L, L, D, dtype), causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_causal_and_bottom_right_causal(dtype):
    _check_against_reference(*_inputs(2, 2, 2, 23, 23, 16, dtype), causal=False)
    # 7 new queries after 23 cached keys: query i sees keys up to 23 + i
    _check_against_reference(*_inputs(1, 4, 2, 7, 30, 32, dtype, seed=1), causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_documents_match_reference_and_separate_documents(dtype):
    """Row 0 packs documents of 5, 1, 17 and 9 tokens, row 1 of 20 and 12: no token may see
    another document, so each document's outputs and gradients equal those of the document run
    alone."""
    lengths = [[5, 1, 17, 9], [20, 12]]
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths]).to(DEVICE)  # (2, 32)
    q, k, v, dout = _inputs(2, 4, 2, 32, 32, 16, dtype)
    out, dq, dk, dv = _check_against_reference(q, k, v, dout, causal=True, position_ids=pos)
    # Only the summation order differs (tiles start elsewhere): fp32 measured 7e-7, fp16 5e-4
    # (a few fp16 rounding steps of values below 2).
    atol = 2e-6 if dtype == torch.float32 else 2e-3
    for b, row in enumerate(lengths):
        start = 0
        for n in row:
            s = slice(start, start + n)
            parts = [t[b:b + 1, :, s].detach().clone().requires_grad_() for t in (q, k, v)]
            alone = fa.flash_attention(*parts, causal=True)
            grads = torch.autograd.grad(alone, parts, dout[b:b + 1, s])
            for got, want in zip((out[b:b + 1, s], *(g[b:b + 1, :, s] for g in (dq, dk, dv))),
                                 (alone, *grads)):
                torch.testing.assert_close(got, want, rtol=0, atol=atol)
            start += n


def _tile_mask(B, Lq, tiles, tile_len, seed=0):
    """Cross-attention mask: each text row sees a random subset of image tiles (tile_len keys each)."""
    gen = torch.Generator().manual_seed(seed)
    per_tile = torch.rand(B, Lq, tiles, generator=gen) > 0.5  # (B, Lq, tiles)
    per_tile[0, :3] = False  # text before any image: sees nothing
    per_tile[1, 5] = False
    per_tile[1, 6:9] = torch.tensor([True, True, False, False])  # contiguous rows
    return per_tile.repeat_interleave(tile_len, dim=2).to(DEVICE)  # (B, Lq, tiles * tile_len)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cross_attention_with_key_mask_and_fully_masked_rows(dtype):
    """21 text rows x 4 tiles of 11 keys; rows that see no tile give 0 and pass no gradient."""
    mask = _tile_mask(2, 21, 4, 11)
    q, k, v, dout = _inputs(2, 4, 2, 21, 44, 32, dtype)
    out, dq, dk, dv = _check_against_reference(q, k, v, dout, key_mask=mask)
    empty = ~mask.any(-1)  # (B, Lq)
    assert empty.sum() >= 4
    assert out[empty].abs().max() == 0 and dq.transpose(1, 2)[empty].abs().max() == 0
    # keys no row may see get no gradient
    unseen = ~mask.any(1)  # (B, Lk)
    if unseen.any():
        assert dk.transpose(1, 2)[unseen].abs().max() == 0


def test_key_padding_mask_and_a_query_block_with_no_keys():
    mask = torch.ones(2, 40, dtype=torch.bool, device=DEVICE)
    mask[0, 33:] = False  # right padding of the keys
    mask[1] = False  # a batch row with no key at all
    _check_against_reference(*_inputs(2, 2, 1, 19, 40, 16, torch.float32), key_mask=mask)


@pytest.mark.parametrize("blocks", [fa.Blocks(32, 16, 16, 32, 1, 1), fa.Blocks(16, 32, 32, 16, 1, 1)],
                         ids=["wide-query-tiles", "wide-key-tiles"])
def test_tile_shapes_do_not_change_the_result(blocks):
    """Forward and backward tiles of different heights and widths (the GPU's defaults differ too)."""
    pos = torch.cat([torch.arange(n) for n in (13, 1, 27)])[None].to(DEVICE)
    _check_against_reference(*_inputs(1, 4, 2, 41, 41, 16, torch.float32), blocks=blocks,
                             causal=True, position_ids=pos)
    _check_against_reference(*_inputs(2, 2, 1, 21, 44, 16, torch.float32), blocks=blocks,
                             key_mask=_tile_mask(2, 21, 4, 11))


def test_reference_mask_by_hand():
    """Documents of 2 and 1 tokens (positions 0 1 0), causal; then 2 queries after 3 cached keys."""
    packed = attention_mask_reference(1, 3, 3, causal=True, position_ids=torch.tensor([[0, 1, 0]]))
    assert packed[0].int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    cached = attention_mask_reference(1, 2, 5, causal=True, key_mask=torch.tensor([[0, 1, 1, 1, 1]]))
    assert cached[0].int().tolist() == [[0, 1, 1, 1, 0], [0, 1, 1, 1, 1]]


def test_row_ranges_use_the_dense_mask_only_for_holes():
    contiguous = torch.zeros(1, 3, 10, dtype=torch.bool)
    contiguous[0, 0, 2:5] = contiguous[0, 2, 7:] = True
    lo, hi, dense = row_ranges(1, 3, 10, key_mask=contiguous)
    assert dense is None and lo.tolist() == [[2, 0, 7]] and hi.tolist() == [[5, 0, 10]]
    holes = contiguous.clone()
    holes[0, 0, 8] = True
    lo, hi, dense = row_ranges(1, 3, 10, key_mask=holes)
    assert dense is not None and lo.tolist() == [[2, 0, 7]] and hi.tolist() == [[9, 0, 10]]


def test_query_block_ranges_cover_every_allowed_pair():
    gen = torch.Generator().manual_seed(0)
    lo = torch.randint(0, 50, (3, 45), generator=gen)
    hi = lo + torch.randint(-3, 20, (3, 45), generator=gen)
    start, end = fa.query_block_ranges(lo, hi.clamp(max=50), 50, 16, 8)
    for b in range(3):
        for i in range(45):
            for j in range(int(lo[b, i]), int(min(hi[b, i], 50))):
                assert start[b, j // 8] <= i < end[b, j // 8]


# ---------------------------------------------------------------------------------------------
# transformers integration: masks


def _tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).to(DEVICE)


def test_mask_function_gives_compact_ranges_for_causal_padding_and_packing():
    from transformers.masking_utils import create_causal_mask

    register()
    model = _tiny_llama()
    model.set_attn_implementation(ATTENTION)
    embeds = torch.zeros(1, 9, 48, device=DEVICE)
    # plain causal: nothing to build
    assert create_causal_mask(model.config, embeds, None, None, position_ids=torch.arange(9)[None]) is None
    # transformers' packed-sequence closure (no cache): one range per row, no (L, L) mask
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]], device=DEVICE)
    ranges = create_causal_mask(model.config, embeds, None, None, position_ids=pos)
    assert isinstance(ranges, hf.RowRanges) and ranges.dense is None
    assert ranges.lo.tolist() == [[0, 0, 0, 3, 3, 5, 5, 5, 5]] and ranges.hi.tolist() == [list(range(1, 10))]
    # left padding: keys from the first real token on; a padded query row sees nothing
    pad = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1]], device=DEVICE)
    ranges = create_causal_mask(model.config, embeds, pad, None, position_ids=pos)
    assert ranges.dense is None and ranges.lo.tolist() == [[2] * 9] and ranges.hi[0, :3].tolist() == [1, 2, 3]
    # a hole in the padding mask: exact dense mask on top of the ranges
    hole = torch.tensor([[1, 1, 1, 0, 1, 1, 1, 1, 1]], device=DEVICE)
    ranges = create_causal_mask(model.config, embeds, hole, None, position_ids=pos)
    assert ranges.dense is not None and not ranges.dense[0, 5, 3] and ranges.dense[0, 5, 4]


def test_any_other_mask_pattern_is_materialised_exactly_as_sdpa():
    from transformers.masking_utils import causal_mask_function, sdpa_mask, sliding_window_overlay, and_masks

    window = and_masks(causal_mask_function, sliding_window_overlay(3))
    ours = hf.flash_attention_mask(2, 6, 6, mask_function=window, device=DEVICE)
    expected = sdpa_mask(2, 6, 6, mask_function=window, allow_is_causal_skip=False, device=DEVICE)
    assert torch.equal(ours, expected)


def test_packed_masks_are_recognised_by_their_values_in_any_construction(caplog):
    """transformers 5.23 built `and(packed, causal)`, 5.25 `and(causal, packed)`; both (and a
    chunked mask, which is the same pattern) give ranges. A sliding window shorter than a
    document or a bidirectional block is not packed-causal: the exact dense mask, logged once."""
    from transformers.masking_utils import (and_masks, causal_mask_function, or_masks,
                                            packed_sequence_mask_function, sdpa_mask,
                                            sliding_window_overlay)

    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1, 1]], device=DEVICE)
    want_lo = [[0, 0, 0, 3, 3, 5, 5, 5, 5], [0, 0, 0, 0, 0, 0, 6, 6, 6]]
    packed = packed_sequence_mask_function(seg)
    for fn in (and_masks(packed, causal_mask_function), and_masks(causal_mask_function, packed)):
        ranges = hf.flash_attention_mask(2, 9, 9, mask_function=fn, device=DEVICE)
        assert isinstance(ranges, hf.RowRanges) and ranges.dense is None
        assert ranges.lo.tolist() == want_lo and ranges.hi.tolist() == [list(range(1, 10))] * 2
    hf._logged.discard("dense-mask")
    block = lambda b, h, q, kv: seg[b, q] == seg[b, kv]  # noqa: E731  (bidirectional documents)
    for fn in (and_masks(causal_mask_function, sliding_window_overlay(2), packed),
               or_masks(and_masks(causal_mask_function, packed), block)):
        with caplog.at_level(logging.WARNING, logger="alignloop.kernels"):
            ours = hf.flash_attention_mask(2, 9, 9, mask_function=fn, device=DEVICE)
        expected = sdpa_mask(2, 9, 9, mask_function=fn, allow_is_causal_skip=False, device=DEVICE)
        assert torch.equal(ours, expected)
    assert sum("no compact form" in r.getMessage() for r in caplog.records) == 1


def test_attention_function_reads_4d_boolean_and_additive_masks():
    """Mllama's cross-attention mask is additive (0 / finfo.min); both forms give the reference."""
    mask = _tile_mask(2, 21, 4, 11)  # (B, Lq, Lk)
    q, k, v, _ = _inputs(2, 4, 2, 21, 44, 32, torch.float32)
    module = torch.nn.Module()
    want = attention_reference(q, k, v, key_mask=mask)
    additive = torch.zeros(mask.shape, device=DEVICE).masked_fill(~mask, torch.finfo(torch.float32).min)
    for m in (mask[:, None], additive[:, None]):
        out, weights = hf.flash_attention_forward(module, q, k, v, m, scaling=32 ** -0.5)
        assert weights is None and out.shape == (2, 21, 4, 32)
        torch.testing.assert_close(out, want, rtol=0, atol=1e-5)


def test_attention_function_reads_documents_from_position_ids_or_cu_seq_lens():
    """No mask from transformers (plain causal): packed documents come from the kwargs."""
    q, k, v, _ = _inputs(1, 4, 2, 20, 20, 16, torch.float32)
    pos = torch.cat([torch.arange(n) for n in (5, 1, 14)])[None].to(DEVICE)
    want = attention_reference(q, k, v, causal=True, position_ids=pos)
    module = torch.nn.Module()
    cu = torch.tensor([0, 5, 6, 20], dtype=torch.int32, device=DEVICE)
    for kwargs in (dict(position_ids=pos), dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu)):
        out, _ = hf.flash_attention_forward(module, q, k, v, None, **kwargs)
        torch.testing.assert_close(out, want, rtol=0, atol=1e-5)


@pytest.mark.skipif(DEVICE == "cuda", reason="the fallback is for machines without a GPU")
def test_without_a_kernel_the_sdpa_fallback_gives_the_same_and_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(fa, "INTERPRETED", False)  # as on a CPU without TRITON_INTERPRET
    monkeypatch.setattr(hf, "_logged", set())
    mask = _tile_mask(2, 21, 4, 11)
    q, k, v, dout = _inputs(2, 4, 2, 21, 44, 32, torch.float32)
    module = torch.nn.Module()
    with caplog.at_level(logging.WARNING, logger="alignloop.kernels"):
        for _ in range(2):
            out, _ = hf.flash_attention_forward(module, q, k, v, mask[:, None], scaling=32 ** -0.5)
    assert sum("using torch sdpa" in r.message for r in caplog.records) == 1
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = _reference(q, k, v, dout, torch.float32, True, key_mask=mask)
    for a, b in zip((out, *got), want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Models


def _logits_and_grads(model, impl, **inputs):
    model.set_attn_implementation(impl)
    model.zero_grad()
    logits = model(**inputs).logits
    weights = torch.linspace(-1, 1, logits.numel(), device=DEVICE).view_as(logits)
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same_model_outputs(a, b, logits_atol=1e-5, grad_rtol=1e-4):
    """Logits within logits_atol; each parameter's gradient within grad_rtol of its largest entry
    (fp32: sdpa and the kernel sum in different orders, measured 1e-7 / 1e-6)."""
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=logits_atol)
    for name in a[1]:
        scale = b[1][name].abs().max().item()
        err = (a[1][name] - b[1][name]).abs().max().item()
        assert err <= grad_rtol * max(scale, 1e-3), f"{name}: grad error {err:.2e} (max {scale:.2e})"


# the sdpa fallback is what a machine without a GPU (and without the interpreter) runs
@pytest.mark.parametrize("kernel", [True] + ([False] if DEVICE != "cuda" else []),
                         ids=["kernel", "sdpa-fallback"][: 1 + (DEVICE != "cuda")])
def test_tiny_llama_matches_sdpa_unpacked_padded_and_packed(kernel, monkeypatch):
    if not kernel:
        monkeypatch.setattr(fa, "INTERPRETED", False)
    register()
    model = _tiny_llama().eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 21), generator=gen).to(DEVICE)
    pad = torch.ones(2, 21, dtype=torch.long, device=DEVICE)
    pad[0, :5] = 0  # left padding
    pad[1, 17:] = 0  # right padding
    cases = [dict(input_ids=ids), dict(input_ids=ids, attention_mask=pad),
             dict(input_ids=ids[:1], use_cache=False,
                  position_ids=torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7, 8]],
                                            device=DEVICE))]
    for inputs in cases:
        _assert_same_model_outputs(_logits_and_grads(model, ATTENTION, **inputs),
                                   _logits_and_grads(model, "sdpa", **inputs))


def test_tiny_llama_packed_equals_documents_run_separately():
    """With the default cache on, transformers does not look for packing (sdpa would attend across
    documents); the kernel reads the documents from position_ids, as flash-attn does."""
    register()
    model = _tiny_llama().eval()
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    spans = [(0, 8), (8, 9), (9, 20)]
    pos = torch.cat([torch.arange(e - s) for s, e in spans])[None].to(DEVICE)
    model.set_attn_implementation(ATTENTION)
    packed = model(input_ids=ids, position_ids=pos).logits
    alone = torch.cat([model(input_ids=ids[:, s:e]).logits for s, e in spans], dim=1)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)


def test_generation_with_padding_and_cache_matches_sdpa():
    register()
    model = _tiny_llama().eval()
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    pad = torch.ones_like(ids)
    pad[0, :4] = 0
    outputs = {}
    for impl in (ATTENTION, "sdpa"):
        model.set_attn_implementation(impl)
        outputs[impl] = model.generate(ids, attention_mask=pad, max_new_tokens=5, do_sample=False,
                                       pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(outputs[ATTENTION].sequences, outputs["sdpa"].sequences)
    for a, b in zip(outputs[ATTENTION].logits, outputs["sdpa"].logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_fp16_tiny_llama_logits_close_to_sdpa():
    """fp16 weights: both paths round differently; logits (about +-1) agree to 5e-3."""
    register()
    model = _tiny_llama().to(torch.float16).eval()
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with torch.no_grad():
        model.set_attn_implementation(ATTENTION)
        ours = model(input_ids=ids).logits.float()
        model.set_attn_implementation("sdpa")
        theirs = model(input_ids=ids).logits.float()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=5e-3)


def _train(impl: str, steps: int = 8) -> list[float]:
    """A few AdamW steps of the tiny Llama on two packed rows (three documents each), alternating."""
    model = _tiny_llama().train()
    model.set_attn_implementation(impl)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = torch.randint(0, 97, (2, 1, 24), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    pos = torch.cat([torch.arange(n) for n in (7, 10, 7)])[None].to(DEVICE)  # (1, 24)
    losses = []
    for step in range(steps):
        ids = batches[step % 2]
        loss = model(input_ids=ids, position_ids=pos, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_training_loss_curve_matches_sdpa():
    """Same seed, same data: the loss of every step within 1e-4 of sdpa's (fp32; measured 1e-6).
    A kernel whose gradient were slightly wrong would drift away step after step."""
    register()
    ours, theirs = _train(ATTENTION), _train("sdpa")
    assert theirs[-1] < theirs[0] - 1.0  # it memorises the two rows: the curve has a slope
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert abs(a - b) <= 1e-4, f"step {step}: loss {a:.6f} vs sdpa {b:.6f}"


# ---------------------------------------------------------------------------------------------
# Recipes


def test_recipe_can_choose_the_kernel_and_loading_registers_it(tiny_dir):
    from alignloop.config import Recipe
    from alignloop.models.loading import load_model

    for name in ("alignloop_flash", "alignloop_triton"):
        cfg = Recipe.model_validate({"model": {"attn_implementation": name}, "precision": "fp32"})
        assert cfg.model.attn_implementation == ATTENTION
    model = load_model(cfg, str(tiny_dir))
    assert model.config._attn_implementation == ATTENTION
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        model.set_attn_implementation("sdpa")
        torch.testing.assert_close(ours, model(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_tiny_mllama_matches_sdpa_through_the_kernel(caplog):
    """Mllama routes its vision encoder (additive padding-tile mask), its causal text self-attention
    and its gated cross-attention (additive mask over image tiles; Mllama unmasks rows that see no
    tile and zeroes their output itself) through the registered function."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    register()
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                  attention_heads=2, image_size=28, patch_size=14, max_num_tiles=4,
                  intermediate_layers_indices=[0], vision_output_dim=64)
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1],
                max_position_embeddings=128, rope_scaling=None, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
    model = MllamaForConditionalGeneration(MllamaConfig(vision_config=vision, text_config=text,
                                                        image_token_index=127)).to(DEVICE).eval()
    gen = torch.Generator().manual_seed(6)
    cross = torch.zeros(2, 13, 1, 4, dtype=torch.long)
    cross[0, 3:, 0, :2] = 1  # row 0: text from token 3 on sees the image's 2 tiles
    cross[1, 5:, 0, :1] = 1
    inputs = dict(input_ids=torch.randint(3, 120, (2, 13), generator=gen),
                  pixel_values=torch.randn(2, 1, 4, 3, 28, 28, generator=gen),
                  aspect_ratio_ids=torch.tensor([[6], [1]]),
                  aspect_ratio_mask=torch.tensor([[[1, 1, 0, 0]], [[1, 0, 0, 0]]]),
                  cross_attention_mask=cross)
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    with caplog.at_level(logging.WARNING, logger="alignloop.kernels"):
        ours = _logits_and_grads(model, ATTENTION, **inputs)
    assert not [r for r in caplog.records if "using torch sdpa" in r.message]
    _assert_same_model_outputs(ours, _logits_and_grads(model, "sdpa", **inputs))
