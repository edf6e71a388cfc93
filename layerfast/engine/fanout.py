"""Fan-out: which groups of K variants may run as one wide computation (DESIGN.md §7.3).

`fan_plan` below is the proof (`prove_fan` the same, with the reason when it fails, which the
plan keeps for a refused group); `fanrun.run_fanned` the execution.

The K variants share the cached input. The first overridden conv/linear sees that shared input,
so its K weight sets are applied as ONE wide conv/linear with K·C_out outputs; overridden modules
further down apply theirs as a grouped conv / batched matmul / per-variant BatchNorm, and the rest
of the suffix runs once for all K (conv outputs stay side by side on the channel dim while the
steps are per-channel, then become a variant-major K·B batch: `fanrun.Fold`).

This is only valid when every step downstream of the first overridden module treats samples
independently. `fan_plan` proves that from the program (an allow-list of modules, functions and
methods, with their dimension arguments checked); anything it cannot prove sends the group to
the swap path, which is always correct. A runtime error in the fanned run does the same.

The fanned run computes an overridden module from its stacked tensors (and runs BatchNorms and
activations on the fold form) without calling the module, so it also refuses: modules with
parametrizations (their state keys are not the `weight` it stacks), forward hooks or pre-hooks
(old-style `weight_norm` / `spectral_norm` are pre-hooks) on any module it would run, global
forward hooks, a tied overridden tensor (held by two modules under two names), and an in-place
write into a value shared by the K variants that another step reads.
A negative dim (`softmax(dim=-1)`) is per-sample or not depending on the value's rank, known
only when it runs: `FanPlan.dims` lists them and `fanrun` raises `NotPerSample` (so the group
takes the swap path) where one resolves to the batch dim.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from layerfast.engine.graph import Program, Ref, refs_in
from layerfast.engine.optables import _FRESH_FUNCS, _FRESH_METHODS, _FRESH_MODULES
from layerfast.engine.tracing import global_hooks

#: Modules that act on each channel (and sample) alone, with no parameters of their own: the
#: same on a fold form [B, K·C, *S] as on each variant's [B, C, *S] (engine/fanrun.py).
PER_CHANNEL_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool2d,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.ZeroPad2d,
    nn.ConstantPad2d,
    nn.Upsample,
)
_BATCHWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.PReLU,
    nn.Softmax,  # over one dim, which `_why_not_batchwise` checks is not the batch dim
    nn.LogSoftmax,
    *PER_CHANNEL_MODULES,
)
_ELEMENTWISE_FUNCS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.floordiv,  # on a size's non-batch items (`c // groups`), or elementwise
    operator.neg,
    operator.pow,  # `h ** 2`, `2 ** h`; a tensor exponent broadcasts (checked as `mul`'s is)
    torch.pow,
    torch.clamp,  # a tensor bound broadcasts (checked as `mul`'s operands are)
    torch.clip,
    operator.iadd,
    operator.imul,
    operator.isub,
    operator.itruediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    F.relu,
    F.gelu,
    F.silu,
    F.hardswish,
    F.hardsigmoid,  # MobileNetV3's functional forms
    F.relu6,
    F.hardtanh,
    F.elu,
    F.leaky_relu,
    # elementwise, no dims (a write by torch.relu_ is checked as every in-place step is)
    torch.exp,
    torch.abs,
    torch.relu_,
    F.softplus,
    F.dropout,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,  # without indices
    F.avg_pool2d,
    F.max_pool2d,
    torch.nn.functional.softmax,
    torch.nn.functional.log_softmax,
}
_ELEMENTWISE_METHODS = {
    "relu",
    "sigmoid",
    "tanh",
    "add",
    "mul",
    "sub",
    "div",
    "contiguous",
    "float",
    "to",
    "size",
    "clone",
    "softmax",
    "log_softmax",
    "add_",
    "relu_",
    "mul_",
    "sub_",
    "exp",
    "abs",
    "pow",
    "clamp",
    "clip",
    "expand_as",  # broadcasts its value to the other's shape (checked as `mul`'s operands are)
}
#: The elementwise functions and methods above that take two tensors and broadcast them.
BROADCASTING_FUNCS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
    operator.iadd, operator.imul, operator.isub, operator.itruediv,
    torch.add, torch.sub, torch.mul, operator.pow, torch.pow,
    torch.clamp, torch.clip,
    torch.max, torch.min,  # `torch.max(h, u)`; a max over a dim has one tensor: nothing to check
}
BROADCASTING_METHODS = {"add", "mul", "sub", "div", "add_", "mul_", "sub_", "pow", "clamp", "clip",
                        "expand_as", "max", "min"}
_FANNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


def _stock(m: nn.Module) -> bool:
    """A fannable module whose forward is torch's own: `apply_fanned` reimplements exactly that
    (a subclass with its own forward, or an instance whose forward was replaced, computes
    something else)."""
    return not _replaced(m) and any(
        isinstance(m, t) and type(m).forward is t.forward for t in _FANNABLE)


def _replaced(m: nn.Module) -> bool:
    """Whether `m.forward` was replaced on the instance (`m.forward = f`): a call runs `f`,
    not its type's forward, whatever that type is known to compute (per sample or not)."""
    return "forward" in vars(m)


