"""Opt-in: fusedformer's native CPU kernels for MLX arrays on MLX's CPU device.

MLX's CPU backend (Linux, ``mlx[cpu]``) runs attention and non-affine quantized matmuls as
generic op compositions. With ``cpu_kernel("native")`` ff.sdpa and ff.mlx's compressed linears
run fusedformer's own kernels on the arrays' memory instead (zero-copy through the buffer
protocol; the result is copied into a new MLX array). Inference only: inputs are evaluated at
the call, gradients do not flow through, and it cannot run inside ``mx.compile``. float32 and
float16 only (numpy has no bfloat16 buffer format); anything else keeps MLX's path.

    with ff.mlx.cpu_kernel("native"):
        logits = model(tokens)

Also ``set_cpu_kernel("native")`` or the environment variable ``FUSEDFORMER_MLX_CPU_KERNEL=native``.
"""

from __future__ import annotations

import contextlib
import os

import mlx.core as mx

CPU_KERNELS = ("mlx", "native")
NATIVE_DTYPES = (mx.float32, mx.float16)
_cpu_kernel = os.environ.get("FUSEDFORMER_MLX_CPU_KERNEL", "mlx")


def set_cpu_kernel(kind: str) -> str:
    """"mlx" (default: MLX's ops, lazy and differentiable) or "native"; returns the previous."""
    global _cpu_kernel
    if kind not in CPU_KERNELS:
        raise ValueError(f"[mlx] cpu kernel {kind!r}; use one of {CPU_KERNELS}")
    previous, _cpu_kernel = _cpu_kernel, kind
    return previous


@contextlib.contextmanager
def cpu_kernel(kind: str):
    """Runs the block with ``set_cpu_kernel(kind)``, restoring the previous choice after."""
    previous = set_cpu_kernel(kind)
    try:
        yield
    finally:
        set_cpu_kernel(previous)


def use_native(*arrays) -> bool:
    """True when the native kernel is chosen and can take these arrays now."""
    return (_cpu_kernel == "native" and mx.default_device() == mx.cpu
            and all(a.dtype in NATIVE_DTYPES for a in arrays))
