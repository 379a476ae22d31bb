// Linear layers with int8 activations, llama.cpp's arithmetic for GGUF's blocks of 32: each row
// of x is quantized per block of 32 inputs (x ~ sx qx, qx in -127..127, sx = max|x| / 127), the
// block products are exact integer sums, and the scales are applied in fp32.
//
//   int4_q8_linear, Q4_0 / Q4_1 weights w = d q + m (q in 0..15):
//     y[r, n] = sum_g  d[n,g] sx[r,g] (sum_j q[n,g,j] qx[r,g,j])  +  m[n,g] sx[r,g] (sum_j qx[r,g,j])
//   int8_q8_linear, Q8_0 weights w = d q (q in -127..127):
//     y[r, n] = sum_g  d[n,g] sx[r,g] (sum_j q[n,g,j] qx[r,g,j])
//
// Each block's terms are added in fp32 with fused multiply-adds, block after block, so a row's
// result does not depend on the other rows of the batch. AVX512-VNNI's vpdpbusd multiplies 64
// unsigned weight bytes by 64 signed activation bytes per instruction; the packed layouts feed it
// 16 output rows x 4 inputs at a time:
//
//   int4: packed uint8 (N/16, G, 4, 64): in vector v of block g of tile t, byte 4 i + k holds
//         q[16 t + i, 32 g + 4 v + k] in its low nibble and q[16 t + i, 32 g + 16 + 4 v + k] in
//         its high one; scales fp16 (N/16, G, 2, 16): d, then m, of the tile's 16 rows.
//   int8: packed uint8 (N/16, G, 8, 64): byte 4 i + k of vector v holds q[16 t + i, 32 g + 4 v + k]
//         + 128 (unsigned, as vpdpbusd wants; the 128 sum(qx) it adds is taken off exactly);
//         scales fp16 (N/16, G, 16).
//
// A weight block is read once for up to 4 rows of x. The portable loop (no AVX512-VNNI) does
// the same arithmetic in the same order. archopt/ops/act8.py holds the references, the
// packing and the modules that call these.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>

#include <cmath>
#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define ARCHOPT_VNNI 1
#endif

namespace {
// How far ahead of the block being multiplied its tile's weights (and Q4 scales) are asked
// for. Measured on a 2-core Sapphire Rapids with weights out of cache: four rows 15-25%
// faster, one row 5-10% (the hardware prefetcher alone runs too close behind).
constexpr int64_t kAhead = 2048;

inline void fetch_ahead(const uint8_t* p) {
  __builtin_prefetch(p + kAhead, 0, 3);
}

constexpr int64_t kBlock = 32;

// One row's blocks quantized: qx (K) int8; per block (G): sx, sx * sum(qx) and sum(qx).
// The vector path gives the same bytes as the scalar one (one product, rounded to nearest even).
void quantize_row(const float* x, int64_t K, int8_t* qx, float* sx, float* sxs, int32_t* qsum) {
  for (int64_t g = 0; g < K / kBlock; g++) {
    const float* b = x + g * kBlock;
    int8_t* q = qx + g * kBlock;
#ifdef ARCHOPT_VNNI
    const __m512 lo = _mm512_loadu_ps(b), hi = _mm512_loadu_ps(b + 16);
    const __m512 zero = _mm512_setzero_ps();  // x - x is 0 for finite x, NaN for NaN and Inf
    const bool finite = _mm512_cmp_ps_mask(_mm512_sub_ps(lo, lo), zero, _CMP_EQ_OQ) == 0xFFFF &&
                        _mm512_cmp_ps_mask(_mm512_sub_ps(hi, hi), zero, _CMP_EQ_OQ) == 0xFFFF;
    const float amax = finite ? _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo),
                                                                   _mm512_abs_ps(hi)))
                              : 0.f;
#else
    float amax = 0.f;
    bool finite = true;
    for (int j = 0; j < kBlock; j++) {
      finite &= std::isfinite(b[j]);
      amax = std::max(amax, std::fabs(b[j]));
    }
#endif
    if (!finite) {  // NaN or Inf in: NaN out, never a finite guess
      std::memset(q, 0, kBlock);
      sx[g] = sxs[g] = std::nanf("");
      qsum[g] = 0;
      continue;
    }
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int sum = 0;
#ifdef ARCHOPT_VNNI
    const __m512 vinv = _mm512_set1_ps(inv);  // the default rounding mode: to nearest, even
    const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, vinv));
    const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, vinv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(qlo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtsepi32_epi8(qhi));
    sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
#else
    for (int j = 0; j < kBlock; j++) {
      const int v = static_cast<int>(std::nearbyint(b[j] * inv));  // to nearest, ties to even
      q[j] = static_cast<int8_t>(v);
      sum += v;
    }