@dataclass
class FanPlan:
    """How a group of variants starting at `start` runs fanned."""

    start: int
    modules: list[str]  # overridden modules, all applied through call_module steps
    fanned: set[int]  # steps whose values are K·B (variant-major)
    batch: set[int]  # steps carrying per-sample values (expandable to K·B)
    # step -> its negative dim argument: per-sample only if it does not resolve to dim 0 for
    # the rank of the step's first tensor argument, which `fanrun` checks when it runs
    dims: dict[int, int] = field(default_factory=dict)
    # elementwise steps of several operands, which broadcast: per-sample only where every
    # batch operand has the result's rank (its dim 0 is the result's dim 0) and no other
    # operand has a dim 0 of its own there, which `fanrun` checks when it runs
    broadcasts: set[int] = field(default_factory=set)
    # `view(-1, N, ...)` / `reshape(-1, ...)` steps: per-sample only where the result keeps its
    # input's rows (N... is each sample's size), which `fanrun` checks when it runs
    rowviews: set[int] = field(default_factory=set)


class NotPerSample(RuntimeError):
    """A fanned step's dim resolved to the batch dim at run time: the group must not fan."""


def resolves_to_batch(d: int, ndim: int) -> bool:
    """Whether dim `d` of a rank-`ndim` value is dim 0 (`-2` of a [B, C] value is)."""
    return d == 0 or (d < 0 and d + max(ndim, 1) == 0)


def _dim_ok(d: Any, i: int, dims: dict[int, int]) -> bool:
    """A dim argument of step i that is never the batch dim: a positive int, or a negative one
    (then recorded in `dims`, to check against the value's rank when it runs)."""
    if not isinstance(d, int) or isinstance(d, bool) or d == 0:
        return False
    if d < 0:
        dims[i] = d
    return True


def _reduced_dims_ok(s: Any, i: int, dims: dict[int, int]) -> bool:
    """A `mean`/`sum`/`amax`/`amin` over named dims that never include the batch dim
    (`x.mean([2, 3])`, a global average pool written by hand: MnasNet, SE blocks;
    `x.mean((-2, -1))`): per sample. No dim (the whole tensor; `amax`'s default `()`) mixes
    samples. Of a list's negative dims only the lowest can be dim 0 of a rank the call accepts
    (a higher one is dim 0 only where the lowest is out of range), so that one is checked
    against the rank when it runs (`dims`)."""
    d = s.args[1] if len(s.args) > 1 else s.kwargs.get("dim")
    if isinstance(d, list | tuple):
        return _dims_ok(d, i, dims)
    return _dim_ok(d, i, dims)


def _dims_ok(ds: list | tuple, i: int, dims: dict[int, int]) -> bool:
    """Whether named dims `ds` (a list or tuple) are plain ints none of which is the batch dim:
    not empty, no 0 (nor a bool). Of the negative ones only the lowest can be dim 0 of a rank
    the call accepts (a higher one is dim 0 only where the lowest is out of range), so that one
    is recorded in `dims` for step i, to check against the rank when it runs."""
    if not ds or not all(isinstance(x, int) and not isinstance(x, bool) and x != 0 for x in ds):
        return False
    neg = [x for x in ds if x < 0]
    if neg:
        dims[i] = min(neg)
    return True


def _identity_in_eval(target: Any, s: Any) -> bool:
    """torchvision's `stochastic_depth(x, p, mode, training)` traced with `training=False`
    (the module in eval mode, as the engine runs it): the identity. EfficientNet, ConvNeXt and
    Swin call it in every block, so refusing it kept their groups from fanning out."""
    if getattr(target, "__name__", "") != "stochastic_depth" or not str(
            getattr(target, "__module__", "")).startswith("torchvision."):
        return False
    training = s.args[3] if len(s.args) > 3 else s.kwargs.get("training", True)
    return training is False


def _has_hooks(m: nn.Module) -> bool:
    """Forward hooks / pre-hooks (a fanned run does not call the module, so they would not
    run) or parametrizations (the module's weight is computed from other tensors)."""
    return bool(m._forward_hooks or m._forward_pre_hooks) or parametrize.is_parametrized(m)


def _describe(prog: Program, s: Any) -> str:
    """Step `s` as a refusal names it: its index and the call (`step 7 (.permute())`)."""
    if s.op == "call_module":
        return f"step {s.index} ({s.target}: {type(prog.modules[s.target]).__name__})"
    if s.op == "call_method":
        return f"step {s.index} (.{s.target}())"
    if s.op == "call_function":
        mod = getattr(s.target, "__module__", None) or ""
        mod = {"_operator": "operator", "torch.nn.functional": "F"}.get(mod, mod)
        name = getattr(s.target, "__name__", repr(s.target))
        return f"step {s.index} ({mod + '.' if mod else ''}{name})"
    return f"step {s.index} ({s.op} {s.target})"


_BATCH_DIM = "is the batch dim"
_NOT_LISTED = "not on the allow-list of per-sample operations"


def _dim_why(d: Any, i: int, dims: dict[int, int], what: str = "dim") -> str | None:
    """`_dim_ok` with the reason it is not: None when `d` is never the batch dim."""
    return None if _dim_ok(d, i, dims) else f"{what} {d!r} {_BATCH_DIM} (or not a plain int)"


