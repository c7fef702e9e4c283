"""What every section of the GPU suite shares: the run's context, timing and memory helpers.

A section is a function `section(ctx: Context) -> list[dict]`: one dict per table row, each with
a "status" ("ok", "oom", "skipped: <why>" or "failed: <why>") beside its measurements. Sections
never raise for a failed configuration: they record it and go on, so one bad kernel cannot cost
the rest of a device lease.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Context:
    """dry_run: CPU, tiny shapes, Triton's interpreter; checks the plumbing, measures nothing."""

    dry_run: bool
    device: str
    out: Path
    deadline: float  # time.monotonic() after which a section starts no new configuration
    notes: list[str] = field(default_factory=list)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def out_of_time(self, reserve_s: float = 0.0) -> bool:
        return self.time_left() < reserve_s


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, reps: int, warmup: int = 1) -> float:
    """Median milliseconds of `fn()` over `reps` runs after `warmup` runs (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def release(device: str) -> None:
    """Frees what Python no longer references and, on a GPU, the allocator's cached blocks."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: str) -> None:
    release(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    """Peak memory allocated by torch since `reset_peak`, GiB (None on a CPU)."""
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def failure(err: BaseException) -> str:
    if isinstance(err, torch.OutOfMemoryError):
        return "oom"
    first = (str(err).strip().splitlines() or [""])[0]
    return f"failed: {type(err).__name__}: {first[:160]}"


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64; inf when out has a NaN or Inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
