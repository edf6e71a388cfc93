"""`layerfast info`: what this installation is made of and what it can run.

Prints the versions (layerfast, torch, torch's CUDA, Python), whether the CUDA kernels of
`layerfast._C` were compiled and whether they can run here (a visible GPU, checked by a tiny
`swap_` on it), every `torch.ops.layerfast.*` op with the dispatch keys that have a kernel, the
GPU architectures compiled into the extension and those torch was built for, whether FFCV is
importable, whether the CPU has native bf16 instructions, and the thread counts. `--json`
prints the same as one JSON object.

    layerfast info [--json]
    python -m layerfast.info [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import sys
from pathlib import Path
from typing import Any

import torch

import layerfast
from layerfast import _ext
from layerfast.errors import output_failed

# Dispatch keys reported for each op. `Meta` is the C++ meta kernel; the Python fake
# implementation (torch.library.register_fake, in layerfast/ops.py) is reported as `fake`.
DISPATCH_KEYS = ("CPU", "CUDA", "Meta")

_FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)


def registered_ops() -> list[str]:
    """Qualified names (`layerfast::swap_`, ...) of every op registered in the `layerfast`
    namespace, sorted."""
    get_all = getattr(torch._C, "_dispatch_get_all_op_names", None)
    if get_all is not None:
        return sorted(n for n in get_all() if n.startswith("layerfast::"))
    # Older torch: probe the op names layerfast.ops documents.
    names = ("swap_", "score_")
    try:
        from layerfast import ops

        names = tuple(n for n in ops.__all__ if n.endswith("_") and "reference" not in n)
    except Exception:  # noqa: BLE001 - best effort on old torch only
        pass
    out = []
    for n in names:
        try:
            torch._C._dispatch_dump(f"layerfast::{n}")
            out.append(f"layerfast::{n}")
        except RuntimeError:
            pass
    return sorted(out)


def _has_fake(qualname: str) -> bool:
    try:
        from torch._library.simple_registry import singleton

        return singleton.find(qualname).fake_impl.kernel is not None
    except Exception:  # noqa: BLE001 - private API; absent on some torch versions
        return False


def op_kernels() -> dict[str, list[str]]:
    """{op name: dispatch keys (among DISPATCH_KEYS, plus `fake`) that have a kernel}."""
    try:  # registers the Python fake implementations, if the ops module is there
        import layerfast.ops  # noqa: F401
    except Exception:  # noqa: BLE001 - info must still report the compiled side
        pass
    out: dict[str, list[str]] = {}
    for q in registered_ops():
        keys = [k for k in DISPATCH_KEYS if torch._C._dispatch_has_kernel_for_dispatch_key(q, k)]
        if _has_fake(q):
            keys.append("fake")
        out[q.split("::", 1)[1]] = keys
    return out


def extension_path() -> str | None:
    return getattr(getattr(layerfast, "_C", None), "__file__", None)


def fatbin_archs(path: str | os.PathLike[str] | None) -> list[str]:
    """GPU code embedded in a shared library: `sm_XY` for machine code, `compute_XY` for PTX.

    Reads the CUDA fat binary headers (magic 0xBA55ED50) directly, so no CUDA toolkit is needed.
    Empty when the file has no device code or cannot be read.
    """
    if path is None:
        return []
    try:
        data = Path(path).read_bytes()
    except OSError:
        return []
    found: set[tuple[int, str]] = set()
    i = data.find(_FATBIN_MAGIC)
    while i != -1 and i + 16 <= len(data):
        _version, hsize, fsize = struct.unpack_from("<HHQ", data, i + 4)
        p, end = i + hsize, min(i + hsize + fsize, len(data))
        while hsize and p + 32 <= end:
            kind, _ev, ehsize, padded = struct.unpack_from("<HHII", data, p)
            sm = struct.unpack_from("<I", data, p + 28)[0]
            if ehsize == 0 or kind not in (1, 2):
                break
            found.add((sm, f"{'compute' if kind == 1 else 'sm'}_{sm}"))
            p += ehsize + padded
        i = data.find(_FATBIN_MAGIC, i + 4)
    return [name for _, name in sorted(found)]


def cuda_check() -> tuple[bool, str]:
    """(ok, detail): can the CUDA kernels run here? Runs a tiny `swap_` on the GPU."""
    if not _ext.HAS_CUDA_KERNELS:
        return False, "the extension was built without CUDA kernels"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    try:
        a = torch.arange(8, dtype=torch.float32, device="cuda")
        b = -a
        torch.ops.layerfast.swap_.default([a], [b])
        torch.cuda.synchronize()
        ref = torch.arange(8, dtype=torch.float32)
        if not (torch.equal(a.cpu(), -ref) and torch.equal(b.cpu(), ref)):
            return False, "swap_ on cuda ran but returned wrong values"
    except Exception as exc:  # noqa: BLE001 - report any failure, e.g. no kernel image
        return False, f"swap_ on cuda failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return True, "swap_ on cuda ok"


def _ffcv() -> dict[str, Any]:
    """Is FFCV importable, and which version? Importing ffcv calls `torch.set_num_threads(1)`
    (ffcv/pipeline/compiler.py); the thread count is restored and the change reported."""
    threads = torch.get_num_threads()
    try:
        import ffcv  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError or a broken native dependency
        return {"available": False, "version": None, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        after = torch.get_num_threads()
        torch.set_num_threads(threads)
    try:  # ffcv.__version__ is stale in 1.0.2 (it says 0.0.3rc1): ask the installed metadata
        from importlib.metadata import version as dist_version

        version = dist_version("ffcv")
    except Exception:  # noqa: BLE001
        version = getattr(sys.modules["ffcv"], "__version__", None)
    out: dict[str, Any] = {"available": True, "version": version, "error": None}
    if after != threads:
        out["note"] = f"importing ffcv sets torch threads {threads} -> {after}"
    return out


#: /proc/cpuinfo flags of native bfloat16 arithmetic: x86's AVX512-BF16 and AMX-BF16, arm64's BF16
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_bf16(cpuinfo: str | None = None) -> dict[str, Any]:
    """Whether this CPU has native bfloat16 instructions (`native`: True, False, or None where
    it cannot be told: no /proc/cpuinfo), and which of `BF16_FLAGS` it has. Why: on the CPU,
    `--precision bf16` runs the matmuls in bf16 through oneDNN, several times the fp32 rate on a
    CPU that has them (BENCHMARKS.md, series 7) and with no such rate to gain where it has not;
    `auto` stays fp32 on the CPU either way."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return {"native": None, "flags": []}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            have = set(value.split())
            found = [f for f in BF16_FLAGS if f in have]
            return {"native": bool(found), "flags": found}
    return {"native": None, "flags": []}


