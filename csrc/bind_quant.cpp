// Bindings of the quant kernels: the quantized matmul over a described compressed weight and
// the native 1-D k-means. Python (ops_quant.py) validates shapes and schemes; here every
// buffer is checked for dtype, contiguity and size before a raw pointer reaches a kernel.
#include <pybind11/numpy.h>

#include <cmath>
#include <string>
#include <vector>

#include "csrc/bindings.h"
#include "csrc/dispatch.h"
#include "kernels/cpu/quant/api.h"

namespace py = pybind11;

namespace ff {
namespace {

[[noreturn]] void fail(const std::string& msg) { throw py::value_error("[qmatmul] " + msg); }

// Pointer to a C-contiguous array of `itemsize`-byte items holding at least `min_items`.
const void* buffer(const py::object& obj, const char* name, int itemsize, int64_t min_items) {
  if (obj.is_none()) {
    if (min_items > 0) fail(std::string(name) + " is required for this format");
    return nullptr;
  }
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!py::isinstance<py::array>(obj)) fail(std::string(name) + " must be a numpy array");
  if (!(a.flags() & py::array::c_style)) fail(std::string(name) + " must be C-contiguous");
  if (a.itemsize() != itemsize)
    fail(std::string(name) + " has " + std::to_string(a.itemsize()) + "-byte items, expected " +
         std::to_string(itemsize));
  if (a.size() < min_items)
    fail(std::string(name) + " has " + std::to_string(a.size()) + " items, expected at least " +
         std::to_string(min_items));
  return a.data();
}

// popcount of a byte (the portable build has no popcount instruction)
const struct Popcount {
  uint8_t v[256];
  Popcount() {
    v[0] = 0;
    for (int i = 1; i < 256; ++i) v[i] = static_cast<uint8_t>(v[i >> 1] + (i & 1));
  }
  uint8_t operator[](uint8_t b) const { return v[b]; }
} kPopcount;

int64_t stream_bytes(int64_t count, int bits) { return (count * bits + 7) / 8; }

// `out` given to _C.qmatmul: a C-contiguous, writeable [m, n] array of x's dtype (every element
// is written).
py::array output_array(const py::object& out, const py::array& x, int64_t m, int64_t n) {
  if (!py::isinstance<py::array>(out)) fail("out must be a numpy array");
  py::array y = py::reinterpret_borrow<py::array>(out);
  if (!y.dtype().is(x.dtype())) fail("out's dtype does not match x's");
  if (y.ndim() != 2 || y.shape(0) != m || y.shape(1) != n)
    fail("out must be [" + std::to_string(m) + ", " + std::to_string(n) + "]");
  if (!(y.flags() & py::array::c_style) || !y.writeable()) fail("out must be C-contiguous and writeable");
  return y;
}

// The compressed weight's description, every buffer checked (own_offsets: the sparse row
// offsets where none are given, which w.row_offsets then points into).
QWeight describe_weight(int codes_kind, int64_t n, int64_t k, int bits, int group, const py::object& codes,
                        const py::object& scales, const py::object& biases, const py::object& zero_points,
                        const py::object& lut, const py::object& mask, const py::object& row_offsets,
                        std::vector<int64_t>* own_offsets) {
  if (n < 0 || k < 1) fail("bad weight shape");
  const bool sparse = !mask.is_none();
  QWeight w{};
  w.codes_kind = static_cast<QCodes>(codes_kind);
  w.n = n;
  w.k = k;
  w.bits = bits;
  w.group = group;
  const int64_t* offsets = nullptr;
  if (sparse) {
    if (k % 8) fail("sparse weights need K % 8 == 0");
    w.mask = static_cast<const uint8_t*>(buffer(mask, "mask", 1, n * k / 8));
    if (row_offsets.is_none()) {  // survivors before each row: a popcount prefix of the mask
      own_offsets->assign(static_cast<size_t>(n + 1), 0);
      for (int64_t r = 0; r < n; ++r) {
        int64_t c = 0;
        for (int64_t b = r * k / 8; b < (r + 1) * k / 8; ++b) c += kPopcount[w.mask[b]];
        (*own_offsets)[r + 1] = (*own_offsets)[r] + c;
      }
      offsets = own_offsets->data();
    } else {
      offsets = static_cast<const int64_t*>(buffer(row_offsets, "row_offsets", 8, n + 1));
    }
    w.row_offsets = offsets;
  }
  const int64_t count = sparse ? offsets[n] : n * k;
  if (sparse && (offsets[0] != 0 || count < 0 || count > n * k)) fail("row_offsets are inconsistent");
  switch (w.codes_kind) {
    case QCodes::affine:
      if (bits < 2 || bits > 8 || group < 8 || group % 8 || k % group) fail("bad affine bits/group");
      w.codes = buffer(codes, "w_q", 1, stream_bytes(count, bits)) ;
      w.scales = static_cast<const float*>(buffer(scales, "scales", 4, n * (k / group)));
      w.biases = static_cast<const float*>(buffer(biases, "biases", 4, n * (k / group)));
      break;
    case QCodes::int8:
      if (sparse) fail("int8 codes are dense only");
      w.codes = buffer(codes, "w_q", 1, count);
      w.scales = static_cast<const float*>(buffer(scales, "scales", 4, n));
      w.zero_points = static_cast<const int8_t*>(buffer(zero_points, "zero_points", 1, 0));
      if (w.zero_points) buffer(zero_points, "zero_points", 1, n);
      break;
    case QCodes::lut:
      if (bits < 1 || bits > 8 || group < 1 || n % group) fail("bad LUT bits/group");
      if (!sparse && k % 8) fail("LUT weights need K % 8 == 0");
      w.codes = buffer(codes, "indices", 1, stream_bytes(count, bits));
      w.lut = static_cast<const float*>(buffer(lut, "lut", 4, (n / group) << bits));
      break;
    case QCodes::f32:
      if (!sparse) fail("raw f32 codes are for sparse weights");
      w.codes = buffer(codes, "values", 4, count);
      break;
    default:
      fail("unknown codes kind " + std::to_string(codes_kind));
  }
  if (!sparse && w.codes_kind == QCodes::affine && k % 8) fail("affine needs K % 8 == 0");
  return w;
}

// y [m, n] = x [m, k] (rows ldx elements apart) @ W.T, with the GIL released.
void run_qmatmul(const void* x, int64_t m, int64_t ldx, int dtype, const QWeight& w, void* y) {
  QMatmulArgs args{x, m, ldx, static_cast<DType>(dtype), w, y};
  py::gil_scoped_release release;
  FF_KERNELS(quant_kernels).qmatmul(args);
}

py::array qmatmul(const py::array& x, int dtype, int codes_kind, int64_t n, int64_t k, int bits, int group,
                  const py::object& codes, const py::object& scales, const py::object& biases,
                  const py::object& zero_points, const py::object& lut, const py::object& mask,
                  const py::object& row_offsets, const py::object& out) {
  if (dtype < 0 || dtype > 2) fail("dtype must be 0 (f32), 1 (f16) or 2 (bf16)");
  const int xsize = dtype == 0 ? 4 : 2;
  if (x.ndim() != 2 || x.shape(1) != k) fail("x must be 2-D [m, " + std::to_string(k) + "]");
  if (x.itemsize() != xsize) fail("x item size does not match dtype");
  if (x.strides(1) != xsize || x.strides(0) % xsize || x.strides(0) < k * xsize)
    fail("x rows must be contiguous");
  std::vector<int64_t> own_offsets;
  const QWeight w = describe_weight(codes_kind, n, k, bits, group, codes, scales, biases, zero_points, lut, mask,
                                    row_offsets, &own_offsets);
  const int64_t m = x.shape(0);
  py::array y = out.is_none() ? py::array(x.dtype(), {m, n}) : output_array(out, x, m, n);
  run_qmatmul(x.data(), m, x.strides(0) / xsize, dtype, w, y.mutable_data());
  return y;
}

// A layer's compressed weight described and checked once (QuantizedLinear's eager call): the
// arrays are kept alive with it. On a 2-core Zen 3 class VM, a tiny layer's call through
// ff.torch's Python front took about 26 us where nn.Linear took 16 (timeit), most of it
// rebuilding _C.qmatmul's 14 arguments and the numpy views of x and y on every call.
class QMatmulPlan {
 public:
  QMatmulPlan(int codes_kind, int64_t n, int64_t k, int bits, int group, py::object codes, py::object scales,
              py::object biases, py::object zero_points, py::object lut, py::object mask, py::object row_offsets)
      : keep_{codes, scales, biases, zero_points, lut, mask, row_offsets} {
    w_ = describe_weight(codes_kind, n, k, bits, group, codes, scales, biases, zero_points, lut, mask, row_offsets,
                         &own_offsets_);
  }
  QMatmulPlan(const QMatmulPlan&) = delete;
  QMatmulPlan& operator=(const QMatmulPlan&) = delete;

