"""A MIL reference interpreter: run an exported Core ML program in numpy, on any OS.

Core ML's runtime (``MLModel.predict``) exists only on macOS. This module loads the MIL program of
a converted model -- from the in-memory ``MLModel`` or from a ``.mlpackage`` on disk through
coremltools' milproto loader -- and executes it op by op with numpy, so every export can be
checked on Linux against the torch model it came from.

Numerics: every op computes in float32 (float64 never: the point is to see what the program does)
and its result is rounded to the dtype the program declares for it, so an fp16 program is
emulated with one fp16 rounding per op (``emulate_fp16=False`` keeps fp16 values in fp32, to tell
lowering errors from precision errors). Semantics follow the op definitions in coremltools
(``coremltools/converters/mil/mil/ops/defs``); where Core ML is undefined (a softmax row whose
scores are all -inf) we do what PyTorch does (NaN), so a program that relies on it fails loudly.

    prog = Program.load("model.mlpackage")          # or Program.load(mlmodel)
    prog.op_types()                                 # {"linear": 4, "scaled_dot_product_attention": 2, ...}
    out = prog.predict({"input_ids": ids})          # {"logits": ndarray}
    state = prog.make_state()                       # stateful programs (KV cache)
    out = prog.predict({...}, state=state)          # updates ``state`` in place, like Core ML
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping
from typing import Callable

import numpy as np

__all__ = ["Program", "UnsupportedOpError", "verify", "SUPPORTED_OPS"]


class UnsupportedOpError(NotImplementedError):
    """The program uses a MIL op the interpreter does not implement."""


# ----------------------------------------------------------------------------------------------
# loading


def _load_mil_program(source):
    """(pymil Program, spec ModelDescription) of an MLModel (in memory) or a .mlpackage / .mlmodel path.

    The description holds what the MIL text does not: the declared ranges / enumerated shapes of
    flexible inputs, which Core ML enforces and so the interpreter does too.
    """
    import coremltools as ct

    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise ValueError(f"[verify] no model at {path!r}")
        model = ct.models.MLModel(path, skip_model_load=True)
        return _program_from_spec(model), model.get_spec().description
    if isinstance(source, ct.models.MLModel):
        program = getattr(source, "_mil_program", None)
        if program is None:
            program = _program_from_spec(source)
        return program, source.get_spec().description
    raise TypeError(f"[verify] expected an MLModel or a path to a .mlpackage, got {type(source).__name__}")


def _program_from_spec(model):
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = model.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise ValueError("[verify] the model is not an ML program (neuralnetwork models are not supported)")
    return load(spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir)


class AllowedShapes:
    """The shapes a flexible input declares: a (lo, hi) range per axis (hi -1: unbounded) or an
    enumerated list. Core ML refuses any other shape, so the interpreter does too."""

    def __init__(self, ranges=None, shapes=None):
        self.ranges = None if ranges is None else [(int(lo), int(hi)) for lo, hi in ranges]
        self.shapes = None if shapes is None else [tuple(int(d) for d in s) for s in shapes]

    @classmethod
    def of_feature(cls, feature) -> "AllowedShapes | None":
        """From a spec FeatureDescription; None for an input of one fixed shape (or not an array)."""
        if feature.type.WhichOneof("Type") != "multiArrayType":
            return None
        array = feature.type.multiArrayType
        kind = array.WhichOneof("ShapeFlexibility")
        if kind == "shapeRange":
            return cls(ranges=[(r.lowerBound, r.upperBound) for r in array.shapeRange.sizeRanges])
        if kind == "enumeratedShapes":
            return cls(shapes=[s.shape for s in array.enumeratedShapes.shapes])
        return None

    def allows(self, shape) -> bool:
        shape = tuple(int(d) for d in shape)
        if self.shapes is not None:
            return shape in self.shapes
        return len(shape) == len(self.ranges) and all(
            lo <= n and (hi < 0 or n <= hi) for n, (lo, hi) in zip(shape, self.ranges)
        )

    def __str__(self):
        if self.shapes is not None:
            return f"one of {self.shapes}"
        dims = [str(lo) if lo == hi else f"{lo}..{hi if hi >= 0 else 'inf'}" for lo, hi in self.ranges]
        return f"({', '.join(dims)})"


def _allowed_shapes(description, function_name: str) -> dict[str, AllowedShapes]:
    """{input name: AllowedShapes} of the flexible inputs of one function of a spec description."""
    if description is None:
        return {}
    features = description.input
    for function in description.functions:  # (multifunction packages describe each function)
        if function.name == function_name:
            features = function.input
    allowed = {f.name: AllowedShapes.of_feature(f) for f in features}
    return {name: shapes for name, shapes in allowed.items() if shapes is not None}


def _np_dtype(builtin):
    from coremltools.converters.mil.mil import types

    return np.dtype(types.nptype_from_builtin(builtin))


# ----------------------------------------------------------------------------------------------
# the op table


class _Args:
    """The inputs of one op, resolved to numpy values (float16 widened to float32)."""

    def __init__(self, op, env):
        self.op = op
        self._env = env

    def _value(self, var):
        if isinstance(var, (list, tuple)):
            return [self._value(v) for v in var]
        if var.name in self._env:
            value = self._env[var.name]
        elif var.val is not None:
            value = np.asarray(var.val)
        else:
            raise RuntimeError(f"[verify] op {self.op.name} ({self.op.op_type}) reads {var.name}, which has no value yet")
        if isinstance(value, np.ndarray) and value.dtype == np.float16:
            value = value.astype(np.float32)
        return value

    def has(self, name):
        return self.op.inputs.get(name) is not None

    def __getattr__(self, name):
        return self.get(name)

    def get(self, name, default=None):
        var = self.op.inputs.get(name)
        return default if var is None else self._value(var)

    def scalar(self, name, default=None):
        value = self.get(name, default)
        return value.item() if isinstance(value, np.ndarray) else value

    def axes(self, name="axes"):
        value = self.get(name)
        return None if value is None else tuple(int(a) for a in np.atleast_1d(value))

    def state(self, name):
        """The name of the state variable an op reads or writes."""
        return self.op.inputs[name].name


OPS: dict[str, Callable] = {}


def op(*names):
    def register(fn):
        for name in names:
            OPS[name] = fn
        return fn

    return register


def _f(fn):
    """An elementwise unary op on x."""
    return lambda a: fn(a.x)


_UNARY = {
    "abs": np.abs, "ceil": np.ceil, "floor": np.floor, "round": np.round, "sign": np.sign,
    "exp": np.exp, "exp2": np.exp2, "sqrt": np.sqrt, "square": np.square,
    "sin": np.sin, "cos": np.cos, "tan": np.tan, "tanh": np.tanh, "atan": np.arctan,
    "asin": np.arcsin, "acos": np.arccos, "sinh": np.sinh, "cosh": np.cosh,
    "relu": lambda x: np.maximum(x, 0), "relu6": lambda x: np.clip(x, 0, 6),
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)), "silu": lambda x: x / (1 + np.exp(-x)),
    "softsign": lambda x: x / (1 + np.abs(x)), "softplus": lambda x: np.logaddexp(0, x),
    "logical_not": np.logical_not, "identity": lambda x: x,
    "erf": np.vectorize(math.erf, otypes=[np.float64]),
}
for _name, _fn in _UNARY.items():
    op(_name)(_f(_fn))

_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "pow": np.power,
    "maximum": np.maximum, "minimum": np.minimum, "mod": np.mod,
    "equal": np.equal, "not_equal": np.not_equal, "greater": np.greater, "greater_equal": np.greater_equal,
    "less": np.less, "less_equal": np.less_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}
for _name, _fn in _BINARY.items():
    op(_name)(lambda a, fn=_fn: fn(a.x, a.y))


@op("real_div")
def _real_div(a):
    x, y = a.x, a.y
    if np.issubdtype(np.result_type(x, y), np.integer):  # MIL real_div on ints is a true division
        return np.asarray(x, np.float32) / np.asarray(y, np.float32)
    return np.divide(x, y)


@op("floor_div")
def _floor_div(a):
    return np.floor_divide(a.x, a.y)


@op("rsqrt")
def _rsqrt(a):
    return 1 / np.sqrt(a.x + a.scalar("epsilon", 1e-12))


@op("inverse")
def _inverse(a):
    return 1 / (a.x + a.scalar("epsilon", 1e-4))


@op("log")
def _log(a):
    return np.log(a.x + a.scalar("epsilon", 1e-45))


@op("clip")
def _clip(a):
    return np.minimum(np.maximum(a.x, a.scalar("alpha")), a.scalar("beta"))


@op("leaky_relu")
def _leaky_relu(a):
    alpha = a.scalar("alpha", 0.01)
    return np.where(a.x >= 0, a.x, alpha * a.x)


@op("elu")
def _elu(a):
    alpha = a.scalar("alpha", 1.0)
    return np.where(a.x > 0, a.x, alpha * (np.exp(a.x) - 1))


@op("gelu")
def _gelu(a):
    x, mode = a.x, a.scalar("mode", "EXACT")
    if mode == "EXACT":
        return 0.5 * x * (1 + _UNARY["erf"](x / math.sqrt(2)))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1 + np.exp(-1.702 * x))
    raise UnsupportedOpError(f"[verify] gelu mode {mode!r} is not supported")


@op("cast")
def _cast(a):
    from coremltools.converters.mil.mil import types

    dtype = _np_dtype(types.string_to_builtin(a.scalar("dtype")))
    x = a.x
    if np.issubdtype(dtype, np.integer) and np.issubdtype(np.asarray(x).dtype, np.floating):
        x = np.trunc(x)  # Core ML casts float -> int toward zero
    return np.asarray(x).astype(dtype)


@op("select")
def _select(a):
    return np.where(a.cond.astype(bool), a.a, a.b)


@op("softmax")
def _softmax(a):
    x, axis = a.x, a.scalar("axis", -1)
    with np.errstate(invalid="ignore"):
        e = np.exp(x - np.max(x, axis=axis, keepdims=True))
        return e / np.sum(e, axis=axis, keepdims=True)


def _reduce(fn):
    def run(a):
        axes = a.axes()
        return fn(a.x, axis=axes, keepdims=bool(a.scalar("keep_dims", False)))

    return run


for _name, _fn in {
    "reduce_sum": np.sum, "reduce_mean": np.mean, "reduce_max": np.max, "reduce_min": np.min,
    "reduce_prod": np.prod,
    "reduce_sum_square": lambda x, **kw: np.sum(x * x, **kw),
    "reduce_l2_norm": lambda x, **kw: np.sqrt(np.sum(x * x, **kw)),
    "reduce_l1_norm": lambda x, **kw: np.sum(np.abs(x), **kw),
}.items():
    op(_name)(_reduce(_fn))


@op("reduce_log_sum_exp")
@_reduce
def _reduce_log_sum_exp(x, axis=None, keepdims=False):
    """log(sum(exp(x))) as max + log(sum(exp(x - max))): no overflow past exp's range (x > 88 in
    fp32); a row of -inf gives -inf (the shift is 0 there, not -inf - -inf = NaN)."""
    peak = np.max(x, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(x - peak), axis=axis, keepdims=True)) + peak
    return out if keepdims else np.squeeze(out, axis=axis)


@op("reduce_argmax", "reduce_argmin")
def _reduce_arg(a):
    fn = np.argmax if a.op.op_type == "reduce_argmax" else np.argmin
    axis = a.scalar("axis", -1)
    out = fn(a.x, axis=axis)
    if a.scalar("keep_dims", False):
        out = np.expand_dims(out, axis)
    return out.astype(np.int32)


@op("layer_norm")
def _layer_norm(a):
    x = a.x
    axes = a.axes() or tuple(range(x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(var + a.scalar("epsilon", 1e-5))
    if a.has("gamma"):
        out = out * a.gamma
    if a.has("beta"):
        out = out + a.beta
    return out


@op("matmul")
def _matmul(a):
    x, y = a.x, a.y
    if a.scalar("transpose_x", False):
        x = np.swapaxes(x, -1, -2)
    if a.scalar("transpose_y", False):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@op("linear")
def _linear(a):
    out = np.matmul(a.x, np.swapaxes(a.weight, -1, -2))
    return out + a.bias if a.has("bias") else out


@op("einsum")
def _einsum(a):
    return np.einsum(a.scalar("equation"), *a.values)


# -- shapes and layout -------------------------------------------------------------------------


@op("const")
def _const(a):
    return np.asarray(a.op.outputs[0].val)


@op("shape")
def _shape(a):
    return np.array(np.shape(a.x), dtype=np.int32)


@op("reshape")
def _reshape(a):
    """iOS17+ semantics: each 0 in ``shape`` copies x's dim matched from the right (shape[i] with
    x.shape[j] where len(shape) - i == rank(x) - j), 1 where there is none (iOS15's rule, ranks
    equal, is the case where the two agree)."""
    x, shape = a.x, [int(s) for s in a.shape]
    offset = x.ndim - len(shape)
    shape = [s if s != 0 else (x.shape[i + offset] if i + offset >= 0 else 1) for i, s in enumerate(shape)]
    return np.reshape(x, shape)


@op("transpose")
def _transpose(a):
    return np.transpose(a.x, [int(p) for p in a.perm])


@op("expand_dims")
def _expand_dims(a):
    x = a.x
    axes = a.axes()
    rank = x.ndim + len(axes)
    for axis in sorted(ax % rank for ax in axes):
        x = np.expand_dims(x, axis)
    return x


@op("squeeze")
def _squeeze(a):
    axes = a.axes()
    return np.squeeze(a.x, axis=axes)


@op("concat")
def _concat(a):
    values, axis = [np.asarray(v) for v in a.values], a.scalar("axis")
    if any(v.ndim == 0 for v in values):  # MIL concatenates scalars as 1-element vectors
        values = [np.atleast_1d(v) for v in values]
    if a.scalar("interleave", False):
        stacked = np.stack(values, axis=axis + 1 if axis >= 0 else axis)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


@op("stack")
def _stack(a):
    return np.stack(a.values, axis=a.scalar("axis"))


@op("split")
def _split(a):
    x, axis = a.x, a.scalar("axis")
    if a.has("split_sizes"):
        bounds = np.cumsum([int(s) for s in a.split_sizes])[:-1]
    else:
        bounds = a.scalar("num_splits")
    return tuple(np.split(x, bounds, axis=axis))


@op("tile")
def _tile(a):
    return np.tile(a.x, [int(r) for r in a.reps])


@op("reverse")
def _reverse(a):
    return np.flip(a.x, axis=a.axes())


def _index_slices(shape, a):
    """Python index for slice_by_index / slice_update from begin/end/stride and their masks."""
    rank = len(shape)
    begin, end = (np.asarray(a.get(n)).astype(int) for n in ("begin", "end"))
    stride = np.asarray(a.get("stride", np.ones(rank, int))).astype(int)
    begin_mask, end_mask, squeeze_mask = (
        np.asarray(a.get(n, np.zeros(rank, bool))).astype(bool) for n in ("begin_mask", "end_mask", "squeeze_mask")
    )
    index = []
    for i in range(rank):
        if squeeze_mask[i]:
            index.append(int(begin[i]))
            continue
        b = None if begin_mask[i] else int(begin[i])
        e = None if end_mask[i] else int(end[i])
        index.append(slice(b, e, int(stride[i])))
    return tuple(index)


@op("slice_by_index")
def _slice_by_index(a):
    x = a.x
    return np.asarray(x[_index_slices(x.shape, a)])


@op("slice_by_size")
def _slice_by_size(a):
    x = a.x
    begin, size = np.asarray(a.begin).astype(int), np.asarray(a.size).astype(int)
    index = tuple(slice(b % d if d else 0, d if s == -1 else b % d + s) for b, s, d in zip(begin, size, x.shape))
    return x[index]


@op("slice_update")
def _slice_update(a):
    x = np.array(a.x, copy=True)
    index, update = _index_slices(x.shape, a), np.asarray(a.update)
    target = x[index].shape
    if target != update.shape:  # (numpy would clip the slice and broadcast into what is left)
        raise ValueError(f"[verify] slice_update {a.op.name}: begin {np.asarray(a.begin).tolist()}, end "
                         f"{np.asarray(a.end).tolist()} select {target} of x {x.shape}, not the update's "
                         f"{update.shape}: the write is out of bounds")
    x[index] = update
    return x


def _checked_indices(a, indices, size: int, axis: int):
    """indices as int64, each in [-size, size) (Core ML's range for gathers), else a clear error
    (a token id past the vocabulary, say) instead of numpy's IndexError."""
    indices = np.asarray(indices).astype(np.int64)
    bad = (indices < -size) | (indices >= size)
    if bad.any():
        raise ValueError(f"[verify] {a.op.op_type} {a.op.name}: index {int(indices[bad].flat[0])} out of range for "
                         f"axis {axis} of size {size}")
    return indices


@op("gather")
def _gather(a):
    x = a.x
    axis, batch_dims = a.scalar("axis", 0), a.scalar("batch_dims", 0)
    axis %= x.ndim
    indices = _checked_indices(a, a.indices, x.shape[axis], axis)
    if batch_dims == 0:
        return np.take(x, indices, axis=axis)
    out = [
        _gather_batch(xb, ib, axis - 1, batch_dims - 1) for xb, ib in zip(x, indices)
    ]
    return np.stack(out)


def _gather_batch(x, indices, axis, batch_dims):
    if batch_dims == 0:
        return np.take(x, indices, axis=axis)
    return np.stack([_gather_batch(xb, ib, axis - 1, batch_dims - 1) for xb, ib in zip(x, indices)])


@op("gather_nd")
def _gather_nd(a):
    """x[indices[..., 0], ..., indices[..., K-1]] after ``batch_dims`` leading batch axes."""
    x, indices = a.x, np.asarray(a.indices).astype(np.int64)
    batch_dims = a.scalar("batch_dims", 0)
    for d in range(indices.shape[-1]):
        _checked_indices(a, indices[..., d], x.shape[batch_dims + d], batch_dims + d)
    return _gather_nd_batch(x, indices, batch_dims)


def _gather_nd_batch(x, indices, batch_dims):
    if batch_dims == 0:
        return x[tuple(np.moveaxis(indices, -1, 0))]
    return np.stack([_gather_nd_batch(xb, ib, batch_dims - 1) for xb, ib in zip(x, indices)])


@op("gather_along_axis")
def _gather_along_axis(a):
    axis = a.scalar("axis", 0) % a.x.ndim
    return np.take_along_axis(a.x, _checked_indices(a, a.indices, a.x.shape[axis], axis), axis=axis)


@op("fill")
def _fill(a):
    return np.full([int(s) for s in a.shape], a.scalar("value", 0.0))


@op("fill_like")
def _fill_like(a):
    return np.full(np.shape(a.ref_tensor), a.scalar("value", 0.0))


@op("range_1d")
def _range_1d(a):
    return np.arange(a.scalar("start"), a.scalar("end"), a.scalar("step"))


@op("band_part")
def _band_part(a):
    x = a.x
    lower, upper = a.scalar("lower", -1), a.scalar("upper", -1)
    m = np.arange(x.shape[-2])[:, None]
    n = np.arange(x.shape[-1])[None, :]
    keep = ((lower < 0) | (m - n <= lower)) & ((upper < 0) | (n - m <= upper))
    return np.where(keep, x, np.zeros((), x.dtype))


@op("cumsum")
def _cumsum(a):
    x, axis = a.x, a.scalar("axis", 0)
    if a.scalar("reverse", False):
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis)
    if a.scalar("exclusive", False):
        out = out - x
    if a.scalar("reverse", False):
        out = np.flip(out, axis)
    return out


