"""ff.sdpa on torch tensors: dtypes (bf16 included), layouts, the fusedformer::sdpa custom ops
under torch.compile / torch.export, and the refused backward."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import fusedformer as ff
from fusedformer import reference

from tests.conftest import require

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def torch():
    return require("torch")


def qkv(torch, b, hq, hkv, lq, lk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=g).to(dtype) for s in ((b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, d)))


def ref_of(q, k, v, **opts):
    return reference.sdpa(*(t.float().numpy() for t in (q, k, v)), **opts)


def torch_sdpa_err(torch, q, k, v, ref, *, causal=False, window=None):
    """Max error of torch's own SDPA in q's dtype (explicit bool mask, live rows only)."""
    import torch.nn.functional as F

    allowed = torch.from_numpy(reference.sdpa_mask(q.shape[2], k.shape[2], causal=causal, window=window))
    g = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=allowed)
    live = allowed.any(-1).numpy()
    return np.abs(out.float().numpy() - ref)[:, :, live].max()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize(
    "shape, opts",
    [
        ((1, 8, 2, 65, 130, 64), dict(causal=True)),
        ((2, 4, 4, 1, 700, 128), dict()),
        ((1, 7, 1, 33, 33, 80), dict(causal=True, window=9)),
        ((1, 4, 2, 20, 1100, 96), dict(window=300)),
        ((1, 8, 4, 3, 1100, 59), dict(causal=True)),
        # 32 pairs of 200 rows: fp16/bf16 blocks of 192 rows and a last of 8 on the avx2 ymm
        # tiles (fp32 blocks there stay at 96)
        ((2, 16, 16, 200, 130, 64), dict(causal=True)),
    ],
    ids=str,
)
def test_dtypes_vs_torch_error(torch, isa, dtype, shape, opts):
    """fp32 within 2e-5 of float64; fp16/bf16 error at most twice torch's own SDPA in that dtype."""
    dt = getattr(torch, dtype)
    q, k, v = qkv(torch, *shape, dt)
    out, lse = ff.sdpa(q, k, v, return_lse=True, **opts)
    assert out.dtype == dt and out.shape == q.shape and lse.dtype == torch.float32
    ref, ref_lse = ref_of(q, k, v, return_lse=True, **opts)
    err = np.abs(out.float().numpy() - ref).max()
    assert not torch.isnan(out).any()
    if dtype == "float32":
        assert err < 2e-5
    else:
        bound = 2 * torch_sdpa_err(torch, q, k, v, ref, **opts)
        assert err <= max(bound, 1e-3 if dtype == "float16" else 8e-3), (err, bound)
    live = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse.numpy()[live], ref_lse[live], atol=2e-3 if dtype != "float32" else 2e-5, rtol=1e-5)


# bf16 prefill blocks (more than 8 query rows): odd key counts, head dims that end mid-vector,
# a K/V row stride that is odd, masks and negative scales (the avx512_bf16 variant pairs
# head dims in Q K^T and keys in P V).
BF16_PREFILL = [
    ((1, 4, 2, 40, 3, 64), dict()),
    ((1, 2, 1, 33, 33, 34), dict(causal=True)),
    ((2, 3, 3, 17, 129, 58), dict(window=20)),
    ((1, 8, 2, 9, 65, 128), dict(causal=True)),
    ((1, 2, 2, 20, 31, 256), dict(scale=-0.2)),
    ((1, 4, 1, 12, 70, 80), dict(mask="bool")),
    ((1, 4, 4, 13, 97, 96), dict(mask="additive", causal=True)),
    # several row blocks per kv head (the avx512_amx variant packs K/V once per call), the last
    # one not a whole number of 16-row tiles, and a last key tile not a whole 32-key step
    ((1, 8, 2, 101, 300, 64), dict(causal=True)),
    ((1, 4, 1, 110, 520, 128), dict(mask="additive", window=200)),
    # 16 pairs of 200 rows: on the avx2 ymm tiles a block of 192 rows and a last of 8
    ((1, 32, 16, 100, 150, 128), dict(causal=True)),
    # scores of a few hundred (base 2) under a negative scale: a max taken on the wrong side
    # overflows 2^x
    ((1, 2, 2, 40, 70, 64), dict(scale=-40.0)),
    # a causal mask with the second batch row's first 300 keys padded: whole key tiles (AMX:
    # 256 keys) outside every row's kept range, skipped; two AMX row blocks per kv head
    ((2, 4, 1, 110, 520, 128), dict(mask="causal-padded")),
    ((2, 4, 1, 110, 520, 64), dict(mask="causal-padded-additive")),
    # random bool masks on the AMX tiles (head dims multiple of 32), read on registers
    ((1, 4, 1, 110, 300, 64), dict(mask="bool")),
    ((1, 8, 2, 50, 200, 128), dict(mask="bool", causal=True)),
    # a mask not contiguous along the keys (a transposed view): scores stored, then masked
    ((1, 4, 1, 110, 300, 64), dict(mask="bool-transposed")),
]


