"""ff.coreml.export: a torch model -> a saved .mlpackage whose attention and weights are ours.

    mlmodel = ff.coreml.export(model, {"input_ids": ids}, "lm.mlpackage", attention="fused")
    ff.coreml.verify("lm.mlpackage", {"input_ids": ids})["logits"]

Inputs are named after the forward's arguments, outputs after what forward returns (the keys of
a dict / ModelOutput; a lone tensor is ``logits`` when the model takes ``input_ids``, else
``output``). What the export decided (attention form, fallbacks) is written to the model's
metadata under ``fusedformer.*`` and warned about. The attention recorded is what the program
holds: "fused" only where it has scaled_dot_product_attention ops (a model's attention becomes
one only through fusedformer's sdpa op, e.g. after ``ff.torch.optimize(model, attention="fused")``).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import sys
import warnings
from dataclasses import dataclass

import numpy as np

PRECISIONS = ("fp16", "fp32")
ATTENTIONS = ("fused", "unfused")


class ExportWarning(UserWarning):
    """The export had to deviate from what was asked (e.g. unfused attention below iOS18)."""


@dataclass
class ExportResult:
    """What export() did; also stored in the package's user-defined metadata."""

    attention: str  # what the program holds: "fused", "unfused" (softmax, no fused op) or "none"
    target: str
    precision: str
    notes: list
    fused_attention_ops: int = 0  # scaled_dot_product_attention ops in the program

    def to_metadata(self) -> dict:
        return {
            "fusedformer.attention": self.attention,
            "fusedformer.fused_attention_ops": str(self.fused_attention_ops),
            "fusedformer.target": self.target,
            "fusedformer.precision": self.precision,
            "fusedformer.notes": "; ".join(self.notes),
        }


# ----------------------------------------------------------------------------------------------
# naming inputs and outputs


def name_inputs(model, example_inputs) -> dict:
    """{forward argument name: tensor} from a dict, a tuple or a single tensor."""
    import torch

    if isinstance(example_inputs, dict):
        return dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    params = [
        p.name for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(example_inputs) > len(params):
        raise ValueError(f"[export] {len(example_inputs)} example inputs for forward({', '.join(params)})")
    return dict(zip(params, example_inputs))


def _flatten_outputs(out):
    """[(name or None, tensor)] of what forward returned."""
    import torch

    if isinstance(out, torch.Tensor):
        return [(None, out)]
    if isinstance(out, dict) or hasattr(out, "keys"):
        return [(k, v) for k, v in out.items() if isinstance(v, torch.Tensor)]
    if isinstance(out, (tuple, list)):
        return [(None, v) for v in out if isinstance(v, torch.Tensor)]
    raise TypeError(f"[export] cannot export a forward that returns {type(out).__name__}")


def name_outputs(flat, input_names) -> list[str]:
    if len(flat) == 1 and flat[0][0] is None:
        return ["logits" if "input_ids" in input_names else "output"]
    return [k if k is not None else f"output_{i}" for i, (k, _) in enumerate(flat)]


def flat_module(model, input_names, static_kwargs):
    """A module for tracing: positional tensors in (named ``input_names``), a tuple of tensors out."""
    import torch

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *args):
            out = self.model(**dict(zip(input_names, args)), **static_kwargs)
            return tuple(t for _, t in _flatten_outputs(out))

    return Flat().eval()


# ----------------------------------------------------------------------------------------------
# conversion


