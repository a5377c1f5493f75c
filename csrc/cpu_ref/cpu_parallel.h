// Dynamic work distribution over at::parallel_for threads, shared by the CPU kernels.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace mate::cpu {

// Runs fn(item) for item in [0, n) on all threads, taking items one at a time so
// that uneven items (causal) balance; items are ordered heaviest first by the caller.
// `serial`: run on the calling thread (work too small to pay for waking the pool).
template <typename F>
inline void parallel_items(int64_t n, const F& fn, bool serial = false) {
  if (n <= 0) return;
  if (serial) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  });
}

}  // namespace mate::cpu