@pytest.mark.parametrize("odd_stride", [False, True], ids=["contiguous", "odd-row-stride"])
@pytest.mark.parametrize("shape, opts", BF16_PREFILL, ids=str)
def test_bf16_prefill_within_rounding(torch, isa, shape, opts, odd_stride):
    """Each output is within bf16 rounding of the float64 result on the same inputs: 2^-8 of
    its magnitude (the output's own rounding) plus 2^-8 max|v| (probabilities rounded to bf16)."""
    b, hq, hkv, lq, lk, d = shape
    opts = dict(opts)
    q, k, v = qkv(torch, *shape, torch.bfloat16)
    if odd_stride:  # rows of d + 1 elements, the last one unused
        k = torch.cat([k, torch.randn(b, hkv, lk, 1).bfloat16()], -1)[..., :d]
        v = torch.cat([v, torch.randn(b, hkv, lk, 1).bfloat16()], -1)[..., :d]
        assert k.stride(2) == d + 1
    kind = opts.pop("mask", None)
    if kind == "bool":
        opts["mask"] = torch.rand(b, 1, lq, lk) < 0.7
    elif kind == "additive":
        opts["mask"] = torch.randn(lq, lk)
    elif kind == "bool-transposed":
        opts["mask"] = (torch.rand(lk, lq) < 0.7).t()
    elif kind and kind.startswith("causal-padded"):
        keep = torch.ones(b, 1, lq, lk, dtype=torch.bool).tril(lk - lq)
        keep[-1, ..., :300] = False
        opts["mask"] = keep if kind == "causal-padded" else torch.randn(lq, lk).masked_fill(~keep, float("-inf"))
    out = ff.sdpa(q, k, v, **opts)
    ref_opts = {n: (o.numpy() if hasattr(o, "numpy") else o) for n, o in opts.items()}
    ref = ref_of(q, k, v, **ref_opts)
    assert not torch.isnan(out).any()
    bound = 2.0**-8 * (np.abs(ref) + np.abs(v.float().numpy()).max())
    excess = np.abs(out.float().numpy() - ref) - bound
    assert excess.max() <= 0, (excess.max(), np.unravel_index(excess.argmax(), excess.shape))


# bf16 decode blocks (at most 8 query rows per kv head): head dims that are whole 32-column
# blocks run on FMAs in the split column order (even columns, then odd), except that blocks of
# one row (group 1, one query) take Q K^T on vdpbf16ps where the variant has it (64, 96, 128,
# 256); register blocks of 1-4 rows x 4 or 8 keys with the last keys one by one; rows past the
# first 128 keys of a block are prefetched; split-KV on the long ones. 80 is not split.
BF16_DECODE = [
    ((1, 8, 2, 1, 333, 64), dict()),
    ((1, 6, 2, 1, 130, 96), dict(causal=True)),
    ((2, 4, 4, 2, 77, 256), dict(window=30)),
    ((1, 16, 2, 1, 1500, 128), dict()),
    ((1, 2, 2, 1, 9, 128), dict(scale=-3.0)),
    ((1, 4, 4, 1, 1500, 128), dict()),
    ((2, 3, 3, 1, 701, 64), dict(window=500)),
    ((1, 2, 2, 1, 259, 96), dict()),
    ((1, 2, 2, 1, 300, 256), dict(causal=True)),
    ((1, 3, 3, 1, 1100, 32), dict()),
    ((1, 6, 2, 1, 333, 32), dict()),
    ((1, 2, 2, 1, 200, 80), dict()),
    # 16 and 32 pairs: no split-KV, blocks of 1100 and 1300 keys (rows requested ahead)
    ((2, 32, 8, 1, 1100, 128), dict()),
    ((2, 16, 16, 1, 1300, 64), dict(causal=True)),
]


@pytest.mark.parametrize("shape, opts", BF16_DECODE, ids=str)
def test_bf16_decode_within_rounding(torch, isa, threads, shape, opts):
    """As test_bf16_prefill_within_rounding, for decode blocks."""
    q, k, v = qkv(torch, *shape, torch.bfloat16)
    out = ff.sdpa(q, k, v, **opts)
    ref = ref_of(q, k, v, **opts)
    assert not torch.isnan(out).any()
    bound = 2.0**-8 * (np.abs(ref) + np.abs(v.float().numpy()).max())
    excess = np.abs(out.float().numpy() - ref) - bound
    assert excess.max() <= 0, (excess.max(), np.unravel_index(excess.argmax(), excess.shape))


TAIL_SHAPES = [(1, 8, 2, 1, 333, 64), (1, 2, 2, 1, 259, 96), (1, 16, 2, 1, 1500, 128), (1, 7, 1, 1, 2049, 59),
               (1, 4, 2, 40, 300, 64), (1, 4, 4, 33, 129, 80)]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("tail", [1, 7])
