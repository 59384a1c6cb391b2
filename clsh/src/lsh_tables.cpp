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

std::string num(double x) {
  std::ostringstream s;
  s.precision(3);
  s << x;
  return s.str();
}

int64_t pairs_of(int64_t s) { return s * (s - 1) / 2; }

// Stable LSD radix sort of 64-bit words by their high 32 bits, 8 bits per pass; the low
// 32 bits carry a rank along. Returns the buffer (a or tmp) that holds the result. One read builds the four histograms, and a digit on which
// all words agree is skipped (K = 16 bit codes: two passes). Why not a code -> bucket
// hash map: a cache miss per item per table, 3-5x slower than this at N = 1e5; and why
// 8-byte words: moving 16-byte (code, rank) records was another 3x slower.
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

// cand[0, mid) and cand[mid, end) ascend; make the whole ascend (linear, unlike a sort).
void merge_tail(std::vector<int32_t>& cand, size_t mid, std::vector<int32_t>& scratch) {
  if (mid == 0 || mid == cand.size() || cand[mid - 1] < cand[mid]) return;
  scratch.resize(cand.size());
  std::merge(cand.begin(), cand.begin() + mid, cand.begin() + mid, cand.end(), scratch.begin());
  cand.swap(scratch);
}

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

int64_t LSHTables::Table::find(uint64_t code) const {
  if (mode == kDense) {
    if (code < lo || code - lo >= dense.size()) return -1;
    return dense[code - lo];
  }
  const uint32_t kq = key(code);
  auto it = std::lower_bound(codes.begin(), codes.end(), code, [&](uint64_t c, uint64_t q) {
    const uint32_t kc = key(c);
    return kc < kq || (kc == kq && c < q);
  });
  return (it != codes.end() && *it == code) ? code_bucket[it - codes.begin()] : -1;
}

size_t LSHTables::Table::scratch_bytes(int64_t n) {
  const size_t m = static_cast<size_t>(n) + 1;
  const size_t radix = 2 * Arena::need<uint64_t>(m) + Arena::need<int64_t>(m) +
                       2 * Arena::need<int32_t>(m);
  const size_t direct = 3 * Arena::need<int32_t>(m);
  return std::max(radix, direct);
}

