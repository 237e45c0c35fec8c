"""fusedformer: fused attention and compressed-weight matmuls for transformer models.

    import fusedformer as ff
    ff.info()
    out = ff.sdpa(q, k, v, causal=True)            # numpy, torch or mlx arrays
    qw = ff.quant.compress(w, ff.quant.Affine(bits=4, group_size=64))
    y = ff.qmatmul(x, qw)

Framework integrations (ff.torch, ff.mlx, ff.coreml) are imported on first use.
"""

from __future__ import annotations

import importlib

from fusedformer import _C
from fusedformer._info import info
from fusedformer.ops import qmatmul, sdpa
from fusedformer.ops_attention import clear_cache, get_cache_memory, set_cache_limit

__version__ = "0.1.0"
__all__ = ["__version__", "info", "sdpa", "qmatmul", "clear_cache", "get_cache_memory", "set_cache_limit", "quant", "torch", "mlx", "coreml", "reference"]

_LAZY_SUBMODULES = {"quant", "torch", "mlx", "coreml", "reference", "bench"}


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        module = importlib.import_module(f"fusedformer.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'fusedformer' has no attribute {name!r}")
