"""Compressed weights in Core ML: fusedformer::qmatmul -> constexpr_* ops; decompressed values
equal qw.dequantize() through the MIL interpreter."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import require

pytestmark = pytest.mark.coreml

ct = require("coremltools")
torch = require("torch")

from tests.coreml_models import ensure_qmatmul_op, psnr  # noqa: E402

import fusedformer as ff  # noqa: E402
from fusedformer import quant  # noqa: E402
from fusedformer.coreml.weights import constexpr_op_types  # noqa: E402
from fusedformer.torch.quantized_linear import QuantizedLinear  # noqa: E402

ensure_qmatmul_op()

SCHEMES = {
    "affine4-g32": quant.Affine(bits=4, group_size=32),
    "affine3-g32": quant.Affine(bits=3, group_size=32),
    "affine8-g64": quant.Affine(bits=8, group_size=64),
    "int8": quant.Int8(),
    "int8-zp": quant.Int8(zero_point=True),
    "lut4-tensor": quant.Palettize(bits=4),
    "lut2-grouped": quant.Palettize(bits=2, granularity="per_grouped_channel", group_size=4),
    "prune": quant.Prune(sparsity=0.5),
    "prune-lut": quant.Prune(sparsity=0.5, then=quant.Palettize(bits=3)),
    "prune-affine": quant.Prune(sparsity=0.5, then=quant.Affine(bits=4, group_size=32)),
}


def _weight_var(program):
    """The weight fed to the (single) linear, or to the matmul a pass made of it."""
    (op,) = [o for o in program._ops() if o.op_type in ("linear", "matmul")]
    return op.inputs["weight" if op.op_type == "linear" else "y"].name


@pytest.mark.parametrize("name", list(SCHEMES))
def test_qmatmul_lowering(name, rng, tmp_path):
    n, k = 16, 64
    w = rng.standard_normal((n, k)).astype(np.float32)
    qw = quant.compress(w, SCHEMES[name])
    bias = rng.standard_normal(n).astype(np.float32)
    module = QuantizedLinear(qw, torch.from_numpy(bias)).eval()
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    mlmodel = ff.coreml.export(module, {"x": torch.from_numpy(x)}, tmp_path / "q.mlpackage", precision="fp32")
    program = ff.coreml.Program.load(tmp_path / "q.mlpackage")
    ops = program.op_types()
    assert constexpr_op_types(qw) <= set(ops), ops
    assert ops["linear"] + ops["matmul"] == 1
    weight = _weight_var(program)
    out = program.predict({"x": x}, intermediates=[weight])
    expected_w = qw.dequantize()
    assert out[weight].dtype == np.float32 and np.array_equal(out[weight], expected_w)
    np.testing.assert_array_equal(out[weight].view(np.uint32), expected_w.view(np.uint32))  # bit for bit
    expected = x @ expected_w.T + bias
    np.testing.assert_allclose(out["output"], expected, rtol=1e-5, atol=1e-5)
    assert mlmodel is not None


def test_fp16_program_keeps_weights_compressed(rng, tmp_path):
    w = rng.standard_normal((16, 64)).astype(np.float32)
    qw = quant.compress(w, quant.Palettize(bits=4))
    module = QuantizedLinear(qw).eval()
    x = rng.standard_normal((1, 64)).astype(np.float32)
    ff.coreml.export(module, {"x": torch.from_numpy(x)}, tmp_path / "q16.mlpackage", precision="fp16")
    program = ff.coreml.Program.load(tmp_path / "q16.mlpackage")
    (lut_op,) = [o for o in program._ops() if o.op_type == "constexpr_lut_to_dense"]
    assert lut_op.outputs[0].dtype == ct.converters.mil.mil.types.fp16
    out = program.predict({"x": x}, intermediates=[_weight_var(program)])
    np.testing.assert_array_equal(out[_weight_var(program)], qw.dequantize().astype(np.float16))
    assert psnr(x @ qw.dequantize().T, out["output"]) > 50


@pytest.mark.parametrize("precision, min_psnr", [("fp32", 60), ("fp16", 35)])
def test_optimized_decoder_with_compressed_weights(tmp_path, precision, min_psnr):
    from fusedformer.coreml.models import tiny_llama

    model = tiny_llama(dim=64, seed=4)
    ff.torch.optimize(model, attention=None, weights=quant.Affine(bits=4, group_size=32))
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        expected = model(ids).numpy()  # native qmatmul kernels
    mlmodel = ff.coreml.export(model, (ids,), tmp_path / "q.mlpackage", precision=precision)
    ops = ff.coreml.Program.load(mlmodel).op_types()
    assert ops["constexpr_blockwise_shift_scale"] == 2 * 7  # every block linear; lm_head kept
    assert ops["scaled_dot_product_attention"] == 2
    assert psnr(expected, ff.coreml.verify(mlmodel, {"input_ids": ids})["logits"]) >= min_psnr


def test_prune_affine_package_holds_the_weight_once(rng, tmp_path):
    """The exact Prune + Affine form stores the mask once (shared by both constexprs) and no dense
    bias: the package is the compressed weight plus a few KiB of program, not one more mask."""
    from fusedformer.coreml.multifunction import package_size

    n, k = 256, 512
    qw = quant.compress(rng.standard_normal((n, k)).astype(np.float32),
                        quant.Prune(sparsity=0.5, then=quant.Affine(bits=4, group_size=32)))
    x = rng.standard_normal((1, k)).astype(np.float32)
    path = tmp_path / "pa.mlpackage"
    ff.coreml.export(QuantizedLinear(qw).eval(), {"x": torch.from_numpy(x)}, path, precision="fp32")
    mask_bytes = n * k // 8
    assert package_size(path) - qw.nbytes < mask_bytes, (package_size(path), qw.nbytes)


def test_compressed_weights_below_ios18_are_refused_up_front(rng, tmp_path, monkeypatch):
    qw = quant.compress(rng.standard_normal((16, 64)).astype(np.float32), quant.Int8())
    monkeypatch.setattr(torch.jit, "trace", None)  # refused before any tracing
    with pytest.raises(ValueError, match=r"^\[export\] target iOS17: compressed weights .* needs iOS18"):
        ff.coreml.export(QuantizedLinear(qw, None).eval(), {"x": torch.randn(2, 64)}, tmp_path / "q.mlpackage",
                         target="iOS17")
