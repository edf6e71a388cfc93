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
* A zip archive with compressed records is refused before torch sees it: torch.save never
  compresses, and torch inflates a compressed record whole in memory, so a 10 MB zip bomb
  would cost tens of GB (and a compressed storage cannot be memory-mapped anyway).
* Every tensor of the state dict must be dense CPU data: a pickle can also rebuild meta
  tensors (no data at all), sparse or nested ones, which no later step can read.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import pickle
import pickletools
import re
import struct
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

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
#: The global torch refused, whole: a damaged name runs on past a control byte, and cutting it
#: at the first non-word character (`torch._utils._rebuild_tensor^v2` -> `..._rebuild_tensor`)
#: made a real name of it, so damage read as a request for code.
_GLOBAL_RE = re.compile(r"GLOBAL (.+?) was not an allowed global|GLOBAL ([\w.]+)", re.S)


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


def _scan_pickles(stream: IO[bytes]) -> tuple[list[str], int | None]:
    """Globals a pickle stream asks for, read from its opcodes (pickletools never executes),
    and the protocol of its first pickle. A legacy torch file is several pickles in a row
    (magic number, protocol, system info, the object) followed by raw storage bytes; they are
    read one after the other until one ends in garbage."""
    found: list[str] = []
    protocol: int | None = None
    for _ in range(8):
        strings: list[str] = []
        memo: dict[object, str | None] = {}
        last: str | None = None
        try:
            for op, arg, _pos in pickletools.genops(stream):
                name = op.name
                if name == "PROTO" and protocol is None:
                    protocol = int(arg)
                if name in ("GLOBAL", "INST") and isinstance(arg, str):
                    found.append(arg.replace(" ", "."))
                elif name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif name == "MEMOIZE":
                    memo[len(memo)] = last
                    continue
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = last
                    continue
                elif name in ("GET", "BINGET", "LONG_BINGET"):  # a memoised module name
                    got = memo.get(arg)
                    if got is not None:
                        strings.append(got)
                    last = got
                    continue
                elif isinstance(arg, str):
                    strings.append(arg)
                last = arg if isinstance(arg, str) else None
        except Exception:  # truncated, not a pickle, or the raw bytes after the last pickle
            break
    return found, protocol


def _zip_pickle(path: Path) -> Iterator[IO[bytes]]:
    """The `data.pkl` record of a torch zip archive, as a stream (stored, so bounded by the
    file's size: compressed archives were refused before loading)."""
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"]
        if names:
            with z.open(names[0]) as f:
                yield f


#: What a refused but harmless-to-its-owner file can do about it (every refusal ends this way).
_IF_TRUSTED = ("If you trust the file, load it once with torch.load(path, weights_only=False) "
               "and torch.save")


def _refuse_code(path: Path, exc: Exception) -> LayerfastError:
    """The message for a checkpoint that torch's weights-only unpickler refused."""
    names: list[str] = []
    m = _GLOBAL_RE.search(str(exc))
    if m:  # torch names builtins without their module ("getattr")
        g = m.group(1) or m.group(2)
        names.append(g if "." in g else f"builtins.{g}")
    protocol: int | None = None
    try:
        if _is_zip(path):
            found: list[str] = []
            for stream in _zip_pickle(path):
                found, protocol = _scan_pickles(stream)
        else:
            with open(path, "rb") as f:
                found, protocol = _scan_pickles(f)
        allowed = _allowed_names()
        names += [g for g in found if _asks_for_code(g, allowed)]
    except Exception:
        pass
    names = list(dict.fromkeys(n for n in names if n))
    if names:
        # escaped: a crafted name may hold a newline or control bytes (one line on stderr)
        shown = ", ".join(n if n.isprintable() else repr(n)[1:-1] for n in names[:5]) + (
            f" and {len(names) - 5} more" if len(names) > 5 else "")
        # A zip file's records passed their CRC-32 when it was opened (`_check_records`), so its
        # names are the ones written. A legacy file has no checksum: one flipped bit in a
        # GLOBAL's text (`collectionr.OrderedDict`) reads as a request for code. Which it is
        # cannot be told from the name (a script's `__main__.Net`, a payload's `__builtin__.eval`
        # name nothing here either), so the message says both.
        damaged = "" if _is_zip(path) else (
            " It is a legacy (non-zip) torch file, which carries no checksum: if it should hold "
            "only tensors, it is more likely damaged (truncated or corrupt) than asking for code.")
        return LayerfastError(
            f"{path}: refused: loading this file would run code (it asks for {shown}), and "
            f"layerfast never unpickles code. {_IF_TRUSTED} just its state dict "
            f"(or write it as .safetensors).{damaged}"
        )
    if "Unsupported operand" in str(exc) and protocol is not None and protocol > 3:
        # torch.save(..., pickle_protocol=4): intact, but torch's weights-only unpickler only
        # knows the opcodes of protocols 2 and 3; "truncated or corrupt" would send the user
        # looking for a broken download
        return LayerfastError(
            f"{path}: cannot load: the file was saved with pickle protocol {protocol}, which "
            f"torch's weights-only loader cannot read (it reads protocols 2 and 3). {_IF_TRUSTED} "
            "it again with the default protocol (or write it as .safetensors)."
        )
    # No global asks for code: the pickle stream itself is broken (random bytes, truncation).
    return _corrupt(path, exc)


