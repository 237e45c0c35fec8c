"""ff.qmatmul kernels against x @ W.T with W = qw.dequantize(), in float64: this measures the
kernel arithmetic only (quantization error is tested in test_quant.py)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import fusedformer as ff
from fusedformer import reference
from fusedformer.quant import Affine, Int8, Palettize, Prune, compress

from tests.conftest import kernel_config, require

SCHEMES = [
    *(Affine(b, g) for b, g in [(2, 32), (3, 64), (4, 64), (4, 32), (4, 128), (5, 32), (6, 128), (8, 64)]),
    Int8(),
    Int8(zero_point=True),
    *(Palettize(b) for b in (1, 2, 3, 4, 6, 8)),
    Palettize(4, "per_grouped_channel", 1),
    Palettize(3, "per_grouped_channel", 7),
    Prune(0.5),
    Prune(n_m=(2, 4)),
    Prune(0.6, then=Affine(4, 32)),
    Prune(0.5, then=Palettize(4)),
    Prune(n_m=(2, 4), then=Palettize(2, "per_grouped_channel", 7)),
]
N, K = 77, 256  # odd N, several K chunks of the GEMV decode (and a partial GEMM panel)
# Error / (sum |x| max |W|) against the float64 product of the rounded x: the output's rounding
# (at most 2^-11 or 2^-9 of |y| <= that scale) and fp32 accumulation.
TOL = {"float32": 2e-6, "float16": 6e-4, "bfloat16": 2e-3}


@functools.lru_cache(maxsize=None)
def weight(scheme):
    rng = np.random.default_rng(abs(hash(repr(scheme))) % 2**32)
    w = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
    return compress(w, scheme)


def check(y, x, qw, dtype="float32"):
    ref = reference.matmul_t(np.asarray(x, np.float64), qw.dequantize().astype(np.float64))
    y = np.asarray(y, np.float64)
    assert y.shape == ref.shape
    assert np.isfinite(y).all()
    scale = np.abs(np.asarray(x, np.float64)).sum(-1, keepdims=True) * np.abs(qw.dequantize()).max()
    err = np.abs(y - ref) / scale
    assert err.max() <= TOL[dtype], err.max()


@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 33, 512])
@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
def test_qmatmul_all_formats(scheme, m, isa, threads, rng):
    qw = weight(scheme)
    x = rng.standard_normal((m, K)).astype(np.float32)
    x_copy = x.copy()
    check(ff.qmatmul(x, qw), x, qw)
    np.testing.assert_array_equal(x, x_copy)


@pytest.mark.parametrize("k", [8, 40, 33, 1])
@pytest.mark.parametrize("m", [1, 9])
def test_int8_odd_k(k, m, isa, rng):
    w = rng.standard_normal((13, k)).astype(np.float32)
    qw = compress(w, Int8(zero_point=True))
    x = rng.standard_normal((m, k)).astype(np.float32)
    check(ff.qmatmul(x, qw), x, qw)


@pytest.mark.parametrize("k", [16, 48, 80])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_4bit_lut_k_not_a_multiple_of_32(k, m, isa, rng):
    # the 4-bit GEMV takes 32 codes per step for m <= 2 and finishes with a 16-code step
    w = (rng.standard_normal((20, k)) * 0.05).astype(np.float32)
    qw = compress(w, Palettize(4, "per_grouped_channel", 4))
    x = rng.standard_normal((m, k)).astype(np.float32)
    check(ff.qmatmul(x, qw), x, qw)


@pytest.mark.parametrize("k", [32, 96, 160])
@pytest.mark.parametrize("m", [1, 2, 3, 8])
def test_4bit_lut_k_an_odd_multiple_of_32(k, m, isa, rng):
    # AVX-512 builds take 64 codes per step for m <= 2 and finish with a 32-code step
    w = (rng.standard_normal((21, k)) * 0.05).astype(np.float32)
    qw = compress(w, Palettize(4, "per_grouped_channel", 7))
    x = rng.standard_normal((m, k)).astype(np.float32)
    check(ff.qmatmul(x, qw), x, qw)


@pytest.mark.parametrize("scheme", [Palettize(4), Int8(), Int8(zero_point=True), Affine(8, 32), Affine(8, 64)], ids=repr)
@pytest.mark.parametrize("k, m", [(2080, 8), (4096, 4), (3104, 5), (2085, 8)])
def test_gemv_in_passes_over_k(scheme, k, m, isa, rng):
    # x rows over 48 KiB go through AVX-512's 4-bit LUT, int8 and 8-bit affine GEMVs in passes
    # over parts of K (704 + 704 + 672, 2 x 2048, 1600 + 1504 codes here; int8's 2085 is 704 +
    # 704 + 677, its last 5 codes a tail after the vector steps; 8-bit affine passes are whole
    # groups), each adding its partial dots to y (the bias term after the last)
    if isinstance(scheme, Palettize) and k % 32:
        pytest.skip("the zmm LUT GEMV takes K % 32 == 0")
    if isinstance(scheme, Affine) and k % scheme.group_size:
        pytest.skip("K is whole groups")
    w = (rng.standard_normal((37, k)) * 0.05).astype(np.float32)
    qw = compress(w, scheme)
    x = rng.standard_normal((m, k)).astype(np.float32)
    check(ff.qmatmul(x, qw), x, qw)


# The 4-bit affine GEMV on integer dot products splits x per group into three int8 parts scaled
# by the group's max |x| (AVX-512 VNNI: vpdpbusd over 128-code superblocks, m <= 3; AVX2:
# vpmaddubsw over 64-code blocks, m = 1); the cases below are the ones that split must get right
# or hand to the fp32 path (non-finite x, tiny groups, K % 64 != 0).
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 2, 5, 8])  # 8: two passes of 4 rows over each W row's codes
def test_4bit_affine_group_scales_are_per_group(group, m, isa, rng):
    # huge x over all-zero weight groups, small x elsewhere: a per-row x scale would lose the
    # small groups; the result is the small groups' sum alone
    k = 4 * group
    w = (rng.standard_normal((37, k)) * 0.05).astype(np.float32)
    w[:, group : 2 * group] = 0
    qw = compress(w, Affine(4, group))
    assert not qw.dequantize()[:, group : 2 * group].any()
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, group : 2 * group] *= np.float32(1e12)
    x[:, 3 * group :] = 0  # an all-zero group too
    ref = reference.matmul_t(x.astype(np.float64), qw.dequantize().astype(np.float64))
    x_small = x.copy()
    x_small[:, group : 2 * group] = 0
    scale = np.abs(x_small.astype(np.float64)).sum(-1, keepdims=True) * np.abs(qw.dequantize()).max()
    assert (np.abs(ff.qmatmul(x, qw) - ref) / scale).max() <= TOL["float32"]


@pytest.mark.parametrize("m", [1, 3, 9])
@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
def test_non_finite_x_gives_the_reference_infinities(scheme, m, isa, rng):
    """A row of x with an infinity gives +-inf where x @ W.T does in float64 and NaN only where
    it does (infinities of both signs, or one against a zero weight); a NaN makes its row NaN;
    the other rows are untouched. (The factored affine / int8 sums gave NaN in most columns.)"""
    qw = weight(scheme)
    x = rng.standard_normal((m, K)).astype(np.float32)
    bad = {0: [(100, np.inf)], m - 1: [(7, -np.inf)]}
    if m >= 3:
        bad[1] = [(200, np.nan)]
    if m >= 9:
        bad[4] = [(3, np.inf), (250, -np.inf)]
    for r, entries in bad.items():
        for c, value in entries:
            x[r, c] = value
    x_copy = x.copy()
    y = ff.qmatmul(x, qw)
    np.testing.assert_array_equal(x, x_copy)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = reference.matmul_t(x.astype(np.float64), qw.dequantize().astype(np.float64))
    w = qw.dequantize()
    for r in sorted(bad):
        assert not np.isfinite(y[r]).any()
        # A weight within rounding of 0 (the kernels decode scale * q + bias with one rounding,
        # dequantize() with two) may be 0 on one side only: inf * it is NaN there, +-inf here.
        inf_cols = [c for c, value in bad[r] if np.isinf(value)]
        near_zero = (np.abs(w[:, inf_cols]) <= 2.0**-20 * np.abs(w).max()).any(axis=1)
        same = ~near_zero
        np.testing.assert_array_equal(np.isnan(y[r, same]), np.isnan(ref[r, same]))
        keep = same & ~np.isnan(ref[r])
        np.testing.assert_array_equal(y[r, keep], ref[r, keep])  # +-inf, as the reference
    good = [r for r in range(m) if r not in bad]
    if good:
        check(y[good], x[good], qw)


@pytest.mark.parametrize("m", [1, 2, 3, 9])
@pytest.mark.parametrize("scheme", [Affine(8, 64), Affine(4, 32), Int8(), Int8(zero_point=True), Prune(0.5, then=Affine(8, 64))],
                         ids=repr)
def test_results_float_holds_do_not_overflow_on_the_way(scheme, m, isa, rng):
    """x ~ 1e36 against weights near 1: y ~ 6e37 fits float32, but the factored sums (sum x q,
    q up to 255) overflow first; such outputs are recomputed, and true overflow stays inf."""
    w = rng.uniform(0.99, 1.0, (5, 64)).astype(np.float32)
    qw = compress(w, scheme)
    x = np.full((m, 64), 1e36, np.float32) * rng.uniform(0.5, 1.0, (m, 64)).astype(np.float32)
    y = ff.qmatmul(x, qw)
    ref = reference.matmul_t(x.astype(np.float64), qw.dequantize().astype(np.float64))
    assert np.abs(ref).max() < np.finfo(np.float32).max
    np.testing.assert_allclose(y, ref, rtol=1e-5)
    x[0] = 1e38  # the true result overflows float32: inf, of the right sign
    y = ff.qmatmul(x, qw)
    assert np.all(np.isposinf(y[0]))
    np.testing.assert_allclose(y[1:], ref[1:], rtol=1e-5)


# K % 64 == 32 (96, 160): the split's 64-code blocks do not fit; 128 takes them. Groups with
# max |x| below 2^-100 go to the fp32 path; 2e-30 is just above that floor.
@pytest.mark.parametrize("k", [96, 128, 160])
@pytest.mark.parametrize("x_scale", [1.0, 1e-33, 2e-30, 1e30])
@pytest.mark.parametrize("m", [1, 2])
def test_4bit_affine_odd_blocks_and_extreme_scales(k, x_scale, m, isa, rng):
    w = (rng.standard_normal((21, k)) * 0.05).astype(np.float32)
    qw = compress(w, Affine(4, 32))
    x = (rng.standard_normal((m, k)) * x_scale).astype(np.float32)
    check(ff.qmatmul(x, qw), x, qw)


# K % 128 == 64: the last 128-code superblock of the VNNI form holds one 64-code block, its
# other half zero codes against zero parts; its one or two groups' factors come from a masked
# load that stops at the row's last group.
@pytest.mark.parametrize("k, group", [(64, 32), (64, 64), (192, 32), (192, 64), (320, 32), (448, 64)])
@pytest.mark.parametrize("m", [1, 2, 3, 8])
def test_4bit_affine_half_superblock_at_the_end(k, group, m, isa, rng):
    w = (rng.standard_normal((23, k)) * 0.05).astype(np.float32)
    qw = compress(w, Affine(4, group))
    x = rng.standard_normal((m, k)).astype(np.float32)
    check(ff.qmatmul(x, qw), x, qw)


@pytest.mark.parametrize("group", [32, 64])
def test_4bit_affine_split_rounding_ties(group, isa, rng):
    # each group's max |x| is 127 (the split's unit is 1), the rest half-integers and values a
    # half step of the second part off them: every rounding of the split lands on a tie
    k = 4 * group
    w = (rng.standard_normal((19, k)) * 0.05).astype(np.float32)
    qw = compress(w, Affine(4, group))
    x = rng.integers(-127, 127, size=(1, k)).astype(np.float32) + np.float32(0.5)
    x[:, 1::3] += np.float32(0.5 / 254)
    x[:, ::group] = 127.0
    check(ff.qmatmul(x, qw), x, qw)


@pytest.mark.parametrize("m", [1, 3, 20])
@pytest.mark.parametrize("scheme", [Affine(4, 64), Int8(), Palettize(3), Prune(0.5, then=Affine(2, 32))], ids=repr)
def test_thread_count_does_not_change_results(m, scheme, isa, rng):
    # big enough that the pool splits the rows (small problems run on the calling thread)
    w = (rng.standard_normal((1031, 1024)) * 0.05).astype(np.float32)
    qw = compress(w, scheme)
    x = rng.standard_normal((m, 1024)).astype(np.float32)
    with kernel_config(threads=1):
        y1 = ff.qmatmul(x, qw)
    with kernel_config(threads=2):
        y2 = ff.qmatmul(x, qw)
    np.testing.assert_array_equal(y1, y2)
    check(y2, x, qw)


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("sparsity", [0.0, 0.9, 0.99])
@pytest.mark.parametrize(("then", "k"), [(None, 64), (Affine(4, 32), 192), (Affine(3, 128), 256),
                                         (Palettize(2), 1024)], ids=repr)
def test_pruned_gemv_at_sparsity_extremes(then, k, sparsity, m, isa, rng):
    """The compacted pruned GEMV (1-2 x rows) with every column kept, groups left empty, and
    rows with a handful of survivors."""
    qw = compress((rng.standard_normal((40, k)) * 0.05).astype(np.float32), Prune(sparsity, then=then))
    x = rng.standard_normal((m, k)).astype(np.float32)
    check(ff.qmatmul(x, qw), x, qw)


@pytest.mark.parametrize("m", [9, 13])
@pytest.mark.parametrize(("scheme", "k"), [(Affine(4, 64), 1088), (Int8(), 1099), (Palettize(3), 1088),
                                           (Prune(0.5, then=Affine(4, 32)), 1056)], ids=repr)
def test_gemm_over_several_k_chunks(scheme, k, m, isa, rng):
    """The GEMM accumulates K chunks (two full ones and a partial one here) into y, over a
    partial block of x rows and a partial W panel."""
    qw = compress((rng.standard_normal((67, k)) * 0.05).astype(np.float32), scheme)
    x = rng.standard_normal((m, k)).astype(np.float32)
    check(ff.qmatmul(x, qw), x, qw)


@pytest.mark.parametrize("m", [1, 5, 40])
def test_float16_and_batched_input(m, isa, rng):
    qw = weight(Affine(4, 32))
    x = rng.standard_normal((2, m, K)).astype(np.float16)
    y = ff.qmatmul(x, qw)
    assert y.dtype == np.float16 and y.shape == (2, m, N)
    check(y.reshape(-1, N), x.reshape(-1, K).astype(np.float32), qw, "float16")


def test_strided_rows(rng):
    qw = weight(Palettize(4))
    x = rng.standard_normal((9, 2 * K)).astype(np.float32)[:, ::2]
    check(ff.qmatmul(x, qw), x, qw)


@pytest.mark.torch
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("m", [1, 17])
def test_torch_dtypes(dtype, m, isa, rng):
    torch = require("torch")
    qw = weight(Int8())
    x = torch.from_numpy(rng.standard_normal((m, K)).astype(np.float32)).to(getattr(torch, dtype))
    y = ff.qmatmul(x, qw)
    assert isinstance(y, torch.Tensor) and y.dtype == x.dtype
    check(y.float().numpy(), x.float().numpy(), qw, dtype)


@pytest.mark.parametrize("scheme", [Affine(4, 64), Int8(), Palettize(3), Prune(0.5, then=Affine(4, 32))], ids=repr)
def test_every_output_element_written(scheme, isa, rng):
    """_C.qmatmul into a given out (as the output cache lends it): poisoned first, all written."""
    from fusedformer import _C
    from fusedformer.ops_quant import kernel_args

    qw = weight(scheme)
    for m in (1, 5, 33):
        x = rng.standard_normal((m, K)).astype(np.float32)
        out = np.full((m, N), np.nan, np.float32)
        assert _C.qmatmul(x, 0, *kernel_args(qw), out) is out
        check(out, x, qw)


def test_large_outputs_reuse_cached_memory(rng, monkeypatch):
    """Outputs of HUGEPAGE_MIN_BYTES and more (a prefill's logits) come from sdpa's output cache:
    a released one is taken again by the next of its size, in numpy and torch."""
    from fusedformer import ops_attention

    monkeypatch.setattr(ops_attention, "_OUTPUT_CACHE", ops_attention._OutputCache(64 << 20))
    n = ops_attention.HUGEPAGE_MIN_BYTES // (4 * 4)  # 4 rows of fp32: exactly the threshold
    qw = compress((rng.standard_normal((n, 64)) * 0.05).astype(np.float32), Int8())
    x = rng.standard_normal((4, 64)).astype(np.float32)
    y = ff.qmatmul(x, qw)
    check(y, x, qw)
    assert ff.get_cache_memory() == 0
    address = y.ctypes.data
    del y
    assert ff.get_cache_memory() == ops_attention.HUGEPAGE_MIN_BYTES
    y = ff.qmatmul(x, qw)
    assert y.ctypes.data == address and ff.get_cache_memory() == 0
    check(y, x, qw)
    del y
    torch = pytest.importorskip("torch")
    t = ff.qmatmul(torch.from_numpy(x), qw)
    assert t.data_ptr() == address
    check(t.numpy(), x, qw)
    small = ff.qmatmul(x[:3], qw)  # under the threshold: not from the cache
    assert small.ctypes.data != address and ff.get_cache_memory() == 0


def test_bad_out(rng):
    from fusedformer import _C
    from fusedformer.ops_quant import kernel_args

    args = kernel_args(weight(Int8()))
    x = rng.standard_normal((2, K)).astype(np.float32)
    for out, msg in [(np.zeros((2, N), np.float16), "dtype"), (np.zeros((3, N), np.float32), r"\[2, 77\]"),
                     (np.zeros((N, 2), np.float32).T, "C-contiguous"), ([0.0], "numpy array")]:
        with pytest.raises(ValueError, match=r"^\[qmatmul\] out.*" + msg):
            _C.qmatmul(x, 0, *args, out)
    frozen = np.zeros((2, N), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        _C.qmatmul(x, 0, *args, frozen)


def test_bad_input(rng):
    qw = weight(Affine(4, 64))
    with pytest.raises(ValueError, match=r"\[qmatmul\].*K=256"):
        ff.qmatmul(np.zeros((2, 100), np.float32), qw)
    with pytest.raises(TypeError, match=r"\[qmatmul\]"):
        ff.qmatmul(np.zeros((2, K), np.float64), qw)
    with pytest.raises(TypeError, match=r"\[qmatmul\] qw"):
        ff.qmatmul(np.zeros((2, K), np.float32), np.zeros((N, K)))
    with pytest.raises(TypeError, match=r"^\[qmatmul\] x must be an array or tensor, got None"):
        ff.qmatmul(None, qw)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", [Affine(4, 64), Int8(), Palettize(4), Prune(0.5, then=Affine(4, 64))], ids=repr)
@pytest.mark.parametrize("m", [1, 8, 300])
def test_large_shapes(scheme, m, rng):
    w = (rng.standard_normal((1031, 2048)) * 0.02).astype(np.float32)
    qw = compress(w, scheme)
    x = rng.standard_normal((m, 2048)).astype(np.float32)
    check(ff.qmatmul(x, qw), x, qw)


def test_random_shapes_and_schemes():
    """hypothesis over (M, N, K, scheme): kernel arithmetic against the float64 oracle."""
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies

    schemes = st.sampled_from([Affine(2, 32), Affine(3, 32), Affine(4, 32), Affine(5, 64), Affine(6, 32),
                               Affine(8, 32), Int8(), Int8(zero_point=True), Palettize(1), Palettize(4),
                               Palettize(6), Prune(0.5), Prune(0.3, then=Affine(4, 32)),
                               Prune(n_m=(2, 4), then=Palettize(3))])

    @hyp.settings(max_examples=25, deadline=None, database=None)
    @hyp.given(m=st.integers(1, 40), n=st.integers(1, 70), k_blocks=st.integers(1, 6), scheme=schemes,
               seed=st.integers(0, 2**31))
    def run(m, n, k_blocks, scheme, seed):
        rng = np.random.default_rng(seed)
        k = 32 * k_blocks if not isinstance(scheme, Affine) or scheme.group_size == 32 else 64 * k_blocks
        qw = compress(rng.standard_normal((n, k)).astype(np.float32), scheme)
        x = rng.standard_normal((m, k)).astype(np.float32)
        check(ff.qmatmul(x, qw), x, qw)

    run()