def _checked_flexible(flexible, named: dict) -> dict:
    """``flexible`` ({input name: {axis: (lo, hi)}}) checked against the traced inputs: an unknown
    name or an axis / range the input cannot have is an [export] error, not a static export."""
    if not flexible:
        return {}
    if not isinstance(flexible, dict):
        raise TypeError(f"[export] flexible must be {{input name: {{axis: (lo, hi)}}}}, got {type(flexible).__name__}")
    for name, axes in flexible.items():
        if name not in named:
            raise ValueError(f"[export] flexible names input {name!r}; the inputs are {list(named)}")
        rank = named[name].dim()
        for axis, bounds in dict(axes).items():
            if isinstance(axis, bool) or not isinstance(axis, int) or not -rank <= axis < rank:
                raise ValueError(f"[export] flexible axis {axis!r} of input {name!r} (rank {rank}) does not exist")
            lo, hi = bounds
            size = named[name].shape[axis]
            if not 1 <= lo <= size <= hi:
                raise ValueError(f"[export] flexible range {(lo, hi)} of input {name!r} axis {axis} must satisfy "
                                 f"1 <= lo <= {size} (the example's size) <= hi")
    return flexible


def _tensor_type(ct, name, tensor, flexible=None):
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"[export] example input {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype == torch.bool:
        raise TypeError(f"[export] input {name!r} is bool; Core ML inputs are int32/fp16/fp32: pass it as int")
    dtype = np.int32 if tensor.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8) else np.float32
    shape = list(tensor.shape)
    if flexible:
        for axis, (lo, hi) in flexible.items():
            shape[axis] = ct.RangeDim(lower_bound=lo, upper_bound=hi, default=int(tensor.shape[axis]))
    return ct.TensorType(name=name, shape=ct.Shape(shape) if flexible else tuple(shape), dtype=dtype)


def resolve_target(target):
    import coremltools as ct

    if not isinstance(target, str):
        return target
    try:
        return getattr(ct.target, target)
    except AttributeError:
        raise ValueError(f"[export] unknown target {target!r} (e.g. 'iOS18', 'macOS15')") from None


def target_name(target) -> str:
    """'iOS18' for "iOS18" or ct.target.iOS18 (an enum alias such as macOS15 names its iOS twin)."""
    return target if isinstance(target, str) else getattr(target, "name", str(target))