void LSHTables::Table::build(const uint64_t* code, int64_t n, int32_t* pos, int32_t* end,
                             Arena& scratch) {
  codes.clear();
  code_bucket.clear();
  dense.clear();
  if (n == 0) {
    mode = kDense;
    lo = 0;
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
    lo = mn;
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
    for (int64_t r = 0; r < n; ++r) {
      const int32_t b = bucket[r];
      const int32_t p = cursor[b]++;
      members[p] = static_cast<int32_t>(r);
      pos[r] = p;
      end[r] = static_cast<int32_t>(offsets[b + 1]);
    }
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

  codes.resize(static_cast<size_t>(nruns));
  code_bucket.resize(static_cast<size_t>(nruns));
  offsets.assign(static_cast<size_t>(nruns + 1), 0);
  for (int64_t k = 0; k < nruns; ++k) {
    codes[k] = code[rank(a[run_start[k]])];
    code_bucket[k] = run_bucket[k];
    offsets[run_bucket[k] + 1] = run_start[k + 1] - run_start[k];
  }
  for (int64_t b = 0; b < nruns; ++b) offsets[b + 1] += offsets[b];
  for (int64_t k = 0; k < nruns; ++k) {
    const int32_t b = run_bucket[k];
    const int32_t e = static_cast<int32_t>(offsets[b + 1]);
    int32_t p = static_cast<int32_t>(offsets[b]);
    for (int64_t q = run_start[k]; q < run_start[k + 1]; ++q, ++p) {
      const int32_t r = rank(a[q]);
      members[p] = r;
      pos[r] = p;
      end[r] = e;
    }
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
}

int64_t LSHTables::size() {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int64_t>(slot_id_.size());
}

void LSHTables::reset_items() {
  slot_id_.clear();
  slot_codes_.clear();
  id_to_slot_.clear();
  ids_are_slots_ = true;
  dirty_ = true;
}

void LSHTables::clear() {
  std::lock_guard<std::mutex> lock(mutex_);
  reset_items();
  slot_id_.shrink_to_fit();
  slot_codes_.shrink_to_fit();
}

void LSHTables::build(const uint64_t* codes, int64_t n) {
  if (n < 0 || n > kMaxItems)
    throw std::invalid_argument("build: number of items must be in 0.." +
                                std::to_string(kMaxItems) + ", got " + std::to_string(n));
  std::lock_guard<std::mutex> lock(mutex_);
  reset_items();
  slot_id_.resize(static_cast<size_t>(n));
  std::iota(slot_id_.begin(), slot_id_.end(), int64_t{0});
  slot_codes_.assign(codes, codes + n * L_);
  ensure_index();  // "build" means index now: it is what callers time, and reads stay cheap
}

int64_t LSHTables::slot_of(int64_t id) const {
  if (ids_are_slots_) return (id >= 0 && id < static_cast<int64_t>(slot_id_.size())) ? id : -1;
  return id < 0 ? -1 : id_to_slot_.find(static_cast<uint64_t>(id));
}

void LSHTables::materialize_id_map(size_t extra) {
  if (!ids_are_slots_) {
    id_to_slot_.reserve(slot_id_.size() + extra);
    return;
  }
  FlatMap m;
  m.reserve(slot_id_.size() + extra);
  bool inserted;
  for (size_t s = 0; s < slot_id_.size(); ++s)
    m.insert_or_get(static_cast<uint64_t>(slot_id_[s]), static_cast<int64_t>(s), inserted);
  id_to_slot_ = std::move(m);
  ids_are_slots_ = false;
}

void LSHTables::insert(const int64_t* ids, const uint64_t* codes, int64_t n) {
  if (n < 0) throw std::invalid_argument("insert: negative count");
  std::lock_guard<std::mutex> lock(mutex_);
  const int64_t cur = static_cast<int64_t>(slot_id_.size());
  if (n > kMaxItems - cur)
    throw std::invalid_argument("insert: the tables would hold more than " +
                                std::to_string(kMaxItems) + " items");
  // Validate everything before touching the tables, so a bad batch changes nothing.
  bool appending = true;  // ids cur, cur+1, ...: slot == id still holds, no map needed
  for (int64_t k = 0; k < n; ++k) {
    if (ids[k] < 0)
      throw std::invalid_argument("insert: id " + std::to_string(ids[k]) +
                                  " is negative; ids must be >= 0");
    if (slot_of(ids[k]) >= 0)
      throw std::invalid_argument("insert: id " + std::to_string(ids[k]) +
                                  " is already stored; remove it first");
    appending = appending && ids[k] == cur + k;
  }
  if (!appending) {
    std::vector<int64_t> sorted(ids, ids + n);
    std::sort(sorted.begin(), sorted.end());
    auto dup = std::adjacent_find(sorted.begin(), sorted.end());
    if (dup != sorted.end())
      throw std::invalid_argument("insert: id " + std::to_string(*dup) +
                                  " appears more than once in the batch");
  }
  if (n == 0) return;
  // Reserve first: after this nothing can throw, so the update is all-or-nothing.
  const bool keep_identity = ids_are_slots_ && appending;
  if (!keep_identity) materialize_id_map(static_cast<size_t>(n));
  slot_id_.reserve(static_cast<size_t>(cur + n));
  slot_codes_.reserve(static_cast<size_t>((cur + n) * L_));
  bool inserted;
  for (int64_t k = 0; k < n; ++k) {
    if (!keep_identity)
      id_to_slot_.insert_or_get(static_cast<uint64_t>(ids[k]), cur + k, inserted);
    slot_id_.push_back(ids[k]);
  }
  slot_codes_.insert(slot_codes_.end(), codes, codes + n * L_);
  dirty_ = true;
}

void LSHTables::remove(const int64_t* ids, int64_t n) {
  if (n < 0) throw std::invalid_argument("remove: negative count");
  std::lock_guard<std::mutex> lock(mutex_);
  for (int64_t k = 0; k < n; ++k)
    if (slot_of(ids[k]) < 0)
      throw std::invalid_argument("remove: id " + std::to_string(ids[k]) + " is not stored");
  std::vector<int64_t> sorted(ids, ids + n);
  std::sort(sorted.begin(), sorted.end());
  auto dup = std::adjacent_find(sorted.begin(), sorted.end());
  if (dup != sorted.end())
    throw std::invalid_argument("remove: id " + std::to_string(*dup) +
                                " appears more than once in the batch");
  if (n == 0) return;
  materialize_id_map(0);
  for (int64_t k = 0; k < n; ++k) {
    const int64_t s = id_to_slot_.find(static_cast<uint64_t>(ids[k]));
    const int64_t last = static_cast<int64_t>(slot_id_.size()) - 1;
    if (s != last) {  // move the last item into the hole: slots stay dense
      slot_id_[s] = slot_id_[last];
      std::memcpy(&slot_codes_[s * L_], &slot_codes_[last * L_], L_ * sizeof(uint64_t));
      id_to_slot_.assign(static_cast<uint64_t>(slot_id_[s]), s);
    }
    slot_id_.pop_back();
    slot_codes_.resize(slot_codes_.size() - L_);
    id_to_slot_.erase(static_cast<uint64_t>(ids[k]));
  }
  dirty_ = true;
}

void LSHTables::ensure_index() {
  if (!dirty_) return;
  reindex();
  dirty_ = false;
}

void LSHTables::reindex() {
  const int64_t n = static_cast<int64_t>(slot_id_.size());
  const int64_t L = L_;

  // Rank = position in ascending id order. Usually ids already ascend in slot order
  // (after build or appends) and then rank == slot.
  std::vector<int64_t> rank_slot;
  if (!std::is_sorted(slot_id_.begin(), slot_id_.end())) {
    rank_slot.resize(static_cast<size_t>(n));
    std::iota(rank_slot.begin(), rank_slot.end(), int64_t{0});
    std::sort(rank_slot.begin(), rank_slot.end(),
              [&](int64_t a, int64_t b) { return slot_id_[a] < slot_id_[b]; });
  }
  auto ids = std::make_shared<std::vector<int64_t>>(static_cast<size_t>(n));
  for (int64_t r = 0; r < n; ++r) (*ids)[r] = slot_id_[rank_slot.empty() ? r : rank_slot[r]];

  // One arena for the whole re-index (huge pages, see buffer.hpp): code, pos and end
  // columns per table, then a scratch region per worker, reused for each table it builds.
  const size_t un = static_cast<size_t>(n);
  // Starting threads costs tens of microseconds: small indexes are built on this thread.
  const int threads = n * L < (int64_t{1} << 15) ? 1 : threads_;
  const int W = n_workers(L, threads);
  const size_t per_worker = Table::scratch_bytes(n) + 64;
  Arena arena(static_cast<size_t>(L) * (Arena::need<uint64_t>(un) + 2 * Arena::need<int32_t>(un)) +
              static_cast<size_t>(W) * per_worker);
  std::vector<uint64_t*> code(static_cast<size_t>(L));
  std::vector<int32_t*> pos(static_cast<size_t>(L)), end(static_cast<size_t>(L));
  for (int64_t l = 0; l < L; ++l) {
    code[l] = arena.take<uint64_t>(un);
    pos[l] = arena.take<int32_t>(un);
    end[l] = arena.take<int32_t>(un);
  }
  std::vector<char*> region(static_cast<size_t>(W));
  for (int w = 0; w < W; ++w) region[w] = arena.take<char>(per_worker);

  // Rows (slot order) -> columns (rank order) in one sequential pass over the codes,
  // rather than one strided pass per table.
  const int64_t nch = n_chunks_for(n, threads_, 4096);
  parallel_for(nch, threads_, [&](int64_t c) {
    const int64_t r0 = c * n / nch, r1 = (c + 1) * n / nch;
    for (int64_t r = r0; r < r1; ++r) {
      const uint64_t* row = &slot_codes_[(rank_slot.empty() ? r : rank_slot[r]) * L];
      for (int64_t l = 0; l < L; ++l) code[l][r] = row[l];
    }
  });

  parallel_for_workers(L, threads, [&](int64_t l, int w) {
    Arena scratch(region[w], per_worker);
    tables_[l].build(code[l], n, pos[l], end[l], scratch);
  });

  // Columns -> rank-major rows (see pos_ and end_ in the header).
  pos_.resize(un * static_cast<size_t>(L));
  end_.resize(un * static_cast<size_t>(L));
  parallel_for(nch, threads_, [&](int64_t c) {
    const int64_t r0 = c * n / nch, r1 = (c + 1) * n / nch;
    for (int64_t l = 0; l < L; ++l) {
      const int32_t* pc = pos[l];
      const int32_t* ec = end[l];
      for (int64_t r = r0; r < r1; ++r) {
        pos_[r * L + l] = pc[r];
        end_[r * L + l] = ec[r];
      }
    }
  });
  rank_id_ = std::move(ids);
}

// Shared by query (codes given) and query_ids (stored items, ranks given).
RankLists LSHTables::collect(int64_t n, int64_t max_values, const uint64_t* codes,
                             const int64_t* ranks) {
  const int64_t L = L_;
  const int64_t nch = n_chunks_for(n, threads_, std::max<int64_t>(16, 8192 / L));
  std::vector<int64_t> row0(static_cast<size_t>(nch + 1));
  for (int64_t c = 0; c <= nch; ++c) row0[c] = c * n / std::max<int64_t>(nch, 1);

  // Pass 1: each query's bucket in each table, members[lo, hi); hi = -1 when it has none
  // (never equal to an end_ entry, which is >= 1). The largest of a row's buckets is a
  // lower bound on its result, so an impossible request fails before any work.
  std::vector<int32_t> lo(static_cast<size_t>(n * L)), hi(static_cast<size_t>(n * L));
  std::vector<double> lower(static_cast<size_t>(nch), 0.0);
  parallel_for(nch, threads_, [&](int64_t c) {
    for (int64_t q = row0[c]; q < row0[c + 1]; ++q) {
      int64_t biggest = 0;
      for (int64_t l = 0; l < L; ++l) {
        const Table& T = tables_[l];
        int32_t& ql = lo[q * L + l];
        int32_t& qh = hi[q * L + l];
        if (ranks) {
          // Bucket start: the last offset <= the item's position.
          const int64_t p = pos_[ranks[q] * L + l];
          ql = static_cast<int32_t>(*(std::upper_bound(T.offsets.begin(), T.offsets.end(), p) - 1));
          qh = end_[ranks[q] * L + l];
        } else {
          const int64_t b = T.find(codes[q * L + l]);
          ql = b < 0 ? 0 : static_cast<int32_t>(T.offsets[b]);
          qh = b < 0 ? -1 : static_cast<int32_t>(T.offsets[b + 1]);
        }
        biggest = std::max<int64_t>(biggest, qh - ql - (ranks ? 1 : 0));
      }
      lower[c] += static_cast<double>(biggest);
    }
  });
  const double bound = std::accumulate(lower.begin(), lower.end(), 0.0);
  if (bound > static_cast<double>(max_values))
    throw OutputTooLarge("query: the result would hold at least " + num(bound) +
                         " ids (limit " + num(static_cast<double>(max_values)) +
                         "); buckets are too large: use more bits per table or fewer queries");

  // Pass 2: union over tables, deduplicated without a scratch set: a member j found in
  // table l is kept only if it shares no bucket with the query in an earlier table, i.e.
  // it is reported by the first table where it collides. Each table's members ascend, so
  // merging keeps every row sorted.
  RankLists out;
  out.rank_id = rank_id_;
  out.row0 = row0;
  out.lens.resize(static_cast<size_t>(nch));
  out.values.resize(static_cast<size_t>(nch));
  std::atomic<int64_t> emitted{0};
  parallel_for(nch, threads_, [&](int64_t c) {
    std::vector<int32_t>& lens = out.lens[c];
    I32Buffer& vals = out.values[c];
    std::vector<int32_t> cand, scratch;
    for (int64_t q = row0[c]; q < row0[c + 1]; ++q) {
      const int64_t self = ranks ? ranks[q] : -1;
      const int32_t* qh = &hi[q * L];
      cand.clear();
      for (int64_t l = 0; l < L; ++l) {
        const int32_t* mem = tables_[l].members.data();
        const size_t before = cand.size();
        for (int32_t p = lo[q * L + l]; p < qh[l]; ++p) {
          const int32_t j = mem[p];
          if (j == self) continue;
          const int32_t* ej = &end_[static_cast<int64_t>(j) * L];
          bool seen = false;
          for (int64_t t = 0; t < l && !seen; ++t) seen = (ej[t] == qh[t]);
          if (!seen) cand.push_back(j);
        }
        merge_tail(cand, before, scratch);
      }
      const int64_t k = static_cast<int64_t>(cand.size());
      if (emitted.fetch_add(k) + k > max_values)
        throw OutputTooLarge("query: the result exceeds " + num(static_cast<double>(max_values)) +
                             " ids; buckets are too large: use more bits per table");
      lens.push_back(static_cast<int32_t>(k));
      vals.append(cand.data(), cand.size());
    }
  });
  return out;
}

RankLists LSHTables::query(const uint64_t* codes, int64_t n, int64_t max_values) {
  if (n < 0) throw std::invalid_argument("query: negative count");
  std::lock_guard<std::mutex> lock(mutex_);
  ensure_index();
  return collect(n, max_values, codes, nullptr);
}

RankLists LSHTables::query_ids(const int64_t* ids, int64_t n, int64_t max_values) {
  if (n < 0) throw std::invalid_argument("query_ids: negative count");
  std::lock_guard<std::mutex> lock(mutex_);
  ensure_index();
  const std::vector<int64_t>& rid = *rank_id_;
  std::vector<int64_t> ranks(static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) {
    // ids ascend with rank: the rank of an id is its position in rank_id_.
    auto it = std::lower_bound(rid.begin(), rid.end(), ids[k]);
    if (it == rid.end() || *it != ids[k])
      throw std::invalid_argument("query_ids: id " + std::to_string(ids[k]) + " is not stored");
    ranks[k] = it - rid.begin();
  }
  return collect(n, max_values, nullptr, ranks.data());
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
      if (l <= L - m) work += t;
    }
    const double all = static_cast<double>(pairs_of(n));
    const double lower = m == 1 ? best : std::max(0.0, (total - (m - 1) * all) / L);
    if (lower > static_cast<double>(max_pairs))
      throw OutputTooLarge(too_many_pairs(lower, m, max_pairs, "at least"));
  }

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
  std::vector<std::vector<uint64_t>> bitmaps(static_cast<size_t>(n_workers(nch, threads_)));
  parallel_for_workers(nch, threads_, [&](int64_t c, int w) {
    std::vector<int32_t>& lens = out.lens[c];
    I32Buffer& vals = out.values[c];
    lens.reserve(static_cast<size_t>(out.row0[c + 1] - out.row0[c]));
    std::vector<int32_t> scratch;
    for (int64_t i = out.row0[c]; i < out.row0[c + 1]; ++i) {
      const int32_t* pi = &pos_[i * L];
      const int32_t* ei = &end_[i * L];
      const size_t start = vals.size();

      if (m == 1 && L > 1) {
        // The j > i sharing i's bucket in table t are members[pos+1, end), ascending.
        int64_t found = 0;
        int32_t lo = INT32_MAX, hi = -1;
        for (int64_t t = 0; t < L; ++t) {
          if (pi[t] + 1 >= ei[t]) continue;
          const int32_t* mem = tables_[t].members.data();
          found += ei[t] - pi[t] - 1;
          lo = std::min(lo, mem[pi[t] + 1]);
          hi = std::max(hi, mem[ei[t] - 1]);
        }
        // Many candidates in a narrow id range (big buckets): a bitmap row dedups and sorts
        // for free. Set a bit per find, then read the words in order; no row reads of j,
        // no merging. The scan is bounded by a few words per find.
        if (found >= 64 && (hi - lo) / 64 <= 4 * found) {
          std::vector<uint64_t>& bits = bitmaps[w];
          if (bits.empty()) bits.assign(static_cast<size_t>(n / 64 + 1), 0);
          for (int64_t t = 0; t < L; ++t) {
            const int32_t* mem = tables_[t].members.data();
            for (int32_t p = pi[t] + 1; p < ei[t]; ++p)
              bits[mem[p] >> 6] |= uint64_t{1} << (mem[p] & 63);
          }
          int32_t* o = vals.extend(static_cast<size_t>(found));  // found >= distinct finds
          for (int32_t word = lo >> 6; word <= (hi >> 6); ++word) {
            uint64_t b = bits[word];
            bits[word] = 0;
            while (b) {
              *o++ = word * 64 + __builtin_ctzll(b);
              b &= b - 1;
            }
          }
          vals.truncate(static_cast<size_t>(o - vals.data()));
          const int64_t k = static_cast<int64_t>(vals.size() - start);
          lens.push_back(static_cast<int32_t>(k));
          if (k > 0 && emitted.fetch_add(k) + k > max_pairs)
            throw OutputTooLarge(too_many_pairs(static_cast<double>(max_pairs), m, max_pairs,
                                                "more than"));
          continue;
        }
      }

      // Pigeonhole: a pair colliding in >= m tables collides first in one of tables
      // 0..L-m. Enumerate only there, keep j at its first colliding table (dedup without
      // a set), and count its other collisions from end_'s row of j. The j > i sharing
      // i's bucket follow i in members: no search, and nothing to read when i is last.
      for (int64_t t = 0; t <= L - m; ++t) {
        const int32_t* mem = tables_[t].members.data();
        const size_t before = vals.size();
        for (int32_t p = pi[t] + 1; p < ei[t]; ++p) {
          const int32_t j = mem[p];
          const int32_t* ej = &end_[static_cast<int64_t>(j) * L];
          bool seen = false;
          for (int64_t u = 0; u < t && !seen; ++u) seen = (ej[u] == ei[u]);
          if (seen) continue;
          if (m > 1) {
            int64_t hits = 1;
            for (int64_t u = t + 1; u < L && hits < m; ++u) hits += (ej[u] == ei[u]);
            if (hits < m) continue;
          }
          vals.push_back(j);
        }
        // Merge this table's (ascending) finds into the row's earlier ones.
        if (before > start && vals.size() > before && vals[before - 1] > vals[before]) {
          scratch.resize(vals.size() - start);
          std::merge(vals.begin() + start, vals.begin() + before, vals.begin() + before,
                     vals.end(), scratch.begin());
          std::copy(scratch.begin(), scratch.end(), vals.begin() + start);
        }
      }
      const int64_t k = static_cast<int64_t>(vals.size() - start);
      lens.push_back(static_cast<int32_t>(k));
      if (k > 0 && emitted.fetch_add(k) + k > max_pairs)
        throw OutputTooLarge(too_many_pairs(static_cast<double>(max_pairs), m, max_pairs,
                                            "more than"));
    }
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
