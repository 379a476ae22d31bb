// One-token (decode) attention read straight from the KV cache, skipping the slots a row
// does not see: no gathered copy of a paged cache, no scoring of a static cache's empty slots.
// Two layouts: a paged pool shared by the rows (``paged_decode_attention``, the serving
// engine's compiled step) and a static cache per row (``static_decode_attention``, generate's
// compiled step). Their dense references are the torch expressions they replace
// (archopt.ops.paged_attention.DecodeView, archopt.ops.kv_cache.StaticCache); the tests in
// tests/test_cpu_kernels.py compare them. Built on first use by archopt.ops.cpu_kernels.
//
// q (B, Hq, 1, d) float32; keys and values float32, float16 or bfloat16 (a cache kept in half
// precision: read and widened to float32 here, every sum in float32); positions (B, 1): each
// row's position. Row b attends over the slots holding
// positions 0..positions[b]; a row with none gets zeros. Each (row, kv head, chunk of 256 of
// the row's slot list) is one task with a fixed order of sums, and a long row's chunks are
// combined in their order, so a row's result does not depend on the other rows of its batch.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace {

// T: the cache's element type (float, c10::Half, c10::BFloat16), widened to float as read.
template <class T>
inline float dot(const float* __restrict a, const T* __restrict b, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += a[i] * static_cast<float>(b[i]);
  return s;
}

template <class T>
inline void axpy(float w, const T* __restrict x, float* __restrict y, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] += w * static_cast<float>(x[i]);
}

// exp(x) for x <= 0 (scores minus their maximum), to about 1 ulp, in a form the compiler
// vectorizes (no library call): 2^n * p(r), n = round(x / ln 2), r = x - n ln 2, p Cephes'.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.3f);  // below, exp underflows: 2^-126 is close enough to 0 here
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Softmax of each of the g rows of w (g, n) in place.
// With ``stats``, each row's maximum and sum of exponentials go there (2 a row), for a
// chunk of a long row that is combined with the others later (``combine_chunks``).
void softmax_rows(float* w, int64_t g, int64_t n, float* stats) {
  for (int64_t j = 0; j < g; ++j) {
    float* wj = w + j * n;
    const float m = *std::max_element(wj, wj + n);
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t i = 0; i < n; ++i) {
      wj[i] = exp_nonpositive(wj[i] - m);
      total += wj[i];
    }
    if (stats != nullptr) stats[2 * j] = m, stats[2 * j + 1] = total;
    const float inv = 1.f / total;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) wj[i] *= inv;
  }
}

// Any head size and group: the n visible slots' keys ks and values vs, g query heads qh.
template <class T>
void attend_generic(const float* qh, const T* const* ks, const T* const* vs, int64_t n,
                    int64_t g, int64_t d, float scale, float* w, float* oh, float* stats) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < g; ++j) w[j * n + i] = dot(qh + j * d, ks[i], d) * scale;
  softmax_rows(w, g, n, stats);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < g; ++j) axpy(w[j * n + i], vs[i], oh + j * d, d);
}

#if defined(__AVX512F__)
// 16 of the cache's values, widened to float32 (exactly: half and bfloat16 are subsets).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const c10::BFloat16* p) {  // a bfloat16 is a float32's top 16 bits
  const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
}

