// Bindings of the attention kernels: _C.sdpa on raw tensor descriptors.
//
// The Python front (fusedformer/ops_attention.py) validates user arguments framework-neutrally
// and hands numpy arrays and torch tensors over as (data pointer, shape, element strides)
// tuples, so the extension needs neither libtorch nor a numpy bf16 dtype. The checks here are
// the last line of defence of the raw-pointer contract (any failure is a bug in the caller).
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <string>

#include "csrc/bindings.h"
#include "csrc/dispatch.h"
#include "kernels/cpu/attention/api.h"

namespace py = pybind11;

namespace ff {
namespace {

template <size_t N>
struct View {
  uintptr_t ptr;
  std::array<int64_t, N> shape, strides;
};

template <size_t N>
View<N> parse_view(const py::handle& h, const char* name) {
  auto fail = [&] {
    return py::type_error(std::string("[sdpa] ") + name + " must be a (ptr, shape[" + std::to_string(N) +
                          "], strides[" + std::to_string(N) + "]) tuple");
  };
  if (!py::isinstance<py::tuple>(h)) throw fail();
  py::tuple t = py::reinterpret_borrow<py::tuple>(h);
  if (t.size() != 3 || !py::isinstance<py::tuple>(t[1]) || !py::isinstance<py::tuple>(t[2])) throw fail();
  py::tuple shape = py::reinterpret_borrow<py::tuple>(t[1]), strides = py::reinterpret_borrow<py::tuple>(t[2]);
  if (shape.size() != N || strides.size() != N) throw fail();
  View<N> v{t[0].cast<uintptr_t>(), {}, {}};
  for (size_t i = 0; i < N; ++i) v.shape[i] = shape[i].cast<int64_t>(), v.strides[i] = strides[i].cast<int64_t>();
  if (v.ptr == 0) throw py::value_error(std::string("[sdpa] ") + name + " has a null data pointer");
  return v;
}

void check(bool ok, const std::string& msg) {
  if (!ok) throw py::value_error("[sdpa] " + msg);
}

SdpaTensor tensor_of(const View<4>& v, const char* name) {
  // (a head dim of 1 has one element per row: any stride is contiguous, as numpy's empty_like
  // of such a q can give its output)
  check(v.shape[3] == 1 || v.strides[3] == 1, std::string(name) + "'s last dimension must be contiguous");
  return {reinterpret_cast<const void*>(v.ptr), v.strides[0], v.strides[1], v.strides[2]};
}

void sdpa_binding(py::handle q_, py::handle k_, py::handle v_, py::handle out_, int dtype,
                  py::object lse_, py::object mask_, int mask_kind, bool causal, double scale,
                  int64_t window, int64_t kv_chunk) {
  const AttentionKernels& kern = FF_KERNELS(attention_kernels);
  const auto q = parse_view<4>(q_, "q"), k = parse_view<4>(k_, "k"), v = parse_view<4>(v_, "v");
  const auto out = parse_view<4>(out_, "out");
  const int64_t B = q.shape[0], Hq = q.shape[1], Lq = q.shape[2], D = q.shape[3];
  const int64_t Hkv = k.shape[1], Lk = k.shape[2];
  check(dtype >= 0 && dtype <= 2, "dtype code must be 0 (f32), 1 (f16) or 2 (bf16)");
  for (int64_t n : {B, Hq, Lq, D, Hkv, Lk}) check(n > 0, "every dimension must be non-zero");
  check(k.shape == v.shape, "k and v shapes differ");
  check(k.shape[0] == B && k.shape[3] == D, "k's batch or head dim does not match q's");
  check(Hq % Hkv == 0, "k's heads do not divide q's heads");
  check(out.shape == q.shape, "out's shape does not match q's");
  check(D <= kern.max_head_dim, "head dim " + std::to_string(D) + " exceeds " +
                                    std::to_string(kern.max_head_dim));
  check(std::isfinite(scale), "scale must be finite");
  check(window >= 0, "window must be >= 0 (0: none)");

  SdpaParams p{};
  p.dtype = static_cast<DType>(dtype);
  p.batch = B, p.q_heads = Hq, p.kv_heads = Hkv, p.q_len = Lq, p.kv_len = Lk, p.head_dim = D;
  p.q = tensor_of(q, "q"), p.k = tensor_of(k, "k"), p.v = tensor_of(v, "v");
  const SdpaTensor o = tensor_of(out, "out");
  p.out = const_cast<void*>(o.data);
  p.out_stride_b = o.stride_b, p.out_stride_h = o.stride_h, p.out_stride_l = o.stride_l;
  p.lse = nullptr;
  if (!lse_.is_none()) {
    const auto lse = parse_view<3>(lse_, "lse");
    check(lse.shape[0] == B && lse.shape[1] == Hq && lse.shape[2] == Lq, "lse must be [B, Hq, Lq]");
    check(lse.strides[2] == 1 && lse.strides[1] == Lq && lse.strides[0] == Hq * Lq,
          "lse must be contiguous");
    p.lse = reinterpret_cast<float*>(lse.ptr);
  }
  check(mask_kind >= 0 && mask_kind <= 2, "mask_kind must be 0 (none), 1 (keep) or 2 (add)");
  p.mask.kind = static_cast<SdpaMaskKind>(mask_kind);
  if (p.mask.kind != SdpaMaskKind::none) {
    check(!mask_.is_none(), "mask_kind given without a mask");
    const auto m = parse_view<4>(mask_, "mask");
    const std::array<int64_t, 4> full{B, Hq, Lq, Lk};
    std::array<int64_t, 4> st{};
    for (int i = 0; i < 4; ++i) {
      check(m.shape[i] == full[i] || m.shape[i] == 1, "mask is not broadcastable to [B, Hq, Lq, Lk]");
      st[i] = m.shape[i] == 1 ? 0 : m.strides[i];
    }
    p.mask.data = reinterpret_cast<const void*>(m.ptr);
    p.mask.stride_b = st[0], p.mask.stride_h = st[1], p.mask.stride_q = st[2], p.mask.stride_k = st[3];
  }
  p.causal = causal;
  p.window = window;
  p.scale = static_cast<float>(scale);
  p.kv_chunk = kv_chunk;
  py::gil_scoped_release release;
  kern.sdpa(p);
}

}  // namespace

void init_attention(py::module_& m) {
  m.def("sdpa", &sdpa_binding, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("dtype"), py::arg("lse") = py::none(), py::arg("mask") = py::none(),
        py::arg("mask_kind") = 0, py::arg("causal") = false, py::arg("scale"),
        py::arg("window") = 0, py::arg("kv_chunk") = -1,
        R"doc(Fused attention forward on raw tensor descriptors (use fusedformer.sdpa instead).

Positional or keyword (the front passes them positionally: about 1 us less a call).
q, k, v, out: (data pointer, shape[4] tuple, element strides[4] tuple) with a contiguous last dimension;
q/out [B, Hq, Lq, D], k/v [B, Hkv, Lk, D]. dtype: 0 f32, 1 f16, 2 bf16 (all four tensors).
lse: None or a contiguous fp32 [B, Hq, Lq] descriptor. mask: None or a [.., .., .., ..]
descriptor broadcastable to [B, Hq, Lq, Lk]; mask_kind 1 reads uint8 (non-zero keeps),
2 reads fp32 added to the scaled scores. window: 0 for none. kv_chunk: -1 picks split-KV by
shape, 0 never splits, n > 0 splits the keys into chunks of n.)doc");
  m.attr("sdpa_max_head_dim") = FF_KERNELS(attention_kernels).max_head_dim;
  m.def(
      "_softmax_exp2",
      [](py::array_t<float, py::array::c_style | py::array::forcecast> x) {
        py::array_t<float> y(x.size());
        FF_KERNELS(attention_kernels).softmax_exp2(x.data(), y.mutable_data(), x.size());
        return y;
      },
      py::arg("x"), "2^x (flat float32) as the active ISA's online softmax computes it (tests).");
}

}  // namespace ff
