// clsh LSH tables: see lsh_tables.hpp for the data layout.
#include "lsh_tables.hpp"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>
#include <numeric>
#include <sstream>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

#include "buffer.hpp"
#include "parallel.hpp"

namespace clsh {

namespace {

// murmur3's 64-bit finalizer: a bijection with full avalanche, so wide codes that differ
// only in their high bits still spread over the 32-bit sort keys.
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

std::string num(double x) {
  std::ostringstream s;
  s.precision(3);
  s << x;
  return s.str();
}

int64_t pairs_of(int64_t s) { return s * (s - 1) / 2; }

// Stable LSD radix sort of 64-bit words by their high 32 bits, 8 bits per pass; the low
// 32 bits carry a rank along. Returns the buffer (a or tmp) that holds the result. One
// read builds the four histograms, and a digit on which all words agree is skipped
// (K = 16 bit codes: two passes). Why not a code -> bucket hash map: a cache miss per item
// per table, 3-5x slower than this at N = 1e5; and why 8-byte words: moving 16-byte
// (code, rank) records was another 3x slower.
uint64_t* radix_sort_high32(uint64_t* a, uint64_t* tmp, size_t n) {
  if (n < 2) return a;
  size_t hist[4][256] = {};
  for (size_t i = 0; i < n; ++i) {
    const uint64_t w = a[i];
    ++hist[0][(w >> 32) & 255];
    ++hist[1][(w >> 40) & 255];
    ++hist[2][(w >> 48) & 255];
    ++hist[3][(w >> 56) & 255];
  }
  for (int d = 0; d < 4; ++d) {
    const int shift = 32 + 8 * d;
    size_t* h = hist[d];
    if (h[(a[0] >> shift) & 255] == n) continue;  // all words share this digit
    size_t sum = 0;
    for (int v = 0; v < 256; ++v) {
      const size_t c = h[v];
      h[v] = sum;
      sum += c;
    }
    for (size_t i = 0; i < n; ++i) tmp[h[(a[i] >> shift) & 255]++] = a[i];
    std::swap(a, tmp);
  }
  return a;  // whichever buffer holds the result
}

// Stable LSD radix sort of keys below `max_key`: the sort behind table-major pair
// enumeration. Digits of at most 11 bits, as few passes as that allows (a partition of
// ~16k keys and a 2048-entry histogram stay in L2). Returns the buffer holding the result.
uint64_t* radix_sort_keys(uint64_t* a, uint64_t* tmp, size_t n, uint64_t max_key) {
  int bits = 0;
  while (bits < 64 && (max_key >> bits) != 0) ++bits;
  const int passes = (bits + 10) / 11;
  if (passes == 0 || n < 2) return a;
  const int digit = (bits + passes - 1) / passes;
  const uint64_t mask = (uint64_t{1} << digit) - 1;
  std::vector<size_t> hist(static_cast<size_t>(mask) + 1);
  for (int shift = 0; shift < bits; shift += digit) {
    std::fill(hist.begin(), hist.end(), size_t{0});
    for (size_t i = 0; i < n; ++i) ++hist[(a[i] >> shift) & mask];
    size_t sum = 0;
    for (size_t& h : hist) {
      const size_t c = h;
      h = sum;
      sum += c;
    }
    for (size_t i = 0; i < n; ++i) tmp[hist[(a[i] >> shift) & mask]++] = a[i];
    std::swap(a, tmp);
  }
  return a;
}

// One row of a result: the ascending values that occur in at least m of up to L ascending
// lists of distinct ranks (the members of one bucket per table; a value occurs at most once
// per list, so its multiplicity is the number of tables it collides in). No reads of other
// items' rows: the cost is the lists themselves plus one counter per value. Strategy:
//  - one list (m == 1): copy it;
//  - long rows, m == 1, values in a narrow range: a bitmap (dedups and sorts for free);
//  - otherwise: count each value, emit those reaching m (resetting as we go), sort them.
//    Measured against sorting the gathered lists and against a k-way merge on clustered
//    16x8 codes: 1.5-2x faster (no data-dependent branches, rows are short after dedup).
// Scratch lives per worker thread and is allocated on first use.
struct RowUnion {
  explicit RowUnion(int64_t n_items) : n(n_items) {}
  int64_t n;  // ranks are < n
  std::vector<const int32_t*> b, e;
  std::vector<uint64_t> bits;
  std::vector<int32_t> count;

