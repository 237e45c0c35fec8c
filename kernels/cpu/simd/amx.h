// AMX tile set-up shared by the kernels that use AMX-BF16 (attention's prefill tiles, the peak
// probe): the palette, its load and release, and a compiler barrier for the tile instructions.
// Functions marked FF_AMX run only where amx_tiles() (kernels/cpu/dispatch.h) says the CPU has
// AMX-BF16 and the OS granted this process the tile registers.
#pragma once

#include <cstdint>

#include "kernels/cpu/simd/vec.h"

namespace ff {
namespace FF_ISA_NS {

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(FF_COMPILER_HAS_AMX)
#define FF_AMX __attribute__((target("amx-tile,amx-bf16,avx512bf16")))

// Tile instructions are inline asm that names only the base pointer: this barrier keeps the
// compiler from moving plain stores into scratch past a tile load, or loads past a tile store.
inline void amx_fence() { asm volatile("" ::: "memory"); }

// The tile palette: palette 1; bytes 16..47 the bytes per row of tiles 0..15 (u16), bytes 48..63
// their rows. Tiles 0..7 are 16 rows x 64 bytes.
struct alignas(64) AmxConfig {
  uint8_t bytes[64];
};
constexpr AmxConfig amx_config() {
  AmxConfig c{};
  c.bytes[0] = 1;
  for (int t = 0; t < 8; ++t) c.bytes[16 + 2 * t] = 64, c.bytes[48 + t] = 16;
  return c;
}
inline constexpr AmxConfig kAmxConfig = amx_config();

// Loads the tile palette for this thread's AMX work (every tile 16 rows x 64 bytes) and
// releases the tiles when it goes out of scope. Loaded per block: other code on this thread
// (a framework's own AMX kernels) may have loaded another palette in between.
class AmxTiles {
 public:
  FF_AMX AmxTiles() {  // (a constant in memory: GCC 12's _tile_loadconfig declares an 8-byte read)
    _tile_loadconfig(kAmxConfig.bytes);
  }
  FF_AMX ~AmxTiles() { _tile_release(); }
  AmxTiles(const AmxTiles&) = delete;
  AmxTiles& operator=(const AmxTiles&) = delete;
};
#endif

}  // namespace FF_ISA_NS
}  // namespace ff
