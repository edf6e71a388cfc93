"""BatchNorm -> [residual add] -> ReLU on the fold form as ONE `layerfast::affine_relu` pass.

In a fanned ResNet unit every BatchNorm runs on a Fold ([B, K·C, *S]) and is followed by a ReLU,
or by the residual add and then a ReLU. As three torch ops that is 7 passes over the tensor's
bytes (BN read+write, add 2 reads+write, ReLU read+write); `affine_relu` reads x and the skip
once and writes once. The skip may be a Fold of the same shape (a fanned downsample, or a
block's own input inside a fanned stage) or the shared per-sample tensor (the unit's input),
which the op adds to all K variants without copying it.

Fusion is a local, proven rewrite: the BN's value has exactly one user, the ReLU (or the add,
whose value has exactly one user, the ReLU); an in-place add must write into a value nobody
else reads (the BN's, or a private skip: `out += identity` with `out` the other branch); dtypes
and layouts match. The fused op runs at the BN step and reads the skip there, so no step between
the BN and the ReLU may write in place (`skip.relu_()` after the BN would be missed). Anything
else runs unfused.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine.fanout import FanPlan
from layerfast.engine.graph import Program, Ref, Step
from layerfast.engine.layout import Fold, fmt_of, same_layout

_RELU_FUNCS = {F.relu, torch.relu}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _only_ref(s: Step, i: int) -> bool:
    return len(s.args) >= 1 and isinstance(s.args[0], Ref) and s.args[0].index == i


def is_relu_of(prog: Program, u: Step, i: int) -> bool:
    """Step `u` is a plain ReLU of step i's value (module, function or method)."""
    if not _only_ref(u, i):
        return False
    if u.op == "call_module":
        return type(prog.modules[u.target]) is nn.ReLU and len(u.args) == 1 and not u.kwargs
    if u.op == "call_function" and u.target in _RELU_FUNCS:
        return all(isinstance(a, bool) for a in u.args[1:]) and set(u.kwargs) <= {"inplace"}
    return (
        u.op == "call_method"
        and u.target in ("relu", "relu_")
        and len(u.args) == 1
        and not u.kwargs
    )


def _is_add(u: Step) -> bool:
    if len(u.args) != 2 or u.kwargs:
        return False
    return (u.op == "call_function" and u.target in _ADD_FUNCS) or (
        u.op == "call_method" and u.target in ("add", "add_")
    )


def _inplace(u: Step) -> bool:
    return u.target is operator.iadd or u.target == "add_"


def _writes_between(prog: Program, lo: int, hi: int, allowed: tuple[int, ...]) -> bool:
    """Whether a step strictly between lo and hi (other than `allowed`) may write in place:
    the fused op reads the add's other operand at step lo, eager mode at the add."""
    return any(prog.is_inplace(prog.steps[j]) for j in range(lo + 1, hi) if j not in allowed)


def bn_scale_shift(
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval BatchNorm as a per-channel affine: y = x·scale + shift, in float32 (float64
    for a float64 model: its own BN computes in float64, and float32 here put ~1e-7 errors
    into logits the naive loop computes to ~1e-16)."""
    dt = torch.promote_types(var.dtype, torch.float32)
    inv = torch.rsqrt(var.to(dt) + eps)
    scale = inv * weight.to(dt) if weight is not None else inv
    shift = (bias.to(dt) if bias is not None else 0) - mean.to(dt) * scale
    return scale, shift


def bn_affine(m: nn.Module, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A shared eval BatchNorm's (scale, shift), tiled for K variants side by side: [K·C]."""
    scale, shift = bn_scale_shift(m.weight, m.bias, m.running_mean, m.running_var, m.eps)
    return scale.repeat(K), shift.repeat(K)


def try_fuse(
    prog: Program,
    s: Step,
    env: dict[int, Any],
    plan: FanPlan,
    x: Fold,
    scale: torch.Tensor,
    shift: torch.Tensor,
    affine_relu,
) -> dict[int, Any] | None:
    """BN step `s` (per-channel `scale`, `shift` [K·C]) on Fold `x`: when its chain ends in a
    ReLU, run it as one `affine_relu` and return the values of the steps it covers (the BN and
    the add get None: nothing else reads them); else None."""
    if x.t.dtype not in _KERNEL_DTYPES or not x.t.is_contiguous(memory_format=fmt_of(x.t)):
        return None
    users = prog.steps[s.index].users
    if len(users) != 1:
        return None
    u = prog.steps[users[0]]
    if is_relu_of(prog, u, s.index):
        return {s.index: None, u.index: Fold(affine_relu(x.t, scale, shift, None, True), x.K)}
    if not _is_add(u) or len(u.users) != 1:
        return None
    mine = [isinstance(a, Ref) and a.index == s.index for a in u.args]
    if mine == [True, True]:
        return None
    if (
        _inplace(u)
        and not mine[0]
        and not (isinstance(u.args[0], Ref) and prog.private(u.args[0].index, u.index))
    ):
        return None  # += into a skip that someone else reads: it must really change
    other = u.args[1] if mine[0] else u.args[0]
    if not isinstance(other, Ref) or other.index not in env:
        return None  # a number, or a value not computed yet (the other branch fuses instead)
    o = env[other.index]
    if isinstance(o, Fold) and o.K == x.K and o.t.shape == x.t.shape:
        res = o.t
    elif (
        isinstance(o, torch.Tensor)
        and other.index not in plan.fanned
        and other.index in plan.batch
        and tuple(o.shape) == x.per_variant_shape
    ):
        res = o
    else:
        return None
    if res.dtype != x.t.dtype or not same_layout(x.t, res):
        return None
    u2 = prog.steps[u.users[0]]
    if not is_relu_of(prog, u2, u.index) or _writes_between(prog, s.index, u2.index, (u.index,)):
        return None
    out = affine_relu(x.t, scale, shift, res, True)
    return {s.index: None, u.index: None, u2.index: Fold(out, x.K)}
