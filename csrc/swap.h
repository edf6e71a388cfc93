// Argument checks and helpers shared by the CPU and CUDA kernels of layerfast::swap_
// (csrc/cpu/swap_kernel.cpp, csrc/cuda/swap_kernel.cu). Schema and semantics: csrc/layerfast.cpp.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/clone.h>

namespace layerfast::swap {

// Pairwise checks: equal list lengths; each pair defined, strided, same device, dtype and shape;
// neither tensor writes one memory location twice; the two tensors of a pair do not partially
// overlap. Error messages name the op and the offending index.
inline void check_args(at::TensorList a, at::TensorList b) {
  TORCH_CHECK(
      a.size() == b.size(), "layerfast::swap_: a and b must have the same length, got ", a.size(),
      " and ", b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    const at::Tensor& x = a[i];
    const at::Tensor& y = b[i];
    TORCH_CHECK(
        x.defined() && y.defined(), "layerfast::swap_: a[", i, "] and b[", i,
        "] must be defined tensors");
    TORCH_CHECK(
        x.layout() == at::kStrided && y.layout() == at::kStrided, "layerfast::swap_: a[", i,
        "] and b[", i, "] must be strided (dense) tensors, got layouts ", x.layout(), " and ",
        y.layout());
    TORCH_CHECK(
        x.device() == y.device(), "layerfast::swap_: a[", i, "] is on ", x.device(), " but b[", i,
        "] is on ", y.device(), "; each pair must be on the same device");
    TORCH_CHECK(
        x.scalar_type() == y.scalar_type(), "layerfast::swap_: a[", i, "] has dtype ",
        x.scalar_type(), " but b[", i, "] has dtype ", y.scalar_type(),
        "; each pair must have the same dtype");
    TORCH_CHECK(
        x.sizes() == y.sizes(), "layerfast::swap_: a[", i, "] has shape ", x.sizes(), " but b[", i,
        "] has shape ", y.sizes(), "; each pair must have the same shape");
    if (x.numel() == 0) {
      continue;
    }
    TORCH_CHECK(
        at::has_internal_overlap(x) != at::MemOverlap::Yes &&
            at::has_internal_overlap(y) != at::MemOverlap::Yes,
        "layerfast::swap_: a[", i, "] or b[", i,
        "] has elements that share memory (e.g. an expanded tensor); it cannot be written to");
    TORCH_CHECK(
        at::get_overlap_status(x, y) != at::MemOverlapStatus::Partial, "layerfast::swap_: a[", i,
        "] and b[", i, "] partially overlap in memory; swapping them is ill-defined");
  }
}

// True when the pair can be swapped as raw bytes: both dense without gaps or overlaps and laid out
// the same way in memory (equal strides on every dimension of size > 1), with the same lazy
// conjugate / negative view bits. Contiguous and channels_last pairs qualify.
inline bool bytewise_swappable(const at::Tensor& x, const at::Tensor& y) {
  if (!x.is_non_overlapping_and_dense() || !y.is_non_overlapping_and_dense()) {
    return false;
  }
  if (x.is_conj() != y.is_conj() || x.is_neg() != y.is_neg()) {
    return false;
  }
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (x.size(d) > 1 && x.stride(d) != y.stride(d)) {
      return false;
    }
  }
  return true;
}

// True when the pair is one and the same memory (swapping it is a no-op).
inline bool same_memory(const at::Tensor& x, const at::Tensor& y) {
  return at::get_overlap_status(x, y) == at::MemOverlapStatus::Full;
}

// Fallback for pairs that are not bytewise_swappable: three copies through a temporary.
// Handles any strides and view bits; on CUDA it runs on the current stream.
inline void swap_by_copy(const at::Tensor& x, const at::Tensor& y) {
  at::Tensor tmp = x.clone();
  x.copy_(y);
  y.copy_(tmp);
}

}  // namespace layerfast::swap
