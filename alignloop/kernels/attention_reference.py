"""Plain PyTorch attention: the spec of `flash_attention.py`, for every variant it runs.

Readable rather than fast: the whole (B, H, Lq, Lk) score matrix is built in fp32. The mask is
built from what the caller means (causal, documents, allowed keys), independently of the row
ranges the kernel uses, so that a test comparing the two also checks that translation.
"""

from __future__ import annotations

import torch


def attention_mask_reference(batch: int, q_len: int, k_len: int, *, causal: bool = False,
                             position_ids: torch.Tensor | None = None,
                             key_mask: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """(B, Lq, Lk) booleans, True where query i may attend to key j.

    causal: bottom-right aligned, key j visible from query i when j <= i + Lk - Lq.
    position_ids (B, L): packed documents in one row (self-attention); a document starts wherever
    the position is not the previous one + 1, and tokens never see another document.
    key_mask (B, Lk) or (B, Lq, Lk): True = may attend (padding, or the image tiles of a row).
    """
    allowed = torch.ones((batch, q_len, k_len), dtype=torch.bool, device=device)
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    if causal:
        allowed &= (j <= i + (k_len - q_len))[None]
    if position_ids is not None:
        pos = position_ids.expand(batch, -1)  # (B, L)
        new_doc = torch.ones_like(pos, dtype=torch.bool)
        new_doc[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
        doc = new_doc.cumsum(1)  # (B, L) document number of each token
        allowed &= doc[:, :, None] == doc[:, None, :]
    if key_mask is not None:
        key_mask = key_mask.to(torch.bool)
        allowed &= key_mask[:, None, :] if key_mask.dim() == 2 else key_mask
    return allowed


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                        position_ids: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                        scale: float | None = None, allowed: torch.Tensor | None = None,
                        upcast: bool = True) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v in fp32, returned in q's dtype as (B, Lq, Hq, D).

    q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D), Hq a multiple of Hkv (grouped-query attention: query
    head h reads key head h // (Hq // Hkv)). Masks as in `attention_mask_reference`, or `allowed`
    (B, Lq, Lk) directly. A row that may see no key gives zeros (and passes no gradient).
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    if allowed is None:
        allowed = attention_mask_reference(B, Lq, Lk, causal=causal, position_ids=position_ids,
                                           key_mask=key_mask, device=q.device)
    group = Hq // Hkv
    dtype = torch.float32 if upcast else q.dtype
    kf = k.to(dtype).repeat_interleave(group, dim=1)  # (B, Hq, Lk, D)
    vf = v.to(dtype).repeat_interleave(group, dim=1)
    scores = torch.einsum("bhid,bhjd->bhij", q.to(dtype), kf) * scale  # (B, Hq, Lq, Lk)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    seen = allowed.any(-1)[:, None, :, None]  # (B, 1, Lq, 1)
    # exp(-inf - max) would be nan for an empty row: give it a finite score row, then zero it.
    probs = (torch.softmax(torch.where(seen, scores, 0.0), dim=-1) * seen).to(dtype)
    out = torch.einsum("bhij,bhjd->bhid", probs, vf)  # (B, Hq, Lq, D)
    return out.transpose(1, 2).to(q.dtype)
