"""The compiled ops of layerfast (`torch.ops.layerfast.*`) and their pure-torch references.

Three hot spots of the engine (DESIGN.md §7) are single ops with a CPU and a CUDA kernel
(csrc/cpu/<op>_kernel.cpp, csrc/cuda/<op>_kernel.cu; schemas in csrc/layerfast.cpp):

- `swap_(a, b)`: exchange the contents of many tensor pairs in place (a variant's weights in,
  the final model's out, and back), one kernel launch on CUDA per 1024 dense pairs (96 on
  drivers before CUDA 12.1).
- `score_(logits, labels, ref_pred, acc)`: fold a block of logits of V variants into per-variant
  counts (correct@1, correct@5, cross-entropy sum, agreement with the baseline) on the device,
  without a host synchronisation.

- `affine_relu(x, scale, shift, residual, relu)`: eval BatchNorm + residual add + ReLU in one
  pass, for the fan-out's fold form (K variants side by side on the channel dim). Functional:
  it returns a new tensor, refuses inputs that require grad, and `affine_relu_reference` is its
  torch twin. (`torch.ops.layerfast._affine_relu_cuda_logic` is test-only: the CUDA kernel's
  per-thread code run on the CPU.)

`swap_` and `score_` mutate their arguments and return nothing. They are real torch ops: they work under
`torch.inference_mode()`, bump the version counters of what they mutate, refuse to be
differentiated, and have fake implementations (below) so `torch.compile` and FakeTensor can trace
them. `swap_reference` and `score_reference` compute the same results with plain torch ops; the
tests compare against them. On devices without a compiled kernel (`has_kernel` is False: MPS,
XPU, or a build without CUDA), `swap_` still works through its device-generic kernel (copies
through a temporary); `score_` does not, and callers use `score_reference` there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from layerfast import _ext  # noqa: F401  (loads layerfast._C, which registers torch.ops.layerfast)

__all__ = ["swap_", "score_", "affine_relu", "swap_reference", "score_reference",
           "affine_relu_reference", "ranks_above", "has_kernel"]

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def has_kernel(op: str, device: torch.device | str) -> bool:
    """True when `torch.ops.layerfast.<op>` has a dedicated compiled kernel for `device`'s type
    (e.g. `has_kernel("score_", "cuda")` is False when the extension was built without CUDA)."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"layerfast::{op}", key
    )


# ---- swap_ -----------------------------------------------------------------------------------


def swap_(a: Sequence[Tensor], b: Sequence[Tensor]) -> None:
    """Exchange the contents of `a[i]` and `b[i]` in place, for every i.

    Why it exists: evaluating a variant means putting its tensors into the live model and taking
    them out again, for every variant and batch. Copying through a temporary costs three passes
    over the bytes and, with `torch._foreach_copy_`, several launches per list; `swap_` reads and
    writes each byte once and, on CUDA, swaps the whole list in one kernel launch (up to 1024
    dense pairs per launch; see csrc/cuda/swap_kernel.cu). Swapping twice restores both lists
    bit for bit (NaN payloads included), and data pointers never change.

    Each pair must have the same shape, dtype and device (any dtype); all tensors on one device.
    Dense pairs with the same layout (contiguous, channels_last, ...) are swapped bytewise; any
    other pair (a strided view, mismatched layouts) falls back to copies through a temporary.
    A pair that is one and the same view of memory is left alone; a pair that shares memory
    otherwise (partial overlap, interleaved strided views that share an element) raises.
    On a tensor that requires grad, call it under `torch.no_grad()` / `torch.inference_mode()`.
    """
    torch.ops.layerfast.swap_.default(list(a), list(b))


def swap_reference(a: Sequence[Tensor], b: Sequence[Tensor]) -> None:
    """`swap_` with plain torch ops (a clone and two copies per pair)."""
    if len(a) != len(b):
        raise ValueError(f"swap_reference: a and b differ in length ({len(a)} vs {len(b)})")
    with torch.no_grad():
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
                raise ValueError(
                    f"swap_reference: a[{i}] is {x.dtype}{list(x.shape)} on {x.device} but b[{i}] "
                    f"is {y.dtype}{list(y.shape)} on {y.device}"
                )
            tmp = x.clone()
            x.copy_(y)
            y.copy_(tmp)


