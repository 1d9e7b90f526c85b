// Multi-tensor reduction engine, one source for host and device.
//
// Work: a list of "entries" (normally one per tensor), each a batch of B row-major matrices [R, C] over the
// tensor's contiguous storage (flat kinds use a virtual [ceil(n/1024), 1024] view with a tail mask). An entry is
// cut into tiles of TR rows x TC*V columns; one tile is one work item, one CUDA block of NT threads. The whole
// list is ONE launch of n_items blocks; the block finds its entry by binary search in item_start (no per-item
// table, so the metadata is O(entries) words).
//
// Inside a tile, thread (ty, tx) (tx in [0, TC), TC = a power of two >= C where C < NT) owns columns
// c0 + v*TC + tx and rows r0 + i*TW + ty. Every statistic is a fixed-order sum:
//   * total:  thread partials in element order, then a fixed tree over the NT threads -> ws_items[item];
//   * rows:   per row, the thread's V terms in order, then a fixed tree over the TC lanes (shared memory);
//   * cols:   per column, the thread's rows in order, then a fixed tree over the TW thread rows.
// A statistic spread over several tiles (rows when nct > 1, columns when nrt > 1, every total) is written as a
// partial and summed in tile order by the LAST block of its group (the one that draws the last ticket of an
// atomic counter, and resets it): a row band's, a column band's or the entry's. The last entry to finish sums
// the entry totals into the global one.
// Nothing depends on which block runs first, so results are deterministic, and host == device bit for bit
// (the host runs the blocks in order through the same code, see Exec in fo_common.h).
// A block takes its entry ticket only after its row / column band work, so the entry's last block sees every
// statistic of the entry final: there it calls the op's entry hook (Op::finish_entry, a no-op by default).
//
// The engine knows no kind: block_program<Sp> takes everything kind-specific from Sp (fo_kinds.h) and its element
// op Sp::Op (value, finish, ctx, finish_entry; see OpBase in fo_functors.h).
#pragma once

#include "fo_common.h"

