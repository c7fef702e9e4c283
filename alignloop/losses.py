"""The preference maths shared by text and vision DPO (reference A5), tested once.

Text DPO runs on TRL's DPOTrainer, which computes the sigmoid term itself and calls
`chosen_nll` for Llama 3's NLL term (alignloop.dpo.trainer); vision DPO, on a plain Trainer
over an Mllama model, calls all three (alignloop.vision.stage). Only torch here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the label tokens and their mask; position t predicts label t + 1.

    logits (B, L, V); labels (B, L) with -100 off the answer -> (log-probs (B, L-1), zero off
    the mask; the mask (B, L-1), 1 where a label token is predicted).
    """
    labels = labels[:, 1:]
    keep = labels != -100                                                         # (B, L-1)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)                      # (B, L-1, V)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)      # (B, L-1)
    return picked * keep, keep.long()


def sigmoid_dpo(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
                ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), averaged over the pairs; every
    input is a (B,) tensor of summed response log-probs (Rafailov et al. 2023; TRL's "sigmoid")."""
    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()


def chosen_nll(log_probs: torch.Tensor, completion_mask: torch.Tensor,
               normalization: str = "sequence") -> torch.Tensor:
    """The NLL term on the chosen responses' loss tokens.

    "sequence" (Pang et al. 2024, Llama 3): each chosen response's summed -log p divided by its
    own number of loss tokens, averaged over the pairs that have any. "token" (TRL's "sft" loss
    type): the mean -log p over every chosen loss token of the batch. log_probs: (2B, T-1)
    log-prob of each next token; completion_mask: (2B, T) over the input positions, or (2B, T-1)
    already aligned with log_probs; rows are [chosen; rejected].
    """
    shift = completion_mask[:, 1:] if completion_mask.size(1) > log_probs.size(1) else completion_mask
    log_probs = log_probs[:, -shift.size(1):]
    chosen, _ = log_probs.chunk(2, dim=0)  # (B, T-1)
    keep = shift.chunk(2, dim=0)[0].bool()
    if normalization == "token":
        return -chosen[keep].mean()
    if normalization != "sequence":
        raise ValueError(f"nll_normalization: {normalization!r} is not sequence or token")
    lengths = keep.sum(dim=1)  # (B,)
    sums = torch.where(keep, chosen, torch.zeros_like(chosen)).sum(dim=1)
    has = lengths > 0
    return -(sums[has] / lengths[has]).mean()