// The 16 sums of a[0..15]'s lanes, as one vector (r[i] = a[i][0] + ... + a[i][15]): a tree of
// shuffles and adds, ~3 instructions a vector where a horizontal sum each takes ~8.
inline __m512 sum16(__m512* a) {
  __m512 b[8], c[4], d[2];
  for (int k = 0; k < 8; ++k)  // per 128-bit lane: x0+x2, y0+y2, x1+x3, y1+y3
    b[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]),
                         _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
  for (int k = 0; k < 4; ++k) {  // per 128-bit lane: the quarter sums of a[4k..4k+3]
    const __m512d x = _mm512_castps_pd(b[2 * k]), y = _mm512_castps_pd(b[2 * k + 1]);
    c[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int k = 0; k < 2; ++k)  // 128-bit lanes: halves of c[2k], then of c[2k+1]
    d[k] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[2 * k], c[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// exp_nonpositive on 16 lanes: the same steps, in the same order, as one vector.
inline __m512 exp16_nonpositive(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.3f), x);  // max_ps returns its second operand on NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512i bits =
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

// softmax_rows, 16 lanes at a time (the tail masked): the scalar loop did not vectorize and
// took a third of a decode task. A NaN score leaves the maximum alone (max_ps returns its
// second operand on NaN) and comes out of exp16 as NaN, so its row's weights are all NaN, as
// the scalar loop and SDPA give them, never a finite average that skipped it.
void softmax_rows_avx512(float* w, int64_t g, int64_t n, float* stats) {
  const __mmask16 tail = static_cast<__mmask16>((1u << (n % 16)) - 1);
  const int64_t full = n - n % 16;
  for (int64_t j = 0; j < g; ++j) {
    float* wj = w + j * n;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < full; i += 16) mx = _mm512_max_ps(_mm512_loadu_ps(wj + i), mx);
    if (tail) mx = _mm512_mask_max_ps(mx, tail, _mm512_maskz_loadu_ps(tail, wj + full), mx);
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 total = _mm512_setzero_ps();
    for (int64_t i = 0; i < full; i += 16) {
      const __m512 e = exp16_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(wj + i), m));
      _mm512_storeu_ps(wj + i, e);
      total = _mm512_add_ps(total, e);
    }
    if (tail) {
      const __m512 e = exp16_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, wj + full), m));
      _mm512_mask_storeu_ps(wj + full, tail, e);
      total = _mm512_mask_add_ps(total, tail, total, e);
    }
    const float sum = _mm512_reduce_add_ps(total);
    if (stats != nullptr) stats[2 * j] = _mm512_cvtss_f32(m), stats[2 * j + 1] = sum;
    const __m512 inv = _mm512_set1_ps(1.f / sum);
    for (int64_t i = 0; i < full; i += 16)
      _mm512_storeu_ps(wj + i, _mm512_mul_ps(_mm512_loadu_ps(wj + i), inv));
    if (tail)
      _mm512_mask_storeu_ps(wj + full, tail,
                            _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, wj + full), inv));
  }
}

