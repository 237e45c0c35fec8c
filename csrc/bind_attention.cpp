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

// The largest |scale|: the kernel folds log2(e) into it in float32 (scores in base 2), which
// must stay finite (1.0001: a margin for that product's rounding).
constexpr double kMaxScale = 3.4028234663852886e38 / 1.4426950408889634 / 1.0001;

void check(bool ok, const std::string& msg) {
  if (!ok) throw py::value_error("[sdpa] " + msg);
}

SdpaTensor tensor_of(const View<4>& v, const char* name) {
  // (a head dim of 1 has one element per row: any stride is contiguous, as numpy's empty_like
  // of such a q can give its output)
  check(v.shape[3] == 1 || v.strides[3] == 1, std::string(name) + "'s last dimension must be contiguous");
  return {reinterpret_cast<const void*>(v.ptr), v.strides[0], v.strides[1], v.strides[2]};
}

// The kernel's parameters for q, k, v and out of one dtype (mask and lse added by the caller),
// checked against the raw-pointer contract.
SdpaParams params_of(const View<4>& q, const View<4>& k, const View<4>& v, const View<4>& out, int dtype,
                     bool causal, double scale, int64_t window, int64_t kv_chunk) {
  const int64_t B = q.shape[0], Hq = q.shape[1], Lq = q.shape[2], D = q.shape[3];
  const int64_t Hkv = k.shape[1], Lk = k.shape[2];
  const int64_t max_head_dim = FF_KERNELS(attention_kernels).max_head_dim;
  check(dtype >= 0 && dtype <= 2, "dtype code must be 0 (f32), 1 (f16) or 2 (bf16)");
  for (int64_t n : {B, Hq, Lq, D, Hkv, Lk}) check(n > 0, "every dimension must be non-zero");
  check(k.shape == v.shape, "k and v shapes differ");
  check(k.shape[0] == B && k.shape[3] == D, "k's batch or head dim does not match q's");
  check(Hq % Hkv == 0, "k's heads do not divide q's heads");
  check(out.shape == q.shape, "out's shape does not match q's");
  check(D <= max_head_dim, "head dim " + std::to_string(D) + " exceeds " + std::to_string(max_head_dim));
  check(std::isfinite(scale) && std::fabs(scale) <= kMaxScale, "scale must be finite in float32 after the factor log2 e");
  check(window >= 0, "window must be >= 0 (0: none)");

  SdpaParams p{};
  p.dtype = static_cast<DType>(dtype);
  p.batch = B, p.q_heads = Hq, p.kv_heads = Hkv, p.q_len = Lq, p.kv_len = Lk, p.head_dim = D;
  p.q = tensor_of(q, "q"), p.k = tensor_of(k, "k"), p.v = tensor_of(v, "v");
  const SdpaTensor o = tensor_of(out, "out");
  p.out = const_cast<void*>(o.data);
  p.out_stride_b = o.stride_b, p.out_stride_h = o.stride_h, p.out_stride_l = o.stride_l;
  p.lse = nullptr;
  p.mask.kind = SdpaMaskKind::none;
  p.causal = causal;
  p.window = window < Lk ? window : Lk;  // (a window of Lk keys already limits nothing; past
                                         // int64 range arithmetic it would overflow key_range)
  p.scale = static_cast<float>(scale);
  p.kv_chunk = kv_chunk;
  return p;
}

void sdpa_binding(py::handle q_, py::handle k_, py::handle v_, py::handle out_, int dtype,
                  py::object lse_, py::object mask_, int mask_kind, bool causal, double scale,
                  int64_t window, int64_t kv_chunk) {
  const auto q = parse_view<4>(q_, "q"), k = parse_view<4>(k_, "k"), v = parse_view<4>(v_, "v");
  const auto out = parse_view<4>(out_, "out");
  SdpaParams p = params_of(q, k, v, out, dtype, causal, scale, window, kv_chunk);
  const int64_t B = p.batch, Hq = p.q_heads, Lq = p.q_len, Lk = p.kv_len;
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
  py::gil_scoped_release release;
  FF_KERNELS(attention_kernels).sdpa(p);
}

// ---- the eager call in one step ------------------------------------------------------------
//
// ff.sdpa's general path checks and describes its arguments in Python (check_args, then
// native_sdpa's descriptors): about 27 us a call on a Zen 3 class VM where torch's own SDPA
// takes 8, which a model pays on every layer of every decode step. sdpa_torch and sdpa_numpy
// take the common eager call (plain CPU tensors or ndarrays of one dtype; no mask, or a bool
// or float32 one; with or without the lse; no autograd to record) in C++ and return None for
// anything else, which the front then sends down the general path: every argument error keeps
// the general path's message, and this path only has to recognise calls that path would accept.

// The element types the one-step call tells apart: q/k/v's, and a mask's (bool keeps, float32
// adds).
enum EagerDType { kF32 = 0, kF16 = 1, kBF16 = 2, kBool = 3, kOther = -1 };

// Torch: the tensor type, empty_like and the dtypes, read once (leaked: they live as long as
// the interpreter's torch module; torch is imported by then, as the caller holds its tensors).
struct TorchFramework {
  py::object tensor_type, empty_like_fn, empty_fn, f32, f16, bf16, boolean;

