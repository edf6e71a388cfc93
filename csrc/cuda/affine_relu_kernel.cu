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
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
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
void launch(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const T* r,
            at::Tensor& out, int64_t Cr) {
  const int64_t numel = x.numel();
  const int64_t N = x.size(0);
  const int64_t C = x.size(1);
  const int64_t S = numel / (N * C);
  const int64_t per_block = int64_t{kThreads} * kVec;
  const int64_t blocks = std::min<int64_t>((numel + per_block - 1) / per_block, kMaxBlocks);
  auto stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  affine_relu_kernel<T, kCL, kRes, kRelu><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      x.const_data_ptr<T>(), scale.const_data_ptr<float>(), shift.const_data_ptr<float>(), r,
      out.mutable_data_ptr<T>(), numel, C, Cr, S);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool kCL>
void by_flags(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
              const std::optional<at::Tensor>& residual, bool relu, at::Tensor& out) {
  const T* r = residual.has_value() ? residual->const_data_ptr<T>() : nullptr;
  const int64_t Cr = residual.has_value() ? residual->size(1) : 1;
  if (r != nullptr) {
    relu ? launch<T, kCL, true, true>(x, scale, shift, r, out, Cr)
         : launch<T, kCL, true, false>(x, scale, shift, r, out, Cr);
  } else {
    relu ? launch<T, kCL, false, true>(x, scale, shift, r, out, Cr)
         : launch<T, kCL, false, false>(x, scale, shift, r, out, Cr);
  }
}

template <typename T>
void by_layout(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
               const std::optional<at::Tensor>& residual, bool relu, at::Tensor& out) {
  if (affine_relu::channels_last(x)) {
    by_flags<T, true>(x, scale, shift, residual, relu, out);
  } else {
    by_flags<T, false>(x, scale, shift, residual, relu, out);
  }
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
  switch (x.scalar_type()) {
    case at::kFloat:
      by_layout<float>(x, scale, shift, residual, relu, out);
      break;
    case at::kHalf:
      by_layout<c10::Half>(x, scale, shift, residual, relu, out);
      break;
    case at::kBFloat16:
      by_layout<c10::BFloat16>(x, scale, shift, residual, relu, out);
      break;
    default:
      TORCH_CHECK(false, "layerfast::affine_relu: unsupported dtype ", x.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(layerfast, CUDA, m) {
  m.impl("affine_relu", &affine_relu_cuda);
}

}  // namespace layerfast
