// Multi-head softmax attention for XLA:CPU, forward and backward, parallel over (batch, head).
//
// Why: XLA:CPU runs the batched (N x N x head_dim) attention matmuls on one thread, so at DiT-S/2 sizes the
// attention takes ~20% of a train step for ~10% of its FLOPs. Here every (batch, head) pair is one task on
// XLA's intra-op thread pool; each task runs its matmuls through a small packed GEMM (6 x 16 register tile,
// GCC vector extensions, so it compiles for whatever SIMD -march=native offers).
//
// Layout (float32, row-major): qkv and d_qkv (B, N, 3, H, D), the fused projection as the network makes it
// (no slicing or transposing copies); out and d_out (B, N, H, D); lse (B, H, N), each softmax row's
// log-sum-exp, kept for the backward. Leading dimensions before N (B, and any vmap adds) are flattened into B.
// scale multiplies q k^T.
//   forward:  S = scale q k^T, P = softmax_rows(S), out = P v
//   backward: P = exp(scale q k^T - lse), d_v = P^T d_out, dP = d_out v^T, dS = P * (dP - rowsum(d_out * out)),
//             d_q = scale dS k, d_k = scale dS^T q
// Built at first use by imm_jax/kernels/build.py (g++ -O3 -march=native) against jaxlib's FFI headers.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace imm_kernels;

