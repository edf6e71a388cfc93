"""One layerfast call at a time per process: `analyze`, `train`, `demo` and `Evaluator.run`
hold a process-wide re-entrant lock while they run.

They change process-wide torch settings for their duration and put them back afterwards: the
TF32 flags (`engine.precision.tf32_allowed`), the intra-op thread count (distances, the demo),
torch's, numpy's and Python's global random states (`rng`, `analysis._keeps_rng`). Two calls
in two threads interleaved those saves and restores: each restored what it had saved while the
other's setting was in force, leaving cuDNN's TF32 off or both flags on (an fp32 and a bf16
`analyze` in two threads, measured), and a CUDA fp32 pass could have run with the other
thread's TF32 on. Serialised, each call sees and leaves the caller's settings, and the results
are those of the calls made one after the other. Re-entrant: `demo` calls `train` and `analyze`,
`analyze` calls `Evaluator.run`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["exclusive"]

_LOCK = threading.RLock()
F = TypeVar("F", bound=Callable[..., Any])


def exclusive(fn: F) -> F:
    """`fn` run while holding the process-wide layerfast lock (module docstring)."""

    @functools.wraps(fn)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            return fn(*args, **kwargs)

    return locked  # type: ignore[return-value]