@torch.library.register_fake("layerfast::swap_")
def _swap_fake(a: list[Tensor], b: list[Tensor]) -> None:
    torch._check(
        len(a) == len(b),
        lambda: f"layerfast::swap_: a and b must have the same length, got {len(a)} and {len(b)}",
    )
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        torch._check(
            x.device == y.device and x.dtype == y.dtype,
            lambda i=i, x=x, y=y: f"layerfast::swap_: a[{i}] is {x.dtype} on {x.device} but "
            f"b[{i}] is {y.dtype} on {y.device}; each pair must have the same dtype and device",
        )
        torch._check(
            x.shape == y.shape,
            lambda i=i, x=x, y=y: f"layerfast::swap_: a[{i}] has shape {list(x.shape)} but b[{i}] "
            f"has shape {list(y.shape)}; each pair must have the same shape",
        )
        # One device for the whole call, as the CPU and CUDA kernels require: a list mixing CPU
        # and meta pairs is dispatched here (Meta wins) and would leave the CPU pairs unswapped.
        torch._check(
            x.device == a[0].device,
            lambda i=i, x=x: f"layerfast::swap_: a[{i}] is on {x.device} but a[0] is on "
            f"{a[0].device}; all tensors of one call must be on the same device",
        )


# ---- score_ ----------------------------------------------------------------------------------


def score_(logits: Tensor, labels: Tensor, ref_pred: Tensor, acc: Tensor) -> None:
    """Add per-variant counts of a block of logits into `acc` (float64 [V, 4]), in place.

    Why it exists: the engine scores hundreds of variants per batch. Doing it with torch ops
    takes about ten kernels and several [V, B, C]-sized temporaries per call; `score_` reads the
    logits once (on CUDA one kernel, plus a small one that adds its per-block sums in a fixed
    order; on CPU one parallel loop) and never synchronises the host, so the accumulator stays
    on the device until the caller reads it.

    Inputs: `logits` float32/float16/bfloat16 [V, B, C], contiguous; `labels` int64 [B] in
    [0, C); `ref_pred` int64 [B], the baseline's predictions (`torch.argmax` of its logits);
    `acc` float64 [V, 4], contiguous; all on one device. For each variant v it adds:

    - `acc[v, 0]` correct@1: pred == label, where pred is the argmax over C with the FIRST
      maximal index on ties (NaN counts as maximal), exactly as `torch.argmax`;
    - `acc[v, 1]` correct@5: the label is among the first 5 classes of a stable descending
      sort of the row (`ranks_above`: a larger logit ranks above, an equal one when its index
      is lower, NaN above every number), the order argmax reads its first place from; so
      correct@1 implies correct@5, and a constant or all-NaN row is correct@5 only for labels
      0..4; when C < 5 this column counts correct@1;
    - `acc[v, 2]` summed cross-entropy: logsumexp(logits) - logits[label], computed in float32
      with max subtraction, summed in float64;
    - `acc[v, 3]` agreement: pred == ref_pred.

    Labels are checked on CPU (an error before anything is added); on CUDA a label outside
    [0, C) trips a device-side assert, which loses the CUDA context, so validate labels once per
    dataset. On CUDA the counts are exact, and the loss sum is reduced in a fixed order (no
    atomics): bit-for-bit the same from run to run, its last bits not the CPU's.
    """
    torch.ops.layerfast.score_.default(logits, labels, ref_pred, acc)


