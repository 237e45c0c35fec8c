// Flash-attention forward (prefill) and split-KV decode (flash-decoding) on the CPU.
//
// Work is cut into units of fixed size, never by thread count, so results are bitwise the
// same for any number of threads:
//   unit = (batch b, kv head, block of query rows (register_tile_rows, kAmxRowTile: chosen by
//   shape), chunk of keys).
// The query rows of a kv head's group are flattened as r = i * G + g (position i, query head
// kvh * G + g), so a block holds every query head of the group that reads the same K/V tiles:
// each K/V tile is loaded once per block and shared by all of them (GQA/MQA without repeating
// K/V). A block walks its keys in tiles of kKeyTile (kAmxKeyTile on AMX tiles) with an online
// softmax (running max m and sum l, rescaling the fp32 accumulator by alpha = exp(m_old -
// m_new); prefill tiles move m only when a row's scores rise more than kMaxSlack above it, so
// alpha is mostly 1); tiles outside every row's causal/window range are skipped. With one
// chunk per row block the block writes its output directly; with several (decode: few rows,
// many keys) each chunk writes an unnormalised partial (o, m, l) and a merge pass combines
// them through their logsumexp.
// Scores are kept in base 2: q is scaled by scale * log2(e) (additive masks by log2(e)), so
// every exponential is a 2^x, without exp's ln2 range reduction; lse = ln2 * m + log(l).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <vector>

#include "kernels/cpu/attention/api.h"
#include "kernels/cpu/attention/amx.h"
#include "kernels/cpu/scratch.h"

namespace ff {
namespace FF_ISA_NS {
namespace attention {
namespace {

// Query rows per block (positions x heads of a group). Each block reads its K/V tiles once for
// all its rows: AVX-512 builds take twice the rows (their CPUs have 1-2 MiB of L2 per core),
// 0.96x the time of 96 on causal B1 H32 L2048 D128 fp32 prefill and 0.91x on bf16 (AMX) in
// alternating runs of two builds on a Sapphire Rapids class VM; on a Zen 3 class AVX2 machine
// (512 KiB L2) 192 measured no better than 96 while fp32 V was read in place; its blocks now
// take up to 192 (kMaxRowTile). Blocks on the AMX tiles take twice that again (0.94x the time
// of 192 on B1 H32 L2048 D128 bf16 prefill, 0.96x on B4 H12 L1024 D64; 576 no better). The
// register tiles of AVX-512 builds take up to three times kRowTile (register_tile_rows).
#if defined(__AVX512F__)
constexpr int64_t kRowTile = 192;
constexpr int64_t kAmxRowTile = 384;
constexpr int64_t kMaxRowTile = 3 * kRowTile;  // the largest blocks (scratch rows)
#else
constexpr int64_t kRowTile = 96;
constexpr int64_t kAmxRowTile = kRowTile;
constexpr int64_t kMaxRowTile = 2 * kRowTile;
// Blocks of the ymm tiles take up to twice kRowTile (register_tile_rows): fp16/bf16 convert
// each K/V tile as they pack it, and fp32 packs K and (rows a multiple of 512 bytes apart) V.
// For fp32, against kRowTile, build_ab 11-15 rounds, per-round median (quartiles): causal B1
// H32 L2048 D128 0.956 (0.918-0.975) and 0.976 (0.940-1.021) in two runs, non-causal B1 H8
// L2048 D128 0.970 (0.967-0.974), B4 H12 L1024 D64 0.975 (0.972-0.980); D96, D256 and the
// [B, L, H, D] layouts 0.94-1.01.
#endif
static_assert(kMaxRowTile >= kAmxRowTile, "the scratch holds the AMX blocks");
// Blocks below which register_tile_rows stops growing them (and split_chunk lengthening its
// chunks; half as many for fp16/bf16 storage there): enough for a pool of 16 threads to take
// two each.
constexpr int64_t kMinBlocks = 32;
// Keys per tile of the AMX tiles: a tile's P V accumulates into O in memory (tile loads and
// stores of O), so longer tiles spend fewer of them per multiply-add (with the K/V packed once
// per call, 256 measured 0.78-0.92x the time of 64 on D128 bf16 prefill; 128 and 512 no better).
constexpr int64_t kAmxKeyTile = 256;
// Their score rows' pitch (floats; also the packed K tile's, in words): AMX moves 16 rows at a
// time, and rows a power of two apart larger than 256 bytes share L1 sets.
constexpr int64_t kAmxPitch = kAmxKeyTile + 16;
// The score rows' pitch of the zmm tiles (floats): the probabilities of a group of key tiles.
constexpr int64_t kGroupPitch = kGroupKeys;
constexpr int64_t kMaxKeyTile = kAmxPitch > kGroupPitch ? kAmxPitch : kGroupPitch;
// ... and of their P rows (words: bf16 pairs), off a power of two for the same reason.
constexpr int64_t kAmxPPitch = kAmxKeyTile / 2 + 16;
static_assert(kRowTile % kMr == 0 && kAmxRowTile % kMr == 0, "blocks are whole kMr-row strips");
constexpr int64_t kSplitChunk = 512;   // the fewest keys per split-KV chunk (split_chunk)
constexpr int64_t kStreamMaxRows = 8;  // blocks this small stream K/V instead of packing them
constexpr int64_t kPrefetchTiles = 2;  // how far ahead K/V tiles are prefetched
constexpr int64_t kPrefetchMaxRows = 64;  // ... by blocks of at most this many rows
constexpr int64_t kDecodeBurstKeys = 2 * kKeyTile;  // fp32 decode rows requested up front
// How far ahead of a tile's keys its kernels request K/V rows where they spread the requests
// over their loops (LineAhead, in attend): against 128 (kDecodePrefetchKeys), cold fp32 GQA
// 32/8 decode took 0.92-0.98x the time at D128 Lk 4096 / 16384 and D96, build_ab 11-15 rounds;
// 256 took 1.19x at D96.
constexpr int64_t kLineAheadKeys = kKeyTile;
// Outputs of at least this many bytes are written with streaming stores (write_row), around the
// caches: an output larger than the L2s leaves them for memory anyway, and a normal store first
// reads each line it writes (write_row held 3.5% of causal B4 H12 L1024 D64 fp32's samples,
// most on the stores). build_ab 9 rounds: causal fp32 prefill B1 H32 L2048 D128 (32 MiB out)
// 0.981x the time, B4 H12 L1024 D64 (12 MiB) 0.975x, B1 H16 L1024 D256 (16 MiB) 0.982x; bf16
// B1 H32 L2048 (16 MiB) 0.994x. Smaller outputs, as a model's layers and decode steps write,
// keep plain stores and stay in cache for the op that reads them next.
constexpr int64_t kStreamOutputBytes = 8 << 20;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Rows per block of the register tiles (fp32 and fp16 inputs, bf16 without AMX) for head dims
// padded to dp, in a call of `pairs` (batch, kv head) pairs of `rows` rows each: as many as
// keep a block's Q and O (rows x dp floats each) within 3 kRowTile x 128 floats, up to
// kMaxRowTile (AVX-512 builds: 576 up to D128, 384 at D192, 288 at D256; AVX2 builds: 192 up
// to D128, 144 at D256), halved (not below kRowTile)
// while the call would have fewer than kMinBlocks blocks. Each K/V tile is packed, and each
// K/V row read, once per block: on causal B1 H32 L2048 D128 fp32, 384 rows took 0.978-0.979x
// the time of 192 and 576 0.961-0.983x that of 384 (768: 0.998x of 576); on non-causal B1 H8
// L2048 D128 0.961-0.966x and 0.986-0.989x (build_ab, 11-21 rounds). Fewer, larger blocks
// balance worse: causal B1 H8 L512 D64 took 0.96x the time in 24 blocks of 192 as in 8 of 384
// on 2 threads. On a Zen 3 class AVX2 VM fp16/bf16 blocks, which convert every K/V tile they
// pack, took 0.92-1.00x the time in blocks of 192 as of 96 on causal prefill (2 threads;
// 1 thread: 0.90-0.94x on D128 bf16; build_ab 9-11 rounds); fp32 blocks, once they packed V
// too, 0.96-0.98x (kMaxRowTile). Depends on the shape alone: the work decomposition, and so
// every bit of the result, is the same for any thread count.
inline int64_t register_tile_rows(int64_t dp, int64_t pairs, int64_t rows) {
  const int64_t fit = 3 * kRowTile * 128 / dp / kMr * kMr;
  int64_t tile = fit < kRowTile ? kRowTile : fit > kMaxRowTile ? kMaxRowTile : fit;
  while (tile > kRowTile && pairs * ((rows + tile - 1) / tile) < kMinBlocks) {
    const int64_t half = tile / 2 / kMr * kMr;
    tile = half < kRowTile ? kRowTile : half;
  }
  return tile;
}

// Keys per chunk of a decode call's split-KV (few rows, many keys: calls of at least
// 2 kSplitChunk keys): as few chunks as give kMinBlocks units over the pairs (batch x kv heads),
// at least kSplitChunk keys each. Longer chunks stream longer runs of K/V and merge fewer
// partials: against chunks of 512 always (isa_ab's cold decode cases, build_ab 7 rounds), GQA
// 32/8 D128 Lk 16384 (4 chunks of 4096) took 0.885x the time in fp32, 0.906x in bf16, 0.919x
// in fp16; Lk 4096 (4 of 1024) 0.938x / bf16 0.961x; MHA 32/32 Lk 4096 bf16 (no split) 0.873x.
// fp16/bf16 storage (elem_bytes 2) takes half as many units, so that a unit streams as many
// bytes as an fp32 one of the same shape does: cold GQA 32/8 Lk 4096 D128 bf16 in 2 chunks of
// 2048 keys took 0.957-0.964x the time of 4 of 1024 (build_ab 11-21 rounds; with K/V in cache
// 0.975-1.05x, Lk 16384 bf16/fp16 0.989-0.992x, fp32 unchanged); 16 units are still one per
// thread of a 16-thread pool. Depends on the shape and storage alone, not on the thread count.
inline int64_t split_chunk(int64_t pairs, int64_t kv_len, int64_t elem_bytes) {
  const int64_t units = elem_bytes == 4 ? kMinBlocks : kMinBlocks / 2;
  const int64_t chunks = (units + pairs - 1) / pairs;
  const int64_t even = round_up((kv_len + chunks - 1) / chunks, kKeyTile);
  return even > kSplitChunk ? even : kSplitChunk;
}

// Every K/V tile of a call in the operand layouts of the AMX tiles, for calls where several
// row blocks read each tile: per (b, kv head) `tiles` tiles of `tile` keys, each k_words of
// packed K then v_words of packed V (32-bit words), as `pack` writes them. A tile is packed by
// the first block that asks for it (while the other threads compute, instead of in a pass of
// its own before them, which is bound by memory bandwidth); a block that asks while another
// packs it packs its own copy instead of waiting (two threads that start on blocks of the same
// kv head would otherwise take turns at each tile).
// The fp32 register tiles pack per block instead: with this cache (pack_wide_tile) B1 H32
// L2048 D128 causal took 0.98-1.02x the time and B4 H12 L1024 D64 causal 1.05-1.09x; writing
// the cache and reading it back from beyond L2 costs about what packing once saves there.
struct KvCache {
  using Pack = void (*)(const SdpaParams& p, int64_t dp, int64_t b, int64_t kvh, int64_t t, int64_t nk,
                        uint32_t* kp, uint32_t* vp);
  uint32_t* words = nullptr;
  std::atomic<uint8_t>* state = nullptr;  // per tile: 0 not packed, 1 being packed, 2 ready
  int64_t tile = 0, tiles = 0, k_words = 0, v_words = 0;
  Pack pack = nullptr;

