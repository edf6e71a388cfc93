"""Running a fanned group: K weight sets of a unit applied at once (DESIGN.md §7.3).

`fanout.fan_plan` proves that a group may run fanned; this module runs it. The first
overridden conv sees the shared input and applies its K weight sets as ONE wide conv with K·C
output channels, [B, K·C, *S]. That layout — the *fold* form, `Fold` — is exactly what a grouped
conv over the K variants reads and writes, and per-channel work (an eval BatchNorm with the K
variants' statistics side by side, activations, pooling, a residual add) is the same on it as on
each variant's own [B, C, *S]. So a unit's values stay folded from its first conv to its last
op, and are laid out as a variant-major K·B batch (`Fold.batch`, one copy) only where a step
needs a batch: a shared conv/linear downstream, a `flatten`, the output.

Before (session 3) every fanned conv unfolded its output and every grouped conv folded its input
back: a ResNet Bottleneck paid six layout copies, plus a two-pass affine per BN and a copy of the
shared identity for the residual add. Folded, it pays one copy, and each BN -> [add ->] ReLU chain
is one `layerfast::affine_relu` pass (`fuse.py`; `batch_norm` and torch ops where that kernel
is missing or the chain is not provably local). Where a step cannot run folded, the value is
unfolded and the step runs on the K·B batch exactly as before, so the set of models that fan out
is unchanged.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine import fuse, layout
from layerfast.engine.fanout import PER_CHANNEL_MODULES, FanPlan, NotPerSample, resolves_to_batch
from layerfast.engine.graph import Program, Ref, Step, _map_refs, refs_in
from layerfast.engine.layout import Fold, empty_as, expand
from layerfast.engine.tracing import autocast_as

# Modules that act on each channel of each sample alone (eval mode), so fold form is safe.
_PER_CHANNEL_MODULES = PER_CHANNEL_MODULES
_PER_CHANNEL_FUNCS = {
    F.relu,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    F.gelu,
    F.silu,
    F.hardswish,
    F.leaky_relu,
    F.relu6,
    F.hardtanh,
    F.elu,
    F.hardsigmoid,
    torch.exp,
    torch.abs,
    torch.relu_,
    F.softplus,
    torch.clamp,  # with number bounds (one tensor argument: the unary fold path's rule)
    torch.clip,
    F.dropout,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.avg_pool2d,
    F.max_pool2d,
}
_PER_CHANNEL_METHODS = {"relu", "relu_", "sigmoid", "tanh", "exp", "abs", "clamp", "clip"}
# Pooling and padding act per channel only on input of their own rank, [B, C, *spatial]: on a
# 4-D value a MaxPool3d (or on a Conv1d's 3-D output a 2-D pool or pad) reads it as one
# unbatched sample and pools across channels, which on the fold form means across variants.
_SPATIAL_RANK: dict[Any, int] = {
    nn.MaxPool1d: 1,
    nn.AvgPool1d: 1,
    nn.AdaptiveAvgPool1d: 1,
    nn.MaxPool2d: 2,
    nn.AvgPool2d: 2,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveMaxPool2d: 2,
    nn.ZeroPad2d: 2,
    nn.ConstantPad2d: 2,
    nn.Dropout2d: 2,
    nn.MaxPool3d: 3,
    nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool3d: 3,
    F.adaptive_avg_pool2d: 2,
    F.adaptive_max_pool2d: 2,
    F.avg_pool2d: 2,
    F.max_pool2d: 2,
}
_BINARY_FUNCS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.iadd,
    operator.isub,
    operator.imul,
    torch.add,
    torch.sub,
    torch.mul,
    operator.pow,
    torch.pow,
}
_BINARY_METHODS = {"add", "sub", "mul", "pow", "add_", "sub_", "mul_"}
_INPLACE = {operator.iadd, operator.isub, operator.imul, "add_", "sub_", "mul_"}

# How a fanned group's values move: fold form with BN -> [add ->] ReLU fused (the default), fold
# form with torch ops, or a K·B batch after every conv (the session-3 path).
GLUE_MODES = ("fused", "fold", "unfolded")


# ---- the per-chunk weight stacks -------------------------------------------------------


def stack_module(
    m: nn.Module, per_variant: list[dict[str, torch.Tensor]], channels_last: bool = False
) -> dict[str, Any]:
    """Stack K weight sets of module `m` (`per_variant[k]`: key -> tensor override, relative to
    the module; missing keys fall back to the live tensor). With `channels_last`, a 2-D conv's
    stacked weight is kept only as one [K·out, in, kh, kw] channels_last tensor (`weight4`):
    the conv then returns channels_last even when its input is ambiguous (one channel)."""

    def get(k: int, attr: str) -> torch.Tensor | None:
        live = getattr(m, attr)
        return per_variant[k].get(attr, live) if live is not None else None

    K = len(per_variant)
    if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
        pairs = [
            fuse.bn_scale_shift(
                get(k, "weight"),
                get(k, "bias"),
                get(k, "running_mean"),
                get(k, "running_var"),
                m.eps,
            )
            for k in range(K)
        ]
        scale, shift = [p[0] for p in pairs], [p[1] for p in pairs]
        # scale/shift: the per-variant affine on a K·B batch; the K·C stacks: one batch_norm
        # call on the fold form, the same kernel (and arithmetic) as each variant's own BN.
        st = {"scale": torch.stack(scale), "shift": torch.stack(shift)}
        for attr in ("running_mean", "running_var", "weight", "bias"):
            st[attr] = (
                torch.cat([get(k, attr) for k in range(K)])
                if getattr(m, attr) is not None
                else None
            )
        return st
    b = torch.stack([get(k, "bias") for k in range(K)]) if m.bias is not None else None
    if channels_last and isinstance(m, nn.Conv2d):
        # ONE copy, straight into the [K·out, in, kh, kw] channels_last layout the conv reads
        # (keeping the [K, out, ...] stack beside it would double a chunk's weight memory).
        w0 = m.weight
        w4 = empty_as((K * w0.shape[0], *w0.shape[1:]), w0, torch.channels_last)
        for k in range(K):
            w4[k * w0.shape[0] : (k + 1) * w0.shape[0]].copy_(get(k, "weight"))
        return {"weight4": w4, "bias": b}
    st: dict[str, Any] = {"weight": torch.stack([get(k, "weight") for k in range(K)]), "bias": b}
    return st


def _tiled_bn(m: nn.Module, K: int) -> dict[str, torch.Tensor | None]:
    """A shared eval BatchNorm's tensors repeated K times, for its call on a fold-form input."""
    return {
        a: (None if getattr(m, a) is None else getattr(m, a).repeat(K))
        for a in ("running_mean", "running_var", "weight", "bias")
    }


