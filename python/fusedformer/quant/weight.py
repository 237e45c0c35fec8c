"""QuantizedWeight: one compressed W [N, K] (y = x @ W.T), its canonical arrays, and compress()."""

from __future__ import annotations

import json
import numbers

import numpy as np

from . import algorithms as alg
from .packing import pack_bits, unpack_bits
from .schemes import Affine, Int8, Palettize, Prune, scheme_from_json


def _fail(msg: str):
    raise ValueError(f"[quant] {msg}")


def _to_numpy_f32(w) -> np.ndarray:
    dtype = str(getattr(w, "dtype", ""))
    if "complex" in dtype:  # (casting would drop the imaginary part, silently)
        raise TypeError(f"[quant] the weight is {dtype}; compress takes real floating weights")
    mod = type(w).__module__
    if mod.startswith("torch"):
        w = w.detach().to("cpu").float().numpy()
    elif mod.startswith("mlx"):
        import mlx.core as mx

        w = np.array(w.astype(mx.float32))
    return np.ascontiguousarray(np.asarray(w, dtype=np.float32))


def _lut_groups(scheme: Palettize, n: int) -> int:
    if scheme.granularity == "per_tensor":
        return 1
    if n % scheme.group_size:
        _fail(f"Palettize per_grouped_channel group_size={scheme.group_size} does not divide "
              f"the {n} output channels")
    return n // scheme.group_size


def _names(scheme) -> tuple[str, ...]:
    """Canonical array names, in the order of to_op_args() and of the kernels' arguments."""
    if isinstance(scheme, Affine):
        return ("w_q", "scales", "biases")
    if isinstance(scheme, Int8):
        return ("w_q", "scales", "zero_points") if scheme.zero_point else ("w_q", "scales")
    if isinstance(scheme, Palettize):
        return ("indices", "lut")
    inner = scheme.then
    if inner is None:
        return ("mask", "values")
    return ("mask",) + _names(inner)


def _dtypes(scheme) -> dict[str, type]:
    """Storage dtype of each canonical array."""
    code = np.uint8
    if isinstance(scheme, Affine):
        code = np.uint32
    elif isinstance(scheme, Int8):
        code = np.int8
    return {"w_q": code, "scales": np.float32, "biases": np.float32, "zero_points": np.int8,
            "indices": np.uint8, "lut": np.float32, "mask": np.uint8, "values": np.float32}


def _as_dtype(name: str, a: np.ndarray, dtype) -> np.ndarray:
    """Reinterprets same-width storage (int32 <-> uint32 from frameworks without uint32)."""
    if a.dtype == dtype:
        return a
    if a.dtype.kind in "iu" and np.dtype(dtype).kind in "iu" and a.dtype.itemsize == np.dtype(dtype).itemsize:
        return a.view(dtype)
    _fail(f"array {name!r} has dtype {a.dtype}, expected {np.dtype(dtype).name}")