namespace fo {

constexpr int NT = 256;         // threads per block
constexpr int LOG2_NT = 8;
constexpr int S_MAX = 8;        // tile rows per thread whose row sums are reduced together (shared memory bound)
constexpr int V_MAX = 8;        // columns per lane for wide rows (row-only kinds; column kinds use 1); power of 2
constexpr int LOADS_IN_FLIGHT = 8;  // per thread (per input)
constexpr int TILE_ELEMS = 8192;  // target elements per tile: amortizes the block's fixed reduction cost
constexpr int NRT_MAX = 64;     // column kinds: at most this many row tiles, bounding the partials to 64*C
constexpr int FLAT_V = 4, FLAT_IT = 8;  // flat kinds: tiles of 8 x 1024 elements
constexpr int N_HYPER = 8;      // an op's launch parameters (Args::hyper)

// Metadata: int64 words. item_start[E + 1], then E records of META_W words: addresses, dtypes, flags, the two
// log2 tile shapes, then the plain integers of FO_META_INTS (X(member, word)), one list for the record's words,
// the planner's encoding and the kernels' decoding.
#define FO_META_INTS(X)                                                                                          \
  X(numel, NUMEL) X(B, B) X(R, R) X(C, C) X(IT, IT) X(nrt, NRT) X(nct, NCT) X(row_out, ROW_OUT) X(col_out, COL_OUT) \
  X(ws_row, WS_ROW) X(ws_col, WS_COL) X(cnt_row, CNT_ROW) X(cnt_col, CNT_COL)

#define FO_META_WORD(member, word) M_##word,
enum Meta : int {
  M_PA, M_PB, M_PC, M_PD, M_PSCALAR, M_DTYPES, M_FLAGS, M_LOG2TC, M_LOG2V, FO_META_INTS(FO_META_WORD) META_W
};
#undef FO_META_WORD

// A record's plain integers by name (aggregate: initialized in FO_META_INTS order).
struct MetaInts {
#define FO_META_MEMBER(member, word) int64_t member;
  FO_META_INTS(FO_META_MEMBER)
#undef FO_META_MEMBER
};
enum Flags : int { F_ROWS = 1, F_COLS = 2 };

struct Args {
  const int64_t* meta;
  int64_t n_entries;
  int64_t n_items;
  float* ws_items;   // [n_items, K] tile totals
  float* ws_extra;   // row / column partials (offsets in the records)
  int* counters;     // [n_entries + 1 + band counters], zero before the first launch; launches leave them zero
  float* out_t;      // [n_entries, K] entry totals
  float* out_stats;  // [n_stats, K] row / column statistics (offsets in the records)
  float* out_g;      // [K] sum over all entries
  const float* scale_a;  // nullable: list A's elements are multiplied by 1 / *scale_a (AMP's loss scale) first
  double eps;            // the launch's eps (an op rounds it to fp32 where its math is fp32)
  double hyper[N_HYPER];  // the op's own launch parameters, in slots the op names
  float* hook_rows;      // outputs of the op's entry hook (nullable): per row, indexed like the row statistics,
  float* hook_entries;   // and per entry
};

struct Tile : MetaInts {
  const void* pa;
  const void* pb;
  const void* pc;
  const void* pd;
  const float* pscalar;  // nullable: a per-tensor fp32 scalar the op's ctx() may read
  int da, db, dc, log2tc, log2v;
  bool rows, cols;
  int64_t e, item0, n_it, b, rt, ct;
};

FO_HD FO_INLINE Tile make_tile(const Args& a, int64_t item) {
  const int64_t* starts = a.meta;
  int64_t lo = 0, hi = a.n_entries - 1;  // last entry whose first item <= item (every entry has >= 1 item)
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (starts[mid] <= item) lo = mid; else hi = mid - 1;
  }
  const int64_t* m = a.meta + (a.n_entries + 1) + lo * META_W;
  Tile t;
  t.e = lo;
  t.item0 = starts[lo];
  t.n_it = starts[lo + 1] - starts[lo];
  t.pa = reinterpret_cast<const void*>(static_cast<uintptr_t>(m[M_PA]));
  t.pb = reinterpret_cast<const void*>(static_cast<uintptr_t>(m[M_PB]));
  t.pc = reinterpret_cast<const void*>(static_cast<uintptr_t>(m[M_PC]));
  t.pd = reinterpret_cast<const void*>(static_cast<uintptr_t>(m[M_PD]));
  t.pscalar = reinterpret_cast<const float*>(static_cast<uintptr_t>(m[M_PSCALAR]));
  t.da = int(m[M_DTYPES] & 0xff);
  t.db = int((m[M_DTYPES] >> 8) & 0xff);
  t.dc = int((m[M_DTYPES] >> 16) & 0xff);
  t.rows = (m[M_FLAGS] & F_ROWS) != 0;
  t.cols = (m[M_FLAGS] & F_COLS) != 0;
  t.log2tc = int(m[M_LOG2TC]);
  t.log2v = int(m[M_LOG2V]);
#define FO_META_LOAD(member, word) t.member = m[M_##word];
  FO_META_INTS(FO_META_LOAD)
#undef FO_META_LOAD
  const int64_t local = item - t.item0;  // item order within an entry: (b, rt, ct), ct fastest
  t.ct = local % t.nct;
  t.rt = (local / t.nct) % t.nrt;
  t.b = local / (t.nct * t.nrt);
  return t;
}

template <int K>
struct Regs {
  float tot[K];
  float col[K];  // column kinds use V == 1: one column per thread
};

template <class Sp>
struct Shared {
  union {
    float v[Sp::ROWS ? S_MAX : 1][Sp::K][NT];  // per-thread row terms of up to S_MAX tile rows
    double h[Sp::Op::SCRATCH > 0 ? Sp::Op::SCRATCH : 1][NT];  // the entry hook's scratch (after the last use of v)
  };
  float red[Sp::K][NT];
  Tile tile;  // in shared memory, not per-thread registers: ~20 int64 fields would crowd out the load loop
  int flag;
};

// Fixed tree over sh.red[k][0..NT) -> out[0..K). Expects the values written and synced; the tree ends synced, the
// store to out is the caller's to sync.
template <int K, class Ex, class Sh>
FO_HD FO_INLINE void block_tree(Ex& ex, Sh& sh, float* out) {
  for (int off = NT / 2; off > 0; off >>= 1) {
    ex.each([&](int tid, Regs<K>&) {
      if (tid < off)
        for (int k = 0; k < K; ++k) sh.red[k][tid] += sh.red[k][tid + off];
    });
    ex.sync();
  }
  ex.each([&](int tid, Regs<K>&) {
    if (tid == 0)
      for (int k = 0; k < K; ++k) out[k] = sh.red[k][0];
  });
}

