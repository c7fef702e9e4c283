"""The `generation` recipe section: which backend samples from a model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alignloop.options import Strict


class GenerationConfig(Strict):
    # hf: transformers generate in this process. vllm: vLLM's offline LLM in this process.
    # vllm_server: an OpenAI-compatible `vllm serve` endpoint (given, or started by alignloop).
    backend: Literal["hf", "vllm", "vllm_server"] = "hf"
    batch_size: int = Field(default=64, gt=0)  # prompts per generate call (hf)
    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    max_model_len: int | None = Field(default=None, gt=0)
    dtype: str = "auto"
    enforce_eager: bool = False
    server_url: str | None = None     # an endpoint that is already up
    server_python: str | None = None  # a Python with vLLM installed, to start the server with
    # The guard against a generator that samples from stale or wrong weights: per-token log-probs
    # that vLLM reports must match transformers' on the same tokens.
    check_logprobs: bool = False
    logprob_tolerance: float = Field(default=0.05, gt=0)
