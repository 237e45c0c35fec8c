"""Lowering of fusedformer's torch custom ops to MIL, registered with coremltools' torch frontend.

* ``fusedformer::sdpa`` -> iOS18 ``scaled_dot_product_attention`` ("fused") or
  matmul / softmax / matmul ("unfused", and every target below iOS18). The fused MIL op has no
  scale argument (we fold the scale into q), no grouped-query attention (we repeat the K/V heads
  in the program) and no causal flag (we build a bool mask). The result equals ``ff.sdpa``:
  bottom-right aligned causal, sliding window, bool or additive user masks, and 0 -- never NaN --
  for a query row whose keys are all masked.
* ``fusedformer::sdpa_lse`` -> the same output plus the log-sum-exp from the scores.
* ``fusedformer::qmatmul(x, parts, meta)`` -> the QuantizedWeight rebuilt from the traced
  constants as a compressed constant (constexpr_* ops, see weights.py), then ``linear``.
* ``aten::diff`` and ``aten::new_ones``, which coremltools 9.0 lacks and transformers' mask
  code emits under tracing.

Importing this module registers the translations (``ct.convert`` called directly then uses them
with the default options); ff.coreml.export chooses the attention form and the weight dtype
with :func:`lowering_options` around ``ct.convert``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.frontend.torch.ops import _get_inputs
from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op
from coremltools.converters.mil.mil import Var, types
from coremltools.converters.mil.mil.block import is_current_opset_version_compatible_with
from coremltools.converters.mil.mil.types.symbolic import is_symbolic

from coremltools import target as _target


@dataclass
class LoweringOptions:
    attention: str = "fused"  # "fused" | "unfused"
    weight_dtype: str = "fp32"  # dtype of decompressed constexpr weights: "fp16" | "fp32"
    # the program never has more queries than keys (KV-cache decoders): causal/window rows are
    # never empty, so flexible lengths need no empty-row guard
    queries_within_keys: bool = False
    notes: list = field(default_factory=list)  # what the lowering decided, for the export result


_OPTIONS = LoweringOptions()


@contextlib.contextmanager
def lowering_options(**kwargs):
    """Sets the lowering options for the conversions run inside the block."""
    global _OPTIONS
    old, _OPTIONS = _OPTIONS, LoweringOptions(**kwargs)
    try:
        yield _OPTIONS
    finally:
        _OPTIONS = old


def fused_attention_available() -> bool:
    """Whether the opset being converted to has scaled_dot_product_attention (iOS18+)."""
    return is_current_opset_version_compatible_with(_target.iOS18)


# ----------------------------------------------------------------------------------------------
# attention


def _value(var):
    """The python value of a constant input (None for an omitted optional)."""
    if var is None:
        return None
    if isinstance(var, Var):
        if var.val is None:
            raise ValueError(f"[coreml] {var.name} must be a constant at export time")
        return var.val.item() if isinstance(var.val, np.ndarray) else var.val
    return var


def _dim(x: Var, axis: int) -> Var | int:
    """x.shape[axis] as an int when static, else as a scalar int32 Var."""
    size = x.shape[axis]
    if not is_symbolic(size):
        return int(size)
    return mb.gather(x=mb.shape(x=x), indices=axis % x.rank, axis=0)


def repeat_kv_heads(x: Var, groups: int, name: str) -> Var:
    """[B, Hkv, L, D] -> [B, Hkv * groups, L, D], kv head h serving query heads h*g .. h*g+g-1."""
    if groups == 1:
        return x
    _, hkv, _, d = x.shape
    x = mb.expand_dims(x=x, axes=[2])
    x = mb.tile(x=x, reps=[1, 1, groups, 1, 1])
    return mb.reshape(x=x, shape=_shape_with_batch(x, [hkv * groups, -1, d]), name=name)


def _shape_with_batch(x: Var, rest: list) -> list | Var:
    """The reshape shape [x.shape[0], *rest]: a list for a static batch; for a flexible one a Var
    built from x's runtime shape (a symbolic dim cannot go in a constant, and reshape's 0 copies a
    dim only when the ranks match), whose symbolic value keeps the result's static dims known."""
    b = x.shape[0]
    if not is_symbolic(b):
        return [int(b)] + list(rest)
    batch = mb.slice_by_size(x=mb.shape(x=x), begin=[0], size=[1])
    return mb.concat(values=[batch, np.array(rest, np.int32)], axis=0)


