"""Stateful KV-cache export: the K/V caches are Core ML states updated in place.

The design of Apple's "On Device Llama 3.1 with Core ML": the caches are fp16 ``ct.StateType``
buffers [layers, B, Hkv, max_len, D] written with ``slice_update``; ``input_ids`` [B, L] and
``attention_mask`` [B, past + L] have flexible length (``RangeDim``), so one program does the
prefill (L = prompt) and every decode step (L = 1). The number of cached tokens is the mask's
length minus L -- no position input is needed -- and causal attention over the cache is
``ff.sdpa(causal=True)``'s bottom-right alignment. Only the mask's length counts: its values are
not read, so padding is not supported (a batch holds sequences of one length); the interpreter
(verify, greedy_decode) refuses a mask with zeros, which the Core ML program would ignore.

The model takes part through a small protocol (fusedformer's own decoder implements it, and
``hf_decoder_adapter`` adapts Hugging Face causal LMs; export(kv_cache=True) wraps those
automatically):

* ``model.kv_cache_config()`` -> ``{"layers": n, "kv_heads": h, "head_dim": d}``
* ``model(input_ids, kv_cache=cache, start=past)``: each attention layer ``i`` calls
  ``k, v = cache.update(i, k, v, start)`` with its new keys/values [B, Hkv, L, D] (after RoPE at
  positions start .. start + L - 1) and attends over the returned [B, Hkv, start + L, D].

Hugging Face models (transformers 5) need no code of their own: their attention layers already
write K/V through ``past_key_values.update(k, v, layer_idx)`` (the DynamicCache interface) and
attend through transformers' AttentionInterface. The adapter passes a ``Cache`` whose layers write
through the protocol's ``update`` and, for the duration of the call, an attention implementation
that is ``fusedformer::sdpa`` (causal, bottom-right aligned, the module's own scaling and sliding
window) with no mask of transformers' making. Any decoder-only causal LM built that way works
(GPT-2, LLaMA, Mistral, Qwen2, ...); a one-token probe at export checks the layout (every layer
writes K/V of one shape once, and attends through the interface) and names what does not fit.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np

STATE_NAMES = ("k_cache", "v_cache")
# the attention implementation a kv-cache export runs HF models with; deliberately not registered
# as a mask function, so transformers builds no mask (fusedformer::sdpa is causal over the cache)
EXPORT_ATTENTION = "fusedformer_kv_export"


def _torch():
    import torch

    return torch


def _unsupported(model, what: str) -> ValueError:
    return ValueError(f"[export] kv_cache=True: {type(model).__name__} {what}")


# ----------------------------------------------------------------------------------------------
# Hugging Face causal LMs


_attention_calls = 0  # calls of _export_attention, for the probe


def _export_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      sliding_window=None, **kwargs):
    """transformers attention function of kv-cache exports: causal fusedformer::sdpa over the cache."""
    global _attention_calls
    torch = _torch()
    from fusedformer.torch.hf import _UNSUPPORTED_KWARGS

    extra = [k for k in _UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
    if extra:
        raise _unsupported(module, f"passes {extra[0]} to its attention, which fusedformer::sdpa cannot express")
    if is_causal is False or not getattr(module, "is_causal", True):
        raise _unsupported(module, "is not causal self-attention")
    _attention_calls += 1
    out = torch.ops.fusedformer.sdpa(query, key, value, None, True, scaling, sliding_window)
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _protocol_cache_class():
    """transformers.Cache subclass whose layers write K/V through the protocol's ``update``."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    class ProtocolLayer(CacheLayerMixin):
        """One layer: holds nothing itself, the protocol cache (the Core ML states) does."""

        is_sliding = False  # a sliding window is applied by the attention, over the full cache

        def __init__(self, owner, index):
            super().__init__()
            self.owner, self.index, self.is_initialized = owner, index, True

        def lazy_initialization(self, key_states, value_states):
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            return self.owner.kv_cache.update(self.index, key_states, value_states, self.owner.start)

        def get_mask_sizes(self, query_length):
            return self.owner.start + query_length, 0

        def get_seq_length(self):
            return self.owner.start

        def get_max_length(self):
            return -1

    class ProtocolCache(Cache):
        def __init__(self, kv_cache, start, layers: int):
            self.kv_cache, self.start = kv_cache, start
            super().__init__(layers=[ProtocolLayer(self, i) for i in range(layers)])

    return ProtocolCache


class _Recorder:
    """The protocol's cache for the probe: returns the new K/V, records their shapes per layer."""

    def __init__(self):
        self.shapes = {}

    def update(self, layer, k, v, start):
        self.shapes.setdefault(layer, []).append((tuple(k.shape), tuple(v.shape)))
        return k, v


