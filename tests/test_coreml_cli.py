"""`fusedformer export` / `fusedformer verify` pieces (fusedformer.coreml.cli)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from tests.conftest import require

pytestmark = pytest.mark.coreml

ct = require("coremltools")
torch = require("torch")

from fusedformer.coreml import cli  # noqa: E402


def _parse(add, argv):
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(argv)


def test_export_then_verify_tiny_llama(tmp_path, capsys):
    out = tmp_path / "tiny.mlpackage"
    args = _parse(cli.add_export_arguments, ["tiny-llama", "--out", str(out), "--seq-len", "6", "--precision", "fp32"])
    assert cli.run_export(args) == 0
    err = capsys.readouterr().err
    assert "scaled_dot_product_attention 2" in err and "saved" in err
    ids = np.arange(6, dtype=np.int32)[None]
    np.savez(tmp_path / "in.npz", input_ids=ids)
    args = _parse(cli.add_verify_arguments, [str(out), "--inputs", str(tmp_path / "in.npz"), "--json",
                                             "--save", str(tmp_path / "out.npz")])
    assert cli.run_verify(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["outputs"]["logits"]["shape"] == [1, 6, 97]
    from fusedformer.coreml.models import tiny_llama

    with torch.no_grad():
        expected = tiny_llama()(torch.from_numpy(ids).long()).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "out.npz")["logits"], expected, atol=1e-4)
    # inputs the program does not take: a message and exit status 1, no traceback
    for name, bad in (("missing", {"tokens": ids}), ("long", {"input_ids": np.zeros((1, 7), np.int32)})):
        np.savez(tmp_path / f"{name}.npz", **bad)
        args = _parse(cli.add_verify_arguments, [str(out), "--inputs", str(tmp_path / f"{name}.npz")])
        assert cli.run_verify(args) == 1, name
        assert "fusedformer verify: [verify] input" in capsys.readouterr().err, name
    args = _parse(cli.add_verify_arguments, [str(out), "--inputs", str(tmp_path / "none.npz")])
    assert cli.run_verify(args) == 2
    assert "no such --inputs file" in capsys.readouterr().err
    # a function the package does not have: a usage error
    assert cli.run_verify(_parse(cli.add_verify_arguments, [str(out), "--function", "nope"])) == 2
    assert "[verify] the program has no function 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("weights", [w if w == "affine4" else pytest.param(w, marks=pytest.mark.slow)
                                     for w in cli.WEIGHT_EXAMPLES])
def test_export_tiny_llama_with_every_weight_scheme(weights, tmp_path, capsys):
    """tiny-llama fits every --weights choice (its dim was 32, under the affine groups of 64)."""
    out = tmp_path / "w.mlpackage"
    args = _parse(cli.add_export_arguments, ["tiny-llama", "--out", str(out), "--seq-len", "4", "--weights", weights])
    assert cli.run_export(args) == 0, capsys.readouterr().err
    assert "saved" in capsys.readouterr().err


@pytest.mark.slow
def test_export_kv_cache_and_verify_random_inputs(tmp_path, capsys):
    out = tmp_path / "kv.mlpackage"
    args = _parse(cli.add_export_arguments, ["tiny-llama", "--out", str(out), "--seq-len", "4", "--kv-cache",
                                             "--max-len", "32"])
    assert cli.run_export(args) == 0
    assert "states ['k_cache', 'v_cache']" in capsys.readouterr().err
    assert cli.run_verify(_parse(cli.add_verify_arguments, [str(out), "--seq-len", "3"])) == 0
    assert "logits: [1, 3, 97]" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--kv-cache"], ["--weights", "int8"], ["--adapter", "a=missing.pt"]])
def test_export_refuses_ios18_features_below_ios18_before_loading(tmp_path, flags, monkeypatch):
    monkeypatch.setattr(cli, "_load_model", None)  # refused before loading the model
    args = _parse(cli.add_export_arguments, ["tiny-llama", "--out", str(tmp_path / "x.mlpackage"),
                                             "--target", "iOS17"] + flags)
    with pytest.raises(ValueError, match=r"^\[export\] target iOS17: .* needs iOS18/macOS15 or later"):
        cli.run_export(args)


def test_verify_missing_package(tmp_path):
    assert cli.run_verify(_parse(cli.add_verify_arguments, [str(tmp_path / "none.mlpackage")])) == 2


def test_bench_coreml_needs_macos(capsys, tmp_path):
    import platform

    from fusedformer.cli import main

    if platform.system() == "Darwin":
        pytest.skip("this checks the message off macOS")
    assert main(["bench", "coreml", str(tmp_path / "a.mlpackage"), "--no-save"]) != 0
    assert "needs macOS" in capsys.readouterr().err


@pytest.mark.slow
def test_export_hf_directory_with_kv_cache_and_adapter(tmp_path, capsys):
    transformers = require("transformers")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "llama")
    out = tmp_path / "llama.mlpackage"
    args = _parse(cli.add_export_arguments, [str(tmp_path / "llama"), "--out", str(out), "--seq-len", "4",
                                             "--kv-cache", "--max-len", "16"])
    assert cli.run_export(args) == 0
    assert "states ['k_cache', 'v_cache']" in capsys.readouterr().err
    # an adapter file: the first layer's query projection, changed
    w = model.model.layers[0].self_attn.q_proj.weight.detach()
    save_file({"model.layers.0.self_attn.q_proj.weight": (w + 0.1).contiguous()}, tmp_path / "a.safetensors")
    out = tmp_path / "multi.mlpackage"
    args = _parse(cli.add_export_arguments, [str(tmp_path / "llama"), "--out", str(out), "--seq-len", "4",
                                             "--adapter", f"tuned={tmp_path / 'a.safetensors'}"])
    assert cli.run_export(args) == 0
    err = capsys.readouterr().err
    assert "functions ['main', 'tuned']" in err, err[-1500:]
    assert cli.run_verify(_parse(cli.add_verify_arguments, [str(out), "--function", "tuned", "--seq-len", "4"])) == 0


def test_verify_unreadable_package_is_a_usage_error(tmp_path, capsys):
    """An empty directory or a junk file: one tagged line naming the path, exit 2, no traceback."""
    empty = tmp_path / "e.mlpackage"
    empty.mkdir()
    junk = tmp_path / "j.mlpackage"
    junk.write_bytes(b"junk")
    for path in (empty, junk):
        assert cli.run_verify(_parse(cli.add_verify_arguments, [str(path)])) == 2, path
        err = capsys.readouterr().err
        line = next(x for x in err.splitlines() if "[verify]" in x)
        assert line.startswith(f"fusedformer verify: [verify] cannot read {str(path)!r}"), err
