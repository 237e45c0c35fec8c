// Scratch memory of the kernels: cache-line aligned, so that a 64-byte row of a tile (a zmm
// load, an AMX tile row) never straddles two lines. Plain `new T[n]` returns 16-byte aligned
// memory, and where in a line it starts changes with malloc's history (small requests come
// from the heap, large ones from mmap at page + 16, and glibc moves that threshold at run
// time): the same call then ran at one of two speeds, 52 or 82 ms on B1 H32 L2048 D128 bf16
// prefill on AMX.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>

#include "kernels/cpu/isa.h"

namespace ff {
namespace FF_ISA_NS {

constexpr std::size_t kScratchAlign = 64;

struct AlignedFree {
  void operator()(void* p) const { ::operator delete[](p, std::align_val_t{kScratchAlign}); }
};

// n elements of trivially constructible T, uninitialised, 64-byte aligned.
template <class T>
using AlignedArray = std::unique_ptr<T[], AlignedFree>;

template <class T>
AlignedArray<T> aligned_array(int64_t n) {
  void* p = ::operator new[](static_cast<std::size_t>(n > 0 ? n : 1) * sizeof(T),
                             std::align_val_t{kScratchAlign});
  return AlignedArray<T>(static_cast<T*>(p));
}

// A buffer that only grows, for per-thread scratch kept between calls (thread_local).
template <class T>
class GrowBuffer {
 public:
  T* get(int64_t n) {
    if (n > capacity_) {
      data_ = aligned_array<T>(n);
      capacity_ = n;
    }
    return data_.get();
  }

 private:
  AlignedArray<T> data_;
  int64_t capacity_ = 0;
};

}  // namespace FF_ISA_NS
}  // namespace ff