  void reset() {
    b.clear();
    e.clear();
  }
  void add(const int32_t* first, const int32_t* last) {
    if (first < last) {
      b.push_back(first);
      e.push_back(last);
    }
  }

  // Appends the row to out (skipping `skip`), returns its length.
  int64_t emit(int64_t m, int32_t skip, I32Buffer& out) {
    const size_t k = b.size();
    if (static_cast<int64_t>(k) < m) return 0;
    const size_t start = out.size();
    int64_t total = 0;
    int32_t lo = INT32_MAX, hi = -1;
    for (size_t t = 0; t < k; ++t) {
      total += e[t] - b[t];
      lo = std::min(lo, *b[t]);
      hi = std::max(hi, *(e[t] - 1));
    }
    if (k == 1) {
      for (const int32_t* p = b[0]; p < e[0]; ++p)
        if (*p != skip) out.push_back(*p);
    } else if (m == 1 && total > 256 && (hi - lo) / 64 <= 4 * total) {
      if (bits.empty()) bits.assign(static_cast<size_t>(n / 64 + 1), 0);
      for (size_t t = 0; t < k; ++t)
        for (const int32_t* p = b[t]; p < e[t]; ++p) bits[*p >> 6] |= uint64_t{1} << (*p & 63);
      if (skip >= 0) bits[skip >> 6] &= ~(uint64_t{1} << (skip & 63));
      int32_t* o = out.extend(static_cast<size_t>(total));  // total >= distinct values
      for (int32_t word = lo >> 6; word <= (hi >> 6); ++word) {
        uint64_t w = bits[word];
        bits[word] = 0;
        while (w) {
          *o++ = word * 64 + __builtin_ctzll(w);
          w &= w - 1;
        }
      }
      out.truncate(static_cast<size_t>(o - out.data()));
    } else {
      if (count.empty()) count.assign(static_cast<size_t>(n), 0);
      for (size_t t = 0; t < k; ++t)
        for (const int32_t* p = b[t]; p < e[t]; ++p) ++count[*p];
      for (size_t t = 0; t < k; ++t)
        for (const int32_t* p = b[t]; p < e[t]; ++p) {
          if (count[*p] >= m && *p != skip) out.push_back(*p);
          count[*p] = 0;  // also marks it emitted
        }
      std::sort(out.begin() + start, out.end());
    }
    return static_cast<int64_t>(out.size() - start);
  }
};

std::string too_many_pairs(double count, int64_t m, int64_t limit, const char* how) {
  return "candidate_pairs: " + std::string(how) + " " + num(count) + " pairs collide in >= " +
         std::to_string(m) + " tables (limit " + num(static_cast<double>(limit)) +
         " pairs); buckets are too large: use more bits per table, a larger min_tables, "
         "or pass a larger max_pairs";
}

}  // namespace

int64_t default_output_limit() {
  double bytes = 16.0 * (1ull << 30);  // fallback when the platform cannot tell
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGE_SIZE)
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page = sysconf(_SC_PAGE_SIZE);
  if (pages > 0 && page > 0) bytes = static_cast<double>(pages) * static_cast<double>(page);
#endif
  return static_cast<int64_t>(bytes / 4.0 / sizeof(int64_t));
}

// ---------------------------------------------------------------- RankLists

int64_t RankLists::total() const {
  int64_t t = 0;
  for (const auto& v : values) t += static_cast<int64_t>(v.size());
  return t;
}

