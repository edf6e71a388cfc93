"""Loads the compiled extension `layerfast._C`, which registers `torch.ops.layerfast.*`."""

from __future__ import annotations

import importlib
import os

import torch  # the extension links against torch's libraries: load them first

_FIX = (
    "From the layerfast source tree run:\n"
    "    pip install --no-build-isolation -e .\n"
    "(set CUDA_HOME=/usr/local/cuda to build the CUDA kernels too)."
)

try:
    # Not `from layerfast import _C`: while layerfast/__init__.py runs, a missing _C makes that
    # statement fail with "cannot import name '_C' from partially initialized module 'layerfast'
    # (most likely due to a circular import)", which sends the user looking for a circular import.
    importlib.import_module("layerfast._C")
except ImportError as exc:  # pragma: no cover - exercised by subprocess tests (test_build.py)
    where = os.path.dirname(os.path.abspath(__file__))
    if isinstance(exc, ModuleNotFoundError) and exc.name == "layerfast._C":
        why = f"is not built: there is no _C*.so in {where}"
    else:  # the file is there but does not load: built for another torch, CUDA or Python
        why = (
            f"is not built for the installed torch {torch.__version__} "
            f"(CUDA {torch.version.cuda or 'none'}): loading it failed with: {exc}"
        )
    raise ImportError(f"layerfast's compiled extension (layerfast._C) {why}. {_FIX}") from exc

HAS_CUDA_KERNELS: bool = torch._C._dispatch_has_kernel_for_dispatch_key("layerfast::swap_", "CUDA")