def _stream_bytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def _expected_shapes(scheme, shape, nnz: int | None) -> dict[str, tuple[int, ...]]:
    """The shape each canonical array must have for a weight of ``shape`` [N, K] (Prune: its
    streams' lengths follow ``nnz``, the mask's set bits; the mask's alone where that is None)."""
    n, k = shape
    if isinstance(scheme, Affine):
        groups = k // scheme.group_size
        return {"w_q": (n, k * scheme.bits // 32), "scales": (n, groups), "biases": (n, groups)}
    if isinstance(scheme, Int8):
        return {"w_q": (n, k), "scales": (n,), "zero_points": (n,)}
    if isinstance(scheme, Palettize):
        return {"indices": (n, _stream_bytes(k, scheme.bits)), "lut": (_lut_groups(scheme, n), 1 << scheme.bits)}
    out = {"mask": (n, k // 8)}
    if nnz is None:
        return out
    inner = scheme.then
    if inner is None:
        out["values"] = (nnz,)
    elif isinstance(inner, Affine):
        groups = k // inner.group_size
        out.update(w_q=(_stream_bytes(nnz, inner.bits),), scales=(n, groups), biases=(n, groups))
    else:
        out.update(indices=(_stream_bytes(nnz, inner.bits),), lut=(_lut_groups(inner, n), 1 << inner.bits))
    return out


_POPCOUNT8 = np.array([bin(b).count("1") for b in range(256)], np.uint8)  # set bits per byte value


def _weight_shape(shape) -> tuple[int, int]:
    """``shape`` as (N, K): exactly two ints (a 3-D shape was cut to its first two; their sizes
    are check_compressible's)."""
    try:
        dims = tuple(shape)
    except TypeError:
        dims = None
    if dims is None or len(dims) != 2 or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in dims):
        raise TypeError(f"[quant] a weight's shape must be a pair of ints [N, K], got {shape!r}")
    return int(dims[0]), int(dims[1])


class QuantizedWeight:
    """A compressed weight W [N, K]; see fusedformer.quant for the layout of each format."""

    def __init__(self, scheme, shape, arrays: dict[str, np.ndarray]):
        self.scheme = scheme
        self.shape = _weight_shape(shape)
        names = _names(scheme)
        missing = [n for n in names if n not in arrays]
        if missing:
            _fail(f"{type(scheme).__name__} weight is missing arrays {missing}")
        self.arrays = {n: _as_dtype(n, np.ascontiguousarray(arrays[n]), _dtypes(scheme)[n]) for n in names}
        self._row_offsets = None
        check_compressible(self.shape, scheme)
        nnz = None  # (Prune: the survivors the mask counts, once its shape is right; row_offsets keeps them)
        if isinstance(scheme, Prune) and self.arrays["mask"].shape == (self.shape[0], self.shape[1] // 8):
            nnz = int(self.row_offsets()[-1])
        for name, want in _expected_shapes(scheme, self.shape, nnz).items():
            got = self.arrays[name].shape if name in self.arrays else want
            if got != want:
                _fail(f"array {name!r} has shape {list(got)}; a {list(self.shape)} weight of {scheme} "
                      f"takes {list(want)}")

    # -- views -------------------------------------------------------------------------
    @property
    def format(self) -> str:
        return self.scheme.to_json()["format"]

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per weight, including scales, biases, LUTs and masks."""
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])

    @property
    def nnz(self) -> int:
        if not isinstance(self.scheme, Prune):
            return self.shape[0] * self.shape[1]
        return int(self.mask().sum())

    def mask(self) -> np.ndarray:
        """bool [N, K] of the kept entries (all True for the dense formats)."""
        if not isinstance(self.scheme, Prune):
            return np.ones(self.shape, bool)
        return unpack_bits(self.arrays["mask"], 1, self.shape[1]).astype(bool)

    def row_offsets(self) -> np.ndarray:
        """int64 [N + 1]: where each row's survivors start in the packed stream (Prune)."""
        if self._row_offsets is None:
            n, k = self.shape
            if not isinstance(self.scheme, Prune):
                counts = np.full(n, k)
            else:  # K % 8 == 0: rows start on a mask byte; set bits per byte (unpacking the mask
                # took ~40 ms for a 4096^2 weight, on the first call of every pruned layer)
                counts = _POPCOUNT8[np.asarray(self.arrays["mask"]).view(np.uint8).reshape(n, k // 8)].sum(1, dtype=np.int64)
            self._row_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return self._row_offsets

    def codes(self) -> np.ndarray:
        """The integer codes: affine q / int8 q / LUT indices as [N, K] (dense formats) or the
        survivors' codes as [nnz] (Prune with then=...)."""
        n, k = self.shape
        s, a = self.scheme, self.arrays
        if isinstance(s, Affine):
            return unpack_bits(a["w_q"].view(np.uint8).reshape(n, -1), s.bits, k)
        if isinstance(s, Int8):
            return a["w_q"]
        if isinstance(s, Palettize):
            return unpack_bits(a["indices"], s.bits, k)
        inner = s.then
        if inner is None:
            _fail(f"codes(): {s} keeps its survivors as float32 values, not codes (arrays['values'])")
        stream = a["w_q"] if isinstance(inner, Affine) else a["indices"]
        return unpack_bits(stream, inner.bits, self.nnz)

    # -- values ------------------------------------------------------------------------
    def dequantize(self) -> np.ndarray:
        """W as float32 [N, K], exactly the values every backend computes with."""
        n, k = self.shape
        s, a = self.scheme, self.arrays
        if isinstance(s, Affine):
            return alg.affine_dequantize(self.codes(), a["scales"], a["biases"], s.group_size)
        if isinstance(s, Int8):
            return alg.int8_dequantize(a["w_q"], a["scales"], a.get("zero_points"))
        if isinstance(s, Palettize):
            return self._lut_values(self.codes(), np.arange(n)[:, None], s)
        keep = self.mask()
        out = np.zeros((n, k), np.float32)
        inner = s.then
        if inner is None:
            out[keep] = a["values"]
            return out
        rows, cols = np.nonzero(keep)
        codes = self.codes()
        if isinstance(inner, Affine):
            g = cols // inner.group_size
            out[keep] = a["scales"][rows, g] * codes.astype(np.float32) + a["biases"][rows, g]
        else:
            out[keep] = self._lut_values(codes, rows, inner)
        return out

    def _lut_values(self, codes, rows, scheme: Palettize):
        lut = self.arrays["lut"]
        group = 0 if lut.shape[0] == 1 else rows // scheme.group_size
        return lut[group, codes].astype(np.float32)

    def snr_db(self, w) -> float:
        """Signal-to-noise ratio of the compressed weight against the original, in dB."""
        w = _to_numpy_f32(w).astype(np.float64)
        err = np.sum((w - self.dequantize()) ** 2)
        return float("inf") if err == 0 else float(10 * np.log10(np.sum(w**2) / err))

    def to_mlx(self):
        """Affine: (w_q uint32, scales, biases) for mx.quantized_matmul / mx.dequantize with
        group_size and bits of the scheme. Other formats: their canonical arrays as mx arrays."""
        import mlx.core as mx

        return tuple(mx.array(a) for a in self.arrays.values())

    # -- serialisation -----------------------------------------------------------------
    def meta(self) -> dict:
        return {"scheme": self.scheme.to_json(), "shape": list(self.shape)}

    def to_op_args(self) -> tuple[list[np.ndarray], str]:
        """(parts in canonical order, JSON meta) for fusedformer::qmatmul."""
        return list(self.arrays.values()), json.dumps(self.meta(), sort_keys=True)

    @classmethod
    def from_op_args(cls, parts, meta: str) -> "QuantizedWeight":
        m = json.loads(meta)
        scheme = scheme_from_json(m["scheme"])
        names = _names(scheme)
        if len(parts) != len(names):
            _fail(f"{m['scheme']['format']} weight takes {len(names)} arrays {names}, got {len(parts)}")
        return cls(scheme, m["shape"], {n: _to_numpy(p) for n, p in zip(names, parts)})

    def to_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Arrays only (safetensors-compatible): the canonical arrays plus ``meta`` (the JSON
        of scheme and shape as uint8 bytes)."""
        parts, meta = self.to_op_args()
        d = {prefix + n: a for n, a in self.arrays.items()}
        d[prefix + "meta"] = np.frombuffer(meta.encode(), dtype=np.uint8).copy()
        return d

    @classmethod
    def from_dict(cls, d: dict, prefix: str = "") -> "QuantizedWeight":
        meta = bytes(_to_numpy(d[prefix + "meta"]).astype(np.uint8)).decode()
        scheme = scheme_from_json(json.loads(meta)["scheme"])
        return cls.from_op_args([d[prefix + n] for n in _names(scheme)], meta)

    def __repr__(self) -> str:
        return (f"QuantizedWeight({self.scheme}, shape={self.shape}, "
                f"{self.bits_per_weight:.3f} bits/weight)")


def _to_numpy(a) -> np.ndarray:
    mod = type(a).__module__
    if mod.startswith("torch"):
        return a.detach().cpu().numpy()
    if mod.startswith("mlx"):
        return np.array(a)
    return np.asarray(a)


# -- compress ---------------------------------------------------------------------------
def is_scheme(obj) -> bool:
    """True for an Affine, Int8, Palettize or Prune scheme object."""
    return isinstance(obj, (Affine, Int8, Palettize, Prune))


def check_compressible(shape, scheme, name: str | None = None) -> None:
    """Raises a ``[quant]`` ValueError if a weight of ``shape`` [N, K] cannot take ``scheme``
    (everything compress() checks except the values themselves)."""
    if not is_scheme(scheme):
        raise TypeError(f"[quant] scheme must be Affine, Int8, Palettize or Prune, got {type(scheme).__name__}")
    what = f"{name}: " if name else ""
    if len(shape) != 2 or min(shape) <= 0:
        _fail(f"{what}the weight must be a non-empty 2-D [N, K] array, got shape {tuple(shape)}")
    n, k = shape
    inner = scheme.then if isinstance(scheme, Prune) else scheme
    if isinstance(scheme, Prune):
        if k % 8:
            _fail(f"{what}Prune needs K divisible by 8 (packed rows), got K={k}")
        if scheme.n_m is not None and k % scheme.n_m[1]:
            _fail(f"{what}K={k} is not divisible by m={scheme.n_m[1]} of n:m pruning")
    if isinstance(inner, Affine) and k % inner.group_size:
        _fail(f"{what}K={k} is not divisible by the group size {inner.group_size}")
    if isinstance(inner, Palettize):
        if k % 8:
            _fail(f"{what}Palettize needs K divisible by 8 (packed rows), got K={k}")
        if inner.granularity == "per_grouped_channel" and n % inner.group_size:
            _fail(f"{what}Palettize per_grouped_channel group_size={inner.group_size} does not divide "
                  f"the {n} output channels")


def check_values(w, scheme, name: str | None = None) -> None:
    """Raises a ``[quant]`` ValueError where W's values cannot take ``scheme`` (NaN/inf entries;
    a group or row range past float32 for the affine forms): with check_compressible, every
    check compress() makes, so optimize() can make them all before it changes anything."""
    w = _to_numpy_f32(w)
    check_compressible(w.shape, scheme, name=name)
    what = f"{name}: " if name else ""
    if not np.isfinite(w).all():
        bad = int(np.size(w) - np.isfinite(w).sum())
        _fail(f"{what}the weight has {bad} NaN/inf entries; compress finite weights only")
    inner = scheme.then if isinstance(scheme, Prune) else scheme
    n, k = w.shape
    if isinstance(inner, Affine):
        g = w.reshape(n, k // inner.group_size, inner.group_size)
        alg.check_range(g.min(-1), g.max(-1), f"{what}Affine group of {inner.group_size}")
    elif isinstance(inner, Int8) and inner.zero_point:
        alg.check_range(np.minimum(w.min(1), 0), np.maximum(w.max(1), 0), f"{what}Int8 with zero points, a row")


def compress(w, scheme) -> QuantizedWeight:
    """Compresses W [N, K] (numpy, torch or mlx; any float dtype) with ``scheme``."""
    if not is_scheme(scheme):
        raise TypeError(f"[quant] scheme must be Affine, Int8, Palettize or Prune, got {type(scheme).__name__}")
    w = _to_numpy_f32(w)
    check_values(w, scheme)
    n, k = w.shape
    if isinstance(scheme, Prune):
        return _compress_pruned(w, scheme)
    if isinstance(scheme, Affine):
        q, scales, biases = alg.affine_quantize(w, scheme.bits, scheme.group_size)
        w_q = pack_bits(q, scheme.bits).view(np.uint32)
        return QuantizedWeight(scheme, w.shape, {"w_q": w_q, "scales": scales, "biases": biases})
    if isinstance(scheme, Int8):
        q, scales, zp = alg.int8_quantize(w, scheme.zero_point)
        arrays = {"w_q": q, "scales": scales}
        if zp is not None:
            arrays["zero_points"] = zp
        return QuantizedWeight(scheme, w.shape, arrays)
    lut, idx = _palettize(w.ravel(), np.arange(n + 1) * k, scheme)
    return QuantizedWeight(scheme, w.shape, {"indices": pack_bits(idx.reshape(n, k), scheme.bits), "lut": lut})


def _palettize(values: np.ndarray, row_offsets: np.ndarray, scheme: Palettize):
    """k-means LUT per group of rows over a row-major flat stream of values.

    row_offsets [N + 1] delimits each row's values. Returns (lut [G, 2**bits], indices uint8
    like values)."""
    n = row_offsets.size - 1
    groups = _lut_groups(scheme, n)
    rows_per_group = n // groups
    lut = np.zeros((groups, 1 << scheme.bits), np.float32)
    idx = np.zeros(values.shape, np.uint8)
    for g in range(groups):
        lo, hi = row_offsets[g * rows_per_group], row_offsets[(g + 1) * rows_per_group]
        lut[g] = alg.kmeans_lut(values[lo:hi], scheme.bits)
        idx[lo:hi] = alg.lut_assign(values[lo:hi], lut[g])
    return lut, idx


def _compress_pruned(w, scheme: Prune) -> QuantizedWeight:
    keep = alg.magnitude_mask(w, scheme.sparsity, scheme.n_m)
    arrays = {"mask": pack_bits(keep.astype(np.uint8), 1)}
    inner = scheme.then
    survivors = w[keep]
    if inner is None:
        arrays["values"] = survivors.astype(np.float32)
    elif isinstance(inner, Affine):
        q, scales, biases = alg.affine_quantize(w, inner.bits, inner.group_size, keep=keep)
        arrays.update(w_q=pack_bits(q[keep], inner.bits), scales=scales, biases=biases)
    else:
        offsets = np.concatenate([[0], np.cumsum(keep.sum(1))])
        lut, idx = _palettize(survivors, offsets, inner)
        arrays.update(indices=pack_bits(idx, inner.bits), lut=lut)
    return QuantizedWeight(scheme, w.shape, arrays)
