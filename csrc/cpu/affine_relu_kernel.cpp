// CPU kernel of layerfast::affine_relu (schema and definition: csrc/layerfast.cpp).
//
// One pass: each element is read once (plus its residual) and written once. Channels-first
// tensors are cut into (n, c) planes, channels_last ones into pixels; either way the inner loop
// runs over contiguous memory with loop-invariant branches (template flags), which gcc
// vectorizes. Arithmetic in float32: y = x * scale[c] + shift[c] (+ residual), then ReLU with
// NaN kept (y < 0 ? 0 : y), rounded once to x's dtype.
#include <algorithm>
#include <cstdint>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "../affine_relu.h"

namespace layerfast {
namespace {

constexpr int64_t kGrainElems = 32768;

template <typename T, bool kRes, bool kRelu>
inline void run_span(const T* x, float a, float b, const T* r, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float y = static_cast<float>(x[i]) * a + b;
    if constexpr (kRes) {
      y += static_cast<float>(r[i]);
    }
    if constexpr (kRelu) {
      y = y < 0.f ? 0.f : y;
    }
    out[i] = static_cast<T>(y);
  }
}

// Channels-first: plane p = n·C + c holds S elements; its residual plane is n·Cr + c % Cr.
template <typename T, bool kRes, bool kRelu>
void planes(const T* x, const float* sc, const float* sh, const T* r, T* out, int64_t N,
            int64_t C, int64_t Cr, int64_t S) {
  at::parallel_for(0, N * C, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(S, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t p = begin; p < end; ++p) {
                       const int64_t c = p % C;
                       const T* rp = kRes ? r + ((p / C) * Cr + c % Cr) * S : nullptr;
                       run_span<T, kRes, kRelu>(x + p * S, sc[c], sh[c], rp, out + p * S, S);
                     }
                   });
}

// Channels-last: pixel q holds C channels, its residual pixel Cr; channel c reads residual
// channel c % Cr, i.e. the C channels are C / Cr runs of Cr.
template <typename T, bool kRes, bool kRelu>
void pixels(const T* x, const float* sc, const float* sh, const T* r, T* out, int64_t P,
            int64_t C, int64_t Cr) {
  at::parallel_for(0, P, std::max<int64_t>(1, kGrainElems / std::max<int64_t>(C, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t q = begin; q < end; ++q) {
                       const T* xq = x + q * C;
                       T* oq = out + q * C;
                       const T* rq = kRes ? r + q * Cr : nullptr;
                       for (int64_t c0 = 0; c0 < C; c0 += Cr) {
                         for (int64_t j = 0; j < Cr; ++j) {
                           float y = static_cast<float>(xq[c0 + j]) * sc[c0 + j] + sh[c0 + j];
                           if constexpr (kRes) {
                             y += static_cast<float>(rq[j]);
                           }
                           if constexpr (kRelu) {
                             y = y < 0.f ? 0.f : y;
                           }
                           oq[c0 + j] = static_cast<T>(y);
                         }
                       }
                     }
                   });
}

template <typename T, bool kRes, bool kRelu>
void run(const at::Tensor& x, const float* sc, const float* sh, const T* r, at::Tensor& out,
         int64_t Cr) {
  const int64_t N = x.size(0);
  const int64_t C = x.size(1);
  const int64_t S = N * C == 0 ? 0 : x.numel() / (N * C);
  const T* xp = x.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  if (affine_relu::channels_last(x)) {
    pixels<T, kRes, kRelu>(xp, sc, sh, r, op, N * S, C, Cr);
  } else {
    planes<T, kRes, kRelu>(xp, sc, sh, r, op, N, C, Cr, S);
  }
}

template <typename T>
void dispatch(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
              const std::optional<at::Tensor>& residual, bool relu, at::Tensor& out) {
  const float* sc = scale.const_data_ptr<float>();
  const float* sh = shift.const_data_ptr<float>();
  const T* r = residual.has_value() ? residual->const_data_ptr<T>() : nullptr;
  const int64_t Cr = residual.has_value() ? residual->size(1) : 1;
  if (r != nullptr) {
    relu ? run<T, true, true>(x, sc, sh, r, out, Cr) : run<T, true, false>(x, sc, sh, r, out, Cr);
  } else {
    relu ? run<T, false, true>(x, sc, sh, r, out, Cr) : run<T, false, false>(x, sc, sh, r, out, Cr);
  }
}

