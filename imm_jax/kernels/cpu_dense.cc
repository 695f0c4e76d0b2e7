// Matrix products for XLA:CPU: a linear layer and its input gradient, and stride-1 convolutions.
//   imm_matmul:  C (M, N) = op(A) (M, K) @ op(B) (K, N) [+ bias (N)]
//                A is stored (M, K), or (K, M) with transpose_a; B is stored (K, N), or (N, K) with transpose_b.
//   imm_conv2d:  y = conv(x, kernel), x (B, H, W, C) NHWC, kernel (kh, kw, C, D) HWIO, zero padding, a stride: the
//                same GEMM with A the implicit im2col matrix of x (never stored) and B the kernel as (kh kw C, D).
// All float32, row-major; outputs written in full (no accumulation into their old contents).
//
// Why: XLA:CPU's library GEMM ran the DiT-S/2 token linears (M = batch * tokens = 8192, K and N 384-1536) at
// 97-137 GFLOP/s on the 2-core development machine, its convolution the narrow DDPM++'s 3x3 convs at 59-113;
// this blocked GEMM (6 x 16 register tile, GCC vector extensions, -march=native) at 133-165 and 117-142
// (docs/PERFORMANCE.md).
//
// Blocking (GotoBLAS): B is packed once per call into 16-column panels per K block and shared by all tasks;
// each task owns a block of up to kMC rows and a range of column panels, packs its rows of A per K block
// (kMC x kKC floats, L2-resident) and runs the register tile over its B panels (kKC x 16 floats each).
// Tasks run on XLA's intra-op thread pool.
// Built at first use by imm_jax/kernels/build.py (g++ -O3 -march=native) against jaxlib's FFI headers.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace imm_kernels;

