"""A variant as the engine reads it: the state keys it overrides and their tensors, under each
tensor's canonical key, and a name for messages.

A variant is a mapping {state-dict key: tensor} or an object with `.overrides()` (and, when it
can say which keys without loading its tensors, a `keys` tuple): `layerfast.variants.Variant`,
or anything a Python user builds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from layerfast.errors import LayerfastError


def overrides_of(v: Any) -> Mapping[str, torch.Tensor]:
    if isinstance(v, Mapping):
        return v
    if hasattr(v, "overrides"):
        return v.overrides()
    raise TypeError(
        f"a variant must be a mapping of state keys to tensors or have .overrides(), got {type(v)}"
    )


def keys_of(v: Any) -> Iterable[str]:
    """The state keys a variant overrides, without loading its tensors when it can say so."""
    keys = getattr(v, "keys", None)
    if isinstance(keys, tuple) and keys:
        return keys
    return overrides_of(v).keys()


def describe(v: Any, i: int) -> str:
    """`variant 7 (reinit of fc to τ=3)` for a `Variant`, `variant 7` for a plain dict."""
    kind, unit = getattr(v, "kind", None), getattr(v, "unit", None)
    if kind is None or unit is None:
        return f"variant {i}"
    tau = getattr(v, "checkpoint", None)
    return f"variant {i} ({kind} of {unit}{'' if tau is None else f' to τ={tau}'})"


def canonical(
    ov: Mapping[str, torch.Tensor], canon: dict[str, str], what: str
) -> dict[str, torch.Tensor]:
    """A variant's overrides under the canonical key of each tensor: a tied weight has several
    state-dict names (`load_state_dict` accepts any) and one live tensor. Two names of one
    tensor with different values cannot both hold — typically a checkpoint saved from a model
    whose weights were not tied, loaded into one where they are."""
    out: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    for k, t in ov.items():
        c = canon.get(k, k)
        if c in out and not torch.equal(out[c], t):
            raise LayerfastError(
                f"{what} gives {names[c]} and {k}, one tied tensor in the model, two different "
                "values: was the checkpoint saved from a model where they were not tied?"
            )
        out[c], names[c] = t, k
    return out
