"""ff.mlx.QuantizedLinear / qmatmul_mlx for every ff.quant scheme against the float64 oracle
built from the dequantized weight (measures MLX arithmetic only, not quantization error)."""

from __future__ import annotations

import numpy as np
import pytest
from tests.conftest import require

from fusedformer import reference

pytestmark = pytest.mark.mlx
mx = require("mlx")
nn = pytest.importorskip("mlx.nn")
from mlx.utils import tree_flatten  # noqa: E402
Q = pytest.importorskip("fusedformer.quant", reason="fusedformer.quant (compressed weights) is not built yet")
from fusedformer.mlx import linear as mlx_linear  # noqa: E402
from fusedformer.mlx.linear import MLXWeight, QuantizedLinear, qmatmul_mlx  # noqa: E402

SCHEMES = (
    [Q.Affine(bits, 32) for bits in (2, 3, 4, 5, 6, 8)]
    + [Q.Affine(4, 64), Q.Affine(4, 128)]
    + [Q.Int8(), Q.Int8(zero_point=True)]
    + [Q.Palettize(bits) for bits in (1, 2, 3, 4, 6, 8)]
    + [Q.Palettize(4, "per_grouped_channel", 16), Q.Palettize(3, "per_grouped_channel", 8)]
    + [Q.Prune(0.5), Q.Prune(0.7, then=Q.Affine(4, 32)), Q.Prune(0.4, then=Q.Affine(3, 64))]
    + [Q.Prune(0.5, then=Q.Palettize(4)), Q.Prune(0.5, then=Q.Palettize(3, "per_grouped_channel", 16))]
    + [Q.Prune(n_m=(2, 4)), Q.Prune(n_m=(2, 4), then=Q.Affine(6, 32))]
)
DTYPES = {"fp32": mx.float32, "fp16": mx.float16, "bf16": mx.bfloat16}
# Error bound per element: EPS * (|x| @ |W|.T) (+ output rounding for the low-precision outputs).
EPS = {"fp32": 2e-6, "fp16": 1e-3, "bf16": 8e-3}


def scheme_id(s):
    return repr(s).replace(" ", "")


def compressed(rng, scheme, n=48, k=128):
    w = rng.standard_normal((n, k)).astype(np.float32)
    return Q.compress(w, scheme)


def check_matmul(y, x64, w, dtype):
    y = np.array(y.astype(mx.float32)).astype(np.float64)
    want = reference.matmul_t(x64, w)
    bound = EPS[dtype] * (np.abs(x64) @ np.abs(w.astype(np.float64)).T) + 1e-6
    assert y.shape == want.shape
    assert not np.isnan(y).any()
    assert (np.abs(y - want) <= bound).all(), f"max error {np.abs(y - want).max()}"


def random_x(rng, shape, dtype):
    x = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(DTYPES[dtype])
    return x, np.array(x.astype(mx.float32)).astype(np.float64)


@pytest.mark.parametrize("scheme", SCHEMES, ids=scheme_id)
def test_dequantized_values_identical(rng, scheme):
    """The MLX form holds exactly qw.dequantize(), bit for bit (no re-quantization)."""
    qw = compressed(rng, scheme)
    np.testing.assert_array_equal(np.array(MLXWeight.from_quantized(qw).dequantize()), qw.dequantize())


@pytest.mark.parametrize("scheme", SCHEMES, ids=scheme_id)
@pytest.mark.parametrize("m", [1, 3, 33])
def test_qmatmul_every_scheme(rng, scheme, m):
    qw = compressed(rng, scheme)
    x, x64 = random_x(rng, (m, 128), "fp32")
    y = qmatmul_mlx(x, qw)
    assert y.dtype == mx.float32 and y.shape == (m, 48)
    check_matmul(y, x64, qw.dequantize(), "fp32")


