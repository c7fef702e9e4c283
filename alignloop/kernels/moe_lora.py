"""Expert LoRA that does not copy the experts: `alignloop_lora`, an experts implementation
registered with transformers' experts interface (transformers.integrations.moe), for models
whose routed experts are fused 3D parameters run through that interface (Mixtral, Qwen3-MoE,
OLMoE in transformers 5.25; not Llama 4, whose experts module does not dispatch through it).

How peft 0.21 computes an expert LoRA (`target_parameters`): its ParamWrapper registers a
parametrization on the experts module for the forward, so that reading `experts.gate_up_proj`
returns W + scaling * B A, a fresh (E, 2I, H) tensor (one `baddbmm`), which every experts
implementation then multiplies with. That tensor is kept for the backward: expert LoRA saves
about the experts' whole size per layer, whatever the number of tokens.

What `experts_forward` does instead: it never reads the parametrized attribute. It reads the
parametrization's original weight W and the two low-rank factors peft's proxy holds (a view of
lora_A / lora_B), sorts the (token, expert) pairs by expert as transformers' `grouped_mm` does,
and computes per expert

    y = x W_e^T + scaling * (x A_e^T) B_e^T            (alignloop.kernels.moe_lora_reference)

with grouped matrix products (torch's grouped_mm where its 16-byte alignment holds, a loop over
the experts otherwise). Each LoRA branch runs under a checkpoint of its own: its gradients need
its input rows (the gathered tokens, the gated activations), which the frozen experts do not
keep but which are one gather / one gate away from the block's input and the (S, 2I)
intermediate it keeps anyway; so the backward keeps the block's input and (S, r) products beyond
what attention-only LoRA keeps, and recomputes the rest (a gather, the gate, rank-r products)
in the backward. peft still owns the adapter: its ParamWrappers, state dict, save / load,
merge, `disable_adapter()` (no parametrization is registered then, and this computes W alone)
are unchanged; only the arithmetic of the forward is ours. Where peft's proxy is not the
two-factor one (several active adapters, fp8 weights) this falls back to reading the
attribute, i.e. to peft's W + delta.

The idea of applying x A B per expert inside the grouped product instead of materialising
W + B A is Unsloth's "split LoRA" for MoE; the code here is written from the maths above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from alignloop.kernels.moe_lora_reference import LoraFactors

NAME = "alignloop_lora"  # the experts_implementation this module registers


def weight_and_factors(module: torch.nn.Module, name: str) -> tuple[torch.Tensor, LoraFactors | None]:
    """The experts' parameter `name` without its LoRA, and the LoRA's factors (None: no adapter
    active on it, or one whose delta peft already added to the weight returned)."""
    if not parametrize.is_parametrized(module, name):
        return getattr(module, name), None
    chain = module.parametrizations[name]
    proxy = chain[0]
    if len(chain) != 1 or not all(hasattr(proxy, key) for key in ("lhs", "rhs", "scaling")):
        return getattr(module, name), None  # peft's W + delta (several adapters, fp8 weights)
    # peft 0.21's _LoraFactorsProxy: W + scaling * lhs @ rhs. (E, out, in) layout: lhs = B
    # (E, out, r), rhs = A (E, r, in); transposed (E, in, out): lhs = A^T, rhs = B^T.
    if getattr(module, "is_transposed", False):
        a, b = proxy.lhs.transpose(-2, -1), proxy.rhs.transpose(-2, -1)
    else:
        a, b = proxy.rhs, proxy.lhs
    return chain.original, LoraFactors(a, b, proxy.scaling)


def _grouped_mm_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch's grouped_mm takes 16-byte aligned operands (strides and start), its backward an
    output whose rows are too, and on CUDA an Ampere or newer GPU; otherwise the loop below."""
    if not hasattr(F, "grouped_mm") or x.dtype != w.dtype or w.shape[-1] * w.element_size() % 16:
        return False
    if x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    for t in (x, w):
        if t.data_ptr() % 16 or any(stride * t.element_size() % 16 for stride, size
                                    in zip(t.stride(), t.shape) if stride != 1 and size > 1):
            return False
    return True


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x (S, in) sorted by group, w (G, in, out), offsets (G,) int32: each group's end row ->
    (S, out), group g's rows times w[g]."""
    if w.stride(-1) != 1 and w.stride(-2) != 1:
        # each w[g] must be row- or column-major; peft's B is a view with the groups innermost
        w = w.contiguous()  # (G, in, out): LoRA-sized, a few MB at most
    if _grouped_mm_fits(x, w):
        return F.grouped_mm(x, w, offs=offsets)
    ends = offsets.tolist()  # one host sync
    starts = [0] + ends[:-1]
    parts = [x[s:e] @ w[g] for g, (s, e) in enumerate(zip(starts, ends)) if e > s]  # (rows_g, out)
    return torch.cat(parts) if parts else x.new_zeros(0, w.shape[-1])


