"""ff.mlx.optimize on a small LLaMA-style mlx.nn model (GQA, RoPE, causal) and its plain torch
twin with the same weights."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
from tests.conftest import require

pytestmark = pytest.mark.mlx
mx = require("mlx")
import mlx.nn as nn  # noqa: E402
from mlx.core.fast import scaled_dot_product_attention as bound_sdpa  # noqa: E402  (a name bound at import)
from mlx.utils import tree_flatten  # noqa: E402

import fusedformer as ff  # noqa: E402
from fusedformer.mlx.linear import QuantizedLinear  # noqa: E402

CONFIG = dict(vocab=101, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden=256, rope_base=10000.0, eps=1e-5)
LOGITS_TOL = dict(atol=2e-4, rtol=2e-4)  # float32 logits of order 1 after two layers


# -- the MLX model ---------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, rope_base, **_):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.rope = nn.RoPE(self.head_dim, traditional=False, base=rope_base)

    def __call__(self, x, mask=None):
        b, length, _ = x.shape
        q = self.q_proj(x).reshape(b, length, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(b, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q, k = self.rope(q), self.rope(k)
        out = mx.fast.scaled_dot_product_attention(
            q, k, v, scale=self.head_dim**-0.5, mask="causal" if mask is None else mask
        )
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, length, -1))


class MLP(nn.Module):
    def __init__(self, dim, hidden, **_):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, **cfg):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg["dim"], eps=cfg["eps"])
        self.attn = Attention(**cfg)
        self.mlp_norm = nn.RMSNorm(cfg["dim"], eps=cfg["eps"])
        self.mlp = MLP(**cfg)

    def __call__(self, x, mask=None):
        x = x + self.attn(self.attn_norm(x), mask)
        return x + self.mlp(self.mlp_norm(x))


class TinyLlama(nn.Module):
    def __init__(self, **cfg):
        super().__init__()
        self.embed = nn.Embedding(cfg["vocab"], cfg["dim"])
        self.layers = [Block(**cfg) for _ in range(cfg["n_layers"])]
        self.norm = nn.RMSNorm(cfg["dim"], eps=cfg["eps"])
        self.lm_head = nn.Linear(cfg["dim"], cfg["vocab"], bias=False)

    def __call__(self, tokens, mask=None):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, mask)
        return self.lm_head(self.norm(x))


# -- its torch twin --------------------------------------------------------------------------
def torch_twin(params: dict, cfg: dict):
    """Plain torch LLaMA with the given float weights ({mlx parameter path: numpy array})."""
    torch = require("torch")
    tnn, F = torch.nn, torch.nn.functional

    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg["eps"]) * weight

    def rope(x):  # non-traditional (rotate-half) RoPE over positions 0..L-1
        d = x.shape[-1]
        inv_freq = cfg["rope_base"] ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles = torch.arange(x.shape[-2], dtype=torch.float64)[:, None] * inv_freq[None]
        cos, sin = angles.cos().float(), angles.sin().float()
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    class Model(tnn.Module):
        def __init__(self):
            super().__init__()
            self.w = tnn.ParameterDict({k.replace(".", "__"): tnn.Parameter(torch.from_numpy(np.array(v)))
                                        for k, v in params.items()})

        def p(self, name):
            return self.w[name.replace(".", "__")]

        def forward(self, tokens):
            h, hkv = cfg["n_heads"], cfg["n_kv_heads"]
            x = self.p("embed.weight")[tokens]
            b, length, _ = x.shape
            for i in range(cfg["n_layers"]):
                pre = f"layers.{i}."
                y = rms_norm(x, self.p(pre + "attn_norm.weight"))
                q, k, v = (F.linear(y, self.p(pre + f"attn.{n}_proj.weight")) for n in "qkv")
                q = rope(q.view(b, length, h, -1).transpose(1, 2))
                k = rope(k.view(b, length, hkv, -1).transpose(1, 2)).repeat_interleave(h // hkv, dim=1)
                v = v.view(b, length, hkv, -1).transpose(1, 2).repeat_interleave(h // hkv, dim=1)
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                x = x + F.linear(a.transpose(1, 2).reshape(b, length, -1), self.p(pre + "attn.o_proj.weight"))
                y = rms_norm(x, self.p(pre + "mlp_norm.weight"))
                gate = F.linear(y, self.p(pre + "mlp.gate_proj.weight"))
                up = F.linear(y, self.p(pre + "mlp.up_proj.weight"))
                x = x + F.linear(F.silu(gate) * up, self.p(pre + "mlp.down_proj.weight"))
            return F.linear(rms_norm(x, self.p("norm.weight")), self.p("lm_head.weight"))

    return Model().eval()


# -- helpers ---------------------------------------------------------------------------------
def make_model(seed=0, cfg=CONFIG):
    mx.random.seed(seed)
    model = TinyLlama(**cfg)
    mx.eval(model.parameters())
    return model


def dense_params(model) -> dict:
    """{parameter path: float32 numpy} with every QuantizedLinear as its dequantized weight."""
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            prefix = f"{path}." if path else ""
            out[prefix + "weight"] = module.quantized_weight().dequantize()
            if "bias" in module:
                out[prefix + "bias"] = np.array(module.bias)
    for path, value in tree_flatten(model.parameters()):
        if ".qweight." not in f".{path}":
            out[path] = np.array(value)
    return out


def same_weights_model(params: dict) -> TinyLlama:
    model = TinyLlama(**CONFIG)
    model.load_weights([(k, mx.array(v)) for k, v in params.items()])
    return model


def tokens(rng, b=2, length=13):
    return mx.array(rng.integers(0, CONFIG["vocab"], size=(b, length)).astype(np.int32))


def assert_logits_close(got, want):
    got = np.array(got) if isinstance(got, mx.array) else got
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, **LOGITS_TOL)


# -- tests -----------------------------------------------------------------------------------
def test_fused_attention_same_logits_as_mlx_and_torch(rng):
    model = make_model()
    ids = tokens(rng)
    base = np.array(model(ids))
    ff.mlx.optimize(model, attention="fused")
    fused = [m for _, m in model.named_modules() if type(m).__name__ == "FusedAttention"]
    assert len(fused) == CONFIG["n_layers"] and all(isinstance(m, Attention) for m in fused)
    logits = np.array(model(ids))
    np.testing.assert_allclose(logits, base, atol=1e-5, rtol=1e-5)
    torch = require("torch")
    with torch.no_grad():
        twin = torch_twin(dense_params(model), CONFIG)(torch.from_numpy(np.array(ids)).long()).numpy()
    assert_logits_close(logits, twin)


def schemes():
    Q = pytest.importorskip("fusedformer.quant", reason="fusedformer.quant (compressed weights) is not built yet")
    return Q


@pytest.mark.parametrize("name", ["int8", "affine4", "palettize4"])
def test_report_counts_what_the_layers_hold(name):
    """bytes_after is the MLX arrays each compressed layer keeps (Int8: MLX's q + 128 codes and
    its group scales), and optimize() leaves no canonical copy cached."""

    Q = schemes()
    scheme = {"int8": Q.Int8(), "affine4": Q.Affine(4, 64), "palettize4": Q.Palettize(4)}[name]
    model = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 128))
    ff.mlx.optimize(model, attention=None, weights=scheme, skip=())
    held = sum(v.nbytes for layer in model.layers for k, v in tree_flatten(layer.parameters()) if k != "bias")
    assert model.fusedformer_report.bytes_after == held
    assert all(layer.qweight._quantized is None for layer in model.layers)


def test_optimize_again_keeps_compressed_layers_and_the_report(rng):
    """A second call cannot recompress (the original weights are gone): it says so, the layers
    and the report keep what the first call did, and attention is not wrapped twice."""
    Q = schemes()
    model = make_model()
    ff.mlx.optimize(model, attention="fused", weights=Q.Int8(), skip=("lm_head",))
    first = model.fusedformer_report
    ids = tokens(rng)
    want = np.array(model(ids))
    with pytest.warns(UserWarning, match=r"\[optimize\] \S+ is already compressed \(Int8\(zero_point=False\)\)"):
        ff.mlx.optimize(model, attention="fused", weights=Q.Affine(4, 32), skip=("lm_head",))
    rep = model.fusedformer_report
    assert rep.quantized == first.quantized and rep.bytes_after == first.bytes_after
    assert rep.attention_modules == first.attention_modules and not rep.unmatched_patterns
    np.testing.assert_array_equal(np.array(model(ids)), want)


@pytest.mark.parametrize("name", ["affine4", "affine8", "int8", "palettize4", "prune50_affine4"])
def test_compressed_weights_same_logits_as_dense_twins(rng, name):
    Q = schemes()
    scheme = {"affine4": Q.Affine(4, 64), "affine8": Q.Affine(8, 32), "int8": Q.Int8(),
              "palettize4": Q.Palettize(4), "prune50_affine4": Q.Prune(0.5, then=Q.Affine(4, 32))}[name]
    model = make_model()
    original = np.array(model.lm_head.weight)
    ff.mlx.optimize(model, attention="fused", weights=scheme, skip=("lm_head",))
    swapped = {p for p, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(swapped) == 7 * CONFIG["n_layers"] and "lm_head" not in swapped
    assert set(model.fusedformer_report.quantized) == swapped and model.fusedformer_report.skipped == ["lm_head"]
    assert len(model.fusedformer_report.attention_modules) == CONFIG["n_layers"]
    assert isinstance(model.lm_head, nn.Linear)
    np.testing.assert_array_equal(np.array(model.lm_head.weight), original)
    ids = tokens(rng)
    logits = np.array(model(ids))
    params = dense_params(model)
    assert_logits_close(logits, np.array(same_weights_model(params)(ids)))
    torch = require("torch")
    with torch.no_grad():
        twin = torch_twin(params, CONFIG)(torch.from_numpy(np.array(ids)).long()).numpy()
    assert_logits_close(logits, twin)


def test_left_padding_gives_finite_logits(rng):
    """Padded queries see no key: MLX alone gives NaN there (additive -inf), which then spreads
    through v into every row; the fused path gives 0 for those rows and finite logits."""
    model = make_model()
    ids = tokens(rng, b=2, length=9)
    keep = np.tril(np.ones((9, 9), bool))[None, None].repeat(2, 0)
    keep[1, :, :, :3] = False  # sequence 1 is left-padded by 3
    mask = mx.array(np.where(keep, 0.0, -np.inf).astype(np.float32))
    assert np.isnan(np.array(model(ids, mask))).any()
    ff.mlx.optimize(model, attention="fused")
    logits = np.array(model(ids, mask))
    assert np.isfinite(logits).all()
    # the unpadded sequence and the real tokens of the padded one are unchanged
    plain = make_model()
    np.testing.assert_allclose(logits[0], np.array(plain(ids[:1]))[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logits[1, 3:], np.array(plain(ids[1:, 3:]))[0], atol=1e-5, rtol=1e-5)


def test_routing_is_scoped_to_optimized_modules():
    mha = nn.MultiHeadAttention(32, 4)
    ff.mlx.optimize(mha, attention="fused")
    assert type(mha).__name__ == "FusedMultiHeadAttention"
    x = mx.random.normal((1, 5, 32))
    mask = mx.array(np.zeros((5, 5), bool))  # every key masked
    assert (np.array(mha(x, x, x, mask)) == np.array(mha.out_proj(mx.zeros((1, 5, 32))))).all()
    ff.mlx.optimize(mha, attention="fused")  # idempotent
    assert type(mha).__name__ == "FusedMultiHeadAttention"


def test_routing_is_per_thread(monkeypatch):
    """A thread inside an optimized module's call routes its own mx.fast calls, not another
    thread's (swapping mx.fast's function per block sent them to ours), and outside every block
    mx.fast runs MLX's own."""
    import importlib

    mlx_optimize = importlib.import_module("fusedformer.mlx.optimize")  # (ff.mlx.optimize is the function)

    monkeypatch.setattr(mlx_optimize, "MX_FAST_SDPA", lambda *a, **k: "mlx")
    monkeypatch.setattr(mlx_optimize, "_fused_sdpa_like_mx_fast", lambda *a, **k: "ours")
    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", mx.fast.scaled_dot_product_attention)

    def call():
        return mx.fast.scaled_dot_product_attention(None, None, None, scale=1.0)

    inside, done, seen = threading.Event(), threading.Event(), []

    def hold():
        with mlx_optimize.use_fused_sdpa():
            seen.append(call())
            inside.set()
            done.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(60)
    try:
        other = call()
    finally:
        done.set()
        holder.join()
    assert seen == ["ours"] and other == "mlx" and call() == "mlx"


