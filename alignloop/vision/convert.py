"""Conversion between `VisionLlama` and transformers' `MllamaForConditionalGeneration`.

Mllama interleaves the layers: `text_config.num_hidden_layers` = self + cross layers, with the
cross layers at `text_config.cross_attention_layers` (reference C3). Our cross layer that runs
before self layer s is the j-th cross layer (j counted from 0), so it sits at Mllama index
s + j, and self layer s sits at s + (number of cross layers before it). For Llama 3.2 11B:
cross before self layers [3, 7, ..., 31] <-> Mllama [3, 8, 13, ..., 38] of 40.

    Mllama key                                          ours
    model.language_model.layers.{m}.<rest>  (self)      language_model.model.layers.{s}.<rest>
    model.language_model.layers.{m}.<rest>  (cross)     cross_attention_layers.{s}.<rest>
    model.language_model.embed_tokens  (V + 8 rows)     language_model.model.embed_tokens (V rows)
                                                        + learnable_embedding (8 rows)
    model.language_model.norm, lm_head                  language_model.model.norm, .lm_head
    model.vision_model.*, model.multi_modal_projector.* vision_model.*, multi_modal_projector.*

Mllama's embedding has V + 8 rows and its lm_head V outputs, so it is never tied; a tied Llama
(3.2 1B/3B, the tiny model) converts to an untied Mllama with lm_head equal to the embedding.

Only layouts with a self layer right after every cross layer convert (issue 13, item 5). Mllama
also allows a cross layer at the last index (after the last self layer) and two cross layers in a
row, but ours runs each cross layer from the pre-hook of the self layer it precedes, one per self
layer, so neither has a place here: both directions refuse them with a ValueError naming
`text_config.cross_attention_layers`, rather than fail in the key map or drop a layer.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MllamaConfig, MllamaForConditionalGeneration,
                          MllamaTextConfig, MllamaVisionConfig)

from alignloop.vision.config import LEARNABLE_ROWS
from alignloop.vision.model import VisionLlama

# LlamaConfig fields that Mllama's text config carries under the same name.
EMBEDDING = "model.language_model.embed_tokens.weight"  # V + 8 rows, split between two of ours
_SHARED_TEXT_FIELDS = ("vocab_size", "hidden_size", "hidden_act", "num_attention_heads",
                       "num_key_value_heads", "intermediate_size", "rope_parameters", "rms_norm_eps",
                       "max_position_embeddings", "initializer_range", "bos_token_id",
                       "eos_token_id", "pad_token_id")


def check_mllama_cross_layers(cross_attention_layers: list[int], num_hidden_layers: int,
                              what: str = "") -> None:
    """Refuses an Mllama layer layout that `VisionLlama` cannot hold, with a ValueError naming
    `text_config.cross_attention_layers`, each offending index and why. Every cross layer must
    be a distinct decoder-layer index with a self layer right after it: not the last index (a
    cross layer after the last self layer) and no two cross layers in a row, since ours runs each
    cross layer from the pre-hook of the self layer it precedes, at most one per self layer."""
    cross, n = list(cross_attention_layers), num_hidden_layers
    if not all(isinstance(m, int) and not isinstance(m, bool) for m in cross):
        raise ValueError(f"cannot convert {what}Mllama text_config.cross_attention_layers={cross}: "
                         "indices must be integers")
    problems = []
    for m in sorted(set(cross)):
        if not 0 <= m < n:
            problems.append(f"index {m} is not a decoder-layer index in 0..{n - 1}")
        elif m == n - 1:
            problems.append(f"index {m} is the last decoder layer, i.e. a cross-attention layer after "
                            "the last self-attention layer; VisionLlama runs each cross layer just "
                            "before a self-attention layer, so it has no place for one after the last")
        elif m + 1 in cross:
            problems.append(f"indices {m} and {m + 1} are two cross-attention layers in a row; "
                            "VisionLlama runs at most one cross layer before each self-attention layer")
        if cross.count(m) > 1:
            problems.append(f"index {m} is listed more than once")
    if problems:
        raise ValueError(f"cannot convert {what}Mllama text_config.cross_attention_layers={cross} "
                         f"(num_hidden_layers={n}): " + "; ".join(problems))


def _check_our_cross_layers(num_self: int, cross_layers: list[int]) -> None:
    """Our cross layers (self-layer indices, each runs before that self layer) in Mllama's terms:
    one "before self layer num_self" would be Mllama's last layer, and VisionLlama never runs it."""
    cross = list(cross_layers)
    check_mllama_cross_layers(mllama_cross_indices(cross), num_self + len(cross),
                              what=f"VisionLlama cross_layers={cross} (of {num_self} self layers), which would be ")


def mllama_cross_indices(cross_layers: list[int]) -> list[int]:
    """Self-layer positions of our cross layers -> their indices among Mllama's layers."""
    return [s + j for j, s in enumerate(sorted(cross_layers))]


def our_cross_layers(mllama_indices: list[int]) -> list[int]:
    """Mllama's cross-layer indices -> the self-layer index each one runs before."""
    return [m - j for j, m in enumerate(sorted(mllama_indices))]


def layer_map(num_self: int, cross_layers: list[int]) -> dict[int, tuple[str, int]]:
    """Mllama layer index -> ("self" | "cross", our index)."""
    _check_our_cross_layers(num_self, cross_layers)
    out, m = {}, 0
    cross = set(cross_layers)
    for s in range(num_self):
        if s in cross:
            out[m], m = ("cross", s), m + 1
        out[m], m = ("self", s), m + 1
    return out


def mllama_config(model: VisionLlama) -> MllamaConfig:
    return join_config(model.language_model.config, model.vision_config, model.cross_layers,
                       model.image_token_id)


