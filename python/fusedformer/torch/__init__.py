"""PyTorch integration: custom ops (torch.library), drop-in modules and optimize().

Importing this module imports torch.
"""

from __future__ import annotations

from fusedformer._lazy import lazy_getattr

# public name -> module (inside fusedformer.torch) that defines it
_EXPORTS = {
    "FusedAttention": "modules",
    "QuantizedLinear": "quantized_linear",
    "optimize": "optimize",
    "use_fused_sdpa": "optimize",
}

__getattr__ = lazy_getattr(__name__, _EXPORTS)