@pytest.mark.parametrize("shape", TAIL_SHAPES, ids=str)
def test_last_keys_carry_the_answer(torch, isa, shape, tail, dtype):
    """The last `tail` keys dominate every row (their keys point along the group's query, their
    scores ~20 above the rest), so a kernel that dropped or misread the keys past its last whole
    tile, block or vector step would be off by O(1), far past any dtype's rounding bound."""
    b, hq, hkv, lq, lk, d = shape
    dt = getattr(torch, dtype)
    q, k, v = qkv(torch, *shape, torch.float32, seed=tail)
    group = hq // hkv
    head_q = q[:, ::group, -1:]  # one query per kv head, for each of its heads and rows
    q = head_q.repeat_interleave(group, 1).expand(b, hq, lq, d).contiguous()
    k[:, :, lk - tail:] = head_q * (20 * d**0.5 / head_q.norm(dim=-1, keepdim=True) ** 2)  # scores of 20
    q, k, v = (t.to(dt) for t in (q, k, v))
    out = ff.sdpa(q, k, v).float().numpy()
    ref = ref_of(q, k, v)
    tail_mean = np.repeat(v.float().numpy()[:, :, lk - tail:].mean(axis=2, keepdims=True), group, axis=1)
    assert np.abs(ref - tail_mean).max() < 0.05  # (the setup does what it says: the tail is the answer)
    tol = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}[dtype]
    np.testing.assert_allclose(out, ref, atol=tol, rtol=0)


@pytest.mark.parametrize("chunk", [192, 256])
def test_bf16_prefill_split_keys(torch, isa, chunk):
    """Key chunks on bf16 prefill blocks: aligned to the AMX key tile (packed once per call) or
    not (packed per block); both within bf16 rounding of the float64 result."""
    from fusedformer.ops_attention import native_sdpa

    q, k, v = qkv(torch, 1, 4, 1, 130, 600, 64, torch.bfloat16)
    out = native_sdpa(q, k, v, causal=True, kv_chunk=chunk)
    ref = ref_of(q, k, v, causal=True)
    assert not torch.isnan(out).any()
    bound = 2.0**-8 * (np.abs(ref) + np.abs(v.float().numpy()).max())
    assert (np.abs(out.float().numpy() - ref) <= bound).all()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("slope", [0.02, -0.02, 0.15, 3.0], ids=lambda s: f"slope{s}")
@pytest.mark.parametrize("masked", [False, True], ids=["clip-only", "additive-mask"])
def test_prefill_scores_rising_along_keys(torch, isa, slope, masked, dtype, seed=1):
    """Scores that climb (or fall) steadily along the keys. The prefill softmax takes a row's
    probabilities against a max that moves only when a tile's scores rise more than 2^8 above it
    (the AMX tiles: a first tile's max from its first 16 keys), so rises below and past that,
    within one key tile and across several, and falls, must all stay within rounding of the
    float64 result (output and lse): fp32 and fp16 (fp32 inside) within the fp32 rounding of
    scores of up to hundreds (plus fp16's own output rounding), bf16 within its rounding."""
    b, hq, hkv, lq, lk, d = 1, 4, 2, 70, 600, 64
    q, k, v = qkv(torch, b, hq, hkv, lq, lk, d, torch.float32, seed)
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=gen)
    u = u / u.norm()
    q = q + 4.0 * u  # every query leans along u, and key j by slope * j along it
    k = k + slope * torch.arange(lk).view(lk, 1) * u
    q, k, v = (t.to(getattr(torch, dtype)) for t in (q, k, v))
    opts = dict(causal=True)
    if masked:
        opts["mask"] = torch.randn(lq, lk, generator=gen)
    out, lse = ff.sdpa(q, k, v, return_lse=True, **opts)
    ref_opts = {n: (o.numpy() if hasattr(o, "numpy") else o) for n, o in opts.items()}
    ref, ref_lse = reference.sdpa(*(t.float().numpy() for t in (q, k, v)), return_lse=True, **ref_opts)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    vmax = np.abs(v.float().numpy()).max()
    if dtype != "bfloat16":  # 2^-24 |s| of fp32 rounding per score, scores of up to hundreds
        qf, kf = q.float().numpy(), np.repeat(k.float().numpy(), hq // hkv, 1)
        slack = 2.0**-20 * np.abs(qf @ kf.swapaxes(-1, -2)).max() / np.sqrt(d)
        own = 2.0**-11 * np.abs(ref) if dtype == "float16" else 0.0  # the output's rounding
        excess = np.abs(out.float().numpy() - ref) - (2e-5 + slack * vmax + own)
        assert excess.max() <= 0, (excess.max(), np.unravel_index(excess.argmax(), excess.shape))
        np.testing.assert_allclose(lse.numpy(), ref_lse, atol=2e-5 + slack, rtol=0)
        return
    bound = 2.0**-8 * (np.abs(ref) + vmax)
    excess = np.abs(out.float().numpy() - ref) - bound
    assert excess.max() <= 0, (excess.max(), np.unravel_index(excess.argmax(), excess.shape))
    np.testing.assert_allclose(lse.numpy(), ref_lse, atol=2e-3, rtol=1e-5)


def test_hf_layout_strided_no_contiguous_needed(torch, isa):
    """[B, L, H, D].transpose(1, 2), as Hugging Face models pass q/k/v."""
    b, l, h, d = 2, 45, 8, 64
    q = torch.randn(b, l, h, d).transpose(1, 2)
    kv = torch.randn(b, l, 2, 2, d)  # fused k/v projection output, 2 kv heads
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    out = ff.sdpa(q, k, v, causal=True)
    np.testing.assert_allclose(out.numpy(), ref_of(q, k, v, causal=True), atol=2e-5)


def test_bf16_mask_and_lse(torch, isa):
    q, k, v = qkv(torch, 1, 4, 2, 9, 70, 32, torch.bfloat16)
    mask = torch.randn(9, 70, dtype=torch.bfloat16)
    mask[3] = float("-inf")
    out, lse = ff.sdpa(q, k, v, mask=mask, return_lse=True)
    assert (out[:, :, 3] == 0).all() and torch.isneginf(lse[:, :, 3]).all()
    ref = ref_of(q, k, v, mask=mask.float().numpy())
    assert np.abs(out.float().numpy() - ref).max() < 2e-2
    keep = torch.rand(1, 1, 9, 70) < 0.5
    out = ff.sdpa(q, k, v, mask=keep)
    assert np.abs(out.float().numpy() - ref_of(q, k, v, mask=keep.numpy())).max() < 2e-2


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_finfo_min_mask_as_torch(torch, isa, dtype):
    """Hugging Face's additive masks hold torch.finfo(dtype).min in the model's dtype (past
    float32's range once times log2 e): masked keys weigh 0 beside live ones and a row of them
    alone attends uniformly, as torch's SDPA gives, never a row of zeros."""
    import torch.nn.functional as F

    dt = getattr(torch, dtype)
    q, k, v = qkv(torch, 2, 4, 4, 9, 70, 32, dt)
    mask = torch.zeros(2, 1, 9, 70, dtype=dt)
    mask[0, :, :, :30] = torch.finfo(dt).min  # left padding
    mask[1, :, 4] = torch.finfo(dt).min  # a padded query row: every key at the lowest
    out = ff.sdpa(q, k, v, mask=mask)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float())
    assert np.abs(out.float().numpy() - want.numpy()).max() < (2e-5 if dtype == "float32" else 2e-2)