def structural_mask(lq, lk, *, causal: bool, window: int | None, name: str) -> Var | None:
    """Bool [Lq, Lk] keep-mask of causal/window, bottom-right aligned like reference.sdpa_mask."""
    if not causal and window is None:
        return None
    if isinstance(lq, int) and isinstance(lk, int):  # static: a constant
        from fusedformer.reference import sdpa_mask

        return mb.const(val=sdpa_mask(lq, lk, causal=causal, window=window), name=name)
    # dynamic lengths (flexible inputs, KV cache): query i sits at absolute position i + lk - lq
    rows = mb.range_1d(start=0, end=lq, step=1)
    rows = mb.add(x=rows, y=mb.sub(x=lk, y=lq))
    rows = mb.expand_dims(x=rows, axes=[1])
    cols = mb.expand_dims(x=mb.range_1d(start=0, end=lk, step=1), axes=[0])
    keep = None
    if causal:
        keep = mb.less_equal(x=cols, y=rows)
    if window is not None:
        lo = mb.greater(x=cols, y=mb.sub(x=rows, y=window))
        keep = lo if keep is None else mb.logical_and(x=keep, y=lo)  # (no upper bound without causal)
    return mb.identity(x=keep, name=name)


def _rows_may_be_empty(lq, lk, user_mask) -> bool:
    """Whether some query row can end up with every key masked (ff.sdpa gives 0 there)."""
    if user_mask is not None:
        return True
    if isinstance(lq, int) and isinstance(lk, int):
        return lq > lk
    return not _OPTIONS.queries_within_keys


def combine_masks(keep: Var | None, user_mask: Var | None, name: str):
    """(mask for attention, bool-or-float) from the structural keep-mask and the user's mask.

    Bool stays bool (both fused and unfused forms take it); an additive float user mask gets
    -inf where the structural mask drops a key.
    """
    if user_mask is None:
        return keep
    if types.is_bool(user_mask.dtype):
        return user_mask if keep is None else mb.logical_and(x=keep, y=user_mask, name=name)
    if keep is None:
        return user_mask
    return mb.select(cond=keep, a=user_mask, b=np.float32(-np.inf), name=name)


def _live_rows(mask: Var, name: str) -> Var:
    """Bool [..., Lq, 1]: rows of the mask that keep at least one key."""
    if types.is_bool(mask.dtype):
        hits = mb.reduce_max(x=mb.cast(x=mask, dtype="fp32"), axes=[-1], keep_dims=True)
        return mb.greater(x=hits, y=np.float32(0.0), name=name)
    best = mb.reduce_max(x=mask, axes=[-1], keep_dims=True)
    return mb.greater(x=best, y=np.float32(-np.inf), name=name)


def _unfused_attention(q: Var, k: Var, v: Var, mask: Var | None, name: str) -> Var:
    """softmax(q k^T + mask) v as matmul / softmax / matmul (q already scaled)."""
    scores = mb.matmul(x=q, y=k, transpose_y=True, name=f"{name}_scores")
    if mask is not None:
        if types.is_bool(mask.dtype):
            scores = mb.select(cond=mask, a=scores, b=np.float32(-np.inf), name=f"{name}_masked")
        else:
            scores = mb.add(x=scores, y=mask, name=f"{name}_masked")
    probs = mb.softmax(x=scores, axis=-1, name=f"{name}_probs")
    return mb.matmul(x=probs, y=v, name=f"{name}_out")


