// Fused softmax attention for XLA:CPU, called from JAX through the XLA FFI.
//
// Why: XLA:CPU has no fused attention. Its einsum-softmax-einsum writes the
// [B, heads, T, S] float32 logits and probabilities (and in the backward
// pass their gradients) to memory: 425 MB per tensor per layer for 576
// tokens at batch 32, streamed several times per layer. Here each task keeps
// one (example, head group) in cache and works on blocks of query rows whose
// full probability rows (kBlockRows x S floats) stay in L1/L2; nothing of
// size T x S is ever written to memory. The backward pass recomputes the
// probabilities from the saved log-sum-exp (as FlashAttention does).
//
// One kernel covers the three attention kinds of diffvit_jax/models:
//   out[o] = sum_m c_m softmax(scale q[o M + m] k[kh]^T) v[vh],
// with c_0 = 1, c_1 = -lambda (num_maps M = 2: differential attention, the
// difference is formed before the value product, so that product is done once),
// kh = qh Nk / Nq (grouped queries when Nk < Nq) and vh = o Nv / Nout.
//   classic:       M = 1, Nq = Nk = Nv = Nout
//   differential:  M = 2, Nq = Nk = 2H, Nv = Nout = H, value heads of 2d
//   differential v2 (lambda applied outside): M = 1, Nq = Nout = 2H, Nk = Nv = H
// Layouts are the model's: q [B, T, Nq, dq], k [B, S, Nk, dq], v [B, S, Nv, dv],
// out [B, T, Nout, dv]; log-sum-exp [B, Nq, T].
//
// Work is split over (example, task group) pairs; a group owns every output
// head that reads its key and value heads, so key/value gradients are summed
// inside one task without locks. The matrix products use a register-tiled
// micro-kernel written with GCC vector extensions (16 floats: one AVX-512
// register, two AVX2 ones).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;
// Query rows per block: a 64 x 576 probability block is 147 KB, so the blocks
// of a task stay in L2 (block sizes 16-64 measured within 5%).
constexpr int64_t kBlockRows = 64;

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }
// {x, x, ..., x}: compiles to one broadcast (Vec{} + x would add a zero first).
template <size_t... I>
inline Vec SplatLanes(float x, std::index_sequence<I...>) {
  return Vec{((void)I, x)...};
}
inline Vec Splat(float x) { return SplatLanes(x, std::make_index_sequence<kLanes>()); }