def _arg(s: Any, pos: int, name: str, default: Any = None) -> Any:
    """Argument `name` of step `s`, passed at position `pos` (self counts) or by keyword."""
    return s.args[pos] if len(s.args) > pos else s.kwargs.get(name, default)


#: `permute` and `transpose`: per-sample exactly when the batch dim stays dim 0 (each sample's
#: slice is then permuted alike, and no other dim becomes the batch).
_PERMUTES = {torch.permute}
_TRANSPOSES = {torch.transpose, torch.swapaxes, torch.swapdims}
#: Splits of a value into a tuple (`x1, x2 = x.chunk(2, dim=1)`: ShuffleNetV2): per-sample when
#: along a dim other than the batch dim; `getitem` with an int then picks one piece. The dim is
#: the third argument (self counts), unbind's the second.
_SPLIT_FUNCS = {torch.chunk, torch.split, torch.tensor_split, torch.unbind}
_SPLIT_METHODS = {"chunk", "split", "tensor_split", "unbind"}


def _permute_why(s: Any) -> str | None:
    """`x.permute(0, 2, 3, 1)` / `torch.permute(x, [0, 2, 3, 1])` (ConvNeXt's LayerNorm2d and
    CNBlock): per-sample when the new order starts with the batch dim, as plain ints."""
    order = s.kwargs.get("dims")
    if order is None:
        rest = s.args[1:]
        order = rest[0] if len(rest) == 1 and isinstance(rest[0], tuple | list) else rest
    order = tuple(order) if isinstance(order, tuple | list) else ()
    if not order or not all(isinstance(d, int) and not isinstance(d, bool) for d in order):
        return "a permutation that is not plain ints"
    return None if order[0] == 0 else f"permutation {list(order)} moves the batch dim"


def _transpose_why(s: Any, i: int, dims: dict[int, int]) -> str | None:
    """`torch.transpose(x, 1, 2)` (ShuffleNetV2's channel_shuffle): per-sample when neither
    dim is the batch dim. A negative one is checked against the rank when it runs; of two
    negative ones only the lower can be dim 0 of a rank the call accepts, so that one."""
    pair = (_arg(s, 1, "dim0"), _arg(s, 2, "dim1"))
    if not _dims_ok(pair, i, dims):
        return f"dims {pair[0]!r}, {pair[1]!r}: one {_BATCH_DIM} (or not a plain int)"
    return None


def _layer_norm_why(s: Any, i: int, dims: dict[int, int]) -> str | None:
    """`F.layer_norm(x, shape, ...)` normalises over the last len(shape) dims: per-sample
    unless they include the batch dim, i.e. dim -len(shape), checked against the rank when it
    runs (`dims`). `shape` must be plain ints (`x.shape[1:]` would be a traced value)."""
    shape = _arg(s, 1, "normalized_shape")
    shape = (shape,) if isinstance(shape, int) and not isinstance(shape, bool) else shape
    if not isinstance(shape, tuple | list | torch.Size) or not shape or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape):
        return "a normalized_shape that is not plain ints"
    dims[i] = -len(shape)
    return None


def _max_arg(s: Any) -> Any:
    """`max`/`min`'s second argument: a dim (`h.max(1)`), another tensor (`torch.max(h, u)`,
    elementwise) or None (the whole tensor)."""
    return _arg(s, 1, "dim", s.kwargs.get("other"))


def _max_why(s: Any, i: int, dims: dict[int, int]) -> str | None:
    """`h.max(d)` / `torch.min(h, dim=d)`: per-sample values and indices (a tuple, read by
    `getitem` or `.values`) over a dim that is not the batch dim; `torch.max(h, u)`: the
    elementwise maximum, a broadcast checked when it runs (`BROADCASTING_FUNCS`); no dim: over
    the whole tensor, refused."""
    d = _max_arg(s)
    if isinstance(d, Ref):
        return None
    return _REDUCES_BATCH if d is None else _dim_why(d, i, dims)


def _is_max_of_dim(prog: Program, r: Any) -> bool:
    """Whether `r` refers to a `max`/`min` over a dim (a (values, indices) tuple)."""
    if not isinstance(r, Ref):
        return False
    src = prog.steps[r.index]
    return ((src.op == "call_function" and src.target in (torch.max, torch.min)) or (
        src.op == "call_method" and src.target in ("max", "min"))) and isinstance(
        _max_arg(src), int) and not isinstance(_max_arg(src), bool)


def _unsqueeze_why(d: Any, i: int, dims: dict[int, int]) -> str | None:
    """`v.unsqueeze(d)`: per-sample unless the new dim goes before the batch dim. Its dim is a
    dim of the result, one rank higher than `v`: a negative `d` is position d + rank + 1, so -1
    never is dim 0 and d <= -2 is exactly where `d + 1` resolves to `v`'s dim 0 (checked
    against the rank when it runs: `unsqueeze(-2)` of a [B] value makes it [1, B])."""
    if not isinstance(d, int) or isinstance(d, bool) or d == 0:
        return f"dim {d!r} goes before the batch dim (or is not a plain int)"
    if d <= -2:
        dims[i] = d + 1
    return None


