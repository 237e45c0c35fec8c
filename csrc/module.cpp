#include <stdexcept>

#include "csrc/bindings.h"
#include "csrc/dispatch.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedformer native kernels (CPU): fused attention, quantized matmuls, probes";
  // Environment is read once, here; a bad value makes the import fail with a clear message.
  try {
    ff::select_isa();
    ff::select_num_threads();
    ff::select_spin();
    ff::select_pool();
  } catch (const std::invalid_argument& e) {
    throw pybind11::value_error(e.what());
  }
  ff::init_core(m);
  ff::init_attention(m);
  ff::init_quant(m);
}
