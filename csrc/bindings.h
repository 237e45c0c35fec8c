// One init_xxx per area (mlx python/src style); module.cpp calls them in order.
#pragma once

#include <pybind11/pybind11.h>

namespace ff {
void init_core(pybind11::module_& m);
void init_attention(pybind11::module_& m);
void init_quant(pybind11::module_& m);
}  // namespace ff
