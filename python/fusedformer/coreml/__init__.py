"""Core ML export of fusedformer models and a MIL reference interpreter to verify them anywhere.

Importing this module imports coremltools (and torch when exporting).

    ff.coreml.export(model, example_inputs, "model.mlpackage", attention="fused")
    ff.coreml.verify("model.mlpackage", {"input_ids": ids})      # -> {"logits": ndarray}

    ff.coreml.export(model, ids, "lm.mlpackage", kv_cache=True)     # K/V caches as Core ML states
    ff.coreml.verify("lm.mlpackage", {"input_ids": ids, "attention_mask": np.ones(ids.shape, np.int32)})
    #   (a prefill on fresh states; pass state=Program.load(path).make_state() to decode on with it)
    ff.coreml.greedy_decode("lm.mlpackage", prompt_ids, steps=16)   # decode through the interpreter
    ff.coreml.export(model, ids, "multi.mlpackage", adapters={"chat": state_dict})
    ff.coreml.verify("multi.mlpackage", {"input_ids": ids}, function_name="chat")

Modules: lowering (torch op -> MIL translations), weights (compressed constants), export,
kv_cache (stateful decoders), multifunction (adapters), interpreter (MIL in numpy), cli.
"""

from __future__ import annotations

from fusedformer._lazy import lazy_getattr

# public name -> module (inside fusedformer.coreml) that defines it
_EXPORTS = {
    "verify": "interpreter",
    "Program": "interpreter",
    "UnsupportedOpError": "interpreter",
    "export": "export",
    "ExportResult": "export",
    "greedy_decode": "kv_cache",
}

__getattr__ = lazy_getattr(__name__, _EXPORTS)