def _squeeze_why(s: Any, i: int, dims: dict[int, int]) -> str | None:
    """`v.squeeze(d)` / `v.squeeze((d1, d2))`: per-sample where no named dim is the batch dim
    (the lowest negative one checked against the rank when it runs). No dim squeezes every
    size-1 dim, the batch dim too where B is 1 and K·B is not: refused."""
    d = _arg(s, 1, "dim")
    if isinstance(d, list | tuple):
        return None if _dims_ok(d, i, dims) else f"dims {d!r}: one {_BATCH_DIM} (or not plain ints)"
    if d is None:
        return "squeezes every size-1 dim, the batch dim too where the batch is 1 sample"
    return _dim_why(d, i, dims)


def _is_split(prog: Program, r: Any) -> bool:
    """Whether `r` refers to a split step (`chunk`, `split`, ...) the proof accepted."""
    if not isinstance(r, Ref):
        return False
    src = prog.steps[r.index]
    return (src.op == "call_function" and src.target in _SPLIT_FUNCS) or (
        src.op == "call_method" and src.target in _SPLIT_METHODS)


def _why_not_batchwise(
    prog: Program, i: int, fanned: set[int], dims: dict[int, int], batch: set[int]
) -> str | None:
    """Why step i is not proven per-sample on a fanned K·B value; None when it is. `batch`:
    the steps whose values derive from the batch (a shared one is expanded to K·B)."""
    why = _why_not_batchwise_bare(prog, i, fanned, dims, batch)
    return None if why is None else f"{_describe(prog, prog.steps[i])}: {why}"


def _why_not_batchwise_bare(
    prog: Program, i: int, fanned: set[int], dims: dict[int, int], batch: set[int]
) -> str | None:
    s = prog.steps[i]
    if s.op == "output":
        return None
    if s.op == "call_module":
        m = prog.modules[s.target]
        if _has_hooks(m):
            return "forward hooks, pre-hooks or a parametrization (a fanned run does not call it)"
        if _replaced(m):
            return "its forward is replaced on the instance (not known to work per sample)"
        if isinstance(m, nn.Flatten):
            return _dim_why(m.start_dim, i, dims, "start_dim")
        if isinstance(m, nn.Unflatten):  # splits one dim of each sample
            return _dim_why(m.dim, i, dims)
        if not isinstance(m, _BATCHWISE_MODULES):
            return f"module type {_NOT_LISTED}"
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
            m.training or m.running_mean is None
        ):
            # normalises with the batch's statistics: mixes the K variants' samples
            return "normalises with the batch's statistics (training mode or no running stats)"
        if isinstance(m, nn.Softmax | nn.LogSoftmax):
            return _dim_why(m.dim, i, dims)
        if isinstance(m, nn.ZeroPad2d | nn.ConstantPad2d | nn.AdaptiveAvgPool2d):
            dims[i] = -2  # acts on the last 2 dims: on a rank-2 value, the batch dim too
        elif isinstance(m, nn.AdaptiveAvgPool3d):
            dims[i] = -3
        return None
    if s.op == "call_function":
        if _is_whole_size(s):  # `v.shape`, traced as getattr(v, "shape")
            return _items_why(prog, s)
        if s.target in (torch.flatten,):
            return _dim_why(_arg(s, 1, "start_dim", 0), i, dims, "start_dim")
        if s.target is torch.unflatten:
            return _dim_why(_arg(s, 1, "dim"), i, dims)
        if s.target in (torch.cat, torch.concat):
            return _dim_why(_arg(s, 1, "dim", 0), i, dims)
        if s.target is operator.getitem:
            idx = s.args[1]
            src = prog.steps[s.args[0].index] if isinstance(s.args[0], Ref) else None
            if src is not None and (src.op == "call_method" and src.target == "size"
                                    or _is_whole_size(src)):
                if isinstance(idx, int) and not isinstance(idx, bool) and idx < 0:
                    dims[i] = idx  # `v.shape[-1]`: item 0 of a rank-1 value (checked when run)
                return None  # an item of `v.size()`/`v.shape` (`_items_why`: how it is used)
            if (_is_split(prog, s.args[0]) or _is_max_of_dim(prog, s.args[0])) and isinstance(
                    idx, int) and not isinstance(idx, bool):
                return None  # one piece of a split along a non-batch dim; max(dim)'s values
            if isinstance(idx, tuple) and idx and idx[0] == slice(None):
                return _index_why(idx[1:], fanned, batch)
            if isinstance(idx, tuple) and idx and idx[0] is Ellipsis:
                if _ellipsis_ok(idx[1:], i, dims):
                    return None
            return "an index that may select along the batch dim"
        if s.target in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax):
            return _dim_why(_arg(s, 1, "dim"), i, dims)
        if s.target in (torch.max, torch.min):
            return _max_why(s, i, dims)
        if s.target is getattr and _is_max_of_dim(prog, s.args[0]) and s.args[1] in (
                "values", "indices"):
            return None  # `torch.max(h, 1).values`
        if s.target is F.normalize:  # over `dim` (default 1) of each sample
            return _dim_why(_arg(s, 2, "dim", 1), i, dims)
        if s.target is torch.unsqueeze:
            return _unsqueeze_why(_arg(s, 1, "dim"), i, dims)
        if s.target is torch.squeeze:
            return _squeeze_why(s, i, dims)
        if s.target in (torch.mean, torch.sum, torch.amax, torch.amin):
            return None if _reduced_dims_ok(s, i, dims) else _REDUCES_BATCH
        if s.target in _PERMUTES:
            return _permute_why(s)
        if s.target in _TRANSPOSES:
            return _transpose_why(s, i, dims)
        if s.target in (F.layer_norm, torch.layer_norm):
            return _layer_norm_why(s, i, dims)
        if s.target in _SPLIT_FUNCS:
            return _dim_why(_arg(s, 1 if s.target is torch.unbind else 2, "dim", 0), i, dims)
        if _identity_in_eval(s.target, s):
            return None
        if s.target is F.adaptive_max_pool2d and _arg(s, 2, "return_indices", False) is not False:
            return "returns indices (a tuple the proof does not follow)"
        if s.target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
            dims[i] = -2  # as nn.AdaptiveAvgPool2d: [B, C] is pooled to [1, 1]
        return None if s.target in _ELEMENTWISE_FUNCS else _NOT_LISTED
    if s.op == "call_method":
        if s.target == "size":
            return _size_why(prog, s, i, dims)
        if s.target == "flatten":
            return _dim_why(_arg(s, 1, "start_dim", 0), i, dims, "start_dim")
        if s.target == "unflatten":
            return _dim_why(_arg(s, 1, "dim"), i, dims)
        if s.target in ("view", "reshape"):
            shape = _view_shape(s)
            src = s.args[0] if s.args else None
            if not (isinstance(src, Ref) and (src.index in fanned or src.index in batch)):
                # a parameter viewed with the fanned batch size: [B, N/B] in eager mode,
                # [K·B, N/(K·B)] fanned, other numbers in every row (`tok.view(h.size(0), -1)`)
                return "views a value that is not the batch's with the batch size"
            if shape and (_is_batch_size(prog, shape[0], fanned) or _is_rowview(s)):
                return None
            return ("its batch entry is not the fanned tensor's own size(0) "
                    "(a number, or a size that is not the batch's, would mix samples)")
        if s.target in ("softmax", "log_softmax"):
            return _dim_why(_arg(s, 1, "dim"), i, dims)
        if s.target in ("max", "min"):
            return _max_why(s, i, dims)
        if s.target == "unsqueeze":
            return _unsqueeze_why(_arg(s, 1, "dim"), i, dims)
        if s.target == "squeeze":
            return _squeeze_why(s, i, dims)
        if s.target in ("mean", "sum", "amax", "amin"):
            return None if _reduced_dims_ok(s, i, dims) else _REDUCES_BATCH
        if s.target == "permute":
            return _permute_why(s)
        if s.target in ("transpose", "swapaxes", "swapdims"):
            return _transpose_why(s, i, dims)
        if s.target in _SPLIT_METHODS:
            return _dim_why(_arg(s, 1 if s.target == "unbind" else 2, "dim", 0), i, dims)
        return None if s.target in _ELEMENTWISE_METHODS else _NOT_LISTED
    return None if s.op == "get_attr" else f"a {s.op} step"


