"""Compressed-weight linears for MLX: ff.mlx.QuantizedLinear and qmatmul_mlx (ff.qmatmul on MLX).

Every format of ``ff.quant`` is served from a ``QuantizedWeight``'s own arrays; nothing is
re-quantized, so MLX computes with the values of ``qw.dequantize()`` (``MLXWeight.dequantize()``
reproduces them bit for bit; matmul results differ from the float64 reference by float32
rounding only):

======================  ==================================================================
format                  MLX path
======================  ==================================================================
Affine                  ``mx.quantized_matmul`` on ``qw.to_mlx()`` — MLX's fused kernel
                        (Metal on Apple GPUs, MLX's CPU kernel elsewhere).
Int8                    ``mx.quantized_matmul`` 8-bit affine on codes q + 128 with bias
                        -(128 + zero_point) * scale: the same weights, MLX's fused kernel
                        (K divisible by 32; else dequantize per tile, then matmul).
Palettize               no fused MLX kernel: unpack the indices and gather from the LUT per
                        tile of output rows, then a float32 matmul.
Prune (+Affine/Palet.)  no fused MLX kernel: scatter the packed survivors into each tile
                        through the bitmask (cumulative count), dequantize, float32 matmul.
======================  ==================================================================

Tiles bound the transient dense weight to ``TILE_ELEMENTS`` values; the compressed arrays are
what stays in memory (``quantized_weight()`` views them from numpy without a copy, except
Int8's: its canonical int8 codes are a copy of the q + 128 codes MLX's kernel reads, made on
first use, by the native kernel's path or a call of ``quantized_weight()``).
Activations may be float32, float16 or bfloat16; accumulation is float32 and the result has the
activations' dtype. No Metal is written here: on Apple GPUs affine and int8 use MLX's own
kernel and the others run as the MLX op compositions below. On MLX's CPU device,
``ff.mlx.cpu_kernel("native")`` runs fusedformer's native kernel for every format instead
(fusedformer.mlx.native; inference only).
"""

from __future__ import annotations

import functools
import json
import weakref

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from fusedformer._frameworks import framework_of
from fusedformer.mlx.native import run_native, use_native
from fusedformer.quant import Affine, Int8, Palettize, Prune, QuantizedWeight, compress

TILE_ELEMENTS = 1 << 22  # dense weight values materialised at once by the tiled formats
CPU_RELAYOUT_MIN_ROWS = 16  # rows of x from which tiles are laid out [K, rows] for MLX's CPU matmul
FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


# -- bit streams ---------------------------------------------------------------------------
def unpack_bits(packed, bits: int, start: int, count: int):
    """Codes ``start .. start+count`` of LSB-first ``bits``-wide streams along the last axis of
    ``packed`` (uint8), as uint8 (the layout of fusedformer.quant.packing)."""
    if bits == 8:
        return packed[..., start : start + count]
    lead = packed.shape[:-1]
    bit0, bit1 = start * bits, (start + count) * bits
    b0, b1 = bit0 // 8, -(-bit1 // 8)
    seg = packed[..., b0:b1]
    if 8 % bits == 0 and bit0 % 8 == 0:  # whole codes per byte: one shift per code slot
        shifts = mx.arange(0, 8, bits, dtype=mx.uint8)
        codes = (seg[..., None] >> shifts) & ((1 << bits) - 1)
        return codes.reshape(*lead, -1)[..., :count]
    planes = ((seg[..., None] >> mx.arange(8, dtype=mx.uint8)) & 1).reshape(*lead, -1)
    planes = planes[..., bit0 - 8 * b0 : bit1 - 8 * b0].reshape(*lead, count, bits)
    return (planes << mx.arange(bits, dtype=mx.uint8)).sum(-1).astype(mx.uint8)


def _take(table, index):
    """table[index] for a 1-D table: a flat gather (faster than a 2-D one on MLX's CPU backend)."""
    return mx.take(table, index.reshape(-1)).reshape(index.shape)


