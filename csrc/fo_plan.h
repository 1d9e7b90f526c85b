// Host-side planning: tensor descriptions -> entry records + tile geometry + buffer sizes. Shared by both
// modules so the host build tests exactly the plans the device runs. A kind's plan rule (the last column of
// FO_KINDS) turns one tensor into entries; the Builder does the tiling and the buffer layout.
#pragma once

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "fo_kinds.h"

namespace fo {

// One input tensor (list A; B, C, D and a per-tensor scalar where the kind reads them), contiguous, viewed as
// [B, R, C, S]: row statistics reduce over C (-> [B, R, S]), column statistics over R (-> [B, C, S]).
struct Desc {
  int64_t pa = 0, pb = 0, pc = 0, pd = 0, pscalar = 0;
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

struct Builder {
  Plan p;
  int n_in = 1;                   // lists the kind's op reads
  bool rows = false, cols = false;  // statistics its kernel can produce (Spec::ROWS / COLS)
  size_t tensor = 0;              // the tensor being planned, for error messages
  std::vector<int64_t> recs, starts{0};
  int64_t band_counters = 0;      // relative to the first band counter (after the entry + global counters)

  std::invalid_argument bad(const std::string& what) const {
    return std::invalid_argument("fused_optim csrc: tensor " + std::to_string(tensor) + ": " + what);
  }
  // Reserves n statistics; returns the first one's index.
  int64_t reserve_stats(int64_t n) {
    const int64_t at = p.n_stats;
    p.n_stats += n;
    return at;
  }
  void require_matrix(const Desc& d, bool batched_strides) const {
    if (d.B * d.R * d.C * d.S != d.numel) throw bad("B*R*C*S != numel");
    if (!batched_strides && d.S != 1) throw bad("S must be 1");
  }
  // The tensor's storage as [ceil(n / 1024), 1024] with a tail mask: every load of a warp is contiguous.
  void add_flat(const Desc& d) {
    const int64_t C = int64_t(NT) * FLAT_V;
    add(d, 0, 1, ceil_div(d.numel, C), C, LOG2_NT, FLAT_V, FLAT_IT, -1, -1);
  }
  // B matrices [R, C] over the tensor's storage; flags: which statistics, written from row_out / col_out.
  void add_matrix(const Desc& d, int flags, int64_t B, int64_t R, int64_t C, int64_t row_out, int64_t col_out) {
    if (((flags & F_ROWS) && !rows) || ((flags & F_COLS) && !cols))
      throw std::logic_error("fused_optim csrc: a plan rule asks for statistics its kind's kernel does not compute");
    int log2tc = 0;
    while ((int64_t(1) << log2tc) < C && log2tc < LOG2_NT) ++log2tc;
    const int vmax = (flags & F_COLS) ? 1 : V_MAX;  // a thread holds one column sum
    int V = 1;  // columns per lane, a power of two
    while (V < vmax && int64_t(V) * NT < C) V <<= 1;
    int64_t IT = std::max<int64_t>(1, TILE_ELEMS / (int64_t(NT) * V));
    if (flags & F_COLS) IT = std::max(IT, ceil_div(ceil_div(R, NT >> log2tc), NRT_MAX));
    add(d, flags, B, R, C, log2tc, V, IT, row_out, col_out);
  }

  Plan finish() {
    p.n_entries = int64_t(starts.size()) - 1;
    p.n_counters = p.n_entries + 1 + band_counters;
    for (int64_t e = 0; e < p.n_entries; ++e)
      for (int f : {M_CNT_ROW, M_CNT_COL})
        if (recs[e * META_W + f] >= 0) recs[e * META_W + f] += p.n_entries + 1;
    p.n_items = starts.back();
    if (p.n_items > 0x7fffffffLL) throw std::invalid_argument("fused_optim csrc: too many tiles for one launch");
    p.meta = std::move(starts);
    p.meta.insert(p.meta.end(), recs.begin(), recs.end());
    return std::move(p);
  }