def test_sparse_and_mkldnn_tensors_rejected(torch):
    q, k, v = qkv(torch, 1, 2, 2, 3, 4, 8, torch.float32)
    for bad in (q.to_sparse(), q.to_mkldnn(), q.to_sparse_csr()):
        with pytest.raises(TypeError, match=r"^\[sdpa\] q must be a dense \(strided\) tensor, got layout"):
            ff.sdpa(bad, k, v)
    for bad in (torch.ones(3, 4).to_sparse(), torch.ones(3, 4).to_sparse_csr()):
        with pytest.raises(TypeError, match=r"^\[sdpa\] mask must be a dense \(strided\) tensor"):
            ff.sdpa(q, k, v, mask=bad)


def test_framework_mix_rejected(torch):
    q, k, v = qkv(torch, 1, 2, 2, 3, 4, 8, torch.float32)
    with pytest.raises(TypeError, match=r"^\[sdpa\] all arrays must come from one framework"):
        ff.sdpa(q, k.numpy(), v)


def test_tensor_off_cpu_rejected(torch):
    """Tensors the native kernel cannot read (here on the meta device) get an error naming
    the argument and the device, not a read through a meaningless pointer."""
    q, k, v = (t.to("meta") for t in qkv(torch, 1, 2, 2, 3, 4, 8, torch.float32))
    with pytest.raises(ValueError, match=r"^\[sdpa\] q is on meta; the native kernel takes CPU tensors"):
        ff.sdpa(q, k, v)


# ---- custom op ------------------------------------------------------------------------------


