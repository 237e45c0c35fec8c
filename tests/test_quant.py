"""fusedformer.quant: formats, quantization error, MLX bit identity, k-means vs coremltools,
serialisation and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fusedformer.quant import (Affine, Int8, Palettize, Prune, QuantizedWeight, compress, pack_bits,
                               unpack_bits)

from tests.conftest import require


def gaussian(rng, shape=(96, 256), std=0.02):
    return (rng.standard_normal(shape) * std).astype(np.float32)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_roundtrip(bits, rng):
    q = rng.integers(0, 1 << bits, size=(5, 48)).astype(np.uint8)
    packed = pack_bits(q, bits)
    assert packed.shape == (5, 48 * bits // 8)
    np.testing.assert_array_equal(unpack_bits(packed, bits, 48), q)


# minimum SNR (dB) on a Gaussian weight and the storage bits per weight (all arrays counted)
SNR = [
    (Affine(2, 64), 8, 3.0), (Affine(3, 64), 14, 4.0), (Affine(4, 64), 20, 5.0), (Affine(4, 32), 21, 6.0),
    (Affine(5, 64), 26, 6.0), (Affine(6, 64), 32, 7.0), (Affine(8, 128), 43, 8.5),
    (Int8(), 40, 8 + 32 / 256), (Int8(zero_point=True), 40, 8 + 40 / 256),
    (Palettize(1), 4, None), (Palettize(2), 9, None), (Palettize(3), 14, None), (Palettize(4), 20, None),
    (Palettize(6), 31, None), (Palettize(8), 43, None), (Palettize(4, "per_grouped_channel", 16), 20, None),
    (Prune(0.5), 10, None), (Prune(n_m=(2, 4)), 8, None), (Prune(0.5, then=Affine(4, 64)), 9.5, None),
    (Prune(0.5, then=Palettize(4)), 9.5, None),
]


@pytest.mark.parametrize("scheme,min_snr,bpw", SNR, ids=[repr(s[0]) for s in SNR])
def test_quantization_error(scheme, min_snr, bpw, rng):
    w = gaussian(rng)
    qw = compress(w, scheme)
    d = qw.dequantize()
    assert d.dtype == np.float32 and d.shape == w.shape
    assert qw.snr_db(w) >= min_snr
    if bpw is not None:
        assert qw.bits_per_weight == pytest.approx(bpw)
    assert qw.bits_per_weight * w.size == 8 * qw.nbytes


def test_prune_structure(rng):
    w = gaussian(rng)
    qw = compress(w, Prune(0.75))
    d = qw.dequantize()
    assert np.count_nonzero(d) == w.size // 4
    kept = np.abs(w[d != 0]).min()
    assert np.abs(w[d == 0]).max() <= kept
    np.testing.assert_array_equal(d[d != 0], w[d != 0])
    d = compress(w, Prune(n_m=(2, 4))).dequantize()
    assert ((d.reshape(-1, 4) != 0).sum(-1) <= 2).all()
    assert (compress(w, Prune(0.0)).dequantize() == w).all()


@pytest.mark.parametrize("k", [64, 72])  # whole mask words per row, or not
def test_row_offsets_count_each_rows_survivors(k, rng):
    qw = compress(gaussian(rng, (9, k)), Prune(0.6))
    expected = np.concatenate([[0], np.cumsum((qw.dequantize() != 0).sum(1))])
    np.testing.assert_array_equal(qw.row_offsets(), expected)
    assert qw.row_offsets().dtype == np.int64


def test_palettize_luts(rng):
    w = gaussian(rng, (32, 64))
    qw = compress(w, Palettize(3, "per_grouped_channel", 8))
    lut = qw.arrays["lut"]
    assert lut.shape == (4, 8) and (np.diff(lut, axis=1) >= 0).all()
    d = qw.dequantize()
    for g in range(4):
        assert set(np.unique(d[8 * g : 8 * g + 8])) <= set(lut[g])


def test_affine_matches_mlx_rule_edges():
    w = np.zeros((2, 64), np.float32)
    w[1] = np.linspace(-1, 3, 64)
    qw = compress(w, Affine(4, 32))
    assert (qw.dequantize()[0] == 0).all()
    assert qw.dequantize()[1].max() == np.float32(3)  # the larger-magnitude edge is exact


@pytest.mark.mlx
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_mlx_bit_identity(bits, group_size, rng):
    mx = require("mlx")
    w = gaussian(rng, (24, 256), std=0.1)
    w[0, :group_size] = 0  # a constant group
    w[1, :7] = 5.0
    qw = compress(w, Affine(bits, group_size))
    w_q, scales, biases = mx.quantize(mx.array(w), group_size=group_size, bits=bits)
    np.testing.assert_array_equal(np.array(w_q), qw.arrays["w_q"])
    np.testing.assert_array_equal(np.array(scales), qw.arrays["scales"])
    np.testing.assert_array_equal(np.array(biases), qw.arrays["biases"])
    ours = qw.to_mlx()
    d = np.array(mx.dequantize(*ours, group_size=group_size, bits=bits))
    np.testing.assert_array_equal(d, qw.dequantize())
    x = rng.standard_normal((3, 256)).astype(np.float32)
    y = np.array(mx.quantized_matmul(mx.array(x), *ours, transpose=True, group_size=group_size, bits=bits))
    np.testing.assert_allclose(y, x @ qw.dequantize().T, rtol=1e-4, atol=1e-4)


@pytest.mark.coreml
@pytest.mark.parametrize("bits,shape", [(1, (64, 128)), (2, (96, 256)), (4, (64, 128)), (4, (256, 512)),
                                        (6, (128, 256)), (8, (64, 256))])
def test_kmeans_never_worse_than_coremltools(bits, shape, rng):
    require("coremltools")
    require("sklearn")
    from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight

    w = gaussian(rng, shape)
    w[0, :3] = 0.2  # outliers
    lut, idx = _get_kmeans_lookup_table_and_weight(bits, w)
    err_coreml = np.sum((w.astype(np.float64).ravel() - lut.ravel()[idx]) ** 2)
    qw = compress(w, Palettize(bits))
    err_ours = np.sum((w.astype(np.float64) - qw.dequantize()) ** 2)
    assert err_ours <= err_coreml * (1 + 1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("n", [4, 200_000])
def test_kmeans_refuses_non_finite_values(bad, n, rng):
    """A NaN never equals itself: the DP's run of equal values never ended, and memory grew
    without bound (compress() checks first; the binding and kmeans_lut did not)."""
    from fusedformer import _C
    from fusedformer.quant.algorithms import kmeans_lut

    v = rng.standard_normal(n).astype(np.float32)
    v[n // 2] = bad
    with pytest.raises(ValueError, match=rf"^\[quant\] k-means values must be finite, got .* at index {n // 2}$"):
        _C.quant_kmeans1d(v, 4)
    with pytest.raises(ValueError, match=r"^\[quant\] k-means values must be finite"):
        kmeans_lut(v, 2)


def test_kmeans_exact_on_small_data():
    # Optimal 2-means: {0, 0, 1, 1, 2} and {10, 11, 11}.
    w = np.array([[0, 1, 2, 10, 11, 11, 0, 1]], np.float32)
    lut = compress(w, Palettize(1)).arrays["lut"][0]
    np.testing.assert_allclose(lut, [4 / 5, 32 / 3], rtol=1e-6)
    lut = compress(np.full((1, 8), 0.5, np.float32), Palettize(2)).arrays["lut"][0]
    np.testing.assert_array_equal(lut, [0.5] * 4)


def _lut_rmse(values, lut):
    from fusedformer.quant.algorithms import lut_assign

    return float(np.sqrt(np.mean((values.astype(np.float64) - lut[lut_assign(values, lut)]) ** 2)))


# 4096 values: the exact DP; 2**17: the histogram (bins over the bulk, far values exact).
@pytest.mark.parametrize("n,bits", [(4096, 8), (1 << 17, 4), (1 << 17, 8)])
@pytest.mark.parametrize("outlier", [1e4, 1e6, -1e12])
def test_kmeans_far_outliers_leave_the_bulk_its_palette(n, bits, outlier, rng):
    """Two values far from the rest take two LUT entries each to itself; the other 2**bits - 2
    serve the bulk about as well as a palette of the bulk alone (k/(k-2) for a Gaussian). Bins of
    equal width over the whole range, and prefix sums taken from the first point, left 3 to 10
    distinct entries or lost the bulk's error to rounding (up to 60 times the error)."""
    from fusedformer.quant.algorithms import kmeans_lut

    bulk = rng.standard_normal(n - 2).astype(np.float32)
    far = np.array([outlier, -outlier / 3], np.float32)
    values = np.concatenate([bulk[: n // 3], far[:1], bulk[n // 3:], far[1:]])
    lut = kmeans_lut(values, bits)
    assert np.isfinite(lut).all() and np.all(np.diff(lut) >= 0)
    for x in far:
        np.testing.assert_allclose(lut[np.abs(lut - x).argmin()], x, rtol=1e-6)
    k = 1 << bits
    assert _lut_rmse(bulk, lut) <= 1.1 * k / (k - 2) * _lut_rmse(bulk, kmeans_lut(bulk, bits))


@pytest.mark.slow
def test_kmeans_large_tensor(rng):
    """A 2048 x 4096 weight (the native k-means; its time is the benchmarks' business, not a test's)."""
    w = rng.standard_normal((2048, 4096)).astype(np.float32)
    qw = compress(w, Palettize(4))
    assert qw.snr_db(w) > 20


SERIAL = [Affine(3, 32), Int8(), Int8(zero_point=True), Palettize(6, "per_grouped_channel", 8), Prune(0.5),
          Prune(n_m=(2, 4), then=Affine(4, 64)), Prune(0.3, then=Palettize(2))]


@pytest.mark.parametrize("scheme", SERIAL, ids=repr)
def test_serialisation_roundtrip(scheme, rng, tmp_path):
    w = gaussian(rng, (48, 128))
    qw = compress(w, scheme)
    for again in (QuantizedWeight.from_dict(qw.to_dict(prefix="p."), prefix="p."), QuantizedWeight.from_op_args(*qw.to_op_args())):
        assert again.scheme == qw.scheme and again.shape == qw.shape
        np.testing.assert_array_equal(again.dequantize(), qw.dequantize())
    st = pytest.importorskip("safetensors.numpy")
    st.save_file(qw.to_dict(), str(tmp_path / "w.safetensors"))
    again = QuantizedWeight.from_dict(st.load_file(str(tmp_path / "w.safetensors")))
    np.testing.assert_array_equal(again.dequantize(), qw.dequantize())


def test_bad_input(rng):
    w = gaussian(rng, (8, 96))
    with pytest.raises(TypeError, match=r"^\[quant\] the weight is complex64; compress takes real floating weights"):
        compress(w.astype(np.complex64), Int8())  # (its imaginary part was dropped, silently)
    with pytest.raises(ValueError, match=r"\[quant\] K=96 is not divisible by the group size 64"):
        compress(w, Affine(4, 64))
    with pytest.raises(ValueError, match=r"\[quant\] Affine bits=7"):
        Affine(7, 64)
    with pytest.raises(ValueError, match=r"\[quant\] Affine group_size=48"):
        Affine(4, 48)
    with pytest.raises(ValueError, match=r"\[quant\] Palettize bits=5"):
        Palettize(5)
    with pytest.raises(ValueError, match=r"\[quant\] Palettize granularity"):
        Palettize(4, "per_channel")
    with pytest.raises(ValueError, match=r"\[quant\] Prune sparsity=1"):
        Prune(1.0)
    with pytest.raises(ValueError, match=r"\[quant\] Prune sparsity=-0.1"):
        Prune(-0.1)
    with pytest.raises(ValueError, match=r"\[quant\] Palettize per_grouped_channel group_size=3"):
        compress(w, Palettize(4, "per_grouped_channel", 3))
    with pytest.raises(ValueError, match=r"\[quant\] .*NaN/inf"):
        bad = w.copy()
        bad[1, 2] = np.nan
        compress(bad, Int8())
    with pytest.raises(ValueError, match=r"\[quant\] .*NaN/inf"):
        bad = w.copy()
        bad[0, 0] = np.inf
        compress(bad, Palettize(2))
    with pytest.raises(ValueError, match=r"\[quant\] the weight must be a non-empty 2-D"):
        compress(w[0], Int8())
    with pytest.raises(ValueError, match=r"\[quant\] Palettize needs K divisible by 8"):
        compress(gaussian(rng, (4, 12)), Palettize(2))
    with pytest.raises(TypeError, match=r"\[quant\] scheme"):
        compress(w, "int4")
    w_copy = w.copy()
    compress(w, Prune(0.5, then=Affine(4, 32)))
    np.testing.assert_array_equal(w, w_copy)  # inputs are never modified


@pytest.mark.parametrize(
    "make, exc, words",
    [
        (lambda: Affine(bits=4.0), TypeError, r"Affine bits takes ints, got 4.0"),
        (lambda: Affine(group_size=64.0), TypeError, r"Affine group_size takes ints"),
        (lambda: Palettize(bits=True), TypeError, r"Palettize bits takes ints, got True"),
        (lambda: Palettize(4, "per_grouped_channel", True), TypeError, r"Palettize group_size takes ints"),
        (lambda: Int8(zero_point="no"), TypeError, r"Int8 zero_point='no' must be a bool"),
        (lambda: Prune(n_m=(2.5, 4)), TypeError, r"Prune n_m takes ints, got 2.5"),
        (lambda: Prune(n_m=(2,)), TypeError, r"Prune n_m=\(2,\) must be a pair"),
        (lambda: Prune(sparsity="0.5"), TypeError, r"Prune sparsity='0.5' must be a real number"),
        (lambda: Prune(float("nan")), ValueError, r"Prune sparsity=nan must lie in \[0, 1\)"),
    ],
)
def test_schemes_reject_wrong_types(make, exc, words):
    """Scheme fields of the wrong type are refused by name, not truncated or taken as truthy."""
    with pytest.raises(exc, match=r"^\[quant\] " + words):
        make()


def test_schemes_normalise_numpy_fields():
    assert Affine(np.int64(4), np.int32(64)) == Affine(4, 64) and type(Affine(np.int64(4)).bits) is int
    assert Int8(np.bool_(True)).zero_point is True
    assert Prune(n_m=[2, 4]).n_m == (2, 4) and Prune(np.float32(0.25)).sparsity == 0.25


def test_prune_sparsity_and_n_m_must_agree():
    """n_m fixes the sparsity: a different one given beside it is refused, not overridden."""
    assert Prune(n_m=(1, 4)).sparsity == 0.75 and Prune().sparsity == 0.5 and Prune() == Prune(0.5)
    assert Prune(0.5, n_m=(2, 4)) == Prune(n_m=(2, 4))
    with pytest.raises(ValueError, match=r"^\[quant\] Prune sparsity=0.9 contradicts n_m=\(2, 4\)"):
        Prune(0.9, n_m=(2, 4))
    qw = compress(gaussian(np.random.default_rng(0), (8, 64)), Prune(n_m=(1, 4), then=Affine(4, 32)))
    assert QuantizedWeight.from_dict(qw.to_dict()).scheme == qw.scheme  # (the JSON carries both)


def test_codes_of_plain_pruned_weights_say_there_are_none(rng):
    qw = compress(gaussian(rng, (8, 64)), Prune(0.5))
    with pytest.raises(ValueError, match=r"^\[quant\] codes\(\): Prune\(.*\) keeps its survivors as float32 values"):
        qw.codes()
    assert qw.arrays["values"].shape == (qw.nnz,)


@pytest.mark.parametrize("shape,words", [((8, 64, 5), "a weight's shape must be a pair of ints"),
                                         ((8,), "a weight's shape must be a pair of ints"),
                                         ((8.0, 64), "a weight's shape must be a pair of ints"),
                                         (8, "a weight's shape must be a pair of ints"),
                                         ((-8, 64), "the weight must be a non-empty 2-D"),
                                         ((8, 0), "the weight must be a non-empty 2-D")])
def test_a_weight_shape_is_two_positive_ints(shape, words, rng):
    """A 3-D shape was cut to its first two dims and accepted; a negative N got a message about
    array shapes ("takes [-8, 8]")."""
    qw = compress(gaussian(rng, (8, 64)), Affine(4, 32))
    with pytest.raises((TypeError, ValueError), match=rf"^\[quant\] {words}"):
        QuantizedWeight(Affine(4, 32), shape, qw.arrays)
    d = qw.to_dict()
    meta = json.loads(bytes(d["meta"]).decode())
    meta["shape"] = [8, 64, 7]
    d["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    with pytest.raises(TypeError, match=r"^\[quant\] a weight's shape must be a pair of ints"):
        QuantizedWeight.from_dict(d)


@pytest.mark.parametrize("scheme", [Affine(4, 32), Int8(), Int8(zero_point=True), Palettize(3),
                                    Palettize(4, "per_grouped_channel", 4), Prune(0.5), Prune(0.5, then=Affine(3, 32)),
                                    Prune(0.5, then=Palettize(2))], ids=repr)
def test_arrays_must_fit_the_declared_shape(scheme, rng):
    """A QuantizedWeight whose arrays do not fit its shape (arrays of a [8, 64] weight declared as
    [4, 128] or [16, 32]) is refused, naming the array, instead of read as another matrix."""
    qw = compress(gaussian(rng, (8, 64)), scheme)
    assert QuantizedWeight(scheme, (8, 64), qw.arrays).shape == (8, 64)
    for shape in ((4, 128), (16, 32)):
        with pytest.raises(ValueError, match=r"^\[quant\] (array '\w+' has shape .* takes|.*divisible)"):
            QuantizedWeight(scheme, shape, qw.arrays)
    if isinstance(scheme, Prune):  # a stream cut short
        arrays = dict(qw.arrays)
        name = "values" if scheme.then is None else ("w_q" if isinstance(scheme.then, Affine) else "indices")
        arrays[name] = arrays[name][:-1]
        with pytest.raises(ValueError, match=rf"^\[quant\] array '{name}' has shape"):
            QuantizedWeight(scheme, (8, 64), arrays)


@pytest.mark.parametrize("scheme", [Affine(4, 32), Int8(zero_point=True), Prune(0.5, then=Affine(4, 32))], ids=repr)
def test_ranges_past_float32_are_refused(scheme, rng):
    """Finite weights whose max - min overflows float32 cannot take scale * q + bias: a clear
    error, not a compressed weight that dequantizes to inf/NaN."""
    w = gaussian(rng, (4, 64))
    w[1, :2] = (3e38, -3e38)
    with pytest.raises(ValueError, match=r"^\[quant\] .*overflows float32"):
        compress(w, scheme)
    w[1, :2] = (1.5e38, -1.5e38)  # a range still in float32
    assert np.isfinite(compress(w, scheme).dequantize()).all()


def test_short_scheme_names_are_one_spelling_for_every_command():
    from fusedformer.quant.names import scheme_from_name

    grouped = Palettize(4, granularity="per_grouped_channel", group_size=16)
    for name, want in {
        "int8": Int8(), "affine4": Affine(4, 64), "affine3": Affine(3, 64), "palettize4": Palettize(4),
        "lut4": Palettize(4), "lut2-grouped": Palettize(2, granularity="per_grouped_channel", group_size=16),
        "palettize4-grouped": grouped, "prune50": Prune(0.5), "prune75-affine4": Prune(0.75, then=Affine(4, 64)),
        "prune50-lut4-grouped": Prune(0.5, then=grouped),
    }.items():
        assert scheme_from_name(name, "cmd") == want, name
    for bad in ("int4", "affine", "lut", "prune0", "prune100", "prune50-nope", "Affine4", ""):
        with pytest.raises(ValueError, match=rf"^\[cmd\] unknown scheme {bad!r}: int8, affineB"):
            scheme_from_name(bad, "cmd")
    for bad in ("affine7", "lut5", "prune50-int8", "prune50-prune50"):  # (the format's own refusal, named)
        with pytest.raises(ValueError, match=rf"^\[cmd\] scheme {bad!r}: \[quant\]"):
            scheme_from_name(bad, "cmd")


def test_prune_then_takes_a_class_for_its_defaults():
    """DESIGN writes Prune(then=None|Affine|Palettize): the class means the format's defaults."""
    assert Prune(0.5, then=Affine) == Prune(0.5, then=Affine())
    assert Prune(0.5, then=Palettize).then == Palettize()
    for bad in (Int8, Int8(), Prune, "affine"):
        with pytest.raises(ValueError, match=r"^\[quant\] Prune then=.* must be None, Affine or Palettize"):
            Prune(0.5, then=bad)