_REDUCES_BATCH = "reduces over the batch dim, or over the whole tensor"


def _is_batch_size(prog: Program, r: Any, fanned: set[int]) -> bool:
    """Whether `r` is a fanned value's batch size: `v.size(0)`, or item 0 of `v.size()`
    (`batchsize, c, h, w = x.size()`: ShuffleNetV2's channel_shuffle), v fanned (K·B rows)."""
    v = _batch_size_of(prog, r)
    return v is not None and v in fanned


def _batch_size_of(prog: Program, r: Any) -> int | None:
    """The step `v` when `r` is `v.size(0)`, `v.size()[0]` or `v.shape[0]`; else None."""
    if not isinstance(r, Ref):
        return None
    src = prog.steps[r.index]
    if src.op == "call_function" and src.target is operator.getitem and src.args[1] == 0 \
            and isinstance(src.args[0], Ref):
        src = prog.steps[src.args[0].index]  # v.size()[0], v.shape[0]
        ok = _is_whole_size(src)
    else:
        ok = (src.op == "call_method" and src.target == "size" and len(src.args) > 1
              and src.args[1] == 0)
    return src.args[0].index if ok and isinstance(src.args[0], Ref) else None


def _index_why(rest: tuple, fanned: set[int], batch: set[int]) -> str | None:
    """`v[:, *rest]`: per-sample when `rest` holds ints, slices, None and Ellipsis, and at most
    one list or tensor that is not a value of the batch. Two such indices apart
    (`h[:, [0, 1], :, [0, 1]]`) put their dim before the batch dim; an index of the batch is
    tiled K times with it, so `h[:, idx]` is [K·B, K·B] where eager mode has [B, B]."""
    advanced = 0
    for e in rest:
        if e is None or e is Ellipsis or isinstance(e, slice) or (
                isinstance(e, int) and not isinstance(e, bool)):
            continue
        if any(r in fanned or r in batch for r in refs_in(e)):
            return "an index computed from the batch (tiled K times with it)"
        advanced += 1
    if advanced > 1:
        return "two list or tensor index entries (their dim goes before the batch dim)"
    return None