def test_skip_patterns_report_and_checks_before_any_change():
    Q = schemes()
    model = nn.Sequential(nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 64), nn.Linear(64, 8))
    with pytest.raises(ValueError, match=r"^\[quant\] layers\.2: K=40 is not divisible by the group size 32"):
        ff.mlx.optimize(model, weights=Q.Affine(4, 32))
    assert [type(m).__name__ for m in model.layers] == ["Linear", "ReLU", "Linear", "Linear"]  # untouched
    w = np.array(model.layers[3].weight)
    w[0, 0] = np.nan  # values too: checked before any change
    model.layers[3].weight = mx.array(w)
    with pytest.raises(ValueError, match=r"^\[quant\] layers\.3: the weight has 1 NaN/inf entries"):
        ff.mlx.optimize(model, weights=Q.Int8(), skip=("layers.2",))
    assert [type(m).__name__ for m in model.layers] == ["Linear", "ReLU", "Linear", "Linear"]
    model.layers[3].weight = mx.array(np.nan_to_num(w))
    ff.mlx.optimize(model, attention=None, weights={"layers.0": Q.Int8(), "*": Q.Affine(4, 32)}, skip=("layers.2",))
    assert [type(m).__name__ for m in model.layers] == ["QuantizedLinear", "ReLU", "Linear", "QuantizedLinear"]
    report = model.fusedformer_report
    assert report.quantized == {"layers.0": repr(Q.Int8()), "layers.3": repr(Q.Affine(4, 32))}
    assert report.skipped == ["layers.2"] and report.bytes_after < report.bytes_before
    with pytest.warns(UserWarning, match=r"\[optimize\] weights pattern 'mlp\.\*' matched no linear layer"):
        ff.mlx.optimize(nn.Sequential(nn.Linear(64, 8)), weights={"mlp.*": Q.Int8()})
    with pytest.raises(ValueError, match=r"^\[optimize\] attention must be one of"):
        ff.mlx.optimize(model, attention="flash")
    with pytest.raises(TypeError, match=r"^\[optimize\] weights for '\*' must be a fusedformer.quant scheme"):
        ff.mlx.optimize(model, weights="int4")


