"""Whether a training stage needs activation checkpointing, from the model's shape and the memory
the device has.

TRL turns activation checkpointing on by default: every decoder layer's forward runs twice, about
a third more time per step, to keep the activations of one layer instead of all of them. That is
right for an 8B model at 8K tokens on one GPU and a waste for a 135M model at 16 x 128 tokens on a
CPU with 24 GiB (docs/benchmarks.md: SFT throughput on SmolLM2). `activation_checkpointing: auto`
(the default) estimates what autograd would keep without checkpointing and turns it on only when
that does not fit comfortably.

The estimate counts the tensors a Llama decoder layer saves for its backward, per token (h
hidden, kv the key/value width, i the MLP width): the two RMSNorms' inputs and outputs (4h), q, k,
v after RoPE and their inputs (2h + 4kv), attention's output and log-sum-exp (h), o_proj's input
(h), the MLP's gate, up, activation and product (4i), and LoRA's dropout masks when adapters train
(about 6h + i). The LM head's logits come on top unless the fused loss is used (tokens x vocab in
fp32, twice: logits and their softmax). In a Mixture-of-Experts layer each token goes through its
k routed experts (and the shared expert, where there is one): 4 x width each in place of 4i.

`SavedTensors` measures instead of estimating: the bytes autograd really keeps for a backward
(benchmarks/moe_lora.py, tests/test_moe.py).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("alignloop.models")

# Checkpointing goes on when the estimate exceeds this share of the memory left for training.
SHARE = 0.5


def activation_bytes(config, tokens: int, dtype_bytes: int, *, lora: bool, fused_head: bool) -> int:
    """Estimated bytes autograd keeps for one micro-batch of `tokens` tokens, no checkpointing."""
    text = config.get_text_config()
    h, i, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    head_dim = getattr(text, "head_dim", None) or h // text.num_attention_heads
    kv = (getattr(text, "num_key_value_heads", None) or text.num_attention_heads) * head_dim
    moe = moe_shape(text)
    if moe is not None:  # the MLP of one token: k routed experts and the shared one
        experts, k, width, shared = moe
        i = k * width + shared
    per_token_layer = 9 * h + 4 * kv + 4 * i + (6 * h + i if lora else 0)
    total = tokens * layers * per_token_layer * dtype_bytes
    if not fused_head:
        total += 2 * tokens * text.vocab_size * 4
    return total


def available_bytes() -> int:
    """Memory this process can still use: free GPU memory on CUDA, else available host memory."""
    import torch

    if torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        return free
    import psutil

    return psutil.virtual_memory().available


def needs_checkpointing(config, tokens: int, dtype_bytes: int, *, lora: bool, fused_head: bool,
                        weights_bytes: int, available: int | None = None) -> bool:
    """True when the activations of `tokens` tokens would take more than SHARE of the memory left
    after the weights (and, for full fine-tuning, their gradients and Adam moments, which the
    caller counts into `weights_bytes`)."""
    need = activation_bytes(config, tokens, dtype_bytes, lora=lora, fused_head=fused_head)
    left = (available_bytes() if available is None else available) - weights_bytes
    on = need > SHARE * left
    logger.info("activation_checkpointing auto: ~%.2f GB of activations for %d tokens, %.2f GB "
                "left after the weights: %s", need / 1e9, tokens, left / 1e9, "on" if on else "off")
    return on


def model_config(path: str):
    """The model's config (an adapter directory's base config), or None when it cannot be read."""
    import json
    from pathlib import Path

    from transformers import AutoConfig

    adapter = Path(path) / "adapter_config.json"
    try:
        if adapter.is_file():
            path = json.loads(adapter.read_text())["base_model_name_or_path"]
        return AutoConfig.from_pretrained(path)
    except Exception as err:  # a hub id offline, a custom model: auto falls back to TRL's default
        logger.info("activation_checkpointing auto: cannot read the config of %s (%s)", path, err)
        return None


def parameter_count(config) -> int:
    """Parameters of a Llama-shaped model from its config (embeddings counted once when tied)."""
    text = config.get_text_config()
    h, i, layers, vocab = text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.vocab_size
    head_dim = getattr(text, "head_dim", None) or h // text.num_attention_heads
    q = text.num_attention_heads * head_dim
    kv = (getattr(text, "num_key_value_heads", None) or text.num_attention_heads) * head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    moe = moe_shape(text)
    if moe is not None:  # every expert's gate, up and down, the router, the shared expert
        experts, _k, width, shared = moe
        per_layer += 3 * h * (experts * width + shared - i) + experts * h
    tied = getattr(config, "tie_word_embeddings", False)
    return layers * per_layer + vocab * h * (1 if tied else 2) + h


def moe_shape(text_config) -> tuple[int, int, int, int] | None:
    """(experts, experts per token, expert width, shared-expert width) of an MoE config, or None
    for a dense one. Mixtral and OLMoE call the expert width intermediate_size, Qwen3-MoE
    moe_intermediate_size; Llama 4's shared expert has intermediate_size too."""
    experts = getattr(text_config, "num_local_experts", None) or getattr(text_config, "num_experts", None)
    if not experts:
        return None
    width = getattr(text_config, "moe_intermediate_size", None) or text_config.intermediate_size
    shared = getattr(text_config, "shared_expert_intermediate_size", None) or 0
    if text_config.model_type.startswith("llama4"):
        shared = text_config.intermediate_size
    return experts, text_config.num_experts_per_tok, width, shared


class SavedTensors:
    """Bytes that autograd saves for the backward of what runs inside the block, each storage
    counted once, leaving out the storages of `exclude` (the model's parameters, which exist
    whether or not a backward follows).

        with SavedTensors(model.parameters()) as saved:
            loss = model(**batch).loss
        saved.bytes
    """

    def __init__(self, exclude=()):
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self.storages: dict[int, int] = {}

    def __enter__(self) -> "SavedTensors":
        import torch

        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())