def lower_sdpa(q, k, v, mask=None, *, causal=False, scale=None, window=None, fused=True, name="sdpa") -> Var:
    """MIL for ff.sdpa(q, k, v, mask=, causal=, scale=, window=) on [B, H, L, D] Vars."""
    if q.rank != 4 or k.rank != 4 or v.rank != 4:
        raise ValueError(f"[coreml] sdpa expects q, k, v of rank 4, got {q.rank}, {k.rank}, {v.rank}")
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    if any(is_symbolic(s) for s in (hq, hkv, d)):
        raise ValueError("[coreml] sdpa needs static head counts and head dim")
    if hq % hkv:
        raise ValueError(f"[coreml] sdpa: k has {hkv} heads, which does not divide q's {hq} heads")
    if window is not None and window < 1:
        raise ValueError(f"[coreml] sdpa: window must be >= 1, got {window}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    # the fused op divides by sqrt(D) itself: fold the rest of the scale into q
    q_scale = scale * math.sqrt(d) if fused else scale
    if q_scale != 1.0:
        q = mb.mul(x=q, y=np.float32(q_scale), name=f"{name}_q_scaled")
    k = repeat_kv_heads(k, hq // hkv, f"{name}_k_heads")
    v = repeat_kv_heads(v, hq // hkv, f"{name}_v_heads")

    lq, lk = _dim(q, -2), _dim(k, -2)
    keep = structural_mask(lq, lk, causal=causal, window=window, name=f"{name}_keep")
    attn_mask = combine_masks(keep, mask, f"{name}_mask")
    guard = attn_mask is not None and _rows_may_be_empty(lq, lk, mask)
    out_name = f"{name}_attn" if guard else name
    if fused:
        kwargs = {} if attn_mask is None else {"attn_mask": attn_mask}
        out = mb.scaled_dot_product_attention(query=q, key=k, value=v, name=out_name, **kwargs)
    else:
        out = _unfused_attention(q, k, v, attn_mask, out_name)
    if guard:  # rows with no key left: 0 like ff.sdpa (Core ML and softmax give NaN there)
        out = mb.select(cond=_live_rows(attn_mask, f"{name}_live"), a=out, b=np.float32(0.0), name=name)
    return out


def _use_fused() -> bool:
    if _OPTIONS.attention == "unfused":
        return False
    if not fused_attention_available():
        note = "scaled_dot_product_attention needs iOS18: attention lowered unfused"
        if note not in _OPTIONS.notes:
            _OPTIONS.notes.append(note)
        return False
    return True


def lower_lse(q, k, mask=None, *, causal=False, scale=None, window=None, name="lse") -> Var:
    """log-sum-exp of the scaled, masked scores [B, H, Lq] (-inf for a row with no key)."""
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    k = repeat_kv_heads(k, hq // hkv, f"{name}_k_heads")
    scores = mb.mul(x=mb.matmul(x=q, y=k, transpose_y=True), y=np.float32(scale))
    lq, lk = _dim(q, -2), _dim(k, -2)
    keep = structural_mask(lq, lk, causal=causal, window=window, name=f"{name}_keep")
    attn_mask = combine_masks(keep, mask, f"{name}_mask")
    if attn_mask is not None:
        if types.is_bool(attn_mask.dtype):
            scores = mb.select(cond=attn_mask, a=scores, b=np.float32(-np.inf))
        else:
            scores = mb.add(x=scores, y=attn_mask)
    lse = mb.reduce_log_sum_exp(x=scores, axes=[-1], keep_dims=True)
    if attn_mask is not None and _rows_may_be_empty(lq, lk, mask):
        lse = mb.select(cond=_live_rows(attn_mask, f"{name}_live"), a=lse, b=np.float32(-np.inf))
    return mb.squeeze(x=lse, axes=[-1], name=name)


def _sdpa_args(context, node):
    inputs = list(_get_inputs(context, node)) + [None] * 7
    q, k, v, mask, causal, scale, window = inputs[:7]
    options = dict(causal=bool(_value(causal) or False), scale=_value(scale), window=_value(window))
    return q, k, v, mask, options


@register_torch_op(torch_alias=["fusedformer::sdpa"], override=True)
def fusedformer_sdpa(context, node):
    q, k, v, mask, options = _sdpa_args(context, node)
    out = lower_sdpa(q, k, v, mask, fused=_use_fused(), name=node.name, **options)
    context.add(out, torch_name=node.name)


@register_torch_op(torch_alias=["fusedformer::sdpa_lse"], override=True)
def fusedformer_sdpa_lse(context, node):
    """(out, lse): out as fusedformer::sdpa, lse from the scores (Core ML's fused op has none)."""
    q, k, v, mask, options = _sdpa_args(context, node)
    out_name, lse_name = node.outputs[:2]
    out = lower_sdpa(q, k, v, mask, fused=_use_fused(), name=out_name, **options)
    lse = lower_lse(q, k, mask, name=lse_name, **options)
    context.add(out, torch_name=out_name)
    context.add(lse, torch_name=lse_name)


# ----------------------------------------------------------------------------------------------
# compressed weights


def _part_dtypes(meta: str) -> list:
    """Canonical dtypes of the QuantizedWeight parts, in to_op_args order.

    The torch frontend stores small integer buffers as int32 consts (values kept, dtype lost):
    packed bit streams are uint8, MLX affine words uint32, int8 codes / zero points int8.
    """
    import json

    from fusedformer.quant.schemes import Affine, Prune, scheme_from_json
    from fusedformer.quant.weight import _names

    scheme = scheme_from_json(json.loads(meta)["scheme"])
    words = np.uint32 if isinstance(scheme, Affine) else (np.uint8 if isinstance(scheme, Prune) else np.int8)
    table = {"w_q": words, "zero_points": np.int8, "indices": np.uint8, "mask": np.uint8}
    return [table.get(name, np.float32) for name in _names(scheme)]


def _restore_parts(parts, meta: str) -> list[np.ndarray]:
    out = []
    for var, dtype in zip(parts, _part_dtypes(meta)):
        value = np.asarray(var.val)
        if np.issubdtype(value.dtype, np.integer) and value.dtype != dtype:
            value = value.astype(np.int64).astype(dtype)  # same values (uint32 words wrap back)
        out.append(value)
    return out


@register_torch_op(torch_alias=["fusedformer::qmatmul"], override=True)
def fusedformer_qmatmul(context, node):
    from fusedformer.coreml.weights import compressed_weight
    from fusedformer.quant import QuantizedWeight

    x, parts, meta = _get_inputs(context, node, expected=3)
    if not isinstance(parts, (list, tuple)) or any(p.val is None for p in parts):
        raise ValueError(f"[coreml] qmatmul {node.name}: the weight parts must be constants (buffers)")
    meta = _value(meta)
    qw = QuantizedWeight.from_op_args(_restore_parts(parts, meta), meta)
    dtype = np.float16 if _OPTIONS.weight_dtype == "fp16" else np.float32
    weight = compressed_weight(qw, dtype=dtype, name=f"{node.name}_weight")
    if types.builtin_to_string(x.dtype) != types.builtin_to_string(weight.dtype):
        # keep the frontend graph in x's dtype; the fp16 pass later drops the cast pair
        weight = mb.cast(x=weight, dtype=types.builtin_to_string(x.dtype))
    context.add(mb.linear(x=x, weight=weight, name=node.name), torch_name=node.name)


# ----------------------------------------------------------------------------------------------
# torch ops coremltools 9.0 lacks that traced models emit


def _slice_axis(x: Var, axis: int, begin: int, end: int | None) -> Var:
    """x[..., begin:end, ...] along ``axis`` (end None: to the end)."""
    begins, ends = [0] * x.rank, [0] * x.rank
    begins[axis] = begin
    ends[axis] = 0 if end is None else end
    end_mask = [i != axis or end is None for i in range(x.rank)]
    return mb.slice_by_index(x=x, begin=begins, end=ends, end_mask=end_mask)


def _diff(context, node):
    """aten::diff(x, n=1, dim=-1, prepend=None, append=None) (transformers' packed-sequence check)."""
    inputs = list(_get_inputs(context, node)) + [None] * 5
    x, n, dim, prepend, append = inputs[:5]
    n, dim = int(_value(n) if n is not None else 1), int(_value(dim) if dim is not None else -1)
    axis = dim % x.rank
    parts = [p for p in (prepend, x, append) if p is not None]
    if len(parts) > 1:
        x = mb.concat(values=parts, axis=axis)
    for _ in range(n):
        x = mb.sub(x=_slice_axis(x, axis, 1, None), y=_slice_axis(x, axis, 0, -1))
    context.add(mb.identity(x=x, name=node.name), torch_name=node.name)


def _new_ones(context, node):
    """aten::new_ones(self, size, dtype, ...) (transformers' mask builders)."""
    from coremltools.converters.mil.frontend.torch.utils import NUM_TO_DTYPE_STRING

    inputs = list(_get_inputs(context, node)) + [None] * 3
    x, size, dtype = inputs[:3]
    if isinstance(size, (list, tuple)):
        size = mb.concat(values=list(size), axis=0)
    if size.val is not None:  # a constant shape (possibly (), a scalar)
        ones = mb.const(val=np.ones([int(d) for d in np.asarray(size.val).ravel()], np.float32))
    else:
        ones = mb.fill(shape=mb.cast(x=size, dtype="int32"), value=1.0)
    dtype = NUM_TO_DTYPE_STRING[_value(dtype)] if dtype is not None else types.builtin_to_string(x.dtype)
    context.add(mb.cast(x=ones, dtype=dtype, name=node.name), torch_name=node.name)


def _register_missing_torch_ops():
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    for name, fn in (("diff", _diff), ("new_ones", _new_ones)):
        if name not in _TORCH_OPS_REGISTRY.name_to_func_mapping:
            register_torch_op(fn, torch_alias=[name])


_register_missing_torch_ops()
