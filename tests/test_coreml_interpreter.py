"""The MIL reference interpreter's ops against coremltools' own value inference.

coremltools computes the value of an op whose inputs are all constants when it builds it (for
constant folding) and ships a ``decompress`` for each constexpr op; the interpreter computes the
same ops independently in numpy. Agreement on constant inputs checks the semantics we rely on.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import require

pytestmark = pytest.mark.coreml

ct = require("coremltools")

from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402
from coremltools.converters.mil.mil.ops.defs.iOS18 import compression as cx  # noqa: E402

from fusedformer.coreml import interpreter  # noqa: E402


def _x(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# op builders on constant inputs: name -> (rng -> output Var)
CASES = {
    "slice_by_index": lambda r: mb.slice_by_index(x=_x(r, 3, 5, 4), begin=[1, 0, -3], end=[3, 5, 4], stride=[1, 2, 1],
                                                  end_mask=[False, True, False], squeeze_mask=[False, False, False]),
    "slice_squeeze": lambda r: mb.slice_by_index(x=_x(r, 3, 5), begin=[2, 1], end=[3, 4], squeeze_mask=[True, False]),
    "slice_by_size": lambda r: mb.slice_by_size(x=_x(r, 4, 6), begin=[1, 2], size=[2, -1]),
    "gather": lambda r: mb.gather(x=_x(r, 5, 3), indices=np.array([[4, 0], [1, -1]], np.int32), axis=0),
    "gather_batch": lambda r: mb.gather(x=_x(r, 2, 5, 3), indices=np.array([[4, 0], [1, 2]], np.int32), axis=1,
                                        batch_dims=1),
    "gather_along_axis": lambda r: mb.gather_along_axis(x=_x(r, 3, 4), indices=np.array([[0, 3], [1, 1], [2, 0]], np.int32),
                                                        axis=1),
    "concat": lambda r: mb.concat(values=[_x(r, 2, 3), _x(r, 2, 1)], axis=1),
    "split": lambda r: mb.split(x=_x(r, 2, 7), split_sizes=[3, 4], axis=1),
    "band_part": lambda r: mb.band_part(x=_x(r, 5, 6), lower=1, upper=2),
    "expand_squeeze": lambda r: mb.squeeze(x=mb.expand_dims(x=_x(r, 3, 4), axes=[0, -1]), axes=[-1]),
    "reshape_zero": lambda r: mb.reshape(x=_x(r, 2, 3, 4), shape=[0, -1, 2]),
    "transpose": lambda r: mb.transpose(x=_x(r, 2, 3, 4), perm=[2, 0, 1]),
    "tile": lambda r: mb.tile(x=_x(r, 2, 3), reps=[2, 1]),
    "softmax": lambda r: mb.softmax(x=_x(r, 3, 5), axis=0),
    "layer_norm": lambda r: mb.layer_norm(x=_x(r, 2, 3, 8), axes=[-1], gamma=_x(r, 8), beta=_x(r, 8), epsilon=1e-5),
    "reduce_mean": lambda r: mb.reduce_mean(x=_x(r, 3, 4), axes=[1], keep_dims=True),
    "matmul_t": lambda r: mb.matmul(x=_x(r, 2, 3, 4), y=_x(r, 5, 4), transpose_y=True),
    "linear": lambda r: mb.linear(x=_x(r, 3, 4), weight=_x(r, 6, 4), bias=_x(r, 6)),
    "cast": lambda r: mb.cast(x=_x(r, 3, 4) * 10, dtype="int32"),
    "range_1d": lambda r: mb.range_1d(start=2, end=11, step=3),
    "cumsum": lambda r: mb.cumsum(x=_x(r, 3, 4), axis=1, reverse=True),
    "gelu_tanh": lambda r: mb.gelu(x=_x(r, 10), mode="TANH_APPROXIMATION"),
    "select": lambda r: mb.select(cond=_x(r, 3, 4) > 0, a=_x(r, 3, 4), b=np.float32(0.0)),
    "pad": lambda r: mb.pad(x=_x(r, 3, 4), pad=np.array([1, 0, 2, 1], np.int32), constant_val=1.5),
    # past exp's fp32 range (x > 88): log(sum(exp(x))) overflows where the max-shifted form does not
    "reduce_log_sum_exp": lambda r: mb.reduce_log_sum_exp(x=_x(r, 3, 5) * 30 + 100, axes=[1], keep_dims=False),
    "slice_update": lambda r: mb.slice_update(x=_x(r, 2, 6, 3), update=_x(r, 2, 2, 3), begin=[0, 3, 0], end=[2, 5, 3]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_op_matches_coremltools_value_inference(case, rng):
    captured = {}

    @mb.program(input_specs=[mb.TensorSpec(shape=(1,))], opset_version=ct.target.iOS18)
    def prog(dummy):
        out = CASES[case](rng)
        captured["out"] = out if isinstance(out, (list, tuple)) else (out,)
        return dummy

    outs = captured["out"]
    operation = outs[0].op
    if outs[0].val is None:
        pytest.skip(f"coremltools does not fold {operation.op_type}")
    ours = interpreter.OPS[operation.op_type](interpreter._Args(operation, {}))
    ours = ours if isinstance(ours, tuple) else (ours,)
    for var, value in zip(outs, ours):
        expected = np.asarray(var.val)
        assert np.shape(value) == expected.shape, operation.op_type
        np.testing.assert_allclose(np.asarray(value, expected.dtype), expected, rtol=1e-5, atol=1e-6)


def test_concat_interleave_as_documented():
    # the op's documentation: in1 rows at output[0::2], in2 rows at output[1::2]
    # (coremltools' own value inference ignores interleave, so this is checked against the doc)
    in1 = np.array([[1, 2], [3, 4], [5, 6]], np.float32)
    in2 = np.array([[7, 8], [9, 10], [11, 12]], np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(3, 2)), mb.TensorSpec(shape=(3, 2))], opset_version=ct.target.iOS18)
    def prog(a, b):
        return mb.concat(values=[a, b], axis=0, interleave=True)

    (out,) = interpreter.Program(prog).predict({"a": in1, "b": in2}).values()
    np.testing.assert_array_equal(out, [[1, 2], [7, 8], [3, 4], [9, 10], [5, 6], [11, 12]])


def test_gather_nd(rng):
    x = _x(rng, 2, 4, 5)
    indices = np.array([[[1, 2], [3, 0]], [[0, 4], [2, 2]]], np.int32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 4, 5))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.gather_nd(x=x, indices=indices, batch_dims=1)

    (out,) = interpreter.Program(prog).predict({"x": x}).values()
    expected = np.stack([x[b][indices[b, :, 0], indices[b, :, 1]] for b in range(2)])
    np.testing.assert_array_equal(out, expected)


def test_reshape_zero_matches_from_the_right():
    """iOS17+ reshape: a 0 copies x's dim matched from the right, 1 where none matches (the
    docstring's own example: [2, 50] by [1, 0, -1, 0] is [1, 1, 2, 50])."""
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 50))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.reshape(x=x, shape=[1, 0, -1, 0])

    x = np.arange(100, dtype=np.float32).reshape(2, 50)
    (out,) = interpreter.Program(prog).predict({"x": x}).values()
    assert out.shape == tuple(prog.functions["main"].outputs[0].shape) == (1, 1, 2, 50)
    np.testing.assert_array_equal(out.reshape(2, 50), x)


