"""torch.library custom ops ``fusedformer::sdpa`` and ``fusedformer::sdpa_lse``.

torch.compile and torch.export see each call as one op (``register_fake`` gives the output
metadata without running the kernel). The forward runs the native CPU kernel on the tensors'
data pointers and strides (no copies, bf16 included). There is no backward yet: autograd
through the op raises a clear error instead of returning wrong gradients.
"""

from __future__ import annotations

from typing import Optional

import torch

from fusedformer._frameworks import refuse_forward_tangents
from fusedformer.ops_attention import _last_dim_contiguous, check_args, native_sdpa

__all__ = ["sdpa", "sdpa_lse"]


def _run(q, k, v, mask, causal, scale, window, return_lse):
    refuse_forward_tangents(torch, "sdpa", q=q, k=k, v=v, mask=mask)
    scale_f, window_i = check_args(q, k, v, mask, causal, scale, window)
    return native_sdpa(q, k, v, mask=mask, causal=causal, scale=scale_f, window=window_i, return_lse=return_lse)


@torch.library.custom_op("fusedformer::sdpa", mutates_args=())
def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Optional[int] = None,
) -> torch.Tensor:
    """Fused attention (fusedformer.sdpa semantics); out [B, Hq, Lq, D] like q (empty_like q:
    its memory layout where q's storage is dense, e.g. [B, Lq, Hq, D] from a model's projection)."""
    return _run(q, k, v, mask, causal, scale, window, return_lse=False)


@torch.library.custom_op("fusedformer::sdpa_lse", mutates_args=())
def sdpa_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As fusedformer::sdpa, also returning lse fp32 [B, Hq, Lq] (natural log; -inf where masked)."""
    return _run(q, k, v, mask, causal, scale, window, return_lse=True)


@sdpa.register_fake
def _sdpa_fake(q, k, v, mask=None, causal=False, scale=None, window=None):
    return torch.empty_like(_last_dim_contiguous(q))


@sdpa_lse.register_fake
def _sdpa_lse_fake(q, k, v, mask=None, causal=False, scale=None, window=None):
    return torch.empty_like(_last_dim_contiguous(q)), q.new_empty(q.shape[:3], dtype=torch.float32)


def _no_backward(op_name):
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"[sdpa] {op_name} has no backward yet: fusedformer's fused attention is forward-only "
            "(inference). Use torch.nn.functional.scaled_dot_product_attention for training."
        )

    return backward


def _setup_context(ctx, inputs, output):
    pass


sdpa.register_autograd(_no_backward("fusedformer::sdpa"), setup_context=_setup_context)
sdpa_lse.register_autograd(_no_backward("fusedformer::sdpa_lse"), setup_context=_setup_context)
