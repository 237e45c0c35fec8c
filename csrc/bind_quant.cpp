// Bindings of the quant kernels: the quantized matmul over a described compressed weight and
// the native 1-D k-means. Python (ops_quant.py) validates shapes and schemes; here every
// buffer is checked for dtype, contiguity and size before a raw pointer reaches a kernel.
#include <pybind11/numpy.h>

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
  if (n < 0 || k < 1) fail("bad weight shape");
  const bool sparse = !mask.is_none();
  QWeight w{};
  w.codes_kind = static_cast<QCodes>(codes_kind);
  w.n = n;
  w.k = k;
  w.bits = bits;
  w.group = group;
  const int64_t* offsets = nullptr;
  std::vector<int64_t> own_offsets;
  if (sparse) {
    if (k % 8) fail("sparse weights need K % 8 == 0");
    w.mask = static_cast<const uint8_t*>(buffer(mask, "mask", 1, n * k / 8));
    if (row_offsets.is_none()) {  // survivors before each row: a popcount prefix of the mask
      own_offsets.assign(static_cast<size_t>(n + 1), 0);
      for (int64_t r = 0; r < n; ++r) {
        int64_t c = 0;
        for (int64_t b = r * k / 8; b < (r + 1) * k / 8; ++b) c += kPopcount[w.mask[b]];
        own_offsets[r + 1] = own_offsets[r] + c;
      }
      offsets = own_offsets.data();
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
  const int64_t m = x.shape(0);
  py::array y = out.is_none() ? py::array(x.dtype(), {m, n}) : output_array(out, x, m, n);
  QMatmulArgs args{x.data(), m, x.strides(0) / xsize, static_cast<DType>(dtype), w, y.mutable_data()};
  {
    py::gil_scoped_release release;
    FF_KERNELS(quant_kernels).qmatmul(args);
  }
  return y;
}

py::array_t<float> kmeans1d(const py::array_t<float, py::array::c_style | py::array::forcecast>& v, int k) {
  if (k < 1 || k > 65536) throw py::value_error("[quant] k-means k must be in [1, 65536]");
  if (v.size() < 1) throw py::value_error("[quant] k-means needs at least one value");
  py::array_t<float> out(k);
  const float* src = v.data();
  const int64_t n = v.size();
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
  m.def("quant_kmeans1d", &kmeans1d, py::arg("values"), py::arg("k"),
        "Optimal 1-D k-means of float32 values into k ascending centroids (float32 [k]).");
}

}  // namespace ff