#endif
    sx[g] = amax / 127.f;
    sxs[g] = sx[g] * static_cast<float>(sum);
    qsum[g] = sum;
  }
}

inline float half_to_float(uint16_t h) {
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

// The quantized rows of x, as the tile functions read them.
struct Rows {
  const int8_t* qx;
  const float* sx;
  const float* sxs;
  const int32_t* qsum;
  int64_t K, G;
};

// MB rows of x (from row r) against the 16 output rows of tile t: Q4 weights.
template <int MB>
void tile_q4(const uint8_t* packed, const uint16_t* scales, const Rows& x, int64_t r, float* y,
             int64_t t, int64_t N) {
  const int64_t G = x.G, K = x.K;
  const int8_t* qx = x.qx + r * K;
  const float* sx = x.sx + r * G;
  const float* sxs = x.sxs + r * G;
  const uint8_t* w = packed + t * G * 256;
  const uint16_t* s = scales + t * G * 32;
#ifdef ARCHOPT_VNNI
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 out[MB];
  for (int i = 0; i < MB; i++) out[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    __m512i acc[MB];
    for (int i = 0; i < MB; i++) acc[i] = _mm512_setzero_si512();
    for (int v = 0; v < 4; v++) {
      fetch_ahead(w + g * 256 + 64 * v);
      const __m512i p = _mm512_loadu_si512(w + g * 256 + 64 * v);
      const __m512i lo = _mm512_and_si512(p, low);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(p, 4), low);
      for (int i = 0; i < MB; i++) {
        const int8_t* xr = qx + i * K + g * kBlock + 4 * v;
        int32_t a, b;
        std::memcpy(&a, xr, 4);
        std::memcpy(&b, xr + 16, 4);
        acc[i] = _mm512_dpbusd_epi32(acc[i], lo, _mm512_set1_epi32(a));
        acc[i] = _mm512_dpbusd_epi32(acc[i], hi, _mm512_set1_epi32(b));
      }
    }
    __builtin_prefetch(s + (g + 8) * 32, 0, 3);
    const auto* sg = reinterpret_cast<const __m256i*>(s + g * 32);
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(sg));
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(sg + 1));
    for (int i = 0; i < MB; i++) {
      const __m512 dsx = _mm512_mul_ps(d, _mm512_set1_ps(sx[i * G + g]));
      out[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i]), dsx, out[i]);
      out[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(sxs[i * G + g]), out[i]);
    }
  }
  for (int i = 0; i < MB; i++) _mm512_storeu_ps(y + (r + i) * N + t * 16, out[i]);
#else
  for (int i = 0; i < MB; i++) {
    float out[16] = {0};
    for (int64_t g = 0; g < G; g++) {
      int32_t acc[16] = {0};
      for (int v = 0; v < 4; v++)
        for (int lane = 0; lane < 16; lane++)
          for (int k = 0; k < 4; k++) {
            const uint8_t p = w[g * 256 + 64 * v + 4 * lane + k];
            acc[lane] += (p & 15) * qx[i * K + g * kBlock + 4 * v + k];
            acc[lane] += (p >> 4) * qx[i * K + g * kBlock + 16 + 4 * v + k];
          }
      for (int lane = 0; lane < 16; lane++) {
        const float d = half_to_float(s[g * 32 + lane]), m = half_to_float(s[g * 32 + 16 + lane]);
        out[lane] = std::fma(static_cast<float>(acc[lane]), d * sx[i * G + g], out[lane]);
        out[lane] = std::fma(m, sxs[i * G + g], out[lane]);
      }
    }
    std::memcpy(y + (r + i) * N + t * 16, out, sizeof(out));
  }
#endif
}

// The same for Q8 weights stored as q + 128.
template <int MB>
void tile_q8(const uint8_t* packed, const uint16_t* scales, const Rows& x, int64_t r, float* y,
             int64_t t, int64_t N) {
  const int64_t G = x.G, K = x.K;
  const int8_t* qx = x.qx + r * K;
  const float* sx = x.sx + r * G;
  const int32_t* qsum = x.qsum + r * G;
  const uint8_t* w = packed + t * G * 512;
  const uint16_t* s = scales + t * G * 16;
#ifdef ARCHOPT_VNNI
  __m512 out[MB];
  for (int i = 0; i < MB; i++) out[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    __m512i acc[MB];
    for (int i = 0; i < MB; i++) acc[i] = _mm512_setzero_si512();
    for (int v = 0; v < 8; v++) {
      fetch_ahead(w + g * 512 + 64 * v);
      const __m512i p = _mm512_loadu_si512(w + g * 512 + 64 * v);
      for (int i = 0; i < MB; i++) {
        int32_t a;
        std::memcpy(&a, qx + i * K + g * kBlock + 4 * v, 4);
        acc[i] = _mm512_dpbusd_epi32(acc[i], p, _mm512_set1_epi32(a));
      }
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + g * 16)));
    for (int i = 0; i < MB; i++) {
      const __m512i dot = _mm512_sub_epi32(acc[i], _mm512_set1_epi32(128 * qsum[i * G + g]));
      const __m512 dsx = _mm512_mul_ps(d, _mm512_set1_ps(sx[i * G + g]));
      out[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), dsx, out[i]);
    }
  }
  for (int i = 0; i < MB; i++) _mm512_storeu_ps(y + (r + i) * N + t * 16, out[i]);