  static const TorchFramework& get() {
    static const TorchFramework* fw = [] {
      py::module_ t = py::module_::import("torch");
      return new TorchFramework{t.attr("Tensor"), t.attr("empty_like"), t.attr("empty"), t.attr("float32"),
                                t.attr("float16"), t.attr("bfloat16"), t.attr("bool")};
    }();
    return *fw;
  }
  // The view (leading dimensions of size 1 where it has fewer than 4, up to `fewer` of them)
  // and EagerDType of a plain dense CPU tensor that needs no autograd (false otherwise: sparse
  // and mkldnn tensors go to the general path, which names them).
  bool view(py::handle t, View<4>* v, int* dtype, int fewer = 0) const {
    if (Py_TYPE(t.ptr()) != reinterpret_cast<PyTypeObject*>(tensor_type.ptr())) return false;
    if (t.attr("requires_grad").cast<bool>() || !t.attr("is_cpu").cast<bool>()) return false;
    const py::object dt = t.attr("dtype");
    *dtype = dt.is(f32) ? kF32 : dt.is(f16) ? kF16 : dt.is(bf16) ? kBF16 : dt.is(boolean) ? kBool : kOther;
    py::object shape, strides;
    try {  // (sparse and mkldnn tensors have no strides or no data pointer: the general path names them)
      shape = t.attr("shape");
      strides = t.attr("stride")();
      v->ptr = t.attr("data_ptr")().cast<uintptr_t>();
    } catch (const py::error_already_set&) {
      return false;
    }
    if (!PyTuple_Check(shape.ptr()) || !PyTuple_Check(strides.ptr())) return false;
    const int nd = static_cast<int>(PyTuple_GET_SIZE(shape.ptr()));
    if (nd > 4 || nd < 4 - fewer) return false;
    for (int i = 0; i < 4; ++i) {
      const int at = i - (4 - nd);
      v->shape[i] = at < 0 ? 1 : PyLong_AsLongLong(PyTuple_GET_ITEM(shape.ptr(), at));
      v->strides[i] = at < 0 ? 0 : PyLong_AsLongLong(PyTuple_GET_ITEM(strides.ptr(), at));
    }
    return true;
  }
  py::object empty_like(py::handle q) const { return empty_like_fn(q); }
  // A contiguous float32 [b, h, l] (the lse) and its data.
  py::object empty_lse(int64_t b, int64_t h, int64_t l, float** data) const {
    py::object t = empty_fn(py::make_tuple(b, h, l), py::arg("dtype") = f32);
    *data = reinterpret_cast<float*>(t.attr("data_ptr")().cast<uintptr_t>());
    return t;
  }
};

// numpy: native-order float32 and float16 ndarrays (not subclasses; numpy has no bfloat16) whose
// strides are whole elements and broadcast no axis (the general path lays such an output out
// otherwise).
struct NumpyFramework {
  py::object empty_like_fn;
  py::dtype f32, f16, boolean;

  static const NumpyFramework& get() {
    static const NumpyFramework* fw = [] {
      return new NumpyFramework{py::module_::import("numpy").attr("empty_like"), py::dtype::of<float>(),
                                py::dtype("float16"), py::dtype::of<bool>()};
    }();
    return *fw;
  }
  bool view(py::handle h, View<4>* v, int* dtype, int fewer = 0) const {
    if (Py_TYPE(h.ptr()) != py::detail::npy_api::get().PyArray_Type_) return false;
    const auto a = py::reinterpret_borrow<py::array>(h);
    const int nd = static_cast<int>(a.ndim());
    if (nd > 4 || nd < 4 - fewer) return false;
    const py::dtype dt = a.dtype();
    *dtype = dt.equal(f32) ? kF32 : dt.equal(f16) ? kF16 : dt.equal(boolean) ? kBool : kOther;
    const int64_t item = static_cast<int64_t>(a.itemsize());
    for (int i = 0; i < 4; ++i) {
      const int at = i - (4 - nd);
      v->shape[i] = at < 0 ? 1 : static_cast<int64_t>(a.shape(at));
      const int64_t bytes = at < 0 ? 0 : static_cast<int64_t>(a.strides(at));
      if (bytes % item != 0 || (bytes == 0 && v->shape[i] > 1)) return false;
      v->strides[i] = bytes / item;
    }
    v->ptr = reinterpret_cast<uintptr_t>(a.data());
    return true;
  }
  py::object empty_like(py::handle q) const { return empty_like_fn(q); }
  py::object empty_lse(int64_t b, int64_t h, int64_t l, float** data) const {
    py::array_t<float> a({b, h, l});
    *data = a.mutable_data();
    return std::move(a);
  }
};

