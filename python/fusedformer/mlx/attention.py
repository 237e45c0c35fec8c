"""ff.sdpa for MLX arrays, with fusedformer's semantics on top of MLX's attention.

Three paths, chosen per call:

* **fused** (``return_lse=False``): ``mx.fast.scaled_dot_product_attention``. On Apple GPUs this
  is MLX's fused Metal kernel (vector kernel for decode, tiled kernel for prefill); on the CPU
  backend (Linux, ``mlx[cpu]``) MLX itself runs an op composition that materialises the scores.
  Causal without window or user mask goes in as MLX's ``"causal"`` string (lower-right aligned,
  like ours); every other case goes in as one combined bool or additive mask array.
* **composed** (``return_lse=True``): plain MLX ops with float32 scores, because
  ``mx.fast.scaled_dot_product_attention`` does not return the log-sum-exp. Always unfused.
* **native** (opt-in, MLX's CPU device, float32/float16; see fusedformer.mlx.native):
  fusedformer's own flash kernel on the arrays' memory. Far faster than MLX's CPU backend, for
  inference only.

On every path rows whose keys are all masked give 0 (and lse ``-inf``): MLX alone gives the mean
of ``v`` (bool masks) or NaN (additive ``-inf``) there, so we detect those rows from the mask and
zero them.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from fusedformer import _C
from fusedformer._frameworks import common_framework
from fusedformer.mlx.native import run_native, use_native

FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
# MLX's own op, captured at import: ff.mlx.use_fused_sdpa() routes the public name to sdpa_mlx.
MX_FAST_SDPA = mx.fast.scaled_dot_product_attention


def sdpa_mlx(q, k, v, mask=None, causal=False, scale=None, window=None, return_lse=False):
    """Scaled dot-product attention on MLX arrays (see ff.sdpa for the semantics).

    q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], Hq % Hkv == 0 (GQA is passed to MLX
    natively, k/v are never repeated). ``mask``: an MLX bool (True = keep) or additive array
    broadcastable to [B, Hq, Lq, Lk]. Causal is bottom-right aligned; ``window=w`` also requires
    j > i + Lk - Lq - w. Returns out [B, Hq, Lq, Dv] in q's dtype, and with ``return_lse`` also
    lse [B, Hq, Lq] in float32. The result is lazy, like every MLX op.
    """
    _check_inputs(q, k, v, mask)
    lq, lk = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if use_native(q) and v.shape[-1] == q.shape[-1] and q.shape[-1] <= _C.sdpa_max_head_dim:
        return _sdpa_native(q, k, v, mask, causal, scale, window, return_lse)
    if return_lse:
        attn_mask, live = attention_mask(mask, lq, lk, causal=causal, window=window, dtype=mx.float32)
        out, lse = sdpa_composed(q, k, v, attn_mask, scale)
        if live is not None:  # (their mask rows are 0s now: attention_mask)
            lse = mx.where(live[..., 0], lse, -mx.inf)
        return _zero_dead_rows(out, live), lse
    attn_mask, live = attention_mask(mask, lq, lk, causal=causal, window=window, dtype=q.dtype)
    out = MX_FAST_SDPA(q, k, v, scale=scale, mask=attn_mask)
    return _zero_dead_rows(out, live)


def _sdpa_native(q, k, v, mask, causal, scale, window, return_lse):
    """fusedformer's native kernel on the MLX arrays' memory (evaluates them now)."""
    from fusedformer.ops_attention import native_sdpa

    window = min(window, 2**63 - 1) if window else 0  # (wider than any call's keys)

    def compute(q, k, v, mask=None):  # zero-copy views (strides kept)
        return native_sdpa(q, k, v, mask=mask, causal=causal, scale=scale, window=window, return_lse=return_lse)

    arrays = (q, k, v)
    if mask is not None:  # (numpy has no bfloat16: such a mask is widened, exactly)
        arrays += (mask.astype(mx.float32) if mask.dtype == mx.bfloat16 else mask,)
    return run_native("sdpa", compute, *arrays)


def sdpa_composed(q, k, v, mask, scale):
    """Attention as plain MLX ops with float32 scores: (out in q's dtype, lse float32 [B,Hq,Lq]).

    ``mask`` is None, ``"causal"`` or an array from :func:`attention_mask`. Fully masked rows give
    out 0 and lse -inf here without any fix-up (the exponent is taken against a finite shift).
    """
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    # Query heads of one kv head side by side: [B, Hkv, group, Lq, D] against [B, Hkv, 1, Lk, D].
    qg = (q.astype(mx.float32) * scale).reshape(b, hkv, group, lq, d)
    kg = k.astype(mx.float32)[:, :, None]
    vg = v.astype(mx.float32)[:, :, None]
    scores = (qg @ kg.swapaxes(-1, -2)).reshape(b, hq, lq, lk)
    if isinstance(mask, str):
        mask = position_mask(lq, lk, causal=True)
    if mask is not None:
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, -mx.inf)
        else:
            scores = scores + mask.astype(mx.float32)
    # Shifted by the row's max and divided by the sum after P V, not shifted by the lse: where
    # the scores sit near float32's lowest (Hugging Face's finfo.min masks), lse - max is lost
    # to rounding and exp(scores - lse) would not sum to 1.
    top = mx.max(scores, axis=-1, keepdims=True)
    shift = mx.where(mx.isfinite(top), top, 0.0)
    probs = mx.exp(scores - shift)
    total = probs.sum(axis=-1, keepdims=True)
    out = (probs.reshape(b, hkv, group, lq, lk) @ vg).reshape(b, hq, lq, dv) / mx.where(total > 0, total, 1.0)
    lse = (shift + mx.log(total))[..., 0]
    lse = mx.where(top[..., 0] == mx.inf, mx.nan, lse)  # (a +inf score: NaN, as its row; log(inf) gave +inf)
    return out.astype(q.dtype), lse


def position_mask(lq: int, lk: int, *, causal: bool = False, window: int | None = None):
    """Bool [lq, lk] of the keys each query may see under causal/window (reference.sdpa_mask)."""
    i = mx.arange(lq)[:, None] + (lk - lq)
    j = mx.arange(lk)[None, :]
    allowed = mx.ones((lq, lk), dtype=mx.bool_)
    if causal:
        allowed = allowed & (j <= i)
    if window is not None:  # (a window of lk keys already limits nothing; wider ones overflow int32)
        allowed = allowed & (j > i - min(window, lk))
    return allowed


def attention_mask(mask, lq: int, lk: int, *, causal: bool, window: int | None, dtype):
    """The one mask MLX gets, and which rows have any key left.

    Returns ``(attn_mask, live)``: attn_mask is None, ``"causal"``, a bool array, or an additive
    array of ``dtype`` (MLX wants additive masks in the output's type); live is None when no row
    can be fully masked, else a bool array broadcastable to [B, Hq, Lq, 1].
    """
    if mask is not None and mask.ndim == 0:  # (a scalar broadcasts too; the rows' any() wants an axis)
        mask = mask.reshape(1, 1)
    if mask is None and window is None:
        if not causal:
            return None, None
        # MLX's "causal" is lower-right aligned like ours; queries before the first key see nothing.
        live = (mx.arange(lq) >= lq - lk)[:, None] if lq > lk else None
        return "causal", live
    positions = position_mask(lq, lk, causal=causal, window=window) if (causal or window is not None) else None
    if mask is None:
        combined = positions
    elif mask.dtype == mx.bool_:
        combined = mask if positions is None else mask & positions
    else:
        combined = _additive_as(mask, dtype)
        if positions is not None:
            combined = mx.where(positions, combined, -mx.inf)
        live = mx.any(combined != -mx.inf, axis=-1, keepdims=True)  # (NaN keeps its row: NaN out)
        # A row with every key at -inf gets 0s instead: its output is zeroed anyway
        # (_zero_dead_rows), and the softmax of -infs is NaN, which MLX's backward multiplied
        # into every gradient (q, k and v all NaN) though the forward was right.
        return mx.where(live, combined, mx.array(0, dtype=combined.dtype)), live
    return combined, mx.any(combined, axis=-1, keepdims=True)


def _additive_as(mask, dtype):
    """An additive mask in ``dtype``; finite values are clamped to its range (-inf stays -inf), so
    a large finite penalty such as -1e9 does not turn into -inf in float16, nor -1e300 (float64)
    in float32. The clamp runs in float32 or wider, where every target's bounds are exact (a
    bfloat16 mask would round float16's -65504 to -65536, -inf once cast)."""
    if mask.dtype == dtype:
        return mask
    if mask.dtype != mx.float64:
        mask = mask.astype(mx.float32)  # (exact from float16 / bfloat16)
    info = mx.finfo(dtype)
    mask = mx.where(mx.isinf(mask), mask, mx.clip(mask, info.min, info.max))
    return mask.astype(dtype)


def _zero_dead_rows(out, live):
    return out if live is None else mx.where(live, out, 0)


def _check_inputs(q, k, v, mask):
    """The MLX-specific checks (shapes are checked framework-neutrally by ops_attention)."""
    framework = common_framework("sdpa", q=q, k=k, v=v, mask=mask)
    if framework != "mlx":
        raise TypeError(f"[sdpa] sdpa_mlx takes MLX arrays, got {framework} arrays")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            kind = "[B, Hq, Lq, D]" if name == "q" else "[B, Hkv, Lk, D]"
            raise ValueError(f"[sdpa] {name} must be 4-d {kind}, got shape {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"[sdpa] {name} has dtype {x.dtype}; MLX attention takes float32, float16 or bfloat16")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"[sdpa] {name} has dtype {x.dtype} but q has {q.dtype}; pass one dtype")