inline int64_t RoundUp(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// exp(x) for x <= 0 (logits minus their row maximum or log-sum-exp); results
// below exp(-87) flush to 0. Cody-Waite reduction to |r| <= ln2/2 and a
// degree-6 Taylor polynomial: relative error ~1e-7.
inline Vec Exp(Vec x) {
  const Vec lo = Splat(-87.0f), hi = Splat(88.0f);
  const auto underflow = x < lo;
  x = underflow ? lo : x;
  x = x > hi ? hi : x;
  const Vec shifter = Splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const Vec t = x * Splat(1.44269504088896341f) + shifter;
  const Vec n = t - shifter;
  Vec r = x - n * Splat(0.693145751953125f);
  r = r - n * Splat(1.428606765330187e-06f);
  Vec p = Splat(1.0f / 720.0f);
  p = p * r + Splat(1.0f / 120.0f);
  p = p * r + Splat(1.0f / 24.0f);
  p = p * r + Splat(1.0f / 6.0f);
  p = p * r + Splat(0.5f);
  p = p * r + Splat(1.0f);
  p = p * r + Splat(1.0f);
  IVec bits;
  std::memcpy(&bits, &t, sizeof(t));
  IVec shifter_bits;
  std::memcpy(&shifter_bits, &shifter, sizeof(shifter));
  const IVec exponent = ((bits - shifter_bits) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &exponent, sizeof(scale));
  return underflow ? Splat(0.0f) : p * scale;
}

inline float Sum(Vec v) {
  float s = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
inline float Max(Vec v) {
  float m = v[0];
  for (int64_t i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

// C[MR x 16 NV] (+)= A[MR x K] B[K x 16 NV]; A(i, k) = a[i a_m + k a_k], B and C
// row-major. The accumulators stay in registers for the whole k loop.
template <int MR, int NV>
inline void Tile(int64_t depth, const float* a, int64_t a_m, int64_t a_k, const float* b,
                 int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  Vec acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j)
      acc[i][j] = accumulate ? Load(c + i * ldc + j * kLanes) : Splat(0.0f);
  for (int64_t k = 0; k < depth; ++k) {
    Vec av[MR];
    for (int i = 0; i < MR; ++i) av[i] = Splat(a[i * a_m + k * a_k]);
    // Each B vector is loaded once and used for every row.
    for (int j = 0; j < NV; ++j) {
      Vec bv = Load(b + k * ldb + j * kLanes);
#if defined(__x86_64__)
      // Pin it to a register: GCC otherwise folds the load into every row's FMA
      // (16 loads per 16 FMAs); 379 -> 325 ms per layer (benchmarks/RESULTS.md).
      asm("" : "+v"(bv));
#endif
      for (int i = 0; i < MR; ++i) acc[i][j] += av[i] * bv;
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) Store(c + i * ldc + j * kLanes, acc[i][j]);
}

template <int NV>
void Columns(int64_t rows, int64_t depth, const float* a, int64_t a_m, int64_t a_k,
             const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  // Fewer vector columns leave registers for more rows.
  constexpr int kRows = NV <= 2 ? 8 : 4;
  int64_t i = 0;
  for (; i + kRows <= rows; i += kRows)
    Tile<kRows, NV>(depth, a + i * a_m, a_m, a_k, b, ldb, c + i * ldc, ldc, accumulate);
  for (; i < rows; ++i)
    Tile<1, NV>(depth, a + i * a_m, a_m, a_k, b, ldb, c + i * ldc, ldc, accumulate);
}

// C[rows x cols] (+)= A[rows x depth] B[depth x cols]; cols a multiple of 16.
void Gemm(int64_t rows, int64_t cols, int64_t depth, const float* a, int64_t a_m, int64_t a_k,
          const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t j = 0;
  for (; j + 4 * kLanes <= cols; j += 4 * kLanes)
    Columns<4>(rows, depth, a, a_m, a_k, b + j, ldb, c + j, ldc, accumulate);
  switch ((cols - j) / kLanes) {
    case 3: Columns<3>(rows, depth, a, a_m, a_k, b + j, ldb, c + j, ldc, accumulate); break;
    case 2: Columns<2>(rows, depth, a, a_m, a_k, b + j, ldb, c + j, ldc, accumulate); break;
    case 1: Columns<1>(rows, depth, a, a_m, a_k, b + j, ldb, c + j, ldc, accumulate); break;
    default: break;
  }
}

struct Dims {
  int64_t batch, tokens, keys, q_heads, k_heads, v_heads, out_heads, qk_dim, v_dim, maps;
  int64_t qk_pad, v_pad, keys_pad;
  int64_t outs_per_task;  // output heads owned by one task
  float scale;

  int64_t tasks() const { return batch * (out_heads / outs_per_task); }
  int64_t q_head(int64_t o, int64_t m) const { return o * maps + m; }
  int64_t k_head(int64_t qh) const { return qh * k_heads / q_heads; }
  int64_t v_head(int64_t o) const { return o * v_heads / out_heads; }
};

// Thread-local scratch, grown on demand; XLA's pool threads live for the process.
float* Scratch(std::vector<float>& buffer, int64_t size) {
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}

// dst[c][s] = src[s, head, c]: key heads transposed to [dim_pad][keys_pad], zero-padded.
void LoadTransposed(const Dims& d, const float* src, int64_t b, int64_t head, int64_t heads,
                    int64_t dim, int64_t dim_pad, float* dst) {
  std::fill(dst, dst + dim_pad * d.keys_pad, 0.0f);
  for (int64_t s = 0; s < d.keys; ++s) {
    const float* row = src + ((b * d.keys + s) * heads + head) * dim;
    for (int64_t c = 0; c < dim; ++c) dst[c * d.keys_pad + s] = row[c];
  }
}

// dst[r][c] = factor * src[b, first + r, head, c] for `rows` rows, zero-padded to dim_pad.
void LoadRows(const float* src, int64_t b, int64_t first, int64_t rows, int64_t seq,
              int64_t head, int64_t heads, int64_t dim, int64_t dim_pad, float factor,
              float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = src + ((b * seq + first + r) * heads + head) * dim;
    float* out = dst + r * dim_pad;
    for (int64_t c = 0; c < dim; ++c) out[c] = factor * row[c];
    std::fill(out + dim, out + dim_pad, 0.0f);
  }
}

// Inverse of LoadRows (without the padding): dst[b, first + r, head, c] = f_r * src[r][c],
// f_r = factor * row_factors[r] (row_factors may be null).
void StoreRows(const float* src, int64_t b, int64_t first, int64_t rows, int64_t seq,
               int64_t head, int64_t heads, int64_t dim, int64_t dim_pad, float factor,
               float* dst, const float* row_factors = nullptr) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = dst + ((b * seq + first + r) * heads + head) * dim;
    const float* in = src + r * dim_pad;
    const float f = row_factors ? factor * row_factors[r] : factor;
    for (int64_t c = 0; c < dim; ++c) row[c] = f * in[c];
  }
}

// exp(logits - row max) over the first `keys` columns of each row, in place;
// padding columns become 0. Writes each row's log-sum-exp and 1 / sum: the
// normalisation is applied later, to the (narrower) output rows.
void UnnormalisedSoftmaxRows(const Dims& d, int64_t rows, float* logits, float* log_sum_exp,
                             float* inverse_total) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = logits + r * d.keys_pad;
    for (int64_t s = d.keys; s < d.keys_pad; ++s) row[s] = -INFINITY;
    Vec peak_v = Splat(-INFINITY);
    for (int64_t s = 0; s < d.keys_pad; s += kLanes) {
      const Vec x = Load(row + s);
      peak_v = x > peak_v ? x : peak_v;
    }
    const float peak = Max(peak_v);
    const Vec shift = Splat(peak);
    Vec total_v = Splat(0.0f);
    for (int64_t s = 0; s < d.keys_pad; s += kLanes) {
      const Vec e = Exp(Load(row + s) - shift);
      total_v += e;
      Store(row + s, e);
    }
    const float total = Sum(total_v);
    inverse_total[r] = 1.0f / total;
    log_sum_exp[r] = peak + std::log(total);
  }
}