void RankLists::write_offsets(int64_t* out) const {
  int64_t pos = 0, row = 0;
  out[0] = 0;
  for (const auto& ls : lens)
    for (int32_t len : ls) out[++row] = (pos += len);
}

void RankLists::write_ids(int64_t* out, int n_threads) const {
  std::vector<int64_t> start(values.size() + 1, 0);
  for (size_t c = 0; c < values.size(); ++c)
    start[c + 1] = start[c] + static_cast<int64_t>(values[c].size());
  const int64_t* id = rank_id->data();
  parallel_for(static_cast<int64_t>(values.size()), n_threads, [&](int64_t c) {
    int64_t* o = out + start[c];
    for (int32_t v : values[c]) *o++ = id[v];
  });
}

void RankLists::write_pairs(int64_t* out, int n_threads) const {
  std::vector<int64_t> start(values.size() + 1, 0);
  for (size_t c = 0; c < values.size(); ++c)
    start[c + 1] = start[c] + static_cast<int64_t>(values[c].size());
  const int64_t* id = rank_id->data();
  parallel_for(static_cast<int64_t>(values.size()), n_threads, [&](int64_t c) {
    int64_t* o = out + 2 * start[c];
    const int32_t* v = values[c].data();
    int64_t row = row0[c];
    for (int32_t len : lens[c]) {
      const int64_t id_row = id[row++];
      for (int32_t k = 0; k < len; ++k) {
        *o++ = id_row;
        *o++ = id[*v++];
      }
    }
  });
}

// ---------------------------------------------------------------- one table

uint32_t LSHTables::Table::key(uint64_t code) const {
  return mode == kWide ? static_cast<uint32_t>(mix64(code) >> 32) : static_cast<uint32_t>(code);
}

size_t LSHTables::Table::scratch_bytes(int64_t n) {
  const size_t m = static_cast<size_t>(n) + 1;
  const size_t radix = 2 * Arena::need<uint64_t>(m) + Arena::need<int64_t>(m) +
                       2 * Arena::need<int32_t>(m);
  const size_t direct = 3 * Arena::need<int32_t>(m);
  return std::max(radix, direct);
}