  // y = x @ W.T for a plain CPU torch tensor x [..., k] (float32, float16, bfloat16; no autograd
  // to record; the last dimension contiguous and the leading ones collapsing into rows of one
  // stride) whose output is under max_out_bytes: a new tensor [..., n] of x's dtype. None for
  // any other x, without running anything (the caller's general path takes it).
  py::object torch(py::handle x, int64_t max_out_bytes) const {
    static const py::object* const torch_fns = [] {
      py::module_ t = py::module_::import("torch");
      return new py::object[5]{t.attr("Tensor"), t.attr("empty"), t.attr("float32"), t.attr("float16"),
                               t.attr("bfloat16")};
    }();
    const py::object &tensor_type = torch_fns[0], &empty = torch_fns[1];
    if (Py_TYPE(x.ptr()) != reinterpret_cast<PyTypeObject*>(tensor_type.ptr())) return py::none();
    if (x.attr("requires_grad").cast<bool>() || !x.attr("is_cpu").cast<bool>()) return py::none();
    const py::object dt = x.attr("dtype");
    const int dtype = dt.is(torch_fns[2]) ? 0 : dt.is(torch_fns[3]) ? 1 : dt.is(torch_fns[4]) ? 2 : -1;
    if (dtype < 0) return py::none();
    const py::object shape = x.attr("shape"), strides = x.attr("stride")();
    if (!PyTuple_Check(shape.ptr()) || !PyTuple_Check(strides.ptr())) return py::none();
    const Py_ssize_t nd = PyTuple_GET_SIZE(shape.ptr());
    if (nd < 1) return py::none();
    auto at = [](const py::object& t, Py_ssize_t i) { return PyLong_AsLongLong(PyTuple_GET_ITEM(t.ptr(), i)); };
    if (at(shape, nd - 1) != w_.k || (w_.k > 1 && at(strides, nd - 1) != 1)) return py::none();
    int64_t m = 1, ldx = w_.k, inner = -1;  // rows, their stride, the stride rows must keep
    py::tuple out_shape(nd);
    for (Py_ssize_t i = nd - 2; i >= 0; --i) {
      const int64_t size = at(shape, i), stride = at(strides, i);
      if (size == 1) {
        out_shape[i] = py::int_(1);
        continue;
      }
      if (inner < 0) {
        ldx = stride;  // the innermost leading dimension of more than one row sets the stride
      } else if (stride != inner) {
        return py::none();  // rows that are not one stride apart
      }
      inner = stride * size;
      m *= size;
      out_shape[i] = py::int_(size);
    }
    out_shape[nd - 1] = py::int_(w_.n);
    if (m == 0 || ldx < w_.k) return py::none();
    if (m * w_.n * (dtype == 0 ? 4 : 2) >= max_out_bytes) return py::none();
    py::object y = empty(out_shape, py::arg("dtype") = dt);
    const auto x_ptr = reinterpret_cast<const void*>(x.attr("data_ptr")().cast<uintptr_t>());
    auto* y_ptr = reinterpret_cast<void*>(y.attr("data_ptr")().cast<uintptr_t>());
    run_qmatmul(x_ptr, m, ldx, dtype, w_, y_ptr);
    return y;
  }