namespace {

// A strided matrix view: element (i, j) at data[i * rs + j * cs].
struct View {
  const float* data;
  int64_t rs, cs;
  float at(int64_t i, int64_t j) const { return data[i * rs + j * cs]; }
};

// c (m x n, row stride ldc) = alpha * a (m x k) @ b (k x n), or += when accumulate.
void gemm(int64_t m, int64_t n, int64_t k, View a, View b, float* c, int64_t ldc, float alpha,
          bool accumulate, Scratch& scratch) {
  const int64_t m_panels = (m + kMR - 1) / kMR, n_panels = (n + kNR - 1) / kNR;
  // Pack a into kMR-row panels (k x kMR each) and b into kNR-column panels (k x kNR each), zero padded.
  float* ap = scratch.get(scratch.a_pack, m_panels * kMR * k);
  float* bp = scratch.get(scratch.b_pack, n_panels * kNR * k);
  for (int64_t ip = 0; ip < m_panels; ++ip) {
    float* dst = ap + ip * kMR * k;
    for (int64_t p = 0; p < k; ++p)
      for (int r = 0; r < kMR; ++r) {
        const int64_t i = ip * kMR + r;
        dst[p * kMR + r] = i < m ? a.at(i, p) : 0.f;
      }
  }
  for (int64_t jp = 0; jp < n_panels; ++jp) {
    float* dst = bp + jp * kNR * k;
    const int64_t j0 = jp * kNR, width = std::min<int64_t>(kNR, n - j0);
    for (int64_t p = 0; p < k; ++p) {
      if (width == kNR && b.cs == 1) {
        std::memcpy(dst + p * kNR, b.data + p * b.rs + j0, kNR * sizeof(float));
      } else {
        for (int r = 0; r < kNR; ++r) dst[p * kNR + r] = r < width ? b.at(p, j0 + r) : 0.f;
      }
    }
  }
  const v8 va = splat8(alpha), zero = splat8(0.f);
  for (int64_t jp = 0; jp < n_panels; ++jp) {
    const int64_t j0 = jp * kNR, width = std::min<int64_t>(kNR, n - j0);
    for (int64_t ip = 0; ip < m_panels; ++ip)
      register_tile(ap + ip * kMR * k, bp + jp * kNR * k, k, c + ip * kMR * ldc + j0, ldc,
                    std::min<int64_t>(kMR, m - ip * kMR), width, va, zero, zero, accumulate);
  }
}

// exp for x <= 0 (softmax after subtracting the row max): 2^n * p(f), relative error ~1e-7.
inline v8 exp8(v8 x) {
  const v8 lo = splat8(-87.f);
  x = x < lo ? lo : x;
  const v8 t = x * splat8(1.44269504088896341f);  // x / ln 2
  // Round to nearest by adding and subtracting 1.5 * 2^23 (|t| < 2^22 here).
  const v8 n = (t + splat8(12582912.f)) - splat8(12582912.f);
  // f = x - n ln 2 in two parts for accuracy, |f| <= ln2 / 2.
  const v8 f = x - n * splat8(0.693359375f) - n * splat8(-2.12194440e-4f);
  v8 p = splat8(1.9875691500e-4f);
  p = p * f + splat8(1.3981999507e-3f);
  p = p * f + splat8(8.3334519073e-3f);
  p = p * f + splat8(4.1665795894e-2f);
  p = p * f + splat8(1.6666665459e-1f);
  p = p * f + splat8(5.0000001201e-1f);
  p = p * f * f + f + splat8(1.f);
  typedef int32_t vi8 __attribute__((vector_size(32)));
  const vi8 bits = (__builtin_convertvector(n, vi8) + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// In-place softmax of each row of s (rows x n, n % 8 == 0); lse[i] = log sum_j exp(s_ij) if lse is given.
void softmax_rows(float* s, int64_t rows, int64_t n, float* lse) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * n;
    v8 mx = splat8(-INFINITY);
    for (int64_t j = 0; j < n; j += 8) {
      const v8 x = load8(row + j);
      mx = x > mx ? x : mx;
    }
    float m = mx[0];
    for (int l = 1; l < 8; ++l) m = std::max(m, mx[l]);
    v8 sum = splat8(0.f);
    const v8 vm = splat8(m);
    for (int64_t j = 0; j < n; j += 8) {
      const v8 e = exp8(load8(row + j) - vm);
      store8(row + j, e);
      sum += e;
    }
    float total = 0.f;
    for (int l = 0; l < 8; ++l) total += sum[l];
    if (lse) lse[i] = m + std::log(total);
    const v8 inv = splat8(1.f / total);
    for (int64_t j = 0; j < n; j += 8) store8(row + j, load8(row + j) * inv);
  }
}

// qkv (..., N, 3, H, D): leading dimensions flattened into `batch` (vmap may add some).
struct Dims {
  int64_t batch, n, heads, d;
  int64_t count() const { return batch * heads; }
  int64_t token_stride() const { return 3 * heads * d; }  // between rows of q (or k, v) in qkv
};

ffi::Error qkv_dims(const ffi::Buffer<ffi::F32>& qkv, Dims* dims) {
  auto shape = qkv.dimensions();
  const size_t rank = shape.size();
  if (rank < 4 || shape[rank - 3] != 3)
    return ffi::Error::InvalidArgument("qkv must have shape (..., N, 3, heads, head_dim)");
  int64_t batch = 1;
  for (size_t i = 0; i + 4 < rank; ++i) batch *= shape[i];
  *dims = {batch, shape[rank - 4], shape[rank - 2], shape[rank - 1]};
  if (dims->n % 8 != 0) return ffi::Error::InvalidArgument("sequence length must be a multiple of 8");
  return ffi::Error::Success();
}

// Offsets of (batch b, head h) in qkv (q part) and in out (..., N, H, D).
inline int64_t qkv_offset(const Dims& x, int64_t b, int64_t h) { return b * x.n * x.token_stride() + h * x.d; }
inline int64_t out_offset(const Dims& x, int64_t b, int64_t h) { return (b * x.n * x.heads + h) * x.d; }

ffi::Error forward(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& qkv, float scale, float* out,
                   float* lse) {
  Dims x;
  if (auto err = qkv_dims(qkv, &x); err.failure()) return err;
  const float* base = qkv.typed_data();
  parallel_for(pool, x.count(), [=](int64_t task) {
    Scratch& scratch = thread_scratch();
    const int64_t b = task / x.heads, h = task % x.heads, n = x.n, d = x.d, ts = x.token_stride();
    const float* q = base + qkv_offset(x, b, h);
    const float *k = q + x.heads * d, *v = q + 2 * x.heads * d;
    float* s = scratch.get(scratch.s, n * n);
    gemm(n, n, d, {q, ts, 1}, {k, 1, ts}, s, n, scale, false, scratch);
    softmax_rows(s, n, n, lse ? lse + task * n : nullptr);
    gemm(n, d, n, {s, n, 1}, {v, ts, 1}, out + out_offset(x, b, h), x.heads * d, 1.f, false, scratch);
  });
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, float scale,
                       ffi::ResultBuffer<ffi::F32> out) {
  return forward(pool, qkv, scale, out->typed_data(), nullptr);
}

ffi::Error ForwardResImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, float scale,
                          ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  return forward(pool, qkv, scale, out->typed_data(), lse->typed_data());
}