def test_nn_quantized_linear_adopted_or_recompressed(rng):
    Q = schemes()
    layer = nn.QuantizedLinear(64, 16, bias=True, group_size=32, bits=4)
    model = nn.Sequential(layer, nn.QuantizedLinear(64, 64, bias=False, group_size=64, bits=4))
    ff.mlx.optimize(model, weights=Q.Affine(4, 32))
    adopted, recompressed = model.layers
    assert isinstance(adopted, QuantizedLinear) and isinstance(recompressed, QuantizedLinear)
    # same bits and group size: MLX's arrays are taken as they are, bit for bit
    np.testing.assert_array_equal(np.array(adopted.qweight.w_q), np.array(layer.weight))
    dense = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=32, bits=4)
    np.testing.assert_array_equal(np.array(adopted.qweight.dequantize()), np.array(dense))
    np.testing.assert_array_equal(adopted.quantized_weight().dequantize(), np.array(dense))
    x = mx.random.normal((3, 64))
    np.testing.assert_allclose(np.array(adopted(x)), np.array(layer(x)), atol=1e-6, rtol=1e-6)
    assert recompressed.scheme == Q.Affine(4, 32)


def test_mlx_lm_model_if_installed(rng):
    mlx_lm_llama = pytest.importorskip("mlx_lm.models.llama", reason="mlx-lm is not installed")
    args = mlx_lm_llama.ModelArgs(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                  vocab_size=101, tie_word_embeddings=False)
    mx.random.seed(0)
    model = mlx_lm_llama.Model(args)
    mx.eval(model.parameters())
    ids = tokens(rng)
    base = np.array(model(ids))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ff.mlx.optimize(model, attention="fused", weights=schemes().Affine(8, 32))
    np.testing.assert_allclose(np.array(model(ids)), base, atol=5e-2, rtol=5e-2)


