// Element functors of the reductions: value() maps one element (a, b, c, d from lists A..D; N_IN of them are
// read) to K fp32 terms that are summed; finish() turns a row/column sum over n elements into the reported
// statistic. Ctx holds the per-tile constants value() may use.
// Compiled for host and device; the build disables FMA contraction so both round identically.
#pragma once

#include "fo_common.h"

namespace fo {

enum Direction : int { DIR_SGD = 0, DIR_ADAM = 1 };

struct Ctx {
  float eps;
  float k0, k1, k2, k3;  // direction constants (ProjOp)
  float bc2_sqrt;        // Adam: sqrt(1 - beta2^step) of this step
  int dir, nesterov;
};

// (1) sum of squares: NovoGrad per-layer second moments, global grad norm, Adafactor's update RMS.
struct SumSqOp {
  static constexpr int K = 1;
  static constexpr int N_IN = 1;
  static constexpr bool HOOK = false;
  FO_HD FO_INLINE static void value(const Ctx&, float a, float, float, float, float* v) { v[0] = a * a; }
  FO_HD FO_INLINE static float finish(float s, int64_t) { return s; }
};

// (2) what a cosine similarity needs (SGDP / AdamP): [a.b, a.a, b.b].
struct DotOp {
  static constexpr int K = 3;
  static constexpr int N_IN = 2;
  static constexpr bool HOOK = false;
  FO_HD FO_INLINE static void value(const Ctx&, float a, float b, float, float, float* v) {
    v[0] = a * b;
    v[1] = a * a;
    v[2] = b * b;
  }
  FO_HD FO_INLINE static float finish(float s, int64_t) { return s; }
};

// (3) Adafactor: means of g*g + eps (the reference computes `grad ** 2 + eps` in fp32, then `.mean`).
struct SqEpsMeanOp {
  static constexpr int K = 1;
  static constexpr int N_IN = 1;
  static constexpr bool HOOK = false;
  FO_HD FO_INLINE static void value(const Ctx& x, float a, float, float, float, float* v) { v[0] = a * a + x.eps; }
  // torch's mean divides the sum by n (a 0-length dim gives nan, as here).
  FO_HD FO_INLINE static float finish(float s, int64_t n) { return s / float(n); }
};

// (4) SGDP / AdamP projection statistics: a = grad, b = param, c, d = the states (momentum buffer; exp_avg and
// exp_avg_sq). The step direction is recomputed as the apply kernel will (nothing is stored), the same fp32
// operations in the same order as the Triton kernel (projection.py: _sgdp_direction / _adamp_direction):
//   SGD:  buf = c*momentum + (1-dampening)*g;       d = nesterov ? g + momentum*buf : buf
//   Adam: m = c + (1-b1)*(g-c); v = d*b2 + ((1-b2)*g)*g; d = (nesterov ? b1*m + (1-b1)*g : m) / (sqrt(v)/bc2 + eps)
// Terms: [p.g, g.g, p.p, p.d]. HOOK: the entry's last block then takes the projection decision (fo_engine.h).
struct ProjOp {
  static constexpr int K = 4;
  static constexpr int N_IN = 4;
  static constexpr bool HOOK = true;
  FO_HD FO_INLINE static float direction(const Ctx& x, float g, float c, float d) {
    if (x.dir == DIR_SGD) {  // k0 = momentum, k1 = 1 - dampening
      const float buf = c * x.k0 + x.k1 * g;
      return x.nesterov ? g + x.k0 * buf : buf;
    }
    // Adam: k0 = 1 - beta1, k1 = beta2, k2 = 1 - beta2, k3 = beta1
    const float m = c + x.k0 * (g - c);
    const float v = d * x.k1 + x.k2 * g * g;
    const float num = x.nesterov ? x.k3 * m + x.k0 * g : m;
    return num / (sqrtf(v) / x.bc2_sqrt + x.eps);
  }
  FO_HD FO_INLINE static void value(const Ctx& x, float g, float p, float c, float d, float* v) {
    v[0] = p * g;
    v[1] = g * g;
    v[2] = p * p;
    v[3] = p * direction(x, g, c, d);
  }
  FO_HD FO_INLINE static float finish(float s, int64_t) { return s; }
};

// Reduction kinds (codes shared with Python): the element op plus which statistics the kernel can produce.
enum Kind : int { KIND_SUMSQ = 0, KIND_DOT = 1, KIND_DOT_ROWS = 2, KIND_FACTORED = 3, KIND_PROJ = 4, N_KINDS = 5 };

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
using SpecProj = Spec<ProjOp, true, false>;

inline int kind_k(int kind) {
  return kind == KIND_PROJ ? 4 : (kind == KIND_DOT || kind == KIND_DOT_ROWS) ? 3 : 1;
}
inline int kind_inputs(int kind) {
  return kind == KIND_PROJ ? 4 : (kind == KIND_DOT || kind == KIND_DOT_ROWS) ? 2 : 1;
}

}  // namespace fo