// One thread fences, draws a ticket of *cnt and fences again: true, in every thread, in the block that draws the
// last of n tickets (it must reset *cnt). Ends synced.
template <int K, class Ex, class Sh>
FO_HD FO_INLINE bool last_ticket(Ex& ex, Sh& sh, int* cnt, int64_t n) {
  ex.each([&](int tid, Regs<K>&) {
    if (tid != 0) return;
    fence();
    sh.flag = atomic_inc(cnt) == n - 1;
    fence();
  });
  ex.sync();
  return sh.flag;
}

// The last block of a set: resets its counter, then sums the n K-vectors at src (written by other blocks: read
// from L2) in a fixed order, per thread then block_tree, -> out[0..K).
template <int K, class Ex, class Sh>
FO_HD FO_INLINE void sum_last(Ex& ex, Sh& sh, int* cnt, const float* src, int64_t n, float* out) {
  ex.each([&](int tid, Regs<K>&) {
    if (tid == 0) *cnt = 0;  // ready for the next launch
    float acc[K];
    for (int k = 0; k < K; ++k) acc[k] = 0.f;
    for (int64_t j = tid; j < n; j += NT)
      for (int k = 0; k < K; ++k) acc[k] += load_l2(&src[j * K + k]);
    for (int k = 0; k < K; ++k) sh.red[k][tid] = acc[k];
  });
  ex.sync();
  block_tree<K>(ex, sh, out);
}

// The last tile of a row (column) band: resets the band's counter, then for each of its lines i in
// [first, min(end, n)) of matrix b sums the line's `parts` partials (one per tile across the band, [part][B * n]
// from ws) in tile order and writes Op::finish(sum, len) to statistic out + b * n + i.
template <class Op, int K, class Ex>
FO_HD FO_INLINE void fold_band(Ex& ex, const Args& a, int* cnt, int64_t b, int64_t B, int64_t first, int64_t end,
                               int64_t n, int64_t len, int64_t parts, int64_t ws, int64_t out) {
  ex.each([&](int tid, Regs<K>&) {
    if (tid == 0) *cnt = 0;
    const int64_t Bn = B * n;
    for (int64_t i = first + tid; i < n && i < end; i += NT) {
      const int64_t id = b * n + i;
      for (int k = 0; k < K; ++k) {
        float acc = 0.f;
        for (int64_t p = 0; p < parts; ++p) acc += load_l2(&a.ws_extra[ws + (p * Bn + id) * K + k]);
        a.out_stats[(out + id) * K + k] = Op::finish(acc, len);
      }
    }
  });
}