def test_native_cpu_kernel_in_an_optimized_model(rng):
    model = make_model()
    ids = tokens(rng)
    base = np.array(model(ids))
    ff.mlx.optimize(model, attention="fused")
    with ff.mlx.cpu_kernel("native"):
        logits = np.array(model(ids))
    np.testing.assert_allclose(logits, base, atol=2e-5, rtol=2e-5)


def test_adopted_bf16_layer_keeps_its_arrays_and_outputs(rng):
    """An mlx-lm-style bf16 4-bit layer adopted as it is keeps its bf16 scales and biases: the
    same bytes and, bit for bit, nn.QuantizedLinear's outputs (float32 copies grew it by 11%
    and moved outputs by up to 0.19); the native kernel widens them and agrees."""
    layer = nn.Linear(256, 64, bias=False)
    layer.set_dtype(mx.bfloat16)
    model = nn.Sequential(layer)
    nn.quantize(model, group_size=64, bits=4)
    x = mx.array(rng.standard_normal((3, 256)).astype(np.float32)).astype(mx.bfloat16)
    want = np.array(model(x).astype(mx.float32))
    before = {k.split(".")[-1]: (v.dtype, v.nbytes) for k, v in tree_flatten(model.parameters())}
    ff.mlx.optimize(model, weights=schemes().Affine(4, 64))
    after = {k.split(".")[-1]: (v.dtype, v.nbytes) for k, v in tree_flatten(model.parameters())}
    assert after == {"w_q": before["weight"], "scales": before["scales"], "biases": before["biases"]}
    assert model.fusedformer_report.bytes_after == model.fusedformer_report.bytes_before
    np.testing.assert_array_equal(np.array(model(x).astype(mx.float32)), want)
    with ff.mlx.cpu_kernel("native"):  # (bf16 x stays on MLX's path; float32 x runs the kernel)
        got = np.array(model(x.astype(mx.float32)))
    np.testing.assert_allclose(got, np.array(model(x.astype(mx.float32))), atol=1e-4, rtol=1e-4)