// Head size D and group G known: the query heads and the outputs stay in registers. Scores
// go 16 slots at a time per query head (one sum16), the last < 16 one slot at a time.
template <class T, int D, int G>
void attend_avx512(const float* qh, const T* const* ks, const T* const* vs, int64_t n,
                   float scale, float* w, float* oh, float* stats) {
  constexpr int V = D / 16;
  __m512 q[G][V];
  for (int j = 0; j < G; ++j)
    for (int c = 0; c < V; ++c) q[j][c] = _mm512_loadu_ps(qh + j * D + c * 16);
  const __m512 sc = _mm512_set1_ps(scale);
  int64_t i = 0;
  constexpr int kLines = D * sizeof(T) / 64;  // cache lines a slot's row takes
  for (; i + 16 <= n; i += 16) {
    for (int64_t s = i + 16; s < std::min<int64_t>(i + 32, n); ++s)  // the next 16 keys
      for (int c = 0; c < kLines; ++c)
        _mm_prefetch(reinterpret_cast<const char*>(ks[s]) + 64 * c, _MM_HINT_T0);
    for (int64_t s = i; s < i + 16; ++s)  // these slots' values, for after the softmax
      for (int c = 0; c < kLines; ++c)
        _mm_prefetch(reinterpret_cast<const char*>(vs[s]) + 64 * c, _MM_HINT_T1);
    for (int j = 0; j < G; ++j) {
      __m512 acc[16];
      for (int s = 0; s < 16; ++s) {
        const T* k = ks[i + s];
        acc[s] = _mm512_mul_ps(q[j][0], load16(k));
        for (int c = 1; c < V; ++c) acc[s] = _mm512_fmadd_ps(q[j][c], load16(k + c * 16), acc[s]);
      }
      _mm512_storeu_ps(w + j * n + i, _mm512_mul_ps(sum16(acc), sc));
    }
  }
  for (; i < n; ++i) {
    __m512 k[V];
    for (int c = 0; c < V; ++c) k[c] = load16(ks[i] + c * 16);
    for (int j = 0; j < G; ++j) {
      __m512 acc = _mm512_mul_ps(q[j][0], k[0]);
      for (int c = 1; c < V; ++c) acc = _mm512_fmadd_ps(q[j][c], k[c], acc);
      w[j * n + i] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
  softmax_rows_avx512(w, G, n, stats);
  __m512 o[G][V];
  for (int j = 0; j < G; ++j)
    for (int c = 0; c < V; ++c) o[j][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    if (i + 8 < n)  // a value row 8 slots ahead
      for (int c = 0; c < kLines; ++c)
        _mm_prefetch(reinterpret_cast<const char*>(vs[i + 8]) + 64 * c, _MM_HINT_T0);
    __m512 v[V];
    for (int c = 0; c < V; ++c) v[c] = load16(vs[i] + c * 16);
    for (int j = 0; j < G; ++j) {
      const __m512 wi = _mm512_set1_ps(w[j * n + i]);
      for (int c = 0; c < V; ++c) o[j][c] = _mm512_fmadd_ps(wi, v[c], o[j][c]);
    }
  }
  for (int j = 0; j < G; ++j)
    for (int c = 0; c < V; ++c) _mm512_storeu_ps(oh + j * D + c * 16, o[j][c]);
}

template <class T>
using Attend = void (*)(const float*, const T* const*, const T* const*, int64_t, float, float*,
                        float*, float*);

template <class T, int D>
Attend<T> pick_group(int64_t g) {
  switch (g) {
    case 1: return attend_avx512<T, D, 1>;
    case 2: return attend_avx512<T, D, 2>;
    case 3: return attend_avx512<T, D, 3>;
    case 4: return attend_avx512<T, D, 4>;
    case 5: return attend_avx512<T, D, 5>;
    case 6: return attend_avx512<T, D, 6>;
    case 8: return attend_avx512<T, D, 8>;
    default: return nullptr;
  }
}

template <class T>
Attend<T> pick(int64_t d, int64_t g) {
  if (d == 64) return pick_group<T, 64>(g);
  if (d == 128) return pick_group<T, 128>(g);
  return nullptr;
}
#else
template <class T>
using Attend = void (*)(const float*, const T* const*, const T* const*, int64_t, float, float*,
                        float*, float*);
template <class T>
Attend<T> pick(int64_t, int64_t) {
  return nullptr;
}
#endif

void check(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype,
           int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_q(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
             const at::Tensor& positions, int64_t kv_dim, const char* op) {
  const auto kv = keys.scalar_type();
  TORCH_CHECK(kv == at::kFloat || kv == at::kHalf || kv == at::kBFloat16, op,
              ": keys must be float32, float16 or bfloat16, got ", kv);
  check(keys, op, "keys", kv, kv_dim);
  check(values, op, "values", kv, kv_dim);
  check(positions, op, "positions", at::kLong, 2);
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.dim() == 4 && q.size(2) == 1, op,
              ": q must be float32 (B, Hq, 1, d), got ", q.scalar_type(), " ", q.sizes());
  TORCH_CHECK(values.sizes() == keys.sizes(), op, ": values ", values.sizes(),
              " must match keys ", keys.sizes());
  TORCH_CHECK(keys.size(kv_dim - 1) == q.size(3), op, ": head_dim of keys ",
              keys.size(kv_dim - 1), " must match q's ", q.size(3));
  const int64_t hkv = keys.size(kv_dim - 3);
  TORCH_CHECK(hkv > 0 && q.size(1) % hkv == 0, op, ": ", q.size(1),
              " query heads must be a multiple of ", hkv, " kv heads");
  TORCH_CHECK(positions.size(0) == q.size(0) && positions.size(1) == 1, op, ": positions ",
              positions.sizes(), " must be (", q.size(0), ", 1)");
}

// A read span longer than kChunk slots is cut into chunks of kChunk of each row's slot list,
// each a task of its own (as flash-decoding does): one long row over 3 kv heads was 3 tasks
// for 2 threads, one thread idle a third of the time. A chunk's softmax keeps its maximum and
// its sum of exponentials, and a row's chunks that saw a slot are combined after
// (``combine_chunks``); a row whose visible slots all lie in one chunk takes that chunk's
// result as it is, summed as it always was. Chunks are cut at fixed places of the row's own
// slot list, so a row's result does not depend on its batch (the padding that a wider row
// adds to the span only adds chunks that see nothing).
constexpr int64_t kChunk = 256;

// out (g, d) = the chunks' outputs o (nch, g, d), each normalized by its own sum, weighted by
// sum * exp(max - the largest max) and normalized again. NaN in a chunk stays NaN.
void combine_chunks(const float* const* o, const float* const* stats, int64_t nch, int64_t g,
                    int64_t d, float* out) {
  for (int64_t j = 0; j < g; ++j) {
    float top = -INFINITY;
    for (int64_t c = 0; c < nch; ++c) top = std::max(top, stats[c][2 * j]);
    float total = 0.f;
    float* oj = out + j * d;
    std::fill(oj, oj + d, 0.f);
    for (int64_t c = 0; c < nch; ++c) {
      const float f = stats[c][2 * j + 1] * std::exp(stats[c][2 * j] - top);
      total += f;
      axpy(f, o[c] + j * d, oj, d);
    }
    const float inv = 1.f / total;
    for (int64_t i = 0; i < d; ++i) oj[i] *= inv;
  }
}

// The shared driver: a task per (row, kv head, chunk of the row's slot list).
// ``visible(b, lo, hi, offsets)`` lists where row b's visible slots among its list's entries
// [lo, hi) start in head 0 of keys and values (in elements) and returns how many there are;
// head h's are ``head_stride`` further. A thread's tasks run in order, so it lists a row's
// chunk once for all its kv heads.
template <class T, class Visible>
at::Tensor decode_attention(const at::Tensor& q, const T* kp, const T* vp, int64_t hkv,
                            int64_t head_stride, int64_t max_slots, double scale,
                            const Visible& visible) {
  // q is read through its strides (a batch's q comes heads-major out of the compiled step: a
  // contiguous copy of it cost a clone a layer); a task copies its g heads together when they
  // are not already d apart. The result is contiguous.
  const at::Tensor qc = q.stride(3) == 1 ? q : q.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  const int64_t Hq = q.size(1), d = q.size(3), g = Hq / hkv;
  const int64_t B = q.size(0), qs0 = qc.stride(0), qs1 = qc.stride(1);
  const bool packed_heads = qs1 == d || g == 1;
  const float* qp = qc.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const Attend<T> fast = pick<T>(d, g);
  const int64_t chunks = std::max<int64_t>(1, (max_slots + kChunk - 1) / kChunk);
  const int64_t span = std::min(max_slots, kChunk);  // the most slots one task attends
  // With one chunk a task writes the output; with more, its partial result and, per query
  // head, (max, sum, slots seen) go to these, in task order (b, chunk, h).
  const int64_t tasks = B * chunks * hkv;
  std::unique_ptr<float[]> partial(chunks > 1 ? new float[tasks * g * d] : nullptr);
  std::unique_ptr<float[]> stats(chunks > 1 ? new float[tasks * (2 * g + 1)] : nullptr);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<const T*> ks(span), vs(span);
    std::vector<int64_t> offsets(span);
    std::vector<float> w(g * span), qbuf(packed_heads ? 0 : g * d);
    int64_t listed = -1, n = 0;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t % hkv, bc = t / hkv, b = bc / chunks, c = bc % chunks;
      if (bc != listed) {
        n = visible(b, c * kChunk, std::min((c + 1) * kChunk, max_slots), offsets.data());
        listed = bc;
      }
      for (int64_t i = 0; i < n; ++i) {
        ks[i] = kp + h * head_stride + offsets[i];
        vs[i] = vp + h * head_stride + offsets[i];
      }
      const float* qh = qp + b * qs0 + h * g * qs1;
      if (!packed_heads && n > 0) {
        for (int64_t j = 0; j < g; ++j) std::copy(qh + j * qs1, qh + j * qs1 + d, &qbuf[j * d]);
        qh = qbuf.data();
      }
      float* oh = chunks == 1 ? op + (b * Hq + h * g) * d : &partial[t * g * d];
      float* st = chunks == 1 ? nullptr : &stats[t * (2 * g + 1)];
      if (st != nullptr) st[2 * g] = static_cast<float>(n);
      if (n == 0) {  // nothing visible: zeros, not NaN (a chunk's count says it)
        if (st == nullptr) std::fill(oh, oh + g * d, 0.f);
      } else if (fast != nullptr) {
        fast(qh, ks.data(), vs.data(), n, sc, w.data(), oh, st);
      } else {
        std::fill(oh, oh + g * d, 0.f);
        attend_generic(qh, ks.data(), vs.data(), n, g, d, sc, w.data(), oh, st);
      }
    }
  });
  if (chunks > 1) {  // each (row, kv head): its chunks that saw a slot, in order. On one
    // thread: a few multiply-adds per chunk, less than another parallel region costs.
    std::vector<const float*> o(chunks), st(chunks);
    for (int64_t bh = 0; bh < B * hkv; ++bh) {
      const int64_t b = bh / hkv, h = bh % hkv;
      int64_t seen = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t t = (b * chunks + c) * hkv + h;
        if (stats[t * (2 * g + 1) + 2 * g] > 0) {
          o[seen] = &partial[t * g * d];
          st[seen++] = &stats[t * (2 * g + 1)];
        }
      }
      float* oh = op + (b * Hq + h * g) * d;
      if (seen == 0) {
        std::fill(oh, oh + g * d, 0.f);
      } else if (seen == 1) {
        std::copy(o[0], o[0] + g * d, oh);
      } else {
        combine_chunks(o.data(), st.data(), seen, g, d, oh);
      }
    }
  }
  return out;
}

