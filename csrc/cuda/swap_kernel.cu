// CUDA kernel of layerfast::swap_ (schema: csrc/layerfast.cpp).
//
// Multi-tensor apply in the style of apex: the pointers and byte counts of up to kMaxTensors
// pairs travel in ONE kernel argument (a __grid_constant__ struct), each pair is cut into
// kChunkBytes chunks, and block g swaps global chunk g, finding its pair by binary search over
// the per-pair prefix sums of chunk counts. A chunk is swapped with 16-byte vector loads when
// both addresses have the same offset modulo 16 (the usual case: allocations are 512-byte
// aligned), 4-byte ones when they agree modulo 4, bytes otherwise; unaligned heads and the tail
// are swapped bytewise.
//
// Launches per call:
// - Kernel arguments above 4 KiB need CUDA >= 12.1 (toolkit and driver) and compute capability
//   >= 7.0. Where both hold, one launch carries up to kMaxTensorsLarge = 1024 pairs (a 28 KiB
//   argument); otherwise kMaxTensorsSmall = 96 pairs (fits the classic 4 KiB limit). Lists of up
//   to 96 pairs always use the small argument, so the common short list costs a small launch.
// - A longer list takes ceil(n / capacity) launches, all on the current stream.
// - Pairs that are not dense with the same layout (see csrc/swap.h) are swapped with three
//   copies through a temporary instead (extra kernels, same stream).
// Everything runs on the current stream of the tensors' device; nothing synchronizes the host.
#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "../swap.h"

namespace layerfast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunkBytes = int64_t{64} << 10;
constexpr int kUnroll = 4;
constexpr int kMaxTensorsSmall = 96;
constexpr int kMaxTensorsLarge = 1024;

template <int N>
struct SwapArgs {
  uint8_t* a[N];
  uint8_t* b[N];
  int64_t nbytes[N];
  int32_t first_chunk[N + 1];  // prefix sums of chunk counts; first_chunk[n] = total chunks
  int32_t n;
};
static_assert(sizeof(SwapArgs<kMaxTensorsSmall>) <= 4096, "small SwapArgs must fit 4 KiB");
static_assert(sizeof(SwapArgs<kMaxTensorsLarge>) <= 32764, "large SwapArgs must fit 32764 B");

// Swaps n units of type V between a and b; the block's threads stride over the units with
// kUnroll independent loads in flight per thread.
template <typename V>
__device__ __forceinline__ void swap_units(V* __restrict__ a, V* __restrict__ b, int64_t n) {
  int64_t i = threadIdx.x;
  for (; i + (kUnroll - 1) * kThreads < n; i += kUnroll * kThreads) {
    V x[kUnroll];
    V y[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      x[u] = a[i + u * kThreads];
      y[u] = b[i + u * kThreads];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      a[i + u * kThreads] = y[u];
      b[i + u * kThreads] = x[u];
    }
  }
  for (; i < n; i += kThreads) {
    const V x = a[i];
    a[i] = b[i];
    b[i] = x;
  }
}

// Swaps n bytes where a and b have the same offset modulo sizeof(V): a bytewise head up to the
// first V-aligned address, V units, a bytewise tail.
template <typename V>
__device__ __forceinline__ void swap_coaligned(uint8_t* a, uint8_t* b, int64_t n) {
  constexpr int64_t W = sizeof(V);
  const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(a) % W);
  const int64_t head = (W - mis) % W < n ? (W - mis) % W : n;
  if (threadIdx.x < head) {
    const uint8_t x = a[threadIdx.x];
    a[threadIdx.x] = b[threadIdx.x];
    b[threadIdx.x] = x;
  }
  const int64_t units = (n - head) / W;
  swap_units(reinterpret_cast<V*>(a + head), reinterpret_cast<V*>(b + head), units);
  const int64_t done = head + units * W;
  if (threadIdx.x < n - done) {
    const uint8_t x = a[done + threadIdx.x];
    a[done + threadIdx.x] = b[done + threadIdx.x];
    b[done + threadIdx.x] = x;
  }
}