def test_dict_of_layers_with_digit_keys():
    """Layers in a dict whose keys are digits (a hand-written MoE) are swapped in place:
    update_modules(tree_unflatten(...)) took the keys for list indices and failed half-way."""
    mx.random.seed(1)
    model = nn.Module()
    model.experts = {"0": nn.Linear(64, 32), "1": nn.Linear(64, 32)}
    model.blocks = [nn.Linear(64, 64)]
    x = mx.random.normal((2, 64))
    want = [np.array(model.experts[k](x)) for k in ("0", "1")]
    ff.mlx.optimize(model, attention=None, weights=schemes().Int8())
    assert isinstance(model.experts, dict) and sorted(model.experts) == ["0", "1"]
    assert all(isinstance(m, QuantizedLinear) for m in (*model.experts.values(), model.blocks[0]))
    for k, w in zip(("0", "1"), want):
        np.testing.assert_allclose(np.array(model.experts[k](x)), w, atol=0.05, rtol=0.05)


def test_tied_weight_is_reported_and_counted():
    """An lm_head holding the embedding's array frees nothing when compressed: the report names
    the tie and counts the dense array as still held (as ff.torch.optimize does)."""
    model = nn.Module()
    model.embed = nn.Embedding(1000, 256)
    model.lm_head = nn.Linear(256, 1000, bias=False)
    model.lm_head.weight = model.embed.weight
    ff.mlx.optimize(model, attention=None, weights=schemes().Affine(4, 64), skip=())
    report = model.fusedformer_report
    assert report.tied == {"lm_head": "embed.weight"}
    dense = model.embed.weight.nbytes
    assert report.bytes_before == dense and report.bytes_after > dense
    assert "lm_head (embed.weight)" in str(report)


class BoundNameAttention(nn.Module):
    """Calls MLX's attention through a name bound at import."""

    def __call__(self, q, k, v, mask):
        return bound_sdpa(q, k, v, scale=1.0, mask=mask)