@op("pad")
def _pad(a):
    x = a.x
    pad = np.asarray(a.pad).astype(int).reshape(-1, 2)
    widths = [(0, 0)] * (x.ndim - len(pad)) + [tuple(p) for p in pad]
    mode = a.scalar("mode", "constant")
    if mode == "constant":
        return np.pad(x, widths, constant_values=a.scalar("constant_val", 0.0))
    return np.pad(x, widths, mode={"reflect": "reflect", "replicate": "edge"}[mode])


@op("topk")
def _topk(a):
    x, k, axis = a.x, a.scalar("k", 1), a.scalar("axis", -1)
    order = np.argsort(x if a.scalar("ascending", False) else -x, axis=axis, kind="stable")
    idx = np.take(order, np.arange(k), axis=axis)
    return np.take_along_axis(x, idx, axis=axis), idx.astype(np.int32)


@op("argsort")
def _argsort(a):
    x, axis = a.x, a.scalar("axis", -1)
    return np.argsort(x if a.scalar("ascending", False) else -x, axis=axis, kind="stable").astype(np.int32)


# -- attention ---------------------------------------------------------------------------------


@op("scaled_dot_product_attention")
def _sdpa(a):
    """iOS18 fused attention: softmax(q k^T / sqrt(E) + mask) v; a bool mask keeps True entries.

    A row whose keys are all masked is undefined in Core ML; we give NaN like PyTorch does.
    """
    q, k, v = a.query, a.key, a.value
    s = np.matmul(q, np.swapaxes(k, -1, -2)) / np.float32(math.sqrt(q.shape[-1]))
    if a.has("attn_mask"):
        mask = a.attn_mask
        s = np.where(mask, s, -np.inf) if mask.dtype == np.bool_ else s + mask
    with np.errstate(invalid="ignore"):
        p = np.exp(s - np.max(s, axis=-1, keepdims=True))
        p = p / np.sum(p, axis=-1, keepdims=True)
    return np.matmul(p, v)


