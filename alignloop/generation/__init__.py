"""Generation: sampling chat completions from a model, through one interface for every backend.

Light on import (the recipe loader imports `alignloop.generation.config`); the backends load
torch, transformers or vLLM only when used.
"""

_LAZY = {"generate": "hf", "SamplingSettings": "hf", "completion_rows": "hf", "sample_batches": "hf"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"alignloop.generation.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'alignloop.generation' has no attribute {name!r}")