def score_reference(logits: Tensor, labels: Tensor, ref_pred: Tensor, acc: Tensor) -> None:
    """`score_` with plain torch ops (same definitions, same checks on shapes and dtypes)."""
    _check_score_args(logits, labels, ref_pred, acc)
    x = logits.float()
    V, B, C = x.shape
    if V == 0 or B == 0:
        return
    pred = x.argmax(-1)  # [V, B], first maximal index
    xl = x.gather(2, labels.view(1, B, 1).expand(V, B, 1)).squeeze(2)  # [V, B]
    correct1 = pred == labels
    correct5 = ranks_above(x, xl, labels).sum(2) < 5 if C >= 5 else correct1
    loss = torch.logsumexp(x, 2) - xl
    agree = pred == ref_pred
    cols = (correct1.sum(1), correct5.sum(1), loss.double().sum(1), agree.sum(1))
    acc.add_(torch.stack([c.to(torch.float64) for c in cols], 1))


def ranks_above(logits: Tensor, label_logit: Tensor, labels: Tensor) -> Tensor:
    """Bool [..., B, C]: class c ranks above the label for correct@5 (`score_`'s docstring):
    `logits` [..., B, C], `label_logit` [..., B], `labels` [B]. The order is a stable
    descending sort's, with NaN above every number: a larger logit, or an equal one (NaN
    equal to NaN) at a lower index. `x > xl` alone counted every tie, and every NaN, in the
    sample's favour: a constant or all-NaN row was correct@5 for every label."""
    xl = label_logit.unsqueeze(-1)
    nan, xl_nan = logits.isnan(), xl.isnan()
    lower = torch.arange(logits.shape[-1], device=logits.device) < labels.unsqueeze(-1)
    ties = (logits == xl) | (nan & xl_nan)
    return (logits > xl) | (nan & ~xl_nan) | (ties & lower)


def _check_score_args(logits: Tensor, labels: Tensor, ref_pred: Tensor, acc: Tensor) -> None:
    torch._check(
        logits.dim() == 3,
        lambda: f"layerfast::score_: logits must have shape [V, B, C], got {list(logits.shape)}",
    )
    torch._check(
        logits.dtype in _LOGIT_DTYPES,
        lambda: f"layerfast::score_: logits must be float32, float16 or bfloat16, got {logits.dtype}",
    )
    V, B, C = logits.shape
    torch._check(
        C >= 1,
        lambda: f"layerfast::score_: logits must have at least one class, got {list(logits.shape)}",
    )
    for name, t in (("labels", labels), ("ref_pred", ref_pred)):
        torch._check(
            t.dim() == 1 and t.shape[0] == B and t.dtype == torch.int64,
            lambda name=name, t=t: f"layerfast::score_: {name} must be int64 of shape [B] = [{B}], "
            f"got {t.dtype} {list(t.shape)}",
        )
    torch._check(
        acc.dim() == 2 and acc.shape[0] == V and acc.shape[1] == 4 and acc.dtype == torch.float64,
        lambda: f"layerfast::score_: acc must be float64 of shape [V, 4] = [{V}, 4], got "
        f"{acc.dtype} {list(acc.shape)}",
    )
    # the kernels' layout checks too: a fake that accepted these let torch.compile trace a call
    # the real op then refused at run time
    for name, t in (("logits", logits), ("acc", acc)):
        torch._check(t.is_contiguous(), lambda name=name, t=t: f"layerfast::score_: {name} must "
                     f"be contiguous, got strides {list(t.stride())}")
    devices = {t.device for t in (logits, labels, ref_pred, acc)}
    torch._check(
        len(devices) == 1,
        lambda: f"layerfast::score_: all tensors must be on one device, got {sorted(map(str, devices))}",
    )


@torch.library.register_fake("layerfast::score_")
def _score_fake(logits: Tensor, labels: Tensor, ref_pred: Tensor, acc: Tensor) -> None:
    _check_score_args(logits, labels, ref_pred, acc)


# ---- affine_relu -----------------------------------------------------------------------------


