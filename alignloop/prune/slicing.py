"""Cutting a Llama down to the units it keeps, and saving it as a plain HF Llama checkpoint.

Weights are nn.Linear's (out, in). With g KV groups of p query heads of d channels, q_proj's
rows are (g, p, d) in that order (HF's repeat_kv gives query head h the key-value head h // p),
k_proj's and v_proj's are (g, d) and o_proj's columns are (g, p, d). In HF's Llama layout RoPE
rotates channel j with channel j + d/2 at frequency j (rotate_half), so a kept pair j becomes
channels (j', j' + d'/2) of the new head, j' its rank among the kept pairs.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import Tensor

from alignloop.prune.shape import Kept, Shape


def _rows(w: Tensor, index: Tensor) -> Tensor:
    return w.index_select(0, index.to(w.device))


def _cols(w: Tensor, index: Tensor) -> Tensor:
    return w.index_select(-1, index.to(w.device))


def _heads(w: Tensor, heads: Tensor, dims: Tensor) -> Tensor:
    """(g, p, d, ...) -> (g, p', d', ...): the kept heads of each group, then their channels."""
    groups = torch.arange(w.shape[0], device=w.device)[:, None]
    w = w[groups, heads.to(w.device)]                               # (g, p', d, ...)
    return w[groups[:, :, None], torch.arange(w.shape[1], device=w.device)[None, :, None],
             dims.to(w.device)[:, None, :]]                         # (g, p', d', ...)


def _channels(w: Tensor, dims: Tensor) -> Tensor:
    """(g, d, ...) -> (g, d', ...)."""
    groups = torch.arange(w.shape[0], device=w.device)[:, None]
    return w[groups, dims.to(w.device)]


def _attention(state: dict, attn, source: Shape, kept_hidden: Tensor, heads: Tensor,
               pairs: Tensor, v_dims: Tensor, prefix: str, d_new: int) -> None:
    g, p, d = source.num_key_value_heads, source.heads_per_group, source.head_dim
    qk_dims = torch.cat([pairs, pairs + d // 2], dim=1)  # (g, d'): first halves, then partners
    # The logits keep the original temperature: softmax(q.k / sqrt(d)) over the kept channels,
    # where the new model divides by sqrt(d'); the factor goes into q.
    scale = math.sqrt(d_new / d)
    q = attn.q_proj.weight.unflatten(0, (g, p, d))
    state[f"{prefix}q_proj.weight"] = _cols(_heads(q, heads, qk_dims), kept_hidden).flatten(0, 2) * scale
    for name, dims in (("k_proj", qk_dims), ("v_proj", v_dims)):
        w = getattr(attn, name).weight.unflatten(0, (g, d))
        state[f"{prefix}{name}.weight"] = _cols(_channels(w, dims), kept_hidden).flatten(0, 1)
    o = attn.o_proj.weight.unflatten(1, (g, p, d)).permute(1, 2, 3, 0)  # (g, p, d, h)
    state[f"{prefix}o_proj.weight"] = _cols(_heads(o, heads, v_dims), kept_hidden).flatten(0, 2).T
    if source.attention_bias:
        q_bias = attn.q_proj.bias.view(g, p, d)
        state[f"{prefix}q_proj.bias"] = _heads(q_bias, heads, qk_dims).flatten() * scale
        state[f"{prefix}k_proj.bias"] = _channels(attn.k_proj.bias.view(g, d), qk_dims).flatten()
        state[f"{prefix}v_proj.bias"] = _channels(attn.v_proj.bias.view(g, d), v_dims).flatten()
        state[f"{prefix}o_proj.bias"] = _rows(attn.o_proj.bias, kept_hidden)


def _mlp(state: dict, mlp, source: Shape, kept_hidden: Tensor, neurons: Tensor, prefix: str) -> None:
    for name in ("gate_proj", "up_proj"):
        state[f"{prefix}{name}.weight"] = _cols(_rows(getattr(mlp, name).weight, neurons), kept_hidden)
        if source.mlp_bias:
            state[f"{prefix}{name}.bias"] = _rows(getattr(mlp, name).bias, neurons)
    state[f"{prefix}down_proj.weight"] = _rows(_cols(mlp.down_proj.weight, neurons), kept_hidden)
    if source.mlp_bias:
        state[f"{prefix}down_proj.bias"] = _rows(mlp.down_proj.bias, kept_hidden)


@torch.no_grad()
def pruned_state(model, kept: Kept, shape: Shape) -> dict[str, Tensor]:
    """The state dict of the pruned model (keys as LlamaForCausalLM's, layers renumbered).
    A tied output layer is the pruned input embeddings (the same tensor)."""
    source, decoder, hidden = Shape.of(model.config), model.model, kept.hidden
    state = {"model.embed_tokens.weight": _cols(decoder.embed_tokens.weight, hidden),
             "model.norm.weight": _rows(decoder.norm.weight, hidden)}
    for new, old in enumerate(kept.layers):
        layer, prefix = decoder.layers[old], f"model.layers.{new}."
        state[f"{prefix}input_layernorm.weight"] = _rows(layer.input_layernorm.weight, hidden)
        state[f"{prefix}post_attention_layernorm.weight"] = _rows(layer.post_attention_layernorm.weight,
                                                                   hidden)
        _attention(state, layer.self_attn, source, hidden, kept.heads[new], kept.qk_pairs[new],
                   kept.v_dims[new], f"{prefix}self_attn.", shape.head_dim)
        _mlp(state, layer.mlp, source, hidden, kept.neurons[new], f"{prefix}mlp.")
    if shape.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    else:  # the model's own output layer, or a copy of its tied embeddings
        state["lm_head.weight"] = _cols(model.lm_head.weight, hidden).clone()
    return {key: value.contiguous() for key, value in state.items()}


def pruned_config(config, shape: Shape):
    """The model's LlamaConfig with the pruned shape (everything else, RoPE included, as it was)."""
    new = copy.deepcopy(config)
    for axis in ("num_hidden_layers", "hidden_size", "head_dim", "intermediate_size",
                 "tie_word_embeddings", "num_attention_heads"):
        setattr(new, axis, getattr(shape, axis))
    return new


def save(model, kept: Kept, shape: Shape, tokenizer, out: Path):
    """Writes the pruned model (safetensors, LlamaConfig, generation config) and the tokenizer
    into `out`; returns the pruned model (weights on the model's device)."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    config = pruned_config(model.config, shape)
    state = pruned_state(model, kept, shape)
    with init_empty_weights():  # parameters on the meta device, filled below; buffers real
        pruned = LlamaForCausalLM(config)
    pruned.load_state_dict(state, assign=True, strict=True)
    if shape.tie_word_embeddings:
        pruned.lm_head.weight = pruned.model.embed_tokens.weight
    pruned.generation_config = copy.deepcopy(model.generation_config)
    pruned.eval()
    pruned.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return pruned
