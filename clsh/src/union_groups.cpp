// Greedy agglomeration of scored candidate pairs with a union-find (disjoint-set forest).
//
// The merge engine verifies LSH candidates (e.g. cosine similarity) and then merges the
// most similar pairs first, under a cap on group size and on the number of merges (to hit
// a target width). Sequential by nature: each union depends on the ones before it.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "lsh_tables.hpp"

namespace clsh {

namespace {

int64_t find_root(std::vector<int64_t>& parent, int64_t x) {
  while (parent[x] != x) {
    parent[x] = parent[parent[x]];  // path halving: near-constant amortized depth
    x = parent[x];
  }
  return x;
}

}  // namespace

std::vector<int64_t> union_groups(int64_t n, const int64_t* pairs, const double* scores,
                                  int64_t n_pairs, int64_t max_group_size,
                                  int64_t max_merges) {
  if (n < 0) throw std::invalid_argument("union_groups: n must be >= 0, got " + std::to_string(n));
  if (max_group_size < 0)
    throw std::invalid_argument("union_groups: max_group_size must be >= 0 (0 = unlimited), got " +
                                std::to_string(max_group_size));
  if (max_merges < -1)
    throw std::invalid_argument("union_groups: max_merges must be >= -1 (-1 = unlimited), got " +
                                std::to_string(max_merges));
  for (int64_t p = 0; p < n_pairs; ++p) {
    for (int k = 0; k < 2; ++k) {
      const int64_t v = pairs[2 * p + k];
      if (v < 0 || v >= n)
        throw std::invalid_argument("union_groups: pair " + std::to_string(p) + " has item " +
                                    std::to_string(v) + " outside 0.." + std::to_string(n - 1));
    }
    if (std::isnan(scores[p]))
      throw std::invalid_argument("union_groups: score of pair " + std::to_string(p) + " is NaN");
  }

  std::vector<int64_t> order(static_cast<size_t>(n_pairs));
  std::iota(order.begin(), order.end(), int64_t{0});
  // Stable, so equal scores keep the caller's order and the result is reproducible.
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return scores[a] > scores[b]; });

  std::vector<int64_t> parent(static_cast<size_t>(n)), size(static_cast<size_t>(n), 1);
  std::iota(parent.begin(), parent.end(), int64_t{0});
  int64_t merges = 0;
  if (max_merges != 0) {
    for (int64_t p : order) {
      int64_t a = find_root(parent, pairs[2 * p]);
      int64_t b = find_root(parent, pairs[2 * p + 1]);
      if (a == b) continue;
      if (max_group_size > 0 && size[a] + size[b] > max_group_size) continue;
      if (size[a] < size[b]) std::swap(a, b);  // union by size keeps trees shallow
      parent[b] = a;
      size[a] += size[b];
      if (++merges == max_merges) break;
    }
  }

  // Number groups in order of their smallest member: scanning items ascending meets
  // each group first at its smallest member.
  std::vector<int64_t> labels(static_cast<size_t>(n)), root_label(static_cast<size_t>(n), -1);
  int64_t next = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = find_root(parent, i);
    if (root_label[r] < 0) root_label[r] = next++;
    labels[i] = root_label[r];
  }
  return labels;
}

}  // namespace clsh