# -- states ------------------------------------------------------------------------------------


@op("read_state")
def _read_state(a):
    return np.array(a._env[a.state("input")], copy=True)


@op("write_state")
def _write_state(a):
    a._env[a.state("state")] = np.asarray(a.value).astype(a._env[a.state("state")].dtype)
    return ()


@op("coreml_update_state")
def _coreml_update_state(a):
    name = a.state("state")
    a._env[name] = np.asarray(a.value).astype(a._env[name].dtype)
    return np.array(a._env[name], copy=True)


# -- compressed weights (iOS18 constexpr ops) -----------------------------------------------------


def _blockwise(values, shape):
    """Repeats per-block parameters (scale/offset) up to ``shape``."""
    for axis, (n, m) in enumerate(zip(shape, values.shape)):
        if n != m:
            values = np.repeat(values, n // m, axis=axis)
    return values


def shift_scale(data, scale, offset=None):
    """constexpr_blockwise_shift_scale: scale * (data - offset), parameters repeated per block."""
    data = np.asarray(data).astype(np.float32)
    if offset is not None:
        data = data - _blockwise(np.asarray(offset, np.float32), data.shape)
    return _blockwise(np.asarray(scale, np.float32), data.shape) * data


def sparse_to_dense(nonzero_data, mask):
    """constexpr_sparse_to_dense: scatter ``nonzero_data`` into the 1s of ``mask`` (row-major)."""
    out = np.zeros(np.shape(mask), dtype=np.asarray(nonzero_data).dtype)
    out[np.asarray(mask) != 0] = nonzero_data
    return out


def lut_to_dense(indices, lut, vector_axis=None):
    """constexpr_lut_to_dense: lut [*blocks, 2^bits, vector] indexed per block of ``indices``."""
    indices = np.asarray(indices).astype(np.int64)
    lut = np.asarray(lut)
    rank = indices.ndim
    vector = lut.shape[-1]
    block = [n // m for n, m in zip(indices.shape, lut.shape[:rank])]
    # index of each element's table along every axis
    table = tuple(
        (np.arange(n) // b).reshape([-1 if i == axis else 1 for i in range(rank)])
        for axis, (n, b) in enumerate(zip(indices.shape, block))
    )
    values = lut[table + (indices,)]  # [*indices.shape, vector]
    if vector == 1:
        return values[..., 0]
    if vector_axis is None:
        raise ValueError("[verify] constexpr_lut_to_dense with vectors needs vector_axis")
    axis = int(vector_axis) % rank
    values = np.moveaxis(values, -1, axis + 1)
    shape = list(indices.shape)
    shape[axis] *= vector
    return values.reshape(shape)


@op("constexpr_blockwise_shift_scale")
def _constexpr_blockwise_shift_scale(a):
    return shift_scale(a.data, a.scale, a.get("offset"))


@op("constexpr_sparse_to_dense")
def _constexpr_sparse_to_dense(a):
    return sparse_to_dense(a.nonzero_data, a.mask)


@op("constexpr_lut_to_dense")
def _constexpr_lut_to_dense(a):
    return lut_to_dense(a.indices, a.lut, a.scalar("vector_axis"))


@op("constexpr_lut_to_sparse")
def _constexpr_lut_to_sparse(a):
    mask = np.asarray(a.indices_mask)
    dense = lut_to_dense(sparse_to_dense(a.indices_nonzero_data, mask), a.lut, a.scalar("vector_axis"))
    if dense.shape != mask.shape:
        mask = np.repeat(mask, dense.shape[a.scalar("vector_axis")] // mask.shape[a.scalar("vector_axis")],
                         axis=a.scalar("vector_axis"))
    return mask, dense[mask != 0]


@op("constexpr_sparse_blockwise_shift_scale")
def _constexpr_sparse_blockwise_shift_scale(a):
    mask = np.asarray(a.data_mask)
    dense = shift_scale(sparse_to_dense(a.nonzero_data, mask), a.scale, a.get("offset"))
    return mask, dense[mask != 0]


@op("constexpr_cast")
def _constexpr_cast(a):
    return np.asarray(a.source_val)


SUPPORTED_OPS = frozenset(OPS)


# ----------------------------------------------------------------------------------------------
# the program


class Program:
    """One function of a MIL program, ready to run in numpy."""

    def __init__(self, mil_program, function_name: str = "main", *, emulate_fp16: bool = True,
                 description=None):
        """``description``: the spec's ModelDescription (Program.load passes it), whose flexible
        input ranges / enumerated shapes predict() enforces as Core ML does."""
        if function_name not in mil_program.functions:
            raise ValueError(
                f"[verify] the program has no function {function_name!r} (it has {sorted(mil_program.functions)})"
            )
        self.mil_program = mil_program
        self.function_name = function_name
        self.function = mil_program.functions[function_name]
        self.emulate_fp16 = emulate_fp16
        self.description = description
        self.allowed_shapes = _allowed_shapes(description, function_name)
        unknown = sorted({o.op_type for o in self._ops()} - SUPPORTED_OPS)
        if unknown:
            raise UnsupportedOpError(
                f"[verify] the MIL reference interpreter does not implement op(s) {', '.join(unknown)}"
            )

    @classmethod
    def load(cls, source, function_name: str = "main", *, emulate_fp16: bool = True) -> "Program":
        """From an MLModel (in memory) or a .mlpackage path."""
        program, description = _load_mil_program(source)
        return cls(program, function_name, emulate_fp16=emulate_fp16, description=description)

    def with_options(self, function_name: str | None = None, emulate_fp16: bool | None = None) -> "Program":
        """This program with another function and/or fp16 emulation (None: keep this one's)."""
        function_name = self.function_name if function_name is None else function_name
        emulate_fp16 = self.emulate_fp16 if emulate_fp16 is None else emulate_fp16
        if (function_name, emulate_fp16) == (self.function_name, self.emulate_fp16):
            return self
        return Program(self.mil_program, function_name, emulate_fp16=emulate_fp16, description=self.description)

    @property
    def functions(self) -> list[str]:
        """The program's function names, sorted (the loaders do not keep one order)."""
        return sorted(self.mil_program.functions)

    def _ops(self):
        return list(self.function.operations)

    def op_types(self) -> Counter:
        """How many ops of each type the function runs (const ops included)."""
        return Counter(o.op_type for o in self._ops())

    # -- io ---------------------------------------------------------------------------------

    def _is_state(self, var) -> bool:
        from coremltools.converters.mil.mil import types

        return types.is_state(var.sym_type)

    @property
    def input_names(self) -> list[str]:
        return [n for n, v in self.function.inputs.items() if not self._is_state(v)]

    @property
    def state_names(self) -> list[str]:
        return [n for n, v in self.function.inputs.items() if self._is_state(v)]

    @property
    def output_names(self) -> list[str]:
        return [v.name for v in self.function.outputs]

    def _state_specs(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """(shape, dtype) of each state buffer, by state name."""
        specs = {}
        for name in self.state_names:
            wrapped = self.function.inputs[name].sym_type.wrapped_type()
            specs[name] = (tuple(wrapped.get_shape()), np.dtype(_np_dtype(wrapped.get_primitive())))
        return specs

    def make_state(self) -> dict[str, np.ndarray]:
        """Fresh state buffers (zeros) for a stateful program, keyed by state name."""
        return {name: np.zeros(shape, dtype) for name, (shape, dtype) in self._state_specs().items()}

    def _check_input(self, name, value):
        var = self.function.inputs[name]
        value = np.asarray(value)
        want = _np_dtype(var.dtype)
        shape = var.shape
        if value.ndim != len(shape) or any(
            isinstance(d, (int, np.integer)) and d != n for d, n in zip(shape, value.shape)
        ):
            raise ValueError(f"[verify] input {name!r} has shape {value.shape}, the program expects {shape}")
        allowed = self.allowed_shapes.get(name)
        if allowed is not None and not allowed.allows(value.shape):
            raise ValueError(f"[verify] input {name!r} has shape {value.shape}; the program declares shapes "
                             f"{allowed} for it (Core ML refuses any other)")
        if np.issubdtype(want, np.integer) and not np.issubdtype(value.dtype, np.integer):
            if value.dtype == np.bool_ or not np.all(np.isfinite(value)) or np.any(value != np.round(value)):
                raise ValueError(f"[verify] input {name!r} holds values of dtype {value.dtype} that are not whole "
                                 f"numbers; the program declares it {want}")
        return value.astype(want)

    def _check_state(self, state: dict):
        """state: the buffers make_state() gives, by name, shape and dtype (Core ML's MLState holds
        them fixed; a wrong one would fail deep inside or silently skip fp16's rounding)."""
        specs = self._state_specs()  # (not make_state(): this runs on every decode step)
        if set(state) != set(specs):
            raise ValueError(f"[verify] state must hold {sorted(specs)}; got {sorted(state)}: pass "
                             f"state=program.make_state()")
        for name, (shape, dtype) in specs.items():
            got = state[name]
            if not isinstance(got, np.ndarray) or got.shape != shape or got.dtype != dtype:
                raise ValueError(f"[verify] state {name!r} must be a {dtype} ndarray of shape {shape} "
                                 f"(program.make_state()); got {type(got).__name__} "
                                 f"{getattr(got, 'dtype', '')} {getattr(got, 'shape', '')}")

    # -- run --------------------------------------------------------------------------------

    def _round(self, var, value):
        """Rounds an op result to the dtype the program declares for it."""
        if not isinstance(value, np.ndarray) and not np.isscalar(value):
            return value
        dtype = _np_dtype(var.dtype)
        if dtype == np.float16 and not self.emulate_fp16:
            dtype = np.dtype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            out = np.asarray(value).astype(dtype)
        return out

    def predict(self, inputs: dict, state: dict | None = None, *, intermediates=()) -> dict[str, np.ndarray]:
        """Runs the function; returns {output name: ndarray}. ``state`` is updated in place.

        ``intermediates``: names of inner variables to return as well (e.g. a decompressed weight).
        """
        if not isinstance(inputs, Mapping):
            raise TypeError(f"[verify] inputs must be a dict of {self.input_names} to arrays, got "
                            f"{type(inputs).__name__}")
        missing = [n for n in self.input_names if n not in inputs]
        extra = [n for n in inputs if n not in self.input_names]
        if missing or extra:
            states = [n for n in extra if n in self.state_names]
            raise ValueError(
                f"[verify] inputs must be {self.input_names}; missing {missing}, unexpected {extra}"
                + (f" ({states} are states: pass them in state=)" if states else "")
            )
        if self.state_names and state is None:
            raise ValueError(f"[verify] the program is stateful ({self.state_names}): pass state=program.make_state()")
        if self.state_names:
            self._check_state(state)
        env: dict[str, object] = {n: self._check_input(n, inputs[n]) for n in self.input_names}
        from fusedformer.coreml import kv_cache

        if kv_cache.is_stateful_decoder(self):  # what Core ML cannot check but would get wrong
            kv_cache.check_decoder_inputs(env["input_ids"], env["attention_mask"], kv_cache.cache_length(self))
        for name in self.state_names:
            env[name] = state[name]
        for operation in self._ops():
            result = OPS[operation.op_type](_Args(operation, env))
            results = result if isinstance(result, tuple) else (result,)
            for var, value in zip(operation.outputs, results):
                env[var.name] = self._round(var, value)
        for name in self.state_names:
            state[name] = env[name]
        names = self.output_names + [n for n in intermediates if n not in self.output_names]
        unknown = [n for n in names if n not in env]
        if unknown:
            raise ValueError(f"[verify] the program has no variable(s) {unknown}")
        return {n: np.asarray(env[n]) for n in names}


def verify(path_or_mlmodel, inputs: dict, *, function_name: str | None = None, state: dict | None = None,
           emulate_fp16: bool | None = None) -> dict[str, np.ndarray]:
    """Runs an exported model's MIL program in numpy; inputs and outputs keyed by their names.

    ``path_or_mlmodel``: a ``.mlpackage`` path or an ``MLModel`` (or an already loaded Program).
    ``function_name`` / ``emulate_fp16``: None means "main" / True (for a Program: its own).
    ``state``: the state buffers of a stateful program (``kv_cache=True`` exports), updated in place
    like Core ML's MLState; None gives fresh (zero) ones, so one call is a prefill::

        out = ff.coreml.verify(path, {"input_ids": ids, "attention_mask": np.ones(ids.shape, np.int32)})
        state = ff.coreml.Program.load(path).make_state()   # to decode on: pass the same state each call
        ff.coreml.verify(path, {"input_ids": ids, "attention_mask": mask}, state=state)
    """
    if isinstance(path_or_mlmodel, Program):
        program = path_or_mlmodel.with_options(function_name, emulate_fp16)
    else:
        program = Program.load(path_or_mlmodel, function_name or "main",
                               emulate_fp16=True if emulate_fp16 is None else emulate_fp16)
    if state is None and program.state_names:
        state = program.make_state()
    inputs = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in inputs.items()}
    return program.predict(inputs, state=state)