namespace {

#ifndef IMM_KMC
#define IMM_KMC 96
#endif
constexpr int64_t kMC = IMM_KMC;  // rows of A per task (16 register-tile panels; 96 x 768 floats = 288 KiB)
#ifndef IMM_KKC
#define IMM_KKC 768
#endif
constexpr int64_t kKC = IMM_KKC;  // K block (a 768 x 16 B panel is 48 KiB; K <= 768 in one block)

// A strided matrix view: element (i, j) at data[i * rs + j * cs].
struct Mat {
  const float* data;
  int64_t rs, cs;
};

// Rows [i0, i0 + rows) x columns [p0, p0 + kc) of a into kMR-row panels, panel-major, zero padded:
// dst[(panel * kc + p) * kMR + r].
void pack_a(Mat a, int64_t i0, int64_t rows, int64_t p0, int64_t kc, float* dst) {
  for (int64_t ip = 0; ip * kMR < rows; ++ip) {
    float* panel = dst + ip * kc * kMR;
    const int64_t height = std::min<int64_t>(kMR, rows - ip * kMR);
    if (a.cs == 1) {  // rows contiguous: read kMR rows side by side
      for (int r = 0; r < kMR; ++r) {
        const float* src = r < height ? a.data + (i0 + ip * kMR + r) * a.rs + p0 : nullptr;
        for (int64_t p = 0; p < kc; ++p) panel[p * kMR + r] = src ? src[p] : 0.f;
      }
    } else {  // columns contiguous (transposed A): each p reads kMR neighbouring floats
      for (int64_t p = 0; p < kc; ++p) {
        const float* src = a.data + (p0 + p) * a.cs + (i0 + ip * kMR) * a.rs;
        for (int r = 0; r < kMR; ++r) panel[p * kMR + r] = r < height ? src[r * a.rs] : 0.f;
      }
    }
  }
}

// Rows [p0, p0 + kc) x column panel jp of b, zero padded: dst[p * kNR + j].
void pack_b_panel(Mat b, int64_t n, int64_t p0, int64_t kc, int64_t jp, float* dst) {
  const int64_t j0 = jp * kNR, width = std::min<int64_t>(kNR, n - j0);
  if (b.cs == 1 && width == kNR) {
    for (int64_t p = 0; p < kc; ++p) std::memcpy(dst + p * kNR, b.data + (p0 + p) * b.rs + j0, kNR * sizeof(float));
  } else if (b.cs == 1) {
    for (int64_t p = 0; p < kc; ++p)
      for (int j = 0; j < kNR; ++j) dst[p * kNR + j] = j < width ? b.data[(p0 + p) * b.rs + j0 + j] : 0.f;
  } else {  // transposed B: column j of op(B) is a contiguous row of the stored matrix
    for (int j = 0; j < kNR; ++j) {
      const float* src = j < width ? b.data + (j0 + j) * b.cs + p0 * b.rs : nullptr;
      for (int64_t p = 0; p < kc; ++p) dst[p * kNR + j] = src ? src[p * b.rs] : 0.f;
    }
  }
}

struct Problem {
  int64_t m, n, k;
  Mat a, b;
  const float* bias;  // (n,) or null
  float* c;
  int64_t k_blocks() const { return (k + kKC - 1) / kKC; }
  int64_t n_panels() const { return (n + kNR - 1) / kNR; }
  int64_t kc(int64_t kb) const { return std::min(kKC, k - kb * kKC); }
  // Packed B: K block kb, column panel jp.
  int64_t b_offset(int64_t kb, int64_t jp) const { return kb * kKC * n_panels() * kNR + jp * kc(kb) * kNR; }
};

// Packs rows [i0, i0 + rows) x columns [p0, p0 + kc) of A as pack_a does, from the strided matrix pr.a.
struct MatrixRows {
  Mat a;
  void operator()(int64_t i0, int64_t rows, int64_t p0, int64_t kc, float* dst) const {
    pack_a(a, i0, rows, p0, kc, dst);
  }
};

// The same for the implicit im2col matrix of a convolution: row i is output pixel (b, oy, ox) of x (B, H, W, C)
// NHWC, column p = (ky * kw + kx) * C + c reads x[b, oy * stride + ky - ph, ox * stride + kx - pw, c] (zero
// outside), so A @ kernel.reshape(kh * kw * C, Cout) is the convolution.
struct ConvPatches {
  const float* x;
  int64_t h, w, c, kw, stride, ph, pw, ho, wo;
  void operator()(int64_t i0, int64_t rows, int64_t p0, int64_t kc, float* dst) const {
    for (int64_t ip = 0; ip * kMR < rows; ++ip) {
      float* panel = dst + ip * kc * kMR;
      for (int r = 0; r < kMR; ++r) {
        const int64_t i = i0 + ip * kMR + r;
        if (ip * kMR + r >= rows) {
          for (int64_t p = 0; p < kc; ++p) panel[p * kMR + r] = 0.f;
          continue;
        }
        const int64_t b = i / (ho * wo), oy = i / wo % ho, ox = i % wo;
        // Walk the columns in runs of one kernel tap: contiguous channels of one input pixel (or zeros).
        for (int64_t p = p0; p < p0 + kc;) {
          const int64_t tap = p / c, c0 = p % c, run = std::min(c - c0, p0 + kc - p);
          const int64_t iy = oy * stride + tap / kw - ph, ix = ox * stride + tap % kw - pw;
          float* out = panel + (p - p0) * kMR + r;
          if (iy < 0 || iy >= h || ix < 0 || ix >= w) {
            for (int64_t q = 0; q < run; ++q) out[q * kMR] = 0.f;
          } else {
            const float* src = x + ((b * h + iy) * w + ix) * c + c0;
            for (int64_t q = 0; q < run; ++q) out[q * kMR] = src[q];
          }
          p += run;
        }
      }
    }
  }
};

// C rows [i0, i0 + rows) x column panels [jp0, jp1), all K blocks; pack_rows packs A's rows (see above).
template <typename PackRows>
void run_block(const Problem& pr, const PackRows& pack_rows, const float* bp, int64_t i0, int64_t rows,
               int64_t jp0, int64_t jp1, float* ap) {
  const int64_t panels = (rows + kMR - 1) / kMR, last = pr.k_blocks() - 1;
  for (int64_t kb = 0; kb <= last; ++kb) {
    const int64_t kc = pr.kc(kb);
    pack_rows(i0, rows, kb * kKC, kc, ap);
    for (int64_t jp = jp0; jp < jp1; ++jp) {
      const float* bpan = bp + pr.b_offset(kb, jp);
      const int64_t j0 = jp * kNR, width = std::min<int64_t>(kNR, pr.n - j0);
      v8 bias0 = splat8(0.f), bias1 = splat8(0.f);
      if (kb == last && pr.bias != nullptr) {
        float tile[kNR] = {};
        for (int64_t j = 0; j < width; ++j) tile[j] = pr.bias[j0 + j];
        bias0 = load8(tile);
        bias1 = load8(tile + 8);
      }
      for (int64_t ip = 0; ip < panels; ++ip)
        register_tile(ap + ip * kc * kMR, bpan, kc, pr.c + (i0 + ip * kMR) * pr.n + j0, pr.n,
                      std::min<int64_t>(kMR, rows - ip * kMR), width, splat8(1.f), bias0, bias1, kb > 0);
    }
  }
}

template <typename PackRows>
void matmul(ffi::ThreadPool& pool, const Problem& pr, const PackRows& pack_rows) {
  if (pr.m == 0 || pr.n == 0) return;
  if (pr.k == 0) {
    for (int64_t i = 0; i < pr.m; ++i)
      for (int64_t j = 0; j < pr.n; ++j) pr.c[i * pr.n + j] = pr.bias ? pr.bias[j] : 0.f;
    return;
  }
  // Packed B lives in the calling thread's scratch: this thread waits in parallel_for until every task
  // that reads it is done, so no other call can reuse the buffer meanwhile.
  thread_local std::vector<float> packed_b;
  const int64_t n_panels = pr.n_panels(), k_blocks = pr.k_blocks();
  packed_b.resize(std::max<size_t>(packed_b.size(), n_panels * kNR * pr.k));
  float* bp = packed_b.data();
  parallel_for(pool, n_panels, [&pr, bp, k_blocks](int64_t jp) {
    for (int64_t kb = 0; kb < k_blocks; ++kb)
      pack_b_panel(pr.b, pr.n, kb * kKC, pr.kc(kb), jp, bp + pr.b_offset(kb, jp));
  });
  // Tasks: row blocks x column ranges, at least ~4 per thread so the pool stays balanced.
  const int64_t row_blocks = (pr.m + kMC - 1) / kMC;
  const int64_t want = 4 * std::max<int64_t>(1, pool.num_threads() + 1);
  const int64_t col_splits = std::min<int64_t>(n_panels, std::max<int64_t>(1, (want + row_blocks - 1) / row_blocks));
  const int64_t panels_per_split = (n_panels + col_splits - 1) / col_splits;
  parallel_for(pool, row_blocks * col_splits, [&, bp, col_splits, panels_per_split, n_panels](int64_t task) {
    const int64_t rb = task / col_splits, cs = task % col_splits;
    const int64_t jp0 = cs * panels_per_split, jp1 = std::min(n_panels, jp0 + panels_per_split);
    if (jp0 >= jp1) return;
    Scratch& scratch = thread_scratch();
    float* ap = scratch.get(scratch.a_pack, kMC * kKC);
    run_block(pr, pack_rows, bp, rb * kMC, std::min(kMC, pr.m - rb * kMC), jp0, jp1, ap);
  });
}

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                      ffi::Buffer<ffi::F32> bias, bool transpose_a, bool transpose_b, bool has_bias,
                      ffi::ResultBuffer<ffi::F32> c) {
  auto da = a.dimensions(), db = b.dimensions(), dc = c->dimensions();
  if (da.size() != 2 || db.size() != 2 || dc.size() != 2)
    return ffi::Error::InvalidArgument("imm_matmul takes 2-D operands");
  const int64_t m = transpose_a ? da[1] : da[0], k = transpose_a ? da[0] : da[1];
  const int64_t n = transpose_b ? db[0] : db[1], kb = transpose_b ? db[1] : db[0];
  if (kb != k || dc[0] != m || dc[1] != n)
    return ffi::Error::InvalidArgument("imm_matmul: operand shapes do not match");
  if (has_bias && (bias.dimensions().size() != 1 || bias.dimensions()[0] != n))
    return ffi::Error::InvalidArgument("imm_matmul: bias must have shape (N,)");
  Problem pr{m, n, k,
             transpose_a ? Mat{a.typed_data(), 1, m} : Mat{a.typed_data(), k, 1},
             transpose_b ? Mat{b.typed_data(), 1, k} : Mat{b.typed_data(), n, 1},
             has_bias ? bias.typed_data() : nullptr, c->typed_data()};
  matmul(pool, pr, MatrixRows{pr.a});
  return ffi::Error::Success();
}

