// CUDA kernel of layerfast::affine_relu (schema and definition: csrc/layerfast.cpp).
//
// One launch, one pass: each thread takes kVec consecutive elements (in memory order) per
// grid-stride step, finds the channel (and residual index) of the first with one division and
// steps the rest incrementally (affine_relu::run_vec in csrc/affine_relu.h, which the CPU also
// runs in the tests), so the integer divisions are amortised over kVec elements.
// Arithmetic in float32 (x * scale + shift may contract to an FMA), ReLU keeps NaN, one rounding
// to x's dtype. On the current stream, with a launch check; no host synchronisation.
#include <algorithm>
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../affine_relu.h"

namespace layerfast {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = affine_relu::kCudaVec;
constexpr int64_t kMaxBlocks = int64_t{1} << 16;

template <typename T, bool kCL, bool kRes, bool kRelu>
__global__ void __launch_bounds__(kThreads) affine_relu_kernel(
    const T* __restrict__ x, const float* __restrict__ sc, const float* __restrict__ sh,
    const T* __restrict__ r, T* __restrict__ out, int64_t numel, int64_t C, int64_t Cr,
    int64_t S) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads * kVec;
  for (int64_t i0 = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kVec;
       i0 < numel; i0 += step) {
    affine_relu::run_vec<T, kCL, kRes, kRelu, kVec>(x, sc, sh, r, out, i0, numel, C, Cr, S);
  }
}

template <typename T, bool kCL, bool kRes, bool kRelu>
void launch(const affine_relu::View<T>& v, cudaStream_t stream) {
  const int64_t per_block = int64_t{kThreads} * kVec;
  const int64_t blocks = std::min<int64_t>((v.numel + per_block - 1) / per_block, kMaxBlocks);
  affine_relu_kernel<T, kCL, kRes, kRelu><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      v.x, v.sc, v.sh, v.r, v.out, v.numel, v.C, v.Cr, v.S);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor affine_relu_cuda(const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                            bool relu) {
  affine_relu::check_args(x, scale, shift, residual);
  TORCH_CHECK(x.is_cuda(), "layerfast::affine_relu: the CUDA kernel got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);  // preserve_format: x's exact strides (dense)
  if (x.numel() == 0) {
    return out;
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  affine_relu::dispatch(
      x, residual.has_value(), relu, "layerfast::affine_relu",
      [&](auto t, auto cl, auto res, auto rl) {
        using T = decltype(t);
        launch<T, decltype(cl)::value, decltype(res)::value, decltype(rl)::value>(
            affine_relu::view_of<T>(x, scale, shift, residual, out), stream);
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(layerfast, CUDA, m) {
  m.impl("affine_relu", &affine_relu_cuda);
}

}  // namespace layerfast
