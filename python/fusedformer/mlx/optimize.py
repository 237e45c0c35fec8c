"""ff.mlx.optimize: fused attention and compressed-weight linears in an mlx.nn model, in place.

Attention. MLX models (mlx.nn.MultiHeadAttention, mlx-lm's models, most hand-written ones) call
``mx.fast.scaled_dot_product_attention`` inside an attention module's ``__call__``. optimize()
finds those modules (any module whose ``__call__`` calls ``scaled_dot_product_attention``) and
gives each a subclass that runs its ``__call__`` inside :func:`use_fused_sdpa`, which routes
``mx.fast.scaled_dot_product_attention`` to :func:`fusedformer.mlx.attention.sdpa_mlx` for the
duration of that call only (other models in the process are untouched). The fused MLX kernel
still does the work; what changes is fusedformer's semantics: rows with every key masked (left
padding, windows) give 0 instead of NaN or the mean of v.

Weights. Every ``nn.Linear`` and ``nn.QuantizedLinear`` not named in ``skip`` becomes an
``ff.mlx.QuantizedLinear`` compressed with ``weights`` (nn.QuantizedLinear is dequantized
first). Layers whose shape the scheme cannot take (e.g. K not divisible by the group size) stay
as they are, with a warning naming them.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import warnings

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from fusedformer.mlx.attention import MX_FAST_SDPA, sdpa_mlx
from fusedformer.mlx.linear import QuantizedLinear

ATTENTION_CHOICES = ("fused", None)
_routing = threading.local()


def optimize(model: nn.Module, attention: str | None = "fused", weights=None, skip=("lm_head",)) -> nn.Module:
    """Swaps attention and linears of an mlx.nn ``model`` in place and returns it.

    attention: "fused" (route the model's attention through ff.sdpa's MLX path) or None (leave it).
    weights: an ff.quant scheme (Affine, Int8, Palettize, Prune) or None (leave the linears).
    skip: module names left alone: an entry matches a module whose dotted path equals it or ends
    with "." + entry (so "lm_head" matches "lm_head" and "model.lm_head").
    """
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"[optimize] attention={attention!r}; use one of {ATTENTION_CHOICES}")
    if isinstance(skip, str):
        skip = (skip,)
    if attention == "fused":
        for path, module in model.named_modules():
            if not _skipped(path, skip) and is_attention_module(module):
                module.__class__ = _fused_class(type(module))
    if weights is not None:
        _compress_linears(model, weights, skip)
    return model


@contextlib.contextmanager
def use_fused_sdpa():
    """Within the block, ``mx.fast.scaled_dot_product_attention`` calls go to fusedformer's MLX
    sdpa (calls with ``sinks`` still go to MLX's, which alone supports them). Re-entrant."""
    depth = getattr(_routing, "depth", 0)
    if depth == 0:
        mx.fast.scaled_dot_product_attention = _fused_sdpa_like_mx_fast
    _routing.depth = depth + 1
    try:
        yield
    finally:
        _routing.depth -= 1
        if _routing.depth == 0:
            mx.fast.scaled_dot_product_attention = MX_FAST_SDPA


def _fused_sdpa_like_mx_fast(q, k, v, *, scale, mask=None, sinks=None, **kwargs):
    """mx.fast.scaled_dot_product_attention's signature, fusedformer's semantics."""
    if sinks is not None or kwargs:
        return MX_FAST_SDPA(q, k, v, scale=scale, mask=mask, sinks=sinks, **kwargs)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"[sdpa] mask={mask!r}; the only string mask is 'causal'")
        return sdpa_mlx(q, k, v, causal=True, scale=scale)
    return sdpa_mlx(q, k, v, mask=mask, scale=scale)


@functools.lru_cache(maxsize=None)
def _calls_sdpa(cls) -> bool:
    try:
        return "scaled_dot_product_attention" in inspect.getsource(cls.__call__)
    except (OSError, TypeError):
        return False


def is_attention_module(module: nn.Module) -> bool:
    """True for modules whose own ``__call__`` runs ``scaled_dot_product_attention``."""
    return getattr(type(module), "_ff_fused_attention", False) is False and (
        isinstance(module, nn.MultiHeadAttention) or _calls_sdpa(type(module))
    )


@functools.lru_cache(maxsize=None)
def _fused_class(cls):
    """A subclass of ``cls`` whose ``__call__`` runs under use_fused_sdpa()."""

    def __call__(self, *args, **kwargs):
        with use_fused_sdpa():
            return cls.__call__(self, *args, **kwargs)

    return type(f"Fused{cls.__name__}", (cls,), {"__call__": __call__, "_ff_fused_attention": True,
                                                 "__module__": cls.__module__, "__doc__": cls.__doc__})


def _skipped(path: str, skip) -> bool:
    return any(path == s or path.endswith("." + s) for s in skip)


def _compress_linears(model: nn.Module, scheme, skip):
    left_dense = []

    def swap(path, module):
        if not isinstance(module, (nn.Linear, nn.QuantizedLinear)) or _skipped(path, skip):
            return module
        try:
            return QuantizedLinear.from_linear(module, scheme)
        except ValueError as err:  # the scheme cannot take this shape
            left_dense.append(f"{path} ({err})")
            return module

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))
    if left_dense:
        warnings.warn(f"[optimize] left dense: {'; '.join(left_dense)}", stacklevel=3)
