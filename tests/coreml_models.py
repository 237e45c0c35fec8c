"""Small torch modules and helpers for the Core ML tests."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn



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
    """Registers torch.ops.fusedformer.qmatmul (importing the library's op)."""
    import fusedformer.torch.qmatmul_op  # noqa: F401


class SdpaLseCall(SdpaCall):
    """forward(q, k, v) = fusedformer::sdpa_lse: (out, lse)."""

    def forward(self, q, k, v):
        return torch.ops.fusedformer.sdpa_lse(q, k, v, self.mask, self.causal, self.scale, self.window)
