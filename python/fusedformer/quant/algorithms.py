"""Compression algorithms: MLX's round-to-nearest affine rule, int8 per channel, exact 1-D
k-means (native) and magnitude pruning. All work on float32 numpy arrays."""

from __future__ import annotations

import numpy as np


def check_range(w_min: np.ndarray, w_max: np.ndarray, what: str) -> None:
    """A ``[quant]`` ValueError where some max - min overflows float32: the scale * q + bias (or
    (q - zero point) * scale) form cannot hold such a range, and its values would be inf/NaN."""
    with np.errstate(over="ignore"):
        span = w_max.astype(np.float32) - w_min.astype(np.float32)
    if not np.isfinite(span).all():
        raise ValueError(f"[quant] {what}: a range of the weight (max - min) overflows float32; "
                         "such a weight cannot be compressed in this format")


def affine_params(w_min: np.ndarray, w_max: np.ndarray, bits: int):
    """MLX's scale/bias rule (mlx backend/cpu/quantized.cpp quantize), float32 throughout.

    The edge value of larger magnitude is made exactly representable: scale = edge / q0,
    bias = edge, so a group's extreme survives quantization.
    """
    f32 = np.float32
    n_bins = f32((1 << bits) - 1)
    w_min, w_max = w_min.astype(f32), w_max.astype(f32)
    mask = np.abs(w_min) > np.abs(w_max)
    scale = np.maximum((w_max - w_min) / n_bins, f32(1e-7))
    scale = np.where(mask, scale, -scale)
    edge = np.where(mask, w_min, w_max)
    with np.errstate(divide="ignore", invalid="ignore"):
        q0 = np.rint(edge / scale)
        nonzero = q0 != 0
        scale = np.where(nonzero, edge / np.where(nonzero, q0, f32(1)), scale)
    bias = np.where(nonzero, edge, f32(0))
    return scale.astype(f32), bias.astype(f32)


def affine_quantize(w: np.ndarray, bits: int, group_size: int, keep: np.ndarray | None = None):
    """w [N, K] float32 -> (q uint8 [N, K], scales [N, K/g], biases [N, K/g]) by MLX's rule.

    ``keep`` (bool [N, K]) restricts each group's range to the kept entries (joint pruning).
    """
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size)
    if keep is None:
        w_min, w_max = g.min(-1), g.max(-1)
    else:
        kg = keep.reshape(g.shape)
        w_min = np.where(kg, g, np.inf).min(-1)
        w_max = np.where(kg, g, -np.inf).max(-1)
        empty = ~kg.any(-1)
        w_min, w_max = np.where(empty, 0, w_min), np.where(empty, 0, w_max)
    scale, bias = affine_params(w_min, w_max, bits)
    q = np.rint((g - bias[..., None]) / scale[..., None])
    q = np.clip(q, 0, (1 << bits) - 1).astype(np.uint8).reshape(n, k)
    return q, scale, bias


def affine_dequantize(q: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int):
    """scale * q + bias in float32 with two roundings, exactly as mx.dequantize."""
    n, k = q.shape
    qg = q.reshape(n, k // group_size, group_size).astype(np.float32)
    return (scales[..., None] * qg + biases[..., None]).reshape(n, k)


def int8_quantize(w: np.ndarray, zero_point: bool):
    """Per output channel: symmetric (Core ML linear_symmetric) or with an int8 zero point."""
    f32 = np.float32
    if not zero_point:
        scale = (np.abs(w).max(1) / f32(127)).astype(f32)
        scale = np.where(scale > 0, scale, f32(1))
        q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
        return q, scale, None
    w_min = np.minimum(w.min(1), 0).astype(f32)
    w_max = np.maximum(w.max(1), 0).astype(f32)
    scale = ((w_max - w_min) / f32(255)).astype(f32)
    scale = np.where(scale > 0, scale, f32(1))
    zp = np.clip(np.rint(-128 - w_min / scale), -128, 127).astype(np.int8)
    q = np.clip(np.rint(w / scale[:, None]) + zp[:, None].astype(f32), -128, 127).astype(np.int8)
    return q, scale, zp


def int8_dequantize(q, scales, zero_points=None):
    """(q - zero_point) * scale: the integer difference is exact, one float32 rounding
    (Core ML constexpr_blockwise_shift_scale's definition)."""
    d = q.astype(np.float32)
    if zero_points is not None:
        d = d - zero_points.astype(np.float32)[:, None]
    return d * scales.astype(np.float32)[:, None]


def kmeans_lut(values: np.ndarray, bits: int) -> np.ndarray:
    """Optimal 1-D k-means (k = 2**bits) centroids, ascending, float32 [k] (native DP)."""
    from fusedformer import _C

    v = np.ascontiguousarray(values, dtype=np.float32).ravel()
    k = 1 << bits
    if v.size == 0:
        return np.zeros(k, np.float32)
    return np.asarray(_C.quant_kmeans1d(v, k), dtype=np.float32)


def lut_assign(values: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Index of the nearest LUT entry (ascending LUT; ties to the lower index)."""
    mid = (lut[1:].astype(np.float64) + lut[:-1]) / 2
    return np.searchsorted(mid, values.astype(np.float64), side="left").astype(np.uint8)


def magnitude_mask(w: np.ndarray, sparsity: float, n_m: tuple[int, int] | None) -> np.ndarray:
    """bool [N, K], True = kept. Unstructured: the round(sparsity * size) smallest |w| go
    (ties broken by position); n:m: in each run of m along K the n largest |w| stay."""
    a = np.abs(w)
    if n_m is not None:
        n, m = n_m
        g = a.reshape(w.shape[0], -1, m)
        order = np.argsort(-g, axis=-1, kind="stable")[..., :n]
        keep = np.zeros(g.shape, bool)
        np.put_along_axis(keep, order, True, axis=-1)
        return keep.reshape(w.shape)
    drop = int(round(sparsity * w.size))
    keep = np.ones(w.size, bool)
    if drop:
        keep[np.argsort(a.ravel(), kind="stable")[:drop]] = False
    return keep.reshape(w.shape)