// probs = exp(logits - log_sum_exp) in place (the forward pass's softmax, recomputed).
void ExpRows(const Dims& d, int64_t rows, float* logits, const float* log_sum_exp) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = logits + r * d.keys_pad;
    const Vec shift = Splat(log_sum_exp[r]);
    for (int64_t s = 0; s < d.keys_pad; s += kLanes) Store(row + s, Exp(Load(row + s) - shift));
    std::fill(row + d.keys, row + d.keys_pad, 0.0f);
  }
}

struct Tensors {
  const float* q;
  const float* k;
  const float* v;
  float lambda;
};

void ForwardTask(const Dims& d, const Tensors& in, int64_t task, float* out, float* lse) {
  thread_local std::vector<float> keys_t, values, queries, probs, block, inverses;
  const int64_t groups = d.out_heads / d.outs_per_task;
  const int64_t b = task / groups, first_out = task % groups * d.outs_per_task;
  float* kt = Scratch(keys_t, d.maps * d.qk_pad * d.keys_pad);
  float* vb = Scratch(values, d.keys_pad * d.v_pad);
  float* qs = Scratch(queries, kBlockRows * d.qk_pad);
  float* p = Scratch(probs, d.maps * kBlockRows * d.keys_pad);
  float* o_block = Scratch(block, kBlockRows * d.v_pad);
  float* inverse = Scratch(inverses, d.maps * kBlockRows);  // 1 / row sums
  int64_t loaded_v = -1, loaded_k[2] = {-1, -1};
  for (int64_t o = first_out; o < first_out + d.outs_per_task; ++o) {
    if (d.v_head(o) != loaded_v) {
      loaded_v = d.v_head(o);
      std::fill(vb, vb + d.keys_pad * d.v_pad, 0.0f);
      LoadRows(in.v, b, 0, d.keys, d.keys, loaded_v, d.v_heads, d.v_dim, d.v_pad, 1.0f, vb);
    }
    for (int64_t m = 0; m < d.maps; ++m) {
      const int64_t kh = d.k_head(d.q_head(o, m));
      if (kh != loaded_k[m]) {
        loaded_k[m] = kh;
        LoadTransposed(d, in.k, b, kh, d.k_heads, d.qk_dim, d.qk_pad,
                       kt + m * d.qk_pad * d.keys_pad);
      }
    }
    for (int64_t t0 = 0; t0 < d.tokens; t0 += kBlockRows) {
      const int64_t rows = std::min(kBlockRows, d.tokens - t0);
      for (int64_t m = 0; m < d.maps; ++m) {
        const int64_t qh = d.q_head(o, m);
        float* pm = p + m * kBlockRows * d.keys_pad;
        LoadRows(in.q, b, t0, rows, d.tokens, qh, d.q_heads, d.qk_dim, d.qk_pad, d.scale, qs);
        Gemm(rows, d.keys_pad, d.qk_pad, qs, d.qk_pad, 1, kt + m * d.qk_pad * d.keys_pad,
             d.keys_pad, pm, d.keys_pad, false);
        UnnormalisedSoftmaxRows(d, rows, pm, lse + (b * d.q_heads + qh) * d.tokens + t0,
                                inverse + m * kBlockRows);
      }
      if (d.maps == 2) {  // A1 - lambda A2 (normalising both), then one product with v
        float* p2 = p + kBlockRows * d.keys_pad;
        for (int64_t r = 0; r < rows; ++r) {
          const Vec c1 = Splat(inverse[r]), c2 = Splat(-in.lambda * inverse[kBlockRows + r]);
          float* row1 = p + r * d.keys_pad;
          const float* row2 = p2 + r * d.keys_pad;
          for (int64_t s = 0; s < d.keys_pad; s += kLanes)
            Store(row1 + s, c1 * Load(row1 + s) + c2 * Load(row2 + s));
        }
      }
      Gemm(rows, d.v_pad, d.keys_pad, p, d.keys_pad, 1, vb, d.v_pad, o_block, d.v_pad, false);
      StoreRows(o_block, b, t0, rows, d.tokens, o, d.out_heads, d.v_dim, d.v_pad, 1.0f, out,
                d.maps == 1 ? inverse : nullptr);
    }
  }
}