// P is recomputed from q, k and the row log-sum-exp (as in FlashAttention): one more (N x N x D) matmul per
// head instead of writing and re-reading B * H * N * N softmax weights (50 MB per DiT-S/2 layer).
ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> out,
                        ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_out, float scale,
                        ffi::ResultBuffer<ffi::F32> d_qkv) {
  Dims x;
  if (auto err = qkv_dims(qkv, &x); err.failure()) return err;
  const float *base = qkv.typed_data(), *out_base = out.typed_data(), *g_base = d_out.typed_data();
  const float* lse_base = lse.typed_data();
  float* d_base = d_qkv->typed_data();
  parallel_for(pool, x.count(), [=](int64_t task) {
    Scratch& scratch = thread_scratch();
    const int64_t b = task / x.heads, h = task % x.heads, n = x.n, d = x.d, ts = x.token_stride();
    const int64_t hd = x.heads * d, oo = out_offset(x, b, h), qo = qkv_offset(x, b, h);
    const float *q = base + qo, *k = q + hd, *v = q + 2 * hd;
    const float *o = out_base + oo, *g = g_base + oo, *row_lse = lse_base + task * n;
    float *dq = d_base + qo, *dk = dq + hd, *dv = dq + 2 * hd;
    float* p = scratch.get(scratch.s, n * n);
    float* ds = scratch.get(scratch.ds, n * n);
    // P = exp(scale q k^T - lse)
    gemm(n, n, d, {q, ts, 1}, {k, 1, ts}, p, n, scale, false, scratch);
    for (int64_t i = 0; i < n; ++i) {
      const v8 l = splat8(row_lse[i]);
      float* row = p + i * n;
      for (int64_t j = 0; j < n; j += 8) store8(row + j, exp8(load8(row + j) - l));
    }
    // d_v = P^T d_out
    gemm(n, d, n, {p, 1, n}, {g, hd, 1}, dv, ts, 1.f, false, scratch);
    // dS = P * (d_out v^T - rowsum(d_out * out))
    gemm(n, n, d, {g, hd, 1}, {v, 1, ts}, ds, n, 1.f, false, scratch);
    for (int64_t i = 0; i < n; ++i) {
      float delta = 0.f;
      for (int64_t j = 0; j < d; ++j) delta += g[i * hd + j] * o[i * hd + j];
      const v8 vdelta = splat8(delta);
      float* row = ds + i * n;
      const float* prow = p + i * n;
      for (int64_t j = 0; j < n; j += 8) store8(row + j, load8(prow + j) * (load8(row + j) - vdelta));
    }
    // d_q = scale dS k, d_k = scale dS^T q
    gemm(n, d, n, {ds, n, 1}, {k, ts, 1}, dq, ts, scale, false, scratch);
    gemm(n, d, n, {ds, 1, n}, {q, ts, 1}, dk, ts, scale, false, scratch);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ImmAttentionForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ImmAttentionForwardRes, ForwardResImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ImmAttentionBackward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
