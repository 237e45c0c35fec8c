"""Tiny torch models for the Core ML tests, and a stand-in for the fusedformer::sdpa op.

The real ops live in fusedformer.torch.attention_op / qmatmul_op (other branches). Until they
are merged, ``ensure_ops()`` registers test-only ops with the same schema, computed by
fusedformer.reference, so tracing records the same ``fusedformer::sdpa`` node.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from fusedformer import reference


def ensure_ops():
    """Makes torch.ops.fusedformer.sdpa exist (the library's if present, else a test-only one)."""
    try:
        import fusedformer.torch.attention_op  # noqa: F401
    except ImportError:
        pass
    if hasattr(torch.ops.fusedformer, "sdpa"):
        return
    _register_test_sdpa()


def _register_test_sdpa():
    @torch.library.custom_op("fusedformer::sdpa", mutates_args=())
    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
             causal: bool = False, scale: float | None = None, window: int | None = None) -> torch.Tensor:
        m = None if mask is None else mask.detach().numpy()
        out = reference.sdpa(q.detach().numpy(), k.detach().numpy(), v.detach().numpy(), mask=m,
                             causal=causal, scale=scale, window=window)
        return torch.from_numpy(out).to(q.dtype)

    @sdpa.register_fake
    def _(q, k, v, mask=None, causal=False, scale=None, window=None):
        return q.new_empty(q.shape[:-1] + v.shape[-1:])


def psnr(ref, out) -> float:
    """Peak signal-to-noise ratio of ``out`` against ``ref`` in dB (peak = max |ref|)."""
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    err = np.mean((ref - out) ** 2)
    if err == 0:
        return math.inf
    return 10 * math.log10(np.max(np.abs(ref)) ** 2 / err)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, positions, base=10000.0):
    """Rotary embedding (half-split form) of x [B, H, L, D] at ``positions`` [L]."""
    d = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = positions.to(torch.float32)[:, None] * inv[None, :]
    cos, sin = torch.cos(ang).repeat(1, 2), torch.sin(ang).repeat(1, 2)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, dim, heads, kv_heads, window=None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.window = heads, kv_heads, dim // heads, window
        self.q = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(heads * self.head_dim, dim, bias=False)

    def project(self, x, positions):
        b, l, _ = x.shape
        q = self.q(x).view(b, l, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, l, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, l, self.kv_heads, self.head_dim).transpose(1, 2)
        return rope(q, positions), rope(k, positions), v

    def attend(self, q, k, v):
        """Causal attention of the L new queries over all keys (bottom-right aligned)."""
        out = torch.ops.fusedformer.sdpa(q, k, v, None, True, None, self.window)
        b, _, l, _ = out.shape
        return self.o(out.transpose(1, 2).reshape(b, l, -1))

    def forward(self, x, positions, kv_cache=None, layer=0, start=0):
        q, k, v = self.project(x, positions)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v, start)
        return self.attend(q, k, v)


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, window=None):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = Attention(dim, heads, kv_heads, window)
        self.up = nn.Linear(dim, 2 * dim, bias=False)
        self.gate = nn.Linear(dim, 2 * dim, bias=False)
        self.down = nn.Linear(2 * dim, dim, bias=False)

    def mlp(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))

    def forward(self, x, positions, **cache):
        x = x + self.attn(self.norm1(x), positions, **cache)
        return x + self.mlp(self.norm2(x))


class TinyDecoder(nn.Module):
    """A LLaMA-shaped causal LM: GQA attention through fusedformer::sdpa, RoPE, RMSNorm, SwiGLU."""

    def __init__(self, vocab=97, dim=32, heads=4, kv_heads=2, layers=2, window=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Block(dim, heads, kv_heads, window) for _ in range(layers)])
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def kv_cache_config(self):
        attn = self.blocks[0].attn
        return {"layers": len(self.blocks), "kv_heads": attn.kv_heads, "head_dim": attn.head_dim}

    def forward(self, input_ids, kv_cache=None, start=0):
        """Logits [B, L, vocab]; with ``kv_cache`` the tokens sit at positions start .. start+L-1."""
        x = self.embed(input_ids)
        positions = torch.arange(start, start + input_ids.shape[1])
        for i, block in enumerate(self.blocks):
            x = block(x, positions, kv_cache=kv_cache, layer=i, start=start)
        return self.lm_head(self.norm(x))


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
