// Device-generic kernel of layerfast::swap_ (schema: csrc/layerfast.cpp), registered as
// CompositeExplicitAutograd. It serves two cases that the CPU and CUDA kernels cannot:
// - an empty list: no tensor, hence no device to dispatch on; it is a no-op;
// - devices without a dedicated kernel (MPS, XPU, ...): each pair is swapped with three copies
//   through a temporary, which is correct for any device torch supports.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "swap.h"

namespace layerfast {
namespace {

void swap_generic(at::TensorList a, at::TensorList b) {
  swap::check_args(a, b);
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(
        a[i].device() == a[0].device(), "layerfast::swap_: all tensors must be on one device; a[0] ",
        "is on ", a[0].device(), " but a[", i, "] is on ", a[i].device());
    if (a[i].numel() != 0 && !swap::same_memory(a[i], b[i])) {
      swap::swap_by_copy(a[i], b[i]);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(layerfast, CompositeExplicitAutograd, m) {
  m.impl("swap_", &swap_generic);
}

}  // namespace layerfast