struct Gradients {
  float* dq;
  float* dk;
  float* dv;
  float* dlambda;  // [B, out_heads]: each output head's share
};

void BackwardTask(const Dims& d, const Tensors& in, const float* lse, const float* dout,
                  int64_t task, const Gradients& grad) {
  thread_local std::vector<float> keys_t, keys, values_t, queries, probs, diff, ddiff, dout_b,
      dq_b, dkeys, dvalues;
  const int64_t groups = d.out_heads / d.outs_per_task;
  const int64_t b = task / groups, first_out = task % groups * d.outs_per_task;
  const int64_t last_out = first_out + d.outs_per_task - 1;
  // The key and value heads this task owns (contiguous ranges).
  const int64_t first_kh = d.k_head(d.q_head(first_out, 0));
  const int64_t num_kh = d.k_head(d.q_head(last_out, d.maps - 1)) - first_kh + 1;
  const int64_t first_vh = d.v_head(first_out);
  const int64_t num_vh = d.v_head(last_out) - first_vh + 1;
  const int64_t k_size = d.qk_pad * d.keys_pad, v_size = d.v_pad * d.keys_pad;
  const int64_t p_size = kBlockRows * d.keys_pad;
  float* kt = Scratch(keys_t, d.maps * k_size);
  float* kb = Scratch(keys, d.maps * k_size);
  float* vt = Scratch(values_t, v_size);
  float* qs = Scratch(queries, d.maps * kBlockRows * d.qk_pad);
  float* p = Scratch(probs, d.maps * p_size);
  float* dif = d.maps == 2 ? Scratch(diff, p_size) : p;
  float* dd = Scratch(ddiff, p_size);
  float* dob = Scratch(dout_b, kBlockRows * d.v_pad);
  float* dqb = Scratch(dq_b, kBlockRows * d.qk_pad);
  float* dk_acc = Scratch(dkeys, num_kh * k_size);
  float* dv_acc = Scratch(dvalues, num_vh * v_size);
  std::fill(dk_acc, dk_acc + num_kh * k_size, 0.0f);
  std::fill(dv_acc, dv_acc + num_vh * v_size, 0.0f);
  int64_t loaded_v = -1, loaded_k[2] = {-1, -1};
  for (int64_t o = first_out; o <= last_out; ++o) {
    double dlambda = 0.0;
    const int64_t vh = d.v_head(o);
    if (vh != loaded_v) {
      loaded_v = vh;
      LoadTransposed(d, in.v, b, vh, d.v_heads, d.v_dim, d.v_pad, vt);
    }
    for (int64_t m = 0; m < d.maps; ++m) {
      const int64_t kh = d.k_head(d.q_head(o, m));
      if (kh != loaded_k[m]) {
        loaded_k[m] = kh;
        LoadTransposed(d, in.k, b, kh, d.k_heads, d.qk_dim, d.qk_pad, kt + m * k_size);
        float* rows = kb + m * k_size;
        std::fill(rows, rows + k_size, 0.0f);
        LoadRows(in.k, b, 0, d.keys, d.keys, kh, d.k_heads, d.qk_dim, d.qk_pad, 1.0f, rows);
      }
    }
    float* dv_head = dv_acc + (vh - first_vh) * v_size;
    for (int64_t t0 = 0; t0 < d.tokens; t0 += kBlockRows) {
      const int64_t rows = std::min(kBlockRows, d.tokens - t0);
      LoadRows(dout, b, t0, rows, d.tokens, o, d.out_heads, d.v_dim, d.v_pad, 1.0f, dob);
      for (int64_t m = 0; m < d.maps; ++m) {
        const int64_t qh = d.q_head(o, m);
        float* qm = qs + m * kBlockRows * d.qk_pad;
        float* pm = p + m * p_size;
        LoadRows(in.q, b, t0, rows, d.tokens, qh, d.q_heads, d.qk_dim, d.qk_pad, d.scale, qm);
        Gemm(rows, d.keys_pad, d.qk_pad, qm, d.qk_pad, 1, kt + m * k_size, d.keys_pad, pm,
             d.keys_pad, false);
        ExpRows(d, rows, pm, lse + (b * d.q_heads + qh) * d.tokens + t0);
      }
      if (d.maps == 2) {
        const Vec neg_lambda = Splat(-in.lambda);
        for (int64_t i = 0; i < rows * d.keys_pad; i += kLanes)
          Store(dif + i, Load(p + i) + neg_lambda * Load(p + p_size + i));
      }
      // d(diff) = dout v^T; dv += diff^T dout.
      Gemm(rows, d.keys_pad, d.v_pad, dob, d.v_pad, 1, vt, d.keys_pad, dd, d.keys_pad, false);
      Gemm(d.keys_pad, d.v_pad, rows, dif, 1, d.keys_pad, dob, d.v_pad, dv_head, d.v_pad, true);
      for (int64_t m = 0; m < d.maps; ++m) {
        const int64_t qh = d.q_head(o, m);
        const int64_t kh_local = d.k_head(qh) - first_kh;
        const float coef = m == 0 ? 1.0f : -in.lambda;
        float* pm = p + m * p_size;
        // dlogits = P * (coef dD - rowsum(coef dD * P)), in place of P.
        for (int64_t r = 0; r < rows; ++r) {
          float* prow = pm + r * d.keys_pad;
          const float* drow = dd + r * d.keys_pad;
          Vec dot_v = Splat(0.0f);
          for (int64_t s = 0; s < d.keys_pad; s += kLanes) dot_v += Load(prow + s) * Load(drow + s);
          const float dot = Sum(dot_v);
          if (m == 1) dlambda -= dot;
          const Vec c = Splat(coef), row_term = Splat(coef * dot);
          for (int64_t s = 0; s < d.keys_pad; s += kLanes) {
            const Vec pv = Load(prow + s);
            Store(prow + s, pv * (c * Load(drow + s) - row_term));
          }
        }
        Gemm(rows, d.qk_pad, d.keys_pad, pm, d.keys_pad, 1, kb + m * k_size, d.qk_pad, dqb,
             d.qk_pad, false);
        StoreRows(dqb, b, t0, rows, d.tokens, qh, d.q_heads, d.qk_dim, d.qk_pad, d.scale,
                  grad.dq);
        Gemm(d.keys_pad, d.qk_pad, rows, pm, 1, d.keys_pad, qs + m * kBlockRows * d.qk_pad,
             d.qk_pad, dk_acc + kh_local * k_size, d.qk_pad, true);
      }
    }
    grad.dlambda[b * d.out_heads + o] = static_cast<float>(dlambda);
  }
  for (int64_t i = 0; i < num_kh; ++i)
    StoreRows(dk_acc + i * k_size, b, 0, d.keys, d.keys, first_kh + i, d.k_heads, d.qk_dim,
              d.qk_pad, 1.0f, grad.dk);
  for (int64_t i = 0; i < num_vh; ++i)
    StoreRows(dv_acc + i * v_size, b, 0, d.keys, d.keys, first_vh + i, d.v_heads, d.v_dim,
              d.v_pad, 1.0f, grad.dv);
}