def check_options(attention, target, precision):
    import coremltools as ct

    if attention not in ATTENTIONS:
        raise ValueError(f"[export] attention must be one of {ATTENTIONS}, got {attention!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"[export] precision must be one of {PRECISIONS}, got {precision!r}")
    if resolve_target(target) < ct.target.iOS15:
        raise ValueError(f"[export] target {target_name(target)} is too old: an ML program needs iOS15/macOS12 "
                         "or later")


def check_target_supports(target, *, kv_cache=False, adapters=False, compressed=False):
    """[export] ValueError, before any work, where ``target`` is older than iOS18 and the export
    needs iOS18 features (conversion would fail late, or silently raise the package's version)."""
    import coremltools as ct

    needs = [what for what, wanted in (
        ("kv_cache=True (its K/V caches are Core ML states)", kv_cache),
        ("adapters (a multifunction package)", adapters),
        ("compressed weights (constexpr_* ops; the model has QuantizedLinear layers)", compressed),
    ) if wanted]
    if needs and resolve_target(target) < ct.target.iOS18:
        raise ValueError(f"[export] target {target_name(target)}: {' and '.join(needs)} "
                         f"{'needs' if len(needs) == 1 else 'need'} iOS18/macOS15 or later; pass target='iOS18' "
                         "(only plain exports, with unfused attention, run on older targets)")


def has_compressed_weights(model) -> bool:
    """Whether ``model`` holds fusedformer compressed layers (they convert to iOS18 constexpr ops)."""
    from fusedformer.torch.quantized_linear import QuantizedLinear

    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def convert(traced, inputs, output_names, *, attention, target, precision, states=None, **lowering_kwargs):
    """ct.convert with our lowerings registered and the options applied; -> (MLModel, notes)."""
    import coremltools as ct

    from fusedformer.coreml import lowering

    check_options(attention, target, precision)
    with lowering.lowering_options(attention=attention, weight_dtype=precision, **lowering_kwargs) as options:
        mlmodel = ct.convert(
            traced,
            inputs=inputs,
            outputs=[ct.TensorType(name=n) for n in output_names],
            states=states,
            convert_to="mlprogram",
            minimum_deployment_target=resolve_target(target),
            compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
            skip_model_load=True,
        )
    return mlmodel, list(options.notes)


def package_path(path) -> str:
    """The package ``path`` names: with the ``.mlpackage`` suffix coremltools adds where it is
    missing. A ValueError where something other than a Core ML package (a directory holding a
    Manifest.json) is there already: export replaces an earlier package, never anything else."""
    path = os.fspath(path).rstrip(os.sep) or os.sep  # (a shell's completion of a package ends in /)
    if not path.endswith(".mlpackage"):
        path += ".mlpackage"
    if os.path.lexists(path) and not (os.path.isdir(path) and os.path.isfile(os.path.join(path, "Manifest.json"))):
        raise ValueError(f"[export] {path} exists and is not a Core ML package; export writes a new .mlpackage "
                         "or replaces one, nothing else (choose another path)")
    return path


def save(mlmodel, path, result: ExportResult):
    for key, value in result.to_metadata().items():
        mlmodel.user_defined_metadata[key] = value
    path = package_path(path)
    if os.path.exists(path):  # an earlier package (package_path refuses anything else)
        shutil.rmtree(path)
    mlmodel.save(path)
    mlmodel.fusedformer = result
    mlmodel.package_path = path
    return mlmodel


def count_ops(mlmodel, op_type: str) -> int:
    """How many ``op_type`` ops the converted program runs (every function)."""
    from fusedformer.coreml.interpreter import _load_mil_program

    program, _ = _load_mil_program(mlmodel)
    return sum(op.op_type == op_type for f in program.functions.values() for op in f.operations)


def attention_form(mlmodel) -> tuple[str, int]:
    """(form, fused op count) of the converted program: "fused" where it has
    scaled_dot_product_attention ops, "unfused" where it has softmax ops only (attention that did
    not go through fusedformer's sdpa op, or lowered unfused), "none" where it has neither."""
    fused = count_ops(mlmodel, "scaled_dot_product_attention")
    if fused:
        return "fused", fused
    return ("unfused" if count_ops(mlmodel, "softmax") else "none"), 0


def finish(mlmodel, path, attention, target, precision, fallbacks, info=()):
    """Records what was done (``fallbacks`` are deviations from the request and are warned)."""
    fallbacks = list(fallbacks)
    form, fused = attention_form(mlmodel)
    if attention == "fused" and form == "unfused" and not any("unfused" in n for n in fallbacks):
        fallbacks.append("attention='fused' but the program has softmax and no scaled_dot_product_attention op: "
                         "the model's attention does not call fusedformer's sdpa op (ff.torch.optimize(model, "
                         "attention='fused') swaps it in); recorded as unfused")
    result = ExportResult(attention=form, target=target_name(target), precision=precision,
                          notes=fallbacks + list(info), fused_attention_ops=fused)
    for note in fallbacks:
        warnings.warn(f"[export] {note}", ExportWarning, stacklevel=3)
    return save(mlmodel, path, result)


@contextlib.contextmanager
def _kv_heads_repeated_for_sdpa():
    """Stock Hugging Face attention ("sdpa") with fewer kv heads than query heads calls torch's
    op with enable_gqa=True where it has no mask, which coremltools' converter ignores (a shape
    error, "Incompatible dim 1 in shapes (1, 4) vs. (1, 2)"): while tracing, transformers is
    told not to, and repeats K/V itself as it does for masked calls. (Models through
    ff.torch.optimize call fusedformer's op, which the lowering takes with its own GQA.)"""
    module = sys.modules.get("transformers.integrations.sdpa_attention")
    if module is None or not hasattr(module, "use_gqa_in_sdpa"):
        yield
        return
    original = module.use_gqa_in_sdpa
    module.use_gqa_in_sdpa = lambda *args, **kwargs: False
    try:
        yield
    finally:
        module.use_gqa_in_sdpa = original


def export(model, example_inputs, path, *, attention="fused", target="iOS18", precision="fp16",
           kv_cache=False, adapters=None, flexible=None, static_kwargs=None, max_len=256):
    """Traces ``model`` on ``example_inputs`` and converts it to a Core ML ML program at ``path``.

    attention: "fused" (iOS18 scaled_dot_product_attention) or "unfused" (matmul/softmax/matmul);
      targets below iOS18 always get "unfused" (recorded in ``mlmodel.fusedformer.notes`` and the
      package metadata, and warned), and so does a model whose attention does not call
      fusedformer's sdpa op (warned; ``.fusedformer.fused_attention_ops`` counts the fused ops).
    target: "iOS18" (default), another ``ct.target`` name or the enum itself; kv_cache, adapters
      and compressed weights (QuantizedLinear layers) need iOS18/macOS15 or later, and an older
      target is refused before any work; iOS15 is the oldest an ML program runs on.
    precision: "fp16" or "fp32" compute precision.
    kv_cache: export a stateful decoder: a Hugging Face causal LM (GPT-2, LLaMA, ... : any whose
      attention layers use transformers' Cache and AttentionInterface) or a model following the
      protocol in kv_cache.py; ``max_len`` is the cache length, inputs take any length up to it.
      Its inputs are input_ids and attention_mask, all ones of length cached + new tokens: only
      the mask's length is read, padding is not supported.
    adapters: {name: state_dict} -> one multifunction package (see multifunction.py).
    flexible: {input name: {axis: (lo, hi)}} flexible input dims (RangeDim).
    static_kwargs: extra keyword arguments passed to forward while tracing (e.g. use_cache=False).
    Returns the MLModel (``.fusedformer`` holds the ExportResult, ``.package_path`` the path
    written: ``path``, with ``.mlpackage`` appended where it lacks it). An existing package there
    is replaced; anything else there is refused, before any work.
    """
    import torch

    import coremltools as ct

    check_options(attention, target, precision)
    check_target_supports(target, kv_cache=kv_cache, adapters=bool(adapters), compressed=has_compressed_weights(model))
    path = package_path(path)
    if kv_cache and flexible:
        raise ValueError("[export] flexible does not apply with kv_cache: the stateful decoder takes any input "
                         "length up to max_len already")
    if adapters and kv_cache:
        raise ValueError("[export] adapters and kv_cache together are not supported yet: export the stateful "
                         "decoder and the adapters' functions separately")
    if adapters:
        from fusedformer.coreml.multifunction import export_multifunction

        return export_multifunction(model, example_inputs, path, adapters=adapters, attention=attention,
                                    target=target, precision=precision, flexible=flexible,
                                    static_kwargs=static_kwargs)
    if kv_cache:
        from fusedformer.coreml.kv_cache import export_stateful

        return export_stateful(model, example_inputs, path, attention=attention, target=target,
                               precision=precision, max_len=max_len)

    named = name_inputs(model, example_inputs)
    flexible = _checked_flexible(flexible, named)
    inputs = [_tensor_type(ct, n, t, flexible.get(n)) for n, t in named.items()]
    static_kwargs = dict(static_kwargs or {})
    model = model.eval()
    with torch.no_grad():
        flat = _flatten_outputs(model(**named, **static_kwargs))
    output_names = name_outputs(flat, list(named))
    wrapper = flat_module(model, list(named), static_kwargs)
    with torch.no_grad(), warnings.catch_warnings(), _kv_heads_repeated_for_sdpa():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace: coremltools needs it
        traced = torch.jit.trace(wrapper, tuple(named.values()), check_trace=False, strict=False)
    mlmodel, notes = convert(traced, inputs, output_names, attention=attention, target=target,
                             precision=precision)
    return finish(mlmodel, path, attention, target, precision, notes)
