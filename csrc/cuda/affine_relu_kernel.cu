// CUDA kernel of layerfast::affine_relu (schema and definition: csrc/layerfast.cpp).
//
// One launch, one pass: each thread takes kVec consecutive elements (in memory order) per
// grid-stride step, finds the channel (and residual index) of the first with one division and
// steps the rest incrementally, so the integer divisions are amortised over kVec elements.
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
constexpr int kVec = 4;
constexpr int64_t kMaxBlocks = int64_t{1} << 16;

template <typename T, bool kCL, bool kRes, bool kRelu>
__global__ void __launch_bounds__(kThreads) affine_relu_kernel(
    const T* __restrict__ x, const float* __restrict__ sc, const float* __restrict__ sh,
    const T* __restrict__ r, T* __restrict__ out, int64_t numel, int64_t C, int64_t Cr,
    int64_t S) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads * kVec;
  for (int64_t i0 = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kVec;
       i0 < numel; i0 += step) {
    // Channels-last: element i is channel i % C of pixel i / C; residual at pixel·Cr + c % Cr.
    // Channels-first: element i is at s = i % S of plane i / S = n·C + c; residual at
    // (n·Cr + c % Cr)·S + s.
    int64_t c, s = 0, n = 0, ri;
    if constexpr (kCL) {
      const int64_t q = i0 / C;
      c = i0 - q * C;
      ri = q * Cr + c % Cr;
    } else {
      const int64_t p = i0 / S;
      s = i0 - p * S;
      n = p / C;
      c = p - n * C;
      ri = (n * Cr + c % Cr) * S + s;
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int64_t i = i0 + j;
      if (i >= numel) {
        break;
      }
      float y = static_cast<float>(x[i]) * sc[c] + sh[c];
      if constexpr (kRes) {
        y += static_cast<float>(r[ri]);
      }
      if constexpr (kRelu) {
        y = y < 0.f ? 0.f : y;
      }
      out[i] = static_cast<T>(y);
      // advance to element i + 1
      if constexpr (kCL) {
        ++c;
        ++ri;
        if (c == C) {
          c = 0;  // next pixel: its residual run starts right after this one's
        } else if (c % Cr == 0) {
          ri -= Cr;  // next run of Cr channels reads the same residual pixel again
        }
      } else {
        ++s;
        ++ri;
        if (s == S) {
          s = 0;
          if (++c == C) {
            c = 0;
            ++n;
          }
          ri = (n * Cr + c % Cr) * S;
        }
      }
    }
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