// Runs fn(0..n-1) on XLA's intra-op pool. The calling thread claims items too,
// so the call finishes even when every pool thread is busy elsewhere; helpers
// that start after all items are claimed return without touching fn.
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const Fn& fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, &fn]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      fn(i);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work] { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

ffi::Error MakeDims(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                    const ffi::Buffer<ffi::F32>& v, float scale, int64_t maps, Dims* d) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("attention: q, k, v must be [B, T, heads, dim]");
  d->batch = qd[0];
  d->tokens = qd[1];
  d->keys = kd[1];
  d->q_heads = qd[2];
  d->k_heads = kd[2];
  d->v_heads = vd[2];
  d->out_heads = maps > 0 ? qd[2] / maps : 0;
  d->qk_dim = qd[3];
  d->v_dim = vd[3];
  d->maps = maps;
  if (maps < 1 || maps > 2 || d->q_heads % maps || d->k_heads == 0 || d->v_heads == 0 || kd[0] != d->batch || vd[0] != d->batch ||
      vd[1] != d->keys || kd[3] != d->qk_dim || d->q_heads % d->k_heads ||
      d->out_heads % d->v_heads)
    return ffi::Error::InvalidArgument("attention: inconsistent q, k, v shapes");
  d->qk_pad = RoundUp(d->qk_dim);
  d->v_pad = RoundUp(d->v_dim);
  d->keys_pad = RoundUp(d->keys);
  // A task owns the output heads that read its key and value heads: output
  // head o reads key heads (o M .. o M + M - 1) Nk / Nq and value head o Nv / Nout.
  const int64_t key_groups = std::max<int64_t>(1, d->k_heads / maps);
  d->outs_per_task = std::max(d->out_heads / std::min(d->out_heads, key_groups),
                              d->out_heads / d->v_heads);
  if (d->out_heads % d->outs_per_task)
    return ffi::Error::InvalidArgument("attention: unsupported head grouping");
  d->scale = scale;
  return ffi::Error::Success();
}

ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                            ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                            ffi::Buffer<ffi::F32> lambda, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> lse, float scale, int64_t num_maps) {
  Dims d;
  if (ffi::Error error = MakeDims(q, k, v, scale, num_maps, &d); error.failure()) return error;
  const Tensors in{q.typed_data(), k.typed_data(), v.typed_data(), lambda.typed_data()[0]};
  float* out_data = out->typed_data();
  float* lse_data = lse->typed_data();
  ParallelFor(pool, d.tasks(), [&](int64_t task) { ForwardTask(d, in, task, out_data, lse_data); });
  return ffi::Error::Success();
}

ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                             ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                             ffi::Buffer<ffi::F32> lambda, ffi::Buffer<ffi::F32> lse,
                             ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                             ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                             ffi::ResultBuffer<ffi::F32> dlambda, float scale, int64_t num_maps) {
  Dims d;
  if (ffi::Error error = MakeDims(q, k, v, scale, num_maps, &d); error.failure()) return error;
  if (static_cast<int64_t>(dlambda->element_count()) != d.batch * d.out_heads)
    return ffi::Error::InvalidArgument("attention: dlambda must be [B, output heads]");
  const Tensors in{q.typed_data(), k.typed_data(), v.typed_data(), lambda.typed_data()[0]};
  const Gradients grad{dq->typed_data(), dk->typed_data(), dv->typed_data(),
                       dlambda->typed_data()};
  const float* lse_data = lse.typed_data();
  const float* dout_data = dout.typed_data();
  ParallelFor(pool, d.tasks(),
              [&](int64_t task) { BackwardTask(d, in, lse_data, dout_data, task, grad); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffvitAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lambda, shape [1]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // log-sum-exp
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("num_maps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DiffvitAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lambda
                                  .Arg<ffi::Buffer<ffi::F32>>()  // log-sum-exp
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dout
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dv
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dlambda per output head
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("num_maps"));
