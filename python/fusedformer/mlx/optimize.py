"""ff.mlx.optimize: fused attention and compressed-weight linears in an mlx.nn model, in place.

Same contract as ff.torch.optimize (modes, ``weights`` as a scheme or {glob: scheme}, ``skip``,
every check before the first change, ``model.fusedformer_report``), for mlx.nn models.

Attention. MLX models (mlx.nn.MultiHeadAttention, mlx-lm's models, most hand-written ones) call
``mx.fast.scaled_dot_product_attention`` inside an attention module's ``__call__``. optimize()
finds those modules (any module whose ``__call__`` calls ``scaled_dot_product_attention``) and
gives each a subclass that runs its ``__call__`` inside :func:`use_fused_sdpa`, which routes
this thread's ``mx.fast.scaled_dot_product_attention`` calls to
:func:`fusedformer.mlx.attention.sdpa_mlx` for the duration of that call only (other models,
and other threads, are untouched; a module that bound MLX's function to a name of its own at
import is routed through that name). The fused MLX kernel still does the work; what changes
is fusedformer's semantics: rows with every key masked (left padding, windows) give 0 instead of
NaN or the mean of v.

Weights. Every ``nn.Linear`` and ``nn.QuantizedLinear`` not matched by ``skip`` becomes an
``ff.mlx.QuantizedLinear`` (see QuantizedLinear.from_linear: an affine nn.QuantizedLinear of the
same bits and group size is adopted as it is, any other is dequantized and compressed).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import threading

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from fusedformer._optimize import check_arguments, count_model_bytes, plan_weights, start_report, weight_holders
from fusedformer.mlx.attention import MX_FAST_SDPA, sdpa_mlx
from fusedformer.mlx.linear import QuantizedLinear, _same_affine, dense_weight
from fusedformer.quant import check_values

_routing = threading.local()


def optimize(model: nn.Module, attention: str | None = "fused", weights=None, skip=("lm_head",)) -> nn.Module:
    """Swaps attention and linears of an mlx.nn ``model`` in place and returns it;
    ``model.fusedformer_report`` says what changed.

    attention: "fused" (route the model's attention through ff.sdpa's MLX path) or None.
    weights: None, an ff.quant scheme for every nn.Linear / nn.QuantizedLinear, or
      {module-name glob: scheme} (the first matching pattern wins).
    skip: module names (globs over the dotted path, or one dotted component such as "lm_head")
      whose linears stay as they are.
    """
    skip = check_arguments(model, attention, skip, nn.Module, "mlx.nn")
    compressed = [(path, m.qweight.scheme) for path, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    plan, skipped, unmatched = (plan_weights(_linears(model), weights, skip, compressed)
                                if weights is not None else ([], [], []))
    for path, linear, scheme in plan:  # every check before the first change (adopted arrays need none)
        if not _same_affine(linear, scheme):
            check_values(dense_weight(linear), scheme, name=path)
    report = start_report(model, "mlx", attention, skipped, unmatched)
    if attention == "fused":
        for path, module in model.named_modules():
            if is_attention_module(module):
                module.__class__ = _fused_class(type(module))
                report.attention_modules.append(path)
    holders = weight_holders(tree_flatten(model.parameters()), plan)
    counted = set()
    for path, linear, scheme in plan:  # one layer at a time: peak memory ~ model + one layer
        layer = QuantizedLinear.from_linear(linear, scheme)
        w = linear.weight
        if id(w) not in counted:  # (a weight two compressed layers share is freed once)
            counted.add(id(w))
            report.bytes_before += _nbytes(linear)
            if holders[id(w)]:  # tied to an array that stays (an embedding): not freed
                report.bytes_after += _nbytes(linear)
                report.tied[path] = holders[id(w)][0]
        report.bytes_after += _nbytes(layer)  # what the layer holds (Int8: MLX's q + 128 codes and group scales)
        report.quantized[path] = repr(scheme)
        _set_module(model, path, layer)
    count_model_bytes(report, tree_flatten(model.parameters()), report.quantized)
    report.close()
    model.fusedformer_report = report
    return model


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Puts ``new`` at ``path`` of the module tree: through modules and dicts by key, lists by
    index (update_modules(tree_unflatten(...)) took a dict's digit keys for list indices)."""
    *parents, last = path.split(".")
    node = model
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[int(last) if isinstance(node, list) else last] = new