#: Zip checkpoints whose records all passed their CRC-32 in this process, by (path, size,
#: mtime, inode, ctime): the LRU of opened files reopens a file in a study of more than its
#: size. Size and mtime alone missed a damaged copy put in place with its mtime kept
#: (`cp -p`, `rsync -t`); a new file has a new inode or ctime, which no copy tool can set.
_RECORDS_OK: set[tuple[str, int, int, int, int]] = set()


def _check_records(path: Path) -> None:
    """Every record of a torch zip archive against its CRC-32, which torch never checks: a
    flipped bit in a tensor's bytes loaded as a silently different weight. Reads the file once
    (zlib's CRC-32 runs at GB/s, and the mapped tensors are then in the page cache)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    if key in _RECORDS_OK:
        return
    try:
        bad = _bad_record(path)
    except Exception:  # not readable as a zip: torch's own error decides the message
        return
    if bad is not None:
        raise _corrupt(path, ValueError(f"the record {bad} fails its CRC-32 check"))
    _RECORDS_OK.add(key)


def _bad_record(path: Path) -> str | None:
    """The first record whose bytes, where torch reads them, fail the central directory's
    CRC-32. Where torch reads them: after the *local* header's name and extra fields (miniz's
    offset), which `zipfile.testzip` does not use, so a flipped bit in a local length field
    passed it while torch read the tensor from shifted bytes. Records are stored (compressed
    archives were refused before), so their bytes are the data."""
    with open(path, "rb") as fh, zipfile.ZipFile(fh) as z:
        for info in z.infolist():
            fh.seek(info.header_offset)
            head = fh.read(30)
            if len(head) < 30 or head[:4] != _ZIP_MAGIC:
                return info.filename
            n, e = struct.unpack("<HH", head[26:30])
            fh.seek(info.header_offset + 30 + n + e)
            crc, left = 0, info.compress_size
            while left:
                chunk = fh.read(min(left, 1 << 20))
                if not chunk:
                    return info.filename
                crc, left = zlib.crc32(chunk, crc), left - len(chunk)
            if crc != info.CRC:
                return info.filename
    return None


def _refuse_compressed(path: Path) -> None:
    """Refuse a zip archive whose records are compressed (or claim to inflate beyond the
    file), before torch inflates them in memory. An archive the zipfile module cannot read is
    left to torch, whose message says truncated or corrupt."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except Exception:
        return
    size = path.stat().st_size
    packed = [
        i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED or i.file_size > size
    ]
    if packed:
        shown = ", ".join(packed[:3]) + (f" and {len(packed) - 3} more" if len(packed) > 3 else "")
        raise LayerfastError(
            f"{path}: refused: the archive's records are compressed ({shown}). torch.save "
            "never compresses them, and torch would inflate each one whole in memory (a small "
            "file could need any amount). Save the state dict again with torch.save (or unzip "
            "it and zip it again without compression, zip -0)."
        )


#: Allow-listed by torch, but `bytearray(n)` allocates and zeroes n bytes: a 1 KB pickle could
#: ask for any amount of memory. Training scripts do not save bytearrays next to weights.
_ALLOCATING_GLOBALS = frozenset({"builtins.bytearray", "__builtin__.bytearray"})


def _refuse_allocating(path: Path, zipped: bool) -> None:
    """Refuse a pickle that names a global able to allocate memory of a size it chooses, before
    torch runs it (opcodes only: a state dict's pickle is small, so this is cheap)."""
    found: list[str] = []
    try:
        if zipped:
            for stream in _zip_pickle(path):
                found = _scan_pickles(stream)[0]
        else:
            with open(path, "rb") as f:
                found = _scan_pickles(f)[0]
    except Exception:  # unreadable archive: torch.load will say what is wrong with it
        return
    bad = sorted(set(found) & _ALLOCATING_GLOBALS)
    if bad:
        raise LayerfastError(
            f"{path}: refused: the pickle calls {bad[0]}, which allocates whatever size the "
            "file asks for (a tiny file can exhaust memory), and a state dict never needs it. "
            f"{_IF_TRUSTED} just its state dict (or write it as .safetensors)."
        )


