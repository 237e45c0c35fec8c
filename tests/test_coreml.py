"""Core ML export: attention lowering, op inventory and the MIL reference interpreter."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.conftest import require

pytestmark = pytest.mark.coreml

ct = require("coremltools")
torch = require("torch")

from tests.coreml_models import SdpaCall, SdpaLseCall, TinyDecoder, ensure_ops, psnr  # noqa: E402

import fusedformer as ff  # noqa: E402
from fusedformer import reference  # noqa: E402

ensure_ops()


def _op_types(mlmodel):
    return ff.coreml.Program.load(mlmodel).op_types()


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    model = TinyDecoder(vocab=97, dim=32, heads=4, kv_heads=2, layers=2).eval()
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        logits = model(ids).numpy()
    return model, ids, logits


@pytest.mark.parametrize("attention", ["fused", "unfused"])
def test_decoder_matches_torch_fp32(decoder, attention, tmp_path):
    model, ids, logits = decoder
    path = tmp_path / "decoder.mlpackage"
    mlmodel = ff.coreml.export(model, (ids,), path, attention=attention, precision="fp32")
    ops = _op_types(mlmodel)
    if attention == "fused":
        assert ops["scaled_dot_product_attention"] == 2 and ops["softmax"] == 0
    else:
        assert ops["softmax"] == 2 and ops["scaled_dot_product_attention"] == 0
    assert mlmodel.user_defined_metadata["fusedformer.attention"] == attention
    assert mlmodel.user_defined_metadata["fusedformer.fused_attention_ops"] == ("2" if attention == "fused" else "0")
    # from disk, through the milproto loader, keyed by the forward's names
    out = ff.coreml.verify(path, {"input_ids": ids})
    assert list(out) == ["logits"]
    assert psnr(logits, out["logits"]) >= 60
    # the in-memory program gives the same bits
    np.testing.assert_array_equal(ff.coreml.verify(mlmodel, {"input_ids": ids})["logits"], out["logits"])


def test_decoder_fp16_emulated(decoder, tmp_path):
    model, ids, logits = decoder
    mlmodel = ff.coreml.export(model, (ids,), tmp_path / "d16.mlpackage", precision="fp16")
    out16 = ff.coreml.verify(mlmodel, {"input_ids": ids})["logits"]
    out32 = ff.coreml.verify(mlmodel, {"input_ids": ids}, emulate_fp16=False)["logits"]
    assert out16.dtype == np.float32 or out16.dtype == np.float16
    assert 30 <= psnr(logits, out16) < psnr(logits, out32)  # fp16 rounding is visible, and bounded
    assert psnr(logits, out32) >= 50  # fp16 weights only
    # a loaded Program takes the options too (they were ignored)
    program = ff.coreml.Program.load(mlmodel)
    np.testing.assert_array_equal(ff.coreml.verify(program, {"input_ids": ids}, emulate_fp16=False)["logits"], out32)
    np.testing.assert_array_equal(ff.coreml.verify(program, {"input_ids": ids})["logits"], out16)
    with pytest.raises(ValueError, match=r"^\[verify\] the program has no function 'chat'"):
        ff.coreml.verify(program, {"input_ids": ids}, function_name="chat")


def test_below_ios18_falls_back_to_unfused(decoder, tmp_path):
    model, ids, logits = decoder
    with pytest.warns(UserWarning, match="unfused"):
        mlmodel = ff.coreml.export(model, (ids,), tmp_path / "old.mlpackage", attention="fused",
                                   target="iOS17", precision="fp32")
    assert mlmodel.user_defined_metadata["fusedformer.attention"] == "unfused"
    assert "iOS18" in mlmodel.user_defined_metadata["fusedformer.notes"]
    ops = _op_types(mlmodel)
    assert ops["scaled_dot_product_attention"] == 0 and ops["softmax"] == 2
    assert psnr(logits, ff.coreml.verify(mlmodel, {"input_ids": ids})["logits"]) >= 60


def _qkv(rng, b, hq, hkv, lq, lk, d):
    return (rng.standard_normal(s).astype(np.float32) for s in ((b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, d)))


def _dead_row_bool_mask(rng, lq, lk):
    mask = rng.random((1, 1, lq, lk)) > 0.4
    mask[..., 1, :] = False  # a query row with no key: 0 in ff.sdpa
    return mask


def _additive_mask(rng, lq, lk):
    mask = rng.standard_normal((1, 1, lq, lk)).astype(np.float32)
    mask[..., 0, 2] = -np.inf
    return mask


SDPA_CASES = {
    # name: (b, hq, hkv, lq, lk, d, options)
    "causal-gqa": (1, 4, 2, 5, 5, 8, dict(causal=True)),
    "decode-window": (2, 4, 1, 3, 7, 8, dict(causal=True, window=2)),
    "lq>lk-empty-rows": (1, 2, 2, 6, 4, 16, dict(causal=True)),
    "window-noncausal": (1, 2, 2, 5, 5, 8, dict(window=2)),
    "bool-mask-dead-row": (1, 2, 1, 4, 6, 8, dict(mask=_dead_row_bool_mask)),
    "additive-mask-causal-scale": (1, 3, 3, 4, 4, 8, dict(mask=_additive_mask, causal=True, scale=0.3)),
}


@pytest.mark.parametrize("attention", ["fused", "unfused"])
@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_sdpa_lowering_matches_reference(case, attention, rng, tmp_path):
    b, hq, hkv, lq, lk, d, options = SDPA_CASES[case]
    q, k, v = _qkv(rng, b, hq, hkv, lq, lk, d)
    options = dict(options)
    if callable(options.get("mask")):
        options["mask"] = options["mask"](rng, lq, lk)
    module = SdpaCall(**options).eval()
    expected = reference.sdpa(q, k, v, **options)
    with torch.no_grad():
        np.testing.assert_allclose(module(*map(torch.from_numpy, (q, k, v))).numpy(), expected, atol=1e-5)
    mlmodel = ff.coreml.export(module, {"q": torch.from_numpy(q), "k": torch.from_numpy(k), "v": torch.from_numpy(v)},
                               tmp_path / "sdpa.mlpackage", attention=attention, precision="fp32")
    out = ff.coreml.verify(mlmodel, {"q": q, "k": k, "v": v})["output"]
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)


def test_verify_rejects_bad_inputs(decoder, tmp_path):
    model, ids, _ = decoder
    mlmodel = ff.coreml.export(model, (ids,), tmp_path / "d.mlpackage", precision="fp32")
    with pytest.raises(ValueError, match="input_ids"):
        ff.coreml.verify(mlmodel, {"tokens": ids})
    with pytest.raises(ValueError, match="shape"):
        ff.coreml.verify(mlmodel, {"input_ids": ids[:, :3]})
    with pytest.raises(ValueError, match="no model"):
        ff.coreml.verify(tmp_path / "missing.mlpackage", {"input_ids": ids})


def test_flexible_length(decoder, tmp_path):
    model, ids, _ = decoder
    mlmodel = ff.coreml.export(model, (ids,), tmp_path / "flex.mlpackage", precision="fp32",
                               flexible={"input_ids": {1: (1, 64)}})
    for length in (1, 4, 17):
        tokens = torch.randint(0, 97, (1, length))
        with torch.no_grad():
            expected = model(tokens).numpy()
        out = ff.coreml.verify(mlmodel, {"input_ids": tokens})["logits"]
        assert psnr(expected, out) >= 60, length


@pytest.mark.parametrize("options", [dict(window=2), dict(causal=True, window=3)], ids=str)
def test_flexible_length_window_matches_reference(options, rng, tmp_path):
    """Flexible lengths build the causal/window mask in the program (not a constant): without
    causal, the window bounds only how far back a query looks, as reference.sdpa_mask."""
    module = SdpaCall(**options).eval()
    q, k, v = _qkv(rng, 1, 2, 2, 6, 6, 8)
    mlmodel = ff.coreml.export(module, {"q": torch.from_numpy(q), "k": torch.from_numpy(k), "v": torch.from_numpy(v)},
                               tmp_path / "flex.mlpackage", precision="fp32",
                               flexible={name: {2: (1, 16)} for name in ("q", "k", "v")})
    for length in (3, 6, 11):
        q, k, v = _qkv(rng, 1, 2, 2, length, length, 8)
        out = ff.coreml.verify(mlmodel, {"q": q, "k": k, "v": v})["output"]
        np.testing.assert_allclose(out, reference.sdpa(q, k, v, **options), atol=2e-5, rtol=1e-5)


def test_package_path_takes_a_trailing_slash(tmp_path):
    from fusedformer.coreml.export import package_path

    for given in (tmp_path / "m.mlpackage", f"{tmp_path / 'm.mlpackage'}/", tmp_path / "m", f"{tmp_path / 'm'}/"):
        assert package_path(given) == str(tmp_path / "m.mlpackage"), given


def test_export_path_never_replaces_anything_but_a_package(decoder, tmp_path):
    """A path without the suffix gets it (and package_path says so); an existing package is
    replaced; a directory or file that is not one is refused before any work, and left alone."""
    model, ids, _ = decoder
    mlmodel = ff.coreml.export(model, (ids,), tmp_path / "bare", precision="fp32")
    assert mlmodel.package_path == str(tmp_path / "bare.mlpackage") and (tmp_path / "bare.mlpackage" / "Manifest.json").is_file()
    assert ff.coreml.export(model, (ids,), tmp_path / "bare", precision="fp32").package_path == mlmodel.package_path
    for victim in (tmp_path / "data.mlpackage", tmp_path / "notes.mlpackage"):
        if victim.name.startswith("data"):
            (victim / "sub").mkdir(parents=True)
            (victim / "important.txt").write_text("keep me")
        else:
            victim.write_text("keep me")
        with pytest.raises(ValueError, match=r"^\[export\] .* exists and is not a Core ML package"):
            ff.coreml.export(model, (ids,), victim)
    assert (tmp_path / "data.mlpackage" / "important.txt").read_text() == "keep me"
    assert (tmp_path / "notes.mlpackage").read_text() == "keep me"


@pytest.mark.parametrize("kwargs, match", [
    ({"flexible": {"input_idz": {1: (1, 64)}}}, r"flexible names input 'input_idz'; the inputs are \['input_ids'\]"),
    ({"flexible": {"input_ids": {5: (1, 64)}}}, r"flexible axis 5 of input 'input_ids' \(rank 2\) does not exist"),
    ({"flexible": {"input_ids": {1: (10, 64)}}}, r"flexible range \(10, 64\) of input 'input_ids' axis 1"),
    ({"kv_cache": True, "adapters": {"a": {}}}, r"adapters and kv_cache together are not supported"),
    ({"kv_cache": True, "flexible": {"input_ids": {1: (1, 64)}}}, r"flexible does not apply with kv_cache"),
    # iOS18 features below iOS18: refused up front (conversion failed late, or raised the package's version)
    ({"kv_cache": True, "target": "iOS17"}, r"target iOS17: kv_cache=True .* needs iOS18/macOS15 or later"),
    ({"adapters": {"a": {}}, "target": "macOS14"}, r"target macOS14: adapters .* needs iOS18/macOS15 or later"),
    ({"kv_cache": True, "target": ct.target.iOS16}, r"target iOS16: kv_cache=True"),
])
def test_export_rejects_bad_combinations(decoder, tmp_path, kwargs, match):
    model, ids, _ = decoder
    with pytest.raises(ValueError, match=r"^\[export\] " + match):
        ff.coreml.export(model, (ids,), tmp_path / "x.mlpackage", **kwargs)
    assert not (tmp_path / "x.mlpackage").exists()


@pytest.mark.parametrize("kwargs, match", [
    ({"attention": "flash"}, "attention must be one of"),
    ({"precision": "bf16"}, "precision must be one of"),
    ({"target": "iOS99"}, "unknown target"),
    ({"target": "iOS14"}, r"^\[export\] target iOS14 is too old: an ML program needs iOS15"),
])
def test_export_rejects_bad_options(decoder, tmp_path, kwargs, match):
    model, ids, _ = decoder
    with pytest.raises(ValueError, match=match):
        ff.coreml.export(model, (ids,), tmp_path / "x.mlpackage", **kwargs)


@pytest.mark.parametrize("case", ["decode-window", "lq>lk-empty-rows", "bool-mask-dead-row"])
def test_sdpa_lse_lowering(case, rng, tmp_path):
    b, hq, hkv, lq, lk, d, options = SDPA_CASES[case]
    q, k, v = _qkv(rng, b, hq, hkv, lq, lk, d)
    options = dict(options)
    if callable(options.get("mask")):
        options["mask"] = options["mask"](rng, lq, lk)
    expected_out, expected_lse = reference.sdpa(q, k, v, return_lse=True, **options)
    module = SdpaLseCall(**options).eval()
    mlmodel = ff.coreml.export(module, {"q": torch.from_numpy(q), "k": torch.from_numpy(k), "v": torch.from_numpy(v)},
                               tmp_path / "lse.mlpackage", precision="fp32")
    out = ff.coreml.verify(mlmodel, {"q": q, "k": k, "v": v})
    np.testing.assert_allclose(out["output_0"], expected_out, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(out["output_1"], expected_lse, atol=2e-5, rtol=1e-5)


class _DiffOnes(torch.nn.Module):
    def forward(self, x):
        d = torch.diff(x, prepend=x[:, :1] - 1, dim=-1)
        return d * x.new_ones((x.shape[0], 1))


def test_torch_ops_coremltools_lacks(rng, tmp_path):
    x = torch.from_numpy(rng.standard_normal((2, 6)).astype(np.float32))
    mlmodel = ff.coreml.export(_DiffOnes(), {"x": x}, tmp_path / "diff.mlpackage", precision="fp32")
    with torch.no_grad():
        expected = _DiffOnes()(x).numpy()
    np.testing.assert_allclose(ff.coreml.verify(mlmodel, {"x": x})["output"], expected, rtol=1e-6, atol=1e-6)


def test_bool_inputs_are_refused(tmp_path):
    with pytest.raises(TypeError, match="bool"):
        ff.coreml.export(_DiffOnes(), {"x": torch.ones(2, 3, dtype=torch.bool)}, tmp_path / "b.mlpackage")


def test_flexible_batch_with_grouped_query_attention(decoder, tmp_path):
    """A flexible batch with K/V heads repeated for GQA (the repeat's reshape cannot hold a
    symbolic batch as a constant); the declared range is enforced like Core ML does."""
    model, ids, _ = decoder
    mlmodel = ff.coreml.export(model, (ids.repeat(2, 1),), tmp_path / "batch.mlpackage", precision="fp32",
                               flexible={"input_ids": {0: (1, 4)}}, target=ct.target.iOS18)
    assert _op_types(mlmodel)["scaled_dot_product_attention"] == 2
    assert mlmodel.user_defined_metadata["fusedformer.target"] == "iOS18"  # (the enum's name, not "9")
    tokens = torch.randint(0, 97, (3, 9))
    with torch.no_grad():
        expected = model(tokens).numpy()
    assert psnr(expected, ff.coreml.verify(mlmodel, {"input_ids": tokens})["logits"]) >= 60
    with pytest.raises(ValueError, match=r"^\[verify\] input 'input_ids' has shape \(5, 9\); the program declares "
                                         r"shapes \(1\.\.4, 9\)"):
        ff.coreml.verify(mlmodel, {"input_ids": torch.zeros(5, 9, dtype=torch.long)})


class _TorchAttention(torch.nn.Module):
    """Attention written out in torch ops, as in a model ff.torch.optimize never saw."""

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


def test_fused_request_without_fused_ops_is_recorded_as_unfused(rng, tmp_path):
    q, k, v = (torch.from_numpy(t) for t in _qkv(rng, 1, 2, 2, 4, 4, 8))
    with pytest.warns(UserWarning, match=r"^\[export\] attention='fused' but the program has softmax and no "
                                         r"scaled_dot_product_attention op"):
        mlmodel = ff.coreml.export(_TorchAttention(), {"q": q, "k": k, "v": v}, tmp_path / "t.mlpackage",
                                   attention="fused", precision="fp32")
    assert mlmodel.fusedformer.attention == "unfused" and mlmodel.fusedformer.fused_attention_ops == 0
    assert mlmodel.user_defined_metadata["fusedformer.attention"] == "unfused"
    assert mlmodel.user_defined_metadata["fusedformer.fused_attention_ops"] == "0"
    # a program with no attention at all says so, and warns of nothing
    from fusedformer.coreml.export import ExportWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportWarning)
        plain = ff.coreml.export(_DiffOnes(), {"x": q[0, 0]}, tmp_path / "p.mlpackage", precision="fp32")
    assert plain.fusedformer.attention == "none"
