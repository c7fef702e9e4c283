"""`attn_implementation="alignloop_triton"`: our flash attention behind transformers' interfaces.

Two functions are registered under one name (stack-notes: without the mask function the
attention function would only ever receive `attention_mask=None`):

- `flash_attention_mask` (AttentionMaskInterface) turns the model's mask request into a compact
  `RowRanges` (per query row an allowed key range) for the cases that matter at long context:
  causal with or without padding or a KV cache, and packed documents (recognised from the mask
  function's values, never from transformers' private closures). Any other mask pattern is
  materialised exactly as sdpa would (`sdpa_mask`, logged once), and read back into ranges by
  the attention function. `None` means plain causal self-attention.
- `flash_attention_forward` (AttentionInterface) accepts what a model may pass: None (causal as
  sdpa decides, packed documents from `position_ids`), `RowRanges`, a 2D key mask (B, Lk), or a
  3D/4D boolean or additive (0 / large negative) mask such as Mllama's cross-attention mask. A
  mask given explicitly is the whole truth, as with sdpa: no causal mask is added to it.

On tensors the kernel cannot run on (CPU without TRITON_INTERPRET, bf16 in the interpreter, no
Triton installed) or with options it does not have (dropout, softcap, per-head or biased masks),
the same masks go to torch's sdpa instead, with a one-time log line: recipes naming
`alignloop_triton` run everywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger("alignloop.kernels")

NAME = "alignloop_triton"
# An additive mask entry at or below this is "masked" (transformers uses finfo(dtype).min); any
# value between this and 0 is a bias the kernel does not take.
MASKED_BELOW = -1e4
_logged: set[str] = set()


@dataclass
class RowRanges:
    """Query row i of batch b may attend to keys `lo[b, i] <= j < hi[b, i]` (and `dense[b, i, j]`)."""

    lo: torch.Tensor  # (B, Lq) int32
    hi: torch.Tensor  # (B, Lq) int32
    k_len: int
    dense: torch.Tensor | None = None  # (B, Lq, Lk) bool, only when a row's keys have holes

    @property
    def shape(self) -> tuple[int, int, int, int]:  # as the (B, 1, Lq, Lk) mask it stands for
        return (self.lo.shape[0], 1, self.lo.shape[1], self.k_len)


def _log_once(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        logger.warning("%s: %s; using torch sdpa for these calls", NAME, reason)


# ---------------------------------------------------------------------------------------------
# Mask function


def flash_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                         mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs):
    """AttentionMaskInterface entry: None, a `RowRanges`, or sdpa's (B, 1, Lq, Lk) boolean mask."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    mask_function = mask_function or causal_mask_function
    device = kwargs.get("device", "cpu")
    offsets = _ints(q_offset, kv_offset)
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)  # (B, Lk) bool or None
    if offsets is not None and mask_function is causal_mask_function:
        q_off, kv_off = offsets
        if (padding is None or bool(padding.all())) and q_length == kv_length and q_off == kv_off:
            return None  # plain causal self-attention (documents come from position_ids)
        return _causal_ranges(batch_size, q_length, kv_length, q_off - kv_off, padding, device)
    if offsets == (0, 0) and padding is None and q_length == kv_length:
        starts = _packed_starts_of(mask_function, batch_size, q_length, device)
        if starts is not None:
            return _packed_ranges(starts)
    _log_once_mask(q_length, kv_length)
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                     attention_mask, **kwargs)


def _ints(*values):
    """The offsets as Python ints, or None when they cannot be read (a traced tensor)."""
    try:
        return tuple(int(v) for v in values)
    except Exception:  # a tensor under torch.compile / export: take the general path
        return None


def _causal_ranges(batch: int, q_len: int, k_len: int, shift: int, padding, device) -> RowRanges:
    """Key j visible from query i when j <= i + shift and key j is not padding."""
    rows = torch.arange(q_len, device=device)
    hi = (rows + shift + 1).clamp(0, k_len).expand(batch, q_len)  # (B, Lq)
    lo = torch.zeros_like(hi)
    dense = None
    if padding is not None:
        from alignloop.kernels.ranges import mask_bounds

        first, last, contiguous = mask_bounds(padding[:, None, :])  # (B, 1) each
        lo, hi = torch.maximum(lo, first), torch.minimum(hi, last)
        if not bool(contiguous.all()):
            dense = padding[:, None, :].expand(batch, q_len, k_len)
    return RowRanges(lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous(), k_len, dense)


