// CPU kernel of layerfast::affine_relu (schema and definition: csrc/layerfast.cpp), and the
// test-only op _affine_relu_cuda_logic (the CUDA kernel's per-thread code, run on the CPU).
//
// One pass: each element is read once (plus its residual) and written once. Channels-first
// tensors are cut into (n, c) planes, channels_last ones into pixels; either way the inner loop
// runs over contiguous memory with loop-invariant branches (template flags), which gcc
// vectorizes. Arithmetic in float32: y = x * scale[c] + shift[c] (+ residual), then ReLU with
// NaN kept (y < 0 ? 0 : y), rounded once to x's dtype.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../affine_relu.h"

namespace layerfast {
namespace {

using affine_relu::View;

constexpr int64_t kGrainElems = 32768;

// n elements; kPerChannel: element i has channel i (a pixel's run), else all share channel 0
// (a plane).
template <typename T, bool kRes, bool kRelu, bool kPerChannel>
inline void span(const T* x, const float* a, const float* b, const T* r, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = kPerChannel ? i : 0;
    const float y = affine_relu::value<kRes, kRelu>(static_cast<float>(x[i]), a[c], b[c],
                                                    kRes ? static_cast<float>(r[i]) : 0.f);
    out[i] = static_cast<T>(y);
  }
}

// Channels-first: plane p = n·C + c holds S elements (one scale/shift); its residual plane is
// n·Cr + c % Cr.
template <typename T, bool kRes, bool kRelu>
void planes(const View<T>& v) {
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(v.S, 1));
  at::parallel_for(0, v.N * v.C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c = p % v.C;
      const T* rp = kRes ? v.r + ((p / v.C) * v.Cr + c % v.Cr) * v.S : nullptr;
      span<T, kRes, kRelu, false>(v.x + p * v.S, v.sc + c, v.sh + c, rp, v.out + p * v.S, v.S);
    }
  });
}

// Channels-last: pixel q holds C channels, its residual pixel Cr; channel c reads residual
// channel c % Cr, i.e. the C channels are C / Cr runs of Cr. Without a residual a pixel is one
// run of C: stepping by View::Cr (1 then) made every channel a call of its own, 3x slower than
// torch's three passes for relu(bn(x)) in channels_last.
template <typename T, bool kRes, bool kRelu>
void pixels(const View<T>& v) {
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(v.C, 1));
  const int64_t run = kRes ? v.Cr : v.C;
  at::parallel_for(0, v.N * v.S, grain, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      for (int64_t c0 = 0; c0 < v.C; c0 += run) {
        const int64_t at = q * v.C + c0;
        span<T, kRes, kRelu, true>(v.x + at, v.sc + c0, v.sh + c0, kRes ? v.r + q * v.Cr : nullptr,
                                   v.out + at, run);
      }
    }
  });
}

// What both CPU entry points share: the checks, the output in x's exact strides (empty_like's
// preserve_format keeps a dense x's layout), the dtype/layout/residual/relu dispatch and the
// View. `body(v, cl, res, rl)` does the arithmetic; cl/res/rl are std::integral_constants.
template <typename Body>
at::Tensor run_cpu(const char* op, const at::Tensor& x, const at::Tensor& scale,
                   const at::Tensor& shift, const std::optional<at::Tensor>& residual, bool relu,
                   const Body& body) {
  affine_relu::check_args(x, scale, shift, residual);
  TORCH_CHECK(x.is_cpu(), op, ": the CPU kernel got x on ", x.device());
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) {
    return out;
  }
  affine_relu::dispatch(x, residual.has_value(), relu, op, [&](auto t, auto cl, auto res, auto rl) {
    using T = decltype(t);
    body(affine_relu::view_of<T>(x, scale, shift, residual, out), cl, res, rl);
  });
  return out;
}

at::Tensor affine_relu_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                           const std::optional<at::Tensor>& residual, bool relu) {
  return run_cpu("layerfast::affine_relu", x, scale, shift, residual, relu,
                 [](const auto& v, auto cl, auto res, auto rl) {
                   using T = std::remove_cv_t<std::remove_pointer_t<decltype(v.out)>>;
                   // S == 1 ([N, C], or 1x1 spatial): both orders are the same bytes, and a
                   // plane is one element; pixels walk each row of C in one vectorized span
                   // (planes made a call per element: 2x slower than torch for BatchNorm1d).
                   if (decltype(cl)::value || v.S == 1) {
                     pixels<T, decltype(res)::value, decltype(rl)::value>(v);
                   } else {
                     planes<T, decltype(res)::value, decltype(rl)::value>(v);
                   }
                 });
}

// Every (thread, grid-stride step) of the CUDA kernel, one after another.
at::Tensor affine_relu_cuda_logic_cpu(const at::Tensor& x, const at::Tensor& scale,
                                      const at::Tensor& shift,
                                      const std::optional<at::Tensor>& residual, bool relu) {
  return run_cpu("layerfast::_affine_relu_cuda_logic", x, scale, shift, residual, relu,
                 [](const auto& v, auto cl, auto res, auto rl) {
                   using T = std::remove_cv_t<std::remove_pointer_t<decltype(v.out)>>;
                   constexpr int kVec = affine_relu::kCudaVec;
                   for (int64_t i0 = 0; i0 < v.numel; i0 += kVec) {
                     affine_relu::run_vec<T, decltype(cl)::value, decltype(res)::value,
                                          decltype(rl)::value, kVec>(
                         v.x, v.sc, v.sh, v.r, v.out, i0, v.numel, v.C, v.Cr, v.S);
                   }
                 });
}

}  // namespace

TORCH_LIBRARY_IMPL(layerfast, CPU, m) {
  m.impl("affine_relu", &affine_relu_cpu);
  m.impl("_affine_relu_cuda_logic", &affine_relu_cuda_logic_cpu);
}

}  // namespace layerfast
