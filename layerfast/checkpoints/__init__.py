"""Checkpoint directories (DESIGN.md §2): τ labels, safe lazy loading, validation.

`discover` maps files to labels (manifest.json or the last integer of the file name),
`safeload` opens one file without running pickled code and without reading it whole,
`keymap` finds the state dict inside a file and maps its keys onto the model's, and
`directory.CheckpointDir` ties them together behind the interface in docs/internals.md.
"""

from __future__ import annotations

from layerfast.checkpoints.directory import CheckpointDir
from layerfast.checkpoints.discover import MANIFEST, SUFFIXES, label_from_stem, write_manifest
from layerfast.checkpoints.safeload import ALLOWED_GLOBALS

__all__ = [
    "ALLOWED_GLOBALS",
    "MANIFEST",
    "SUFFIXES",
    "CheckpointDir",
    "label_from_stem",
    "write_manifest",
]
