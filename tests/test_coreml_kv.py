"""Stateful KV-cache export: fp16 cache states, flexible length, greedy decode via the interpreter."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import require

pytestmark = pytest.mark.coreml

ct = require("coremltools")
torch = require("torch")

from tests.coreml_models import TinyDecoder, ensure_ops, psnr  # noqa: E402

import fusedformer as ff  # noqa: E402
from fusedformer.coreml.kv_cache import greedy_decode  # noqa: E402

ensure_ops()


def torch_greedy(model, ids, steps):
    """Greedy tokens by recomputing the whole sequence every step (no cache): the oracle."""
    tokens = []
    for _ in range(steps):
        with torch.no_grad():
            token = model(ids)[:, -1].argmax(-1)
        tokens.append(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
    return torch.stack(tokens, dim=1).numpy()


@pytest.fixture(scope="module")
def stateful(tmp_path_factory):
    torch.manual_seed(1)
    model = TinyDecoder(vocab=97, dim=32, heads=4, kv_heads=2, layers=2).eval()
    ids = torch.randint(0, 97, (1, 5))
    path = tmp_path_factory.mktemp("kv") / "decoder.mlpackage"
    mlmodel = ff.coreml.export(model, (ids,), path, kv_cache=True, precision="fp32")
    return model, ids, path, mlmodel


def test_program_has_states_and_flexible_inputs(stateful):
    _, _, path, mlmodel = stateful
    program = ff.coreml.Program.load(path)
    assert program.state_names == ["k_cache", "v_cache"]
    assert program.input_names == ["input_ids", "attention_mask"]
    ops = program.op_types()
    assert ops["slice_update"] == 4 and ops["coreml_update_state"] == 4 and ops["read_state"] == 2
    assert ops["scaled_dot_product_attention"] == 2
    assert ops["reduce_max"] == 0  # no empty-row guard: a decoder never has more queries than keys
    state = program.make_state()
    assert all(s.dtype == np.float16 and s.shape == (2, 1, 2, 256, 8) for s in state.values())
    spec = mlmodel.get_spec()
    assert [s.name for s in spec.description.state] == ["k_cache", "v_cache"]


def test_prefill_then_decode_matches_torch(stateful):
    model, ids, path, _ = stateful
    program = ff.coreml.Program.load(path)
    state = program.make_state()
    # prefill 5 tokens, then one more token: logits of the last position equal torch's
    prefill = program.predict({"input_ids": ids.numpy(), "attention_mask": np.ones((1, 5), np.int32)}, state)
    with torch.no_grad():
        expected = model(ids).numpy()
    assert psnr(expected, prefill["logits"]) >= 60  # fp16 cache read back: still tight
    nxt = torch.tensor([[7]])
    step = program.predict({"input_ids": nxt.numpy(), "attention_mask": np.ones((1, 6), np.int32)}, state)
    with torch.no_grad():
        expected = model(torch.cat([ids, nxt], 1))[:, -1:].numpy()
    assert psnr(expected, step["logits"]) >= 60
    assert np.abs(state["k_cache"][:, :, :, 6:]).max() == 0  # nothing written past the 6 tokens


def test_greedy_decode_matches_torch(stateful):
    model, ids, path, _ = stateful
    np.testing.assert_array_equal(greedy_decode(path, ids.numpy(), steps=8), torch_greedy(model, ids, 8))


def test_kv_cache_needs_the_protocol(tmp_path):
    with pytest.raises(TypeError, match="kv_cache_config"):
        ff.coreml.export(torch.nn.Linear(4, 4), (torch.zeros(1, 4),), tmp_path / "x.mlpackage", kv_cache=True)


def test_inputs_past_max_len_are_refused(stateful):
    """Core ML refuses inputs beyond their declared range (1..max_len); the interpreter did not,
    and then dropped the K/V it could not write (wrong logits, no error)."""
    _, _, path, mlmodel = stateful
    program = ff.coreml.Program.load(path)
    ids, mask = np.zeros((1, 2), np.int32), np.ones((1, 257), np.int32)
    with pytest.raises(ValueError, match=r"^\[verify\] input 'attention_mask' has shape \(1, 257\); the program "
                                         r"declares shapes \(1, 1\.\.256\)"):
        program.predict({"input_ids": ids, "attention_mask": mask}, program.make_state())
    # without the package's description (no declared ranges): the cache length still bounds it
    bare = ff.coreml.Program(mlmodel._mil_program)
    with pytest.raises(ValueError, match=r"^\[verify\] attention_mask has length 257: .* max_len=256"):
        bare.predict({"input_ids": ids, "attention_mask": mask}, bare.make_state())
    with pytest.raises(ValueError, match=r"^\[verify\] greedy_decode: a prompt of 250 tokens and 8 steps need 257 "
                                         r"cache positions; the export's max_len is 256"):
        greedy_decode(program, np.zeros((1, 250), np.int32), steps=8)


def test_bad_state_and_steps_are_named(stateful):
    """A state missing, of another shape or dtype, or passed as an input, and steps < 1, are
    [verify] errors (they were a KeyError, an error deep in slice_update, silently fp32 state, an
    ignored input, and numpy's "need at least one array")."""
    _, _, path, _ = stateful
    program = ff.coreml.Program.load(path)
    inputs = {"input_ids": np.array([[1]], np.int32), "attention_mask": np.ones((1, 1), np.int32)}
    fresh = program.make_state()
    with pytest.raises(ValueError, match=r"^\[verify\] state must hold \['k_cache', 'v_cache'\]; got \['k_cache'\]"):
        program.predict(inputs, {"k_cache": fresh["k_cache"]})
    for bad in (fresh["k_cache"][..., :4].copy(), fresh["k_cache"].astype(np.float32)):
        with pytest.raises(ValueError, match=r"^\[verify\] state 'k_cache' must be a float16 ndarray of shape"):
            program.predict(inputs, {**fresh, "k_cache": bad})
    with pytest.raises(ValueError, match=r"unexpected \['k_cache'\] \(\['k_cache'\] are states: pass them in state=\)"):
        program.predict({**inputs, "k_cache": fresh["k_cache"]}, program.make_state())
    for steps in (0, -3, 1.5):
        with pytest.raises(ValueError, match=r"^\[verify\] greedy_decode: steps must be an int >= 1"):
            greedy_decode(program, [[1, 2]], steps=steps)


def test_slice_update_past_the_cache_is_an_error(stateful, monkeypatch):
    """The last line of defence: a cache write out of bounds raises instead of writing nothing."""
    from fusedformer.coreml import kv_cache

    _, _, _, mlmodel = stateful
    bare = ff.coreml.Program(mlmodel._mil_program)
    state = bare.make_state()
    monkeypatch.setattr(kv_cache, "check_decoder_inputs", lambda *args: None)  # (no input checks left)
    with pytest.raises(ValueError, match=r"^\[verify\] slice_update .* out of bounds"):
        bare.predict({"input_ids": np.zeros((1, 1), np.int32),
                      "attention_mask": np.ones((1, kv_cache.cache_length(bare) + 1), np.int32)}, state)


def test_padding_and_short_masks_are_refused(stateful):
    """The export reads only the mask's length: zeros (padding) would silently be ignored."""
    _, _, path, _ = stateful
    program = ff.coreml.Program.load(path)
    ids = np.array([[5, 6, 7]], np.int32)
    with pytest.raises(ValueError, match=r"^\[verify\] attention_mask has values other than 1: padding is not "
                                         r"supported by the stateful"):
        program.predict({"input_ids": ids, "attention_mask": np.array([[0, 0, 1]], np.int32)}, program.make_state())
    with pytest.raises(ValueError, match=r"^\[verify\] attention_mask has length 2, shorter than input_ids \(3\)"):
        program.predict({"input_ids": ids, "attention_mask": np.ones((1, 2), np.int32)}, program.make_state())
    # the package says so too
    descriptions = {f.name: f.shortDescription for f in stateful[3].get_spec().description.input}
    assert "padding is not supported" in descriptions["attention_mask"]


def test_verify_stateful_prefill_then_decode(stateful):
    """verify() makes fresh states when given none (a prefill), and decodes on with the caller's."""
    model, ids, path, _ = stateful
    mask = np.ones((1, 5), np.int32)
    prefill = ff.coreml.verify(path, {"input_ids": ids, "attention_mask": mask})["logits"]
    state = ff.coreml.Program.load(path).make_state()
    np.testing.assert_array_equal(
        ff.coreml.verify(path, {"input_ids": ids, "attention_mask": mask}, state=state)["logits"], prefill)
    step = ff.coreml.verify(path, {"input_ids": np.array([[7]]), "attention_mask": np.ones((1, 6), np.int32)},
                            state=state)["logits"]
    with torch.no_grad():
        expected = model(torch.cat([ids, torch.tensor([[7]])], 1))[:, -1:].numpy()
    assert psnr(expected, step) >= 60