void LSHTables::Table::build(const uint64_t* code, int64_t n, Arena& scratch) {
  dense.clear();
  if (n == 0) {
    mode = kDense;
    offsets.assign(1, 0);
    members.clear();
    return;
  }
  uint64_t diff = 0, mn = code[0], mx = code[0];
  for (int64_t r = 0; r < n; ++r) {
    diff |= code[r] ^ code[0];
    mn = std::min(mn, code[r]);
    mx = std::max(mx, code[r]);
  }
  members.resize(static_cast<size_t>(n));

  if (mx - mn < static_cast<uint64_t>(2 * n + 1024)) {
    // Direct addressing. Visiting ranks in ascending order numbers buckets by their
    // smallest member, and the counting-sort placement keeps members ascending.
    mode = kDense;
    dense.assign(static_cast<size_t>(mx - mn + 1), -1);
    int32_t* bucket = scratch.take<int32_t>(static_cast<size_t>(n));
    int32_t* count = scratch.take<int32_t>(static_cast<size_t>(n));
    int32_t nb = 0;
    for (int64_t r = 0; r < n; ++r) {
      int32_t& b = dense[code[r] - mn];
      if (b < 0) {
        b = nb;
        count[nb++] = 0;
      }
      ++count[b];
      bucket[r] = b;
    }
    offsets.resize(static_cast<size_t>(nb) + 1);
    offsets[0] = 0;
    for (int32_t b = 0; b < nb; ++b) offsets[b + 1] = offsets[b] + count[b];
    int32_t* cursor = count;  // reuse: cursor[b] = next free slot of bucket b
    for (int32_t b = 0; b < nb; ++b) cursor[b] = static_cast<int32_t>(offsets[b]);
    for (int64_t r = 0; r < n; ++r) members[cursor[bucket[r]]++] = static_cast<int32_t>(r);
    return;
  }

  mode = (diff >> 32) != 0 ? kWide : kNarrow;
  uint64_t* a = scratch.take<uint64_t>(static_cast<size_t>(n));
  uint64_t* tmp = scratch.take<uint64_t>(static_cast<size_t>(n));
  for (int64_t r = 0; r < n; ++r)
    a[r] = (static_cast<uint64_t>(key(code[r])) << 32) | static_cast<uint32_t>(r);
  a = radix_sort_high32(a, tmp, static_cast<size_t>(n));  // stable: ranks ascend within a key
  auto rank = [](uint64_t w) { return static_cast<int32_t>(static_cast<uint32_t>(w)); };

  // Runs of equal code; in kWide a run of equal hash that mixes codes is ordered by code
  // (stably, so ranks still ascend within a code) and split.
  int64_t* run_start = scratch.take<int64_t>(static_cast<size_t>(n) + 1);
  int64_t nruns = 0;
  for (int64_t p = 0; p < n;) {
    int64_t e = p + 1;
    while (e < n && (a[e] >> 32) == (a[p] >> 32)) ++e;
    bool mixed = false;
    if (mode == kWide)
      for (int64_t q = p + 1; q < e && !mixed; ++q) mixed = code[rank(a[q])] != code[rank(a[p])];
    if (mixed) {
      std::stable_sort(a + p, a + e,
                       [&](uint64_t x, uint64_t y) { return code[rank(x)] < code[rank(y)]; });
      for (int64_t q = p; q < e; ++q)
        if (q == p || code[rank(a[q])] != code[rank(a[q - 1])]) run_start[nruns++] = q;
    } else {
      run_start[nruns++] = p;
    }
    p = e;
  }
  run_start[nruns] = n;

  // Number buckets by their smallest member: the first rank of each run (runs ascend).
  int32_t* run_of_first = scratch.take<int32_t>(static_cast<size_t>(n));
  std::fill(run_of_first, run_of_first + n, -1);
  for (int64_t k = 0; k < nruns; ++k) run_of_first[rank(a[run_start[k]])] = static_cast<int32_t>(k);
  int32_t* run_bucket = scratch.take<int32_t>(static_cast<size_t>(nruns));
  int32_t next = 0;
  for (int64_t r = 0; r < n; ++r)
    if (run_of_first[r] >= 0) run_bucket[run_of_first[r]] = next++;

  offsets.assign(static_cast<size_t>(nruns + 1), 0);
  for (int64_t k = 0; k < nruns; ++k) offsets[run_bucket[k] + 1] = run_start[k + 1] - run_start[k];
  for (int64_t b = 0; b < nruns; ++b) offsets[b + 1] += offsets[b];
  for (int64_t k = 0; k < nruns; ++k) {
    int32_t* dst = &members[offsets[run_bucket[k]]];
    for (int64_t q = run_start[k]; q < run_start[k + 1]; ++q) *dst++ = rank(a[q]);
  }
}

// ---------------------------------------------------------------- LSHTables

LSHTables::LSHTables(int64_t n_tables, int n_threads)
    : L_(n_tables), threads_(resolve_threads(n_threads)) {
  if (n_tables < 1 || n_tables > kMaxTables)
    throw std::invalid_argument("n_tables must be in 1.." + std::to_string(kMaxTables) +
                                ", got " + std::to_string(n_tables));
  if (n_threads < 0)
    throw std::invalid_argument("n_threads must be >= 0 (0 = all cores), got " +
                                std::to_string(n_threads));
  tables_.resize(static_cast<size_t>(L_));
  codes_.resize(static_cast<size_t>(L_));
}

int64_t LSHTables::size() {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int64_t>(slot_id_.size());
}

void LSHTables::reset_items() {
  slot_id_.clear();
  for (auto& col : codes_) col.clear();
  dirty_ = true;
}

