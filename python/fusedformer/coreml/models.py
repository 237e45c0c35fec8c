"""A small LLaMA-shaped decoder for exports, the CLI's ``tiny-llama`` and the tests.

GQA attention through ``torch.ops.fusedformer.sdpa`` (bottom-right causal), RoPE, RMSNorm,
SwiGLU; it implements the KV-cache protocol of fusedformer.coreml.kv_cache
(``kv_cache_config()`` and ``forward(input_ids, kv_cache=, start=)``).
"""

from __future__ import annotations

import torch
from torch import nn

import fusedformer.torch.attention_op  # noqa: F401  (registers torch.ops.fusedformer.sdpa)


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


def tiny_llama(vocab=97, dim=64, heads=4, kv_heads=2, layers=2, seed=0) -> TinyDecoder:
    """A seeded random TinyDecoder in eval mode (dim 64: every --weights scheme of `fusedformer export`
    fits it, the affine ones' groups of 64 included)."""
    torch.manual_seed(seed)
    return TinyDecoder(vocab=vocab, dim=dim, heads=heads, kv_heads=kv_heads, layers=layers).eval()
