// Element functors of the reductions: value() maps one element (a from list A, b from list B) to K fp32 terms
// that are summed; finish() turns a row/column sum over n elements into the reported statistic.
// Compiled for host and device; the build disables FMA contraction so both round identically.
#pragma once

#include "fo_common.h"

namespace fo {

// (1) sum of squares: NovoGrad per-layer second moments, global grad norm, Adafactor's update RMS.
struct SumSqOp {
  static constexpr int K = 1;
  static constexpr bool TWO_INPUTS = false;
  FO_HD FO_INLINE static void value(float a, float, float, float* v) { v[0] = a * a; }
  FO_HD FO_INLINE static float finish(float s, int64_t) { return s; }
};

// (2) what a cosine similarity needs (SGDP / AdamP): [a.b, a.a, b.b].
struct DotOp {
  static constexpr int K = 3;
  static constexpr bool TWO_INPUTS = true;
  FO_HD FO_INLINE static void value(float a, float b, float, float* v) {
    v[0] = a * b;
    v[1] = a * a;
    v[2] = b * b;
  }
  FO_HD FO_INLINE static float finish(float s, int64_t) { return s; }
};

// (3) Adafactor: means of g*g + eps (the reference computes `grad ** 2 + eps` in fp32, then `.mean`).
struct SqEpsMeanOp {
  static constexpr int K = 1;
  static constexpr bool TWO_INPUTS = false;
  FO_HD FO_INLINE static void value(float a, float, float eps, float* v) { v[0] = a * a + eps; }
  // torch's mean divides the sum by n (a 0-length dim gives nan, as here).
  FO_HD FO_INLINE static float finish(float s, int64_t n) { return s / float(n); }
};

// Reduction kinds (codes shared with Python): the element op plus which statistics the kernel can produce.
enum Kind : int { KIND_SUMSQ = 0, KIND_DOT = 1, KIND_DOT_ROWS = 2, KIND_FACTORED = 3, N_KINDS = 4 };

template <class OpT, bool ROWS_, bool COLS_>
struct Spec {
  using Op = OpT;
  static constexpr int K = OpT::K;
  static constexpr bool ROWS = ROWS_;  // per-row sums (a row: C consecutive elements)
  static constexpr bool COLS = COLS_;  // per-column sums (a column: R elements, stride C)
};

using SpecSumSq = Spec<SumSqOp, false, false>;
using SpecDot = Spec<DotOp, false, false>;
using SpecDotRows = Spec<DotOp, true, false>;
using SpecFactored = Spec<SqEpsMeanOp, true, true>;

inline int kind_k(int kind) { return (kind == KIND_DOT || kind == KIND_DOT_ROWS) ? 3 : 1; }

}  // namespace fo