def collect() -> dict[str, Any]:
    """Everything `layerfast info` reports, as a JSON-serialisable dict."""
    cuda_built = torch.backends.cuda.is_built()
    gpu_visible = torch.cuda.is_available()
    runnable, detail = cuda_check()
    gpus = []
    if gpu_visible:
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            gpus.append({"name": torch.cuda.get_device_name(i), "capability": f"{major}.{minor}"})
    ext = extension_path()
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count()
    return {
        "layerfast": layerfast.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "extension": ext,
        "cuda_kernels_compiled": bool(_ext.HAS_CUDA_KERNELS),
        "cuda_kernels_runnable": runnable,
        "cuda_check": detail,
        "gpus": gpus,
        "extension_gpu_code": fatbin_archs(ext),
        "torch_cuda_arch_list": torch.cuda.get_arch_list() if cuda_built else [],
        "ops": op_kernels(),
        "ffcv": _ffcv(),
        "cpu_bf16": cpu_bf16(),
        "threads": {
            "torch_intra_op": torch.get_num_threads(),
            "torch_inter_op": torch.get_num_interop_threads(),
            "cpus": cpus,
        },
    }


def format_text(info: dict[str, Any]) -> str:
    def yn(b: bool) -> str:
        return "yes" if b else "no"

    ffcv = info["ffcv"]
    lines = [
        f"layerfast       {info['layerfast']}",
        f"torch           {info['torch']} (CUDA {info['torch_cuda'] or 'none'})",
        f"python          {info['python']} ({info['platform']})",
        f"extension       {info['extension']}",
        f"CUDA kernels    compiled: {yn(info['cuda_kernels_compiled'])}; "
        f"runnable here: {yn(info['cuda_kernels_runnable'])} ({info['cuda_check']})",
    ]
    for i, g in enumerate(info["gpus"]):
        lines.append(f"GPU {i}           {g['name']} (compute capability {g['capability']})")
    lines.append(
        f"GPU code        {', '.join(info['extension_gpu_code']) or 'none'}  (in layerfast._C)"
    )
    if info["torch_cuda_arch_list"]:
        lines.append(f"torch built for {', '.join(info['torch_cuda_arch_list'])}")
    lines.append("ops             torch.ops.layerfast.*: dispatch keys with a kernel")
    ops = info["ops"].items() or [("(none registered)", [])]
    width = max(14, *(len(n) + 2 for n, _ in ops))
    for name, keys in ops:
        lines.append(f"  {name:<{width}}{', '.join(keys) or '-'}")
    if ffcv["available"]:
        note = f"  (note: {ffcv['note']})" if ffcv.get("note") else ""
        lines.append(f"FFCV            {ffcv['version'] or 'installed (version unknown)'}{note}")
    else:
        lines.append(f"FFCV            not importable ({ffcv['error']})")
    bf16 = info["cpu_bf16"]
    if bf16["native"]:
        lines.append(
            f"CPU bf16        native ({', '.join(bf16['flags'])}): --precision bf16 "
            "runs fast on the CPU (auto stays fp32 there)"
        )
    elif bf16["native"] is False:
        lines.append(
            "CPU bf16        not native (no avx512_bf16, amx_bf16 or bf16 flag): "
            "keep fp32 on the CPU"
        )
    else:
        lines.append("CPU bf16        unknown (no CPU flags to read here)")
    t = info["threads"]
    lines.append(
        f"threads         torch intra-op {t['torch_intra_op']}, inter-op {t['torch_inter_op']}; "
        f"{t['cpus']} CPUs usable"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="layerfast info",
        description="Versions, compiled kernels, registered ops, FFCV, CPU bf16 and threads.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    info = collect()
    try:
        print(json.dumps(info, indent=2) if args.json else format_text(info))
        sys.stdout.flush()
    except OSError as exc:  # `... | head` (the reader left early) or `> /dev/full`
        status = output_failed(exc)
        if status is None:
            raise
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