@pytest.mark.parametrize("scheme", SCHEMES, ids=scheme_id)
def test_qmatmul_of_no_rows(rng, scheme):
    """x with no rows gives [0, N] (MLX's quantized_matmul of no rows killed the process with SIGFPE)."""
    qw = compressed(rng, scheme)
    for shape in ((0, 128), (2, 0, 128)):
        y = qmatmul_mlx(mx.zeros(shape), qw)
        mx.eval(y)
        assert y.shape == (*shape[:-1], 48) and y.dtype == mx.float32


@pytest.mark.parametrize("scheme", [Q.Affine(4, 64), Q.Int8(), Q.Palettize(4), Q.Prune(0.5, then=Q.Affine(4, 32))],
                         ids=scheme_id)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_module_dtypes_bias_and_batch_dims(rng, scheme, dtype):
    qw = compressed(rng, scheme, n=33 if not isinstance(scheme, Q.Palettize) else 48, k=256)
    bias = rng.standard_normal(qw.shape[0]).astype(np.float32)
    layer = QuantizedLinear(qw, bias=mx.array(bias))
    x, x64 = random_x(rng, (2, 5, 256), dtype)
    y = layer(x)
    assert y.dtype == DTYPES[dtype] and y.shape == (2, 5, qw.shape[0])
    check_matmul(y.reshape(10, -1) - mx.array(bias).astype(y.dtype), x64.reshape(10, -1), qw.dequantize(), dtype)
    assert tree_flatten(layer.trainable_parameters()) == []  # frozen like nn.QuantizedLinear


@pytest.mark.parametrize("scheme", [Q.Int8(True), Q.Palettize(3, "per_grouped_channel", 8),
                                    Q.Prune(0.6, then=Q.Affine(3, 32)), Q.Prune(0.5, then=Q.Palettize(3)),
                                    Q.Prune(0.5)], ids=scheme_id)
def test_tiles(rng, scheme, monkeypatch):
    """Tiles of a few output rows: stream offsets that fall inside a byte, LUT groups across tiles."""
    monkeypatch.setattr(mlx_linear, "TILE_ELEMENTS", 5 * 64)
    qw = compressed(rng, scheme, n=40, k=64)
    weight = MLXWeight.from_quantized(qw)
    assert len(weight._row_tiles()) == 8
    np.testing.assert_array_equal(np.array(weight.dequantize()), qw.dequantize())
    x, x64 = random_x(rng, (7, 64), "fp32")
    check_matmul(weight.matmul_t(x), x64, qw.dequantize(), "fp32")


def test_from_linear_keeps_bias_and_matches_compress(rng):
    lin = nn.Linear(64, 24)
    layer = QuantizedLinear.from_linear(lin, Q.Affine(4, 32))
    qw = Q.compress(np.array(lin.weight), Q.Affine(4, 32))
    np.testing.assert_array_equal(np.array(layer.qweight.dequantize()), qw.dequantize())
    x, x64 = random_x(rng, (3, 64), "fp32")
    y = layer(x) - lin.bias
    check_matmul(y, x64, qw.dequantize(), "fp32")


def test_bad_inputs(rng):
    qw = compressed(rng, Q.Affine(4, 32), n=8, k=64)
    with pytest.raises(ValueError, match=r"^\[qmatmul\] x has shape \(3, 32\) but the weight has K=64"):
        qmatmul_mlx(mx.zeros((3, 32)), qw)
    with pytest.raises(TypeError, match=r"^\[qmatmul\] x has dtype .*int32"):
        qmatmul_mlx(mx.zeros((3, 64), dtype=mx.int32), qw)
    with pytest.raises(TypeError, match=r"^\[qmatmul\] qmatmul_mlx takes an MLX x"):
        qmatmul_mlx(np.zeros((3, 64), np.float32), qw)


@pytest.mark.parametrize("scheme", [Q.Affine(4, 32), Q.Palettize(4), Q.Prune(0.5)], ids=scheme_id)
def test_ff_qmatmul_front_dispatches_mlx(rng, scheme):
    import fusedformer as ff

    qw = compressed(rng, scheme)
    x, x64 = random_x(rng, (2, 3, 128), "bf16")
    y = ff.qmatmul(x, qw)
    assert isinstance(y, mx.array) and y.dtype == mx.bfloat16 and y.shape == (2, 3, 48)
    check_matmul(y.reshape(6, -1), x64.reshape(6, -1), qw.dequantize(), "bf16")
    with pytest.raises(ValueError, match=r"^\[qmatmul\] x has shape"):
        ff.qmatmul(mx.zeros((2, 64)), qw)