def _ellipsis_ok(rest: tuple, i: int, dims: dict[int, int]) -> bool:
    """`v[..., *rest]`: the Ellipsis covers rank - n dims, n the entries of `rest` that index a
    dim; where it covers none (`h[..., 0]` on a 1-D [B] value) the first of them is the batch
    dim. So the first indexed dim is dim -n, checked against the rank when it runs (`dims`).
    Only ints, slices and None: a tensor or bool index covers a number of dims unknown here."""
    plain = all(
        e is None or isinstance(e, slice) or (isinstance(e, int) and not isinstance(e, bool))
        for e in rest
    )
    if not plain:
        return False
    n = sum(e is not None for e in rest)
    if n:
        dims[i] = -n
    return True


def _size_why(prog: Program, s, i: int, dims: dict[int, int]) -> str | None:
    """`v.size(...)` of a fanned value. Its batch entry is K·B where the model saw B, so it may
    only set the batch entry of a view/reshape (which `_why_not_batchwise` checks); read any
    other way (`y * (16 / h.size(0))`) it would silently scale the fanned result by 1/K. Other
    dims are per-sample (a negative one is checked against the rank when it runs)."""
    d = s.args[1] if len(s.args) > 1 else s.kwargs.get("dim")
    if d is None:  # v.size(): item 0 only as a view's batch entry, the others freely
        return _items_why(prog, s)
    if d != 0:
        return _dim_why(d, i, dims)
    return None if _only_batch_entry(prog, s) else _SIZE_USED


_SIZE_USED = "the batch size (K·B when fanned) is used other than as a view/reshape's batch entry"


def _is_whole_size(s: Any) -> bool:
    """Step `s` is a value's whole torch.Size: `v.size()`, or `v.shape` (traced as
    `getattr(v, "shape")`; `h.reshape(h.shape[0], -1)` is as common as `h.size(0)`)."""
    if s.op == "call_method":
        return s.target == "size" and len(s.args) == 1 and not s.kwargs
    return (s.op == "call_function" and s.target is getattr and len(s.args) == 2
            and s.args[1] == "shape" and not s.kwargs)


def _items_why(prog: Program, s: Any) -> str | None:
    """A fanned value's whole size (`_is_whole_size`): only read item by item, item 0 (K·B
    when fanned) only as a view/reshape's batch entry, the others freely. A negative item
    (`v.shape[-1]`) is item 0 only of a value of that rank, which `fanrun` checks when it runs
    (the getitem step's dim in `FanPlan.dims`)."""
    for u in (prog.steps[j] for j in s.users):
        if not (u.op == "call_function" and u.target is operator.getitem
                and isinstance(u.args[1], int) and not isinstance(u.args[1], bool)):
            return "the whole size is used, not its items"
        if u.args[1] == 0 and not _only_batch_entry(prog, u):
            return _SIZE_USED
    return None


def _only_batch_entry(prog: Program, s) -> bool:
    """Whether every user of step `s` (a batch size) is a view/reshape taking it as its batch
    entry and nothing else."""

    def first_only(u) -> bool:  # this size(0) is the view's batch entry and nothing else
        shape = _view_shape(u)
        at = [j for j, a in enumerate(shape) if isinstance(a, Ref) and a.index == s.index]
        return at == [0] and not any(
            isinstance(a, Ref) and a.index == s.index for a in u.args[:1])

    return all(
        u.op == "call_method" and u.target in ("view", "reshape") and first_only(u)
        for u in (prog.steps[j] for j in s.users)
    )


def _is_rowview(s: Any) -> bool:
    """`v.view(-1, N, ...)` / `v.reshape(-1, ...)` with plain positive ints after the -1 (the
    classic `x.view(-1, 16 * 5 * 5)` flatten). Fanned, the -1 becomes K·B where eager mode has
    B; the result is per-sample exactly where it keeps its input's rows (N... is each sample's
    size, so row i is sample i reshaped), which `fanrun` checks when it runs (`FanPlan.rowviews`;
    a view that cuts each sample into several rows takes the swap path)."""
    if s.op != "call_method" or s.target not in ("view", "reshape"):
        return False
    shape = _view_shape(s)
    ints = all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
    return len(shape) > 1 and ints and shape[0] == -1 and all(d > 0 for d in shape[1:])


def _view_shape(s) -> tuple:
    """The shape arguments of a `view`/`reshape` step, whether passed as *args or one tuple."""
    if len(s.args) < 2:
        return ()
    return tuple(
        s.args[1:] if len(s.args) > 2 or not isinstance(s.args[1], tuple | list) else s.args[1]
    )


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
    """Prove that variants overriding `keys` and starting at cut `start` may run fanned;
    None where the proof fails (`prove_fan` says why)."""
    got = prove_fan(prog, start, keys)
    return got if isinstance(got, FanPlan) else None


