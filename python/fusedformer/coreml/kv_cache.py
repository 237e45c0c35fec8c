"""Stateful KV-cache export: the K/V caches are Core ML states updated in place.

The design of Apple's "On Device Llama 3.1 with Core ML": the caches are fp16 ``ct.StateType``
buffers [layers, B, Hkv, max_len, D] written with ``slice_update``; ``input_ids`` [B, L] and
``attention_mask`` [B, past + L] have flexible length (``RangeDim``), so one program does the
prefill (L = prompt) and every decode step (L = 1). The number of cached tokens is the mask's
length minus L -- no position input is needed -- and causal attention over the cache is
``ff.sdpa(causal=True)``'s bottom-right alignment.

The model takes part through a small protocol (fusedformer's own decoder implements it, and
``llama_family_adapter`` adapts Hugging Face LLaMA-family causal LMs: Llama, Mistral, Qwen2, ...;
export(kv_cache=True) wraps those automatically):

* ``model.kv_cache_config()`` -> ``{"layers": n, "kv_heads": h, "head_dim": d}``
* ``model(input_ids, kv_cache=cache, start=past)``: each attention layer ``i`` calls
  ``k, v = cache.update(i, k, v, start)`` with its new keys/values [B, Hkv, L, D] (after RoPE at
  positions start .. start + L - 1) and attends over the returned [B, Hkv, start + L, D].
"""

from __future__ import annotations

import numpy as np

STATE_NAMES = ("k_cache", "v_cache")


def _torch():
    import torch

    return torch


def llama_family_adapter(hf_model):
    """The KV-cache protocol over a Hugging Face LLaMA-family causal LM (same weights, no copy).

    It runs the model's own modules (embeddings, RMSNorms, projections, rotary embedding, MLP,
    lm_head) layer by layer, with the K/V of each layer going through the cache and attention
    through ``fusedformer::sdpa`` (causal, bottom-right aligned, the module's own scaling).
    """
    torch = _torch()
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    import fusedformer.torch.attention_op  # noqa: F401  (registers the op)

    class _Adapter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hf = hf_model

        def kv_cache_config(self):
            attn = self.hf.model.layers[0].self_attn
            config = self.hf.config
            return {"layers": len(self.hf.model.layers), "kv_heads": config.num_key_value_heads,
                    "head_dim": attn.head_dim}

        def _attention(self, attn, h, cos, sin, kv_cache, layer, start):
            b, length, _ = h.shape
            shape = (b, length, -1, attn.head_dim)
            q = attn.q_proj(h).view(shape).transpose(1, 2)
            k = attn.k_proj(h).view(shape).transpose(1, 2)
            v = attn.v_proj(h).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            if kv_cache is not None:
                k, v = kv_cache.update(layer, k, v, start)
            out = torch.ops.fusedformer.sdpa(q, k, v, None, True, attn.scaling, None)
            return attn.o_proj(out.transpose(1, 2).reshape(b, length, -1))

        def forward(self, input_ids, kv_cache=None, start=0):
            inner = self.hf.model
            x = inner.embed_tokens(input_ids)
            positions = torch.arange(start, start + input_ids.shape[1]).unsqueeze(0)
            cos, sin = inner.rotary_emb(x, positions)
            for i, layer in enumerate(inner.layers):
                x = x + self._attention(layer.self_attn, layer.input_layernorm(x), cos, sin, kv_cache, i, start)
                x = x + layer.mlp(layer.post_attention_layernorm(x))
            return self.hf.lm_head(inner.norm(x))

    return _Adapter().eval()