def join_config(text: LlamaConfig, vision: MllamaVisionConfig, cross_layers: list[int],
                image_token_id: int) -> MllamaConfig:
    """The MllamaConfig of a Llama text config + our adapter's layout."""
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if head_dim * text.num_attention_heads != text.hidden_size:
        raise ValueError(f"Mllama needs head_dim * num_attention_heads == hidden_size "
                         f"({head_dim} x {text.num_attention_heads} != {text.hidden_size})")
    if getattr(text, "attention_bias", False) or getattr(text, "mlp_bias", False):
        raise ValueError("Mllama has no attention or MLP biases; this Llama config uses them")
    _check_our_cross_layers(text.num_hidden_layers, list(cross_layers))
    fields = {name: getattr(text, name) for name in _SHARED_TEXT_FIELDS}
    text_config = MllamaTextConfig(
        **fields, num_hidden_layers=text.num_hidden_layers + len(cross_layers),
        cross_attention_layers=mllama_cross_indices(cross_layers), tie_word_embeddings=False)
    return MllamaConfig(vision_config=vision.to_dict(), text_config=text_config.to_dict(),
                        image_token_index=image_token_id)


def split_config(config: MllamaConfig) -> tuple[LlamaConfig, MllamaVisionConfig, list[int], int]:
    """(Llama text config, vision config, our cross layers, image token id) of an MllamaConfig."""
    text = config.text_config
    cross = list(text.cross_attention_layers)
    check_mllama_cross_layers(cross, text.num_hidden_layers)
    fields = {name: getattr(text, name) for name in _SHARED_TEXT_FIELDS}
    llama = LlamaConfig(**fields, num_hidden_layers=text.num_hidden_layers - len(cross),
                        head_dim=text.hidden_size // text.num_attention_heads,
                        tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    return llama, config.vision_config, our_cross_layers(cross), config.image_token_index


def key_map(num_self: int, cross_layers: list[int]) -> Callable[[str], str | None]:
    """A function from an Mllama state-dict key to ours (None for the embedding, split apart)."""
    layers = layer_map(num_self, cross_layers)
    prefix = "model.language_model."

    def ours(key: str) -> str | None:
        if key == "lm_head.weight":
            return "language_model.lm_head.weight"
        if key == EMBEDDING:
            return None
        if key.startswith(prefix + "layers."):
            index, _, rest = key[len(prefix + "layers."):].partition(".")
            kind, i = layers[int(index)]
            return (f"language_model.model.layers.{i}.{rest}" if kind == "self"
                    else f"cross_attention_layers.{i}.{rest}")
        if key.startswith(prefix):
            return "language_model.model." + key[len(prefix):]
        if key.startswith("model."):
            return key[len("model."):]
        raise KeyError(f"unexpected Mllama weight {key}")

    return ours


def to_mllama(model: VisionLlama) -> MllamaForConditionalGeneration:
    """An MllamaForConditionalGeneration holding this model's tensors (no copy, except the
    embedding, which is concatenated with the learnable rows). Built on the meta device, so an
    11B model is neither initialised nor held twice."""
    from transformers.models.mllama.modeling_mllama import MllamaRotaryEmbedding

    config = mllama_config(model)
    config.text_config._attn_implementation = model.language_model.config._attn_implementation
    with torch.device("meta"):
        mllama = MllamaForConditionalGeneration(config)
    ours = _our_state(model)
    rename = key_map(model.language_model.config.num_hidden_layers, model.cross_layers)
    state = {}
    for key in mllama.state_dict():
        if key == EMBEDDING:
            state[key] = torch.cat([ours["language_model.model.embed_tokens.weight"],
                                    ours["learnable_embedding.weight"]])
        else:
            state[key] = ours[rename(key)]
    mllama.load_state_dict(state, strict=True, assign=True)
    text = mllama.model.language_model
    text.rotary_emb = MllamaRotaryEmbedding(text.config).to(model.device)
    _no_meta_buffers(mllama, "to_mllama")
    mllama.generation_config = model.language_model.generation_config
    return mllama.train(model.training)


def from_mllama(mllama: MllamaForConditionalGeneration) -> VisionLlama:
    """A VisionLlama with the Mllama model's weights (its text layers become a LlamaForCausalLM)."""
    text, vision, cross, image_id = split_config(mllama.config)
    text._attn_implementation = mllama.config.text_config._attn_implementation or "sdpa"
    dtype = mllama.dtype
    with torch.device("meta"):
        language_model = LlamaForCausalLM(text)
        model = VisionLlama(language_model, vision, cross, image_id)
    rename = key_map(text.num_hidden_layers, cross)
    state = {}
    for key, value in mllama.state_dict().items():
        if key == EMBEDDING:
            state["language_model.model.embed_tokens.weight"] = value[:text.vocab_size]
            state["learnable_embedding.weight"] = value[text.vocab_size:text.vocab_size + LEARNABLE_ROWS]
        else:
            state[rename(key)] = value
    model.load_state_dict(state, strict=True, assign=True)
    model.to(dtype)
    _rebuild_buffers(model)
    model.language_model.generation_config = mllama.generation_config
    return model.train(mllama.training)


def _our_state(model: VisionLlama) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if "language_model.lm_head.weight" not in state:  # tied: lm_head shares the embedding
        state["language_model.lm_head.weight"] = state["language_model.model.embed_tokens.weight"]
    return state


def _rebuild_buffers(model: VisionLlama) -> None:
    """Non-persistent buffers (RoPE inverse frequencies) were created on the meta device."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    inner = model.language_model.model
    inner.rotary_emb = LlamaRotaryEmbedding(inner.config).to(model.device)
    _no_meta_buffers(model, "from_mllama")


def _no_meta_buffers(model, where: str) -> None:
    left = [name for name, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"{where}: buffers left on the meta device: {left}")
