// CPU kernel of layerfast::swap_ (schema: csrc/layerfast.cpp).
//
// Pairs that are dense with the same layout are swapped as raw bytes: their byte ranges are cut
// into 128 KiB chunks, and the chunks of the whole list are shared among the intra-op threads
// (at::parallel_for), so a list of many small tensors is as parallel as one big tensor. Each
// chunk is std::swap_ranges over bytes, which compilers vectorize. Other pairs fall back to three
// copies through a temporary (csrc/swap.h).
#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../swap.h"

namespace layerfast {
namespace {

constexpr int64_t kChunkBytes = int64_t{128} << 10;
// Chunks per parallel task.
constexpr int64_t kGrainChunks = 4;
// Below this many bytes in total the list is swapped on the calling thread: every tensor is at
// least one chunk, so a list of small tensors was split over the OpenMP threads for a few
// hundred KB, and waking them cost milliseconds on a busy machine (microseconds of work).
constexpr int64_t kSerialBytes = int64_t{1} << 20;

struct Chunk {
  uint8_t* a;
  uint8_t* b;
  int64_t nbytes;
};

void swap_cpu(at::TensorList a, at::TensorList b) {
  swap::check_args(a, b);
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const at::Tensor& x = a[i];
    const at::Tensor& y = b[i];
    TORCH_CHECK(
        x.is_cpu(), "layerfast::swap_: the CPU kernel got a[", i, "] and b[", i, "] on ",
        x.device(), "; all tensors of one call must be on the same device");
    if (x.numel() == 0 || swap::same_memory(x, y)) {
      continue;
    }
    if (!swap::bytewise_swappable(x, y)) {
      swap::swap_by_copy(x, y);
      continue;
    }
    auto* pa = static_cast<uint8_t*>(x.data_ptr());
    auto* pb = static_cast<uint8_t*>(y.data_ptr());
    const int64_t nbytes = x.numel() * static_cast<int64_t>(x.element_size());
    total += nbytes;
    for (int64_t off = 0; off < nbytes; off += kChunkBytes) {
      chunks.push_back({pa + off, pb + off, std::min(kChunkBytes, nbytes - off)});
    }
  }
  auto swap_chunks = [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& ch = chunks[c];
      std::swap_ranges(ch.a, ch.a + ch.nbytes, ch.b);
    }
  };
  const auto n = static_cast<int64_t>(chunks.size());
  if (total < kSerialBytes) {
    swap_chunks(0, n);
  } else {
    at::parallel_for(0, n, kGrainChunks, swap_chunks);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(layerfast, CPU, m) {
  m.impl("swap_", &swap_cpu);
}

}  // namespace layerfast