at::Tensor affine_relu_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                           const std::optional<at::Tensor>& residual, bool relu) {
  affine_relu::check_args(x, scale, shift, residual);
  TORCH_CHECK(x.is_cpu(), "layerfast::affine_relu: the CPU kernel got x on ", x.device());
  at::Tensor out = at::empty_like(x);  // preserve_format: x's exact strides (dense)
  if (x.numel() == 0) {
    return out;
  }
  switch (x.scalar_type()) {
    case at::kFloat:
      dispatch<float>(x, scale, shift, residual, relu, out);
      break;
    case at::kHalf:
      dispatch<c10::Half>(x, scale, shift, residual, relu, out);
      break;
    case at::kBFloat16:
      dispatch<c10::BFloat16>(x, scale, shift, residual, relu, out);
      break;
    default:
      TORCH_CHECK(false, "layerfast::affine_relu: unsupported dtype ", x.scalar_type());
  }
  return out;
}

template <typename T, bool kCL, bool kRes, bool kRelu>
void emulate(const at::Tensor& x, const float* sc, const float* sh, const T* r, at::Tensor& out,
             int64_t Cr) {
  const int64_t numel = x.numel();
  const int64_t C = x.size(1);
  const int64_t S = numel / (x.size(0) * C);
  constexpr int kVec = affine_relu::kCudaVec;
  for (int64_t i0 = 0; i0 < numel; i0 += kVec) {  // every (thread, step) of any grid
    affine_relu::run_vec<T, kCL, kRes, kRelu, kVec>(x.const_data_ptr<T>(), sc, sh, r,
                                                   out.mutable_data_ptr<T>(), i0, numel, C, Cr, S);
  }
}

template <typename T, bool kCL>
void emulate_flags(const at::Tensor& x, const float* sc, const float* sh, const T* r,
                   at::Tensor& out, int64_t Cr, bool relu) {
  if (r != nullptr) {
    relu ? emulate<T, kCL, true, true>(x, sc, sh, r, out, Cr)
         : emulate<T, kCL, true, false>(x, sc, sh, r, out, Cr);
  } else {
    relu ? emulate<T, kCL, false, true>(x, sc, sh, r, out, Cr)
         : emulate<T, kCL, false, false>(x, sc, sh, r, out, Cr);
  }
}

template <typename T>
void emulate_dispatch(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                      const std::optional<at::Tensor>& residual, bool relu, at::Tensor& out) {
  const float* sc = scale.const_data_ptr<float>();
  const float* sh = shift.const_data_ptr<float>();
  const T* r = residual.has_value() ? residual->const_data_ptr<T>() : nullptr;
  const int64_t Cr = residual.has_value() ? residual->size(1) : 1;
  if (affine_relu::channels_last(x)) {
    emulate_flags<T, true>(x, sc, sh, r, out, Cr, relu);
  } else {
    emulate_flags<T, false>(x, sc, sh, r, out, Cr, relu);
  }
}

at::Tensor affine_relu_cuda_logic_cpu(const at::Tensor& x, const at::Tensor& scale,
                                      const at::Tensor& shift,
                                      const std::optional<at::Tensor>& residual, bool relu) {
  affine_relu::check_args(x, scale, shift, residual);
  TORCH_CHECK(x.is_cpu(), "layerfast::_affine_relu_cuda_logic: runs on the CPU, got x on ",
              x.device());
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) {
    return out;
  }
  switch (x.scalar_type()) {
    case at::kFloat:
      emulate_dispatch<float>(x, scale, shift, residual, relu, out);
      break;
    case at::kHalf:
      emulate_dispatch<c10::Half>(x, scale, shift, residual, relu, out);
      break;
    case at::kBFloat16:
      emulate_dispatch<c10::BFloat16>(x, scale, shift, residual, relu, out);
      break;
    default:
      TORCH_CHECK(false, "layerfast::_affine_relu_cuda_logic: unsupported dtype ", x.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(layerfast, CPU, m) {
  m.impl("affine_relu", &affine_relu_cpu);
  m.impl("_affine_relu_cuda_logic", &affine_relu_cuda_logic_cpu);
}

}  // namespace layerfast
