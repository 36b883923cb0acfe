// A caching pool of large, 2 MiB-aligned host blocks for the CPU outputs and workspaces of the ops.
//
// Why: glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh mmap and
// returns it to the kernel on free, so each training step pays first-touch page faults on every
// large temporary again: measured on a 2-core Xeon VM, a fresh 128 MiB tensor costs ~29 ms to touch
// where a reused one costs ~1 ms, as much as a third of the encoder GEMM at the cpu-small shape.
// Blocks of at least kMinBytes are taken from here instead: a freed tensor's block goes back to the
// pool (up to a byte limit) and the next request of the same rounded size reuses it, warm. New
// blocks are advised MADV_HUGEPAGE on Linux (transparent huge pages: ~3x cheaper first touch there,
// and fewer TLB misses for the kernels' random row gathers).
//
// The limit (bytes the pool may hold while unused) defaults to FASTCLT_HOST_POOL_MB (MiB; 4096 when
// unset; 0 turns the pool off); a freed block that does not fit evicts older unused blocks first. Thread-safe. Tensors from the pool are ordinary CPU tensors except
// that their storage cannot be resized in place to a larger size.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fastclt {
namespace host_pool {

// Requests below this many bytes go to at::empty (the allocator serves them well).
constexpr int64_t kMinBytes = int64_t(2) << 20;

// An uninitialised contiguous CPU tensor; from the pool when it holds at least kMinBytes.
at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options);

struct Stats {
  int64_t cached_bytes;  // held by the pool, unused
  int64_t cached_blocks;
  int64_t limit_bytes;
  int64_t hits;    // requests served from the pool
  int64_t misses;  // requests that allocated a new block
};

Stats stats();
// Frees every unused block the pool holds.
void release();
// Sets the limit on unused bytes held (0: no caching) and frees what is over it.
void set_limit(int64_t bytes);

}  // namespace host_pool
}  // namespace fastclt