#else
  for (int i = 0; i < MB; i++) {
    float out[16] = {0};
    for (int64_t g = 0; g < G; g++) {
      int32_t acc[16] = {0};
      for (int v = 0; v < 8; v++)
        for (int lane = 0; lane < 16; lane++)
          for (int k = 0; k < 4; k++)
            acc[lane] += w[g * 512 + 64 * v + 4 * lane + k] * qx[i * K + g * kBlock + 4 * v + k];
      for (int lane = 0; lane < 16; lane++) {
        const float d = half_to_float(s[g * 16 + lane]);
        const int32_t dot = acc[lane] - 128 * qsum[i * G + g];
        out[lane] = std::fma(static_cast<float>(dot), d * sx[i * G + g], out[lane]);
      }
    }
    std::memcpy(y + (r + i) * N + t * 16, out, sizeof(out));
  }
#endif
}

// y (M, N) fp32: every row of x quantized here, then each tile of 16 output rows by T4 (four
// rows of x at a time), T2 (two) and T1 (the last one): a batch of 2 or 3 rows reads its
// tiles once or twice, not 2 or 3 times (tile functions of any width give a row the same
// sums, in the same order).
using Tile = void (*)(const uint8_t*, const uint16_t*, const Rows&, int64_t, float*, int64_t,
                      int64_t);
template <Tile T4, Tile T2, Tile T1>
torch::Tensor run(const char* name, const torch::Tensor& x, const torch::Tensor& packed,
                  const torch::Tensor& scales, int64_t N, int64_t vectors, int64_t per_block) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu() && scales.device().is_cpu(),
              name, " runs on the CPU");
  const int64_t K = x.size(-1), G = K / kBlock;
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 4 &&
                  packed.size(2) == vectors && packed.size(3) == 64,
              name, ": packed must be uint8 (N/16, K/32, ", vectors, ", 64), got ", packed.sizes());
  TORCH_CHECK(K % kBlock == 0 && N % 16 == 0 && packed.size(0) == N / 16 && packed.size(1) == G,
              name, ": x has ", K, " features and the weight is (", packed.size(0) * 16, ", ",
              packed.size(1) * kBlock, "), expected (", N, ", ", K, ")");
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && scales.numel() == N * G * per_block,
              name, ": scales must be fp16 with ", N * G * per_block, " values, got ",
              scales.scalar_type(), " ", scales.sizes());
  TORCH_CHECK(K > 0, name, ": x must have features, got shape ", x.sizes());
  // A decode step calls this ~120 times on a few rows: the common case (a float, contiguous x)
  // costs one allocation, the result. x is read in place and the scratch is this thread's
  // own buffer, kept between calls (up to 1 MiB: a long prompt's takes a tensor of its own);
  // reshaping, converting and allocating through the dispatcher took ~8 calls a linear.
  torch::Tensor converted;
  const float* xs;
  if (x.scalar_type() == torch::kFloat && x.is_contiguous()) {
    xs = x.data_ptr<float>();
  } else {
    converted = x.reshape({-1, K}).to(torch::kFloat).contiguous();
    xs = converted.data_ptr<float>();
  }
  const int64_t M = x.numel() / K;
  // Three rows take a four-row pass with a row of zeros (its result dropped): one read of each
  // tile of weights instead of two (a two-row and a one-row pass), 7% less for the model's
  // linears at 3 rows; every row's sums are the same in any pass (seven rows likewise).
  const int64_t Mp = M % 4 == 3 ? M + 1 : M;
  // Per row, 3 G words (sx, sxs, qsum), then every row's K bytes.
  const size_t need = static_cast<size_t>(Mp * (3 * G * 4 + K));
  constexpr size_t kKeep = 1 << 20;
  thread_local std::vector<uint8_t> kept;
  torch::Tensor big;
  uint8_t* scratch;
  if (need <= kKeep) {
    if (kept.size() < need) kept.resize(kKeep);
    scratch = kept.data();
  } else {
    big = torch::empty({static_cast<int64_t>(need)}, torch::kUInt8);
    scratch = big.data_ptr<uint8_t>();
  }
  float* sx = reinterpret_cast<float*>(scratch);
  float* sxs = sx + Mp * G;
  int32_t* qsum = reinterpret_cast<int32_t*>(sxs + Mp * G);
  int8_t* qx = reinterpret_cast<int8_t*>(qsum + Mp * G);
  for (int64_t r = 0; r < M; r++)
    quantize_row(xs + r * K, K, qx + r * K, sx + r * G, sxs + r * G, qsum + r * G);
  if (Mp > M) {  // the padding row: zero activations, zero scales
    std::memset(qx + M * K, 0, K);
    std::fill(sx + M * G, sx + Mp * G, 0.f);
    std::fill(sxs + M * G, sxs + Mp * G, 0.f);
    std::fill(qsum + M * G, qsum + Mp * G, 0);
  }
  const Rows q{qx, sx, sxs, qsum, K, G};
  auto shape = x.sizes().vec();
  shape.back() = N;
  // With a padding row, one more row of result, dropped (the first M rows are contiguous).
  auto y = Mp == M ? torch::empty(shape, torch::kFloat)
                   : torch::empty({Mp, N}, torch::kFloat).narrow(0, 0, M).view(shape);
  const auto pc = packed.contiguous();
  const auto sc = scales.contiguous();
  const uint8_t* w = pc.data_ptr<uint8_t>();
  const uint16_t* s = reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N / 16, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; t++) {
      int64_t r = 0;
      for (; r + 4 <= Mp; r += 4) T4(w, s, q, r, yp, t, N);
      if (r + 2 <= Mp) T2(w, s, q, r, yp, t, N), r += 2;
      if (r < Mp) T1(w, s, q, r, yp, t, N);
    }
  });
  return x.scalar_type() == torch::kFloat ? y : y.to(x.scalar_type());
}

