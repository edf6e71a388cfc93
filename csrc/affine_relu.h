// Argument checks shared by the CPU and CUDA kernels of layerfast::affine_relu
// (csrc/cpu/affine_relu_kernel.cpp, csrc/cuda/affine_relu_kernel.cu). Schema: csrc/layerfast.cpp.
#pragma once

#include <ATen/core/Tensor.h>

namespace layerfast::affine_relu {

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

}  // namespace layerfast::affine_relu
