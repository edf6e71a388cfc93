"""Shared pytest fixtures and markers for the layerfast tests.

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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: as fast for tiny models, and several times faster than
    two on a busy shared 2-core CPU (OpenMP barriers spin). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory: pytest.TempPathFactory):
    """fcn3x256 trained 3 epochs on `digits` (checkpoints + manifest), shared by the analysis,
    CLI and resume tests. Read-only: tests that corrupt checkpoints copy the directory first."""
    from layerfast.train import train

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ckpts")
    train("fcn3x256", "digits", 3, out, device="cpu", progress=False)
    torch.set_num_threads(before)
    return out
