// Argument checks and helpers shared by the CPU and CUDA kernels of layerfast::swap_
// (csrc/cpu/swap_kernel.cpp, csrc/cuda/swap_kernel.cu). Schema and semantics: csrc/layerfast.cpp.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/clone.h>
#include <ATen/ops/zeros.h>

#include <algorithm>

namespace layerfast::swap {

// True when x and y are the same view: the same first element, sizes and strides (two tensor
// objects for `b[:, ::2]`, or one). Swapping such a pair is a no-op, whatever its strides.
inline bool same_view(const at::Tensor& x, const at::Tensor& y) {
  return x.data_ptr() == y.data_ptr() && x.sizes() == y.sizes() && x.strides() == y.strides();
}

// True when two strided views of one storage share an element. at::get_overlap_status decides
// only dense tensors and answers TooHard for the rest (b[:, ::2][:2] against b[:, ::2][1:3]);
// here each view's elements are marked in a flag buffer over the span the two cover together, and
// a flag both set is shared memory. O(span) bytes on the tensors' device, and only for such pairs
// (never the engine's: its stash is memory of its own). Both have the same dtype (checked first),
// so their storage offsets and strides count the same elements.
inline bool strided_views_overlap(const at::Tensor& x, const at::Tensor& y) {
  if (!x.storage().is_alias_of(y.storage())) {
    return false;
  }
  auto last = [](const at::Tensor& t) {
    int64_t end = t.storage_offset();
    for (int64_t d = 0; d < t.dim(); ++d) {
      end += (t.size(d) - 1) * t.stride(d);
    }
    return end;
  };
  const int64_t x0 = x.storage_offset(), y0 = y.storage_offset();
  const int64_t x1 = last(x), y1 = last(y);
  if (x1 < y0 || y1 < x0) {
    return false;
  }
  const int64_t lo = std::min(x0, y0);
  at::Tensor mark = at::zeros({std::max(x1, y1) - lo + 1}, x.options().dtype(at::kBool));
  mark.as_strided(x.sizes(), x.strides(), x0 - lo).fill_(true);
  return mark.as_strided(y.sizes(), y.strides(), y0 - lo).any().item<bool>();
}

// Pairwise checks: equal list lengths; each pair defined, strided, same device, dtype and shape;
// neither tensor writes one memory location twice; the two tensors of a pair share no memory
// unless they are the same view of it (a no-op). Error messages name the op and the offending
// index.
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
    const at::MemOverlapStatus status = at::get_overlap_status(x, y);
    TORCH_CHECK(
        same_view(x, y) ||
            (status != at::MemOverlapStatus::Partial &&
             !(status == at::MemOverlapStatus::TooHard && strided_views_overlap(x, y))),
        "layerfast::swap_: a[", i, "] and b[", i,
        "] share memory without being the same view of it (they partially overlap, or cover the "
        "same memory in another order); swapping them is ill-defined");
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
  return same_view(x, y) || at::get_overlap_status(x, y) == at::MemOverlapStatus::Full;
}

// Fallback for pairs that are not bytewise_swappable: three copies through a temporary.
// Handles any strides and view bits; on CUDA it runs on the current stream.
inline void swap_by_copy(const at::Tensor& x, const at::Tensor& y) {
  at::Tensor tmp = x.clone();
  x.copy_(y);
  y.copy_(tmp);
}

}  // namespace layerfast::swap
