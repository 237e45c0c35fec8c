"""Hugging Face models through ff.torch.optimize -> Core ML -> the MIL interpreter."""

from __future__ import annotations

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


def test_llama_stateful_decode_matches_generate(tmp_path):
    from fusedformer.coreml.kv_cache import greedy_decode

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                                   pad_token_id=0)[:, 5:].numpy()
    path = tmp_path / "llama.mlpackage"
    ff.coreml.export(model, (ids,), path, kv_cache=True, precision="fp32", max_len=64)
    program = ff.coreml.Program.load(path)
    assert program.state_names == ["k_cache", "v_cache"]
    assert program.op_types()["scaled_dot_product_attention"] == 2
    np.testing.assert_array_equal(greedy_decode(program, ids.numpy(), steps=8), generated)
