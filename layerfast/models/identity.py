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
  a notebook runs what it imported), with the functions, classes, constants, tensors and
  arrays (by their bytes) that code reads from its module's globals or, as `module.name`, from
  the user's other modules, transitively (a helper the forward calls, a constant).

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

import functools
import hashlib
import re
import sys
import types
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

_OWN_PACKAGES = frozenset({"torch", "torchvision", "layerfast"})
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_PLAIN = (int, float, complex, str, bytes, bool, type(None))


def _name_of(obj: object) -> tuple[str, str]:
    """(module, qualified name) of a function or class, or else of the object's class: never
    an attribute of the object itself, which a proxy may answer by raising or with a new
    proxy."""
    plain = (type, types.FunctionType, types.BuiltinFunctionType)
    src = obj if isinstance(obj, plain) else type(obj)
    try:
        mod, qual = src.__module__, src.__qualname__
    except Exception:  # noqa: BLE001 - a metaclass property that raises
        mod, qual = "", type(obj).__name__
    return (mod if isinstance(mod, str) else ""), (qual if isinstance(qual, str) else "?")


def _own(obj: object) -> bool:
    """torch's, torchvision's or layerfast's: versioned apart from the user's model."""
    return _name_of(obj)[0].split(".")[0] in _OWN_PACKAGES


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


def _user_module(mod: types.ModuleType) -> bool:
    """A module of the user's own (not torch's, the standard library's or an installed
    package's): the values the model's code reads from it as `mod.name` are its definition."""
    name = getattr(mod, "__name__", "") or ""
    if name.split(".")[0] in _OWN_PACKAGES | set(sys.stdlib_module_names):
        return False
    path = str(getattr(mod, "__file__", "") or "")
    return "site-packages" not in path and "dist-packages" not in path


def _array_text(v: Any) -> str | None:
    """dtype, shape and (up to 2**20 elements) a digest of the bytes of a tensor or a numpy
    array; None for anything else."""
    try:
        if isinstance(v, torch.Tensor):
            head = f"tensor {v.dtype} {tuple(v.shape)}"
            if v.numel() > 1 << 20 or v.layout != torch.strided or v.is_meta:
                return head
            data = v.detach().cpu().contiguous().reshape(-1)
            raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
        elif isinstance(v, np.ndarray):
            head = f"array {v.dtype} {v.shape}"
            if v.size > 1 << 20 or v.dtype == object:
                return head
            raw = np.ascontiguousarray(v).tobytes()
        else:
            return None
    except Exception:  # noqa: BLE001 - an exotic tensor: its type and shape say enough
        return f"{type(v).__name__} {getattr(v, 'shape', '')}"
    return f"{head} {hashlib.sha256(raw).hexdigest()[:16]}"


class _Digest:
    """A sha256 over code and values, each function, class and container taken once, walked
    breadth first from a work list (a vendored library's web of helpers is no recursion)."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.seen: set[int] = set()
        self.todo: deque[tuple[str, Any]] = deque()

    def text(self, s: str) -> None:
        self.h.update(s.encode("utf-8", "surrogatepass") + b"\0")

    def drain(self) -> None:
        while self.todo:
            kind, obj = self.todo.popleft()
            if kind == "function":
                self.function(obj)
            else:
                self.cls(obj)

    def code(self, co: types.CodeType, globs: dict[str, Any] | None) -> None:
        self.h.update(co.co_code)
        self.text(repr(co.co_names) + repr(co.co_varnames))
        for c in co.co_consts:
            if isinstance(c, types.CodeType):
                self.code(c, globs)
            else:
                self.text(_plain_repr(c) or type(c).__name__)
        if globs is None:
            return
        for name in co.co_names:  # what the code reads by name from its module
            if name not in globs:
                continue
            g = globs[name]
            if isinstance(g, types.ModuleType):
                if _user_module(g):  # `ops.act(x)`: the attributes the code may read
                    for attr in co.co_names:
                        if attr in vars(g):
                            self.value(f"{name}.{attr}", vars(g)[attr])
                continue
            self.value(name, g)

    def value(self, name: str, v: object) -> None:
        """A name a model's code or module refers to: code is followed, plain values and
        arrays are read, containers are opened, torch's own objects are named only."""
        plain = _plain_repr(v)
        if plain is not None:
            self.text(f"{name}={plain}")
            return
        arr = _array_text(v)
        if arr is not None:
            self.text(f"{name}={arr}")
            return
        if isinstance(v, types.ModuleType) or id(v) in self.seen:
            return
        self.seen.add(id(v))
        if isinstance(v, types.MethodType):
            v = v.__func__
        mod, qual = _name_of(v)
        self.text(f"{name}->{mod}.{qual}")
        if isinstance(v, list | tuple | dict) and len(v) <= 4096:
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, x in items:
                self.value(f"{name}[{_plain_repr(k) or type(k).__name__}]", x)
            return
        if isinstance(v, functools.partial):
            self.value(f"{name}.func", v.func)
            self.value(f"{name}.args", v.args)
            self.value(f"{name}.keywords", v.keywords)
            return
        if _own(v):
            return
        try:  # an instance's own attributes: never through __getattr__ (a proxy's)
            own = dict(vars(v)) if not isinstance(v, type) else {}
        except TypeError:  # no __dict__
            own = {}
        if "__wrapped__" in own:  # functools.wraps: a decorator's wrapper, an lru_cache
            self.value(f"{name}.__wrapped__", own["__wrapped__"])
        elif isinstance(v, functools._lru_cache_wrapper):  # type: ignore[attr-defined]
            self.value(f"{name}.__wrapped__", v.__wrapped__)
        if isinstance(v, types.FunctionType):
            self.todo.append(("function", v))
        elif isinstance(v, type):
            self.todo.append(("class", v))
        elif not isinstance(v, types.BuiltinFunctionType):
            # an instance of the user's class (`ACT = Swish(1.0)` called by the forward): its
            # class's code and its plain attributes
            if not _own(type(v)) and id(type(v)) not in self.seen:
                self.seen.add(id(type(v)))
                self.todo.append(("class", type(v)))
            for k, x in sorted(own.items()):
                if not k.startswith("__"):
                    plain = _plain_repr(x)
                    if plain is not None:
                        self.text(f"{name}.{k}={plain}")

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
    try:
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
        d.drain()
    except Exception as exc:  # noqa: BLE001 - user objects of any kind: never fail the run
        d.text(f"walk stopped: {type(exc).__name__}")  # the same objects stop it the same way
    return d.h.hexdigest()[:16]
