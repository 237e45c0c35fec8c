"""`ff.torch.optimize(model, ...)`: one call swaps fused attention and compressed weights into a
PyTorch or Hugging Face model, in place.

Everything that can go wrong (an unknown mode or scheme, a model on another device, a weight the
scheme cannot compress) is checked before the first module changes, so a failed call leaves
the model as it was. Linear layers are then compressed and swapped one at a time, so peak
memory stays near the fp32 model plus one layer.
"""

from __future__ import annotations

import functools
import inspect
import re
import warnings

import torch
from torch import nn

from fusedformer import quant
from fusedformer._optimize import (OptimizeReport, check_arguments, count_model_bytes, plan_weights, start_report,
                                  weight_holders)
from fusedformer.torch.routing import AttentionStats
from fusedformer.torch.sdpa_mode import use_fused_sdpa  # noqa: F401  (re-exported as ff.torch.use_fused_sdpa)


def _linears(model: nn.Module):
    """Every nn.Linear under every name it has (one module set as two attributes is two names:
    both are swapped, or neither; _one_module_one_scheme), the model itself aside."""
    for name, module in model.named_modules(remove_duplicate=False):
        if type(module) is nn.Linear and name:
            yield name, module, tuple(module.weight.shape)


def _linear_like(model: nn.Module) -> dict[str, int]:
    """Type name -> count of the layers that compute x @ W.T + b but are not nn.Linear, which
    weights= leaves dense: nn.Linear subclasses (Falcon's FalconLinear; their forward may differ)
    and transformers' Conv1D (GPT-2's projections, W stored [in, out])."""
    found: dict[str, int] = {}
    for _, m in model.named_modules():
        if (isinstance(m, nn.Linear) and type(m) is not nn.Linear) or type(m).__name__ == "Conv1D":
            found[type(m).__name__] = found.get(type(m).__name__, 0) + 1
    return found


def _check_weight_plan(model: nn.Module, plan) -> None:
    """Before any change: the model itself cannot be swapped in place; compressed layers compute
    in float32/float16/bfloat16 (a float64 layer passed optimize() and failed on its first call);
    a call that compresses nothing, or leaves linear-like layers of other types dense, says so."""
    if type(model) is nn.Linear:
        raise ValueError("[optimize] the model is itself an nn.Linear, which optimize() cannot replace in place: "
                         "wrap it (nn.Sequential(model)) or use fusedformer.torch.QuantizedLinear.from_linear")
    for name, linear, _ in plan:
        if linear.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"[optimize] {name} is {linear.weight.dtype}: compressed layers compute in float32, "
                             "float16 or bfloat16 (cast the model first, e.g. model.float())")
    others = _linear_like(model)
    if others:
        kinds = ", ".join(f"{kind} ({n})" for kind, n in others.items())
        warnings.warn(f"[optimize] weights= compresses nn.Linear layers only; {kinds} stay dense"
                      + ("" if plan else ": no layer was compressed"), stacklevel=3)
    elif not plan and not _compressed(model):
        warnings.warn("[optimize] weights= compressed no layer (every nn.Linear is skipped, or none matched)",
                      stacklevel=3)


def _one_module_one_scheme(plan, dense):
    """The plan with a linear that has several names (``m.a = m.b = nn.Linear(...)``) compressed
    under all of them or none: none where one of its names stays dense (skipped, or read by its
    parent); a ValueError where the patterns give its names different schemes. Before, only the
    first name was swapped and the others kept running the dense layer. Returns (plan, the
    names that now stay dense as well)."""
    dense_ids = {id(module) for name, module, _ in dense}
    schemes: dict[int, tuple[str, object]] = {}
    kept, dropped = [], []
    for name, module, scheme in plan:
        if id(module) in dense_ids:
            dropped.append(name)
            continue
        first = schemes.setdefault(id(module), (name, scheme))
        if first[1] != scheme:
            raise ValueError(f"[optimize] {first[0]} and {name} are one nn.Linear, and weights gives them different "
                             f"schemes ({first[1]!r}, {scheme!r}); give them one")
        kept.append((name, module, scheme))
    return kept, dropped


