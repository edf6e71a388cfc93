"""Datasets: a `--data` spec -> `DataSource` -> sequential CPU batches -> `to_device`.

```python
src = open_data("fashion-mnist", split="test")
for x, y in src.batches(512):            # uint8 [b,C,H,W], int64 [b]; last partial batch kept
    x, y = to_device(x, y, src, "cuda", torch.bfloat16, channels_last=True)
```
Batches stay raw (uint8) on the host and are normalised on the device, once per batch, so the
one data pass of the engine (DESIGN.md §7.1) moves the fewest bytes. Specs, splits and
normalisation constants are documented in docs/data.md.
"""

from __future__ import annotations

import os
from pathlib import Path

from layerfast.data.device import to_device
from layerfast.data.source import DataSource
from layerfast.data.spec import SPLITS, VALID_SPECS, absolute_spec, open_data
from layerfast.errors import LayerfastError, refused_paths_are_input

__all__ = ["DataSource", "SPLITS", "VALID_SPECS", "convert", "ffcv_available", "open_data",
           "to_device"]  # fmt: skip


@refused_paths_are_input
def convert(spec: str | os.PathLike[str], to: str | Path, split: str = "test") -> Path:
    """Write dataset `spec` (split `split`) to the FFCV file `to` (fields `image`, `label`).

    Reading `to` back yields exactly the same batches as `spec`. The file appears atomically
    (temp file + os.replace): an interrupted conversion leaves no half-written .beton. A `to`
    whose sidecar says it holds the other split is refused, not replaced (`check_target`); one
    of the same split but another data set is replaced with a warning naming both. A path-like
    `spec` (`Path("x.npz")`, as `open_data` takes) is recorded in the sidecar as its string:
    it failed once all was converted, in the sidecar's json.dump, with a TypeError traceback.
    The path in it is recorded resolved (`absolute_spec`, as `train` records manifest.json's):
    a relative `x.npz` was later read against another command's current directory, so the
    same name in another folder was taken for the data the .beton holds."""
    from layerfast.data.beton import check_target, require_ffcv, warn_other_source
    from layerfast.data.beton import convert as _convert

    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    to = Path(to).expanduser()
    require_ffcv()  # before opening: do not decode a whole dataset only to fail
    check_target(to, split)
    source = open_data(spec, split, split_flag="--split")  # a valid spec from here on
    warn_other_source(to, spec, split)  # before the conversion, which can take an hour
    return _convert(source, absolute_spec(spec), split, to)


def ffcv_available() -> bool:
    """Whether FFCV imports (for `layerfast info`); leaves torch's thread count as it was."""
    from layerfast.data.beton import require_ffcv

    try:
        require_ffcv()
    except LayerfastError:
        return False
    return True
