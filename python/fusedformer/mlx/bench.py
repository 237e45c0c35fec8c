"""MLX rows for the ``attention`` and ``qmatmul`` benchmark areas.

Each helper takes the area's numpy inputs, builds the MLX arrays once, times with
``fusedformer.bench.measure`` forcing every result with ``mx.eval`` (MLX is lazy: an unforced
call times graph construction only), and returns row dicts for ``Report.add``::

    from fusedformer.mlx import bench as mlx_bench
    for row in mlx_bench.attention_rows(q, k, v, causal=True, budget_s=args.budget):
        rep.add(case=case, flops=flops, bytes=nbytes, baseline="torch sdpa", **row)

or let ``add_attention_rows`` / ``add_qmatmul_rows`` add them to a Report in one call. Every
row's note names the MLX device and platform (on Linux: "MLX CPU backend on Linux").
"""

from __future__ import annotations

import platform

import mlx.core as mx
import numpy as np

from fusedformer.bench.harness import measure
from fusedformer.mlx.attention import MX_FAST_SDPA, attention_mask, sdpa_mlx
from fusedformer.mlx.native import NATIVE_DTYPES, cpu_kernel
from fusedformer.mlx.linear import MLXWeight

IMPL_SDPA = "fusedformer mlx sdpa"
IMPL_SDPA_NATIVE = "fusedformer mlx sdpa, native cpu kernel"
IMPL_MX_FAST_SDPA = "mlx mx.fast.sdpa"
IMPL_QLINEAR = "fusedformer mlx QuantizedLinear"
IMPL_MX_QMATMUL = "mlx quantized_matmul"
_DTYPES = {np.dtype(np.float32): mx.float32, np.dtype(np.float16): mx.float16}


def backend_note() -> str:
    """E.g. "MLX CPU backend on Linux" or "MLX GPU backend on Darwin"."""
    device = "GPU" if mx.default_device() == mx.gpu else "CPU"
    return f"MLX {device} backend on {platform.system()}"


def to_mlx(a, dtype=None):
    """A numpy array as an evaluated MLX array (``dtype``: an mx dtype, default: a's own)."""
    x = mx.array(np.asarray(a))
    x = x.astype(dtype) if dtype is not None else x
    mx.eval(x)
    return x


def _row(impl: str, fn, budget_s: float, note: str = "") -> dict:
    timing = measure(fn, budget_s=budget_s, sync=mx.eval)
    return {"impl": impl, "timing": timing, "note": "; ".join(filter(None, [backend_note(), note]))}


def attention_rows(q, k, v, *, causal=False, window=None, mask=None, dtype=None, budget_s=1.0) -> list[dict]:
    """Rows for ff.sdpa on MLX arrays (ours: MLX's op with our semantics, and on the CPU device
    also the opt-in native kernel) and mx.fast.scaled_dot_product_attention given the same mask
    (MLX's own op), on numpy q [B,Hq,Lq,D], k/v [B,Hkv,Lk,D] (``dtype``: an mx dtype)."""
    q, k, v = (to_mlx(t, dtype) for t in (q, k, v))
    mask = None if mask is None else to_mlx(mask)
    scale = q.shape[-1] ** -0.5
    mlx_mask, _ = attention_mask(mask, q.shape[2], k.shape[2], causal=causal, window=window, dtype=q.dtype)
    if isinstance(mlx_mask, mx.array):
        mx.eval(mlx_mask)

    def ours():
        return sdpa_mlx(q, k, v, mask=mask, causal=causal, scale=scale, window=window)

    rows = [_row(IMPL_SDPA, ours, budget_s)]
    if mx.default_device() == mx.cpu and q.dtype in NATIVE_DTYPES:
        with cpu_kernel("native"):
            rows.append(_row(IMPL_SDPA_NATIVE, ours, budget_s, note="inference only, evaluates at the call"))
    rows.append(_row(IMPL_MX_FAST_SDPA, lambda: MX_FAST_SDPA(q, k, v, scale=scale, mask=mlx_mask), budget_s))
    return rows


def qmatmul_rows(x, qw, *, dtype=None, budget_s=1.0, native=True) -> list[dict]:
    """Rows for ff.mlx's x @ W.T over ``qw`` (any scheme) on numpy x [..., K]: MLX's path of the
    format (the note says whether that is MLX's fused kernel or an op composition) and, on the
    CPU device with ``native``, the opt-in native kernel. One copy of the weight, timed on its
    own: cache-warm where it fits."""
    weight = MLXWeight.from_quantized(qw)
    mx.eval(weight.parameters())
    xm = to_mlx(x, dtype)
    impl = f"{IMPL_QLINEAR} ({type(qw.scheme).__name__})"
    rows = [_row(impl, lambda: weight.matmul_t(xm), budget_s, note=weight.path)]
    if native and mx.default_device() == mx.cpu and xm.dtype in NATIVE_DTYPES:
        with cpu_kernel("native"):
            rows.append(_row(f"{impl}, native cpu kernel", lambda: weight.matmul_t(xm), budget_s,
                             note="inference only, evaluates at the call"))
    return rows


def mlx_quantized_matmul_row(x, w, *, bits=4, group_size=64, dtype=None, budget_s=1.0) -> dict:
    """MLX's own pipeline as a baseline: mx.quantize(w) then mx.quantized_matmul, numpy x and w."""
    wq, scales, biases = mx.quantize(to_mlx(w, dtype), group_size=group_size, bits=bits)
    mx.eval(wq, scales, biases)
    xm = to_mlx(x, dtype)
    fn = lambda: mx.quantized_matmul(xm, wq, scales, biases, transpose=True, group_size=group_size, bits=bits)  # noqa: E731
    return _row(f"{IMPL_MX_QMATMUL} ({bits}-bit, group {group_size})", fn, budget_s)


def add_attention_rows(rep, *, case, q, k, v, causal=False, window=None, mask=None, dtype=None, flops=None,
                       bytes=None, baseline=None, budget_s=1.0) -> None:  # noqa: A002 (Report.add's name)
    """attention_rows(...) added to ``rep`` under ``case`` (same flops/bytes/baseline for each)."""
    for row in attention_rows(q, k, v, causal=causal, window=window, mask=mask, dtype=dtype, budget_s=budget_s):
        rep.add(case=case, flops=flops, bytes=bytes, baseline=baseline, **row)


def add_qmatmul_rows(rep, *, case, x, qws: dict, flops=None, io_bytes=0.0, budget_s=1.0, native=False) -> None:
    """One row per {name: QuantizedWeight} for ff.mlx's MLX path ("fusedformer mlx <name>"), plus
    the opt-in native kernel on MLX arrays with ``native=True``; bytes = compressed weight + io.
    These rows time one weight copy on its own (qmatmul_rows), cache-warm where it fits, so
    they carry no ratio to a baseline timed cold in rounds, nor a share of the read probe: their
    note says so."""
    warm = "one weight copy, timed apart from the rounds (cache-warm where it fits): no ratio, no % BW"
    for name, qw in qws.items():
        rows = qmatmul_rows(x, qw, budget_s=budget_s, native=native)
        for row, impl in zip(rows, (f"fusedformer mlx {name}", f"fusedformer mlx {name}, native")):
            note = "; ".join(filter(None, [row.pop("note", ""), warm]))
            rep.add(case=case, flops=flops, bytes=qw.nbytes + io_bytes, note=note, share_of_bandwidth=False,
                    **{**row, "impl": impl})
