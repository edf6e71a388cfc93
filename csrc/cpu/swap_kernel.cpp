#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

namespace layerfast {

void swap_cpu(at::TensorList a, at::TensorList b) {
  TORCH_CHECK(a.size() == b.size(), "layerfast::swap_: lists differ in length (", a.size(), " vs ", b.size(), ")");
  for (size_t i = 0; i < a.size(); ++i) {
    auto tmp = at::empty_like(a[i]);
    tmp.copy_(a[i]);
    const_cast<at::Tensor&>(a[i]).copy_(b[i]);
    const_cast<at::Tensor&>(b[i]).copy_(tmp);
  }
}

TORCH_LIBRARY_IMPL(layerfast, CPU, m) { m.impl("swap_", &swap_cpu); }

}  // namespace layerfast
