// Greedy decoding's choice: the index of each row's largest logit, as torch's argmax gives it
// (the first index on ties; a NaN counts as the largest, the first NaN wins). Its reference is
// ``logits.max(dim=-1).indices`` (archopt.sampling.greedy; tests/test_cpu_kernels.py compares
// them on ties, NaN and -inf rows). torch's reduction reads a vocabulary at ~6 GB/s; this one
// keeps a best value and index per lane and reads at the cache's speed, rows in parallel.
// Built on first use by archopt.ops.cpu_kernels.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>

namespace {

int64_t first_nan(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (std::isnan(x[i])) return i;
  return -1;
}

int64_t argmax_scalar(const float* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (x[i] > x[best]) best = i;
  return best;
}

int64_t argmax_row(const float* x, int64_t n) {
#if defined(__AVX512F__)
  if (n >= 16) {
    // Lane l holds the largest of x[l], x[l + 16], ... and the first index it was seen at.
    __m512 best = _mm512_loadu_ps(x);
    __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i at = idx;
    const __m512i step = _mm512_set1_epi32(16);
    __mmask16 nan = _mm512_cmp_ps_mask(best, best, _CMP_UNORD_Q);
    int64_t i = 16;
    for (; i + 16 <= n; i += 16) {
      const __m512 v = _mm512_loadu_ps(x + i);
      idx = _mm512_add_epi32(idx, step);
      const __mmask16 gt = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);  // strictly: first kept
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      best = _mm512_mask_mov_ps(best, gt, v);
      at = _mm512_mask_mov_epi32(at, gt, idx);
    }
    if (i < n) {  // the tail: lanes past the end are left out of the comparison
      const __mmask16 live = static_cast<__mmask16>((1u << (n - i)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(live, x + i);
      idx = _mm512_add_epi32(idx, step);
      const __mmask16 gt = _mm512_mask_cmp_ps_mask(live, v, best, _CMP_GT_OQ);
      nan |= _mm512_mask_cmp_ps_mask(live, v, v, _CMP_UNORD_Q);
      best = _mm512_mask_mov_ps(best, gt, v);
      at = _mm512_mask_mov_epi32(at, gt, idx);
    }
    if (nan) return first_nan(x, n);
    // Across lanes: the largest value, and the smallest index among the lanes that hold it.
    const float top = _mm512_reduce_max_ps(best);
    const __mmask16 tops = _mm512_cmp_ps_mask(best, _mm512_set1_ps(top), _CMP_EQ_OQ);
    const __m512i big = _mm512_set1_epi32(INT32_MAX);
    return _mm512_reduce_min_epi32(_mm512_mask_mov_epi32(big, tops, at));
  }
#endif
  const int64_t i = first_nan(x, n);
  return i >= 0 ? i : argmax_scalar(x, n);
}

// logits (B, V) float32, contiguous, V >= 1: (B,) int64.
at::Tensor greedy(const at::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu(), "greedy: logits must be on the CPU, got ",
              logits.device());
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2,
              "greedy: logits must be float32 (B, vocab), got ", logits.scalar_type(), " ",
              logits.sizes());
  TORCH_CHECK(logits.size(1) >= 1 && logits.size(1) < INT32_MAX,
              "greedy: the vocabulary must have 1 to 2^31 - 2 entries, got ", logits.size(1));
  const at::Tensor x = logits.contiguous();
  const int64_t B = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({B}, x.options().dtype(at::kLong));
  const float* xp = x.const_data_ptr<float>();
  int64_t* op = out.mutable_data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) op[b] = argmax_row(xp + b * V, V);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(archopt, m) { m.def("greedy(Tensor logits) -> Tensor"); }

TORCH_LIBRARY_IMPL(archopt, CPU, m) { m.impl("greedy", greedy); }
