"""In-memory inputs for `analyze()` (the Python API only): checkpoints as a mapping
`{τ label: state_dict}` and data as a pair `(x, y)` (or `(x, y, num_classes)`).

They are validated, then written once to a content-addressed folder under the system temp
dir (`<tempdir>/layerfast-inputs-<uid>/<sha256>/`: `epoch_<τ>.pt` files, or `data.npz`), and
the analysis runs on those paths exactly as on files the user saved. Why files, and not a
second code path: everything `analyze` guarantees for files holds unchanged — the same safe
loading and validation, the same fingerprint (so a rerun with the same objects sees the same
paths, sizes and mtimes and resumes, and changed content is another folder, hence another run),
the same run.json — and the results are bit for bit those of the same objects saved by hand.

- A folder is named by the sha256 of what it holds (labels, keys, dtypes, shapes and bytes;
  x's and y's dtypes, shapes and bytes), and a file already there is reused, never rewritten:
  a rewrite would change its mtime, and the resume fingerprint with it. Files are written
  with layerfast's own atomic writers to a hidden name, then hard-linked into place, so a file
  that exists is whole, and of two processes writing the same content at once the first's
  file stays (`_write_new`).
- The state dict of each value is found by the checkpoint loader's own rule (`find_state_dict`:
  a state dict, or one held under `state_dict`, `model`, ...), and only its tensors are saved
  (`torch.save`, which keeps tied tensors tied; safetensors refuses shared storage). A tensor
  that views part of a larger storage is copied out of it first (`_compact`): torch.save
  writes a view's whole storage.
- `(x, y)` is checked by the .npz reader's own code (`data.npz.open_arrays`) before it is
  saved with `numpy.savez(x=x, y=y)`: float32 `x` fed as is, uint8 scaled to [0, 1]. A third
  element is the .npz's optional `num_classes`, for labels that do not cover every class.
- The folder is per user (mode 0700): a shared `/tmp/layerfast-inputs` would let another
  user plant weights at a predictable content address.
- Nothing is deleted: the same objects again reuse the folder, and the system's temp cleaner
  removes it in time. A rerun after that rewrites the files with new mtimes, and the resume
  store then refuses them as changed checkpoints (pass `fresh=True`).
"""

from __future__ import annotations

import contextlib
import hashlib
import numbers
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from layerfast.data.source import DataSource
from layerfast.errors import LayerfastError

#: Each in-memory input is written under `<tempdir>/<ROOT>-<uid>/<sha256>/`.
ROOT = "layerfast-inputs"
#: Bumped when what a folder holds for the same content changes (file names, format).
_VERSION = b"layerfast-inputs 1\0"


def is_in_memory(ckpts: Any, data: Any) -> tuple[bool, bool]:
    """Whether `ckpts` is a mapping of state dicts and `data` an `(x, y)` pair."""
    return isinstance(ckpts, Mapping), isinstance(data, tuple | list)


def root() -> Path:
    """This user's folder for materialised inputs, created 0700 when missing; one that is not
    a directory of this user's (a link, another user's) is refused."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    path = Path(tempfile.gettempdir()) / (ROOT if uid is None else f"{ROOT}-{uid}")
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = path.lstat()
    except OSError as exc:
        raise LayerfastError(f"cannot write the in-memory inputs to {path}: "
                             f"{exc.strerror or exc}") from None
    import stat

    if not stat.S_ISDIR(st.st_mode) or (uid is not None and st.st_uid != uid):
        raise LayerfastError(f"{path} is not a directory of this user's: remove it (it holds "
                             "only layerfast's copies of in-memory inputs)")
    return path


def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's values as bytes (a uint8 array), whatever its dtype (bfloat16 has no
    numpy dtype)."""
    flat = t.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, np.uint8)


def _label(key: Any) -> int:
    if isinstance(key, bool) or not isinstance(key, numbers.Integral):
        raise LayerfastError(f"ckpts: the labels τ must be integers (the epoch of each state "
                             f"dict, 0 = the initialization), got {type(key).__name__} {key!r}")
    if int(key) < 0:
        raise LayerfastError(f"ckpts: the labels τ must be >= 0 (0 is the initialization), "
                             f"got {int(key)}")
    from layerfast.checkpoints.discover import MAX_LABEL

    if int(key) > MAX_LABEL:  # the directory reader's bound, here before any file is written
        raise LayerfastError(f"ckpts: the labels τ must be below 2**63, got {int(key)}")
    return int(key)


