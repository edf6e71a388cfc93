"""From whatever a training script saved to the model's state-dict keys.

Checkpoints in the wild wrap the state dict (torchvision's reference scripts: `{"model": ...}`,
Lightning: `{"state_dict": ...}`, plain loops: `{"model_state_dict": ...}`, DeepSpeed:
`{"module": ...}`) and prefix its keys (DDP: `module.`, torch.compile: `_orig_mod.`, Lightning:
the LightningModule's attribute, e.g. `model.`). This module finds the state dict and maps its
keys onto the reference model's, without touching tensor data.

Rules:

1. Unwrapping: a mapping whose values are all tensors (`*_extra_state` entries aside) *is* the
   state dict; otherwise the first of `state_dict`, `model_state_dict`, `model`, `module` that
   holds one (searched up to three levels deep) is.
2. Normalisation (no reference needed): every `_orig_mod` key component is dropped (no real
   module has that name; torch.compile inserts it wherever a submodule was compiled), then a
   leading `module.` is stripped while *every* key has it (DDP wraps the whole model).
3. Resolution against a reference (`CheckpointDir.validate`): the first of these key maps that
   matches the reference's key set exactly is used: the normalised keys; the raw keys (for a
   model whose own root really is called `module`); the normalised keys with a first component
   that *every* key shares stripped (Lightning's `model.`); the keys under the one prefix, of
   any depth, whose subtree alone matches (a LightningModule that also owns, say, a loss module
   with parameters, its model at `model.` or one attribute deeper at `backbone.net.`; two
   matching subtrees, e.g. teacher and student, is an error, and so is a
   matching subtree next to a full copy of the model's keys at the top level, e.g. a state
   dict with an `ema.` copy added). "Matches"
   tolerates missing `num_batches_tracked` buffers. Without an exact match, the candidate with
   the largest overlap is used so that validation lists meaningful mismatches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from layerfast.errors import LayerfastError

WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model", "module")
TOLERATED_MISSING_SUFFIXES: tuple[str, ...] = ("num_batches_tracked",)
_MAX_DEPTH = 3


def is_tolerated_missing(key: str) -> bool:
    """Buffers a checkpoint may lack: eval never reads them (BN's `num_batches_tracked`)."""
    return key.rsplit(".", 1)[-1] in TOLERATED_MISSING_SUFFIXES


def _is_state_dict(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    has_tensor = False
    for k, v in obj.items():
        if not isinstance(k, str):
            return False
        if isinstance(v, torch.Tensor):
            has_tensor = True
        elif not k.endswith("_extra_state"):
            return False
    return has_tensor


def find_state_dict(obj: Any, where: str, holder: str = "the file") -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint object (rule 1), tensors only.

    `where` names the file in the error message, `holder` what held `obj` ("it" for an
    in-memory value, `layerfast.inputs`).
    """

    def search(o: Any, depth: int) -> Mapping[str, Any] | None:
        if _is_state_dict(o):
            return o
        if depth >= _MAX_DEPTH or not isinstance(o, Mapping):
            return None
        for key in WRAPPER_KEYS:
            if key in o:
                found = search(o[key], depth + 1)
                if found is not None:
                    return found
        return None

    found = search(obj, 0)
    if found is None:
        if isinstance(obj, Mapping):
            top = ", ".join(repr(k) for k in list(obj)[:12])
            what = f"a dict with keys [{top}{', ...' if len(obj) > 12 else ''}]"
        elif isinstance(obj, torch.nn.Module):
            what = "a whole nn.Module"
        else:
            what = f"a {type(obj).__name__}"
        raise LayerfastError(
            f"{where}: no state dict found: {holder} holds {what}. Expected a state dict "
            f"(name -> tensor) or a dict holding one under {', '.join(map(repr, WRAPPER_KEYS))}."
        )
    return {k: v for k, v in found.items() if isinstance(v, torch.Tensor)}


def normalise(keys: Iterable[str]) -> dict[str, str]:
    """Rule 2: normalised key -> raw key."""
    raw = list(keys)
    norm = [".".join(p for p in k.split(".") if p != "_orig_mod") for k in raw]
    while norm and all(k.startswith("module.") for k in norm):
        norm = [k[len("module.") :] for k in norm]
    return _injective(zip(norm, raw, strict=True))


def _injective(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for new, raw in pairs:
        if new in out:  # two raw keys collapse onto one name: keep the raw ones apart
            return {}
        out[new] = raw
    return out


def _matches(
    candidate: Mapping[str, str], reference: set[str], ties: Mapping[str, Sequence[str]]
) -> bool:
    keys = set(candidate)
    if not keys <= reference:
        return False
    return all(
        is_tolerated_missing(k) or any(t in keys for t in ties.get(k, ())) for k in reference - keys
    )


def tied_keys(reference: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Key -> the other keys of `reference` that are the same tensor (tied weights), for the
    keys that have any. Same tensor: the same object, or (real tensors) the same memory, shape,
    strides and dtype, as a state dict's detached views of one parameter are."""
    groups: dict[object, list[str]] = {}
    for k, v in reference.items():
        ident: object = id(v)
        if isinstance(v, torch.Tensor) and v.device.type != "meta" and v.numel() > 0:
            ident = (str(v.device), v.untyped_storage().data_ptr(), v.storage_offset(),
                     tuple(v.shape), tuple(v.stride()), v.dtype)  # fmt: skip
        groups.setdefault(ident, []).append(k)
    return {k: tuple(o for o in g if o != k) for g in groups.values() if len(g) > 1 for k in g}


def fill_tied(keymap: dict[str, str], ties: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Serve a tied name the file lacks from another name of the same tensor that it has:
    `safetensors.torch.save_model` keeps one name per shared tensor (`save_file` refuses them)."""
    for k, others in ties.items():
        if k not in keymap:
            present = next((o for o in others if o in keymap), None)
            if present is not None:
                keymap[k] = keymap[present]
    return keymap


def _matching_subtrees(
    base: Mapping[str, str], reference: set[str], ties: Mapping[str, Sequence[str]]
) -> list[tuple[str, dict[str, str]]]:
    """Every prefix, of any depth, whose subtree alone matches `reference` (rule 3), sorted by
    prefix, one entry per distinct key map (the shortest prefix names it: `ema.` and
    `ema.module.`, normalised within the subtree, are one). Any depth: a LightningModule's
    `self.backbone = Wrapper(net)` beside a loss with parameters saves `backbone.net.*` and
    `loss.*`, which no first component matched. Only prefixes some key splits into (prefix,
    a reference key or a `module.` one) can match; the keys are grouped under them in one
    pass, so the search stays linear in the keys."""
    splits = [(k, k.split(".")) for k in base]
    prefixes = {".".join(parts[:i]) for _, parts in splits for i in range(1, len(parts))
                if parts[i] == "module" or ".".join(parts[i:]) in reference}  # fmt: skip
    under: dict[str, list[str]] = {p: [] for p in prefixes}
    for k, parts in splits:
        for i in range(1, len(parts)):
            group = under.get(".".join(parts[:i]))
            if group is not None:
                group.append(k)
    hits: list[tuple[str, dict[str, str]]] = []
    for p in sorted(prefixes, key=lambda q: (q.count("."), q)):
        stripped = normalise(k[len(p) + 1 :] for k in under[p])
        cand = {new: base[f"{p}.{tail}"] for new, tail in stripped.items()}
        if cand and _matches(cand, reference, ties) and all(cand != c for _, c in hits):
            hits.append((p, cand))
    return sorted(hits, key=lambda h: h[0])


def resolve(
    raw_keys: Iterable[str],
    reference: set[str],
    where: str,
    ties: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, str]:
    """Rule 3: reference-space key -> raw key for one file. `ties` (`tied_keys`): a candidate
    may lack a name of a tied tensor when it has another."""
    ties = ties or {}
    raw = list(raw_keys)
    base = normalise(raw)
    if base and _matches(base, reference, ties):
        return base
    candidates: list[dict[str, str]] = [base, {k: k for k in raw}]
    # the model's keys at the top level plus another copy under a prefix (`ema.`): that copy
    # is the lone matching subtree, but the top level matches too, so which one is meant?
    top = {k: v for k, v in base.items() if k in reference}
    top_matches = bool(top) and _matches(top, reference, ties)

    firsts = {k.split(".", 1)[0] for k in base}
    if len(firsts) == 1 and all("." in k for k in base):
        (p,) = firsts
        stripped = normalise(k[len(p) + 1 :] for k in base)
        candidates.append({new: base[f"{p}.{tail}"] for new, tail in stripped.items()})
    # a shared first part (`model.`) that leaves more than the model (`model.backbone.net.*`
    # beside `model.loss.*`) is searched deeper like several first parts are
    if len(firsts) > 1 or not _matches(candidates[-1], reference, ties):
        subtree_hits = _matching_subtrees(base, reference, ties)
        if len(subtree_hits) > 1 or (subtree_hits and top_matches):
            names = ", ".join(
                ["the top level"] * top_matches + [repr(p + ".") for p, _ in subtree_hits]
            )
            raise LayerfastError(
                f"{where}: several parts of the checkpoint match the model ({names}); "
                "save the one you mean as its own state dict."
            )
        candidates.extend(c for _, c in subtree_hits)

    for cand in candidates:
        if cand and _matches(cand, reference, ties):
            return cand
    return max(candidates, key=lambda c: len(set(c) & reference))


def canonical_keys(model: nn.Module) -> dict[str, str]:
    """Every state-dict name of a parameter or buffer -> its canonical key (the first name the
    de-duplicating `named_parameters()` / `named_buffers()` give the same tensor). Tied weights
    (`b.weight = a.weight`) have several names and one key; `load_state_dict` accepts any of
    them and writes the one tensor."""
    out: dict[str, str] = {}
    first: dict[int, str] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + \
        list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        if t is None:
            continue
        out[name] = first.setdefault(id(t), name)
    return out
