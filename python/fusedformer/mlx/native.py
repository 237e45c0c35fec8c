"""Opt-in: fusedformer's native CPU kernels for MLX arrays on MLX's CPU device.

MLX's CPU backend (Linux, ``mlx[cpu]``) runs attention and non-affine quantized matmuls as
generic op compositions. With ``cpu_kernel("native")`` ff.sdpa and ff.mlx's compressed linears
run fusedformer's own kernels on the arrays' memory instead (zero-copy through the buffer
protocol; the result is copied into a new MLX array). Inference only: inputs are evaluated at
the call; a gradient through it (mx.grad, mx.vjp, mx.jvp) raises a ValueError naming the op, as
does a call inside ``mx.compile`` or ``mx.vmap``. float32 and float16 only (numpy has no bfloat16
buffer format); anything else keeps MLX's path.

    with ff.mlx.cpu_kernel("native"):     # this thread, for the block
        logits = model(tokens)

``set_cpu_kernel("native")`` or the environment variable ``FUSEDFORMER_MLX_CPU_KERNEL=native``
set the default of every thread outside such blocks.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import mlx.core as mx
import numpy as np

CPU_KERNELS = ("mlx", "native")
NATIVE_DTYPES = (mx.float32, mx.float16)
_thread = threading.local()  # .kind: this thread's cpu_kernel() block, None outside blocks


def _kernel_from_environment() -> str:
    """FUSEDFORMER_MLX_CPU_KERNEL: "mlx" or "native"; empty or unset: "mlx"."""
    value = os.environ.get("FUSEDFORMER_MLX_CPU_KERNEL", "")
    if value and value not in CPU_KERNELS:
        raise ValueError(f"[mlx] FUSEDFORMER_MLX_CPU_KERNEL={value!r} is not one of: {', '.join(CPU_KERNELS)} "
                         "(empty or unset: mlx)")
    return value or "mlx"


_default_kernel = _kernel_from_environment()


def _checked(kind: str) -> str:
    if kind not in CPU_KERNELS:
        raise ValueError(f"[mlx] cpu kernel {kind!r}; use one of {CPU_KERNELS}")
    return kind


def set_cpu_kernel(kind: str) -> str:
    """Every thread's choice outside cpu_kernel() blocks: "mlx" (default: MLX's ops, lazy and
    differentiable) or "native"; returns the previous default."""
    global _default_kernel
    previous, _default_kernel = _default_kernel, _checked(kind)
    return previous


@contextlib.contextmanager
def cpu_kernel(kind: str):
    """Runs the block with ``kind`` as this thread's choice (other threads keep theirs: a
    process-wide switch gave a thread that was training native, gradient-less calls)."""
    previous = getattr(_thread, "kind", None)
    _thread.kind = _checked(kind)
    try:
        yield
    finally:
        _thread.kind = previous


def current_cpu_kernel() -> str:
    """This thread's choice: its innermost cpu_kernel() block, else the default."""
    kind = getattr(_thread, "kind", None)
    return _default_kernel if kind is None else kind


def use_native(*arrays) -> bool:
    """True when the native kernel is chosen and can take these arrays now."""
    return (current_cpu_kernel() == "native" and mx.default_device() == mx.cpu
            and all(a.dtype in NATIVE_DTYPES for a in arrays))


def run_native(op: str, compute, *arrays):
    """``compute(*views)`` on zero-copy numpy views of ``arrays`` (evaluated now), its numpy
    result (an array or a tuple of them) returned as new MLX arrays. MLX would take the result
    for a constant, so a gradient through it would be 0, silently: under mx.grad, mx.vjp and
    mx.jvp it raises a ValueError naming the op instead; mx.compile and mx.vmap cannot evaluate
    the inputs, and that error names the op and the way out too. (The custom function costs
    about 13 us a call.)"""
    def forward(*xs):
        out = compute(*_views(op, xs))
        return tuple(mx.array(o) for o in out) if isinstance(out, tuple) else mx.array(out)

    call = mx.custom_function(forward)
    call.vjp(functools.partial(_no_derivative, op))
    call.jvp(functools.partial(_no_derivative, op))
    return call(*arrays)


def _views(op: str, arrays) -> list:
    try:
        return [np.asarray(a) for a in arrays]
    except ValueError as e:
        if "function transformations" not in str(e):
            raise
        raise ValueError(f"[{op}] cpu_kernel('native') evaluates its inputs, which mx.compile and mx.vmap do not "
                         "allow: run this under cpu_kernel('mlx')") from None


def _no_derivative(op: str, *args):
    raise ValueError(f"[{op}] cpu_kernel('native') is for inference: it has no gradient (run training under "
                     "cpu_kernel('mlx'), MLX's differentiable ops)")