def test_attention_called_through_a_bound_name_is_routed():
    """A module calling MLX's function through a name bound at import is routed (it was reported
    fused and ran MLX's op): its fully masked row gives 0; outside the module the name still
    runs MLX's function."""
    model = nn.Module()
    model.attn = BoundNameAttention()
    ff.mlx.optimize(model, attention="fused")
    assert model.fusedformer_report.attention_modules == ["attn"]
    q, k = mx.random.normal((1, 1, 2, 8)), mx.random.normal((1, 1, 3, 8))
    mask = mx.array([[True, True, True], [False, False, False]])
    out = np.array(model.attn(q, k, k, mask))
    np.testing.assert_array_equal(out[0, 0, 1], 0)
    np.testing.assert_allclose(out[0, 0, 0], np.array(ff.sdpa(q, k, k, mask=mask, scale=1.0))[0, 0, 0], atol=1e-5)
    outside = np.array(bound_sdpa(q, k, k, scale=1.0, mask=mask))
    np.testing.assert_array_equal(outside, np.array(mx.fast.scaled_dot_product_attention(q, k, k, scale=1.0, mask=mask)))
    assert not np.all(outside[0, 0, 1] == 0)  # (MLX's own: the mean of v there)


@pytest.mark.parametrize("kind", ["qmatmul", "sdpa"])
def test_native_kernel_refuses_gradients_and_transforms(kind, rng):
    """The native kernel's result is a constant to MLX: a gradient through it was 0, silently.
    It raises instead, naming the op; mx.compile and mx.vmap say why they cannot run it."""
    if kind == "qmatmul":
        layer = QuantizedLinear(ff.quant.compress(rng.standard_normal((32, 64)).astype(np.float32), schemes().Int8()))
        x = mx.random.normal((2, 64))
        f = layer
    else:
        x = mx.random.normal((1, 2, 4, 64))

        def f(q):
            return ff.sdpa(q, q, q, causal=True)
    with ff.mlx.cpu_kernel("native"):
        mx.eval(f(x))  # (runs)
        with pytest.raises(ValueError, match=rf"^\[{kind}\] cpu_kernel\('native'\) is for inference: it has no gradient"):
            mx.grad(lambda a: f(a).sum())(x)
        with pytest.raises(ValueError, match=rf"^\[{kind}\] cpu_kernel\('native'\) is for inference"):
            mx.jvp(f, [x], [x])
        with pytest.raises(ValueError, match=rf"^\[{kind}\] cpu_kernel\('native'\) evaluates its inputs, which mx.compile"):
            mx.compile(f)(x)
    grad = mx.grad(lambda a: f(a).sum())(x)  # MLX's path: differentiable
    assert float(mx.abs(grad).sum()) > 0


def test_cpu_kernel_block_is_this_threads_own():
    """cpu_kernel("native") in one thread leaves another thread on MLX's path (a process-wide
    switch gave a training thread zero gradients while another was inside a block)."""
    from fusedformer.mlx.native import current_cpu_kernel

    inside, release, seen = threading.Event(), threading.Event(), []

    def worker():
        with ff.mlx.cpu_kernel("native"):
            seen.append(current_cpu_kernel())
            inside.set()
            release.wait(30)

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert inside.wait(30)
        assert current_cpu_kernel() == "mlx" and seen == ["native"]
        layer = QuantizedLinear(ff.quant.compress(np.ones((8, 32), np.float32), schemes().Int8()))
        grad = mx.grad(lambda a: layer(a).sum())(mx.ones((1, 32)))
        assert float(mx.abs(grad).sum()) > 0
    finally:
        release.set()
        t.join()
    previous = ff.mlx.set_cpu_kernel("native")  # the default outside blocks, every thread
    try:
        assert current_cpu_kernel() == "native"
        with ff.mlx.cpu_kernel("mlx"):
            assert current_cpu_kernel() == "mlx"
    finally:
        ff.mlx.set_cpu_kernel(previous)


def test_report_counts_what_stays_dense():
    """The report says what the whole model holds and how much of it stays dense (the embedding)."""
    model = nn.Module()
    model.embed = nn.Embedding(1000, 256)
    model.proj = nn.Linear(256, 256)
    ff.mlx.optimize(model, attention=None, weights=schemes().Int8())
    report = model.fusedformer_report
    arrays = dict(tree_flatten(model.parameters()))
    assert report.dense_bytes == arrays["embed.weight"].nbytes
    assert report.model_bytes == sum(a.nbytes for a in arrays.values())
    assert "of it outside compressed layers" in str(report)
