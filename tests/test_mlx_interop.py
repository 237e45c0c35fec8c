"""One QuantizedWeight serves numpy, torch and MLX with the same dequantized values; a torch
model optimized by ff.torch.optimize converts to MLX without re-quantization."""

from __future__ import annotations

import numpy as np
import pytest

import fusedformer as ff
from fusedformer import reference
from tests.conftest import require

pytestmark = [pytest.mark.mlx, pytest.mark.torch]
mx = require("mlx")
torch = require("torch")
import mlx.nn as nn  # noqa: E402

from fusedformer.quant import Affine, Int8, Palettize, Prune, QuantizedWeight, compress  # noqa: E402
from fusedformer.mlx.linear import MLXWeight, QuantizedLinear, quantized_weights_from_state_dict  # noqa: E402

SCHEMES = [Affine(4, 32), Affine(3, 64), Int8(), Int8(zero_point=True), Palettize(4),
           Palettize(2, "per_grouped_channel", 16), Prune(0.5), Prune(0.5, then=Affine(4, 32)),
           Prune(n_m=(2, 4), then=Palettize(3))]


def scheme_id(s):
    return repr(s).replace(" ", "")


def close_to_reference(y, x, w):
    want = reference.matmul_t(x, w)
    bound = 2e-6 * (np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T) + 1e-6
    assert (np.abs(np.asarray(y, np.float64) - want) <= bound).all()


@pytest.mark.parametrize("scheme", SCHEMES, ids=scheme_id)
def test_one_weight_three_frameworks(rng, scheme):
    qw = compress(rng.standard_normal((48, 128)).astype(np.float32), scheme)
    w = qw.dequantize()
    np.testing.assert_array_equal(np.array(MLXWeight.from_quantized(qw).dequantize()), w)
    x = rng.standard_normal((5, 128)).astype(np.float32)
    close_to_reference(ff.qmatmul(x, qw), x, w)
    close_to_reference(ff.qmatmul(torch.from_numpy(x), qw).numpy(), x, w)
    close_to_reference(np.array(ff.qmatmul(mx.array(x), qw)), x, w)


def test_safetensors_file_into_mlx(rng, tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    qw = compress(rng.standard_normal((32, 64)).astype(np.float32), Prune(0.5, then=Palettize(4)))
    path = tmp_path / "w.safetensors"
    safetensors_numpy.save_file(qw.to_dict(prefix="proj."), str(path))
    loaded = QuantizedWeight.from_dict(safetensors_numpy.load_file(str(path)), prefix="proj.")
    x = mx.array(rng.standard_normal((3, 64)).astype(np.float32))
    np.testing.assert_array_equal(np.array(QuantizedLinear(loaded)(x)), np.array(QuantizedLinear(qw)(x)))


@pytest.mark.parametrize("scheme", [Affine(4, 32), Int8(), Palettize(4), Prune(0.5, then=Affine(8, 32))],
                         ids=scheme_id)
def test_optimized_torch_model_to_mlx(rng, scheme):
    torch.manual_seed(0)
    tmodel = torch.nn.Sequential(torch.nn.Linear(128, 96), torch.nn.GELU(), torch.nn.Linear(96, 64, bias=False))
    ff.torch.optimize(tmodel, attention=None, weights=scheme, skip=())
    tlayers = {"0": tmodel[0], "2": tmodel[2]}
    assert all(type(m).__name__ == "QuantizedLinear" for m in tlayers.values())

    # layer by layer, and through the state dict (what a safetensors file of the torch model holds)
    from_layers = {p: QuantizedLinear.from_torch(m) for p, m in tlayers.items()}
    from_state = quantized_weights_from_state_dict(tmodel.state_dict())
    assert sorted(from_state) == ["0", "2"]
    for p, tlayer in tlayers.items():
        want = tlayer.dequantized_weight().numpy()
        np.testing.assert_array_equal(np.array(from_layers[p].qweight.dequantize()), want)
        np.testing.assert_array_equal(np.array(MLXWeight.from_quantized(from_state[p]).dequantize()), want)

    mmodel = nn.Sequential(from_layers["0"], nn.GELU(approx="none"), from_layers["2"])
    x = rng.standard_normal((4, 128)).astype(np.float32)
    with torch.no_grad():
        want = tmodel(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.array(mmodel(mx.array(x))), want, atol=1e-5, rtol=1e-5)
