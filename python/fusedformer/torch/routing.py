"""Routing torch attention calls to the fused op, and counting what could not be routed.

Every integration (the Hugging Face attention function, the F.scaled_dot_product_attention
mode, the swapped nn.MultiheadAttention) asks `unsupported_reason` first: a call the fused op
cannot serve exactly (dropout while training, a gradient to compute, a device other than the
CPU, an unsupported dtype; `shape_reason`: a head dim past MAX_HEAD_DIM, v's head dim unlike q's,
K/V broadcast over the batch...) runs torch's own op instead and is counted under its reason in an
`AttentionStats`, so nothing falls back silently.
"""

from __future__ import annotations

import collections
import os
import sys
import threading

import torch

from fusedformer._frameworks import forward_tangent, functorch_active
import fusedformer.torch.attention_op  # noqa: F401  (registers torch.ops.fusedformer.sdpa)
from fusedformer.ops_attention import MAX_HEAD_DIM, sdpa

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class AttentionStats:
    """Counts attention calls served by the fused op and fallbacks to torch by reason."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.fused = 0
        self.fallbacks: collections.Counter[str] = collections.Counter()

    def __getstate__(self):  # (copy.deepcopy and pickle of an optimized model: the lock stays behind)
        return {"fused": self.fused, "fallbacks": self.fallbacks}

    def __setstate__(self, state):
        self.__init__()
        self.fused, self.fallbacks = state["fused"], collections.Counter(state["fallbacks"])
        if "transformers" in sys.modules:  # an optimized HF model loaded in a fresh process needs
            from fusedformer.torch import hf  # its attention function registered again

            hf.register()

    def record(self, reason: str | None) -> None:
        """Counts one call (calls inside a torch.compile / export graph are not counted: the
        graph runs no Python, and a lock would break it)."""
        if torch.compiler.is_compiling():
            return
        if self._pid != os.getpid():  # a forked child: the lock may have been held at the fork by
            self._lock = threading.Lock()  # a thread that does not exist here (it would wait forever)
            self._pid = os.getpid()
        with self._lock:
            if reason is None:
                self.fused += 1
            else:
                self.fallbacks[reason] += 1

    @property
    def total(self) -> int:
        return self.fused + sum(self.fallbacks.values())

    def __repr__(self) -> str:
        fb = ", ".join(f"{r}: {n}" for r, n in self.fallbacks.most_common()) or "none"
        return f"AttentionStats(fused={self.fused}, fallbacks: {fb})"


def unsupported_reason(*tensors: torch.Tensor | None, dropout: float = 0.0) -> str | None:
    """Why the fused op cannot serve this call (None if it can)."""
    present = [t for t in tensors if t is not None]
    if dropout > 0:
        return "dropout > 0"
    if any(t.device.type != "cpu" for t in present):
        return f"device {next(t.device for t in present if t.device.type != 'cpu')}"
    for t in present[:3]:
        if t.dtype not in SUPPORTED_DTYPES:
            return f"dtype {t.dtype}"
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return "gradient required (fused backward not implemented)"
    if forward_tangent(torch, **{str(i): t for i, t in enumerate(present)}):
        return "forward-mode AD tangent (fused jvp not implemented)"
    if functorch_active(torch):
        return "torch.func transform (not implemented by the fused op)"
    return None


def shape_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the fused op cannot take these [..., L, D] q, k, v that torch's SDPA takes (or rejects
    itself): empty inputs, head dims that differ or pass MAX_HEAD_DIM, k/v broadcast over q's
    batch. None if it can."""
    if 0 in q.shape or 0 in k.shape or 0 in v.shape:
        return "empty input"
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d:
        return f"head dims q {d}, k {k.shape[-1]}, v {v.shape[-1]} differ"
    if d > MAX_HEAD_DIM:
        return f"head dim {d} > {MAX_HEAD_DIM}"
    if k.shape[:-1] != v.shape[:-1] or k.shape[0] != q.shape[0]:
        return "k/v shapes differ from each other or broadcast over q's batch"
    return None


def fused_sdpa(q, k, v, mask=None, *, causal=False, scale=None, window=None) -> torch.Tensor:
    """ff.sdpa on torch tensors (bottom-right causal): the kernel directly in eager mode,
    torch.ops.fusedformer.sdpa under torch.compile / export / tracing."""
    return sdpa(q, k, v, mask=mask, causal=causal, scale=scale, window=window)
