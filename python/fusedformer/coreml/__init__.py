"""Core ML export of fusedformer models and a MIL reference interpreter to verify them anywhere.

Importing this module imports coremltools (and torch when exporting).

    ff.coreml.export(model, example_inputs, "model.mlpackage", attention="fused")
    ff.coreml.verify("model.mlpackage", {"input_ids": ids})      # -> {"logits": ndarray}
"""

from __future__ import annotations

import importlib

# public name -> module (inside fusedformer.coreml) that defines it
_EXPORTS = {
    "verify": "interpreter",
    "Program": "interpreter",
    "UnsupportedOpError": "interpreter",
    "export": "export",
    "ExportResult": "export",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"fusedformer.coreml.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fusedformer.coreml' has no attribute {name!r}")