@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("k", [40, 96])  # 40: no MLX group size divides K -> composition; 96: 8-bit kernel
def test_int8_both_paths(rng, zero_point, k):
    qw = compressed(rng, Q.Int8(zero_point), n=33, k=k)
    weight = MLXWeight.from_quantized(qw)
    assert (weight.group_size is None) == (k == 40)
    np.testing.assert_array_equal(np.array(weight.dequantize()), qw.dequantize())
    x, x64 = random_x(rng, (7, k), "fp32")
    check_matmul(weight.matmul_t(x), x64, qw.dequantize(), "fp32")


@pytest.mark.parametrize("scheme", [Q.Affine(4, 32), Q.Int8(True), Q.Palettize(3), Q.Prune(0.5, then=Q.Affine(4, 32)),
                                    Q.Prune(0.5, then=Q.Palettize(4)), Q.Prune(0.5)], ids=scheme_id)
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_native_cpu_kernel(rng, scheme, dtype):
    """Opt-in native kernel on views of the MLX arrays: the same QuantizedWeight, same results."""
    import fusedformer as ff

    qw = compressed(rng, scheme)
    layer = QuantizedLinear(qw)
    view = layer.quantized_weight()
    for name, a in qw.arrays.items():
        np.testing.assert_array_equal(view.arrays[name], a, err_msg=name)
    x, x64 = random_x(rng, (3, 128), dtype)
    with ff.mlx.cpu_kernel("native"):
        y = layer(x)
    assert isinstance(y, mx.array) and y.dtype == DTYPES[dtype]
    check_matmul(y, x64, qw.dequantize(), dtype)


@pytest.mark.parametrize("scheme", [Q.Palettize(4), Q.Prune(0.5), Q.Int8(True)], ids=scheme_id)
def test_many_rows_relayout_path(rng, scheme, monkeypatch):
    monkeypatch.setattr(mlx_linear, "TILE_ELEMENTS", 16 * 64)
    qw = compressed(rng, scheme, n=48, k=64)
    weight = MLXWeight.from_quantized(qw)
    x, x64 = random_x(rng, (2, 20, 64), "fp32")  # 40 rows >= CPU_RELAYOUT_MIN_ROWS
    y = MLXWeight._mlx_matmul_t(weight, x)  # the composition path, also for int8
    check_matmul(y.reshape(40, -1), x64.reshape(40, -1), qw.dequantize(), "fp32")


