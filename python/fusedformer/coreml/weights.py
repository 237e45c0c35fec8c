"""A fusedformer QuantizedWeight as a compressed Core ML constant (iOS18 constexpr ops).

The decompressed weight equals ``qw.dequantize()`` (fp32 programs: bit for bit; fp16 programs:
the fp16 program computes with fp16 scales/LUTs):

====================  ===========================================================================
Int8                  constexpr_blockwise_shift_scale(int8 q, scale [N,1], offset = zero point)
                      -> (q - zp) * scale, the format's own definition
Palettize             constexpr_lut_to_dense(uint<bits> indices, lut [G,1,2^bits,1]), one table
                      per group of N/G rows
Affine (MLX)          constexpr_blockwise_shift_scale(uint4/uint8 q, scale [N,K/g]) + bias: MLX's
                      ``scale * q + bias`` cannot be written as Core ML's ``scale * (q - offset)``
                      without a rounding change (the offset -bias/scale is rounded), so the bias
                      is added by one runtime ``add`` per group: (scale * q) rounded, + bias
                      rounded, the order dequantize() uses
Prune                 constexpr_sparse_to_dense(values, uint1 mask)
Prune + Palettize     constexpr_lut_to_sparse -> constexpr_sparse_to_dense
Prune + Affine        constexpr_sparse_blockwise_shift_scale(q, scale) -> constexpr_sparse_to_dense,
                      then + bias like Affine, but on the kept entries only: the bias is multiplied
                      by the 0/1 keep-mask, which constexpr_lut_to_dense(the same uint1 mask
                      constant, lut [0, 1]) makes (2 table entries stored, no second mask)
====================  ===========================================================================
"""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

def _uint_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes as the narrowest unsigned sub-byte dtype MIL has for them (uint1/2/3/4/6/8)."""
    dtype = {
        1: types.np_uint1_dtype, 2: types.np_uint2_dtype, 3: types.np_uint3_dtype,
        4: types.np_uint4_dtype, 6: types.np_uint6_dtype, 8: np.dtype(np.uint8),
    }[bits]
    return np.asarray(codes, dtype=np.uint8).astype(dtype)


def _affine_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Affine codes for blockwise_shift_scale: uint4 when they fit, else uint8."""
    return np.asarray(codes, np.uint8).astype(types.np_uint4_dtype if bits <= 4 else np.uint8)


def _lut(qw, lut: np.ndarray, dtype) -> np.ndarray:
    """fusedformer LUT [G, 2^bits] -> MIL [G, 1, 2^bits, 1] (G blocks of rows, all columns)."""
    g, size = lut.shape
    return lut.astype(dtype).reshape(g, 1, size, 1)


def _check_palette_groups(qw):
    if qw.arrays["lut"].shape[0] not in (1, qw.shape[0]) and qw.shape[0] % qw.arrays["lut"].shape[0]:
        raise ValueError(f"[coreml] {qw}: LUT groups do not divide the {qw.shape[0]} rows")


def compressed_weight(qw, *, dtype=np.float32, name: str = "weight"):
    """MIL Var of W [N, K] = qw.dequantize(), built from constexpr ops (inside a mb program)."""
    from fusedformer.quant import Affine, Int8, Palettize, Prune

    dtype = np.dtype(dtype)
    s, a = qw.scheme, qw.arrays
    n, k = qw.shape
    if isinstance(s, Int8):
        zp = a.get("zero_points")
        kwargs = {} if zp is None else {"offset": np.asarray(zp, np.int8).reshape(n, 1)}
        return mb.constexpr_blockwise_shift_scale(
            data=np.asarray(a["w_q"], np.int8), scale=a["scales"].astype(dtype).reshape(n, 1), name=name, **kwargs
        )
    if isinstance(s, Palettize):
        _check_palette_groups(qw)
        return mb.constexpr_lut_to_dense(indices=_uint_codes(qw.codes(), s.bits), lut=_lut(qw, a["lut"], dtype),
                                         name=name)
    if isinstance(s, Affine):
        scaled = mb.constexpr_blockwise_shift_scale(
            data=_affine_codes(qw.codes(), s.bits), scale=a["scales"].astype(dtype), name=f"{name}_scaled"
        )
        return _add_group_bias(scaled, a["biases"].astype(dtype), s.group_size, name)
    if isinstance(s, Prune):
        return _pruned(qw, dtype, name)
    raise TypeError(f"[coreml] cannot lower a {type(s).__name__} weight")


