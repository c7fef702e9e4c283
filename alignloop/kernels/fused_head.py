"""Our fused linear + cross-entropy behind TRL's fused-LM-head call, for SFT and DPO.

TRL 1.16's SFTTrainer and DPOTrainer compute every loss (and DPO's reference log-probs) through
one call: `model(..., labels=labels, fused_lm_head=True)`, answered by the forward that TRL's
`add_fused_lm_head` puts on the model instance with a `FusedCausalLMOutput` (per-token `log_probs`,
zero where the label is -100, plus logging statistics). `install` puts our forward on the same
instance in front of TRL's: calls with `fused_lm_head=True` run the backbone (`model.model`, no
LM head) to the last hidden state and score it with `alignloop.kernels.fused_loss` against the LM
head's weight; every other call (generation, evaluation with logits) goes to the forward that was
there. TRL's losses, the DPO NLL term, the metrics and gradient accumulation stay TRL's.

Works with full fine-tuning, LoRA (the LM head stays a frozen nn.Linear, so its weight gets no
gradient and the backward skips that matmul) and activation checkpointing (the backbone is
checkpointed as usual; the head's memory is one chunk of logits). On a Mixture-of-Experts model
whose trainer asks for router logits (`output_router_logits`, TRL's MoE auxiliary loss), the
output carries the load-balancing loss as `aux_loss` and `loss` includes it times the config's
`router_aux_loss_coef`, as TRL's own head does (docs/moe.md).
"""

from __future__ import annotations

import functools
import os
import types

import torch
from torch.distributed.tensor import DTensor

from alignloop.kernels.fused_loss import IGNORE_INDEX, linear_log_probs

# `fused_loss: auto` turns the fused loss on from this max_length, or from this vocabulary size at
# any length: below both the logits are small and TRL's own fused head is as good. With a real
# vocabulary the head's log-softmax over every token (prompt and padding included) dominates a
# short step: SmolLM2-135M (49,152) LoRA SFT at 16 x 128 runs 2.1x faster fused on 2 CPU cores
# (docs/benchmarks.md). ALIGNLOOP_FUSED_LOSS_MIN_LENGTH / _MIN_VOCAB move them (0: auto is always
# on, which is how the whole test suite is checked with the fused loss; docs/long_context.md).
AUTO_MIN_LENGTH = int(os.environ.get("ALIGNLOOP_FUSED_LOSS_MIN_LENGTH", 4096))
AUTO_MIN_VOCAB = int(os.environ.get("ALIGNLOOP_FUSED_LOSS_MIN_VOCAB", 32768))


def wanted(setting: bool | str, max_length: int | None, vocab_size: int | None = None) -> bool:
    """The recipe's `fused_loss` (true, false or "auto") for a stage with this max_length and a
    model with this vocabulary (None: unknown, decided by the length alone)."""
    if setting == "auto":
        return (max_length is None or max_length >= AUTO_MIN_LENGTH
                or (vocab_size is not None and vocab_size >= AUTO_MIN_VOCAB))
    return bool(setting)


def vocab_size(model) -> int:
    """The vocabulary (LM head rows) of a causal LM, peft-wrapped or not."""
    return unwrap(model).config.get_text_config().vocab_size


def installed(model) -> bool:
    """Whether `install` put our fused head on this model."""
    return bool(getattr(unwrap(model).forward, "_alignloop_fused", False))


def unwrap(model):
    """The causal LM under a peft wrapper (the model whose forward TRL patched)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_head(model) -> str | None:
    """Why our fused head cannot stand in for this model's LM head, or None when it can."""
    base = unwrap(model)
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return (f"the LM head is a {type(head).__name__}, not a plain Linear (is lm_head a LoRA "
                "target or in modules_to_save?); remove it from the adapter or set fused_loss: false")
    config = base.config.get_text_config()
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier"):
        if getattr(config, key, None) not in (None, 1.0):
            return f"the model scales its logits ({key}); set fused_loss: false"
    if not hasattr(base, base.base_model_prefix):
        return f"{type(base).__name__} has no backbone attribute '{base.base_model_prefix}'"
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():  # the head's weight is a sharded placeholder outside its module
        return "DeepSpeed ZeRO-3 shards the LM head's weight; set fused_loss: false (or use FSDP)"
    return None


def install(model, *, budget_bytes: int | None = None, backend: str = "auto") -> None:
    """Routes `model(..., fused_lm_head=True)` through our fused loss (see the module docstring).

    `model`: the trainer's model (peft-wrapped or not), after the TRL trainer was built (TRL adds
    its own head in the trainer's constructor). Raises ValueError when `check_head` objects.
    """
    problem = check_head(model)
    if problem:
        raise ValueError(f"fused_loss: {problem}")
    base = unwrap(model)
    previous = base.forward
    if getattr(previous, "_alignloop_fused", False):
        return

    @functools.wraps(type(base).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            passed = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return previous(*args, **kwargs, **{k: v for k, v in passed.items() if v is not None})
        return fused_forward(self, args, kwargs, labels, shift_labels, num_items_in_batch,
                             budget_bytes, backend)

    forward._alignloop_fused = True
    base.forward = types.MethodType(forward, base)


def fused_forward(model, args, kwargs, labels, shift_labels, num_items_in_batch, budget_bytes, backend):
    """The backbone to the last hidden state, then per-token log-probs of the next-token labels."""
    from trl.trainer.utils import FusedCausalLMOutput

    kwargs["use_cache"] = False
    config = model.config.get_text_config()
    if getattr(config, "output_router_logits", False):  # an MoE whose trainer wants the aux loss
        kwargs.setdefault("output_router_logits", True)
    backbone = getattr(model, model.base_model_prefix)(*args, **kwargs)
    hidden = backbone.last_hidden_state  # (B, T, H)
    if shift_labels is None:
        hidden, targets = hidden[:, :-1], labels[:, 1:]  # (B, T-1, H), (B, T-1)
    else:
        targets = shift_labels
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if isinstance(weight, DTensor):  # FSDP2: the whole head, differentiably gathered
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    targets = targets.to(weight.device)
    if backend == "auto":
        backend = "triton" if weight.is_cuda and _has_triton() else "torch"
    out = linear_log_probs(hidden.to(weight.device), weight, targets, bias,
                           stats=True, budget_bytes=budget_bytes, backend=backend)
    mask = targets != IGNORE_INDEX
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss, aux = -out.log_probs.sum() / count, None
    if kwargs.get("output_router_logits"):
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        experts = getattr(config, "num_local_experts", None) or config.num_experts  # Llama 4 / others
        aux = load_balancing_loss_func(backbone.router_logits, experts, config.num_experts_per_tok,
                                       kwargs.get("attention_mask"))
        loss = loss + getattr(config, "router_aux_loss_coef", 0.0) * aux
    return FusedCausalLMOutput(loss=loss, log_probs=out.log_probs, entropy=out.entropy,
                               mean_logits=out.mean_logit, is_top1=out.is_top1, label_mask=mask,
                               aux_loss=aux)


@functools.cache
def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None
