"""The float64 oracle itself, checked against torch's SDPA where their semantics agree, and
against a direct per-row loop where they do not (bottom-right causal, window, dead rows)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fusedformer import reference
from tests.conftest import require


def torch_sdpa(q, k, v, **kw):
    torch = require("torch")
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    mask = kw.pop("attn_mask", None)
    out = torch.nn.functional.scaled_dot_product_attention(
        t(q), t(k), t(v), attn_mask=None if mask is None else t(mask), **kw
    )
    return out.numpy()


def loop_sdpa(q, k, v, allowed, scale):
    """Row by row, the textbook definition, for the cases torch cannot express."""
    b, hq, lq, d = q.shape
    group = hq // k.shape[1]
    out = np.zeros(q.shape[:3] + (v.shape[-1],))
    lse = np.full(q.shape[:3], -np.inf)
    for bi in range(b):
        for h in range(hq):
            for i in range(lq):
                keys = [j for j in range(k.shape[2]) if allowed[i, j]]
                if not keys:
                    continue
                s = np.array([q[bi, h, i] @ k[bi, h // group, j] * scale for j in keys])
                m = s.max()
                p = np.exp(s - m)
                out[bi, h, i] = p @ v[bi, h // group, keys] / p.sum()
                lse[bi, h, i] = m + math.log(p.sum())
    return out, lse


@pytest.fixture
def qkv(rng):
    def make(b=2, hq=4, hkv=2, lq=5, lk=7, d=8):
        return (
            rng.standard_normal((b, hq, lq, d)),
            rng.standard_normal((b, hkv, lk, d)),
            rng.standard_normal((b, hkv, lk, d)),
        )

    return make


@pytest.mark.torch
def test_plain_matches_torch(qkv):
    q, k, v = qkv(hkv=4)
    np.testing.assert_allclose(reference.sdpa(q, k, v), torch_sdpa(q, k, v), rtol=1e-10, atol=1e-12)


@pytest.mark.torch
def test_gqa_scale_matches_torch(qkv):
    q, k, v = qkv(hq=6, hkv=2)
    np.testing.assert_allclose(
        reference.sdpa(q, k, v, scale=0.3), torch_sdpa(q, k, v, scale=0.3, enable_gqa=True), rtol=1e-10, atol=1e-12
    )


@pytest.mark.torch
def test_causal_square_matches_torch_is_causal(qkv):
    q, k, v = qkv(hkv=4, lq=9, lk=9)
    np.testing.assert_allclose(
        reference.sdpa(q, k, v, causal=True), torch_sdpa(q, k, v, is_causal=True), rtol=1e-10, atol=1e-12
    )


@pytest.mark.torch
@pytest.mark.parametrize("shape", [(2, 4, 5, 7), (1, 1, 5, 7), (2, 1, 1, 7), (5, 7)])
def test_bool_and_additive_masks_match_torch(qkv, rng, shape):
    q, k, v = qkv(hkv=4)
    keep = rng.random(shape) > 0.3
    np.testing.assert_allclose(
        reference.sdpa(q, k, v, mask=keep), torch_sdpa(q, k, v, attn_mask=keep), rtol=1e-10, atol=1e-12
    )
    bias = rng.standard_normal(shape)
    np.testing.assert_allclose(
        reference.sdpa(q, k, v, mask=bias), torch_sdpa(q, k, v, attn_mask=bias), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("lq, lk", [(1, 9), (4, 9), (9, 9), (9, 4)])
@pytest.mark.parametrize("window", [None, 1, 3])
def test_bottom_right_causal_and_window_match_loop(qkv, lq, lk, window):
    q, k, v = qkv(lq=lq, lk=lk)
    allowed = np.array([[j <= i + lk - lq and (window is None or j > i + lk - lq - window)
                         for j in range(lk)] for i in range(lq)])
    scale = 1 / math.sqrt(q.shape[-1])
    out, lse = reference.sdpa(q, k, v, causal=True, window=window, return_lse=True)
    want_out, want_lse = loop_sdpa(q, k, v, allowed, scale)
    np.testing.assert_allclose(out, want_out, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-10, atol=1e-12)


def test_window_without_causal_bounds_only_the_past(qkv):
    q, k, v = qkv(lq=3, lk=6)
    allowed = reference.sdpa_mask(3, 6, window=2)
    # query i sits at key position i + 3: it sees keys j > i + 1 (and every later key)
    assert allowed.tolist() == [[j > i + 1 for j in range(6)] for i in range(3)]


def test_fully_masked_rows_are_zero_with_minus_inf_lse(qkv):
    q, k, v = qkv()
    keep = np.ones((5, 7), dtype=bool)
    keep[2] = False
    bias = np.zeros((5, 7))
    bias[3] = -np.inf
    out, lse = reference.sdpa(q, k, v, mask=keep, return_lse=True)
    assert np.all(out[:, :, 2] == 0) and np.all(lse[:, :, 2] == -np.inf)
    assert not np.isnan(out).any()
    out, lse = reference.sdpa(q, k, v, mask=bias, return_lse=True)
    assert np.all(out[:, :, 3] == 0) and np.all(np.isneginf(lse[:, :, 3]))
    # causal with more queries than keys: the first rows see nothing
    out, lse = reference.sdpa(q, k[:, :, :3], v[:, :, :3], causal=True, return_lse=True)
    assert np.all(out[:, :, :2] == 0) and np.all(np.isneginf(lse[:, :, :2]))
    assert np.all(np.isfinite(lse[:, :, 2:]))


@pytest.mark.torch
def test_lse_matches_torch_logsumexp(qkv):
    torch = require("torch")
    q, k, v = qkv(hkv=4)
    _, lse = reference.sdpa(q, k, v, return_lse=True)
    s = torch.from_numpy(q) @ torch.from_numpy(k).transpose(-1, -2) / math.sqrt(q.shape[-1])
    np.testing.assert_allclose(lse, torch.logsumexp(s, -1).numpy(), rtol=1e-10)


def test_inputs_unmodified(qkv):
    q, k, v = qkv()
    copies = [a.copy() for a in (q, k, v)]
    reference.sdpa(q, k, v, causal=True, window=2, mask=np.ones((5, 7)))
    for a, c in zip((q, k, v), copies):
        np.testing.assert_array_equal(a, c)
