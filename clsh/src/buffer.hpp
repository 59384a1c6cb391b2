// Uninitialized scratch memory that asks for transparent huge pages when large.
//
// Why: on a VM a first-touch page fault costs microseconds, and glibc hands large freed
// blocks back to the OS, so every re-index touched its scratch arrays fresh: page
// faults were half of the build time at N = 1e5. One 2 MiB huge page per fault instead
// of 512 small ones removes most of that (numpy does the same for its large arrays).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

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

}  // namespace clsh