def _not_dense(t: torch.Tensor) -> str | None:
    """Why a loaded tensor is not dense CPU data, or None."""
    if t.device.type == "meta":
        return "a meta tensor, no data"
    if t.is_nested:
        return "a nested tensor"
    if t.layout != torch.strided:
        return f"a {str(t.layout).removeprefix('torch.')} tensor"
    if t.device.type != "cpu":
        return f"on device {t.device}"
    return None


def _all_finite(t: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """No NaN/Inf in `t`, or in `t` cast to `dtype` (the model's) when that range is narrower:
    float64 1e300 is finite as stored and inf in a float32 model, which is what is evaluated."""
    if (dtype is not None and dtype.is_floating_point and t.is_floating_point()
            and torch.finfo(t.dtype).max > torch.finfo(dtype).max):
        t = t.to(dtype)
    try:
        return bool(torch.isfinite(t).all())
    except (NotImplementedError, RuntimeError):  # float8 has no isfinite kernel
        return bool(torch.isfinite(t.to(torch.float32)).all())


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

    def all_finite(self, raw_key: str, dtype: torch.dtype | None = None) -> bool:
        """No NaN/Inf in the tensor, as cast to `dtype` if given (reads it, keeps nothing)."""
        return _all_finite(self.get(raw_key), dtype)


class TorchFile(OpenedFile):
    """A torch.save file, loaded weights-only, memory-mapped when the format allows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.in_memory = not _is_zip(path)
        if not self.in_memory:
            _refuse_compressed(path)
            _check_records(path)
        _refuse_allocating(path, zipped=not self.in_memory)
        try:
            with torch.serialization.safe_globals(ALLOWED_GLOBALS), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                # torch checks a sparse tensor's invariants while loading and says so as a
                # raw UserWarning (two lines, one of torch's source); the tensor is refused
                # just below with one line that says why, so its warning is only noise.
                warnings.filterwarnings("ignore", message="Validating sparse tensor invariants")
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
        odd = [(k, why) for k, t in self._sd.items() if (why := _not_dense(t)) is not None]
        if odd:
            shown = "; ".join(f"{k}: {why}" for k, why in odd[:5])
            more = f"; and {len(odd) - 5} more" if len(odd) > 5 else ""
            raise LayerfastError(
                f"{path}: refused: tensors that are not dense CPU data ({shown}{more}). "
                "layerfast reads dense weights only: save real values (tensor.to_dense())."
            )

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

    def all_finite(self, raw_key: str, dtype: torch.dtype | None = None) -> bool:
        return _all_finite(self._sd[raw_key], dtype)  # straight from the mapping


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


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file starts with its JSON header's length (u64, little-endian), then `{`."""
    return (len(head) >= 9 and head[8:9] == b"{"
            and 0 < int.from_bytes(head[:8], "little") <= size - 8)


def _corrupt(path: Path, exc: Exception) -> LayerfastError:
    head = b""
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            head = f.read(9)
    size = 0
    with contextlib.suppress(OSError):
        size = path.stat().st_size
    # An intact file of the other format under this suffix (torch.save(sd, "m.safetensors"),
    # save_file(sd, "m.pt")) is not "truncated or corrupt": say what it is instead.
    if path.suffix.lower() == ".safetensors":
        # its own format first: a header of 640 bytes (0x280) starts with b"\x80\x02", a
        # pickle's PROTO 2, so a truncated safetensors file was called a torch pickle
        if not _looks_like_safetensors(head, size) and (
                head[:4] == _ZIP_MAGIC or head[:1] == _PICKLE_PROTO):
            return LayerfastError(
                f"{path}: not a safetensors file: it is a torch.save file (a "
                f"{'zip archive' if head[:4] == _ZIP_MAGIC else 'legacy torch pickle'}), which "
                "layerfast reads by its suffix: rename it to .pt."
            )
    elif _looks_like_safetensors(head, size):
        return LayerfastError(
            f"{path}: not a torch.save file: it is a safetensors file, which layerfast reads "
            "by its suffix: rename it to .safetensors."
        )
    else:
        head = head[:8]
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
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:  # permissions, I/O errors: not "truncated or corrupt"
        raise LayerfastError(
            f"{path}: cannot read the checkpoint: {exc.strerror or exc}."
        ) from None
    try:
        if path.suffix.lower() == ".safetensors":
            return SafetensorsFile(path)
        return TorchFile(path)
    except OSError as exc:  # removed or made unreadable since the checks above: not a traceback
        raise LayerfastError(
            f"{path}: cannot read the checkpoint: {exc.strerror or exc}."
        ) from None
