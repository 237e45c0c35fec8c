"""ff.sdpa on MLX arrays (fusedformer.mlx.attention) against the float64 numpy oracle."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.conftest import require

import fusedformer as ff
from fusedformer import reference

pytestmark = pytest.mark.mlx
mx = require("mlx")
from fusedformer.mlx.attention import attention_mask, sdpa_composed, sdpa_mlx  # noqa: E402

DTYPES = {"fp32": mx.float32, "fp16": mx.float16, "bf16": mx.bfloat16}
# (atol, rtol) on out, outputs of order 1; lse is compared in float32 (scores are float32).
# Measured worst cases on mlx[cpu]: fp32 7e-7, fp16 1.1e-3, bf16 5.4e-3 (out); lse 5e-7 for all.
TOL = {"fp32": (1e-5, 1e-5), "fp16": (3e-3, 3e-3), "bf16": (2e-2, 2e-2)}
LSE_TOL = {"fp32": 1e-5, "fp16": 1e-5, "bf16": 1e-5}


def make_qkv(rng, b, hq, hkv, lq, lk, d, dv=None, dtype="fp32"):
    """Random MLX q, k, v of ``dtype`` and their float64 values (what the oracle sees)."""
    shapes = [(b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, dv or d)]
    arrays = [mx.array(rng.standard_normal(s).astype(np.float32)).astype(DTYPES[dtype]) for s in shapes]
    return arrays, [np.array(a.astype(mx.float32)).astype(np.float64) for a in arrays]


def check(got, want, dtype, what="out"):
    got = np.array(got.astype(mx.float32))
    assert got.shape == want.shape, what
    assert not np.isnan(got).any(), f"{what} has NaN"
    atol, rtol = TOL[dtype] if what == "out" else (LSE_TOL[dtype], LSE_TOL[dtype])
    finite = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), finite, err_msg=f"{what}: -inf pattern")
    np.testing.assert_allclose(got[finite], want[finite], atol=atol, rtol=rtol, err_msg=what)


def run_both(rng, shape, *, dtype="fp32", mask_np=None, op=ff.sdpa, **options):
    """Checks out (fused path) and out + lse (composed path) against the oracle, through ff.sdpa
    (which validates and dispatches MLX arrays to sdpa_mlx) unless ``op`` says otherwise."""
    (q, k, v), (q64, k64, v64) = make_qkv(rng, *shape, dtype=dtype)
    mask = None if mask_np is None else mx.array(mask_np)
    want, want_lse = reference.sdpa(q64, k64, v64, mask=mask_np, return_lse=True, **options)
    out = op(q, k, v, mask=mask, **options)
    assert isinstance(out, mx.array) and out.dtype == DTYPES[dtype]
    check(out, want, dtype)
    out, lse = op(q, k, v, mask=mask, return_lse=True, **options)
    assert lse.dtype == mx.float32
    check(out, want, dtype)
    check(lse, want_lse, dtype, "lse")


# (B, Hq, Hkv, Lq, Lk, D): MHA, GQA, MQA, decode, Lq > Lk, odd sizes straddling vector widths
SHAPES = [
    (1, 2, 2, 33, 33, 64),
    (2, 4, 2, 31, 129, 32),
    (1, 6, 1, 1, 127, 40),
    (1, 4, 4, 17, 5, 16),
    (1, 8, 2, 3, 64, 128),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_causal_and_plain(rng, shape, causal):
    run_both(rng, shape, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("window", [1, 4, 100])
@pytest.mark.parametrize("lq,lk", [(33, 33), (7, 40), (40, 7)])
def test_window(rng, lq, lk, window, causal):
    run_both(rng, (1, 4, 2, lq, lk, 32), causal=causal, window=window)


# mask shapes broadcast to [B=2, Hq=4, Lq=9, Lk=21]
MASK_SHAPES = [(9, 21), (21,), (2, 1, 9, 21), (1, 4, 1, 21), (2, 4, 9, 21), ()]  # (0-d: crashed)


@pytest.mark.parametrize("mask_shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 5)], ids=["plain", "causal", "window"])
def test_masks(rng, mask_shape, kind, causal, window):
    if kind == "bool":
        mask = np.asarray(rng.random(mask_shape) < 0.7)
    else:
        mask = np.asarray(rng.standard_normal(mask_shape) * 2, np.float32)
        mask[rng.random(mask_shape) < 0.2] = -np.inf
    run_both(rng, (2, 4, 2, 9, 21, 16), mask_np=mask, causal=causal, window=window)


@pytest.mark.parametrize("kind", ["bool", "additive", "causal", "window"])
def test_fully_masked_rows_give_zero(rng, kind):
    b, hq, lq, lk = 1, 4, 6, 10
    options, mask = {}, None
    if kind == "bool":
        mask = rng.random((b, hq, lq, lk)) < 0.5
        mask[0, 1, 2] = False
        mask[0, :, 4] = False
    elif kind == "additive":
        mask = rng.standard_normal((lq, lk)).astype(np.float32)
        mask[3] = -np.inf
    elif kind == "causal":
        options = dict(causal=True)
        lq, lk = 12, 5  # the first 7 queries come before every key
    else:
        options = dict(causal=True, window=2)
        lq, lk = 12, 5
    (q, k, v), (q64, k64, v64) = make_qkv(rng, b, hq, 2, lq, lk, 16)
    want, want_lse = reference.sdpa(q64, k64, v64, mask=mask, return_lse=True, **options)
    assert np.isneginf(want_lse).any()
    mx_mask = None if mask is None else mx.array(mask)
    out = sdpa_mlx(q, k, v, mask=mx_mask, **options)
    check(out, want, "fp32")
    dead = np.isneginf(want_lse)
    assert (np.array(out)[dead] == 0).all()
    out, lse = sdpa_mlx(q, k, v, mask=mx_mask, return_lse=True, **options)
    check(out, want, "fp32")
    check(lse, want_lse, "fp32", "lse")
    # gradients stay finite: an additive row of -infs reached MLX's op, whose backward
    # multiplied the NaN softmax of that row into every gradient of q, k and v
    for lse_too in (False, True):
        def loss(q, k, v):
            res = sdpa_mlx(q, k, v, mask=mx_mask, return_lse=lse_too, **options)
            return (res[0] if lse_too else res).sum()

        for g in mx.grad(loss, argnums=(0, 1, 2))(q, k, v):
            assert not np.isnan(np.array(g)).any()


@pytest.mark.parametrize("native", [False, True], ids=["mlx", "native"])
def test_float32_lowest_in_an_additive_mask_keeps_the_keys(rng, request, native):
    """Hugging Face's mask value, float32's lowest: a row of it alone attends uniformly (out the
    mean of v, not their sum; lse float32's lowest), beside live scores its keys weigh 0."""
    if native:
        request.getfixturevalue("native_cpu_kernel")
    mask = rng.standard_normal((7, 21)).astype(np.float32)
    mask[0] = np.finfo(np.float32).min
    mask[1, :10] = np.finfo(np.float32).min
    run_both(rng, (1, 4, 2, 7, 21, 32), mask_np=mask)


@pytest.mark.parametrize("native", [False, True], ids=["mlx", "native"])
def test_mask_dtypes_past_the_inputs_range_keep_their_keys(rng, request, native):
    """Finite additive values past the inputs' range stay finite (a kept key), whatever the
    mask's own dtype: bfloat16 -1e9 / +1e9 for float16 inputs, float64 -1e300 / +1e300 for
    float32; a NaN row stays NaN."""
    if native:
        request.getfixturevalue("native_cpu_kernel")
    for dtype, mdtype, big in (("fp16", mx.bfloat16, 1e9), ("fp32", mx.float64, 1e300)):
        (q, k, v), (q64, k64, v64) = make_qkv(rng, 1, 2, 1, 4, 9, 16, dtype=dtype)
        mask = rng.standard_normal((4, 9))
        mask[0] = -big  # a row of it alone: its scores are lost to rounding, so uniform (as torch gives)
        mask[1, 3] = big  # this key takes the row
        want = reference.sdpa(q64, k64, v64, mask=np.clip(mask, -1e4, 1e4))  # rows 1-3: the same weights, in range
        want[:, :, 0] = np.repeat(v64.mean(axis=2), 2, axis=1)
        for return_lse in (False, True):
            with mx.stream(mx.cpu):
                got = ff.sdpa(q, k, v, mask=mx.array(mask, dtype=mdtype), return_lse=return_lse)
            check(got[0] if return_lse else got, want, dtype)
    mask = np.zeros((4, 9), np.float32)
    mask[2] = np.nan
    (q, k, v), _ = make_qkv(rng, 1, 2, 1, 4, 9, 16)
    for return_lse in (False, True):
        got = np.array(ff.sdpa(q, k, v, mask=mx.array(mask), return_lse=return_lse)[0 if return_lse else ...])
        assert np.isnan(got[:, :, 2]).all() and not np.isnan(got[:, :, [0, 1, 3]]).any()


def test_native_kernel_takes_bf16_masks_and_huge_windows(rng, native_cpu_kernel):
    (q, k, v), (q64, k64, v64) = make_qkv(rng, 1, 2, 1, 5, 11, 16)
    mask = rng.standard_normal((5, 11)).astype(np.float32)
    bf16 = mx.array(mask).astype(mx.bfloat16)
    check(ff.sdpa(q, k, v, mask=bf16), reference.sdpa(q64, k64, v64, mask=np.array(bf16.astype(mx.float32))), "fp32")
    check(ff.sdpa(q, k, v, causal=True, window=2**70), reference.sdpa(q64, k64, v64, causal=True), "fp32")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("masking", ["causal", "window", "bool", "additive"])
def test_dtypes(rng, dtype, masking):
    shape = (1, 4, 2, 19, 37, 64)
    options = {"causal": dict(causal=True), "window": dict(causal=True, window=8)}.get(masking, {})
    mask = None
    if masking == "bool":
        mask = rng.random((19, 37)) < 0.6
    elif masking == "additive":
        mask = rng.standard_normal((1, 4, 19, 37)).astype(np.float32)
        mask[..., ::3] = -1e9  # a large finite penalty stays finite after the cast to fp16
    run_both(rng, shape, dtype=dtype, mask_np=mask, **options)


def test_scale_and_value_dim(rng):
    run_both(rng, (2, 4, 1, 5, 9, 48), scale=0.3, causal=True)
    # ff.sdpa takes v shaped like k; sdpa_mlx itself also serves a value dim != the head dim
    run_both(rng, (2, 4, 1, 5, 9, 48, 24), scale=0.3, causal=True, op=sdpa_mlx)
    run_both(rng, (1, 2, 2, 7, 7, 16, 80), scale=1.7, op=sdpa_mlx)


def test_composed_path_matches_fused(rng):
    """The unfused MLX composition (the lse path) is the in-framework oracle of the fused one."""
    (q, k, v), _ = make_qkv(rng, 1, 8, 2, 65, 65, 64)
    fused = sdpa_mlx(q, k, v, causal=True)
    composed, _ = sdpa_composed(q, k, v, "causal", 64**-0.5)
    np.testing.assert_allclose(np.array(fused), np.array(composed), atol=2e-6, rtol=2e-6)


def test_lse_of_non_finite_rows_is_the_references(rng):
    """A +inf mask entry (a +inf score) makes its row and lse NaN; the lse path gave lse +inf."""
    (q, k, v), (q64, k64, v64) = make_qkv(rng, 1, 2, 1, 3, 5, 8)
    m = np.zeros((3, 5), np.float32)
    m[1, 2], m[2, :], m[0, 4] = np.inf, -np.inf, np.nan
    want_out, want_lse = reference.sdpa(q64, k64, v64, mask=m, return_lse=True)
    out, lse = sdpa_mlx(q, k, v, mask=mx.array(m), return_lse=True)
    np.testing.assert_array_equal(np.isnan(np.array(out)), np.isnan(want_out))
    np.testing.assert_array_equal(np.array(lse), want_lse.astype(np.float32))  # (NaN, NaN, -inf)


def test_bad_inputs(rng):
    (q, k, v), (q64, k64, _) = make_qkv(rng, 1, 2, 2, 4, 4, 8)
    with pytest.raises(TypeError, match=r"^\[sdpa\] all arrays must come from one framework: .*k is numpy"):
        sdpa_mlx(q, k64.astype(np.float32), v)
    with pytest.raises(TypeError, match=r"^\[sdpa\] all arrays must come from one framework: .*mask is numpy"):
        sdpa_mlx(q, k, v, mask=np.ones((4, 4), dtype=bool))
    with pytest.raises(TypeError, match=r"^\[sdpa\] q has dtype .*int32"):
        sdpa_mlx(q.astype(mx.int32), k, v)
    with pytest.raises(TypeError, match=r"^\[sdpa\] v has dtype .*float16 but q has .*float32"):
        sdpa_mlx(q, k, v.astype(mx.float16))


def test_bad_inputs_through_ff_sdpa(rng):
    (q, k, v), (q64, k64, _) = make_qkv(rng, 1, 2, 2, 4, 4, 8)
    with pytest.raises(TypeError, match=r"^\[sdpa\] all arrays must come from one framework: .*k is numpy"):
        ff.sdpa(q, k64.astype(np.float32), v)
    with pytest.raises(TypeError, match=r"^\[sdpa\] all arrays must come from one framework: .*mask is numpy"):
        ff.sdpa(q, k, v, mask=np.ones((4, 4), dtype=bool))
    with pytest.raises(TypeError, match=r"^\[sdpa\] q has dtype int32"):
        ff.sdpa(q.astype(mx.int32), k.astype(mx.int32), v.astype(mx.int32))
    with pytest.raises(TypeError, match=r"^\[sdpa\] q, k and v must share one dtype"):
        ff.sdpa(q, k, v.astype(mx.float16))
    with pytest.raises(ValueError, match=r"^\[sdpa\] k has 3 heads, which does not divide q's 2 heads"):
        ff.sdpa(q, mx.zeros((1, 3, 4, 8)), mx.zeros((1, 3, 4, 8)))


@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 2), hkv=st.integers(1, 3), group=st.integers(1, 3), lq=st.integers(1, 40),
    lk=st.integers(1, 40), d=st.sampled_from([8, 16, 33, 64]), causal=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 8)), seed=st.integers(0, 2**31),
)
def test_random_shapes(b, hkv, group, lq, lk, d, causal, window, seed):
    run_both(np.random.default_rng(seed), (b, hkv * group, hkv, lq, lk, d), causal=causal, window=window)


