"""MLX integration: ff.sdpa on MLX arrays, compressed-weight linears and optimize() for mlx.nn models.

Importing this module does not import MLX; each name below imports it on first use.

    import fusedformer as ff
    ff.sdpa(q, k, v, causal=True)                  # MLX arrays in, MLX arrays out
    layer = ff.mlx.QuantizedLinear(qw, bias=None)   # qw = ff.quant.compress(w, scheme)
    ff.mlx.optimize(model, attention="fused", weights=ff.quant.Affine(4, 64))
"""

from __future__ import annotations

from fusedformer._lazy import lazy_getattr

# public name -> module (inside fusedformer.mlx) that defines it
_EXPORTS = {
    "sdpa_mlx": "attention",
    "cpu_kernel": "native",
    "set_cpu_kernel": "native",
    "QuantizedLinear": "linear",
    "qmatmul_mlx": "linear",
    "optimize": "optimize",
    "use_fused_sdpa": "optimize",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
