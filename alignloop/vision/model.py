"""The Llama 3.2 Vision design on an unchanged HF `LlamaForCausalLM` (reference C2, C3).

    image -> MllamaVisionModel (transformers': tiles, aspect-ratio embeddings, gated global
             layers, multi-layer features) -> (B, N, T, P, D_vis)
          -> multi_modal_projector Linear(D_vis, D) -> cross_attention_states (B, N*T*P, D)
    text  -> LlamaForCausalLM, with a gated cross-attention layer run before the self-attention
             layers listed in `cross_layers` (Meta: before every 4th)

The language model is not modified: its module tree and state dict are the original's. The cross
layers live in `cross_attention_layers` and run from a forward pre-hook on their self-attention
layer, which receives the vision inputs as keyword arguments that LlamaModel passes through to
every decoder layer. So with no image the language model runs exactly as before, and with both
tanh gates at zero (their initial value) each cross layer adds exactly 0.

The image token and the rows after the text vocabulary come from `learnable_embedding` (Meta's
8 trainable rows, reference C2); every other id reads the language model's own, frozen, table.
Cross-attention masks follow HF Mllama (reference C3), including its treatment of text before
the first image: its attention row is left unmasked (uniform over the image) and only its MLP
branch is zeroed; Meta's code zeroes both. We follow HF so that `to_mllama` models match.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, MllamaVisionConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, eager_attention_forward
from transformers.models.mllama.modeling_mllama import MllamaVisionModel

from alignloop.vision.config import LEARNABLE_ROWS, AdapterConfig


class CrossAttention(nn.Module):
    """Text queries attend to vision states: GQA, per-head q/k RMSNorm, no RoPE.

    The attention function is transformers' `config._attn_implementation` (sdpa, eager, or one
    registered with AttentionInterface, such as alignloop's Triton kernel), read at call time so
    that `set_attn_implementation` on the language model switches it here too.
    """

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads  # as Mllama's cross-attention
        self.num_key_value_groups = self.num_heads // self.num_kv_heads  # read by sdpa/eager
        self.scaling = self.head_dim ** -0.5
        self.is_causal = False
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, vision: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """hidden (B, L, D), vision (B, S, D), bias (B, 1, L, S) additive -> (B, L, D)."""
        b, length, _ = hidden.shape
        q = self.q_norm(self.q_proj(hidden).view(b, length, self.num_heads, self.head_dim).transpose(1, 2))
        k = self.k_norm(self.k_proj(vision).view(b, -1, self.num_kv_heads, self.head_dim).transpose(1, 2))
        v = self.v_proj(vision).view(b, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                        eager_attention_forward)
        out, _ = attend(self, q, k, v, bias.to(q.dtype), dropout=0.0, scaling=self.scaling)  # (B, L, H, d)
        return self.o_proj(out.reshape(b, length, -1))


class CrossAttentionDecoderLayer(nn.Module):
    """h = x + tanh(g_attn) * xattn(norm(x)); h = h + tanh(g_mlp) * rows * mlp(norm(h)).

    Parameter names are Mllama's (`cross_attn`, `cross_attn_attn_gate`, ...), so conversion is a
    renumbering of layers. Both gates start at zero (reference C2).
    """

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.cross_attn = CrossAttention(config, layer_idx)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = LlamaMLP(config)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, hidden: torch.Tensor, vision: torch.Tensor, bias: torch.Tensor,
                rows: torch.Tensor) -> torch.Tensor:
        """rows (B, 1, L, 1): 0 for text that may attend to no image (its MLP branch is zeroed)."""
        attended = self.cross_attn(self.input_layernorm(hidden), vision, bias)
        hidden = hidden + self.cross_attn_attn_gate.tanh() * attended
        fed = self.mlp(self.post_attention_layernorm(hidden)) * rows[:, 0].to(hidden.dtype)
        return hidden + self.cross_attn_mlp_gate.tanh() * fed


VISION_KWARGS = ("cross_attention_states", "cross_attention_bias", "text_row_mask")


class _FusionHook:
    """Forward pre-hook of a self-attention decoder layer: takes the vision keyword arguments out
    of the call (so the layer and its attention function never see them) and, when the layer has
    a cross layer and there are vision states, runs the cross layer on its input first."""

    def __init__(self, cross: CrossAttentionDecoderLayer | None):
        self.cross = cross

    def __call__(self, module, args, kwargs):
        vision = {name: kwargs.pop(name, None) for name in VISION_KWARGS}
        if self.cross is None or vision["cross_attention_states"] is None:
            return args, kwargs
        if args:
            hidden = self.cross(args[0], *vision.values())
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = self.cross(kwargs["hidden_states"], *vision.values())
        return args, kwargs


def cross_attention_bias(mask: torch.Tensor, patches: int, dtype: torch.dtype):
    """Mllama's cross-attention mask (B, L, N, T) of 0/1 -> (bias (B, 1, L, N*T*P), rows (B, 1, L, 1)).

    Each tile stands for its P patch tokens. bias is 0 where a token may attend and the dtype's
    minimum elsewhere; rows is 0 for a token that may attend to nothing (text before the first
    image, padding), and such a token's bias row is all 0 (Mllama's choice: no -inf-only rows).
    """
    b, length = mask.shape[:2]
    keep = mask.repeat_interleave(patches, dim=3).reshape(b, length, -1).unsqueeze(1).bool()  # (B, 1, L, S)
    rows = keep.any(dim=-1, keepdim=True).to(dtype)                                          # (B, 1, L, 1)
    bias = torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill(~keep, torch.finfo(dtype).min)
    return bias * rows, rows


class VisionLlama(nn.Module):
    """A Llama text model with gated cross-attention to an image encoder.

    `cross_layers`: self-attention layer indices, a cross layer runs before each.
    `image_token_id`: the `<|image|>` id; ids >= the text vocabulary read `learnable_embedding`.
    """

    def __init__(self, language_model: LlamaForCausalLM, vision_config: MllamaVisionConfig,
                 cross_layers: list[int], image_token_id: int):
        super().__init__()
        text = language_model.config
        self.language_model = language_model
        self.vision_config = vision_config
        self.cross_layers = sorted(cross_layers)
        self.image_token_id = image_token_id
        self.vocab_size = text.vocab_size
        dtype = language_model.dtype
        self.vision_model = MllamaVisionModel(vision_config).to(dtype)
        self.multi_modal_projector = nn.Linear(vision_config.vision_output_dim, text.hidden_size,
                                               bias=True, dtype=dtype)
        self.learnable_embedding = nn.Embedding(LEARNABLE_ROWS, text.hidden_size, dtype=dtype)
        self.cross_attention_layers = nn.ModuleDict(
            {str(i): CrossAttentionDecoderLayer(text, i).to(dtype) for i in self.cross_layers})
        self._init_new(text.initializer_range)
        crosses = self.cross_attention_layers
        self._hooks = [layer.register_forward_pre_hook(_FusionHook(crosses[str(i)] if str(i) in crosses else None),
                                                       with_kwargs=True)
                       for i, layer in enumerate(language_model.model.layers)]

    def _init_new(self, std: float) -> None:
        """Normal(0, std) for the new linear and embedding weights (as Llama's init); norms 1, gates 0."""
        for module in [*self.cross_attention_layers.modules(), self.learnable_embedding]:
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
        nn.init.normal_(self.multi_modal_projector.weight, std=std)
        nn.init.zeros_(self.multi_modal_projector.bias)

    @property
    def config(self) -> LlamaConfig:
        """The language model's config (what HF Trainer and generation helpers look at)."""
        return self.language_model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.device

    # -----------------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, L, D): the language model's rows, learnable rows for ids >= vocab_size."""
        extra = input_ids >= self.vocab_size
        embeds = self.language_model.get_input_embeddings()(input_ids.masked_fill(extra, 0))
        if extra.any():
            rows = self.learnable_embedding((input_ids - self.vocab_size).clamp(min=0))
            embeds = torch.where(extra.unsqueeze(-1), rows, embeds)
        return embeds

    def encode_images(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                      aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, N, T, 3, H, W) -> cross_attention_states (B, N*T*P, D)."""
        features = self.vision_model(pixel_values=pixel_values.to(self.dtype),
                                     aspect_ratio_ids=aspect_ratio_ids,
                                     aspect_ratio_mask=aspect_ratio_mask).last_hidden_state
        return self.multi_modal_projector(features).flatten(1, 3)  # (B, N, T, P, Dv) -> (B, N*T*P, D)

    def vision_inputs(self, cross_attention_states, cross_attention_mask) -> dict[str, Any]:
        """The keyword arguments the fusion hooks read (empty without vision states)."""
        if cross_attention_states is None:
            return {}
        if cross_attention_mask is None:
            raise ValueError("cross_attention_mask (B, L, images, tiles) is needed with images")
        bias, rows = cross_attention_bias(cross_attention_mask, self.vision_model.num_patches, self.dtype)
        return {"cross_attention_states": cross_attention_states, "cross_attention_bias": bias,
                "text_row_mask": rows}

    def forward(self, input_ids: torch.Tensor, attention_mask=None, pixel_values=None,
                aspect_ratio_ids=None, aspect_ratio_mask=None, cross_attention_mask=None,
                labels=None, cross_attention_states=None, past_key_values=None, use_cache=False,
                position_ids=None, logits_to_keep: int = 0, **kwargs):
        """Mllama's inputs (module docstring); returns the language model's CausalLMOutput.

        Without pixel_values and cross_attention_states this is the language model's forward.
        """
        if pixel_values is not None:
            if cross_attention_states is not None:
                raise ValueError("give pixel_values or cross_attention_states, not both")
            cross_attention_states = self.encode_images(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        return self.language_model(
            inputs_embeds=self.embed(input_ids), attention_mask=attention_mask, labels=labels,
            past_key_values=past_key_values, use_cache=use_cache, position_ids=position_ids,
            logits_to_keep=logits_to_keep,
            **self.vision_inputs(cross_attention_states, cross_attention_mask), **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask=None, pixel_values=None,
                 aspect_ratio_ids=None, aspect_ratio_mask=None, cross_attention_mask=None,
                 max_new_tokens: int = 32, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, **ignored) -> torch.Tensor:
        """Greedy continuation of left-padded prompts -> (B, L + new) token ids, as HF's
        `generate(do_sample=False)`: every new token attends to the images its prompt's last
        token attends to (Mllama extends the cross-attention mask with its last row)."""
        from transformers import DynamicCache

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []),
                           device=input_ids.device)
        pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
        states = None
        if pixel_values is not None:
            states = self.encode_images(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        cache = DynamicCache(config=self.language_model.config)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)      # (B, L)
        tokens, step_ids, step_mask = input_ids, input_ids, cross_attention_mask
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            out = self(step_ids, attention_mask=attention_mask, position_ids=positions,
                       cross_attention_states=states, cross_attention_mask=step_mask,
                       past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1).masked_fill(done, pad)        # (B,)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done |= torch.isin(nxt, eos)
            if done.all():
                break
            step_ids = nxt[:, None]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(nxt), 1)], dim=1)
            positions = positions[:, -1:] + 1
            if step_mask is not None:
                step_mask = step_mask[:, -1:]
        return tokens

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False) -> None:
        """Recompute in the backward pass (Trainer's `activation_checkpointing`): the language
        model's decoder layers, with the cross layers that run inside their hooks, and the
        encoder's layers."""
        kwargs = dict(activation_checkpointing_kwargs=activation_checkpointing_kwargs,
                      every_n_layers=every_n_layers, offload=offload)
        self.language_model.activation_checkpointing_enable(**kwargs)
        self.vision_model.activation_checkpointing_enable(**kwargs)

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.language_model.is_activation_checkpointing

    # -----------------------------------------------------------------------------------------

    def adapter_parameters(self, parts=("encoder", "projector", "cross_attention", "image_rows")):
        """The parameters of the named new parts (never the language model's)."""
        modules = {"encoder": self.vision_model, "projector": self.multi_modal_projector,
                   "cross_attention": self.cross_attention_layers, "image_rows": self.learnable_embedding}
        return [p for part in parts for p in modules[part].parameters()]

    def freeze_language_model(self) -> None:
        for p in self.language_model.parameters():
            p.requires_grad_(False)


def resolve_image_token_id(config: AdapterConfig, vocab_size: int, tokenizer=None) -> int:
    """`config.image_token_id`, else the tokenizer's single-token `<|image|>`, else vocab_size."""
    if config.image_token_id is not None:
        return config.image_token_id
    if tokenizer is not None:
        ids = tokenizer("<|image|>", add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return ids[0]
    return vocab_size


def attach(language_model: LlamaForCausalLM, config: AdapterConfig | None = None,
           tokenizer=None) -> VisionLlama:
    """A fresh adapter (gates at zero) and encoder on `language_model` (issue 4, item 3).

    Seeded by `config.seed`, so the same config gives the same adapter. The image token is a
    learnable row when its id is >= the text vocabulary (Llama 3.x: add `<|image|>` to the
    tokenizer, it gets 128256, and no embedding resize is needed).
    """
    config = config or AdapterConfig()
    text = language_model.config
    layers = config.cross_layers(text.num_hidden_layers)
    vision_config = MllamaVisionConfig(**config.encoder_fields())
    image_id = resolve_image_token_id(config, text.vocab_size, tokenizer)
    if image_id >= text.vocab_size + LEARNABLE_ROWS:
        raise ValueError(f"image_token_id {image_id} is beyond the text vocabulary ({text.vocab_size}) "
                         f"plus {LEARNABLE_ROWS} learnable rows")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return VisionLlama(language_model, vision_config, layers, image_id)


def build(path: str, config: AdapterConfig | None = None, tokenizer=None, *,
          dtype: torch.dtype | None = None) -> VisionLlama:
    """Loads a Llama text checkpoint (e.g. Llama 3.1 8B Instruct) and attaches a fresh adapter."""
    language_model = LlamaForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    return attach(language_model, config, tokenizer)
