"""Which array framework a value belongs to, without importing frameworks that are not loaded."""

from __future__ import annotations

import sys

import numpy as np


def framework_of(x) -> str:
    """'numpy', 'torch' or 'mlx' (anything else array-like is treated as numpy)."""
    if isinstance(x, np.ndarray):
        return "numpy"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch"
    if torch is None and type(x).__module__.startswith("torch"):  # (at interpreter shutdown,
        return "torch"  # sys.modules is emptied: a tensor must not pass for a numpy array)
    mx = sys.modules.get("mlx.core")
    if mx is not None and isinstance(x, mx.array):
        return "mlx"
    return "numpy"


def common_framework(op: str, **arrays) -> str:
    """The one framework of all non-None arguments; a TypeError naming them otherwise."""
    kinds = {name: framework_of(a) for name, a in arrays.items() if a is not None}
    found = set(kinds.values())
    if len(found) > 1:
        detail = ", ".join(f"{n} is {k}" for n, k in kinds.items())
        raise TypeError(f"[{op}] all arrays must come from one framework: {detail}")
    return found.pop() if found else "numpy"


def forward_ad_active(torch) -> bool:
    """Whether torch.autograd.forward_ad has a dual level open (a module int, so calls outside
    one pay nothing per tensor; a torch without that int is taken as having one), or a torch.func
    transform (jvp, vmap, grad, ...) is running."""
    return getattr(torch.autograd.forward_ad, "_current_level", 0) >= 0 or functorch_active(torch)


def functorch_active(torch) -> bool:
    """Whether a torch.func transform is running: its wrapped tensors look like plain ones, and
    the native kernels read their primal only (torch.func.jvp gave a zero tangent)."""
    level = getattr(getattr(torch._C, "_functorch", None), "maybe_current_level", None)
    return level is not None and level() is not None


def forward_tangent(torch, **tensors) -> str | None:
    """The name of the first tensor carrying a forward-mode AD tangent (None if none does): the
    native kernels read the primal only and would drop it, silently."""
    if not forward_ad_active(torch):
        return None
    unpack = torch.autograd.forward_ad.unpack_dual
    return next((name for name, t in tensors.items() if t is not None and unpack(t).tangent is not None), None)


def refuse_forward_tangents(torch, op: str, **tensors) -> None:
    """Raises NotImplementedError naming ``op`` and the argument where a tensor carries a
    forward-mode AD tangent (fused kernels have no jvp yet)."""
    if functorch_active(torch):
        raise NotImplementedError(
            f"[{op}] torch.func transforms (jvp, vmap, grad, ...) are not implemented: the fused kernel reads "
            "the plain values of their wrapped tensors; run the unfused torch op under them")
    name = forward_tangent(torch, **tensors)
    if name is not None:
        raise NotImplementedError(
            f"[{op}] forward-mode AD is not implemented: {name} carries a tangent (torch.autograd.forward_ad), "
            "which the fused kernel would drop; run the unfused torch op for jvp")
