"""torch integration: fusedformer::qmatmul (custom op + fake) and QuantizedLinear."""

from __future__ import annotations

import io

import numpy as np
import pytest

import fusedformer as ff
from fusedformer.quant import Affine, Int8, Palettize, Prune

from tests.conftest import require

pytestmark = pytest.mark.torch
torch = require("torch")

from fusedformer.torch.quantized_linear import QuantizedLinear  # noqa: E402

SCHEMES = [Affine(4, 32), Affine(3, 64), Int8(), Palettize(4, "per_grouped_channel", 8), Prune(0.5, then=Affine(4, 64))]


@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
@pytest.mark.parametrize("bias", [True, False])
def test_quantized_linear_matches_dequantized(scheme, bias, rng):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 40, bias=bias)
    q = QuantizedLinear.from_linear(lin, scheme)
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x.double(), q.dequantized_weight().double(),
                                         None if lin.bias is None else lin.bias.double())
        y = q(x)
    assert y.shape == (2, 5, 40) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    assert q.weight_nbytes < lin.weight.numel() * 4


@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
def test_state_dict_roundtrip(scheme):
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 24)
    q = QuantizedLinear.from_linear(lin, scheme)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    other = QuantizedLinear.from_linear(torch.nn.Linear(64, 24), Int8())  # another scheme
    other.load_state_dict(torch.load(buf))
    assert other.scheme == q.scheme
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(other(x), q(x), rtol=0, atol=0)
    assert any(k.endswith("w_meta") for k in q.state_dict())


def test_copy_and_pickle_after_a_call():
    """A module that has run (its kernel cache holds a _C.QMatmulPlan) still deep-copies and
    pickles whole (torch.save of the module), and the copies compute the same."""
    import copy

    torch.manual_seed(5)
    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 24), Affine(4, 32))
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = q(x)
        assert q._kernel_cache is not None
        buf = io.BytesIO()
        torch.save(q, buf)
        buf.seek(0)
        for other in (copy.deepcopy(q), torch.load(buf, weights_only=False)):
            torch.testing.assert_close(other(x), want, rtol=0, atol=0)
        torch.testing.assert_close(q(x), want, rtol=0, atol=0)


def test_op_fake_and_compile_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 24, bias=False), Affine(4, 32))
    with FakeTensorMode() as mode:
        x = torch.empty(7, 64)
        parts = [mode.from_tensor(p) for p in q._parts()]
        y = torch.ops.fusedformer.qmatmul(x, parts, q._meta)
    assert y.shape == (7, 24)
    torch.library.opcheck(torch.ops.fusedformer.qmatmul.default, (torch.randn(3, 64), q._parts(), q._meta),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("scheme", [Affine(4, 32), Int8()], ids=["affine4", "int8"])
def test_qmatmul_compiles_as_one_graph(scheme):
    """ff.qmatmul on a weight held by the caller, under torch.compile(fullgraph=True): Dynamo could
    not trace json.dumps of the meta nor ndarray.dtype of the parts."""
    rng = np.random.default_rng(3)
    weights = [ff.quant.compress(rng.standard_normal((n, 64)).astype(np.float32), scheme) for n in (24, 16, 24)]
    x = torch.randn(5, 64)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t, qw: ff.qmatmul(t, qw), backend="aot_eager", fullgraph=True)
    for qw in weights + weights[:1]:  # (another weight is not served the first one's constants)
        torch.testing.assert_close(compiled(x, qw), ff.qmatmul(x, qw), rtol=0, atol=0)


def test_meta_tensors_take_the_shape_function():
    """x on the meta device (shape-only model building) gives y's shape, as nn.Linear does; the
    eager path used to refuse it as not on the CPU."""
    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 24), Affine(4, 32))
    y = q(torch.empty(5, 64, device="meta"))
    assert y.shape == (5, 24) and y.device.type == "meta"


def test_forward_mode_ad_is_refused_not_dropped():
    import torch.autograd.forward_ad as fwad

    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 8), Int8())
    x = torch.randn(2, 64)
    with fwad.dual_level():
        dual = fwad.make_dual(x, torch.randn_like(x))
        with pytest.raises(NotImplementedError, match=r"^\[qmatmul\] forward-mode AD is not implemented: x carries"):
            q(dual)
        with pytest.raises(NotImplementedError, match=r"^\[qmatmul\] forward-mode AD"):
            ff.qmatmul(dual, q.quantized_weight())
        torch.testing.assert_close(q(x), torch.nn.functional.linear(x, q.dequantized_weight(), q.bias), rtol=1e-5, atol=1e-5)


def test_torch_func_jvp_is_refused():
    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 8), Int8())
    x = torch.randn(2, 64)
    qw = q.quantized_weight()
    for f in (q, lambda x: ff.qmatmul(x, qw)):
        with pytest.raises(NotImplementedError, match=r"^\[qmatmul\] torch.func transforms"):
            torch.func.jvp(f, (x,), (torch.randn_like(x),))


def test_backward_raises_clearly():
    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 8), Int8())
    x = torch.randn(2, 64, requires_grad=True)
    y = q(x)
    with pytest.raises(NotImplementedError, match=r"\[qmatmul\] backward is not implemented"):
        y.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_activations(dtype):
    torch.manual_seed(2)
    lin = torch.nn.Linear(64, 16)
    q = QuantizedLinear.from_linear(lin, Palettize(4))
    x = torch.randn(4, 64)
    with torch.no_grad():
        y = q(x.to(dtype))
        ref = q(x.to(dtype).float())  # the same rounded activations in fp32
    assert y.dtype == dtype
    # two roundings (the matmul's output, then the bias added in the dtype): an ulp of the largest
    # terms, 2^-10 (fp16) or 2^-8 (bf16) of them
    eps = 2.0 ** (-10 if dtype == torch.float16 else -8)
    torch.testing.assert_close(y.float(), ref, rtol=eps, atol=eps * float(ref.abs().max()))


