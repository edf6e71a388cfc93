"""`to_device`: one host->device copy of the raw batch, normalisation on the device.

The batch crosses the bus as uint8 (4x fewer bytes than float32) from pinned memory with
`non_blocking=True`, so the copy overlaps the previous batch's compute. Normalisation
`(x/scale - mean)/std` is folded into one fused `addcmul(-mean/std, x, 1/(scale*std))` that
reads uint8 and writes the requested dtype (and memory format) directly: one kernel, no
float32 temporary on the host or the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from layerfast.data.source import DataSource
from layerfast.errors import LayerfastError

_consts: dict[tuple, tuple[Tensor, Tensor]] = {}


def _constants(
    source: DataSource, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor] | None:
    """Per-channel (multiplier, offset) as [C,1,1] on `device`, cached: building them every
    batch would be a tiny synchronous host->device copy per batch. float32, or float64 when
    float64 output is asked for (float32 constants would round it to float32 accuracy)."""
    if source.mean is None or source.std is None:
        return None
    cdtype = torch.float64 if dtype == torch.float64 else torch.float32
    key = (source.mean, source.std, source.scale, str(device), cdtype)
    if key not in _consts:
        mean = torch.tensor(source.mean, dtype=torch.float64)
        std = torch.tensor(source.std, dtype=torch.float64)
        mul = (1.0 / (source.scale * std)).to(cdtype).view(-1, 1, 1)
        add = (-mean / std).to(cdtype).view(-1, 1, 1)
        _consts[key] = (mul.to(device), add.to(device))
    return _consts[key]


def to_device(
    x: Tensor,
    y: Tensor,
    source: DataSource,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> tuple[Tensor, Tensor]:
    """Move a CPU batch to `device` and normalise it there: returns (x in `dtype`, y int64).

    x: uint8 or float [B,C,H,W] as yielded by `DataSource.batches`. Never writes into `x`.
    channels_last applies to 4-D batches only (the layout cuDNN prefers for bf16 convs)."""
    device = torch.device(device)
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise LayerfastError(f"{source.name}: labels must be integers, got {y.dtype}")
    if not dtype.is_floating_point:
        raise LayerfastError(f"to_device: dtype must be a floating type, got {dtype}")
    cuda = device.type == "cuda"
    if cuda and x.device.type == "cpu":
        x = x if x.is_pinned() else x.pin_memory()
        y = y if y.is_pinned() else y.pin_memory()
    xd = x.to(device, non_blocking=cuda)
    yd = y.to(device, dtype=torch.int64, non_blocking=cuda)
    fmt = torch.channels_last if channels_last and xd.dim() == 4 else torch.contiguous_format
    out = torch.empty(xd.shape, dtype=dtype, device=device, memory_format=fmt)
    consts = _constants(source, device, dtype)
    if consts is not None:
        torch.addcmul(consts[1], xd, consts[0], out=out)
    elif source.scale != 1.0 and dtype == torch.float64:  # a Python scalar computes in float32
        out.copy_(xd).div_(source.scale)
    elif source.scale != 1.0:
        torch.mul(xd, 1.0 / source.scale, out=out)
    else:
        out.copy_(xd)
    return out, yd
