"""Kernel sections of the GPU suite: the machine's ceilings, correctness of the Triton attention
and fused loss in 16-bit at their real tile sizes, their speed against sdpa / naive / TRL, and a
tile sweep for Hopper.

Correctness follows FlashAttention's rule: in a 16-bit dtype the kernel's max error against an
fp32 reference is at most twice PyTorch's own error computing the same thing in that dtype (the
reference run with `upcast=False`, and for the loss the naive logits in that dtype), plus 1e-5
for values PyTorch gets exactly. Every check draws fresh random inputs (never zeros).
"""

from __future__ import annotations

import importlib.util
import itertools

import torch

from benchmarks.gpu.common import (Context, failure, peak_gib, rel_error, release, reset_peak, synchronize,
                                   time_ms)

# Llama 3 8B / 3.2 attention heads for speed; the 1B model's head_dim 64 is checked too.
HEADS, KV_HEADS = 32, 8
VOCAB = 128256
TILE_TOKENS, TILES = 1601, 4  # Llama 3.2 Vision: 1600 patches + 1 class token per 560 px tile


def _gen(ctx: Context, seed: int) -> torch.Generator:
    return torch.Generator(device=ctx.device).manual_seed(seed)


def _randn(ctx, gen, *shape, dtype, grad=False):
    t = torch.randn(*shape, device=ctx.device, dtype=torch.float32, generator=gen).to(dtype)
    return t.requires_grad_() if grad else t


# ---------------------------------------------------------------------------------------------
# Ceilings


def ceilings(ctx: Context) -> list[dict]:
    """A large bf16 matmul and a device-to-device copy: the two ceilings every figure is read against."""
    n = 256 if ctx.dry_run else 8192
    dtype = torch.float32 if ctx.dry_run else torch.bfloat16
    gen = _gen(ctx, 0)
    rows = []
    a, b = _randn(ctx, gen, n, n, dtype=dtype), _randn(ctx, gen, n, n, dtype=dtype)
    ms = time_ms(lambda: a @ b, ctx.device, reps=3 if ctx.dry_run else 10, warmup=1 if ctx.dry_run else 3)
    rows.append(dict(section="ceilings", what=f"matmul {n}^3 {str(dtype)[6:]}", ms=round(ms, 3),
                     rate=f"{2 * n**3 / ms / 1e9:.0f} TFLOP/s", status="ok"))
    count = (2**20 if ctx.dry_run else 2**31)  # bf16 elements: 4 GiB on the GPU
    src = torch.empty(count, device=ctx.device, dtype=torch.bfloat16).normal_(generator=gen)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), ctx.device, reps=3 if ctx.dry_run else 10)
    rows.append(dict(section="ceilings", what=f"copy {2 * count / 2**30:.2f} GiB", ms=round(ms, 3),
                     rate=f"{2 * 2 * count / (ms * 1e-3) / 1e9:.0f} GB/s (read + write)", status="ok"))
    del a, b, src, dst
    return rows


# ---------------------------------------------------------------------------------------------
# Attention correctness