// Convolution, x (B, H, W, Cin) NHWC, kernel (kh, kw, Cin, Cout) HWIO, zero padding (pad_h, pad_w) on both
// sides of each spatial axis, equal strides -> (B, (H + 2 pad_h - kh) / stride + 1, ..., Cout): the GEMM above
// on implicit im2col rows.
ffi::Error Conv2dImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                      int64_t stride, int64_t pad_h, int64_t pad_w, ffi::ResultBuffer<ffi::F32> y) {
  auto dx = x.dimensions(), dk = kernel.dimensions(), dy = y->dimensions();
  if (dx.size() != 4 || dk.size() != 4 || dy.size() != 4 || dk[2] != dx[3])
    return ffi::Error::InvalidArgument("imm_conv2d: expects x (B, H, W, C) and an HWIO kernel (kh, kw, C, D)");
  if (stride < 1 || pad_h < 0 || pad_w < 0 || dx[1] + 2 * pad_h < dk[0] || dx[2] + 2 * pad_w < dk[1])
    return ffi::Error::InvalidArgument("imm_conv2d: bad stride or padding for this input and kernel");
  const int64_t ho = (dx[1] + 2 * pad_h - dk[0]) / stride + 1, wo = (dx[2] + 2 * pad_w - dk[1]) / stride + 1;
  if (dy[0] != dx[0] || dy[1] != ho || dy[2] != wo || dy[3] != dk[3])
    return ffi::Error::InvalidArgument("imm_conv2d: output shape does not match input, kernel and padding");
  const int64_t m = dx[0] * ho * wo, kk = dk[0] * dk[1] * dx[3], n = dk[3];
  Problem pr{m, n, kk, Mat{nullptr, 0, 0}, Mat{kernel.typed_data(), n, 1}, nullptr, y->typed_data()};
  matmul(pool, pr, ConvPatches{x.typed_data(), dx[1], dx[2], dx[3], dk[1], stride, pad_h, pad_w, ho, wo});
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ImmMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b")
                                  .Attr<bool>("has_bias")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ImmConv2d, Conv2dImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_h")
                                  .Attr<int64_t>("pad_w")
                                  .Ret<ffi::Buffer<ffi::F32>>());
