// The schema file: every op of the `layerfast` library is declared here, once.
// Kernels register themselves next to their code (csrc/cpu/<op>_kernel.cpp, csrc/cuda/<op>_kernel.cu).
// Autograd and ADInplaceOrView kernels (not differentiable; version counter bumps) are in
// csrc/autograd.cpp. Fake implementations for torch.compile / FakeTensor live in Python, in
// layerfast/ops.py (see set_python_module below), next to the pure-torch references.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import layerfast._C` only has to load this library so its static registrations run; the
// module itself is empty. Plain Python.h keeps pybind11 (and its compile time) out of the build.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(layerfast, m) {
  // The fake implementations of these ops are registered by `import layerfast.ops`.
  m.set_python_module("layerfast.ops");

  // swap_(a, b): exchange the contents of a[i] and b[i] for every i, in place.
  // - len(a) == len(b); each pair has the same shape, dtype and device; all tensors on one device.
  // - Any dtype. Storage is not reallocated: data pointers stay, only the bytes move.
  // - Pairs that are dense with the same strides (contiguous, channels_last, ...) are swapped
  //   bytewise: CPU with std::swap_ranges (parallel over 128 KiB chunks), CUDA with ONE kernel
  //   launch per 1024 pairs (per 96 where the driver is older than CUDA 12.1; see
  //   csrc/cuda/swap_kernel.cu). Other pairs (views with gaps, different layouts) fall back to
  //   three copies through a temporary. Other devices (and the empty list) use the generic
  //   kernel in csrc/swap_generic.cpp.
  // - A pair that is the same view of the same memory is a no-op; a pair that shares memory
  //   otherwise (partial overlap, strided views of one storage that share an element, or the
  //   same memory in another order) is an error. Tensors of different pairs must not share
  //   memory (not checked).
  // - An empty list is a no-op.
  m.def("swap_(Tensor(a!)[] a, Tensor(b!)[] b) -> ()");

  // score_(logits, labels, ref_pred, acc): add, per variant v, four counts into acc[v, :]:
  //   acc[v, 0] += #{b : pred[v, b] == labels[b]}                           correct@1
  //   acc[v, 1] += #{b : #{c : logits[v, b, c] > logits[v, b, labels[b]]} < 5}  correct@5
  //                (when C < 5 this column counts correct@1 instead)
  //   acc[v, 2] += sum_b (logsumexp_c logits[v, b, :] - logits[v, b, labels[b]])  cross-entropy
  //   acc[v, 3] += #{b : pred[v, b] == ref_pred[b]}                          agreement
  // where pred[v, b] = argmax_c logits[v, b, c], the FIRST maximal index on ties (NaN counts as
  // maximal, as in torch.argmax). The loss is computed in float32 with max subtraction and
  // summed in float64. No host synchronisation.
  // - logits: float32, float16 or bfloat16, [V, B, C], contiguous, C >= 1.
  // - labels: int64 [B], values in [0, C) (checked on CPU; a device-side assert on CUDA).
  // - ref_pred: int64 [B], the baseline's predictions (torch.argmax of its logits).
  // - acc: float64 [V, 4], contiguous; all four tensors on one device.
  m.def("score_(Tensor logits, Tensor labels, Tensor ref_pred, Tensor(a!) acc) -> ()");

  // affine_relu(x, scale, shift, residual, relu) -> out: an eval-mode BatchNorm (as a per-channel
  // affine), an optional residual add and an optional ReLU in one pass, for the fan-out's fold form:
  //   y[n, c, ...] = x[n, c, ...] * scale[c] + shift[c]  (+ residual[n, c % C_r, ...])
  //   out = relu ? (y < 0 ? 0 : y) : y   (NaN stays NaN, as torch.relu)
  // computed in float32 (the product and sum may contract to one FMA), rounded once to x's dtype.
  // The residual's channel index c % C_r lets a shared skip [N, C_r, ...] be added to K variants
  // side by side ([N, K·C_r, ...]) without copying it K times.
  // - x: float32, float16 or bfloat16, [N, C, ...], contiguous or channels_last (4-D).
  // - scale, shift: float32 [C], contiguous (for BN: w·rsqrt(var + eps), b - mean·scale).
  // - residual: None, or x's dtype and memory layout, [N, C_r, ...] with C_r dividing C.
  // - out: a new tensor with x's shape, dtype and strides. Not differentiable.
  m.def("affine_relu(Tensor x, Tensor scale, Tensor shift, Tensor? residual, bool relu) -> Tensor");

  // _affine_relu_cuda_logic: affine_relu computed on the CPU by the CUDA kernel's own per-thread
  // code (affine_relu::run_vec, csrc/affine_relu.h), one simulated thread-step after another.
  // Test-only: it lets CI check the GPU kernel's index arithmetic without a GPU.
  m.def(
      "_affine_relu_cuda_logic(Tensor x, Tensor scale, Tensor shift, Tensor? residual, bool relu) "
      "-> Tensor");
}