void LSHTables::clear() {
  std::lock_guard<std::mutex> lock(mutex_);
  reset_items();
  // Give the memory back too: a cleared table may live on, empty, for a long time.
  slot_id_.shrink_to_fit();
  for (auto& col : codes_) HugeVector<uint64_t>().swap(col);
  tables_.assign(static_cast<size_t>(L_), Table{});
  HugeVector<int32_t>().swap(pos_);
  HugeVector<int32_t>().swap(end_);
  positions_ = false;
}

void LSHTables::build(const uint64_t* codes, int64_t n) {
  if (n < 0 || n > kMaxItems)
    throw std::invalid_argument("build: number of items must be in 0.." +
                                std::to_string(kMaxItems) + ", got " + std::to_string(n));
  std::lock_guard<std::mutex> lock(mutex_);
  reset_items();
  slot_id_.resize(static_cast<size_t>(n));
  std::iota(slot_id_.begin(), slot_id_.end(), int64_t{0});
  // Rows -> one column per table, in one sequential pass (parallel over row blocks): the
  // tables then read their codes contiguously instead of with a stride of L.
  const int64_t L = L_;
  for (auto& col : codes_) col.resize(static_cast<size_t>(n));
  const int threads = n * L < (int64_t{1} << 18) ? 1 : threads_;
  const int64_t nch = threads > 1 ? n_chunks_for(n, threads, 16384) : 1;
  parallel_for(nch, threads, [&](int64_t c) {
    for (int64_t r = c * n / nch; r < (c + 1) * n / nch; ++r)
      for (int64_t l = 0; l < L; ++l) codes_[l][r] = codes[r * L + l];
  });
  ensure_index();  // "build" means index now: it is what callers time, and reads stay cheap
}

void LSHTables::ensure_index() {
  if (!dirty_) return;
  reindex();
  dirty_ = false;
}

void LSHTables::reindex() {
  const int64_t n = static_cast<int64_t>(slot_id_.size());
  const int64_t L = L_;

  // build numbers items 0..n-1 in slot order, so rank == slot == id.
  auto ids = std::make_shared<std::vector<int64_t>>(slot_id_);

  // One arena for the whole re-index (huge pages, see buffer.hpp): a scratch region per
  // worker, reused for each table that worker builds. Starting threads costs tens of
  // microseconds (and more on a busy machine): small indexes are built on this thread.
  const int threads = n * L < (int64_t{1} << 18) ? 1 : threads_;
  const int W = n_workers(L, threads);
  const size_t per_worker = Table::scratch_bytes(n) + 64;
  Arena arena(static_cast<size_t>(W) * Arena::need<char>(per_worker));
  std::vector<char*> region(static_cast<size_t>(W));
  for (int w = 0; w < W; ++w) region[w] = arena.take<char>(per_worker);

  parallel_for_workers(L, threads, [&](int64_t l, int w) {
    Arena scratch(region[w], per_worker);
    tables_[l].build(codes_[l].data(), n, scratch);
  });
  positions_ = false;
  rank_id_ = std::move(ids);
}

void LSHTables::ensure_positions() {
  if (positions_) return;
  const int64_t n = static_cast<int64_t>(rank_id_->size());
  pos_.resize(static_cast<size_t>(n * L_));
  end_.resize(static_cast<size_t>(n * L_));
  parallel_for(L_, n * L_ < (int64_t{1} << 18) ? 1 : threads_, [&](int64_t l) {
    const Table& T = tables_[l];
    int32_t* pos = pos_.data() + l * n;
    int32_t* end = end_.data() + l * n;
    for (size_t b = 0; b + 1 < T.offsets.size(); ++b)
      for (int64_t p = T.offsets[b]; p < T.offsets[b + 1]; ++p) {
        pos[T.members[p]] = static_cast<int32_t>(p);
        end[T.members[p]] = static_cast<int32_t>(T.offsets[b + 1]);
      }
  });
  positions_ = true;
}

