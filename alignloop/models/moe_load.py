"""Routing during MoE training: the load-balancing loss, and per-expert load telemetry.

The auxiliary loss is the Switch Transformer's (Fedus et al. 2021, eq. 4-6), as transformers'
Mixtral implements it and every MoE family in transformers reuses: over all layers' router logits,

    aux = E * sum_e f_e * P_e

f_e the share of (token, top-k slot) assignments that go to expert e, P_e the mean router
probability of e (padding left out). It is 1 for a perfectly even router (a coefficient of
variation of 0) and grows as the load concentrates. Training adds coef * aux to the loss.

`RouterLoad` counts, through forward hooks on the routers, how many tokens each expert of each
layer receives in the forward passes that build a gradient (not evaluation or DPO's reference
pass; activation checkpointing's recomputation counts every layer twice, which leaves the shares
unchanged), and `LoadCallback` logs their coefficient of variation (std / mean over the experts
of a layer, averaged over the layers: 0 when every expert gets the same share).
"""

from __future__ import annotations

import contextlib
import math

import torch
from transformers import TrainerCallback

from alignloop.models.moe import base_name, moe_blocks


def experts_per_token(text_config) -> tuple[int, int]:
    """(experts, experts per token) of an MoE config (Llama 4 says num_local_experts, OLMoE and
    Qwen3-MoE num_experts)."""
    experts = getattr(text_config, "num_local_experts", None) or getattr(text_config, "num_experts")
    return experts, text_config.num_experts_per_tok


def aux_loss(router_logits: tuple[torch.Tensor, ...], text_config, attention_mask=None) -> torch.Tensor:
    """The load-balancing loss (above) of one forward's router logits, one (tokens, E) tensor per
    sparse layer; `attention_mask` (B, T) leaves padding out."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    experts, k = experts_per_token(text_config)
    return load_balancing_loss_func(tuple(router_logits), experts, k, attention_mask)


@contextlib.contextmanager
def caught_router_logits(model: torch.nn.Module):
    """Inside the block, forwards of `model` (a causal LM or sequence classifier, unwrapped) that
    pass output_router_logits=True leave their backbone's router logits (one (tokens, E) tensor
    per sparse layer) in the yielded list: heads such as GenericForSequenceClassification drop
    them from their own output."""
    caught: list = []
    backbone = getattr(model, model.base_model_prefix, None) or model.model
    catch = lambda module, args, out: caught.append(getattr(out, "router_logits", None))  # noqa: E731
    handle = backbone.register_forward_hook(catch)
    try:
        yield caught
    finally:
        handle.remove()


def load_cv(shares: list[float]) -> float:
    """Coefficient of variation of one layer's per-expert shares: population std / mean."""
    mean = sum(shares) / len(shares)
    if mean == 0:
        return float("nan")
    return math.sqrt(sum((s - mean) ** 2 for s in shares) / len(shares)) / mean


class RouterLoad:
    """Tokens per expert per sparse layer, counted by forward hooks on the routers of `model`
    (peft-wrapped or not). `window()` and `total()` return per-layer token shares; `close()`
    removes the hooks."""

    def __init__(self, model: torch.nn.Module, top_k: int):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        modules = {}
        for name, module in base.named_modules():  # a wrapped router: its innermost module runs
            modules[base_name(name)] = module
        self.layers = [b.router for b in moe_blocks(base) if b.router]
        self.top_k, self.mask = top_k, None
        self.counts = {name: None for name in self.layers}  # since the last window()
        self.totals = {name: None for name in self.layers}
        # the attention mask, from the backbone's call (peft calls the causal LM's forward
        # directly, so a hook on it would not fire)
        backbone = getattr(base, base.base_model_prefix, None) or base.model
        self.handles = [backbone.register_forward_pre_hook(self._keep_mask, with_kwargs=True)]
        self.handles += [modules[name].register_forward_hook(self._counter(name)) for name in self.layers]

    def _keep_mask(self, module, args, kwargs):
        self.mask = kwargs.get("attention_mask")

    def _counter(self, name: str):
        def count(module, args, out):
            if not torch.is_grad_enabled() or not isinstance(out, tuple):
                return
            if len(out) == 3:  # (logits, scores, top-k indices): Mixtral, Qwen3-MoE, OLMoE
                chosen = out[2]  # (N, k)
            else:  # (scores, logits): Llama 4
                chosen = out[1].topk(self.top_k, dim=-1).indices  # (N, k)
            experts = out[0].shape[-1] if len(out) == 3 else out[1].shape[-1]
            mask = self.mask
            if mask is not None and mask.dim() == 2 and mask.numel() == chosen.shape[0]:
                chosen = chosen[mask.reshape(-1).bool().to(chosen.device)]
            counts = torch.bincount(chosen.reshape(-1).detach(), minlength=experts).float()  # (E,)
            self.counts[name] = counts if self.counts[name] is None else self.counts[name] + counts
        return count

    def window(self) -> dict[str, list[float]]:
        """Per layer, each expert's share of the tokens since the last call (then restart)."""
        shares = {}
        for name, counts in self.counts.items():
            if counts is not None and counts.sum() > 0:
                shares[name] = (counts * self.top_k / counts.sum()).tolist()
                total = self.totals[name]
                self.totals[name] = counts if total is None else total + counts
            self.counts[name] = None
        return shares

    def total(self) -> dict[str, list[float]]:
        """Per layer, each expert's share of every counted token (the current window included)."""
        self.window()
        return {name: (c * self.top_k / c.sum()).tolist()
                for name, c in self.totals.items() if c is not None and c.sum() > 0}

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def mean_cv(shares: dict[str, list[float]]) -> float | None:
    """The layers' coefficients of variation, averaged; None without counts."""
    values = [load_cv(s) for s in shares.values()]
    return sum(values) / len(values) if values else None


def load_report(shares: dict[str, list[float]]) -> dict:
    """What a stage's metrics keep: per layer the token share of each expert (they sum to k)
    and its coefficient of variation, and their mean."""
    layers = [{"layer": name, "token_share": [round(s, 4) for s in values], "cv": round(load_cv(values), 4)}
              for name, values in shares.items()]
    cv = mean_cv(shares)
    return {"layers": layers, "mean_cv": None if cv is None else round(cv, 4)}


class LoadCallback(TrainerCallback):
    """Adds `moe/load_cv` (the mean over layers of the per-layer coefficient of variation of the
    expert load since the last log) to every training log, before the loggers see it."""

    def __init__(self, load: RouterLoad):
        self.load = load

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        cv = mean_cv(self.load.window())
        if cv is not None:
            logs["moe/load_cv"] = round(cv, 4)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["moe/load_cv"] = logs["moe/load_cv"]
