"""Loads the compiled extension `layerfast._C`, which registers `torch.ops.layerfast.*`."""

from __future__ import annotations

import torch  # noqa: F401  (the extension links against torch's libraries: load them first)

try:
    from layerfast import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "layerfast's compiled extension (layerfast._C) is not built or does not match the "
        f"installed torch ({exc}). From the layerfast source tree run:\n"
        "    pip install --no-build-isolation -e .\n"
        "(set CUDA_HOME=/usr/local/cuda to build the CUDA kernels too)."
    ) from exc

HAS_CUDA_KERNELS: bool = torch._C._dispatch_has_kernel_for_dispatch_key("layerfast::swap_", "CUDA")