def _bn(x: torch.Tensor, st: dict[str, Any], eps: float) -> torch.Tensor:
    return F.batch_norm(
        x, st["running_mean"], st["running_var"], st["weight"], st["bias"], False, 0.0, eps
    )


# ---- one overridden module --------------------------------------------------------------


def apply_fanned(
    m: nn.Module, st: dict[str, Any], x: torch.Tensor | Fold, fanned: bool, K: int
) -> torch.Tensor | Fold:
    """Apply K weight sets of `m` to a shared input [B, ...] (`fanned` False), a K·B batch, or
    a Fold. Convs return a Fold (wide conv on a shared input, grouped conv otherwise); an eval
    BN keeps a Fold folded; everything else returns a K·B batch."""
    if isinstance(m, nn.Conv1d | nn.Conv2d):
        conv = F.conv2d if isinstance(m, nn.Conv2d) else F.conv1d
        b = st["bias"]  # [K, out]
        wk = st["weight4"] if "weight4" in st else st["weight"].reshape(-1, *st["weight"].shape[2:])
        bk = None if b is None else b.reshape(-1)
        if isinstance(x, Fold):
            xf = x.t
        elif not fanned and m.groups == 1:
            return Fold(conv(x, wk, bk, m.stride, m.padding, m.dilation, 1), K)
        else:
            xf = layout.to_fold(x if fanned else expand(x, K), K)
        return Fold(conv(xf, wk, bk, m.stride, m.padding, m.dilation, m.groups * K), K)
    if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) and isinstance(x, Fold):
        return Fold(_bn(x.t, st, m.eps), K)
    if isinstance(x, Fold):
        x, fanned = x.batch(), True
    if isinstance(m, nn.Linear):
        w, b = st["weight"], st["bias"]  # [K, out, in], [K, out]
        if not fanned:
            y = F.linear(x, w.reshape(-1, w.shape[-1]), None if b is None else b.reshape(-1))
            y = y.reshape(*x.shape[:-1], K, w.shape[1]).movedim(-2, 0)
            return y.reshape(K * x.shape[0], *y.shape[2:])
        B = x.shape[0] // K
        xk = x.reshape(K, -1, x.shape[-1])
        y = (
            torch.bmm(xk, w.transpose(1, 2).to(xk.dtype))
            if b is None
            else torch.baddbmm(b.unsqueeze(1).to(xk.dtype), xk, w.transpose(1, 2).to(xk.dtype))
        )
        return y.reshape(K * B, *x.shape[1:-1], w.shape[1])
    if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
        if not fanned:
            x = expand(x, K)
        B = x.shape[0] // K
        view = (K, 1, -1) + (1,) * (x.dim() - 2)
        sc, sh = st["scale"].reshape(view), st["shift"].reshape(view)
        xk = x.reshape(K, B, *x.shape[1:])
        if x.dtype == sc.dtype:
            return (xk * sc + sh).reshape(K * B, *x.shape[1:])
        # A narrower x (bf16 autocast, a float16 model): the affine in scale's float32, rounded
        # once into x's dtype, as the model's own BatchNorm computes. With scale and shift
        # rounded to bf16 first, x·scale and shift (large where the running mean is) cancelled
        # with bf16 errors: ~17x the eager BN's error on the output. `out=` stores the float32
        # result straight into x's dtype, without a float32 copy of the K·B batch.
        y = torch.empty_like(x)
        torch.addcmul(sh, xk, sc, out=y.view(K, B, *x.shape[1:]))
        return y
    raise TypeError(f"cannot fan out {type(m).__name__}")