def prove_fan(prog: Program, start: int, keys: set[str]) -> FanPlan | str:
    """`fan_plan`'s proof: the plan, or one short line saying why the group may not fan (the
    first step or tensor that fails it), which the plan summary keeps as `fanout_refused` so
    that a slow run says which group ran on the swap path and why."""
    if not prog.traced:
        return f"the model runs untraced ({prog.trace_error}): no program to prove it on"
    if global_hooks():
        return "global forward hooks are registered (a fanned run calls no module)"
    keys = {prog.canonical_key(k) for k in keys}
    tied = sorted(k for k in keys if prog.tied(k))
    if tied:  # stacks are per module; the other holder would run with the live tensor
        return f"{tied[0]} is tied (held by two modules)"
    owner: dict[str, str] = {}
    for s in prog.steps[start + 1 :]:
        if s.index in prog.found_opaque:  # every key is its own now: say what it did
            return (f"{_describe(prog, s)} was found on the first batch to read or write tensors "
                    "past the trace (the effects check), so every variant starts before it")
        if (s.op == "get_attr" or prog.is_opaque(s)) and s.keys & keys:
            how = "by code the trace does not see" if prog.is_opaque(s) else "as a tensor"
            return (f"{_describe(prog, s)} reads the unit's {sorted(s.keys & keys)[0]} {how}, "
                    "not through a module call")
        if s.op == "call_module" and s.keys & keys:
            m = prog.modules[s.target]
            if not _stock(m):
                return (f"{_describe(prog, s)}: only torch's own Linear, Conv1d/2d and "
                        "BatchNorm1d/2d are fanned (this one is another type, or has its own "
                        "forward, or holds the unit's tensors in a submodule)")
            if _has_hooks(m):
                return (f"{_describe(prog, s)}: forward hooks, pre-hooks or a parametrization "
                        "(a fanned run does not call it)")
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) and m.running_mean is None:
                return f"{_describe(prog, s)}: a BatchNorm without running statistics"
            if isinstance(m, nn.Conv1d | nn.Conv2d) and m.padding_mode != "zeros":
                # the stacked conv pads with zeros; a shared conv downstream runs as itself on
                # the K·B batch, where any padding mode pads each sample on its own
                return (f"{_describe(prog, s)}: padding_mode {m.padding_mode!r} (only 'zeros' "
                        "is fanned)")
            for k in s.keys:
                owner[k] = s.target
    missing = sorted(keys - set(owner))
    if missing:
        return f"{missing[0]} is not read by a module call after the start cut"
    mods = sorted(set(owner.values()))
    seeds = {
        s.index
        for s in prog.steps
        if s.op == "call_module" and s.target in mods and s.index > start
    }
    fanned = _closure(prog, seeds, start)
    dims: dict[int, int] = {}
    batch = _closure(prog, {prog.carrier[start] if start else 0}, -1)
    for i in sorted(fanned):
        why = _why_not_batchwise(prog, i, fanned, dims, batch) or _writes_why(prog, i, fanned)
        if why:
            return why
    why = _viewed_then_written_why(prog, fanned)
    if why:
        return why
    for i in sorted(seeds):
        if not _reads_batch(prog.steps[i], batch):
            return (f"{_describe(prog, prog.steps[i])}: applied to a parameter or buffer, "
                    "not to a value of the batch")
    why = _restack_why(prog, fanned, batch, seeds)
    if why:
        return why
    broadcasts = {
        i for i in fanned
        if (prog.steps[i].op == "call_function" and prog.steps[i].target in BROADCASTING_FUNCS)
        or (prog.steps[i].op == "call_method" and prog.steps[i].target in BROADCASTING_METHODS)
    }
    rowviews = {i for i in fanned if _is_rowview(prog.steps[i])}
    return FanPlan(start, mods, fanned, batch, dims, broadcasts, rowviews)


def _data_refs(s: Any) -> list[int]:
    """The arguments of step `s` whose rows become its value's rows. A size has none (it is
    numbers); `to`, `view`/`reshape`, `getitem` and the splits only their first: the others
    are a dtype/device template (`p.to(h)` is `p`), sizes, an index or its bounds."""
    if _is_whole_size(s) or (s.op == "call_method" and s.target == "size"):
        return []
    if (s.op == "call_method" and s.target in ("to", "view", "reshape", *_SPLIT_METHODS)) or (
            s.op == "call_function"
            and (s.target is operator.getitem or s.target in _SPLIT_FUNCS)):
        return refs_in(s.args[:1])
    return refs_in(s.args) + refs_in(s.kwargs)


def _stacked(prog: Program, fanned: set[int], seeds: set[int]) -> set[int]:
    """The fanned steps whose value holds the K variants' values stacked on dim 0 (K·B rows,
    variant-major): the overridden modules' outputs and what is computed from them row by row
    (`_data_refs`). A fanned step reached only through a size, a `to` template or an index
    bound (`p.to(h)`, `p * h.size(1)`, `p[:, :h.size(1)]`) holds the one value eager mode
    computes, with its own rows: fanned, but not K·B."""
    out: set[int] = set()
    for i in sorted(fanned):
        if i in seeds or any(r in out for r in _data_refs(prog.steps[i])):
            out.add(i)
    return out


