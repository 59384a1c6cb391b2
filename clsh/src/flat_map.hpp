// Open-addressing hash map uint64 -> int64 (linear probing, power-of-two capacity,
// load factor <= 1/2, backward-shift deletion), used for id -> slot after insert/remove.
//
// Why not std::unordered_map: one node allocation per entry and a pointer chase per
// lookup. Keys and values sit side by side so a lookup costs one cache miss.
#pragma once

#include <cstdint>
#include <cstddef>
#include <vector>

namespace clsh {

// murmur3's 64-bit finalizer: a bijection with full avalanche, so low-entropy keys
// (K = 1 codes are only 0 and 1; ids are 0..N-1) still spread over a table.
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

class FlatMap {
 public:
  static constexpr int64_t kAbsent = -1;

  FlatMap() = default;

  size_t size() const { return size_; }

  void clear() {
    slots_.clear();
    slots_.shrink_to_fit();
    mask_ = 0;
    size_ = 0;
  }

  void reserve(size_t n) {
    size_t want = 16;
    while (want < 2 * n) want <<= 1;
    if (want > slots_.size()) rehash(want);
  }

  // Value stored under key, or kAbsent.
  int64_t find(uint64_t key) const {
    if (slots_.empty()) return kAbsent;
    size_t i = mix(key) & mask_;
    for (;;) {
      const Slot& s = slots_[i];
      if (s.value == kAbsent) return kAbsent;
      if (s.key == key) return s.value;
      i = (i + 1) & mask_;
    }
  }

  // Returns the value stored under key; if key was absent, stores `value` first and
  // sets inserted = true. value must be >= 0.
  int64_t insert_or_get(uint64_t key, int64_t value, bool& inserted) {
    if (2 * (size_ + 1) > slots_.size()) rehash(slots_.empty() ? 16 : 2 * slots_.size());
    size_t i = mix(key) & mask_;
    for (;;) {
      Slot& s = slots_[i];
      if (s.value == kAbsent) {
        s.key = key;
        s.value = value;
        ++size_;
        inserted = true;
        return value;
      }
      if (s.key == key) {
        inserted = false;
        return s.value;
      }
      i = (i + 1) & mask_;
    }
  }

  // Overwrites the value of a key that must be present.
  void assign(uint64_t key, int64_t value) {
    size_t i = mix(key) & mask_;
    while (slots_[i].key != key || slots_[i].value == kAbsent) i = (i + 1) & mask_;
    slots_[i].value = value;
  }

  // Removes key if present. Backward-shift deletion keeps probe chains intact without
  // tombstones, so a table that sees many insert/remove cycles never degrades.
  bool erase(uint64_t key) {
    if (slots_.empty()) return false;
    size_t i = mix(key) & mask_;
    for (;;) {
      const Slot& s = slots_[i];
      if (s.value == kAbsent) return false;
      if (s.key == key) break;
      i = (i + 1) & mask_;
    }
    size_t j = i;
    for (;;) {
      j = (j + 1) & mask_;
      if (slots_[j].value == kAbsent) break;
      const size_t home = mix(slots_[j].key) & mask_;
      // The entry at j may move into the hole at i unless its home lies cyclically in (i, j].
      const bool stays = (i <= j) ? (i < home && home <= j) : (i < home || home <= j);
      if (stays) continue;
      slots_[i] = slots_[j];
      i = j;
    }
    slots_[i].value = kAbsent;
    --size_;
    return true;
  }

 private:
  struct Slot {
    uint64_t key = 0;
    int64_t value = kAbsent;
  };

  static inline uint64_t mix(uint64_t x) { return mix64(x); }

  void rehash(size_t capacity) {
    std::vector<Slot> old;
    old.swap(slots_);
    slots_.assign(capacity, Slot{});
    mask_ = capacity - 1;
    for (const Slot& s : old) {
      if (s.value == kAbsent) continue;
      size_t i = mix(s.key) & mask_;
      while (slots_[i].value != kAbsent) i = (i + 1) & mask_;
      slots_[i] = s;
    }
  }

  std::vector<Slot> slots_;
  size_t mask_ = 0;
  size_t size_ = 0;
};

}  // namespace clsh
