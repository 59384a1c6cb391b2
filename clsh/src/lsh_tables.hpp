// clsh: multi-table LSH bucket index over integer codes, and greedy union of scored pairs.
//
// An item is a row of L codes (one uint64 per hash table, e.g. K packed SimHash sign
// bits). Two items are candidates when their codes are equal in at least one table
// (the multi-table scheme of Indyk & Motwani 1998; Charikar 2002 for sign bits). No
// Python here: the Cython layer (clsh/_clsh.pyx) validates dtypes and shapes and calls
// these methods with the GIL released.
//
// Layout. build() stores items 0..N-1, one column of codes per table, and indexes them in
// parallel over tables: per table its buckets in CSR form (buckets ordered by smallest
// member, members ascending) and, on first use, per item its position and bucket end in
// each table. Results are rank lists; ranks are ids (0..N-1).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "buffer.hpp"

namespace clsh {

// Raised when a result would not fit in memory (a bucket of size s yields s(s-1)/2
// pairs, so huge buckets make the output quadratic). Translated to MemoryError.
struct OutputTooLarge : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Rows of rank lists, filled in parallel chunks of consecutive rows (chunk c holds rows
// row0[c] .. row0[c+1]-1). Ranks are stored as int32, a quarter of the int64 (i, j) pairs
// they become: the intermediate stays small and the numpy output, allocated by the
// caller once total() is known, is written exactly once, mapping ranks to ids on the fly.
struct RankLists {
  std::shared_ptr<const std::vector<int64_t>> rank_id;  // kept alive with the result
  std::vector<int64_t> row0;
  std::vector<std::vector<int32_t>> lens;    // per chunk: length of each row
  std::vector<I32Buffer> values;             // per chunk: its rows' ranks, concatenated

  int64_t n_rows() const { return row0.empty() ? 0 : row0.back(); }
  int64_t total() const;
  void write_offsets(int64_t* out) const;                // n_rows + 1 CSR offsets
  void write_ids(int64_t* out, int n_threads) const;     // values as ids
  void write_pairs(int64_t* out, int n_threads) const;   // (id of row r, id of value), row r = rank r
};

struct Stats {
  int64_t n_items = 0;
  int64_t n_tables = 0;
  std::vector<int64_t> buckets_per_table;
  std::vector<int64_t> pairs_per_table;  // sum over buckets of size*(size-1)/2
  int64_t max_bucket = 0;
  double mean_bucket = 0.0;
};

// Most int64 values one result may hold: a quarter of physical memory, so that a
// degenerate input (all codes equal) fails with MemoryError instead of waking the OOM killer.
int64_t default_output_limit();

class LSHTables {
 public:
  static constexpr int64_t kMaxTables = 65536;
  static constexpr int64_t kMaxItems = 2147483647;  // ranks and bucket numbers are int32

  LSHTables(int64_t n_tables, int n_threads);

  int64_t n_tables() const { return L_; }
  int n_threads() const { return threads_; }
  int64_t size();

  // Replaces the contents with items 0..n-1; codes is n x L, row-major. Indexes at once.
  void build(const uint64_t* codes, int64_t n);
  void clear();

  // Non-empty buckets of one table (rows), ordered by smallest member, members ascending.
  RankLists buckets(int64_t table);
  // Row i holds the j > i colliding with i in >= min_tables tables, ascending: write_pairs
  // gives the pairs sorted lexicographically. OutputTooLarge beyond max_pairs pairs.
  RankLists candidate_pairs(int64_t min_tables, int64_t max_pairs);
  Stats stats();

 private:
  struct Table {
    // How codes are grouped and looked up, chosen per table and per re-index:
    //  kDense:  codes span a range <= 2n + 1024 (K <= ~17 bits): a direct-address array
    //           code - min -> bucket; one pass, no sort.
    //  kNarrow: codes agree above bit 31: radix sort (low 32 bits, rank) in 8-byte words.
    //  kWide:   otherwise: radix sort by a 32-bit hash; a run of equal hash that mixes codes
    //           (probability ~n^2 / 2^33) is split by comparing full codes.
    enum Mode { kDense, kNarrow, kWide };
    Mode mode = kDense;
    std::vector<int32_t> dense;         // kDense: bucket of code min + k, or -1
    HugeVector<int64_t> offsets;        // n_buckets + 1
    HugeVector<int32_t> members;        // ranks

    uint32_t key(uint64_t code) const;  // radix modes: 32-bit sort key
    // (Re)builds from the codes of ranks 0..n-1.
    void build(const uint64_t* code_of_rank, int64_t n, Arena& scratch);
    static size_t scratch_bytes(int64_t n);  // what build takes from scratch
  };

  RankLists pairs_by_sorting(int64_t m, int64_t occurrences, int64_t max_pairs);
  void ensure_index();  // callers hold mutex_
  void reindex();
  void reset_items();

  std::mutex mutex_;
  int64_t L_;
  int threads_;

  // Items 0..n-1.
  std::vector<int64_t> slot_id_;
  std::vector<HugeVector<uint64_t>> codes_;  // per table, the code of each item

  // Index in rank space, valid when !dirty_.
  bool dirty_ = true;
  std::shared_ptr<std::vector<int64_t>> rank_id_;  // ascending ids; shared with results
  // Per table (L x n, table-major): rank i's position in that table's members, and the end
  // of its bucket there; the j > i sharing i's bucket are members[pos + 1, end). Built on
  // first use (dense-bucket pairs): sparse pair enumeration never needs them.
  HugeVector<int32_t> pos_, end_;
  bool positions_ = false;
  void ensure_positions();
  std::vector<Table> tables_;
};

// Greedy agglomeration: visit pairs by descending score (stable on ties), union their
// groups unless the merged size would exceed max_group_size (0 = unlimited), stop after
// max_merges successful unions (-1 = unlimited). Returns labels 0..G-1 numbered in order
// of each group's smallest member.
std::vector<int64_t> union_groups(int64_t n, const int64_t* pairs, const double* scores,
                                  int64_t n_pairs, int64_t max_group_size,
                                  int64_t max_merges);

// Sign bits of a row-major (n, L*K) projection matrix packed into (n, L) codes: bit k of
// code l is set when proj[r, l*K + k] >= 0. Threaded over rows.
void pack_signs(const float* proj, int64_t n, int64_t n_cols, int K, uint64_t* out, int n_threads);
void pack_signs(const double* proj, int64_t n, int64_t n_cols, int K, uint64_t* out, int n_threads);

}  // namespace clsh
