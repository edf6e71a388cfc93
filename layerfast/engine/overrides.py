"""A variant as the engine reads it: the state keys it overrides and their tensors, under each
tensor's canonical key, and a name for messages.

A variant is a mapping {state-dict key: tensor} or an object with `.overrides()` (and, when it
can say which keys without loading its tensors, a `keys` tuple): `layerfast.variants.Variant`,
or anything a Python user builds.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
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


def prefix_hint(unknown: Sequence[str], live: Collection[str]) -> str:
    """What to do about `unknown` keys that are the model's own but for DataParallel's or
    DDP's `module.` prefix (empty when they are not): a wrapped model's state dict has
    it, the checkpoint loader strips it (`checkpoints.keymap`), a variant given as a mapping is
    taken as it is. Not stripped here: a model may own a submodule called `module`, so the
    prefix is not always a wrapper's; the refusal names the fix instead. The model is called
    wrapped only when every key of it starts with `module.`, as a wrapper's do: a model that
    owns a submodule `module` beside others was told to pass `model.module`, that submodule
    alone."""
    if not unknown:
        return ""
    if all(k.startswith("module.") and k.removeprefix("module.") in live for k in unknown):
        return " (a DataParallel/DDP state dict's keys: strip their leading 'module.')"
    if all(f"module.{k}" in live for k in unknown):
        if all(k.startswith("module.") for k in live):
            return (" (the model is wrapped in DataParallel/DDP and its keys start with "
                    "'module.': pass model.module)")
        return " (the model's keys for them start with 'module.', its submodule's name)"
    return ""


def check_fits(ov: Mapping[str, Any], live: Mapping[str, torch.Tensor], name: str,
               i: int) -> None:
    """Variant `i` (`name` in messages), its overrides `ov` under canonical keys, fits the
    model's tensors `live`, or one LayerfastError lists every way it does not: values that
    are not tensors, unknown keys, shapes, dtypes a floating tensor cannot take, meta tensors,
    sparse (or other non-strided) tensors.

    As for checkpoints (docs/decisions.md): a floating model tensor takes any floating dtype,
    but an integer, bool or complex one was cast silently (complex with torch's warning at
    most), and a meta tensor, which holds no values, failed in `copy_`."""
    odd = next(((k, t) for k, t in ov.items() if not isinstance(t, torch.Tensor)), None)
    if odd is not None:
        raise LayerfastError(f"{name} gives {odd[0]} a {type(odd[1]).__name__}, not a "
                             "torch.Tensor (numpy arrays: torch.from_numpy)")
    bad = [k for k in ov if k not in live]
    shapes = [f"{k}: {tuple(t.shape)} vs model {tuple(live[k].shape)}"
              for k, t in ov.items() if k in live and t.shape != live[k].shape]
    dtypes = [f"{k}: {t.dtype} vs model {live[k].dtype}" for k, t in ov.items()
              if k in live and live[k].is_floating_point() and not t.is_floating_point()]
    meta = [k for k, t in ov.items() if t.is_meta]
    sparse = [f"{k}: {str(t.layout).removeprefix('torch.')}" for k, t in ov.items()
              if t.layout is not torch.strided]
    if bad or shapes or dtypes or meta or sparse:
        what = [f"unknown keys {bad[:10]}{prefix_hint(bad, live)}"] if bad else []
        what += [f"shape mismatches {shapes[:10]}"] if shapes else []
        what += [f"dtype mismatches {dtypes[:10]}"] if dtypes else []
        what += [f"meta tensors, which hold no values, for {meta[:10]}"] if meta else []
        what += [f"tensors that are not dense {sparse[:10]} (tensor.to_dense())"] if sparse else []
        raise LayerfastError(f"variant {i} does not fit the model: {'; '.join(what)}")
