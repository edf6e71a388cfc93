"""`PhaseClock`: where a pass spends its time, per phase (data, baseline, fanned, swapped).

On the CPU a phase's time is wall time. On CUDA wall time around asynchronous launches measures
the launches, not the work (the host runs ahead until the queue fills), so each phase is
bracketed by CUDA events on the run's device's current stream instead, and the events are read
once at the end, after the pass's own final sync. Event time is the time the stream spent between the two
marks: device work, plus any wait for the host when the device had caught up with it.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch


class PhaseClock:
    """Accumulates seconds per named phase; `totals()` returns them (and syncs on CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self._seconds: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            # the run's device's stream: `record()` alone marks the *current* device's, which on
            # cuda:1 is another GPU's queue, and every phase would read ~0
            stream = torch.cuda.current_stream(self.device)
            start.record(stream)
            try:
                yield
            finally:
                end.record(stream)
                self._events.append((name, start, end))
        else:
            t = time.perf_counter()
            try:
                yield
            finally:
                self._seconds[name] += time.perf_counter() - t

    def totals(self) -> dict[str, float]:
        """Seconds per phase so far. On CUDA this waits for the recorded events (a sync)."""
        if self._events:
            self._events[-1][2].synchronize()
            for name, start, end in self._events:
                self._seconds[name] += start.elapsed_time(end) / 1000.0
            self._events.clear()
        return dict(self._seconds)