def _state_dict(label: int, value: Any) -> dict[str, torch.Tensor]:
    """The tensors of one value, found as the file loader finds a file's state dict."""
    from layerfast.checkpoints.keymap import WRAPPER_KEYS, find_state_dict

    where = f"ckpts[{label}]"
    if isinstance(value, torch.nn.Module):
        raise LayerfastError(f"{where} is an nn.Module: pass its state_dict()")
    if not isinstance(value, Mapping):
        raise LayerfastError(f"{where} is a {type(value).__name__}, not a state dict (a mapping "
                             "of parameter names to tensors, as model.state_dict() gives)")
    if not value:
        raise LayerfastError(f"{where} is an empty mapping, not a state dict")
    bad = [k for k, v in value.items()
           if not isinstance(v, torch.Tensor) and not str(k).endswith("_extra_state")]
    if bad and not any(k in value for k in WRAPPER_KEYS):  # a state dict with stray values
        shown = ", ".join(f"{k!r} ({type(value[k]).__name__})" for k in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise LayerfastError(f"{where}: {shown}{more} {'is' if len(bad) == 1 else 'are'} not "
                             "a tensor; a state dict maps parameter names to tensors")
    sd = find_state_dict(value, where, holder="it")
    for k, t in sd.items():
        if t.layout != torch.strided or t.is_meta or t.is_quantized:
            what = ("quantized" if t.is_quantized else "meta" if t.is_meta
                    else str(t.layout).removeprefix("torch."))
            raise LayerfastError(f"{where}[{k!r}] is a {what} tensor; checkpoints hold dense "
                                 "tensors with values")
    # detach (a Parameter's grad state is no weight), cpu (a no-op for CPU tensors, so ties
    # stay), and a conjugate or negative view's values made real (as torch.save would have
    # them, and as `_tensor_bytes` reads them)
    return {k: t.detach().cpu().resolve_conj().resolve_neg() for k, t in sd.items()}


def _write_new(path: Path, write: Callable[[Path], None]) -> None:
    """`write(path)` unless `path` exists already (same name, same content: reused as it is,
    its mtime kept for the resume fingerprint).

    Two processes materialising the same content at once both find no file: written straight
    to `path` (an atomic rename over it), the second replaced the first's file, whose new
    mtime then refused the first run's resume. So the file is written under a hidden name of
    this process's and hard-linked to `path`, which fails where `path` exists: the first
    writer's file stays. (A file system without hard links falls back to the rename.)"""
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.new")
    try:
        write(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:  # another process's copy of the same content: keep it
            pass
        except OSError:  # no hard links here (some FUSE or FAT mounts)
            if not path.exists():
                os.replace(tmp, path)
    except OSError as exc:
        raise LayerfastError(f"cannot write the in-memory inputs to {path}: "
                             f"{exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _folder(digest: str) -> Path:
    path = root() / digest
    try:
        path.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise LayerfastError(f"cannot write the in-memory inputs to {path}: "
                             f"{exc.strerror or exc}") from None
    return path


def _checked_ckpts(ckpts: Mapping[Any, Any]) -> tuple[list[tuple[int, dict]], str]:
    """The state dicts by label, checked, and the sha256 of what they hold."""
    if not ckpts:
        raise LayerfastError("ckpts is an empty mapping: give {τ: state_dict, ...} with the "
                             "final model's state dict at the largest τ")
    if any(isinstance(k, str) for k in ckpts) and \
            any(isinstance(v, torch.Tensor) for v in ckpts.values()):
        # was "the labels τ must be integers, got str 'fc1.weight'", which did not say why
        raise LayerfastError("ckpts is one state dict (names to tensors); give a mapping "
                             "{τ: state_dict, ...} of the checkpoints, with the final model's "
                             "at the largest τ")
    from layerfast.checkpoints.keymap import WRAPPER_KEYS

    held = next((k for k in WRAPPER_KEYS if isinstance(ckpts.get(k), Mapping)), None)
    if held is not None:
        # one checkpoint as training scripts save it (`{"state_dict": sd, "epoch": 3}`,
        # `{"model": sd}`: the loader's holders) got "the labels τ must be integers, got str
        # 'state_dict'", which did not say why
        raise LayerfastError(f"ckpts is one checkpoint (a state dict held under {held!r}); "
                             "give a mapping {τ: state_dict, ...} of the checkpoints, with the "
                             "final model's at the largest τ")
    labelled = sorted(((_label(k), v) for k, v in ckpts.items()), key=lambda kv: kv[0])
    dicts = [(tau, _state_dict(tau, v)) for tau, v in labelled]
    h = hashlib.sha256(_VERSION + b"ckpts\0")
    for tau, sd in dicts:
        h.update(f"tau {tau}\0".encode())
        for k, t in sorted(sd.items()):  # the keys' order changes no checkpoint read
            h.update(f"{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode("utf-8", "surrogatepass"))
            h.update(_tensor_bytes(t))
    return dicts, h.hexdigest()


def _compact(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`sd` with each tensor that views part of a larger storage copied out of it.

    torch.save writes a tensor's whole storage: a state dict of views into one flat buffer
    (a flat-parameter optimizer, a preallocated history of every epoch) wrote the whole
    buffer into every epoch_<τ>.pt, gigabytes for a small model. A tensor that spans its
    storage is kept as it is, and the same view under two names (tied weights) becomes one
    copy, so ties stay ties. Called per file as it is written: one state dict's copies at
    a time, not every checkpoint's at once."""
    copies: dict[tuple, torch.Tensor] = {}
    out = {}
    for k, t in sd.items():
        if t.untyped_storage().nbytes() > t.numel() * t.element_size():
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                     tuple(t.stride()), t.dtype)
            if ident not in copies:
                copies[ident] = t.clone(memory_format=torch.contiguous_format)
            t = copies[ident]
        out[k] = t
    return out


def _write_ckpts(dicts: list[tuple[int, dict]], digest: str) -> tuple[Path, str]:
    """The folder holding the state dicts as `epoch_<τ>.pt` files, and a line for run.json."""
    from layerfast.checkpoints.save import save_atomic

    folder = _folder(digest)
    for tau, sd in dicts:
        _write_new(folder / f"epoch_{tau}.pt", lambda p, sd=sd: save_atomic(_compact(sd), p))
    taus = ", ".join(str(t) for t, _ in dicts)
    return folder, (f"in-memory: {len(dicts)} state dict{'s' * (len(dicts) != 1)} "
                    f"(τ {taus}), sha256 {digest}")


def _array(name: str, v: Any) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        # the checks before .cpu(): a meta tensor's copy is torch's NotImplementedError
        t = v.detach() if v.is_meta else v.detach().cpu()
        if t.dtype == torch.bfloat16 or t.layout != torch.strided or t.is_meta:
            what = "a meta" if t.is_meta else str(t.dtype if t.layout == torch.strided
                                                  else t.layout).removeprefix("torch.")
            raise LayerfastError(f"data: {name} is {what} tensor; give x as float32 (fed as "
                                 "is) or uint8 (scaled to [0,1]), y as integers")
        try:
            return t.resolve_conj().resolve_neg().numpy()
        except TypeError:  # a dtype numpy lacks besides bfloat16 (float8_*, ...): no .npz holds it
            raise LayerfastError(
                f"data: {name} is {str(t.dtype).removeprefix('torch.')} tensor, which numpy "
                "(and a .npz) cannot hold; give x as float32 (fed as is) or uint8 (scaled to "
                "[0,1]), y as integers") from None
    if isinstance(v, np.ndarray):
        return v
    raise LayerfastError(f"data: (x, y) must hold torch tensors or numpy arrays; {name} is a "
                         f"{type(v).__name__}")


def _checked_data(data: tuple | list, split: str) -> tuple[dict[str, np.ndarray], str]:
    """The arrays of `(x, y)` or `(x, y, num_classes)` as a .npz would hold them, checked as
    that file would be, and the sha256 of what they hold."""
    from layerfast.data.npz import open_arrays

    if len(data) not in (2, 3):
        raise LayerfastError(f"data: an in-memory dataset is a pair (x, y), or (x, y, "
                             f"num_classes); got a {type(data).__name__} of {len(data)}")
    arrays = {"x": _array("x", data[0]), "y": _array("y", data[1])}
    if len(data) == 3:  # the .npz's optional scalar: classes the labels present do not cover
        nc = data[2]
        if isinstance(nc, torch.Tensor | np.ndarray) and nc.ndim == 0 \
                and not nc.dtype == torch.bool and not nc.dtype == np.bool_:
            nc = nc.item()  # `y.max() + 1`, a 0-d tensor, as the count it holds
        if isinstance(nc, bool) or not isinstance(nc, numbers.Integral) or nc < 1:
            raise LayerfastError(f"data: num_classes, the third of (x, y, num_classes), must "
                                 f"be a positive integer, got {nc!r}")
        arrays["num_classes"] = np.array(int(nc), dtype=np.int64)
    x, y = arrays["x"], arrays["y"]
    if x.dtype == object or y.dtype == object:
        raise LayerfastError("data: x and y must be numeric arrays, not object arrays")
    if x.ndim >= 1 and y.ndim == 1 and len(x) == len(y) == 0:
        raise LayerfastError("data: the in-memory (x, y) is empty (0 samples)")
    open_arrays(arrays, "data (x, y)", "data (x, y)", split, None)  # the .npz reader's checks
    h = hashlib.sha256(_VERSION + b"data\0")
    for name, a in arrays.items():
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
    return arrays, h.hexdigest()


def _write_data(arrays: dict[str, np.ndarray], digest: str) -> tuple[Path, str]:
    """`<folder>/data.npz` holding the arrays, and a line for run.json."""
    path = _folder(digest) / "data.npz"
    _write_new(path, lambda p: _savez_atomic(p, arrays))
    x, y = arrays["x"], arrays["y"]
    nc = f", num_classes {int(arrays['num_classes'])}" if "num_classes" in arrays else ""
    return path, (f"in-memory: x {x.dtype} {list(x.shape)}, y {y.dtype} {list(y.shape)}{nc}, "
                  f"sha256 {digest}")


def _savez_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """numpy.savez(**arrays) to a hidden temporary beside `path`, fsync, rename over it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def need_data(ckpts: Any, data: Any) -> None:
    """In-memory checkpoints name no data: without `data`, the error would be that the temp
    folder has no manifest.json naming it."""
    if isinstance(ckpts, Mapping) and data is None:
        raise LayerfastError("data is required with in-memory checkpoints (a manifest.json "
                             "names it only in a directory layerfast train wrote): pass "
                             "data=(x, y) or a spec such as 'digits'")


def open_pair(data: tuple | list, split: str = "test",
              max_samples: int | None = None) -> DataSource:
    """The DataSource of an in-memory `(x, y)` (or `(x, y, num_classes)`), nothing written:
    for `list_units`, which needs only its sample shape and class count."""
    from layerfast.data.npz import open_arrays

    arrays, _ = _checked_data(data, split)
    return open_arrays(arrays, "data (x, y)", "data (x, y)", split, max_samples)


def materialise(ckpts: Any, data: Any, split: str) -> tuple[Any, Any, dict[str, str] | None]:
    """`ckpts` and `data` as `analyze` takes them from files: in-memory ones written out (see
    the module docstring), paths and specs as they are; and run.json's `inputs` entry saying
    which were in memory (None when neither was)."""
    mem_ck, mem_data = is_in_memory(ckpts, data)
    if not (mem_ck or mem_data):
        return ckpts, data, None
    need_data(ckpts, data)
    from layerfast.data.spec import check_split, spec_text

    check_split(split)  # open_data's check, before anything is written
    # everything checked before anything is written (a data spec beside in-memory checkpoints
    # by its form: a dict or an array there wrote the checkpoints' files, then was refused)
    if not mem_data:
        spec_text(data)
    checked_data = _checked_data(data, split) if mem_data else None
    checked_ck = _checked_ckpts(ckpts) if mem_ck else None
    inputs = {}
    if checked_data is not None:
        path, inputs["data"] = _write_data(*checked_data)
        data = str(path)
    if checked_ck is not None:
        ckpts, inputs["ckpts"] = _write_ckpts(*checked_ck)
    return ckpts, data, inputs


#: How an error names each in-memory input: as the caller passed it (as `open_pair` names the
#: data), not by the temp file it was written to.
DATA_NAME, CKPTS_NAME = "data (x, y)", "the in-memory state dicts"
#: How a message names one in-memory state dict, by its τ (the key the caller gave it).
STATE_NAME = "state dict τ={}"
_STATE_FILE = re.compile(r"(?<![\w./-])epoch_(\d+)\.pt\b")
#: Words about the files that, for in-memory state dicts, are about the state dicts.
_FILE_WORDS = (("the other files were saved", "the other state dicts were saved"),
               ("which file holds what", "which state dict holds what"))


def _renamer(ckpts: Any, data: Any, inputs: dict[str, str]) -> Callable[[str], str]:
    """The rewrite `named_as_passed` applies: the temp folder and files `materialise` wrote
    (`ckpts` the folder, `data` the .npz), written as the caller passed them."""
    data_forms = ckpt_forms = ()
    taus: set[str] = set()
    if "data" in inputs:
        data_forms = tuple(dict.fromkeys((str(data), str(Path(data).resolve()))))
    if "ckpts" in inputs:
        ckpt_forms = tuple(dict.fromkeys((str(ckpts), str(Path(ckpts).resolve()))))
        with contextlib.suppress(OSError):  # the folder holds exactly the caller's τ
            taus = {m.group(1) for p in Path(ckpts).iterdir()
                    if (m := _STATE_FILE.fullmatch(p.name))}  # fmt: skip

    def state(m: re.Match[str]) -> str:
        return STATE_NAME.format(m.group(1)) if m.group(1) in taus else m.group(0)

    def rename(msg: str) -> str:
        for form in data_forms:
            msg = msg.replace(repr(form), DATA_NAME).replace(form, DATA_NAME)
        if ckpt_forms:
            for form in ckpt_forms:  # a file's whole path first, then the folder's
                msg = re.sub(re.escape(form + os.sep) + r"epoch_(\d+)\.pt\b", state, msg)
                msg = msg.replace(form, CKPTS_NAME)
            msg = _STATE_FILE.sub(state, msg)
            if msg.count("state dict τ="):
                msg = re.sub(r"\((\d+) files\)", r"(\1 state dicts)", msg)
                for was, now in _FILE_WORDS:
                    msg = msg.replace(was, now)
        return msg

    return rename


def _as_passed_classes(msg: str) -> str:
    """`msg` with the .npz's words for its class count (`build.build`) said of the in-memory
    data: its num_classes is the third element of `data=(x, y, num_classes)`, passed, not an
    array the caller wrote."""
    from layerfast.build import NPZ_DECLARE, NPZ_DECLARED, NPZ_SET

    msg = msg.replace(NPZ_DECLARED.format(DATA_NAME), "passed as num_classes")
    msg = msg.replace(NPZ_DECLARE.format(DATA_NAME),
                      "or pass data=(x, y, num_classes) to declare the classes they miss")
    return re.sub(re.escape(NPZ_SET.format(DATA_NAME, "")) + r"(\d+)", r"or pass data=(x, y, \1)",
                  msg)


@contextlib.contextmanager
def named_as_passed(ckpts: Any, data: Any, inputs: dict[str, str] | None) -> Iterator[None]:
    """A LayerfastError raised inside, and every warning said inside, names the in-memory
    inputs as the caller passed them, not by the temp files `materialise` wrote (`ckpts` the
    folder, `data` the .npz it returned), which the caller never made: "the in-memory state
    dicts", each one "state dict τ=1", "data (x, y)". And what a message says of the .npz's
    num_classes is said of `data=(x, y, num_classes)` (`_as_passed_classes`): a count given
    there is "passed as num_classes", and where the head was built for the in-memory labels'
    largest + 1 and the state dicts have more classes, the fix named is that third element.
    Why: a notebook's test labels that missed a class were
    answered with a shape mismatch between two files under the temp dir, the model "built for
    9 classes, the largest label of '/tmp/layerfast-inputs-0/<sha256>/data.npz' (test) + 1",
    and no word of the third element the README offers for exactly that case; and warnings
    (bfloat16 state dicts) and shape errors still named each state dict `epoch_1.pt`."""
    if not inputs:
        yield
        return
    from layerfast.errors import renamed_warnings

    rename = _renamer(ckpts, data, inputs)
    try:
        with renamed_warnings(rename):
            yield
    except LayerfastError as exc:
        msg = rename(str(exc))
        if "data" in inputs:
            msg = _as_passed_classes(msg)
        if msg != str(exc):
            exc.args = (msg,)
        raise
