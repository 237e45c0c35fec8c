"""PyTorch integration: custom ops (torch.library), drop-in modules and optimize().

Importing this module imports torch.
"""

from __future__ import annotations

import importlib

# public name -> module (inside fusedformer.torch) that defines it
_EXPORTS = {
    "FusedAttention": "modules",
    "QuantizedLinear": "quantized_linear",
    "optimize": "optimize",
    "use_fused_sdpa": "optimize",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"fusedformer.torch.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fusedformer.torch' has no attribute {name!r}")