# ---- shared steps on fold-form values ---------------------------------------------------

_NO = object()  # "this step cannot run on the fold form"


def _fold_step(
    prog: Program, s: Step, env: dict[int, Any], plan: FanPlan, K: int, stacks: dict
) -> Any:
    """Run step `s` on fold-form values when that is provably the same per channel; else _NO.

    An in-place step (relu_, +=) writes into the Fold's tensor, as eager mode writes into the
    variant's. A Fold never has a batch form yet here (`run_fanned` retires a Fold the moment one
    is made), so no copy can go stale."""
    refs = set(refs_in(s.args) + refs_in(s.kwargs))
    if not any(isinstance(env.get(r), Fold) for r in refs):
        return _NO
    first = s.args[0] if s.args else None
    if s.op == "call_module":
        m = prog.modules[s.target]
        x = (
            env[first.index]
            if isinstance(first, Ref) and len(s.args) == 1 and not s.kwargs
            else None
        )
        if not isinstance(x, Fold):
            return _NO
        if (
            isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)
            and not m.training
            and m.running_mean is not None
        ):
            return Fold(_bn(x.t, _tiled(stacks, s.target, K, _tiled_bn, m), m.eps), K)
        if _SPATIAL_RANK.get(type(m), x.t.dim() - 2) != x.t.dim() - 2:
            return _NO
        if isinstance(m, _PER_CHANNEL_MODULES) and not getattr(m, "return_indices", False):
            y = prog.call_module(s, x.t)  # in place where eager mode is (Program.keep_inplace)
            return x if y is x.t else Fold(y, K)
        return _NO
    unary = (s.op == "call_function" and s.target in _PER_CHANNEL_FUNCS) or (
        s.op == "call_method" and s.target in _PER_CHANNEL_METHODS
    )
    if unary:
        # a Ref among the keyword arguments (`torch.exp(g, out=g)`: the one ref is the input
        # itself) would reach torch unresolved, a TypeError that sent the group to the swap
        # path: the batch form runs such a step as eager mode does
        if (len(refs) != 1 or not isinstance(first, Ref) or refs_in(s.kwargs)
                or s.kwargs.get("return_indices")):
            return _NO
        x = env[first.index]
        if _SPATIAL_RANK.get(s.target, x.t.dim() - 2) != x.t.dim() - 2:
            return _NO
        args = (x.t, *s.args[1:])
        y = (
            s.target(*args, **s.kwargs)
            if s.op == "call_function"
            else getattr(x.t, s.target)(*args[1:], **s.kwargs)
        )
        return x if y is x.t else Fold(y, K)  # in place (relu_, inplace=True) or not
    binary = (s.op == "call_function" and s.target in _BINARY_FUNCS) or (
        s.op == "call_method" and s.target in _BINARY_METHODS
    )
    if binary and len(s.args) == 2 and not s.kwargs:
        return _binary(s, env, plan, K)
    return _NO