def test_custom_op_registered_and_opcheck(torch):
    import fusedformer.torch.attention_op  # noqa: F401

    q, k, v = qkv(torch, 1, 4, 2, 5, 9, 16, torch.float32)
    assert torch.allclose(torch.ops.fusedformer.sdpa(q, k, v, None, True), ff.sdpa(q, k, v, causal=True))
    for op, args in [
        (torch.ops.fusedformer.sdpa.default, (q, k, v, None, True, None, 3)),
        (torch.ops.fusedformer.sdpa_lse.default, (q, k, v, torch.ones(5, 9, dtype=torch.bool), False, 0.5, None)),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_backward_raises_naming_op(torch):
    q, k, v = qkv(torch, 1, 2, 2, 3, 4, 8, torch.float32)
    q.requires_grad_(True)
    out = ff.sdpa(q, k, v)
    with pytest.raises(NotImplementedError, match=r"fusedformer::sdpa has no backward"):
        out.sum().backward()
    out, lse = ff.sdpa(q, k, v, return_lse=True)
    with pytest.raises(NotImplementedError, match=r"fusedformer::sdpa_lse has no backward"):
        (out.sum() + lse.sum()).backward()


def test_forward_mode_ad_is_refused_not_dropped(torch):
    """A dual tensor's tangent used to be dropped (the output had none): silently wrong jvps."""
    import torch.autograd.forward_ad as fwad

    q, k, v = qkv(torch, 1, 2, 2, 3, 4, 8, torch.float32)
    for name in ("q", "k", "v"):
        args = {"q": q, "k": k, "v": v}
        with fwad.dual_level():
            args[name] = fwad.make_dual(args[name], torch.randn_like(args[name]))
            for lse in (False, True):
                with pytest.raises(NotImplementedError, match=rf"^\[sdpa\] forward-mode AD is not implemented: {name} carries"):
                    ff.sdpa(args["q"], args["k"], args["v"], return_lse=lse)
            with pytest.raises(NotImplementedError, match=r"\[sdpa\] forward-mode AD"):
                torch.ops.fusedformer.sdpa(args["q"], args["k"], args["v"])
    with fwad.dual_level():  # inside a dual level, tensors without tangents still run
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        torch.testing.assert_close(ff.sdpa(q, k, v), want)


def test_torch_func_transforms_are_refused(torch):
    """torch.func.jvp gave a zero tangent, silently; vmap failed on a data pointer, grad with
    autograd.Function's own message."""
    q, k, v = qkv(torch, 1, 4, 2, 5, 9, 32, torch.float32)
    words = r"^\[sdpa\] torch.func transforms \(jvp, vmap, grad, ...\) are not implemented"
    with pytest.raises(NotImplementedError, match=words):
        torch.func.jvp(lambda x: ff.sdpa(x, k, v), (q,), (torch.randn_like(q),))
    with pytest.raises(NotImplementedError, match=words):
        torch.vmap(lambda x: ff.sdpa(x, k, v))(q[None].expand(3, -1, -1, -1, -1))
    with pytest.raises(NotImplementedError, match=words):
        torch.func.grad(lambda x: ff.sdpa(x, k, v, return_lse=True)[0].sum())(q)


def _module(torch):
    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return ff.sdpa(q, k, v, causal=True) * 2

    return Attn()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile(torch, backend):
    torch._dynamo.reset()
    q, k, v = qkv(torch, 1, 8, 2, 17, 40, 32, torch.float32)
    mod = _module(torch)
    compiled = torch.compile(mod, backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), mod(q, k, v))


def test_torch_export_sees_one_op(torch):
    q, k, v = qkv(torch, 1, 8, 2, 17, 40, 32, torch.float32)
    ep = torch.export.export(_module(torch), (q, k, v))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count("fusedformer.sdpa.default") == 1, targets
    torch.testing.assert_close(ep.module()(q, k, v), _module(torch)(q, k, v))


def test_torch_export_dynamic_lengths(torch):
    """ff.sdpa's checks leave symbolic lengths symbolic: one export serves every Lq, Lk (a KV
    cache's), mask included, strict or not."""

    class Attn(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return ff.sdpa(q, k, v, mask=mask)

    q, k, v = qkv(torch, 1, 4, 2, 5, 7, 16, torch.float32)
    mask = torch.randn(1, 1, 5, 7)
    lq, lk = torch.export.Dim("lq", min=2, max=64), torch.export.Dim("lk", min=2, max=64)
    dims = ({2: lq}, {2: lk}, {2: lk}, {2: lq, 3: lk})
    q2, k2, v2 = qkv(torch, 1, 4, 2, 9, 30, 16, torch.float32, seed=1)
    mask2 = torch.randn(1, 1, 9, 30)
    for strict in (False, True):
        ep = torch.export.export(Attn(), (q, k, v, mask), dynamic_shapes=dims, strict=strict)
        torch.testing.assert_close(ep.module()(q2, k2, v2, mask2), ff.sdpa(q2, k2, v2, mask=mask2))


@pytest.mark.parametrize("mode", ["eager", "op", "compiled"])
def test_output_takes_q_layout(torch, mode):
    """out is empty_like(q), as torch's own SDPA: from the [B, L, H, D] storage of a model's
    projection, transpose(1, 2) back to it is free (Hugging Face's attention functions call
    .contiguous() there); from contiguous q, out is contiguous. The custom op's fake agrees, so
    compiled graphs see the real strides."""
    from fusedformer.torch import attention_op

    x = torch.randn(2, 9, 4, 16)  # [B, L, H, D]
    kv = torch.randn(2, 9, 2, 2, 16)
    q, k, v = x.transpose(1, 2), kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    run = {
        "eager": lambda *a: ff.sdpa(*a, causal=True),
        "op": lambda *a: attention_op.sdpa(*a, None, True),
        "compiled": torch.compile(lambda *a: attention_op.sdpa(*a, None, True), backend="aot_eager", fullgraph=True),
    }[mode]
    torch._dynamo.reset()
    out = run(q, k, v)
    assert out.shape == q.shape and out.stride() == q.stride()
    assert out.transpose(1, 2).is_contiguous()
    np.testing.assert_allclose(out.numpy(), ref_of(q, k, v, causal=True), atol=2e-5)
    plain = run(q.contiguous(), k, v)
    assert plain.is_contiguous()
    torch.testing.assert_close(plain, out)


def test_jit_trace_records_the_op(torch):
    """jit.trace must see fusedformer::sdpa (the Core ML path lowers it), not a baked constant,
    and without the argument checks' TracerWarnings (a dozen a call)."""
    import warnings

    q, k, v = qkv(torch, 1, 4, 2, 5, 9, 16, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(_module(torch), (q, k, v))
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)], caught[0].message
    assert "fusedformer::sdpa" in str(traced.graph)
    q2, k2, v2 = qkv(torch, 1, 4, 2, 5, 9, 16, torch.float32, seed=1)
    torch.testing.assert_close(traced(q2, k2, v2), _module(torch)(q2, k2, v2))


