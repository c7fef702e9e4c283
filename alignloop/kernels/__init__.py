"""Fused kernels (Triton) beside their plain PyTorch references; see docs/kernels.md.

Nothing heavy is imported here: Triton is only needed once a kernel runs.
"""

from __future__ import annotations

# model.attn_implementation for our flash attention. transformers 5.23 treats every name that
# contains "flash" as a flash-attn package to import (utils.generic.is_flash_attention_requested),
# so the registered name cannot be "alignloop_flash"; recipes may still write that (an alias).
ATTENTION = "alignloop_triton"
ATTENTION_ALIASES = ("alignloop_flash",)


def register() -> str:
    """Registers `alignloop_triton` with transformers' AttentionInterface and AttentionMaskInterface.

    Afterwards `from_pretrained(..., attn_implementation="alignloop_triton")` and
    `model.set_attn_implementation("alignloop_triton")` work for Llama, Mllama and our vision
    model. Idempotent. Returns the name."""
    from alignloop.kernels.transformers_attention import register as _register

    return _register()
