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
    bytes_after: int = 0  # with the dense weights that ties keep alive
    tied: dict[str, str] = field(default_factory=dict)  # compressed layer -> a parameter sharing its dense weight
    model_bytes: int = 0  # every parameter and buffer of the model after the call, each once
    dense_bytes: int = 0  # ... of them outside compressed layers (embeddings, norms, layers left dense)
    stats: object = None

    def close(self) -> None:
        """At the end of a call: a layer an earlier call skipped and this one compressed is no
        longer listed as skipped."""
        self.skipped = [n for n in self.skipped if n not in self.quantized]

    def __str__(self) -> str:
        lines = [f"fusedformer.{self.framework}.optimize: attention={self.attention!r}, "
                 f"{len(self.attention_modules)} attention modules"]
        if self.quantized:
            lines.append(
                f"  {len(self.quantized)} linear layers compressed: {self.bytes_before / 2**20:.1f} MiB -> "
                f"{self.bytes_after / 2**20:.1f} MiB ({self.bytes_before / max(self.bytes_after, 1):.2f}x smaller)"
            )
        if self.model_bytes:
            lines.append(f"  the model holds {self.model_bytes / 2**20:.1f} MiB, {self.dense_bytes / 2**20:.1f} MiB "
                         "of it outside compressed layers (embeddings, norms, layers left dense)")
        if self.tied:
            lines.append("  dense weights still held through ties (counted after): "
                         + ", ".join(f"{name} ({other})" for name, other in self.tied.items()))
        if self.skipped:
            lines.append(f"  skipped: {', '.join(self.skipped)}")
        for p in self.unmatched_patterns:
            lines.append(f"  warning: pattern {p!r} matched no linear layer")
        if self.stats is not None:
            lines.append(f"  attention calls so far: {self.stats}")
        return "\n".join(lines)


def start_report(model, framework: str, attention, skipped, unmatched, stats=None) -> OptimizeReport:
    """This call's report. A later optimize() of the same model carries over what the earlier ones
    changed (attention modules, compressed layers and their bytes), so the report stays the
    model's whole story."""
    report = OptimizeReport(framework, attention=attention, skipped=skipped, unmatched_patterns=unmatched, stats=stats)
    previous = getattr(model, "fusedformer_report", None)
    if isinstance(previous, OptimizeReport):
        report.attention = attention if attention is not None else previous.attention
        report.attention_modules = list(previous.attention_modules)
        report.quantized = dict(previous.quantized)
        report.tied = dict(previous.tied)
        report.skipped = [n for n in previous.skipped if n not in skipped] + list(skipped)
        report.bytes_before, report.bytes_after = previous.bytes_before, previous.bytes_after
    return report


def check_arguments(model, attention, skip, module_type, framework: str) -> tuple[str, ...]:
    """Validates optimize()'s arguments; returns ``skip`` as a tuple."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"[optimize] attention must be one of {ATTENTION_MODES}, got {attention!r}")
    if not isinstance(model, module_type):
        raise TypeError(f"[optimize] model must be a {framework} Module, got {type(model).__name__}")
    if isinstance(skip, str):
        return (skip,)
    patterns = tuple(skip) if isinstance(skip, (tuple, list, set, frozenset)) else None
    if patterns is None or not all(isinstance(s, str) for s in patterns):
        raise TypeError(f"[optimize] skip must be a module-name pattern (str) or a sequence of them, got {skip!r}")
    return patterns


def matches(name: str, pattern: str) -> bool:
    """A glob over the full module name, or an exact dotted component ("lm_head", "mlp")."""
    return fnmatch.fnmatchcase(name, pattern) or pattern in name.split(".")


def plan_weights(linears, weights, skip, compressed=()):
    """Which linear gets which scheme.

    ``linears``: (name, module, (out_features, in_features)) for every candidate layer;
    ``compressed``: (name, scheme) of the layers an earlier optimize() compressed, which stay
    as they are (their original weights are gone) with a warning where a pattern asks for
    another scheme. Returns ([(name, module, scheme)], skipped names, patterns that matched
    nothing); raises before anything changes if a layer cannot take its scheme. Warns on
    unmatched patterns.
    """
    from fusedformer import quant

    rules = list(weights.items()) if isinstance(weights, dict) else [("*", weights)]
    for pattern, scheme in rules:
        if not isinstance(pattern, str):
            raise TypeError(f"[optimize] weights' keys must be module-name patterns (str), got {pattern!r}")
        if not quant.is_scheme(scheme):
            raise TypeError(f"[optimize] weights for {pattern!r} must be a fusedformer.quant scheme, got {scheme!r}")
    used, plan, skipped = set(), [], []
    for name, module, shape in linears:
        if any(matches(name, s) for s in skip):
            skipped.append(name)
            used.update(p for p, _ in rules if matches(name, p))  # (matched, and skipped: no typo to warn of)
            continue
        for pattern, scheme in rules:
            if matches(name, pattern):
                used.add(pattern)
                quant.check_compressible(shape, scheme, name=name)
                plan.append((name, module, scheme))
                break
    for name, current in compressed:
        if any(matches(name, s) for s in skip):
            continue
        pattern, scheme = next(((p, sc) for p, sc in rules if matches(name, p)), (None, None))
        if pattern is None:
            continue
        used.add(pattern)
        if scheme != current:
            warnings.warn(f"[optimize] {name} is already compressed ({current!r}) and stays so: its original "
                          f"weights are gone (optimize the uncompressed model for {scheme!r})", stacklevel=3)
    unmatched = [p for p, _ in rules if p not in used]
    for p in unmatched:
        warnings.warn(f"[optimize] weights pattern {p!r} matched no linear layer", stacklevel=3)
    return plan, skipped, unmatched


def weight_holders(named_parameters, plan) -> dict[int, list[str]]:
    """id(weight) of each planned linear -> the names of the parameters outside the plan that
    hold the same weight object (tied weights: swapping the linear does not free it).
    ``named_parameters``: (name, parameter) pairs, duplicates included."""
    planned = {f"{name}.weight" if name else "weight" for name, _, _ in plan}
    holders = {id(linear.weight): [] for _, linear, _ in plan}
    for pname, p in named_parameters:
        if id(p) in holders and pname not in planned:
            holders[id(p)].append(pname)
    return holders


def count_model_bytes(report: OptimizeReport, arrays, compressed_prefixes) -> None:
    """Sets report.model_bytes and dense_bytes from (name, array) pairs of every parameter and
    buffer (each array once: ``nbytes`` and an id), given the paths of the compressed layers."""
    seen, total, dense = set(), 0, 0
    prefixes = tuple(p + "." for p in compressed_prefixes)
    for name, array in arrays:
        if id(array) in seen:
            continue
        seen.add(id(array))
        total += array.nbytes
        if not name.startswith(prefixes):
            dense += array.nbytes
    report.model_bytes, report.dense_bytes = total, dense
