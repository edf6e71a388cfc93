"""engine.phases.PhaseClock: seconds per phase, wall time on the CPU, CUDA events on a GPU."""

from __future__ import annotations

import time

import pytest
import torch

from layerfast.engine.phases import PhaseClock


def test_cpu_phases_accumulate_wall_time_per_name() -> None:
    clock = PhaseClock(torch.device("cpu"))
    for _ in range(2):
        with clock("a"):
            time.sleep(0.02)
    with clock("b"):
        pass
    with pytest.raises(ValueError), clock("c"):  # a phase that raises still counts its time
        time.sleep(0.01)
        raise ValueError
    t = clock.totals()
    assert set(t) == {"a", "b", "c"} and not clock.cuda
    assert 0.04 <= t["a"] < 1.0 and 0 <= t["b"] < t["a"] and 0.01 <= t["c"] < 1.0


@pytest.mark.cuda
def test_cuda_phases_time_the_device_work_not_the_launch() -> None:
    dev = torch.device("cuda")
    clock = PhaseClock(dev)
    a = torch.randn(4096, 4096, device=dev)
    a @ a  # cuBLAS's handle and workspace are made on the first call, on the host
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with clock("matmul"):
        for _ in range(20):
            a = (a @ a).div_(64)
    launch = time.perf_counter() - t0  # the host returns long before the GPU is done
    t = clock.totals()  # waits for the events
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    assert clock.cuda and 0 < t["matmul"] <= wall and t["matmul"] > launch


def test_cuda_events_mark_the_runs_own_device_stream(monkeypatch) -> None:
    """`Event.record()` with no stream marks the *current* device's stream: a run on cuda:1
    (current device 0) timed another GPU's queue, and every phase read ~0. The events now mark
    the run's device's current stream. Simulated with fake events and streams."""
    asked, marked = [], []

    class FakeEvent:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing

        def record(self, stream=None) -> None:
            marked.append(stream)

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, end) -> float:
            return 250.0

    def current_stream(device=None):
        asked.append(device)
        return f"stream of {device}"

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    dev = torch.device("cuda", 1)
    clock = PhaseClock(dev)
    with clock("baseline"):
        pass
    assert asked == [dev] and marked == [f"stream of {dev}"] * 2
    assert clock.totals() == {"baseline": 0.25}