// decode_attention over keys and values of the cache's element type (checked by check_q).
template <class Visible>
at::Tensor decode_attention_of(const at::Tensor& q, const at::Tensor& keys,
                               const at::Tensor& values, int64_t hkv, int64_t head_stride,
                               int64_t max_slots, double scale, const Visible& visible) {
  auto run = [&](auto* kp, auto* vp) {
    return decode_attention(q, kp, vp, hkv, head_stride, max_slots, scale, visible);
  };
  switch (keys.scalar_type()) {
    case at::kHalf:
      return run(keys.const_data_ptr<c10::Half>(), values.const_data_ptr<c10::Half>());
    case at::kBFloat16:
      return run(keys.const_data_ptr<c10::BFloat16>(), values.const_data_ptr<c10::BFloat16>());
    default:
      return run(keys.const_data_ptr<float>(), values.const_data_ptr<float>());
  }
}

// keys, values (Hkv, P, d): one layer's pool; read_slots (B, S): each row's slots (any order,
// padded with slots that hold no position); slot_pos (P,): each slot's position (-1 empty).
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& keys,
                                  const at::Tensor& values, const at::Tensor& read_slots,
                                  const at::Tensor& slot_pos, const at::Tensor& positions,
                                  double scale) {
  const char* op = "paged_decode_attention";
  check_q(q, keys, values, positions, 3, op);
  check(read_slots, op, "read_slots", at::kLong, 2);
  check(slot_pos, op, "slot_pos", at::kLong, 1);
  const int64_t hkv = keys.size(0), P = keys.size(1), d = keys.size(2), S = read_slots.size(1);
  TORCH_CHECK(read_slots.size(0) == q.size(0), op, ": read_slots ", read_slots.sizes(),
              " must have one row per query row (", q.size(0), ")");
  TORCH_CHECK(slot_pos.size(0) == P, op, ": slot_pos has ", slot_pos.size(0),
              " entries, the pool ", P, " slots");
  const int64_t* rs = read_slots.const_data_ptr<int64_t>();
  const int64_t* sp = slot_pos.const_data_ptr<int64_t>();
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  std::atomic<int64_t> bad{-1};
  at::Tensor out = decode_attention_of(q, keys, values, hkv, P * d, S, scale,
                                       [&](int64_t b, int64_t lo, int64_t hi, int64_t* at) {
    int64_t n = 0;
    for (int64_t s = lo; s < hi; ++s) {
      const int64_t slot = rs[b * S + s];
      if (slot < 0 || slot >= P) {
        bad = slot;
        continue;
      }
      const int64_t p = sp[slot];
      if (p >= 0 && p <= pos[b]) at[n++] = slot * d;
    }
    return n;
  });
  TORCH_CHECK(bad.load() < 0, op, ": read slot ", bad.load(), " is outside the pool of ", P,
              " slots");
  return out;
}

