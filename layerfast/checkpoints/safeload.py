"""Opening one checkpoint file without running any code it contains, and without reading it all.

Why this way:

* Pickle can call any importable function while loading (`__reduce__`), so a downloaded
  checkpoint could run code. torch files are opened only with `torch.load(weights_only=True)`,
  whose unpickler refuses every global outside an allow-list *before* calling anything.
  `ALLOWED_GLOBALS` extends torch's own list with the inert objects training scripts commonly
  put next to the weights (argparse.Namespace, pathlib paths, numpy scalars/arrays/dtypes).
  `collections.defaultdict` cannot be loaded by torch's weights-only unpickler at all.
* `mmap=True` maps the file instead of reading it: a tensor's bytes are read only when that
  tensor is copied out, so asking for one unit of a 100-checkpoint run reads one unit.
  Legacy (non-zip, `_use_new_zipfile_serialization=False`) files cannot be mapped and are read
  whole; the directory keeps at most one of those in memory.
* safetensors files are opened with `safe_open`, which reads only the header up front.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import pickle
import pickletools
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from layerfast.checkpoints.keymap import find_state_dict
from layerfast.errors import LayerfastError


def _numpy_globals() -> list[object]:
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    out: list[object] = [np.dtype, np.ndarray, core.multiarray.scalar, core.multiarray._reconstruct]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles dtypes by their DType class
    if dtypes is not None:
        for name in dir(dtypes):
            obj = getattr(dtypes, name)
            if isinstance(obj, type) and issubclass(obj, np.dtype):
                out.append(obj)
    return out


ALLOWED_GLOBALS: list[object] = [
    argparse.Namespace,
    pathlib.PosixPath,
    pathlib.WindowsPath,
    pathlib.PurePosixPath,
    pathlib.PureWindowsPath,
    *_numpy_globals(),
]

_ZIP_MAGIC = b"PK\x03\x04"
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _allowed_names() -> set[str]:
    """Names torch's weights-only unpickler accepts (for the refusal message only: torch, not
    this set, decides what loads)."""
    names = set()
    for obj in ALLOWED_GLOBALS:
        names.add(f"{obj.__module__}.{obj.__qualname__}")  # type: ignore[attr-defined]
    try:  # private, so optional: the message is merely less precise without it
        from torch._weights_only_unpickler import _get_allowed_globals

        names.update(_get_allowed_globals())
    except Exception:
        pass
    return names


def _asks_for_code(name: str, allowed: set[str]) -> bool:
    # torch's own rebuild helpers (torch._utils._rebuild_tensor_v2, ...) are how tensors load
    return name not in allowed and not name.startswith("torch.")


def _globals_in_pickle(data: bytes) -> list[str]:
    """Globals a raw pickle asks for, read from its opcodes (pickletools never executes)."""
    found: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # truncated or not a pickle: report what was seen so far
        pass
    return found


def _refuse_code(path: Path, exc: Exception) -> LayerfastError:
    """The message for a checkpoint that torch's weights-only unpickler refused."""
    names: list[str] = []
    m = _GLOBAL_RE.search(str(exc))
    if m:  # torch names builtins without their module ("getattr")
        names.append(m.group(1) if "." in m.group(1) else f"builtins.{m.group(1)}")
    try:
        if _is_zip(path):
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        else:
            found = _globals_in_pickle(path.read_bytes())
        allowed = _allowed_names()
        names += [g for g in found if _asks_for_code(g, allowed)]
    except Exception:
        pass
    names = list(dict.fromkeys(n for n in names if n))
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return LayerfastError(
            f"{path}: refused: loading this file would run code (it asks for {shown}), and "
            "layerfast never unpickles code. If you trust the file, load it once with "
            "torch.load(path, weights_only=False) and torch.save just its state dict "
            "(or write it as .safetensors)."
        )
    # No global asks for code: the pickle stream itself is broken (random bytes, truncation).
    return _corrupt(path, exc)


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == _ZIP_MAGIC


class OpenedFile:
    """One opened checkpoint: raw key -> shape, dtype, and a copy of a tensor on request."""

    path: Path
    in_memory: bool  # True when the whole file was read (legacy torch format)

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, raw_key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def is_floating(self, raw_key: str) -> bool:
        raise NotImplementedError

    def dtype_name(self, raw_key: str) -> str:
        """The stored dtype as torch spells it without `torch.` ("float32", "int64", "bool"),
        from metadata only: validation compares it with the model's without reading data."""
        raise NotImplementedError

    def get(self, raw_key: str) -> torch.Tensor:
        """A fresh CPU tensor (never a view of the cache or the file mapping)."""
        raise NotImplementedError

    def all_finite(self, raw_key: str) -> bool:
        """No NaN/Inf in the tensor (reads it, keeps nothing)."""
        return bool(torch.isfinite(self.get(raw_key)).all())


