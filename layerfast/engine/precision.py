"""Precision modes (DESIGN.md §7.6): fp32 reproduces the naive loop; tf32 and bf16 trade exactness
for speed on CUDA. The chosen mode is recorded with the results."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch

from layerfast.errors import LayerfastError, warn

PRECISIONS = ("auto", "fp32", "tf32", "bf16")


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise LayerfastError(f"unknown --device {device!r}: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LayerfastError("--device cuda was asked for, but torch sees no CUDA GPU here")
    n = torch.cuda.device_count() if dev.type == "cuda" else 0
    if dev.index is not None and dev.type == "cuda" and dev.index >= n:
        # else "invalid device ordinal" from deep inside the first allocation, exit 1
        raise LayerfastError(
            f"--device {device}: torch sees {n} CUDA GPU{'s' if n != 1 else ''} here "
            f"(cuda:0{f'..cuda:{n - 1}' if n > 1 else ''})"
        )
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 on CUDA (with channels_last) and fp32 elsewhere; tf32 off CUDA is fp32."""
    if precision not in PRECISIONS:
        raise LayerfastError(
            f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}"
        )
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "tf32" and device.type != "cuda":  # recorded as what ran, and said
        warn(f"precision tf32 (TensorFloat-32 matmuls and convolutions) is a CUDA mode: on "
             f"{device.type} it runs, and is recorded, as fp32")
        return "fp32"
    return precision


@contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """Set matmul/conv math for the mode and restore the caller's settings afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    tf32 = precision in ("tf32", "bf16")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    )
    try:
        with autocast:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


LAYOUTS = ("auto", "contiguous", "channels_last")


def channels_last(precision: str, device: torch.device, layout: str = "auto") -> bool:
    """Whether 4-D activations run in channels_last. `auto`: on CUDA with bf16/tf32 (tensor
    cores want NHWC), else not — so fp32 keeps the naive loop's layout and its exact bits.
    `channels_last` forces it anywhere: on the CPU it ran conv nets ~1.6-2.4× faster (oneDNN,
    measured, docs/engine.md), with logits that differ from the contiguous ones in the last
    bits (max |Δlogit| ~7e-6 on a trained ResNet-20), like fan-out."""
    if layout not in LAYOUTS:
        raise LayerfastError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "auto":
        return device.type == "cuda" and precision in ("bf16", "tf32")
    return layout == "channels_last"
