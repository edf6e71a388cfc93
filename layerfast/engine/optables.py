"""What the program knows about the calls fx records: which write into an argument, which
always return a new tensor, and which may return several tensors.

`graph.Program` reads these tables to decide where a cut is safe (one tensor carries all
state) and which steps run in place. A call missing from a "fresh" table only costs a cut; a
call missing from an "in place" or "tuple" table could cost correctness, which is why those
err towards inclusion.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layerfast.engine.tracing import _AUG_OPS

# ---- in-place steps and fresh values ----------------------------------------------------------

_INPLACE_FUNCS = set(_AUG_OPS.values()) | {operator.setitem}

# Modules whose output is always a new tensor (never their input or a view of it).
_FRESH_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.Bilinear,
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Embedding,
    nn.Sigmoid,
    nn.Tanh,
    nn.GELU,
    nn.Softplus,
    nn.Softmax,
    nn.LogSoftmax,
    nn.PReLU,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Upsample,
    # these have an `inplace` flag: fresh only while it is off (checked at the step)
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Threshold,
    nn.RReLU,
)
_FRESH_FUNCS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.floordiv,
    operator.mod,
    operator.pow,
    operator.matmul,
    operator.neg,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.cat,
    torch.concat,
    torch.stack,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.exp,
    torch.matmul,
    torch.bmm,
    torch.softmax,
    torch.log_softmax,
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.linear,
    F.batch_norm,
    F.layer_norm,
    F.group_norm,
    F.gelu,
    F.softmax,
    F.log_softmax,
    F.adaptive_avg_pool2d,
    F.avg_pool2d,
    F.interpolate,
    # with an `inplace` argument: fresh only when it is False (checked at the step)
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.silu,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    # the fan-out allow-list's elementwise forms (a `torch.pow(u, h)` or `u.max(h)` followed by
    # an in-place write was refused as a possible view of the shared `u`); an out= tensor is
    # an in-place step, which every caller checks first
    torch.pow,
    torch.clamp,
    torch.clip,
    torch.abs,
    torch.max,
    torch.min,
    F.softplus,
    F.normalize,
}
_FRESH_METHODS = {
    "add",
    "sub",
    "mul",
    "div",
    "matmul",
    "pow",
    "exp",
    "relu",
    "sigmoid",
    "tanh",
    "softmax",
    "log_softmax",
    "clone",
    "mean",
    "sum",
    "amax",
    "amin",
    "abs",
    "neg",
    "sqrt",
    "rsqrt",
    "clamp",
    "clip",
    "max",
    "min",
}


def _op_schemas(fn: Any) -> list[Any]:
    """The schemas of a `torch.ops` operator (`torch.ops.aten.add_.Tensor`: one; a packet,
    `torch.ops.aten.mul_`: each overload's), or [] for anything else."""
    if isinstance(fn, torch._ops.OpOverload):
        return [fn._schema]
    if isinstance(fn, torch._ops.OpOverloadPacket):
        return [getattr(fn, o)._schema for o in fn.overloads()]
    return []


def writes_by_schema(fn: Any) -> list[int] | None:
    """For a `torch.ops` operator whose schema writes into an argument (`Tensor(a!)`): the
    positions of the written arguments (every overload's, for a packet); None for any other
    callable. Its name does not tell (`torch.ops.aten.add_.Tensor` is called "add_.Tensor",
    a user's `torch.library` op anything), so the trailing-underscore rule missed it."""
    written = sorted({
        i for sch in _op_schemas(fn) for i, a in enumerate(sch.arguments)
        if a.alias_info is not None and a.alias_info.is_write
    })
    return written if written else None


def inplace_name(name: Any) -> bool:
    """A name that PyTorch gives only to calls writing into an argument: a trailing `_`
    (`add_`, `torch.relu_`), private ones too (`torch._foreach_mul_`), dunders excepted."""
    return isinstance(name, str) and name.endswith("_") and not name.startswith("__")


def inplace_arg(fn: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a call passes `inplace=True`, by keyword or by position (`F.relu(x, True)`)."""
    if "inplace" in kwargs:
        return bool(kwargs["inplace"])
    if not args[1:]:
        return False
    try:
        bound = inspect.signature(fn).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return bool(bound.arguments.get("inplace", False))


# Producers whose value may hold several tensors (a tuple, a torch.Size), never a cut's carrier.
_TUPLE_FUNCS = {
    torch.chunk,
    torch.split,
    torch.unbind,
    torch.tensor_split,
    torch.hsplit,
    torch.vsplit,
    torch.dsplit,
    torch.sort,
    torch.topk,
    torch.max,
    torch.min,
    torch.aminmax,
    torch.kthvalue,
    torch.mode,
    torch.median,
    torch.std_mean,
    torch.var_mean,
    torch.unique,
    torch.frexp,
    torch.meshgrid,
    torch.broadcast_tensors,
    getattr,
    len,
    F.max_pool2d_with_indices,
}
_TUPLE_METHODS = {
    "chunk",
    "split",
    "split_with_sizes",
    "unbind",
    "tensor_split",
    "hsplit",
    "vsplit",
    "dsplit",
    "sort",
    "topk",
    "max",
    "min",
    "aminmax",
    "kthvalue",
    "mode",
    "median",
    "unique",
    "frexp",
    "size",
    "tolist",
    "dim",
    "numel",
    "item",
}