def hf_decoder_adapter(hf_model, batch: int = 1, max_len: int | None = None):
    """The KV-cache protocol over a Hugging Face causal LM (same weights, no copy).

    The model runs its own forward; its attention layers' ``past_key_values.update`` goes to the
    protocol cache and their attention to ``fusedformer::sdpa`` (see the module docstring; the
    model's own mask is not used: an export has no padding). Raises ValueError
    (``[export] kv_cache=True: ...``) for a layout the states cannot hold, and for a ``max_len``
    past the model's ``max_position_embeddings``.
    """
    torch = _torch()
    from transformers import AttentionInterface

    import fusedformer.torch.attention_op  # noqa: F401  (registers the op)

    AttentionInterface.register(EXPORT_ATTENTION, _export_attention)
    config = hf_model.config.get_text_config()
    if getattr(hf_model.config, "is_encoder_decoder", False):
        raise _unsupported(hf_model, "is an encoder-decoder; only decoder-only causal LMs are supported")
    from fusedformer.torch.hf import cache_argument

    cache_arg = cache_argument(hf_model)
    if cache_arg is None:
        raise _unsupported(hf_model, "takes no past_key_values, so it has no K/V cache to make states of")
    if getattr(config, "add_cross_attention", False):
        raise _unsupported(hf_model, "has cross-attention; only decoder-only causal LMs are supported")
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers < 1:
        raise _unsupported(hf_model, "has no config.num_hidden_layers to size the cache states with")
    positions = getattr(config, "max_position_embeddings", None)
    if max_len is not None and isinstance(positions, int) and max_len > positions:
        raise _unsupported(hf_model, f"has max_position_embeddings={positions}, fewer than max_len={max_len}")

    @contextlib.contextmanager
    def export_attention():
        old = hf_model.config._attn_implementation
        hf_model.set_attn_implementation(EXPORT_ATTENTION)
        try:
            if hf_model.config._attn_implementation != EXPORT_ATTENTION:
                raise _unsupported(hf_model, "cannot switch its attention implementation (transformers' "
                                             "AttentionInterface), so its K/V cannot become Core ML states")
            yield
        finally:
            hf_model.set_attn_implementation(old)

    class _Adapter(torch.nn.Module):
        def __init__(self, cache_config):
            super().__init__()
            self.hf = hf_model
            self.cache_config = cache_config

        def kv_cache_config(self):
            return dict(self.cache_config)

        def forward(self, input_ids, kv_cache=None, start=0):
            cache = None if kv_cache is None else _protocol_cache_class()(kv_cache, start, layers)
            positions = torch.arange(start, start + input_ids.shape[1]).unsqueeze(0)
            with export_attention():
                out = self.hf(input_ids=input_ids, position_ids=positions, use_cache=cache is not None,
                              **{cache_arg: cache})
            logits = getattr(out, "logits", None)
            if logits is None:
                raise _unsupported(self.hf, "returns no logits: pass the causal LM (e.g. GPT2LMHeadModel), "
                                            "not its base model")
            return logits

    # probe: one token through a recording cache tells the state layout (or what does not fit)
    global _attention_calls
    recorder, calls = _Recorder(), _attention_calls
    adapter = _Adapter({})
    with torch.no_grad():
        adapter.eval()(torch.zeros(batch, 1, dtype=torch.long), kv_cache=recorder, start=0)
    calls = _attention_calls - calls
    shapes = recorder.shapes
    if sorted(shapes) != list(range(layers)) or any(len(s) != 1 for s in shapes.values()):
        written = {i: len(s) for i, s in sorted(shapes.items())}
        raise _unsupported(hf_model, f"wrote K/V to its past_key_values cache as {{layer: times}} = {written}; "
                                     f"a stateful export needs each of its {layers} layers to write once")
    if any(len(k) != 4 or len(v) != 4 for ((k, v),) in shapes.values()):
        raise _unsupported(hf_model, f"wrote K/V of shapes {shapes[0][0]}; the states need [B, heads, L, head_dim]")
    heads_dims = {i: ((k[1], k[3]), (v[1], v[3])) for i, ((k, v),) in shapes.items()}
    if len({hd for pair in heads_dims.values() for hd in pair}) != 1:
        raise _unsupported(hf_model, f"caches K/V of different (heads, head_dim) per layer {{layer: (K, V)}} = "
                                     f"{heads_dims}; the states hold one shape for every layer, K and V alike")
    kv_heads, head_dim = heads_dims[0][0]
    if calls != layers:
        raise _unsupported(hf_model, f"ran {calls} of its {layers} attention layers through transformers' "
                                     f"AttentionInterface; every layer must (its attention becomes fusedformer::sdpa)")
    adapter.cache_config.update(layers=layers, kv_heads=kv_heads, head_dim=head_dim)
    return adapter


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