class TorchFile(OpenedFile):
    """A torch.save file, loaded weights-only, memory-mapped when the format allows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.in_memory = not _is_zip(path)
        try:
            with torch.serialization.safe_globals(ALLOWED_GLOBALS), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                obj = torch.load(
                    str(path), map_location="cpu", weights_only=True, mmap=not self.in_memory
                )
        except pickle.UnpicklingError as exc:
            raise _refuse_code(path, exc) from None
        except LayerfastError:
            raise
        except Exception as exc:  # truncated zip, EOF, garbage: name the file, hide internals
            raise _corrupt(path, exc) from None
        self._sd = find_state_dict(obj, str(path))

    def dtype_name(self, raw_key: str) -> str:
        return str(self._sd[raw_key].dtype).removeprefix("torch.")

    def keys(self) -> list[str]:
        return list(self._sd)

    def shape(self, raw_key: str) -> tuple[int, ...]:
        return tuple(self._sd[raw_key].shape)

    def is_floating(self, raw_key: str) -> bool:
        t = self._sd[raw_key]
        return t.is_floating_point() or t.is_complex()

    def get(self, raw_key: str) -> torch.Tensor:
        try:
            return self._sd[raw_key].detach().clone(memory_format=torch.contiguous_format)
        except RuntimeError as exc:  # e.g. the mapped file shrank underneath us
            raise _corrupt(self.path, exc) from None

    def all_finite(self, raw_key: str) -> bool:
        return bool(torch.isfinite(self._sd[raw_key]).all())  # straight from the mapping


class SafetensorsFile(OpenedFile):
    """A .safetensors file: the header is parsed at open, each tensor read when asked for."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.in_memory = False
        try:
            self._f = safe_open(str(path), framework="pt", device="cpu")
            self._keys = list(self._f.keys())
        except Exception as exc:
            raise _corrupt(path, exc) from None
        if not self._keys:
            raise LayerfastError(f"{path}: the safetensors file holds no tensors.")
        self._meta: dict[str, tuple[tuple[int, ...], bool]] = {}
        self._dtypes: dict[str, str] = {}
        for k in self._keys:
            sl = self._f.get_slice(k)
            dtype = sl.get_dtype()
            floating = dtype.startswith(("F", "BF", "C"))  # F32, F8_E4M3, BF16, C64, ...
            self._meta[k] = (tuple(sl.get_shape()), floating)
            self._dtypes[k] = _SAFETENSORS_DTYPES.get(dtype, dtype.lower())

    def dtype_name(self, raw_key: str) -> str:
        return self._dtypes[raw_key]

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, raw_key: str) -> tuple[int, ...]:
        return self._meta[raw_key][0]

    def is_floating(self, raw_key: str) -> bool:
        return self._meta[raw_key][1]

    def get(self, raw_key: str) -> torch.Tensor:
        try:
            return self._f.get_tensor(raw_key)
        except Exception as exc:
            raise _corrupt(self.path, exc) from None


#: safetensors' dtype codes -> torch's names, so messages spell dtypes one way.
_SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "C64": "complex64",
    "C128": "complex128", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip

_PICKLE_PROTO = b"\x80"  # a legacy torch.save file is a pickle of protocol >= 2: opcode PROTO


def _corrupt(path: Path, exc: Exception) -> LayerfastError:
    head = b""
    if path.suffix.lower() != ".safetensors":
        with contextlib.suppress(OSError):
            with open(path, "rb") as f:
                head = f.read(8)
        if head and head[:4] != _ZIP_MAGIC and head[:1] != _PICKLE_PROTO:
            # torch's own error here is a bare KeyError number (the first byte read as a
            # pickle opcode): say what the file is not instead.
            return LayerfastError(
                f"{path}: not a torch checkpoint: the file is neither a zip archive (what "
                f"torch.save writes) nor a legacy torch pickle (it starts with {head!r})."
            )
    text = str(exc).strip()
    detail = text.splitlines()[0].split(". ")[0][:200] if text else type(exc).__name__
    return LayerfastError(
        f"{path}: cannot read the checkpoint: the file is truncated or corrupt ({detail})."
    )


def open_file(path: Path) -> OpenedFile:
    """Open one checkpoint file by its suffix; every failure is a LayerfastError naming it."""
    if not path.is_file():
        raise LayerfastError(f"{path}: checkpoint file not found.")
    if path.stat().st_size == 0:
        raise LayerfastError(f"{path}: cannot read the checkpoint: the file is empty.")
    if path.suffix.lower() == ".safetensors":
        return SafetensorsFile(path)
    return TorchFile(path)
