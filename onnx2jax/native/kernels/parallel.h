// Work shared between the calling thread and XLA's intra-op pool, for the kernels in this
// folder (conv2d.cc, attention.cc).
//
// Items are claimed from a counter, so a pool task that starts late finds nothing left and
// returns: the caller never waits for a task to start, only for claimed items to finish (no
// deadlock when every pool thread is itself busy in such a call).

#ifndef ONNX2JAX_KERNELS_PARALLEL_H_
#define ONNX2JAX_KERNELS_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <pthread.h>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace onnx2jax {

class SharedWork {
 public:
  // `body(first, last)` computes items [first, last); `claim` items are taken at a time.
  SharedWork(int64_t items, int64_t claim, std::function<void(int64_t, int64_t)> body)
      : items_(items), claim_(std::max<int64_t>(1, claim)), body_(std::move(body)) {}

  void Run() {
    for (int64_t first; (first = next_.fetch_add(claim_)) < items_;) {
      const int64_t last = std::min(items_, first + claim_);
      body_(first, last);
      if (done_.fetch_add(last - first) + (last - first) == items_) {
        std::lock_guard<std::mutex> lock(mutex_);
        finished_.notify_all();
      }
    }
  }

  // Computes every item and returns when all are done; `flops` is the whole job's cost.
  //
  // A job of under kFlopsPerThread flops runs on the calling thread: handing it to the pool
  // (schedule, wake a worker, sleep or spin until it is done) cost more than computing it (tiny
  // MLPs, CNNs and decode steps: benchmarks/LOG.md). A larger one uses at most one thread per
  // kFlopsPerThread, so every thread it wakes gets work that pays for the waking.
  //
  // XLA runs a call on one of its pool's workers, each pinned to a CPU of its own
  // (onnx2jax/runtime/cputhreads.py), or on a thread of its own. A worker computes its share
  // and waits for the others by spinning. Any other thread shares a CPU with a worker, so it sleeps
  // while the workers compute (measured faster than computing or spinning too:
  // benchmarks/LOG.md). If no worker has started within a millisecond (each busy elsewhere),
  // it computes too.
  static void RunOn(xla::ffi::ThreadPool& pool, const std::shared_ptr<SharedWork>& work,
                    int64_t flops) {
    const int64_t wanted = std::min(std::max<int64_t>(1, pool.num_threads()),
                                    std::max<int64_t>(1, flops / kFlopsPerThread));
    if (wanted == 1 || work->items_ <= 1) {
      work->Run();
      return;
    }
    char name[16] = {};
    pthread_getname_np(pthread_self(), name, sizeof name);
    const bool worker = std::strncmp(name, "tf_XLAEigen", 11) == 0;
    const int64_t helpers = std::min(wanted, work->items_) - (worker ? 1 : 0);
    for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
    auto finished = [&] { return work->done_.load(std::memory_order_acquire) == work->items_; };
    if (!worker) {
      std::unique_lock<std::mutex> lock(work->mutex_);
      while (!work->finished_.wait_for(lock, std::chrono::milliseconds(1), finished))
        if (work->next_.load() == 0) break;
    }
    // Every item is claimed once this returns, and claimed items are being computed.
    work->Run();
    while (!finished()) std::this_thread::yield();
  }

 private:
  // The least work worth a thread of its own: smaller shares cost more to hand off than to compute.
  static constexpr int64_t kFlopsPerThread = int64_t{1} << 21;

  const int64_t items_, claim_;
  const std::function<void(int64_t, int64_t)> body_;
  std::atomic<int64_t> next_{0}, done_{0};
  std::mutex mutex_;  // with `finished_`: a caller that sleeps until done
  std::condition_variable finished_;
};

}  // namespace onnx2jax

#endif  // ONNX2JAX_KERNELS_PARALLEL_H_
