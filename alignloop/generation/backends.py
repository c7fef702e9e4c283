"""One interface over the generation backends (docs/generation.md).

    with open_generator(cfg.generation, model_dir, dtype="float32") as gen:
        samples = gen.generate(prompts, SamplingSettings(n=8, temperature=0.8))  # [[Sample] * n] per prompt

`model_dir` is a full HF model directory or a LoRA adapter directory (its base comes from
adapter_config.json). Prompts are chat message lists; the generator renders them with the
model's chat template and the assistant generation prompt.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator


@dataclass
class Sample:
    text: str                    # decoded completion, special tokens removed
    token_ids: list[int]         # the sampled completion tokens (the stop token included)
    logprobs: list[float] | None  # log-prob of each sampled token under the model, if reported
    finish_reason: str           # "stop" (end of turn / text) or "length"


class HFGenerator:
    """transformers `generate` in this process."""

    def __init__(self, model_dir: str, batch_size: int, dtype: str):
        import torch

        from alignloop.models.loading import load_for_inference

        self.model_dir, self.batch_size, self.dtype = str(model_dir), batch_size, dtype
        self.model, self.tokenizer = load_for_inference(model_dir, dtype=getattr(torch, dtype))

    def generate(self, prompts: list[list[dict]], settings) -> list[list[Sample]]:
        from alignloop.generation.hf import generate_samples

        return generate_samples(self.model, self.tokenizer, prompts, settings, batch_size=self.batch_size)

    def describe(self) -> dict:
        return {"backend": "hf", "model": self.model_dir, "dtype": self.dtype}


@contextlib.contextmanager
def open_generator(cfg, model_dir: str, *, dtype: str = "float32") -> Iterator[HFGenerator]:
    """A generator for `model_dir` with the backend that `cfg` (a GenerationConfig) names."""
    if cfg.backend != "hf":
        raise NotImplementedError(f"generation backend {cfg.backend!r} is not available yet")
    yield HFGenerator(model_dir, cfg.batch_size, dtype)
