"""Does the traced program compute what the model's own forward does? (DESIGN.md §7)

fx records one path through Python: a branch on `isinstance(h, torch.Tensor)` or
`hasattr(out, "logits")` sees a Proxy while tracing and a tensor when run, and a getattr on a
module's output is recorded blindly; such a program computes another function (a wrong number)
or fails where the forward does not. The Evaluator compares the two on the first batch
(`Evaluator._verified`) and runs the model untraced when they differ.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from layerfast.engine.graph import Program, eager_inplace
from layerfast.engine.precision import precision_context

_OOM = (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else (RuntimeError,)

#: Samples of the first batch on which the traced program is checked against the forward.
VERIFY_SAMPLES = 64


def trace_differs(
    model: nn.Module, prog: Program, x: torch.Tensor, device: torch.device
) -> str | None | bool:
    """Compare `prog` with `model`'s own forward on `x`, in fp32: None (the same), why not, or
    False when the model's own forward fails (the pass then reports that). Out of memory in
    either forward is raised, not taken as a verdict: the caller backs off."""
    with precision_context("fp32", device):
        try:
            with eager_inplace(model):
                ref = model(x.clone())
        except _OOM:
            raise
        except Exception:  # noqa: BLE001 - the model itself fails: the pass says so
            return False
        try:
            got = prog.run(x.clone())
        except _OOM:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure means "not the forward"
            return f"the traced program raised {type(exc).__name__}: {exc}"[:300]
        return differs(got, ref, device)


def differs(got: Any, ref: Any, device: torch.device) -> str | None:
    """Why the traced program's output `got` is not the forward's `ref` (None: it is)."""
    if not isinstance(ref, torch.Tensor):
        return None if not isinstance(got, torch.Tensor) else "the forward returns no tensor"
    if not isinstance(got, torch.Tensor) or got.shape != ref.shape or got.dtype != ref.dtype:
        return "the traced program's output is not the forward's (type, shape or dtype)"
    exact = device.type == "cpu"
    rtol, atol = (0.0, 0.0) if exact else (1e-4, 1e-5 * float(ref.abs().max().nan_to_num(0)))
    if torch.allclose(got, ref, rtol=rtol, atol=atol, equal_nan=True):
        return None
    d = (got.float() - ref.float()).abs().nan_to_num(float("inf")).max().item()
    return f"the traced program's logits differ from the forward's (max |diff| {d:.3g})"


def unbatched_cuts(prog: Program, x: torch.Tensor, device: torch.device) -> set[int]:
    """The cuts whose value does not hold the batch in dim 0 (a sequence-first LSTM's input,
    `x.transpose(0, 1)`, an `unsqueeze(0)`), found by running the program on the first 8
    samples of `x` and on 4 (fewer when `x` has fewer, or when a run fails or runs out of
    memory: then on half as many). A variant started at such a cut would have its batch cut
    along another dim (and be scored against other labels), so these cuts are not used. With
    no run at all, no cut is proven."""
    if not prog.cuts:
        return set()
    n = min(int(x.shape[0]), 8)  # only shapes matter: two sizes tell any length apart
    bad: set[int] = set()
    checked = 0
    with precision_context("fp32", device):
        while n >= 1 and checked < 2:
            cache: dict[int, Any] = {}
            try:
                prog.run(x[:n].clone(), 0, keep=set(prog.cuts), saved=cache)
            except Exception:  # noqa: BLE001 - out of memory too: no verdict from this size
                n //= 2
                continue
            checked += 1
            for c in prog.cuts:
                if c == 0:  # the input itself: a batch is [B, ...] by the data's contract
                    continue
                t = cache.get(c)
                if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != n:
                    bad.add(c)
            n //= 2
    return bad if checked else set(prog.cuts)