template <int N>
__global__ void __launch_bounds__(kThreads) swap_kernel(const __grid_constant__ SwapArgs<N> args) {
  const int32_t g = static_cast<int32_t>(blockIdx.x);
  // The pair t holding chunk g: the last t with first_chunk[t] <= g (every pair has >= 1 chunk).
  int lo = 0;
  int hi = args.n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (args.first_chunk[mid] <= g) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int64_t start = static_cast<int64_t>(g - args.first_chunk[lo]) * kChunkBytes;
  const int64_t left = args.nbytes[lo] - start;
  const int64_t n = left < kChunkBytes ? left : kChunkBytes;
  uint8_t* a = args.a[lo] + start;
  uint8_t* b = args.b[lo] + start;
  const auto pa = reinterpret_cast<uintptr_t>(a);
  const auto pb = reinterpret_cast<uintptr_t>(b);
  if (pa % 16 == pb % 16) {
    swap_coaligned<uint4>(a, b, n);
  } else if (pa % 4 == pb % 4) {
    swap_coaligned<uint32_t>(a, b, n);
  } else {
    swap_units(a, b, n);
  }
}

struct Pair {
  uint8_t* a;
  uint8_t* b;
  int64_t nbytes;
};

template <int N>
void launch(const Pair* pairs, int n, cudaStream_t stream) {
  SwapArgs<N> args;
  int64_t chunks = 0;
  for (int i = 0; i < n; ++i) {
    args.a[i] = pairs[i].a;
    args.b[i] = pairs[i].b;
    args.nbytes[i] = pairs[i].nbytes;
    args.first_chunk[i] = static_cast<int32_t>(chunks);
    chunks += (pairs[i].nbytes + kChunkBytes - 1) / kChunkBytes;
    TORCH_CHECK(
        chunks <= INT32_MAX, "layerfast::swap_: more than 2^31 chunks of ", kChunkBytes,
        " bytes in one launch (the list holds over 128 TiB)");
  }
  args.first_chunk[n] = static_cast<int32_t>(chunks);
  args.n = n;
  swap_kernel<N><<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Kernel arguments above 4 KiB: CUDA 12.1+ driver and a Volta or newer device.
bool large_args_supported(int device) {
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
  static const int driver = [] {
    int v = 0;
    C10_CUDA_CHECK(cudaDriverGetVersion(&v));
    return v;
  }();
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return driver >= 12010 && major >= 7;
#else
  (void)device;
  return false;
#endif
}

void swap_cuda(at::TensorList a, at::TensorList b) {
  swap::check_args(a, b);
  if (a.empty()) {
    return;
  }
  // Every device is checked before anything is swapped, so a failing call changes nothing (the
  // copy fallback below would otherwise already have swapped the pairs before a bad one). The
  // reference device is the first CUDA tensor's: a list that starts with a CPU tensor gets this
  // message rather than CUDAGuard's complaint about a non-CUDA device.
  size_t first = 0;
  while (first < a.size() && !a[first].is_cuda()) {
    ++first;
  }
  TORCH_CHECK(
      first < a.size(), "layerfast::swap_: the CUDA kernel got no CUDA tensor; a[0] is on ",
      a[0].device());
  const c10::Device device = a[first].device();
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(
        a[i].device() == device, "layerfast::swap_: all tensors must be on one CUDA device; a[",
        first, "] is on ", device, " but a[", i, "] is on ", a[i].device());
  }
  const c10::cuda::CUDAGuard guard(device);
  std::vector<Pair> pairs;
  pairs.reserve(a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    const at::Tensor& x = a[i];
    const at::Tensor& y = b[i];
    if (x.numel() == 0 || swap::same_memory(x, y)) {
      continue;
    }
    if (!swap::bytewise_swappable(x, y)) {
      swap::swap_by_copy(x, y);
      continue;
    }
    pairs.push_back(
        {static_cast<uint8_t*>(x.data_ptr()), static_cast<uint8_t*>(y.data_ptr()),
         x.numel() * static_cast<int64_t>(x.element_size())});
  }
  if (pairs.empty()) {
    return;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const int total = static_cast<int>(pairs.size());
  if (total <= kMaxTensorsSmall || !large_args_supported(device.index())) {
    for (int i = 0; i < total; i += kMaxTensorsSmall) {
      launch<kMaxTensorsSmall>(pairs.data() + i, std::min(kMaxTensorsSmall, total - i), stream);
    }
    return;
  }
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
  for (int i = 0; i < total; i += kMaxTensorsLarge) {
    launch<kMaxTensorsLarge>(pairs.data() + i, std::min(kMaxTensorsLarge, total - i), stream);
  }
#endif
}

}  // namespace

TORCH_LIBRARY_IMPL(layerfast, CUDA, m) {
  m.impl("swap_", &swap_cuda);
}

}  // namespace layerfast