def _binary(s: Step, env: dict[int, Any], plan: FanPlan, K: int) -> Any:
    """a ∘ b with a Fold on at least one side; the other a Fold of the same shape, a number (or
    a shared 0-d tensor, one number for all), or a shared per-sample tensor of a variant's shape
    (broadcast over K: no copy of it)."""
    vals = [env[a.index] if isinstance(a, Ref) else a for a in s.args]
    fold = next(v for v in vals if isinstance(v, Fold))
    inplace = s.target in _INPLACE
    if inplace and not isinstance(vals[0], Fold):
        return _NO  # an in-place op into a shared value

    def number(a: Any, v: Any) -> bool:
        return isinstance(v, int | float) or (
            isinstance(a, Ref) and a.index not in plan.fanned and isinstance(v, torch.Tensor)
            and v.dim() == 0)

    pv = fold.per_variant_shape
    if all(isinstance(v, Fold) or number(a, v) for a, v in zip(s.args, vals, strict=True)):
        if any(isinstance(v, Fold) and v.t.shape != fold.t.shape for v in vals):
            return _NO
        ops = [v.t if isinstance(v, Fold) else v for v in vals]
        broadcast = False
    else:
        for a, v in zip(s.args, vals, strict=True):
            if not isinstance(v, Fold | torch.Tensor | int | float):
                return _NO
            if isinstance(v, torch.Tensor) and (
                not isinstance(a, Ref)
                or a.index in plan.fanned
                or a.index not in plan.batch
                or tuple(v.shape) != pv
            ):
                return _NO
            if isinstance(v, Fold) and v.t.shape != fold.t.shape:
                return _NO
        ops = [
            v.t.unflatten(1, (K, pv[1]))
            if isinstance(v, Fold)
            else v.unsqueeze(1)
            if isinstance(v, torch.Tensor)
            else v
            for v in vals
        ]
        broadcast = True
    y = s.target(*ops) if s.op == "call_function" else getattr(ops[0], s.target)(*ops[1:])
    if inplace:
        return vals[0]
    return Fold(y.flatten(1, 2) if broadcast else y, K)


# ---- the suffix -------------------------------------------------------------------------

_FOLD_MODULES = (nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)  # take a Fold as is


def _retire(env: dict[int, Any], f: Fold) -> torch.Tensor:
    """From now on the value of every step holding `f` is its K·B batch form. A Fold and its
    batch form are never both live, so an in-place step on either (or on a view of the batch)
    is seen by every later user, as in eager mode."""
    b = f.batch()
    for r, v in env.items():
        if v is f:
            env[r] = b
    return b


def _fusion(
    prog: Program, s: Step, env: dict[int, Any], plan: FanPlan, stacks: dict, K: int, kernel
) -> dict[int, Any] | None:
    """If step `s` is a BatchNorm on a Fold whose chain ends in a ReLU: the fused values."""
    if s.op != "call_module" or len(s.args) != 1 or not isinstance(s.args[0], Ref):
        return None
    m, x = prog.modules[s.target], env.get(s.args[0].index)
    if not isinstance(x, Fold) or not isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
        return None
    if s.target in stacks:
        st = stacks[s.target]
        scale, shift = st["scale"].reshape(-1), st["shift"].reshape(-1)
    elif not m.training and m.running_mean is not None:
        scale, shift = _tiled(stacks, s.target, K, fuse.bn_affine, m)
    else:
        return None
    return fuse.try_fuse(prog, s, env, plan, x, scale, shift, kernel)


_TILED = "<tiled BNs>"  # a key of `stacks` no module name can take


def _tiled(stacks: dict, name: str, K: int, make, m: nn.Module) -> Any:
    """`make(m, K)` for a shared BN, made once per chunk: `stacks` lives as long as the chunk's
    weight stacks (all batches of the pass), so these small tensors are not rebuilt per batch."""
    cache = stacks.setdefault(_TILED, {})
    key = (make.__name__, name, K)
    if key not in cache:
        cache[key] = make(m, K)
    return cache[key]


