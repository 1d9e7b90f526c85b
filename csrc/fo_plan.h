// Host-side planning: tensor descriptions -> entry records + tile geometry + buffer sizes. Shared by both
// modules so the host build tests exactly the plans the device runs.
#pragma once

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "fo_engine.h"

namespace fo {

// One input tensor (list A; B for the dot kinds; B, C, D and a step count for the projection), contiguous,
// viewed as [B, R, C, S]: row statistics reduce over C (-> [B, R, S]), column statistics over R (-> [B, C, S]).
struct Desc {
  int64_t pa = 0, pb = 0, pc = 0, pd = 0, pstep = 0;
  int da = F32, db = F32, dc = F32;
  int64_t numel = 0, B = 1, R = 1, C = 1, S = 1;
};

struct Plan {
  std::vector<int64_t> meta;   // item_start[E + 1] + E records
  int64_t n_entries = 0, n_items = 0, ws_extra = 0, n_stats = 0, n_counters = 0;
  int K = 1;
  std::vector<int64_t> row_out, col_out;  // per tensor: first statistic of its rows / columns (-1: none)
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline Plan make_plan(int kind, const std::vector<Desc>& ds) {
  if (kind < 0 || kind >= N_KINDS) throw std::invalid_argument("fused_optim csrc: unknown kind " + std::to_string(kind));
  const bool flat = kind == KIND_SUMSQ || kind == KIND_DOT;
  const int n_in = kind_inputs(kind);
  Plan p;
  p.K = kind_k(kind);
  std::vector<int64_t> recs, starts{0};
  int64_t band_counters = 0;  // relative to the first band counter (after the entry + global counters)

  auto add_entry = [&](const Desc& d, int flags, int64_t B, int64_t R, int64_t C, int64_t row_out, int64_t col_out) {
    int64_t rec[META_W] = {};
    int log2tc, V;  // V: columns per lane, a power of two
    int64_t IT;
    if (flat) {  // [ceil(n / 1024), 1024] with a tail mask: every load of a warp is contiguous
      log2tc = LOG2_NT;
      V = FLAT_V;
      C = int64_t(NT) * FLAT_V;
      R = ceil_div(d.numel, C);
      B = 1;
      IT = FLAT_IT;
    } else {
      log2tc = 0;
      while ((int64_t(1) << log2tc) < C && log2tc < LOG2_NT) ++log2tc;
      const int vmax = (flags & F_COLS) ? 1 : V_MAX;  // a thread holds one column sum
      V = 1;
      while (V < vmax && int64_t(V) * NT < C) V <<= 1;
      const int64_t TW = NT >> log2tc;
      IT = std::max<int64_t>(1, TILE_ELEMS / (int64_t(NT) * V));
      if (flags & F_COLS) IT = std::max(IT, ceil_div(ceil_div(R, TW), NRT_MAX));
    }
    const int64_t TW = NT >> log2tc, TC = int64_t(1) << log2tc;
    const int64_t nrt = std::max<int64_t>(1, ceil_div(R, TW * IT));
    const int64_t nct = std::max<int64_t>(1, ceil_div(C, TC * V));
    rec[M_PA] = d.pa;
    rec[M_PB] = n_in >= 2 ? d.pb : 0;
    rec[M_PC] = n_in >= 4 ? d.pc : 0;
    rec[M_PD] = n_in >= 4 ? d.pd : 0;
    rec[M_PSTEP] = n_in >= 4 ? d.pstep : 0;
    rec[M_DTYPES] = d.da | (n_in >= 2 ? d.db << 8 : 0) | (n_in >= 4 ? d.dc << 16 : 0);
    rec[M_FLAGS] = flags;
    rec[M_NUMEL] = d.numel;
    rec[M_B] = B;
    rec[M_R] = R;
    rec[M_C] = C;
    rec[M_LOG2TC] = log2tc;
    int log2v = 0;
    while ((1 << log2v) < V) ++log2v;
    rec[M_LOG2V] = log2v;
    rec[M_IT] = IT;
    rec[M_NRT] = nrt;
    rec[M_NCT] = nct;
    rec[M_ROW_OUT] = row_out;
    rec[M_COL_OUT] = col_out;
    rec[M_WS_ROW] = rec[M_WS_COL] = -1;
    rec[M_CNT_ROW] = rec[M_CNT_COL] = -1;
    if ((flags & F_ROWS) && nct > 1) {  // rows split over column tiles: partials + one counter per row band
      rec[M_WS_ROW] = p.ws_extra;
      p.ws_extra += B * R * nct * p.K;
      rec[M_CNT_ROW] = band_counters;
      band_counters += B * nrt;
    }
    if ((flags & F_COLS) && nrt > 1) {  // columns split over row tiles: partials + one counter per column band
      rec[M_WS_COL] = p.ws_extra;
      p.ws_extra += B * C * nrt * p.K;
      rec[M_CNT_COL] = band_counters;
      band_counters += B * nct;
    }
    recs.insert(recs.end(), rec, rec + META_W);
    starts.push_back(starts.back() + std::max<int64_t>(B, 1) * nrt * nct);
  };

  for (size_t i = 0; i < ds.size(); ++i) {
    const Desc& d = ds[i];
    auto bad = [&](const std::string& what) {
      return std::invalid_argument("fused_optim csrc: tensor " + std::to_string(i) + ": " + what);
    };
    auto bad_code = [](int c) { return c < F32 || c > F16; };
    if (bad_code(d.da) || (n_in >= 2 && bad_code(d.db)) || (n_in >= 4 && bad_code(d.dc)))
      throw bad("unsupported dtype code");
    if (d.numel < 0 || d.B < 0 || d.R < 0 || d.C < 0 || d.S < 0) throw bad("negative size");
    if (d.numel > 0 && (d.pa == 0 || (n_in >= 2 && d.pb == 0) || (n_in >= 4 && (d.pc == 0 || d.pd == 0))))
      throw bad("null address");
    if (kind == KIND_PROJ && (d.B != 1 || d.numel == 0)) throw bad("the projection takes non-empty [R, C] views");
    if (!flat && d.B * d.R * d.C * d.S != d.numel) throw bad("B*R*C*S != numel");
    if (kind != KIND_FACTORED && !flat && d.S != 1) throw bad("S must be 1");
    int64_t row_out = -1, col_out = -1;
    if (kind == KIND_DOT_ROWS || kind == KIND_PROJ) {
      row_out = p.n_stats;
      p.n_stats += d.B * d.R;
      add_entry(d, F_ROWS, d.B, d.R, d.C, row_out, -1);
    } else if (kind == KIND_FACTORED) {
      row_out = p.n_stats;
      col_out = row_out + d.B * d.R * d.S;
      p.n_stats = col_out + d.B * d.C * d.S;
      if (d.S == 1) {
        add_entry(d, F_ROWS | F_COLS, d.B, d.R, d.C, row_out, col_out);
      } else {
        // Reductions over strided dims: both are column sums, of [B*R] matrices [C, S] (-> rows [B, R, S]) and of
        // [B] matrices [R, C*S] (-> columns [B, C, S]). Two entries over the same storage, still one launch.
        add_entry(d, F_COLS, d.B * d.R, d.C, d.S, -1, row_out);
        add_entry(d, F_COLS, d.B, d.R, d.C * d.S, -1, col_out);
      }
    } else {
      add_entry(d, 0, 1, 1, 1, -1, -1);
    }
    p.row_out.push_back(row_out);
    p.col_out.push_back(col_out);
  }
  p.n_entries = int64_t(starts.size()) - 1;
  p.n_counters = p.n_entries + 1 + band_counters;
  for (int64_t e = 0; e < p.n_entries; ++e)
    for (int f : {M_CNT_ROW, M_CNT_COL})
      if (recs[e * META_W + f] >= 0) recs[e * META_W + f] += p.n_entries + 1;
  p.n_items = starts.back();
  if (p.n_items > 0x7fffffffLL) throw std::invalid_argument("fused_optim csrc: too many tiles for one launch");
  p.meta = std::move(starts);
  p.meta.insert(p.meta.end(), recs.begin(), recs.end());
  return p;
}

}  // namespace fo