def _compressed(model: nn.Module):
    """(name, scheme) of the layers an earlier optimize() compressed."""
    from fusedformer.torch.quantized_linear import QuantizedLinear

    return [(name, m.scheme) for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def _check_device(model: nn.Module) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type != "cpu":
            raise ValueError(
                f"[optimize] {name} is on {t.device}; fusedformer's kernels run on the CPU (move the model with .cpu())"
            )


def _plan_attention(model: nn.Module) -> list[tuple[str, nn.Module, type]]:
    from fusedformer.torch.modules import SWAPS

    return [(name, m, SWAPS[type(m)]) for name, m in model.named_modules() if type(m) in SWAPS]


def _plan_no_fastpath(model: nn.Module, compressed: list[str]) -> list[tuple[str, nn.Module, type]]:
    """torch's encoder (layers) holding a linear about to be compressed, with the subclass that
    turns off their native fast path (it reads linear1.weight; attention="fused" swaps its own)."""
    from fusedformer.torch.modules import NO_FASTPATH_SWAPS

    return [(name, m, NO_FASTPATH_SWAPS[type(m)]) for name, m in model.named_modules()
            if type(m) in NO_FASTPATH_SWAPS and any(c.startswith(name + ".") if name else True for c in compressed)]


# Modules whose classes' code is not a model's own (torch's layers, transformers' base classes).
_FRAMEWORK_MODULES = ("torch.", "transformers.modeling_utils", "transformers.generation", "transformers.integrations")


def _reads_child_weight(parent: nn.Module, child: str) -> bool:
    """Whether the code of ``parent``'s class (and of its bases that are a model's own, not
    torch's or transformers' infrastructure) reads ``self.<child>.weight``: T5's feed-forward
    casts its input to ``self.wo.weight.dtype`` in forward, WavLM's attention hands
    ``self.q_proj.weight`` to torch in a method forward calls. A QuantizedLinear has no weight.
    torch's encoder layers, whose fast path reads linear1.weight, are swapped for subclasses
    without it instead."""
    from fusedformer.torch.modules import NO_FASTPATH_SWAPS, SWAPS

    cls = type(parent)
    return cls not in NO_FASTPATH_SWAPS and cls not in SWAPS and _class_reads(cls, child)


@functools.lru_cache(maxsize=None)
def _class_reads(cls: type, child: str) -> bool:
    pattern = re.compile(rf"\bself\.{re.escape(child)}\.weight\b")
    for klass in cls.__mro__:
        if klass is object or klass.__module__.startswith(_FRAMEWORK_MODULES):
            continue
        try:
            if pattern.search(inspect.getsource(klass)):
                return True
        except (OSError, TypeError):  # (no source kept: reads nothing we can see)
            continue
    return False


def _without_weight_readers(model: nn.Module, plan):
    """The plan without the linears whose parent's code reads their dense weight itself: they
    stay as they are, with a warning per kind of parent (``skip`` them to silence it), and are
    returned by name."""
    kept, names, by_kind = [], [], {}
    for item in plan:
        name = item[0]
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if _reads_child_weight(parent, child):
            names.append(name)
            by_kind.setdefault(type(parent).__name__, {}).setdefault(child, []).append(name)
        else:
            kept.append(item)
    for parent, children in by_kind.items():
        reads = ", ".join(f"{child}.weight" for child in children)
        layers = [name for found in children.values() for name in found]
        warnings.warn(f"[optimize] {parent} reads {reads} itself, which a compressed layer has not: "
                      f"{len(layers)} such layer(s) stay dense, e.g. {layers[0]} (skip them to silence this)",
                      stacklevel=3)
    return kept, names


def _named_tensors(model: nn.Module) -> list:
    return [*model.named_parameters(), *model.named_buffers()]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def optimize(model: nn.Module, attention: str | None = "fused", weights=None, skip=("lm_head",)) -> nn.Module:
    """Makes ``model`` fast in place and returns it; ``model.fusedformer_report`` says what changed.

    attention: "fused" routes attention to ff.sdpa — Hugging Face models through a registered
      attention function, torch's nn.MultiheadAttention / nn.Transformer*Layer by swapping in
      fused subclasses (same parameters and state_dict); None leaves attention alone. Calls the
      fused op cannot serve (dropout in training, gradients, other devices) run torch's op and
      are counted in ``model.fusedformer_report.stats``.
    weights: None, a scheme (ff.quant.Affine(4, 64), Int8(), Palettize(4), Prune(0.5)) for every
      nn.Linear, or {module-name glob: scheme} (the first matching pattern wins).
    skip: module names (globs or dotted components) whose linear layers stay as they are.
    """
    from fusedformer.torch import hf

    skip = check_arguments(model, attention, skip, nn.Module, "torch.nn")
    _check_device(model)
    plan, skipped, unmatched = (plan_weights(_linears(model), weights, skip, _compressed(model))
                                if weights is not None else ([], [], []))
    plan, dense = _without_weight_readers(model, plan)
    skipped += dense
    names = {name: module for name, module, _ in _linears(model)}
    plan, also_dense = _one_module_one_scheme(plan, [(n, names[n], None) for n in skipped if n in names])
    skipped += also_dense
    if weights is not None:
        _check_weight_plan(model, plan)
    for name, linear, scheme in plan:  # every check before the first change
        quant.check_values(linear.weight.detach(), scheme, name=name)
    swaps = _plan_attention(model) if attention == "fused" else _plan_no_fastpath(model, [n for n, _, _ in plan])

    previous = getattr(model, "fusedformer_report", None)
    stats = previous.stats if isinstance(previous, OptimizeReport) else AttentionStats()
    report = start_report(model, "torch", attention, skipped, unmatched, stats)
    fused = hf.use_fused_attention(model, stats) if attention == "fused" and hf.is_hf_model(model) else []
    for name, module, cls in swaps:
        module.__class__ = cls
        if hasattr(cls, "_fusedformer_stats"):
            module._fusedformer_stats = stats
        if attention == "fused":
            fused.append(name)
    report.attention_modules += [name for name in fused if name not in report.attention_modules]
    if plan:
        from fusedformer.torch.quantized_linear import QuantizedLinear

        holders = weight_holders(model.named_parameters(remove_duplicate=False), plan)
        counted = set()
        swapped = {}  # id(linear) -> its QuantizedLinear (one per module, under each of its names)
        for name, linear, scheme in plan:
            if id(linear) in swapped:
                report.quantized[name] = repr(scheme)
                _set_submodule(model, name, swapped[id(linear)])
                continue
            q = swapped[id(linear)] = QuantizedLinear.from_linear(linear, scheme)
            w = linear.weight
            if id(w) not in counted:  # (a weight two compressed layers share is freed once)
                counted.add(id(w))
                report.bytes_before += w.numel() * w.element_size()
                if holders[id(w)]:  # tied to a parameter that stays (an embedding): not freed
                    report.bytes_after += w.numel() * w.element_size()
                    report.tied[name] = holders[id(w)][0]
            report.bytes_after += q.weight_nbytes
            report.quantized[name] = repr(scheme)
            _set_submodule(model, name, q)
    count_model_bytes(report, _named_tensors(model), report.quantized)
    report.close()
    model.fusedformer_report = report
    return model
