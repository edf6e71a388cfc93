"""What a batch must be before the engine touches it: a pair (x, y) of tensors with integer
labels `[B]`, labels inside the model's outputs, and logits of one row per sample.

Each check turns what would be a shape or dtype error deep in a pass (or, on CUDA, a device-side
assert that loses the context) into one message about the user's data or model. The label span
is read on the host, before the batch moves, so checking it costs no sync.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from layerfast.errors import LayerfastError


def iterable(obj: object) -> bool:
    """Whether `for item in obj` works as Python decides it: an `Iterable` (`__iter__`), or a
    sequence by the old protocol (`__getitem__` from 0 until IndexError, as a map-style torch
    `Dataset` of batches is), which `isinstance(obj, Iterable)` says no to; never a str or
    bytes, whose items are characters."""
    if isinstance(obj, str | bytes):
        return False
    return isinstance(obj, Iterable) or callable(getattr(type(obj), "__getitem__", None))


def pair(item: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain iterable's batch as (x, y): tensors, y integer labels [B]; anything else is one
    clear error rather than a failure deep in the pass."""
    if isinstance(item, Mapping):  # unpacked, a dict of two gave its keys: "got (str, str)"
        keys = ", ".join(map(repr, list(item)[:4]))
        raise LayerfastError(
            f"each batch must be a pair (x, y) of tensors; got a dict (keys {keys}): pass "
            "pairs, e.g. ((b['x'], b['y']) for b in loader)"
        )
    try:
        x, y = item
    except (TypeError, ValueError):
        n = f" of {len(item)} items" if hasattr(item, "__len__") else ""
        raise LayerfastError(
            f"each batch must be a pair (x, y) of tensors; got a {type(item).__name__}{n}"
        ) from None
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise LayerfastError(
            "each batch must be a pair (x, y) of tensors; got "
            f"({type(x).__name__}, {type(y).__name__}) (numpy arrays: torch.from_numpy)"
        )
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise LayerfastError(f"labels y must be integers, got {y.dtype}")
    if y.dim() != 1 or x.dim() == 0 or y.shape[0] != x.shape[0]:
        raise LayerfastError(
            f"a batch's labels y must be [B] for x [B, ...]; got x {tuple(x.shape)}, "
            f"y {tuple(y.shape)}"
        )
    return x, y


def peek(data: Any) -> tuple[Any, Any]:
    """(data, its first item or None) without losing that item from a one-shot iterator."""
    it = iter(data)
    first = next(it, None)
    if it is data and first is not None:  # an iterator: put the first item back in front
        return itertools.chain([first], it), first
    return data, first


def label_span(y: torch.Tensor) -> tuple[int, int] | None:
    """The labels' (min, max), read while they are still on the host: on the device reading
    them would cost a sync per batch. None for labels already on a device (then unchecked:
    `ops.score_` asserts on the device) or an empty batch."""
    if y.device.type != "cpu" or not y.numel():
        return None
    lo, hi = torch.aminmax(y)
    return int(lo), int(hi)


def check_logits(logits: object, batch: int) -> None:
    """The baseline's output must be one row of class scores per sample: anything else would
    reach `score_` as a shape error deep in the pass (or, for a floating type it cannot read,
    a dtype error), not as a message about the model. analyze's probe checks the same."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise LayerfastError(
            f"the model must return logits shaped [batch, classes]; it returned "
            f"{_described(logits)}"
        )
    if logits.shape[0] != batch:
        raise LayerfastError(
            f"the model returned {logits.shape[0]} rows of logits for a batch of {batch} samples: "
            "it must return one row per sample"
        )
    if logits.shape[1] < 1:
        raise LayerfastError("the model returned logits with no classes (shape [batch, 0])")
    if not logits.is_floating_point():
        raise LayerfastError(
            f"the model returned {logits.dtype} logits: they must be floating point"
        )


def _described(out: object) -> str:
    """What a model returned instead of a [batch, classes] tensor, and how to get one: wrap it
    in a module whose forward returns the scores alone (a Hugging Face model's `.logits`)."""
    wrap = ("; wrap the model in a module whose forward returns the class scores alone "
            "(e.g. `return self.net(x)")
    if isinstance(out, torch.Tensor):
        squeeze = [i for i, d in enumerate(out.shape) if d == 1 and i > 0]
        if out.dim() == 3 and squeeze:
            return f"a tensor shaped {list(out.shape)}{wrap}.squeeze({squeeze[0]})`)"
        return f"a tensor shaped {list(out.shape)}"
    if isinstance(out, dict | tuple | list) and not out:
        return f"an empty {type(out).__name__}"
    if isinstance(out, dict):
        keys = ", ".join(repr(k) for k in list(out)[:4]) + (", ..." if len(out) > 4 else "")
        tensors = [k for k, v in out.items() if isinstance(v, torch.Tensor)]
        pick = "logits" if "logits" in tensors else tensors[0] if tensors else None
        way = f"{wrap}[{pick!r}]`)" if pick is not None else ""
        return f"a {type(out).__name__} with keys {keys}{way}"
    if isinstance(out, tuple | list):
        return f"a {type(out).__name__} of {len(out)}{wrap}[0]`, the scores' index)"
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return f"an object of type {type(out).__name__}{wrap}.logits`)"
    return f"an object of type {type(out).__name__}"


def check_classes(num_classes: int) -> None:
    """Class scores need two classes at least: argmax over one logit (a sigmoid binary
    classifier's [B, 1]) is always class 0, so every variant would score error 0, loss 0 and
    agreement 1 on labels 0, and every unit be called robust, whatever its weights. analyze
    refuses such a model before its pass; `Evaluator`, given any module, refuses it here."""
    if num_classes < 2:
        raise LayerfastError(
            f"the model has {num_classes} output{'' if num_classes == 1 else 's'}: with one "
            "class every variant's error is 0 and every unit 'robust', whatever its weights; "
            "layerfast analyzes classifiers with 2 or more logits (a binary classifier with "
            "one sigmoid logit z: return torch.cat([-z, z], 1) / 2 instead)")


def check_labels(span: tuple[int, int], num_classes: int) -> None:
    """A clear error for a label outside the model's outputs, before anything is scored: on
    CUDA, `score_` meets it as a device-side assert, which loses the CUDA context."""
    lo, hi = span
    if lo < 0 or hi >= num_classes:
        raise LayerfastError(
            f"labels must lie in [0, {num_classes}) for a model with "
            f"{num_classes} outputs; found {lo}..{hi}"
        )
