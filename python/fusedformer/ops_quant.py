"""Front of ff.qmatmul: y = x @ W.T for a compressed W (fusedformer.quant.QuantizedWeight).

numpy and torch inputs run the native kernel (W decoded tile by tile inside it); mlx inputs go
to fusedformer.mlx (lazily imported). x is [..., K] in float32, float16 or bfloat16 (torch);
the result has x's dtype and shape [..., N].
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# (imported here, not inside the calls: a call from a __del__ at interpreter shutdown finds no
# import machinery left)
from . import _C, ops_attention
from ._frameworks import framework_of
from .ops_attention import HUGEPAGE_MIN_BYTES
from .quant import Affine, Int8, Palettize, Prune, QuantizedWeight

_CODES = {"affine": 0, "int8": 1, "lut": 2, "f32": 3}


class KernelArgs(NamedTuple):
    """fusedformer._C.qmatmul's arguments after x and dtype, in its order: a call passes them
    positionally (pybind11 matches keywords by name, about 1.5 us of a decode step's call)."""

    codes_kind: int
    n: int
    k: int
    bits: int
    group: int
    codes: np.ndarray
    scales: np.ndarray | None = None
    biases: np.ndarray | None = None
    zero_points: np.ndarray | None = None
    lut: np.ndarray | None = None
    mask: np.ndarray | None = None
    row_offsets: np.ndarray | None = None


def kernel_args(qw) -> KernelArgs:
    """The arguments of fusedformer._C.qmatmul describing qw (cached on it)."""
    cached = getattr(qw, "_kernel_args", None)
    if cached is not None:
        return cached
    n, k = qw.shape
    s, a = qw.scheme, qw.arrays
    inner = s.then if isinstance(s, Prune) else s
    args = dict(n=n, k=k)
    if isinstance(s, Prune):
        # the survivors before each row, computed once per weight (else the binding counts the
        # whole mask on every call: 2 MiB of mask bytes for a 4096^2 weight, a fifth of the call)
        args.update(mask=a["mask"], row_offsets=qw.row_offsets())
    if inner is None:
        args.update(codes_kind=_CODES["f32"], bits=32, group=1, codes=a["values"])
    elif isinstance(inner, Affine):
        args.update(codes_kind=_CODES["affine"], bits=inner.bits, group=inner.group_size,
                    codes=a["w_q"].view(np.uint8), scales=a["scales"], biases=a["biases"])
    elif isinstance(inner, Int8):
        args.update(codes_kind=_CODES["int8"], bits=8, group=1, codes=a["w_q"], scales=a["scales"],
                    zero_points=a.get("zero_points"))
    elif isinstance(inner, Palettize):
        rows_per_lut = n if a["lut"].shape[0] == 1 else inner.group_size
        args.update(codes_kind=_CODES["lut"], bits=inner.bits, group=rows_per_lut, codes=a["indices"],
                    lut=a["lut"])
    qw._kernel_args = KernelArgs(**args)
    return qw._kernel_args


def _check(x_shape, qw):
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"[qmatmul] qw must be a fusedformer.quant.QuantizedWeight, got {type(qw).__name__}")
    if len(x_shape) < 1 or x_shape[-1] != qw.shape[1]:
        raise ValueError(f"[qmatmul] x has shape {tuple(x_shape)}, whose last dimension must equal "
                         f"the weight's K={qw.shape[1]} (weight shape [N, K] = {list(qw.shape)})")


def qmatmul_numpy(x: np.ndarray, qw, dtype_code: int | None = None, args: KernelArgs | None = None) -> np.ndarray:
    """Native kernel on a numpy array (float32/float16, or raw bf16 words with dtype_code=2).
    ``args``: kernel_args(qw), when the caller caches them."""
    if args is None:
        args = kernel_args(qw)
    if dtype_code is None:
        if x.dtype == np.float32:
            dtype_code = 0
        elif x.dtype == np.float16:
            dtype_code = 1
        else:
            raise TypeError(f"[qmatmul] x must be float32 or float16 (numpy), got {x.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] and (x2.strides[-1] != x2.itemsize or x2.strides[0] < x2.shape[1] * x2.itemsize):
        x2 = np.ascontiguousarray(x2)
    if x2.shape[0] * args.n * x2.itemsize < HUGEPAGE_MIN_BYTES:  # (decode's GEMVs: the binding allocates)
        y = _C.qmatmul(x2, dtype_code, *args)
    else:
        y = _C.qmatmul(x2, dtype_code, *args, _cached_output(x2.shape[0], args.n, x2.dtype))
    return y.reshape(*lead, args.n)


def _cached_output(m: int, n: int, dtype: np.dtype) -> np.ndarray | None:
    """An [m, n] output of HUGEPAGE_MIN_BYTES or more from sdpa's cache of released outputs
    (ops_attention._OUTPUT_CACHE; None where its limit is 0, and the binding allocates). Fresh
    memory of 32 MiB and more (a prefill's logits: 512 tokens x 32000 fp32 is 62.5 MiB) comes
    zeroed page by page from the OS inside every call: glibc maps such requests anew each time."""
    cache = ops_attention._OUTPUT_CACHE
    if cache.limit == 0:
        return None
    return cache.lend(m * n * dtype.itemsize).view(dtype).reshape(m, n)


def qmatmul(x, qw):
    """x @ W.T with W = qw.dequantize() decoded inside the kernel; x's framework and dtype out."""
    if x is None:  # (numpy would make it a 0-d object array: "x has shape ()")
        raise TypeError("[qmatmul] x must be an array or tensor, got None")
    kind = framework_of(x)
    if kind == "numpy" and not isinstance(x, np.ndarray):  # (lists, scalars: as ff.sdpa takes them)
        x = np.asarray(x)
    _check(tuple(x.shape), qw)
    if kind == "mlx":
        from .mlx import quant as mlx_quant  # implemented by the MLX integration

        return mlx_quant.qmatmul(x, qw)
    if kind == "torch":
        from .torch.qmatmul_op import qmatmul_torch

        return qmatmul_torch(x, qw)
    return qmatmul_numpy(np.asarray(x), qw)


def qmatmul_tensor(x, qw, args: KernelArgs | None = None):
    """The native kernel on a CPU torch tensor (float32, float16 or bfloat16)."""
    import torch

    code = _torch_dtype_codes(torch).get(x.dtype)
    if code is None:
        raise TypeError(f"[qmatmul] x must be float32, float16 or bfloat16, got {x.dtype}")
    if not x.is_cpu:
        raise ValueError(f"[qmatmul] x must be on the CPU, got {x.device}")
    xc = x.detach()
    if xc.dim() and xc.stride(-1) != 1:
        xc = xc.contiguous()
    raw = xc.view(torch.int16) if x.dtype == torch.bfloat16 else xc
    y = torch.from_numpy(qmatmul_numpy(raw.numpy(), qw, code, args))
    return y.view(torch.bfloat16) if x.dtype == torch.bfloat16 else y


_TORCH_DTYPE_CODES: dict = {}


def _torch_dtype_codes(torch) -> dict:
    """torch dtype -> the kernel's dtype code (built once: a dict per call costs a microsecond)."""
    if not _TORCH_DTYPE_CODES:
        _TORCH_DTYPE_CODES.update({torch.float32: 0, torch.float16: 1, torch.bfloat16: 2})
    return _TORCH_DTYPE_CODES
