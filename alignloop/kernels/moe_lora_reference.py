"""Expert LoRA, the plain reference: a routed Mixture-of-Experts layer whose experts each carry a
LoRA on their fused gate/up projection and on their down projection, computed one expert at a
time (the spec that alignloop.kernels.moe_lora is tested against).

transformers 5 stores the routed experts of Mixtral, Qwen3-MoE and OLMoE as two 3D parameters,
`gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I), each expert's matrix laid out like an
nn.Linear weight (out, in); Llama 4 stores them transposed, (E, H, 2I) and (E, I, H) (in, out).
peft's `target_parameters` gives each expert e of such a parameter its own rank-r pair; in the
"x A B" form used here:

    y_e(x) = x W_e^T + scaling * (x A_e^T) B_e^T        A: (E, r, in), B: (E, out, r)

which is x (W_e + scaling * B_e A_e)^T: the same as adding the delta to the weight (peft's way)
without ever forming (E, out, in) matrices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class LoraFactors:
    """One 3D parameter's per-expert LoRA: x -> scaling * (x A_e^T) B_e^T."""

    a: torch.Tensor  # (E, r, in)
    b: torch.Tensor  # (E, out, r)
    scaling: float


def delta_weight(lora: LoraFactors, transposed: bool = False) -> torch.Tensor:
    """The dense delta of every expert: (E, out, in), or (E, in, out) for a transposed layout."""
    delta = lora.scaling * lora.b @ lora.a  # (E, out, in)
    return delta.transpose(-2, -1) if transposed else delta


def expert_linear(x: torch.Tensor, weight: torch.Tensor, lora: LoraFactors | None, e: int,
                  transposed: bool = False) -> torch.Tensor:
    """Expert e's projection of x (T, in) -> (T, out), with its LoRA when there is one."""
    out = x @ weight[e] if transposed else x @ weight[e].T  # (T, out)
    if lora is not None:
        out = out + lora.scaling * (x @ lora.a[e].T) @ lora.b[e].T  # (T, r) -> (T, out)
    return out


def experts_reference(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                      gate_up: torch.Tensor, down: torch.Tensor, act: Callable, *,
                      gate_up_lora: LoraFactors | None = None, down_lora: LoraFactors | None = None,
                      transposed: bool = False) -> torch.Tensor:
    """The routed experts' output for tokens x (N, H).

    top_k_index (N, K): each token's experts; top_k_weights (N, K): their routing weights.
    gate_up: (E, 2I, H) (transposed: (E, H, 2I)), first half gate, second half up; down:
    (E, H, I) (transposed: (E, I, H)). Each token's output is the routing-weighted sum over its
    K experts of down(act(gate) * up).
    """
    out = torch.zeros_like(x, dtype=torch.float32)  # (N, H), summed in fp32 as transformers does
    for e in range(gate_up.shape[0]):
        token, slot = torch.where(top_k_index == e)  # (T,), (T,): the tokens routed to e
        if token.numel() == 0:
            continue
        h = expert_linear(x[token], gate_up, gate_up_lora, e, transposed)  # (T, 2I)
        gate, up = h.chunk(2, dim=-1)  # (T, I) each
        y = expert_linear(act(gate) * up, down, down_lora, e, transposed)  # (T, H)
        out.index_add_(0, token, (y * top_k_weights[token, slot, None]).float())
    return out.to(x.dtype)