@pytest.mark.parametrize("kind", ["gather", "gather_along_axis", "gather_nd"])
def test_gather_index_out_of_range_is_named(kind):
    """An index past the axis (a token id past the vocabulary) is a [verify] error naming the op,
    not numpy's IndexError (which the verify CLI printed as a traceback)."""
    table = np.arange(15, dtype=np.float32).reshape(5, 3)
    build = {
        "gather": lambda x, i: mb.gather(x=x, indices=i, axis=0),
        "gather_along_axis": lambda x, i: mb.gather_along_axis(x=x, indices=mb.tile(x=mb.expand_dims(x=i, axes=[1]),
                                                                                    reps=[1, 3]), axis=0),
        "gather_nd": lambda x, i: mb.gather_nd(x=x, indices=mb.expand_dims(x=i, axes=[1])),
    }[kind]

    @mb.program(input_specs=[mb.TensorSpec(shape=(5, 3)), mb.TensorSpec(shape=(2,), dtype=types.int32)],
                opset_version=ct.target.iOS18)
    def prog(x, i):
        return build(x, i)

    program = interpreter.Program(prog)
    out = next(iter(program.predict({"x": table, "i": np.array([4, -5], np.int32)}).values()))
    np.testing.assert_array_equal(out.reshape(2, 3), table[[4, 0]])
    with pytest.raises(ValueError, match=rf"^\[verify\] {kind} .*: index 5 out of range for axis 0 of size 5"):
        program.predict({"x": table, "i": np.array([1, 5], np.int32)})


