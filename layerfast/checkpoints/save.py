"""Writing a checkpoint so that a reader never sees half of one, and a full disk says so.

Used by `layerfast train` for its checkpoints and by `layerfast bench` for its synthetic ones.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from layerfast.checkpoints.discover import new_file_mode


class _KeepsWriteError:
    """A file's `write` that remembers the first OSError: torch's zip writer swallows it and
    fails later with "[enforce fail at inline_container.cc] unexpected pos", which names neither
    the disk nor the file. With the OSError kept, a full disk is an OSError the caller can say
    in one line."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.f.flush()


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a hidden temporary in the same directory, fsync, then rename over `path`:
    discovery ignores hidden files, and a rename is all-or-nothing."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            w = _KeepsWriteError(f)
            try:
                torch.save(obj, w)
            except RuntimeError:
                if w.error is not None:  # the disk's error, not torch's "unexpected pos"
                    raise w.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, new_file_mode())  # mkstemp's 0600 -> what open() would have given
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
