"""CheckpointDir: the τ-labelled checkpoints of one training run, loaded lazily and safely.

Memory contract (DESIGN §2): nothing large is cached across calls. `tensors(label, names)`
returns fresh copies of just `names`; the only state kept between calls is

* the key map of every file (strings only), and
* an LRU of at most `CACHE_SIZE` (64) opened files. An opened zip-format torch file is a memory
  map and an opened safetensors file a parsed header, so an entry costs address space, not RAM
  (pages read are the kernel's reclaimable page cache). A legacy non-zip torch file cannot be
  mapped and is held in RAM whole; at most ONE such file is kept open at a time.

  Why 64: variants read each unit from every checkpoint in turn, a cycle over the files; an LRU
  smaller than the number of checkpoints misses on every read. With 4 entries, ResNet-50 at
  block granularity (5 checkpoints, 126 variants) reopened a file 91 times: 9.4 s of a 13 s
  setup, mostly the weights-only unpickler.

So resident memory is bounded by the tensors a caller holds plus at most one legacy file,
whatever the number of checkpoints.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from layerfast.checkpoints.discover import MANIFEST, discover
from layerfast.checkpoints.keymap import (
    fill_tied,
    is_tolerated_missing,
    normalise,
    resolve,
    tied_keys,
)
from layerfast.checkpoints.safeload import OpenedFile, open_file
from layerfast.errors import LayerfastError

_MAX_LISTED = 20


def _listing(items: Sequence[str], what: str) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"{what} ({len(items)}): {shown}{more}"


class CheckpointDir:
    """One directory of checkpoints, one file per τ (DESIGN.md §2).

    Keys are state-dict keys of the model: wrappers unwrapped and prefixes stripped (see
    `layerfast.checkpoints.keymap`). Before `validate()` they are the normalised keys; after it,
    keys resolved against the reference model (e.g. Lightning's `model.` prefix dropped).
    """

    CACHE_SIZE = 64

    def __init__(self, path: str | os.PathLike[str], final: int | None = None) -> None:
        self.path = Path(path)
        self.files: dict[int, Path]
        self.manifest: dict[str, Any] | None
        self.files, self.manifest = discover(self.path)
        self.labels: list[int] = sorted(self.files)
        #: Whether the caller named the final model (`final=`/`--final`) rather than taking the
        #: largest τ: only then may the final model be the initialization (see `validate`).
        self.final_explicit: bool = final is not None
        #: Why this directory's training run did not finish, or None: `layerfast train` writes
        #: `"complete": false` into the manifest until its last epoch, so a run that was
        #: interrupted or diverged says so. Such a directory is still analysable (analysing a
        #: cut-short run can be intended); callers should warn with this text.
        self.incomplete: str | None = _incomplete_reason(self.manifest, self.labels)
        if final is None:
            self.final: int = self.labels[-1]
        else:
            if final not in self.files:
                raise LayerfastError(
                    f"final model {final}: no checkpoint with label {final} in {self.path} "
                    f"(labels: {self._label_list()})."
                )
            self.final = final
        self._lock = threading.RLock()
        self._open_files: OrderedDict[int, OpenedFile] = OrderedDict()
        self._reference: frozenset[str] | None = None
        #: key -> the reference's other names of the same tensor (`keymap.tied_keys`)
        self._ties: dict[str, tuple[str, ...]] = {}
        self._keymaps: dict[int, dict[str, str]] = {}
        #: label -> the model dtypes its tensors were found finite as (`_check_finite`)
        self._finite_ok: dict[int, frozenset[tuple[str, torch.dtype | None]]] = {}
        self._ties_ok: set[int] = set()

    def __repr__(self) -> str:
        return f"CheckpointDir({str(self.path)!r}, labels={self.labels}, final={self.final})"

    def _label_list(self) -> str:
        return ", ".join(map(str, self.labels))

    def check_label(self, label: int) -> None:
        """LayerfastError unless `label` is one of this directory's τ."""
        if label not in self.files:
            raise LayerfastError(
                f"no checkpoint with label {label} in {self.path} (labels: {self._label_list()})."
            )

    # -- opening ---------------------------------------------------------------------------

    def _open(self, label: int) -> OpenedFile:
        self.check_label(label)
        with self._lock:
            f = self._open_files.get(label)
            if f is not None:
                self._open_files.move_to_end(label)
                return f
            f = open_file(self.files[label])
            if f.in_memory:  # at most one whole-file-in-RAM entry
                for other in [k for k, v in self._open_files.items() if v.in_memory]:
                    del self._open_files[other]
            self._open_files[label] = f
            while len(self._open_files) > self.CACHE_SIZE:
                self._open_files.popitem(last=False)
            return f

    def _keymap(self, label: int) -> dict[str, str]:
        """Model key -> raw key in the file, computed once per file."""
        with self._lock:
            km = self._keymaps.get(label)
            if km is None:
                raw = self._open(label).keys()
                if self._reference is None:
                    km = normalise(raw) or {k: k for k in raw}
                else:
                    where = str(self.files[label])
                    km = fill_tied(resolve(raw, set(self._reference), where, self._ties),
                                   self._ties)  # fmt: skip
                self._keymaps[label] = km
            return km

    def close(self) -> None:
        """Drop every opened file (unmaps them); later calls reopen as needed."""
        with self._lock:
            self._open_files.clear()

    # -- reading ---------------------------------------------------------------------------

    def keys(self, label: int) -> list[str]:
        """The model state-dict keys the checkpoint at `label` holds."""
        return list(self._keymap(label))

    def shapes(self, label: int) -> dict[str, tuple[int, ...]]:
        """Key -> shape, from metadata only (no tensor data is read)."""
        f, km = self._open(label), self._keymap(label)
        return {k: f.shape(raw) for k, raw in km.items()}

    def stored_dtypes(self, label: int) -> list[str]:
        """The dtypes (torch's names, sorted) the checkpoint at `label` stores its floating
        tensors in, from metadata only. They are cast to the model's dtype on loading, so a
        float16 or bfloat16 file is analysed as stored, i.e. rounded: run.json records it."""
        return sorted(set(self.key_dtypes(label).values()))

    def key_dtypes(self, label: int) -> dict[str, str]:
        """Key -> the dtype (torch's name) each floating tensor of the checkpoint at `label` is
        stored in, from metadata only: what each is cast from, into the model's own tensor of
        that key (`checkpoints.stored.stored_dtypes` compares them per tensor)."""
        f, km = self._open(label), self._keymap(label)
        return {k: f.dtype_name(raw) for k, raw in km.items() if f.is_floating(raw)}

    def tensors(self, label: int, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """CPU copies of the tensors `names` (all when None) of the checkpoint at `label`.

        Only those tensors are read from the file; each call returns fresh tensors the caller
        may modify.
        """
        km = self._keymap(label)
        wanted = list(km) if names is None else list(names)
        missing = [n for n in wanted if n not in km]
        if missing:
            raise LayerfastError(
                f"{self.files[label]}: {_listing(missing, 'missing tensors')} "
                f"(the checkpoint has {len(km)} tensors)."
            )
        f = self._open(label)
        return {n: f.get(km[n]) for n in wanted}

    # -- validation ------------------------------------------------------------------------

    def validate(
        self,
        reference: Mapping[str, Any],
        labels: Iterable[int] | None = None,
        check_finite: bool = True,
    ) -> None:
        """Check keys and shapes of checkpoints against the model's state dict `reference`.

        Every missing key, unexpected key and shape mismatch of every checkpoint is listed in
        ONE LayerfastError (lists truncated after 20 per file; files with identical problems
        grouped), so a wrong --arch is diagnosed in one go. A missing `num_batches_tracked` is
        tolerated (eval never reads it). A floating model tensor fed from a non-floating one
        (int, bool, complex) is a dtype mismatch: load_state_dict would cast it silently and the
        weights would be wrong; floating -> floating (float16/bfloat16/float64 -> float32) is a
        harmless cast and non-floating model buffers (`num_batches_tracked`) take any dtype. With `check_finite`, every floating tensor is checked
        for NaN/Inf, one tensor at a time straight from the file mapping; a file that passed
        is not checked again for the same model dtypes. The reference's key set is remembered: it decides how each
        file's keys are resolved from now on (see `keymap.resolve`).
        Whether there is a trained model at all is `check_trained`'s question, not this one's.
        """
        ref_shapes = {k: tuple(v.shape) for k, v in reference.items()}
        ref_float = {
            k: str(v.dtype).removeprefix("torch.")
            for k, v in reference.items()
            if isinstance(getattr(v, "dtype", None), torch.dtype) and v.dtype.is_floating_point
        }
        ties = tied_keys(reference)
        with self._lock:
            ref = frozenset(ref_shapes)
            # a shape-only reference of the same keys cannot show ties: keep what is known
            if ref != self._reference or (ties and ties != self._ties):
                self._reference = ref
                self._ties = ties
                self._keymaps.clear()
                self._finite_ok.clear()
                self._ties_ok.clear()
        todo = self.labels if labels is None else list(labels)
        for label in todo:
            self.check_label(label)

        problems: dict[str, list[str]] = {}  # problem text -> file names
        for label in todo:
            km, shapes = self._keymap(label), self.shapes(label)
            missing = [k for k in ref_shapes if k not in km and not is_tolerated_missing(k)]
            unexpected = [k for k in km if k not in ref_shapes]
            bad_shape = [
                f"{k} {list(shapes[k])} in the checkpoint vs {list(s)} in the model"
                for k, s in ref_shapes.items()
                if k in km and tuple(shapes[k]) != tuple(s)
            ]
            f = self._open(label)
            dtypes = {k: f.dtype_name(km[k]) for k in ref_float if k in km}
            bad_dtype = [
                f"{k} {d} in the checkpoint vs {ref_float[k]} in the model"
                for k, d in dtypes.items()
                if not d.startswith(_FLOATING_NAMES)
            ]
            parts = []
            if missing:
                parts.append(_listing(missing, "missing keys"))
            if unexpected:
                parts.append(_listing(unexpected, "unexpected keys"))
            if bad_shape:
                parts.append(_listing(bad_shape, "shape mismatches"))
            if bad_dtype:
                why = "dtype mismatches (a floating tensor in the model needs a floating one)"
                parts.append(_listing(bad_dtype, why))
            if parts:
                problems.setdefault("; ".join(parts), []).append(self.files[label].name)
        if problems:
            blocks = [f"{_files(names)}: {text}" for text, names in problems.items()]
            raise LayerfastError(
                f"checkpoints in {self.path} do not match the model: " + " | ".join(blocks)
            )
        if check_finite:
            dtypes = {k: d if isinstance(d := getattr(v, "dtype", None), torch.dtype) else None
                      for k, v in reference.items()}
            self._check_finite(todo, dtypes)
        self._check_ties(todo)

    def check_trained(self) -> None:
        """LayerfastError when the final model is τ=0 only because nothing later exists.

        A directory holding only τ=0 (typically a `layerfast train` run that diverged in its
        first epoch) would otherwise be analysed as if it were trained, and every unit would
        look robust. Asking for it explicitly (`final=0`) is allowed: analysing the
        initialization on purpose is a legitimate, if unusual, experiment. A separate call
        rather than part of `__init__`/`validate`, because reading or validating a lone τ=0
        file (tests, tools, `layerfast train` itself) is fine; an analysis calls it.
        """
        if self.final == 0 and not self.final_explicit:
            why = f" ({self.incomplete})" if self.incomplete else ""
            raise LayerfastError(
                f"{self.path} holds only the initialization (τ=0){why}: there is no trained "
                "model to analyse. To analyse the initialization on purpose, name it as the "
                "final model (final=0; --final 0 on the command line)."
            )

    def _check_ties(self, labels: Sequence[int]) -> None:
        """One value per tied tensor: a file holding two names of a tensor the model ties
        (`fc.weight` is `embed.weight`) under two different values was saved from a model
        where they were not tied. Loading it keeps whichever name comes last, so the final
        model, each unit's reset (its own name's value) and distances.csv (per name) would
        each read another tensor: a reinit to the final τ was not the baseline. A `fullmodel`
        variant (both names at once) was refused only at evaluation, and a reinit-only run
        not at all. Reads only the tied tensors a file stores under several raw names."""
        bad: list[str] = []
        for label in labels:
            if label in self._ties_ok or not self._ties:
                continue
            f, km = self._open(label), self._keymap(label)
            seen: set[str] = set()
            found: list[str] = []
            for k, others in self._ties.items():
                if k in seen or k not in km:
                    continue
                names = [n for n in (k, *others) if n in km]
                seen.update(names)
                raws = list(dict.fromkeys(km[n] for n in names))
                if len(raws) < 2:  # one stored tensor serves every name
                    continue
                first = f.get(raws[0])
                for n in names[1:]:
                    if km[n] != raws[0] and not _same_values_nan_equal(first, f.get(km[n])):
                        found.append(f"{names[0]} and {n}")
            if found:
                bad.append(f"{self.files[label].name}: {', '.join(found[:5])}"
                           + (", ..." if len(found) > 5 else ""))
            else:
                self._ties_ok.add(label)
        if bad:
            raise LayerfastError(
                "checkpoints hold two different values for one tied tensor of the model: "
                + " | ".join(bad) + " (saved from a model where they were not tied? the model "
                "holds one tensor for both names)"
            )

    def _check_finite(self, labels: Sequence[int], ref: Mapping[str, torch.dtype | None]) -> None:
        """NaN/Inf in the floating tensors of `labels`, as the model will hold them (`ref`: key
        -> the model's dtype): a float64 value beyond float32's range is inf once loaded."""
        bad: list[str] = []
        # a verdict holds for the dtypes it was reached under: a float64 1e300 is finite for a
        # float64 model and Inf for a float32 one with the same keys
        seen_as = frozenset(ref.items())
        for label in labels:
            if self._finite_ok.get(label) == seen_as:
                continue
            f, km = self._open(label), self._keymap(label)
            keys = [k for k in km if k in ref and f.is_floating(km[k])]
            found = [k for k in keys if not f.all_finite(km[k], ref[k])]
            if found:
                bad.append(f"{self.files[label].name}: {_listing(found, 'tensors')}")
            else:
                self._finite_ok[label] = seen_as
        if bad:
            raise LayerfastError(
                "checkpoints hold NaN or Inf weights: " + " | ".join(bad) + " (a diverged run? "
                "a value beyond the model's dtype's range counts: it is Inf once loaded)"
            )


def _same_values_nan_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape and values, NaN equal to NaN (non-finite values are `_check_finite`'s)."""
    if a.shape != b.shape:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


#: Stored dtypes (torch's names) that may feed a floating model tensor: a float cast is harmless.
_FLOATING_NAMES: tuple[str, ...] = ("float", "bfloat")


def _incomplete_reason(manifest: Mapping[str, Any] | None, labels: Sequence[int]) -> str | None:
    """A one-line reason when the manifest says its training run did not finish, else None."""
    if not manifest or manifest.get("complete", True) is not False:
        return None
    epochs = manifest.get("epochs")
    upto = f"checkpoints up to epoch {labels[-1]}" if labels else "no checkpoints"
    of = f" of {epochs}" if isinstance(epochs, int) and not isinstance(epochs, bool) else ""
    stopped = manifest.get("stopped")  # why, where layerfast train knew (a divergence, ...)
    why = (f"it stopped: {' '.join(stopped.split())[:300]}" if isinstance(stopped, str)
           and stopped.strip() else "it was interrupted or diverged")
    return f"its {MANIFEST} says the training run did not finish ({upto}{of}): {why}"


def _files(names: list[str]) -> str:
    if len(names) <= 3:
        return ", ".join(names)
    return f"{names[0]}, ..., {names[-1]} ({len(names)} files)"