def test_ff_qmatmul_on_tensors(rng):
    import fusedformer as ff
    from fusedformer.quant import compress

    w = rng.standard_normal((20, 64)).astype(np.float32)
    qw = compress(w, Affine(4, 64))
    x = torch.randn(3, 64)
    y = ff.qmatmul(x, qw)
    assert isinstance(y, torch.Tensor)
    np.testing.assert_allclose(y.numpy(), x.numpy() @ qw.dequantize().T, rtol=1e-5, atol=1e-5)


# Pruned weights both ways: affine survivors and raw fp32 ones (codes kind 3).
PLAN_SCHEMES = SCHEMES + [Affine(8, 64), Palettize(2), Prune(0.5)]


@pytest.mark.parametrize("scheme", PLAN_SCHEMES, ids=repr)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_plan_matches_the_general_path(scheme, dtype, isa, threads):
    """QuantizedLinear's eager call through _C.QMatmulPlan (the weight described once) gives
    qmatmul_tensor's bits, in x's dtype, for x of any leading shape and for rows one stride
    apart but further than K (a slice of a wider tensor); x is left unchanged."""
    from fusedformer.ops_attention import HUGEPAGE_MIN_BYTES
    from fusedformer.ops_quant import qmatmul_tensor

    torch.manual_seed(3)
    dt = getattr(torch, dtype)
    q = QuantizedLinear.from_linear(torch.nn.Linear(128, 40, bias=False), scheme)
    args, plan = q._cached_kernel(q._parts())
    assert plan is not None
    xs = [torch.randn(128), torch.randn(1, 128), torch.randn(2, 3, 128), torch.randn(3, 1, 128),
          torch.randn(2, 3, 160)[..., 16:144], torch.randn(33, 128)]
    for x in (x.to(dt) for x in xs):
        before = x.clone()
        y = plan.torch(x, HUGEPAGE_MIN_BYTES)
        assert y is not None and y.dtype == dt and y.shape == (*x.shape[:-1], 40) and y.is_contiguous()
        torch.testing.assert_close(y, qmatmul_tensor(x, None, args), rtol=0, atol=0)
        assert torch.equal(x, before)
        with torch.no_grad():
            torch.testing.assert_close(q(x), y, rtol=0, atol=0)


def test_plan_declines_the_rest():
    """_C.QMatmulPlan.torch returns None, running nothing, for every x it does not take, which
    QuantizedLinear then sends down qmatmul_tensor (the same result); a bad weight description
    is the binding's ValueError."""
    from fusedformer import _C
    from fusedformer.ops_attention import HUGEPAGE_MIN_BYTES

    torch.manual_seed(4)
    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 8, bias=False), Affine(4, 32))
    args, plan = q._cached_kernel(q._parts())
    x = torch.randn(3, 64)
    assert plan.torch(x, HUGEPAGE_MIN_BYTES) is not None
    declined = [
        x.double(),  # another dtype
        x.clone().requires_grad_(),  # autograd to record
        torch.nn.Parameter(x.clone()),  # a subclass
        torch.randn(64, 3).t(),  # the last dimension not contiguous
        torch.randn(3, 2, 64).transpose(0, 1),  # rows not one stride apart
        x[:, None].expand(3, 2, 64),  # a broadcast row (stride 0)
        torch.randn(3, 32),  # K does not match
        torch.randn(0, 64),  # no rows
    ]
    for bad in declined:
        assert plan.torch(bad, HUGEPAGE_MIN_BYTES) is None
        if bad.dtype == torch.float32 and bad.shape[-1] == 64 and bad.numel():
            with torch.no_grad():
                torch.testing.assert_close(q(bad), q(bad.detach().contiguous()), rtol=0, atol=0)
    assert plan.torch(x, 3 * 8 * 4) is None  # an output at the limit (the output cache's)
    assert plan.torch(x.numpy(), HUGEPAGE_MIN_BYTES) is None
    with pytest.raises(ValueError, match=r"\[qmatmul\] bad affine bits/group"):
        _C.QMatmulPlan(*args._replace(bits=9))


def test_qmatmul_takes_nested_lists_as_numpy_does():
    """ff.qmatmul converts sequences as ff.sdpa does: float64 then gets the named dtype error."""
    import fusedformer as ff
    from fusedformer.quant import compress

    qw = compress(np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32), Int8())
    with pytest.raises(TypeError, match=r"^\[qmatmul\] x must be float32 or float16 \(numpy\), got float64"):
        ff.qmatmul([[1.0] * 32], qw)



def test_reading_the_dense_weight_says_what_to_do():
    """Model code that reads .weight of a compressed layer (as WavLM's attention does) gets an
    AttributeError naming the fix; hasattr and getattr with a default behave as for any module
    without one."""
    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 24), Int8())
    with pytest.raises(AttributeError, match=r"\[QuantizedLinear\] a compressed layer has no dense \.weight.*skip="):
        q.weight.dtype
    assert not hasattr(q, "weight") and getattr(q, "weight", None) is None
    assert q.w_scales.dtype == torch.float32  # (buffers still found)
