// Minimal std::thread work pool for clsh: one call = one fork/join.
//
// std::thread instead of OpenMP so that the extension links the same way with gcc,
// clang and Apple clang, and never pulls a second OpenMP runtime into a process that
// already has torch's. Work is handed out dynamically (an atomic task counter), and
// every task writes only to its own output slot, so results never depend on the
// number of threads or on scheduling.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace clsh {

// 0 (or negative) = all hardware threads.
inline int resolve_threads(int n_threads) {
  if (n_threads > 0) return n_threads;
  unsigned hc = std::thread::hardware_concurrency();
  return hc == 0 ? 1 : static_cast<int>(hc);
}

// Calls body(task, worker) for every task in [0, n_tasks) on up to n_threads threads;
// worker in [0, n_workers(n_tasks, n_threads)) identifies the thread, so a task may use
// per-worker scratch memory. The first exception thrown by any task stops the remaining
// tasks and is rethrown in the calling thread (an exception escaping a std::thread
// would abort the process).
inline int n_workers(int64_t n_tasks, int n_threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(std::max(n_threads, 1), n_tasks)));
}

template <class Body>
void parallel_for_workers(int64_t n_tasks, int n_threads, Body&& body) {
  if (n_tasks <= 0) return;
  const int nt = n_workers(n_tasks, n_threads);
  if (nt <= 1) {
    for (int64_t t = 0; t < n_tasks; ++t) body(t, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto worker = [&](int w) {
    for (;;) {
      if (failed.load(std::memory_order_relaxed)) return;
      const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
      if (t >= n_tasks) return;
      try {
        body(t, w);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        failed.store(true);
        return;
      }
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(nt - 1));
  for (int w = 1; w < nt; ++w) {
    // If the OS refuses another thread, run with the ones we have: the result is the same.
    try {
      threads.emplace_back(worker, w);
    } catch (...) {
      break;
    }
  }
  worker(0);
  for (auto& th : threads) th.join();
  if (error) std::rethrow_exception(error);
}

// Same without the worker index.
template <class Body>
void parallel_for(int64_t n_tasks, int n_threads, Body&& body) {
  parallel_for_workers(n_tasks, n_threads, [&](int64_t t, int) { body(t); });
}

// Number of chunks to cut n items into: enough chunks per thread that a few huge
// buckets cannot leave threads idle, but not so many that bookkeeping dominates.
inline int64_t n_chunks_for(int64_t n, int n_threads, int64_t min_chunk = 512) {
  if (n <= 0) return 0;
  int64_t by_threads = static_cast<int64_t>(n_threads) * 16;
  int64_t by_size = (n + min_chunk - 1) / min_chunk;
  return std::max<int64_t>(1, std::min(by_threads, by_size));
}

}  // namespace clsh