 private:
  void add(const Desc& d, int flags, int64_t B, int64_t R, int64_t C, int log2tc, int V, int64_t IT, int64_t row_out,
           int64_t col_out) {
    const int64_t TW = NT >> log2tc, TC = int64_t(1) << log2tc;
    const int64_t nrt = std::max<int64_t>(1, ceil_div(R, TW * IT));
    const int64_t nct = std::max<int64_t>(1, ceil_div(C, TC * V));
    int64_t rec[META_W] = {};
    rec[M_PA] = d.pa;
    rec[M_PB] = n_in >= 2 ? d.pb : 0;
    rec[M_PC] = n_in >= 4 ? d.pc : 0;
    rec[M_PD] = n_in >= 4 ? d.pd : 0;
    rec[M_PSCALAR] = n_in >= 4 ? d.pscalar : 0;
    rec[M_DTYPES] = d.da | (n_in >= 2 ? d.db << 8 : 0) | (n_in >= 4 ? d.dc << 16 : 0);
    rec[M_FLAGS] = flags;
    rec[M_LOG2TC] = log2tc;
    int log2v = 0;
    while ((1 << log2v) < V) ++log2v;
    rec[M_LOG2V] = log2v;
    // no row / column partials (-1) unless split below
    MetaInts r{d.numel, B, R, C, IT, nrt, nct, row_out, col_out, -1, -1, -1, -1};
    if ((flags & F_ROWS) && nct > 1) split(r.ws_row, r.cnt_row, B * R, nct, B * nrt);  // over column tiles
    if ((flags & F_COLS) && nrt > 1) split(r.ws_col, r.cnt_col, B * C, nrt, B * nct);  // over row tiles
#define FO_META_STORE(member, word) rec[M_##word] = r.member;
    FO_META_INTS(FO_META_STORE)
#undef FO_META_STORE
    recs.insert(recs.end(), rec, rec + META_W);
    starts.push_back(starts.back() + std::max<int64_t>(B, 1) * nrt * nct);
  }
  // Statistics of `lines` rows (columns) split over `parts` tiles each: their partials and one counter per band.
  void split(int64_t& ws, int64_t& cnt, int64_t lines, int64_t parts, int64_t bands) {
    ws = p.ws_extra;
    p.ws_extra += lines * parts * p.K;
    cnt = band_counters;
    band_counters += bands;
  }
};

// ---- plan rules: one tensor -> entries; returns where its row / column statistics start (-1: none) ----
struct Outs {
  int64_t row = -1, col = -1;
};

// Totals only: one flat entry.
inline Outs rule_flat(Builder& b, const Desc& d) {
  b.add_flat(d);
  return {};
}

// A statistic per row of ONE non-empty [R, C] matrix per tensor: an entry is the whole tensor, so an entry hook
// can decide over its rows.
inline Outs rule_rows(Builder& b, const Desc& d) {
  if (d.B != 1 || d.numel == 0) throw b.bad("this kind takes non-empty [R, C] views");
  b.require_matrix(d, false);
  const int64_t row = b.reserve_stats(d.R);
  b.add_matrix(d, F_ROWS, 1, d.R, d.C, row, -1);
  return {row, -1};
}

// Statistics per row ([B, R, S]) and per column ([B, C, S]) of [B, R, C, S] (Adafactor's factored moments).
inline Outs rule_factored(Builder& b, const Desc& d) {
  b.require_matrix(d, true);
  const int64_t row = b.reserve_stats(d.B * d.R * d.S), col = b.reserve_stats(d.B * d.C * d.S);
  if (d.S == 1) {
    b.add_matrix(d, F_ROWS | F_COLS, d.B, d.R, d.C, row, col);
  } else {
    // Reductions over strided dims: both are column sums, of [B*R] matrices [C, S] (-> rows [B, R, S]) and of
    // [B] matrices [R, C*S] (-> columns [B, C, S]). Two entries over the same storage, still one launch.
    b.add_matrix(d, F_COLS, d.B * d.R, d.C, d.S, -1, row);
    b.add_matrix(d, F_COLS, d.B, d.R, d.C * d.S, -1, col);
  }
  return {row, col};
}

using Rule = Outs (*)(Builder&, const Desc&);

inline Rule plan_rule(int kind) {
  switch (kind) {
#define FO_PLAN_RULE(NAME, OP, ROWS, COLS, RULE) \
  case KIND_##NAME:                              \
    return &RULE;
    FO_KINDS(FO_PLAN_RULE)
#undef FO_PLAN_RULE
  }
  return nullptr;
}

inline std::invalid_argument unknown_kind(int kind) {
  return std::invalid_argument("fused_optim csrc: unknown kind " + std::to_string(kind));
}

inline Plan make_plan(int kind, const std::vector<Desc>& ds) {
  Builder b;
  if (!dispatch_kind(kind, [&](auto sp) {
        using Sp = decltype(sp);
        b.p.K = Sp::K;
        b.n_in = Sp::Op::N_IN;
        b.rows = Sp::ROWS;
        b.cols = Sp::COLS;
      }))
    throw unknown_kind(kind);
  const Rule rule = plan_rule(kind);
  const int n_in = b.n_in;
  for (size_t i = 0; i < ds.size(); ++i) {
    const Desc& d = ds[i];
    b.tensor = i;
    auto bad_code = [](int c) { return c < F32 || c > F16; };
    if (bad_code(d.da) || (n_in >= 2 && bad_code(d.db)) || (n_in >= 4 && bad_code(d.dc)))
      throw b.bad("unsupported dtype code");
    if (d.numel < 0 || d.B < 0 || d.R < 0 || d.C < 0 || d.S < 0) throw b.bad("negative size");
    if (d.numel > 0 && (d.pa == 0 || (n_in >= 2 && d.pb == 0) || (n_in >= 4 && (d.pc == 0 || d.pd == 0))))
      throw b.bad("null address");
    const Outs o = rule(b, d);
    b.p.row_out.push_back(o.row);
    b.p.col_out.push_back(o.col);
  }
  return b.finish();
}

}  // namespace fo
