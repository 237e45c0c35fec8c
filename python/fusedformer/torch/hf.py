"""Hugging Face transformers integration: an attention function registered as "fusedformer".

What transformers (5.x) passes to an attention function, and how it maps onto ff.sdpa:
- query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D] (GQA un-repeated: the fused op shares K/V
  tiles across the group itself);
- attention_mask: None, or a 4-D mask built by transformers' sdpa mask function (bool, True =
  attend, or additive float), already holding causality, padding and sliding windows; with None
  the call is causal iff ``is_causal`` (or the module's ``is_causal``) and Lq > 1. When a static
  cache passes more keys than queries with no mask (an empty-cache prefill), transformers means
  top-left causality, so the keys beyond Lq are dropped, as its own sdpa function does; with
  fewer keys than queries and no mask, that top-left causality is passed as a bool mask;
- scaling: the softmax scale; dropout: applied only in training (then torch's function runs);
- sliding_window: already in the mask, so it is not applied twice;
- softcap, position_bias, attention sinks, paged caches: not supported. Calls the fused op
  cannot serve run the model's own attention instead, counted in the stats by reason:
  transformers' "sdpa" where the model ran it before optimize(), else (eager, flex, flash, and
  calls with softcapping or sinks) its modeling file's eager_attention_forward on the mask made
  eager's.
Returns (output [B, Lq, Hq, D] contiguous, None), as transformers expects.
"""

from __future__ import annotations

import inspect
import sys
import warnings

import torch

from fusedformer.torch.routing import AttentionStats, fused_sdpa, shape_reason, unsupported_reason

NAME = "fusedformer"
_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux", "sinks", "cache")
_registered = False


def cache_argument(model) -> str | None:
    """The name of the forward argument of a Hugging Face model that takes its K/V cache:
    ``cache`` from transformers 5.24 on (``past_key_values`` is still accepted there, deprecated),
    ``past_key_values`` before; None when the model takes neither."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def stats_of(module) -> AttentionStats:
    """The stats object optimize() attached to this attention module (a shared default otherwise)."""
    stats = getattr(module, "_fusedformer_stats", None)
    return stats if stats is not None else DEFAULT_STATS


DEFAULT_STATS = AttentionStats()


def fusedformer_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
):
    stats = stats_of(module)
    reason = unsupported_reason(query, key, value, attention_mask, dropout=dropout if module.training else 0.0)
    if reason is None:
        reason = shape_reason(query, key, value)
    if reason is None:
        extra = [k for k in _UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
        if extra:
            reason = f"unsupported argument {extra[0]}"
        elif kwargs.get("output_attentions"):
            reason = "output_attentions"
    if reason is not None:
        stats.record(reason)
        fallback, eager = _fallback(module, kwargs)
        if eager:  # (the mask transformers built for us is sdpa's: bool, or None for plain causal)
            attention_mask = _eager_mask(query, key, attention_mask, is_causal, module)
        return fallback(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )

    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # (bool: under torch.jit.trace, as ff.coreml.export runs, sizes are 0-d tensors and causal
    # would be one; the decision baked at trace time is right for any later Lq, since bottom-right
    # causality with one query row sees every key. Not int(q_len): under torch.compile with
    # dynamic shapes that would specialize the graph to one length)
    causal = bool(is_causal) and attention_mask is None and bool(q_len > 1)
    if causal and kv_len > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    elif causal and kv_len < q_len:  # (top-left too: query i sees keys j <= i, rows past Lk see all)
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()
        causal = False
    stats.record(None)
    out = fused_sdpa(query, key, value, attention_mask, causal=causal, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


_EAGER_ONLY_KWARGS = ("softcap", "s_aux", "sinks")  # what transformers' sdpa function cannot do


def _fallback(module, kwargs):
    """(function, whether it is eager) that a call the fused op cannot serve runs. The mask it
    gets is sdpa's (the "fusedformer" mask builder is transformers' sdpa_mask), which only
    transformers' sdpa function takes as it is: a model that ran "sdpa" before optimize()
    (``module._fusedformer_fallback``) falls back to it, unless the call needs what only eager
    computes (softcap, sinks); any other (eager, flex_attention, flash...) runs its modeling
    file's eager_attention_forward on the mask made eager's (flex took sdpa's mask as no mask or
    as 0/1 scores: wrong logits)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = getattr(module, "_fusedformer_fallback", "sdpa")
    if impl.startswith("paged|") and impl in ALL_ATTENTION_FUNCTIONS:  # (only it reads the paged cache)
        return ALL_ATTENTION_FUNCTIONS[impl], False
    if impl != "sdpa" or any(kwargs.get(k) is not None for k in _EAGER_ONLY_KWARGS):
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is not None:
            return eager, True
    return ALL_ATTENTION_FUNCTIONS["sdpa"], False


def _eager_mask(query, key, attention_mask, is_causal, module):
    """sdpa's mask as eager attention takes it: additive in the query's dtype (finfo.min where a
    bool mask drops a key), and causality made explicit where sdpa's mask left it to is_causal
    (None: top-left, as torch's is_causal)."""
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            return attention_mask
        low = torch.finfo(query.dtype).min
        return torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(~attention_mask, low)
    lq, lk = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal or lq == 1:
        return None
    keep = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril()
    return torch.zeros(1, 1, lq, lk, dtype=query.dtype, device=query.device).masked_fill(~keep, torch.finfo(query.dtype).min)


def register() -> None:
    """Registers the attention function (and transformers' sdpa mask builder) as "fusedformer"."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, fusedformer_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


def is_hf_model(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def use_fused_attention(model, stats: AttentionStats) -> list[str]:
    """Sets "fusedformer" as the attention implementation of an HF model; returns the names of
    the attention modules that will report to ``stats`` (the innermost: BERT's BertSelfAttention,
    not the BertAttention around it). A model whose attention does not go through transformers'
    AttentionInterface (GPT-Neo, Bloom...) keeps its attention, with a warning, and none is named."""
    register()
    previous = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if previous == NAME:  # (a second optimize(): the first one's fallback stays)
        previous = getattr(model, "_fusedformer_fallback", "sdpa")
    model.set_attn_implementation(NAME)
    if getattr(model.config, "_attn_implementation", None) != NAME:
        warnings.warn(f"[optimize] {type(model).__name__} does not route attention through transformers' "
                      "AttentionInterface: its attention stays as it is, not fused", stacklevel=3)
        return []
    model._fusedformer_fallback = previous
    found = [(name, module) for name, module in model.named_modules()
             if hasattr(module, "is_causal") or type(module).__name__.endswith("Attention")]
    for _, module in found:
        module._fusedformer_stats = stats
        module._fusedformer_fallback = previous
    return [name for name, _ in found if not any(other.startswith(name + ".") for other, _ in found)]
