"""One interface over the generation backends (docs/generation.md).

    with open_generator(cfg.generation, model_dir, dtype="float32") as gen:
        samples = gen.generate(prompts, SamplingSettings(n=8, temperature=0.8))  # [[Sample] * 8] / prompt
        gen.describe()  # provenance: backend, model, base, adapter, dtype, engine start time, ...

`model_dir` is a full HF model directory or a LoRA adapter directory (its base comes from
adapter_config.json). Prompts are chat message lists; the generator renders them with the
model's chat template and the assistant generation prompt, so every backend samples from the
same token ids. Backends: `hf` (transformers, hf.py), `vllm` (vLLM's offline engine in this
process, vllm_engine.py), `vllm_server` (an OpenAI-compatible vLLM server, given or started
here, vllm_server.py). Nothing heavy is imported until a backend is opened.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator

from alignloop.generation.common import GeneratorError, Sample, SamplingSettings, resolve_model

logger = logging.getLogger("alignloop.generation")

__all__ = ["Sample", "SamplingSettings", "GeneratorError", "open_generator"]


class HFGenerator:
    """transformers `generate` in this process (the adapter, if any, through peft)."""

    def __init__(self, model_dir: str, batch_size: int, dtype: str):
        import torch

        from alignloop.models.loading import load_for_inference

        self.ref, self.batch_size, self.dtype = resolve_model(model_dir), batch_size, dtype
        self.model, self.tokenizer = load_for_inference(model_dir, dtype=getattr(torch, dtype))
        self.start_seconds = None

    def generate(self, prompts: list[list[dict]], settings: SamplingSettings) -> list[list[Sample]]:
        from alignloop.generation.hf import generate_samples

        return generate_samples(self.model, self.tokenizer, prompts, settings,
                                batch_size=self.batch_size)

    def describe(self) -> dict:
        return {"backend": "hf", "model": self.ref.path, "base": self.ref.base,
                "adapter": self.ref.adapter, "dtype": self.dtype, "start_seconds": self.start_seconds}

    def close(self) -> None:
        del self.model


class LogprobGuard:
    """Wraps a generator: after each call, `check_samples` of its samples (spread over the
    prompts) are rescored by transformers and must match (alignloop.generation.logprobs)."""

    def __init__(self, inner, model_dir: str, tolerance: float, check_samples: int):
        self.inner, self.model_dir = inner, model_dir
        self.tolerance, self.check_samples = tolerance, check_samples
        self.checks: list[dict] = []  # one report per generate call
        self.start_seconds = inner.start_seconds
        self._checker = None

    def generate(self, prompts: list[list[dict]], settings: SamplingSettings) -> list[list[Sample]]:
        from alignloop.generation.logprobs import LogprobChecker, raise_if_stale

        samples = self.inner.generate(prompts, settings)
        picked = [(i * len(prompts) // self.check_samples, i % settings.n)
                  for i in range(min(self.check_samples, len(prompts) * settings.n))]
        self._checker = self._checker or LogprobChecker(self.model_dir)
        report = raise_if_stale(self.model_dir, [prompts[p] for p, _ in picked],
                                [[samples[p][k]] for p, k in picked], self.tolerance,
                                checker=self._checker)
        logger.info("log-prob check of %s: max |diff| %.2e over %d tokens (tolerance %g)",
                    self.model_dir, report["max_abs_diff"], report["tokens"], self.tolerance)
        self.checks.append(report)
        return samples

    def describe(self) -> dict:
        return {**self.inner.describe(), "logprob_tolerance": self.tolerance}

    def close(self) -> None:
        self.inner.close()


def generator_dtype(cfg, dtype: str) -> str:
    """The recipe's generation.dtype when set, else what the caller loads training weights in."""
    return dtype if cfg.dtype == "auto" else cfg.dtype


@contextlib.contextmanager
def open_generator(cfg, model_dir, *, dtype: str = "float32") -> Iterator:
    """A generator for `model_dir` with the backend that `cfg` (a GenerationConfig) names.

    The engine (or server) is released on exit, also when the block raises.
    """
    from alignloop.generation.logprobs import TOLERANCE

    dtype, model_dir = generator_dtype(cfg, dtype), str(model_dir)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if cfg.backend == "hf":
            gen = HFGenerator(model_dir, cfg.batch_size, dtype)
        elif cfg.backend == "vllm":
            from alignloop.generation.vllm_engine import VLLMGenerator

            gen = VLLMGenerator(cfg, model_dir, dtype)
        elif cfg.backend == "vllm_server":
            from alignloop.generation.vllm_server import VLLMServerGenerator

            gen = VLLMServerGenerator(cfg, model_dir, dtype, stack)
        else:
            raise GeneratorError(f"generation.backend: unknown backend {cfg.backend!r}")
        stack.callback(gen.close)
        gen.start_seconds = round(time.perf_counter() - start, 2)
        logger.info("%s generator for %s ready in %.1f s", cfg.backend, model_dir, gen.start_seconds)
        if cfg.check_logprobs or must_guard(cfg.backend, model_dir):
            tolerance = cfg.logprob_tolerance or TOLERANCE[dtype]
            gen = LogprobGuard(gen, model_dir, tolerance, cfg.check_samples)
        yield gen


def must_guard(backend: str, model_dir) -> bool:
    """An adapter on 3D parameters (peft's target_parameters: an MoE's routed experts) served by
    vLLM is always checked: vLLM has served such adapters as if they were absent, the base's
    outputs without an error (vLLM PR #41384), which only the log-probs show (docs/moe.md)."""
    if backend == "hf":
        return False
    ref = resolve_model(model_dir)
    if not ref.target_parameters:
        return False
    logger.info("%s: an adapter on %s served by %s: the log-prob guard is on", model_dir,
                ", ".join(ref.target_parameters), backend)
    return True