def project(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Each row's expert projection without LoRA, x (S, in) -> (S, out)."""
    return grouped_mm(x, weight if transposed else weight.transpose(-2, -1), offsets)


def lora_rows(x: torch.Tensor, lora: LoraFactors, offsets: torch.Tensor) -> torch.Tensor:
    """Each row's expert LoRA, scaling * (x A^T) B^T: x (S, in) -> (S, r) -> (S, out)."""
    low = grouped_mm(x, lora.a.to(x.dtype).transpose(-2, -1), offsets) * lora.scaling  # (S, r)
    return grouped_mm(low, lora.b.to(x.dtype).transpose(-2, -1), offsets)  # scaled at rank r


def _gate_up_lora(hidden: torch.Tensor, rows: torch.Tensor, a, b, scaling, offsets) -> torch.Tensor:
    return lora_rows(hidden[rows].to(a.dtype), LoraFactors(a, b, scaling), offsets)  # (S, 2I)


def _down_lora(h: torch.Tensor, apply_gate, a, b, scaling, offsets) -> torch.Tensor:
    return lora_rows(apply_gate(h), LoraFactors(a, b, scaling), offsets)  # (S, H)


def _checkpointed(fn, *args) -> torch.Tensor:
    """fn(*args), its inner tensors recomputed in the backward: what the LoRA needs for its
    gradients is its input rows, which the base experts do not keep (the gathered tokens, the
    gated activations); from the block's own saved tensors they are one gather / one gate away."""
    from torch.utils.checkpoint import checkpoint

    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False)


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts interface's signature: tokens (N, H), their experts (N, K) and routing weights
    (N, K) -> (N, H). `self`: a transformers experts module (use_experts_implementation)."""
    if getattr(self, "_is_expert_parallel", False) or not getattr(self, "has_gate", False):
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    gate_up, gate_up_lora = weight_and_factors(self, "gate_up_proj")
    down, down_lora = weight_and_factors(self, "down_proj")
    transposed = getattr(self, "is_transposed", False)
    n, k = top_k_index.shape
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))  # (S,), S = N * K, grouped by expert
    x = hidden_states[perm // k].to(gate_up.dtype)  # (S, H)
    # histc rather than bincount: no host sync; CPU wants floats, CUDA integers (as transformers)
    ids = expert_ids.float() if x.device.type in ("cpu", "mps") else expert_ids.int()
    counts = torch.histc(ids, bins=self.num_experts, min=0, max=self.num_experts - 1)  # (E,)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)  # (E,)
    h = project(x, gate_up, offsets, transposed)  # (S, 2I)
    if gate_up_lora is not None:
        lora = gate_up_lora
        h = h + _checkpointed(_gate_up_lora, hidden_states, perm // k, lora.a, lora.b, lora.scaling, offsets)
    if getattr(self, "has_bias", False):
        h = h + self.gate_up_proj_bias[expert_ids]
    y = project(self._apply_gate(h), down, offsets, transposed)  # (S, I) -> (S, H)
    if down_lora is not None:
        lora = down_lora
        y = y + _checkpointed(_down_lora, h, self._apply_gate, lora.a, lora.b, lora.scaling, offsets)
    if getattr(self, "has_bias", False):
        y = y + self.down_proj_bias[expert_ids]
    if getattr(self, "has_post_expert_norm", False):
        y = self.post_expert_norm(y)
    y = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1)  # (S, H)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return y[inverse].view(n, k, -1).sum(dim=1).to(hidden_states.dtype)  # (N, H)


def register() -> str:
    """Registers `alignloop_lora` with transformers' experts interface. Idempotent."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if NAME not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(NAME, experts_forward)
    return NAME


def dispatches(model: torch.nn.Module) -> bool:
    """Whether the model's experts modules run through transformers' experts interface (the
    decorator sets `has_gate` on them): only then can `alignloop_lora` stand in."""
    experts = [m for m in model.modules()
               if isinstance(getattr(m, "gate_up_proj", None), torch.nn.Parameter)
               or parametrize.is_parametrized(m, "gate_up_proj")]
    return bool(experts) and all(hasattr(m, "has_gate") for m in experts)


def install(model: torch.nn.Module) -> bool:
    """Runs the experts of `model` (a transformers model, peft-wrapped or not) through
    `alignloop_lora`. Returns False, changing nothing, where they do not dispatch (Llama 4)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not dispatches(base):
        return False
    register()
    base.set_experts_implementation(NAME)
    return True


def installed(model: torch.nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config.get_text_config()._experts_implementation == NAME