  // The packed tile of keys [ti tile, ...) of (b, kv head), packed now if no block has begun
  // to: its K; its V follows at k_words. Null while another block packs it.
  const uint32_t* get(const SdpaParams& p, int64_t dp, int64_t b, int64_t kvh, int64_t ti) const {
    const int64_t u = (b * p.kv_heads + kvh) * tiles + ti;
    uint32_t* kp = words + u * (k_words + v_words);
    std::atomic<uint8_t>& st = state[u];
    const uint8_t now = st.load(std::memory_order_acquire);
    if (now == 2) return kp;
    uint8_t expected = 0;
    if (now == 1 || !st.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) return nullptr;
    const int64_t t = ti * tile, nk = p.kv_len - t < tile ? p.kv_len - t : tile;
    pack(p, dp, b, kvh, t, nk, kp, kp + k_words);
    st.store(2, std::memory_order_release);
    return kp;
  }
};

// The rows of K and V from key t of (b, kv head).
template <class S>
const S* key_rows(const SdpaTensor& x, int64_t b, int64_t kvh, int64_t t) {
  return static_cast<const S*>(x.data) + b * x.stride_b + kvh * x.stride_h + t * x.stride_l;
}

// The K and V rows of a block's next key tile, requested into L2 a slice per strip of this
// tile's S = Q K^T (qk_packed_wide's per-strip hook), so that packing them (pack_wide_tile)
// finds them there. Each block packs its tiles from the raw rows, which come from memory: in
// one burst at each tile's start the loads stall (pack_k_transposed held 4.5% of causal B4 H12
// L1024 D64 fp32's samples), and so do requests for the whole tile at once (the fill buffers
// run out: build_ab 0.995x). Spread over the strips they run under the FMAs.
// always_inline: GCC takes a function whose only effects are prefetches for one without side
// effects and drops calls to it that it has not inlined (a build without it had no prefetch).
struct NextTileRows {
  const char* k = nullptr;
  const char* v = nullptr;
  int64_t k_stride = 0, v_stride = 0;  // bytes between rows
  int64_t rows = 0;                    // 0: nothing to request
  int64_t row_bytes = 0;

  // Rows [i rows / strips, (i + 1) rows / strips) of K and of V, for strip i of `strips`, a line
  // of K then the same line of V (prefetch_rows on K's slice, then on V's, measured 1.007-1.012x
  // the time of this on fp32 causal prefill: build_ab 9 rounds).
  __attribute__((always_inline)) void request(int64_t i, int64_t strips) const {
    for (int64_t row = i * rows / strips, e = (i + 1) * rows / strips; row < e; ++row)
      for (int64_t at = 0; at < row_bytes; at += 64) {
        __builtin_prefetch(k + row * k_stride + at, 0, 2);
        __builtin_prefetch(v + row * v_stride + at, 0, 2);
      }
  }
};

// KvCache::Pack of the AMX tiles: K pairs, then V pairs (pack_amx_kv).
void pack_amx_tile(const SdpaParams& p, int64_t dp, int64_t b, int64_t kvh, int64_t t, int64_t nk,
                   uint32_t* kp, uint32_t* vp) {
  pack_amx_kv(key_rows<uint16_t>(p.k, b, kvh, t), p.k.stride_l, key_rows<uint16_t>(p.v, b, kvh, t),
              p.v.stride_l, nk, p.head_dim, dp, kAmxPitch, kp, vp);
}

// The same for the fp32 register tiles (packed per block): K transposed (pack_k_transposed),
// then V in the panels of pack_v_wide.
template <DType T>
void pack_wide_tile(const SdpaParams& p, int64_t dp, int64_t b, int64_t kvh, int64_t t, int64_t nk,
                    uint32_t* kp, uint32_t* vp) {
  using S = typename Elem<T>::type;
  pack_k_transposed<T>(key_rows<S>(p.k, b, kvh, t), p.k.stride_l, nk, p.head_dim,
                       reinterpret_cast<float*>(kp));
  pack_v_wide<T>(key_rows<S>(p.v, b, kvh, t), p.v.stride_l, nk, p.head_dim, dp,
                 reinterpret_cast<float*>(vp));
}

// The keys each stored row of the mask keeps: pairs [lo, hi) from its first to one past its
// last kept key (bool: non-zero; additive: not -inf), (0, 0) for a row that keeps none. Rows
// are indexed over the mask's own extent: a dimension it broadcasts (stride 0) counts once.
// Blocks narrow each row's keys to its mask row's range, so that key tiles a mask wholly
// excludes (above the diagonal of a causal mask, left padding) are skipped, not computed and
// masked; inside the range the mask still applies key by key.
struct MaskRanges {
  const int64_t* pairs = nullptr;
  int64_t stride_b = 0, stride_h = 0, stride_q = 0;  // in pairs