def test_inputs_must_be_a_dict():
    @mb.program(input_specs=[mb.TensorSpec(shape=(2,))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.add(x=x, y=np.float32(1))

    with pytest.raises(TypeError, match=r"^\[verify\] inputs must be a dict of \['x'\] to arrays, got ndarray"):
        interpreter.Program(prog).predict(np.zeros(2, np.float32))


def test_integer_inputs_refuse_fractions():
    @mb.program(input_specs=[mb.TensorSpec(shape=(2,), dtype=types.int32)], opset_version=ct.target.iOS18)
    def prog(i):
        return mb.add(x=i, y=np.int32(1))

    program = interpreter.Program(prog)
    np.testing.assert_array_equal(next(iter(program.predict({"i": np.array([1.0, 2.0])}).values())), [2, 3])
    with pytest.raises(ValueError, match=r"^\[verify\] input 'i' holds values of dtype float64 that are not whole"):
        program.predict({"i": np.array([1.9, 2.5])})


def test_cumsum_exclusive():
    @mb.program(input_specs=[mb.TensorSpec(shape=(4,))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.cumsum(x=x, axis=0, exclusive=True, reverse=True)

    (out,) = interpreter.Program(prog).predict({"x": np.array([1, 2, 3, 4], np.float32)}).values()
    np.testing.assert_array_equal(out, [9, 7, 4, 0])


def _uint(values, dtype):
    return np.asarray(values, np.uint8).astype(dtype)


def test_constexpr_ops_match_coremltools_decompress(rng):
    data = rng.integers(-8, 8, (6, 8)).astype(np.int8)
    scale = rng.random((3, 2)).astype(np.float32) + 0.1
    offset = rng.integers(-3, 3, (3, 2)).astype(np.int8)
    np.testing.assert_array_equal(interpreter.shift_scale(data, scale, offset),
                                  cx.constexpr_blockwise_shift_scale.decompress(data, scale, offset))
    indices = rng.integers(0, 4, (6, 8))
    lut = rng.standard_normal((2, 1, 4, 1)).astype(np.float32)
    np.testing.assert_array_equal(interpreter.lut_to_dense(indices, lut),
                                  cx.constexpr_lut_to_dense.decompress(_uint(indices, types.np_uint2_dtype), lut, None))
    vlut = rng.standard_normal((1, 1, 4, 2)).astype(np.float32)  # vector palettization along axis 0
    np.testing.assert_array_equal(interpreter.lut_to_dense(indices[:3], vlut, 0),
                                  cx.constexpr_lut_to_dense.decompress(_uint(indices[:3], types.np_uint2_dtype), vlut,
                                                                       np.int32(0)))
    mask = rng.random((6, 8)) > 0.5
    values = rng.standard_normal(mask.sum()).astype(np.float32)
    np.testing.assert_array_equal(interpreter.sparse_to_dense(values, mask.astype(np.uint8)),
                                  cx.constexpr_sparse_to_dense.decompress(values, mask.astype(np.uint8)))


def test_unknown_op_is_named():
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 1, 2, 3))], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.l2_pool(x=x, kernel_sizes=[1, 1], strides=[1, 1], pad_type="valid")

    with pytest.raises(interpreter.UnsupportedOpError, match="l2_pool"):
        interpreter.Program(prog)


def test_fp16_rounding_after_each_op():
    @mb.program(input_specs=[mb.TensorSpec(shape=(3,))], opset_version=ct.target.iOS18)
    def prog(x):
        h = mb.cast(x=x, dtype="fp16")
        return mb.cast(x=mb.add(x=h, y=np.float16(1e-4)), dtype="fp32")

    x = np.array([1.0, 2.0, 1e-3], np.float32)
    out = interpreter.Program(prog).predict({"x": x})
    (name,) = out
    expected = (x.astype(np.float16) + np.float16(1e-4)).astype(np.float32)
    np.testing.assert_array_equal(out[name], expected)  # 1 + 1e-4 rounds back to 1 in fp16
    assert out[name][0] == 1.0
    wide = interpreter.Program(prog, emulate_fp16=False).predict({"x": x})[name]
    assert wide[0] > 1.0


def test_reduce_log_sum_exp_of_masked_rows():
    """A row of -inf (every key masked) gives -inf, not NaN; a large finite row no inf."""
    x = np.array([[-np.inf, -np.inf, -np.inf], [1000.0, 1000.0, -np.inf], [0.0, np.log(3.0), -np.inf]], np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(3, 3))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.reduce_log_sum_exp(x=x, axes=[-1], keep_dims=True)

    (out,) = interpreter.Program(prog).predict({"x": x}).values()
    np.testing.assert_allclose(out[:, 0], [-np.inf, 1000 + np.log(2.0), np.log(4.0)], rtol=1e-6)