def _attention_cases(ctx: Context):
    """(name, q_len, k_len, mask kwargs builder) at shapes that cross many real tiles, odd ends."""
    L = 40 if ctx.dry_run else 1029
    Lq_cross = 24 if ctx.dry_run else 517
    Lk_cross = 2 * 20 if ctx.dry_run else 2 * TILES * 401

    def causal(gen):
        return {"causal": True}

    def packed(gen):
        cuts = sorted(torch.randperm(L - 2, generator=torch.Generator().manual_seed(1))[:3].add(1).tolist())
        pos = torch.cat([torch.arange(e - s) for s, e in zip([0, *cuts], [*cuts, L])])
        return {"causal": True, "position_ids": pos[None].expand(2, -1).to(ctx.device)}

    def padded(gen):
        mask = torch.ones(2, L, dtype=torch.bool)
        mask[0, : L // 3] = False  # left padding in row 0
        mask[1, L - L // 5:] = False  # right padding in row 1
        return {"causal": True, "key_mask": mask.to(ctx.device)}

    def cross(gen):
        # image m's tiles are visible from text row (m + 1) * Lq / 3 on; rows before see none
        per_image = Lk_cross // 2
        rows = torch.arange(Lq_cross)[:, None]
        sees = torch.cat([(rows >= (m + 1) * Lq_cross // 3).expand(-1, per_image) for m in range(2)], 1)
        return {"key_mask": sees[None].expand(2, -1, -1).contiguous().to(ctx.device)}

    return [("causal GQA", L, L, causal), ("packed documents", L, L, packed),
            ("key padding", L, L, padded), ("masked cross-attention", Lq_cross, Lk_cross, cross)]


def _blocks_label(b) -> str:
    return (f"fwd {b.m}x{b.n} w{b.warps} s{b.stages}, bwd {b.bwd_m}x{b.bwd_n} "
            f"w{b.bwd_warps or b.warps} s{b.bwd_stages or b.stages}")


def attention_correctness(ctx: Context) -> list[dict]:
    from alignloop.kernels import flash_attention as fa
    from alignloop.kernels.attention_reference import attention_reference

    dtypes = [torch.float16] if ctx.dry_run else [torch.bfloat16, torch.float16]
    dims = [16] if ctx.dry_run else [64, 128]
    Hq, Hkv = (4, 2) if ctx.dry_run else (8, 2)
    rows = []
    for seed, ((name, Lq, Lk, mask_of), dtype, D) in enumerate(itertools.product(_attention_cases(ctx), dtypes, dims)):
        if ctx.out_of_time(30):
            rows.append(dict(section="attention_correctness", variant=name, dtype=str(dtype)[6:], head_dim=D,
                             status="skipped: out of time"))
            continue
        row = dict(section="attention_correctness", variant=name, dtype=str(dtype)[6:], head_dim=D,
                   blocks=_blocks_label(fa.default_blocks(D, torch.device(ctx.device))))
        try:
            gen = _gen(ctx, seed)
            q = _randn(ctx, gen, 2, Hq, Lq, D, dtype=dtype, grad=True)
            k = _randn(ctx, gen, 2, Hkv, Lk, D, dtype=dtype, grad=True)
            v = _randn(ctx, gen, 2, Hkv, Lk, D, dtype=dtype, grad=True)
            dout = _randn(ctx, gen, 2, Lq, Hq, D, dtype=dtype)
            mask = mask_of(gen)
            out = fa.flash_attention(q, k, v, **mask)
            ours = [out, *torch.autograd.grad(out, (q, k, v), dout)]

            def reference(rdtype, upcast):
                xs = [t.detach().to(rdtype).requires_grad_() for t in (q, k, v)]
                o = attention_reference(*xs, upcast=upcast, **mask)
                return [o, *torch.autograd.grad(o, xs, dout.to(rdtype))]

            exact, low = reference(torch.float32, True), reference(dtype, False)
            worst, passed = 0.0, True
            for part, a, t, b in zip(("out", "dq", "dk", "dv"), ours, low, exact):
                err = (a.float() - b).abs().max().item() if torch.isfinite(a).all() else float("inf")
                torch_err = (t.float() - b).abs().max().item()
                ratio = err / max(torch_err, 1e-12)
                row[f"{part}_err"] = f"{err:.1e}"
                row[f"{part}_ratio"] = round(ratio, 2)
                passed &= err <= 2 * torch_err + 1e-5
                worst = max(worst, ratio)
            row["rel_err_out"] = f"{rel_error(ours[0], exact[0]):.1e}"
            row["max_ratio_vs_torch"] = round(worst, 2)
            row["status"] = "ok" if passed else "failed: error > 2x PyTorch's own 16-bit error"
        except Exception as err:  # noqa: BLE001 - a failed configuration is a result
            row["status"] = failure(err)
        rows.append(row)
        synchronize(ctx.device)
    return rows


# ---------------------------------------------------------------------------------------------
# Attention speed


def sdpa_attention(backend=None, mask=None, causal=False, expand_kv=False):
    """sdpa with `enable_gqa`; `expand_kv` repeats the key/value heads first instead (what
    transformers' sdpa path does), for backends without GQA (memory-efficient)."""
    import contextlib

    from torch.nn.attention import sdpa_kernel

    def attend(q, k, v):
        if expand_kv:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        return out.transpose(1, 2)
    return attend


def fwd_bwd_step(attend, q, k, v, dout):
    def step():
        for t in (q, k, v):
            t.grad = None
        attend(q, k, v).backward(dout)
    return step


def _attention_inputs(ctx, q_len, k_len, D, seed=0):
    gen = _gen(ctx, seed)
    dtype = torch.float16 if ctx.dry_run else torch.bfloat16
    hq, hkv = (2, 1) if ctx.dry_run else (HEADS, KV_HEADS)
    q = _randn(ctx, gen, 1, hq, q_len, D, dtype=dtype, grad=True)
    k = _randn(ctx, gen, 1, hkv, k_len, D, dtype=dtype, grad=True)
    v = _randn(ctx, gen, 1, hkv, k_len, D, dtype=dtype, grad=True)
    dout = _randn(ctx, gen, 1, q_len, hq, D, dtype=dtype)
    return q, k, v, dout


def _tflops(pairs: int, D: int, ms: float, factor: float) -> float:
    """Useful multiply-adds only: 4 * Hq * D per allowed pair forward, 2.5x that backward."""
    return factor * 4 * HEADS * D * pairs / (ms * 1e-3) / 1e12


def _time_candidates(ctx, row_base, candidates, q, k, v, dout, pairs, D, reps) -> list[dict]:
    rows = []
    for label, attend in candidates:
        row = dict(row_base, implementation=label)
        try:
            fwd = time_ms(lambda: attend(q, k, v), ctx.device, reps)
            both = time_ms(fwd_bwd_step(attend, q, k, v, dout), ctx.device, reps)
            row.update(fwd_ms=round(fwd, 3), fwd_bwd_ms=round(both, 3),
                       fwd_tflops=round(_tflops(pairs, D, fwd, 1.0), 1),
                       fwd_bwd_tflops=round(_tflops(pairs, D, both, 3.5), 1), status="ok")
        except Exception as err:  # noqa: BLE001
            row["status"] = failure(err)
        rows.append(row)
        release(ctx.device)
    return rows


def attention_speed(ctx: Context) -> list[dict]:
    from torch.nn.attention import SDPBackend

    from alignloop.kernels.flash_attention import flash_attention

    D = 16 if ctx.dry_run else 128
    reps = 1 if ctx.dry_run else 10
    rows = []
    lengths = [32] if ctx.dry_run else [2048, 8192, 32768]
    for n in lengths:
        if ctx.out_of_time(20):
            rows.append(dict(section="attention_speed", variant="causal", shape=f"{n}", status="skipped: out of time"))
            continue
        q, k, v, dout = _attention_inputs(ctx, n, n, D)
        candidates = [("alignloop", lambda q, k, v: flash_attention(q, k, v, causal=True))]
        if not ctx.dry_run:
            candidates += [("sdpa flash", sdpa_attention(SDPBackend.FLASH_ATTENTION, causal=True)),
                           ("sdpa efficient", sdpa_attention(SDPBackend.EFFICIENT_ATTENTION, causal=True, expand_kv=True))]
        base = dict(section="attention_speed", variant="causal", shape=f"{n // 1024}K" if n >= 1024 else str(n),
                    dtype=str(q.dtype)[6:], head_dim=D)
        rows += _time_candidates(ctx, base, candidates, q, k, v, dout, n * (n + 1) // 2, D,
                                 reps if n < 32768 else 5)
        del q, k, v, dout
    # masked cross-attention: text rows x 2 images x 4 tiles x 1601 keys, rows before the first
    # image see nothing; sdpa gets the same dense boolean mask (empty rows given every key and
    # zeroed afterwards, as Mllama does).
    for text_len in ([24] if ctx.dry_run else [2048, 8192]):
        if ctx.out_of_time(20):
            rows.append(dict(section="attention_speed", variant="masked cross", shape=f"{text_len}",
                             status="skipped: out of time"))
            continue
        images, per_tile = 2, (4 if ctx.dry_run else TILE_TOKENS)
        image_at = [(m + 1) * text_len // (images + 1) for m in range(images)]
        text = torch.arange(text_len, device=ctx.device)[:, None]
        sees = torch.stack([text[:, 0] >= at for at in image_at], 1).repeat_interleave(TILES * per_tile, 1)[None]
        seen = sees.any(-1, keepdim=True)
        dense = (sees | ~seen)[:, None]  # (1, 1, Lq, Lk)
        q, k, v, dout = _attention_inputs(ctx, text_len, sees.shape[-1], D, seed=1)
        plain = sdpa_attention(mask=dense)

        def sdpa_masked(q, k, v, plain=plain, seen=seen):
            return plain(q, k, v) * seen[..., None]

        candidates = [("alignloop", lambda q, k, v, m=sees: flash_attention(q, k, v, key_mask=m)),
                      ("sdpa dense mask", sdpa_masked)]
        base = dict(section="attention_speed", variant="masked cross",
                    shape=f"{text_len} x {images}x{TILES}x{per_tile}", dtype=str(q.dtype)[6:], head_dim=D)
        rows += _time_candidates(ctx, base, candidates, q, k, v, dout, int(sees.sum()), D, reps)
        del q, k, v, dout, sees, dense
    _ratios(rows)
    return rows


def _ratios(rows: list[dict]) -> None:
    """speedup = the other implementation's time / alignloop's, per (variant, shape)."""
    ours = {(r["variant"], r["shape"]): r for r in rows if r.get("implementation") == "alignloop" and r["status"] == "ok"}
    for r in rows:
        mine = ours.get((r.get("variant"), r.get("shape")))
        if mine and r is not mine and r["status"] == "ok":
            r["alignloop_speedup_fwd_bwd"] = round(r["fwd_bwd_ms"] / mine["fwd_bwd_ms"], 2)
            r["alignloop_speedup_fwd"] = round(r["fwd_ms"] / mine["fwd_ms"], 2)


# ---------------------------------------------------------------------------------------------
# Tile sweep


# (rows, keys, warps, stages). First run (H200, 2026-12-04) swept the first eight of each; the
# rest look around its winners (forward 64x64 w4 s3 at head_dim 128, backward 64x64 w4).
FWD_TILES = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3),
             (64, 128, 4, 3), (128, 128, 8, 2), (128, 64, 4, 2),
             (64, 64, 4, 4), (64, 32, 4, 3), (64, 64, 8, 3), (64, 64, 4, 2)]
BWD_TILES = [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2),
             (32, 128, 4, 2), (64, 64, 4, 3), (128, 128, 8, 2),
             (64, 32, 4, 2), (128, 32, 4, 2), (64, 64, 4, 1), (128, 64, 4, 2), (32, 32, 2, 2)]


def attention_tiles(ctx: Context) -> list[dict]:
    """Forward tiles timed on the forward, backward tiles on forward+backward minus forward, 8K
    causal bf16, head_dim 64 and 128; each candidate's output checked against the default's."""
    from alignloop.kernels import flash_attention as fa

    rows = []
    n = 32 if ctx.dry_run else 8192
    reps = 1 if ctx.dry_run else 8
    fwd_tiles = [(16, 16, 1, 1)] if ctx.dry_run else FWD_TILES
    bwd_tiles = [(16, 16, 1, 1), (32, 16, 1, 1)] if ctx.dry_run else BWD_TILES
    for D in ([16] if ctx.dry_run else [128, 64]):
        q, k, v, dout = _attention_inputs(ctx, n, n, D, seed=2)
        default = fa.default_blocks(D, torch.device(ctx.device))
        reference = fa.flash_attention(q, k, v, causal=True, blocks=default).detach()
        ref_grads = torch.autograd.grad(fa.flash_attention(q, k, v, causal=True, blocks=default), (q, k, v), dout)
        fwd_best = None
        for m, nb, warps, stages in fwd_tiles:
            if ctx.out_of_time(15):
                break
            blocks = fa.Blocks(m, nb, default.bwd_m, default.bwd_n, warps, stages,
                               default.bwd_warps or default.warps, default.bwd_stages or default.stages)
            row = dict(section="attention_tiles", pass_="forward", head_dim=D, tokens=n,
                       tiles=f"m{m} n{nb} w{warps} s{stages}", default=(m, nb, warps, stages) ==
                       (default.m, default.n, default.warps, default.stages))
            try:
                out = fa.flash_attention(q, k, v, causal=True, blocks=blocks)
                row["rel_diff_vs_default"] = f"{rel_error(out, reference):.1e}"
                row["ms"] = round(time_ms(lambda: fa.flash_attention(q, k, v, causal=True, blocks=blocks),
                                          ctx.device, reps), 3)
                row["status"] = "ok" if rel_error(out, reference) < 1e-2 else "failed: output differs"
                if row["status"] == "ok" and (fwd_best is None or row["ms"] < fwd_best[0]):
                    fwd_best = (row["ms"], blocks)
            except Exception as err:  # noqa: BLE001 - e.g. out of shared memory
                row["status"] = failure(err)
            rows.append(row)
        fwd_blocks = fwd_best[1] if fwd_best else default
        fwd_ms = fwd_best[0] if fwd_best else None
        for m, nb, warps, stages in bwd_tiles:
            if ctx.out_of_time(15):
                break
            blocks = fa.Blocks(fwd_blocks.m, fwd_blocks.n, m, nb, fwd_blocks.warps, fwd_blocks.stages, warps, stages)
            row = dict(section="attention_tiles", pass_="backward", head_dim=D, tokens=n,
                       tiles=f"m{m} n{nb} w{warps} s{stages}",
                       default=(m, nb, warps, stages) == (default.bwd_m, default.bwd_n,
                                                         default.bwd_warps or default.warps,
                                                         default.bwd_stages or default.stages))
            try:
                out = fa.flash_attention(q, k, v, causal=True, blocks=blocks)
                grads = torch.autograd.grad(out, (q, k, v), dout)
                diff = max(rel_error(g, r) for g, r in zip(grads, ref_grads))
                row["rel_diff_vs_default"] = f"{diff:.1e}"
                both = time_ms(fwd_bwd_step(lambda q, k, v: fa.flash_attention(q, k, v, causal=True, blocks=blocks),
                                        q, k, v, dout), ctx.device, reps)
                row["fwd_bwd_ms"] = round(both, 3)
                if fwd_ms is not None:
                    row["ms"] = round(both - fwd_ms, 3)
                row["status"] = "ok" if diff < 2e-2 else "failed: gradients differ"
            except Exception as err:  # noqa: BLE001
                row["status"] = failure(err)
            rows.append(row)
        del q, k, v, dout
    return rows


# ---------------------------------------------------------------------------------------------
# Fused loss


def _trl_chunked():
    """TRL 1.16's ChunkedLogProbFunction (the LM head its SFT/DPO trainers use), loaded from its
    file without running trl/__init__, which wants datasets and more than the device image has.

    Its backward imports `maybe_gather_lm_head_ctx` from trl.trainer.utils, a DeepSpeed ZeRO-3
    gather that is a null context without ZeRO-3: stand-in packages provide just that. This is
    for this benchmark process only. None when TRL is not installed."""
    import contextlib
    import sys
    import types

    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = next(iter(spec.submodule_search_locations))
    if "trl" not in sys.modules:
        for name, path in (("trl", root), ("trl.kernels", root + "/kernels"), ("trl.trainer", root + "/trainer")):
            package = types.ModuleType(name)
            package.__path__ = [path]
            sys.modules[name] = package
        utils = types.ModuleType("trl.trainer.utils")
        utils.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        sys.modules["trl.trainer.utils"] = utils
    module_spec = importlib.util.spec_from_file_location("trl.kernels.chunked_logprob",
                                                         root + "/kernels/chunked_logprob.py")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules["trl.kernels.chunked_logprob"] = module
    module_spec.loader.exec_module(module)
    return module.ChunkedLogProbFunction


def _loss_inputs(ctx, tokens, hidden, vocab, dtype, trainable_head, seed):
    gen = _gen(ctx, seed)
    h = (_randn(ctx, gen, tokens, hidden, dtype=torch.float32) * 0.5).to(dtype).requires_grad_()
    w = (_randn(ctx, gen, vocab, hidden, dtype=torch.float32) * hidden ** -0.5).to(dtype)
    w.requires_grad_(trainable_head)
    labels = torch.randint(0, vocab, (tokens,), device=ctx.device, generator=gen)
    labels[torch.rand(tokens, device=ctx.device, generator=gen) < 0.25] = -100  # prompt tokens
    return h, w, labels


def _loss_impls(ctx):
    from alignloop.kernels.fused_loss import linear_cross_entropy

    def naive(h, w, labels):  # what transformers does: full logits, fp32 cross-entropy
        logits = (h @ w.t()).float()
        return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)

    impls = [("naive", naive),
             ("alignloop torch", lambda h, w, y: linear_cross_entropy(h, w, y, backend="torch")),
             ("alignloop triton", lambda h, w, y: linear_cross_entropy(h, w, y, backend="triton"))]
    chunked = _trl_chunked()
    if chunked is not None:
        def trl(h, w, labels):
            keep = labels != -100
            out = chunked.apply(h[keep], w, None, labels[keep], 1.0, 32768, None, 1.0, ())
            return -out[0].sum() / keep.sum().clamp(min=1)
        impls.append(("trl chunked", trl))
    else:
        ctx.notes.append("TRL is not installed: no 'trl chunked' loss rows")
    return impls


def fused_loss(ctx: Context) -> list[dict]:
    """Correctness of every loss against an fp32 reference (16-bit rule vs the naive 16-bit
    logits), then time and peak memory of forward+backward at the real Llama 3 vocabulary."""
    rows = []
    impls = _loss_impls(ctx)
    vocab = 1000 if ctx.dry_run else VOCAB
    hidden = 32 if ctx.dry_run else 2048
    dtype = torch.float16 if ctx.dry_run else torch.bfloat16
    tokens = 67 if ctx.dry_run else 4099
    for trainable in (False, True):
        h, w, labels = _loss_inputs(ctx, tokens, hidden, vocab, dtype, trainable, seed=3)
        params = (h, w) if trainable else (h,)
        h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_(trainable)
        exact_loss = impls[0][1](h32, w32, labels)
        exact = [exact_loss, *torch.autograd.grad(exact_loss, (h32, w32) if trainable else (h32,))]
        low = None
        for name, fn in impls:
            row = dict(section="fused_loss_correctness", implementation=name, head="trainable" if trainable else "frozen",
                       tokens=tokens, vocab=vocab, dtype=str(dtype)[6:])
            try:
                loss = fn(h, w, labels)
                got = [loss, *torch.autograd.grad(loss, params)]
                errs = [(a.float() - b).abs().max().item() for a, b in zip(got, exact)]
                if low is None:  # the naive 16-bit logits: PyTorch's own error
                    low = errs
                for part, err, torch_err in zip(("loss", "grad_h", "grad_w"), errs, low):
                    row[f"{part}_err"] = f"{err:.1e}"
                    row[f"{part}_ratio"] = round(err / max(torch_err, 1e-12), 2)
                passed = all(e <= 2 * t + 1e-5 for e, t in zip(errs, low))
                row["grad_h_rel"] = f"{rel_error(got[1], exact[1]):.1e}"
                row["status"] = "ok" if passed else "failed: error > 2x the naive 16-bit error"
            except Exception as err:  # noqa: BLE001
                row["status"] = failure(err)
            rows.append(row)
        del h, w, labels, h32, w32, exact
    sizes = [(64, False), (64, True)] if ctx.dry_run else [(8192, False), (8192, True), (32768, False)]
    for tokens, trainable in sizes:
        for name, fn in impls:
            if ctx.out_of_time(15):
                rows.append(dict(section="fused_loss_speed", implementation=name, tokens=tokens,
                                 status="skipped: out of time"))
                continue
            row = dict(section="fused_loss_speed", implementation=name, head="trainable" if trainable else "frozen",
                       tokens=tokens, hidden=hidden, vocab=vocab, dtype=str(dtype)[6:])
            try:
                h, w, labels = _loss_inputs(ctx, tokens, hidden, vocab, dtype, trainable, seed=4)
                params = (h, w) if trainable else (h,)

                def step(fn=fn, h=h, w=w, labels=labels, params=params):
                    for p in params:
                        p.grad = None
                    fn(h, w, labels).backward()

                step()
                base = torch.cuda.memory_allocated() if ctx.device == "cuda" else 0
                reset_peak(ctx.device)
                step()
                synchronize(ctx.device)
                peak = peak_gib(ctx.device)
                row["ms"] = round(time_ms(step, ctx.device, 2 if ctx.dry_run else 5, warmup=0), 2)
                if peak is not None:
                    row["peak_over_inputs_gib"] = round(peak - base / 2**30, 3)
                row["status"] = "ok"
                del h, w, labels, params
            except Exception as err:  # noqa: BLE001
                row["status"] = failure(err)
            rows.append(row)
            release(ctx.device)
    return rows
