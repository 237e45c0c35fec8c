"""ff.sdpa (native kernel) against the float64 oracle reference.sdpa."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedformer as ff
from fusedformer import reference
from fusedformer.ops_attention import native_sdpa
from tests.conftest import ISAS, kernel_config, require

# Max abs error vs the float64 oracle (outputs are O(1): convex combinations of N(0,1) rows).
# fp16/bf16 are bounded by twice torch's own SDPA error in tests/test_sdpa_torch.py; these
# absolute bounds are that criterion's envelope for the shapes below.
TOL = {"float32": 2e-5, "float16": 3e-3, "bfloat16": 2.5e-2}
LSE_TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.5e-2}


def make_qkv(rng, b, hq, hkv, lq, lk, d, dtype=np.float32):
    q = rng.standard_normal((b, hq, lq, d)).astype(dtype)
    k = rng.standard_normal((b, hkv, lk, d)).astype(dtype)
    v = rng.standard_normal((b, hkv, lk, d)).astype(dtype)
    return q, k, v


def check(out, lse, q, k, v, tol="float32", **opts):
    ref_out, ref_lse = reference.sdpa(q, k, v, return_lse=True, **opts)
    out = np.asarray(out, dtype=np.float64)
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, ref_out, atol=TOL[tol], rtol=0)
    if lse is not None:
        lse = np.asarray(lse, dtype=np.float64)
        assert lse.shape == ref_lse.shape
        np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
        live = np.isfinite(ref_lse)
        np.testing.assert_allclose(lse[live], ref_lse[live], atol=LSE_TOL[tol], rtol=1e-6)


# (B, Hq, Hkv, Lq, Lk, D): lengths straddle the key tile (64) and vector width, Lq > Lk too.
SHAPES = [
    (1, 1, 1, 1, 1, 32),
    (2, 8, 8, 3, 31, 59),
    (1, 8, 2, 33, 129, 64),
    (1, 32, 8, 1, 1025, 128),
    (1, 7, 1, 31, 127, 80),
    (1, 8, 2, 129, 33, 96),
    (1, 1, 1, 127, 3, 111),
    (1, 8, 8, 1, 129, 256),
    # several row blocks (AVX-512 register tiles: 192 rows in calls of few blocks, 5 at D59, 3
    # at D80 with a last of 16, 3 at D128 with a last of 4, streamed) ...
    (1, 8, 1, 97, 130, 59),
    (1, 4, 1, 100, 67, 80),
    (1, 4, 1, 97, 65, 128),
    # ... and the larger blocks of calls with more: 576 rows (32 pairs x 3 blocks, the last of
    # 48 rows), 288 (12 pairs x 3 at D128, the last of 124)
    (1, 32, 32, 1200, 65, 32),
    (1, 12, 12, 700, 70, 128),
]
OPTIONS = [
    dict(),
    dict(causal=True),
    dict(window=17),
    dict(causal=True, window=5),
    dict(scale=0.3),
]


def test_softmax_exp2_within_two_ulp(rng, isa):
    """The online softmax's 2^x (each ISA's own: a table and degree-2 polynomial on AVX-512)
    against float64 over its whole range, in ulps of the result; 0 below -126.5 and at -inf
    (from -126.5 to -126 subnormal on AVX2 and generic, 0 on AVX-512); inputs above 127 clamp
    there; NaN stays NaN (a NaN score must reach the row's sum, test_non_finite_rows_...)."""
    from fusedformer import _C

    x = np.concatenate([rng.uniform(-126, 127, 400_000), rng.uniform(-1, 1, 100_000),
                        rng.uniform(-126, -100, 1000), np.arange(-126, 127.01, 1 / 32)]).astype(np.float32)
    y = _C._softmax_exp2(x).astype(np.float64)
    exact = np.exp2(x.astype(np.float64))
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(y - exact) / ulp) <= 2.0
    edges = np.array([-126.51, -127, -1000, -np.inf, 200, np.inf, np.nan], np.float32)
    np.testing.assert_array_equal(_C._softmax_exp2(edges), [0, 0, 0, 0, 2.0**127, 2.0**127, np.nan])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()) or "plain")
def test_matches_reference(rng, isa, shape, opts):
    q, k, v = make_qkv(rng, *shape)
    out, lse = ff.sdpa(q, k, v, return_lse=True, **opts)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.dtype == np.float32
    check(out, lse, q, k, v, **opts)


@pytest.mark.parametrize(
    "shape", [(1, 8, 2, 33, 200, 64), (2, 7, 1, 129, 127, 59), (2, 8, 4, 200, 300, 64)], ids=str
)
def test_threads_same_bits(rng, isa, threads, shape):
    """Results are bitwise identical for 1 and 2 threads (fixed work decomposition); the last
    shape has 8 (batch, kv head) pairs of several row blocks, which 2 threads take a pair at a
    time."""
    q, k, v = make_qkv(rng, *shape)
    from tests.conftest import kernel_config

    with kernel_config(threads=1):
        base = ff.sdpa(q, k, v, causal=True)
    out = ff.sdpa(q, k, v, causal=True)
    np.testing.assert_array_equal(out, base)
    check(out, None, q, k, v, causal=True)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("opts", [dict(), dict(causal=True, window=40)], ids=["plain", "causal-window"])
@pytest.mark.parametrize("shape", [(2, 8, 2, 65, 130, 64), (1, 8, 4, 2, 300, 59)], ids=["packed", "streamed"])
def test_numpy_dtypes(rng, isa, dtype, opts, shape):
    q, k, v = make_qkv(rng, *shape, dtype=dtype)
    out, lse = ff.sdpa(q, k, v, return_lse=True, **opts)
    assert out.dtype == np.dtype(dtype)
    check(out, lse, q, k, v, tol=dtype, **opts)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("opts", ["causal-window", "window", "mask"])
def test_blocks_whose_rows_start_at_different_keys(rng, isa, dtype, opts):
    """Several blocks of 192 rows (where the zmm tiles pack each strip's queries during the
    first tile and request the next tile's K/V during each) whose rows see their first keys in
    different tiles: a sliding window, and a mask hiding a different number of each row's first
    keys."""
    q, k, v = make_qkv(rng, 1, 8, 2, 700, 700, 64, dtype=dtype)
    kw = {"causal-window": dict(causal=True, window=40), "window": dict(window=150)}.get(opts, {})
    if opts == "mask":
        first = (np.arange(700) * 37) % 650  # each row's first kept key
        kw = dict(mask=np.arange(700)[None, :] >= first[:, None])
    out, lse = ff.sdpa(q, k, v, return_lse=True, **kw)
    check(out, lse, q, k, v, tol=dtype, **kw)