// keys, values (B, Hkv, S, d): one layer's static cache; slot_pos (B, S): each slot's
// position (-1 empty). Row b attends over its own slots with 0 <= position <= positions[b].
at::Tensor static_decode_attention(const at::Tensor& q, const at::Tensor& keys,
                                   const at::Tensor& values, const at::Tensor& slot_pos,
                                   const at::Tensor& positions, double scale) {
  const char* op = "static_decode_attention";
  check_q(q, keys, values, positions, 4, op);
  check(slot_pos, op, "slot_pos", at::kLong, 2);
  const int64_t B = keys.size(0), hkv = keys.size(1), S = keys.size(2), d = keys.size(3);
  TORCH_CHECK(B == q.size(0) && slot_pos.size(0) == B && slot_pos.size(1) == S, op,
              ": keys ", keys.sizes(), " and slot_pos ", slot_pos.sizes(),
              " must have one row per query row (", q.size(0), ") and the same slots");
  const int64_t* sp = slot_pos.const_data_ptr<int64_t>();
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  return decode_attention_of(q, keys, values, hkv, S * d, S, scale,
                             [&](int64_t b, int64_t lo, int64_t hi, int64_t* at) {
    int64_t n = 0;
    for (int64_t s = lo; s < hi; ++s) {
      const int64_t p = sp[b * S + s];
      if (p >= 0 && p <= pos[b]) at[n++] = (b * hkv * S + s) * d;
    }
    return n;
  });
}

}  // namespace

