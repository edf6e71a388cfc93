"""After a pass fails: whether the model's own forward fails on the batch (bad input, exit 2)
or the engine's does (an internal error), and what to tell the user.

Only ever run after a failure, so one eager forward per variant costs nothing that matters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from layerfast.engine.graph import eager_inplace
from layerfast.engine.overrides import describe
from layerfast.engine.precision import precision_context
from layerfast.errors import LayerfastError

#: What running out of device memory raises (older torch: a RuntimeError).
OOM_ERRORS: tuple[type[Exception], ...] = (
    (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else (RuntimeError,))
#: A device left broken by an earlier failure (torch >= 2.8), which fails anything after it.
ACCELERATOR_ERRORS: tuple[type[Exception], ...] = tuple(
    e for e in (getattr(torch, "AcceleratorError", None),) if e is not None)


def own_failure(model: nn.Module, variants: Sequence[Any], pass_idx: list[int], precision: str,
                device: torch.device, x: torch.Tensor, first: int,
                dev_ov: list[dict[str, torch.Tensor]], live: dict[str, torch.Tensor],
                step: int) -> None:
    """Raise the LayerfastError for a model whose own forward fails on batch `x` (samples
    `first`.. of the data), with its own tensors or with one variant's (`dev_ov[j]`, variant
    `pass_idx[j]`): a user's model that cannot take some batch (a check on the batch size, on
    finite activations) is bad input, as when it fails on the first one
    (`build._num_outputs`). Return when every forward runs: the failure was the engine's
    own, and the caller re-raises it as an internal error. The whole batch is tried first (a
    model may fail only on large batches), then, when that runs out of memory, pieces of
    `step` samples (no larger than an out-of-memory back-off left)."""
    B = int(x.shape[0])
    where = f"samples {first}..{first + B - 1} of the data (a batch of {B})"
    for j, ov in [(None, {}), *enumerate(dev_ov)]:
        if j is not None and not ov:
            continue
        saved = {k: live[k].clone() for k in ov}
        try:
            for k, t in ov.items():
                live[k].copy_(t)
            with precision_context(precision, device), eager_inplace(model):
                try:
                    model(x.clone())
                except OOM_ERRORS:
                    if step >= B:
                        raise
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    for lo in range(0, B, step):
                        model(x[lo : lo + step].clone())
        except OOM_ERRORS:
            return
        except Exception as exc:  # noqa: BLE001 - any failure of the model itself
            if isinstance(exc, ACCELERATOR_ERRORS) or "CUDA error" in str(exc):
                return  # a device left broken by the first failure fails anything
            msg = " ".join(str(exc).split())[:300]
            i = None if j is None else pass_idx[j]
            whose = "" if i is None else f" with the tensors of {describe(variants[i], i)}"
            raise LayerfastError(f"the model fails on {where}{whose}: "
                                 f"{type(exc).__name__}: {msg}"
                                 f"{bf16_only(model, precision, device, x)}") from exc
        finally:
            for k, t in saved.items():
                live[k].copy_(t)


def bf16_only(model: nn.Module, precision: str, device: torch.device, x: torch.Tensor) -> str:
    """A note for a model whose forward failed under bf16 autocast but runs without it (an
    op with no bfloat16 kernel, such as `torch.special.ndtri` on the CPU): the failure is the
    mode's, not the model's, and the message must say which precision runs it."""
    if precision != "bf16":
        return ""
    try:
        with precision_context("fp32", device), eager_inplace(model):
            model(x.clone())
    except Exception:  # noqa: BLE001 - fails anyway: the model's own failure, as said
        return ""
    return (" (under --precision bf16's autocast, which runs the model's matmuls and "
            "convolutions in bfloat16; it runs without it: --precision fp32)")
