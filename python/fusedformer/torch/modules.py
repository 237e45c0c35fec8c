"""Drop-in torch modules on the fused attention op.

- `FusedAttention`: multi-head self/cross attention with GQA/MQA and a KV cache, for people
  writing their own models.
- `FusedMultiheadAttention`, `FusedTransformerEncoderLayer`, `FusedTransformerDecoderLayer`:
  subclasses of torch's modules that optimize() swaps in by class (same parameters, same
  state_dict keys); calls the fused op cannot serve exactly run torch's own code, counted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusedformer.ops_attention import MAX_HEAD_DIM
from fusedformer.torch.routing import AttentionStats, fused_sdpa, shape_reason, unsupported_reason


class FusedAttention(nn.Module):
    """Multi-head attention (GQA/MQA when ``num_kv_heads < num_heads``) on the fused SDPA op.

    forward(x [B, L, E], context=None, *, mask=None, past_kv=None, use_cache=False)
      - ``context`` [B, S, E]: keys/values come from it (cross attention); else from x;
      - ``mask``: bool (True = attend) or additive, broadcastable to [B, H, L, S_total];
      - ``past_kv``: (k, v) [B, Hkv, S_past, Dh] from an earlier call (decode with a cache);
      - returns out [B, L, E], or (out, (k, v)) with ``use_cache``.
    Causality (``causal=True``) is bottom-right aligned, so decode steps with a cache are right.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        bias: bool = False,
        causal: bool = False,
        window: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if embed_dim % num_heads:
            raise ValueError(f"[FusedAttention] embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if num_heads % num_kv_heads:
            raise ValueError(f"[FusedAttention] num_kv_heads {num_kv_heads} does not divide num_heads {num_heads}")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.causal, self.window = causal, window
        kv_dim = num_kv_heads * self.head_dim
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self.k_proj = nn.Linear(embed_dim, kv_dim, **kw)
        self.v_proj = nn.Linear(embed_dim, kv_dim, **kw)
        self.o_proj = nn.Linear(embed_dim, embed_dim, **kw)

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, heads, self.head_dim).transpose(1, 2)

    def forward(self, x, context=None, *, mask=None, past_kv=None, use_cache=False):
        src = x if context is None else context
        q = self._heads(self.q_proj(x), self.num_heads)
        k = self._heads(self.k_proj(src), self.num_kv_heads)
        v = self._heads(self.v_proj(src), self.num_kv_heads)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        if unsupported_reason(q, k, v, mask) is None and shape_reason(q, k, v) is None:
            out = fused_sdpa(q, k, v, mask, causal=self.causal, scale=None, window=self.window)
        else:  # training with gradients, a head dim past the kernel's: the same semantics in torch ops
            out = _attention_in_torch(q, k, v, mask, causal=self.causal, window=self.window)
        out = self.o_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        return (out, (k, v)) if use_cache else out


def _attention_in_torch(q, k, v, mask, *, causal, window):
    """The same semantics as the fused op in plain torch ops (differentiable)."""
    from fusedformer.reference import sdpa_mask

    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    allowed = torch.from_numpy(sdpa_mask(q.shape[2], k.shape[2], causal=causal, window=window)).to(q.device)
    bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
    if mask is not None:
        bias = bias + (mask.to(q.dtype) if mask.dtype != torch.bool else torch.zeros_like(bias).masked_fill(~mask, float("-inf")))
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias
    dead = torch.isneginf(s.amax(-1, keepdim=True))
    p = torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
    return p @ v


class FusedMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention whose forward runs the fused op (need_weights=False calls).

    Calls that ask for attention weights, use add_bias_kv/add_zero_attn, dropout while
    training, or anything `unsupported_reason` rejects run nn.MultiheadAttention's own code and
    are counted in ``self._fusedformer_stats``. Fully masked rows give 0 where torch gives NaN.
    """

    _fusedformer_stats: AttentionStats | None = None

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        stats = self._fusedformer_stats if self._fusedformer_stats is not None else AttentionStats()
        reason = unsupported_reason(query, key, value, attn_mask, key_padding_mask,
                                    dropout=self.dropout if self.training else 0.0)
        if reason is None:
            if need_weights:
                reason = "need_weights=True"
            elif self.bias_k is not None or self.add_zero_attn:
                reason = "add_bias_kv/add_zero_attn"
            elif query.dim() != 3:
                reason = "unbatched input"
            elif is_causal and attn_mask is None:
                reason = "is_causal without attn_mask (torch rejects it)"
            elif self.head_dim > MAX_HEAD_DIM:
                reason = f"head dim {self.head_dim} > {MAX_HEAD_DIM}"
            elif 0 in query.shape or 0 in key.shape:
                reason = "empty input"
        if reason is not None:
            stats.record(reason)
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, lq, e = query.shape
        lk = key.shape[1]
        h, hd = self.num_heads, self.head_dim
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        bq, bk, bv = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = F.linear(query, wq, bq).view(b, lq, h, hd).transpose(1, 2)
        k = F.linear(key, wk, bk).view(b, lk, h, hd).transpose(1, 2)
        v = F.linear(value, wv, bv).view(b, lk, h, hd).transpose(1, 2)
        mask = _mha_mask(attn_mask, key_padding_mask, b, h, lq, lk, q.dtype)
        stats.record(None)
        out = fused_sdpa(q, k, v, mask)
        out = F.linear(out.transpose(1, 2).reshape(b, lq, e), self.out_proj.weight, self.out_proj.bias)
        return (out if self.batch_first else out.transpose(0, 1)), None


def _mha_mask(attn_mask, key_padding_mask, b, h, lq, lk, dtype):
    """nn.MultiheadAttention's masks (bool True = masked out, or additive) as one fused-op mask."""
    parts = []
    if attn_mask is not None:
        parts.append(attn_mask.view(b, h, lq, lk) if attn_mask.dim() == 3 else attn_mask)
    if key_padding_mask is not None:
        parts.append(key_padding_mask.view(b, 1, 1, lk))
    if not parts:
        return None
    if all(p.dtype == torch.bool for p in parts):
        keep = ~parts[0]
        for p in parts[1:]:
            keep = keep & ~p
        return keep
    bias = torch.zeros((), dtype=dtype, device=parts[0].device)
    for p in parts:
        if p.dtype == torch.bool:
            p = torch.zeros(p.shape, dtype=dtype, device=p.device).masked_fill(p, float("-inf"))
        bias = bias + p.to(dtype)
    return bias


def _always(value):
    """A class attribute that reads ``value`` on every instance, whatever __init__ stored (a
    property: it wins over the instance's own entry, and assignments to it are ignored)."""
    return property(lambda self: value, lambda self, _: None)


# torch's encoder and encoder layer take a native fast path (nested tensors; one fused C++ layer)
# that bypasses self_attn.forward and reads linear1.weight / linear2.weight, which a
# QuantizedLinear has not. The subclasses turn it off for themselves through the conditions
# torch checks on the module (use_nested_tensor, activation_relu_or_gelu), not through the
# process-wide torch.backends.mha flag: toggling that around each call raced between threads
# (left off for every other model, or on while another call read it).
class _EncoderNoFastPath:
    use_nested_tensor = _always(False)


class _LayerNoFastPath:
    activation_relu_or_gelu = _always(0)


class FusedTransformerEncoder(_EncoderNoFastPath, nn.TransformerEncoder):
    """nn.TransformerEncoder without its nested-tensor fast path, so its layers' attention runs fused."""


class FusedTransformerEncoderLayer(_LayerNoFastPath, nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer whose self-attention runs the fused op (see FusedMultiheadAttention)."""


class FusedTransformerDecoderLayer(nn.TransformerDecoderLayer):
    """nn.TransformerDecoderLayer whose attentions run the fused op (see FusedMultiheadAttention)."""


class TransformerEncoderNoFastPath(_EncoderNoFastPath, nn.TransformerEncoder):
    """nn.TransformerEncoder (attention as torch runs it) without the fast path, for compressed linears."""


class TransformerEncoderLayerNoFastPath(_LayerNoFastPath, nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer (attention as torch runs it) without the fast path, for compressed linears."""


# torch class -> subclass optimize(attention=None) swaps in where it compresses the linears inside
NO_FASTPATH_SWAPS = {
    nn.TransformerEncoder: TransformerEncoderNoFastPath,
    nn.TransformerEncoderLayer: TransformerEncoderLayerNoFastPath,
}

# torch class -> fused subclass optimize() swaps in
SWAPS = {
    nn.MultiheadAttention: FusedMultiheadAttention,
    nn.TransformerEncoder: FusedTransformerEncoder,
    nn.TransformerEncoderLayer: FusedTransformerEncoderLayer,
    nn.TransformerDecoderLayer: FusedTransformerDecoderLayer,
}
