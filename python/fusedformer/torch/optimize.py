"""`ff.torch.optimize(model, ...)`: one call swaps fused attention and compressed weights into a
PyTorch or Hugging Face model, in place.

Everything that can go wrong (an unknown mode or scheme, a model on another device, a weight the
scheme cannot compress) is checked before the first module changes, so a failed call leaves
the model as it was. Linear layers are then compressed and swapped one at a time, so peak
memory stays near the fp32 model plus one layer.
"""

from __future__ import annotations

import torch
from torch import nn

from fusedformer._optimize import OptimizeReport, check_arguments, plan_weights
from fusedformer.torch.routing import AttentionStats
from fusedformer.torch.sdpa_mode import use_fused_sdpa  # noqa: F401  (re-exported as ff.torch.use_fused_sdpa)


def _linears(model: nn.Module):
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            yield name, module, tuple(module.weight.shape)


def _check_device(model: nn.Module) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type != "cpu":
            raise ValueError(
                f"[optimize] {name} is on {t.device}; fusedformer's kernels run on the CPU (move the model with .cpu())"
            )


def _plan_attention(model: nn.Module) -> list[tuple[str, nn.Module, type]]:
    from fusedformer.torch.modules import SWAPS

    return [(name, m, SWAPS[type(m)]) for name, m in model.named_modules() if type(m) in SWAPS]


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
    plan, skipped, unmatched = plan_weights(_linears(model), weights, skip) if weights is not None else ([], [], [])
    for name, linear, _ in plan:  # every check before the first change
        if not torch.isfinite(linear.weight).all():
            raise ValueError(f"[optimize] {name}.weight has NaN/inf entries; it cannot be compressed")
    swaps = _plan_attention(model) if attention == "fused" else []

    previous = getattr(model, "fusedformer_report", None)
    stats = previous.stats if isinstance(previous, OptimizeReport) else AttentionStats()
    report = OptimizeReport("torch", attention=attention, skipped=skipped, unmatched_patterns=unmatched, stats=stats)
    if attention == "fused":
        if hf.is_hf_model(model):
            report.attention_modules += hf.use_fused_attention(model, stats)
        for name, module, fused_cls in swaps:
            module.__class__ = fused_cls
            if hasattr(fused_cls, "_fusedformer_stats"):
                module._fusedformer_stats = stats
            report.attention_modules.append(name)
    if plan:
        from fusedformer.torch.quantized_linear import QuantizedLinear

        for name, linear, scheme in plan:
            q = QuantizedLinear.from_linear(linear, scheme)
            report.bytes_before += linear.weight.numel() * linear.weight.element_size()
            report.bytes_after += q.weight_nbytes
            report.quantized[name] = repr(scheme)
            _set_submodule(model, name, q)
    model.fusedformer_report = report
    return model