def _restack_why(prog: Program, fanned: set[int], batch: set[int], seeds: set[int]) -> str | None:
    """Steps that take a value's dim 0 to be the K variants' rows: an overridden module on a
    fanned input (`apply_fanned` splits it into K blocks) and a view/reshape whose batch entry
    is a fanned `size(0)` (K·B). Both need a value that really is K·B (`_stacked`), or a
    shared one (tiled K times when it runs), and the view a K·B batch size: `p.to(h)` is `p`
    fanned too, so `p.to(h).view(h.size(0), -1)` cut a [B·N] tensor into K·B rows of N/K where
    eager mode has B rows of N, and `h.view(p.to(h).size(0), -1)` put K variants in one row.
    None: every such step reads a K·B value."""
    stacked = _stacked(prog, fanned, seeds)

    def rows(r: Any) -> bool:  # a K·B value, or a shared one that is tiled to K·B
        return isinstance(r, Ref) and (r.index in stacked or (
            r.index in batch and r.index not in fanned))

    for i in sorted(fanned):
        s = prog.steps[i]
        if i in seeds:
            bad = [r for r in refs_in(s.args) + refs_in(s.kwargs) if r in fanned and r not in stacked]
            if bad:
                return (f"{_describe(prog, s)}: applied to a fanned value that is not the K "
                        f"variants' batch (step {bad[0]}: reached through a size, a .to() "
                        "template or an index bound)")
        elif s.op == "call_method" and s.target in ("view", "reshape"):
            if _is_rowview(s) and rows(s.args[0]):
                continue  # rows kept, which `fanrun` checks when it runs
            shape = _view_shape(s)
            v = _batch_size_of(prog, shape[0]) if shape else None
            if not rows(s.args[0]) or v is None or v not in stacked:
                return (f"{_describe(prog, s)}: its batch entry or the value it views is not "
                        "the K variants' batch (a value reached through a size, a .to() "
                        "template or an index bound has the rows eager mode gives it)")
    return None


def _reads_batch(s, batch: set[int]) -> bool:
    """Whether call `s` of an overridden module reads a per-sample value (one derived from
    the batch). Applied to a parameter or buffer (`self.proj(self.tok)`, a [1, D] token), its
    K outputs are stacked as a [K, ...] "batch" whose dim 0 is the variants, not K·B samples:
    broadcast against a per-sample [B, 1, D] value it gives [K·B, K, D], and `h[:, 0]` then
    gave every variant variant 0's token, silently."""
    return any(r in batch for r in refs_in(s.args) + refs_in(s.kwargs))


def _writes_why(prog: Program, i: int, fanned: set[int]) -> str | None:
    """An in-place fanned step may write into a fanned value (each variant's own), or into a
    shared one that nobody else reads; not into a shared value other steps read, which in
    eager mode becomes each variant's own (`z = x; x += conv(x); ... z`). None: it may."""
    s = prog.steps[i]
    if not prog.is_inplace(s):
        return None
    v = prog.mutated(s)
    if isinstance(v, Ref) and v.index in fanned and _may_view_shared(prog, v.index, fanned):
        return (f"{_describe(prog, s)}: writes in place into a view of a value the K variants "
                "share (fanned, the write would go into a copy that other steps do not read)")
    if isinstance(v, Ref) and (v.index in fanned or prog.private(v.index, i)):
        return None
    return (f"{_describe(prog, s)}: writes in place into a value the K variants share "
            "that another step reads")


def _viewed_then_written_why(prog: Program, fanned: set[int]) -> str | None:
    """A fanned step that may return a view of a value the K variants share (`x2.to(h)` is
    `x2`; `x2.view(h.size(0), -1)`, `x2[:, :h.size(1)]` view it) holds a K-fold copy when
    fanned: the shared operand is tiled when that step runs. A later in-place write into the
    shared value, or into anything that may alias it (`x2.relu_()`, an `nn.ReLU(inplace=True)`
    on it, `x2[:, :4].mul_(-1)`), reaches the view in eager mode and not the copy. So after
    such a step, only writes into the K variants' own values (fanned, no view of a shared one)
    or into a private value (fresh, read by its writer alone: it aliases nothing the view step
    reads) are allowed. None: no other write."""
    views = [i for i in sorted(fanned) if _may_view_shared(prog, i, fanned)]
    if not views:
        return None
    for s in prog.steps[views[0] + 1 :]:
        if not prog.is_inplace(s):
            continue
        v = prog.mutated(s)
        if isinstance(v, Ref) and (
            prog.private(v.index, s.index)
            or (v.index in fanned and not _may_view_shared(prog, v.index, fanned))
        ):
            continue
        return (f"{_describe(prog, s)}: writes in place after "
                f"{_describe(prog, prog.steps[views[0]])} may have viewed a value the K variants "
                "share (fanned, that view is a copy the write does not reach)")
    return None


def _may_view_shared(prog: Program, v: int, fanned: set[int]) -> bool:
    """Whether fanned value `v` may be (a view of) a value the K variants share. A fanned step
    whose first argument is shared — fanned only by another argument (`u[:, :h.size(1)]`,
    `u.to(h)`) — returns a view of it (`u` itself) in eager mode, but of its K-fold copy when
    fanned: a write into it must reach `u`, which other steps read. Followed through the first
    argument of every step that may return a view; a fresh tensor (a module's output, an
    arithmetic result) ends the chain."""
    seen: set[int] = set()
    while v in fanned and v not in seen:
        seen.add(v)
        s = prog.steps[v]
        if not prog.is_inplace(s) and _returns_fresh(prog, s):
            return False
        first = s.args[0] if s.args else None
        if not isinstance(first, Ref):
            return True
        v = first.index
    return True


def _returns_fresh(prog: Program, s: Any) -> bool:
    """Step `s` returns a new tensor, never one of its arguments or a view of one."""
    if s.op == "call_module":
        m = prog.modules[s.target]
        return (isinstance(m, _FRESH_MODULES) and not getattr(m, "inplace", False)
                and not getattr(m, "return_indices", False))
    return (s.op == "call_function" and s.target in _FRESH_FUNCS) or (
        s.op == "call_method" and s.target in _FRESH_METHODS)