def _packed_ranges(starts: torch.Tensor) -> RowRanges:
    """Causal within each document: starts (B, L), the index of each token's document start."""
    B, L = starts.shape
    hi = (torch.arange(L, device=starts.device) + 1).expand(B, L)
    return RowRanges(starts.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous(), L)


def _log_once_mask(q_length: int, kv_length: int) -> None:
    """The compact path cannot be taken: say so once instead of silently building (L, L)."""
    reason = "dense-mask"
    if reason not in _logged:
        _logged.add(reason)
        logger.warning("%s: this mask pattern has no compact form (padding inside packed "
                       "documents, a sliding window, a KV-cache offset, ...); building the dense "
                       "(B, 1, %d, %d) boolean mask as sdpa does", NAME, q_length, kv_length)


def _packed_starts_of(mask_function, batch: int, length: int, device) -> torch.Tensor | None:
    """(B, L) document starts if `mask_function` is causal attention inside runs of tokens, else None.

    Read from the mask function's values, not its construction: transformers builds packed
    masks from closures whose nesting changes between releases (5.23 and 5.25 differ), but every
    release keeps the documented contract `mask_function(batch_idx, head_idx, q_idx, kv_idx) ->
    bool` on index tensors. O(L) probes per batch row:
    - row i continues the previous row's document where (i, i - 1) is allowed; this gives the
      document starts s(i);
    - then (i, i) and (i, s(i)) and the midpoint (i, (s(i) + i) // 2) must be allowed, and
      (i, i + 1) and (i, s(i) - 1) not.
    Causal, packed-causal and chunked masks pass; sliding windows shorter than a document, block
    overlays and future-looking masks fail and take the exact dense path. A mask with holes
    strictly inside [s(i), i] that the midpoint misses would pass: transformers builds none.
    """
    try:
        b = torch.arange(batch, device=device).repeat_interleave(length)  # (B*L,)
        i = torch.arange(length, device=device).repeat(batch)  # (B*L,)
        h = torch.zeros_like(i)

        def allowed(kv: torch.Tensor) -> torch.Tensor:  # (B*L,) key index per row -> (B, L)
            inside = (kv >= 0) & (kv < length)
            out = mask_function(b, h, i, kv.clamp(0, length - 1))
            return (torch.as_tensor(out, device=device).to(torch.bool).expand_as(i) & inside
                    ).reshape(batch, length)

        starts_here = ~allowed(i - 1)  # row 0 always starts (its key -1 is outside)
        idx = torch.arange(length, device=device)
        starts = torch.where(starts_here, idx, 0).cummax(dim=1).values  # (B, L)
        flat = starts.reshape(-1)
        must = allowed(i) & allowed(flat) & allowed((flat + i) // 2)
        must_not = allowed(i + 1) | allowed(flat - 1)
        if bool(must.all()) and not bool(must_not.any()):
            return starts
    except Exception:  # a mask function that does not take index tensors (vmap only)
        pass
    return None


# ---------------------------------------------------------------------------------------------
# Attention function


def flash_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask, scaling: float | None = None,
                            dropout: float = 0.0, **kwargs):
    """AttentionInterface entry. query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D) ->
    ((B, Lq, Hq, D), None)."""
    is_causal = kwargs.pop("is_causal", None)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    spec = _ranges_for(attention_mask, query, key, is_causal, kwargs)
    if spec is None:  # a mask we do not translate: sdpa takes the original
        _log_once("per-head or additive-bias attention mask")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    lo, hi, dense = spec
    reason = _why_not_kernel(query, dropout, kwargs)
    if reason is None:
        from alignloop.kernels.flash_attention import flash_attention_ranges

        return flash_attention_ranges(query, key, value, lo, hi, dense, scaling), None
    _log_once(reason)
    return sdpa_ranges(query, key, value, lo, hi, dense, scaling, dropout), None


def _why_not_kernel(query: torch.Tensor, dropout: float, kwargs) -> str | None:
    if dropout > 0:
        return "attention dropout is not in the kernel"
    if kwargs.get("softcap") is not None:
        return "softcap is not in the kernel"
    try:
        from alignloop.kernels import flash_attention as fa
    except ImportError:
        return "triton is not installed"
    if not fa.kernel_runs_on(query.device):
        return f"no GPU for the Triton kernel (tensors on {query.device.type}, TRITON_INTERPRET not set)"
    if fa.INTERPRETED and query.device.type != "cuda" and query.dtype == torch.bfloat16:
        return "bf16 is wrong in Triton's interpreter (triton-lang/triton#11584)"
    if query.dtype not in fa.SUPPORTED_DTYPES or query.shape[-1] > fa.MAX_HEAD_DIM:
        return f"dtype {query.dtype} / head_dim {query.shape[-1]} is not in the kernel"
    return None


