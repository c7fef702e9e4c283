"""What this machine can do: a CUDA GPU, native bf16, an installed package; and the precision an
`auto` recipe resolves to. Light imports (torch only when asked); used by the config checks and
by the stages that build trainer arguments."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@functools.cache
def bf16_supported() -> bool:
    """bf16 on a CUDA GPU that has it, or on a CPU with native bf16 instructions."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def has_module(name: str) -> bool:
    """Whether `name` is importable, without importing it."""
    return importlib.util.find_spec(name) is not None


def resolve_precision(precision: str) -> str:
    """`auto` becomes bf16 on a CUDA GPU that has it, else fp32; anything else stays.

    A CPU with native bf16 (AVX512-BF16 / AMX) may still be asked for bf16 explicitly; `auto`
    keeps CPU runs in fp32 so that the same recipe gives the same numbers on every CPU.
    """
    if precision != "auto":
        return precision
    return "bf16" if cuda_available() and bf16_supported() else "fp32"