// The call on F's arrays, or None where it is not the common one (see above).
template <class F>
py::object sdpa_eager(py::handle q_, py::handle k_, py::handle v_, py::handle mask_, py::handle causal_,
                      py::handle scale_, py::handle window_, int64_t max_out_bytes, bool return_lse) {
  const F& fw = F::get();
  View<4> q, k, v;
  int qt, kt, vt;
  if (!fw.view(q_, &q, &qt) || !fw.view(k_, &k, &kt) || !fw.view(v_, &v, &vt)) return py::none();
  if (qt < kF32 || qt > kBF16) return py::none();
  for (const View<4>* x : {&q, &k, &v}) {  // non-empty, last dimension contiguous (else a copy)
    for (int64_t n : x->shape)
      if (n <= 0) return py::none();
    if (x->ptr == 0 || (x->shape[3] != 1 && x->strides[3] != 1)) return py::none();
  }
  const int64_t D = q.shape[3];
  if (kt != qt || vt != qt || k.shape != v.shape || k.shape[0] != q.shape[0] || k.shape[3] != D ||
      q.shape[1] % k.shape[1] != 0 || D > FF_KERNELS(attention_kernels).max_head_dim)
    return py::none();
  if (!PyBool_Check(causal_.ptr())) return py::none();
  double scale = 1.0 / std::sqrt(static_cast<double>(D));
  if (!scale_.is_none()) {
    if (!PyFloat_CheckExact(scale_.ptr())) return py::none();
    scale = PyFloat_AS_DOUBLE(scale_.ptr());
    if (!std::isfinite(scale) || std::fabs(scale) > kMaxScale) return py::none();
  }
  int64_t window = 0;
  if (!window_.is_none()) {
    if (!PyLong_CheckExact(window_.ptr())) return py::none();
    window = PyLong_AsLongLong(window_.ptr());
    if (window == -1 && PyErr_Occurred()) {  // past int64: the general path's to handle
      PyErr_Clear();
      return py::none();
    }
    if (window < 1) return py::none();
  }
  View<4> m;  // the mask: bool (keeps) or float32 (adds), broadcastable to [B, Hq, Lq, Lk]
  int mt = kOther;
  if (!mask_.is_none()) {
    if (!fw.view(mask_, &m, &mt, 4) || (mt != kBool && mt != kF32) || m.ptr == 0) return py::none();
    const std::array<int64_t, 4> full{q.shape[0], q.shape[1], q.shape[2], k.shape[2]};
    for (int i = 0; i < 4; ++i) {
      if (m.shape[i] != full[i] && m.shape[i] != 1) return py::none();
      if (m.shape[i] == 1) m.strides[i] = 0;
    }
  }
  const int64_t elem = qt == 0 ? 4 : 2;
  if (q.shape[0] * q.shape[1] * q.shape[2] * D * elem >= max_out_bytes) return py::none();
  py::object out_ = fw.empty_like(q_);
  View<4> out;
  int ot;
  check(fw.view(out_, &out, &ot) && ot == qt, "empty_like(q) is not an output like q");
  SdpaParams p = params_of(q, k, v, out, qt, causal_.ptr() == Py_True, scale, window, -1);
  if (mt != kOther) {
    p.mask.kind = mt == kBool ? SdpaMaskKind::keep : SdpaMaskKind::add;
    p.mask.data = reinterpret_cast<const void*>(m.ptr);
    p.mask.stride_b = m.strides[0], p.mask.stride_h = m.strides[1], p.mask.stride_q = m.strides[2];
    p.mask.stride_k = m.strides[3];
  }
  py::object lse_;
  if (return_lse) lse_ = fw.empty_lse(q.shape[0], q.shape[1], q.shape[2], &p.lse);
  {
    py::gil_scoped_release release;
    FF_KERNELS(attention_kernels).sdpa(p);
  }
  if (return_lse) return py::make_tuple(out_, lse_);
  return out_;
}

}  // namespace

void init_attention(py::module_& m) {
  // numpy's functions and dtypes (and pybind11's numpy C API) are looked up here, not on the first
  // call, which may come from a finalizer at interpreter shutdown, when imports fail.
  NumpyFramework::get();
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
  m.attr("sdpa_max_scale") = kMaxScale;
  const char* eager_doc = R"doc(The common eager ff.sdpa call in one step (use fusedformer.sdpa instead).

sdpa_torch / sdpa_numpy(q, k, v, mask, causal, scale, window, max_out_bytes, return_lse=False) with plain CPU
tensors (float32, float16, bfloat16) that need no autograd, or ndarrays (float32, float16,
native byte order, no broadcast axis), of one dtype: q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] with
a contiguous last dimension; mask None, or bool (True keeps) or float32 (added) of up to 4 dims
broadcastable to [B, Hq, Lq, Lk], of the same framework; causal a bool, scale None or a finite
float, window None or an int >= 1, and an output under max_out_bytes. Returns the output
(empty_like(q)), or with return_lse (output, lse: contiguous float32 [B, Hq, Lq] of the same
framework); None for any other call, without running anything.)doc";
  for (const auto& [name, fn] : {std::pair{"sdpa_torch", &sdpa_eager<TorchFramework>},
                                 std::pair{"sdpa_numpy", &sdpa_eager<NumpyFramework>}})
    m.def(name, fn, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"), py::arg("causal"), py::arg("scale"),
          py::arg("window"), py::arg("max_out_bytes"), py::arg("return_lse") = false, eager_doc);
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