torch::Tensor int4_q8_linear(const torch::Tensor& x, const torch::Tensor& packed,
                             const torch::Tensor& scales, int64_t out_features) {
  return run<tile_q4<4>, tile_q4<2>, tile_q4<1>>("int4_q8_linear", x, packed, scales, out_features, 4, 2);
}

torch::Tensor int8_q8_linear(const torch::Tensor& x, const torch::Tensor& packed,
                             const torch::Tensor& scales, int64_t out_features) {
  return run<tile_q8<4>, tile_q8<2>, tile_q8<1>>("int8_q8_linear", x, packed, scales, out_features, 8, 1);
}

}  // namespace (the library's symbols are global: only the C entry points below leave it)

// C entry points for AOTInductor (archopt.ops.cpu_kernels.C_SHIM_OPS): a compiled step calls
// these directly instead of boxing its arguments through the dispatcher (about 1 us a call
// saved, 120 calls a decode step). Errors come back as AOTI_TORCH_FAILURE, message kept.
#define ARCHOPT_SHIM extern "C" __attribute__((visibility("default"))) AOTITorchError

ARCHOPT_SHIM aoti_torch_cpu_int4_q8_linear(AtenTensorHandle x, AtenTensorHandle packed,
                                           AtenTensorHandle scales, int64_t out_features,
                                           AtenTensorHandle* ret) {
  using torch::aot_inductor::tensor_handle_to_tensor_pointer;
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *ret = torch::aot_inductor::new_tensor_handle(int4_q8_linear(
        *tensor_handle_to_tensor_pointer(x), *tensor_handle_to_tensor_pointer(packed),
        *tensor_handle_to_tensor_pointer(scales), out_features));
  });
}

ARCHOPT_SHIM aoti_torch_cpu_int8_q8_linear(AtenTensorHandle x, AtenTensorHandle packed,
                                           AtenTensorHandle scales, int64_t out_features,
                                           AtenTensorHandle* ret) {
  using torch::aot_inductor::tensor_handle_to_tensor_pointer;
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *ret = torch::aot_inductor::new_tensor_handle(int8_q8_linear(
        *tensor_handle_to_tensor_pointer(x), *tensor_handle_to_tensor_pointer(packed),
        *tensor_handle_to_tensor_pointer(scales), out_features));
  });
}

TORCH_LIBRARY_FRAGMENT(archopt, m) {
  m.def("int4_q8_linear(Tensor x, Tensor packed, Tensor scales, int out_features) -> Tensor");
  m.def("int8_q8_linear(Tensor x, Tensor packed, Tensor scales, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(archopt, CPU, m) {
  m.impl("int4_q8_linear", int4_q8_linear);
  m.impl("int8_q8_linear", int8_q8_linear);
}
