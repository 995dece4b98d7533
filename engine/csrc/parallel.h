// parallel_for for our kernels, on a pool of our own threads instead of at::parallel_for's
// OpenMP teams.
//
// Why: libgomp keeps a team per calling thread, and counts every team's threads. The server
// runs the engine's steps on a thread of its own beside other threads that hold teams (the
// main thread's, the encoders'), so libgomp counts more threads than cores and lets its
// workers spin only briefly before sleeping: each parallel region from the engine's thread then
// waited ~60-110 µs for a worker to wake. A batch-1 decode step makes ~150 regions (four
// projections and attention per layer, the LM head): 20 ms on the engine's thread against
// 8 ms on the main thread (BENCHMARKS.md). Here a region wakes workers that spin between
// regions (a step's come tens of microseconds apart) and sleep only after kSpin of nothing.
//
// Semantics follow at::parallel_for: fn(chunk_begin, chunk_end) over [begin, end) in at most
// at::get_num_threads() contiguous chunks of at least `grain`; inline when that is one chunk,
// inside another region, or while another thread holds the pool (the encoders' threads may
// call our kernels as the engine does: one of them then runs alone rather than waiting).
#pragma once
#include <ATen/Parallel.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace attnserve {

class WorkerPool {
 public:
  using Chunk = std::function<void(int64_t, int64_t)>;

  static WorkerPool& instance() {
    static WorkerPool* pool = new WorkerPool();   // never destroyed: its threads run to exit
    return *pool;
  }

  // False when the pool is busy (the caller then runs the loop itself).
  bool run(int64_t begin, int64_t end, int64_t num_chunks, const Chunk& fn) {
    std::unique_lock<std::mutex> held(busy_, std::try_to_lock);
    if (!held.owns_lock()) return false;
    if (owner_pid_ != getpid()) forget_workers();   // a forked child has none of them
    while (static_cast<int64_t>(workers_.size()) < num_chunks - 1) start_worker();
    task_ = &fn;
    begin_ = begin;
    end_ = end;
    num_chunks_ = num_chunks;
    error_ = nullptr;
    pending_.store(static_cast<int64_t>(workers_.size()), std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    run_chunk(0);                                   // the caller takes the first chunk
    while (pending_.load(std::memory_order_acquire) > 0) pause();
    if (error_) std::rethrow_exception(error_);
    return true;
  }

 private:
  static constexpr auto kSpin = std::chrono::microseconds(50);

  static void pause() {
#if defined(__x86_64__)
    _mm_pause();
#endif
  }

  void run_chunk(int64_t index) {
    if (index >= num_chunks_) return;
    const int64_t size = (end_ - begin_ + num_chunks_ - 1) / num_chunks_;
    const int64_t first = begin_ + index * size, last = std::min(end_, first + size);
    if (first >= last) return;
    try {
      in_region() = true;
      (*task_)(first, last);
      in_region() = false;
    } catch (...) {
      in_region() = false;
      std::lock_guard<std::mutex> lock(error_mutex_);
      if (!error_) error_ = std::current_exception();
    }
  }

  void start_worker() {
    const int64_t index = static_cast<int64_t>(workers_.size()) + 1;   // chunk 0 is the caller's
    workers_.emplace_back([this, index, seen = generation_.load()]() mutable {
      for (;;) {
        seen = wait_for_work(seen);
        run_chunk(index);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
      }
    });
    workers_.back().detach();
  }

  uint64_t wait_for_work(uint64_t seen) {
    const auto spin_until = std::chrono::steady_clock::now() + kSpin;
    for (int spins = 0;; ++spins) {
      const uint64_t now = generation_.load(std::memory_order_acquire);
      if (now != seen) return now;
      pause();
      if (spins % 64 == 63 && std::chrono::steady_clock::now() > spin_until) break;
    }
    std::unique_lock<std::mutex> lock(sleep_mutex_);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    wake_.wait(lock, [&] { return generation_.load(std::memory_order_seq_cst) != seen; });
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
    return generation_.load(std::memory_order_acquire);
  }

  void forget_workers() {
    workers_.clear();                               // (detached; in a child they do not exist)
    owner_pid_ = getpid();
  }

 public:
  static bool& in_region() {
    thread_local bool inside = false;
    return inside;
  }

 private:
  std::mutex busy_, sleep_mutex_, error_mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> pending_{0}, sleepers_{0};
  std::vector<std::thread> workers_;
  pid_t owner_pid_ = getpid();
  const Chunk* task_ = nullptr;
  int64_t begin_ = 0, end_ = 0, num_chunks_ = 0;
  std::exception_ptr error_;
};

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& fn) {
  if (begin >= end) return;
  const int64_t range = end - begin;
  const int64_t chunks = std::min<int64_t>(at::get_num_threads(), (range + grain - 1) / std::max<int64_t>(grain, 1));
  if (chunks <= 1 || WorkerPool::in_region() ||
      !WorkerPool::instance().run(begin, end, chunks, WorkerPool::Chunk(fn))) {
    fn(begin, end);
  }
}

}  // namespace attnserve
