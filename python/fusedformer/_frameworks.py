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