// C entry points for AOTInductor, as in act8_linear.cpp: one call a layer, without boxing.
#define ARCHOPT_SHIM extern "C" __attribute__((visibility("default"))) AOTITorchError

ARCHOPT_SHIM aoti_torch_cpu_paged_decode_attention(AtenTensorHandle q, AtenTensorHandle keys,
                                                   AtenTensorHandle values,
                                                   AtenTensorHandle read_slots,
                                                   AtenTensorHandle slot_pos,
                                                   AtenTensorHandle positions, double scale,
                                                   AtenTensorHandle* ret) {
  using torch::aot_inductor::tensor_handle_to_tensor_pointer;
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *ret = torch::aot_inductor::new_tensor_handle(paged_decode_attention(
        *tensor_handle_to_tensor_pointer(q), *tensor_handle_to_tensor_pointer(keys),
        *tensor_handle_to_tensor_pointer(values), *tensor_handle_to_tensor_pointer(read_slots),
        *tensor_handle_to_tensor_pointer(slot_pos), *tensor_handle_to_tensor_pointer(positions),
        scale));
  });
}

ARCHOPT_SHIM aoti_torch_cpu_static_decode_attention(AtenTensorHandle q, AtenTensorHandle keys,
                                                    AtenTensorHandle values,
                                                    AtenTensorHandle slot_pos,
                                                    AtenTensorHandle positions, double scale,
                                                    AtenTensorHandle* ret) {
  using torch::aot_inductor::tensor_handle_to_tensor_pointer;
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *ret = torch::aot_inductor::new_tensor_handle(static_decode_attention(
        *tensor_handle_to_tensor_pointer(q), *tensor_handle_to_tensor_pointer(keys),
        *tensor_handle_to_tensor_pointer(values), *tensor_handle_to_tensor_pointer(slot_pos),
        *tensor_handle_to_tensor_pointer(positions), scale));
  });
}

TORCH_LIBRARY(archopt, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor keys, Tensor values, Tensor read_slots, "
      "Tensor slot_pos, Tensor positions, float scale) -> Tensor");
  m.def(
      "static_decode_attention(Tensor q, Tensor keys, Tensor values, Tensor slot_pos, "
      "Tensor positions, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(archopt, CPU, m) {
  m.impl("paged_decode_attention", paged_decode_attention);
  m.impl("static_decode_attention", static_decode_attention);
}
