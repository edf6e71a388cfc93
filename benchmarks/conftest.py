"""Shared pytest configuration for the benchmarks (`pytest benchmarks/ --benchmark-enable`).

Benchmark modules are `bench_*.py`, collected by the hook below.
`@pytest.mark.cuda`: the test needs a CUDA GPU; it is skipped where `torch.cuda.is_available()`
is False (the marker is declared in pyproject.toml).
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def pytest_collect_file(parent: pytest.Collector, file_path):
    # benchmark modules are named bench_*.py (pyproject's pytest settings collect test_*.py only);
    # a file named on the command line is collected by pytest itself
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