def test_compiled_graphs_leave_the_default_scale_to_the_op(torch):
    """The default scale reaches the op as None, not as 1/sqrt(D) of the traced shape: as a
    value of the graph, inductor's caches gave a graph compiled for D 16 to a call with D 32
    (scale 0.25: an error of 0.75; test_torch_compile_inductor runs that sequence)."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(n.args for n in gm.graph.nodes if n.op == "call_function" and "fusedformer" in str(n.target))
        return gm.forward

    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v, m: ff.sdpa(q, k, v, mask=m, causal=True), backend=backend, fullgraph=True)
    for d in (32, 16, 32):
        q, k, v = qkv(torch, 2, 6, 3, 17, 17, d, torch.float32, seed=d)
        m = torch.rand(2, 1, 17, 17, generator=torch.Generator().manual_seed(d)) < 0.7
        want = ref_of(q, k, v, mask=m.numpy(), causal=True)
        np.testing.assert_allclose(f(q, k, v, m).numpy(), want, atol=2e-5, rtol=0)
    assert seen and all(args[5] is None for args in seen), seen


@pytest.mark.slow
def test_torch_compile_inductor(torch):
    """Inductor compiles around the opaque op (about 1.5 min on 2 busy cores: slow marker)."""
    torch._dynamo.reset()
    q, k, v = qkv(torch, 1, 8, 2, 17, 40, 32, torch.float32)
    mod = _module(torch)
    compiled = torch.compile(mod, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), mod(q, k, v))
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v, m: ff.sdpa(q, k, v, mask=m, causal=True), fullgraph=True)
    for d in (32, 16, 32):  # (a graph for D 16 used to serve D 32 with its scale)
        q, k, v = qkv(torch, 2, 6, 3, 17, 17, d, torch.float32, seed=d)
        m = torch.rand(2, 1, 17, 17, generator=torch.Generator().manual_seed(d)) < 0.7
        np.testing.assert_allclose(f(q, k, v, m).numpy(), ref_of(q, k, v, mask=m.numpy(), causal=True), atol=2e-5, rtol=0)


def _vm_flags(addr: int) -> list[str] | None:
    """The VmFlags of the mapping in /proc/self/smaps that holds addr (None: no such mapping)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    return None


HUGE = 2 << 20
needs_thp = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled")),
    reason="transparent huge pages are a Linux kernel feature (this kernel has none)",
)


