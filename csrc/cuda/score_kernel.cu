// CUDA kernel of layerfast::score_ (schema and definitions: csrc/layerfast.cpp).
//
// Two launches, no host synchronisation, bitwise repeatable. Block k scores kRowsPerBlock
// consecutive samples of one variant v; each of its kWarps warps takes one row (v, b) at a time:
// lanes stride over the C logits (pass 1: max with its first index, count of logits above the
// label's; warp butterfly reduction), then sum exp(x - max) (pass 2, the row is now in L1/L2).
// Lane 0 keeps the warp's per-variant sums, the block adds its warps' sums in shared memory and
// writes them (float64) to its own slot of a scratch buffer. A second, tiny kernel then adds
// each variant's block sums in block order into acc[v, :]. Float atomics would have been one
// launch, but the loss sum's last bits would then depend on the order in which blocks finish,
// and two runs of the same analysis must write the same numbers.
//
// Labels outside [0, C) trip a device-side assert (CUDA_KERNEL_ASSERT; the CUDA context is lost
// afterwards), so callers validate labels once per dataset; the kernel never reads out of bounds.
#include <cmath>
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "../score.h"

namespace layerfast {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerBlock = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// True when candidate (v2, i2) beats (v1, i1) for the first argmax: larger value, NaN above
// everything, the smaller index on ties; index -1 is an empty candidate.
__device__ __forceinline__ bool beats(float v1, int64_t i1, float v2, int64_t i2) {
  if (i2 < 0) {
    return false;
  }
  if (i1 < 0) {
    return true;
  }
  const bool n1 = isnan(v1);
  const bool n2 = isnan(v2);
  if (n1 || n2) {
    return n1 && n2 ? i2 < i1 : n2;
  }
  return v2 != v1 ? v2 > v1 : i2 < i1;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) score_kernel(
    const T* __restrict__ logits, const int64_t* __restrict__ labels, int64_t label_stride,
    const int64_t* __restrict__ ref_pred, int64_t ref_stride, double* __restrict__ partials,
    int64_t B, int64_t C, int64_t blocks_per_variant) {
  const int64_t v = blockIdx.x / blocks_per_variant;
  const int64_t b0 = (blockIdx.x % blocks_per_variant) * kRowsPerBlock;
  const int64_t b1 = b0 + kRowsPerBlock < B ? b0 + kRowsPerBlock : B;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  double correct1 = 0;
  double correct5 = 0;
  double loss = 0;
  double agree = 0;
  for (int64_t b = b0 + warp; b < b1; b += kWarps) {
    const T* row = logits + (v * B + b) * C;
    const int64_t label = labels[b * label_stride];
    const bool valid = label >= 0 && label < C;
    CUDA_KERNEL_ASSERT(valid && "layerfast::score_: a label is outside [0, C)");
    const float xl = valid ? static_cast<float>(row[label]) : NAN;
    const bool xl_nan = isnan(xl);
    // Pass 1.
    float m = -INFINITY;
    int64_t pred = -1;
    int greater = 0;
    for (int64_t c = lane; c < C; c += 32) {
      const float x = static_cast<float>(row[c]);
      greater += score::ranks_above(x, c, xl, xl_nan, label);
      if (pred < 0 || (!isnan(m) && (x > m || isnan(x)))) {
        m = x;
        pred = c;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      const float m2 = __shfl_xor_sync(kFullMask, m, off);
      const int64_t p2 = __shfl_xor_sync(kFullMask, pred, off);
      greater += __shfl_xor_sync(kFullMask, greater, off);
      if (beats(m, pred, m2, p2)) {
        m = m2;
        pred = p2;
      }
    }
    // Pass 2: logsumexp with max subtraction (an infinite max shifts by 0, as torch.logsumexp).
    const float shift = isinf(m) ? 0.f : m;
    float s = 0.f;
    for (int64_t c = lane; c < C; c += 32) {
      s += expf(static_cast<float>(row[c]) - shift);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      s += __shfl_xor_sync(kFullMask, s, off);
    }
    if (lane == 0) {
      const bool c1 = pred == label;
      correct1 += c1;
      correct5 += C >= 5 ? greater < 5 : c1;
      loss += static_cast<double>((logf(s) + shift) - xl);
      agree += pred == ref_pred[b * ref_stride];
    }
  }
  __shared__ double partial[kWarps][4];
  if (lane == 0) {
    partial[warp][0] = correct1;
    partial[warp][1] = correct5;
    partial[warp][2] = loss;
    partial[warp][3] = agree;
  }
  __syncthreads();
  if (threadIdx.x < 4) {
    double total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      total += partial[w][threadIdx.x];
    }
    // 64-bit: in unsigned int, blockIdx.x * 4 wraps from block 2^30 on (2^31 - 1 are allowed)
    partials[static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x] = total;
  }
}

// acc[v, j] += sum over k, in order, of partials[v * blocks_per_variant + k, j]: one thread per
// (v, j), so the order of the additions is fixed.
__global__ void sum_partials_kernel(
    const double* __restrict__ partials, double* __restrict__ acc, int64_t V,
    int64_t blocks_per_variant) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= V * 4) {
    return;
  }
  const int64_t v = i / 4;
  const int64_t j = i % 4;
  const double* p = partials + v * blocks_per_variant * 4 + j;
  double total = 0;
  for (int64_t k = 0; k < blocks_per_variant; ++k) {
    total += p[k * 4];
  }
  acc[i] += total;
}

template <typename T>
void launch(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& ref_pred,
    const at::Tensor& acc, cudaStream_t stream) {
  const int64_t V = logits.size(0);
  const int64_t B = logits.size(1);
  const int64_t C = logits.size(2);
  const int64_t per_variant = (B + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t blocks = V * per_variant;
  TORCH_CHECK(
      blocks <= INT32_MAX, "layerfast::score_: V * ceil(B / ", kRowsPerBlock,
      ") must fit in 2^31 - 1 blocks, got logits ", logits.sizes());
  // From the caching allocator on the current stream: no synchronisation, reused across calls.
  const at::Tensor partials = at::empty({blocks, 4}, acc.options());
  score_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      logits.const_data_ptr<T>(), labels.const_data_ptr<int64_t>(), labels.stride(0),
      ref_pred.const_data_ptr<int64_t>(), ref_pred.stride(0), partials.mutable_data_ptr<double>(),
      B, C, per_variant);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  constexpr int kSumThreads = 128;
  const int64_t sum_blocks = (V * 4 + kSumThreads - 1) / kSumThreads;
  sum_partials_kernel<<<static_cast<unsigned>(sum_blocks), kSumThreads, 0, stream>>>(
      partials.const_data_ptr<double>(), acc.mutable_data_ptr<double>(), V, per_variant);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void score_cuda(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& ref_pred,
    const at::Tensor& acc) {
  score::check_args(logits, labels, ref_pred, acc);
  TORCH_CHECK(
      logits.is_cuda(), "layerfast::score_: the CUDA kernel got logits on ", logits.device());
  if (logits.size(0) == 0 || logits.size(1) == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  switch (logits.scalar_type()) {
    case at::kFloat:
      launch<float>(logits, labels, ref_pred, acc, stream);
      break;
    case at::kHalf:
      launch<c10::Half>(logits, labels, ref_pred, acc, stream);
      break;
    case at::kBFloat16:
      launch<c10::BFloat16>(logits, labels, ref_pred, acc, stream);
      break;
    default:
      TORCH_CHECK(false, "layerfast::score_: unsupported logits dtype ", logits.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(layerfast, CUDA, m) {
  m.impl("score_", &score_cuda);
}

}  // namespace layerfast