def _ranges_for(mask, query: torch.Tensor, key: torch.Tensor, is_causal: bool, kwargs):
    """(lo, hi, dense) for the kernel, or None for a mask it cannot express."""
    from alignloop.kernels.ranges import document_starts, mask_bounds

    B, Lq, Lk, device = query.shape[0], query.shape[2], key.shape[2], query.device
    if isinstance(mask, RowRanges):
        return mask.lo, mask.hi, mask.dense
    if mask is None:
        rows = torch.arange(Lq, device=device)
        lo = torch.zeros((B, Lq), dtype=torch.int64, device=device)
        if not (is_causal and Lq > 1):  # as sdpa: one query token (decoding) sees every key
            return lo.int(), torch.full_like(lo, Lk).int(), None
        hi = (rows + 1).clamp(max=Lk).expand(B, Lq)  # upper-left, as sdpa's is_causal
        starts = _packed_starts(kwargs, B, Lq, Lk, device, document_starts)
        if starts is not None:
            lo = starts
        return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous(), None
    if mask.dim() == 2:  # (B, Lk) key mask, e.g. padding of the keys
        allowed = mask.to(torch.bool)[:, None, :].expand(B, Lq, Lk)
    elif mask.dim() in (3, 4):
        if mask.dim() == 4:
            if mask.shape[1] != 1:
                return None
            mask = mask[:, 0]
        mask = mask[..., :Lk]  # a mask sized for a longer (static) cache
        if mask.dtype == torch.bool:
            allowed = mask
        else:
            allowed = mask == 0
            if not bool((allowed | (mask <= MASKED_BELOW)).all()):
                return None
        if allowed.shape[-2] != Lq or allowed.shape[-1] != Lk:
            return None
        allowed = allowed.expand(B, Lq, Lk)
    else:
        return None
    first, last, contiguous = mask_bounds(allowed)
    dense = None if bool(contiguous.all()) else allowed
    return first.to(torch.int32).contiguous(), last.to(torch.int32).contiguous(), dense


def _packed_starts(kwargs, B, Lq, Lk, device, document_starts):
    """Document starts (B, L) from cu_seq_lens_q or position_ids, for self-attention without a mask."""
    if Lq != Lk:
        return None
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and B == 1 and int(cu[-1]) == Lq:
        idx = torch.arange(Lq, device=device)
        doc = torch.searchsorted(cu.to(device)[1:-1].contiguous(), idx, right=True)
        return cu.to(device)[doc][None].to(torch.int64)
    pos = kwargs.get("position_ids")
    if pos is None or pos.dim() != 2 or pos.shape[-1] != Lq or pos.shape[0] not in (1, B):
        return None
    return document_starts(pos.to(device).expand(B, Lq))


# ---------------------------------------------------------------------------------------------
# sdpa with the same masks (CPU, dropout, ...)


def sdpa_ranges(query, key, value, lo, hi, dense, scaling, dropout: float = 0.0) -> torch.Tensor:
    """torch sdpa on the mask that (lo, hi, dense) stand for -> (B, Lq, Hq, D).

    Rows that may see no key give zeros (sdpa would give NaN): they are let see every key and
    their output multiplied by 0, which also zeroes their gradients (Mllama does the same)."""
    B, Hq, Lq, _ = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    options = dict(dropout_p=dropout, scale=scaling, enable_gqa=Hq != Hkv)
    rows = torch.arange(Lq, device=query.device)
    if dense is None and not bool(lo.any()):
        if bool((hi == Lk).all()):
            out = torch.nn.functional.scaled_dot_product_attention(query, key, value, **options)
            return out.transpose(1, 2).contiguous()
        if Lq == Lk and bool((hi == rows + 1).all()):
            out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True,
                                                                   **options)
            return out.transpose(1, 2).contiguous()
    cols = torch.arange(Lk, device=query.device)
    allowed = (cols >= lo[..., None]) & (cols < hi[..., None])  # (B, Lq, Lk)
    if dense is not None:
        allowed = allowed & dense.to(torch.bool)
    seen = allowed.any(-1)  # (B, Lq)
    allowed = allowed | ~seen[..., None]
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed[:, None],
                                                           **options)
    out = out * seen[:, None, :, None].to(out.dtype)  # (B, Hq, Lq, D)
    return out.transpose(1, 2).contiguous()


def register() -> str:
    """Registers `alignloop_triton` with transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, flash_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    return NAME