  void narrow(int64_t b, int64_t h, int64_t i, int64_t* lo, int64_t* hi) const {
    const int64_t* r = pairs + 2 * (b * stride_b + h * stride_h + i * stride_q);
    if (r[0] > *lo) *lo = r[0];
    if (r[1] < *hi) *hi = r[1];
  }
};

// Shape-derived constants of one call.
struct Problem {
  const SdpaParams& p;
  int64_t group;       // Hq / Hkv
  int64_t dp;          // head dim rounded up to 16: row pitch of the fp32 scratch
  int64_t row_tile;    // rows per block: register_tile_rows, or kAmxRowTile on the AMX tiles
  int64_t row_blocks;  // blocks per (b, kv head)
  int64_t chunks;      // key chunks per block (1: no split)
  int64_t chunk_len;   // keys per chunk
  // AMX prefill, when several row blocks read each K/V tile: the tiles of the call in the
  // operand layouts, each packed once, by the first block that reads it; else null and each
  // block packs its own.
  const KvCache* kv_cache = nullptr;
  // How the AMX and fp32 register (zmm) tiles pack a K/V tile (pack_amx_tile, pack_wide_tile);
  // null where the call runs neither.
  KvCache::Pack pack_kv = nullptr;
  // With a mask: its rows' key ranges (null without a mask).
  const MaskRanges* mask_ranges = nullptr;
  // Whether write_row streams the output (an output of at least kStreamOutputBytes).
  bool stream_out = false;
};

struct Block {
  int64_t b, kvh;
  int64_t r0, nr;  // flattened rows [r0, r0 + nr) of the group
  int64_t j0, j1;  // keys [j0, j1)
};

// The fp32 working set of one block (per thread, kept between calls), for blocks of at most
// `rows` rows (the call's Problem::row_tile; sized per call, so that decode's small blocks keep
// their arrays close together).
struct Work {
  float* q;      // [rows][dp], pre-scaled
  float* o;      // [rows][dp], unnormalised output
  float* s;      // [rows][tile keys], scores then probabilities
  float* kt;     // [kKeyTile / kKPanel][D][kKPanel], packed transposed K tile (AMX: K pairs)
  float* v;      // packed V: the panels of pack_v_wide (zmm tiles: a group of tiles) or
                 // [dp / kVPanel][kKeyTile][kVPanel] (AMX: V pairs); all three sized for
                 // kMaxKeyTile keys
  uint32_t* p;   // [rows][kAmxPPitch] AMX: probabilities as bf16 pairs
  float* m;      // [rows] running max
  float* l;      // [rows] running sum
  float* alpha;  // [rows] rescale of this tile
  float* alpha2; // [rows] ... of a later tile of a group (zmm tiles), from the one before
};

Work thread_work(int64_t dp, int64_t block_rows) {
  thread_local GrowBuffer<float> buf;
  const int64_t rows = round_up(block_rows, 16);
  const int64_t v_size = std::max(kMaxKeyTile * dp, kGroupKeys * round_up(dp, 64));
  const int64_t sizes[] = {rows * dp, rows * dp, rows * kMaxKeyTile, dp * kMaxKeyTile, v_size,
                           rows * kAmxPPitch, rows, rows, rows, rows};
  constexpr int kArrays = sizeof(sizes) / sizeof(sizes[0]);
  int64_t need = 0;
  for (int64_t n : sizes) need += n;
  float* ptrs[kArrays];  // each a multiple of 16 floats: every array starts on a cache line
  float* at = buf.get(need);
  for (int i = 0; i < kArrays; ++i) ptrs[i] = at, at += sizes[i];
  return {ptrs[0], ptrs[1], ptrs[2], ptrs[3], ptrs[4], reinterpret_cast<uint32_t*>(ptrs[5]),
          ptrs[6], ptrs[7], ptrs[8], ptrs[9]};
}

// Keys [lo, hi) query position i may see under causal/window (before any mask).
inline void key_range(const SdpaParams& p, int64_t i, int64_t* lo, int64_t* hi) {
  const int64_t diag = i + p.kv_len - p.q_len;  // bottom-right aligned
  *lo = 0;
  *hi = p.kv_len;
  if (p.causal) *hi = diag + 1;
  if (p.window > 0) *lo = diag - p.window + 1;  // one-sided, as reference.sdpa
  if (*lo < 0) *lo = 0;
  if (*hi > p.kv_len) *hi = p.kv_len;
}

inline void apply_mask(const SdpaMask& mk, int64_t b, int64_t h, int64_t i, int64_t t,
                       int64_t nk, float* s) {
  const int64_t base = b * mk.stride_b + h * mk.stride_h + i * mk.stride_q + t * mk.stride_k;
  const int64_t sk = mk.stride_k;
  if (mk.kind == SdpaMaskKind::keep) {
    const uint8_t* keep = static_cast<const uint8_t*>(mk.data) + base;
    for (int64_t j = 0; j < nk; ++j)
      if (!keep[j * sk]) s[j] = kNegInf;
  } else {
    const float* add = static_cast<const float*>(mk.data) + base;
    for (int64_t j = 0; j < nk; ++j) {  // -inf drops the key whatever its score (NaN + -inf is NaN)
      const float a = add[j * sk];
      s[j] = a == kNegInf ? kNegInf : s[j] + mask_base2(a);
    }
  }
}

// [lo, hi) of the kept keys among n mask entries at `row` (element stride sk): bool entries
// are kept when non-zero, additive ones when not -inf. Contiguous rows are skipped a 64-bit
// word at a time from both ends (8 bools or 2 floats: a causal mask's row i ends in Lk - 1 - i
// masked keys).
inline void kept_keys(SdpaMaskKind kind, const void* row, int64_t n, int64_t sk, int64_t* lo, int64_t* hi) {
  const bool keep = kind == SdpaMaskKind::keep;
  const int64_t size = keep ? 1 : static_cast<int64_t>(sizeof(float));
  const char* base = static_cast<const char*>(row);
  constexpr uint32_t kNegInfBits = 0xFF800000u;
  auto kept = [&](int64_t j) {
    if (keep) return base[j * sk] != 0;
    uint32_t bits;
    std::memcpy(&bits, base + j * sk * size, sizeof(bits));
    return bits != kNegInfBits;
  };
  const uint64_t none = keep ? 0 : (uint64_t{kNegInfBits} << 32 | kNegInfBits);  // a word keeping nothing
  const int64_t per_word = 8 / size;
  auto word_keeps_none = [&](int64_t j) {
    uint64_t w;
    std::memcpy(&w, base + j * size, sizeof(w));
    return w == none;
  };
  int64_t a = 0, e = n;
  if (sk == 1) {
    while (a + per_word <= n && word_keeps_none(a)) a += per_word;
  }
  while (a < n && !kept(a)) ++a;
  if (sk == 1) {
    while (e - per_word >= a && word_keeps_none(e - per_word)) e -= per_word;
  }
  while (e > a && !kept(e - 1)) --e;
  *lo = a < e ? a : 0;
  *hi = a < e ? e : 0;
}

// The MaskRanges of a call's mask, in `buf` (2 per stored row).
MaskRanges mask_ranges(const SdpaParams& p, GrowBuffer<int64_t>* buf) {
  const SdpaMask& mk = p.mask;
  const int64_t nh = mk.stride_h ? p.q_heads : 1, nq = mk.stride_q ? p.q_len : 1;
  const int64_t nb = mk.stride_b ? p.batch : 1;
  int64_t* pairs = buf->get(2 * nb * nh * nq);
  const int64_t size = mk.kind == SdpaMaskKind::keep ? 1 : static_cast<int64_t>(sizeof(float));
  // chunks of at least 32K entries: a small mask (an encoder's padding) is scanned inline
  const int64_t grain = std::max<int64_t>(16, (int64_t{1} << 15) / std::max<int64_t>(p.kv_len, 1));
  parallel_for(nb * nh * nq, grain, [&](int64_t begin, int64_t end) {
    int64_t b = begin / (nh * nq), h = begin / nq % nh, i = begin % nq;
    for (int64_t r = begin; r < end; ++r) {
      const char* row = static_cast<const char*>(mk.data) +
                        size * (b * mk.stride_b + h * mk.stride_h + i * mk.stride_q);
      kept_keys(mk.kind, row, p.kv_len, mk.stride_k, pairs + 2 * r, pairs + 2 * r + 1);
      if (++i == nq) {  // the next row, without divisions
        i = 0;
        if (++h == nh) h = 0, ++b;
      }
    }
  });
  return {pairs, mk.stride_b ? nh * nq : 0, mk.stride_h ? nq : 0, mk.stride_q ? 1 : 0};
}

// out[k] = the keys of the tile [t, t + nk) that rows [k kMr, (k + 1) kMr) of the block may
// see, counted from t: up to the largest hi of the strip (a row with lo >= hi sees none). A
// strip's register tiles stop there; its rows' scores past their own hi are masked anyway.
inline void tile_strip_keys(const int64_t* lo, const int64_t* hi, int64_t t, int64_t nk,
                            int64_t nr, bool clip, int64_t* out) {
  for (int64_t r0 = 0; r0 < nr; r0 += kMr) {
    int64_t n = clip ? 0 : nk;
    for (int64_t r = r0; clip && r < r0 + kMr && r < nr; ++r)
      if (lo[r] < hi[r] && hi[r] - t > n) n = hi[r] - t;
    out[r0 / kMr] = n < nk ? n : nk;
  }
}

// s[j] = 2^(s[j] - m) for j < n (a multiple of 8); returns their sum.
inline float exp_sum(float* s, int64_t n, float m) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  return exp_sum_zmm(s, n, m);
#else
  const f32x8 mv = simd::set1(m);
  f32x8 sum = simd::zero();
  for (int64_t j = 0; j < n; j += 8) {
    const f32x8 e = simd::exp2(simd::sub(simd::load(s + j), mv));
    simd::store(s + j, e);
    sum = simd::add(sum, e);
  }
  return simd::reduce_add(sum);
#endif
}

// Online softmax over one tile row of nk scores (the row has round_up(nk, 8) writable columns):
// updates the running max m and sum l, turns s into 2^(s - m) and returns the factor the
// accumulator must be rescaled by. m moves only when the tile's scores rise more than
// kMaxSlack above it (else alpha = 1: no rescale, and no exponential of m_old - m_new). A row
// with no finite score yet keeps m = -inf, l = 0, p = 0. A NaN score makes l NaN (write_row
// then recomputes the row): through exp_sum's 2^NaN, or, where the max passed over it (vmaxps
// drops a NaN in its first operand) on a tile with no finite score, set here.
inline float softmax_update(float* s, int64_t nk, float* m, float* l) {
  const int64_t n8 = round_up(nk, 8);
  for (int64_t j = nk; j < n8; ++j) s[j] = kNegInf;
  f32x8 mx = simd::set1(kNegInf);
  for (int64_t j = 0; j < n8; j += 8) mx = simd::max(mx, simd::load(s + j));
  const float m_tile = simd::reduce_max(mx);
  if (m_tile <= *m + kMaxSlack) {  // (m = -inf: only when the tile has no finite score either)
    if (*m == kNegInf) {
      for (int64_t j = 0; j < nk; ++j)
        if (std::isnan(s[j])) *l = s[j];
      for (int64_t j = 0; j < n8; j += 8) simd::store(s + j, simd::zero());
      return 1.0f;
    }
    *l += exp_sum(s, n8, *m);
    return 1.0f;
  }
  return advance_row(m, l, m_tile, exp_sum(s, n8, m_tile));
}

// Tile h > 0 of a group (kGroupTiles tiles, one P V step) joined to those before it: rows whose
// max rose in tile h (alpha2 != 1) take its rescale on the earlier tiles' probabilities (the
// left h kKeyTile of their score rows) and on their accumulator; each strip's keys (group_keys)
// then run from the group's start into tile h where it has any there (a strip with keys in tile
// h had all of the earlier tiles').
inline void join_tile(int64_t h, const int64_t* strip_keys, const Work& w, int64_t pitch, int64_t nr,
                      int64_t* group_keys) {
  for (int64_t rr = 0; rr < nr; ++rr) {
    const float a2 = w.alpha2[rr];
    if (a2 == 1.0f) continue;
    float* s = w.s + rr * pitch;
    for (int64_t j = 0; j < h * kKeyTile; j += 8) simd::store(s + j, simd::mul(simd::load(s + j), simd::set1(a2)));
    w.alpha[rr] *= a2;
  }
  for (int64_t i = 0; i < (nr + kMr - 1) / kMr; ++i)
    if (strip_keys[i] > 0) group_keys[i] = h * kKeyTile + strip_keys[i];
}

// Runs one block over its keys; leaves the unnormalised output in w.o and m, l in w.m, w.l.
template <DType T>
void attend(const Problem& pr, const Block& bk, const Work& w) {
  using S = typename Elem<T>::type;
  const SdpaParams& p = pr.p;
  const int64_t G = pr.group, D = p.head_dim, dp = pr.dp, nr = bk.nr;
  const S* q = static_cast<const S*>(p.q.data) + bk.b * p.q.stride_b;
  const S* k = static_cast<const S*>(p.k.data) + bk.b * p.k.stride_b + bk.kvh * p.k.stride_h;
  const S* v = static_cast<const S*>(p.v.data) + bk.b * p.v.stride_b + bk.kvh * p.v.stride_h;

  const bool stream = nr <= kStreamMaxRows;
  const bool wide = stream && wide_rows(D);
  // bf16 prefill on vdpbf16ps: q rows stay bf16 words (pitch dp / 2), scores are scaled after.
  const bool dot16 = T == DType::bf16 && !stream && bf16_tiles(D);
  // ... and on AMX tiles where the variant has them (same q words; scores scaled after).
  const bool amx = dot16 && amx_bf16_tiles(D);
  // ... and the tiles whose K/V come packed (pr.pack_kv): AMX, and the fp32 register tiles.
  const bool packed_tiles = !stream && (amx || (kZmmTiles && !dot16));
  // ... but blocks of fewer rows than kRowTile (a verify step's, a call's last) read fp32 V in
  // place and pack only K: packing V in panels for 64 rows made verify GQA 32/8 Lq 16 Lk 4096
  // D128 1.06x slower.
  const bool v_in_place = packed_tiles && !amx && T == DType::f32 && D % 16 == 0 && nr < kRowTile;
  // ... and bf16 decode rows of whole 32-column blocks: O in registers, and q, in the split
  // order; a block of one row (MHA decode) takes S = q K^T on vdpbf16ps where the CPU has it,
  // q as bf16 words (measured on a temporary build with both paths, K/V from memory: MHA 32/32
  // Lk 4096 D128 took 0.92x the time of the split order's FMAs; with the four rows of GQA 32/8
  // vdpbf16ps took 1.06x).
  const bool split = wide && split_cols(T, D);
  // ... and the f32x8 stream path's, in the split order of 16 columns (bf16, D a multiple of 16).
  const bool stream16 = stream && !wide && split16(T, D);
  const bool wide16 = split && nr == 1 && bf16_wide_dot(D);
  std::optional<AmxTiles> tiles;
  if (amx) tiles.emplace();
  // The zmm register tiles run P V once per group of kGroupTiles key tiles: tile h's
  // probabilities wait at column h kKeyTile of the score rows, its V in rows h kKeyTile of the
  // panels (B1 H32 L2048 D128 causal fp32 prefill: pairs took 0.972x the time of a P V step per
  // tile, D256 0.962x). Blocks with V in place take one tile per step: verify GQA 32/8 Lq 16
  // took 1.04x the time in pairs.
  const bool grouped = packed_tiles && !amx && !v_in_place;
  const int64_t tile = amx ? kAmxKeyTile : kKeyTile;  // keys per tile
  const int64_t pitch = amx ? kAmxPitch : grouped ? kGroupPitch : kKeyTile;  // of the score rows
  const float scale2 = p.scale * simd::exp2_poly::kLog2e;  // scores in base 2
  uint32_t* qw = reinterpret_cast<uint32_t*>(w.q);
  // The zmm register tiles pack each strip's q rows just before its S = Q K^T on the block's
  // first tile (the strip hook below), while the rows kQAheadStrips strips on are requested into
  // L1: packed up front, a block's rows came from memory in one burst and their loads stalled
  // (the packing held 2.6% of causal B4 H12 L1024 D64 fp32's samples). Every strip with keys
  // has keys in the first tile (it starts at the smallest lo, and tile_strip_keys counts a
  // strip's keys from the tile's start up to its largest hi); strips without are never read.
  const bool lazy_q = packed_tiles && !amx;
  constexpr int64_t kQAheadStrips = 2;

  // Rows: packed queries (but lazy_q), fresh state, and the keys each may see within [j0, j1).
  int64_t lo[kMaxRowTile], hi[kMaxRowTile], pos[kMaxRowTile], head[kMaxRowTile];
  int64_t jmin = bk.j1, jmax = bk.j0, lo_max = bk.j0, hi_min = bk.j1;
  auto q_row = [&](int64_t rr) { return q + head[rr] * p.q.stride_h + pos[rr] * p.q.stride_l; };
  for (int64_t rr = 0; rr < nr; ++rr) {
    const int64_t r = bk.r0 + rr;
    pos[rr] = r / G;
    head[rr] = bk.kvh * G + r % G;
    const S* qrow = q_row(rr);
    if (dot16 || wide16)
      std::memcpy(qw + rr * dp / 2, qrow, D * sizeof(S));
    else if (split || stream16)
      pack_row_split(reinterpret_cast<const uint16_t*>(qrow), D, scale2, w.q + rr * dp, split ? 32 : 16);
    else if (!lazy_q)
      pack_row_scaled<T>(qrow, D, scale2, w.q + rr * dp, dp);
    for (int64_t x = 0; x < dp; x += 8) simd::store(w.o + rr * dp + x, simd::zero());
    w.m[rr] = kNegInf;
    w.l[rr] = 0.0f;
    key_range(p, pos[rr], &lo[rr], &hi[rr]);
    if (pr.mask_ranges) pr.mask_ranges->narrow(bk.b, head[rr], pos[rr], &lo[rr], &hi[rr]);
    lo[rr] = lo[rr] > bk.j0 ? lo[rr] : bk.j0;
    hi[rr] = hi[rr] < bk.j1 ? hi[rr] : bk.j1;
    if (lo[rr] < hi[rr]) {
      jmin = lo[rr] < jmin ? lo[rr] : jmin;
      jmax = hi[rr] > jmax ? hi[rr] : jmax;
    }
    lo_max = lo[rr] > lo_max ? lo[rr] : lo_max;
    hi_min = hi[rr] < hi_min ? hi[rr] : hi_min;
  }

  const int64_t ks = p.k.stride_l, vs = p.v.stride_l;
  const uint32_t* kp = reinterpret_cast<const uint32_t*>(w.kt);  // this tile's packed K, V
  const uint32_t* vp = reinterpret_cast<const uint32_t*>(w.v);
  int64_t h = 0;  // (grouped) this tile's place in its group
  int64_t group_keys[kMaxRowTile / kMr];  // ... and each strip's keys from the group's start
  // fp32 decode rows: the first kDecodeBurstKeys rows of K, then of V, requested into L2
  // before the first tile. The row kernels prefetch each line kDecodePrefetchKeys keys ahead of
  // the one they read, which never covers a block's first rows. isa_ab's cases, build_ab 21
  // rounds: with K/V from memory (cold), GQA 32/8 D128 Lk 4096 / 16384 took 0.952x / 0.941x the
  // time, MHA 32/32 Lk 257 D64 0.966x; with K/V still in cache from the previous call the
  // requests cost instructions (MHA Lk 257 1.036x, GQA Lk 4096 0.997x). bf16 and fp16 rows
  // (half the bytes per key) measured no gain cold (0.998-1.009x) and bf16 GQA Lk 4096 1.051x
  // hot, so they go without.
  if (wide && T == DType::f32) {
    const int64_t t0 = bk.j0 + (jmin - bk.j0) / tile * tile;
    const int64_t n = jmax - t0 < kDecodeBurstKeys ? jmax - t0 : kDecodeBurstKeys;
    const int64_t row_bytes = D * static_cast<int64_t>(sizeof(S));
    prefetch_rows<2>(k + t0 * ks, ks * static_cast<int64_t>(sizeof(S)), n, row_bytes);
    prefetch_rows<2>(v + t0 * vs, vs * static_cast<int64_t>(sizeof(S)), n, row_bytes);
  }
  const int64_t t_first = bk.j0 + (jmin - bk.j0) / tile * tile;
  // fp32 stream blocks of several rows (GQA/MQA decode) over at least kSplitChunk keys of K/V
  // rows stored back to back: S = Q K^T requests the K rows kLineAheadKeys keys past each
  // tile's and P V the V rows, a line per iteration of their inner loops (LineAhead), instead
  // of StreamAhead's burst of both per block of keys of S = Q K^T, which leaves the memory idle
  // while P V computes. On a Zen 3 class AVX2 VM (build_ab, 9-15 rounds, 2 threads), requests
  // 128 keys ahead made cold GQA 32/8 D128 decode take 0.79-0.88x the time at Lk 4096,
  // 0.84-0.92x at Lk 16384 and 0.90x at Lk 1500, D96 (pv_stream) 0.69x at Lk 4096, and
  // 0.88-0.99x with K/V in cache; with kLineAheadKeys (64), 0.79x / 0.75x / D96 0.74x
  // (15 rounds). Measured and left out: bf16/fp16 rows (qk_dot / pv_stream: 1.01-1.21x
  // slower), MHA fp32 (one row: 1.04x), blocks of 257 keys (1.07-1.15x); and the kernels'
  // inner loops carry the requests only where they make them (NoLines): a LineAhead with
  // nothing to request cost short blocks 1.07-1.17x.
  const bool spread = T == DType::f32 && stream && !wide && nr > 1 && D % 16 == 0 &&
                      bk.j1 - bk.j0 >= kSplitChunk && p.k.stride_l == D && p.v.stride_l == D;
  for (int64_t t = t_first; t < jmax; t += tile) {
    const int64_t nk = bk.j1 - t < tile ? bk.j1 - t : tile;
    const S* kt = k + t * ks;
    const S* vt = v + t * vs;
    // (spread) The rows of x kLineAheadKeys keys past this tile's, over `steps` steps.
    auto lines_ahead = [&](const S* x, int64_t xs, int64_t steps) {
      const int64_t a = t + kLineAheadKeys, n = jmax - a < nk ? jmax - a : nk;
      return spread && n > 0 ? LineAhead::over(x + a * xs, n * D * static_cast<int64_t>(sizeof(S)), steps)
                             : LineAhead{};
    };
    // Touch the K and V rows kPrefetchTiles tiles ahead while this one computes: V is read
    // column block by column block, which hardware prefetchers do not follow. Blocks of many
    // rows compute long enough on each tile for the next to arrive unasked, and two tiles ahead
    // no longer fit L1: with all 192 rows prefetching, B1 H32 L2048 D128 prefill took 1.02x the
    // time in fp32 and 1.03-1.06x in bf16 (AMX, where K/V are packed up front and the raw rows
    // are not read at all); 64 rows of a verify step (Lq 16, GQA 4) on the avx2 variant took
    // 0.96x the time with it. (Touching the next tile into L2 a part per P V strip measured
    // 0.97-1.0x with 192-row fp32 blocks, and 0.998-1.03x, no gain, with 576.) Decode rows
    // request theirs inside their kernels instead, a few rows at a time (the wide path:
    // kDecodePrefetchKeys; the stream path: StreamAhead): on a Zen 3 class AVX2 VM this burst
    // of a whole tile's requests made cold GQA 32/8 D128 decode 1.04-1.2x slower than none at
    // all, and blocks of 160-1500 keys up to 1.3x slower than StreamAhead.
    if (!stream && nr <= kPrefetchMaxRows && !pr.kv_cache) {
      const int64_t ahead = t + kPrefetchTiles * tile;
      const int64_t n = jmax - ahead < tile ? jmax - ahead : tile;
      const int64_t row_bytes = D * static_cast<int64_t>(sizeof(S));
      if (n > 0) {
        prefetch_rows(k + ahead * ks, ks * sizeof(S), n, row_bytes);
        prefetch_rows(v + ahead * vs, vs * sizeof(S), n, row_bytes);
      }
    }

    // Rows that reach past the tile's end or start before it; strip_keys then says how far
    // each kMr-row strip of the prefill tiles must go (on the causal diagonal, not the whole
    // tile: the masked triangle is skipped, not computed and masked).
    const bool clip = t < lo_max || t + nk > hi_min;
    const bool masked = p.mask.kind != SdpaMaskKind::none;
    int64_t strip_keys[kMaxRowTile / kMr];
    if (!stream) tile_strip_keys(lo, hi, t, nk, nr, clip, strip_keys);
    // Without a mask, or with one contiguous along the keys, the zmm score tiles run the online
    // softmax on their registers (softmax_rows_zmm: a short last tile's padding columns, on a
    // clipped tile each row's keys outside [lo, hi), and masked keys become -inf there, and an
    // additive mask is added) instead of storing the scores for the pass below.
    const bool fuse = !stream && !amx && kFusedSoftmax && (!masked || p.mask.stride_k == 1);
    int32_t tile_lo[kMaxRowTile], tile_hi[kMaxRowTile];
    if (fuse && clip) {
      for (int64_t rr = 0; rr < nr; ++rr) {
        const int64_t a = lo[rr] - t, e = hi[rr] - t;
        tile_lo[rr] = static_cast<int32_t>(a < 0 ? 0 : a > nk ? nk : a);
        tile_hi[rr] = static_cast<int32_t>(e < tile_lo[rr] ? tile_lo[rr] : e > nk ? nk : e);
      }
    }
    // each row's mask at key t, where the softmax reads it on registers (zmm tiles, AMX rows)
    const bool mask_in_place = masked && p.mask.stride_k == 1 && (fuse || amx);
    const void* mask_rows[kMaxRowTile];
    if (mask_in_place) {
      const int64_t bytes = p.mask.kind == SdpaMaskKind::keep ? 1 : static_cast<int64_t>(sizeof(float));
      for (int64_t rr = 0; rr < nr; ++rr)
        mask_rows[rr] = static_cast<const char*>(p.mask.data) +
                        bytes * (bk.b * p.mask.stride_b + head[rr] * p.mask.stride_h +
                                 pos[rr] * p.mask.stride_q + t);
    }
    const bool keep_mask = fuse && p.mask.kind == SdpaMaskKind::keep;
    const bool add_mask = fuse && p.mask.kind == SdpaMaskKind::add;
    float* const s_t = w.s + h * kKeyTile;           // this tile's scores
    float* const alpha_t = h ? w.alpha2 : w.alpha;  // and rescale
    const RowState rows{w.m, w.l, alpha_t, nk, clip ? tile_lo : nullptr, clip ? tile_hi : nullptr,
                        keep_mask ? reinterpret_cast<const uint8_t* const*>(mask_rows) : nullptr,
                        add_mask ? reinterpret_cast<const float* const*>(mask_rows) : nullptr};
    const RowState* fused = fuse ? &rows : nullptr;

    // This tile's K and V in the AMX or fp32 register tiles' layouts: from the call's cache, or
    // packed here (no cache, or another block is packing the cached tile).
    if (packed_tiles) {
      kp = pr.kv_cache ? pr.kv_cache->get(p, dp, bk.b, bk.kvh, t / tile) : nullptr;
      if (kp) {
        vp = kp + pr.kv_cache->k_words;
      } else if (v_in_place) {
        pack_k_transposed<T>(kt, ks, nk, D, w.kt);
        kp = reinterpret_cast<const uint32_t*>(w.kt);
      } else {
        pr.pack_kv(p, dp, bk.b, bk.kvh, t, nk, reinterpret_cast<uint32_t*>(w.kt),
                   reinterpret_cast<uint32_t*>(w.v + h * kKeyTile * 64));
        kp = reinterpret_cast<const uint32_t*>(w.kt);
        vp = reinterpret_cast<const uint32_t*>(w.v);
      }
    }

    // S = (scale log2(e) q) K^T
    if (wide16) {
      qk_wide_bf16(qw, reinterpret_cast<const uint16_t*>(kt), ks, nk, D, scale2, w.s, jmax - t);
    } else if (wide) {
      qk_wide<T>(w.q, dp, kt, ks, nk, D, w.s, pitch, nr, jmax - t);
    } else if (stream) {
      // Stream blocks request their K/V rows from here whatever their length (blocks shorter
      // than 1024 keys used to take the whole-tile burst above instead). On a Zen 3 class AVX2
      // VM (scratch A/B of two builds, 15-25 rounds, 2 threads), against the burst, GQA 32/8
      // D128 bf16 / fp16 blocks of 160-1500 keys took 0.76-0.94x the time with K/V from memory
      // and 0.86-1.01x from cache; fp32 blocks of 200-512 keys 0.94-1.00x / 0.86-1.03x, MHA
      // 32/32 Lk 200 D64 0.94-0.97x; isa_ab's Lk 257 D64 fp32 cases 0.97-1.00x (25 rounds).
      const StreamAhead ahead{reinterpret_cast<const char*>(kt), reinterpret_cast<const char*>(vt),
                              ks * static_cast<int64_t>(sizeof(S)), vs * static_cast<int64_t>(sizeof(S)),
                              D * static_cast<int64_t>(sizeof(S)), jmax - t};
      // One fp32 row (MHA decode) takes qk_dot_f32 (a row x 8 keys, one reduction per 8
      // scores); blocks of several rows take qk_dot, kDotRows rows x 2 keys, each K vector loaded
      // once for the rows and one reduction per 8 scores too, where qk_dot_f32 reloads the keys
      // per row (9 loads per 8 multiply-adds). fp32 GQA 32/8 D128 against qk_dot_f32 on a Zen 3
      // class AVX2 VM (build_ab, per-round medians, quartiles): cold Lk 4096 0.969 / 0.929
      // (0.888-0.948) the time, Lk 16384 0.949 / 0.919 (0.901-0.947), D96 0.896 / 0.976, warm Lk
      // 4096 0.891 (11 and 15 rounds); short blocks (no spread) GQA 32/4 Lk 257 D64 cold 0.940.
      // The first rows' kernel requests the rows for all.
      auto dot_rows = [&](auto lines_of) {
        FF_BOOL_SWITCH(stream16, kSplit, [&] {
          for (int64_t rr = 0; rr < nr; rr += kDotRows)
            with_rows<kDotRows>(static_cast<int>(nr - rr), [&](auto R) {
              qk_dot<T, decltype(R)::value, kSplit && T == DType::bf16>(
                  w.q + rr * dp, dp, kt, ks, nk, D, w.s + rr * pitch, pitch,
                  rr == 0 && !spread ? ahead : StreamAhead{}, lines_of(rr));
            });
        });
      };
      if (T == DType::f32 && nr == 1) {
        if constexpr (T == DType::f32) qk_dot_f32(w.q, kt, ks, nk, D, w.s, ahead);
      } else if (spread) {  // (qk_dot's inner loop steps once per 16 columns of a key pair)
        dot_rows([&](int64_t rr) { return rr == 0 ? lines_ahead(k, ks, nk / 2 * (D / 16)) : LineAhead{}; });
      } else {
        dot_rows([](int64_t) { return NoLines{}; });
      }
    } else if (amx) {
      qk_amx_tile(qw, dp / 2, kp, D, w.s, pitch, strip_keys, nr);
    } else if (dot16) {
      qk_bf16_tile(qw, dp / 2, reinterpret_cast<const uint16_t*>(kt), ks, nk, D, scale2,
                   reinterpret_cast<uint32_t*>(w.kt), w.s, pitch, strip_keys, nr, fused);
    } else if (kZmmTiles) {
      const int64_t strips = (nr + kMr - 1) / kMr, row_bytes = D * static_cast<int64_t>(sizeof(S));
      NextTileRows next;  // (blocks of at most kPrefetchMaxRows rows prefetch above)
      if (nr > kPrefetchMaxRows && t + tile < jmax) {
        const int64_t ahead = t + tile;
        next = {reinterpret_cast<const char*>(k + ahead * ks), reinterpret_cast<const char*>(v + ahead * vs),
                ks * static_cast<int64_t>(sizeof(S)), vs * static_cast<int64_t>(sizeof(S)),
                jmax - ahead < tile ? jmax - ahead : tile, row_bytes};
      }
      // (always_inline: see NextTileRows)
      auto before_strip = [&](int64_t i) __attribute__((always_inline)) {
        next.request(i, strips);
        if (!lazy_q || t != t_first) return;
        if (strip_keys[i] > 0)
          for (int64_t rr = i * kMr; rr < (i + 1) * kMr && rr < nr; ++rr)
            pack_row_scaled<T>(q_row(rr), D, scale2, w.q + rr * dp, dp);
        const int64_t a = i + kQAheadStrips;
        if (a < strips && strip_keys[a] > 0)
          for (int64_t rr = a * kMr; rr < (a + 1) * kMr && rr < nr; ++rr) prefetch_rows(q_row(rr), 0, 1, row_bytes);
      };
      qk_packed_wide(w.q, dp, reinterpret_cast<const float*>(kp), D, s_t, pitch, strip_keys, nr, fused,
                     before_strip);
    } else {
      pack_k_transposed<T>(kt, ks, nk, D, w.kt);
      for (int64_t c = 0; c < nk; c += 16) {
        const float* panel = w.kt + c / kKPanel * D * kKPanel + c % kKPanel;
        for (int64_t rr = 0; rr < nr; rr += kMr) {
          if (c >= strip_keys[rr / kMr]) continue;
          with_rows<kMr>(static_cast<int>(nr - rr), [&](auto R) {
            qk_packed<decltype(R)::value>(w.q + rr * dp, dp, panel, D, w.s + rr * pitch + c, pitch);
          });
        }
      }
    }

    // masks, then the online softmax of every row (columns past a strip's keys, never
    // computed, are past each of its rows' hi and set to -inf here)
    for (int64_t rr = 0; rr < nr && !fused; ++rr) {
      float* s = s_t + rr * pitch;
      if (amx && (!masked || mask_in_place)) {  // the scale, clip, mask and bf16 rounding fused in
        const int64_t a = clip && lo[rr] > t ? lo[rr] - t : 0;
        const int64_t e = clip && hi[rr] - t < nk ? hi[rr] - t : nk;
        MaskRow mr;
        if (masked && p.mask.kind == SdpaMaskKind::keep) mr.keep = static_cast<const uint8_t*>(mask_rows[rr]);
        if (masked && p.mask.kind == SdpaMaskKind::add) mr.add = static_cast<const float*>(mask_rows[rr]);
        w.alpha[rr] = softmax_amx_row(s, a, e, round_up(nk, 32), scale2, mr, &w.m[rr], &w.l[rr],
                                      w.p + rr * kAmxPPitch);
        continue;
      }
      if (amx)
        for (int64_t j = 0; j < nk; ++j) s[j] *= scale2;
      if (clip) {
        const int64_t a = lo[rr] - t, e = hi[rr] - t;
        for (int64_t j = 0; j < nk && j < a; ++j) s[j] = kNegInf;
        for (int64_t j = e < 0 ? 0 : e; j < nk; ++j) s[j] = kNegInf;
      }
      if (masked) apply_mask(p.mask, bk.b, head[rr], pos[rr], t, nk, s);
      if (amx)  // scaled and masked scores (-inf where masked): the same step with scale 1
        w.alpha[rr] = softmax_amx_row(s, 0, nk, round_up(nk, 32), 1.0f, MaskRow{}, &w.m[rr], &w.l[rr],
                                      w.p + rr * kAmxPPitch);
      else
        alpha_t[rr] = softmax_update(s, nk, &w.m[rr], &w.l[rr]);
    }

    // O = diag(alpha) O + P V
    if (wide) {
      pv_wide<T>(w.o, dp, w.alpha, w.s, pitch, vt, vs, nk, D, nr, jmax - t);
    } else if (stream && D % 64 == 0 && (nr == 1 || (T == DType::f32 && !spread))) {
      // (Other blocks of several rows take pv_stream below, which reads each V vector once for
      // kDotRows rows where pv_stream_rows reads it once per row. fp16/bf16: converted once, not
      // per row: cold GQA 32/8 D128 decode bf16 took 0.91-0.93x the time on a Zen 3 class AVX2
      // VM, build_ab 7 rounds. fp32 over spread's long runs of keys: a tile's V (32 KiB at
      // D128) does not stay in L1 across the rows, so each row's pass reread it from L2; with
      // pv_stream, cold GQA 32/8 D128 decode took 0.926 (0.904-0.957) / 0.970 (0.931-0.991) the
      // time at Lk 4096 and 0.946 / 0.965 at Lk 16384, build_ab 15 rounds twice, per-round
      // medians (quartiles); Lk 1500 and D96 (pv_stream already) unchanged. Short fp32 blocks,
      // without spread's requests, stay here: pv_stream took GQA 32/4 Lk 257 D64 1.20x the time.)
      FF_BOOL_SWITCH(stream16, kSplit, [&] {
        pv_stream_rows<T, kSplit && T == DType::bf16>(w.o, dp, w.alpha, w.s, pitch, vt, vs, nk, D, nr);
      });
    } else if (stream) {
      FF_BOOL_SWITCH(stream16, kSplit, [&] {
        for (int64_t rr = 0; rr < nr; rr += kDotRows)
          with_rows<kDotRows>(static_cast<int>(nr - rr), [&](auto R) {
            constexpr int kR = decltype(R)::value;
            constexpr bool kS = kSplit && T == DType::bf16;
            float* const o = w.o + rr * dp;
            const float* const a = w.alpha + rr;
            const float* const s = w.s + rr * pitch;
            if (spread && rr == 0)  // (the first rows' kernel requests the rows for all)
              pv_stream<T, kR, kS>(o, dp, a, s, pitch, vt, vs, nk, D, lines_ahead(v, vs, D / 16 * nk));
            else
              pv_stream<T, kR, kS>(o, dp, a, s, pitch, vt, vs, nk, D);
          });
      });
    } else if (amx) {
      pv_amx_tile(w.o, dp, w.alpha, w.p, kAmxPPitch, vp, dp, strip_keys, nr);
    } else if (dot16) {
      pv_bf16_tile(w.o, dp, w.alpha, w.s, pitch, reinterpret_cast<const uint16_t*>(vt), vs, nk, D,
                   dp, reinterpret_cast<uint32_t*>(w.v), strip_keys, nr);
    } else if (kZmmTiles) {  // V in place, or in the panels of pack_v_wide over a group of tiles
      if (v_in_place) {
        pv_f32_wide(w.o, dp, w.alpha, w.s, pitch, reinterpret_cast<const float*>(vt), vs, strip_keys, dp, nr);
        continue;
      }
      if (h == 0)
        std::copy(strip_keys, strip_keys + (nr + kMr - 1) / kMr, group_keys);
      else
        join_tile(h, strip_keys, w, pitch, nr, group_keys);
      if (++h < kGroupTiles && t + tile < jmax) continue;  // P V waits for the group's next tile
      h = 0;
      pv_f32_wide(w.o, dp, w.alpha, w.s, pitch, reinterpret_cast<const float*>(vp), 0, group_keys, dp, nr);
    } else {  // 16-column register tiles: V in panels, or fp32 V in place (below)
      // (fp32 V rows a multiple of 512 bytes apart are packed too: the 16-column slice P V
      // reads of a tile's 64 rows then falls in at most 8 of L1's 64 sets, one for rows 4 KiB
      // apart (an H8 D128 [B, L, H, D] view), whose 8 ways it fills or overflows, and P and O
      // lines evict it between the row strips that reread it; packed, it is 4 KiB of
      // consecutive lines. On a Zen 3 class AVX2 VM, build_ab 15 rounds, per-round median
      // (quartiles): B1 H8 L1024 D128 causal with the [B, L, H, D] view's rows 0.910
      // (0.883-0.944), contiguous B1 H32 L2048 D128 0.979 (0.943-1.002). Rows 256 or 384 bytes
      // apart (contiguous D64, D96) stay in place: packing them made D64 1.05-1.07x slower.)
      const int64_t v_row_bytes = vs * static_cast<int64_t>(sizeof(S));
      const bool in_place = T == DType::f32 && D % 16 == 0 && v_row_bytes % 512 != 0;
      if (!in_place) pack_v_panels<T>(vt, vs, nk, D, dp, w.v);
      for (int64_t c = 0; c < dp; c += kVPanel) {
        const float* vc = in_place ? reinterpret_cast<const float*>(vt) + c : w.v + c * kKeyTile;
        const int64_t vc_stride = in_place ? vs : kVPanel;
        for (int64_t rr = 0; rr < nr; rr += kMr)
          with_rows<kMr>(static_cast<int>(nr - rr), [&](auto R) {
            pv_f32<decltype(R)::value>(w.o + rr * dp + c, dp, w.alpha + rr, w.s + rr * pitch,
                                       pitch, vc, vc_stride, strip_keys[rr / kMr]);
          });
      }
    }
  }
}

// One row recomputed in float64 with reference.sdpa's semantics, for the rows past fp32 that
// the kernel cannot finish (write_row): the keys it keeps are those of its causal/window range
// that the mask keeps (bool non-zero; an additive score of -inf drops the key); none kept
// gives 0 and lse -inf; a NaN or +inf among the kept scores (a NaN or inf in what the row
// reads) gives a NaN row; otherwise the exact softmax, which float64 holds for any finite fp32
// inputs (scores of q ~ k ~ 1e19 overflow fp32, not float64). Scalar code: such rows are rare,
// and a NaN row stops at its first NaN score.
template <DType T>
void write_exact_row(const SdpaParams& p, int64_t b, int64_t h, int64_t i) {
  using S = typename Elem<T>::type;
  constexpr double kInf = std::numeric_limits<double>::infinity();
  const int64_t D = p.head_dim, kvh = h / (p.q_heads / p.kv_heads);
  const S* q = static_cast<const S*>(p.q.data) + b * p.q.stride_b + h * p.q.stride_h + i * p.q.stride_l;
  const S* k = static_cast<const S*>(p.k.data) + b * p.k.stride_b + kvh * p.k.stride_h;
  const S* v = static_cast<const S*>(p.v.data) + b * p.v.stride_b + kvh * p.v.stride_h;
  const SdpaMask& mk = p.mask;
  const int64_t mask_row = b * mk.stride_b + h * mk.stride_h + i * mk.stride_q;
  int64_t lo, hi;
  key_range(p, i, &lo, &hi);
  double qd[kMaxHeadDim];
  for (int64_t x = 0; x < D; ++x) qd[x] = Elem<T>::to_f32(q[x]);
  std::vector<double> s;  // the kept keys' scores, and their keys
  std::vector<int64_t> keys;
  double m = -kInf;
  bool nan = false;
  for (int64_t j = lo; j < hi && !nan; ++j) {
    if (mk.kind == SdpaMaskKind::keep && !static_cast<const uint8_t*>(mk.data)[mask_row + j * mk.stride_k]) continue;
    if (mk.kind == SdpaMaskKind::add && static_cast<const float*>(mk.data)[mask_row + j * mk.stride_k] == -kInf)
      continue;  // (dropped before its score is read: a NaN in its K stays unread)
    const S* kj = k + j * p.k.stride_l;
    double dot = 0.0;
    for (int64_t x = 0; x < D; ++x) dot += qd[x] * Elem<T>::to_f32(kj[x]);
    double sj = static_cast<double>(p.scale) * dot;
    if (mk.kind == SdpaMaskKind::add) sj += static_cast<const float*>(mk.data)[mask_row + j * mk.stride_k];
    if (sj == -kInf) continue;
    nan = std::isnan(sj) || sj == kInf;
    m = std::max(m, sj);
    s.push_back(sj);
    keys.push_back(j);
  }
  double o[kMaxHeadDim] = {}, l = 0.0;
  for (size_t n = 0; n < keys.size() && !nan; ++n) {
    const double e = std::exp(s[n] - m);
    const S* vj = v + keys[n] * p.v.stride_l;
    for (int64_t x = 0; x < D; ++x) o[x] += e * Elem<T>::to_f32(vj[x]);
    l += e;
  }
  const float fill = nan ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
  float row[kMaxHeadDim];
  for (int64_t x = 0; x < D; ++x) row[x] = l > 0.0 ? static_cast<float>(o[x] / l) : fill;
  S* dst = static_cast<S*>(p.out) + b * p.out_stride_b + h * p.out_stride_h + i * p.out_stride_l;
  from_f32<T>(row, dst, D);
  if (p.lse)
    p.lse[(b * p.q_heads + h) * p.q_len + i] =
        nan ? fill : l > 0.0 ? static_cast<float>(m + std::log(l)) : kNegInf;
}

// Whether row i keeps any key: one in its causal/window range that the mask keeps (bool
// non-zero, additive not -inf). O(keys) of mask reads, for rows that ended with no finite score.
inline bool keeps_a_key(const SdpaParams& p, int64_t b, int64_t h, int64_t i) {
  int64_t lo, hi;
  key_range(p, i, &lo, &hi);
  const SdpaMask& mk = p.mask;
  if (mk.kind == SdpaMaskKind::none || hi <= lo) return hi > lo;
  const int64_t row = b * mk.stride_b + h * mk.stride_h + i * mk.stride_q;
  for (int64_t j = lo; j < hi; ++j) {
    if (mk.kind == SdpaMaskKind::keep ? static_cast<const uint8_t*>(mk.data)[row + j * mk.stride_k] != 0
                                      : static_cast<const float*>(mk.data)[row + j * mk.stride_k] != kNegInf)
      return true;
  }
  return false;
}

// Whether the n floats at o (padded to whole vectors) are all finite: o * 0 is NaN exactly
// where o is not.
inline bool all_finite(const float* o, int64_t n) {
  f32x8 acc = simd::zero();
  for (int64_t x = 0; x < n; x += 8) acc = simd::fmadd(simd::load(o + x), simd::zero(), acc);
  return simd::reduce_add(acc) == 0.0f;
}

// out[b, h, i] = o / l, lse = ln2 m + log l. A row with no finite score (l = 0, m = -inf; a NaN
// score would have made l NaN) gets 0 and lse -inf, whatever o holds (0 p times a non-finite
// V), where it is fully masked; where it keeps a key, its scores all fell below fp32 from finite
// inputs (q ~ -k ~ 1e19, or q past fp32 once scaled) and it takes write_exact_row; rows past fp32 (m or l not finite) take write_exact_row, and so do rows whose
// o is not finite: a NaN or inf in the V of a key the row keeps (write_exact_row gives its NaN
// columns), or of a key it masks, which the tiles' P V multiplied by p = 0 (a strip's rows run
// to the strip's last key; a KV cache's unused tail may hold anything): the row reads only
// its kept keys there. With `stream`
// (Problem::stream_out), rows of whole 32-byte blocks on a 16-byte boundary leave through
// streaming stores (simd::stream, stream_copy).
template <DType T>
void write_row(const SdpaParams& p, bool stream, int64_t b, int64_t h, int64_t i, const float* o, float m,
               float l) {
  using S = typename Elem<T>::type;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  S* dst = static_cast<S*>(p.out) + b * p.out_stride_b + h * p.out_stride_h + i * p.out_stride_l;
  if (l == 0.0f) {
    if (keeps_a_key(p, b, h, i)) {  // (it took the whole row for masked)
      write_exact_row<T>(p, b, h, i);
      return;
    }
    std::memset(dst, 0, p.head_dim * sizeof(S));  // (+0 in fp32, fp16 and bf16 alike)
    if (p.lse) p.lse[(b * p.q_heads + h) * p.q_len + i] = kNegInf;
    return;
  }
  if (!(l < kInf && m > kNegInf && m < kInf) || !all_finite(o, p.head_dim)) {  // (false for NaN too)
    write_exact_row<T>(p, b, h, i);
    return;
  }
  const f32x8 inv = simd::set1(1.0f / l);
  const int64_t row_bytes = p.head_dim * static_cast<int64_t>(sizeof(S));
  if (stream && row_bytes % 32 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
    if constexpr (T == DType::f32) {
      for (int64_t x = 0; x < p.head_dim; x += 8) simd::stream(dst + x, simd::mul(simd::load(o + x), inv));
    } else {
      float row[kMaxHeadDim];
      S narrow[kMaxHeadDim];
      for (int64_t x = 0; x < p.head_dim; x += 8) simd::store(row + x, simd::mul(simd::load(o + x), inv));
      from_f32<T>(row, narrow, p.head_dim);
      simd::stream_copy(dst, narrow, row_bytes);
    }
  } else if constexpr (T == DType::f32) {  // straight into the output (a memcpy per row cost more)
    int64_t x = 0;
    for (; x + 8 <= p.head_dim; x += 8) simd::store(dst + x, simd::mul(simd::load(o + x), inv));
    if (x < p.head_dim)
      simd::store_partial(dst + x, simd::mul(simd::load(o + x), inv), static_cast<int>(p.head_dim - x));
  } else {
    float row[kMaxHeadDim];
    for (int64_t x = 0; x < p.head_dim; x += 8) simd::store(row + x, simd::mul(simd::load(o + x), inv));
    from_f32<T>(row, dst, p.head_dim);
  }
  if (p.lse) {  // m in base 2; fp32's lowest where mask_base2 made it so (the row's sum cannot lift it)
    constexpr float kLowest = std::numeric_limits<float>::lowest();
    p.lse[(b * p.q_heads + h) * p.q_len + i] = m == kLowest ? kLowest : simd::exp2_poly::kLn2 * m + std::log(l);
  }
}

// Unit u -> block. Consecutive units share a kv head (its K/V stay in cache); within a head,
// blocks of later rows (more keys under causal) come first.
Block block_of(const Problem& pr, int64_t u) {
  const SdpaParams& p = pr.p;
  const int64_t c = u % pr.chunks;
  const int64_t rest = u / pr.chunks;
  const int64_t bh = rest / pr.row_blocks, blk = pr.row_blocks - 1 - rest % pr.row_blocks;
  Block bk;
  bk.b = bh / p.kv_heads;
  bk.kvh = bh % p.kv_heads;
  bk.r0 = blk * pr.row_tile;
  const int64_t rows = p.q_len * pr.group;
  bk.nr = rows - bk.r0 < pr.row_tile ? rows - bk.r0 : pr.row_tile;
  bk.j0 = c * pr.chunk_len;
  bk.j1 = bk.j0 + pr.chunk_len < p.kv_len ? bk.j0 + pr.chunk_len : p.kv_len;
  return bk;
}

// Partials of split-KV: per unit, `pitch` rows of o [dp] plus m and l.
struct Partials {
  AlignedArray<float> o, m, l;
};

// The K/V cache of a call (Problem::kv_cache) for tiles of `tile` keys, k_words + v_words
// words each, nothing packed yet: its words in a buffer of the calling thread, kept between
// calls (grown to the largest call's packed K/V size).
KvCache kv_cache(const SdpaParams& p, int64_t tile, int64_t k_words, int64_t v_words, KvCache::Pack pack,
                 std::unique_ptr<std::atomic<uint8_t>[]>* state) {
  KvCache c;
  c.tile = tile;
  c.tiles = (p.kv_len + tile - 1) / tile;
  c.k_words = k_words;
  c.v_words = v_words;
  c.pack = pack;
  const int64_t n = p.batch * p.kv_heads * c.tiles;
  thread_local GrowBuffer<uint32_t> buf;
  c.words = buf.get(n * (k_words + v_words));
  state->reset(new std::atomic<uint8_t>[n]);
  for (int64_t i = 0; i < n; ++i) (*state)[i].store(0, std::memory_order_relaxed);
  c.state = state->get();
  return c;
}

template <DType T>
void run(const SdpaParams& p, const Problem& pr) {
  const int64_t units = p.batch * p.kv_heads * pr.row_blocks * pr.chunks;
  const int64_t dp = pr.dp, G = pr.group;
  const int64_t rows = p.q_len * G;
  const int64_t pitch = rows < pr.row_tile ? rows : pr.row_tile;  // partial rows per unit
  Partials part;
  if (pr.chunks > 1) {
    part.o = aligned_array<float>(units * pitch * dp);
    part.m = aligned_array<float>(units * pitch);
    part.l = aligned_array<float>(units * pitch);
  }
  // Where the call has (batch, kv head) pairs enough to go round (4 per thread), a thread takes
  // all row blocks of a pair at once: the blocks after the first find the pair's K/V (on the
  // AMX tiles its packed tiles) in the same core's L2. build_ab 9 rounds against one block at a
  // time: bf16 (AMX) prefill 0.935-0.977x the time, fp32 0.970-1.006x. It changes only which
  // thread runs a unit, not any unit's result.
  const int64_t pairs = p.batch * p.kv_heads;
  const int64_t grain = pr.chunks == 1 && pr.row_blocks > 1 && pairs >= 4 * num_threads() ? pr.row_blocks : 1;
  parallel_for(units, grain, [&](int64_t begin, int64_t end) {
    const Work w = thread_work(dp, pr.row_tile);
    for (int64_t u = begin; u < end; ++u) {
      const Block bk = block_of(pr, u);
      attend<T>(pr, bk, w);
      if (pr.chunks == 1) {
        for (int64_t rr = 0; rr < bk.nr; ++rr) {
          const int64_t r = bk.r0 + rr;
          write_row<T>(p, pr.stream_out, bk.b, bk.kvh * G + r % G, r / G, w.o + rr * dp, w.m[rr], w.l[rr]);
        }
      } else {
        for (int64_t i = 0; i < bk.nr * dp; ++i) part.o[u * pitch * dp + i] = w.o[i];
        for (int64_t rr = 0; rr < bk.nr; ++rr) {
          part.m[u * pitch + rr] = w.m[rr];
          part.l[u * pitch + rr] = w.l[rr];
        }
      }
    }
    simd::stream_fence();  // write_row's streaming stores, before the task is reported done
  });
  if (pr.chunks == 1) return;

  // Merge the chunks of each block: o = sum_c 2^(m_c - M) o_c, l = sum_c 2^(m_c - M) l_c. A
  // chunk that saw a NaN score (l_c NaN) leaves l NaN, and write_row recomputes the row.
  const int64_t blocks = units / pr.chunks;
  parallel_for(blocks, 1, [&](int64_t begin, int64_t end) {
    float acc[kMaxHeadDim];
    for (int64_t ub = begin; ub < end; ++ub) {
      const int64_t u0 = ub * pr.chunks;
      const Block bk = block_of(pr, u0);
      for (int64_t rr = 0; rr < bk.nr; ++rr) {
        float mx = kNegInf;
        for (int64_t c = 0; c < pr.chunks; ++c) mx = std::fmax(mx, part.m[(u0 + c) * pitch + rr]);
        for (int64_t x = 0; x < dp; x += 8) simd::store(acc + x, simd::zero());
        float l = 0.0f;
        if (mx != kNegInf) {
          for (int64_t c = 0; c < pr.chunks; ++c) {
            const int64_t at = (u0 + c) * pitch + rr;
            const float e = simd::exp2_scalar(part.m[at] - mx);
            if (e == 0.0f) continue;
            l += e * part.l[at];
            const float* o = part.o.get() + at * dp;
            const f32x8 ev = simd::set1(e);
            for (int64_t x = 0; x < dp; x += 8)
              simd::store(acc + x, simd::fmadd(ev, simd::load(o + x), simd::load(acc + x)));
          }
        }
        for (int64_t c = 0; c < pr.chunks; ++c)  // a NaN score, even where every m_c is -inf or NaN
          if (std::isnan(part.l[(u0 + c) * pitch + rr])) l = part.l[(u0 + c) * pitch + rr];
        const int64_t r = bk.r0 + rr;
        write_row<T>(p, pr.stream_out, bk.b, bk.kvh * G + r % G, r / G, acc, mx, l);
      }
    }
    simd::stream_fence();
  });
}

// AttentionKernels::softmax_exp2: the exp2 of exp_sum (exp2_16 on AVX-512, simd::exp2 else).
void softmax_exp2(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    float buf[16] = {};
    const int64_t lanes = n - i < 16 ? n - i : 16;
    std::copy(x + i, x + i + lanes, buf);
    exp_sum(buf, 16, 0.0f);
    std::copy(buf, buf + lanes, y + i);
  }
}

void sdpa(const SdpaParams& p) {
  const int64_t G = p.q_heads / p.kv_heads;
  const int64_t rows = p.q_len * G;
  const int64_t elem_bytes = p.dtype == DType::f32 ? 4 : 2;
  int64_t chunk = p.kv_len;
  if (p.kv_chunk > 0) {
    chunk = p.kv_chunk;
  } else if (p.kv_chunk < 0 && rows <= kRowTile && p.kv_len >= 2 * kSplitChunk) {
    chunk = split_chunk(p.batch * p.kv_heads, p.kv_len, elem_bytes);  // decode: few rows, many keys
  }
  if (chunk >= p.kv_len) chunk = p.kv_len;
  const bool dot16 = p.dtype == DType::bf16 && bf16_tiles(p.head_dim);  // bf16 on vdpbf16ps
  const bool amx = dot16 && amx_bf16_tiles(p.head_dim);
  const int64_t D = p.head_dim, dp = round_up(D, 16);
  const int64_t row_tile = amx ? kAmxRowTile : register_tile_rows(dp, p.batch * p.kv_heads, rows);
  Problem pr{p, G, dp, row_tile, (rows + row_tile - 1) / row_tile,
             (p.kv_len + chunk - 1) / chunk, chunk};
  if (amx) {
    pr.pack_kv = pack_amx_tile;
  } else if (kZmmTiles && !dot16) {
    FF_DTYPE_SWITCH(p.dtype, T, [&] { pr.pack_kv = pack_wide_tile<T>; });
  }
  // AMX prefill with several row blocks per kv head, tiles aligned to every chunk: pack once.
  std::unique_ptr<std::atomic<uint8_t>[]> kv_state;
  KvCache cache;
  if (amx && pr.row_blocks > 1 && (pr.chunks == 1 || chunk % kAmxKeyTile == 0)) {
    cache = kv_cache(p, kAmxKeyTile, D / 2 * kAmxPitch, kAmxKeyTile / 2 * dp, pack_amx_tile, &kv_state);
    pr.kv_cache = &cache;
  }
  pr.stream_out = p.batch * p.q_heads * p.q_len * p.head_dim * elem_bytes >= kStreamOutputBytes;
  MaskRanges ranges;
  if (p.mask.kind != SdpaMaskKind::none) {
    thread_local GrowBuffer<int64_t> pairs;
    ranges = mask_ranges(p, &pairs);
    pr.mask_ranges = &ranges;
  }
  FF_DTYPE_SWITCH(p.dtype, T, [&] { run<T>(p, pr); });
}

}  // namespace
}  // namespace attention

const AttentionKernels& attention_kernels() {
  static const AttentionKernels k{attention::sdpa, attention::kMaxHeadDim, attention::kKeyTile,
                                  attention::softmax_exp2};
  return k;
}

}  // namespace FF_ISA_NS
}  // namespace ff