def _check_dim(s: Step, d: int, env: dict[int, Any]) -> None:
    """Step s's negative dim `d`, against the rank of its first tensor argument (a Fold has the
    rank of each variant's value): raise `NotPerSample` where it is the batch dim, so the group
    runs on the swap path instead (`F.log_softmax(x, dim=-2)` on [B, C] logits)."""
    refs = refs_in(s.args) + refs_in(s.kwargs)
    v = env.get(refs[0]) if refs else None
    t = v.t if isinstance(v, Fold) else v
    # an item of a value's torch.Size (`v.shape[-1]`): the rank is the size's length
    rank = len(t) if isinstance(t, torch.Size) else t.dim() if isinstance(t, torch.Tensor) else None
    if rank is None or resolves_to_batch(d, rank):
        raise NotPerSample(
            f"step {s.index} ({getattr(s.target, '__name__', s.target)}): dim {d} is the "
            f"batch dim of a rank-{'?' if rank is None else rank} value"
        )


def _tiles(v: Any) -> bool:
    """Whether a shared value of the batch is tiled K times for a step on the K·B batch. A 0-d
    one (`h * x.sum()`, `h / x.norm()`: a reduction of the whole shared input) has no batch dim:
    eager mode gives every variant the same number, so it is used as it is, a per-call
    constant (tiling it raised IndexError, and the group fell back to the swap path)."""
    return isinstance(v, torch.Tensor) and v.dim() > 0


def _check_broadcast(s: Step, local: dict[int, Any], plan: FanPlan, rows: int) -> None:
    """Elementwise step `s` on the K·B batch (`rows` = K·B) broadcasts its operands: raise
    `NotPerSample` unless every batch operand (fanned, or shared and tiled K times) has the
    result's rank and all K·B rows, and every other tensor (a parameter) a dim 0 of 1 or a lower
    rank. Otherwise broadcasting lines the batch dim up with another one: `h * h.sum(1)` on
    [B, 1] is [B, B] in eager mode, [K·B, K·B] fanned; a shared `x.mean(0)` [1, H, W] tiled to
    [K, H, W] against [K·B, 1, H, W] is counted K times by a later `sum(1)`; a [2, 1, C]
    parameter moves the batch to dim 1, where `mean(1)` then averages over K·B rows."""
    vals = [(r, local[r]) for r in refs_in(s.args) + refs_in(s.kwargs)]
    ts = [(r, v) for r, v in vals if isinstance(v, torch.Tensor)]
    rank = max((v.dim() for _, v in ts), default=0)
    for r, v in ts:
        if r not in plan.fanned and not _tiles(v):
            continue  # a shared 0-d value: one number for every variant and sample
        batch = r in plan.fanned or r in plan.batch
        ok = (v.dim() == rank and v.shape[0] == rows) if batch else (
            v.dim() < rank or v.shape[0] == 1)
        if not ok:
            raise NotPerSample(
                f"step {s.index} ({getattr(s.target, '__name__', s.target)}): broadcasts a "
                f"{tuple(v.shape)} {'batch value' if batch else 'tensor'} against rank {rank} "
                f"with {rows} rows: it would line the batch dim up with another dim")


def _check_rows(s: Step, local: dict[int, Any], y: Any) -> None:
    """A `view(-1, N...)` step (`FanPlan.rowviews`) on the K·B batch: raise `NotPerSample` unless
    its result keeps its input's rows. Then row i is sample i reshaped (dim 0 is outermost);
    otherwise each sample is cut into several rows (or rows merged), and the -1, K·B rows
    fanned where eager mode has B, no longer lines the rows up with the samples."""
    v = local.get(s.args[0].index) if isinstance(s.args[0], Ref) else None
    if not (isinstance(v, torch.Tensor) and isinstance(y, torch.Tensor) and v.dim() > 0
            and y.shape[0] == v.shape[0]):
        raise NotPerSample(
            f"step {s.index} (.{s.target}(-1, ...)): the result does not keep its input's rows "
            f"({tuple(getattr(v, 'shape', ()))} -> {tuple(getattr(y, 'shape', ()))})")