def test_cache_controls(rng, monkeypatch):
    """ff.get_cache_memory, ff.clear_cache and ff.set_cache_limit (MLX's names) on the memory of
    released outputs: counted once released, freed past a lowered limit and by clear_cache, none
    kept at limit 0; a bad limit is refused naming the call."""
    from fusedformer import ops_attention

    monkeypatch.setattr(ops_attention, "_OUTPUT_CACHE", ops_attention._OutputCache(64 << 20))
    q, k, v = make_qkv(rng, 1, 8, 2, 1024, 33, 128)  # 4 MiB fp32 outputs
    a, b = ff.sdpa(q, k, v), ff.sdpa(q, k, v)
    assert ff.get_cache_memory() == 0
    del a
    assert ff.get_cache_memory() == 4 << 20
    del b
    assert ff.get_cache_memory() == 8 << 20
    assert ff.set_cache_limit(5 << 20) == 64 << 20
    assert ff.get_cache_memory() == 4 << 20
    ff.clear_cache()
    assert ff.get_cache_memory() == 0
    assert ff.set_cache_limit(0) == 5 << 20
    out = ff.sdpa(q, k, v)
    check(out, None, q, k, v)
    del out
    assert ff.get_cache_memory() == 0
    with pytest.raises(ValueError, match=r"\[set_cache_limit\] limit"):
        ff.set_cache_limit(-1)
    with pytest.raises(TypeError, match=r"\[set_cache_limit\] limit"):
        ff.set_cache_limit(1.5)


# ---- masks ----------------------------------------------------------------------------------

MASK_SHAPES = [(5, 70), (1, 1, 5, 70), (2, 1, 1, 70), (2, 4, 5, 70), (70,), (2, 4, 5, 1), (4, 1, 70)]


@pytest.mark.parametrize("mshape", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_masks(rng, isa, mshape, kind):
    q, k, v = make_qkv(rng, 2, 4, 2, 5, 70, 32)
    if kind == "bool":
        mask = rng.random(mshape) < 0.7
    else:
        mask = rng.standard_normal(mshape).astype(np.float32)
        mask[rng.random(mshape) < 0.2] = -np.inf
    out, lse = ff.sdpa(q, k, v, mask=mask, return_lse=True)
    check(out, lse, q, k, v, mask=mask)
    out, lse = ff.sdpa(q, k, v, mask=mask, causal=True, window=9, return_lse=True)
    check(out, lse, q, k, v, mask=mask, causal=True, window=9)


def test_additive_mask_float64_and_strided(rng, isa):
    q, k, v = make_qkv(rng, 1, 2, 1, 9, 40, 16)
    big = rng.standard_normal((2, 9, 80))  # float64, viewed with a step on the key axis
    mask = big[:, :, ::2]
    out = ff.sdpa(q, k, v, mask=mask[None])
    check(out, None, q, k, v, mask=mask[None])


def test_fully_masked_rows_give_zero_and_neg_inf(rng, isa, threads):
    q, k, v = make_qkv(rng, 1, 4, 2, 6, 100, 32)
    mask = np.ones((6, 100), dtype=bool)
    mask[2] = False
    add = np.zeros((6, 100), dtype=np.float32)
    add[4] = -np.inf
    for m in (mask, add):
        for chunk in (-1, 0, 64):
            out, lse = native_sdpa(q, k, v, mask=m, return_lse=True, kv_chunk=chunk)
            dead = 2 if m.dtype == bool else 4
            assert not np.isnan(out).any()
            assert (out[:, :, dead] == 0).all() and np.isneginf(lse[:, :, dead]).all()
            check(out, lse, q, k, v, mask=m)


LOWEST = np.finfo(np.float32).min  # torch.finfo(float32).min: Hugging Face models' mask value


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape, chunk", [((1, 4, 2, 70, 130, 32), -1), ((1, 8, 2, 1, 1100, 64), 0),
                                          ((1, 8, 2, 1, 1100, 64), 256)], ids=str)