class _Model(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def __call__(self, x):
        return self.layer(x)


LOAD_SCHEMES = [Q.Affine(4, 32), Q.Int8(True), Q.Palettize(3), Q.Prune(0.5), Q.Prune(0.5, then=Q.Affine(4, 32)),
                Q.Prune(0.5, then=Q.Palettize(2))]


@pytest.mark.parametrize("scheme", LOAD_SCHEMES, ids=scheme_id)
def test_load_weights_replaces_what_was_derived(rng, scheme, monkeypatch, tmp_path):
    """load_weights into a model whose layer has already run (native path: the cached
    QuantizedWeight) and is split into row tiles (pruned: the survivors before each tile) serves
    the loaded weight, on both paths; a layer of different survivors counts differ per tile."""
    import fusedformer as ff

    monkeypatch.setattr(mlx_linear, "TILE_ELEMENTS", 16 * 128)  # 48 rows in 3 tiles of 16
    saved_qw, other_qw = compressed(rng, scheme), compressed(rng, scheme)
    saved, other = _Model(QuantizedLinear(saved_qw)), _Model(QuantizedLinear(other_qw))
    path = str(tmp_path / "w.safetensors")
    saved.save_weights(path)
    x, x64 = random_x(rng, (3, 128), "fp32")
    with ff.mlx.cpu_kernel("native"):
        mx.eval(other(x))  # builds the native path's QuantizedWeight of the old arrays
    other.layer.qweight.dequantize()  # ... and the pruned tiles' offsets
    other.load_weights(path)
    for name, a in saved_qw.arrays.items():
        np.testing.assert_array_equal(other.layer.quantized_weight().arrays[name], a, err_msg=name)
    np.testing.assert_array_equal(np.array(other.layer.qweight.dequantize()), saved_qw.dequantize())
    check_matmul(other(x), x64, saved_qw.dequantize(), "fp32")
    with ff.mlx.cpu_kernel("native"):
        check_matmul(other(x), x64, saved_qw.dequantize(), "fp32")


def test_pruned_mask_and_survivors_of_different_weights_are_refused(rng):
    layer = QuantizedLinear(compressed(rng, Q.Prune(0.5)))
    denser = compressed(rng, Q.Prune(0.25))
    layer.update({"qweight": {"mask": mx.array(denser.arrays["mask"])}})
    with pytest.raises(ValueError, match=r"\[qmatmul\] the pruned weight's mask keeps \d+ values but its 'values'"):
        layer(mx.array(rng.standard_normal((1, 128)).astype(np.float32)))


@pytest.mark.parametrize("scheme", LOAD_SCHEMES + [Q.Int8()], ids=scheme_id)
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_set_dtype_casts_the_format_arrays_as_mlx_does(rng, scheme, dtype):
    """model.set_dtype casts the format's float arrays (as it does nn.QuantizedLinear's scales);
    both paths then serve the same rounded weight, the native kernel on its exact float32
    widening."""
    import fusedformer as ff

    qw = compressed(rng, scheme)
    model = _Model(QuantizedLinear(qw))
    with ff.mlx.cpu_kernel("native"):
        mx.eval(model(mx.zeros((1, 128))))  # a QuantizedWeight of the float32 arrays, to be dropped
    model.set_dtype(DTYPES[dtype])
    rounded = np.array(model.layer.qweight.dequantize()).astype(np.float64)
    # (affine and int8 round scale * q + bias to that dtype on MLX, not on the native kernel)
    np.testing.assert_allclose(model.layer.quantized_weight().dequantize(), rounded, rtol=0,
                               atol=EPS[dtype] * np.abs(rounded).max())
    x, x64 = random_x(rng, (3, 128), dtype)
    check_matmul(model(x), x64, rounded, dtype)
    with ff.mlx.cpu_kernel("native"):
        check_matmul(model(x), x64, rounded, dtype)


@pytest.mark.parametrize("scheme", LOAD_SCHEMES, ids=scheme_id)
def test_compiled_with_the_state_after_load_weights(rng, scheme, monkeypatch, tmp_path):
    """mx.compile(..., inputs=model.state) of a model whose weights were loaded, and again after
    another load: nothing is derived from the arrays inside the traced call (where they cannot
    be read back), and the compiled function serves the weights loaded last. (Not for a pruned
    weight of other survivors per row tile: its tiles' slices are numbers fixed in the trace;
    compile again after loading one.)"""
    monkeypatch.setattr(mlx_linear, "TILE_ELEMENTS", 16 * 128)
    first, second = compressed(rng, scheme), compressed(rng, scheme)
    paths = []
    for i, qw in enumerate((first, second)):
        paths.append(str(tmp_path / f"w{i}.safetensors"))
        _Model(QuantizedLinear(qw)).save_weights(paths[-1])
    model = _Model(QuantizedLinear(compressed(rng, scheme)))
    model.load_weights(paths[0])
    step = mx.compile(lambda x: model(x), inputs=model.state)
    x, x64 = random_x(rng, (3, 128), "fp32")
    check_matmul(step(x), x64, first.dequantize(), "fp32")
    if not isinstance(scheme, Q.Prune):
        model.load_weights(paths[1])
        check_matmul(step(x), x64, second.dequantize(), "fp32")