# the inputs' descriptions in the package (Xcode and MLModel.input_description show them)
INPUT_DESCRIPTIONS = {
    "input_ids": "new tokens [batch, L]: the prompt, then one token per step",
    "attention_mask": "all ones, [batch, cached + L]: only its length counts (cached tokens = its length - L); "
                      "its values are ignored, padding is not supported; cached + L <= max_len",
}


def export_stateful(model, example_inputs, path, *, attention="fused", target="iOS18", precision="fp16",
                    max_len: int = 256):
    """Exports ``model`` (the kv-cache protocol above) as a stateful decoder at ``path``.

    ``example_inputs``: input_ids [B, L] (tensor, or {"input_ids": ...}); the export accepts any
    L in 1..max_len and any total length up to max_len. Its ``attention_mask`` input is all ones
    of length cached + L: only the length is read, padding is not supported.
    """
    import warnings

    import coremltools as ct
    import torch

    from fusedformer.coreml.export import convert, finish

    ids = example_inputs["input_ids"] if isinstance(example_inputs, dict) else (
        example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
    )
    batch, length = ids.shape
    if not hasattr(model, "kv_cache_config"):
        from fusedformer.torch.hf import is_hf_model

        if not is_hf_model(model):
            raise TypeError(
                f"[export] kv_cache=True needs a Hugging Face causal LM or a decoder with kv_cache_config() and "
                f"forward(input_ids, kv_cache=, start=) (see fusedformer.coreml.kv_cache); "
                f"{type(model).__name__} is neither"
            )
        model = hf_decoder_adapter(model.eval(), batch=batch, max_len=max_len)
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
    for name, text in INPUT_DESCRIPTIONS.items():
        mlmodel.input_description[name] = text
    info = [f"stateful KV cache: {', '.join(STATE_NAMES)} fp16 {list(wrapper.k_cache.shape)}"]
    return finish(mlmodel, path, attention, target, precision, notes, info)


# ----------------------------------------------------------------------------------------------
# running a stateful export (MIL interpreter)


def is_stateful_decoder(program) -> bool:
    """Whether an interpreter Program has the layout export(kv_cache=True) writes."""
    return program.state_names == list(STATE_NAMES) and program.input_names == ["input_ids", "attention_mask"]


def cache_length(program) -> int:
    """max_len of a stateful export: the length axis of its cache states."""
    return int(program.function.inputs[STATE_NAMES[0]].sym_type.wrapped_type().get_shape()[3])


def check_decoder_inputs(input_ids, attention_mask, max_len: int) -> None:
    """[verify] errors for the inputs a stateful export takes without complaint but mishandles:
    a mask with zeros (ignored, so padding would silently give unpadded results), a mask shorter
    than input_ids (a negative cache position), more tokens than the cache holds (dropped)."""
    ids_len, mask_len = np.shape(input_ids)[-1], np.shape(attention_mask)[-1]
    if np.any(np.asarray(attention_mask) != 1):
        raise ValueError("[verify] attention_mask has values other than 1: padding is not supported by the stateful "
                         "(kv_cache=True) export, which reads only the mask's length (cached + new tokens)")
    if mask_len < ids_len:
        raise ValueError(f"[verify] attention_mask has length {mask_len}, shorter than input_ids ({ids_len}): its "
                         f"length must be the cached tokens plus the new ones")
    if mask_len > max_len:
        raise ValueError(f"[verify] attention_mask has length {mask_len}: cached + new tokens exceed the cache's "
                         f"max_len={max_len}")


def greedy_decode(program, prompt_ids, steps: int):
    """Greedy tokens from a stateful export run by the MIL interpreter (prefill, then 1 token/step).

    The prompt and the tokens fed back must fit the cache: prompt + steps - 1 <= max_len (the last
    token is returned, not fed).
    """
    from fusedformer.coreml.interpreter import Program

    program = program if isinstance(program, Program) else Program.load(program)
    if not is_stateful_decoder(program):
        raise ValueError(f"[verify] greedy_decode needs a kv_cache=True export (states {list(STATE_NAMES)}, inputs "
                         f"input_ids and attention_mask); this one has states {program.state_names}, inputs "
                         f"{program.input_names}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"[verify] greedy_decode: steps must be an int >= 1, got {steps!r}")
    ids = np.asarray(prompt_ids, dtype=np.int32)
    if ids.ndim != 2 or ids.shape[1] < 1:
        raise ValueError(f"[verify] greedy_decode: prompt_ids must be [batch, tokens] with tokens >= 1, got shape "
                         f"{ids.shape}")
    max_len = cache_length(program)
    if ids.shape[1] + steps - 1 > max_len:
        raise ValueError(f"[verify] greedy_decode: a prompt of {ids.shape[1]} tokens and {steps} steps need "
                         f"{ids.shape[1] + steps - 1} cache positions; the export's max_len is {max_len}")
    state = program.make_state()
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
