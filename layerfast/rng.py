"""Seeding the host's global generators for a span of code, and giving them back afterwards.

torch's generators have `torch.random.fork_rng`; Python's `random` and numpy's global generator
have no such thing, yet user code draws from them: a factory that initialises with
`np.random.randn`, a `reset_parameters` that calls `random.gauss`. layerfast seeds them wherever
it seeds torch's CPU generator for a result that must be reproducible per seed (training's θ⁰,
a re-randomization's draw), and restores the caller's states afterwards.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np

__all__ = ["forked_host_generators", "seeded_host_generators"]


@contextlib.contextmanager
def forked_host_generators() -> Iterator[None]:
    """Python's `random` and numpy's global generator put back on exit, as
    `torch.random.fork_rng` does for torch's: code run inside may draw from them freely."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextlib.contextmanager
def seeded_host_generators(seed: int) -> Iterator[None]:
    """Python's `random` and numpy's global generator seeded with `seed`, restored on exit.

    numpy takes seeds in 0..2³²−1, so it gets the seed mod 2³² (a negative seed too); `random`
    takes any integer.
    """
    with forked_host_generators():
        random.seed(seed)
        np.random.seed(seed % 2**32)
        yield
