"""Build `layerfast._C`: the compiled ops, registered as `torch.ops.layerfast.*`.

The C++ kernels (csrc/*.cpp, csrc/cpu/*.cpp) are always built. The CUDA kernels
(csrc/cuda/*.cu) are built when torch was built with CUDA and nvcc is found, or when
FORCE_CUDA=1; FORCE_CUDA=0 builds the C++ kernels only. A machine without a visible GPU gets a
default TORCH_CUDA_ARCH_LIST.
Build with `pip install --no-build-isolation -e .` so the extension compiles against the
torch you already have.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Hopper (H100/H200) and Ampere, plus PTX so newer GPUs can JIT. Used only when no GPU is visible
# and the user did not choose; compile time grows with each architecture.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _nvcc_version(cuda_home: str) -> str | None:
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.check_output([nvcc, "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _toolkit_ok(home: str | None) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, "bin", "nvcc")) and any(
        glob.glob(os.path.join(home, d, "libcudart.so*")) for d in ("lib64", "lib")
    )


def _find_cuda_home() -> str | None:
    """A CUDA toolkit directory (bin/nvcc and lib64/libcudart), or None.

    torch's own guess takes the parent of the first `nvcc` on PATH; a wrapper such as
    /usr/local/bin/nvcc then gives /usr/local, whose lib has no libcudart, and the link fails.
    We check the candidates and export the first real toolkit as CUDA_HOME before
    torch.utils.cpp_extension reads it."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if _toolkit_ok(home):
            return home
    return None


def _want_cuda(torch_cuda: str | None, cuda_home: str | None) -> bool:
    """FORCE_CUDA=1: always (and fail if it cannot); FORCE_CUDA=0: never (the C++ kernels
    only, e.g. next to an nvcc that does not match torch); unset: when both are there."""
    force = os.environ.get("FORCE_CUDA", "")
    if force in ("0", "1"):
        return force == "1"
    return bool(torch_cuda) and bool(cuda_home)


def _check_versions(torch_cuda: str | None, cuda_home: str | None) -> None:
    """Stop early and clearly when nvcc and torch disagree: a mismatched build links but fails at
    import or, worse, at the first kernel launch."""
    if not cuda_home:
        sys.exit("layerfast build: FORCE_CUDA=1 but no CUDA toolkit found; set CUDA_HOME.")
    nvcc = _nvcc_version(cuda_home)
    if torch_cuda is None:
        sys.exit(
            f"layerfast build: nvcc {nvcc} found at {cuda_home}, but the installed torch has no "
            "CUDA; install a CUDA build of torch or unset FORCE_CUDA."
        )
    if nvcc is None:
        sys.exit(f"layerfast build: cannot run {cuda_home}/bin/nvcc --version.")
    if nvcc.split(".")[0] != torch_cuda.split(".")[0] or nvcc != ".".join(torch_cuda.split(".")[:2]):
        sys.exit(
            f"layerfast build: nvcc is CUDA {nvcc} ({cuda_home}) but torch was built with CUDA "
            f"{torch_cuda}. Install the torch build for CUDA {nvcc}, or point CUDA_HOME at a "
            f"CUDA {torch_cuda} toolkit, or build the C++ kernels only with FORCE_CUDA=0."
        )


def extensions():
    found = _find_cuda_home()
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    torch_cuda = torch.version.cuda
    cuda_home = found
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # torch adds -DPy_LIMITED_API for py_limited_api=True. OpenMP: at::parallel_for in the CPU
    # kernels is inline ATen code that runs serially unless the extension itself has it.
    cxx = ["-O3", "-fopenmp"]
    link = ["-fopenmp"]
    use_cuda = _want_cuda(torch_cuda, cuda_home)
    if use_cuda:
        _check_versions(torch_cuda, cuda_home)
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return [
            CUDAExtension(
                "layerfast._C",
                sources,
                extra_compile_args={"cxx": cxx + ["-DLAYERFAST_WITH_CUDA"], "nvcc": nvcc},
                extra_link_args=link,
                py_limited_api=True,
            )
        ]
    return [
        CppExtension("layerfast._C", sources, extra_compile_args={"cxx": cxx},
                     extra_link_args=link, py_limited_api=True)
    ]


def _limited_api_tag() -> str:
    """The wheel's abi3 tag: the oldest Python the extension is compiled for. torch compiles every
    py_limited_api extension with -DPy_LIMITED_API=cpp_extension.min_supported_cpython (3.10 in
    torch 2.13 and 2.14), so a fixed "cp39" tag claimed a Python the binary was never built for."""
    from torch.utils import cpp_extension

    version = int(getattr(cpp_extension, "min_supported_cpython", "0x030A0000"), 16)
    return f"cp{version >> 24}{(version >> 16) & 0xFF}"


def main() -> None:
    found = _find_cuda_home()
    if found and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = found  # before cpp_extension reads it at import
    from torch.utils.cpp_extension import BuildExtension

    setup(
        # Here, not in pyproject.toml: see the comment on `dynamic` there.
        license="BSD-3-Clause",
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        options={"bdist_wheel": {"py_limited_api": _limited_api_tag()}},
    )


if __name__ == "__main__":
    main()