@needs_thp
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_large_output_hinted_to_huge_pages(torch, layout):
    """An output of HUGEPAGE_MIN_BYTES or more (8 heads x 1024 x 128 fp32: 4 MiB) is allocated
    with its whole 2 MiB pages marked MADV_HUGEPAGE ('hg' in VmFlags) before the kernel writes
    it, in q's layout, and the result is still the reference's."""
    from fusedformer.ops_attention import HUGEPAGE_MIN_BYTES

    q, k, v = qkv(torch, 1, 8, 2, 1024, 1024, 128, torch.float32, seed=3)
    if layout == "transposed":
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    out = ff.sdpa(q, k, v, causal=True)
    storage = out.untyped_storage()
    assert storage.nbytes() >= HUGEPAGE_MIN_BYTES and out.stride() == q.stride()
    first_whole_page = -(-storage.data_ptr() // HUGE) * HUGE
    assert "hg" in _vm_flags(first_whole_page)
    np.testing.assert_allclose(out.numpy(), ref_of(q, k, v, causal=True), atol=2e-5)


def test_only_large_outputs_hinted(torch, monkeypatch):
    """The hint is asked for outputs of HUGEPAGE_MIN_BYTES or more only (smaller ones may share
    pages with other allocations of the heap), and only for the whole 2 MiB pages inside."""
    from fusedformer import _C
    from fusedformer import ops_attention
    from fusedformer.ops_attention import HUGEPAGE_MIN_BYTES

    class Spy:
        calls: list = []

        def __getattr__(self, name):
            return getattr(_C, name)

        def advise_hugepages(self, ptr, nbytes):
            self.calls.append(nbytes)
            return _C.advise_hugepages(ptr, nbytes)

    monkeypatch.setattr(ops_attention, "_C", Spy())
    monkeypatch.setattr(ops_attention, "_OUTPUT_CACHE", ops_attention._OutputCache(64 << 20))  # nothing kept yet
    ff.sdpa(*qkv(torch, 1, 4, 4, 64, 64, 64, torch.float32))
    assert Spy.calls == []
    ff.sdpa(*qkv(torch, 1, 8, 8, 1024, 16, 128, torch.float32))
    assert Spy.calls == [HUGEPAGE_MIN_BYTES]
    assert not _C.advise_hugepages(0, 0) and not _C.advise_hugepages(HUGE + 64, HUGE - 128)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_large_outputs_reuse_memory_only_once_released(torch, monkeypatch, dtype):
    """Outputs of HUGEPAGE_MIN_BYTES or more come from _OutputCache: a second output while the
    first lives gets other memory; once the first is released the next output of that size takes
    its memory (in its own q's layout), every element rewritten, and the live one is untouched."""
    import gc

    from fusedformer import ops_attention

    monkeypatch.setattr(ops_attention, "_OUTPUT_CACHE", ops_attention._OutputCache(64 << 20))
    dt = getattr(torch, dtype)
    rows = (4 << 20) // (8 * 128 * (4 if dtype == "float32" else 2))
    tol = 2e-5 if dtype == "float32" else 2.5e-2
    first = qkv(torch, 1, 8, 2, rows, 33, 128, dt, seed=4)
    second = qkv(torch, 1, 8, 2, rows, 33, 128, dt, seed=5)
    a = ff.sdpa(*first, causal=True)
    b = ff.sdpa(*second, causal=True)
    assert a.data_ptr() != b.data_ptr()
    kept = a.data_ptr()
    del a
    gc.collect()
    q, k, v = qkv(torch, 1, 8, 2, rows, 33, 128, dt, seed=6)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    c = ff.sdpa(q, k, v, causal=True)
    assert c.data_ptr() == kept and c.stride() == q.stride() and c.dtype == dt
    np.testing.assert_allclose(c.float().numpy(), ref_of(q, k, v, causal=True), atol=tol)
    np.testing.assert_allclose(b.float().numpy(), ref_of(*second, causal=True), atol=tol)


def test_output_cache_limit(torch, monkeypatch):
    """_OutputCache keeps released memory up to its limit and no more; FUSEDFORMER_OUTPUT_CACHE_MB
    sets the limit (0: outputs are plain torch tensors), and a bad value is refused naming it."""
    from fusedformer import ops_attention

    cache = ops_attention._OutputCache(6 << 20)
    x, y = cache.take(4 << 20), cache.take(4 << 20)
    assert x.ctypes.data % 64 == 0 and x.nbytes == 4 << 20
    cache.give_back(x)
    cache.give_back(y)
    assert cache.bytes == 4 << 20 and cache.take(4 << 20) is x and cache.bytes == 0
    monkeypatch.setenv("FUSEDFORMER_OUTPUT_CACHE_MB", "0")
    assert ops_attention._cache_limit() == 0
    monkeypatch.setattr(ops_attention, "_OUTPUT_CACHE", ops_attention._OutputCache(0))
    out = ff.sdpa(*qkv(torch, 1, 8, 2, 1024, 33, 128, torch.float32), causal=True)
    assert out.untyped_storage().resizable()
    for bad in ("lots", "-1"):
        monkeypatch.setenv("FUSEDFORMER_OUTPUT_CACHE_MB", bad)
        with pytest.raises(ValueError, match="FUSEDFORMER_OUTPUT_CACHE_MB"):
            ops_attention._cache_limit()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize(
    "shape, opts",
    [
        ((1, 8, 2, 1, 257, 64), dict()),
        ((2, 7, 1, 33, 129, 59), dict(causal=True, scale=0.3)),
        ((1, 4, 4, 31, 127, 32), dict(causal=True, window=9)),
        ((1, 32, 8, 3, 1025, 128), dict(window=100)),
        # transformers' padding mask (bool, [B, 1, Lq, Lk]) and additive ones, broadcast by size
        # 1 or by stride 0
        ((2, 8, 2, 1, 257, 64), dict(mask="bool")),
        ((2, 4, 4, 33, 31, 32), dict(mask="additive", causal=True)),
        ((1, 4, 2, 3, 129, 64), dict(mask="expanded")),
    ],
    ids=str,
)
def test_eager_call_in_one_step_matches_the_general_path(torch, isa, threads, dtype, shape, opts):
    """The common eager call (_C.sdpa_torch: checked and described in C++) gives the general
    path's bits (native_sdpa, the same kernel), in q's dtype and layout; q as the transpose of a
    [B, Lq, Hq, D] tensor, as models pass it; masks bool or additive (float32)."""
    from fusedformer import _C
    from fusedformer.ops_attention import HUGEPAGE_MIN_BYTES, native_sdpa

    b, hq, hkv, lq, lk, d = shape
    q, k, v = qkv(torch, b, hq, hkv, lq, lk, d, getattr(torch, dtype))
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    g = torch.Generator().manual_seed(2)
    opts = dict(opts)
    kind = opts.pop("mask", None)
    mask = {None: None, "bool": torch.rand(b, 1, lq, lk, generator=g) < 0.8,
            "additive": torch.where(torch.rand(lq, lk, generator=g) < 0.2, float("-inf"), torch.randn(lq, lk, generator=g)),
            "expanded": torch.randn(lk, generator=g).expand(b, hq, lq, lk)}[kind]
    before = [t.clone() for t in (q, k, v) + (() if mask is None else (mask,))]
    out = _C.sdpa_torch(q, k, v, mask, opts.get("causal", False), opts.get("scale"), opts.get("window"),
                        HUGEPAGE_MIN_BYTES)
    assert out is not None and out.dtype == q.dtype and out.shape == q.shape and out.stride() == q.stride()
    want = native_sdpa(q, k, v, mask=mask, causal=opts.get("causal", False), scale=opts.get("scale"),
                       window=opts.get("window") or 0)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert not torch.isnan(out).any()
    for t, t0 in zip((q, k, v) + (() if mask is None else (mask,)), before):
        assert torch.equal(t, t0)
    torch.testing.assert_close(ff.sdpa(q, k, v, mask=mask, **opts), want, rtol=0, atol=0)
    if mask is not None:  # and the mask acts: the call without it differs
        assert not torch.equal(ff.sdpa(q, k, v, **opts), want)
    # with the lse: (out, lse), lse contiguous float32 [B, Hq, Lq], the general path's bits
    out, lse = _C.sdpa_torch(q, k, v, mask, opts.get("causal", False), opts.get("scale"), opts.get("window"),
                             HUGEPAGE_MIN_BYTES, True)
    want, want_lse = native_sdpa(q, k, v, mask=mask, causal=opts.get("causal", False), scale=opts.get("scale"),
                                 window=opts.get("window") or 0, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3] and lse.is_contiguous()
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
    for got, w in zip(ff.sdpa(q, k, v, mask=mask, return_lse=True, **opts), (want, want_lse)):
        torch.testing.assert_close(got, w, rtol=0, atol=0)


def test_eager_call_in_one_step_declines_the_rest(torch):
    """_C.sdpa_torch returns None, running nothing, for every call it does not take: those
    go down ff.sdpa's general path (with its own errors, or its copies)."""
    from fusedformer import _C
    from fusedformer.ops_attention import HUGEPAGE_MIN_BYTES

    q, k, v = qkv(torch, 1, 4, 2, 5, 9, 32, torch.float32)

    def declines(q=q, k=k, v=v, mask=None, causal=False, scale=None, window=None, limit=HUGEPAGE_MIN_BYTES):
        return _C.sdpa_torch(q, k, v, mask, causal, scale, window, limit) is None

    assert not declines()
    assert not declines(mask=torch.ones(1, 1, 5, 9, dtype=torch.bool))
    assert not declines(mask=torch.zeros(9).expand(5, 9))  # broadcast by stride 0: read in place
    assert declines(mask=torch.zeros(5, 9, dtype=torch.float16))  # the general path converts it
    assert declines(mask=torch.zeros(5, 9, dtype=torch.int32))  # the general path's error
    assert declines(mask=torch.zeros(5, 8))  # not broadcastable
    assert declines(mask=torch.zeros(5, 9, requires_grad=True))  # autograd to record
    assert declines(mask=np.zeros((5, 9), np.float32))  # another framework
    assert declines(q=q.numpy())  # not torch
    assert declines(q=q.clone().requires_grad_())  # autograd to record
    assert declines(k=k.half(), v=v.half())  # mixed dtypes
    assert declines(q=q.double(), k=k.double(), v=v.double())  # unsupported dtype
    assert declines(q=q[0])  # 3-d
    assert declines(q=q[:, :, :0])  # zero-sized
    assert declines(v=v[:, :, :8])  # v's shape is not k's
    assert declines(q=torch.randn(1, 3, 5, 32))  # heads do not divide
    assert declines(q=torch.randn(1, 4, 5, 16))  # head dims differ
    big = _C.sdpa_max_head_dim + 1
    assert declines(q=torch.randn(1, 4, 5, big), k=torch.randn(1, 2, 9, big), v=torch.randn(1, 2, 9, big))
    assert declines(q=torch.randn(1, 4, 32, 5).transpose(2, 3))  # last dim not contiguous: a copy
    assert declines(causal=1)
    for scale in (1, np.float32(0.5), float("nan"), float("inf"), True, 1e40, -3e38):
        assert declines(scale=scale)
    for window in (0, -3, True, np.int64(4), 2.0, 2**70):
        assert declines(window=window)
    assert declines(limit=q.numel() * 4)  # large outputs take the output cache

    class Sub(torch.Tensor):
        pass

    assert declines(q=q.as_subclass(Sub))


def test_eager_call_in_one_step_only_when_eager(torch):
    """ff.sdpa takes the one-step call only in plain eager mode: under torch.jit.trace the op
    must be recorded (the general path's custom op), so the trace replays on new inputs."""
    from fusedformer import ops_attention

    q, k, v = qkv(torch, 1, 4, 2, 5, 9, 32, torch.float32)
    assert ops_attention._eager_call(q, k, v, None, False, None, None) is not None
    assert isinstance(ops_attention._eager_call(q, k, v, None, False, None, None, True), tuple)

    traced = torch.jit.trace(lambda a, b, c: ff.sdpa(a, b, c), (q, k, v), check_trace=False)
    q2, k2, v2 = qkv(torch, 1, 4, 2, 5, 9, 32, torch.float32, seed=1)
    torch.testing.assert_close(traced(q2, k2, v2), ff.sdpa(q2, k2, v2), rtol=0, atol=0)
    traced = torch.jit.trace(lambda a, b, c: ff.sdpa(a, b, c, return_lse=True), (q, k, v), check_trace=False)
    for got, want in zip(traced(q2, k2, v2), ff.sdpa(q2, k2, v2, return_lse=True)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
