"""Multifunction adapters: one package, a function per adapter, shared weights stored once."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import require

pytestmark = [pytest.mark.coreml, pytest.mark.slow]  # seven conversions

ct = require("coremltools")
torch = require("torch")

from tests.coreml_models import TinyDecoder, ensure_ops, psnr  # noqa: E402

import fusedformer as ff  # noqa: E402
from fusedformer.coreml.multifunction import package_size, weights_size  # noqa: E402

ensure_ops()

# each adapter replaces the first layer's query and value projections (a merged LoRA)
ADAPTED = ("blocks.0.attn.q.weight", "blocks.0.attn.v.weight")


def _adapter(model, seed):
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    return {k: sd[k] + 0.1 * torch.randn(sd[k].shape, generator=g) for k in ADAPTED}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(2)
    model = TinyDecoder(vocab=97, dim=64, heads=4, kv_heads=2, layers=2).eval()
    ids = torch.randint(0, 97, (1, 6))
    adapters = {"chat": _adapter(model, 1), "code": _adapter(model, 2)}
    tmp = tmp_path_factory.mktemp("mf")
    ff.coreml.export(model, (ids,), tmp / "single.mlpackage", precision="fp32")
    multi = ff.coreml.export(model, (ids,), tmp / "multi.mlpackage", precision="fp32", adapters=adapters)
    # the returned MLModel reads its weights from the saved package
    assert sorted(ff.coreml.Program.load(multi).functions) == ["chat", "code", "main"]
    return model, ids, adapters, tmp


def test_one_function_per_adapter_each_correct(exported):
    model, ids, adapters, tmp = exported
    path = tmp / "multi.mlpackage"
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    assert sorted(ff.coreml.Program.load(path).functions) == ["chat", "code", "main"]
    for name, sd in [("main", {})] + list(adapters.items()):
        model.load_state_dict({**base_state, **sd})
        with torch.no_grad():
            expected = model(ids).numpy()
        model.load_state_dict(base_state)
        out = ff.coreml.verify(path, {"input_ids": ids}, function_name=name)["logits"]
        assert psnr(expected, out) >= 60, name
    # the export left the torch model as it was
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())


def test_package_is_one_model_plus_adapters(exported):
    _, _, adapters, tmp = exported
    adapter_bytes = sum(4 * t.numel() for sd in adapters.values() for t in sd.values())  # fp32
    # weights: the base once plus each adapter's tensors (64-byte blob alignment as slack)
    single, multi = weights_size(tmp / "single.mlpackage"), weights_size(tmp / "multi.mlpackage")
    assert single <= multi <= single + adapter_bytes + 64 * 16, (single, multi, adapter_bytes)
    # the whole package adds one program text per function (large only for toy models like this)
    assert package_size(tmp / "multi.mlpackage") < 2 * package_size(tmp / "single.mlpackage")


def test_bad_adapters_are_refused(exported, tmp_path):
    model, ids, _, _ = exported
    with pytest.raises(ValueError, match="lacks"):
        ff.coreml.export(model, (ids,), tmp_path / "x.mlpackage", adapters={"a": {"nope.weight": torch.zeros(1)}})
    with pytest.raises(ValueError, match="reserved"):
        ff.coreml.export(model, (ids,), tmp_path / "x.mlpackage", adapters={"main": {}})