RankLists LSHTables::buckets(int64_t table) {
  if (table < 0 || table >= L_)
    throw std::invalid_argument("buckets: table index " + std::to_string(table) +
                                " is out of range for n_tables=" + std::to_string(L_));
  std::lock_guard<std::mutex> lock(mutex_);
  ensure_index();
  const Table& T = tables_[table];
  const int64_t nb = static_cast<int64_t>(T.offsets.size()) - 1;
  RankLists out;
  out.rank_id = rank_id_;
  const int64_t nch = n_chunks_for(nb, threads_, 4096);
  out.row0.resize(static_cast<size_t>(nch + 1));
  for (int64_t c = 0; c <= nch; ++c) out.row0[c] = c * nb / std::max<int64_t>(nch, 1);
  out.lens.resize(static_cast<size_t>(nch));
  out.values.resize(static_cast<size_t>(nch));
  parallel_for(nch, threads_, [&](int64_t c) {
    const int64_t b0 = out.row0[c], b1 = out.row0[c + 1];
    for (int64_t b = b0; b < b1; ++b)
      out.lens[c].push_back(static_cast<int32_t>(T.offsets[b + 1] - T.offsets[b]));
    out.values[c].append(T.members.data() + T.offsets[b0],
                         static_cast<size_t>(T.offsets[b1] - T.offsets[b0]));
  });
  return out;
}

RankLists LSHTables::candidate_pairs(int64_t min_tables, int64_t max_pairs) {
  if (min_tables < 1 || min_tables > L_)
    throw std::invalid_argument("candidate_pairs: min_tables must be in 1..n_tables=" +
                                std::to_string(L_) + ", got " + std::to_string(min_tables));
  std::lock_guard<std::mutex> lock(mutex_);
  ensure_index();
  const int64_t n = static_cast<int64_t>(rank_id_->size());
  const int64_t L = L_, m = min_tables;

  // Refuse up front when a lower bound on the output already exceeds the limit, so a
  // degenerate input (all codes equal: ~N^2/2 pairs) fails at once, not after filling
  // memory. When m == 1 every pair of any single table is a candidate; in general, with
  // T the number of (pair, table) collisions, T <= (m-1) C(n,2) + L P.
  double work = static_cast<double>(n);  // pair candidates to visit, plus one per item
  {
    double total = 0, best = 0;
    for (int64_t l = 0; l < L; ++l) {
      const Table& T = tables_[l];
      double t = 0;
      for (size_t b = 0; b + 1 < T.offsets.size(); ++b)
        t += static_cast<double>(pairs_of(T.offsets[b + 1] - T.offsets[b]));
      total += t;
      best = std::max(best, t);
      work += t;
    }
    const double all = static_cast<double>(pairs_of(n));
    const double lower = m == 1 ? best : std::max(0.0, (total - (m - 1) * all) / L);
    if (lower > static_cast<double>(max_pairs))
      throw OutputTooLarge(too_many_pairs(lower, m, max_pairs, "at least"));
  }

  // Sparse buckets (the usual case: K large enough that most buckets are small): walk each
  // table's buckets in order and sort the pair keys, instead of visiting every item's L
  // buckets at random places in memory. Dense buckets (many pairs per item): per-item rows.
  if (work - n <= 32.0 * n) return pairs_by_sorting(m, static_cast<int64_t>(work) - n, max_pairs);
  ensure_positions();

  RankLists out;
  out.rank_id = rank_id_;
  // Chunks of ~16k units of work (one thread for small jobs), at most 16 per thread; dynamic
  // scheduling absorbs the imbalance of uneven buckets.
  const int64_t nch = std::max<int64_t>(
      n > 0, std::min<int64_t>({n, int64_t{16} * threads_, static_cast<int64_t>(work / 16384)}));
  out.row0.resize(static_cast<size_t>(nch + 1));
  for (int64_t c = 0; c <= nch; ++c) out.row0[c] = c * n / std::max<int64_t>(nch, 1);
  out.lens.resize(static_cast<size_t>(nch));
  out.values.resize(static_cast<size_t>(nch));
  std::atomic<int64_t> emitted{0};
  std::vector<RowUnion> rows(static_cast<size_t>(n_workers(nch, threads_)), RowUnion(n));
  parallel_for_workers(nch, threads_, [&](int64_t c, int w) {
    std::vector<int32_t>& lens = out.lens[c];
    I32Buffer& vals = out.values[c];
    lens.reserve(static_cast<size_t>(out.row0[c + 1] - out.row0[c]));
    RowUnion& row = rows[w];
    for (int64_t i = out.row0[c]; i < out.row0[c + 1]; ++i) {
      // The j > i sharing i's bucket in table t follow i in members: members[pos+1, end).
      row.reset();
      for (int64_t t = 0; t < L; ++t) {
        const int32_t* mem = tables_[t].members.data();
        row.add(mem + pos_[t * n + i] + 1, mem + end_[t * n + i]);
      }
      const int64_t k = row.emit(m, -1, vals);
      lens.push_back(static_cast<int32_t>(k));
      if (k > 0 && emitted.fetch_add(k) + k > max_pairs)
        throw OutputTooLarge(too_many_pairs(static_cast<double>(max_pairs), m, max_pairs,
                                            "more than"));
    }
  });
  return out;
}

