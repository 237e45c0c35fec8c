"""What ff.torch.optimize and ff.mlx.optimize share: argument checks, the weights plan (which
linear layer gets which scheme) and the report. Framework-neutral: no torch or mlx import."""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field

ATTENTION_MODES = ("fused", None)


@dataclass
class OptimizeReport:
    """What optimize() changed; ``stats`` (torch) keeps counting attention calls as the model runs."""

    framework: str
    attention: str | None
    attention_modules: list[str] = field(default_factory=list)
    quantized: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    unmatched_patterns: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    stats: object = None

    def __str__(self) -> str:
        lines = [f"fusedformer.{self.framework}.optimize: attention={self.attention!r}, "
                 f"{len(self.attention_modules)} attention modules"]
        if self.quantized:
            lines.append(
                f"  {len(self.quantized)} linear layers compressed: {self.bytes_before / 2**20:.1f} MiB -> "
                f"{self.bytes_after / 2**20:.1f} MiB ({self.bytes_before / max(self.bytes_after, 1):.2f}x smaller)"
            )
        if self.skipped:
            lines.append(f"  skipped: {', '.join(self.skipped)}")
        for p in self.unmatched_patterns:
            lines.append(f"  warning: pattern {p!r} matched no linear layer")
        if self.stats is not None:
            lines.append(f"  attention calls so far: {self.stats}")
        return "\n".join(lines)


def check_arguments(model, attention, skip, module_type, framework: str) -> tuple[str, ...]:
    """Validates optimize()'s arguments; returns ``skip`` as a tuple."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"[optimize] attention must be one of {ATTENTION_MODES}, got {attention!r}")
    if not isinstance(model, module_type):
        raise TypeError(f"[optimize] model must be a {framework} Module, got {type(model).__name__}")
    return (skip,) if isinstance(skip, str) else tuple(skip)


def matches(name: str, pattern: str) -> bool:
    """A glob over the full module name, or an exact dotted component ("lm_head", "mlp")."""
    return fnmatch.fnmatchcase(name, pattern) or pattern in name.split(".")


def plan_weights(linears, weights, skip):
    """Which linear gets which scheme.

    ``linears``: (name, module, (out_features, in_features)) for every candidate layer.
    Returns ([(name, module, scheme)], skipped names, patterns that matched nothing); raises
    before anything changes if a layer cannot take its scheme. Warns on unmatched patterns.
    """
    from fusedformer import quant

    rules = list(weights.items()) if isinstance(weights, dict) else [("*", weights)]
    for pattern, scheme in rules:
        if not quant.is_scheme(scheme):
            raise TypeError(f"[optimize] weights for {pattern!r} must be a fusedformer.quant scheme, got {scheme!r}")
    used, plan, skipped = set(), [], []
    for name, module, shape in linears:
        if any(matches(name, s) for s in skip):
            skipped.append(name)
            continue
        for pattern, scheme in rules:
            if matches(name, pattern):
                used.add(pattern)
                quant.check_compressible(shape, scheme, name=name)
                plan.append((name, module, scheme))
                break
    unmatched = [p for p, _ in rules if p not in used]
    for p in unmatched:
        warnings.warn(f"[optimize] weights pattern {p!r} matched no linear layer", stacklevel=3)
    return plan, skipped, unmatched