def run_fanned(
    prog: Program,
    plan: FanPlan,
    x: torch.Tensor,
    stacks: dict[str, dict],
    K: int,
    fold: bool = True,
    fuse_ops: bool = True,
    trace: list[str] | None = None,
) -> torch.Tensor:
    """Run the suffix from `plan.start` on the shared input `x` for K variants at once.
    Returns logits [K·B, C], variant-major. `fold=False` unfolds after every conv (the
    session-3 path, kept for tests and comparison); `fuse_ops=False` runs BN -> add -> ReLU on
    the fold form as separate torch ops instead of one `affine_relu`. `trace` collects, per
    fanned step, how it ran: "module" (an overridden module), "fused", "fold", or "batch" (on
    the K·B batch)."""
    start = plan.start
    env: dict[int, Any] = {prog.carrier[start] if start else 0: x}
    for s in prog.steps[: start + 1]:
        if s.op == "get_attr":
            env[s.index] = prog.fetch(s.target)
    kernel = None
    if fold and fuse_ops:
        from layerfast import ops

        kernel = ops.affine_relu if ops.has_kernel("affine_relu", x.device) else None
    done: dict[int, Any] = {}  # values of steps a fusion already computed
    covered: set[int] = set()  # every step a fusion ran (for `trace`)
    frees = prog.frees
    # the forward's own autocast regions whose state is not the one in force (`regions_here`):
    # each such step runs under its region's state, however it runs here
    regions = prog.regions_here()
    for s in prog.steps[start + 1 :]:
        if s.op == "output":
            out = _map_refs(s.args, lambda r, env_=env: env_[r.index])[0]
            if isinstance(out, Fold):
                return out.batch()
            return out if s.index in plan.fanned else expand(out, K)
        if s.index in plan.dims:
            _check_dim(s, plan.dims[s.index], env)
        if regions and s.index in regions:
            with autocast_as(prog.autocast_kind, regions[s.index]):  # type: ignore[arg-type]
                y = _fanned_step(prog, plan, s, env, stacks, K, fold, kernel, done, covered,
                                 K * x.shape[0], regions)
        else:
            y = _fanned_step(prog, plan, s, env, stacks, K, fold, kernel, done, covered,
                             K * x.shape[0], regions)
        if trace is not None and s.index in plan.fanned:
            trace.append(
                "fused"
                if s.index in covered
                else "module"
                if s.op == "call_module" and s.target in stacks
                else "fold"
                if isinstance(y, Fold)
                else "batch"
            )
        env[s.index] = y
        for r in frees[s.index]:
            env.pop(r, None)
    raise RuntimeError("program has no output")


def _one_state(prog: Program, s: Step, regions: Mapping[int, Any]) -> bool:
    """Whether the steps a fusion at `s` may cover (`try_fuse`'s chain: s, its only user, and
    where that is not the ReLU, the add's only user) all run in the same autocast state: the
    fused op runs once, in s's."""
    if not regions:
        return True
    chain = {s.index}
    if len(s.users) == 1:
        u = prog.steps[s.users[0]]
        chain.add(u.index)
        if not fuse.is_relu_of(prog, u, s.index) and len(u.users) == 1:
            chain.add(u.users[0])
    return len({regions.get(i) for i in chain}) == 1


def _fanned_step(prog: Program, plan: FanPlan, s: Step, env: dict[int, Any], stacks: dict,
                 K: int, fold: bool, kernel, done: dict[int, Any], covered: set[int],
                 rows: int, regions: Mapping[int, Any]) -> Any:
    """Step s's value in `run_fanned` (its autocast state is the caller's to set): a value a
    fusion computed already, the step as it is (not fanned), a fusion, an overridden module's
    K weight sets, a step on the fold form, or the step on the K·B batch."""
    if s.index in done:
        return done.pop(s.index)
    if s.index not in plan.fanned:
        return prog.eval_step(s, env)
    if kernel is not None and _one_state(prog, s, regions) and (
            fused := _fusion(prog, s, env, plan, stacks, K, kernel)):
        covered.update(fused)
        done.update(fused)
        return done.pop(s.index)
    if s.op == "call_module" and s.target in stacks:
        (arg,) = s.args
        m, v = prog.modules[s.target], env[arg.index]
        if isinstance(v, Fold) and not (fold and isinstance(m, _FOLD_MODULES)):
            v = _retire(env, v)
        y = apply_fanned(m, stacks[s.target], v, arg.index in plan.fanned, K)
        return y if fold or not isinstance(y, Fold) else y.batch()
    y = _fold_step(prog, s, env, plan, K, stacks)
    if y is not _NO:
        return y
    local: dict[int, Any] = {}
    for r in set(refs_in(s.args) + refs_in(s.kwargs)):
        v = env[r]
        if isinstance(v, Fold):
            v = _retire(env, v)
        elif r not in plan.fanned and r in plan.batch and _tiles(v):
            v = expand(v, K)
        local[r] = v
    if s.index in plan.broadcasts:
        _check_broadcast(s, local, plan, rows)
    y = prog.eval_step(s, local)
    if s.index in plan.rowviews:
        _check_rows(s, local, y)
    return y
