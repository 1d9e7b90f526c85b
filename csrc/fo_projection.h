// SGDP / AdamP's projection (KIND_PROJ): per-row statistics [p.g, g.g, p.p, p.d] with d this step's direction,
// then, in the entry hook, timm's projection decision for the tensor. The Triton twins are
// fused_optim/optimizers/projection.py's _sgdp_direction / _adamp_direction and _finish_stats.
#pragma once

#include "fo_functors.h"

namespace fo {

// Lists: a = grad, b = param, c, d = the states (momentum buffer; exp_avg and exp_avg_sq), before this step; the
// per-tensor scalar (Adam) is the step count before this step. The direction is recomputed as the apply kernel
// will (nothing is stored), the same fp32 operations in the same order as the Triton kernel:
//   SGD:  buf = c*momentum + (1-dampening)*g;       d = nesterov ? g + momentum*buf : buf
//   Adam: m = c + (1-b1)*(g-c); v = d*b2 + ((1-b2)*g)*g; d = (nesterov ? b1*m + (1-b1)*g : m) / (sqrt(v)/bc2 + eps)
struct ProjOp : OpBase {
  static constexpr int K = 4;
  static constexpr int N_IN = 4;
  static constexpr int SCRATCH = 5;  // the hook's block reductions: max |cos| and the four sums
  // Args::hyper slots (fused_optim/csrc.py: projection_args). SGD: k0 = momentum, k1 = 1 - dampening;
  // Adam: k0 = 1 - beta1, k1 = beta2, k2 = 1 - beta2, k3 = beta1. hook_rows: [a, c] per row; hook_entries: mode.
  enum Hyper : int { H_ADAM, H_NESTEROV, H_K0, H_K1, H_K2, H_K3, H_BETA2, H_DELTA };
  static_assert(H_DELTA < N_HYPER, "ProjOp's parameters exceed Args::hyper");

  struct Ctx {
    float eps;
    float k0, k1, k2, k3;  // rounded like the Triton kernel's .to(tl.float32)
    float bc2_sqrt;        // Adam: sqrt(1 - beta2^step) of this step
    bool adam, nesterov;
  };
  FO_HD FO_INLINE static Ctx ctx(const Args& a, const Tile& t) {
    const double* h = a.hyper;
    Ctx x{float(a.eps), float(h[H_K0]), float(h[H_K1]), float(h[H_K2]), float(h[H_K3]), 1.f, h[H_ADAM] != 0.0,
          h[H_NESTEROV] != 0.0};
    if (x.adam && t.pscalar) {  // Triton's _adam_scalars, in fp64 like there
      const double step = double(load_ro<float>(t.pscalar, 0)) + 1.0;  // the step this update makes
      x.bc2_sqrt = float(sqrt(1.0 - exp2(step * log2(h[H_BETA2]))));
    }
    return x;
  }
  FO_HD FO_INLINE static float direction(const Ctx& x, float g, float c, float d) {
    if (!x.adam) {
      const float buf = c * x.k0 + x.k1 * g;
      return x.nesterov ? g + x.k0 * buf : buf;
    }
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

  // timm's decision for one tensor (fp64, like the Triton kernel): channel view when every row's |cos(p, g)| <
  // delta / sqrt(row length), else layer view when the whole tensor's |cos| < delta / sqrt(numel), else none.
  // Writes per row a = <p,d> / (|p|+eps)^2 and c = <p,g> / (|p|+eps)^2 (the row's in the channel view, the
  // tensor's in the layer view, 0 for none) and the entry's mode (0 none, 1 channel, 2 layer): what the apply
  // kernel needs to remove the radial parts of d (and, with caution, of g).
  template <class Ex>
  FO_HD FO_INLINE static void finish_entry(Ex& ex, double (*h)[NT], const Args& a, const Tile& tl) {
    const double eps = a.eps;
    ex.each([&](int tid, auto&) {
      double mx = 0.0, s[4] = {0.0, 0.0, 0.0, 0.0};  // max |cos| over rows; sums of the four statistics
      for (int64_t r = tid; r < tl.R; r += NT) {
        const float* st = a.out_stats + (tl.row_out + r) * K;
        double v[4];
        for (int k = 0; k < 4; ++k) {
          v[k] = double(load_l2(st + k));
          s[k] += v[k];
        }
        mx = fmax(mx, fabs(v[0]) / (fmax(sqrt(v[1]), eps) * fmax(sqrt(v[2]), eps)));
      }
      h[0][tid] = mx;
      for (int k = 0; k < 4; ++k) h[k + 1][tid] = s[k];
    });
    ex.sync();
    for (int off = NT / 2; off > 0; off >>= 1) {
      ex.each([&](int tid, auto&) {
        if (tid >= off) return;
        h[0][tid] = fmax(h[0][tid], h[0][tid + off]);
        for (int k = 1; k < 5; ++k) h[k][tid] += h[k][tid + off];
      });
      ex.sync();
    }
    ex.each([&](int tid, auto&) {
      const double spg = h[1][0], sgg = h[2][0], spp = h[3][0], spd = h[4][0];
      const double layer_cos = fabs(spg) / (fmax(sqrt(sgg), eps) * fmax(sqrt(spp), eps));
      const bool channel = h[0][0] < a.hyper[H_DELTA] / sqrt(double(tl.C));
      const bool layer = !channel && layer_cos < a.hyper[H_DELTA] / sqrt(double(tl.numel > 1 ? tl.numel : 1));
      const double ln = sqrt(spp) + eps;  // timm's unit weight is p / (|p| + eps)
      for (int64_t r = tid; r < tl.R; r += NT) {
        const float* st = a.out_stats + (tl.row_out + r) * K;
        const double rn = sqrt(double(load_l2(st + 2))) + eps;
        const double av = channel ? double(load_l2(st + 3)) / (rn * rn) : layer ? spd / (ln * ln) : 0.0;
        const double cv = channel ? double(load_l2(st + 0)) / (rn * rn) : layer ? spg / (ln * ln) : 0.0;
        a.hook_rows[(tl.row_out + r) * 2 + 0] = float(av);
        a.hook_rows[(tl.row_out + r) * 2 + 1] = float(cv);
      }
      if (tid == 0) a.hook_entries[tl.e] = channel ? 1.f : layer ? 2.f : 0.f;
    });
    ex.sync();
  }

  static const char* check(const Args& a) {
    return a.hook_rows && a.hook_entries ? nullptr : "the projection needs its coef_rows and mode_t outputs";
  }
};

}  // namespace fo