def affine_relu(x: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None = None,
                relu: bool = True) -> Tensor:
    """`relu(x * scale[c] + shift[c] + residual[:, c % C_r])`, per channel c of dim 1, one pass.

    Why it exists: in the fan-out's fold form ([B, K·C, *S], K variants side by side) a ResNet
    block ends BN -> add -> ReLU. As torch ops that is three passes over the tensor (BatchNorm,
    add, relu: 7 tensor reads/writes); this op reads x (and the residual) once and writes once.
    The residual may have C_r = C / K channels: a skip shared by the K variants is then added to
    each without being copied K times.

    `x`: float32/float16/bfloat16 [N, C, ...], contiguous or channels_last; `scale`, `shift`:
    float32 [C] (an eval BatchNorm is `scale = weight * rsqrt(running_var + eps)`,
    `shift = bias - running_mean * scale`); `residual`: None or x's dtype and layout, shape
    [N, C_r, ...] with C_r dividing C. Computed in float32 (the product and sum may fuse into an
    FMA), NaN kept by the ReLU, rounded once to x's dtype; the result has x's layout.
    """
    return torch.ops.layerfast.affine_relu.default(x, scale, shift, residual, relu)


def affine_relu_reference(x: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None = None,
                          relu: bool = True) -> Tensor:
    """`affine_relu` with plain torch ops (float32 math, one rounding at the end)."""
    _check_affine_args(x, scale, shift, residual)
    view = (1, -1) + (1,) * (x.dim() - 2)
    y = x.float() * scale.view(view) + shift.view(view)
    if residual is not None:
        k = x.shape[1] // residual.shape[1]
        y = y + residual.float().repeat(1, k, *([1] * (x.dim() - 2)))
    if relu:
        y = torch.relu(y)
    return y.to(x.dtype)


def _check_affine_args(x: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None) -> None:
    torch._check(x.dim() >= 2, lambda: f"layerfast::affine_relu: x must have shape [N, C, ...], "
                 f"got {list(x.shape)}")
    torch._check(x.dtype in _LOGIT_DTYPES, lambda: "layerfast::affine_relu: x must be float32, "
                 f"float16 or bfloat16, got {x.dtype}")
    # the kernel's layout checks too (a fake that accepted any strides let torch.compile trace
    # a call the real op then refused at run time)
    cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last)
    torch._check(x.is_contiguous() or cl, lambda: "layerfast::affine_relu: x must be contiguous "
                 f"or channels_last (4-D), got strides {list(x.stride())} for shape {list(x.shape)}")
    C = x.shape[1]
    for name, t in (("scale", scale), ("shift", shift), ("residual", residual)):
        torch._check(
            t is None or t.device == x.device,
            lambda name=name, t=t: f"layerfast::affine_relu: {name} is on {t.device} but x is on "
            f"{x.device}; all tensors must be on one device",
        )
    for name, t in (("scale", scale), ("shift", shift)):
        torch._check(
            t.dim() == 1 and t.shape[0] == C and t.dtype == torch.float32 and t.is_contiguous(),
            lambda name=name, t=t: f"layerfast::affine_relu: {name} must be contiguous float32 of "
            f"shape [C] = [{C}], got {t.dtype} {list(t.shape)} strides {list(t.stride())}",
        )
    if residual is not None:
        r = residual
        ok = (r.dim() == x.dim() and r.shape[0] == x.shape[0] and r.shape[1] >= 1
              and C % r.shape[1] == 0 and tuple(r.shape[2:]) == tuple(x.shape[2:]))
        torch._check(ok, lambda: "layerfast::affine_relu: residual must have shape [N, C_r, ...] "
                     f"with x's N and spatial sizes and C_r dividing C (x is {list(x.shape)}), got "
                     f"{list(r.shape)}")
        torch._check(r.dtype == x.dtype, lambda: f"layerfast::affine_relu: residual must have "
                     f"x's dtype {x.dtype}, got {r.dtype}")
        fmt = torch.channels_last if cl else torch.contiguous_format
        torch._check(r.is_contiguous(memory_format=fmt), lambda: "layerfast::affine_relu: "
                     f"residual must have x's memory layout ({'channels_last' if cl else 'contiguous'}"
                     f"), got strides {list(r.stride())} for shape {list(r.shape)}")


@torch.library.register_fake("layerfast::_affine_relu_cuda_logic")
@torch.library.register_fake("layerfast::affine_relu")
def _affine_relu_fake(x: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None,
                      relu: bool) -> Tensor:
    _check_affine_args(x, scale, shift, residual)
    return torch.empty_like(x)
