// Autograd and ADInplaceOrView kernels of the layerfast ops (device independent).
//
// affine_relu is functional: its Autograd kernel only refuses inputs that require grad while
// grad mode is on (a result without history would silently drop their gradients).
//
// swap_ and score_ are not differentiable, and both mutate their inputs and return nothing, a case torch's
// stock fallbacks get wrong for us: torch::autograd::autogradNotImplementedFallback skips the
// ADInplaceOrView key for ops without in-place outputs, and its ADInplaceOrView twin bumps only
// mutable outputs. So:
// - Autograd: refuse to mutate a tensor that requires grad while grad mode is on (call under
//   torch.no_grad() or torch.inference_mode()); then redispatch below Autograd. score_'s logits
//   may require grad: the counts simply carry no history.
// - ADInplaceOrView: run the kernel, then bump the version counter of every mutated tensor
//   (a[i], b[i]; acc), as torch's own in-place ops do, so that a tensor saved for backward and
//   then mutated is detected instead of silently used.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

namespace layerfast {
namespace {

using SwapFn = void(at::TensorList, at::TensorList);
using ScoreFn = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);

const c10::TypedOperatorHandle<SwapFn>& swap_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("layerfast::swap_", "").typed<SwapFn>();
  return op;
}

const c10::TypedOperatorHandle<ScoreFn>& score_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("layerfast::score_", "").typed<ScoreFn>();
  return op;
}

void check_no_grad(const at::Tensor& t, const char* op, const char* name, size_t i) {
  TORCH_CHECK(
      !(t.defined() && t.requires_grad() && c10::GradMode::is_enabled()), op, ": ", name, "[", i,
      "] requires grad, and ", op,
      " mutates it in place and is not differentiable; call it under torch.no_grad() or "
      "torch.inference_mode()");
}

void swap_autograd(c10::DispatchKeySet ks, at::TensorList a, at::TensorList b) {
  for (size_t i = 0; i < a.size(); ++i) {
    check_no_grad(a[i], "layerfast::swap_", "a", i);
  }
  for (size_t i = 0; i < b.size(); ++i) {
    check_no_grad(b[i], "layerfast::swap_", "b", i);
  }
  at::AutoDispatchBelowAutograd guard;
  swap_op().redispatch(ks & c10::after_autograd_keyset, a, b);
}

void score_autograd(
    c10::DispatchKeySet ks, const at::Tensor& logits, const at::Tensor& labels,
    const at::Tensor& ref_pred, const at::Tensor& acc) {
  TORCH_CHECK(
      !(acc.requires_grad() && c10::GradMode::is_enabled()),
      "layerfast::score_: acc requires grad, and score_ adds counts into it in place and is not "
      "differentiable; pass an accumulator that does not require grad");
  at::AutoDispatchBelowAutograd guard;
  score_op().redispatch(ks & c10::after_autograd_keyset, logits, labels, ref_pred, acc);
}

using AffineReluFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const std::optional<at::Tensor>&, bool);

at::Tensor affine_relu_autograd(
    c10::DispatchKeySet ks, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
    const std::optional<at::Tensor>& residual, bool relu) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("layerfast::affine_relu", "")
                             .typed<AffineReluFn>();
  if (c10::GradMode::is_enabled()) {
    const bool grad = x.requires_grad() || scale.requires_grad() || shift.requires_grad() ||
                      (residual.has_value() && residual->requires_grad());
    TORCH_CHECK(
        !grad,
        "layerfast::affine_relu is not differentiable and an input requires grad; call it under "
        "torch.no_grad() or torch.inference_mode()");
  }
  at::AutoDispatchBelowAutograd guard;
  return op.redispatch(ks & c10::after_autograd_keyset, x, scale, shift, residual, relu);
}

void bump(const at::Tensor& t) {
  if (t.defined()) {
    t.unsafeGetTensorImpl()->bump_version();
  }
}

void swap_inplace_or_view(c10::DispatchKeySet ks, at::TensorList a, at::TensorList b) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    swap_op().redispatch(ks & c10::after_ADInplaceOrView_keyset, a, b);
  }
  for (const at::Tensor& t : a) {
    bump(t);
  }
  for (const at::Tensor& t : b) {
    bump(t);
  }
}

void score_inplace_or_view(
    c10::DispatchKeySet ks, const at::Tensor& logits, const at::Tensor& labels,
    const at::Tensor& ref_pred, const at::Tensor& acc) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    score_op().redispatch(ks & c10::after_ADInplaceOrView_keyset, logits, labels, ref_pred, acc);
  }
  bump(acc);
}

}  // namespace

TORCH_LIBRARY_IMPL(layerfast, Autograd, m) {
  m.impl("swap_", &swap_autograd);
  m.impl("score_", &score_autograd);
  m.impl("affine_relu", &affine_relu_autograd);
}

TORCH_LIBRARY_IMPL(layerfast, ADInplaceOrView, m) {
  m.impl("swap_", &swap_inplace_or_view);
  m.impl("score_", &score_inplace_or_view);
}

}  // namespace layerfast
