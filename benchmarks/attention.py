"""Attention forward+backward: alignloop's Triton kernel vs torch sdpa (and flash-attn if installed).

    .venv/bin/python benchmarks/attention.py                 # all shapes below, on a CUDA GPU
    .venv/bin/python benchmarks/attention.py --max-length 16384 --reps 5

Shapes (Llama 3 8B / 3.2 11B Vision attention: 32 query heads, 8 key/value heads, head dim 128), bf16:
- causal self-attention, one sequence of 1K ... 128K tokens; sdpa runs its flash backend;
- cross-attention, text rows x images * 4 tiles * 1601 keys with a key mask in which each text
  row sees the tiles of the images before it (Llama 3.2 Vision), and rows before the first image
  see none; sdpa gets the same boolean mask (its flash backend takes no mask, so torch picks
  memory-efficient or math). Rows that see no tile are given every key and zeroed afterwards for
  sdpa, as Mllama does; the kernel returns zeros for them itself.

TFLOP/s count the useful multiply-adds only: 4 * Hq * D per allowed (query, key) pair forward,
2.5 x that backward (FlashAttention's convention), so a kernel that skips masked blocks is not
credited for work it did not need. Each row is the median of `--reps` timed runs after one warm-up,
synchronised with CUDA events. Results go to docs/benchmarks.md by hand, with the GPU's name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpu.common import time_ms  # noqa: E402
from benchmarks.gpu.kernel_sections import fwd_bwd_step, sdpa_attention  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
TILE_TOKENS, TILES = 1601, 4  # Llama 3.2 Vision: 1600 patches + 1 class token per 560 px tile


def _inputs(q_len: int, k_len: int):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()

    q = randn(1, HEADS, q_len, HEAD_DIM)
    k, v = randn(1, KV_HEADS, k_len, HEAD_DIM), randn(1, KV_HEADS, k_len, HEAD_DIM)
    dout = torch.randn(1, q_len, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    return q, k, v, dout


def _flash_attn(causal: bool):
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    def attend(q, k, v):  # flash-attn takes (B, L, H, D)
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
    return attend


def _tflops(pairs: int, ms: float) -> float:
    return 3.5 * 4 * HEADS * HEAD_DIM * pairs / (ms * 1e-3) / 1e12


def _row(name: str, shape: str, pairs: int, candidates, q, k, v, dout, reps: int) -> None:
    reference = None
    for label, attend in candidates:
        if attend is None:
            continue
        try:
            out = attend(q, k, v)
            err = 0.0 if reference is None else (out.float() - reference).abs().max().item()
            reference = out.float() if reference is None else reference
            del out
            ms = time_ms(fwd_bwd_step(attend, q, k, v, dout), "cuda", reps)
            tflops = _tflops(pairs, ms)
            print(f"| {name} | {shape} | {label} | {ms:.2f} | {tflops:.0f} | {err:.1e} |", flush=True)
        except torch.OutOfMemoryError:
            print(f"| {name} | {shape} | {label} | out of memory | | |", flush=True)
        except RuntimeError as err:  # e.g. no sdpa backend for these inputs
            print(f"| {name} | {shape} | {label} | failed: {str(err).splitlines()[0][:80]} | | |", flush=True)
        torch.cuda.empty_cache()


def causal_rows(lengths, reps: int) -> None:
    from torch.nn.attention import SDPBackend

    from alignloop.kernels.flash_attention import flash_attention

    for n in lengths:
        q, k, v, dout = _inputs(n, n)
        pairs = n * (n + 1) // 2
        _row("causal", f"{n // 1024}K", pairs, [
            ("sdpa (flash)", sdpa_attention(SDPBackend.FLASH_ATTENTION, causal=True)),
            ("alignloop", lambda q, k, v: flash_attention(q, k, v, causal=True)),
            ("flash-attn", _flash_attn(causal=True)),
        ], q, k, v, dout, reps)
        del q, k, v, dout


def cross_mask(text_len: int, images: int) -> torch.Tensor:
    """(1, Lq, Lk) booleans: image m's <|image|> token sits at m * text_len / (images + 1); each
    text row sees the tiles of every image before it."""
    image_at = [(m + 1) * text_len // (images + 1) for m in range(images)]
    rows = torch.arange(text_len, device="cuda")[:, None]
    sees = torch.stack([rows[:, 0] >= at for at in image_at], dim=1)  # (Lq, images)
    return sees.repeat_interleave(TILES * TILE_TOKENS, dim=1)[None]  # (1, Lq, images * tiles * 1601)


def cross_rows(text_lengths, images_list, reps: int) -> None:
    from alignloop.kernels.flash_attention import flash_attention

    for text_len in text_lengths:
        for images in images_list:
            mask = cross_mask(text_len, images)
            seen = mask.any(-1, keepdim=True)
            sdpa_mask = (mask | ~seen)[:, None]  # (1, 1, Lq, Lk): empty rows see all, zeroed below
            q, k, v, dout = _inputs(text_len, mask.shape[-1])
            plain = sdpa_attention(mask=sdpa_mask)

            def sdpa_masked(q, k, v, plain=plain, seen=seen):
                return plain(q, k, v) * seen[..., None]

            _row("cross", f"{text_len} x {images}x{TILES}x{TILE_TOKENS}", int(mask.sum()), [
                ("sdpa (mask)", sdpa_masked),
                ("alignloop", lambda q, k, v, mask=mask: flash_attention(q, k, v, key_mask=mask)),
            ], q, k, v, dout, reps)
            del q, k, v, dout, mask, sdpa_mask


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-length", type=int, default=131072, help="longest causal sequence")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/attention.py measures GPU kernels and needs a CUDA GPU; none is visible "
              "here (torch.cuda.is_available() is False). Nothing was measured.", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, torch {torch.__version__}, bf16, Hq={HEADS}, Hkv={KV_HEADS}, D={HEAD_DIM}, "
          f"median of {args.reps}\n")
    print("| variant | shape | implementation | fwd+bwd ms | TFLOP/s | max abs diff vs first |")
    print("|---|---|---|---|---|---|")
    lengths = [n for n in (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072) if n <= args.max_length]
    causal_rows(lengths, args.reps)
    cross_rows([512, 2048, 8192], [1, 2], args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
