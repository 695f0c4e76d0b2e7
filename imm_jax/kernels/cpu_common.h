// Pieces shared by the CPU kernels (cpu_attention.cc, cpu_dense.cc): 8-float vectors (GCC vector
// extensions, compiled for whatever SIMD -march=native offers), the register-tile size, per-thread scratch
// and a parallel loop on XLA's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace imm_kernels {

typedef float v8 __attribute__((vector_size(32)));

constexpr int kMR = 6;   // rows of the register tile (6 x 16: 12 accumulators, measured 1.3-1.6x 4 x 16)
constexpr int kNR = 16;  // columns of the register tile (two v8)

inline v8 load8(const float* p) {
  v8 r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
inline void store8(float* p, v8 x) { std::memcpy(p, &x, sizeof(x)); }
inline v8 splat8(float x) { return v8{x, x, x, x, x, x, x, x}; }

// One register tile of C: c (height x width valid of kMR x kNR, row stride ldc) = alpha * apan^T bpan +
// (bias0, bias1) [+ c when accumulate], apan a packed kMR-row panel (kc x kMR) and bpan a packed kNR-column
// panel (kc x kNR). Forced inline and unrolled: without that GCC 12 left the accumulators in memory once the
// tile was shared by both kernels (fc1's product 124 against 185 GFLOP/s).
__attribute__((always_inline)) inline void register_tile(const float* apan, const float* bpan, int64_t kc,
                                                         float* c, int64_t ldc, int64_t height, int64_t width,
                                                         v8 alpha, v8 bias0, v8 bias1, bool accumulate) {
  v8 acc[kMR][2];
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r) acc[r][0] = acc[r][1] = splat8(0.f);
  for (int64_t p = 0; p < kc; ++p) {
    const v8 b0 = load8(bpan + p * kNR), b1 = load8(bpan + p * kNR + 8);
    const float* ar = apan + p * kMR;
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r) {
      const v8 x = splat8(ar[r]);
      acc[r][0] += x * b0;
      acc[r][1] += x * b1;
    }
  }
  for (int r = 0; r < height; ++r) {
    float* crow = c + r * ldc;
    v8 lo = acc[r][0] * alpha + bias0, hi = acc[r][1] * alpha + bias1;
    if (width == kNR) {
      if (accumulate) {
        lo += load8(crow);
        hi += load8(crow + 8);
      }
      store8(crow, lo);
      store8(crow + 8, hi);
    } else {
      float tile[kNR];
      store8(tile, lo);
      store8(tile + 8, hi);
      for (int64_t j = 0; j < width; ++j) crow[j] = accumulate ? crow[j] + tile[j] : tile[j];
    }
  }
}

// Scratch owned by one worker thread, grown on demand and reused across tasks and calls.
struct Scratch {
  std::vector<float> a_pack, b_pack, s, ds;
  float* get(std::vector<float>& v, size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
  }
};

Scratch& thread_scratch() {
  thread_local Scratch scratch;
  return scratch;
}

// Runs body(i) for i in [0, count) on the caller and the pool. Waits for claimed items only, never for
// scheduled tasks to start, so concurrent calls cannot deadlock on a busy pool.
template <typename F>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t count, F body) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto worker = [state, count, body]() {
    int64_t i;
    while ((i = state->next.fetch_add(1)) < count) {
      body(i);
      if (state->done.fetch_add(1) + 1 == count) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(worker)(worker));
  worker();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == count; });
}

}  // namespace imm_kernels
