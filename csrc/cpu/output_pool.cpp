// The output pool of the CPU kernels (output_pool.h): what it keeps, when it releases, and its Python bindings.
#include "output_pool.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#ifdef __linux__
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>
#define FASTJAC_OUTPUT_POOL 1
#endif

namespace fastjac::cpu {
namespace {

constexpr size_t kPoolMin = size_t(1) << 20;  // smaller outputs come from c10's allocator (glibc's heap)
constexpr size_t kHuge = size_t(2) << 20;     // blocks from 2 * kHuge are 2 MiB-aligned, advised to THP
constexpr size_t kPage = 4096;

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// The default bound on kept bytes: FASTJAC_CPU_POOL_MB, else a quarter of physical memory up to 8 GiB.
int64_t default_limit() {
  if (const char* env = std::getenv("FASTJAC_CPU_POOL_MB"); env != nullptr && *env != '\0') {
    char* end = nullptr;
    errno = 0;
    const long long mb = std::strtoll(env, &end, 10);
    TORCH_CHECK_VALUE(errno == 0 && end != env && *end == '\0' && mb >= 0 && mb < (1ll << 40),
                      "FASTJAC_CPU_POOL_MB must be a whole number of MiB >= 0 (0 turns the CPU output pool off), got '",
                      env, "'");
    return int64_t(mb) << 20;
  }
  int64_t physical = int64_t(8) << 30;
#ifdef FASTJAC_OUTPUT_POOL
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) physical = int64_t(pages) * int64_t(page);
#endif
  return std::min<int64_t>(physical / 4, int64_t(8) << 30);
}

#ifdef FASTJAC_OUTPUT_POOL

struct Block {
  void* ptr;
  size_t bytes;    // mapped bytes
  size_t request;  // bytes asked for by the tensor (what the profiler is told)
};

// Maps `bytes` (a multiple of kPage): when large, 2 MiB-aligned, and the whole 2 MiB pages of the first `request`
// bytes advised to transparent huge pages (the tail keeps 4 KiB pages, so that no more is resident than a request
// touches).
void* map_block(size_t bytes, size_t request) {
  const bool huge = bytes >= 2 * kHuge;
  const size_t span = huge ? bytes + kHuge : bytes;
  void* p = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  if (!huge) return p;
  const auto base = reinterpret_cast<uintptr_t>(p), start = round_up(base, kHuge);
  if (start > base) munmap(p, start - base);
  if (const size_t tail = base + span - (start + bytes); tail > 0) munmap(reinterpret_cast<void*>(start + bytes), tail);
#ifdef MADV_HUGEPAGE
  if (const size_t whole = request / kHuge * kHuge; whole > 0)
    madvise(reinterpret_cast<void*>(start), whole, MADV_HUGEPAGE);
#endif
  return reinterpret_cast<void*>(start);
}

void unmap(const std::vector<Block*>& blocks) {
  for (Block* b : blocks) {
    munmap(b->ptr, b->bytes);
    delete b;
  }
}

class OutputPool final : public c10::Allocator {
 public:
  OutputPool() : limit_(default_limit()) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < kPoolMin) return c10::GetCPUAllocator()->allocate(n);  // a resize of a pool tensor to a small size
    const size_t bytes = round_up(n, n >= 2 * kHuge ? kHuge : kPage);
    Block* block = nullptr;
    std::vector<Block*> evicted;
    {
      const std::lock_guard<std::mutex> lock(mu_);
      const auto hit = std::find_if(cached_.rbegin(), cached_.rend(), [&](Block* b) { return b->bytes == bytes; });
      if (hit != cached_.rend()) {
        block = *hit;
        cached_.erase(std::next(hit).base());
        cached_bytes_ -= bytes;
        ++hits_;
      } else {  // release kept blocks of at least `bytes` first: resident memory rises no more than without the pool
        ++misses_;
        const size_t target = cached_bytes_ > bytes ? cached_bytes_ - bytes : 0;
        evicted = evict_oldest_locked([&] { return cached_bytes_ > target; });
      }
    }
    unmap(evicted);
    if (block == nullptr) {
      void* p = map_block(bytes, n);
      if (p == nullptr) {
        release();  // out of address space or memory: drop what is kept and try once more
        p = map_block(bytes, n);
      }
      TORCH_CHECK(p != nullptr, "fastjac: could not map ", bytes, " bytes for a CPU kernel output (", std::strerror(errno),
                  ")");
      block = new Block{p, bytes, 0};
    }
    block->request = n;
    account(block, true);
    return {block->ptr, block, &OutputPool::free_block, c10::Device(c10::kCPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  void release() {
    std::vector<Block*> evicted;
    {
      const std::lock_guard<std::mutex> lock(mu_);
      evicted = evict_oldest_locked([&] { return true; });
    }
    unmap(evicted);
  }

  void set_limit(int64_t bytes) {
    TORCH_CHECK_VALUE(bytes >= 0, "fastjac: the CPU output pool's limit must be >= 0 bytes, got ", bytes);
    std::vector<Block*> evicted;
    {
      const std::lock_guard<std::mutex> lock(mu_);
      limit_ = bytes;
      evicted = evict_over_limit_locked();
    }
    unmap(evicted);
  }

  OutputPoolStats stats() {
    const std::lock_guard<std::mutex> lock(mu_);
    return {int64_t(live_), int64_t(cached_bytes_), limit_, hits_, misses_, released_};
  }

  // After fork() the child has one thread: a mutex another thread of the parent held stays locked in it.
  void reset_after_fork() { new (&mu_) std::mutex(); }

 private:
  static void free_block(void* ctx);

  // A freed output's block: kept, then the oldest kept blocks beyond limit_ released.
  void keep(Block* block) {
    std::vector<Block*> evicted = account(block, false);
    unmap(evicted);
  }

  // Removes kept blocks, oldest first, while `more()` holds (mu_ held); the caller unmaps them outside the lock.
  template <typename More>
  std::vector<Block*> evict_oldest_locked(const More& more) {
    size_t k = 0;
    while (k < cached_.size() && more()) cached_bytes_ -= cached_[k++]->bytes;
    std::vector<Block*> evicted(cached_.begin(), cached_.begin() + k);
    cached_.erase(cached_.begin(), cached_.begin() + k);
    released_ += int64_t(k);
    return evicted;
  }

  std::vector<Block*> evict_over_limit_locked() {
    return evict_oldest_locked([&] { return int64_t(cached_bytes_) > limit_; });
  }

  // Live-byte bookkeeping of an allocation or a free (which also keeps the block, trimming to limit_), and the
  // profiler's memory event, as c10's CPU allocator reports its blocks. Returns the blocks to unmap.
  std::vector<Block*> account(Block* block, bool allocated) {
    size_t live, reserved;
    std::vector<Block*> evicted;
    {
      const std::lock_guard<std::mutex> lock(mu_);
      if (allocated) {
        live_ += block->bytes;
      } else {
        live_ -= block->bytes;
        cached_.push_back(block);
        cached_bytes_ += block->bytes;
        evicted = evict_over_limit_locked();
      }
      live = live_, reserved = live_ + cached_bytes_;
    }
    if (c10::memoryProfilingEnabled()) {
      const int64_t size = int64_t(block->request);
      c10::reportMemoryUsageToProfiler(block->ptr, allocated ? size : -size, live, reserved, c10::Device(c10::kCPU));
    }
    return evicted;
  }

  std::mutex mu_;
  std::vector<Block*> cached_;  // kept blocks, oldest first
  size_t live_ = 0, cached_bytes_ = 0;
  int64_t limit_;
  int64_t hits_ = 0, misses_ = 0, released_ = 0;
};

OutputPool& pool() {
  // Never destroyed: tensors may outlive static destruction at exit and still return their blocks.
  static OutputPool* const instance = [] {
    auto* p = new OutputPool();
    pthread_atfork(nullptr, nullptr, [] { pool().reset_after_fork(); });
    return p;
  }();
  return *instance;
}

void OutputPool::free_block(void* ctx) { pool().keep(static_cast<Block*>(ctx)); }

#endif  // FASTJAC_OUTPUT_POOL

}  // namespace

at::Tensor empty_output(const at::Tensor& like) {
#ifdef FASTJAC_OUTPUT_POOL
  if (like.numel() * int64_t(like.element_size()) >= int64_t(kPoolMin))
    return at::Tensor(at::detail::empty_generic(like.sizes(), &pool(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                like.scalar_type(), c10::MemoryFormat::Contiguous));
#endif
  return at::empty(like.sizes(), like.options().memory_format(c10::MemoryFormat::Contiguous));
}

OutputPoolStats output_pool_stats() {
#ifdef FASTJAC_OUTPUT_POOL
  return pool().stats();
#else
  return {};
#endif
}

void release_output_pool() {
#ifdef FASTJAC_OUTPUT_POOL
  pool().release();
#endif
}

void set_output_pool_limit(int64_t bytes) {
#ifdef FASTJAC_OUTPUT_POOL
  pool().set_limit(bytes);
#else
  (void)bytes;
#endif
}

void bind_output_pool(pybind11::module& m) {
  namespace py = pybind11;
  m.def(
      "output_pool_stats",
      [] {
        const OutputPoolStats s = output_pool_stats();
        py::dict d;
        d["live_bytes"] = s.live_bytes, d["cached_bytes"] = s.cached_bytes, d["limit_bytes"] = s.limit_bytes;
        d["hits"] = s.hits, d["misses"] = s.misses, d["released_blocks"] = s.released_blocks;
        return d;
      },
      "The CPU output pool's counters (csrc/cpu/output_pool.h).");
  m.def("release_output_pool", &release_output_pool, "Unmaps every block the CPU output pool keeps.");
  m.def("set_output_pool_limit", &set_output_pool_limit, "Bound on the bytes the CPU output pool keeps (0: off).",
        py::arg("bytes"));
}

}  // namespace fastjac::cpu