@pytest.fixture
def native_cpu_kernel():
    with ff.mlx.cpu_kernel("native"):
        yield


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("masking", ["none", "causal", "window", "bool", "additive"])
def test_native_cpu_kernel(rng, native_cpu_kernel, dtype, masking):
    """Opt-in: fusedformer's own kernel on the MLX arrays' memory, same semantics and dtypes."""
    options = {"causal": dict(causal=True), "window": dict(causal=True, window=5)}.get(masking, {})
    mask = None
    if masking == "bool":
        mask = rng.random((2, 1, 9, 21)) < 0.6
        mask[1, 0, 3] = False  # a fully masked row
    elif masking == "additive":
        mask = rng.standard_normal((9, 21)).astype(np.float32)
        mask[2] = -np.inf
    run_both(rng, (2, 4, 2, 9, 21, 32), dtype=dtype, mask_np=mask, **options)


def test_native_cpu_kernel_scope_and_fallbacks(rng):
    from fusedformer.mlx import native

    (q, k, v), (q64, k64, v64) = make_qkv(rng, 1, 2, 1, 5, 5, 16, dtype="bf16")
    with ff.mlx.cpu_kernel("native"):
        assert native.use_native(q.astype(mx.float32))
        assert not native.use_native(q)  # bf16 has no numpy buffer format: MLX's path
        check(ff.sdpa(q, k, v, causal=True), reference.sdpa(q64, k64, v64, causal=True), "bf16")
    assert not native.use_native(q.astype(mx.float32))
    with pytest.raises(ValueError, match=r"^\[mlx\] cpu kernel 'metal'"):
        ff.mlx.set_cpu_kernel("metal")


