"""Plain numpy float64 oracles for every fusedformer op.

These are the definitions the fast kernels are tested against (and the fallbacks some paths
use). They favour clarity over speed: the full score matrix is materialised here, on purpose.
"""

from __future__ import annotations

import numpy as np


def sdpa_mask(lq: int, lk: int, *, causal: bool = False, window: int | None = None) -> np.ndarray:
    """Bool [lq, lk]: True where query i may attend key j under causal/window.

    Causal is bottom-right aligned: query i sees keys j <= i + lk - lq (equal to torch's
    ``is_causal`` when lq == lk, and right for a KV-cache decode where the queries are the last
    lq positions). ``window=w`` also requires j > i + lk - lq - w: with ``causal`` each query
    sees the w most recent keys up to its own position (a sliding window); without ``causal`` it
    bounds only how far back a query looks.
    """
    i = np.arange(lq)[:, None] + (lk - lq)
    j = np.arange(lk)[None, :]
    allowed = np.ones((lq, lk), dtype=bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= j > i - window
    return allowed


def sdpa(q, k, v, *, mask=None, causal=False, scale=None, window=None, return_lse=False):
    """Scaled dot-product attention in float64.

    q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] with Hq % Hkv == 0 (query head h
    uses kv head h // (Hq // Hkv)). ``mask`` broadcasts to [B, Hq, Lq, Lk]: bool (True = keep)
    or additive float. A key is masked by causal/window, a False in a bool mask, or a score of
    -inf (an additive -inf); fully masked rows give 0 and lse = -inf, whatever v holds. A NaN
    or +inf among a row's kept scores (from a NaN or inf in its inputs) makes that row NaN, as
    IEEE arithmetic has it, and so does a NaN or inf in the v of a key the row keeps (in those
    columns: p * inf, 0 * inf); what a row does not keep it does not read (a KV cache's unused
    tail may hold anything). Finite float32 inputs never overflow float64 here. Returns float64
    arrays: out [B, Hq, Lq, Dv] (and lse [B, Hq, Lq] if ``return_lse``).
    """
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    scale = 1.0 / np.sqrt(d) if scale is None else float(scale)
    s = np.einsum("bhid,bhjd->bhij", q, k) * scale
    allowed = np.broadcast_to(sdpa_mask(lq, lk, causal=causal, window=window), s.shape)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype == np.bool_:
            allowed = allowed & np.broadcast_to(mask, s.shape)
        else:
            add = np.broadcast_to(mask.astype(np.float64), s.shape)
            allowed = allowed & (add != -np.inf)  # (dropped whatever its score: NaN + -inf is NaN)
            s = s + add
    allowed = allowed & (s != -np.inf)
    s = np.where(allowed, s, -np.inf)
    dead = ~allowed.any(axis=-1, keepdims=True)  # every key masked
    m = s.max(axis=-1, keepdims=True)  # NaN where a kept score is NaN
    with np.errstate(invalid="ignore"):  # inf - inf: a +inf score makes its row NaN
        p = np.where(allowed, np.exp(s - np.where(dead, 0.0, m)), 0.0)
    denom = p.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):  # (a NaN row's p)
        p = p / np.where(dead, 1.0, denom)
    finite = np.isfinite(v)
    out = np.einsum("bhij,bhjd->bhid", p, np.where(finite, v, 0.0))
    with np.errstate(invalid="ignore"):  # the non-finite v of kept keys, as IEEE multiplies and adds them
        for bb, hh, j in zip(*np.nonzero(~finite.all(axis=-1))):
            rows = allowed[bb, hh, :, j]
            out[bb, hh, rows] += p[bb, hh, rows, j][:, None] * np.where(finite[bb, hh, j], 0.0, v[bb, hh, j])
    out = np.where(dead, 0.0, out)
    if not return_lse:
        return out
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = np.where(dead, -np.inf, m + np.log(np.where(dead, 1.0, denom)))[..., 0]
    return out, lse


def matmul_t(x, w):
    """x @ w.T in float64: the oracle of every quantized matmul, given the dequantized weight."""
    return np.asarray(x, dtype=np.float64) @ np.asarray(w, dtype=np.float64).T
