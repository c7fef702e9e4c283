"""The kernel's mask representation, without Triton (the sdpa fallback uses it too).

Per query row i of batch b, an allowed key range `[lo[b, i], hi[b, i])`, intersected with a
dense (B, Lq, Lk) boolean mask only where some row's allowed keys are not one range.
"""

from __future__ import annotations

import torch


def row_ranges(batch: int, q_len: int, k_len: int, *, causal: bool = False,
               position_ids: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
               device=None):
    """The kernel's mask representation: lo, hi (B, Lq) int32 and a dense mask or None."""
    rows = torch.arange(q_len, device=device)
    lo = torch.zeros((batch, q_len), dtype=torch.int64, device=device)
    hi = torch.full((batch, q_len), k_len, dtype=torch.int64, device=device)
    if causal:
        hi = torch.minimum(hi, (rows + 1 + k_len - q_len).clamp(min=0)[None, :])
    if position_ids is not None:
        assert q_len == k_len, "position_ids (packed documents) need self-attention"
        lo = torch.maximum(lo, document_starts(position_ids.expand(batch, -1)))
    dense = None
    if key_mask is not None:
        if key_mask.dim() == 2:
            key_mask = key_mask[:, None, :].expand(batch, q_len, k_len)
        first, last, contiguous = mask_bounds(key_mask)
        lo, hi = torch.maximum(lo, first), torch.minimum(hi, last)
        if not bool(contiguous.all()):
            dense = key_mask.to(torch.bool)
    return lo.to(torch.int32), hi.to(torch.int32), dense


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) -> (B, L): index of the first token of each token's document.

    A document starts wherever the position is not the previous one + 1 (transformers'
    `find_packed_sequence_indices` uses the same rule)."""
    idx = torch.arange(position_ids.shape[1], device=position_ids.device)
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return torch.where(starts, idx, 0).cummax(dim=1).values


def segment_starts(segments: torch.Tensor) -> torch.Tensor:
    """(B, L) segment ids (equal = same document) -> (B, L) index of each token's document start."""
    idx = torch.arange(segments.shape[1], device=segments.device)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return torch.where(starts, idx, 0).cummax(dim=1).values


def mask_bounds(mask: torch.Tensor):
    """(B, Lq, Lk) booleans -> first allowed key, one past the last, and whether the allowed keys
    of each row are contiguous. A row with no allowed key gets first = last = 0."""
    mask = mask.to(torch.bool)
    k_len = mask.shape[-1]
    anyone = mask.any(-1)
    first = mask.to(torch.int8).argmax(-1)
    last = k_len - mask.flip(-1).to(torch.int8).argmax(-1)
    count = mask.sum(-1)
    first = torch.where(anyone, first, 0)
    last = torch.where(anyone, last, 0)
    return first, last, count == last - first