def _linears(model):
    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            yield path, module, _linear_shape(module)


def _linear_shape(linear) -> tuple[int, int]:
    out_dims, cols = linear.weight.shape
    return (out_dims, cols * 32 // linear.bits) if isinstance(linear, nn.QuantizedLinear) else (out_dims, cols)


def _nbytes(linear) -> int:
    return sum(v.nbytes for k, v in tree_flatten(linear.parameters()) if k != "bias")


@contextlib.contextmanager
def use_fused_sdpa():
    """Within the block, this thread's ``mx.fast.scaled_dot_product_attention`` calls go to
    fusedformer's MLX sdpa (calls with ``sinks`` still go to MLX's, which alone supports them).
    Re-entrant. The first use puts a router in mx.fast that stays: outside such blocks (and in
    other threads) it passes calls to MLX's own function. Swapping mx.fast's function in and out
    per block raced between threads (calls outside a block sent to ours, calls inside to MLX's)."""
    if mx.fast.scaled_dot_product_attention is not _routed_sdpa:
        mx.fast.scaled_dot_product_attention = _routed_sdpa
    _routing.depth = getattr(_routing, "depth", 0) + 1
    try:
        yield
    finally:
        _routing.depth -= 1


def _routed_sdpa(*args, **kwargs):
    """mx.fast.scaled_dot_product_attention once use_fused_sdpa() has run: ours inside its blocks
    (this thread's), MLX's own elsewhere."""
    if getattr(_routing, "depth", 0) > 0:
        return _fused_sdpa_like_mx_fast(*args, **kwargs)
    return MX_FAST_SDPA(*args, **kwargs)


def _fused_sdpa_like_mx_fast(q, k, v, *, scale, mask=None, sinks=None, **kwargs):
    """mx.fast.scaled_dot_product_attention's signature, fusedformer's semantics."""
    if sinks is not None or kwargs:
        return MX_FAST_SDPA(q, k, v, scale=scale, mask=mask, sinks=sinks, **kwargs)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"[sdpa] mask={mask!r}; the only string mask is 'causal'")
        return sdpa_mlx(q, k, v, causal=True, scale=scale)
    return sdpa_mlx(q, k, v, mask=mask, scale=scale)


def _bound_names(cls) -> list[str]:
    """Names in the module of ``cls.__call__`` bound to MLX's attention function at import
    (``from mlx.core.fast import scaled_dot_product_attention [as name]``), or to the router."""
    namespace = getattr(cls.__call__, "__globals__", {})
    return [name for name, value in namespace.items() if value is MX_FAST_SDPA or value is _routed_sdpa]


def _route_bound_names(cls) -> None:
    """Binds the names _bound_names finds to the router, which passes calls outside
    use_fused_sdpa() blocks to MLX's function as before: such a module was reported fused but
    never routed."""
    namespace = cls.__call__.__globals__
    for name in _bound_names(cls):
        namespace[name] = _routed_sdpa


@functools.lru_cache(maxsize=None)
def _calls_sdpa(cls) -> bool:
    try:
        source = inspect.getsource(cls.__call__)
    except (OSError, TypeError):
        return False
    return "scaled_dot_product_attention" in source or any(
        re.search(rf"\b{re.escape(name)}\s*\(", source) for name in _bound_names(cls))


def is_attention_module(module: nn.Module) -> bool:
    """True for modules whose own ``__call__`` runs ``scaled_dot_product_attention``."""
    return getattr(type(module), "_ff_fused_attention", False) is False and (
        isinstance(module, nn.MultiHeadAttention) or _calls_sdpa(type(module))
    )


@functools.lru_cache(maxsize=None)
@functools.lru_cache(maxsize=None)
def _fused_class(cls):
    """A subclass of ``cls`` whose ``__call__`` runs under use_fused_sdpa() (one per class, so
    that modules of one class share it)."""
    _route_bound_names(cls)

    def __call__(self, *args, **kwargs):
        with use_fused_sdpa():
            return cls.__call__(self, *args, **kwargs)

    return type(f"Fused{cls.__name__}", (cls,), {"__call__": __call__, "_ff_fused_attention": True,
                                                 "__module__": cls.__module__, "__doc__": cls.__doc__})