#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <class Sp, class Ex>
FO_HD FO_INLINE void block_program(Ex& ex, Shared<Sp>& sh, const Args& a, int64_t item) {
  using Op = typename Sp::Op;
  constexpr int K = Sp::K;
  using Rg = Regs<K>;
  ex.each([&](int tid, Rg&) {
    if (tid == 0) sh.tile = make_tile(a, item);
  });
  ex.sync();
  const Tile& tl = sh.tile;
  const int TC = 1 << tl.log2tc;
  const int64_t TW = NT >> tl.log2tc;
  const int64_t r0 = tl.rt * TW * tl.IT, c0 = (tl.ct * TC) << tl.log2v;
  const bool do_rows = Sp::ROWS && tl.rows;
  const bool do_cols = Sp::COLS && tl.cols;
  const bool b_ok = tl.b < tl.B;  // false only for the one empty tile of an entry with B == 0
  // x * (1 / scale), the unscaling the Triton kernels and the references' callers do (rounded the same way)
  const float inv_a = a.scale_a ? 1.f / load_ro<float>(a.scale_a, 0) : 1.f;
  const typename Op::Ctx cx = Op::ctx(a, tl);  // the op's per-tile constants

  ex.each([&](int, Rg& rg) {
    for (int k = 0; k < K; ++k) rg.tot[k] = rg.col[k] = 0.f;
  });

  // Pass over the tile in groups of S tile rows per thread (all at once when no row sums are wanted).
  const int64_t S = do_rows ? S_MAX : (tl.IT < (1 << 20) ? tl.IT : (1 << 20));  // bounded: q counts in int
  for (int64_t s = 0; s < tl.IT; s += S) {
    const int ns = int(tl.IT - s < S ? tl.IT - s : S);
    dispatch_dtype(tl.da, [&](auto ta) {
      dispatch_input<Op::N_IN >= 2>(tl.db, [&](auto tb) {
      dispatch_input<Op::N_IN >= 4>(tl.dc, [&](auto tc) {  // lists C and D share a dtype
        ex.each([&](int tid, Rg& rg) {
          const int tx = tid & (TC - 1);
          const int64_t ty = tid >> tl.log2tc;
          // The thread's elements of this group, q = (j, v) in order: tile row s + j, column c0 + v*TC + tx.
          // Batches of LOADS_IN_FLIGHT independent loads are issued before any is used (memory parallelism).
          const int nq = ns << tl.log2v, vmask = (1 << tl.log2v) - 1;
          const int64_t rf = r0 + s * TW + ty;              // this thread's first row of the group
          const int64_t jlim = rf < tl.R ? (tl.R - rf + TW - 1) / TW : 0;  // row rf + j*TW exists iff j < jlim
          const int64_t clim = tl.C - c0 - tx;              // column exists iff v*TC < clim
          const int64_t ibase = (tl.b * tl.R + rf) * tl.C + c0 + tx, rstride = TW * tl.C;
          float rl[K];
          for (int k = 0; k < K; ++k) rl[k] = 0.f;
          for (int q0 = 0; q0 < nq; q0 += LOADS_IN_FLIGHT) {
            float xa[LOADS_IN_FLIGHT], xb[LOADS_IN_FLIGHT], xc[LOADS_IN_FLIGHT], xd[LOADS_IN_FLIGHT];
            bool ok[LOADS_IN_FLIGHT];
            FO_UNROLL
            for (int u = 0; u < LOADS_IN_FLIGHT; ++u) {
              const int q = q0 + u, j = q >> tl.log2v, cv = (q & vmask) << tl.log2tc;
              const int64_t i = ibase + j * rstride + cv;
              ok[u] = q < nq && b_ok && j < jlim && cv < clim && i < tl.numel;  // i < numel: flat kinds' tail
              xa[u] = ok[u] ? load(ta, tl.pa, i) * inv_a : 0.f;
              xb[u] = Op::N_IN >= 2 && ok[u] ? load(tb, tl.pb, i) : 0.f;
              xc[u] = Op::N_IN >= 4 && ok[u] ? load(tc, tl.pc, i) : 0.f;
              xd[u] = Op::N_IN >= 4 && ok[u] ? load(tc, tl.pd, i) : 0.f;
            }
            FO_UNROLL
            for (int u = 0; u < LOADS_IN_FLIGHT; ++u) {
              if (ok[u]) {
                float x[K];
                Op::value(cx, xa[u], xb[u], xc[u], xd[u], x);
                for (int k = 0; k < K; ++k) {
                  rg.tot[k] += x[k];
                  if (Sp::COLS) rg.col[k] += x[k];  // column kinds have V == 1: one column per thread
                  rl[k] += x[k];
                }
              }
              if constexpr (Sp::ROWS) {
                const int q = q0 + u;
                if (do_rows && q < nq && (q & vmask) == vmask) {  // the thread's part of row s+j is done
                  for (int k = 0; k < K; ++k) {
                    sh.v[q >> tl.log2v][k][tid] = rl[k];
                    rl[k] = 0.f;
                  }
                }
              }
            }
          }
        });
      });
      });
    });
    if constexpr (Sp::ROWS) {
      if (do_rows) {
        ex.sync();
        for (int off = TC >> 1; off > 0; off >>= 1) {  // tree over the TC lanes of each thread row
          ex.each([&](int tid, Rg&) {
            if ((tid & (TC - 1)) < off)
              for (int j = 0; j < ns; ++j)
                for (int k = 0; k < K; ++k) sh.v[j][k][tid] += sh.v[j][k][tid + off];
          });
          ex.sync();
        }
        ex.each([&](int tid, Rg&) {
          if ((tid & (TC - 1)) != 0) return;
          const int64_t ty = tid >> tl.log2tc;
          for (int j = 0; j < ns; ++j) {
            const int64_t r = r0 + (s + j) * TW + ty;
            if (!b_ok || r >= tl.R) continue;
            const int64_t rid = tl.b * tl.R + r;
            for (int k = 0; k < K; ++k) {
              const float val = sh.v[j][k][tid];
              if (tl.nct == 1) a.out_stats[(tl.row_out + rid) * K + k] = Op::finish(val, tl.C);
              else a.ws_extra[tl.ws_row + (tl.ct * tl.B * tl.R + rid) * K + k] = val;  // [ct][row]: coalesced
            }
          }
        });
        ex.sync();  // sh.v is rewritten by the next group
      }
    }
  }

  if constexpr (Sp::COLS) {
    if (do_cols) {
      ex.each([&](int tid, Rg& rg) {
        for (int k = 0; k < K; ++k) sh.red[k][tid] = rg.col[k];
      });
      ex.sync();
      for (int64_t off = TW >> 1; off > 0; off >>= 1) {  // tree over the thread rows of each column
        ex.each([&](int tid, Rg&) {
          if ((tid >> tl.log2tc) < off)
            for (int k = 0; k < K; ++k) sh.red[k][tid] += sh.red[k][tid + (off << tl.log2tc)];
        });
        ex.sync();
      }
      ex.each([&](int tid, Rg&) {
        const int64_t c = c0 + tid;
        if (tid >= TC || !b_ok || c >= tl.C) return;
        const int64_t cid = tl.b * tl.C + c;
        for (int k = 0; k < K; ++k) {
          const float val = sh.red[k][tid];
          if (tl.nrt == 1) a.out_stats[(tl.col_out + cid) * K + k] = Op::finish(val, tl.R);
          else a.ws_extra[tl.ws_col + (tl.rt * tl.B * tl.C + cid) * K + k] = val;  // [rt][col]
        }
      });
      ex.sync();
    }
  }

  // Tile total -> ws_items. Then tickets (atomic counters, reset by whoever draws the last one):
  //   bit 1: last tile of this row band (b, rt)    -> sums the band's row partials over its nct column tiles
  //   bit 2: last tile of this column band (b, ct) -> sums the band's column partials over its nrt row tiles
  // and then, after the band work, the entry's ticket: its last tile sums the entry total over its tiles.
  // Bands spread the second stage over many blocks (an LM head's rows would otherwise be summed by one block).
  ex.each([&](int tid, Rg& rg) {
    for (int k = 0; k < K; ++k) sh.red[k][tid] = rg.tot[k];
  });
  ex.sync();
  block_tree<K>(ex, sh, &a.ws_items[item * K]);
  ex.sync();
  // Barrier, then one thread fences and takes the tickets (the pattern of cooperative groups' grid sync): the
  // block's partials are published before its tickets, and a last block reads them (from L2) after its fence.
  const bool split_rows = do_rows && b_ok && tl.nct > 1, split_cols = do_cols && b_ok && tl.nrt > 1;
  int* const row_cnt = a.counters + tl.cnt_row + tl.b * tl.nrt + tl.rt;
  int* const col_cnt = a.counters + tl.cnt_col + tl.b * tl.nct + tl.ct;
  ex.each([&](int tid, Rg&) {
    if (tid != 0) return;
    fence();
    int f = 0;
    if (split_rows && atomic_inc(row_cnt) == tl.nct - 1) f |= 1;
    if (split_cols && atomic_inc(col_cnt) == tl.nrt - 1) f |= 2;
    fence();
    sh.flag = f;
  });
  ex.sync();
  const int flags = sh.flag;
  if constexpr (Sp::ROWS) {
    if (flags & 1)
      fold_band<Op, K>(ex, a, row_cnt, tl.b, tl.B, r0, r0 + TW * tl.IT, tl.R, tl.C, tl.nct, tl.ws_row, tl.row_out);
  }
  if constexpr (Sp::COLS) {
    if (flags & 2)
      fold_band<Op, K>(ex, a, col_cnt, tl.b, tl.B, c0, c0 + (int64_t(TC) << tl.log2v), tl.C, tl.R, tl.nrt, tl.ws_col,
                       tl.col_out);
  }
  ex.sync();  // this block's band sums are written before it takes its entry ticket
  if (!last_ticket<K>(ex, sh, &a.counters[tl.e], tl.n_it)) return;
  sum_last<K>(ex, sh, &a.counters[tl.e], &a.ws_items[tl.item0 * K], tl.n_it, &a.out_t[tl.e * K]);
  ex.sync();
  Op::finish_entry(ex, sh.h, a, tl);  // every statistic of the entry is final here

  // The last entry to finish sums the entry totals.
  if (!last_ticket<K>(ex, sh, &a.counters[a.n_entries], a.n_entries)) return;
  sum_last<K>(ex, sh, &a.counters[a.n_entries], a.out_t, a.n_entries, a.out_g);
}

}  // namespace fo
