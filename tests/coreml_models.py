"""Small torch modules for the Core ML tests, and a stand-in for the fusedformer::qmatmul op.

The real qmatmul op lives in fusedformer.torch.qmatmul_op (branch quant). Until it is merged,
``ensure_qmatmul_op()`` registers a test-only op with the same schema, computed from
``QuantizedWeight.dequantize()``, so tracing records the same ``fusedformer::qmatmul`` node.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from fusedformer import reference


def ensure_ops():
    """Registers torch.ops.fusedformer.sdpa (importing the library's op)."""
    import fusedformer.torch.attention_op  # noqa: F401


from fusedformer.coreml.models import TinyDecoder  # noqa: E402,F401  (re-exported for the tests)


def psnr(ref, out) -> float:
    """Peak signal-to-noise ratio of ``out`` against ``ref`` in dB (peak = max |ref|)."""
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    err = np.mean((ref - out) ** 2)
    if err == 0:
        return math.inf
    return 10 * math.log10(np.max(np.abs(ref)) ** 2 / err)


class SdpaCall(nn.Module):
    """forward(q, k, v) = fusedformer::sdpa with fixed options and a fixed mask (a buffer, since
    Core ML inputs cannot be bool): tests the attention lowering alone."""

    def __init__(self, mask=None, causal=False, scale=None, window=None):
        super().__init__()
        self.register_buffer("mask", None if mask is None else torch.as_tensor(mask))
        self.causal, self.scale, self.window = causal, scale, window

    def forward(self, q, k, v):
        return torch.ops.fusedformer.sdpa(q, k, v, self.mask, self.causal, self.scale, self.window)


def ensure_qmatmul_op():
    """Makes torch.ops.fusedformer.qmatmul exist (the library's if present, else a test-only one)."""
    try:
        import fusedformer.torch.qmatmul_op  # noqa: F401
    except ImportError:
        pass
    if hasattr(torch.ops.fusedformer, "qmatmul"):
        return

    @torch.library.custom_op("fusedformer::qmatmul", mutates_args=())
    def qmatmul(x: torch.Tensor, parts: list[torch.Tensor], meta: str) -> torch.Tensor:
        from fusedformer.quant import QuantizedWeight

        w = QuantizedWeight.from_op_args([p.numpy() for p in parts], meta).dequantize()
        return torch.from_numpy(reference.matmul_t(x.detach().numpy(), w).astype(np.float32)).to(x.dtype)

    @qmatmul.register_fake
    def _(x, parts, meta):
        import json

        return x.new_empty(x.shape[:-1] + (json.loads(meta)["shape"][0],))


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    """A QuantizedWeight part as a torch buffer (uint32 words travel as int32: same bytes)."""
    a = np.ascontiguousarray(a)
    if a.dtype == np.uint32:
        a = a.view(np.int32)
    return torch.from_numpy(a.copy())


class QLinear(nn.Module):
    """y = fusedformer::qmatmul(x, qw) + bias, the parts of qw held as buffers."""

    def __init__(self, qw, bias=None):
        super().__init__()
        parts, self.meta = qw.to_op_args()
        self.n_parts = len(parts)
        for i, p in enumerate(parts):
            self.register_buffer(f"part{i}", _as_tensor(p))
        self.bias = None if bias is None else nn.Parameter(torch.as_tensor(bias))

    def forward(self, x):
        parts = [getattr(self, f"part{i}") for i in range(self.n_parts)]
        y = torch.ops.fusedformer.qmatmul(x, parts, self.meta)
        return y if self.bias is None else y + self.bias
