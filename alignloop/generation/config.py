"""The `generation` recipe section: which backend samples from a model (docs/generation.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alignloop.options import Strict


class GenerationConfig(Strict):
    # hf: transformers generate in this process. vllm: vLLM's offline LLM in this process.
    # vllm_server: an OpenAI-compatible vLLM server (server_url, or started from server_python).
    backend: Literal["hf", "vllm", "vllm_server"] = "hf"
    batch_size: int = Field(default=64, gt=0)  # prompts per generate call (hf)
    # vLLM engine settings (vllm, and a server started here)
    tensor_parallel_size: int = Field(default=1, ge=1)  # GPUs one engine shards the model over
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)  # on a CPU build: of host memory
    max_model_len: int | None = Field(default=None, gt=0)  # None: the model's own
    # auto: the dtype the stage loads weights in (fp32 unless the run is bf16)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    enforce_eager: bool = False  # no CUDA graphs / torch.compile: faster start, slower decoding
    server_url: str | None = None     # an endpoint that is already up, e.g. http://host:8000
    server_python: str | None = None  # a Python with vLLM installed, to start the server with
    server_model: str | None = None   # the served model to request (None: the one served from
                                      # the model's directory, else the only one served)
    server_timeout: float = Field(default=900, gt=0)  # s to wait for the server, and per request
    # The guard against a generator that samples from stale or wrong weights: the per-token
    # log-probs it reports must match transformers' (fp32) on the same tokens, for
    # `check_samples` samples of each call (alignloop.generation.logprobs).
    check_logprobs: bool = False
    check_samples: int = Field(default=4, gt=0)
    # max |difference| per token; None: by the generator's dtype (1e-3 fp32, 0.1 bf16/fp16)
    logprob_tolerance: float | None = Field(default=None, gt=0)