def _row_lut_values(lut, codes, row0: int, group_size: int):
    """lut[group of each row][codes] for codes [rows, K] starting at output row ``row0``."""
    if lut.shape[0] == 1:
        return _take(lut[0], codes)
    groups = (mx.arange(row0, row0 + codes.shape[0]) // group_size)[:, None]
    return _take(lut.reshape(-1), groups * lut.shape[1] + codes.astype(mx.int32))


# -- one compressed weight as MLX arrays -----------------------------------------------------
class MLXWeight(nn.Module):
    """A compressed W [N, K] held as MLX arrays (frozen parameters), multiplied as x @ W.T."""

    path = "MLX op composition: dequantize per tile, then matmul"  # how matmul_t runs

    def __init__(self, qw: QuantizedWeight):
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.scheme = qw.scheme
        self._quantized = None

    def __setitem__(self, key, value):
        # Every array replaced (load_weights, update, set_dtype: all go through here) drops or
        # rebuilds what was derived from the old ones (at once: under mx.compile nothing can be
        # read back from an array, so nothing is derived lazily inside a call).
        super().__setitem__(key, value)
        self._arrays_changed(key)

    def _arrays_changed(self, key: str):
        self._quantized = None

    @staticmethod
    def from_quantized(qw: QuantizedWeight) -> "MLXWeight":
        for scheme_type, cls in _FORMATS:
            if isinstance(qw.scheme, scheme_type):
                weight = cls(qw)
                weight.freeze()
                return weight
        raise TypeError(f"[qmatmul] no MLX path for scheme {qw.scheme!r}")

    def matmul_t(self, x):
        """x [..., K] @ W.T -> [..., N] in x's dtype with float32 accumulation: MLX's path of
        the format, or fusedformer's native kernel when chosen (fusedformer.mlx.native)."""
        if use_native(x):
            from fusedformer.ops_quant import qmatmul_numpy

            return run_native("qmatmul", functools.partial(qmatmul_numpy, qw=self.quantized_weight()), x)
        if x.size == 0:  # (MLX's quantized_matmul of no rows dies of SIGFPE in mlx 0.32: the process with it)
            return mx.zeros((*x.shape[:-1], self.out_features), dtype=x.dtype)
        return self._mlx_matmul_t(x)

    def quantized_weight(self) -> QuantizedWeight:
        """This weight as a QuantizedWeight over numpy views of its MLX arrays (zero-copy, but
        float16/bfloat16 arrays left by set_dtype, widened to float32 copies)."""
        if self._quantized is None:
            arrays = {name: np.asarray(_widened(a)) for name, a in self.canonical_arrays().items()}
            self._quantized = QuantizedWeight(self.scheme, (self.out_features, self.in_features), arrays)
        return self._quantized

    def canonical_arrays(self) -> dict:
        """The format's arrays by their fusedformer.quant names (MLX arrays)."""
        raise NotImplementedError

    def _mlx_matmul_t(self, x):
        """Tile by tile: dequantize rows, multiply in float32."""
        x32 = x.astype(mx.float32)
        # MLX's CPU matmul is ~3x slower with a transposed right operand: from a few rows of x
        # on, copying each tile to [K, rows] first pays for itself (measured on mlx[cpu] 0.32).
        rows = int(np.prod(x.shape[:-1]))
        relayout = mx.default_device() == mx.cpu and rows >= CPU_RELAYOUT_MIN_ROWS

        def tile_t(r0, r1):
            w_t = self.dequantize_rows(r0, r1).T
            return mx.contiguous(w_t) if relayout else w_t

        tiles = [x32 @ tile_t(r0, r1) for r0, r1 in self._row_tiles()]
        y = tiles[0] if len(tiles) == 1 else mx.concatenate(tiles, axis=-1)
        return y.astype(x.dtype)

    def dequantize(self):
        """W as float32 [N, K]: the same values as QuantizedWeight.dequantize() (with the format's
        float arrays cast by ``set_dtype``, MLX's own dequantization in that dtype)."""
        w = mx.concatenate([self.dequantize_rows(r0, r1) for r0, r1 in self._row_tiles()], axis=0)
        return w.astype(mx.float32)

    def dequantize_rows(self, r0: int, r1: int):
        raise NotImplementedError

    def _row_tiles(self):
        rows = max(1, TILE_ELEMENTS // self.in_features)
        return [(r, min(r + rows, self.out_features)) for r in range(0, self.out_features, rows)]


def _mx(arrays: dict, name: str):
    return mx.array(np.asarray(arrays[name]))


def _widened(a):
    """``a`` with float16/bfloat16 (a model's ``set_dtype`` casts the format's float arrays, as
    it does nn.QuantizedLinear's scales) widened to float32, exactly, for the native kernel."""
    return a.astype(mx.float32) if a.dtype in (mx.float16, mx.bfloat16) else a


class AffineWeight(MLXWeight):
    """MLX's own affine format: ``mx.quantized_matmul`` (fused) on ``qw.to_mlx()``."""

    path = "mx.quantized_matmul (MLX's fused kernel)"

    def __init__(self, qw):
        super().__init__(qw)
        self.bits, self.group_size = qw.scheme.bits, qw.scheme.group_size
        self.w_q, self.scales, self.biases = qw.to_mlx()

    def canonical_arrays(self):
        return {"w_q": self.w_q, "scales": self.scales, "biases": self.biases}

    def _mlx_matmul_t(self, x):
        y = mx.quantized_matmul(x, self.w_q, self.scales, self.biases, transpose=True,
                                group_size=self.group_size, bits=self.bits)
        return y.astype(x.dtype)

    def dequantize_rows(self, r0, r1):
        return mx.dequantize(self.w_q[r0:r1], self.scales[r0:r1], self.biases[r0:r1],
                             group_size=self.group_size, bits=self.bits)


class Int8Weight(MLXWeight):
    """Per-channel int8. MLX has no int8 kernel, but its 8-bit affine one takes these weights
    without loss: codes u = q + 128 (uint8, MLX's packing), scale = the channel's scale, bias =
    -(128 + zero_point) * scale, so scale * u + bias = (q - zero_point) * scale. Used when a
    group size of 128/64/32 divides K (float32 rounding of the sum differs from the composition
    path, the weights are the same); otherwise (q - zero_point) * scale per tile, then matmul."""

    def __init__(self, qw):
        super().__init__(qw)
        arrays = qw.to_dict()
        n, k = qw.shape
        scales = np.asarray(arrays["scales"], np.float32)
        zero = np.asarray(arrays["zero_points"], np.float32) if "zero_points" in arrays else np.zeros(n, np.float32)
        self.codes = mx.array((np.asarray(arrays["w_q"]).astype(np.int16) + 128).astype(np.uint8))  # u = q + 128
        self.scales = mx.array(scales)
        self.offsets = mx.array(zero + 128)  # exact small integers: W = (u - offset) * scale
        self.group_size = next((g for g in (128, 64, 32) if k % g == 0), None)
        if self.group_size is not None:  # (parameters, as MLX's kernel reads them: group_arrays)
            groups = k // self.group_size
            self.group_scales = mx.array(np.repeat(scales[:, None], groups, axis=1))
            self.group_biases = mx.array(np.repeat((-(zero + 128) * scales)[:, None], groups, axis=1))

    @property
    def path(self):
        return MLXWeight.path if self.group_size is None else "mx.quantized_matmul 8-bit (MLX's fused kernel)"

    def group_arrays(self):
        """The group scales and biases MLX's 8-bit kernel reads: the parameters, or where
        set_dtype made them float16/bfloat16, the same derived in float32 from the channels'
        arrays. In half precision the kernel would round scale * u (u up to 255) before the bias
        -(128 + zero_point) * scale cancels it, a rounding step of the code's whole range on
        every weight; in float32 both are exact."""
        if self.group_scales.dtype == mx.float32 and self.group_biases.dtype == mx.float32:
            return self.group_scales, self.group_biases
        scales = self.scales.astype(mx.float32)[:, None]
        shape = self.group_scales.shape
        return mx.broadcast_to(scales, shape), mx.broadcast_to(-self.offsets.astype(mx.float32)[:, None] * scales, shape)

    def canonical_arrays(self):
        arrays = {"w_q": (self.codes.astype(mx.int16) - 128).astype(mx.int8), "scales": self.scales}
        if self.scheme.zero_point:
            arrays["zero_points"] = (self.offsets - 128).astype(mx.int8)
        return arrays

    def _mlx_matmul_t(self, x):
        if self.group_size is None:
            return super()._mlx_matmul_t(x)
        scales, biases = self.group_arrays()
        y = mx.quantized_matmul(x, self.codes.view(mx.uint32), scales, biases,
                                transpose=True, group_size=self.group_size, bits=8)
        return y.astype(x.dtype)

    def dequantize_rows(self, r0, r1):
        return (self.codes[r0:r1].astype(mx.float32) - self.offsets[r0:r1, None]) * self.scales[r0:r1, None]


class PalettizedWeight(MLXWeight):
    """k-means LUT (no fused MLX kernel): unpack indices and gather from the LUT per tile."""

    def __init__(self, qw):
        super().__init__(qw)
        arrays = qw.to_dict()
        self.bits, self.group_size = qw.scheme.bits, qw.scheme.group_size
        self.indices, self.lut = _mx(arrays, "indices"), _mx(arrays, "lut")

    def canonical_arrays(self):
        return {"indices": self.indices, "lut": self.lut}

    def dequantize_rows(self, r0, r1):
        codes = unpack_bits(self.indices[r0:r1], self.bits, 0, self.in_features)
        return _row_lut_values(self.lut, codes, r0, self.group_size)


class PrunedWeight(MLXWeight):
    """Bitmask + packed survivors (no fused MLX kernel). Each tile places its rows' survivors
    through the mask's running count, then dequantizes them as the inner scheme says. The
    survivors before each tile are numbers (row_offsets, from the mask when it is set): a
    function mx.compile traced keeps them, so compile again after loading a mask that keeps
    other counts per tile."""

    def __init__(self, qw):
        super().__init__(qw)
        arrays = qw.to_dict()
        self.inner = qw.scheme.then
        self.mask = _mx(arrays, "mask")
        if self.inner is None:
            self.survivors = _mx(arrays, "values")  # ("values" would shadow dict.values of nn.Module)
        elif isinstance(self.inner, Affine):
            self.w_q = _mx(arrays, "w_q").view(mx.uint8).reshape(-1)
            self.scales, self.biases = _mx(arrays, "scales"), _mx(arrays, "biases")
        else:
            self.indices, self.lut = _mx(arrays, "indices"), _mx(arrays, "lut")

    def _arrays_changed(self, key):
        super()._arrays_changed(key)
        if key == "mask":  # survivors before each row, plain numpy (tile slices need numbers)
            kept = np.unpackbits(np.asarray(self.mask), axis=-1, count=self.in_features, bitorder="little")
            self.row_offsets = np.concatenate([[0], np.cumsum(kept.sum(1))]).astype(np.int64)

    def _check_survivors(self):
        """The mask's survivors against the arrays holding them (shapes only), before a call."""
        nnz = int(self.row_offsets[-1])
        inner = self.inner
        if inner is None:
            held, name = self.survivors.shape[0], "values"
        elif isinstance(inner, Affine):
            held, name = self.w_q.size * 8 // inner.bits, "w_q"
        else:
            held, name = self.indices.size * 8 // inner.bits, "indices"
        if held < nnz:
            raise ValueError(f"[qmatmul] the pruned weight's mask keeps {nnz} values but its '{name}' "
                             f"holds {held}: mask and survivors come from different weights")

    def canonical_arrays(self):
        if self.inner is None:
            return {"mask": self.mask, "values": self.survivors}
        if isinstance(self.inner, Affine):
            return {"mask": self.mask, "w_q": self.w_q, "scales": self.scales, "biases": self.biases}
        return {"mask": self.mask, "indices": self.indices, "lut": self.lut}

    def dequantize_rows(self, r0, r1):
        if r0 == 0:
            self._check_survivors()
        rows, k = r1 - r0, self.in_features
        keep = unpack_bits(self.mask[r0:r1], 1, 0, k).astype(mx.bool_)
        s0, s1 = int(self.row_offsets[r0]), int(self.row_offsets[r1])
        if s1 == s0:
            return mx.zeros((rows, k), dtype=mx.float32)
        slot = mx.maximum(mx.cumsum(keep.reshape(-1).astype(mx.int32)) - 1, 0).reshape(rows, k)
        inner = self.inner
        if inner is None:
            dense = _take(self.survivors[s0:s1], slot)
        elif isinstance(inner, Affine):
            codes = _take(unpack_bits(self.w_q, inner.bits, s0, s1 - s0), slot).astype(mx.float32)
            g = inner.group_size
            dense = (self.scales[r0:r1, :, None] * codes.reshape(rows, k // g, g)
                     + self.biases[r0:r1, :, None]).reshape(rows, k)
        else:
            codes = _take(unpack_bits(self.indices, inner.bits, s0, s1 - s0), slot)
            dense = _row_lut_values(self.lut, codes, r0, inner.group_size)
        return mx.where(keep, dense, 0.0)


_FORMATS = ((Affine, AffineWeight), (Int8, Int8Weight), (Palettize, PalettizedWeight), (Prune, PrunedWeight))


# -- the module and the functional op --------------------------------------------------------
class QuantizedLinear(nn.Module):
    """y = x @ W.T + bias with W compressed by any ff.quant scheme (see the module docstring
    for which formats run a fused MLX kernel). Parameters are frozen, like nn.QuantizedLinear."""

    def __init__(self, qw: QuantizedWeight, bias=None):
        super().__init__()
        self.qweight = MLXWeight.from_quantized(qw)
        if bias is not None:
            self.bias = bias if isinstance(bias, mx.array) else mx.array(np.asarray(bias))
        self.freeze()

    def quantized_weight(self) -> QuantizedWeight:
        """The QuantizedWeight this layer serves, over views of its MLX arrays (serialisation,
        ff.torch.QuantizedLinear, the native kernel)."""
        return self.qweight.quantized_weight()

    @classmethod
    def from_linear(cls, linear: nn.Module, scheme) -> "QuantizedLinear":
        """Compresses an nn.Linear's weight with ``scheme``. An affine nn.QuantizedLinear whose
        bits and group size equal the scheme's is adopted as it is (its arrays are already our
        format; quantizing its dequantized grid again would move some values); any other is
        dequantized and compressed."""
        if not _same_affine(linear, scheme):
            return cls(compress(dense_weight(linear), scheme), bias=linear.get("bias"))
        layer = cls(affine_weight_from_mlx(linear.weight, linear.scales, linear.biases, scheme), bias=linear.get("bias"))
        # Its own scales and biases, in their dtype (an mlx-lm bf16 model's: bf16), so that the
        # layer holds and computes what nn.QuantizedLinear did (float32 copies grew it by 11%
        # and moved bf16 outputs by up to 0.19); the native kernel widens them when it runs.
        layer.qweight.scales, layer.qweight.biases = linear.scales, linear.biases
        return layer

    @classmethod
    def from_torch(cls, layer) -> "QuantizedLinear":
        """The MLX twin of an ``ff.torch.QuantizedLinear``: the same QuantizedWeight (so the
        same dequantized values, bit for bit) and its bias."""
        bias = None if layer.bias is None else mx.array(layer.bias.detach().float().cpu().numpy())
        return cls(layer.quantized_weight(), bias=bias)

    @property
    def scheme(self):
        return self.qweight.scheme

    def _extra_repr(self):
        w = self.qweight
        return f"input_dims={w.in_features}, output_dims={w.out_features}, bias={'bias' in self}, scheme={w.scheme}"

    def __call__(self, x):
        y = self.qweight.matmul_t(x)
        return y + self.bias.astype(y.dtype) if "bias" in self else y


def dense_weight(linear: nn.Module):
    """The float weight [N, K] of an nn.Linear or nn.QuantizedLinear (affine, dequantized)."""
    if isinstance(linear, nn.QuantizedLinear):
        return mx.dequantize(linear.weight, linear.scales, linear.get("biases"),
                             group_size=linear.group_size, bits=linear.bits, mode=linear.mode)
    return linear.weight


def _same_affine(linear, scheme) -> bool:
    return (isinstance(linear, nn.QuantizedLinear) and linear.mode == "affine" and isinstance(scheme, Affine)
            and (linear.bits, linear.group_size) == (scheme.bits, scheme.group_size))


def affine_weight_from_mlx(w_q, scales, biases, scheme: Affine) -> QuantizedWeight:
    """A QuantizedWeight over MLX's own affine arrays (scales and biases widened to float32,
    which is exact): the inverse of ``qw.to_mlx()``, no re-quantization."""
    shape = (w_q.shape[0], w_q.shape[1] * 32 // scheme.bits)
    meta = json.dumps({"scheme": scheme.to_json(), "shape": list(shape)}, sort_keys=True)
    parts = [np.array(w_q), np.array(scales.astype(mx.float32)), np.array(biases.astype(mx.float32))]
    return QuantizedWeight.from_op_args(parts, meta)


def quantized_weights_from_state_dict(state_dict) -> dict[str, QuantizedWeight]:
    """{module path: QuantizedWeight} for every compressed layer of a state dict saved by
    ``ff.torch.QuantizedLinear`` (keys ``<path>.w_<array>`` and ``<path>.w_meta``; torch tensors
    or numpy arrays, e.g. from a safetensors file)."""
    arrays = {k: _as_numpy(v) for k, v in state_dict.items()}
    paths = [k[: -len("w_meta")] for k in arrays if k.endswith("w_meta")]
    return {p.rstrip("."): QuantizedWeight.from_dict(arrays, prefix=p + "w_") for p in paths}


def _as_numpy(a) -> np.ndarray:
    if type(a).__module__.startswith("torch"):
        return a.detach().cpu().numpy()
    return np.asarray(a)


_CACHE: "weakref.WeakKeyDictionary[QuantizedWeight, MLXWeight]" = weakref.WeakKeyDictionary()


def mlx_weight(qw: QuantizedWeight) -> MLXWeight:
    """The MLX form of ``qw``, built once per QuantizedWeight object (weakly cached)."""
    try:
        return _CACHE[qw]
    except KeyError:
        weight = _CACHE[qw] = MLXWeight.from_quantized(qw)
        return weight
    except TypeError:  # not weak-referenceable or not hashable
        return MLXWeight.from_quantized(qw)


def qmatmul_mlx(x, qw: QuantizedWeight):
    """ff.qmatmul for MLX activations: x [..., K] @ W.T -> [..., N] in x's dtype (lazy)."""
    if framework_of(x) != "mlx":
        raise TypeError(f"[qmatmul] qmatmul_mlx takes an MLX x, got {framework_of(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"[qmatmul] x has dtype {x.dtype}; MLX qmatmul takes float32, float16 or bfloat16")
    if x.ndim == 0 or x.shape[-1] != qw.shape[1]:
        raise ValueError(f"[qmatmul] x has shape {tuple(x.shape)} but the weight has K={qw.shape[1]} input features")
    return mlx_weight(qw).matmul_t(x)
