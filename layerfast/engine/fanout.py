"""Fan-out: K variants that start at the same cut run as one wide computation (DESIGN.md §7.3).

The K variants share the cached input. The first overridden conv/linear sees that shared input,
so its K weight sets are applied as ONE wide conv/linear with K·C_out outputs; the result is laid
out as a K·B batch (variant-major) and the rest of the suffix runs once on it. An overridden
module whose input is already fanned applies its K weight sets as a grouped conv / batched
matmul; an overridden eval-mode BatchNorm becomes a per-variant affine.

This is only valid when every step downstream of the first overridden module treats samples
independently. `fan_plan` proves that from the program (an allow-list of modules, functions and
methods, with their dimension arguments checked); anything it cannot prove sends the group to
the swap path, which is always correct. A runtime error in the fanned run does the same.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine.graph import Program, Ref, _map_refs, refs_in

_BATCHWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU,
    nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d,
    nn.Dropout, nn.Dropout2d, nn.Identity, nn.ZeroPad2d, nn.ConstantPad2d, nn.Upsample,
)
_ELEMENTWISE_FUNCS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd,
    operator.imul, torch.add, torch.sub, torch.mul, torch.relu, torch.sigmoid, torch.tanh,
    F.relu, F.gelu, F.silu, F.hardswish, F.leaky_relu, F.dropout, F.adaptive_avg_pool2d,
    F.avg_pool2d, F.max_pool2d, torch.nn.functional.softmax, torch.nn.functional.log_softmax,
}
_ELEMENTWISE_METHODS = {
    "relu", "sigmoid", "tanh", "add", "mul", "sub", "div", "contiguous", "float", "to",
    "size", "clone", "softmax", "log_softmax", "add_", "relu_", "mul_",
}
_FANNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class FanPlan:
    """How a group of variants starting at `start` runs fanned."""

    start: int
    modules: list[str]  # overridden modules, all applied through call_module steps
    fanned: set[int]  # steps whose values are K·B (variant-major)
    batch: set[int]  # steps carrying per-sample values (expandable to K·B)


def _dim_ok(d: Any) -> bool:
    return isinstance(d, int) and d != 0


def _step_is_batchwise(prog: Program, i: int, fanned: set[int]) -> bool:
    s = prog.steps[i]
    if s.op == "output":
        return True
    if s.op == "call_module":
        m = prog.modules[s.target]
        if not isinstance(m, _BATCHWISE_MODULES):
            return False
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) and m.padding_mode != "zeros":
            return False
        return not (isinstance(m, nn.Softmax | nn.LogSoftmax) and m.dim in (0, None))
    if s.op == "call_function":
        if s.target in (torch.flatten,):
            start_dim = s.args[1] if len(s.args) > 1 else s.kwargs.get("start_dim", 0)
            return _dim_ok(start_dim)
        if s.target in (torch.cat, torch.concat):
            dim = s.args[1] if len(s.args) > 1 else s.kwargs.get("dim", 0)
            return _dim_ok(dim)
        if s.target is operator.getitem:
            idx = s.args[1]
            if isinstance(s.args[0], Ref) and prog.steps[s.args[0].index].target == "size":
                return True
            if isinstance(idx, tuple) and idx and (idx[0] == slice(None) or idx[0] is Ellipsis):
                return True
            return False
        if s.target in (F.softmax, F.log_softmax):
            dim = s.args[1] if len(s.args) > 1 else s.kwargs.get("dim")
            return _dim_ok(dim)
        return s.target in _ELEMENTWISE_FUNCS
    if s.op == "call_method":
        if s.target == "flatten":
            start_dim = s.args[1] if len(s.args) > 1 else s.kwargs.get("start_dim", 0)
            return _dim_ok(start_dim)
        if s.target in ("view", "reshape"):
            if len(s.args) < 2:
                return False
            shape = s.args[1:] if len(s.args) > 2 or not isinstance(s.args[1], tuple | list) else s.args[1]
            first = shape[0] if shape else None
            if not isinstance(first, Ref):
                return False
            src = prog.steps[first.index]
            return (src.op == "call_method" and src.target == "size" and len(src.args) > 1
                    and src.args[1] == 0 and isinstance(src.args[0], Ref)
                    and src.args[0].index in fanned)
        if s.target in ("softmax", "log_softmax"):
            dim = s.args[1] if len(s.args) > 1 else s.kwargs.get("dim")
            return _dim_ok(dim)
        return s.target in _ELEMENTWISE_METHODS
    return s.op == "get_attr"


def _closure(prog: Program, seeds: set[int], after: int) -> set[int]:
    out: set[int] = set()
    todo = [i for i in seeds if i > after]
    while todo:
        i = todo.pop()
        if i in out:
            continue
        out.add(i)
        todo.extend(prog.steps[i].users)
    return out


def fan_plan(prog: Program, start: int, keys: set[str]) -> FanPlan | None:
    """Prove that variants overriding `keys` and starting at cut `start` may run fanned."""
    if not prog.traced:
        return None
    owner: dict[str, str] = {}
    for s in prog.steps[start + 1:]:
        if s.op == "get_attr" and s.keys & keys:
            return None  # weights read functionally: cannot be fanned
        if s.op == "call_module" and s.keys & keys:
            if not isinstance(prog.modules[s.target], _FANNABLE):
                return None
            m = prog.modules[s.target]
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) and m.running_mean is None:
                return None
            for k in s.keys:
                owner[k] = s.target
    if not keys <= set(owner):
        return None
    mods = sorted(set(owner.values()))
    seeds = {s.index for s in prog.steps if s.op == "call_module" and s.target in mods and s.index > start}
    fanned = _closure(prog, seeds, start)
    for i in sorted(fanned):
        if not _step_is_batchwise(prog, i, fanned):
            return None
    batch = _closure(prog, {prog.carrier[start] if start else 0}, -1)
    return FanPlan(start, mods, fanned, batch)


# ---- the per-chunk weight stacks -------------------------------------------------------


def stack_module(m: nn.Module, per_variant: list[dict[str, torch.Tensor]],
                 channels_last: bool = False) -> dict[str, Any]:
    """Stack K weight sets of module `m` (`per_variant[k]`: key -> tensor override, relative to
    the module; missing keys fall back to the live tensor). With `channels_last`, a 2-D conv's
    stacked weight is also kept as one [K·out, in, kh, kw] channels_last tensor (`weight4`):
    the conv then returns channels_last even when its input is ambiguous (one channel)."""

    def get(k: int, attr: str) -> torch.Tensor | None:
        live = getattr(m, attr)
        return per_variant[k].get(attr, live) if live is not None else None

    K = len(per_variant)
    if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
        scale, shift = [], []
        for k in range(K):
            w, b = get(k, "weight"), get(k, "bias")
            rm, rv = get(k, "running_mean"), get(k, "running_var")
            inv = torch.rsqrt(rv.float() + m.eps)
            sc = inv * w.float() if w is not None else inv
            sh = (b.float() if b is not None else 0) - rm.float() * sc
            scale.append(sc)
            shift.append(sh)
        return {"scale": torch.stack(scale), "shift": torch.stack(shift)}
    w = torch.stack([get(k, "weight") for k in range(K)])  # [K, out, ...]
    b = torch.stack([get(k, "bias") for k in range(K)]) if m.bias is not None else None
    st: dict[str, Any] = {"weight": w, "bias": b}
    if channels_last and isinstance(m, nn.Conv2d):
        w4 = w.reshape(-1, *w.shape[2:])
        st["weight4"] = _empty(tuple(w4.shape), w4, torch.channels_last).copy_(w4)
    return st


def _fmt(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor laid out that way (and not trivially both), else contiguous.
    Every copy the fan-out makes keeps it: a suffix that fell back to NCHW would run its convs
    in the slow layout for bf16 tensor cores (and for oneDNN on the CPU)."""
    cl = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _empty(shape: tuple[int, ...], like: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


def _unfold(y: torch.Tensor, K: int) -> torch.Tensor:
    """[B, K·C, *S] -> [K·B, C, *S]: variant-major batch (one copy, keeping channels_last)."""
    B, KC = y.shape[:2]
    out = y.reshape(B, K, KC // K, *y.shape[2:]).transpose(0, 1).reshape(K * B, KC // K, *y.shape[2:])
    return out.contiguous(memory_format=_fmt(y))


def _fold(x: torch.Tensor, K: int) -> torch.Tensor:
    """[K·B, C, *S] -> [B, K·C, *S], for a grouped conv over the K variants (one copy, keeping
    channels_last)."""
    KB, C = x.shape[:2]
    B = KB // K
    fmt = _fmt(x)
    if fmt is torch.contiguous_format:
        return x.reshape(K, B, C, *x.shape[2:]).transpose(0, 1).reshape(B, K * C, *x.shape[2:])
    out = _empty((B, K * C, *x.shape[2:]), x, fmt)
    out.view(B, K, C, *x.shape[2:]).copy_(x.view(K, B, C, *x.shape[2:]).transpose(0, 1))
    return out


def apply_fanned(m: nn.Module, st: dict[str, Any], x: torch.Tensor, fanned: bool, K: int) -> torch.Tensor:
    """Apply K weight sets of `m`: on a shared input [B, ...] (wide op) or a fanned one [K·B, ...]."""
    if isinstance(m, nn.Linear):
        w, b = st["weight"], st["bias"]  # [K, out, in], [K, out]
        if not fanned:
            y = F.linear(x, w.reshape(-1, w.shape[-1]), None if b is None else b.reshape(-1))
            y = y.reshape(*x.shape[:-1], K, w.shape[1]).movedim(-2, 0)
            return y.reshape(K * x.shape[0], *y.shape[2:])
        B = x.shape[0] // K
        xk = x.reshape(K, -1, x.shape[-1])
        y = torch.bmm(xk, w.transpose(1, 2).to(xk.dtype)) if b is None else \
            torch.baddbmm(b.unsqueeze(1).to(xk.dtype), xk, w.transpose(1, 2).to(xk.dtype))
        return y.reshape(K * B, *x.shape[1:-1], w.shape[1])
    if isinstance(m, nn.Conv1d | nn.Conv2d):
        conv = F.conv2d if isinstance(m, nn.Conv2d) else F.conv1d
        w, b = st["weight"], st["bias"]  # [K, out, in/g, ...]
        wk = st.get("weight4", w.reshape(-1, *w.shape[2:]))
        bk = None if b is None else b.reshape(-1)
        if not fanned and m.groups == 1:
            y = conv(x, wk, bk, m.stride, m.padding, m.dilation, 1)
            return _unfold(y, K)
        if not fanned:
            x = expand(x, K)
        y = conv(_fold(x, K), wk, bk, m.stride, m.padding, m.dilation, m.groups * K)
        return _unfold(y, K)
    if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
        if not fanned:
            x = expand(x, K)
        B = x.shape[0] // K
        view = (K, 1, -1) + (1,) * (x.dim() - 2)
        sc = st["scale"].to(x.dtype).reshape(view)
        sh = st["shift"].to(x.dtype).reshape(view)
        y = x.reshape(K, B, *x.shape[1:]) * sc + sh
        return y.reshape(K * B, *x.shape[1:])
    raise TypeError(f"cannot fan out {type(m).__name__}")


def expand(t: torch.Tensor, K: int) -> torch.Tensor:
    """[B, ...] -> [K·B, ...]: the shared value repeated for each variant (in its layout)."""
    fmt = _fmt(t)
    if fmt is torch.contiguous_format:
        return t.unsqueeze(0).expand(K, *t.shape).reshape(K * t.shape[0], *t.shape[1:])
    out = _empty((K * t.shape[0], *t.shape[1:]), t, fmt)
    out.view(K, *t.shape).copy_(t.unsqueeze(0).expand(K, *t.shape))
    return out


def run_fanned(prog: Program, plan: FanPlan, x: torch.Tensor, stacks: dict[str, dict], K: int) -> torch.Tensor:
    """Run the suffix from `plan.start` on the shared input `x` for K variants at once.
    Returns logits [K·B, C], variant-major."""
    start = plan.start
    env: dict[int, Any] = {prog.carrier[start] if start else 0: x}
    for s in prog.steps[: start + 1]:
        if s.op == "get_attr":
            env[s.index] = prog.fetch(s.target)
    frees = prog.frees
    for s in prog.steps[start + 1:]:
        fan = s.index in plan.fanned
        if fan:
            local: dict[int, Any] = {}
            for r in set(refs_in(s.args) + refs_in(s.kwargs)):
                v = env[r]
                if r not in plan.fanned and r in plan.batch and isinstance(v, torch.Tensor):
                    v = expand(v, K)
                local[r] = v
        else:
            local = env
        if s.op == "output":
            out = _map_refs(s.args, lambda r, env_=local: env_[r.index])[0]
            return out if fan else expand(out, K)
        if s.op == "call_module" and s.target in stacks:
            (arg,) = s.args
            env[s.index] = apply_fanned(prog.modules[s.target], stacks[s.target], env[arg.index],
                                        arg.index in plan.fanned, K)
        else:
            env[s.index] = prog.eval_step(s, local)
        for r in frees[s.index]:
            env.pop(r, None)
    raise RuntimeError("program has no output")
