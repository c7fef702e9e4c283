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
fp32, twice: logits and their softmax).
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
    tied = getattr(config, "tie_word_embeddings", False)
    return layers * per_layer + vocab * h * (1 if tied else 2) + h