 private:
  std::vector<py::object> keep_;  // the arrays w_ points into
  std::vector<int64_t> own_offsets_;
  QWeight w_{};
};

py::array_t<float> kmeans1d(const py::array_t<float, py::array::c_style | py::array::forcecast>& v, int k) {
  if (k < 1 || k > 65536) throw py::value_error("[quant] k-means k must be in [1, 65536]");
  if (v.size() < 1) throw py::value_error("[quant] k-means needs at least one value");
  py::array_t<float> out(k);
  const float* src = v.data();
  const int64_t n = v.size();
  for (int64_t i = 0; i < n; ++i)  // (a NaN never equals itself: the DP's run of equal values never ended)
    if (!std::isfinite(src[i]))
      throw py::value_error("[quant] k-means values must be finite, got " + std::to_string(src[i]) + " at index " +
                            std::to_string(i));
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    FF_KERNELS(quant_kernels).kmeans1d(src, n, k, dst);
  }
  return out;
}

}  // namespace

void init_quant(py::module_& m) {
  m.def("qmatmul", &qmatmul, py::arg("x"), py::arg("dtype"), py::arg("codes_kind"), py::arg("n"),
        py::arg("k"), py::arg("bits"), py::arg("group"), py::arg("codes"), py::arg("scales") = py::none(),
        py::arg("biases") = py::none(), py::arg("zero_points") = py::none(), py::arg("lut") = py::none(),
        py::arg("mask") = py::none(), py::arg("row_offsets") = py::none(), py::arg("out") = py::none(),
        "y = x @ W.T for a compressed W [n, k] (codes_kind: 0 affine, 1 int8, 2 lut, 3 raw f32;\n"
        "mask/row_offsets for pruned weights). x [m, k] raw f32/f16/bf16 (dtype 0/1/2); y like x,\n"
        "written to `out` when given (C-contiguous [m, n], x's dtype) and returned.");
  // (module_local: benchmarks/build_ab.py loads two builds of this module into one process)
  py::class_<QMatmulPlan>(m, "QMatmulPlan", py::module_local(),
                          "A compressed weight described once for qmatmul's eager calls (ff.torch's "
                          "QuantizedLinear); built from the arguments _C.qmatmul takes after x and dtype.")
      .def(py::init<int, int64_t, int64_t, int, int, py::object, py::object, py::object, py::object, py::object,
                    py::object, py::object>(),
           py::arg("codes_kind"), py::arg("n"), py::arg("k"), py::arg("bits"), py::arg("group"), py::arg("codes"),
           py::arg("scales") = py::none(), py::arg("biases") = py::none(), py::arg("zero_points") = py::none(),
           py::arg("lut") = py::none(), py::arg("mask") = py::none(), py::arg("row_offsets") = py::none())
      .def("torch", &QMatmulPlan::torch, py::arg("x"), py::arg("max_out_bytes"),
           "x @ W.T for a plain CPU torch tensor x [..., K] (float32/float16/bfloat16, no autograd, last "
           "dimension contiguous, leading ones of one row stride) with an output under max_out_bytes: "
           "a new tensor [..., N]; None for any other x, without running anything.");
  m.def("quant_kmeans1d", &kmeans1d, py::arg("values"), py::arg("k"),
        "Optimal 1-D k-means of float32 values into k ascending centroids (float32 [k]).");
}

}  // namespace ff
