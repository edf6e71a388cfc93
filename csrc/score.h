// Argument checks and per-element helpers shared by the CPU and CUDA kernels of layerfast::score_
// (csrc/cpu/score_kernel.cpp, csrc/cuda/score_kernel.cu). Schema and semantics: csrc/layerfast.cpp.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

namespace layerfast::score {

inline void check_args(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& ref_pred,
    const at::Tensor& acc) {
  TORCH_CHECK(
      logits.dim() == 3, "layerfast::score_: logits must have shape [V, B, C], got ",
      logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(
      dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
      "layerfast::score_: logits must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(
      logits.is_contiguous(),
      "layerfast::score_: logits must be contiguous (call .contiguous() first), got strides ",
      logits.strides());
  const int64_t V = logits.size(0);
  const int64_t B = logits.size(1);
  TORCH_CHECK(
      logits.size(2) >= 1, "layerfast::score_: logits must have at least one class, got shape ",
      logits.sizes());
  TORCH_CHECK(
      labels.dim() == 1 && labels.size(0) == B, "layerfast::score_: labels must have shape [B] = [",
      B, "] to match logits ", logits.sizes(), ", got ", labels.sizes());
  TORCH_CHECK(
      labels.scalar_type() == at::kLong, "layerfast::score_: labels must be int64, got ",
      labels.scalar_type());
  TORCH_CHECK(
      ref_pred.dim() == 1 && ref_pred.size(0) == B,
      "layerfast::score_: ref_pred must have shape [B] = [", B, "] to match logits ",
      logits.sizes(), ", got ", ref_pred.sizes());
  TORCH_CHECK(
      ref_pred.scalar_type() == at::kLong, "layerfast::score_: ref_pred must be int64, got ",
      ref_pred.scalar_type());
  TORCH_CHECK(
      acc.dim() == 2 && acc.size(0) == V && acc.size(1) == 4,
      "layerfast::score_: acc must have shape [V, 4] = [", V, ", 4] to match logits ",
      logits.sizes(), ", got ", acc.sizes());
  TORCH_CHECK(
      acc.scalar_type() == at::kDouble, "layerfast::score_: acc must be float64, got ",
      acc.scalar_type());
  TORCH_CHECK(
      acc.is_contiguous(), "layerfast::score_: acc must be contiguous, got strides ",
      acc.strides());
  const auto dev = logits.device();
  TORCH_CHECK(
      labels.device() == dev && ref_pred.device() == dev && acc.device() == dev,
      "layerfast::score_: all tensors must be on one device, got logits on ", dev, ", labels on ",
      labels.device(), ", ref_pred on ", ref_pred.device(), ", acc on ", acc.device());
}

// Whether class c ranks above the label (logit xl) for correct@5 ("fewer than 5 classes rank
// above the label"): the order of a stable descending sort, the one torch.argmax reads its
// first place from. A larger logit ranks above; an equal one ranks above when its index is
// lower; a NaN ranks above every number (and, among NaNs, by index). So correct@1 implies
// correct@5, and a row that does not depend on the class (a zero head reset to tau = 0, all
// logits NaN or +inf) is correct@5 only for labels 0..4. Counting only `x > xl` made every
// sample of such a variant correct@5: a top5_error of 0 beside a top-1 error near chance.
// `xl_nan` (whether xl is NaN) is the caller's, once per row. With xl a number, a class
// below the label ranks above unless x < xl, one after it only if x > xl or x is NaN: one
// comparison per logit. (No fast-math here: x != x is NaN.)
C10_HOST_DEVICE inline bool ranks_above(float x, int64_t c, float xl, bool xl_nan, int64_t label) {
  if (xl_nan) {
    return (x != x) & (c < label);
  }
  return c < label ? !(x < xl) : !(x <= xl);
}

}  // namespace layerfast::score
