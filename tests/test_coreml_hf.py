"""Hugging Face models through ff.torch.optimize -> Core ML -> the MIL interpreter."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tests.conftest import require

pytestmark = [pytest.mark.coreml, pytest.mark.hf]

ct = require("coremltools")
torch = require("torch")
transformers = require("transformers")

from tests.coreml_models import psnr  # noqa: E402

import fusedformer as ff  # noqa: E402


def _inventory(mlmodel):
    return ff.coreml.Program.load(mlmodel).op_types()


@pytest.mark.parametrize("attention", ["fused", pytest.param("unfused", marks=pytest.mark.slow)])
def test_gpt2(attention, tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 100, (1, 7))
    with torch.no_grad():
        expected = model(ids).logits.numpy()  # stock attention
    ff.torch.optimize(model, attention="fused")
    mlmodel = ff.coreml.export(model, {"input_ids": ids}, tmp_path / "gpt2.mlpackage", attention=attention,
                               precision="fp32", static_kwargs={"use_cache": False})
    assert model.fusedformer_report.stats.fused > 0  # the traced attention was ours
    ops = _inventory(mlmodel)
    fused = ops["scaled_dot_product_attention"]
    assert (fused, ops["softmax"]) == ((2, 0) if attention == "fused" else (0, 2))
    out = ff.coreml.verify(tmp_path / "gpt2.mlpackage", {"input_ids": ids})
    assert list(out) == ["logits"]
    assert psnr(expected, out["logits"]) >= 60


@pytest.mark.parametrize("kv_heads, optimized", [(4, True), (2, True), (2, False)])
def test_llama_plain_export_with_the_models_defaults(kv_heads, optimized, tmp_path):
    """A plain export (no static_kwargs: use_cache left on) of an HF Llama, optimized or stock, MHA
    or GQA. Optimized: the traced query length was a 0-d tensor, which made `causal` one ([sdpa]
    causal must be a bool). Stock GQA: transformers called torch's sdpa with enable_gqa=True,
    which coremltools ignores (a shape error in conversion)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        expected = model(ids).logits.numpy()
    if optimized:
        ff.torch.optimize(model, attention="fused")
    mlmodel = ff.coreml.export(model, (ids,), tmp_path / "llama.mlpackage", precision="fp32",
                               attention="fused" if optimized else "unfused")
    assert mlmodel.fusedformer.attention == ("fused" if optimized else "unfused")
    out = ff.coreml.verify(tmp_path / "llama.mlpackage", {"input_ids": ids.numpy()})
    assert psnr(expected, next(iter(out.values()))) >= 60
    from transformers.integrations import sdpa_attention

    assert sdpa_attention.use_gqa_in_sdpa(None, torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))  # restored


def test_bert_with_padding(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=100, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0  # the second sentence is 4 tokens + 3 padding
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    ff.torch.optimize(model, attention="fused")
    mlmodel = ff.coreml.export(model, {"input_ids": ids, "attention_mask": mask}, tmp_path / "bert.mlpackage",
                               precision="fp32")
    assert _inventory(mlmodel)["scaled_dot_product_attention"] == 2
    out = ff.coreml.verify(mlmodel, {"input_ids": ids, "attention_mask": mask})
    assert list(out) == ["last_hidden_state", "pooler_output"]
    assert psnr(expected, out["last_hidden_state"]) >= 60
    # padding matters: the same ids without the mask give other states for the padded sentence
    unmasked = ff.coreml.verify(mlmodel, {"input_ids": ids, "attention_mask": np.ones((2, 7), np.int32)})
    assert np.abs(unmasked["last_hidden_state"][1] - expected[1]).max() > 1e-3


# -- stateful KV cache (export(kv_cache=True)) over HF causal LMs and their DynamicCache interface

T = transformers
SMALL = dict(vocab_size=100, max_position_embeddings=64)
CAUSAL_LMS = {
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                                   initializer_range=0.3)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2, **SMALL)),
    # sliding window 4 < prompt + generated tokens: the window is in the program
    "mistral-window": lambda: T.MistralForCausalLM(T.MistralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        sliding_window=4, initializer_range=0.3, **SMALL)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2,
                                                      initializer_range=0.3, **SMALL)),
}


def _generate(model, ids, steps):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps,
                             pad_token_id=0)
    return out[:, ids.shape[1]:].numpy()


@pytest.mark.parametrize("kind, attention", [
    ("gpt2", "fused"), ("llama", "fused"),
    pytest.param("gpt2", "unfused", marks=pytest.mark.slow),
    pytest.param("mistral-window", "fused", marks=pytest.mark.slow),
    pytest.param("qwen2", "fused", marks=pytest.mark.slow),
])
def test_stateful_decode_matches_generate(kind, attention, tmp_path):
    from fusedformer.coreml.kv_cache import greedy_decode

    torch.manual_seed(0)
    model = CAUSAL_LMS[kind]().eval()
    ids = torch.randint(0, 100, (1, 5))
    generated = _generate(model, ids, 8)  # stock attention, transformers' DynamicCache
    assert len(set(generated[0])) > 1  # not a degenerate repeat of one token
    ff.torch.optimize(model, attention="fused")  # as the CLI does; the export switches it for its own
    path = tmp_path / f"{kind}.mlpackage"
    ff.coreml.export(model, (ids,), path, kv_cache=True, attention=attention, precision="fp32", max_len=64)
    assert model.config._attn_implementation == "fusedformer"  # given back after the export
    program = ff.coreml.Program.load(path)
    assert program.state_names == ["k_cache", "v_cache"]
    assert program.input_names == ["input_ids", "attention_mask"]
    ops = program.op_types()
    assert ops["read_state"] == 2 and ops["coreml_update_state"] == ops["slice_update"] == 2 * 2  # k, v x 2 layers
    assert (ops["scaled_dot_product_attention"], ops["softmax"]) == ((2, 0) if attention == "fused" else (0, 2))
    state = program.make_state()
    assert all(s.dtype == np.float16 and s.shape[:2] == (2, 1) and s.shape[3] == 64 for s in state.values())
    np.testing.assert_array_equal(greedy_decode(program, ids.numpy(), steps=8), generated)


UNSUPPORTED = {
    "GPT2Model": (lambda: T.GPT2Model(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)),
                  "returns no logits"),
    "GPT2LMHeadModel": (lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100,
                                                               n_positions=64, add_cross_attention=True)),
                        "has cross-attention"),
    "Gemma2Attention": (lambda: T.Gemma2ForCausalLM(T.Gemma2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, **SMALL)), "passes softcap"),
    "BertSelfAttention": (lambda: T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                           intermediate_size=64, vocab_size=100)),
                          "is not causal self-attention"),
    "T5ForConditionalGeneration": (lambda: T.T5ForConditionalGeneration(T.T5Config(
        d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=100)), "is an encoder-decoder"),
    "LlamaForCausalLM": (lambda: T.LlamaForCausalLM(T.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
        max_position_embeddings=32)), "has max_position_embeddings=32, fewer than max_len=64"),
}


@pytest.mark.parametrize("culprit", list(UNSUPPORTED))
def test_stateful_export_names_what_does_not_fit(culprit, tmp_path):
    factory, reason = UNSUPPORTED[culprit]
    model = factory().eval()
    implementation = model.config._attn_implementation
    with pytest.raises(ValueError, match=re.escape(f"[export] kv_cache=True: {culprit} {reason}")):
        ff.coreml.export(model, (torch.zeros(1, 3, dtype=torch.long),), tmp_path / "x.mlpackage", kv_cache=True,
                         max_len=64)
    assert model.config._attn_implementation == implementation
