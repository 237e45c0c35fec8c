"""`use_fused_sdpa()`: every torch.nn.functional.scaled_dot_product_attention call inside the
block runs on the fused op, with torch's semantics kept exactly (is_causal is top-left aligned
in torch, so Lq != Lk gets an explicit mask); calls it cannot serve run torch's op, counted."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fusedformer.torch.routing import AttentionStats, fused_sdpa, shape_reason, unsupported_reason


def sdpa_like_torch(
    stats: AttentionStats,
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
):
    """F.scaled_dot_product_attention's contract, served by the fused op where it can be."""

    def torch_op(reason):
        stats.record(reason)
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )

    reason = unsupported_reason(query, key, value, attn_mask, dropout=dropout_p)
    if reason is None and not (query.dim() == key.dim() == value.dim() and query.dim() in (3, 4)):
        reason = f"rank {query.dim()} inputs"
    if reason is None:
        reason = shape_reason(query, key, value)
    if reason is None and is_causal and attn_mask is not None:
        reason = "attn_mask with is_causal (torch rejects it)"
    if reason is None and query.dim() == 4 and query.shape[1] != key.shape[1] and not enable_gqa:
        reason = "head counts differ without enable_gqa (torch rejects it)"
    if reason is None and attn_mask is not None and not (attn_mask.dtype == torch.bool or attn_mask.dtype == query.dtype):
        reason = f"attn_mask dtype {attn_mask.dtype}"
    if reason is not None:
        return torch_op(reason)

    squeeze = query.dim() == 3
    q, k, v = (t.unsqueeze(1) if squeeze else t for t in (query, key, value))
    lq, lk = q.shape[-2], k.shape[-2]
    causal, mask = False, attn_mask
    if is_causal:
        if lq == lk:
            causal = True
        else:  # torch aligns is_causal top-left: query i sees keys j <= i
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
    if squeeze and mask is not None and mask.dim() == 3:
        mask = mask.unsqueeze(1)
    stats.record(None)
    out = fused_sdpa(q, k, v, mask, causal=causal, scale=scale)
    return out.squeeze(1) if squeeze else out


class FusedSDPAMode(TorchFunctionMode):
    def __init__(self, stats: AttentionStats):
        super().__init__()
        self.stats = stats

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return sdpa_like_torch(self.stats, *args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def use_fused_sdpa(stats: AttentionStats | None = None):
    """Routes F.scaled_dot_product_attention to the fused op inside the block.

        with ff.torch.use_fused_sdpa() as stats:
            model(x)
        print(stats)   # fused calls and fallbacks by reason
    """
    stats = stats if stats is not None else AttentionStats()
    with FusedSDPAMode(stats):
        yield stats
