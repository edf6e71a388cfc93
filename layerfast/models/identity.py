"""What a model's definition is, for the resume store: a digest of its structure and of the code
that runs it.

A rerun into the same out dir resumes (or, when finished, only re-reports) the stored sums. The
arch's name alone does not say that the model is the same: a user who edits their model file
(ReLU to Sigmoid, the same state-dict keys) and reruns the same command got the old model's
results, and a half-finished run would have added the two models' counts together. So the
fingerprint holds `definition_id(model, factory)`, a digest of:

- `repr(model)`, memory addresses taken out: every module's type and configuration (in/out
  features, kernel size, ...), which is all there is to a model built from torch's modules;
- the plain attributes of its modules (numbers, strings, functions: `self.mode = "relu"`,
  `Lambda(torch.relu)`);
- the code of its modules' classes (and their bases) that are not torch's, torchvision's or
  layerfast's, and of the factory, as it runs in this process (not the file as it is on disk:
  a notebook runs what it imported), with the functions, classes and constants that code
  reads from its module's globals, transitively (a helper the forward calls, a constant).

The code is read from the compiled objects: instructions, names and constants (sets sorted, so
that string hashing's per-process order does not matter), never line numbers or addresses. So
a script that defines its model and changes only its `analyze(threshold=...)` call is the same
model, and the same notebook after a kernel restart is too.

Not seen: state the code reads from elsewhere (a file, an environment variable, an object's
attributes that are not plain values), and a change to torch itself. layerfast's own
architectures are versioned by the store's schema, which is bumped when what a run computes
changes.
"""

from __future__ import annotations

import hashlib
import re
import types
from collections.abc import Callable
from typing import Any

from torch import nn

_OWN_PACKAGES = frozenset({"torch", "torchvision", "layerfast"})
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_PLAIN = (int, float, complex, str, bytes, bool, type(None))


def _own(obj: object) -> bool:
    """torch's, torchvision's or layerfast's: versioned apart from the user's model."""
    mod = getattr(obj, "__module__", None)
    return isinstance(mod, str) and mod.split(".")[0] in _OWN_PACKAGES


def _plain_repr(v: object, depth: int = 0) -> str | None:
    """A stable text for a plain value (numbers, strings, and tuples, lists, sets and dicts of
    them; sets sorted), or None for anything else."""
    if isinstance(v, _PLAIN):
        return repr(v)
    if depth > 3 or (isinstance(v, tuple | list | set | frozenset | dict) and len(v) > 4096):
        return None  # a vocabulary, a lookup table: named, not read
    if isinstance(v, tuple | list):
        parts = [_plain_repr(x, depth + 1) for x in v]
        return None if None in parts else f"{type(v).__name__}({', '.join(parts)})"  # type: ignore[arg-type]
    if isinstance(v, set | frozenset):
        parts = [_plain_repr(x, depth + 1) for x in v]
        return None if None in parts else f"set({', '.join(sorted(parts))})"  # type: ignore[arg-type]
    if isinstance(v, dict):
        items = [(_plain_repr(k, depth + 1), _plain_repr(x, depth + 1)) for k, x in v.items()]
        if any(k is None or x is None for k, x in items):
            return None
        return f"dict({', '.join(sorted(f'{k}: {x}' for k, x in items))})"
    return None


class _Digest:
    """A sha256 over code and values, each function and class taken once."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.seen: set[int] = set()

    def text(self, s: str) -> None:
        self.h.update(s.encode("utf-8", "surrogatepass") + b"\0")

    def code(self, co: types.CodeType, globs: dict[str, Any] | None) -> None:
        self.h.update(co.co_code)
        self.text(repr(co.co_names) + repr(co.co_varnames))
        for c in co.co_consts:
            if isinstance(c, types.CodeType):
                self.code(c, globs)
            else:
                self.text(_plain_repr(c) or type(c).__name__)
        if globs is not None:  # what the code reads by name from its module
            for name in co.co_names:
                if name in globs:
                    self.value(name, globs[name])

    def value(self, name: str, v: object) -> None:
        """A name a model's code or module refers to: code is followed, plain values are read,
        modules and torch's own objects are named only."""
        plain = _plain_repr(v)
        if plain is not None:
            self.text(f"{name}={plain}")
            return
        if isinstance(v, types.ModuleType):
            return
        if id(v) in self.seen:
            return
        self.seen.add(id(v))
        if isinstance(v, types.MethodType):
            v = v.__func__
        qual = f"{getattr(v, '__module__', '')}.{getattr(v, '__qualname__', type(v).__name__)}"
        self.text(f"{name}->{qual}")
        if _own(v):
            return
        if isinstance(v, types.FunctionType):
            self.function(v)
        elif isinstance(v, type):
            self.cls(v)

    def function(self, f: types.FunctionType) -> None:
        self.code(f.__code__, f.__globals__)
        for d in (*(f.__defaults__ or ()), *(f.__kwdefaults__ or {}).values()):
            self.value("default", d)
        for cell in f.__closure__ or ():
            try:
                self.value("closure", cell.cell_contents)
            except ValueError:  # an empty cell
                pass

    def cls(self, c: type) -> None:
        for base in c.__mro__:
            if base is object or _own(base) or (base is not c and id(base) in self.seen):
                continue
            self.seen.add(id(base))
            self.text(f"class {base.__qualname__}")
            for name, v in sorted(vars(base).items()):
                for f in (v, getattr(v, "__func__", None), getattr(v, "fget", None)):
                    if isinstance(f, types.FunctionType):
                        self.text(name)
                        self.function(f)
                        break
                else:
                    if not name.startswith("__"):
                        plain = _plain_repr(v)
                        if plain is not None:
                            self.text(f"{name}={plain}")


def _structure(model: nn.Module) -> str:
    """`repr(model)` without addresses; the module tree's names and types when a user's
    `extra_repr` cannot be printed."""
    try:
        return _ADDRESS.sub("", repr(model))
    except Exception:  # noqa: BLE001 - user code: a repr that fails must not fail the run
        return "\n".join(f"{n}: {type(m).__module__}.{type(m).__qualname__}"
                         for n, m in model.named_modules())


def definition_id(model: nn.Module, factory: Callable[..., Any] | None = None) -> str:
    """A short hex digest of `model`'s definition, and of the `factory` that built it (see the
    module's docstring)."""
    d = _Digest()
    d.text(_structure(model))
    for name, m in model.named_modules():
        d.text(f"module {name}")
        d.value("class", type(m))
        for k, v in sorted(vars(m).items()):
            if k.startswith("_") or k == "training":
                continue
            if _plain_repr(v) is not None or callable(v) and not isinstance(v, nn.Module):
                d.value(k, v)
    if factory is not None:
        d.text("factory")
        d.value("factory", factory)
    return d.h.hexdigest()[:16]
