// Argument checks shared by the CPU and CUDA kernels of layerfast::affine_relu
// (csrc/cpu/affine_relu_kernel.cpp, csrc/cuda/affine_relu_kernel.cu). Schema: csrc/layerfast.cpp.
#pragma once

#include <cstdint>
#include <optional>
#include <type_traits>

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace layerfast::affine_relu {

// Elements per CUDA thread and grid-stride step (csrc/cuda/affine_relu_kernel.cu).
constexpr int kCudaVec = 4;

// The two memory orders the kernels walk: channels-first ([N, C, S...] contiguous, one plane of
// S elements per (n, c)) and channels_last (4-D [N, C, H, W] stored as [N, H, W, C]). A tensor
// that is both (C == 1 or H·W == 1) is treated as channels-first; its bytes are in the same order.
inline bool channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline void check_args(
    const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
    const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(
      x.dim() >= 2, "layerfast::affine_relu: x must have shape [N, C, ...], got ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(
      dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
      "layerfast::affine_relu: x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(
      x.is_contiguous() || channels_last(x),
      "layerfast::affine_relu: x must be contiguous or channels_last (4-D), got strides ",
      x.strides(), " for shape ", x.sizes());
  const int64_t C = x.size(1);
  for (const auto* p : {&scale, &shift}) {
    const char* name = p == &scale ? "scale" : "shift";
    TORCH_CHECK(
        p->dim() == 1 && p->size(0) == C, "layerfast::affine_relu: ", name,
        " must have shape [C] = [", C, "] to match x ", x.sizes(), ", got ", p->sizes());
    TORCH_CHECK(
        p->scalar_type() == at::kFloat, "layerfast::affine_relu: ", name,
        " must be float32, got ", p->scalar_type());
    TORCH_CHECK(
        p->is_contiguous(), "layerfast::affine_relu: ", name, " must be contiguous");
    TORCH_CHECK(
        p->device() == x.device(), "layerfast::affine_relu: ", name, " is on ", p->device(),
        " but x is on ", x.device(), "; all tensors must be on one device");
  }
  if (!residual.has_value()) {
    return;
  }
  const at::Tensor& r = *residual;
  TORCH_CHECK(
      r.device() == x.device(), "layerfast::affine_relu: residual is on ", r.device(),
      " but x is on ", x.device(), "; all tensors must be on one device");
  TORCH_CHECK(
      r.scalar_type() == dt, "layerfast::affine_relu: residual must have x's dtype ", dt,
      ", got ", r.scalar_type());
  bool shape_ok = r.dim() == x.dim() && r.size(0) == x.size(0) && r.size(1) >= 1 &&
                  C % r.size(1) == 0;
  for (int64_t d = 2; shape_ok && d < x.dim(); ++d) {
    shape_ok = r.size(d) == x.size(d);
  }
  TORCH_CHECK(
      shape_ok, "layerfast::affine_relu: residual must have shape [N, C_r, ...] with x's N and ",
      "spatial sizes and C_r dividing C (x is ", x.sizes(), "), got ", r.sizes());
  const bool cl = channels_last(x);
  TORCH_CHECK(
      cl ? r.is_contiguous(at::MemoryFormat::ChannelsLast) : r.is_contiguous(),
      "layerfast::affine_relu: residual must have x's memory layout (",
      cl ? "channels_last" : "contiguous", "), got strides ", r.strides(), " for shape ",
      r.sizes());
}

// One call's typed pointers and sizes: x and out are [N, C, S...] (S = the product of the
// spatial sizes), the residual [N, Cr, S...] or null.
template <typename T>
struct View {
  const T* x;
  const float* sc;
  const float* sh;
  const T* r;
  T* out;
  int64_t numel, N, C, Cr, S;
};

template <typename T>
View<T> view_of(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                const std::optional<at::Tensor>& residual, at::Tensor& out) {
  const int64_t N = x.size(0);
  const int64_t C = x.size(1);
  return {x.const_data_ptr<T>(),
          scale.const_data_ptr<float>(),
          shift.const_data_ptr<float>(),
          residual.has_value() ? residual->const_data_ptr<T>() : nullptr,
          out.mutable_data_ptr<T>(),
          x.numel(),
          N,
          C,
          residual.has_value() ? residual->size(1) : 1,
          N * C == 0 ? 0 : x.numel() / (N * C)};
}

// Calls f(T{}, cl, res, relu) with x's element type T and the three flags as
// std::bool_constant, so each kernel is compiled per combination with its branches resolved.
template <typename F>
void dispatch(const at::Tensor& x, bool res, bool relu, const char* op, F&& f) {
  const bool cl = channels_last(x);
  auto typed = [&](auto t) {
    auto third = [&](auto a, auto b) {
      relu ? f(t, a, b, std::true_type{}) : f(t, a, b, std::false_type{});
    };
    auto second = [&](auto a) { res ? third(a, std::true_type{}) : third(a, std::false_type{}); };
    cl ? second(std::true_type{}) : second(std::false_type{});
  };
  switch (x.scalar_type()) {
    case at::kFloat:
      typed(float{});
      break;
    case at::kHalf:
      typed(c10::Half{});
      break;
    case at::kBFloat16:
      typed(c10::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", x.scalar_type());
  }
}

// One element: x·a + b (+ r), then ReLU keeping NaN — the arithmetic every kernel shares.
template <bool kRes, bool kRelu>
C10_HOST_DEVICE inline float value(float x, float a, float b, float r) {
  float y = x * a + b;
  if constexpr (kRes) {
    y += r;
  }
  if constexpr (kRelu) {
    y = y < 0.f ? 0.f : y;
  }
  return y;
}

// The CUDA kernel's work for one thread and one grid-stride step: elements [i0, i0 + kVec) in
// memory order (fewer at the end). The channel (and residual index) of the first element costs
// one division; the rest are stepped incrementally. It lives here, host-and-device, so that the
// CPU can run this exact code too (`layerfast::_affine_relu_cuda_logic`, a test-only op): the
// index stepping is checked in CI although no GPU runs it there.
//   channels-last: element i is channel i % C of pixel i / C; residual at pixel·Cr + c % Cr;
//   channels-first: element i is at s = i % S of plane i / S = n·C + c; residual at
//   (n·Cr + c % Cr)·S + s.
template <typename T, bool kCL, bool kRes, bool kRelu, int kVec>
C10_HOST_DEVICE inline void run_vec(
    const T* __restrict__ x, const float* __restrict__ sc, const float* __restrict__ sh,
    const T* __restrict__ r, T* __restrict__ out, int64_t i0, int64_t numel, int64_t C,
    int64_t Cr, int64_t S) {
  int64_t c, k = 0, s = 0, n = 0, ri;  // k = c % Cr, kept by stepping (channels-last)
  if constexpr (kCL) {
    const int64_t q = i0 / C;
    c = i0 - q * C;
    k = c % Cr;
    ri = q * Cr + k;
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
    const float y = value<kRes, kRelu>(static_cast<float>(x[i]), sc[c], sh[c],
                                       kRes ? static_cast<float>(r[ri]) : 0.f);
    out[i] = static_cast<T>(y);
    if constexpr (kCL) {  // step to element i + 1, with no division (k counts instead)
      ++c;
      ++ri;
      ++k;
      if (c == C) {
        c = 0;  // next pixel: its residual run starts right after this one's
        k = 0;
      } else if (k == Cr) {
        k = 0;
        ri -= Cr;  // the next run of Cr channels reads the same residual pixel again
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

}  // namespace layerfast::affine_relu
