"""Memory layouts of the fan-out: a unit's K variants side by side on the channel dim (`Fold`,
[B, K·C, *S], what a wide or grouped conv writes) or as a variant-major batch ([K·B, C, *S],
what the model's own modules read), and the one-copy moves between them.

Every copy keeps channels_last: a suffix that fell back to NCHW would run its convs in the slow
layout for bf16 tensor cores (and for oneDNN on the CPU).
"""

from __future__ import annotations

import torch


def fmt_of(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor laid out that way (and not trivially both), else contiguous."""
    cl = (
        t.dim() == 4
        and t.is_contiguous(memory_format=torch.channels_last)
        and not t.is_contiguous()
    )
    return torch.channels_last if cl else torch.contiguous_format


def empty_as(shape: tuple[int, ...], like: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


def to_batch(y: torch.Tensor, K: int) -> torch.Tensor:
    """[B, K·C, *S] -> [K·B, C, *S]: variant-major batch, in ONE copy that keeps channels_last
    (a reshape of the transposed view would copy to NCHW first, then again to channels_last)."""
    B, KC = y.shape[:2]
    C, S = KC // K, tuple(y.shape[2:])
    out = empty_as((K * B, C, *S), y, fmt_of(y))
    out.view(K, B, C, *S).copy_(y.view(B, K, C, *S).transpose(0, 1))
    return out


def to_fold(x: torch.Tensor, K: int) -> torch.Tensor:
    """[K·B, C, *S] -> [B, K·C, *S], for a grouped conv over the K variants (one copy, keeping
    channels_last)."""
    KB, C = x.shape[:2]
    B, S = KB // K, tuple(x.shape[2:])
    out = empty_as((B, K * C, *S), x, fmt_of(x))
    out.view(B, K, C, *S).copy_(x.view(K, B, C, *S).transpose(0, 1))
    return out


def expand(t: torch.Tensor, K: int) -> torch.Tensor:
    """[B, ...] -> [K·B, ...]: the shared value repeated for each variant (in its layout)."""
    fmt = fmt_of(t)
    if fmt is torch.contiguous_format:
        return t.unsqueeze(0).expand(K, *t.shape).reshape(K * t.shape[0], *t.shape[1:])
    out = empty_as((K * t.shape[0], *t.shape[1:]), t, fmt)
    out.view(K, *t.shape).copy_(t.unsqueeze(0).expand(K, *t.shape))
    return out


class Fold:
    """K variants' values side by side on the channel dim: `t` is [B, K·C, *S], variant k's
    channels at [k·C, (k+1)·C). `batch()` is the same values as a K·B batch, made once."""

    __slots__ = ("K", "_batch", "t")

    def __init__(self, t: torch.Tensor, K: int) -> None:
        self.t, self.K, self._batch = t, K, None

    @property
    def per_variant_shape(self) -> tuple[int, ...]:
        return (self.t.shape[0], self.t.shape[1] // self.K, *self.t.shape[2:])

    def batch(self) -> torch.Tensor:
        if self._batch is None:
            self._batch = to_batch(self.t, self.K)
        return self._batch


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Both dense in the same memory order (what `layerfast::affine_relu` needs of x and its
    residual)."""
    fa = fmt_of(a)
    return (
        fa is fmt_of(b) and a.is_contiguous(memory_format=fa) and b.is_contiguous(memory_format=fa)
    )