def test_mlx_path_compiles_and_differentiates(rng):
    """MLX's path stays an MLX graph: mx.compile and mx.grad work through it."""
    (q, k, v), (q64, k64, v64) = make_qkv(rng, 1, 4, 2, 9, 12, 16)
    mask = mx.array(rng.random((9, 12)) < 0.8)

    def f(q, k, v):
        return sdpa_mlx(q, k, v, mask=mask, causal=True, window=6)

    check(mx.compile(f)(q, k, v), reference.sdpa(q64, k64, v64, mask=np.array(mask), causal=True, window=6), "fp32")

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v) * v.sum()).sum()

    attn_mask, _ = attention_mask(mask, 9, 12, causal=True, window=6, dtype=mx.float32)
    composed = lambda q, k, v: sdpa_composed(q, k, v, attn_mask, 16**-0.5)[0]  # noqa: E731
    grads = mx.grad(loss(f), argnums=(0, 1, 2))(q, k, v)
    want = mx.grad(loss(composed), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(grads, want):
        assert not np.isnan(np.array(g)).any()
        np.testing.assert_allclose(np.array(g), np.array(w), atol=1e-4, rtol=1e-4)


def test_window_wider_than_the_keys_is_no_window(rng):
    """A window of Lk keys or more, up to past int64, limits nothing (MLX's int32 positions)."""
    for lq, lk in ((5, 9), (9, 5)):
        q, k, v = (mx.array(rng.standard_normal(s).astype(np.float32)) for s in ((1, 2, lq, 8), (1, 2, lk, 8), (1, 2, lk, 8)))
        for causal in (False, True):
            want = np.array(ff.sdpa(q, k, v, causal=causal))
            for window in (lk, 2**62, 2**70):
                np.testing.assert_array_equal(np.array(ff.sdpa(q, k, v, causal=causal, window=window)), want)


def test_cpu_kernel_environment_variable_is_checked(monkeypatch):
    """FUSEDFORMER_MLX_CPU_KERNEL is read when fusedformer.mlx.native is imported: a value other
    than mlx or native (case included) is an error naming it, not a silent MLX path."""
    import importlib

    from fusedformer.mlx import native

    try:
        for bad in ("bogus", "Native", " native"):
            monkeypatch.setenv("FUSEDFORMER_MLX_CPU_KERNEL", bad)
            with pytest.raises(ValueError, match=r"^\[mlx\] FUSEDFORMER_MLX_CPU_KERNEL=.* is not one of: mlx, native"):
                importlib.reload(native)
        for value, kind in (("", "mlx"), ("native", "native"), ("mlx", "mlx")):
            monkeypatch.setenv("FUSEDFORMER_MLX_CPU_KERNEL", value)
            importlib.reload(native)
            assert native.current_cpu_kernel() == kind, value
    finally:
        monkeypatch.undo()
        importlib.reload(native)  # (the default of the environment the suite runs in)
