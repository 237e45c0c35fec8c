"""`ff.torch.optimize(model, ...)`: one call swaps fused attention and compressed weights into a
PyTorch or Hugging Face model, in place.

Everything that can go wrong (an unknown mode or scheme, a model on another device, a weight the
scheme cannot compress) is checked before the first module changes, so a failed call leaves
the model as it was. Linear layers are then compressed and swapped one at a time, so peak
memory stays near the fp32 model plus one layer.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from fusedformer.torch.routing import AttentionStats
from fusedformer.torch.sdpa_mode import use_fused_sdpa  # noqa: F401  (re-exported as ff.torch.use_fused_sdpa)

ATTENTION_MODES = ("fused", None)


@dataclass
class OptimizeReport:
    """What optimize() changed; ``stats`` keeps counting attention calls as the model runs."""

    attention: str | None
    attention_modules: list[str] = field(default_factory=list)
    quantized: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    unmatched_patterns: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    stats: AttentionStats = field(default_factory=AttentionStats)

    def __str__(self) -> str:
        lines = [f"fusedformer.optimize: attention={self.attention!r}, {len(self.attention_modules)} attention modules"]
        if self.quantized:
            lines.append(
                f"  {len(self.quantized)} linear layers compressed: {self.bytes_before / 2**20:.1f} MiB -> "
                f"{self.bytes_after / 2**20:.1f} MiB ({self.bytes_before / max(self.bytes_after, 1):.2f}x smaller)"
            )
        if self.skipped:
            lines.append(f"  skipped: {', '.join(self.skipped)}")
        for p in self.unmatched_patterns:
            lines.append(f"  warning: pattern {p!r} matched no linear layer")
        lines.append(f"  attention calls so far: {self.stats}")
        return "\n".join(lines)


def _matches(name: str, pattern: str) -> bool:
    """A glob over the full module name, or an exact dotted component ("lm_head", "mlp")."""
    return fnmatch.fnmatchcase(name, pattern) or pattern in name.split(".")


def _check_device(model: nn.Module) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type != "cpu":
            raise ValueError(
                f"[optimize] {name} is on {t.device}; fusedformer's kernels run on the CPU (move the model with .cpu())"
            )


def _plan_weights(model: nn.Module, weights, skip) -> tuple[list[tuple[str, nn.Linear, object]], list[str], list[str]]:
    """[(name, linear, scheme)] to compress, names skipped, patterns that matched nothing."""
    from fusedformer import quant

    if isinstance(weights, dict):
        rules = list(weights.items())
    else:
        rules = [("*", weights)]
    for pattern, scheme in rules:
        if not quant.is_scheme(scheme):
            raise TypeError(f"[optimize] weights for {pattern!r} must be a fusedformer.quant scheme, got {scheme!r}")
    used, plan, skipped = set(), [], []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        if any(_matches(name, s) for s in skip):
            skipped.append(name)
            continue
        for pattern, scheme in rules:
            if _matches(name, pattern):
                used.add(pattern)
                plan.append((name, module, scheme))
                break
    unmatched = [p for p, _ in rules if p not in used]
    for name, linear, scheme in plan:  # every check before the first change
        quant.check_compressible(tuple(linear.weight.shape), scheme, name=name)
        if not torch.isfinite(linear.weight).all():
            raise ValueError(f"[optimize] {name}.weight has NaN/inf entries; it cannot be compressed")
    return plan, skipped, unmatched


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

    if attention not in ATTENTION_MODES:
        raise ValueError(f"[optimize] attention must be one of {ATTENTION_MODES}, got {attention!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"[optimize] model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(skip, str):
        skip = (skip,)
    _check_device(model)
    plan, skipped, unmatched = _plan_weights(model, weights, skip) if weights is not None else ([], [], [])
    swaps = _plan_attention(model) if attention == "fused" else []
    for p in unmatched:
        warnings.warn(f"[optimize] weights pattern {p!r} matched no nn.Linear", stacklevel=2)

    report = getattr(model, "fusedformer_report", None)
    stats = report.stats if isinstance(report, OptimizeReport) else AttentionStats()
    report = OptimizeReport(attention=attention, skipped=skipped, unmatched_patterns=unmatched, stats=stats)
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
