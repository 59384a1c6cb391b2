// Uninitialized scratch memory that asks for transparent huge pages when large.
//
// Why: on a VM a first-touch page fault costs microseconds, and glibc hands large freed
// blocks back to the OS, so every re-index touched its scratch arrays fresh: page
// faults were half of the build time at N = 1e5. One 2 MiB huge page per fault instead
// of 512 small ones removes most of that (numpy does the same for its large arrays).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace clsh {

class Arena {
 public:
  explicit Arena(size_t bytes) {
    constexpr size_t kHuge = size_t{1} << 21;
    if (bytes == 0) return;
#if defined(__linux__)
    if (bytes >= kHuge) {
      const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
      p_ = std::aligned_alloc(kHuge, rounded);
      if (p_) madvise(p_, rounded, MADV_HUGEPAGE);  // a hint: fine if THP is off
    }
#endif
    if (!p_) p_ = std::malloc(bytes);
    if (!p_) throw std::bad_alloc();
    size_ = bytes;
  }
  // A view of memory owned elsewhere (a region carved from a larger arena).
  Arena(void* p, size_t bytes) : p_(p), size_(bytes), owned_(false) {}
  ~Arena() {
    if (owned_) std::free(p_);
  }
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  // Carves n elements of T at a 64-byte multiple from the start (at least 16-byte aligned).
  template <class T>
  T* take(size_t n) {
    used_ = (used_ + 63) / 64 * 64;
    T* out = reinterpret_cast<T*>(static_cast<char*>(p_) + used_);
    used_ += n * sizeof(T);
    if (used_ > size_) throw std::bad_alloc();  // a sizing bug, never user input
    return out;
  }

  // Bytes to reserve for n elements of T taken with take<T>().
  template <class T>
  static size_t need(size_t n) {
    return n * sizeof(T) + 64;
  }

 private:
  void* p_ = nullptr;
  size_t size_ = 0;
  size_t used_ = 0;
  bool owned_ = true;
};

// std::allocator that asks for huge pages for blocks of 4 MiB and more (index arrays of a
// large table: codes, members, offsets), for the same reason as Arena.
template <class T>
struct HugeAlloc {
  using value_type = T;
  HugeAlloc() = default;
  template <class U>
  HugeAlloc(const HugeAlloc<U>&) {}
  T* allocate(size_t n) {
    const size_t bytes = n * sizeof(T);
    void* p = nullptr;
#if defined(__linux__)
    constexpr size_t kHuge = size_t{1} << 21;
    if (bytes >= 2 * kHuge) {
      p = std::aligned_alloc(kHuge, (bytes + kHuge - 1) / kHuge * kHuge);
      if (p) madvise(p, (bytes + kHuge - 1) / kHuge * kHuge, MADV_HUGEPAGE);
    }
#endif
    if (!p) p = std::malloc(bytes ? bytes : 1);
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <class U>
  bool operator==(const HugeAlloc<U>&) const { return true; }
  template <class U>
  bool operator!=(const HugeAlloc<U>&) const { return false; }
};

template <class T>
using HugeVector = std::vector<T, HugeAlloc<T>>;

// Growable int32 array for results: growth without value-initialization (a result is
// written exactly once), realloc so that large blocks move by remapping instead of copying,
// and a huge-page hint once a block is large (a 100M-pair result touches gigabytes).
class I32Buffer {
 public:
  I32Buffer() = default;
  ~I32Buffer() { std::free(p_); }
  I32Buffer(const I32Buffer&) = delete;
  I32Buffer& operator=(const I32Buffer&) = delete;
  I32Buffer(I32Buffer&& o) noexcept : p_(o.p_), n_(o.n_), cap_(o.cap_) {
    o.p_ = nullptr;
    o.n_ = o.cap_ = 0;
  }
  I32Buffer& operator=(I32Buffer&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    std::swap(cap_, o.cap_);
    return *this;
  }

  size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }
  int32_t* data() { return p_; }
  const int32_t* data() const { return p_; }
  int32_t* begin() { return p_; }
  int32_t* end() { return p_ + n_; }
  const int32_t* begin() const { return p_; }
  const int32_t* end() const { return p_ + n_; }
  int32_t& operator[](size_t i) { return p_[i]; }
  int32_t operator[](size_t i) const { return p_[i]; }

  void push_back(int32_t v) {
    if (n_ == cap_) grow(n_ + 1);
    p_[n_++] = v;
  }
  // Appends k uninitialized elements and returns a pointer to the first.
  int32_t* extend(size_t k) {
    if (n_ + k > cap_) grow(n_ + k);
    int32_t* out = p_ + n_;
    n_ += k;
    return out;
  }
  void append(const int32_t* a, size_t k) {
    if (k) std::memcpy(extend(k), a, k * sizeof(int32_t));
  }
  void truncate(size_t k) { n_ = std::min(n_, k); }

 private:
  void grow(size_t need) {
    const size_t cap = std::max<size_t>({need, 2 * cap_, 16});
    void* q = std::realloc(p_, cap * sizeof(int32_t));
    if (!q) throw std::bad_alloc();
    p_ = static_cast<int32_t*>(q);
    cap_ = cap;
#if defined(__linux__)
    constexpr uintptr_t kHuge = uintptr_t{1} << 21;
    if (cap_ * sizeof(int32_t) >= 2 * kHuge) {
      const uintptr_t a = reinterpret_cast<uintptr_t>(p_);
      const uintptr_t s = (a + kHuge - 1) & ~(kHuge - 1);
      const uintptr_t e = (a + cap_ * sizeof(int32_t)) & ~(kHuge - 1);
      if (e > s) madvise(reinterpret_cast<void*>(s), e - s, MADV_HUGEPAGE);
    }
#endif
  }

  int32_t* p_ = nullptr;
  size_t n_ = 0, cap_ = 0;
};

}  // namespace clsh
