"""Multifunction adapters: one .mlpackage, a function per adapter over one deduplicated base.

``export(model, inputs, path, adapters={"chat": sd1, "code": sd2})`` exports the base model as
function ``main`` and, for each adapter, the model with that adapter's tensors loaded (a LoRA's
A/B matrices, or any subset of the weights) as a function of the adapter's name. coremltools'
``save_multifunction`` deduplicates the constants the functions share, so the package weighs
about one model plus the adapters, not N models. A multifunction package needs iOS18/macOS15
(export refuses an older target up front).

    ff.coreml.verify(path, inputs, function_name="chat")
"""

from __future__ import annotations

import os
import tempfile

BASE_FUNCTION = "main"


def _check_adapter(model, name, state_dict):
    if name == BASE_FUNCTION:
        raise ValueError(f"[export] adapter name {BASE_FUNCTION!r} is reserved for the base model")
    if not name.isidentifier():
        raise ValueError(f"[export] adapter name {name!r} must be an identifier (it names a Core ML function)")
    params = model.state_dict()
    unknown = [k for k in state_dict if k not in params]
    if unknown:
        raise ValueError(f"[export] adapter {name!r} has tensors the model lacks: {unknown[:5]}")
    wrong = [k for k, v in state_dict.items() if tuple(v.shape) != tuple(params[k].shape)]
    if wrong:
        raise ValueError(f"[export] adapter {name!r} has tensors of the wrong shape: {wrong[:5]}")


def export_multifunction(model, example_inputs, path, *, adapters: dict, **options):
    """Exports the base and each adapter, then merges them into one multifunction package."""
    import coremltools as ct
    import torch

    from fusedformer.coreml.export import export, save, ExportResult

    for name, state_dict in adapters.items():
        _check_adapter(model, name, state_dict)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results = {}
    with tempfile.TemporaryDirectory(prefix="ff-multifunction-") as tmp:
        try:
            for name, state_dict in [(BASE_FUNCTION, {})] + list(adapters.items()):
                with torch.no_grad():
                    model.load_state_dict({**base, **state_dict})
                part = os.path.join(tmp, f"{name}.mlpackage")
                results[name] = export(model, example_inputs, part, **options).fusedformer
        finally:
            with torch.no_grad():
                model.load_state_dict(base)
        desc = ct.utils.MultiFunctionDescriptor()
        for name in results:
            desc.add_function(os.path.join(tmp, f"{name}.mlpackage"), src_function_name="main",
                              target_function_name=name)
        desc.default_function_name = BASE_FUNCTION
        merged = os.path.join(tmp, "merged.mlpackage")
        ct.utils.save_multifunction(desc, merged)
        mlmodel = ct.models.MLModel(merged, skip_model_load=True)
        first = results[BASE_FUNCTION]
        result = ExportResult(attention=first.attention, target=first.target, precision=first.precision,
                              notes=first.notes + [f"functions: {', '.join(results)}"],
                              fused_attention_ops=sum(r.fused_attention_ops for r in results.values()))
        path = save(mlmodel, path, result).package_path
    # reopen from its final place: the merged model's weights lived in the temporary directory
    mlmodel = ct.models.MLModel(path, skip_model_load=True)
    mlmodel.fusedformer = result
    mlmodel.package_path = path
    return mlmodel


def package_size(path) -> int:
    """Bytes on disk of a .mlpackage (or any file/directory)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def weights_size(path) -> int:
    """Bytes of a .mlpackage's weight blobs (without the program text, which is per function)."""
    return package_size(os.path.join(os.fspath(path), "Data", "com.apple.CoreML", "weights"))