def is_llama_family(model) -> bool:
    """A Hugging Face causal LM with LLaMA's layout (model.layers[i].self_attn.q_proj, rotary_emb)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return (hasattr(model, "lm_head") and layers is not None and len(layers) > 0
            and hasattr(layers[0], "self_attn") and hasattr(layers[0].self_attn, "q_proj")
            and hasattr(inner, "rotary_emb") and hasattr(layers[0], "mlp"))


def stateful_decoder(model, max_len: int, batch: int = 1):
    """Wraps a protocol model: forward(input_ids, attention_mask) -> logits, caches as buffers."""
    torch = _torch()

    class _StatefulDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            config = model.kv_cache_config()
            self.model = model
            self.max_len = max_len
            shape = (config["layers"], batch, config["kv_heads"], max_len, config["head_dim"])
            self.register_buffer("k_cache", torch.zeros(shape, dtype=torch.float16))
            self.register_buffer("v_cache", torch.zeros(shape, dtype=torch.float16))

        def update(self, layer: int, k, v, start):
            end = start + k.shape[2]
            self.k_cache[layer, :, :, start:end] = k.to(torch.float16)
            self.v_cache[layer, :, :, start:end] = v.to(torch.float16)
            return (self.k_cache[layer, :, :, :end].to(k.dtype), self.v_cache[layer, :, :, :end].to(v.dtype))

        def forward(self, input_ids, attention_mask):
            start = attention_mask.shape[-1] - input_ids.shape[-1]
            return self.model(input_ids, kv_cache=self, start=start)

        def reset(self):
            self.k_cache.zero_()
            self.v_cache.zero_()

    return _StatefulDecoder().eval()


def export_stateful(model, example_inputs, path, *, attention="fused", target="iOS18", precision="fp16",
                    max_len: int = 256):
    """Exports ``model`` (the kv-cache protocol above) as a stateful decoder at ``path``.

    ``example_inputs``: input_ids [B, L] (tensor, or {"input_ids": ...}); the export accepts any
    L in 1..max_len and any total length up to max_len.
    """
    import warnings

    import coremltools as ct
    import torch

    from fusedformer.coreml.export import convert, finish

    if not hasattr(model, "kv_cache_config") and is_llama_family(model):
        model = llama_family_adapter(model)
    if not hasattr(model, "kv_cache_config"):
        raise TypeError(
            f"[export] kv_cache=True needs a decoder with kv_cache_config() and forward(input_ids, "
            f"kv_cache=, start=) (see fusedformer.coreml.kv_cache); {type(model).__name__} has none"
        )
    ids = example_inputs["input_ids"] if isinstance(example_inputs, dict) else (
        example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
    )
    batch, length = ids.shape
    if length > max_len:
        raise ValueError(f"[export] example input_ids has {length} tokens, more than max_len={max_len}")
    wrapper = stateful_decoder(model.eval(), max_len=max_len, batch=batch)
    mask = torch.ones(batch, length, dtype=torch.int32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(wrapper, (ids, mask), check_trace=False)
    wrapper.reset()
    cache_type = ct.TensorType(shape=tuple(wrapper.k_cache.shape), dtype=np.float16)
    states = [ct.StateType(wrapped_type=cache_type, name=n) for n in STATE_NAMES]
    inputs = [
        ct.TensorType(name="input_ids", shape=(batch, ct.RangeDim(1, max_len, default=length)), dtype=np.int32),
        ct.TensorType(name="attention_mask", shape=(batch, ct.RangeDim(1, max_len, default=length)), dtype=np.int32),
    ]
    mlmodel, notes = convert(traced, inputs, ["logits"], attention=attention, target=target,
                                     precision=precision, states=states, queries_within_keys=True)
    info = [f"stateful KV cache: {', '.join(STATE_NAMES)} fp16 {list(wrapper.k_cache.shape)}"]
    return finish(mlmodel, path, attention, target, precision, notes, info)


def greedy_decode(program, prompt_ids, steps: int):
    """Greedy tokens from a stateful export run by the MIL interpreter (prefill, then 1 token/step)."""
    from fusedformer.coreml.interpreter import Program

    program = program if isinstance(program, Program) else Program.load(program)
    state = program.make_state()
    ids = np.asarray(prompt_ids, dtype=np.int32)
    total = ids.shape[1]
    tokens = []
    step_ids = ids
    for _ in range(steps):
        logits = program.predict(
            {"input_ids": step_ids, "attention_mask": np.ones((ids.shape[0], total), np.int32)}, state=state
        )["logits"]
        token = logits[:, -1].argmax(-1).astype(np.int32)
        tokens.append(token)
        step_ids = token[:, None]
        total += 1
    return np.stack(tokens, axis=1)
