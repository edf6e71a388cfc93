"""The `Evaluator`'s public arguments, checked before any work: each bad value is one
LayerfastError naming the argument, not a TypeError from deep inside the pass, nor (a
callback that is no function, an interval that is no number) a pass that ran and then failed
at its first batch or silently never called back.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping
from typing import Any

import torch

from layerfast.engine.batches import iterable
from layerfast.errors import LayerfastError


def is_variant(v: Any) -> bool:
    """What `overrides.overrides_of` reads: a mapping {state key: tensor} or an object with
    `.overrides()`, at least one of them.

    An empty list ran a whole data pass and returned [0, 4] counts: the baseline is computed
    but is not one of the rows. `{}` (the final model as one variant) given bare instead of as
    `[{}]` was read as that empty list."""
    return isinstance(v, Mapping) or callable(getattr(v, "overrides", None))


def positive_int(value: Any, name: str) -> int:
    """`value` as an int >= 1 (a numpy integer too), else a LayerfastError naming `name`.

    `max_fanout=0` made K = 0 chunks, whose weight stacks `torch.stack` refused with a bare
    RuntimeError mid-pass; a negative cap sent every group to the swap path as a "fallback",
    and True ran as 1: refused here, as an unknown `glue` or `fanout` is."""
    try:
        n = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        n = None
    if n is None or n < 1:
        raise LayerfastError(f"{name} must be a positive integer, got {value!r}")
    return n


def variant_list(variants: Any) -> list:
    """`variants` as a list, each a mapping of state keys to tensors or an object with
    `.overrides()`, at least one of them.

    An empty list ran a whole data pass and returned [0, 4] counts: the baseline is computed
    but is not one of the rows. `{}` (the final model as one variant) given bare instead of as
    `[{}]` was read as that empty list."""
    if isinstance(variants, Mapping) and variants and all(
            is_variant(v) for v in variants.values()):  # {name: variant}: a study's table
        names = ", ".join(repr(k) for k in list(variants)[:3])
        raise LayerfastError(
            f"variants must be a list of variants; got a mapping of names ({names}"
            f"{', ...' if len(variants) > 3 else ''}) to variants: pass "
            "list(variants.values()) (the counts' rows are in that order)")
    if isinstance(variants, Mapping) and variants and all(
            isinstance(k, str) for k in variants):  # {key: tensor}: one variant, not a list
        raise LayerfastError("variants must be a list of variants; got one mapping of state "
                             "keys to tensors: pass [it] (and {} for the final model)")
    if not iterable(variants):  # a sequence by `__getitem__` too, as `list()` takes
        raise LayerfastError(f"variants must be a list of variants (mappings of state keys "
                             f"to tensors, or layerfast Variants); got "
                             f"{type(variants).__name__}")
    out = list(variants)
    if not out:
        what = "an empty mapping, not a list" if isinstance(variants, Mapping) else "empty"
        raise LayerfastError(f"variants is {what}: nothing to evaluate; pass [{{}}] for the "
                             "final model alone")
    odd = next((i for i, v in enumerate(out) if not is_variant(v)), None)
    if odd is not None:  # else a bare TypeError from `overrides_of`, in `run`
        raise LayerfastError(
            f"variant {odd} must be a mapping of state keys to tensors or have "
            f".overrides(); got {type(out[odd]).__name__}")
    return out


def check_run(data: Any, start: Any, counts: Any, V: int, callbacks: dict[str, Any],
              checkpoint_every: Any) -> float:
    """`Evaluator.run`'s arguments; returns `checkpoint_every` as a float.

    `callbacks`: {argument name: value}, each None or callable (`on_progress=5` failed with
    "'int' object is not callable" after the first batch). `checkpoint_every`: seconds >= 0,
    `math.inf` for the end of the pass only (a string failed at the first batch when
    `on_checkpoint` was given, and was ignored without it; a negative or NaN interval ran)."""
    if not (hasattr(data, "batches") or iterable(data)):  # else a TypeError deep in the plan
        raise LayerfastError(f"data must be a layerfast DataSource or an iterable of (x, y) "
                             f"batches; got {type(data).__name__}")
    for name, fn in callbacks.items():
        if fn is not None and not callable(fn):
            raise LayerfastError(f"{name} must be a function or None; got "
                                 f"{type(fn).__name__} {fn!r}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, numbers.Real) \
            or math.isnan(checkpoint_every) or checkpoint_every < 0:
        raise LayerfastError(f"checkpoint_every must be a number of seconds >= 0 (math.inf: "
                             f"at the end only); got {checkpoint_every!r}")
    try:  # True skipped one sample; "x" was said to need a DataSource
        ok = not isinstance(start, bool) and operator.index(start) >= 0
    except TypeError:
        ok = False
    if not ok:
        raise LayerfastError(f"start must be an integer >= 0 (samples already evaluated); "
                             f"got {start!r}")
    if counts is not None and (not isinstance(counts, torch.Tensor)
                               or tuple(counts.shape) != (V, 4)):
        # else an IndexError or AttributeError from the resumed pass's setup
        got = tuple(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__
        raise LayerfastError(f"counts must be the [V, 4] = [{V}, 4] tensor of sums a "
                             f"checkpoint gave (on_checkpoint); got {got}")
    return float(checkpoint_every)