constexpr int64_t kPartKeys = 16384;  // keys per partition: key + scratch (256 KB) stay in L2

// Table-major candidate pairs. Each (pair, table) collision i < j becomes a key
// (i - first row) << jbits | j in the partition of rows holding i; partitions are sorted
// independently (in parallel) and a key that occurs >= m times is a pair colliding in >= m
// tables. Output in RankLists form, partition c = chunk c, so rows stay in order.
RankLists LSHTables::pairs_by_sorting(int64_t m, int64_t occurrences, int64_t max_pairs) {
  const int64_t n = static_cast<int64_t>(rank_id_->size());
  const int64_t L = L_;
  auto bit_length = [](uint64_t v) {
    int b = 0;
    while (b < 64 && (v >> b) != 0) ++b;
    return b;
  };
  // Partitions are blocks of 2^shift rows (partition of row i: i >> shift), sized for about
  // kPartKeys keys each, and at least 4 per thread. Keys are (i - first row) << jbits | j:
  // shifts and masks, no division.
  const int jbits = bit_length(static_cast<uint64_t>(std::max<int64_t>(n - 1, 1)));
  const double per_row = std::max(1.0, static_cast<double>(occurrences) / std::max<int64_t>(n, 1));
  int shift = bit_length(static_cast<uint64_t>(kPartKeys / per_row)) - 1;
  shift = std::min(shift, bit_length(static_cast<uint64_t>(n / (int64_t{4} * threads_))) - 1);
  shift = std::max(shift, 0);
  const int64_t C = (n + (int64_t{1} << shift) - 1) >> shift;

  RankLists out;
  out.rank_id = rank_id_;
  out.row0.resize(static_cast<size_t>(C + 1));
  for (int64_t c = 0; c <= C; ++c) out.row0[c] = std::min(n, c << shift);
  out.lens.resize(static_cast<size_t>(C));
  out.values.resize(static_cast<size_t>(C));
  if (n == 0) return out;

  // Keys per (table, partition): a member at position p of a bucket ending at e pairs with
  // the e - p - 1 members after it.
  std::vector<int64_t> count(static_cast<size_t>(L * C), 0);
  parallel_for(L, threads_, [&](int64_t t) {
    const Table& T = tables_[t];
    const int32_t* mem = T.members.data();
    int64_t* cnt = &count[t * C];
    for (size_t b = 0; b + 1 < T.offsets.size(); ++b)
      for (int64_t p = T.offsets[b]; p < T.offsets[b + 1] - 1; ++p)
        cnt[mem[p] >> shift] += T.offsets[b + 1] - p - 1;
  });
  // Layout: partition-major, then table.
  std::vector<int64_t> base(static_cast<size_t>(L * C), 0);
  {
    int64_t pos = 0;
    for (int64_t c = 0; c < C; ++c)
      for (int64_t t = 0; t < L; ++t) {
        base[t * C + c] = pos;
        pos += count[t * C + c];
      }
  }
  Arena arena(2 * Arena::need<uint64_t>(static_cast<size_t>(occurrences)));
  uint64_t* keys = arena.take<uint64_t>(static_cast<size_t>(occurrences));
  uint64_t* tmp = arena.take<uint64_t>(static_cast<size_t>(occurrences));
  const uint64_t row_mask = (uint64_t{1} << shift) - 1;
  parallel_for(L, threads_, [&](int64_t t) {
    const Table& T = tables_[t];
    const int32_t* mem = T.members.data();
    std::vector<int64_t> cursor(base.begin() + t * C, base.begin() + (t + 1) * C);
    for (size_t b = 0; b + 1 < T.offsets.size(); ++b) {
      const int64_t e = T.offsets[b + 1];
      for (int64_t p = T.offsets[b]; p < e - 1; ++p) {
        const uint64_t i = static_cast<uint64_t>(mem[p]);
        const uint64_t hi = (i & row_mask) << jbits;
        uint64_t* o = keys + cursor[i >> shift];
        for (int64_t q = p + 1; q < e; ++q) *o++ = hi | static_cast<uint64_t>(mem[q]);
        cursor[i >> shift] = o - keys;
      }
    }
  });
  // Partition c's keys: its tables' slices, consecutive from base[0 * C + c]. Sorted, a key
  // that occurs >= m times (once per table it collides in) is a pair; rows come out in order.
  std::atomic<int64_t> emitted{0};
  const uint64_t j_mask = (uint64_t{1} << jbits) - 1;
  parallel_for(C, threads_, [&](int64_t c) {
    const int64_t lo = base[c];
    int64_t k_ = 0;
    for (int64_t t = 0; t < L; ++t) k_ += count[t * C + c];
    const size_t k = static_cast<size_t>(k_);
    const int64_t rows = out.row0[c + 1] - out.row0[c];
    const uint64_t* sorted =
        radix_sort_keys(keys + lo, tmp + lo, k, static_cast<uint64_t>(rows) << jbits);
    std::vector<int32_t>& lens = out.lens[c];
    lens.assign(static_cast<size_t>(rows), 0);
    I32Buffer& vals = out.values[c];
    int32_t* o = vals.extend(k);  // k >= pairs kept
    for (size_t p = 0; p < k;) {
      size_t q = p + 1;
      while (q < k && sorted[q] == sorted[p]) ++q;
      if (static_cast<int64_t>(q - p) >= m) {
        ++lens[sorted[p] >> jbits];
        *o++ = static_cast<int32_t>(sorted[p] & j_mask);
      }
      p = q;
    }
    vals.truncate(static_cast<size_t>(o - vals.data()));
    const int64_t kept = static_cast<int64_t>(vals.size());
    if (kept > 0 && emitted.fetch_add(kept) + kept > max_pairs)
      throw OutputTooLarge(too_many_pairs(static_cast<double>(max_pairs), m, max_pairs, "more than"));
  });
  return out;
}

Stats LSHTables::stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  ensure_index();
  Stats s;
  s.n_items = static_cast<int64_t>(rank_id_->size());
  s.n_tables = L_;
  int64_t total_buckets = 0;
  for (const Table& T : tables_) {
    const int64_t nb = static_cast<int64_t>(T.offsets.size()) - 1;
    int64_t pairs = 0;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t size = T.offsets[b + 1] - T.offsets[b];
      pairs += pairs_of(size);
      s.max_bucket = std::max(s.max_bucket, size);
    }
    s.buckets_per_table.push_back(nb);
    s.pairs_per_table.push_back(pairs);
    total_buckets += nb;
  }
  if (total_buckets > 0)
    s.mean_bucket = static_cast<double>(s.n_items) * L_ / static_cast<double>(total_buckets);
  return s;
}

}  // namespace clsh