def test_additive_mask_at_float32_lowest_keeps_the_keys(rng, isa, threads, dtype, shape, chunk):
    """An additive float32 lowest (whose base-2 value overflows float32) weighs a key at the
    lowest, not -inf: a row of it alone attends uniformly, as in float64 and in torch's SDPA,
    with lse float32's lowest; beside ordinary scores it weighs 0; beside -inf it is kept."""
    q, k, v = make_qkv(rng, *shape, dtype)
    lq, lk = shape[3], shape[4]
    mask = rng.standard_normal((lq, lk)).astype(np.float32)
    mask[0] = LOWEST
    if lq > 2:
        mask[1, : lk // 2] = LOWEST  # ordinary scores beside it
        mask[2, ::2], mask[2, 1::2] = LOWEST, -np.inf  # -inf beside it
    out, lse = native_sdpa(q, k, v, mask=mask, return_lse=True, kv_chunk=chunk)
    check(out, None, q, k, v, tol=dtype, mask=mask)
    assert (lse[:, :, 0] == LOWEST).all()
    if lq > 2:
        check(out[:, :, 1:], lse[:, :, 1:], q[:, :, 1:], k, v, tol=dtype, mask=mask[1:])


def test_float64_mask_past_float32_keeps_the_keys(rng, isa):
    """A float64 additive mask below float32's range (-1e300) is a kept key at the lowest weight, not -inf."""
    q, k, v = make_qkv(rng, 1, 2, 1, 3, 40, 16)
    mask = rng.standard_normal((3, 40))
    mask[0] = -1e300
    mask[1, 5:] = -1e300
    mask[2, 7] = 1e300  # past float32 on the other side: this key takes the row
    out, lse = ff.sdpa(q, k, v, mask=mask, return_lse=True)
    check(out, None, q, k, v, mask=mask)
    assert (lse[:, :, 0] == LOWEST).all() and np.isfinite(lse).all()


# ---- masks that exclude whole key tiles ------------------------------------------------------
# Each row's keys are narrowed to its mask row's kept range [first, last + 1) before the tiles
# run, so tiles a mask excludes entirely are skipped. Shapes span several row blocks (192 rows)
# and key tiles (64; the AMX tiles' 384 rows and 256 keys: tests/test_sdpa_torch.py); ranges
# start and end off the 8-key words the range scan skips by.


def ranged_mask(rng, lq, lk, holes=0.1):
    """Bool [lq, lk]: row i keeps a random range of keys (some rows none, some all), with random
    holes inside."""
    a = rng.integers(-lk // 4, lk, lq).clip(0, lk)
    e = (a + rng.integers(-lk // 8, lk, lq)).clip(a, lk)
    a[:3], e[:3] = (0, 0, 0), (lk, 0, 5)  # all keys, none, the first five
    j = np.arange(lk)
    return (j >= a[:, None]) & (j < e[:, None]) & (rng.random((lq, lk)) >= holes)


def additive(rng, keep):
    """fp32 additive form of a bool mask: N(0, 1) where kept, -inf elsewhere."""
    return np.where(keep, rng.standard_normal(keep.shape), -np.inf).astype(np.float32)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_masks_excluding_whole_tiles(rng, isa, threads, dtype, kind):
    q, k, v = make_qkv(rng, 2, 4, 2, 200, 330, 32, dtype)  # 400 rows per kv head
    keep = ranged_mask(rng, 200, 330)
    pad = np.ones((2, 1, 1, 330), dtype=bool)
    pad[1, ..., :201] = False  # left padding of a batch row: whole tiles masked
    per_head = ranged_mask(rng, 2 * 4 * 200, 330).reshape(2, 4, 200, 330)  # scan chunks cross heads
    for m in (keep, pad, keep & pad, per_head):
        mask = m if kind == "bool" else additive(rng, m)
        out, lse = ff.sdpa(q, k, v, mask=mask, return_lse=True)
        check(out, lse, q, k, v, tol=dtype, mask=mask)
    mask = keep if kind == "bool" else additive(rng, keep)
    out, lse = ff.sdpa(q, k, v, mask=mask, causal=True, window=200, return_lse=True)
    check(out, lse, q, k, v, tol=dtype, mask=mask, causal=True, window=200)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_causal_or_window_as_a_mask_equals_the_option(rng, isa, threads, dtype):
    """A mask holding what causal/window select gives the same bits as the options (the same
    tiles run; the mask's -inf enters where the options' clip does)."""
    lq, lk = 200, 330
    q, k, v = make_qkv(rng, 1, 4, 2, lq, lk, 32, dtype)
    diag = np.arange(lq)[:, None] + lk - lq
    j = np.arange(lk)[None]
    for opts, keep in [(dict(causal=True), j <= diag), (dict(causal=True, window=70), (j <= diag) & (j > diag - 70))]:
        want = ff.sdpa(q, k, v, **opts)
        np.testing.assert_array_equal(ff.sdpa(q, k, v, mask=keep), want)
        np.testing.assert_array_equal(ff.sdpa(q, k, v, mask=np.where(keep, 0, -np.inf).astype(np.float32)), want)


def test_mask_strided_or_broadcast_along_keys(rng, isa, threads):
    """The range scan on masks that are not contiguous along the keys: a transposed view (stride
    Lq) and a mask broadcast along the keys (stride 0: a row keeps all keys or none)."""
    q, k, v = make_qkv(rng, 1, 4, 2, 300, 300, 32)
    keep = ranged_mask(rng, 300, 300)
    transposed = np.ascontiguousarray(keep.T).T
    assert transposed.strides[1] != 1
    out, lse = ff.sdpa(q, k, v, mask=transposed, return_lse=True)
    check(out, lse, q, k, v, mask=keep)
    rows = rng.random((300, 1)) < 0.5
    out, lse = ff.sdpa(q, k, v, mask=rows, return_lse=True)
    assert (out[:, :, ~rows[:, 0]] == 0).all() and np.isneginf(lse[:, :, ~rows[:, 0]]).all()
    check(out, lse, q, k, v, mask=rows)


def test_causal_more_queries_than_keys(rng, isa):
    """Bottom-right causal: the first Lq - Lk queries see no key at all."""
    q, k, v = make_qkv(rng, 1, 2, 2, 40, 10, 32)
    out, lse = ff.sdpa(q, k, v, causal=True, return_lse=True)
    assert (out[:, :, :30] == 0).all() and np.isneginf(lse[:, :, :30]).all()
    check(out, lse, q, k, v, causal=True)


# ---- split-KV decode ------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [64, 128, 192])
@pytest.mark.parametrize("opts", [dict(), dict(causal=True, window=300), dict(causal=True)], ids=str)
def test_split_kv(rng, isa, threads, chunk, opts):
    q, k, v = make_qkv(rng, 2, 8, 2, 3, 701, 64)
    out, lse = native_sdpa(q, k, v, return_lse=True, kv_chunk=chunk, **opts)
    check(out, lse, q, k, v, **opts)


# Long decode blocks (K/V rows requested kDecodePrefetchKeys ahead from S = Q K^T: StreamAhead;
# fp32 blocks of several rows over 512+ keys: LineAhead, with qk_dot and pv_stream over row
# groups of 4 and fewer, at D 64, 80, 96, 128) with rows whose keys all lie in the first or the
# last part of the block, rows with no key at all, window and causal ranges; kv_chunk 0 keeps
# each block whole, -1 splits by shape.
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("chunk", [0, -1])
@pytest.mark.parametrize(
    "shape, opts",
    [
        ((1, 8, 2, 1, 1025, 64), dict(mask="parts")),
        ((1, 7, 1, 1, 2049, 59), dict(mask="parts")),
        ((1, 4, 4, 2, 1500, 128), dict(mask="parts", causal=True)),
        ((4, 32, 8, 1, 1100, 128), dict()),
        ((1, 6, 2, 3, 1500, 80), dict(causal=True, window=1100)),
        ((1, 6, 2, 2, 1500, 80), dict(mask="parts")),
        ((1, 8, 2, 1, 1100, 96), dict(causal=True, window=700)),
    ],
    ids=str,
)
def test_decode_long_blocks(rng, isa, threads, dtype, chunk, shape, opts):
    b, hq, hkv, lq, lk, d = shape
    q, k, v = make_qkv(rng, *shape, dtype=np.dtype(dtype))
    opts = dict(opts)
    if opts.pop("mask", None):  # "parts"
        keep = rng.random((b, hq, lq, lk)) < 0.8
        keep[:, 0::3, :, lk * 2 // 5:] = False  # keys in the first 2/5 only
        keep[:, 1::3, :, : lk * 3 // 5] = False  # ... in the last 2/5 only
        keep[0, hq - 1, 0] = False  # no key at all
        opts["mask"] = keep
    out, lse = native_sdpa(q, k, v, return_lse=True, kv_chunk=chunk, **opts)
    check(out, lse, q, k, v, tol=dtype, **opts)
    if "mask" in opts:
        assert (out[0, hq - 1, 0] == 0).all() and np.isneginf(lse[0, hq - 1, 0])


# (hq, hkv, lk) -> the keys per split-KV chunk split_chunk picks for fp32 and for 2-byte
# storage (half as many units, twice the keys each); lk itself: not split
AUTO_SPLIT = {
    (32, 8, 1500): (512, 768),
    (8, 1, 3001): (512, 512),
    (4, 1, 1100): (512, 512),
    (16, 8, 4100): (1088, 2112),
    (32, 32, 1100): (1100, 1100),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("heads", list(AUTO_SPLIT), ids=str)
def test_split_kv_auto_decode(rng, isa, threads, heads, dtype):
    """Lq = 1 with many keys takes the split path by shape, chunks by the kv heads and the storage
    size (split_chunk: kMinBlocks units over the kv heads, half as many for 2-byte storage, at
    least 512 keys each; none for 32 kv heads): the same bits as those chunks forced, and for
    any thread count."""
    hq, hkv, lk = heads
    q, k, v = make_qkv(rng, 1, hq, hkv, 1, lk, 128, dtype)
    out, lse = ff.sdpa(q, k, v, causal=True, return_lse=True)
    check(out, lse, q, k, v, causal=True, tol=np.dtype(dtype).name)
    chunk = AUTO_SPLIT[heads][0 if dtype == np.float32 else 1]
    np.testing.assert_array_equal(native_sdpa(q, k, v, causal=True, kv_chunk=chunk), out)
    from tests.conftest import kernel_config

    with kernel_config(threads=1):
        np.testing.assert_array_equal(ff.sdpa(q, k, v, causal=True), out)


def test_split_kv_many_rows(rng, isa):
    """Forced chunks also work when a kv group has several row blocks."""
    q, k, v = make_qkv(rng, 1, 4, 1, 40, 300, 32)
    out = native_sdpa(q, k, v, causal=True, kv_chunk=64)
    check(out, None, q, k, v, causal=True)


# ---- layouts, poisoning, immutability -------------------------------------------------------


@pytest.mark.parametrize("b,l,h,d", [(2, 37, 6, 64), (1, 129, 4, 128), (1, 70, 3, 96)])
def test_strided_inputs(rng, isa, b, l, h, d):
    """[B, L, H, D] tensors viewed as [B, H, L, D] (Hugging Face layout), sliced heads. The
    K/V rows lie 2 H D floats apart: 3072 and 4096 bytes (a multiple of 512: fp32 V packed for
    P V), and 2304 (V read in place)."""
    qb = rng.standard_normal((b, l, h, d)).astype(np.float32)
    kvb = rng.standard_normal((b, l, 2 * h, d)).astype(np.float32)
    q = qb.transpose(0, 2, 1, 3)
    k = kvb.transpose(0, 2, 1, 3)[:, : h // 2]
    v = kvb.transpose(0, 2, 1, 3)[:, h // 2 :: 1][:, ::1][:, : h // 2]
    assert not q.flags.c_contiguous
    out = ff.sdpa(q, k, v, causal=True)
    check(out, None, q, k, v, causal=True)


def test_negative_zero_and_step_strides(rng, isa):
    """Reversed queries, K broadcast over heads (stride 0), every second key of V."""
    q = rng.standard_normal((1, 4, 9, 32), dtype=np.float32)[:, :, ::-1]
    k = np.broadcast_to(rng.standard_normal((1, 1, 20, 32), dtype=np.float32), (1, 2, 20, 32))
    v = rng.standard_normal((1, 2, 40, 32), dtype=np.float32)[:, :, ::2]
    out = ff.sdpa(q, k, v, causal=True)
    check(out, None, q, k, v, causal=True)

def test_head_dim_one_in_hugging_face_layout(rng, isa):
    """D = 1 viewed from [B, L, H, 1]: numpy's empty_like of such a q gives an output whose last
    axis (one element per row) has a stride other than 1, which the kernel must take."""
    q = rng.standard_normal((1, 5, 8, 1), dtype=np.float32).transpose(0, 2, 1, 3)
    k, v = (rng.standard_normal((1, 2, 7, 1), dtype=np.float32) for _ in range(2))
    assert np.empty_like(q).strides[-1] != q.itemsize
    out = ff.sdpa(q, k, v, causal=True)
    check(out, None, q, k, v, causal=True)



def test_noncontiguous_last_dim_is_copied(rng, isa):
    q, k, v = make_qkv(rng, 1, 2, 2, 7, 9, 64)
    qs = np.asfortranarray(q)
    ks = np.repeat(k, 2, axis=-1)[..., ::2]
    out = ff.sdpa(qs, ks, v)
    check(out, None, q, k, v)


@pytest.mark.parametrize("chunk", [-1, 64])
def test_poisoned_output_fully_written(rng, isa, chunk):
    q, k, v = make_qkv(rng, 1, 8, 2, 5, 300, 59)
    out = np.full(q.shape, np.nan, dtype=np.float32)
    native_sdpa(q, k, v, causal=True, out=out, kv_chunk=chunk)
    check(out, None, q, k, v, causal=True)
    out16 = np.full(q.shape, np.nan, dtype=np.float16)
    q16, k16, v16 = (t.astype(np.float16) for t in (q, k, v))
    native_sdpa(q16, k16, v16, window=3, out=out16, kv_chunk=chunk)
    check(out16, None, q16, k16, v16, tol="float16", window=3)


# Outputs of at least 8 MiB leave through streaming stores (kStreamOutputBytes in sdpa.cpp),
# where the rows are whole 32-byte blocks on 16-byte boundaries: 8 MiB in fp32 and fp16 at a
# 64-byte and a 16-byte boundary; D59 (rows of 236 bytes) and an output 2 bytes off a 16-byte
# boundary take the plain stores.
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("d, at", [(128, 0), (128, 16), (128, 2), (59, 0)], ids=["at64", "at16", "off", "d59"])
def test_streamed_output_fully_written(rng, isa, dtype, d, at):
    heads = (8 << 20) // (1024 * d * np.dtype(dtype).itemsize) + 1
    q, k, v = make_qkv(rng, 1, heads, 1, 1024, 33, d, dtype)
    raw = np.full(q.nbytes + 128, 0xFF, dtype=np.uint8)  # NaN in fp32 and fp16
    start = -raw.ctypes.data % 64 + at
    out = raw[start:start + q.nbytes].view(dtype).reshape(q.shape)
    assert out.ctypes.data % 64 == at and np.isnan(out).all()
    native_sdpa(q, k, v, causal=True, out=out)  # bottom-right causal: 991 rows see no key
    check(out, None, q, k, v, tol=np.dtype(dtype).name, causal=True)
    assert (out[:, :, :1024 - 33] == 0).all()


def test_large_numpy_outputs_reuse_memory_only_once_released(rng, monkeypatch):
    """numpy outputs of 4 MiB and more come from the output cache (ops_attention._OutputCache):
    laid out as np.empty_like(q), other memory while the first output (or a view of it) lives,
    its memory once released, every element rewritten."""
    import gc

    from fusedformer import ops_attention

    monkeypatch.setattr(ops_attention, "_OUTPUT_CACHE", ops_attention._OutputCache(64 << 20))
    q, k, v = make_qkv(rng, 1, 8, 2, 1024, 33, 128)  # 4 MiB out
    a = ff.sdpa(q, k, v, causal=True)
    row = a[0, 3]  # a view keeps the memory lent
    kept = a.ctypes.data
    del a
    gc.collect()
    b = ff.sdpa(q, k, v, causal=True)
    assert b.ctypes.data != kept
    del row
    gc.collect()
    qt = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)  # [B, L, H, D] storage
    c = ff.sdpa(qt, k * 0.5, v, causal=True)
    assert c.ctypes.data == kept and c.strides == np.empty_like(qt).strides
    check(c, None, qt, k * 0.5, v, causal=True)
    check(b, None, q, k, v, causal=True)


@pytest.mark.parametrize("rows", [4, 1024], ids=["small", "cached"])
def test_broadcast_q_gets_a_contiguous_output(rng, rows):
    """A q broadcast over heads (stride 0) gets a C-contiguous output: np.empty_like would lay
    that axis out innermost, after the head dim, where the kernel needs the head dim contiguous.
    At 1024 rows the output (4 MiB) would come from the output cache."""
    q1, k, v = make_qkv(rng, 1, 1, 2, rows, 40, 128)
    q = np.broadcast_to(q1, (1, 8, rows, 128))
    out = ff.sdpa(q, k, v, causal=True)
    assert out.flags.c_contiguous
    check(out, None, q, k, v, causal=True)


_CACHE_GC = """
import gc, sys
import numpy as np
import fusedformer as ff
q = np.random.default_rng(0).standard_normal((1, 8, 512, 256)).astype(np.float32)  # 4 MiB outputs: cached
a, b = ff.sdpa(q, q, q), ff.sdpa(q, q, q)
gc.disable(); gc.collect()
cycle = [a]; cycle.append(cycle); del a, cycle  # `a` waits for the collector
gc.set_threshold(int(sys.argv[1])); gc.enable()
del b  # a collection may start inside the cache's locked section and release `a` there
ff.set_cache_limit(1 << 30)
print(ff.get_cache_memory())
"""


def test_output_cache_survives_collections_inside_its_lock():
    """An output freed by a garbage collection that starts inside the cache's locked section (its
    finalizer gives the memory back on the same thread) does not deadlock (a non-reentrant lock
    did): whatever collection threshold places it there."""
    import subprocess
    import sys

    for threshold in range(3, 9):
        out = subprocess.run([sys.executable, "-c", _CACHE_GC, str(threshold)], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, (threshold, out.stderr[-2000:])


def test_output_cache_limit_zero_keeps_nothing():
    """Outputs released after set_cache_limit(0) go back to the system (none wait to be filed)."""
    from fusedformer import ops_attention

    q = np.random.default_rng(0).standard_normal((1, 8, 1024, 128)).astype(np.float32)  # 4 MiB: cached
    outs = [ff.sdpa(q, q, q) for _ in range(3)]
    before = ff.set_cache_limit(0)
    try:
        del outs
        gc.collect()
        assert ff.get_cache_memory() == 0 and not ops_attention._OUTPUT_CACHE.returned
    finally:
        ff.set_cache_limit(before)


def test_inputs_unmodified(rng, isa):
    q, k, v = make_qkv(rng, 1, 4, 2, 9, 70, 40)
    mask = rng.standard_normal((9, 70)).astype(np.float32)
    copies = [t.copy() for t in (q, k, v, mask)]
    ff.sdpa(q, k, v, mask=mask, causal=True, return_lse=True)
    for a, b in zip((q, k, v, mask), copies):
        np.testing.assert_array_equal(a, b)


def test_large_scores_no_overflow(rng, isa):
    q, k, v = make_qkv(rng, 1, 2, 2, 20, 90, 64)
    q, k = q * 30, k * 30
    out, lse = ff.sdpa(q, k, v, return_lse=True)
    ref_out, ref_lse = reference.sdpa(q, k, v, return_lse=True)
    assert not np.isnan(out).any()
    # Scores reach ~3000 here: one fp32 ulp of them moves a probability by ~2e-4 of itself, so
    # the output's error bound is that conditioning (an overflow would be off by O(1)).
    scores = np.abs(np.einsum("bhid,bhjd->bhij", q.astype(np.float64), k.astype(np.float64))) / 8
    bound = 2 * np.spacing(np.float32(scores.max())) * np.abs(v).max()
    np.testing.assert_allclose(out, ref_out, atol=TOL["float32"] + bound, rtol=0)
    np.testing.assert_allclose(lse, ref_lse, atol=LSE_TOL["float32"] + bound, rtol=1e-6)


def _non_finite_case(rng, case, shape, dtype):
    """Inputs for test_non_finite_rows_match_reference as float32 arrays already rounded to
    dtype, with the mask (or None) and the options."""
    b, hq, hkv, lq, lk, d = shape
    q, k, v = make_qkv(rng, b, hq, hkv, lq, lk, d)
    opts, mask = dict(causal=True), None
    j = lk - lq + lq // 2  # a key the later half of the rows keep under causal
    if case == "nan-q":  # that row NaN, the rest as before
        q[0, hq - 1, lq // 2, 3] = np.nan
    elif case == "nan-k":  # the rows that keep key j NaN, those before it (causal) not
        k[0, 0, j, 5] = np.nan
    elif case == "inf-q":  # +inf and -inf scores: rows with a +inf score NaN (inf - inf)
        q[0, 0, lq - 1, 0] = np.inf
    elif case == "overflow":  # finite inputs, scaled scores past fp32 in some rows: exact
        k *= 1e18
        for i in {lq // 2, lq - 1}:
            q[0, :, i] *= 1e21
    elif case == "underflow":  # finite inputs, every kept score of some rows below fp32's lowest:
        k = np.abs(k) + 1  # exact (they were taken for fully masked rows: 0, lse -inf)
        for i in {lq // 2, lq - 1}:
            q[0, :, i] = -(np.abs(q[0, :, i]) + 1) * 5e37
    elif case == "overflow-one-chunk":  # ... in the keys of one chunk of a split decode only
        k[:, :, lk - 200:] *= 1e19
        q *= 1e20
    elif case == "nan-k-masked-after":  # the first tile's kept keys all NaN, then masked keys
        k[0, :, :8, 0] = np.nan  # (vmaxps passes over a NaN followed by -inf), then finite tiles
        mask = np.ones((lq, lk), bool)
        mask[:, 8:64] = False
        opts = {}
    elif case == "nan-q-masked-row":  # a NaN in a fully masked row: still 0, lse -inf
        mask = np.ones((lq, lk), bool)
        mask[lq // 2] = False
        q[0, 1, lq // 2, 0] = np.nan
        opts = {}
    elif case == "nan-v-causal":  # a NaN value the later rows keep: NaN in its column there only,
        v[0, 0, j, 5] = np.nan  # not in the earlier rows of the same tiles (their p = 0)
    elif case == "non-finite-masked-tail":  # a KV cache's unused tail holding anything, masked: read by no row
        mask = np.ones((lq, lk), bool)
        mask[:, lk - 5:] = False
        k[0, :, lk - 5:] = np.nan
        v[0, :, lk - 5:] = np.inf
        v[0, :, lk - 3:, 1] = np.nan
        opts = {}
    elif case == "non-finite-masked-additive":  # an additive -inf drops a key as a bool False does:
        mask = np.zeros((lq, lk), np.float32)  # a NaN / inf in its K is not read (NaN + -inf made its
        mask[:, lk // 2] = -np.inf  # rows NaN, mid-row; at the row's end the key was never computed)
        mask[:, lk - 1] = -np.inf
        mask[: lq // 2, 0] = -np.inf  # (dropped by half the rows, kept and finite for the others)
        k[0, :, lk // 2] = np.nan
        k[0, :, lk - 1, 2] = np.inf
        v[0, :, lk // 2] = np.nan
        opts = {}
    elif case == "nan-v-masked-row":  # a NaN value: NaN where kept; a fully masked row of the
        mask = np.ones((hq, lq, lk), bool)  # same kv head still 0 (its P V may have run over the
        mask[1, lq // 2] = False  # NaN with p = 0)
        v[0, 0, min(3, lk - 1), 5] = np.nan
        opts = {}
    if dtype != "float32":  # what the kernel sees, for the reference too
        torch = pytest.importorskip("torch")
        q, k, v = (torch.from_numpy(x).to(getattr(torch, dtype)).float().numpy() for x in (q, k, v))
    return q, k, v, mask, opts


# (fp16 inputs cannot reach fp32's overflow: 65504^2 D is far below it)
NON_FINITE_CASES = [(case, dtype) for case in ("nan-q", "nan-k", "nan-k-masked-after", "inf-q", "overflow",
                                               "underflow", "overflow-one-chunk", "nan-q-masked-row", "nan-v-masked-row",
                                               "nan-v-causal", "non-finite-masked-tail", "non-finite-masked-additive")
                    for dtype in ("float32", "float16", "bfloat16")
                    if not (dtype == "float16" and case.startswith(("overflow", "underflow")))]


@pytest.mark.parametrize(
    "shape", [(1, 4, 2, 33, 129, 64), (1, 8, 2, 1, 2100, 128), (2, 3, 3, 7, 40, 33)], ids=str
)
@pytest.mark.parametrize("case,dtype", NON_FINITE_CASES, ids=[f"{c}-{d}" for c, d in NON_FINITE_CASES])
def test_non_finite_rows_match_reference(rng, isa, threads, case, shape, dtype):
    """Rows the fp32 kernel cannot finish are exact (reference.sdpa's semantics, in float64): a
    NaN or inf among the inputs a row reads makes it NaN (it used to drop out as a 0 or a
    vanished key), scores that overflow fp32 from finite inputs give the exact softmax (they
    gave 0; those past fp32's lowest gave 0 as if fully masked), and a fully masked row stays 0
    whatever its query holds. The other rows are
    untouched. Shapes: prefill, a split-KV decode (chunks merged), an odd head dim."""
    torch = pytest.importorskip("torch")
    q, k, v, mask, opts = _non_finite_case(rng, case, shape, dtype)
    tq, tk, tv = (torch.from_numpy(x).to(getattr(torch, dtype)) for x in (q, k, v))
    tmask = None if mask is None else torch.from_numpy(mask)
    before = [x.clone() for x in (tq, tk, tv)]
    out, lse = ff.sdpa(tq, tk, tv, mask=tmask, return_lse=True, **opts)
    for x, y in zip((tq, tk, tv), before):  # unmodified, bit for bit (NaN where NaN was)
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    out, lse = out.double().numpy(), lse.double().numpy()
    ref_out, ref_lse = reference.sdpa(q, k, v, mask=mask, return_lse=True, **opts)
    nan_rows = np.isnan(ref_out).any(-1)
    assert nan_rows.any() == (case in ("nan-q", "nan-k", "nan-k-masked-after", "inf-q", "nan-v-masked-row",
                                       "nan-v-causal"))
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref_out))  # (whole rows, or v's column)
    np.testing.assert_array_equal(np.isnan(lse), np.isnan(ref_lse))
    live = ~nan_rows
    np.testing.assert_allclose(out[live], ref_out[live], atol=TOL[dtype], rtol=0)
    with np.errstate(over="ignore"):  # overflowing rows' lse is past fp32 too
        ref_lse = ref_lse.astype(np.float32).astype(np.float64)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=LSE_TOL[dtype], rtol=1e-6)
    if case.endswith("masked-row"):
        dead = ~np.broadcast_to(mask, out.shape[:3] + (mask.shape[-1],)).any(-1)
        assert dead.any() and (out[dead] == 0).all() and np.isneginf(lse[dead]).all()


# ---- bad input ------------------------------------------------------------------------------


def _bad(rng):
    q, k, v = make_qkv(rng, 1, 4, 2, 5, 6, 8)
    return q, k, v


@pytest.mark.parametrize(
    "mutate, exc, words",
    [
        (lambda q, k, v: (q, k[:, :1].repeat(3, 1), v[:, :1].repeat(3, 1)), ValueError, "3 heads, which does not divide"),
        (lambda q, k, v: (q, k[..., :4], v[..., :4]), ValueError, "head dim"),
        (lambda q, k, v: (q[0], k, v), ValueError, "q must be 4-d"),
        (lambda q, k, v: (q, k, v[:, :, :3]), ValueError, "v's shape"),
        (lambda q, k, v: (q, k.astype(np.float16), v), TypeError, "share one dtype"),
        (lambda q, k, v: (q.astype(np.float64), k.astype(np.float64), v.astype(np.float64)), TypeError, "float64"),
        (lambda q, k, v: (q[:, :, :0], k, v), ValueError, "zero-sized"),
        (lambda q, k, v: (q[:1], np.concatenate([k, k]), np.concatenate([v, v])), ValueError, "batch"),
        (lambda q, k, v: (None, k, v), TypeError, "q must be an array or tensor, got None"),
        (lambda q, k, v: (q, k, None), TypeError, "v must be an array or tensor, got None"),
    ],
)
def test_bad_arrays(rng, mutate, exc, words):
    q, k, v = mutate(*_bad(rng))
    with pytest.raises(exc, match=r"^\[sdpa\].*" + words):
        ff.sdpa(q, k, v)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(scale=float("nan")), ValueError, "scale"),
        (dict(scale=float("inf")), ValueError, "scale"),
        (dict(scale=1e40), ValueError, "scale"),  # finite, but not in float32
        (dict(scale=-3e38), ValueError, "scale"),  # ... after the factor log2 e
        (dict(scale="1"), TypeError, "scale"),
        (dict(window=0), ValueError, "window"),
        (dict(window=2.5), TypeError, "window"),
        (dict(causal="yes"), TypeError, "causal"),
        (dict(return_lse="yes"), TypeError, "return_lse must be a bool"),
        (dict(mask=np.ones((5, 7), dtype=bool)), ValueError, "mask of shape"),
        (dict(mask=np.ones((3, 5, 6), dtype=bool)), ValueError, "mask of shape"),
        (dict(mask=np.ones((5, 6), dtype=np.int32)), TypeError, "mask must be bool"),
        (dict(mask=np.ones((5, 6), dtype=">f4")), TypeError, "mask must be bool .*byte order"),
    ],
)
def test_bad_options(rng, kwargs, exc, words):
    q, k, v = _bad(rng)
    with pytest.raises(exc, match=r"^\[sdpa\].*" + words):
        ff.sdpa(q, k, v, **kwargs)


def test_numpy_scalar_options_match_python_ones(rng):
    """scale, window and causal given as numpy scalars (as computed from arrays) act as the
    Python values they equal: the argument checks take plain types first, numbers after."""
    q, k, v = _bad(rng)
    want = ff.sdpa(q, k, v, scale=0.25, window=2, causal=True)
    got = ff.sdpa(q, k, v, scale=np.float32(0.25), window=np.int64(2), causal=np.bool_(True))
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(want, ff.sdpa(q, k, v, scale=0.5, window=2, causal=True))


@pytest.mark.parametrize(
    "descriptor",
    [[0, (1, 1, 1, 1), (1, 1, 1, 1)], (8, [1, 1, 1, 1], (1, 1, 1, 1)), (8, (1, 1, 1), (1, 1, 1, 1)), (8,)],
    ids=["list", "shape list", "3-d shape", "short"],
)
def test_raw_binding_rejects_malformed_descriptors(rng, descriptor):
    """_C.sdpa's raw-pointer contract: a malformed descriptor is a TypeError, never a crash."""
    from fusedformer import _C
    from fusedformer.ops_attention import _descriptor

    q, k, v = _bad(rng)
    dk, dv = _descriptor(k, "k"), _descriptor(v, "v")
    with pytest.raises(TypeError, match=r"^\[sdpa\] q must be a \(ptr, shape\[4\], strides\[4\]\) tuple"):
        _C.sdpa(descriptor, dk, dv, _descriptor(q, "out"), 0, None, None, 0, False, 0.5, 0, -1)


def test_head_dim_limit(rng):
    q, k, v = make_qkv(rng, 1, 1, 1, 2, 2, 264)
    with pytest.raises(ValueError, match=r"^\[sdpa\] head dim 264"):
        ff.sdpa(q, k, v)


# ---- random shapes --------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 2),
    hkv=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4, 7]),
    lq=st.integers(1, 80),
    lk=st.integers(1, 200),
    d=st.sampled_from([1, 8, 13, 32, 59, 64, 100]),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 100)),
    chunk=st.sampled_from([-1, 0, 64]),
    seed=st.integers(0, 2**31),
)
def test_random_shapes(b, hkv, group, lq, lk, d, causal, window, chunk, seed):
    rng = np.random.default_rng(seed)
    q, k, v = make_qkv(rng, b, hkv * group, hkv, lq, lk, d)
    out, lse = native_sdpa(q, k, v, causal=causal, window=window or 0, return_lse=True, kv_chunk=chunk)
    check(out, lse, q, k, v, causal=causal, window=window)


@pytest.mark.torch
@settings(max_examples=100, deadline=None)
@given(
    hkv=st.integers(1, 2),
    group=st.sampled_from([1, 3, 4]),
    lq=st.sampled_from([1, 2, 6, 7, 63, 65, 193, 290]),
    lk=st.sampled_from([1, 3, 64, 65, 129, 257, 600]),
    d=st.sampled_from([1, 16, 48, 59, 64, 80, 96, 128, 192, 256]),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 300)),
    mask=st.sampled_from([None, "bool", "bool over keys", "additive"]),
    layout=st.sampled_from(["dense", "BLHD", "numpy BLHD"]),
    config=st.sampled_from([(isa, n) for isa in ISAS for n in (1, 2)]),
    seed=st.integers(0, 2**31),
)
def test_random_configurations(hkv, group, lq, lk, d, dtype, causal, window, mask, layout, config, seed):
    """Every option together on random shapes (up to several row blocks and key tiles): dtypes,
    bool / additive / broadcast masks with fully masked rows, [B, L, H, D] layouts (torch and
    numpy), each ISA on 1 and 2 threads; inputs never modified."""
    torch = require("torch")
    if lq * lk * d * hkv * group > 2e7:
        return  # (the float64 oracle's time)
    rng = np.random.default_rng(seed)
    hq = hkv * group

    def make(h, length):
        x = rng.standard_normal((1, length, h, d)).astype(np.float32).transpose(0, 2, 1, 3)
        if layout == "dense":
            x = np.ascontiguousarray(x)
        t = torch.from_numpy(x).to(getattr(torch, dtype))
        return t.numpy() if layout == "numpy BLHD" and dtype != "bfloat16" else t

    q, k, v = make(hq, lq), make(hkv, lk), make(hkv, lk)
    m = None
    if mask == "additive":
        m = rng.standard_normal((1, hq, lq, lk)).astype(np.float32)
    elif mask is not None:
        m = rng.random((1, hq, lq, lk) if mask == "bool" else (1, 1, 1, lk)) < 0.7
        if mask == "bool" and lq > 1:
            m[:, :, 1] = False  # a fully masked row: 0 out, lse -inf, no NaN
    if m is not None and isinstance(q, torch.Tensor):
        m = torch.from_numpy(m)
    copies = [x.clone() if isinstance(x, torch.Tensor) else x.copy() for x in (q, k, v)]
    with kernel_config(isa=config[0], threads=config[1]):
        out, lse = ff.sdpa(q, k, v, mask=m, causal=causal, window=window, return_lse=True)
    as64 = [np.asarray(x.float() if isinstance(x, torch.Tensor) else x, np.float64) for x in (out, lse, q, k, v)]
    check(as64[0], as64[1], *as64[2:], tol=dtype, mask=None if m is None else np.asarray(m),
          causal=causal, window=window)
    for x, c in zip((q, k, v), copies):
        assert (x == c).all()


@pytest.mark.slow
def test_big_prefill(rng):
    q, k, v = make_qkv(rng, 1, 4, 2, 1025, 1025, 128)
    out = ff.sdpa(q, k, v, causal=True)
    check(out, None, q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize(
    "shape, opts",
    [((1, 8, 2, 1, 257, 64), dict()), ((2, 7, 1, 33, 129, 59), dict(causal=True, scale=0.3)),
     ((1, 4, 4, 31, 127, 32), dict(causal=True, window=9)),
     ((2, 4, 2, 3, 127, 32), dict(mask="bool [B, 1, Lq, Lk]")), ((1, 4, 1, 33, 31, 64), dict(mask="float32 [Lk]")),
     ((2, 4, 2, 3, 129, 32), dict(mask="float32 [B, Hq, 1, Lk]", causal=True))],
    ids=str,
)
def test_eager_call_in_one_step_matches_the_general_path(rng, isa, threads, dtype, shape, opts):
    """The common call on ndarrays (_C.sdpa_numpy: checked and described in C++) gives the
    general path's bits (native_sdpa, the same kernel), in q's dtype and layout; q as the
    transpose of a [B, Lq, Hq, D] array; masks bool or additive, broadcast along any axis."""
    from fusedformer import _C
    from fusedformer.ops_attention import HUGEPAGE_MIN_BYTES, native_sdpa

    b, hq, _, lq, lk, _ = shape
    q, k, v = (x.astype(dtype) for x in make_qkv(rng, *shape))
    q = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    opts = dict(opts)
    if "mask" in opts:
        kind, dims = opts["mask"].split(" ", 1)
        full = dict(B=b, Hq=hq, Lq=lq, Lk=lk)
        mshape = [full.get(n, 1) for n in dims.strip("[]").split(", ")]
        opts["mask"] = (rng.random(mshape) < 0.8 if kind == "bool"
                        else np.where(rng.random(mshape) < 0.2, -np.inf, rng.standard_normal(mshape)).astype(np.float32))
    mask = opts.get("mask")
    before = [x.copy() for x in (q, k, v) + (() if mask is None else (mask,))]
    out = _C.sdpa_numpy(q, k, v, mask, opts.get("causal", False), opts.get("scale"), opts.get("window"),
                        HUGEPAGE_MIN_BYTES)
    assert out is not None and out.dtype == q.dtype and out.shape == q.shape and out.strides == q.strides
    want = native_sdpa(q, k, v, mask=mask, causal=opts.get("causal", False), scale=opts.get("scale"),
                       window=opts.get("window") or 0)
    np.testing.assert_array_equal(out, want)
    assert not np.isnan(out).any()
    for x, x0 in zip((q, k, v) + (() if mask is None else (mask,)), before):
        np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(ff.sdpa(q, k, v, **opts), want)
    if mask is not None:  # and the mask acts: the call without it differs
        assert not np.array_equal(ff.sdpa(q, k, v, **{**opts, "mask": None}), want)
    # with the lse: (out, lse), lse contiguous float32 [B, Hq, Lq], the general path's bits
    out, lse = _C.sdpa_numpy(q, k, v, mask, opts.get("causal", False), opts.get("scale"), opts.get("window"),
                             HUGEPAGE_MIN_BYTES, True)
    want, want_lse = native_sdpa(q, k, v, mask=mask, causal=opts.get("causal", False), scale=opts.get("scale"),
                                 window=opts.get("window") or 0, return_lse=True)
    assert lse.dtype == np.float32 and lse.shape == q.shape[:3] and lse.flags.c_contiguous
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(lse, want_lse)
    for got, w in zip(ff.sdpa(q, k, v, return_lse=True, **opts), (want, want_lse)):
        np.testing.assert_array_equal(got, w)


def test_eager_call_in_one_step_declines_the_rest(rng):
    """_C.sdpa_numpy returns None, running nothing, for every call it does not take: those go
    down ff.sdpa's general path (with its own errors, or its copies and layouts)."""
    from fusedformer import _C
    from fusedformer.ops_attention import HUGEPAGE_MIN_BYTES

    q, k, v = make_qkv(rng, 1, 4, 2, 5, 9, 32)

    def declines(q=q, k=k, v=v, mask=None, causal=False, scale=None, window=None, limit=HUGEPAGE_MIN_BYTES):
        return _C.sdpa_numpy(q, k, v, mask, causal, scale, window, limit) is None

    assert not declines()
    assert not declines(mask=np.ones((5, 9), bool))
    assert declines(mask=np.ones((5, 9), np.float16))  # the general path converts it
    assert declines(mask=np.ones((5, 9), np.int32))  # the general path's error
    assert declines(mask=np.ones((5, 8), bool))  # not broadcastable
    assert declines(mask=np.ones((1, 1, 1, 5, 9), bool))  # 5-d
    assert declines(mask=np.broadcast_to(np.ones((1, 9), bool), (5, 9)))  # a broadcast axis
    assert declines(mask=np.ones((5, 9), bool).tolist())
    assert declines(q=q.tolist())  # not an ndarray
    assert declines(q=q.view(np.ma.MaskedArray))  # a subclass
    assert declines(k=k.astype(np.float16), v=v.astype(np.float16))  # mixed dtypes
    assert declines(q=q.astype(np.float64), k=k.astype(np.float64), v=v.astype(np.float64))
    assert declines(q=q.astype(">f4"), k=k.astype(">f4"), v=v.astype(">f4"))  # byte order
    assert declines(q=q[0])  # 3-d
    assert declines(q=q[:, :, :0])  # zero-sized
    assert declines(v=v[:, :, :8])  # v's shape is not k's
    assert declines(q=rng.standard_normal((1, 3, 5, 32)).astype(np.float32))  # heads do not divide
    assert declines(q=np.broadcast_to(q[:, :1], q.shape))  # a broadcast axis (stride 0)
    assert declines(q=rng.standard_normal((1, 4, 32, 5)).astype(np.float32).transpose(0, 1, 3, 2))
    buf = np.ones(1 << 16, np.uint8)  # a stride of 642 bytes: not whole float32 elements
    assert declines(q=np.ndarray(q.shape, np.float32, buffer=buf, strides=(4096, 642, 128, 4)))
    assert declines(causal=np.bool_(True))
    for scale in (1, np.float64(0.5), float("nan"), 1e40, 3e38):
        assert declines(scale=scale)
    for window in (0, True, np.int64(4), -(2**70)):
        assert declines(window=window)
    assert declines(limit=q.nbytes)  # large outputs take the output cache


def test_window_wider_than_int64_is_no_window(rng):
    """A window of Lk keys or more, up to past int64 (a Python int may be any size), limits
    nothing; Lq > Lk too, where the diagonal starts below key 0."""
    for lq, lk in ((5, 9), (9, 5)):
        q, k, v = make_qkv(rng, 1, 4, 2, lq, lk, 32)
        for causal in (False, True):
            want = ff.sdpa(q, k, v, causal=causal)
            for window in (lk, 2**62, 2**63 - 1, 2**70):
                np.testing.assert_array_equal(ff.sdpa(q, k, v, causal=causal, window=window), want)