def _add_group_bias(scaled, biases: np.ndarray, group_size: int, name: str, keep=None):
    """W [N, K] = scaled + bias, one bias per group of ``group_size`` columns, as a runtime add
    after the constexpr (so each value is (scale * q) rounded, + bias rounded: dequantize()'s
    order). ``keep``: a 0/1 [N, K] Var; the bias then goes to the kept entries only."""
    n, k = scaled.shape
    groups = k // group_size
    bias = biases.reshape(n, groups, 1)
    if keep is not None:  # 1 * bias is bias, 0 * bias is 0: exact
        bias = mb.mul(x=mb.reshape(x=keep, shape=[n, groups, group_size]), y=bias, name=f"{name}_kept_bias")
    biased = mb.add(x=mb.reshape(x=scaled, shape=[n, groups, group_size]), y=bias)
    return mb.reshape(x=biased, shape=[n, k], name=name)


def _pruned(qw, dtype, name):
    from fusedformer.quant import Affine

    s, a = qw.scheme, qw.arrays
    mask = qw.mask().astype(np.uint8).astype(types.np_uint1_dtype)
    inner = s.then
    if inner is None:
        return mb.constexpr_sparse_to_dense(nonzero_data=a["values"].astype(dtype), mask=mask, name=name)
    if isinstance(inner, Affine):
        # one mask constant for both constexprs: the sparse scale * q and the 0/1 keep-mask
        mask = mb.const(val=mask, name=f"{name}_mask")
        mask_out, values = mb.constexpr_sparse_blockwise_shift_scale(
            data_mask=mask, nonzero_data=_affine_codes(qw.codes(), inner.bits),
            scale=a["scales"].astype(dtype), name=f"{name}_sparse",
        )
        scaled = mb.constexpr_sparse_to_dense(nonzero_data=values, mask=mask_out, name=f"{name}_scaled")
        keep = mb.constexpr_lut_to_dense(indices=mask, lut=np.array([0, 1], dtype).reshape(1, 1, 2, 1),
                                         name=f"{name}_keep")
        return _add_group_bias(scaled, a["biases"].astype(dtype), inner.group_size, name, keep=keep)
    _check_palette_groups(qw)
    mask_out, values = mb.constexpr_lut_to_sparse(
        indices_mask=mask, indices_nonzero_data=_uint_codes(qw.codes(), inner.bits),
        lut=_lut(qw, a["lut"], dtype), name=f"{name}_sparse",
    )
    return mb.constexpr_sparse_to_dense(nonzero_data=values, mask=mask_out, name=name)


def constexpr_op_types(qw) -> set[str]:
    """The constexpr op types the lowering of ``qw`` emits (for op-inventory tests)."""
    from fusedformer.quant import Affine, Int8, Palettize, Prune

    s = qw.scheme
    if isinstance(s, (Int8, Affine)):
        return {"constexpr_blockwise_shift_scale"}
    if isinstance(s, Palettize):
        return {"constexpr_lut_to_dense"}
    if s.then is None:
        return {"constexpr_sparse_to_dense"}
    if isinstance(s.then, Affine):
        return {"constexpr_sparse_blockwise_shift_scale", "constexpr_sparse_to_dense", "constexpr_lut_to_dense"}
    return {"constexpr_lut_to_sparse", "constexpr_sparse_to_dense"}
