"""What a model's definition is, for the resume store: a digest of its structure and of the code
of its own classes.

A rerun into the same out dir resumes (or, when finished, only re-reports) the stored sums. The
arch's name alone does not say that the model is the same: a user who edits `mynet.py` (ReLU to
Sigmoid, the same state-dict keys) and reruns the same command got the old model's results,
and a half-finished run would have added the two models' counts together. So the fingerprint
holds `definition_id(model)`:

- `repr(model)`: every module's type and configuration (in/out features, kernel size, ...), which
  is all there is to a model built from torch's modules (an `nn.Sequential` a factory returns);
- for each class of the model's modules (and their bases) that is neither torch's, torchvision's
  nor layerfast's, the bytes of the source file it was defined in (its forward, the helpers the
  forward calls, the constants it reads), or, for a class with no file (defined in a notebook
  cell or `python -c`), the code of the functions it defines.

What it cannot see: code in other files that such a class imports, and a change to torch
itself. layerfast's own architectures are versioned by the store's schema, which is bumped when
what a run computes changes.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
import types
from pathlib import Path

from torch import nn

_OWN_PACKAGES = frozenset({"torch", "torchvision", "layerfast", "builtins"})


def _code_bytes(code: types.CodeType) -> bytes:
    """A code object's instructions, names and constants, nested code included (not its line
    numbers or file name: moving a class in its file changes nothing it computes)."""
    parts = [code.co_code, repr(code.co_names).encode(), repr(code.co_varnames).encode()]
    for c in code.co_consts:
        parts.append(_code_bytes(c) if isinstance(c, types.CodeType) else repr(c).encode())
    return b"\0".join(parts)


def _class_code(cls: type) -> bytes:
    """The code of the functions `cls` defines itself (methods, static and class methods, and
    properties' getters)."""
    out = []
    for name, v in sorted(vars(cls).items()):
        for f in (v, getattr(v, "__func__", None), getattr(v, "fget", None)):
            code = getattr(f, "__code__", None)
            if isinstance(code, types.CodeType):
                out.append(name.encode() + b"=" + _code_bytes(code))
    return b"\n".join(out)


def _source_file(cls: type) -> Path | None:
    try:
        path = inspect.getsourcefile(cls)
    except (TypeError, OSError):  # a class defined in __main__ with no file, or a builtin
        return None
    return Path(path) if path and Path(path).is_file() else None


def definition_id(model: nn.Module) -> str:
    """A short hex digest of `model`'s definition (see the module's docstring)."""
    h = hashlib.sha256(repr(model).encode())
    seen: set[type] = set()
    files: set[Path] = set()
    for m in model.modules():
        for cls in type(m).__mro__:
            if cls in seen:
                continue
            seen.add(cls)
            if str(getattr(cls, "__module__", "")).split(".")[0] in _OWN_PACKAGES:
                continue
            path = _source_file(cls) if cls.__module__ != "__main__" or _has_file() else None
            if path in files:
                continue
            try:
                text = path.read_bytes() if path is not None else None
            except OSError:  # unreadable now: the class's own code still says what it does
                text = None
            if text is not None:
                files.add(path)
                h.update(b"file\0" + text)
            else:
                h.update(b"class\0" + cls.__qualname__.encode() + _class_code(cls))
    return h.hexdigest()[:16]


def _has_file() -> bool:
    """Whether `__main__` is a script file (`python script.py`) rather than a notebook, a REPL or
    `python -c`, where inspect would name a file that does not hold the class."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return isinstance(path, str) and path.endswith(".py") and Path(path).is_file()
