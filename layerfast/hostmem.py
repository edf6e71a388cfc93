"""glibc malloc in its steady state from a command's start (`layerfast analyze`, `bench`,
`train`).

glibc serves an allocation of 128 KiB or more with a fresh `mmap` and unmaps it on `free`; each
time a freed mmapped block is larger than the threshold, the threshold rises to its size, up to
32 MiB (`DEFAULT_MMAP_THRESHOLD_MAX` on 64-bit), and the trim threshold to twice that. A CPU pass
allocates and frees activations of a few MB per step and per batch, so until enough large blocks
have been freed every one of them is mapped, zero-filled by the kernel page by page, and
unmapped again: measured on the 2-core CI machine, ResNet-20 at block granularity (33 variants,
512 CIFAR-sized samples, one thread) spent 2.8-3.0 s of system time in page faults beside 4.0 s
of user time with prefix sharing alone, 1.9 s with fan-out (whose larger buffers raise the
threshold sooner); with the thresholds set at their ceiling first, 0.1-0.2 s. `bench` times the
modes after warm-ups partly for this reason (BENCHMARKS.md).

Setting them is what glibc's own rule ends at; it changes no result, only when memory returns to
the system (freed blocks below 32 MiB stay in the heap until 64 MiB at its top are free). It is
done for the commands only: a library call must not change a notebook's process-wide malloc (a
notebook gets the same by starting Python with `MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=67108864`). A user's own malloc settings win: with any of those variables
or a `glibc.malloc` tunable set, nothing is changed."""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # mallopt parameters (<malloc.h>)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: where its rule ends
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # what the rule sets beside it

_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                  "MALLOC_MMAP_MAX_")


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")  # type: ignore[union-attr]
    except (ValueError, OSError, AttributeError):  # musl, macOS, Windows: no such name
        return False


def steady_malloc() -> bool:
    """Set glibc's mmap and trim thresholds to where its dynamic rule ends; returns whether
    they were set (False off glibc, or when the user set malloc's own knobs)."""
    if any(v in os.environ for v in _USER_SETTINGS):
        return False
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if not _glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; the mmap threshold first: setting it turns the rule off
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
